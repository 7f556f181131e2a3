//! What switches send that the pmacct peer does not, built by hand (for
//! `sflow_records`, which holds it against tshark, and `sflow_fuzz`, which mutates it):
//! sFlow v5 datagrams of three sources (an IPv4 agent with sub-agents 0 and 7, an IPv6
//! agent with sub-agent 3) with expanded and compact flow samples; raw headers of
//! Ethernet, 802.1Q, QinQ and MPLS frames, IPv4 and IPv6 (hop-by-hop, routing, fragment
//! and destination options headers, later fragments), TCP, UDP, ICMP and ICMPv6, and bare
//! IP headers (header protocols 11 and 12); sampled IPv4 and IPv6 records; sampling rates
//! 1, 10 and 256.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Ext, ethernet, icmp, ipv4, ipv6, tcp, udp,
};
use crate::sflow::{
    HEADER_ETHERNET, HEADER_IPV4, HEADER_IPV6, SampleHead, SampledIp, Tagged, datagram,
    expanded_flow_sample, flow_sample, mpls, raw_header, sampled_ip,
};

/// (protocol, src, src port, dst, dst port), ICMP's destination port `type << 8 | code`.
pub type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// One flow sample as built, or as tshark decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub agent: IpAddr,
    pub sub_agent: u32,
    pub expanded: bool,
    pub rate: u32,
    /// Raw header (true) or sampled IPv4/IPv6 record.
    pub raw: bool,
    pub tuple: Tuple,
    /// IP length.
    pub bytes: u64,
    /// Outer and inner VLAN ids of a raw header (0: none).
    pub vlans: (u16, u16),
    /// Input ifIndex (compact samples pack it with its format, expanded ones do not).
    pub input: u32,
}

/// The inner packet of a sample, as built.
enum Inner {
    /// A raw header record of this protocol, of this frame (or IP packet), snapped at
    /// 128 bytes.
    Raw(u32, Vec<u8>),
    Sampled(SampledIp),
}

struct Spec {
    expanded: bool,
    rate: u32,
    /// ifIndex: the data source and the input interface.
    ifindex: u32,
    inner: Inner,
    tuple: Tuple,
    bytes: u64,
    vlans: (u16, u16),
}

const SNAP: usize = 128;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// An Ethernet frame (with `tags`) of an IPv4 packet.
fn eth4(tags: &[(u16, u16)], ip: &[u8]) -> Vec<u8> {
    [ethernet(tags, ETH_P_IP), ip.to_vec()].concat()
}

fn eth6(tags: &[(u16, u16)], ip: &[u8]) -> Vec<u8> {
    [ethernet(tags, ETH_P_IPV6), ip.to_vec()].concat()
}

/// A TCP segment header with `n` bytes of payload.
fn tcp_n(sp: u16, dp: u16, n: usize) -> Vec<u8> {
    [tcp(sp, dp, 0x18), vec![0xab; n]].concat()
}

fn udp_n(sp: u16, dp: u16, n: usize) -> Vec<u8> {
    [udp(sp, dp, n), vec![0xcd; n]].concat()
}

/// A raw-header sample: (expanded, rate, ifIndex), the header's protocol and packet,
/// and what should be read from it.
fn raw(
    (expanded, rate, ifindex): (bool, u32, u32),
    protocol: u32,
    frame: Vec<u8>,
    tuple: Tuple,
    bytes: usize,
    vlans: (u16, u16),
) -> Spec {
    Spec {
        expanded,
        rate,
        ifindex,
        inner: Inner::Raw(protocol, frame),
        tuple,
        bytes: bytes as u64,
        vlans,
    }
}

/// A sampled-IP sample: (expanded, rate, ifIndex) and the record.
fn sampled((expanded, rate, ifindex): (bool, u32, u32), s: SampledIp) -> Spec {
    Spec {
        expanded,
        rate,
        ifindex,
        tuple: (
            s.protocol as u8,
            s.src,
            s.src_port as u16,
            s.dst,
            s.dst_port as u16,
        ),
        bytes: u64::from(s.length),
        vlans: (0, 0),
        inner: Inner::Sampled(s),
    }
}

