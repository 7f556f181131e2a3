//! The same flows reported by two exporters: the collector forwards every record, and
//! marks the second report of each flow as a duplicate, so statistics count it once.
//! Needs no privileges; skips with a message when `../shared` is absent.

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
