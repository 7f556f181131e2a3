//! What switches send that the pmacct peer (`sflow_peer.rs`) does not: hand-built sFlow
//! v5 datagrams (`tests::sflow_switch`, per sflow.org/sflow_version_5.txt) with expanded flow
//! samples (format 3) beside compact ones, sampled IPv4 (record 3) and IPv6 (record 4)
//! records instead of raw headers, an IPv6 agent and sub-agent ids other than 0, and raw
//! headers of 802.1Q and QinQ frames, an MPLS label stack, IPv6 with hop-by-hop, routing
//! and fragment (first fragment) headers, later IPv4 and IPv6 fragments (no ports), ICMP
//! and ICMPv6, and IPv4/IPv6 headers without a link header (header protocols 11 and 12),
//! at sampling rates 1, 10 and 256.
//!
//! - Built against tshark: the datagrams, as UDP to port 6343 in a pcap, are decoded by
//!   tshark without a malformed packet or an expert warning, and sample by sample tshark
//!   reads what was built: sample type (compact or expanded), sampling rate, input
//!   ifIndex, agent address, sub-agent id, and the inner packet's protocol, addresses,
//!   ports (ICMP: `type << 8 | code` in the destination port), VLANs and IP length (raw
//!   headers: `ip.len` or `ipv6.plen` + 40, which is also the frame length less the
//!   stripped FCS and the link header; sampled records: their length field).
//! - Agent against tshark: the same datagrams sent to `detector run --sflow-listen`; key
//!   by key (agent/sub-agent, sampling interval, protocol, addresses, ports) the agent's
//!   flows (`--flows-json`) hold tshark's packets (`raw_packets`) and IP bytes
//!   (`raw_bytes`), those scaled by the interval (`packets`, `bytes`), the VLANs tshark
//!   reads in the raw headers and the samples' input ifIndex; its statistics line
//!   counts, per agent and sub-agent, the datagrams and flow samples (expanded ones among
//!   them) tshark decodes, each a packet, with no errors, no non-IP sample and no loss.
//!
//! - Interface counters: compact and expanded counter samples from two agents reach a
//!   live /metrics as sent, the listener taken from the configuration file.
//!
//! The tshark test skips with a message when tshark is not installed.

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tests::netns::{Guarded, free_udp_port, sh, wait_for_text};
use tests::sflow::{datagram, source_stats, stat, write_sflow_pcap};
use tests::sflow_switch::{Sample, Tuple, build};

/// The first (outermost) occurrence of a key in a tshark JSON tree (with
/// `--no-duplicate-keys` a repeated key holds an array).
fn first<'a>(tree: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let v = tree.get(name)?;
    Some(v.as_array().and_then(|a| a.first()).unwrap_or(v))
}

/// Every occurrence of a key.
fn all<'a>(tree: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    match tree.get(name) {
        Some(serde_json::Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
        None => vec![],
    }
}

/// A field as a number or address; panics with the tree when absent.
fn field<T: std::str::FromStr>(tree: &serde_json::Value, name: &str) -> T {
    first(tree, name)
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("tshark: no {name} in {tree:#}"))
}

/// tshark's decode of the datagrams: every flow sample, and (datagrams, flow samples,
/// expanded flow samples) per agent/sub-agent.
struct Decoded {
    samples: Vec<Sample>,
    per_source: BTreeMap<String, (u64, u64, u64)>,
}

