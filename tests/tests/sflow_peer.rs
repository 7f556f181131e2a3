//! A live sFlow peer: pmacct's `pmacctd` with its `sfprobe` plugin replays a labelled
//! capture as sFlow v5 to a relay in this test, which keeps every datagram and passes it
//! on to the agent's `--sflow-listen`.
//!
//! - 1:1, every capture `LABELS.tsv` names: every flow sample of the datagrams, as
//!   tshark decodes them (written to a pcap), is one the agent counted; key by key
//!   (addresses, protocol, ports) the agent's flows (`--flows-json`) hold the packets
//!   and IP bytes of the samples tshark decodes with that key; and at most the capture's
//!   IP packets and bytes (tshark's dissection of the capture), missing at most 10
//!   (pmacctd leaves the last few packets of a capture out).
//! - 1:10 and 1:100: pmacctd samples each packet with probability 1/N, so the number
//!   sampled is binomial; the agent's scaled totals must be within 5 standard deviations
//!   of the capture's: packets within 5 x N x sqrt(n x q x (1 - q)), bytes within
//!   5 x N x sqrt(q x (1 - q) x sum of the squared sizes), q = 1/N (a false failure
//!   about once in 1.7 million runs). The agent re-exports the flows, NetFlow v9 to
//!   nfacctd (renormalising) at 1:10 and IPFIX to nfcapd at 1:100: each collector scales
//!   the raw counts by the interval the agent announces and must count exactly the
//!   agent's estimates.
//!
//! - The same datagrams (the relay sends each one to all three) go to two independent
//!   sFlow collectors, pmacct's `sfacctd` (renormalising, print plugin by 5-tuple) and
//!   nfdump's `sfcapd`, at 1:1 for every capture and at 1:10 and 1:100. Key by key:
//!   sfcapd holds the agent's packets, raw at 1:1 and scaled by the sampling rate at
//!   1:N, exactly; sfacctd the agent's packets at 1:1, and at 1:N each sample scaled by
//!   the effective rate pmacct derives (growth of the sample pool over growth of the
//!   sequence number since the source's previous sample; the sampling rate for the first
//!   one), computed here from tshark's decode of the same datagrams. Two documented
//!   design differences: both collectors count a sample's frame length as the record
//!   states it (Ethernet header and FCS included) where the agent, as NetFlow does,
//!   counts IP bytes, so their bytes are checked against tshark's frame lengths of the
//!   key's samples; and neither keys ICMP by type and code as the agent does (sfacctd
//!   leaves the ports 0, nfdump keeps type and code apart), so ICMP and ICMPv6 keys are
//!   compared with ports 0. At 1:N sfacctd's total, another estimator, must be within
//!   the agent's 5 standard deviations of the capture. The relay paces each collector by
//!   its socket's receive queue, and its socket must have dropped nothing
//!   (`/proc/net/udp`).
//!
//! Skips with a message when `../shared` is absent or pmacctd is not installed.

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use tests::collectors::{Nfacctd, Nfcapd, Sfacctd, udp_socket_queue, wait_for_udp_queue};
use tests::netns::{Guarded, free_udp_port, grow_receive_buffer, sh, wait_for_text};
use tests::sflow::{last_stats, stat};
use tests::tshark::Tuple;

const CAPTURE: &str = "pcap/p2p/nDPI__gnutella.pcap";

/// A flow key as the capture's truth keys it (`tests::tshark::Tuple`: protocol, source,
/// source port, destination, destination port; ICMP's destination port `type << 8 |
/// code`, as the agent keys it).
type Key = Tuple;
/// (packets, IP bytes) per key.
type ByKey = BTreeMap<Key, (u64, u64)>;

struct Run {
    datagrams: Vec<Vec<u8>>,
    /// (packets, bytes) over the flow records: as exported (scaled).
    packets: u64,
    bytes: u64,
    /// Sampling intervals the records carried.
    sampling: Vec<u64>,
    /// Unscaled (packets, bytes) of the records per flow key.
    by_key: ByKey,
    log: String,
    /// (packets, bytes) the collector counted, when the agent exported to one.
    collected: Option<(u64, u64)>,
    /// What sfacctd and sfcapd counted per key from the same datagrams, and sfcapd's
    /// sequence failures.
    peers: Peers,
}