/// The agents (address, sub-agent) and their datagrams' samples: ((expanded, rate,
/// ifIndex), inner packet, then what tshark and the agent should read: tuple, IP length,
/// VLANs).
#[rustfmt::skip]
fn specs() -> Vec<(IpAddr, u32, Vec<Vec<Spec>>)> {
    let a4 = IpAddr::V4(v4("192.0.2.1"));
    let a6 = IpAddr::V6(v6("2001:db8::a"));
    let ip4 = |s: &str| IpAddr::V4(v4(s));
    let ip6 = |s: &str| IpAddr::V6(v6(s));
    let (e, c) = (true, false);

    // Agent 192.0.2.1, sub-agent 0: raw headers of IPv4 packets, expanded and compact.
    let (s, d) = (v4("10.0.0.1"), v4("10.0.0.2"));
    let tcp_big = ipv4(s, d, 6, 0, 0x4000, &[], &tcp_n(40001, 443, 1400));
    let tcp_small = ipv4(s, d, 6, 0, 0x4000, &[], &tcp_n(40001, 443, 200));
    let t_tcp = (6, ip4("10.0.0.1"), 40001, ip4("10.0.0.2"), 443);
    let dot1q = ipv4(v4("10.0.1.1"), v4("10.0.1.2"), 17, 0, 0, &[], &udp_n(5353, 53, 100));
    let qinq = ipv4(v4("10.0.2.1"), v4("10.0.2.2"), 6, 0, 0, &[], &tcp_n(1234, 80, 500));
    let labelled = ipv4(v4("10.0.3.1"), v4("10.0.3.2"), 17, 0, 0, &[], &udp_n(4000, 4001, 300));
    let ping = ipv4(v4("10.0.4.1"), v4("10.0.4.2"), 1, 0, 0, &[], &[icmp(8, 0), vec![0; 56]].concat());
    let bare4 = ipv4(v4("10.0.5.1"), v4("10.0.5.2"), 17, 0, 0, &[], &udp_n(123, 123, 48));
    // A later fragment (offset 185 x 8 bytes) of a UDP datagram: no ports.
    let later4 = ipv4(v4("10.0.6.1"), v4("10.0.6.2"), 17, 0, 185, &[], &[0xee; 300]);
    let source0 = vec![vec![
        raw((e, 1, 1), HEADER_ETHERNET, eth4(&[], &tcp_big), t_tcp, tcp_big.len(), (0, 0)),
        raw((e, 1, 1), HEADER_ETHERNET, eth4(&[], &tcp_small), t_tcp, tcp_small.len(), (0, 0)),
        raw((e, 10, 2), HEADER_ETHERNET, eth4(&[(ETH_P_8021Q, 100)], &dot1q),
            (17, ip4("10.0.1.1"), 5353, ip4("10.0.1.2"), 53), dot1q.len(), (100, 0)),
        raw((c, 256, 3), HEADER_ETHERNET, eth4(&[(ETH_P_8021AD, 200), (ETH_P_8021Q, 300)], &qinq),
            (6, ip4("10.0.2.1"), 1234, ip4("10.0.2.2"), 80), qinq.len(), (200, 300)),
        raw((c, 10, 4), HEADER_ETHERNET, [ethernet(&[], 0x8847), mpls(&[1000, 2000]), labelled.clone()].concat(),
            (17, ip4("10.0.3.1"), 4000, ip4("10.0.3.2"), 4001), labelled.len(), (0, 0)),
        raw((e, 256, 5), HEADER_ETHERNET, eth4(&[], &ping),
            (1, ip4("10.0.4.1"), 0, ip4("10.0.4.2"), 8 << 8), ping.len(), (0, 0)),
        raw((e, 10, 6), HEADER_IPV4, bare4.clone(),
            (17, ip4("10.0.5.1"), 123, ip4("10.0.5.2"), 123), bare4.len(), (0, 0)),
        raw((c, 1, 1), HEADER_ETHERNET, eth4(&[], &later4),
            (17, ip4("10.0.6.1"), 0, ip4("10.0.6.2"), 0), later4.len(), (0, 0)),
    ]];

    // Agent 192.0.2.1, sub-agent 7: sampled IPv4 and IPv6 records.
    let rec = |length, protocol, src, dst, src_port, dst_port| SampledIp {
        length,
        protocol,
        src,
        dst,
        src_port,
        dst_port,
        tcp_flags: if protocol == 6 { 0x10 } else { 0 },
        tos: 0,
    };
    let source7 = vec![vec![
        sampled((e, 1, 11), rec(1500, 6, ip4("10.1.0.1"), ip4("10.1.0.2"), 50000, 22)),
        sampled((e, 1, 11), rec(40, 6, ip4("10.1.0.1"), ip4("10.1.0.2"), 50000, 22)),
        sampled((c, 10, 12), rec(576, 17, ip4("10.1.1.1"), ip4("10.1.1.2"), 5000, 5001)),
        sampled((e, 256, 13), rec(1280, 17, ip6("2001:db8:1::1"), ip6("2001:db8:1::2"), 6000, 6001)),
        sampled((c, 10, 14), rec(60, 6, ip6("2001:db8:2::1"), ip6("2001:db8:2::2"), 443, 50001)),
    ]];

    // Agent 2001:db8::a, sub-agent 3: raw headers of IPv6 packets, two datagrams.
    let (s, d) = (v6("2001:db8:3::1"), v6("2001:db8:3::2"));
    // Hop-by-hop, routing (segment routing) and fragment (first fragment) headers.
    let chain = [hop_by_hop(), srh(d), first_fragment()];
    let ext_big = ipv6_chain(s, d, &chain, 6, &tcp_n(33000, 443, 1200));
    let ext_small = ipv6_chain(s, d, &chain, 6, &tcp_n(33000, 443, 800));
    let t_ext = (6, ip6("2001:db8:3::1"), 33000, ip6("2001:db8:3::2"), 443);
    let hbh = ipv6(v6("2001:db8:4::1"), v6("2001:db8:4::2"), 0, &[Ext::HopByHop], 17, &udp_n(546, 547, 100));
    let (s, d) = (v6("2001:db8:5::1"), v6("2001:db8:5::2"));
    let frag = ipv6_chain(s, d, &[first_fragment()], 17, &udp_n(7000, 7001, 1400));
    // The datagram's later fragment (offset 185): no ports.
    let later6 = ipv6(s, d, 0, &[Ext::Fragment { offset: 185, more: false }], 17, &[0xee; 300]);
    let ping6 = ipv6(v6("2001:db8:6::1"), v6("2001:db8:6::2"), 0, &[], 58, &[icmp(128, 0), vec![0; 56]].concat());
    let bare6 = ipv6(v6("2001:db8:7::1"), v6("2001:db8:7::2"), 0, &[Ext::DestOpts], 17, &udp_n(8000, 8001, 200));
    let source3 = vec![
        vec![
            raw((e, 10, 21), HEADER_ETHERNET, eth6(&[], &ext_big), t_ext, ext_big.len(), (0, 0)),
            raw((e, 1, 22), HEADER_ETHERNET, eth6(&[], &hbh),
                (17, ip6("2001:db8:4::1"), 546, ip6("2001:db8:4::2"), 547), hbh.len(), (0, 0)),
            raw((c, 256, 23), HEADER_ETHERNET, eth6(&[(ETH_P_8021Q, 42)], &frag),
                (17, ip6("2001:db8:5::1"), 7000, ip6("2001:db8:5::2"), 7001), frag.len(), (42, 0)),
            raw((e, 1, 24), HEADER_ETHERNET, eth6(&[], &ping6),
                (58, ip6("2001:db8:6::1"), 0, ip6("2001:db8:6::2"), 128 << 8), ping6.len(), (0, 0)),
        ],
        vec![
            raw((e, 10, 21), HEADER_ETHERNET, eth6(&[], &ext_small), t_ext, ext_small.len(), (0, 0)),
            raw((c, 256, 23), HEADER_ETHERNET, eth6(&[(ETH_P_8021Q, 42)], &later6),
                (17, ip6("2001:db8:5::1"), 0, ip6("2001:db8:5::2"), 0), later6.len(), (42, 0)),
            raw((e, 10, 25), HEADER_IPV6, bare6.clone(),
                (17, ip6("2001:db8:7::1"), 8000, ip6("2001:db8:7::2"), 8001), bare6.len(), (0, 0)),
        ],
    ];
    vec![(a4, 0, source0), (a4, 7, source7), (a6, 3, source3)]
}

