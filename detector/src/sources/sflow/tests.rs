//! The decoder on hand-made datagrams: packets into flows, sequences, counters, limits,
//! and bad input (truncated, wrong version, huge counts).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::decode::{Decoder, SflowLimits, SflowTimeouts};
use crate::flow::{FlowRecord, Live, Origin};

/// Builds sFlow v5 datagrams (XDR: big-endian 32-bit words, opaque data padded to 4).
#[derive(Default)]
struct Dgram {
    words: Vec<u8>,
    samples: u32,
}

fn put(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// An Ethernet/IPv4/TCP frame's first bytes, `vlans` tags in front of IPv4.
fn frame(vlans: &[u16], ip_len: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    for v in vlans {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0x10];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 192, 0, 2, 9]);
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&6881u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&51413u16.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    f.extend_from_slice(&tcp);
    f
}

impl Dgram {
    /// A flow sample with one raw packet header record.
    fn flow(mut self, seq: u32, rate: u32, drops: u32, input: u32, hdr: &[u8]) -> Self {
        let mut rec = Vec::new();
        put(&mut rec, 1); // Ethernet
        put(&mut rec, hdr.len() as u32 + 4); // frame length (with FCS)
        put(&mut rec, 4); // stripped
        put(&mut rec, hdr.len() as u32);
        rec.extend_from_slice(hdr);
        rec.resize(rec.len().div_ceil(4) * 4, 0);
        let mut s = Vec::new();
        put(&mut s, seq);
        put(&mut s, 3); // source id: ifIndex 3
        put(&mut s, rate);
        put(&mut s, seq * rate); // pool
        put(&mut s, drops);
        put(&mut s, input);
        put(&mut s, 7);
        put(&mut s, 1); // one record
        put(&mut s, 1); // raw packet header
        put(&mut s, rec.len() as u32);
        s.extend_from_slice(&rec);
        put(&mut self.words, 1); // flow sample
        put(&mut self.words, s.len() as u32);
        self.words.extend_from_slice(&s);
        self.samples += 1;
        self
    }

    /// A counter sample with one generic interface record.
    fn counters(mut self, if_index: u32, in_octets: u64, out_octets: u64) -> Self {
        let mut r = Vec::new();
        put(&mut r, if_index);
        put(&mut r, 6);
        r.extend_from_slice(&1_000_000_000u64.to_be_bytes());
        put(&mut r, 1);
        put(&mut r, 3);
        r.extend_from_slice(&in_octets.to_be_bytes());
        for x in [10, 1, 1, 2, 3, 0] {
            put(&mut r, x); // in ucast, mcast, bcast, discards, errors, unknown
        }
        r.extend_from_slice(&out_octets.to_be_bytes());
        for x in [20, 0, 0, 4, 5, 0] {
            put(&mut r, x); // out ucast, mcast, bcast, discards, errors, promisc
        }
        let mut s = Vec::new();
        put(&mut s, 1);
        put(&mut s, if_index);
        put(&mut s, 1);
        put(&mut s, 1); // generic interface
        put(&mut s, r.len() as u32);
        s.extend_from_slice(&r);
        put(&mut self.words, 2);
        put(&mut self.words, s.len() as u32);
        self.words.extend_from_slice(&s);
        self.samples += 1;
        self
    }

    fn build(&self, seq: u32) -> Vec<u8> {
        let mut d = Vec::new();
        for x in [5, 1, 0xc000_0201, 7, seq, 1000, self.samples] {
            put(&mut d, x);
        }
        d.extend_from_slice(&self.words);
        d
    }
}

fn from() -> SocketAddr {
    "192.0.2.1:40000".parse().unwrap()
}

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

fn decoder() -> Decoder {
    Decoder::new(SflowLimits::default(), SflowTimeouts::default(), Vec::new())
}

fn all(d: &mut Decoder) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    d.flush(&mut out);
    out
}

