//! A pipeline split over several shard workers gives exactly what one shard gives: the
//! same records (with the same duplicate marks) and the same alarm events, over random
//! streams of hosts, peers, duplicates from a second exporter and evaluations.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::*;
use crate::flow::{Live, Origin};

/// A sink that keeps every record it is sent.
struct Keep(Arc<Mutex<Vec<FlowRecord>>>);

impl Sink for Keep {
    fn name(&self) -> String {
        "keep".into()
    }
    fn counters(&self) -> crate::export::SinkCounters {
        crate::export::SinkCounters {
            sink: self.name(),
            records: self.0.lock().unwrap().len() as u64,
            errors: 0,
        }
    }
    fn send(&mut self, records: &[FlowRecord], _now: SystemTime) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
    fn describe(&self) -> String {
        String::new()
    }
}

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

/// A stream of batches at increasing times: a few internal hosts (some torrent-like,
/// fanning out to many peers on TCP and UDP; some quiet), external peers shared between
/// hosts (so the top senders span shards), copies of some records from a second
/// exporter, and records with no internal side.
fn stream(seed: u64, batches: usize) -> Vec<(u64, Vec<FlowRecord>)> {
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let exporter = Origin::Exporter {
        addr: SocketAddr::from(([127, 0, 0, 9], 2055)),
        domain: 1,
    };
    let mut out = Vec::new();
    for b in 0..batches {
        let at = b as u64 * 3;
        let mut recs = Vec::new();
        for _ in 0..200 {
            let host_n = next(12) as u8;
            let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, host_n));
            // Torrent-like hosts (0..3) reach hundreds of peers; the others a few.
            let peers = if host_n < 3 { 400 } else { 6 };
            let peer = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + next(peers) as u32));
            let proto = if next(3) == 0 { 17 } else { 6 };
            let (lport, rport) = (51413 + next(2) as u16, 1024 + next(60000) as u16);
            let inbound = next(2) == 0;
            let (src, sport, dst, dport) = if inbound {
                (peer, rport, host, lport)
            } else {
                (host, lport, peer, rport)
            };
            let mut r = FlowRecord::new(src, sport, dst, dport, proto);
            r.packets = 1 + next(50);
            r.bytes = r.packets * (60 + next(1400));
            r.first = t(at);
            r.last = t(at + next(3));
            r.tcp_flags = if proto == 6 { 0x18 } else { 0 };
            if next(10) == 0 {
                // Neither side internal.
                r.src_addr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, next(9) as u8));
            }
            if next(5) == 0 {
                let mut copy = r.clone();
                copy.origin = exporter;
                recs.push(copy);
            }
            recs.push(r);
        }
        out.push((at, recs));
    }
    out
}

/// Runs the stream through a pipeline of `workers` shards; returns every record the
/// sinks got (as sortable text) and every alarm event (as JSON).
fn run(workers: usize, stream: &[(u64, Vec<FlowRecord>)]) -> (Vec<String>, Vec<String>) {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let cfg = PipelineConfig {
        workers,
        when_behind: WhenBehind::Wait,
        dedup_flows: 100_000,
        shard_queue: super::SHARD_QUEUE,
    };
    let detect = DetectConfig {
        eval_interval: Duration::from_secs(10),
        window: Duration::from_secs(60),
        ..DetectConfig::default()
    };
    let mut p = Pipeline::new(
        &cfg,
        vec![Box::new(Keep(kept.clone()))],
        detect,
        AlarmSink::open(None).unwrap(),
    );
    let mut events = Vec::new();
    let mut last = 0;
    for (at, recs) in stream {
        p.emit(recs.clone(), t(*at));
        events.extend(p.tick(t(*at), false));
        last = *at;
    }
    let done = p.finish(t(last + 1));
    events.extend(done.final_events);
    let mut records: Vec<String> = kept
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect();
    records.sort();
    let events = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    (records, events)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn a_sharded_pipeline_gives_what_one_shard_gives(seed in any::<u64>(), workers in 2usize..5) {
        let s = stream(seed, 60);
        let (records1, events1) = run(1, &s);
        let (records_n, events_n) = run(workers, &s);
        prop_assert!(events1.iter().any(|e| e.contains("\"raised\"")), "the stream raises no alarm: {events1:?}");
        prop_assert!(records1.iter().any(|r| r.contains("duplicate: true")));
        prop_assert_eq!(records1.len(), records_n.len());
        prop_assert!(records1 == records_n, "records differ");
        prop_assert_eq!(events1, events_n);
    }
}

