//! IPFIX biflows (RFC 5103): a record with reverse counters (enterprise 29305) is two
//! flows, the reverse one from the other end. The capture is built here and read by
//! tshark, whose dissection gives each record's forward and reverse counts; `replay
//! --netflow` must export exactly those flows.

use std::collections::BTreeMap;

use tests::export::{
    LINKTYPE_RAW, ipfix, put16, put32, put64, replay_netflow, udp_packets, write_pcap,
};
use tests::netns::sh;

/// A template with forward and reverse counters, and 12 biflows: every third one has no
/// reverse traffic.
fn messages() -> Vec<Vec<u8>> {
    let mut t = Vec::new();
    put16(&mut t, 256);
    put16(&mut t, 9);
    for (ie, len) in [
        (8u16, 4u16),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (2, 8),
        (1, 8),
    ] {
        put16(&mut t, ie);
        put16(&mut t, len);
    }
    for ie in [2u16, 1] {
        // Enterprise bit, then the reverse PEN (RFC 5103).
        put16(&mut t, 0x8000 | ie);
        put16(&mut t, 8);
        put32(&mut t, 29305);
    }
    let mut data = Vec::new();
    for i in 0..12u64 {
        data.extend_from_slice(&[10, 0, 0, 9]);
        data.extend_from_slice(&[203, 0, 113, 1 + i as u8]);
        put16(&mut data, 50_000 + i as u16);
        put16(&mut data, 6881);
        data.push(if i % 2 == 0 { 6 } else { 17 });
        put64(&mut data, 10 + i); // packets
        put64(&mut data, 1000 * (10 + i)); // octets
        let rev = if i % 3 == 2 { 0 } else { 20 + i };
        put64(&mut data, rev); // reverse packets
        put64(&mut data, 500 * rev); // reverse octets
    }
    vec![ipfix(7, 0, &[(2, t)]), ipfix(7, 0, &[(256, data)])]
}

#[test]
fn a_biflow_becomes_two_flows_with_the_reverse_counts() {
    let dir = std::env::temp_dir().join(format!("detector-biflow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cap = dir.join("biflows.pcap");
    let to = (std::net::Ipv4Addr::new(192, 0, 2, 2), 4739);
    let from = (std::net::Ipv4Addr::new(192, 0, 2, 1), 40_000);
    write_pcap(&cap, LINKTYPE_RAW, &udp_packets(from, to, &messages()));
    let p = cap.to_str().unwrap();
    // tshark's reading, record by record: addresses and ports, then the forward and
    // the reverse packets and octets (the reverse ones labelled so).
    let pdml = sh(
        "tshark",
        &["-r", p, "-d", "udp.port==4739,cflow", "-T", "pdml"],
    );
    let pdml = String::from_utf8_lossy(&pdml.stdout).to_string();
    let attr = |line: &str, key: &str| -> String {
        let from = line.find(&format!("{key}=\"")).unwrap() + key.len() + 2;
        line[from..from + line[from..].find('"').unwrap()].to_string()
    };
    // (proto, src, sport, dst, dport) -> (packets, bytes), both directions.
    type Key = (u64, String, u64, String, u64);
    let mut want: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    let mut cur: BTreeMap<&str, String> = BTreeMap::new();
    let mut counts: Vec<(u64, bool)> = Vec::new();
    let mut flush = |cur: &mut BTreeMap<&str, String>, counts: &mut Vec<(u64, bool)>| {
        if counts.len() == 4 {
            let n = |k: &str| cur[k].parse::<u64>().unwrap();
            let (src, dst) = (cur["srcaddr"].clone(), cur["dstaddr"].clone());
            let proto = n("protocol");
            want.insert(
                (proto, src.clone(), n("srcport"), dst.clone(), n("dstport")),
                (counts[0].0, counts[1].0),
            );
            if counts[2].0 > 0 || counts[3].0 > 0 {
                assert!(counts[2].1 && counts[3].1, "reverse counts labelled so");
                want.insert(
                    (proto, dst, n("dstport"), src, n("srcport")),
                    (counts[2].0, counts[3].0),
                );
            }
        }
        cur.clear();
        counts.clear();
    };
    for line in pdml.lines() {
        let line = line.trim();
        if !line.starts_with("<field name=\"cflow.") {
            continue;
        }
        let name = attr(line, "name");
        let show = attr(line, "show");
        match name.as_str() {
            "cflow.srcaddr" => {
                flush(&mut cur, &mut counts);
                cur.insert("srcaddr", show);
            }
            "cflow.dstaddr" => drop(cur.insert("dstaddr", show)),
            "cflow.srcport" => drop(cur.insert("srcport", show)),
            "cflow.dstport" => drop(cur.insert("dstport", show)),
            "cflow.protocol" => drop(cur.insert("protocol", show)),
            "cflow.packets" | "cflow.octets" => counts.push((
                show.parse().unwrap(),
                attr(line, "showname").contains("Reverse"),
            )),
            _ => {}
        }
    }
    flush(&mut cur, &mut counts);
    assert_eq!(want.len(), 12 + 8, "tshark's flows: {want:?}");

    let got: BTreeMap<Key, (u64, u64)> = replay_netflow(&cap, &dir.join("flows.json"))
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            let n = |k: &str| v[k].as_u64().unwrap();
            (
                (
                    n("protocol"),
                    s("src_addr"),
                    n("src_port"),
                    s("dst_addr"),
                    n("dst_port"),
                ),
                (n("packets"), n("bytes")),
            )
        })
        .collect();
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).ok();
}
