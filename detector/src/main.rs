//! The `detector` binary: the allocator, the logger, and one command of the command line
//! (`run`, `replay`, `central`, `check-config`), each a shell around the library.

use std::process::ExitCode;

use clap::Parser;
use detector::cli::{Cli, Command};

/// mimalloc maps its memory in large aligned regions and asks the kernel for transparent
/// huge pages on them: the detection engine holds millions of small tables spread over
/// gigabytes, and with 4 KiB pages most of its memory accesses also missed the TLB
/// (`cargo xtask bench engine`: about a third of the time in the steady state).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn tune_allocator() {
    // Freed memory goes back to the kernel after 1 s instead of 10 ms: as peers leave the
    // window and others arrive, memory is freed and taken again all the time, and giving
    // it back at once made the kernel zero huge pages over and over (a quarter of the
    // engine benchmark's time went to the system).
    // SAFETY: sets an allocator option; no other thread exists yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
}

/// Lets a command whose output goes to a pipe end quietly when the reader closes it
/// (`detector replay ... 2>&1 | head -1`), as Unix tools do, instead of panicking on the
/// next write. Not for `run`: a service keeps going whatever happens to its stderr.
fn end_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Replay(_) | Command::CheckConfig { .. }
    ) {
        end_on_closed_pipe();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let args = args.with_file_listeners()?;
                rt.block_on(detector::agent::run(args))
            }),
        Command::Replay(args) => detector::replay::replay(args.options()),
        Command::Central(args) => detector::scaleout::central::run(&args.options()),
        // A YAML file is an --http-config file.
        Command::CheckConfig { file }
            if file.extension().is_some_and(|e| e == "yml" || e == "yaml") =>
        {
            detector::status::access::WebConfig::load(&file)
                .map(|c| print!("{}", c.describe()))
                .map_err(anyhow::Error::from)
        }
        Command::CheckConfig { file } => detector::config::FileConfig::load(&file)
            .map(|c| print!("{}", c.to_toml()))
            .map_err(anyhow::Error::from),
        Command::Man => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(anyhow::Error::from)
                .map(|()| {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&out);
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a message that already quotes its cause
/// (`cannot read X: No such file or directory`) is not followed by it again.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
