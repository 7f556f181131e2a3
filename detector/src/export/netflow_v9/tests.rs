//! The sink's observation domains, read back from the UDP socket of a collector by
//! netflow_parser: each relayed record goes out with its raw counts under a domain
//! whose sampling options announce its interval, so a collector that scales per domain
//! (as nfcapd does) gets the agent's estimates; past the bound of domains, records go
//! out scaled under the unsampled domain, counted.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use netflow_parser::variable_versions::field_value::{DataNumber, FieldValue};
use netflow_parser::variable_versions::v9::FlowSetBody;
use netflow_parser::variable_versions::v9::lookup::V9Field;
use netflow_parser::{NetflowPacket, NetflowParser};

use super::*;
use crate::flow::Origin;

fn boot() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn record(i: u32, sampling: u32, local: bool) -> FlowRecord {
    let exporter: SocketAddr = "192.0.2.7:2055".parse().unwrap();
    FlowRecord {
        packets: 1 + u64::from(i % 7),
        bytes: 60 + u64::from(i) * 13,
        first: boot() + Duration::from_secs(1),
        last: boot() + Duration::from_secs(2),
        sampling,
        origin: if local {
            Origin::Local
        } else {
            Origin::Exporter {
                addr: exporter,
                domain: 3,
            }
        },
        ..FlowRecord::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            40_000,
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            443,
            6,
        )
    }
}

fn number(v: &FieldValue) -> u64 {
    match v {
        FieldValue::DataNumber(DataNumber::U8(x)) => u64::from(*x),
        FieldValue::DataNumber(DataNumber::U16(x)) => u64::from(*x),
        FieldValue::DataNumber(DataNumber::U32(x)) => u64::from(*x),
        FieldValue::DataNumber(DataNumber::U64(x)) => *x,
        other => panic!("unexpected value {other:?}"),
    }
}

/// Per source id: (announced interval, raw packets, raw bytes, records).
type Domains = BTreeMap<u32, (u64, u64, u64, u64)>;

