//! The same flows reported by two exporters: the collector forwards every record, and
//! marks the second report of each flow as a duplicate, so statistics count it once.
//! Two NetFlow v9 exporters sending one capture (skips with a message when `../shared`
//! is absent), and sFlow against NetFlow v9 on hand-built flows. Needs no privileges.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::Duration;

use detector::sources::capture::Capture;
use detector::sources::netflow::capture::udp_in_frame;
use nix::sys::signal::Signal;
use tests::netns::{free_udp_port, start_collector};

#[test]
fn two_exporters_reporting_the_same_flows_count_once() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let bin = tests::detector_bin();
    if !bin.exists() {
        panic!(
            "{} is missing: build it first (cargo xtask test does)",
            bin.display()
        );
    }
    let pcap = data
        .join("netflow/pmacct-test-automation__101-NFv9-CISCO-cust_primitives__traffic-00.pcap");
    let mut datagrams = Vec::new();
    let mut cap = Capture::open(&pcap).unwrap();
    while let Some(Ok(f)) = cap.next_frame() {
        if let Some(dg) = udp_in_frame(&f.data) {
            datagrams.push(dg.payload.to_vec());
        }
    }
    let port = free_udp_port();
    let dir = std::env::temp_dir().join(format!("detector-dedup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, log) = (dir.join("flows.json"), dir.join("agent.log"));
    let mut agent = start_collector(port, &json, &log);
    // Two exporters (two source sockets) send the same export stream.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in &datagrams {
        a.send_to(d, ("127.0.0.1", port)).unwrap();
        b.send_to(d, ("127.0.0.1", port)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        agent
            .stop(Signal::SIGTERM, Duration::from_secs(20))
            .success()
    );

    let mut per_flow: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let mut sources = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = format!(
            "{} {} {} {} {} {}",
            v["src_addr"], v["dst_addr"], v["src_port"], v["dst_port"], v["protocol"], v["first"]
        );
        let e = per_flow.entry(key).or_default();
        if v["duplicate"].as_bool().unwrap() {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
        sources.insert(v["source"].as_str().unwrap().to_string());
    }
    assert!(!per_flow.is_empty());
    assert_eq!(
        sources.len(),
        1,
        "both exporters are 127.0.0.1: {sources:?}"
    );
    for (k, (unique, dup)) in &per_flow {
        assert!(
            *unique >= 1 && unique == dup,
            "{k}: {unique} counted, {dup} duplicates"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A source's records of a flow: packets, bytes, records marked duplicate, records.
type Counts = (u64, u64, u32, u32);

/// `src:sport -> dst:dport` over TCP, the key of a flow in `--flows-json`.
fn flow_key(v: &serde_json::Value) -> String {
    format!(
        "{}:{} -> {}:{} {}",
        v["src_addr"], v["src_port"], v["dst_addr"], v["dst_port"], v["protocol"]
    )
}

/// The same flows seen by a switch's sFlow (raw IPv4 headers, sampled 1 in 1: every
/// packet) and by a NetFlow v9 exporter (another source): for each flow the collector
/// keeps both sources' records, all of one source marked duplicate and none of the
/// other's, each source's packets and bytes the ones sent; detection counts each flow
/// once: the host's peers, flows and bytes on `/api/hosts` are one copy's. Both orders:
/// host A's flows reach the agent through sFlow first (sFlow owns them), host B's
/// through NetFlow first.
#[test]
fn a_flow_seen_by_sflow_and_netflow_counts_once() {
    use std::net::{IpAddr, Ipv4Addr};
    use std::process::{Command, Stdio};
    use std::time::{Instant, SystemTime};
    use tests::agent::{Exporter, peer, rec, scratch, wait_for, write_config};
    use tests::frames::{ipv4, tcp};
    use tests::netns::{Guarded, wait_for_text};
    use tests::sflow::{HEADER_IPV4, SampleHead, datagram, flow_sample, raw_header};

    const FLOWS: u32 = 6;
    const PACKETS: u64 = 5;
    const PAYLOAD: usize = 100;
    let ip_len = (20 + 20 + PAYLOAD) as u64;
    let (a, b) = (Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 6));
    let dir = scratch("dedup-sflow");
    let (nf, sf, http) = (
        free_udp_port(),
        free_udp_port(),
        tests::http::free_tcp_port(),
    );
    let config = write_config(&dir, "");
    let (json, log) = (dir.join("flows.json"), dir.join("agent.log"));
    let child = Command::new(tests::detector_bin())
        .args(["run", "--netflow-listen", &format!("127.0.0.1:{nf}")])
        .args(["--sflow-listen", &format!("127.0.0.1:{sf}")])
        .arg("--config")
        .arg(&config)
        .arg("--flows-json")
        .arg(&json)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--inactive-timeout", "2", "--stats-interval", "0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the agent");
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "receiving sFlow", Duration::from_secs(20));

    // Host `h`'s flows: to peer i from port 40000+i to 443, PACKETS packets each.
    let peers = |h: Ipv4Addr| {
        (0..FLOWS).map(move |i| {
            let IpAddr::V4(p) = peer(i) else {
                unreachable!()
            };
            (h, 40_000 + i as u16, p, 443u16)
        })
    };
    let sflow_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seq = 0u32;
    let mut send_sflow = |h: Ipv4Addr| {
        // One datagram a packet round: a sample of each flow.
        for _ in 0..PACKETS {
            seq += 1;
            let samples: Vec<_> = peers(h)
                .enumerate()
                .map(|(i, (s, sp, d, dp))| {
                    let packet = ipv4(
                        s,
                        d,
                        6,
                        0,
                        0,
                        &[],
                        &[tcp(sp, dp, 0x18), vec![7; PAYLOAD]].concat(),
                    );
                    let n = (seq - 1) * FLOWS + i as u32 + 1;
                    let head = SampleHead {
                        sequence: n,
                        source_type: 0,
                        source_index: 1,
                        rate: 1,
                        pool: n,
                        drops: 0,
                        input: 1,
                        output: 2,
                    };
                    flow_sample(&head, &[raw_header(HEADER_IPV4, &packet, 128)])
                })
                .collect();
            let dg = datagram(
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
                0,
                seq,
                seq * 100,
                &samples,
            );
            sflow_sock.send_to(&dg, ("127.0.0.1", sf)).unwrap();
        }
    };
    let mut exporter = Exporter::new(nf);
    let netflow = |h: Ipv4Addr, at: SystemTime| {
        peers(h)
            .map(|(s, sp, d, dp)| {
                rec(
                    IpAddr::V4(s),
                    sp,
                    IpAddr::V4(d),
                    dp,
                    6,
                    PACKETS,
                    PACKETS * ip_len,
                    at,
                )
            })
            .collect::<Vec<_>>()
    };
    // A: sFlow, then NetFlow; B: NetFlow, then sFlow.
    send_sflow(a);
    std::thread::sleep(Duration::from_millis(700));
    let now = SystemTime::now();
    exporter.send(&[netflow(a, now), netflow(b, now)].concat(), now);
    std::thread::sleep(Duration::from_millis(700));
    send_sflow(b);

    // Detection: each host's peers, flows and bytes once, after the sFlow flows ended
    // (inactive timeout 2 s) and another evaluation.
    let base = format!("http://127.0.0.1:{http}");
    std::thread::sleep(Duration::from_secs(4));
    let started = Instant::now();
    for h in [a, b] {
        let d = wait_for(
            &format!("{h} on /api/hosts"),
            Duration::from_secs(20),
            || {
                let v = tests::http::get(&format!("{base}/api/hosts/{h}"))?;
                let v: serde_json::Value = serde_json::from_str(&v).ok()?;
                // Until one copy's bytes are in (the sFlow flows' last growth came),
                // then exactly one copy's.
                let d = v["detail"].clone();
                (d["bytes_out"].as_u64()? >= u64::from(FLOWS) * PACKETS * ip_len).then_some(d)
            },
        );
        assert_eq!(d["peers"], FLOWS, "{h}: {d}");
        assert_eq!(d["flows"], FLOWS, "{h}: {d}");
        assert_eq!(
            d["bytes_out"],
            u64::from(FLOWS) * PACKETS * ip_len,
            "{h}: {d}"
        );
        assert_eq!(d["bytes_in"], 0, "{h}: {d}");
    }
    eprintln!("detection read in {:?}", started.elapsed());
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "agent: {st}\n{log}");

    // The records: per flow, per source (packets, bytes, duplicate marks, records).
    let mut per: BTreeMap<String, BTreeMap<String, Counts>> = BTreeMap::new();
    for line in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let e = per
            .entry(flow_key(&v))
            .or_default()
            .entry(v["source"].as_str().unwrap().to_string())
            .or_default();
        e.0 += v["raw_packets"]
            .as_u64()
            .unwrap_or_else(|| v["packets"].as_u64().unwrap());
        e.1 += v["raw_bytes"]
            .as_u64()
            .unwrap_or_else(|| v["bytes"].as_u64().unwrap());
        e.2 += u32::from(v["duplicate"].as_bool().unwrap());
        e.3 += 1;
    }
    assert_eq!(per.len(), 2 * FLOWS as usize, "{per:#?}\n{log}");
    for (h, sflow_first) in [(a, true), (b, false)] {
        for (s, sp, d, dp) in peers(h) {
            let key = format!("\"{s}\":{sp} -> \"{d}\":{dp} 6");
            let sources = &per[&key];
            assert_eq!(sources.len(), 2, "{key}: {sources:?}");
            let (sflow, netflow) = (&sources["192.0.2.9/0"], &sources["127.0.0.1/0"]);
            for (name, s) in [("sflow", sflow), ("netflow", netflow)] {
                assert_eq!(
                    (s.0, s.1),
                    (PACKETS, PACKETS * ip_len),
                    "{key} {name}: {s:?}"
                );
                assert!(
                    s.2 == 0 || s.2 == s.3,
                    "{key} {name}: marked in part: {s:?}"
                );
            }
            // The source that came second is the duplicate.
            let (owner, copy) = if sflow_first {
                (sflow, netflow)
            } else {
                (netflow, sflow)
            };
            assert_eq!(owner.2, 0, "{key}: the first source's records: {owner:?}");
            assert_eq!(
                copy.2, copy.3,
                "{key}: the second source's records: {copy:?}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