/// Live flows: a stream whose local records are told in parts, as a start and a growth
/// report (detection only) then as exported (continued, saying what growth told), gives
/// the sinks exactly the exported records and the same alarms as the stream told once.
#[test]
fn flow_starts_reach_detection_only_and_change_no_verdict() {
    let s = stream(7, 60);
    let announced: Vec<(u64, Vec<FlowRecord>)> = s
        .iter()
        .map(|(at, recs)| {
            let mut out: Vec<FlowRecord> = recs
                .iter()
                .filter(|r| r.origin == Origin::Local)
                .map(|r| FlowRecord {
                    packets: 0,
                    bytes: 0,
                    last: r.first,
                    live: Live::Start,
                    ..r.clone()
                })
                .collect();
            // Half of each local record told early, as the flow grew.
            out.extend(
                recs.iter()
                    .filter(|r| r.origin == Origin::Local)
                    .map(|r| FlowRecord {
                        packets: r.packets / 2,
                        bytes: r.bytes / 2,
                        live: Live::Grow,
                        ..r.clone()
                    }),
            );
            out.extend(recs.iter().map(|r| {
                let mut r = r.clone();
                if r.origin == Origin::Local {
                    r.live = Live::Continued {
                        told_packets: r.packets / 2,
                        told_bytes: r.bytes / 2,
                    };
                }
                r
            }));
            (*at, out)
        })
        .collect();
    let (records, events) = run(2, &s);
    let (records_live, events_live) = run(2, &announced);
    // The local meter now tells a flow first (at its start), so it owns the flow and an
    // exporter's copy carries the duplicate mark instead: the same records, as many
    // marked.
    let strip = |v: &[String]| -> Vec<String> {
        let mut v: Vec<String> = v
            .iter()
            .map(|r| {
                let r = match r.split_once("live: Continued {") {
                    Some((head, tail)) => {
                        let rest = tail.split_once('}').map_or("", |x| x.1);
                        format!("{head}live: Whole{rest}")
                    }
                    None => r.clone(),
                };
                r.replace("duplicate: true", "duplicate: _")
                    .replace("duplicate: false", "duplicate: _")
            })
            .collect();
        v.sort();
        v
    };
    let marked = |v: &[String]| v.iter().filter(|r| r.contains("duplicate: true")).count();
    assert_eq!(marked(&records_live), marked(&records));
    assert!(
        !records_live
            .iter()
            .any(|r| r.contains("live: Start") || r.contains("live: Grow")),
        "a start or a growth report reached a sink"
    );
    assert!(
        strip(&records_live) == strip(&records),
        "the sinks got other records"
    );
    assert!(events.iter().any(|e| e.contains("\"raised\"")));
    // The same events; only the list of who saw the host starts with the local meter.
    let sorted_sources = |e: &String| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(list) = v["exporters"].as_array_mut() {
            list.sort_by_key(|x| x.to_string());
        }
        v
    };
    assert_eq!(events_live.len(), events.len());
    for (a, b) in events_live.iter().zip(&events) {
        assert_eq!(sorted_sources(a), sorted_sources(b), "the alarms differ");
    }
}

/// Internal hosts of one network spread over the workers: no worker idles while
/// another takes every host (a hash whose high bits barely moved for addresses that
/// differ in their last bytes sent 10.0.0.0/17 to one of two workers).
#[test]
fn hosts_of_one_network_spread_over_the_workers() {
    let cfg = DetectConfig {
        internal: vec!["10.0.0.0/8".parse().expect("cidr")],
        ..DetectConfig::default()
    };
    let peer = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 1));
    for n in [2usize, 3, 4, 8] {
        let mut per = vec![0usize; n];
        for i in 0..20_000u32 {
            let host = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let r = FlowRecord::new(host, 51413, peer, 443, 6);
            per[super::shard_of(&cfg, &r, n)] += 1;
        }
        let fair = 20_000 / n;
        for (w, &k) in per.iter().enumerate() {
            assert!(
                k > fair * 9 / 10 && k < fair * 11 / 10,
                "{n} workers: worker {w} got {k} of 20000 hosts ({per:?})"
            );
        }
    }
}

