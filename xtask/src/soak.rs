//! `cargo xtask soak --minutes N`: the agent under everything at once, for N minutes.
//!
//! Two network namespaces joined by a veth; the agent meters the receiving end (native
//! XDP) with small flow tables (--map-size 2,048: 4,096 slots and a 2,048-flow hash map, so bursts take the overflow path), receives
//! NetFlow v9 from three exporters on its loopback, detects, and exports NetFlow v9 to a
//! real `nfcapd`. Every second a thread of this process, in the sending namespace,
//! sends raw frames: new short flows (churn), the same long flows again (exported at
//! each active timeout), and every 30 s a burst of 6,000 new flows; another thread sends
//! v9 records of a BitTorrent-shaped host from three exporter addresses for the first
//! half of each minute (one alarm raised, then cleared in the quiet half), with a new
//! host each minute. Both threads count exactly what they sent.
//!
//! Each sample (every minute; every 15 s in runs under 10 minutes) prints the agent's
//! resident memory, the map fill and every loss counter, read from its `/metrics`. It
//! passes when memory is flat after warm-up (the last third's peak within 10 % + 8 MiB
//! of the first third's; the agent runs with transparent huge pages off so that its
//! resident memory follows its allocations), no loss counter moved (ring buffer, overflow table, kernel
//! receive drops, shed records, sink errors), alarms were raised and cleared, and after
//! a clean stop nfdump's totals equal what was sent: packets and bytes of the local
//! traffic, records and packets of the NetFlow.

use std::collections::BTreeMap;
use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::bench_agent::{Proc, VethPair, frame_sender, ip, ip_checksum, sh, sys, thousands};

const NS_TX: &str = "dsoak-tx";
const NS_RX: &str = "dsoak-rx";
const DEV_TX: &str = "dsoak-tx0";
const DEV_RX: &str = "dsoak-rx0";
const ADDR_TX: [u8; 4] = [10, 98, 0, 1];
const ADDR_RX: [u8; 4] = [10, 98, 0, 2];
/// Not the receiving veth's MAC: frames are dropped after XDP saw them (no replies).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x98];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FRAME_LEN: usize = 60;
const IP_LEN: u64 = (FRAME_LEN - 14) as u64;
/// IPv4 flows fill the slot table (2 x this) and then the hash map (this): the bursts
/// overfill both.
const MAP_SIZE: u32 = 2048;
const NFCAPD_PORT: u16 = 29996;
const LISTEN_PORT: u16 = 29055;
const HTTP_PORT: u16 = 29750;
/// Local traffic each second.
const LONG_FLOWS: u32 = 16;
const LONG_PACKETS: u32 = 5;
const CHURN_FLOWS: u32 = 400;
const CHURN_PACKETS: u32 = 2;
const BURST_EVERY: u64 = 30;
const BURST_FLOWS: u32 = 6000;
/// NetFlow: the exporters, how often they send, the peers of the torrent host.
const EXPORTERS: [[u8; 4]; 3] = [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]];
const NETFLOW_EVERY: u64 = 5;
const PEERS: u32 = 80;

/// Options of `cargo xtask soak`.
#[derive(Args)]
pub struct SoakArgs {
    /// Minutes to run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Seconds between samples (default: 60, or 15 for runs under 10 minutes).
    #[arg(long)]
    pub sample_secs: Option<u64>,
}

/// A 60-byte IPv4/UDP frame from `src:port` to the receiver.
fn frame(src: u32, port: u16) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&DST_MAC);
    f[6..12].copy_from_slice(&SRC_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(IP_LEN as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.to_be_bytes());
    ip[16..20].copy_from_slice(&ADDR_RX);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[36..38].copy_from_slice(&5001u16.to_be_bytes());
    f[38..40].copy_from_slice(&((IP_LEN - 20) as u16).to_be_bytes());
    f
}

/// The frames of second `s`: long flows (198.18.0.x), new churn flows (198.18.128.0/17
/// and up, a port per 32,768 of them), and every [`BURST_EVERY`] s a burst of new flows
/// (11.0.0.0/8).
fn frames_of_second(s: u64) -> Vec<[u8; FRAME_LEN]> {
    let base = |a: [u8; 4]| u32::from_be_bytes(a);
    let mut v = Vec::new();
    for i in 0..LONG_FLOWS {
        for _ in 0..LONG_PACKETS {
            v.push(frame(base([198, 18, 0, 1]) + i, 40_000));
        }
    }
    for j in 0..CHURN_FLOWS {
        let k = s * u64::from(CHURN_FLOWS) + u64::from(j);
        let f = frame(
            base([198, 18, 128, 0]) + (k % 32_768) as u32,
            20_000 + (k / 32_768) as u16,
        );
        for _ in 0..CHURN_PACKETS {
            v.push(f);
        }
    }
    if s % BURST_EVERY == BURST_EVERY / 2 {
        let burst = s / BURST_EVERY;
        for j in 0..BURST_FLOWS {
            let k = burst * u64::from(BURST_FLOWS) + u64::from(j);
            v.push(frame(base([11, 0, 0, 0]) + k as u32, 30_000));
        }
    }
    v
}