struct Peers {
    sfacctd: ByKey,
    sfcapd: ByKey,
    sfcapd_sequence_failures: u64,
}

/// A collector the agent re-exports to: NetFlow v9 to nfacctd (renormalising), or
/// IPFIX to nfcapd; both scale each record by the sampling its domain announces.
#[derive(Clone, Copy, Debug)]
enum Export {
    V9ToNfacctd,
    IpfixToNfcapd,
}

enum Collector {
    Nfacctd(Nfacctd),
    Nfcapd(Nfcapd),
}

/// pmacctd replays `pcap` at 1:`rate` through a relay to an agent, sfacctd and sfcapd;
/// the agent's flows and what the two collectors counted.
fn run(pcap: &Path, rate: u32, dir: &Path, export: Option<Export>) -> Run {
    let agent_port = free_udp_port();
    let (sfacctd_port, sfcapd_port) = (free_udp_port(), free_udp_port());
    let sfacctd = Sfacctd::start(&dir.join("sfacctd"), sfacctd_port);
    let sfcapd = Nfcapd::start_sfcapd(dir.join("sfcapd"), sfcapd_port);
    let export_port = free_udp_port();
    let collector = export.map(|e| match e {
        Export::V9ToNfacctd => {
            Collector::Nfacctd(Nfacctd::start(&dir.join("nfacctd"), export_port))
        }
        Export::IpfixToNfcapd => Collector::Nfcapd(Nfcapd::start(dir.join("nfcapd"), export_port)),
    });
    let export_args: Vec<String> = match export {
        None => Vec::new(),
        Some(e) => vec![
            "--export".into(),
            format!("127.0.0.1:{export_port}"),
            "--export-format".into(),
            match e {
                Export::V9ToNfacctd => "v9",
                Export::IpfixToNfcapd => "ipfix",
            }
            .into(),
        ],
    };
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    grow_receive_buffer(&relay, 32 << 20);
    relay
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let json = dir.join(format!("flows-{rate}.json"));
    let log = dir.join(format!("agent-{rate}.log"));
    let child = Command::new(tests::detector_bin())
        .args(["run", "--sflow-listen", &format!("127.0.0.1:{agent_port}")])
        .arg("--flows-json")
        .arg(&json)
        .args(["--stats-interval", "0"])
        .args(&export_args)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "receiving sFlow", Duration::from_secs(20));

    let kept = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let relay_thread = {
        let (kept, done) = (kept.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                match relay.recv(&mut buf) {
                    Ok(n) => {
                        relay.send_to(&buf[..n], ("127.0.0.1", agent_port)).unwrap();
                        // The collectors keep the default receive buffer (about 200
                        // KiB; net.core.rmem_max caps what they may ask for, and they
                        // cannot force more as the agent does): send to each once its
                        // queue holds under 64 KiB, so none overflows.
                        for port in [sfacctd_port, sfcapd_port] {
                            wait_for_udp_queue(port, 64 << 10, Duration::from_secs(10));
                            relay.send_to(&buf[..n], ("127.0.0.1", port)).unwrap();
                        }
                        kept.lock().unwrap().push(buf[..n].to_vec());
                    }
                    Err(_) if done.load(Ordering::Relaxed) => return,
                    Err(_) => {}
                }
            }
        })
    };
    let conf = dir.join(format!("pmacctd-{rate}.conf"));
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\npcap_savefile: {}\nplugins: sfprobe\nsfprobe_receiver: 127.0.0.1:{relay_port}\nsfprobe_agentip: 127.0.0.1\nsampling_rate: {rate}\npidfile: {}\n",
            pcap.display(),
            dir.join(format!("pmacctd-{rate}.pid")).display()
        ),
    )
    .unwrap();
    let pm_log = dir.join(format!("pmacctd-{rate}.log"));
    let out = std::fs::File::create(&pm_log).unwrap();
    let child = Command::new("pmacctd")
        .arg("-f")
        .arg(&conf)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run pmacctd");
    let st = Guarded::new("pmacctd", child).wait(Duration::from_secs(120));
    let pm_text = std::fs::read_to_string(&pm_log).unwrap_or_default();
    // At the end of the capture the core asks the plugin to stop; on a loaded machine
    // it may notice the plugin gone before its own clean exit and return 1. The plugin
    // had finished (it says so); what it sent is checked sample by sample.
    let plugin_done = pm_text.contains("sfprobe ): Shutting down on user request");
    assert!(st.success() || plugin_done, "pmacctd: {st}: {pm_text}");
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    relay_thread.join().unwrap();
    // Every datagram reached the collectors: their sockets dropped none.
    for (name, port) in [("sfacctd", sfacctd_port), ("sfcapd", sfcapd_port)] {
        let (_, drops) = udp_socket_queue(port).unwrap_or_else(|| panic!("{name}'s socket"));
        assert_eq!(drops, 0, "{name}'s socket dropped datagrams");
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{log}");
    let (mut packets, mut bytes, mut sampling) = (0, 0, Vec::new());
    let mut by_key = ByKey::new();
    for line in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        packets += v["packets"].as_u64().unwrap();
        bytes += v["bytes"].as_u64().unwrap();
        let addr = |f: &str| -> IpAddr {
            v[f].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{f}: {line}"))
        };
        let num = |f: &str| v[f].as_u64().unwrap_or_else(|| panic!("{f}: {line}"));
        let key = (
            num("protocol") as u8,
            addr("src_addr"),
            num("src_port") as u16,
            addr("dst_addr"),
            num("dst_port") as u16,
        );
        let raw = |f: &str, scaled: &str| v[f].as_u64().unwrap_or_else(|| num(scaled));
        let e = by_key.entry(key).or_insert((0, 0));
        e.0 += raw("raw_packets", "packets");
        e.1 += raw("raw_bytes", "bytes");
        let n = v["sampling"].as_u64().unwrap_or(0);
        if !sampling.contains(&n) {
            sampling.push(n);
        }
    }
    let datagrams = std::mem::take(&mut *kept.lock().unwrap());
    let collected = collector.map(|c| match c {
        Collector::Nfacctd(c) => c.totals(),
        Collector::Nfcapd(c) => {
            let ((_, p, b), _) = c.totals();
            (p, b)
        }
    });
    let (sfcapd, sfcapd_sequence_failures) = sfcapd.by_key();
    let peers = Peers {
        sfacctd: sfacctd.by_key(),
        sfcapd,
        sfcapd_sequence_failures,
    };
    Run {
        peers,
        collected,
        datagrams,
        packets,
        bytes,
        sampling,
        by_key,
        log,
    }
}

