//! NetFlow v9 records that name their sampler, with several samplers of different rates
//! in one exporter (FLOW_SAMPLER_ID 48 in the data, options records giving each
//! sampler's FLOW_SAMPLER_RANDOM_INTERVAL 50): each record is scaled by its own
//! sampler's rate (v9, and IPFIX with selectorId 302). The capture is built here and checked against tshark's dissection,
//! which gives the expected rate of each record; `replay --netflow` must agree.

use std::collections::BTreeMap;
use std::process::Command;

use tests::netns::sh;

fn be16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// A v9 datagram: header, then the flowsets (id, body), each padded to 4 bytes.
fn v9(seq: u32, count: u16, sets: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut d = Vec::new();
    be16(&mut d, 9);
    be16(&mut d, count);
    be32(&mut d, 600_000); // sysUptime
    be32(&mut d, 1_800_000_000); // unix secs
    be32(&mut d, seq);
    be32(&mut d, 1); // source id
    for (id, body) in sets {
        let mut b = body.clone();
        while (b.len() + 4) % 4 != 0 {
            b.push(0);
        }
        be16(&mut d, *id);
        be16(&mut d, (b.len() + 4) as u16);
        d.extend_from_slice(&b);
    }
    d
}

/// Two samplers (1 in 100, 1 in 1000) and 40 records alternating between them.
fn datagrams() -> Vec<Vec<u8>> {
    // Data template 256 and options template 257 (scope System).
    let mut t = Vec::new();
    be16(&mut t, 256);
    let fields: [(u16, u16); 8] = [
        (8, 4),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (2, 4),
        (1, 4),
        (48, 1),
    ];
    be16(&mut t, fields.len() as u16);
    for (ty, len) in fields {
        be16(&mut t, ty);
        be16(&mut t, len);
    }
    let mut o = Vec::new();
    be16(&mut o, 257);
    be16(&mut o, 4); // scope length: one field
    be16(&mut o, 12); // option length: three fields
    for (ty, len) in [(1u16, 4u16), (48, 1), (50, 4), (49, 1)] {
        be16(&mut o, ty);
        be16(&mut o, len);
    }
    let mut od = Vec::new();
    for (id, rate) in [(1u8, 100u32), (2, 1000)] {
        be32(&mut od, 0); // System scope
        od.push(id);
        be32(&mut od, rate);
        od.push(2); // random sampling
    }
    let mut data = Vec::new();
    for i in 0..40u32 {
        data.extend_from_slice(&[10, 0, 0, 5]);
        data.extend_from_slice(&[198, 51, 100, (i % 200) as u8]);
        be16(&mut data, 10_000 + i as u16);
        be16(&mut data, 443);
        data.push(6);
        be32(&mut data, 3 + i); // packets
        be32(&mut data, 1000 * (3 + i)); // bytes
        data.push(1 + (i % 2) as u8); // sampler id
    }
    vec![
        v9(0, 4, &[(0, t), (1, o), (257, od)]),
        v9(1, 40, &[(256, data)]),
    ]
}

/// The same in IPFIX: selectorId (302) names the sampler in the data and in the options
/// records (scope observationDomainId), samplerRandomInterval (50) gives its rate.
fn ipfix_messages() -> Vec<Vec<u8>> {
    let message = |sets: Vec<(u16, Vec<u8>)>| {
        let mut d = Vec::new();
        be16(&mut d, 10);
        be16(&mut d, 0);
        be32(&mut d, 1_800_000_000);
        be32(&mut d, 0);
        be32(&mut d, 1);
        for (id, mut body) in sets {
            while body.len() % 4 != 0 {
                body.push(0);
            }
            be16(&mut d, id);
            be16(&mut d, (body.len() + 4) as u16);
            d.extend_from_slice(&body);
        }
        let len = d.len() as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        d
    };
    let mut t = Vec::new();
    be16(&mut t, 256);
    let fields: [(u16, u16); 8] = [
        (8, 4),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (2, 4),
        (1, 4),
        (302, 1),
    ];
    be16(&mut t, fields.len() as u16);
    for (ty, len) in fields {
        be16(&mut t, ty);
        be16(&mut t, len);
    }
    let mut o = Vec::new();
    be16(&mut o, 257);
    be16(&mut o, 3); // fields
    be16(&mut o, 1); // scope fields
    for (ty, len) in [(149u16, 4u16), (302, 1), (50, 4)] {
        be16(&mut o, ty);
        be16(&mut o, len);
    }
    let mut od = Vec::new();
    for (id, rate) in [(1u8, 100u32), (2, 1000)] {
        be32(&mut od, 1); // observation domain
        od.push(id);
        be32(&mut od, rate);
    }
    let mut data = Vec::new();
    for i in 0..40u32 {
        data.extend_from_slice(&[10, 0, 0, 5]);
        data.extend_from_slice(&[198, 51, 100, (i % 200) as u8]);
        be16(&mut data, 10_000 + i as u16);
        be16(&mut data, 443);
        data.push(6);
        be32(&mut data, 3 + i);
        be32(&mut data, 1000 * (3 + i));
        data.push(1 + (i % 2) as u8);
    }
    vec![
        message(vec![(2, t), (3, o), (257, od)]),
        message(vec![(256, data)]),
    ]
}