/// Batches as a sink got them, with the time.
type Batches = Vec<(SystemTime, Vec<FlowRecord>)>;

/// A sink that keeps each batch it is sent, with the time, and takes detection-only
/// records (as the NATS edge's).
struct KeepLive(Arc<Mutex<Batches>>);

impl Sink for KeepLive {
    fn name(&self) -> String {
        "keep-live".into()
    }
    fn counters(&self) -> crate::export::SinkCounters {
        crate::export::SinkCounters::default()
    }
    fn send(&mut self, records: &[FlowRecord], now: SystemTime) {
        if !records.is_empty() {
            self.0.lock().unwrap().push((now, records.to_vec()));
        }
    }
    fn describe(&self) -> String {
        String::new()
    }
    fn wants_live(&self) -> bool {
        true
    }
}

/// Scale-out edges (live flows across the cluster): a sink that wants detection-only
/// records (the NATS edge's) gets every start and growth report with the exported
/// records, while another sink of the same pipeline still gets the exported records
/// only; and a second pipeline fed what the live sink got, through the scale-out wire
/// encoding (a detector node), raises the edge's own alarm at the same evaluation, long
/// before any of the host's flows is exported. A node fed the exported records alone (the
/// earlier release) does not alarm before the exports.
#[test]
fn a_live_sink_gets_what_detection_gets_and_a_node_fed_it_alarms_as_early() {
    use crate::scaleout::wire;
    let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
    let quiet = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    let peer = |i: u32| IpAddr::V4(Ipv4Addr::from(0xc612_0100 + i));
    let flow = |i: u32, proto: u8| {
        let mut r = FlowRecord::new(
            peer(i),
            10_000 + (i * 577 % 50_000) as u16,
            host,
            40_123,
            proto,
        );
        r.first = t(2 * u64::from(i / 6));
        r.last = r.first;
        r.tcp_flags = if proto == 6 { 0x02 } else { 0 };
        r
    };
    // 40 s of a swarm: six new peers every 2 s (a TCP and a UDP flow each, started),
    // each flow's growth told every 10 s; nothing of the host is exported until t = 42
    // (as at an active timeout), when every flow is (continued: its start and growth
    // were told). A quiet host's exports run beside it.
    let mut stream: Vec<(u64, Vec<FlowRecord>)> = Vec::new();
    let (mut starts, mut grows) = (0usize, 0usize);
    let mut told_of = std::collections::BTreeMap::new();
    for b in 0..20u64 {
        let at = 2 * b;
        let mut recs = Vec::new();
        for i in (6 * b as u32)..(6 * b as u32 + 6) {
            for proto in [6, 17] {
                recs.push(FlowRecord {
                    live: Live::Start,
                    ..flow(i, proto)
                });
                starts += 1;
            }
        }
        if at % 10 == 8 {
            for i in 0..(6 * b as u32) {
                for proto in [6, 17] {
                    let mut g = flow(i, proto);
                    g.packets = 20;
                    g.bytes = 20 * 700;
                    g.last = t(at);
                    g.live = Live::Grow;
                    recs.push(g);
                    grows += 1;
                    *told_of.entry((i, proto)).or_insert(0u64) += 20;
                }
            }
        }
        let mut q = FlowRecord::new(
            quiet,
            40_000,
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            443,
            6,
        );
        q.packets = 10;
        q.bytes = 9_000;
        q.first = t(at);
        q.last = t(at);
        q.tcp_flags = 0x1b;
        recs.push(q);
        stream.push((at, recs));
    }
    // The exports: what was told and 5 packets more of each flow.
    let (mut truth_bytes, mut exports) = (0u64, Vec::new());
    for i in 0..120u32 {
        for proto in [6, 17] {
            let told = told_of.get(&(i, proto)).copied().unwrap_or(0);
            let mut r = flow(i, proto);
            r.packets = told + 5;
            r.bytes = r.packets * 700;
            r.last = t(41);
            r.live = Live::Continued {
                told_packets: told,
                told_bytes: told * 700,
            };
            truth_bytes += r.bytes;
            exports.push(r);
        }
    }
    stream.push((42, exports));
    let detect = DetectConfig {
        eval_interval: Duration::from_secs(2),
        window: Duration::from_secs(120),
        ..DetectConfig::default()
    };
    let cfg = PipelineConfig {
        workers: 2,
        when_behind: WhenBehind::Wait,
        dedup_flows: 100_000,
        shard_queue: super::SHARD_QUEUE,
    };
    // The edge: its own detection, a plain sink and a live one.
    let plain = Arc::new(Mutex::new(Vec::new()));
    let live = Arc::new(Mutex::new(Vec::new()));
    let mut edge = Pipeline::new(
        &cfg,
        vec![
            Box::new(Keep(plain.clone())),
            Box::new(KeepLive(live.clone())),
        ],
        detect.clone(),
        AlarmSink::open(None).unwrap(),
    );
    let mut edge_events = Vec::new();
    for (at, recs) in &stream {
        edge.emit(recs.clone(), t(*at));
        edge_events.extend(edge.tick(t(*at), false));
    }
    let edge_done = edge.finish(t(43));
    let plain = plain.lock().unwrap().clone();
    let live = live.lock().unwrap().clone();
    assert_eq!(
        plain.len(),
        20 + 240,
        "the plain sink got the exported records only"
    );
    assert!(!plain.iter().any(|r| r.live.detection_only()));
    let told = |k: fn(&Live) -> bool| {
        live.iter()
            .flat_map(|(_, v)| v)
            .filter(|r| k(&r.live))
            .count()
    };
    assert_eq!(told(|l| *l == Live::Start), starts);
    assert_eq!(told(|l| *l == Live::Grow), grows);
    assert_eq!(told(|l| *l == Live::Whole), 20);
    assert_eq!(told(|l| matches!(l, Live::Continued { .. })), 240);
    let raised_at = |events: &[AlarmEvent]| {
        events
            .iter()
            .find(|e| e.host == host && e.state == crate::detect::AlarmState::Raised)
            .map(|e| e.at.clone())
    };
    let edge_raised = raised_at(&edge_events).expect("the edge alarms from the starts");
    assert!(edge_raised < crate::flow::rfc3339(t(41)), "{edge_raised}");
    assert!(!edge_events.iter().any(|e| e.host == quiet));

    // Nodes: fed at the same moments through the wire encoding, the live sink's batches,
    // or the exported records alone.
    let node = |batches: Batches| {
        let mut p = Pipeline::new(
            &cfg,
            Vec::new(),
            detect.clone(),
            AlarmSink::open(None).unwrap(),
        );
        let agent = wire::AgentName::new("edge-1");
        let mut events = Vec::new();
        let mut next = batches.into_iter().peekable();
        for (at, _) in &stream {
            while let Some((_, recs)) = next.next_if(|(when, _)| *when <= t(*at)) {
                let msg = wire::encode(&agent, &recs.iter().collect::<Vec<_>>());
                p.emit(wire::decode(&msg).unwrap().1, t(*at));
            }
            events.extend(p.tick(t(*at), false));
        }
        (events, p.finish(t(43)))
    };
    // Each flow counted once, its bytes once, at the edge and at the node: the truth
    // of what was sent (240 flows of 120 peers).
    let measures = |done: &Finished| {
        let (_, v) = done
            .hosts
            .iter()
            .find(|(h, _)| *h == host)
            .expect("the host is explained");
        (v.measures.flows, v.measures.peers, v.measures.bytes_in)
    };
    assert_eq!(measures(&edge_done), (240, 120, truth_bytes));
    let (node_events, node_done) = node(live.clone());
    assert_eq!(measures(&node_done), (240, 120, truth_bytes));
    assert_eq!(
        raised_at(&node_events).as_deref(),
        Some(edge_raised.as_str()),
        "the node raised at another evaluation than the edge"
    );
    let exported: Batches = live
        .iter()
        .map(|(at, v)| {
            (
                *at,
                v.iter()
                    .filter(|r| !r.live.detection_only())
                    .map(|r| FlowRecord {
                        live: Live::Whole,
                        ..r.clone()
                    })
                    .collect(),
            )
        })
        .collect();
    // Fed the exported records alone (the earlier release: wire version 1 has no live
    // flows), a node hears of the host at t = 42 only.
    let (late, _) = node(exported);
    assert!(
        raised_at(&late).is_none_or(|at| at > crate::flow::rfc3339(t(41))),
        "exported records alone raised the alarm before the exports"
    );
}