/// The inner packet of a raw header record as tshark dissects it: the tuple, the IP
/// length, the VLANs, and the link header's length (Ethernet, tags, labels).
fn dissected(record: &serde_json::Value) -> (Tuple, u64, (u16, u16), u64) {
    let tree = &record["sflow_245.header_tree"];
    let (src, dst, proto, len): (IpAddr, IpAddr, u8, u64) = if let Some(ip) = first(tree, "ip") {
        (
            field(ip, "ip.src"),
            field(ip, "ip.dst"),
            field(ip, "ip.proto"),
            field(ip, "ip.len"),
        )
    } else if let Some(ip) = first(tree, "ipv6") {
        let plen: u64 = field(ip, "ipv6.plen");
        (
            field(ip, "ipv6.src"),
            field(ip, "ipv6.dst"),
            field(ip, "ipv6.nxt"),
            plen + 40,
        )
    } else {
        panic!("tshark: no IP packet in {record:#}");
    };
    let tuple = if let Some(t) = first(tree, "tcp") {
        (
            6,
            src,
            field(t, "tcp.srcport"),
            dst,
            field(t, "tcp.dstport"),
        )
    } else if let Some(t) = first(tree, "udp") {
        (
            17,
            src,
            field(t, "udp.srcport"),
            dst,
            field(t, "udp.dstport"),
        )
    } else if let Some(t) = first(tree, "icmp") {
        let (ty, code): (u16, u16) = (field(t, "icmp.type"), field(t, "icmp.code"));
        (1, src, 0, dst, ty << 8 | code)
    } else if let Some(t) = first(tree, "icmpv6") {
        let (ty, code): (u16, u16) = (field(t, "icmpv6.type"), field(t, "icmpv6.code"));
        (58, src, 0, dst, ty << 8 | code)
    } else {
        // A later fragment: no transport header; its protocol is the fragment header's.
        let proto = first(tree, "ipv6")
            .and_then(|ip| first(ip, "ipv6.fraghdr"))
            .map_or(proto, |f| field(f, "ipv6.fraghdr.nxt"));
        (proto, src, 0, dst, 0)
    };
    let ad = first(tree, "ieee8021ad");
    let q: Vec<u16> = all(tree, "vlan")
        .iter()
        .map(|v| field(v, "vlan.id"))
        .collect();
    let vlans = match (ad, q.as_slice()) {
        (Some(ad), [inner, ..]) => (field(ad, "ieee8021ad.id"), *inner),
        (Some(ad), []) => (field(ad, "ieee8021ad.id"), 0),
        (None, [outer, inner, ..]) => (*outer, *inner),
        (None, [outer]) => (*outer, 0),
        (None, []) => (0, 0),
    };
    let link = if tree.get("eth").is_some() {
        14 + 4 * (u64::from(ad.is_some()) + q.len() as u64 + all(tree, "mpls").len() as u64)
    } else {
        0
    };
    (tuple, len, vlans, link)
}