/// A pcap of raw IPv4 packets carrying `datagrams` to UDP port 2055.
fn pcap(path: &std::path::Path, datagrams: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&101u32.to_le_bytes()); // LINKTYPE_RAW
    for (i, d) in datagrams.iter().enumerate() {
        let mut payload = tests::frames::udp(40_000, 2055, d.len());
        payload.extend_from_slice(d);
        let ip = tests::frames::ipv4(
            [192, 0, 2, 1].into(),
            [192, 0, 2, 2].into(),
            17,
            0,
            0,
            &[],
            &payload,
        );
        out.extend_from_slice(&(1_800_000_000u32 + i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(ip.len() as u32).to_le_bytes());
        out.extend_from_slice(&(ip.len() as u32).to_le_bytes());
        out.extend_from_slice(&ip);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn each_record_is_scaled_by_the_rate_of_the_sampler_it_names() {
    check("v9", &datagrams(), "cflow.sampler_id");
    check("ipfix", &ipfix_messages(), "cflow.selector_id");
}

fn check(format: &str, messages: &[Vec<u8>], sampler_field: &str) {
    let dir =
        std::env::temp_dir().join(format!("detector-samplers-{format}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cap = dir.join("samplers.pcap");
    pcap(&cap, messages);
    let p = cap.to_str().unwrap();

    // tshark's reading: each sampler's interval, each record's sampler and packets.
    let fields = sh(
        "tshark",
        &[
            "-r",
            p,
            "-T",
            "fields",
            "-E",
            "separator=;",
            "-e",
            sampler_field,
            "-e",
            "cflow.sampler_random_interval",
            "-e",
            "cflow.srcport",
            "-e",
            "cflow.packets",
        ],
    );
    let text = String::from_utf8_lossy(&fields.stdout).to_string();
    let col = |line: &str, i: usize| -> Vec<u64> {
        line.split(';')
            .nth(i)
            .unwrap_or("")
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect()
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{format}: two datagrams: {text}");
    let rate: BTreeMap<u64, u64> = col(lines[0], 0).into_iter().zip(col(lines[0], 1)).collect();
    assert_eq!(rate.len(), 2, "two samplers in tshark's reading: {text}");
    let (ids, ports, pkts) = (col(lines[1], 0), col(lines[1], 2), col(lines[1], 3));
    assert_eq!((ids.len(), ports.len(), pkts.len()), (40, 40, 40), "{text}");
    let want: BTreeMap<u64, (u64, u64)> = ports
        .iter()
        .zip(ids.iter().zip(&pkts))
        .map(|(&port, (&id, &n))| (port, (rate[&id], n * rate[&id])))
        .collect();

    let json = dir.join("flows.json");
    let out = Command::new(tests::detector_bin())
        .args(["replay", "--netflow", p, "--flows-json"])
        .arg(&json)
        .output()
        .expect("replay runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeMap<u64, (u64, u64)> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["src_port"].as_u64().unwrap(),
                (
                    v["sampling"].as_u64().unwrap(),
                    v["packets"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, want, "{format}: (sampling, scaled packets) per record");
    std::fs::remove_dir_all(&dir).ok();
}
