//! What the scale-out tests over loopback share (`scaleout_takeover`, `scaleout_cluster`):
//! nats-server processes (alone or three in a cluster), edges (`detector run` as a
//! NetFlow collector publishing to NATS), detector nodes, a BitTorrent-like host's records
//! one peer at a time, and readings of logs, alarm files and nats-server's monitoring.

#![allow(dead_code, reason = "each test file uses its own part of the helpers")]

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use detector::flow::FlowRecord;
use serde_json::Value;
use tests::agent::{peer, rec};
use tests::netns::{Guarded, wait_for_text};

/// Detection settings of these tests: a two-minute window evaluated every two seconds,
/// two evaluations over the threshold to raise (the default's rule, faster).
pub const EVAL_SECS: u64 = 2;
pub const CONFIG: &str =
    "[detection]\nwindow_secs = 120\neval_interval_secs = 2\nconsecutive = 2\n";

pub use tests::http::free_tcp_port;

/// A nats-server's ports and files.
#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub port: u16,
    pub monitor: u16,
    /// The cluster (route) port, for a cluster member.
    pub route: Option<u16>,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl Server {
    pub fn new(dir: &Path, name: &str, clustered: bool) -> Self {
        Self {
            name: name.to_string(),
            port: free_tcp_port(),
            monitor: free_tcp_port(),
            route: clustered.then(free_tcp_port),
            store: dir.join(format!("{name}-store")),
            log: dir.join(format!("{name}.log")),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (JetStream on, file store kept across restarts; `routes`: the other
    /// members' route ports), waits until it says it is ready (a cluster member: also
    /// that JetStream is up, which needs a quorum of members).
    pub fn start(&self, routes: &[u16]) -> Guarded {
        let mut c = Command::new("nats-server");
        c.args(["-js", "-n", &self.name, "-a", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor.to_string(),
            ])
            .arg("-sd")
            .arg(&self.store);
        if let Some(route) = self.route {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            c.args(["--cluster_name", "detector-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
                .args(["--routes", &routes.join(",")]);
        }
        // Appended: a restarted server's log follows its first life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let before = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Server is ready")
            .count();
        let child = c
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (package nats-server; cargo xtask setup installs it)");
        let g = Guarded::new(&self.name, child);
        tests::agent::wait_for("nats-server to be ready", Duration::from_secs(30), || {
            (std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .matches("Server is ready")
                .count()
                > before)
                .then_some(())
        });
        g
    }

    /// The monitoring endpoint's JetStream report (streams and consumers).
    pub fn jsz(&self) -> Option<Value> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?accounts=true&streams=true&consumers=true",
            self.monitor
        );
        ureq::get(&url)
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?
            .into_json()
            .ok()
    }
}

/// A stream's report in a `/jsz` answer.
pub fn stream<'a>(j: &'a Value, name: &str) -> Option<&'a Value> {
    j["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"] == name)
}

/// `detector central` on `urls` (comma-separated), its log in `dir/NAME.log`, its
/// alarms in `dir/NAME.alarms.jsonl`.
pub fn node(dir: &Path, name: &str, urls: &str, shards: u32, more: &[&str]) -> Guarded {
    node_of(&tests::detector_bin(), dir, name, urls, shards, more)
}

/// [`node`] run by the binary `bin` (another release's, in an upgrade).
pub fn node_of(
    bin: &Path,
    dir: &Path,
    name: &str,
    urls: &str,
    shards: u32,
    more: &[&str],
) -> Guarded {
    let config = dir.join("detector.toml");
    if !config.exists() {
        std::fs::write(&config, CONFIG).unwrap();
    }
    let child = Command::new(bin)
        .args(["central", "--nats", urls, "--shards", &shards.to_string()])
        .args(["--node", name, "--lease-secs", "2", "--ack-wait-secs", "2"])
        .arg("--config")
        .arg(&config)
        .args(["--stats-interval", "1", "--alarms-json"])
        .arg(dir.join(format!("{name}.alarms.jsonl")))
        .args(more)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("the detector binary (cargo build -p detector)");
    Guarded::new(name, child)
}

