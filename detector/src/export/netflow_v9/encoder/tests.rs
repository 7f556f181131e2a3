//! The encoder's round trips through the decoder (netflow_parser underneath), sizes,
//! sequence numbers and template refreshes.

use super::*;
use crate::flow::Direction;
use netflow_parser::variable_versions::field_value::FieldValue;
use netflow_parser::variable_versions::v9::FlowSetBody;
use netflow_parser::variable_versions::v9::lookup::V9Field;
use netflow_parser::{NetflowPacket, NetflowParser};
use std::net::{Ipv4Addr, Ipv6Addr};

fn boot() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn rec(i: u32, v6: bool) -> FlowRecord {
    let (src, dst) = if v6 {
        (
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        )
    };
    let proto = [6, 17, if v6 { 58 } else { 1 }][i as usize % 3];
    FlowRecord {
        packets: 10 + i as u64,
        bytes: 5_000_000_000 + i as u64,
        first: boot() + Duration::from_millis(1000 + i as u64),
        last: boot() + Duration::from_millis(9000 + i as u64),
        direction: if i.is_multiple_of(3) {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        tcp_flags: 0x1b,
        tos: 0x20,
        vlan: (i % 4000) as u16,
        ifindex: 7,
        ..FlowRecord::new(src, 1024 + i as u16, dst, 443, proto)
    }
}

#[derive(Debug, Default, PartialEq)]
struct Decoded {
    bytes: u64,
    packets: u64,
    first: u32,
    last: u32,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: u16,
    dport: u16,
    proto: u8,
    tos: u8,
    flags: u8,
    dir: u8,
    input: u32,
    output: u32,
    vlan: u16,
    icmp: u16,
}

fn num(v: &FieldValue) -> u64 {
    use netflow_parser::variable_versions::field_value::{DataNumber, DurationValue};
    match v {
        FieldValue::DataNumber(DataNumber::U8(x)) => *x as u64,
        FieldValue::DataNumber(DataNumber::U16(x)) => *x as u64,
        FieldValue::DataNumber(DataNumber::U24(x)) => *x as u64,
        FieldValue::DataNumber(DataNumber::U32(x)) => *x as u64,
        FieldValue::DataNumber(DataNumber::U64(x)) => *x,
        FieldValue::Duration(DurationValue::Millis { value, .. }) => *value,
        FieldValue::ProtocolType(p) => u8::from(*p) as u64,
        FieldValue::TcpControlBits(b, _) => {
            let bits = [b.fin, b.syn, b.rst, b.psh, b.ack, b.urg, b.ece, b.cwr];
            bits.iter()
                .enumerate()
                .map(|(i, &on)| (on as u64) << i)
                .sum()
        }
        other => panic!("unexpected value {other:?}"),
    }
}

fn decode(parser: &mut NetflowParser, dg: &[u8]) -> (Vec<Decoded>, Vec<u32>, usize) {
    let res = parser.parse_bytes(dg);
    assert!(res.error.is_none(), "parse error: {:?}", res.error);
    let mut out = Vec::new();
    let mut seq = Vec::new();
    let mut sampling = Vec::new();
    for p in res.packets {
        let NetflowPacket::V9(v9) = p else {
            panic!("not v9")
        };
        seq.push(v9.header.sequence_number);
        for fs in v9.flowsets {
            match fs.body {
                FlowSetBody::Data(d) => {
                    for r in d.fields {
                        let mut x = Decoded::default();
                        for (f, v) in r {
                            match f {
                                V9Field::InBytes => x.bytes = num(&v),
                                V9Field::InPkts => x.packets = num(&v),
                                V9Field::FirstSwitched => x.first = num(&v) as u32,
                                V9Field::LastSwitched => x.last = num(&v) as u32,
                                V9Field::Ipv4SrcAddr | V9Field::Ipv6SrcAddr => {
                                    x.src = Some(IpAddr::try_from(&v).unwrap())
                                }
                                V9Field::Ipv4DstAddr | V9Field::Ipv6DstAddr => {
                                    x.dst = Some(IpAddr::try_from(&v).unwrap())
                                }
                                V9Field::L4SrcPort => x.sport = num(&v) as u16,
                                V9Field::L4DstPort => x.dport = num(&v) as u16,
                                V9Field::Protocol => x.proto = num(&v) as u8,
                                V9Field::SrcTos => x.tos = num(&v) as u8,
                                V9Field::TcpFlags => x.flags = num(&v) as u8,
                                V9Field::Direction => x.dir = num(&v) as u8,
                                V9Field::InputSnmp => x.input = num(&v) as u32,
                                V9Field::OutputSnmp => x.output = num(&v) as u32,
                                V9Field::SrcVlan => x.vlan = num(&v) as u16,
                                V9Field::IcmpType => x.icmp = num(&v) as u16,
                                other => panic!("unexpected field {other:?}"),
                            }
                        }
                        out.push(x);
                    }
                }
                FlowSetBody::OptionsData(o) => {
                    for f in o.fields {
                        for (k, v) in f.options_fields {
                            if k == V9Field::SamplingInterval {
                                sampling.push(num(&v));
                            }
                        }
                    }
                }
                FlowSetBody::NoTemplate(_) => panic!("data before template"),
                _ => {}
            }
        }
    }
    let n = sampling.len();
    (out, seq, n)
}

fn expected(r: &FlowRecord) -> Decoded {
    let (input, output) = match r.direction {
        Direction::Ingress => (r.ifindex, 0),
        Direction::Egress => (0, r.ifindex),
    };
    Decoded {
        bytes: r.bytes,
        packets: r.packets,
        first: r.first.duration_since(boot()).unwrap().as_millis() as u32,
        last: r.last.duration_since(boot()).unwrap().as_millis() as u32,
        src: Some(r.src_addr),
        dst: Some(r.dst_addr),
        sport: r.src_port,
        dport: r.dst_port,
        proto: r.protocol,
        tos: r.tos,
        flags: r.tcp_flags,
        dir: r.direction.netflow_value(),
        input,
        output,
        vlan: r.vlan,
        icmp: if r.is_icmp() { r.dst_port } else { 0 },
    }
}

#[test]
fn round_trips_ipv4_and_ipv6_records_through_netflow_parser() {
    let records: Vec<_> = (0..300).map(|i| rec(i, i % 5 == 0)).collect();
    let mut enc = V9Encoder::new(V9Config::default(), boot());
    let now = boot() + Duration::from_secs(10);
    let dgs = enc.encode(&records, now);
    assert!(dgs.len() > 1, "300 records must need several datagrams");
    let mut parser = NetflowParser::default();
    let mut decoded = Vec::new();
    let mut seqs = Vec::new();
    for dg in &dgs {
        assert!(dg.len() <= 1400, "datagram of {} bytes", dg.len());
        let (d, s, _) = decode(&mut parser, dg);
        decoded.extend(d);
        seqs.extend(s);
    }
    let want: Vec<_> = records.iter().map(expected).collect();
    assert_eq!(decoded, want);
    assert_eq!(seqs, (0..dgs.len() as u32).collect::<Vec<_>>());
}

/// An unsampled IPFIX export carries no sampling options record, at the first
/// message or at a template refresh, so every reader counts the same Data Records:
/// each message's sequence number is the number of flow records before it.
#[test]
fn unsampled_ipfix_sends_no_options_and_counts_flow_records() {
    let cfg = V9Config {
        format: ExportFormat::Ipfix,
        sampling_interval: 1,
        template_refresh_packets: 3,
        ..V9Config::default()
    };
    let mut enc = V9Encoder::new(cfg, boot());
    let now = boot() + Duration::from_secs(10);
    let mut sent = 0u32;
    for round in 0..4u32 {
        let records: Vec<_> = (0..60).map(|i| rec(round * 60 + i, i % 7 == 0)).collect();
        for dg in enc.encode(&records, now) {
            assert_eq!(u32::from_be_bytes(dg[8..12].try_into().unwrap()), sent);
            let mut at = 16;
            while at + 4 <= dg.len() {
                let set = u16::from_be_bytes([dg[at], dg[at + 1]]);
                let len = usize::from(u16::from_be_bytes([dg[at + 2], dg[at + 3]]));
                assert_ne!(set, 3, "an options template in an unsampled export");
                assert_ne!(set, TEMPLATE_OPTIONS, "an options record");
                if set == TEMPLATE_IPV4 || set == TEMPLATE_IPV6 {
                    let layout = ExportFormat::Ipfix.layout();
                    let fields = if set == TEMPLATE_IPV4 {
                        layout.v4
                    } else {
                        layout.v6
                    };
                    sent += ((len - 4) / record_len(fields)) as u32;
                }
                at += len;
            }
        }
    }
    assert_eq!(sent, 240);
}

/// IPFIX carries what v9 carries: our decoder (netflow_parser underneath) reads every
/// record back, times to the millisecond from flowStart/EndMilliseconds; each
/// header's sequence number counts the data records before it, so the decoder sees
/// no gap; every message says its own length.
#[test]
fn ipfix_round_trips_records_with_sequence_numbers_counting_records() {
    use crate::sources::netflow::decode::{DecodeLimits, Decoder};
    let records: Vec<_> = (0..300).map(|i| rec(i, i % 5 == 0)).collect();
    let cfg = V9Config {
        format: ExportFormat::Ipfix,
        source_id: 7,
        sampling_interval: 10,
        ..V9Config::default()
    };
    let mut enc = V9Encoder::new(cfg, boot());
    let now = boot() + Duration::from_secs(10);
    let dgs = enc.encode(&records, now);
    assert!(dgs.len() > 1, "300 records must need several messages");
    let from = "192.0.2.9:4739".parse().unwrap();
    let mut dec = Decoder::new(DecodeLimits::default(), vec![]);
    let mut out = Vec::new();
    let mut expected_seq = 0u32;
    for dg in &dgs {
        assert_eq!(u16::from_be_bytes([dg[0], dg[1]]), 10);
        assert_eq!(u16::from_be_bytes([dg[2], dg[3]]) as usize, dg.len());
        assert!(dg.len() <= 1400);
        let seq = u32::from_be_bytes(dg[8..12].try_into().unwrap());
        assert_eq!(seq, expected_seq);
        let before = out.len();
        dec.decode(from, dg, now, &mut out);
        // The first message also carries the sampling options record.
        let options = u32::from(expected_seq == 0);
        expected_seq += (out.len() - before) as u32 + options;
    }
    let stats = &dec.exporters()[&from.ip()];
    assert_eq!(stats.sequence_gaps, 0, "{stats:?}");
    assert_eq!(stats.ipfix, dgs.len() as u64);
    assert_eq!(stats.options_records, 1);
    assert_eq!(out.len(), records.len());
    for (got, want) in out.iter().zip(&records) {
        assert_eq!(
            (
                got.src_addr,
                got.dst_addr,
                got.src_port,
                got.dst_port,
                got.protocol
            ),
            (
                want.src_addr,
                want.dst_addr,
                want.src_port,
                want.dst_port,
                want.protocol
            )
        );
        assert_eq!((got.packets, got.bytes), (want.packets, want.bytes));
        assert_eq!((got.first, got.last), (want.first, want.last));
        assert_eq!(
            (got.tos, got.tcp_flags, got.vlan),
            (want.tos, want.tcp_flags, want.vlan)
        );
        assert_eq!(got.direction, want.direction);
        // samplingPacketInterval 1, samplingPacketSpace 9: 1 in 10.
        assert_eq!(got.sampling, 10);
    }
}

#[test]
fn header_count_matches_records_and_templates() {
    let records: Vec<_> = (0..3).map(|i| rec(i, false)).collect();
    let mut enc = V9Encoder::new(V9Config::default(), boot());
    let dgs = enc.encode(&records, boot());
    assert_eq!(dgs.len(), 1);
    // 2 data templates + 1 options template + 1 options record + 3 data records.
    assert_eq!(u16::from_be_bytes([dgs[0][2], dgs[0][3]]), 7);
    let dgs = enc.encode(&records, boot());
    assert_eq!(u16::from_be_bytes([dgs[0][2], dgs[0][3]]), 3);
    assert_eq!(u32::from_be_bytes(dgs[0][12..16].try_into().unwrap()), 1);
}

#[test]
fn templates_are_resent_every_n_packets_and_every_m_seconds() {
    let cfg = V9Config {
        template_refresh_packets: 3,
        template_refresh_secs: 30,
        sampling_interval: 100,
        ..V9Config::default()
    };
    let mut enc = V9Encoder::new(cfg, boot());
    let mut parser = NetflowParser::default();
    let one = [rec(1, false)];
    let mut with_templates = Vec::new();
    for i in 0..7 {
        let dg = enc.encode(&one, boot() + Duration::from_secs(i));
        let (_, _, n_opts) = decode(&mut parser, &dg[0]);
        with_templates.push(n_opts == 1);
    }
    assert_eq!(
        with_templates,
        [true, false, false, true, false, false, true]
    );
    // Time-based: next datagram 30 s after the last templates carries them again.
    let dg = enc.encode(&one, boot() + Duration::from_secs(36));
    assert_eq!(decode(&mut parser, &dg[0]).2, 1);
    let dg = enc.encode(&one, boot() + Duration::from_secs(37));
    assert_eq!(decode(&mut parser, &dg[0]).2, 0);
}

#[test]
fn no_datagram_without_records_unless_templates_are_due() {
    let mut enc = V9Encoder::new(V9Config::default(), boot());
    assert_eq!(
        enc.encode(&[], boot()).len(),
        1,
        "first call announces templates"
    );
    assert!(enc.encode(&[], boot()).is_empty());
    assert_eq!(enc.encode(&[], boot() + Duration::from_secs(61)).len(), 1);
}

#[test]
fn every_datagram_fits_any_family_mix() {
    for pattern in 0..4 {
        let records: Vec<_> = (0..500)
            .map(|i| rec(i, (i as usize + pattern).is_multiple_of(pattern + 2)))
            .collect();
        let mut enc = V9Encoder::new(V9Config::default(), boot());
        let mut parser = NetflowParser::default();
        let mut n = 0;
        for dg in enc.encode(&records, boot()) {
            assert!(dg.len() <= 1400);
            assert_eq!(dg.len() % 4, 0);
            n += decode(&mut parser, &dg).0.len();
        }
        assert_eq!(n, 500);
    }
}
