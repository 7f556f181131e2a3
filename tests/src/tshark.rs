//! Independent truth from a capture: tshark's dissection of every packet, summed per flow
//! the way a NetFlow meter keys it (protocol, addresses, ports; ICMP type and code in the
//! destination port; non-first fragments with ports 0), in IP bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use crate::netns::sh;

/// (protocol, src, src port, dst, dst port).
pub type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// One dissected IP packet.
#[derive(Clone, Debug)]
pub struct Packet {
    pub tuple: Tuple,
    /// IP total length (IPv6: payload length + 40).
    pub bytes: u64,
}

const FIELDS: &[&str] = &[
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "ip.proto",
    "ipv6.nxt",
    "tcp.srcport",
    "tcp.dstport",
    "udp.srcport",
    "udp.dstport",
    "icmp.type",
    "icmp.code",
    "icmpv6.type",
    "icmpv6.code",
    "ip.len",
    "ipv6.plen",
    "ip.frag_offset",
    "ipv6.fraghdr.offset",
];

/// Every IP packet of a capture, outer headers only, reassembly off (as a meter sees
/// packets one at a time).
pub fn packets(pcap: &Path) -> Vec<Packet> {
    let mut args = vec![
        "-r",
        pcap.to_str().unwrap(),
        "-o",
        "ip.defragment:FALSE",
        "-o",
        "ipv6.defragment:FALSE",
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-E",
        "occurrence=f",
    ];
    for f in FIELDS {
        args.push("-e");
        args.push(f);
    }
    let out = sh("tshark", &args);
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split(';').collect();
        if f.len() < FIELDS.len() {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        let (src, dst, bytes, v4) = if !f[0].is_empty() {
            (f[0], f[1], n(14), true)
        } else if !f[2].is_empty() {
            (f[2], f[3], n(15).map(|p| p + 40), false)
        } else {
            continue;
        };
        let (Ok(src), Ok(dst), Some(bytes)) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>(), bytes)
        else {
            continue;
        };
        let fragment = if v4 {
            n(16).unwrap_or(0) != 0
        } else {
            n(17).unwrap_or(0) != 0
        };
        // The protocol: from the transport tshark found, else the IP header's. ICMP
        // comes first: an ICMP error quotes the TCP/UDP header of the packet it is about.
        let (proto, sp, dp) = if fragment {
            (n(4).or(n(5)).unwrap_or(0) as u8, 0, 0)
        } else if let Some(t) = n(10) {
            (1, 0, (t << 8 | n(11).unwrap_or(0)) as u16)
        } else if let Some(t) = n(12) {
            (58, 0, (t << 8 | n(13).unwrap_or(0)) as u16)
        } else if let (Some(s), Some(d)) = (n(6), n(7)) {
            (6, s as u16, d as u16)
        } else if let (Some(s), Some(d)) = (n(8), n(9)) {
            (17, s as u16, d as u16)
        } else {
            (n(4).or(n(5)).unwrap_or(0) as u8, 0, 0)
        };
        v.push(Packet {
            tuple: (proto, src, sp, dst, dp),
            bytes,
        });
    }
    v
}

/// Packets and bytes per flow.
pub fn totals(packets: &[Packet]) -> BTreeMap<Tuple, (u64, u64)> {
    let mut m = BTreeMap::new();
    for p in packets {
        let e = m.entry(p.tuple).or_insert((0, 0));
        e.0 += 1;
        e.1 += p.bytes;
    }
    m
}