/// An edge: `detector run` collecting NetFlow on `127.0.0.1:nf_port` and publishing every
/// record to `urls`, as agent `name`; its log in `dir/NAME.log`.
pub fn edge(dir: &Path, name: &str, nf_port: u16, urls: &str, shards: u32) -> Guarded {
    edge_of(&tests::detector_bin(), dir, name, nf_port, urls, shards)
}

/// [`edge`] run by the binary `bin` (another release's, in an upgrade).
pub fn edge_of(
    bin: &Path,
    dir: &Path,
    name: &str,
    nf_port: u16,
    urls: &str,
    shards: u32,
) -> Guarded {
    let config = dir.join("detector.toml");
    if !config.exists() {
        std::fs::write(&config, CONFIG).unwrap();
    }
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin)
        .args(["run", "--netflow-listen", &format!("127.0.0.1:{nf_port}")])
        .args(["--nats", urls, "--nats-shards", &shards.to_string()])
        .args([
            "--agent-name",
            name,
            "--workers",
            "1",
            "--stats-interval",
            "1",
        ])
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("the detector binary (cargo build -p detector)");
    let g = Guarded::new(name, child);
    wait_for_text(&log, "publishing every record", Duration::from_secs(30));
    g
}

/// The records a BitTorrent client exchanges with its peer `i` over the 5 s up to `at`:
/// TCP both ways and small UDP datagrams (DHT) on its listening port, the peer on a high
/// port of its own. The listening port is a random one (no client default, which would
/// add a rule's weight at the tenth peer): the score climbs in steps a few peers apart
/// (2 at the 3rd peer, 5 at the 8th, over the threshold of 7 at the 15th).
pub const LISTEN: u16 = 40_123;

/// See [`LISTEN`].
pub fn peer_records(host: IpAddr, i: u32, at: SystemTime) -> Vec<FlowRecord> {
    let p = peer(i);
    let rport = 10_000 + (i as u16).wrapping_mul(577) % 50_000;
    vec![
        rec(p, rport, host, LISTEN, 6, 40, 50_000, at),
        rec(host, LISTEN, p, rport, 6, 30, 2_000, at),
        rec(host, LISTEN, p, rport, 17, 2, 180, at),
        rec(p, rport, host, LISTEN, 17, 2, 200, at),
    ]
}

/// The alarm events of `host` in `dir/NAME.alarms.jsonl`.
pub fn events(dir: &Path, name: &str, host: IpAddr) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{name}.alarms.jsonl")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["host"] == host.to_string())
        .collect()
}

/// An event's time field (`at`, `first_seen`) as a time.
pub fn time_of(e: &Value, field: &str) -> SystemTime {
    humantime::parse_rfc3339(e[field].as_str().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{field} of {e}: {err}"))
}

pub use tests::agent::last_number;

/// Every number after `prefix` in `log`, in order.
pub fn numbers(log: &Path, prefix: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.match_indices(prefix)
        .filter_map(|(at, _)| {
            text[at + prefix.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The records an edge published, from its last statistics line.
pub fn published(log: &Path) -> u64 {
    last_number(log, "nats: ").unwrap_or(0)
}

/// A node's counters from its last statistics line: records consumed from its durable
/// consumers and records its takeovers replayed.
pub fn consumed(log: &Path) -> (u64, u64) {
    (
        last_number(log, "consumed ").unwrap_or(0),
        last_number(log, "takeovers replayed ").unwrap_or(0),
    )
}

/// Which shards `name` took, in its log order (a shard taken twice counts twice).
pub fn taken(log: &Path) -> Vec<u32> {
    numbers(log, "took shard ")
        .into_iter()
        .map(|s| s as u32)
        .collect()
}

/// The shards a node holds now, from its log (those taken and not given back or lost).
pub fn holds(log: &Path) -> std::collections::BTreeSet<u32> {
    let mut held = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let num = |prefix: &str| -> Option<u32> {
            let at = line.find(prefix)?;
            line[at + prefix.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        if let Some(s) = num("took shard ") {
            held.insert(s);
        } else if let Some(s) = num("gave shard ").or_else(|| num("lost the lease of shard ")) {
            held.remove(&s);
        }
    }
    held
}

/// The highest score the node's last statistics line gives `host`.
pub fn score(log: &Path, host: IpAddr) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("highest scores"))?;
    let at = line.find(&format!("{host} "))?;
    line[at + host.to_string().len() + 1..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}
