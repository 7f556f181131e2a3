//! Project tasks: `cargo xtask setup | run | test | bench`.
//!
//! `setup` installs what is missing (idempotent, says what it does); `run` and `test`
//! call it first, so a fresh Debian machine needs only `cargo xtask run -- ...` or
//! `cargo xtask test`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench_agent;
mod package;
mod soak;
mod timing;

#[derive(Parser)]
#[command(name = "xtask", about = "Set-up, run, test and benchmark the detector")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites: LLVM 22 (apt), rust-src, bpf-linker, test peers.
    Setup,
    /// Build (release) and run the agent: `cargo xtask run -- --iface IFACE --export HOST:PORT`.
    Run {
        /// Arguments for `detector run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the whole test suite: unit tests, then the privileged tests (BPF, XDP,
    /// network namespaces) as root.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// The lab: a real BitTorrent swarm and real benign servers and clients in network
    /// namespaces, the agent on the uplink, and a labelled scorecard.
    Lab {
        /// Arguments for the lab: --duration SECS, --peers N, --seed N, --scorecard PATH,
        /// --sampling N, --sflow.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build a Debian package of the agent (target/debian/): the binary, a systemd unit,
    /// the default configuration and the man page.
    Package {
        /// Then install it with dpkg, verify the unit, check the shipped configuration,
        /// and purge it again (as root).
        #[arg(long)]
        check: bool,
    },
    /// The agent under flow churn, map-filling bursts, NetFlow from several exporters and
    /// alarms raised and cleared, for N minutes (as root): memory, map fill and loss
    /// counters sampled; passes when memory is flat and the exported totals equal what
    /// was sent.
    Soak(soak::SoakArgs),
    /// Benchmarks that print figures and ratios against references measured in the same run.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// ns per packet under BPF_PROG_TEST_RUN: PASS-only, parse-only, and the flow meter.
    Xdp {
        /// Runs per frame.
        #[arg(long, default_value_t = 200_000)]
        repeat: u32,
    },
    /// Highest loss-free NetFlow ingest rate of the agent and of nfcapd, same datagrams.
    Ingest,
    /// Records per second through dedup, profiles and scoring; memory per host.
    Engine,
    /// One pass of the meter's drain over the slot table (2^21 slots, 1 M flows),
    /// against the bookkeeping alone and a sweep of the table's memory.
    Drain,
    /// The agent end to end as root: flow meter CPU per flow in network namespaces
    /// (every packet exported to nfcapd?), and NetFlow ingest rate against nfcapd and
    /// nfacctd. The agent binary is $DETECTOR_BIN when set, else a release build.
    Agent(bench_agent::AgentArgs),
    /// Records per second from edge agents through NATS JetStream (a local nats-server)
    /// to one and to two detector nodes, their memory, and a paper estimate for 5
    /// million records per second. SCALEOUT_RECORDS sets the records per round.
    Scaleout,
}

/// Debian packages: LLVM for bpf-linker, and the real peers the tests compare against.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "nfdump",
    "tshark",
    "ethtool",
    "iproute2",
    "iputils-ping",
    "softflowd",
    "rsyslog",
    // The lab (`cargo xtask lab`, and its short run in `cargo xtask test`).
    "opentracker",
    "python3-libtorrent",
    "mktorrent",
    "aria2",
    "nginx",
    "dnsmasq-base",
    "nmap",
    "curl",
    "openssl",
    // The lab's Transmission host (transmission-remote is in transmission-cli) and the
    // capture of its traffic.
    "transmission-daemon",
    "transmission-cli",
    "tcpdump",
    // pmacct: nfacctd, a second collector for `cargo xtask bench agent`; pmacctd with its
    // sfprobe plugin, the sFlow exporter of the sFlow tests and the lab through sFlow;
    // sfacctd, an independent sFlow decoder the sFlow tests compare against.
    "pmacct",
    // sfcapd, nfdump's sFlow collector: the other independent sFlow decoder.
    "nfdump-sflow",
    // `cargo xtask package` and its check: systemd-analyze verify.
    "systemd",
    // The `--http` test: promtool and a Prometheus server scrape /metrics, headless
    // Chromium renders the status page. promtool also checks and tests the shipped
    // alerting rules (the dashboards test, the package check).
    "prometheus",
    "chromium",
    // Scale-out: the JetStream server edges publish to and detector nodes consume from.
    "nats-server",
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Run { args } => run(args),
        Task::Test { filter } => test(filter),
        Task::Lab { args } => lab(args),
        Task::Package { check } => package(check),
        Task::Soak(args) => soak(&args),
        Task::Bench {
            which: Bench::Xdp { repeat },
        } => bench_xdp(repeat),
        Task::Bench {
            which: Bench::Ingest,
        } => bench_ingest(),
        Task::Bench {
            which: Bench::Engine,
        } => bench_engine(),
        Task::Bench {
            which: Bench::Drain,
        } => bench_drain(),
        Task::Bench {
            which: Bench::Agent(args),
        } => bench_agent(&args),
        Task::Bench {
            which: Bench::Scaleout,
        } => bench_scaleout(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
    fn signal(signum: i32, handler: usize) -> usize;
}

/// Ignores Ctrl-C (SIGINT) in this process while a child that handles it runs: the
/// terminal sends it to the whole foreground group, and the child (the lab) needs the
/// time to stop what it started and remove its namespaces before the prompt comes back.
fn ignore_interrupts() {
    const SIGINT: i32 = 2;
    const SIG_IGN: usize = 1;
    // SAFETY: installs the "ignore" disposition; no handler code runs.
    unsafe {
        signal(SIGINT, SIG_IGN);
    }
}

fn cargo_home_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin (bpf-linker) and LLVM 22's bin in front.
fn tool_path() -> OsString {
    let mut parts = vec![cargo_home_bin(), PathBuf::from("/usr/lib/llvm-22/bin")];
    if let Some(p) = env::var_os("PATH") {
        parts.extend(env::split_paths(&p));
    }
    env::join_paths(parts).expect("valid PATH")
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// Runs a command as root: directly when we are root, else through sudo.
fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn rust_src_installed() -> bool {
    let Ok(out) = Command::new("rustc").args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
}

fn bpf_linker_installed() -> bool {
    cargo_home_bin().join("bpf-linker").exists()
        || Command::new("bpf-linker").arg("--version").output().is_ok()
}

fn setup_needed() -> bool {
    !missing_apt_packages().is_empty() || !rust_src_installed() || !bpf_linker_installed()
}

fn setup() -> Result<()> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        say("apt packages: all present");
    } else {
        say(&format!("installing apt packages: {}", missing.join(" ")));
        status(privileged("apt-get").args(["update", "-qq"]))?;
        status(
            privileged("env")
                .arg("DEBIAN_FRONTEND=noninteractive")
                .args(["apt-get", "install", "-y", "-qq"])
                .args(&missing),
        )?;
    }
    if rust_src_installed() {
        say("rust-src: present");
    } else {
        say("installing rust-src (the eBPF crate builds core from source)");
        status(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if bpf_linker_installed() {
        say("bpf-linker: present");
    } else {
        say("installing bpf-linker against LLVM 22 (about a minute)");
        status(Command::new("cargo").env("PATH", tool_path()).args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }
    say("setup complete");
    Ok(())
}

fn ensure_setup() -> Result<()> {
    if setup_needed() {
        say("prerequisites missing; running setup first");
        setup()?;
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root()).env("PATH", tool_path());
    c
}

fn build_release() -> Result<PathBuf> {
    say("building the agent (release)");
    status(cargo().args(["build", "--release", "--package", "detector"]))?;
    Ok(workspace_root().join("target/release/detector"))
}

fn run(args: Vec<OsString>) -> Result<()> {
    ensure_setup()?;
    let bin = build_release()?;
    if !is_root() {
        say("the agent attaches XDP/TC programs, which needs root: running it through sudo");
    }
    let mut cmd = privileged(bin.to_str().context("non-UTF-8 path")?);
    cmd.arg("run").args(args);
    status(&mut cmd)
}

fn test(filter: Option<String>) -> Result<()> {
    let mut times = timing::Timings::default();
    let r = test_timed(filter, &mut times);
    say("the ten slowest tests and steps:");
    for line in times.slowest(10) {
        eprintln!("  {line}");
    }
    r
}

fn test_timed(filter: Option<String>, times: &mut timing::Timings) -> Result<()> {
    ensure_setup()?;
    // Some tests start the agent binary itself.
    status(cargo().args(["build", "--package", "detector", "--bin", "detector"]))?;
    say("unit and unprivileged tests");
    let mut c = cargo();
    c.args(["test", "--workspace", "--exclude", "detector-ebpf"]);
    if let Some(f) = &filter {
        c.arg("--").arg(f);
    }
    times.cargo_test("unit and unprivileged tests", &mut c)?;
    if !is_root() {
        bail!(
            "the privileged tests (BPF_PROG_TEST_RUN, XDP, network namespaces) need root: run `sudo -E cargo xtask test`"
        );
    }
    say("privileged tests: BPF_PROG_TEST_RUN, XDP and TC in network namespaces, live peers");
    // The same package set as above, so nothing is rebuilt with other features.
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "detector-ebpf",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    if let Some(f) = &filter {
        c.arg(f);
    }
    times.cargo_test("privileged tests", &mut c)?;
    if filter.is_none() {
        say(
            "package: build it, install it with dpkg, verify the unit, check the shipped configuration",
        );
        let bin = build_release()?;
        times.step("package: build and check", || {
            let deb = package::build(&bin)?;
            package::check(&deb)
        })?;
        say("soak, short run (`cargo xtask soak --minutes 30` for the long one)");
        times.step("soak, 2 minutes", || {
            soak::run(
                &bin,
                &soak::SoakArgs {
                    minutes: 2,
                    sample_secs: Some(15),
                },
            )
        })?;
    }
    Ok(())
}

fn package(check: bool) -> Result<()> {
    ensure_setup()?;
    let deb = package::build(&build_release()?)?;
    if check {
        if !is_root() {
            bail!("installing the package needs root: run `sudo -E cargo xtask package --check`");
        }
        package::check(&deb)?;
    }
    Ok(())
}

fn lab(args: Vec<OsString>) -> Result<()> {
    ensure_setup()?;
    say("building the agent and the lab (release)");
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "detector",
        "--bin",
        "detector",
        "--package",
        "tests",
        "--bin",
        "lab",
    ]))?;
    let root = workspace_root();
    if !is_root() {
        say("the lab creates network namespaces and attaches XDP: running it through sudo");
    }
    let lab = root.join("target/release/lab");
    let mut cmd = privileged(lab.to_str().context("non-UTF-8 path")?);
    cmd.args(args);
    // The lab installs its own handler, which replaces the inherited "ignore".
    ignore_interrupts();
    status(&mut cmd)
}

