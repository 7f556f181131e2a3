//! `cargo xtask bench scaleout`: records per second from edge agents through NATS
//! JetStream to one and to two detector nodes on this machine, the nodes' memory, and a
//! paper estimate of what 5 million records per second would take.
//!
//! Each round starts a fresh nats-server (JetStream, loopback only). The edges are the
//! real edge sink (`NatsSink`, as `detector run --nats` uses it) fed synthetic records of
//! many internal hosts and peers, in threads; their rate is records stored and
//! acknowledged by JetStream per second. Then the nodes (`detector central`, the release
//! binary) start on the full stream; their rate is records consumed per second, from the
//! first lease taken to the stream drained (nats-server's monitoring endpoint says when).
//! `DETECTOR_BIN=PATH` runs the nodes from another build (to compare two, alternately).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use detector::detect::DetectConfig;
use detector::export::Sink;
use detector::flow::FlowRecord;
use detector::scaleout::edge::NatsSink;

const SHARDS: u32 = 16;
const TARGET: f64 = 5_000_000.0;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Records of `hosts` internal hosts (10.0.0.0/8) with external peers.
fn records(n: usize, hosts: u32, seed: u64) -> Vec<FlowRecord> {
    let mut rng = Rng(seed);
    let now = SystemTime::now();
    (0..n)
        .map(|_| {
            let r = rng.next();
            let host = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (r as u32 % hosts)));
            let peer = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + ((r >> 32) as u32 % 131_072)));
            let (sport, dport) = ((r >> 16) as u16 | 1024, 51413);
            let mut f = if r & 1 == 0 {
                FlowRecord::new(peer, sport, host, dport, 6)
            } else {
                FlowRecord::new(host, dport, peer, sport, 17)
            };
            f.packets = 1 + (r >> 40) % 50;
            f.bytes = f.packets * 700;
            f.first = now - Duration::from_secs(5);
            f.last = now;
            f
        })
        .collect()
}

fn jsz(monitor: u16) -> Result<serde_json::Value> {
    let out = Command::new("curl")
        .args([
            "-sf",
            &format!("http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true&consumers=true"),
        ])
        .output()
        .context("curl")?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The record stream's batches and how many of them the shards' durable consumers have
/// still to deliver or to see acknowledged (the stream keeps batches by age: consumed
/// ones stay).
fn flow_state(monitor: u16) -> Result<(u64, u64)> {
    let j = jsz(monitor)?;
    let s = j["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"] == "DETECTOR_RECORDS")
        .cloned()
        .unwrap_or_default();
    let consumers: Vec<&serde_json::Value> = s["consumer_detail"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("shard-")))
        .collect();
    let mut left: u64 = consumers
        .iter()
        .map(|c| {
            c["num_pending"].as_u64().unwrap_or(0) + c["num_ack_pending"].as_u64().unwrap_or(0)
        })
        .sum();
    // A shard whose consumer is not made yet has everything left.
    if consumers.len() < SHARDS as usize {
        left = left.max(1);
    }
    Ok((s["state"]["messages"].as_u64().unwrap_or(0), left))
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn wait_text(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("'{needle}' not in {} after {timeout:?}", path.display())
}

struct Round {
    nodes: usize,
    edge_rate: f64,
    node_rate: f64,
    rss_mib: Vec<f64>,
    /// Per node, its peak RSS after the evaluation that followed the drain (an evaluation
    /// takes memory too; a node evaluates every 10 s while it ingests).
    peak_mib: Vec<f64>,
    /// Per node: hosts profiled and MiB its detection tables hold, after the drain.
    profiled: Vec<(u64, u64)>,
}