/// The datagrams as a pcap of IPv4/UDP packets to port 6343 (tshark's sFlow port).
fn write_pcap(datagrams: &[Vec<u8>], path: &Path) {
    let header = PcapHeader {
        datalink: DataLink::RAW,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(std::fs::File::create(path).unwrap(), header).unwrap();
    for (i, d) in datagrams.iter().enumerate() {
        let len = 28 + d.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        let ulen = 8 + d.len();
        p.extend_from_slice(&[0x18, 0xc7, 0x18, 0xc7, (ulen >> 8) as u8, ulen as u8, 0, 0]);
        p.extend_from_slice(d);
        let t = Duration::from_millis(i as u64);
        w.write_packet(&PcapPacket::new(t, p.len() as u32, &p))
            .unwrap();
    }
}

/// tshark's sFlow decode: (flow samples, their sequence numbers, counter samples).
fn tshark_samples(pcap: &Path) -> (u64, Vec<u64>, u64) {
    let out = sh(
        "tshark",
        &[
            "-r",
            pcap.to_str().unwrap(),
            "-d",
            "udp.port==6343,sflow",
            "-T",
            "fields",
            "-E",
            "separator=;",
            "-E",
            "aggregator=,",
            "-e",
            "sflow.flow_sample.sequence_number",
            "-e",
            "sflow.counters_sample.sequence_number",
        ],
    );
    let (mut flows, mut seqs, mut counters) = (0, Vec::new(), 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut cols = line.split(';');
        for s in cols
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
        {
            flows += 1;
            seqs.push(s.parse().unwrap());
        }
        counters += cols
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .count() as u64;
    }
    (flows, seqs, counters)
}

/// A field of a tshark JSON tree (with `--no-duplicate-keys` a repeated field is an
/// array: its first occurrence), as a number or address.
fn field<T: std::str::FromStr>(tree: &serde_json::Value, name: &str) -> Option<T> {
    let v = &tree[name];
    let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
    v.as_str()?.parse().ok()
}

/// The first (outermost) occurrence of a layer in a tshark JSON tree.
fn layer<'a>(tree: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let v = tree.get(name)?;
    Some(v.as_array().and_then(|a| a.first()).unwrap_or(v))
}