/// `tshark -T json` of the pcap of the datagrams, reassembly off (as the agent reads a
/// first fragment); asserts it found nothing malformed and no expert information.
fn tshark(pcap: &Path) -> Decoded {
    let out = sh(
        "tshark",
        &[
            "-r",
            pcap.to_str().unwrap(),
            "-o",
            "ip.defragment:FALSE",
            "-o",
            "ipv6.defragment:FALSE",
            "-d",
            "udp.port==6343,sflow",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for bad in ["_ws.malformed", "_ws.expert", "_ws.short"] {
        assert!(!text.contains(bad), "tshark reports {bad}:\n{text}");
    }
    let frames: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut d = Decoded {
        samples: Vec::new(),
        per_source: BTreeMap::new(),
    };
    for (i, frame) in frames.iter().enumerate() {
        let sflow = &frame["_source"]["layers"]["sflow"];
        assert!(
            sflow.is_object(),
            "frame {}: no sflow layer: {frame:#}",
            i + 1
        );
        let agent: IpAddr = match field::<u32>(sflow, "sflow_245.agenttype") {
            1 => field(sflow, "sflow_245.agent"),
            2 => field(sflow, "sflow_245.agent.v6"),
            t => panic!("frame {}: agent address type {t}", i + 1),
        };
        let sub_agent: u32 = field(sflow, "sflow_245.sub_agent_id");
        let numsamples: usize = field(sflow, "sflow_245.numsamples");
        let before = d.samples.len();
        let counts = d
            .per_source
            .entry(format!("{agent}/{sub_agent}"))
            .or_default();
        counts.0 += 1;
        let samples = sflow
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("low sample"))
            .flat_map(|(_, v)| match v {
                serde_json::Value::Array(a) => a.iter().collect::<Vec<_>>(),
                v => vec![v],
            });
        for s in samples {
            let kind: u32 = field(s, "sflow_245.sampletype");
            let expanded = match kind {
                1 => false,
                3 => true,
                k => panic!("frame {}: sample type {k}: {s:#}", i + 1),
            };
            counts.1 += 1;
            counts.2 += u64::from(expanded);
            let rate: u32 = field(s, "sflow.flow_sample.sampling_rate");
            let input: u32 = if expanded {
                assert_eq!(
                    field::<u32>(s, "sflow.flow_sample.input_interface_format"),
                    0
                );
                field(s, "sflow.flow_sample.input_interface_value")
            } else {
                field(s, "sflow.flow_sample.input_interface")
            };
            let sample = if let Some(r) = first(s, "Raw packet header") {
                let (tuple, bytes, vlans, link) = dissected(r);
                // The IP length is the frame's, less what was stripped and the link header.
                let frame: u64 = field(r, "sflow_245.header.frame_length");
                let stripped: u64 = field(r, "sflow_245.header.payload_stripped");
                assert_eq!(frame - stripped - link, bytes, "frame {}: {r:#}", i + 1);
                Sample {
                    agent,
                    sub_agent,
                    expanded,
                    rate,
                    raw: true,
                    tuple,
                    bytes,
                    vlans,
                    input,
                }
            } else {
                let (r, src, dst): (_, IpAddr, IpAddr) = if let Some(r) = first(s, "IPv4 data") {
                    (
                        r,
                        field(r, "sflow_245.ipv4_src"),
                        field(r, "sflow_245.ipv4_dst"),
                    )
                } else if let Some(r) = first(s, "IPv6 data") {
                    (
                        r,
                        field(r, "sflow_245.ipv6_src"),
                        field(r, "sflow_245.ipv6_dst"),
                    )
                } else {
                    panic!("frame {}: no raw header or sampled IP record: {s:#}", i + 1);
                };
                Sample {
                    agent,
                    sub_agent,
                    expanded,
                    rate,
                    raw: false,
                    tuple: (
                        field(r, "sflow.ip_protocol"),
                        src,
                        field(r, "sflow_245.ip.source_port"),
                        dst,
                        field(r, "sflow.ip.destination_port"),
                    ),
                    bytes: field(r, "sflow_245.ip.length"),
                    vlans: (0, 0),
                    input,
                }
            };
            d.samples.push(sample);
        }
        assert_eq!(
            d.samples.len() - before,
            numsamples,
            "frame {}: samples",
            i + 1
        );
    }
    d
}

/// (agent/sub-agent, sampling interval, tuple).
type Key = (String, u32, Tuple);

/// Per key: raw packets, raw bytes, scaled packets, scaled bytes, (VLAN, inner VLAN,
/// input ifIndex).
type Flows = BTreeMap<Key, (u64, u64, u64, u64, (u16, u16, u32))>;

/// tshark's samples as the agent should aggregate them.
fn expected(samples: &[Sample]) -> Flows {
    let mut m = Flows::new();
    for s in samples {
        let r = u64::from(s.rate);
        let e = m
            .entry((format!("{}/{}", s.agent, s.sub_agent), s.rate, s.tuple))
            .or_insert((0, 0, 0, 0, (s.vlans.0, s.vlans.1, s.input)));
        assert_eq!(
            e.4,
            (s.vlans.0, s.vlans.1, s.input),
            "one key, one VLAN pair and input: {s:?}"
        );
        e.0 += 1;
        e.1 += s.bytes;
        e.2 += r;
        e.3 += s.bytes * r;
    }
    m
}

/// The agent's flows (`--flows-json`), summed per key.
fn agent_flows(json: &str) -> Flows {
    let mut m = Flows::new();
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let num = |f: &str| v[f].as_u64().unwrap_or_else(|| panic!("{f}: {line}"));
        let addr = |f: &str| -> IpAddr {
            v[f].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{f}: {line}"))
        };
        let key = (
            v["source"].as_str().unwrap().to_string(),
            num("sampling") as u32,
            (
                num("protocol") as u8,
                addr("src_addr"),
                num("src_port") as u16,
                addr("dst_addr"),
                num("dst_port") as u16,
            ),
        );
        let vlans = (
            num("vlan") as u16,
            num("vlan_inner") as u16,
            num("ifindex") as u32,
        );
        let e = m.entry(key).or_insert((0, 0, 0, 0, vlans));
        assert_eq!(e.4, vlans, "{line}");
        e.0 += num("raw_packets");
        e.1 += num("raw_bytes");
        e.2 += num("packets");
        e.3 += num("bytes");
    }
    m
}

