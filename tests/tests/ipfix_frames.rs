//! RFC 7133 dataLinkFrameSection (IE 315): routers that export sampled frames instead
//! of flow fields (Juniper inline monitoring, Cisco sampled-frame export). Each frame's
//! headers (Ethernet, 802.1Q and QinQ tags, MPLS labels, IPv4, IPv6, TCP, UDP, ICMP)
//! become a flow record of one packet of its IP length, scaled by the exporter's
//! sampling rate (samplingPacketInterval/Space options). The frames are built here; the
//! truth is tshark's dissection of the same frames in a capture of their own, and
//! `replay --netflow` of the IPFIX capture must give those flows times the rate.

use std::collections::BTreeMap;

use tests::export::{
    LINKTYPE_ETHERNET, LINKTYPE_RAW, ipfix, put16, put32, replay_netflow, udp_packets, write_pcap,
};
use tests::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ethernet, ipv4, ipv6, tcp, udp,
};

/// The sampled frames, whole.
fn frames() -> Vec<Vec<u8>> {
    let a4 = [10, 1, 0, 5].into();
    let b4 = [198, 51, 100, 7].into();
    let a6 = "2001:db8::5".parse().unwrap();
    let b6 = "2001:db8:1::7".parse().unwrap();
    let tcp4 = |sport, payload: usize| {
        let mut t = tcp(sport, 443, 0x12);
        t.extend(vec![0u8; payload]);
        ipv4(a4, b4, 6, 0x28, 0, &[], &t)
    };
    let udp4 = |sport, payload: usize| {
        let mut u = udp(sport, 6881, payload);
        u.extend(vec![0u8; payload]);
        ipv4(a4, b4, 17, 0, 0, &[], &u)
    };
    let mut mpls = ethernet(&[], 0x8847);
    mpls.extend_from_slice(&[0x00, 0x01, 0x20, 0x40]); // label 18, not bottom
    mpls.extend_from_slice(&[0x00, 0x02, 0x31, 0x40]); // label 35, bottom of stack
    mpls.extend(udp4(40_003, 200));
    let mut t6 = tcp(40_004, 443, 0x10);
    t6.extend(vec![0u8; 300]);
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend(vec![0u8; 56]);
    vec![
        [ethernet(&[], ETH_P_IP), tcp4(40_001, 1000)].concat(),
        [ethernet(&[(ETH_P_8021Q, 100)], ETH_P_IP), udp4(40_002, 500)].concat(),
        mpls,
        [ethernet(&[], ETH_P_IPV6), ipv6(a6, b6, 0, &[], 6, &t6)].concat(),
        [
            ethernet(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)], ETH_P_IP),
            ipv4(a4, b4, 1, 0, 0, &[], &icmp),
        ]
        .concat(),
        [ethernet(&[], ETH_P_IP), udp4(40_006, 18)].concat(),
    ]
}

/// IPFIX: 1-in-100 sampling options, then one record per frame holding its first 96
/// bytes (variable length) and the ingress interface.
fn messages(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    messages_of(frames, 96)
}

/// The same with sections of up to `section` bytes.
fn messages_of(frames: &[Vec<u8>], section: usize) -> Vec<Vec<u8>> {
    let mut t = Vec::new();
    put16(&mut t, 256);
    put16(&mut t, 2);
    for (ie, len) in [(10u16, 4u16), (315, 65_535)] {
        put16(&mut t, ie);
        put16(&mut t, len);
    }
    let mut ot = Vec::new();
    put16(&mut ot, 257);
    put16(&mut ot, 3); // fields
    put16(&mut ot, 1); // scope fields
    for (ie, len) in [(149u16, 4u16), (305, 4), (306, 4)] {
        put16(&mut ot, ie);
        put16(&mut ot, len);
    }
    let mut od = Vec::new();
    put32(&mut od, 7); // observation domain
    put32(&mut od, 1); // one packet selected
    put32(&mut od, 99); // then 99 skipped
    let mut data = Vec::new();
    for f in frames {
        put32(&mut data, 3);
        let section = &f[..f.len().min(section)];
        data.push(section.len() as u8);
        data.extend_from_slice(section);
    }
    vec![
        ipfix(7, 0, &[(2, t), (3, ot), (257, od)]),
        ipfix(7, 0, &[(256, data)]),
    ]
}

/// The flows `replay --netflow` reads from the IPFIX `export` (raw IPv4 packets), each
/// record sampled 1 in 100: per 5-tuple, packets and bytes as exported (scaled).
fn replayed(
    export: &[Vec<u8>],
    dir: &std::path::Path,
) -> BTreeMap<tests::tshark::Tuple, (u64, u64)> {
    let export_pcap = dir.join("ipfix.pcap");
    write_pcap(&export_pcap, LINKTYPE_RAW, export);
    let mut got = BTreeMap::new();
    for v in replay_netflow(&export_pcap, &dir.join("flows.json")) {
        let n = |k: &str| v[k].as_u64().unwrap();
        let ip = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        assert_eq!(n("sampling"), 100, "{v}");
        got.insert(
            (
                n("protocol") as u8,
                ip("src_addr"),
                n("src_port") as u16,
                ip("dst_addr"),
                n("dst_port") as u16,
            ),
            (n("packets"), n("bytes")),
        );
    }
    got
}

