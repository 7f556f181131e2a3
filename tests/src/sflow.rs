//! Building sFlow v5 datagrams by hand (sflow.org/sflow_version_5.txt, XDR: every field
//! a big-endian 32-bit word or a multiple of 4 bytes): the datagram header with an IPv4
//! or IPv6 agent, compact (format 1) and expanded (format 3) flow samples, and the raw
//! packet header (1), sampled IPv4 (3) and sampled IPv6 (4) flow records. The frames
//! inside raw headers come from [`crate::frames`]; MPLS label stacks from [`mpls`].
//! Counter samples, compact (2) and expanded (4), with generic interface counters (1).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::export::{LINKTYPE_RAW, put32, udp_packets, write_pcap};

/// A sample or record: its data format (enterprise 0, so the format number) and body.
pub type Tagged = (u32, Vec<u8>);

/// Raw packet header protocols (`header_protocol`).
pub const HEADER_ETHERNET: u32 = 1;
pub const HEADER_IPV4: u32 = 11;
pub const HEADER_IPV6: u32 = 12;

/// sFlow's UDP port, the one tshark dissects as sFlow.
pub const SFLOW_PORT: u16 = 6343;

fn put_addr(v: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            put32(v, 1);
            v.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            put32(v, 2);
            v.extend_from_slice(&a.octets());
        }
    }
}

/// Appends `(format, body)` items as XDR `data_format` + opaque length + body.
fn put_tagged(v: &mut Vec<u8>, items: &[Tagged]) {
    for (format, body) in items {
        assert_eq!(body.len() % 4, 0, "XDR bodies are padded to 4 bytes");
        put32(v, *format);
        put32(v, body.len() as u32);
        v.extend_from_slice(body);
    }
}

/// A datagram (version 5) of agent `agent` / `sub_agent`, sequence `seq`, with `samples`.
pub fn datagram(
    agent: IpAddr,
    sub_agent: u32,
    seq: u32,
    uptime_ms: u32,
    samples: &[Tagged],
) -> Vec<u8> {
    let mut d = Vec::new();
    put32(&mut d, 5);
    put_addr(&mut d, agent);
    put32(&mut d, sub_agent);
    put32(&mut d, seq);
    put32(&mut d, uptime_ms);
    put32(&mut d, samples.len() as u32);
    put_tagged(&mut d, samples);
    d
}

/// What a flow sample says besides its records.
#[derive(Clone, Copy, Debug)]
pub struct SampleHead {
    pub sequence: u32,
    /// Data source: type (0 ifIndex) and index.
    pub source_type: u32,
    pub source_index: u32,
    pub rate: u32,
    pub pool: u32,
    pub drops: u32,
    /// Input and output ifIndex (format 0: a single interface).
    pub input: u32,
    pub output: u32,
}

/// A compact flow sample (format 1): source id, input and output packed in 32 bits.
pub fn flow_sample(h: &SampleHead, records: &[Tagged]) -> Tagged {
    assert!(h.source_type < 256 && h.source_index < 1 << 24);
    let mut v = Vec::new();
    put32(&mut v, h.sequence);
    put32(&mut v, h.source_type << 24 | h.source_index);
    put32(&mut v, h.rate);
    put32(&mut v, h.pool);
    put32(&mut v, h.drops);
    put32(&mut v, h.input);
    put32(&mut v, h.output);
    put32(&mut v, records.len() as u32);
    put_tagged(&mut v, records);
    (1, v)
}

/// An expanded flow sample (format 3): source id type and index, and the interfaces'
/// formats and values, each in a word of its own.
pub fn expanded_flow_sample(h: &SampleHead, records: &[Tagged]) -> Tagged {
    let mut v = Vec::new();
    put32(&mut v, h.sequence);
    put32(&mut v, h.source_type);
    put32(&mut v, h.source_index);
    put32(&mut v, h.rate);
    put32(&mut v, h.pool);
    put32(&mut v, h.drops);
    put32(&mut v, 0);
    put32(&mut v, h.input);
    put32(&mut v, 0);
    put32(&mut v, h.output);
    put32(&mut v, records.len() as u32);
    put_tagged(&mut v, records);
    (3, v)
}

/// A raw packet header record (format 1): the first `snap` bytes of `frame` (as a switch
/// samples them), the frame's length on the wire with its 4-byte FCS, which is stripped.
pub fn raw_header(protocol: u32, frame: &[u8], snap: usize) -> Tagged {
    let header = &frame[..frame.len().min(snap)];
    let mut v = Vec::new();
    put32(&mut v, protocol);
    put32(&mut v, frame.len() as u32 + 4);
    put32(&mut v, 4);
    put32(&mut v, header.len() as u32);
    v.extend_from_slice(header);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    (1, v)
}