/// One flow sample as tshark decodes it.
struct Sample {
    /// The flow key of its raw packet header; None for a frame without IP.
    key: Option<Key>,
    /// IP bytes (`ip.len`, or `ipv6.plen` + 40).
    ip_bytes: u64,
    /// The frame length the record states (FCS included).
    frame: u64,
    /// Data source (class, index), sequence number, sample pool, sampling rate.
    source: (u64, u64),
    sequence: u64,
    pool: u64,
    rate: u64,
}

/// tshark's decode of every flow sample's raw packet header, aggregated by flow key:
/// (packets, IP bytes: `ip.len`, or `ipv6.plen` + 40); the number of IP samples, and of
/// samples of frames that carry no IP packet.
fn tshark_flows(samples: &[Sample]) -> (ByKey, u64, u64) {
    let mut by_key = ByKey::new();
    let (mut ip, mut not_ip) = (0, 0);
    for s in samples {
        match s.key {
            Some(k) => {
                ip += 1;
                let e = by_key.entry(k).or_insert((0, 0));
                e.0 += 1;
                e.1 += s.ip_bytes;
            }
            None => not_ip += 1,
        }
    }
    (by_key, ip, not_ip)
}

/// `by_key` with the ports of ICMP and ICMPv6 keys 0, as sfacctd and sfcapd key them.
fn icmp_without_ports(by_key: &ByKey) -> ByKey {
    let mut out = ByKey::new();
    for (&(proto, src, sport, dst, dport), &(p, b)) in by_key {
        let k = if matches!(proto, 1 | 58) {
            (proto, src, 0, dst, 0)
        } else {
            (proto, src, sport, dst, dport)
        };
        let e = out.entry(k).or_insert((0, 0));
        e.0 += p;
        e.1 += b;
    }
    out
}

/// What sfcapd and sfacctd must count from tshark's samples, per key (ICMP without
/// ports), in frame bytes: sfcapd each sample scaled by its sampling rate; sfacctd by
/// pmacct's effective rate, the growth of the data source's sample pool over the growth
/// of its sequence number since the source's previous sample, or the sampling rate for
/// the source's first sample (or when pool or sequence did not grow).
fn peers_expected(samples: &[Sample]) -> (ByKey, ByKey) {
    let (mut sfcapd, mut sfacctd) = (ByKey::new(), ByKey::new());
    let mut last: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    for s in samples {
        let effective = match last.get(&s.source) {
            Some(&(seq, pool)) if s.sequence > seq && s.pool > pool => {
                (s.pool - pool) / (s.sequence - seq)
            }
            _ => s.rate,
        };
        let grew = last
            .get(&s.source)
            .is_none_or(|&(seq, pool)| s.sequence > seq && s.pool > pool);
        if grew {
            last.insert(s.source, (s.sequence, s.pool));
        }
        let Some(k) = s.key else { continue };
        for (m, n) in [(&mut sfcapd, s.rate), (&mut sfacctd, effective)] {
            let e = m.entry(k).or_insert((0, 0));
            e.0 += n;
            e.1 += n * s.frame;
        }
    }
    (icmp_without_ports(&sfcapd), icmp_without_ports(&sfacctd))
}