fn collect(collector: &UdpSocket) -> Domains {
    let mut parser = NetflowParser::default();
    let mut domains = Domains::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = collector.recv(&mut buf) {
        let res = parser.parse_bytes(&buf[..n]);
        assert!(res.error.is_none(), "{:?}", res.error);
        for p in res.packets {
            let NetflowPacket::V9(v9) = p else {
                panic!("not v9")
            };
            let d = domains.entry(v9.header.source_id).or_default();
            for fs in v9.flowsets {
                match fs.body {
                    FlowSetBody::Data(data) => {
                        for r in data.fields {
                            d.3 += 1;
                            for (f, v) in r {
                                match f {
                                    V9Field::InPkts => d.1 += number(&v),
                                    V9Field::InBytes => d.2 += number(&v),
                                    _ => {}
                                }
                            }
                        }
                    }
                    FlowSetBody::OptionsData(o) => {
                        for f in o.fields {
                            for (k, v) in f.options_fields {
                                if k == V9Field::SamplingInterval {
                                    d.0 = number(&v);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    domains
}

#[test]
fn relayed_records_go_out_raw_under_a_domain_per_sampling_interval() {
    let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
    collector
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let cfg = V9Config {
        source_id: 40,
        sampling_interval: 4,
        ..V9Config::default()
    };
    let mut sink = V9Sink::new(&[collector.local_addr().unwrap()], cfg, boot()).unwrap();
    // The meter's records (sampled 1 in 4), then relayed ones at 1, 10 and 100, then
    // enough other intervals to take every domain and overflow.
    let mut records: Vec<FlowRecord> = (0..30).map(|i| record(i, 4, true)).collect();
    let intervals = [1, 10, 100];
    records.extend((0..300).map(|i| record(100 + i, intervals[i as usize % 3], false)));
    let extra: Vec<u32> = (1000..1020).collect();
    records.extend(extra.iter().map(|&n| record(n, n, false)));
    sink.send(&records, boot() + Duration::from_secs(3));
    let got = collect(&collector);

    // The meter's domain: its own interval, raw counts.
    let local: Vec<_> = records
        .iter()
        .filter(|r| r.origin == Origin::Local)
        .collect();
    let sum = |rs: &[&FlowRecord]| -> (u64, u64, u64) {
        (
            rs.iter().map(|r| r.packets).sum(),
            rs.iter().map(|r| r.bytes).sum(),
            rs.len() as u64,
        )
    };
    let (p, b, n) = sum(&local);
    assert_eq!(got[&40], (4, p, b, n), "the meter's domain");
    // 1, 10, 100 and the first 13 extra intervals each have a domain, in order of first
    // sight, announcing its interval over the raw counts of its records.
    let firsts: Vec<u32> = intervals
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .take(MAX_RELAY_DOMAINS)
        .collect();
    let overflow: Vec<&FlowRecord> = records
        .iter()
        .filter(|r| r.origin != Origin::Local && !firsts.contains(&r.sampling))
        .collect();
    assert_eq!(overflow.len(), extra.len() + 3 - MAX_RELAY_DOMAINS);
    for (k, &interval) in firsts.iter().enumerate() {
        let id = 41 + k as u32;
        let mine: Vec<&FlowRecord> = records
            .iter()
            .filter(|r| r.origin != Origin::Local && r.sampling == interval)
            .collect();
        let (mut p, mut b, n) = sum(&mine);
        if interval == 1 {
            // The unsampled domain also carries the overflow, scaled.
            p += overflow.iter().map(|r| r.est_packets()).sum::<u64>();
            b += overflow.iter().map(|r| r.est_bytes()).sum::<u64>();
            assert_eq!(
                got[&id],
                (1, p, b, n + overflow.len() as u64),
                "source {id}"
            );
        } else {
            assert_eq!(got[&id], (u64::from(interval), p, b, n), "source {id}");
        }
    }
    assert_eq!(got.len(), 1 + MAX_RELAY_DOMAINS, "{got:?}");
    assert_eq!(sink.rescaled(), overflow.len() as u64);
    // What a collector that scales each domain by its interval totals: the estimates.
    let scaled: u64 = got.values().map(|d| d.0 * d.1).sum();
    assert_eq!(scaled, records.iter().map(|r| r.est_packets()).sum::<u64>());
    let scaled: u64 = got.values().map(|d| d.0 * d.2).sum();
    assert_eq!(scaled, records.iter().map(|r| r.est_bytes()).sum::<u64>());
}

/// Runs for UDP segmentation offload: equal datagrams together, a shorter one ends a
/// run, a longer one starts the next, at most 64 datagrams and 65,487 bytes a run; every
/// datagram in exactly one run, in order.
#[test]
fn gso_runs_group_equal_datagrams_and_end_at_a_shorter_one() {
    let dg = |n: usize| Bytes::from(vec![0u8; n]);
    let sizes = [1400, 1400, 1400, 900, 1400, 1400, 1500, 1500, 60, 60, 60];
    let datagrams: Vec<Bytes> = sizes.iter().map(|&n| dg(n)).collect();
    assert_eq!(
        gso_runs(&datagrams),
        vec![0..4, 4..6, 6..9, 9..11],
        "sizes {sizes:?}"
    );
    // 100 equal datagrams: the segment limit cuts them at 64.
    let equal: Vec<Bytes> = (0..100).map(|_| dg(100)).collect();
    assert_eq!(gso_runs(&equal), vec![0..64, 64..100]);
    // 1,400-byte datagrams: the byte limit cuts them at 46 (64,400 bytes).
    let big: Vec<Bytes> = (0..50).map(|_| dg(1400)).collect();
    assert_eq!(gso_runs(&big), vec![0..46, 46..50]);
    assert_eq!(gso_runs(&[]), Vec::<std::ops::Range<usize>>::new());
}

/// What `send_all` sends over loopback arrives as the datagrams it was given, one for
/// one, byte for byte and in order, with segmentation offload on (runs of equal
/// datagrams) and off.
#[test]
fn send_all_delivers_every_datagram_as_it_was_with_and_without_segmentation() {
    let rx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    // Room for every datagram before the first is read (the kernel caps it at twice
    // net.core.rmem_max, 416 KiB by default: 80 datagrams of 1,400 bytes take ~220).
    rx.set_recv_buffer_size(4 << 20).unwrap();
    rx.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let rx = UdpSocket::from(rx);
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let addr = rx.local_addr().unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    // 80 datagrams: runs of 1,400-byte ones broken by shorter ones, each numbered.
    let datagrams: Vec<Bytes> = (0..80u32)
        .map(|i| {
            let len = if i % 37 == 36 { 200 + i as usize } else { 1400 };
            let mut v = vec![(i % 251) as u8; len];
            v[..4].copy_from_slice(&i.to_be_bytes());
            Bytes::from(v)
        })
        .collect();
    for gso_on in [true, false] {
        let mut gso = gso_on;
        let mut failures = 0;
        let sent = send_all(&tx, addr, &datagrams, &mut gso, &mut |_| failures += 1);
        assert_eq!((sent, failures), (80, 0), "gso {gso_on}");
        let mut buf = vec![0u8; 65_536];
        for (i, want) in datagrams.iter().enumerate() {
            let n = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(&buf[..n], &want[..], "datagram {i} (gso {gso_on})");
        }
        eprintln!("gso {gso_on}: kept {gso}");
    }
}