/// The fields of a sampled IPv4 or IPv6 record.
#[derive(Clone, Copy, Debug)]
pub struct SampledIp {
    /// The IP packet's length.
    pub length: u32,
    pub protocol: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u32,
    pub dst_port: u32,
    pub tcp_flags: u32,
    /// ToS (IPv4) or priority (IPv6).
    pub tos: u32,
}

/// A sampled IPv4 (format 3) or IPv6 (format 4) record, by the addresses' family.
pub fn sampled_ip(s: &SampledIp) -> Tagged {
    let mut v = Vec::new();
    put32(&mut v, s.length);
    put32(&mut v, s.protocol);
    let format = match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            v.extend_from_slice(&a.octets());
            v.extend_from_slice(&b.octets());
            3
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            v.extend_from_slice(&a.octets());
            v.extend_from_slice(&b.octets());
            4
        }
        _ => panic!("mixed address families"),
    };
    put32(&mut v, s.src_port);
    put32(&mut v, s.dst_port);
    put32(&mut v, s.tcp_flags);
    put32(&mut v, s.tos);
    (format, v)
}

/// Generic interface counters (counter record 0:1) as a switch sends them.
#[derive(Clone, Copy, Debug, Default)]
pub struct IfCounters {
    pub if_index: u32,
    pub speed: u64,
    pub in_octets: u64,
    pub in_ucast: u32,
    pub in_multicast: u32,
    pub in_broadcast: u32,
    pub in_discards: u32,
    pub in_errors: u32,
    pub out_octets: u64,
    pub out_ucast: u32,
    pub out_multicast: u32,
    pub out_broadcast: u32,
    pub out_discards: u32,
    pub out_errors: u32,
}

/// A generic interface counters record (format 1): ifType 6 (ethernetCsmacd), full
/// duplex, up, no unknown protocols, not promiscuous.
pub fn if_counters(c: &IfCounters) -> Tagged {
    let mut v = Vec::new();
    put32(&mut v, c.if_index);
    put32(&mut v, 6);
    v.extend_from_slice(&c.speed.to_be_bytes());
    put32(&mut v, 1);
    put32(&mut v, 3);
    v.extend_from_slice(&c.in_octets.to_be_bytes());
    for x in [
        c.in_ucast,
        c.in_multicast,
        c.in_broadcast,
        c.in_discards,
        c.in_errors,
        0,
    ] {
        put32(&mut v, x);
    }
    v.extend_from_slice(&c.out_octets.to_be_bytes());
    for x in [
        c.out_ucast,
        c.out_multicast,
        c.out_broadcast,
        c.out_discards,
        c.out_errors,
        0,
    ] {
        put32(&mut v, x);
    }
    (1, v)
}

/// A counter sample of data source ifIndex `if_index`: compact (format 2, source type
/// and index packed in a word) or expanded (format 4).
pub fn counter_sample(expanded: bool, sequence: u32, if_index: u32, records: &[Tagged]) -> Tagged {
    let mut v = Vec::new();
    put32(&mut v, sequence);
    if expanded {
        put32(&mut v, 0);
        put32(&mut v, if_index);
    } else {
        assert!(if_index < 1 << 24);
        put32(&mut v, if_index);
    }
    put32(&mut v, records.len() as u32);
    put_tagged(&mut v, records);
    (if expanded { 4 } else { 2 }, v)
}

/// An MPLS label stack (after an Ethernet header of type 0x8847): the labels, the last
/// one with the bottom-of-stack bit, TTL 64.
pub fn mpls(labels: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        let bottom = u32::from(i + 1 == labels.len());
        put32(&mut v, l << 12 | bottom << 8 | 64);
    }
    v
}

/// The datagrams as a pcap of raw IPv4/UDP packets from 127.0.0.1 to port 6343.
pub fn write_sflow_pcap(path: &Path, datagrams: &[Vec<u8>]) {
    let lo = Ipv4Addr::LOCALHOST;
    let packets = udp_packets((lo, 50_000), (lo, SFLOW_PORT), datagrams);
    write_pcap(path, LINKTYPE_RAW, &packets);
}

/// The agent's last statistics line with sFlow sources in it.
pub fn last_stats(log: &str) -> &str {
    log.lines()
        .rev()
        .find(|l| l.contains("sflow agent"))
        .unwrap_or_else(|| panic!("no sflow statistics in the log:\n{log}"))
}

/// The statistics of agent/sub-agent `source` in the agent's last statistics line.
pub fn source_stats<'a>(log: &'a str, source: &str) -> &'a str {
    let line = last_stats(log);
    line.split("; ")
        .find(|p| p.starts_with(&format!("sflow agent {source}:")))
        .unwrap_or_else(|| panic!("no statistics of {source}: {line}"))
}

/// The number after the first `key ` in `stats` (a statistics line or a part of one).
pub fn stat(stats: &str, key: &str) -> u64 {
    let at = stats
        .find(&format!("{key} "))
        .unwrap_or_else(|| panic!("{key}: {stats}"));
    stats[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{key}: {stats}"))
}
