//! Building export captures by hand: NetFlow v9 and IPFIX messages, raw IPv4/UDP
//! packets around them, and pcap files, for tests that check our decoding against
//! tshark's dissection of the same bytes.

use std::net::Ipv4Addr;
use std::path::Path;

/// Appends `x` big-endian.
pub fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}

pub fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

pub fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// Appends the sets (id, body) of a message, each padded to 4 bytes.
fn put_sets(d: &mut Vec<u8>, sets: &[(u16, Vec<u8>)]) {
    for (id, body) in sets {
        let mut b = body.clone();
        while b.len() % 4 != 0 {
            b.push(0);
        }
        put16(d, *id);
        put16(d, (b.len() + 4) as u16);
        d.extend_from_slice(&b);
    }
}

/// A NetFlow v9 datagram of source id `source`: header (count `count`), then the sets.
pub fn v9(source: u32, seq: u32, count: u16, sets: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut d = Vec::new();
    put16(&mut d, 9);
    put16(&mut d, count);
    put32(&mut d, 600_000); // sysUptime
    put32(&mut d, 1_800_000_000); // unix secs
    put32(&mut d, seq);
    put32(&mut d, source);
    put_sets(&mut d, sets);
    d
}

/// An IPFIX message of observation domain `domain`: header (its length filled in), then
/// the sets.
pub fn ipfix(domain: u32, seq: u32, sets: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut d = Vec::new();
    put16(&mut d, 10);
    put16(&mut d, 0);
    put32(&mut d, 1_800_000_000);
    put32(&mut d, seq);
    put32(&mut d, domain);
    put_sets(&mut d, sets);
    let len = d.len() as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// Raw IPv4 packets carrying `payloads` in UDP from `from` to `to`.
pub fn udp_packets(
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    payloads: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    payloads
        .iter()
        .map(|p| {
            let mut u = crate::frames::udp(from.1, to.1, p.len());
            u.extend_from_slice(p);
            crate::frames::ipv4(from.0, to.0, 17, 0, 0, &[], &u)
        })
        .collect()
}

/// Link types of [`write_pcap`].
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;

/// Writes `packets` as a pcap file of link type `linktype`, a second apart.
pub fn write_pcap(path: &Path, linktype: u32, packets: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&linktype.to_le_bytes());
    for (i, p) in packets.iter().enumerate() {
        out.extend_from_slice(&(1_800_000_000u32 + i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    std::fs::write(path, out).expect("writing the pcap");
}

/// A template record: its id, field count, then (type, length) of each field.
pub fn template(id: u16, fields: &[(u16, u16)]) -> Vec<u8> {
    let mut t = Vec::new();
    put16(&mut t, id);
    put16(&mut t, fields.len() as u16);
    for &(ty, len) in fields {
        put16(&mut t, ty);
        put16(&mut t, len);
    }
    t
}

/// `detector replay --netflow CAPTURE --flows-json JSON`: the records it exported.
pub fn replay_netflow(capture: &Path, json: &Path) -> Vec<serde_json::Value> {
    let _ = std::fs::remove_file(json);
    let out = std::process::Command::new(crate::detector_bin())
        .args(["replay", "--netflow"])
        .arg(capture)
        .arg("--flows-json")
        .arg(json)
        .output()
        .expect("run detector replay");
    assert!(
        out.status.success(),
        "replay --netflow {}: {}",
        capture.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(json)
        .expect("the flows file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}