/// Keys where `a` and `b` differ, one line each.
fn key_diffs(what: &str, a: &ByKey, b: &ByKey) -> Vec<String> {
    let keys: std::collections::BTreeSet<&Key> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            (x != y).then(|| format!("{k:?}: {what} {x:?} vs {y:?}"))
        })
        .collect()
}

/// Packets (the first of each pair) per key.
fn packets_only(by_key: &ByKey) -> BTreeMap<Key, u64> {
    by_key.iter().map(|(k, v)| (*k, v.0)).collect()
}

/// tshark's decode of every flow sample of the datagrams in `pcap`.
fn tshark_flow_samples(pcap: &Path) -> Vec<Sample> {
    let out = sh(
        "tshark",
        &[
            "-r",
            pcap.to_str().unwrap(),
            "-d",
            "udp.port==6343,sflow",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
    );
    let frames: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut sampled = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let sflow = &frame["_source"]["layers"]["sflow"];
        let sflow = sflow
            .as_object()
            .unwrap_or_else(|| panic!("frame {}: no sflow layer", i + 1));
        for (name, sample) in sflow {
            if !name.starts_with("Flow sample") {
                continue;
            }
            let what = || format!("frame {}, {name}: {sample:#}", i + 1);
            let num = |tree: &serde_json::Value, f: &str| -> u64 {
                field(tree, f).unwrap_or_else(|| panic!("{f}: {}", what()))
            };
            let header = &sample["Raw packet header"];
            let mut s = Sample {
                key: None,
                ip_bytes: 0,
                frame: num(header, "sflow_245.header.frame_length"),
                source: (
                    num(sample, "sflow.flow_sample.source_id_class"),
                    num(sample, "sflow.flow_sample.index"),
                ),
                sequence: num(sample, "sflow.flow_sample.sequence_number"),
                pool: num(sample, "sflow.flow_sample.sample_pool"),
                rate: num(sample, "sflow.flow_sample.sampling_rate"),
            };
            let tree = &header["sflow_245.header_tree"];
            let (src, dst, mut proto, len) = if let Some(ip) = layer(tree, "ip") {
                (
                    field(ip, "ip.src"),
                    field(ip, "ip.dst"),
                    field(ip, "ip.proto"),
                    field(ip, "ip.len"),
                )
            } else if let Some(ip) = layer(tree, "ipv6") {
                (
                    field(ip, "ipv6.src"),
                    field(ip, "ipv6.dst"),
                    field(ip, "ipv6.nxt"),
                    field::<u64>(ip, "ipv6.plen").map(|n| n + 40),
                )
            } else {
                // An ARP or other non-IP frame: the agent counts it as not-ip.
                sampled.push(s);
                continue;
            };
            let (mut sport, mut dport) = (0, 0);
            if let Some(t) = layer(tree, "tcp") {
                proto = Some(6);
                sport = field(t, "tcp.srcport").unwrap_or_else(|| panic!("{}", what()));
                dport = field(t, "tcp.dstport").unwrap_or_else(|| panic!("{}", what()));
            } else if let Some(t) = layer(tree, "udp") {
                proto = Some(17);
                sport = field(t, "udp.srcport").unwrap_or_else(|| panic!("{}", what()));
                dport = field(t, "udp.dstport").unwrap_or_else(|| panic!("{}", what()));
            } else {
                for (p, l) in [(1, "icmp"), (58, "icmpv6")] {
                    if let Some(t) = layer(tree, l) {
                        proto = Some(p);
                        let n = |f: &str| -> u16 {
                            field(t, &format!("{l}.{f}")).unwrap_or_else(|| panic!("{}", what()))
                        };
                        dport = n("type") << 8 | n("code");
                    }
                }
            }
            s.key = Some((
                proto.unwrap_or_else(|| panic!("{}", what())),
                src.unwrap_or_else(|| panic!("{}", what())),
                sport,
                dst.unwrap_or_else(|| panic!("{}", what())),
                dport,
            ));
            s.ip_bytes = len.unwrap_or_else(|| panic!("{}", what()));
            sampled.push(s);
        }
    }
    // serde_json orders a datagram's samples by name ("Flow sample, seq 10" before
    // "..., seq 9"): put each source's samples back in the order it numbered and sent
    // them, the order a collector sees them in.
    sampled.sort_by_key(|s| (s.source, s.sequence));
    sampled
}