/// Hosts profiled and table MiB from the last statistics line of a node's log.
fn stats_line(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().rev().find(|l| l.contains("hosts profiled"))?;
    let before = |needle: &str| -> Option<u64> {
        let end = line.find(needle)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    Some((before(" hosts profiled")?, before(" MiB), highest")?))
}

fn round(nodes: usize, total: usize, edges: usize, hosts: u32, dir: &Path) -> Result<Round> {
    let port = 14_222 + nodes as u16;
    let monitor = 18_222 + nodes as u16;
    let store = dir.join(format!("js-{nodes}"));
    let _ = std::fs::remove_dir_all(&store);
    let log = dir.join(format!("nats-{nodes}.log"));
    let server = Killed(
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("nats-server (apt-get install nats-server)")?,
    );
    wait_text(&log, "Server is ready", Duration::from_secs(20))?;
    let url = format!("nats://127.0.0.1:{port}");

    // Edges: the real sink, one per thread, all records handed over then dropped (the
    // drop waits until every batch is acknowledged).
    let per_edge = total / edges;
    let detect = Arc::new(DetectConfig {
        internal: vec!["10.0.0.0/8".parse().expect("cidr")],
        ..DetectConfig::default()
    });
    let batches: Vec<Vec<FlowRecord>> = (0..edges)
        .map(|e| records(per_edge, hosts, e as u64 + 1))
        .collect();
    let t = Instant::now();
    let threads: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(e, recs)| {
            let (url, detect) = (url.clone(), detect.clone());
            std::thread::spawn(move || -> Result<u64> {
                let mut sink = NatsSink::start(&url, &format!("edge-{e}"), SHARDS, 4096, detect)?;
                let c = sink.counters();
                let done = |c: &detector::scaleout::edge::EdgeCounters| {
                    use std::sync::atomic::Ordering::Relaxed;
                    c.published_records.load(Relaxed) + c.shed_records.load(Relaxed)
                };
                let mut sent = 0u64;
                for chunk in recs.chunks(20_000) {
                    sink.send(chunk, SystemTime::now());
                    sent += chunk.len() as u64;
                    // The sink never waits (it sheds when its queue is full): hold the
                    // producer back instead, as a meter's own pace would.
                    while done(&c) + 200_000 < sent {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                drop(sink);
                let shed = c.shed_records.load(std::sync::atomic::Ordering::Relaxed);
                if shed > 0 {
                    bail!("edge {e} shed {shed} records");
                }
                Ok(c.published_records
                    .load(std::sync::atomic::Ordering::Relaxed))
            })
        })
        .collect();
    let mut published = 0;
    for th in threads {
        published += th.join().map_err(|_| anyhow::anyhow!("edge thread"))??;
    }
    let edge_secs = t.elapsed().as_secs_f64();

    // Nodes on the full stream.
    // Another build to compare with this one: $DETECTOR_BIN.
    let bin = std::env::var_os("DETECTOR_BIN").map_or_else(
        || workspace().join("target/release/detector"),
        PathBuf::from,
    );
    let mut procs = Vec::new();
    let mut logs = Vec::new();
    for n in 0..nodes {
        let nlog = dir.join(format!("node-{nodes}-{n}.log"));
        procs.push(Killed(
            Command::new(&bin)
                .args(["central", "--nats", &url, "--shards", &SHARDS.to_string()])
                .args(["--node", &format!("bench-{n}"), "--internal", "10.0.0.0/8"])
                .args(["--stats-interval", "1"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(File::create(&nlog)?)
                .spawn()
                .with_context(|| format!("{} (cargo build --release)", bin.display()))?,
        ));
        logs.push(nlog);
    }
    for l in &logs {
        wait_text(l, "took shard", Duration::from_secs(30))?;
    }
    let t = Instant::now();
    loop {
        let (messages, left) = flow_state(monitor)?;
        if messages > 0 && left == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("the nodes did not drain the stream in 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let node_secs = t.elapsed().as_secs_f64();
    let rss_mib = procs.iter().map(|p| peak_rss_mib(p.0.id())).collect();
    // Each node's next statistics line after an evaluation that came after the drain
    // (the line reports the shards as of the last evaluation, every 10 s): the hosts it
    // profiles and the bytes its tables hold.
    std::thread::sleep(Duration::from_secs(11));
    let mut profiled = Vec::new();
    for l in &logs {
        let lines = |text: &str| text.matches("hosts profiled").count();
        let before = lines(&std::fs::read_to_string(l)?);
        let t = Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(l)?;
            if lines(&text) > before || t.elapsed() > Duration::from_secs(10) {
                break text;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        profiled.push(
            stats_line(&text).with_context(|| format!("no statistics line in {}", l.display()))?,
        );
    }
    let peak_mib = procs.iter().map(|p| peak_rss_mib(p.0.id())).collect();
    drop(procs);
    drop(server);
    Ok(Round {
        nodes,
        edge_rate: published as f64 / edge_secs,
        node_rate: published as f64 / node_secs,
        rss_mib,
        peak_mib,
        profiled,
    })
}

fn main() -> Result<()> {
    let total: usize = std::env::var("SCALEOUT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let edges = 3;
    let hosts = 20_000;
    let dir = workspace().join("target/bench-scaleout");
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "scale-out: {total} records of {hosts} internal hosts from {edges} edges, {SHARDS} shards, one nats-server (JetStream, file store), {cores} cores"
    );
    let mut rounds = Vec::new();
    for nodes in [1, 2] {
        let r = round(nodes, total, edges, hosts, &dir)?;
        println!(
            "{} node(s): edges -> JetStream {:>10.0} records/s; JetStream -> nodes {:>10.0} records/s; node peak RSS {} MiB",
            r.nodes,
            r.edge_rate,
            r.node_rate,
            r.peak_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        for (i, ((&drained, &peak), &(hosts, tables))) in r
            .rss_mib
            .iter()
            .zip(&r.peak_mib)
            .zip(&r.profiled)
            .enumerate()
        {
            let per_host = |mib: f64| mib * 1048.576 / hosts.max(1) as f64;
            println!(
                "  node {i}: {hosts} hosts profiled, peak RSS {:.1} KB a host (target <= 20; {:.1} when the stream was drained, before an evaluation), its detection tables {:.1} KB a host",
                per_host(peak),
                per_host(drained),
                per_host(tables as f64)
            );
        }
        rounds.push(r);
    }
    let (one, two) = (&rounds[0], &rounds[1]);
    println!(
        "ratio two nodes / one: {:.2} (on {cores} cores the nodes share the same CPUs and nats-server)",
        two.node_rate / one.node_rate
    );
    let per_node = one.node_rate;
    let ingest = rounds.iter().map(|r| r.edge_rate).fold(0.0, f64::max);
    let record_bytes = detector::scaleout::wire::RECORD_LEN as f64;
    println!("paper estimate for {TARGET:.0} records/s:");
    println!(
        "  detector nodes: {:.0} of this size ({:.0} records/s each, measured alone with all {SHARDS} shards); shards: at least that many, e.g. {} so leases move in small steps",
        (TARGET / per_node).ceil(),
        per_node,
        ((TARGET / per_node).ceil() as u64 * 4).next_power_of_two()
    );
    println!(
        "  JetStream: {:.0} MB/s of batches ({record_bytes:.0} bytes a record); one server here stored {:.0} records/s, so {:.0} servers' worth of ingest, x3 with replicas for durability: a cluster of about {:.0} servers, the flow stream split into several streams (by shard range) so each has its own leader",
        TARGET * record_bytes / 1e6,
        ingest,
        (TARGET / ingest).ceil(),
        (TARGET / ingest * 3.0).ceil()
    );
    Ok(())
}