/// The agent on `127.0.0.1:<free port>` is sent the datagrams and stopped: its flows
/// file and its log.
fn run_agent(datagrams: &[Vec<u8>], dir: &Path) -> (String, String) {
    let port = free_udp_port();
    let (json, log) = (dir.join("flows.json"), dir.join("agent.log"));
    let child = Command::new(tests::detector_bin())
        .args(["run", "--sflow-listen", &format!("127.0.0.1:{port}")])
        .arg("--flows-json")
        .arg(&json)
        .args(["--stats-interval", "0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "receiving sFlow", Duration::from_secs(20));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in datagrams {
        sock.send_to(d, ("127.0.0.1", port)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "agent: {st}\n{log}");
    (std::fs::read_to_string(&json).unwrap_or_default(), log)
}

#[test]
fn switch_sflow_decodes_as_tshark_decodes_it() {
    let started = Instant::now();
    if Command::new("tshark").arg("-v").output().is_err() {
        eprintln!("skipped: tshark is not installed (Debian package tshark)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("detector-sflow-records-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (datagrams, mut built) = build();
    let pcap = dir.join("sflow.pcap");
    write_sflow_pcap(&pcap, &datagrams);

    // The datagrams are sFlow as tshark reads it, with what was built in them.
    let decoded = tshark(&pcap);
    let mut samples = decoded.samples.clone();
    samples.sort_by_key(|s| format!("{s:?}"));
    built.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        samples, built,
        "tshark's samples (left) against the ones built"
    );
    let rates: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.rate).collect();
    assert_eq!(rates.into_iter().collect::<Vec<_>>(), [1, 10, 256]);

    // The agent's flows, key by key, are tshark's samples.
    let (json, log) = run_agent(&datagrams, &dir);
    let want = expected(&decoded.samples);
    let got = agent_flows(&json);
    let keys: std::collections::BTreeSet<&Key> = want.keys().chain(got.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (t, a) = (want.get(k), got.get(k));
            (t != a).then(|| {
                format!("{k:?}:\n  tshark (raw packets, raw bytes, packets, bytes, (vlan, inner vlan, input)) {t:?}\n  agent  {a:?}")
            })
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} flow keys differ:\n{}\nagent log:\n{log}",
        diffs.len(),
        want.len(),
        diffs.join("\n")
    );

    // Its statistics count every datagram and flow sample, expanded ones too, per agent
    // and sub-agent, each sample a packet, nothing lost or in error.
    assert_eq!(decoded.per_source.len(), 3);
    for (source, &(datagrams, flow_samples, expanded)) in &decoded.per_source {
        assert!(
            expanded > 0 && expanded < flow_samples,
            "{source}: both kinds"
        );
        let st = source_stats(&log, source);
        for (key, want) in [
            ("datagrams", datagrams),
            ("flow samples", flow_samples),
            ("counter samples", 0),
            ("other samples", 0),
            ("packets", flow_samples),
            ("not-ip", 0),
            ("lost datagrams", 0),
            ("sequence resets", 0),
            ("lost samples", 0),
            ("agent drops", 0),
        ] {
            assert_eq!(stat(st, key), want, "{source} {key}: {st}");
        }
        assert!(st.contains("errors {}"), "{st}");
    }
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("sflow listener"))
        .unwrap();
    assert!(line.contains("header errors {}"), "{line}");
    eprintln!(
        "{} datagrams, {} flow samples ({} expanded), {} flow keys: tshark and the agent agree ({:?})",
        datagrams.len(),
        samples.len(),
        samples.iter().filter(|s| s.expanded).count(),
        want.len(),
        started.elapsed()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The `detector_sflow_if_*` series of a /metrics page: (name, listener, source,
/// ifIndex) to value.
fn if_series(metrics: &str) -> BTreeMap<(String, String, String, String), f64> {
    let mut m = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("detector_sflow_if_") {
            continue;
        }
        let (name, rest) = line.split_once('{').unwrap_or_else(|| panic!("{line}"));
        let (labels, value) = rest.rsplit_once("} ").unwrap_or_else(|| panic!("{line}"));
        let labels: BTreeMap<&str, &str> = labels
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{line}"));
                (k, v.trim_matches('"'))
            })
            .collect();
        assert_eq!(labels.len(), 3, "{line}");
        m.insert(
            (
                name.to_string(),
                labels["listener"].to_string(),
                labels["source"].to_string(),
                labels["ifindex"].to_string(),
            ),
            value.parse().unwrap_or_else(|_| panic!("{line}")),
        );
    }
    m
}