/// sfacctd's and sfcapd's counts against what tshark's decode of the same datagrams
/// makes them (`peers_expected`) and, key by key, sfcapd's packets against the agent's
/// (raw counts scaled by `rate`), and at 1:1 sfacctd's too; what differs.
fn check_peers(r: &Run, samples: &[Sample], rate: u64) -> Vec<String> {
    let mut bad = Vec::new();
    let (sfcapd, sfacctd) = peers_expected(samples);
    let scaled: ByKey = r
        .by_key
        .iter()
        .map(|(k, &(p, b))| (*k, (p * rate, b * rate)))
        .collect();
    let agent = packets_only(&icmp_without_ports(&scaled));
    let mut compare = |what: &str, diffs: Vec<String>| {
        if !diffs.is_empty() {
            bad.push(format!(
                "{what}: {} keys differ; the first:\n{}",
                diffs.len(),
                diffs[..diffs.len().min(10)].join("\n")
            ));
        }
    };
    compare(
        "sfcapd vs tshark (packets x rate, frame bytes x rate)",
        key_diffs("sfcapd, tshark", &r.peers.sfcapd, &sfcapd),
    );
    compare(
        "sfacctd vs tshark (packets x effective rate, frame bytes x effective rate)",
        key_diffs("sfacctd, tshark", &r.peers.sfacctd, &sfacctd),
    );
    let packets =
        |m: &BTreeMap<Key, u64>| -> ByKey { m.iter().map(|(k, v)| (*k, (*v, 0))).collect() };
    compare(
        "sfcapd vs agent packets",
        key_diffs(
            "sfcapd, agent packets",
            &packets(&packets_only(&r.peers.sfcapd)),
            &packets(&agent),
        ),
    );
    if rate == 1 {
        compare(
            "sfacctd vs agent packets",
            key_diffs(
                "sfacctd, agent packets",
                &packets(&packets_only(&r.peers.sfacctd)),
                &packets(&agent),
            ),
        );
    }
    if r.peers.sfcapd_sequence_failures != 0 {
        bad.push(format!(
            "sfcapd counted {} sequence failures",
            r.peers.sfcapd_sequence_failures
        ));
    }
    bad
}

