//! What switches send that the pmacct peer (`sflow_peer.rs`) does not: hand-built sFlow
//! v5 datagrams (`tests::sflow`, per sflow.org/sflow_version_5.txt) with expanded flow
//! samples (format 3) beside compact ones, sampled IPv4 (record 3) and IPv6 (record 4)
//! records instead of raw headers, an IPv6 agent and sub-agent ids other than 0, and raw
//! headers of 802.1Q and QinQ frames, an MPLS label stack, IPv6 with hop-by-hop, routing
//! and fragment (first fragment) headers, later IPv4 and IPv6 fragments (no ports), ICMP
//! and ICMPv6, and IPv4/IPv6 headers without a link header (header protocols 11 and 12),
//! at sampling rates 1, 10 and 256.
//!
//! - Built against tshark: the datagrams, as UDP to port 6343 in a pcap, are decoded by
//!   tshark without a malformed packet or an expert warning, and sample by sample tshark
//!   reads what was built: sample type (compact or expanded), sampling rate, input
//!   ifIndex, agent address, sub-agent id, and the inner packet's protocol, addresses,
//!   ports (ICMP: `type << 8 | code` in the destination port), VLANs and IP length (raw
//!   headers: `ip.len` or `ipv6.plen` + 40, which is also the frame length less the
//!   stripped FCS and the link header; sampled records: their length field).
//! - Agent against tshark: the same datagrams sent to `detector run --sflow-listen`; key
//!   by key (agent/sub-agent, sampling interval, protocol, addresses, ports) the agent's
//!   flows (`--flows-json`) hold tshark's packets (`raw_packets`) and IP bytes
//!   (`raw_bytes`), those scaled by the interval (`packets`, `bytes`), the VLANs tshark
//!   reads in the raw headers and the samples' input ifIndex; its statistics line
//!   counts, per agent and sub-agent, the datagrams and flow samples (expanded ones among
//!   them) tshark decodes, each a packet, with no errors, no non-IP sample and no loss.
//!
//! Skips with a message when tshark is not installed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tests::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Ext, ethernet, icmp, ipv4, ipv6, tcp, udp,
};
use tests::netns::{Guarded, free_udp_port, sh, wait_for_text};
use tests::sflow::{
    HEADER_ETHERNET, HEADER_IPV4, HEADER_IPV6, SampleHead, SampledIp, Tagged, datagram,
    expanded_flow_sample, flow_sample, mpls, raw_header, sampled_ip, source_stats, stat,
    write_sflow_pcap,
};

/// (protocol, src, src port, dst, dst port), ICMP's destination port `type << 8 | code`.
type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// One flow sample as built, or as tshark decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sample {
    agent: IpAddr,
    sub_agent: u32,
    expanded: bool,
    rate: u32,
    /// Raw header (true) or sampled IPv4/IPv6 record.
    raw: bool,
    tuple: Tuple,
    /// IP length.
    bytes: u64,
    /// Outer and inner VLAN ids of a raw header (0: none).
    vlans: (u16, u16),
    /// Input ifIndex (compact samples pack it with its format, expanded ones do not).
    input: u32,
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
fn build() -> (Vec<Vec<u8>>, Vec<Sample>) {
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

/// The first (outermost) occurrence of a key in a tshark JSON tree (with
/// `--no-duplicate-keys` a repeated key holds an array).
fn first<'a>(tree: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let v = tree.get(name)?;
    Some(v.as_array().and_then(|a| a.first()).unwrap_or(v))
}

/// Every occurrence of a key.
fn all<'a>(tree: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    match tree.get(name) {
        Some(serde_json::Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
        None => vec![],
    }
}

/// A field as a number or address; panics with the tree when absent.
fn field<T: std::str::FromStr>(tree: &serde_json::Value, name: &str) -> T {
    first(tree, name)
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("tshark: no {name} in {tree:#}"))
}

/// tshark's decode of the datagrams: every flow sample, and (datagrams, flow samples,
/// expanded flow samples) per agent/sub-agent.
struct Decoded {
    samples: Vec<Sample>,
    per_source: BTreeMap<String, (u64, u64, u64)>,
}

