//! The agent run live without BPF, as a NetFlow v9 collector on loopback, for the tests
//! of what it serves and sends (`status_http`, `dashboards`, `siem_formats`,
//! `operator_decisions`, `http_security`): a scratch directory, the agent's command line,
//! a torrent-shaped host's records and an exporter that sends them, waiting for a
//! condition, the tools the tests run beside it (Prometheus among them).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use detector::export::netflow_v9::{V9Config, V9Encoder};
use detector::flow::FlowRecord;

use crate::netns::Guarded;

/// An empty directory `$TMPDIR/detector-NAME-PID` (what an earlier run left is removed).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("detector-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Calls `f` every 200 ms until it gives a value, and returns it; panics (`timed out
/// waiting for WHAT`) after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(what, timeout, Duration::from_millis(200), f)
}

/// [`wait_for`], calling `f` every `every`.
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(every);
    }
}

/// Where the program `name` is installed (`/usr/bin`, `/usr/sbin`, `/usr/local/bin` or
/// `/bin`), if it is.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// [`find_tool`], or a panic that says `cargo xtask setup` installs it.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name)
        .unwrap_or_else(|| panic!("{name} is not installed (cargo xtask setup installs it)"))
}

/// Detection settings that spare a test the defaults' wait: a 120 s window evaluated every
/// second, an alarm raised at the first evaluation over the threshold.
pub const FAST_DETECTION: &str =
    "[detection]\nwindow_secs = 120\neval_interval_secs = 1\nconsecutive = 1\n";

/// Writes the agent's configuration `dir/detector.toml`: [`FAST_DETECTION`], then `more`
/// (further `[detection]` keys first, other tables after); returns its path.
pub fn write_config(dir: &Path, more: &str) -> PathBuf {
    let path = dir.join("detector.toml");
    std::fs::write(&path, format!("{FAST_DETECTION}{more}")).unwrap();
    path
}

/// `detector run` as a NetFlow collector on `127.0.0.1:nf_port` with the configuration
/// file `config`, its flows written to `dir/flows.json`, two workers and no periodic
/// statistics; standard output discarded, standard error to `log`. The caller adds its
/// own arguments and spawns it with [`spawn_agent`].
pub fn agent_command(dir: &Path, nf_port: u16, config: &Path, log: &Path) -> Command {
    let mut c = Command::new(crate::detector_bin());
    c.args(["run", "--netflow-listen", &format!("127.0.0.1:{nf_port}")])
        .arg("--config")
        .arg(config)
        .arg("--flows-json")
        .arg(dir.join("flows.json"))
        .args(["--stats-interval", "0", "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c
}

/// Spawns the agent's `cmd`; it is killed when the guard is dropped.
pub fn spawn_agent(cmd: &mut Command) -> Guarded {
    Guarded::new("detector", cmd.spawn().unwrap())
}

/// Peer `i` of [`torrent`]: 203.0.113.0/24, then 198.51.100.0/24 from the 200th
/// (documentation networks: external by default).
pub fn peer(i: u32) -> IpAddr {
    let base = if i < 200 {
        0xcb00_7100
    } else {
        0xc633_6400 - 200
    };
    IpAddr::V4(Ipv4Addr::from(base + i))
}

/// A flow of `packets` and `bytes` over the 5 s up to `at` (TCP with PSH|ACK).
#[allow(clippy::too_many_arguments, reason = "a test record builder")]
pub fn rec(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    packets: u64,
    bytes: u64,
    at: SystemTime,
) -> FlowRecord {
    FlowRecord {
        packets,
        bytes,
        first: at - Duration::from_secs(5),
        last: at,
        tcp_flags: if proto == 6 { 0x18 } else { 0 },
        ..FlowRecord::new(src, sport, dst, dport, proto)
    }
}

/// A BitTorrent client's flows over a few seconds: 80 throttled peers on high ports,
/// its listening port 51413 on TCP and UDP, peers met both ways (214 records).
pub fn torrent(host: IpAddr, at: SystemTime) -> Vec<FlowRecord> {
    let mut v = Vec::new();
    for i in 0..80u32 {
        let p = peer(i);
        let rport = 10_000 + (i as u16 * 577) % 50_000;
        if i % 2 == 0 {
            v.push(rec(p, rport, host, 51413, 6, 40, 50_000, at));
            v.push(rec(host, 51413, p, rport, 6, 30, 2_000, at));
        } else {
            v.push(rec(host, 40_000 + i as u16, p, rport, 6, 30, 2_000, at));
            v.push(rec(p, rport, host, 40_000 + i as u16, 6, 40, 50_000, at));
        }
        if i % 3 == 0 {
            v.push(rec(host, 51413, p, rport, 17, 2, 180, at));
            v.push(rec(p, rport, host, 51413, 17, 2, 200, at));
        }
    }
    v
}

/// A NetFlow v9 exporter on 127.0.0.1 (booted 10 minutes ago, source id 0) sending to
/// the agent's listener.
pub struct Exporter {
    /// The exporter's socket (any port of 127.0.0.1), for other datagrams too.
    pub sock: UdpSocket,
    /// The agent's listener.
    pub to: SocketAddr,
    enc: V9Encoder,
}

impl Exporter {
    /// An exporter to `127.0.0.1:port`.
    pub fn new(port: u16) -> Self {
        Self {
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
            to: format!("127.0.0.1:{port}").parse().unwrap(),
            enc: V9Encoder::new(
                V9Config::default(),
                SystemTime::now() - Duration::from_secs(600),
            ),
        }
    }

    /// Encodes `records`, exported at `now`, and sends the datagrams.
    pub fn send(&mut self, records: &[FlowRecord], now: SystemTime) {
        for dg in self.enc.encode(records, now) {
            self.sock.send_to(&dg, self.to).unwrap();
        }
    }
}

/// A Prometheus server (Debian's `prometheus`; `cargo xtask setup` installs it) on
/// `127.0.0.1:port` with the configuration `config` written to `dir/prometheus.yml`, its
/// data in `dir/data` and its log in `dir/prometheus.log`; killed when dropped.
pub fn start_prometheus(dir: &Path, config: &str, port: u16) -> Guarded {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    Guarded::new("prometheus", child)
}

/// The number after `prefix` in the last line of `log` holding it (a statistics line's
/// count).
pub fn last_number(log: &Path, prefix: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let at = text.rfind(prefix)?;
    text[at + prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