#[test]
fn samples_of_one_flow_make_one_sampled_record_of_the_agent() {
    let mut d = decoder();
    let mut out = Vec::new();
    let dg = Dgram::default()
        .flow(1, 10, 0, 5, &frame(&[100, 200], 1000, 0x10))
        .flow(2, 10, 0, 5, &frame(&[100, 200], 500, 0x18));
    d.decode(from(), &dg.build(1), t(0), &mut out);
    assert!(out.is_empty());
    let r = all(&mut d);
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(
        (r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.protocol),
        (
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "192.0.2.9".parse().unwrap(),
            6881,
            51413,
            6
        )
    );
    assert_eq!((r.packets, r.bytes, r.sampling), (2, 1500, 10));
    assert_eq!((r.est_packets(), r.est_bytes()), (20, 15000));
    assert_eq!(
        (r.vlan, r.vlan_inner, r.ifindex, r.tos, r.tcp_flags),
        (100, 200, 5, 0x10, 0x18)
    );
    assert_eq!(
        r.origin,
        Origin::Exporter {
            addr: "192.0.2.1:0".parse().unwrap(),
            domain: 7
        }
    );
    let s = &d.source_stats()[0].1;
    assert_eq!(
        (s.datagrams, s.flow_samples, s.packets, s.records),
        (1, 2, 2, 1)
    );
}

#[test]
fn flows_end_at_the_inactive_and_active_timeouts_and_at_fin() {
    let mut d = decoder();
    let mut out = Vec::new();
    let one = |seq| {
        Dgram::default()
            .flow(seq, 1, 0, 1, &frame(&[], 100, 0x10))
            .build(seq)
    };
    d.decode(from(), &one(1), t(0), &mut out);
    d.expire(t(14), &mut out);
    assert!(out.is_empty());
    d.expire(t(15), &mut out);
    assert_eq!(out.len(), 1, "inactive timeout");
    out.clear();
    // A packet every 10 s: the active timeout (60 s) cuts the flow.
    for i in 0..7 {
        d.decode(from(), &one(2 + i), t(100 + 10 * u64::from(i)), &mut out);
        d.expire(t(100 + 10 * u64::from(i)), &mut out);
    }
    assert_eq!(out.len(), 1, "active timeout");
    assert_eq!(out[0].packets, 7);
    out.clear();
    let fin = Dgram::default()
        .flow(9, 1, 0, 1, &frame(&[], 100, 0x11))
        .build(9);
    d.decode(from(), &fin, t(300), &mut out);
    d.expire(t(300), &mut out);
    assert_eq!(out.len(), 1, "FIN");
    assert_eq!(d.flows(), 0);
}

#[test]
fn sequence_gaps_and_agent_drops_are_counted() {
    let mut d = decoder();
    let mut out = Vec::new();
    let f = frame(&[], 100, 0x10);
    d.decode(
        from(),
        &Dgram::default().flow(1, 1, 0, 1, &f).build(1),
        t(0),
        &mut out,
    );
    // Datagrams 2-4 lost; samples 2-5 lost; the agent dropped 3.
    d.decode(
        from(),
        &Dgram::default().flow(6, 1, 3, 1, &f).build(5),
        t(1),
        &mut out,
    );
    // The agent restarted.
    d.decode(
        from(),
        &Dgram::default().flow(7, 1, 3, 1, &f).build(0),
        t(2),
        &mut out,
    );
    let s = &d.source_stats()[0].1;
    assert_eq!(
        (
            s.lost_datagrams,
            s.lost_samples,
            s.agent_drops,
            s.sequence_resets
        ),
        (3, 4, 3, 1)
    );
}

#[test]
fn interface_counters_are_kept_per_source_and_interface() {
    let mut d = decoder();
    let mut out = Vec::new();
    let dg = Dgram::default().counters(3, 1000, 2000).counters(4, 1, 2);
    d.decode(from(), &dg.build(1), t(0), &mut out);
    let i = d.interfaces();
    assert_eq!(i.len(), 2);
    let c = i[&(("192.0.2.1".parse().unwrap(), 7), 3)];
    assert_eq!(
        (c.in_octets, c.in_packets, c.in_discards, c.in_errors),
        (1000, 12, 2, 3)
    );
    assert_eq!(
        (c.out_octets, c.out_packets, c.out_discards, c.out_errors),
        (2000, 20, 4, 5)
    );
    assert_eq!(d.source_stats()[0].1.counter_samples, 2);
}

