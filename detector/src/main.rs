use std::process::ExitCode;

use clap::Parser;
use detector::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(detector::agent::run(args))),
        Command::Replay(args) => detector::replay::replay(args),
        Command::CheckConfig { file } => detector::config::FileConfig::load(&file)
            .map(|c| print!("{}", c.to_toml()))
            .map_err(anyhow::Error::from),
        Command::BenchXdp(args) => detector::bench::xdp(args),
        Command::BenchIngest(args) => detector::bench::ingest(args),
        Command::BenchEngine(args) => detector::bench::engine(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