/// The inner packet of a raw header record as tshark dissects it: the tuple, the IP
/// length, the VLANs, and the link header's length (Ethernet, tags, labels).
fn dissected(record: &serde_json::Value) -> (Tuple, u64, (u16, u16), u64) {
    let tree = &record["sflow_245.header_tree"];
    let (src, dst, proto, len): (IpAddr, IpAddr, u8, u64) = if let Some(ip) = first(tree, "ip") {
        (
            field(ip, "ip.src"),
            field(ip, "ip.dst"),
            field(ip, "ip.proto"),
            field(ip, "ip.len"),
        )
    } else if let Some(ip) = first(tree, "ipv6") {
        let plen: u64 = field(ip, "ipv6.plen");
        (
            field(ip, "ipv6.src"),
            field(ip, "ipv6.dst"),
            field(ip, "ipv6.nxt"),
            plen + 40,
        )
    } else {
        panic!("tshark: no IP packet in {record:#}");
    };
    let tuple = if let Some(t) = first(tree, "tcp") {
        (
            6,
            src,
            field(t, "tcp.srcport"),
            dst,
            field(t, "tcp.dstport"),
        )
    } else if let Some(t) = first(tree, "udp") {
        (
            17,
            src,
            field(t, "udp.srcport"),
            dst,
            field(t, "udp.dstport"),
        )
    } else if let Some(t) = first(tree, "icmp") {
        let (ty, code): (u16, u16) = (field(t, "icmp.type"), field(t, "icmp.code"));
        (1, src, 0, dst, ty << 8 | code)
    } else if let Some(t) = first(tree, "icmpv6") {
        let (ty, code): (u16, u16) = (field(t, "icmpv6.type"), field(t, "icmpv6.code"));
        (58, src, 0, dst, ty << 8 | code)
    } else {
        // A later fragment: no transport header; its protocol is the fragment header's.
        let proto = first(tree, "ipv6")
            .and_then(|ip| first(ip, "ipv6.fraghdr"))
            .map_or(proto, |f| field(f, "ipv6.fraghdr.nxt"));
        (proto, src, 0, dst, 0)
    };
    let ad = first(tree, "ieee8021ad");
    let q: Vec<u16> = all(tree, "vlan")
        .iter()
        .map(|v| field(v, "vlan.id"))
        .collect();
    let vlans = match (ad, q.as_slice()) {
        (Some(ad), [inner, ..]) => (field(ad, "ieee8021ad.id"), *inner),
        (Some(ad), []) => (field(ad, "ieee8021ad.id"), 0),
        (None, [outer, inner, ..]) => (*outer, *inner),
        (None, [outer]) => (*outer, 0),
        (None, []) => (0, 0),
    };
    let link = if tree.get("eth").is_some() {
        14 + 4 * (u64::from(ad.is_some()) + q.len() as u64 + all(tree, "mpls").len() as u64)
    } else {
        0
    };
    (tuple, len, vlans, link)
}