#[test]
fn bad_datagrams_are_counted_by_kind() {
    let mut d = decoder();
    let mut out = Vec::new();
    let good = Dgram::default()
        .flow(1, 1, 0, 1, &frame(&[], 100, 0x10))
        .build(1);
    let mut v4 = good.clone();
    v4[3] = 4;
    d.decode(from(), &v4, t(0), &mut out);
    d.decode(from(), &good[..10], t(0), &mut out);
    d.decode(from(), &good[..good.len() - 8], t(0), &mut out);
    let mut huge = good.clone();
    huge[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
    d.decode(from(), &huge, t(0), &mut out);
    assert_eq!(d.global.errors.get("version"), Some(&1));
    assert_eq!(d.global.errors.get("truncated"), Some(&1));
    let s = &d.source_stats()[0].1;
    assert_eq!(s.errors.get("truncated"), Some(&1));
    assert_eq!(s.errors.get("too_many_samples"), Some(&1));
    assert_eq!(s.datagrams, 2);
    assert!(out.is_empty() && d.flows() == 0);
}

#[test]
fn the_allow_list_and_the_limits_bound_what_is_kept() {
    let allow = vec!["198.51.100.0/24".parse().unwrap()];
    let mut d = Decoder::new(SflowLimits::default(), SflowTimeouts::default(), allow);
    let mut out = Vec::new();
    let good = Dgram::default()
        .flow(1, 1, 0, 1, &frame(&[], 100, 0x10))
        .build(1);
    d.decode(from(), &good, t(0), &mut out);
    assert_eq!(d.global.rejected, 1);
    let limits = SflowLimits {
        max_sources: 1,
        max_flows: 1,
        max_interfaces: 1,
        ..SflowLimits::default()
    };
    let mut d = Decoder::new(limits, SflowTimeouts::default(), Vec::new());
    let mut other = good.clone();
    other[15] = 8; // another sub-agent
    d.decode(from(), &good, t(0), &mut out);
    d.decode(from(), &other, t(0), &mut out);
    assert_eq!(d.global.over_source_limit, 1);
    let two = Dgram::default()
        .flow(2, 1, 0, 1, &frame(&[], 100, 0x10))
        .flow(3, 1, 0, 2, &frame(&[], 100, 0x10))
        .counters(1, 1, 1)
        .counters(2, 1, 1);
    d.decode(from(), &two.build(2), t(0), &mut out);
    assert_eq!((d.global.over_flow_limit, out.len()), (1, 1));
    assert_eq!(
        (d.global.over_interface_limit, d.interfaces().len()),
        (1, 1)
    );
    assert_eq!(d.flows(), 1);
}

proptest! {
    /// Any bytes, and any corruption of a good datagram: no panic, every datagram
    /// counted once (as a source's datagram, or a header error).
    #[test]
    fn never_panics_and_counts_every_datagram(
        junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut d = decoder();
        let mut out = Vec::new();
        let mut good = Dgram::default()
            .flow(1, 10, 0, 1, &frame(&[7], 100, 0x10))
            .counters(3, 1, 2)
            .build(1);
        for (i, b) in &flips {
            let i = i.index(good.len());
            good[i] ^= b;
        }
        let cut = cut.index(good.len() + 1);
        let mut sent = 0u64;
        for dg in junk.iter().map(Vec::as_slice).chain([&good[..], &good[..cut]]) {
            d.decode(from(), dg, t(0), &mut out);
            sent += 1;
        }
        d.expire(t(100), &mut out);
        let counted: u64 = d.source_stats().iter().map(|(_, s)| s.datagrams).sum::<u64>()
            + d.global.errors.values().sum::<u64>();
        prop_assert_eq!(counted, sent);
        let packets: u64 = d.source_stats().iter().map(|(_, s)| s.packets).sum();
        prop_assert_eq!(out.iter().map(|r| r.packets).sum::<u64>(), packets);
    }
}

/// Live flows: detection hears of a flow with its first sample (a detection-only start
/// record), then of its growth every interval, and the exported record counts only what
/// it was not told; over the three, detection counts the flow once and every packet and
/// byte once, and the export is the same record as without live reports.
#[test]
fn live_reports_tell_detection_early_and_count_everything_once() {
    let timeouts = SflowTimeouts {
        live: Some(Duration::from_secs(10)),
        ..SflowTimeouts::default()
    };
    let mut live = Decoder::new(SflowLimits::default(), timeouts, Vec::new());
    let mut plain = decoder();
    let (mut out, mut plain_out) = (Vec::new(), Vec::new());
    // A sample every 5 s for 50 s, 100 bytes each, 1 in 10.
    for i in 0..11u32 {
        let dg = Dgram::default()
            .flow(i + 1, 10, 0, 1, &frame(&[], 100, 0x10))
            .build(i + 1);
        let at = t(5 * u64::from(i));
        live.decode(from(), &dg, at, &mut out);
        live.expire(at, &mut out);
        plain.decode(from(), &dg, at, &mut plain_out);
        plain.expire(at, &mut plain_out);
        if i == 0 {
            assert_eq!(out.len(), 1, "the start, with the first sample");
            assert_eq!(out[0].live, Live::Start);
            assert_eq!((out[0].packets, out[0].bytes), (1, 100));
        }
    }
    live.flush(&mut out);
    plain.flush(&mut plain_out);
    let grows = out.iter().filter(|r| r.live == Live::Grow).count();
    assert!(grows >= 4, "growth every 10 s over 50 s: {grows}");
    let exported: Vec<&FlowRecord> = out.iter().filter(|r| !r.live.detection_only()).collect();
    assert_eq!(exported.len(), 1);
    assert_eq!(plain_out.len(), 1);
    let (e, p) = (exported[0], &plain_out[0]);
    assert_eq!((e.packets, e.bytes, e.sampling), (p.packets, p.bytes, 10));
    assert_eq!((e.packets, e.bytes), (11, 1100));
    // What detection counts: the flow once, packets and bytes once, scaled.
    let flows = out.iter().filter(|r| !r.live.continues()).count();
    let packets: u64 = out.iter().map(|r| r.new_packets()).sum();
    let bytes: u64 = out.iter().map(|r| r.new_bytes()).sum();
    assert_eq!((flows, packets, bytes), (1, 110, 11_000));
}

/// IPv6 fragments in a raw header (header protocol 12): the first fragment (offset 0,
/// more fragments) carries the UDP header and is keyed with its ports, as IPv4's first
/// fragment is; a later one (offset 185) has none. etherparse 0.18 reads the M flag as
/// an offset bit, which made every first fragment portless.
#[test]
fn ipv6_first_fragments_keep_their_ports_and_later_ones_have_none() {
    use flowparser_sflow::flow_records::{FlowRecord as SflowRecord, RawPacketHeader};
    let packet = |offset_m: u16, payload: &[u8]| {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(8 + 1000u16).to_be_bytes());
        p.extend_from_slice(&[44, 64]);
        for a in ["2001:db8::1", "2001:db8::2"] {
            p.extend_from_slice(&a.parse::<std::net::Ipv6Addr>().unwrap().octets());
        }
        p.extend_from_slice(&[17, 0]);
        p.extend_from_slice(&offset_m.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        p.extend_from_slice(payload);
        let rec = SflowRecord::RawPacketHeader(RawPacketHeader {
            header_protocol: 12,
            frame_length: 1048,
            stripped: 0,
            header_length: p.len() as u32,
            header: p,
        });
        super::decode::packet_of(&[rec]).expect("an IPv6 packet")
    };
    let udp = [0x1b, 0x58, 0x1b, 0x59, 0x03, 0xe8, 0, 0];
    let first = packet(1, &udp);
    assert_eq!(
        (first.protocol, first.src_port, first.dst_port),
        (17, 7000, 7001)
    );
    assert_eq!(first.bytes, 1048);
    let later = packet(185 << 3, &udp);
    assert_eq!((later.protocol, later.src_port, later.dst_port), (17, 0, 0));
}

/// A sampled IPv4 or IPv6 record carries ICMP's type and code in its "or equivalent"
/// source and destination ports (as sflowtool reads them); the agent keys ICMP as it
/// does a raw header's: source port 0, destination port type << 8 | code.
#[test]
fn icmp_in_sampled_records_is_keyed_by_type_and_code() {
    use flowparser_sflow::flow_records::{FlowRecord as SflowRecord, SampledIpv4, SampledIpv6};
    let v4 = SflowRecord::SampledIpv4(SampledIpv4 {
        length: 84,
        protocol: 1,
        src_ip: "192.0.2.1".parse().unwrap(),
        dst_ip: "198.51.100.2".parse().unwrap(),
        src_port: 8,
        dst_port: 0,
        tcp_flags: 0,
        tos: 0,
    });
    let p = super::decode::packet_of(&[v4]).expect("an IPv4 packet");
    assert_eq!(
        (p.protocol, p.src_port, p.dst_port, p.bytes),
        (1, 0, 8 << 8, 84)
    );
    let v6 = SflowRecord::SampledIpv6(SampledIpv6 {
        length: 104,
        protocol: 58,
        src_ip: "2001:db8::1".parse().unwrap(),
        dst_ip: "2001:db8::2".parse().unwrap(),
        src_port: 1,
        dst_port: 4,
        tcp_flags: 0,
        priority: 0,
    });
    let p = super::decode::packet_of(&[v6]).expect("an IPv6 packet");
    assert_eq!((p.protocol, p.src_port, p.dst_port), (58, 0, 1 << 8 | 4));
    let udp = SflowRecord::SampledIpv4(SampledIpv4 {
        length: 60,
        protocol: 17,
        src_ip: "192.0.2.1".parse().unwrap(),
        dst_ip: "198.51.100.2".parse().unwrap(),
        src_port: 53000,
        dst_port: 53,
        tcp_flags: 0,
        tos: 0,
    });
    let p = super::decode::packet_of(&[udp]).expect("an IPv4 packet");
    assert_eq!((p.src_port, p.dst_port), (53000, 53));
}

/// A raw IPv6 header (header protocol 12) whose extension chain the snap length cut:
/// hop-by-hop options, then a routing header of which only 4 bytes were sampled. The
/// packet is still read (addresses, the IP length), with no ports, and nothing reads
/// past the sampled bytes.
#[test]
fn an_ipv6_extension_chain_cut_by_the_snap_length_is_read_without_ports() {
    use flowparser_sflow::flow_records::{FlowRecord as SflowRecord, RawPacketHeader};
    for cut in [0usize, 1, 2, 4, 7] {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(8 + 24 + 8u16).to_be_bytes());
        p.extend_from_slice(&[0, 64]); // hop-by-hop first
        for a in ["2001:db8::1", "2001:db8::2"] {
            p.extend_from_slice(&a.parse::<std::net::Ipv6Addr>().unwrap().octets());
        }
        p.extend_from_slice(&[43, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop, next: routing
        p.extend_from_slice(&[17, 2, 4, 0, 0, 0, 0, 0][..cut]); // routing, cut
        let rec = SflowRecord::RawPacketHeader(RawPacketHeader {
            header_protocol: 12,
            frame_length: 84,
            stripped: 4,
            header_length: p.len() as u32,
            header: p,
        });
        let got = super::decode::packet_of(&[rec]).expect("an IPv6 packet");
        assert_eq!((got.src_port, got.dst_port), (0, 0), "cut at {cut}");
        assert_eq!(got.bytes, 80, "cut at {cut}");
    }
}