fn setup(name: &str) -> Option<(PathBuf, PathBuf)> {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return None;
    };
    if Command::new("pmacctd").arg("-V").output().is_err() {
        eprintln!("skipped: pmacctd is not installed (Debian package pmacct)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("detector-sflow-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Some((data, dir))
}

/// The distinct captures `LABELS.tsv` names (those present).
fn labelled_captures(data: &Path) -> Vec<PathBuf> {
    let labels = std::fs::read_to_string(data.join("LABELS.tsv")).unwrap();
    let mut out: Vec<PathBuf> = labels
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .map(|c| data.join(c))
        .filter(|p| p.is_file())
        .collect();
    out.dedup();
    out
}

/// Replays one capture at 1:1 and checks the agent against tshark; what differs.
fn one_to_one(pcap: &Path, dir: &Path) -> Result<String, String> {
    let name = pcap.file_name().unwrap().to_string_lossy().to_string();
    let dir = dir.join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let truth = tests::tshark::packets(pcap);
    let (n, bytes) = (
        truth.len() as u64,
        truth.iter().map(|p| p.bytes).sum::<u64>(),
    );
    let r = run(pcap, 1, &dir, None);
    let sflow_pcap = dir.join("sflow-1.pcap");
    write_pcap(&r.datagrams, &sflow_pcap);
    let (flows, seqs, counters) = tshark_samples(&sflow_pcap);
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    // (a) Every sample tshark decodes the agent counted, none lost, none left out.
    let got = |k: &str| stat(last_stats(&r.log), k);
    check(
        got("datagrams") == r.datagrams.len() as u64,
        format!(
            "datagrams {} vs {} sent",
            got("datagrams"),
            r.datagrams.len()
        ),
    );
    check(
        got("flow samples") == flows,
        format!("flow samples {} vs tshark {flows}", got("flow samples")),
    );
    check(
        got("counter samples") == counters,
        format!(
            "counter samples {} vs tshark {counters}",
            got("counter samples")
        ),
    );
    check(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "tshark: sample sequence gaps".into(),
    );
    check(
        got("lost datagrams") == 0 && got("lost samples") == 0,
        "losses counted".into(),
    );
    check(r.log.contains("errors {}"), "decode errors".into());
    // (c) Key by key, the agent's flows hold the packets and IP bytes of tshark's
    // samples; the samples of frames without IP are the agent's not-ip.
    let decoded_samples = tshark_flow_samples(&sflow_pcap);
    let (decoded, samples, not_ip) = tshark_flows(&decoded_samples);
    check(
        samples + not_ip == flows,
        format!("tshark's two decodes disagree: {samples} + {not_ip} vs {flows}"),
    );
    check(
        (got("packets"), got("not-ip")) == (samples, not_ip),
        format!(
            "agent packets/not-ip {}/{} vs tshark {samples}/{not_ip}",
            got("packets"),
            got("not-ip")
        ),
    );
    let keys: std::collections::BTreeSet<&Key> = decoded.keys().chain(r.by_key.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (t, a) = (decoded.get(k), r.by_key.get(k));
            (t != a).then(|| format!("{k:?}: tshark (packets, bytes) {t:?}, agent {a:?}"))
        })
        .collect();
    check(
        diffs.is_empty(),
        format!(
            "{} of {} flow keys differ; the first:\n{}",
            diffs.len(),
            decoded.len(),
            diffs[..diffs.len().min(10)].join("\n")
        ),
    );
    // (d) sfacctd and sfcapd, fed the same datagrams, agree with tshark and the agent.
    for b in check_peers(&r, &decoded_samples, 1) {
        check(false, b);
    }
    // (b) Against the capture: pmacctd samples every IP packet it reads at 1:1 but
    // the last few of a capture (2 to 8 here, whatever the capture's size), so the flows
    // hold at most the capture's IP packets and bytes, and all but at most 10 packets.
    check(
        r.sampling.iter().all(|&s| s == 1),
        format!("sampling {:?}", r.sampling),
    );
    check(
        r.packets == samples,
        format!("flows hold {} packets, {samples} samples", r.packets),
    );
    let missing = n.saturating_sub(r.packets);
    check(
        r.packets <= n && r.bytes <= bytes && missing <= 10,
        format!(
            "flows {} packets / {} bytes vs the capture's IP {n} / {bytes}",
            r.packets, r.bytes
        ),
    );
    if bad.is_empty() {
        std::fs::remove_dir_all(&dir).ok();
        Ok(format!(
            "{name}: {} flow keys, {samples} samples (+{not_ip} not IP) of {n} IP packets \
             agree; sfacctd and sfcapd {} and {} keys, {} and {} packets agree",
            decoded.len(),
            r.peers.sfacctd.len(),
            r.peers.sfcapd.len(),
            r.peers.sfacctd.values().map(|v| v.0).sum::<u64>(),
            r.peers.sfcapd.values().map(|v| v.0).sum::<u64>(),
        ))
    } else {
        Err(format!("{name}:\n  {}\n{}", bad.join("\n  "), r.log))
    }
}