#[test]
fn sampled_frame_sections_become_flows_scaled_by_the_sampling_rate() {
    let dir = std::env::temp_dir().join(format!("detector-frames-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let frames = frames();

    // The truth: tshark's dissection of the frames themselves.
    let truth_pcap = dir.join("frames.pcap");
    write_pcap(&truth_pcap, LINKTYPE_ETHERNET, &frames);
    let truth = tests::tshark::totals(&tests::tshark::packets(&truth_pcap));
    assert_eq!(truth.len(), frames.len(), "one flow per frame: {truth:?}");
    let want: BTreeMap<_, _> = truth
        .into_iter()
        .map(|(k, (p, b))| (k, (p * 100, b * 100)))
        .collect();

    // The export: IPFIX in UDP to 4739, in raw IPv4 packets.
    let export = udp_packets(
        ([192, 0, 2, 1].into(), 40_000),
        ([192, 0, 2, 2].into(), 4739),
        &messages(&frames),
    );
    assert_eq!(replayed(&export, &dir), want);
    std::fs::remove_dir_all(&dir).ok();
}

/// A segment routing header (RFC 8754, routing type 4) listing `segments`, the last
/// one active, before protocol `next`.
fn srh(next: u8, segments: &[std::net::Ipv6Addr]) -> Vec<u8> {
    let n = segments.len() as u8;
    let mut h = vec![next, 2 * n, 4, n - 1, n - 1, 0, 0, 0];
    for s in segments {
        h.extend_from_slice(&s.octets());
    }
    h
}

/// SRv6 (H.Encaps, as in akvorado's ipfix-srv6 data): an outer IPv6 header with a
/// segment routing header carrying an IPv4 or an IPv6 packet. The record is the inner
/// packet's flow (addresses, protocol, ports), one packet of the outer IP length, times
/// the sampling rate; the truth is tshark's dissection of the frames (innermost
/// headers: the last occurrence of each field).
#[test]
fn srv6_encapsulated_frames_give_the_inner_packets_flow() {
    let dir = std::env::temp_dir().join(format!("detector-srv6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (o1, o2) = (
        "2001:db8:ff::1".parse().unwrap(),
        "2001:db8:ff::2".parse().unwrap(),
    );
    let segs = [
        "2001:db8:ff::2".parse().unwrap(),
        "2001:db8:ff::9".parse().unwrap(),
    ];
    let mut t = tcp(40_010, 443, 0x18);
    t.extend(vec![0u8; 200]);
    let inner4 = ipv4(
        [10, 1, 0, 9].into(),
        [198, 51, 100, 9].into(),
        6,
        0,
        0,
        &[],
        &t,
    );
    let mut u = udp(40_011, 6881, 100);
    u.extend(vec![0u8; 100]);
    let inner6 = ipv6(
        "2001:db8::9".parse().unwrap(),
        "2001:db8:1::9".parse().unwrap(),
        0,
        &[],
        17,
        &u,
    );
    let frames = vec![
        [
            ethernet(&[], ETH_P_IPV6),
            ipv6(o1, o2, 0, &[], 43, &[srh(4, &segs), inner4].concat()),
        ]
        .concat(),
        [
            ethernet(&[], ETH_P_IPV6),
            ipv6(o1, o2, 0, &[], 43, &[srh(41, &segs), inner6].concat()),
        ]
        .concat(),
    ];
    let truth_pcap = dir.join("frames.pcap");
    write_pcap(&truth_pcap, LINKTYPE_ETHERNET, &frames);
    let fields = [
        "ip.src",
        "ip.dst",
        "ipv6.src",
        "ipv6.dst",
        "tcp.srcport",
        "tcp.dstport",
        "udp.srcport",
        "udp.dstport",
        "ipv6.plen",
        "ipv6.routing.type",
    ];
    let mut args = vec![
        "-r",
        truth_pcap.to_str().unwrap(),
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ];
    for f in &fields {
        args.extend(["-e", f]);
    }
    let out = tests::netns::sh("tshark", &args);
    let mut want = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split(';').collect();
        let last = |i: usize| cols[i].split(',').next_back().unwrap_or("");
        let first = |i: usize| cols[i].split(',').next().unwrap_or("");
        assert_eq!(
            first(9),
            "4",
            "tshark sees a segment routing header: {line}"
        );
        let (src, dst) = if !cols[0].is_empty() {
            (last(0), last(1))
        } else {
            (last(2), last(3))
        };
        let (proto, sport, dport) = if !cols[4].is_empty() {
            (6u8, last(4), last(5))
        } else {
            (17, last(6), last(7))
        };
        let outer_len = first(8).parse::<u64>().unwrap() + 40;
        want.insert(
            (
                proto,
                src.parse::<std::net::IpAddr>().unwrap(),
                sport.parse::<u16>().unwrap(),
                dst.parse::<std::net::IpAddr>().unwrap(),
                dport.parse::<u16>().unwrap(),
            ),
            (100u64, outer_len * 100),
        );
    }
    assert_eq!(want.len(), 2, "{want:?}");
    let export = udp_packets(
        ([192, 0, 2, 1].into(), 40_000),
        ([192, 0, 2, 2].into(), 4739),
        &messages_of(&frames, 160),
    );
    assert_eq!(replayed(&export, &dir), want);
    std::fs::remove_dir_all(&dir).ok();
}