/// Builds the micro-benchmarks (`detector/benches/micro.rs`, not part of the product
/// binary) with the release profile, beside the release agent, and returns the
/// executable cargo made.
fn build_micro() -> Result<PathBuf> {
    say("building the micro-benchmarks (detector/benches/micro.rs, release)");
    let out = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "detector",
            "--bench",
            "micro",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build --bench micro")?;
    if !out.status.success() {
        bail!("building the micro-benchmarks failed");
    }
    // The artifact message of the bench target names its executable.
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .lines()
        .filter(|l| l.contains("\"name\":\"micro\"") && l.contains("\"kind\":[\"bench\"]"))
        .find_map(|l| {
            let at = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            l[at..].split('"').next().map(str::to_string)
        })
        .context("cargo did not name the micro-benchmark executable")?;
    Ok(PathBuf::from(path))
}

fn bench_xdp(repeat: u32) -> Result<()> {
    ensure_setup()?;
    let bin = build_micro()?;
    let mut cmd = privileged(bin.to_str().context("non-UTF-8 path")?);
    cmd.args(["xdp", "--repeat", &repeat.to_string()]);
    status(&mut cmd)
}

fn bench_ingest() -> Result<()> {
    ensure_setup()?;
    let bin = build_micro()?;
    let testdata = workspace_root().join("../shared/testdata/netflow");
    status(
        Command::new(bin)
            .arg("ingest")
            .arg("--testdata")
            .arg(testdata),
    )
}

fn bench_drain() -> Result<()> {
    let bin = build_micro()?;
    status(Command::new(bin).arg("drain"))
}

fn bench_engine() -> Result<()> {
    let bin = build_micro()?;
    status(Command::new(bin).arg("engine"))
}

fn bench_scaleout() -> Result<()> {
    ensure_setup()?;
    build_release()?;
    say("running the scale-out benchmark (cargo bench -p detector --bench scaleout)");
    status(cargo().args(["bench", "-p", "detector", "--bench", "scaleout"]))
}

fn soak(args: &soak::SoakArgs) -> Result<()> {
    ensure_setup()?;
    if !is_root() {
        bail!("the soak attaches XDP in network namespaces: run `sudo -E cargo xtask soak`");
    }
    let bin = match env::var_os("DETECTOR_BIN") {
        Some(b) => PathBuf::from(b),
        None => build_release()?,
    };
    soak::run(&bin, args)
}

fn bench_agent(args: &bench_agent::AgentArgs) -> Result<()> {
    ensure_setup()?;
    let bin = match env::var_os("DETECTOR_BIN") {
        Some(b) => PathBuf::from(b),
        None => build_release()?,
    };
    bench_agent::run(&bin, args)
}