#[test]
fn pmacct_sflow_at_one_to_one_gives_every_packet_and_byte_of_the_labelled_captures() {
    let Some((data, dir)) = setup("1") else {
        return;
    };
    let captures = labelled_captures(&data);
    assert!(captures.len() >= 10, "{captures:?}");
    let mut failures = Vec::new();
    for pcap in &captures {
        match one_to_one(pcap, &dir) {
            Ok(line) => eprintln!("1:1 {line}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} captures:\n{}",
        failures.len(),
        captures.len(),
        failures.join("\n\n")
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// pmacctd samples at 1:`rate` (each packet with probability 1/`rate`), so the number
/// sampled is binomial: the agent's scaled totals must be within 5 standard deviations
/// of the capture's, and the collector it re-exports to must count exactly the agent's
/// estimates (the records' raw counts scaled by the interval their domain announces).
fn sampled(rate: u32, export: Export) {
    let Some((data, dir)) = setup(&rate.to_string()) else {
        return;
    };
    let pcap = data.join(CAPTURE);
    let truth = tests::tshark::packets(&pcap);
    let n = truth.len() as f64;
    let bytes: f64 = truth.iter().map(|p| p.bytes as f64).sum();
    let squares: f64 = truth.iter().map(|p| (p.bytes as f64).powi(2)).sum();
    let r = run(&pcap, rate, &dir, Some(export));
    assert_eq!(r.sampling, vec![u64::from(rate)], "{}", r.log);
    let q = 1.0 / f64::from(rate);
    let k = f64::from(rate);
    let (sd_packets, sd_bytes) = (
        k * (n * q * (1.0 - q)).sqrt(),
        k * (q * (1.0 - q) * squares).sqrt(),
    );
    let (dp, db) = (r.packets as f64 - n, r.bytes as f64 - bytes);
    assert!(
        dp.abs() <= 5.0 * sd_packets,
        "packets {} vs {n} (sd {sd_packets:.0})",
        r.packets
    );
    assert!(
        db.abs() <= 5.0 * sd_bytes,
        "bytes {} vs {bytes} (sd {sd_bytes:.0})",
        r.bytes
    );
    assert_eq!(
        r.collected,
        Some((r.packets, r.bytes)),
        "{export:?}: the collector's (packets, bytes) vs the agent's estimates\n{}",
        r.log
    );
    // sfacctd and sfcapd, fed the same datagrams: sfcapd's packets are the agent's
    // estimates key by key, sfacctd's each sample scaled by pmacct's effective rate
    // (checked against tshark's decode of the pools and sequence numbers); sfacctd's
    // total, a different estimator, must be as close to the capture as the agent's.
    let sflow_pcap = dir.join(format!("sflow-{rate}.pcap"));
    write_pcap(&r.datagrams, &sflow_pcap);
    let decoded = tshark_flow_samples(&sflow_pcap);
    let bad = check_peers(&r, &decoded, u64::from(rate));
    assert!(bad.is_empty(), "1:{rate}:\n{}", bad.join("\n"));
    let total = |m: &ByKey| m.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    let (sfcapd, sfacctd) = (total(&r.peers.sfcapd), total(&r.peers.sfacctd));
    assert_eq!(sfcapd.0, r.packets, "sfcapd's packets vs the agent's");
    let dq = sfacctd.0 as f64 - n;
    assert!(
        dq.abs() <= 5.0 * sd_packets,
        "sfacctd's packets {} vs {n} (sd {sd_packets:.0})",
        sfacctd.0
    );
    eprintln!(
        "1:{rate}: packets {} vs {n} ({:+.2} sd), bytes {} vs {bytes} ({:+.2} sd); \
         {export:?} counted the same; sfcapd packets {}, frame bytes {}; sfacctd \
         packets {} ({:+.2} sd), frame bytes {}",
        r.packets,
        dp / sd_packets,
        r.bytes,
        db / sd_bytes,
        sfcapd.0,
        sfcapd.1,
        sfacctd.0,
        dq / sd_packets,
        sfacctd.1,
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pmacct_sflow_at_one_to_ten_scales_to_the_capture_and_nfacctd_reads_the_v9_re_export() {
    sampled(10, Export::V9ToNfacctd);
}

#[test]
fn pmacct_sflow_at_one_to_a_hundred_scales_to_the_capture_and_nfcapd_reads_the_ipfix_re_export() {
    sampled(100, Export::IpfixToNfcapd);
}