/// Sends the local traffic until `stop`; returns the packets sent.
fn send_local(stop: &AtomicBool) -> Result<u64> {
    let (sock, dest) = frame_sender(NS_TX, DEV_TX, DST_MAC)?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut s = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let frames = frames_of_second(s);
        let mut at = 0;
        while at < frames.len() {
            let batch: Vec<&[u8]> = frames[at..(at + 256).min(frames.len())]
                .iter()
                .map(|f| &f[..])
                .collect();
            match sys::send_batch(sock.0, &batch, Some(&dest)) {
                Ok(k) => {
                    at += k;
                    sent += k as u64;
                }
                Err(e) if matches!(e.raw_os_error(), Some(105 | 11)) => {
                    thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e).context("sending frames"),
            }
        }
        s += 1;
        let next = Duration::from_secs(s);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// What the NetFlow thread sent: records and their packets.
#[derive(Default, Clone, Copy)]
struct NetflowSent {
    records: u64,
    packets: u64,
}

/// NetFlow v9 template 256: IPv4 flow fields (type, length).
const TEMPLATE: [(u16, u16); 10] = [
    (8, 4),  // IPV4_SRC_ADDR
    (12, 4), // IPV4_DST_ADDR
    (7, 2),  // L4_SRC_PORT
    (11, 2), // L4_DST_PORT
    (4, 1),  // PROTOCOL
    (6, 1),  // TCP_FLAGS
    (2, 4),  // IN_PKTS
    (1, 4),  // IN_BYTES
    (22, 4), // FIRST_SWITCHED
    (21, 4), // LAST_SWITCHED
];
const RECORD_LEN: usize = 30;
const RECORDS_PER_DATAGRAM: usize = 40;

/// One torrent-shaped record: (src, sport, dst, dport, proto, packets, bytes).
type Rec = ([u8; 4], u16, [u8; 4], u16, u8, u32, u32);

/// The records of the torrent host of minute `m` for one send: 80 peers, each sending
/// to the host's listening port 51413 (TCP) and met on UDP too.
fn torrent_records(m: u64) -> Vec<Rec> {
    let host = [10, 60, (m / 250) as u8, (m % 250) as u8 + 1];
    let mut v = Vec::new();
    for i in 0..PEERS {
        let peer = if i < 40 {
            [203, 0, 113, i as u8 + 1]
        } else {
            [198, 51, 100, i as u8 - 39]
        };
        let rport = 10_000 + (i as u16 * 577) % 50_000;
        v.push((peer, rport, host, 51413, 6, 40, 50_000));
        v.push((host, 51413, peer, rport, 6, 30, 2_000));
        if i % 3 == 0 {
            v.push((host, 51413, peer, rport, 17, 2, 180));
            v.push((peer, rport, host, 51413, 17, 2, 200));
        }
    }
    v
}

/// v9 datagrams (each with the template) carrying `records`, seen `uptime_ms` after the
/// exporter's boot at `unix_secs`.
fn v9_datagrams(
    records: &[Rec],
    source_id: u32,
    seq: &mut u32,
    uptime_ms: u32,
    unix_secs: u32,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for chunk in records.chunks(RECORDS_PER_DATAGRAM) {
        let mut d = Vec::with_capacity(1500);
        d.extend_from_slice(&9u16.to_be_bytes());
        d.extend_from_slice(&((chunk.len() + 1) as u16).to_be_bytes());
        d.extend_from_slice(&uptime_ms.to_be_bytes());
        d.extend_from_slice(&unix_secs.to_be_bytes());
        d.extend_from_slice(&seq.to_be_bytes());
        d.extend_from_slice(&source_id.to_be_bytes());
        *seq += 1;
        // Template flowset.
        d.extend_from_slice(&0u16.to_be_bytes());
        d.extend_from_slice(&((8 + 4 * TEMPLATE.len()) as u16).to_be_bytes());
        d.extend_from_slice(&256u16.to_be_bytes());
        d.extend_from_slice(&(TEMPLATE.len() as u16).to_be_bytes());
        for (t, l) in TEMPLATE {
            d.extend_from_slice(&t.to_be_bytes());
            d.extend_from_slice(&l.to_be_bytes());
        }
        // Data flowset, padded to 4 bytes.
        let len = 4 + chunk.len() * RECORD_LEN;
        let pad = (4 - len % 4) % 4;
        d.extend_from_slice(&256u16.to_be_bytes());
        d.extend_from_slice(&((len + pad) as u16).to_be_bytes());
        for &(src, sp, dst, dp, proto, pkts, bytes) in chunk {
            d.extend_from_slice(&src);
            d.extend_from_slice(&dst);
            d.extend_from_slice(&sp.to_be_bytes());
            d.extend_from_slice(&dp.to_be_bytes());
            d.push(proto);
            d.push(if proto == 6 { 0x18 } else { 0 });
            d.extend_from_slice(&pkts.to_be_bytes());
            d.extend_from_slice(&bytes.to_be_bytes());
            d.extend_from_slice(&uptime_ms.saturating_sub(4000).to_be_bytes());
            d.extend_from_slice(&uptime_ms.to_be_bytes());
        }
        d.extend(std::iter::repeat_n(0, pad));
        out.push(d);
    }
    out
}

/// Sends the torrent host's records from every exporter for the first half of each
/// minute, every [`NETFLOW_EVERY`] s, until `stop`.
fn send_netflow(stop: &AtomicBool) -> Result<NetflowSent> {
    sys::enter_netns(NS_RX).context("entering the agent's namespace")?;
    let socks: Vec<UdpSocket> = EXPORTERS
        .iter()
        .map(|a| UdpSocket::bind((std::net::Ipv4Addr::from(*a), 0)))
        .collect::<std::io::Result<_>>()
        .context("binding the exporters' sockets")?;
    let boot = SystemTime::now() - Duration::from_secs(3600);
    let mut seqs = [0u32; EXPORTERS.len()];
    let mut sent = NetflowSent::default();
    let start = Instant::now();
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let s = tick * NETFLOW_EVERY;
        if s % 60 < 30 {
            let now = SystemTime::now();
            let uptime_ms = now.duration_since(boot).unwrap_or_default().as_millis() as u32;
            let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as u32;
            let records = torrent_records(s / 60);
            for (i, sock) in socks.iter().enumerate() {
                for dg in v9_datagrams(&records, 100 + i as u32, &mut seqs[i], uptime_ms, unix) {
                    sock.send_to(&dg, ("127.0.0.1", LISTEN_PORT))
                        .context("sending NetFlow")?;
                }
                sent.records += records.len() as u64;
                sent.packets += records.iter().map(|r| u64::from(r.5)).sum::<u64>();
            }
        }
        tick += 1;
        let next = Duration::from_secs(tick * NETFLOW_EVERY);
        while start.elapsed() < next && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(sent)
}

/// The agent's resident memory in KiB.
fn rss_kib(pid: i32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// The samples of a `/metrics` text: name with labels -> value.
fn scrape() -> Result<BTreeMap<String, f64>> {
    let text = sh(Command::new("ip").args([
        "netns",
        "exec",
        NS_RX,
        "curl",
        "-sf",
        &format!("http://127.0.0.1:{HTTP_PORT}/metrics"),
    ]))
    .context("scraping the agent's /metrics (curl)")?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// Sum of every sample of a family (over its labels).
fn family(m: &BTreeMap<String, f64>, name: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// Loss counters that must stay at zero.
const LOSSES: [(&str, &str); 8] = [
    ("detector_meter_ring_buffer_dropped_packets_total", "ring"),
    ("detector_meter_new_flows_dropped_total", "unannounced"),
    ("detector_meter_overflow_table_full_total", "ovf-full"),
    ("detector_netflow_kernel_drops_total", "udp-drop"),
    ("detector_netflow_held_dropped_total", "nf-held"),
    ("detector_shed_records_total", "shed"),
    ("detector_sink_errors_total", "sink-err"),
    ("detector_alarm_sink_errors_total", "alarm-err"),
];

struct Sample {
    at: u64,
    rss_kib: u64,
    metrics: BTreeMap<String, f64>,
}

/// `nfdump -N` summary of the flows matching `filter`: (flows, bytes, packets).
fn nfdump_summary(dir: &Path, filter: &str) -> Result<(u64, u64, u64)> {
    let text = sh(Command::new("nfdump").arg("-N").arg("-R").arg(dir).args([
        "-n",
        "0",
        "-s",
        "proto/packets",
        filter,
    ]))
    .context("nfdump (package nfdump)")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .context("nfdump printed no summary")?;
    let get = |k: &str| -> u64 {
        line.split(k)
            .nth(1)
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((
        get("total flows:"),
        get("total bytes:"),
        get("total packets:"),
    ))
}

pub fn run(bin: &Path, args: &SoakArgs) -> Result<()> {
    let total = Duration::from_secs(args.minutes * 60);
    let every = Duration::from_secs(
        args.sample_secs
            .unwrap_or(if args.minutes < 10 { 15 } else { 60 })
            .max(1),
    );
    let tmp = PathBuf::from(format!("/tmp/detector-soak-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let _topo = VethPair::create([NS_TX, NS_RX, DEV_TX, DEV_RX], [ADDR_TX, ADDR_RX], false)?;
    let nfdir = tmp.join("nfcapd");
    fs::create_dir_all(&nfdir)?;
    let mut nfcapd = Proc::spawn(
        "nfcapd",
        Command::new("ip")
            .args(["netns", "exec", NS_RX, "nfcapd", "-w"])
            .arg(&nfdir)
            .args(["-p", &NFCAPD_PORT.to_string(), "-b", "127.0.0.1"])
            .args(["-B", "67108864"]),
        tmp.join("nfcapd.log"),
    )?;
    thread::sleep(Duration::from_millis(300));
    nfcapd.check_running()?;
    let config = tmp.join("detector.toml");
    fs::write(
        &config,
        "[allow]\n# The local traffic's receiver: thousands of external senders, not a P2P host.\nhosts = [\"10.98.0.2\"]\n\n[detection]\nwindow_secs = 60\neval_interval_secs = 2\nconsecutive = 1\nclear_after_secs = 20\n",
    )?;
    let mut agent = Proc::spawn(
        "agent",
        Command::new("ip")
            .args(["netns", "exec", NS_RX])
            // Memory is judged by what the agent allocates: with transparent huge pages,
            // resident memory also grows as the kernel (khugepaged) backs 2 MiB ranges the
            // allocator has only partly used with huge pages, later on some machines than
            // others (the same 2-minute run: 96 MiB rising to 150 on a fresh machine,
            // 141 to 153 here, 68 to 84 with them off).
            .env("MIMALLOC_ALLOW_THP", "0")
            .arg(bin)
            .args(["run", "--iface", DEV_RX, "--xdp-mode", "native"])
            .args(["--map-size", &MAP_SIZE.to_string()])
            .args(["--export", &format!("127.0.0.1:{NFCAPD_PORT}")])
            .args(["--netflow-listen", &format!("127.0.0.1:{LISTEN_PORT}")])
            .args(["--http", &format!("127.0.0.1:{HTTP_PORT}")])
            .arg("--alarms-json")
            .arg(tmp.join("alarms.json"))
            .arg("--config")
            .arg(&config)
            .args(["--active-timeout", "10", "--inactive-timeout", "5"])
            .args(["--stats-interval", "60"]),
        tmp.join("agent.log"),
    )?;
    let start = Instant::now();
    loop {
        agent.check_running()?;
        if ip(&["-n", NS_RX, "link", "show", "dev", DEV_RX])?.contains("xdp") && scrape().is_ok() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not start within 60 s:\n{}", agent.log_tail());
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!(
        "soak: {} min; every second {LONG_FLOWS} long flows x {LONG_PACKETS} packets, {CHURN_FLOWS} new flows x {CHURN_PACKETS}; every {BURST_EVERY} s {BURST_FLOWS} new flows (map {MAP_SIZE}); NetFlow from {} exporters every {NETFLOW_EVERY} s in the first half of each minute (a new torrent host each minute)",
        args.minutes,
        EXPORTERS.len()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let s1 = stop.clone();
    let local = thread::Builder::new()
        .name("soak-local".into())
        .spawn(move || send_local(&s1))?;
    let s2 = stop.clone();
    let netflow = thread::Builder::new()
        .name("soak-netflow".into())
        .spawn(move || send_netflow(&s2))?;

    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>10} {:>10} {:>7} {:>7}  losses ({})",
        "min",
        "rss MiB",
        "map",
        "overflow",
        "map-full",
        "records",
        "raised",
        "cleared",
        LOSSES.iter().map(|l| l.1).collect::<Vec<_>>().join(" ")
    );
    let run_start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = every;
    while run_start.elapsed() < total {
        agent.check_running()?;
        if local.is_finished() || netflow.is_finished() {
            break;
        }
        if run_start.elapsed() >= next {
            next += every;
            let metrics = scrape()?;
            let s = Sample {
                at: run_start.elapsed().as_secs(),
                rss_kib: rss_kib(agent.pid())?,
                metrics,
            };
            let m = &s.metrics;
            println!(
                "{:>6.1} {:>9.1} {:>8} {:>8} {:>10} {:>10} {:>7} {:>7}  {}",
                s.at as f64 / 60.0,
                s.rss_kib as f64 / 1024.0,
                m.get("detector_meter_flows{table=\"kernel\"}")
                    .copied()
                    .unwrap_or(0.0),
                m.get("detector_meter_flows{table=\"overflow\"}")
                    .copied()
                    .unwrap_or(0.0),
                thousands(family(m, "detector_meter_map_full_packets_total")),
                thousands(family(m, "detector_records_total")),
                family(m, "detector_alarm_events_total{state=\"raised\"}"),
                family(m, "detector_alarm_events_total{state=\"cleared\"}"),
                LOSSES
                    .iter()
                    .map(|(n, _)| family(m, n).to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            samples.push(s);
        }
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let sent_local = local
        .join()
        .map_err(|_| anyhow::anyhow!("the local sender panicked"))??;
    let sent_nf = netflow
        .join()
        .map_err(|_| anyhow::anyhow!("the NetFlow sender panicked"))??;
    // The agent takes in what is queued, then flushes every flow at SIGTERM.
    thread::sleep(Duration::from_secs(3));
    let last = scrape()?;
    agent.stop(15, Duration::from_secs(120))?;
    let agent_log = fs::read_to_string(tmp.join("agent.log")).unwrap_or_default();
    thread::sleep(Duration::from_secs(1));
    nfcapd.stop(15, Duration::from_secs(60))?;

    let (_, local_bytes, local_packets) =
        nfdump_summary(&nfdir, "dst host 10.98.0.2 and proto udp and dst port 5001")?;
    let (nf_records, _, nf_packets) = nfdump_summary(&nfdir, "net 10.60.0.0/16")?;
    let mut failures = Vec::new();
    println!(
        "local traffic: sent {} packets ({} bytes), nfcapd has {} ({} bytes)",
        thousands(sent_local),
        thousands(sent_local * IP_LEN),
        thousands(local_packets),
        thousands(local_bytes)
    );
    if (local_packets, local_bytes) != (sent_local, sent_local * IP_LEN) {
        failures.push("the local traffic exported differs from what was sent".to_string());
    }
    println!(
        "NetFlow: sent {} records ({} packets) from {} exporters, nfcapd has {} ({} packets)",
        thousands(sent_nf.records),
        thousands(sent_nf.packets),
        EXPORTERS.len(),
        thousands(nf_records),
        thousands(nf_packets)
    );
    if (nf_records, nf_packets) != (sent_nf.records, sent_nf.packets) {
        failures.push("the NetFlow records re-exported differ from what was sent".to_string());
    }
    if !agent_log.contains("every packet the kernel counted was exported") {
        failures.push("the agent's exit check did not find every counted packet exported".into());
    }
    for (name, short) in LOSSES {
        let v = family(&last, name);
        if v != 0 {
            failures.push(format!("loss counter {short} ({name}) is {v}"));
        }
    }
    let raised = family(&last, "detector_alarm_events_total{state=\"raised\"}");
    let cleared = family(&last, "detector_alarm_events_total{state=\"cleared\"}");
    println!("alarms: {raised} raised, {cleared} cleared");
    if raised == 0 || cleared == 0 {
        failures.push("alarms were not both raised and cleared".into());
    }
    if family(&last, "detector_meter_map_full_packets_total") == 0 {
        failures
            .push("the bursts never filled the map (the overflow path was not exercised)".into());
    }
    // Memory: the last third's peak against the first third's (warm-up).
    if samples.len() >= 3 {
        let third = samples.len().div_ceil(3);
        let warm = samples[..third]
            .iter()
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(0);
        let end = samples[samples.len() - third..]
            .iter()
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(0);
        let limit = warm + warm / 10 + 8 * 1024;
        println!(
            "memory: peak {:.1} MiB in the first third, {:.1} MiB in the last (limit {:.1})",
            warm as f64 / 1024.0,
            end as f64 / 1024.0,
            limit as f64 / 1024.0
        );
        if end > limit {
            failures.push("resident memory grew after warm-up".into());
        }
    } else {
        failures.push(format!(
            "only {} samples: run longer (--minutes) or sample more often (--sample-secs)",
            samples.len()
        ));
    }
    if failures.is_empty() {
        let _ = fs::remove_dir_all(&tmp);
        println!("soak: PASS");
        Ok(())
    } else {
        bail!(
            "soak: FAIL: {} (logs in {})",
            failures.join("; "),
            tmp.display()
        )
    }
}