/// The datagrams, in sending order, and the samples they carry, as built.
pub fn build() -> (Vec<Vec<u8>>, Vec<Sample>) {
    let (mut datagrams, mut built) = (Vec::new(), Vec::new());
    for (agent, sub_agent, dgrams) in specs() {
        // Each data source's sample sequence counts up from 1, with no gap.
        let mut next: BTreeMap<u32, u32> = BTreeMap::new();
        for (i, specs) in dgrams.iter().enumerate() {
            let mut samples: Vec<Tagged> = Vec::new();
            for s in specs {
                let seq = next.entry(s.ifindex).or_insert(1);
                let head = SampleHead {
                    sequence: *seq,
                    source_type: 0,
                    source_index: s.ifindex,
                    rate: s.rate,
                    pool: *seq * s.rate,
                    drops: 0,
                    input: s.ifindex,
                    output: 100,
                };
                *seq += 1;
                let record = match &s.inner {
                    Inner::Raw(protocol, frame) => raw_header(*protocol, frame, SNAP),
                    Inner::Sampled(r) => sampled_ip(r),
                };
                samples.push(if s.expanded {
                    expanded_flow_sample(&head, &[record])
                } else {
                    flow_sample(&head, &[record])
                });
                built.push(Sample {
                    agent,
                    sub_agent,
                    expanded: s.expanded,
                    rate: s.rate,
                    raw: matches!(s.inner, Inner::Raw(..)),
                    tuple: s.tuple,
                    bytes: s.bytes,
                    vlans: s.vlans,
                    input: s.ifindex,
                });
            }
            datagrams.push(datagram(
                agent,
                sub_agent,
                i as u32 + 1,
                60_000 + i as u32,
                &samples,
            ));
        }
    }
    (datagrams, built)
}

/// An IPv6 packet with extension headers `exts` ((number, bytes), each with its next
/// header field filled in here) in front of `payload` of protocol `proto`.
fn ipv6_chain(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    exts: &[(u8, Vec<u8>)],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = exts.get(i + 1).map_or(proto, |e| e.0);
        chain.extend(b);
    }
    chain.extend_from_slice(payload);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(chain.len() as u16).to_be_bytes());
    h.push(exts.first().map_or(proto, |e| e.0));
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    [h, chain].concat()
}

/// Hop-by-hop options (number 0): a PadN option, 8 bytes.
fn hop_by_hop() -> (u8, Vec<u8>) {
    (0, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// A segment routing header (routing type 4, RFC 8754; number 43) with one segment,
/// `segment`, none left.
fn srh(segment: Ipv6Addr) -> (u8, Vec<u8>) {
    let mut h = vec![0, 2, 4, 0, 0, 0, 0, 0];
    h.extend_from_slice(&segment.octets());
    (43, h)
}

/// A fragment header (number 44) of the first fragment (offset 0, more fragments).
fn first_fragment() -> (u8, Vec<u8>) {
    (44, vec![0, 0, 0, 1, 0x12, 0x34, 0x56, 0x78])
}
