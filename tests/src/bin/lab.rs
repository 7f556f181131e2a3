//! `lab`: a real BitTorrent swarm and real benign traffic in network namespaces, the
//! agent on the uplink, and a labelled scorecard. Run it with `cargo xtask lab`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tests::lab::{self, LabConfig};

#[derive(Parser)]
#[command(
    name = "lab",
    about = "Real P2P and benign hosts in network namespaces, scored"
)]
struct Args {
    /// How long the hosts run, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(30..))]
    duration: u64,
    /// BitTorrent peers in the swarm (one libtorrent session and address each).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=2000))]
    peers: u64,
    /// Seed for every address, port and timing choice (the same seed, the same lab).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the scorecard as JSON here.
    #[arg(long)]
    scorecard: Option<PathBuf>,
    /// Working directory (wiped first): logs, torrents, exports.
    #[arg(long, default_value = "/tmp/detector-lab")]
    dir: PathBuf,
    /// The meter's 1-in-N packet sampling (1: every packet); sampled, the scorecard holds
    /// the targets of detection under sampling.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
    sampling: u32,
    /// See the uplink through sFlow (pmacctd's sfprobe sampling 1 in --sampling) instead
    /// of the XDP meter.
    #[arg(long)]
    sflow: bool,
    /// The agent binary (default: the one built beside this binary).
    #[arg(long)]
    detector: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from));
    let detector = args
        .detector
        .or_else(|| here.map(|d| d.join("detector")))
        .unwrap_or_else(|| PathBuf::from("detector"));
    if !detector.exists() {
        eprintln!(
            "lab: error: agent binary {} not found: build it (cargo build -p detector) or pass --detector PATH",
            detector.display()
        );
        return ExitCode::FAILURE;
    }
    lab::catch_interrupts();
    let cfg = LabConfig {
        duration: Duration::from_secs(args.duration),
        peers: args.peers as usize,
        seed: args.seed,
        dir: args.dir,
        detector,
        scripts: tests::workspace_root().join("tests/lab"),
        sampling: args.sampling,
        sflow: args.sflow,
    };
    match lab::run(&cfg) {
        Ok(card) => {
            println!("{}", card.table());
            if let Some(path) = &args.scorecard {
                let text = serde_json::to_string_pretty(&card.json).expect("json");
                if let Err(e) = std::fs::write(path, text + "\n") {
                    eprintln!("lab: error: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if card.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