/// Interface counters sent by two agents, in compact and expanded counter samples (an
/// ifIndex above 2^24 only the expanded form can carry, octets above 2^32), are on a live
/// /metrics as sent: each of the eight `detector_sflow_if_*` gauges of each interface
/// holds the value in the last datagram (packets: unicast + multicast + broadcast), and
/// no other interface is shown. The agent takes its listener from the configuration
/// file's `[sflow] listen`, with no `--sflow-listen` flag, and its statistics count every
/// counter sample and datagram sent.
#[test]
fn interface_counters_reach_metrics_as_sent_with_the_listener_from_the_file() {
    use tests::sflow::{IfCounters, counter_sample, if_counters};
    let dir = tests::agent::scratch("sflow-ifcounters");
    let (port, http) = (free_udp_port(), tests::http::free_tcp_port());
    let config = dir.join("detector.toml");
    std::fs::write(
        &config,
        format!("[sflow]\nlisten = [\"127.0.0.1:{port}\"]\n"),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let child = Command::new(tests::detector_bin())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--stats-interval", "0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "receiving sFlow", Duration::from_secs(20));

    let a4: IpAddr = "192.0.2.1".parse().unwrap();
    let a6: IpAddr = "2001:db8::a".parse().unwrap();
    let c = |if_index: u32, base: u32| IfCounters {
        if_index,
        speed: 10_000_000_000,
        in_octets: 5_000_000_000 + u64::from(base),
        in_ucast: base + 1,
        in_multicast: base + 2,
        in_broadcast: base + 3,
        in_discards: base + 4,
        in_errors: base + 5,
        out_octets: 7_000_000_000 + u64::from(base),
        out_ucast: base + 11,
        out_multicast: base + 12,
        out_broadcast: base + 13,
        out_discards: base + 14,
        out_errors: base + 15,
    };
    // Agent a4: ifIndex 3 twice (the second report is the one shown) and 4, compact;
    // agent a6 sub-agent 3: ifIndex 70000, expanded.
    let (first3, last3, if4, big) = (c(3, 100), c(3, 900), c(4, 40), c(70_000, 7));
    let datagrams = [
        datagram(
            a4,
            0,
            1,
            1000,
            &[
                counter_sample(false, 1, 3, &[if_counters(&first3)]),
                counter_sample(false, 1, 4, &[if_counters(&if4)]),
            ],
        ),
        datagram(
            a6,
            3,
            1,
            1000,
            &[counter_sample(true, 1, 70_000, &[if_counters(&big)])],
        ),
        datagram(
            a4,
            0,
            2,
            2000,
            &[counter_sample(false, 2, 3, &[if_counters(&last3)])],
        ),
    ];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in &datagrams {
        sock.send_to(d, ("127.0.0.1", port)).unwrap();
        // In order: the last report of ifIndex 3 is the second one.
        std::thread::sleep(Duration::from_millis(50));
    }

    let listener = format!("127.0.0.1:{port}");
    let mut want = BTreeMap::new();
    for (source, x) in [
        ("192.0.2.1/0", &last3),
        ("192.0.2.1/0", &if4),
        ("2001:db8::a/3", &big),
    ] {
        let sum = |a: u32, b: u32, c: u32| u64::from(a) + u64::from(b) + u64::from(c);
        for (name, v) in [
            ("in_octets", x.in_octets),
            (
                "in_packets",
                sum(x.in_ucast, x.in_multicast, x.in_broadcast),
            ),
            ("in_errors", u64::from(x.in_errors)),
            ("in_discards", u64::from(x.in_discards)),
            ("out_octets", x.out_octets),
            (
                "out_packets",
                sum(x.out_ucast, x.out_multicast, x.out_broadcast),
            ),
            ("out_errors", u64::from(x.out_errors)),
            ("out_discards", u64::from(x.out_discards)),
        ] {
            want.insert(
                (
                    format!("detector_sflow_if_{name}"),
                    listener.clone(),
                    source.to_string(),
                    x.if_index.to_string(),
                ),
                v as f64,
            );
        }
    }
    let url = format!("http://127.0.0.1:{http}/metrics");
    // Gauges as last sent, and nothing else: waits for them, then says what differs.
    let end = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = tests::http::get(&url)
            .map(|m| if_series(&m))
            .unwrap_or_default();
        if got == want || Instant::now() > end {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(got, want, "/metrics (left) against what was sent");
    assert_eq!(want.len(), 24);
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "agent: {st}\n{log}");
    for (source, datagrams, counters) in [("192.0.2.1/0", 2, 3), ("2001:db8::a/3", 1, 1)] {
        let st = source_stats(&log, source);
        assert_eq!(stat(st, "datagrams"), datagrams, "{source}: {st}");
        assert_eq!(stat(st, "counter samples"), counters, "{source}: {st}");
        assert_eq!(stat(st, "flow samples"), 0, "{source}: {st}");
        assert_eq!(stat(st, "lost datagrams"), 0, "{source}: {st}");
        assert!(st.contains("errors {}"), "{st}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
