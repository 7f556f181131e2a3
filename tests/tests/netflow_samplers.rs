//! NetFlow v9 records that name their sampler, with several samplers of different rates
//! in one exporter (FLOW_SAMPLER_ID 48 in the data, options records giving each
//! sampler's FLOW_SAMPLER_RANDOM_INTERVAL 50): each record is scaled by its own
//! sampler's rate (v9, and IPFIX with selectorId 302). The capture is built here and checked against tshark's dissection,
//! which gives the expected rate of each record; `replay --netflow` must agree.

use std::collections::BTreeMap;

use tests::export::{
    LINKTYPE_RAW, ipfix, put16, put32, replay_netflow, template, udp_packets, v9, write_pcap,
};
use tests::netns::sh;

/// The data template: addresses, ports, protocol, packets, bytes, and the field `sampler`
/// (v9 FLOW_SAMPLER_ID 48, IPFIX selectorId 302) naming the record's sampler.
fn data_template(sampler: u16) -> Vec<u8> {
    let fields = [
        (8, 4),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (2, 4),
        (1, 4),
        (sampler, 1),
    ];
    template(256, &fields)
}

/// 40 records alternating between samplers 1 and 2, in the data template's layout.
fn records() -> Vec<u8> {
    let mut data = Vec::new();
    for i in 0..40u32 {
        data.extend_from_slice(&[10, 0, 0, 5]);
        data.extend_from_slice(&[198, 51, 100, (i % 200) as u8]);
        put16(&mut data, 10_000 + i as u16);
        put16(&mut data, 443);
        data.push(6);
        put32(&mut data, 3 + i); // packets
        put32(&mut data, 1000 * (3 + i)); // bytes
        data.push(1 + (i % 2) as u8); // sampler id
    }
    data
}

/// Two samplers (1 in 100, 1 in 1000) and 40 records alternating between them.
fn datagrams() -> Vec<Vec<u8>> {
    // Options template 257 (scope System).
    let mut o = Vec::new();
    put16(&mut o, 257);
    put16(&mut o, 4); // scope length: one field
    put16(&mut o, 12); // option length: three fields
    for (ty, len) in [(1u16, 4u16), (48, 1), (50, 4), (49, 1)] {
        put16(&mut o, ty);
        put16(&mut o, len);
    }
    let mut od = Vec::new();
    for (id, rate) in [(1u8, 100u32), (2, 1000)] {
        put32(&mut od, 0); // System scope
        od.push(id);
        put32(&mut od, rate);
        od.push(2); // random sampling
    }
    vec![
        v9(1, 0, 4, &[(0, data_template(48)), (1, o), (257, od)]),
        v9(1, 1, 40, &[(256, records())]),
    ]
}

/// The same in IPFIX: selectorId (302) names the sampler in the data and in the options
/// records (scope observationDomainId), samplerRandomInterval (50) gives its rate.
fn ipfix_messages() -> Vec<Vec<u8>> {
    let mut o = Vec::new();
    put16(&mut o, 257);
    put16(&mut o, 3); // fields
    put16(&mut o, 1); // scope fields
    for (ty, len) in [(149u16, 4u16), (302, 1), (50, 4)] {
        put16(&mut o, ty);
        put16(&mut o, len);
    }
    let mut od = Vec::new();
    for (id, rate) in [(1u8, 100u32), (2, 1000)] {
        put32(&mut od, 1); // observation domain
        od.push(id);
        put32(&mut od, rate);
    }
    vec![
        ipfix(1, 0, &[(2, data_template(302)), (3, o), (257, od)]),
        ipfix(1, 0, &[(256, records())]),
    ]
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
    let to = (std::net::Ipv4Addr::new(192, 0, 2, 2), 2055);
    let from = (std::net::Ipv4Addr::new(192, 0, 2, 1), 40_000);
    write_pcap(&cap, LINKTYPE_RAW, &udp_packets(from, to, messages));
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

    let got: BTreeMap<u64, (u64, u64)> = replay_netflow(&cap, &dir.join("flows.json"))
        .iter()
        .map(|v| {
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