/// `tshark -T json` of the pcap of the datagrams, reassembly off (as the agent reads a
/// first fragment); asserts it found nothing malformed and no expert information.
fn tshark(pcap: &Path) -> Decoded {
    let out = sh(
        "tshark",
        &[
            "-r",
            pcap.to_str().unwrap(),
            "-o",
            "ip.defragment:FALSE",
            "-o",
            "ipv6.defragment:FALSE",
            "-d",
            "udp.port==6343,sflow",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for bad in ["_ws.malformed", "_ws.expert", "_ws.short"] {
        assert!(!text.contains(bad), "tshark reports {bad}:\n{text}");
    }
    let frames: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut d = Decoded {
        samples: Vec::new(),
        per_source: BTreeMap::new(),
    };
    for (i, frame) in frames.iter().enumerate() {
        let sflow = &frame["_source"]["layers"]["sflow"];
        assert!(
            sflow.is_object(),
            "frame {}: no sflow layer: {frame:#}",
            i + 1
        );
        let agent: IpAddr = match field::<u32>(sflow, "sflow_245.agenttype") {
            1 => field(sflow, "sflow_245.agent"),
            2 => field(sflow, "sflow_245.agent.v6"),
            t => panic!("frame {}: agent address type {t}", i + 1),
        };
        let sub_agent: u32 = field(sflow, "sflow_245.sub_agent_id");
        let numsamples: usize = field(sflow, "sflow_245.numsamples");
        let before = d.samples.len();
        let counts = d
            .per_source
            .entry(format!("{agent}/{sub_agent}"))
            .or_default();
        counts.0 += 1;
        let samples = sflow
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("low sample"))
            .flat_map(|(_, v)| match v {
                serde_json::Value::Array(a) => a.iter().collect::<Vec<_>>(),
                v => vec![v],
            });
        for s in samples {
            let kind: u32 = field(s, "sflow_245.sampletype");
            let expanded = match kind {
                1 => false,
                3 => true,
                k => panic!("frame {}: sample type {k}: {s:#}", i + 1),
            };
            counts.1 += 1;
            counts.2 += u64::from(expanded);
            let rate: u32 = field(s, "sflow.flow_sample.sampling_rate");
            let input: u32 = if expanded {
                assert_eq!(
                    field::<u32>(s, "sflow.flow_sample.input_interface_format"),
                    0
                );
                field(s, "sflow.flow_sample.input_interface_value")
            } else {
                field(s, "sflow.flow_sample.input_interface")
            };
            let sample = if let Some(r) = first(s, "Raw packet header") {
                let (tuple, bytes, vlans, link) = dissected(r);
                // The IP length is the frame's, less what was stripped and the link header.
                let frame: u64 = field(r, "sflow_245.header.frame_length");
                let stripped: u64 = field(r, "sflow_245.header.payload_stripped");
                assert_eq!(frame - stripped - link, bytes, "frame {}: {r:#}", i + 1);
                Sample {
                    agent,
                    sub_agent,
                    expanded,
                    rate,
                    raw: true,
                    tuple,
                    bytes,
                    vlans,
                    input,
                }
            } else {
                let (r, src, dst): (_, IpAddr, IpAddr) = if let Some(r) = first(s, "IPv4 data") {
                    (
                        r,
                        field(r, "sflow_245.ipv4_src"),
                        field(r, "sflow_245.ipv4_dst"),
                    )
                } else if let Some(r) = first(s, "IPv6 data") {
                    (
                        r,
                        field(r, "sflow_245.ipv6_src"),
                        field(r, "sflow_245.ipv6_dst"),
                    )
                } else {
                    panic!("frame {}: no raw header or sampled IP record: {s:#}", i + 1);
                };
                Sample {
                    agent,
                    sub_agent,
                    expanded,
                    rate,
                    raw: false,
                    tuple: (
                        field(r, "sflow.ip_protocol"),
                        src,
                        field(r, "sflow_245.ip.source_port"),
                        dst,
                        field(r, "sflow.ip.destination_port"),
                    ),
                    bytes: field(r, "sflow_245.ip.length"),
                    vlans: (0, 0),
                    input,
                }
            };
            d.samples.push(sample);
        }
        assert_eq!(
            d.samples.len() - before,
            numsamples,
            "frame {}: samples",
            i + 1
        );
    }
    d
}

/// (agent/sub-agent, sampling interval, tuple).
type Key = (String, u32, Tuple);

/// Per key: raw packets, raw bytes, scaled packets, scaled bytes, (VLAN, inner VLAN,
/// input ifIndex).
type Flows = BTreeMap<Key, (u64, u64, u64, u64, (u16, u16, u32))>;

/// tshark's samples as the agent should aggregate them.
fn expected(samples: &[Sample]) -> Flows {
    let mut m = Flows::new();
    for s in samples {
        let r = u64::from(s.rate);
        let e = m
            .entry((format!("{}/{}", s.agent, s.sub_agent), s.rate, s.tuple))
            .or_insert((0, 0, 0, 0, (s.vlans.0, s.vlans.1, s.input)));
        assert_eq!(
            e.4,
            (s.vlans.0, s.vlans.1, s.input),
            "one key, one VLAN pair and input: {s:?}"
        );
        e.0 += 1;
        e.1 += s.bytes;
        e.2 += r;
        e.3 += s.bytes * r;
    }
    m
}

/// The agent's flows (`--flows-json`), summed per key.
fn agent_flows(json: &str) -> Flows {
    let mut m = Flows::new();
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let num = |f: &str| v[f].as_u64().unwrap_or_else(|| panic!("{f}: {line}"));
        let addr = |f: &str| -> IpAddr {
            v[f].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{f}: {line}"))
        };
        let key = (
            v["source"].as_str().unwrap().to_string(),
            num("sampling") as u32,
            (
                num("protocol") as u8,
                addr("src_addr"),
                num("src_port") as u16,
                addr("dst_addr"),
                num("dst_port") as u16,
            ),
        );
        let vlans = (
            num("vlan") as u16,
            num("vlan_inner") as u16,
            num("ifindex") as u32,
        );
        let e = m.entry(key).or_insert((0, 0, 0, 0, vlans));
        assert_eq!(e.4, vlans, "{line}");
        e.0 += num("raw_packets");
        e.1 += num("raw_bytes");
        e.2 += num("packets");
        e.3 += num("bytes");
    }
    m
}

/// The agent on `127.0.0.1:<free port>` is sent the datagrams and stopped: its flows
/// file and its log.
fn run_agent(datagrams: &[Vec<u8>], dir: &Path) -> (String, String) {
    let port = free_udp_port();
    let (json, log) = (dir.join("flows.json"), dir.join("agent.log"));
    let child = Command::new(tests::detector_bin())
        .args(["run", "--sflow-listen", &format!("127.0.0.1:{port}")])
        .arg("--flows-json")
        .arg(&json)
        .args(["--stats-interval", "0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "receiving sFlow", Duration::from_secs(20));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in datagrams {
        sock.send_to(d, ("127.0.0.1", port)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "agent: {st}\n{log}");
    (std::fs::read_to_string(&json).unwrap_or_default(), log)
}

#[test]
fn switch_sflow_decodes_as_tshark_decodes_it() {
    let started = Instant::now();
    if Command::new("tshark").arg("-v").output().is_err() {
        eprintln!("skipped: tshark is not installed (Debian package tshark)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("detector-sflow-records-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (datagrams, mut built) = build();
    let pcap = dir.join("sflow.pcap");
    write_sflow_pcap(&pcap, &datagrams);

    // The datagrams are sFlow as tshark reads it, with what was built in them.
    let decoded = tshark(&pcap);
    let mut samples = decoded.samples.clone();
    samples.sort_by_key(|s| format!("{s:?}"));
    built.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        samples, built,
        "tshark's samples (left) against the ones built"
    );
    let rates: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.rate).collect();
    assert_eq!(rates.into_iter().collect::<Vec<_>>(), [1, 10, 256]);

    // The agent's flows, key by key, are tshark's samples.
    let (json, log) = run_agent(&datagrams, &dir);
    let want = expected(&decoded.samples);
    let got = agent_flows(&json);
    let keys: std::collections::BTreeSet<&Key> = want.keys().chain(got.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (t, a) = (want.get(k), got.get(k));
            (t != a).then(|| {
                format!("{k:?}:\n  tshark (raw packets, raw bytes, packets, bytes, (vlan, inner vlan, input)) {t:?}\n  agent  {a:?}")
            })
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} flow keys differ:\n{}\nagent log:\n{log}",
        diffs.len(),
        want.len(),
        diffs.join("\n")
    );

    // Its statistics count every datagram and flow sample, expanded ones too, per agent
    // and sub-agent, each sample a packet, nothing lost or in error.
    assert_eq!(decoded.per_source.len(), 3);
    for (source, &(datagrams, flow_samples, expanded)) in &decoded.per_source {
        assert!(
            expanded > 0 && expanded < flow_samples,
            "{source}: both kinds"
        );
        let st = source_stats(&log, source);
        for (key, want) in [
            ("datagrams", datagrams),
            ("flow samples", flow_samples),
            ("counter samples", 0),
            ("other samples", 0),
            ("packets", flow_samples),
            ("not-ip", 0),
            ("lost datagrams", 0),
            ("sequence resets", 0),
            ("lost samples", 0),
            ("agent drops", 0),
        ] {
            assert_eq!(stat(st, key), want, "{source} {key}: {st}");
        }
        assert!(st.contains("errors {}"), "{st}");
    }
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("sflow listener"))
        .unwrap();
    assert!(line.contains("header errors {}"), "{line}");
    eprintln!(
        "{} datagrams, {} flow samples ({} expanded), {} flow keys: tshark and the agent agree ({:?})",
        datagrams.len(),
        samples.len(),
        samples.iter().filter(|s| s.expanded).count(),
        want.len(),
        started.elapsed()
    );
    std::fs::remove_dir_all(&dir).ok();
}
