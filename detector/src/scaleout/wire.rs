//! The records' encoding on the `records.<shard>` subjects: one message is one batch from
//! one edge agent. Versioned, little-endian, fixed-size records (no allocation to decode
//! a record, no schema to agree on beyond the version byte).
//!
//! ```text
//! batch   := magic "DTF" | version u8 (2; 1 is read too) | agent_len u8
//!            | agent bytes (UTF-8, <= 32) | count u32 | record * count
//! record  := src [16] | dst [16]          IPv6, or IPv4-mapped IPv6
//!            | src_port u16 | dst_port u16 | protocol u8 | tcp_flags u8 | tos u8
//!            | flags u8                    bit 0 duplicate (marked at the edge),
//!                                          bit 1 egress, bit 2 measured by an exporter
//!            | packets u64 | bytes u64     as measured (sampling not applied)
//!            | first_ms u64 | last_ms u64  UNIX milliseconds
//!            | sampling u32 | ifindex u32 | vlan u16 | vlan_inner u16
//!            | exporter [16] | exporter_port u16 | domain u32   (zero for the local meter)
//!            | hints u8 | live u8          version 1: live is a reserved 0
//!            [version 2 only:]
//!            | opening [4]                 the meter's sizes of the first payloads
//!            | told_packets u64 | told_bytes u64   (live 3 only; zero otherwise)
//! live    := 0 whole (an exported record, a new flow for detection)
//!            | 1 start | 2 growth        (live flows: detection only, never exported)
//!            | 3 continued               (exported; its start was told: packets and
//!                                         bytes count less told_packets/told_bytes)
//! ```
//! A version 1 record is [`RECORD_LEN_V1`] bytes, a version 2 record [`RECORD_LEN`].
//! Version 1 batches (edges of an earlier release) decode as exported records
//! ([`Live::Whole`]) without opening sizes. A reader refuses another magic or version
//! (an earlier node refuses version 2: upgrade the nodes before the edges), a count that
//! the message does not hold, an unknown live value and an agent name that is not UTF-8:
//! the batch is counted as malformed and acknowledged (it can never decode), never
//! half-applied.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::flow::{Direction, FlowRecord, Live, Origin};

pub const MAGIC: &[u8; 3] = b"DTF";
/// The version edges write.
pub const VERSION: u8 = 2;
/// A version 1 record's length.
pub const RECORD_LEN_V1: usize = 16 + 16 + 2 + 2 + 4 + 8 * 4 + 4 + 4 + 2 + 2 + 16 + 2 + 4 + 2;
/// A version 2 record's length: version 1's, the opening sizes and what growth reports
/// told of a continued flow.
pub const RECORD_LEN: usize = RECORD_LEN_V1 + 4 + 8 + 8;
pub use crate::flow::{AGENT_MAX, AgentName};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a flow batch (magic {0:?})")]
    Magic([u8; 3]),
    #[error(
        "flow batch version {0}, this node reads versions 1 and {VERSION} (upgrade the nodes before the edges)"
    )]
    Version(u8),
    #[error("flow record with an unknown live value {0}")]
    Live(u8),
    #[error("flow batch cut short: {0}")]
    Short(&'static str),
    #[error("agent name is not UTF-8")]
    Agent,
}

fn put_addr(b: &mut BytesMut, a: IpAddr) {
    let v6 = match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    b.put_slice(&v6.octets());
}

fn get_addr(b: &mut &[u8]) -> IpAddr {
    let mut o = [0u8; 16];
    b.copy_to_slice(&mut o);
    Ipv6Addr::from(o).to_canonical()
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes one batch of `agent`'s records.
pub fn encode(agent: &AgentName, records: &[&FlowRecord]) -> Bytes {
    let name = agent.as_str().as_bytes();
    let mut b = BytesMut::with_capacity(9 + name.len() + records.len() * RECORD_LEN);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(name.len() as u8);
    b.put_slice(name);
    b.put_u32_le(records.len() as u32);
    for r in records {
        put_addr(&mut b, r.src_addr);
        put_addr(&mut b, r.dst_addr);
        b.put_u16_le(r.src_port);
        b.put_u16_le(r.dst_port);
        b.put_u8(r.protocol);
        b.put_u8(r.tcp_flags);
        b.put_u8(r.tos);
        let exporter = match r.origin {
            Origin::Exporter { addr, domain } => Some((addr, domain)),
            Origin::Edge {
                addr: Some(addr),
                domain,
                ..
            } => Some((addr, domain)),
            Origin::Local | Origin::Edge { addr: None, .. } => None,
        };
        let flags = u8::from(r.duplicate)
            | u8::from(r.direction == Direction::Egress) << 1
            | u8::from(exporter.is_some()) << 2;
        b.put_u8(flags);
        b.put_u64_le(r.packets);
        b.put_u64_le(r.bytes);
        b.put_u64_le(millis(r.first));
        b.put_u64_le(millis(r.last));
        b.put_u32_le(r.sampling);
        b.put_u32_le(r.ifindex);
        b.put_u16_le(r.vlan);
        b.put_u16_le(r.vlan_inner);
        match exporter {
            Some((addr, domain)) => {
                put_addr(&mut b, addr.ip());
                b.put_u16_le(addr.port());
                b.put_u32_le(domain);
            }
            None => {
                b.put_bytes(0, 16 + 2 + 4);
            }
        }
        b.put_u8(r.hints);
        let (live, told_packets, told_bytes) = match r.live {
            Live::Whole => (0, 0, 0),
            Live::Start => (1, 0, 0),
            Live::Grow => (2, 0, 0),
            Live::Continued {
                told_packets,
                told_bytes,
            } => (3, told_packets, told_bytes),
        };
        b.put_u8(live);
        b.put_slice(&r.opening);
        b.put_u64_le(told_packets);
        b.put_u64_le(told_bytes);
    }
    b.freeze()
}

/// Decodes a batch: the agent's name and its records, each with an [`Origin::Edge`]
/// naming the agent (and the exporter that measured it, if any).
pub fn decode(msg: &[u8]) -> Result<(AgentName, Vec<FlowRecord>), WireError> {
    let mut b = msg;
    if b.len() < 5 {
        return Err(WireError::Short("header"));
    }
    let magic = [b[0], b[1], b[2]];
    if &magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = b[3];
    let record_len = match version {
        1 => RECORD_LEN_V1,
        VERSION => RECORD_LEN,
        v => return Err(WireError::Version(v)),
    };
    let name_len = usize::from(b[4]);
    b.advance(5);
    if b.len() < name_len + 4 {
        return Err(WireError::Short("agent name"));
    }
    let name = std::str::from_utf8(&b[..name_len]).map_err(|_| WireError::Agent)?;
    let agent = AgentName::new(name);
    b.advance(name_len);
    let count = b.get_u32_le() as usize;
    if b.len() != count.saturating_mul(record_len) {
        return Err(WireError::Short("records"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let src = get_addr(&mut b);
        let dst = get_addr(&mut b);
        let src_port = b.get_u16_le();
        let dst_port = b.get_u16_le();
        let protocol = b.get_u8();
        let tcp_flags = b.get_u8();
        let tos = b.get_u8();
        let flags = b.get_u8();
        let packets = b.get_u64_le();
        let bytes = b.get_u64_le();
        let first = UNIX_EPOCH + Duration::from_millis(b.get_u64_le());
        let last = UNIX_EPOCH + Duration::from_millis(b.get_u64_le());
        let sampling = b.get_u32_le();
        let ifindex = b.get_u32_le();
        let vlan = b.get_u16_le();
        let vlan_inner = b.get_u16_le();
        let exp_addr = get_addr(&mut b);
        let exp_port = b.get_u16_le();
        let domain = b.get_u32_le();
        let hints = b.get_u8();
        let live = b.get_u8();
        let mut opening = [0u8; 4];
        let (mut told_packets, mut told_bytes) = (0, 0);
        if version >= 2 {
            b.copy_to_slice(&mut opening);
            told_packets = b.get_u64_le();
            told_bytes = b.get_u64_le();
        }
        // Version 1 carried a reserved 0 there: every record as exported.
        let live = match live {
            0 => Live::Whole,
            1 => Live::Start,
            2 => Live::Grow,
            3 => Live::Continued {
                told_packets,
                told_bytes,
            },
            v => return Err(WireError::Live(v)),
        };
        out.push(FlowRecord {
            packets,
            bytes,
            first,
            last,
            direction: if flags & 2 != 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            tcp_flags,
            tos,
            vlan,
            vlan_inner,
            ifindex,
            sampling: sampling.max(1),
            origin: Origin::Edge {
                agent,
                addr: (flags & 4 != 0).then_some(SocketAddr::new(exp_addr, exp_port)),
                domain,
            },
            duplicate: flags & 1 != 0,
            hints,
            opening,
            live,
            ..FlowRecord::new(src, src_port, dst, dst_port, protocol)
        });
    }
    Ok((agent, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<FlowRecord> {
        let mut a = FlowRecord::new(
            "10.0.0.5".parse().unwrap(),
            51413,
            "198.51.100.7".parse().unwrap(),
            6881,
            6,
        );
        a.packets = 12;
        a.bytes = 9_000;
        a.first = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        a.last = UNIX_EPOCH + Duration::from_millis(1_700_000_004_456);
        a.tcp_flags = 0x1b;
        a.tos = 0x28;
        a.direction = Direction::Egress;
        a.vlan = 10;
        a.ifindex = 3;
        a.hints = 1;
        let mut b = FlowRecord::new(
            "2001:db8::1".parse().unwrap(),
            443,
            "2001:db8:1::2".parse().unwrap(),
            50_000,
            17,
        );
        b.packets = 1;
        b.bytes = 1_200;
        b.sampling = 100;
        b.duplicate = true;
        b.origin = Origin::Exporter {
            addr: "192.0.2.1:2055".parse().unwrap(),
            domain: 7,
        };
        // Live flows: a start, a growth report, and the export of a flow whose start
        // and growth were told (with the meter's opening sizes).
        let mut start = a.clone();
        start.live = Live::Start;
        start.packets = 0;
        start.bytes = 0;
        let mut grow = a.clone();
        grow.live = Live::Grow;
        grow.opening = [3, 9, 0, 17];
        let mut cont = a.clone();
        cont.live = Live::Continued {
            told_packets: 7,
            told_bytes: 5_000,
        };
        cont.opening = [3, 9, 250, 17];
        vec![a, b, start, grow, cont]
    }

    #[test]
    fn a_batch_decodes_to_the_records_it_encoded_from_the_named_agent() {
        let recs = sample();
        let agent = AgentName::new("router-1");
        let msg = encode(&agent, &recs.iter().collect::<Vec<_>>());
        assert_eq!(msg.len(), 5 + 8 + 4 + recs.len() * RECORD_LEN);
        assert_eq!(msg[3], 2, "edges write version 2");
        let (who, got) = decode(&msg).unwrap();
        assert_eq!(who.as_str(), "router-1");
        assert_eq!(got.len(), recs.len());
        for (g, r) in got.iter().zip(&recs) {
            let expected_origin = match r.origin {
                Origin::Exporter { addr, domain } => Origin::Edge {
                    agent,
                    addr: Some(addr),
                    domain,
                },
                _ => Origin::Edge {
                    agent,
                    addr: None,
                    domain: 0,
                },
            };
            assert_eq!(
                *g,
                FlowRecord {
                    origin: expected_origin,
                    ..r.clone()
                }
            );
        }
        assert_eq!(got[0].origin.label(), "router-1");
        assert_eq!(got[1].origin.label(), "router-1:192.0.2.1/7");
        // What detection reads of live flows came through (the comparison above holds
        // it; spelled out for the reader).
        assert_eq!(got[2].live, Live::Start);
        assert!(got[2].live.detection_only() && got[3].live.detection_only());
        assert_eq!(
            got[4].live,
            Live::Continued {
                told_packets: 7,
                told_bytes: 5_000
            }
        );
        assert_eq!(got[4].opening, [3, 9, 250, 17]);
        assert_eq!(got[4].new_packets(), 12 - 7);
    }

    /// A version 1 batch (an edge of the earlier release), laid out field by field as
    /// that release's documentation gives it (not by this module's encoder).
    fn v1_batch(agent: &str, records: &[(&str, &str, u16, u16, u8, u64, u64)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(b"DTF");
        b.put_u8(1);
        b.put_u8(agent.len() as u8);
        b.put_slice(agent.as_bytes());
        b.put_u32_le(records.len() as u32);
        for &(src, dst, sp, dp, proto, packets, bytes) in records {
            for a in [src, dst] {
                let ip: IpAddr = a.parse().unwrap();
                put_addr(&mut b, ip);
            }
            b.put_u16_le(sp);
            b.put_u16_le(dp);
            b.put_u8(proto);
            b.put_u8(0x12); // tcp flags
            b.put_u8(0); // tos
            b.put_u8(0b010); // egress, not a duplicate, the local meter
            b.put_u64_le(packets);
            b.put_u64_le(bytes);
            b.put_u64_le(1_700_000_000_000);
            b.put_u64_le(1_700_000_003_000);
            b.put_u32_le(1); // sampling
            b.put_u32_le(4); // ifindex
            b.put_u16_le(0);
            b.put_u16_le(0);
            b.put_bytes(0, 16 + 2 + 4); // no exporter
            b.put_u8(0); // hints
            b.put_u8(0); // reserved
        }
        b.to_vec()
    }

    #[test]
    fn a_version_1_batch_still_decodes_as_exported_records() {
        let recs = [
            ("10.0.0.5", "198.51.100.7", 51413, 6881, 6, 12, 9_000),
            ("10.0.0.6", "2001:db8::9", 53, 40_000, 17, 1, 80),
        ];
        let msg = v1_batch("edge-old", &recs);
        assert_eq!(msg.len(), 5 + 8 + 4 + 2 * RECORD_LEN_V1);
        assert_eq!(RECORD_LEN_V1, 108, "version 1's record length is fixed");
        let (who, got) = decode(&msg).unwrap();
        assert_eq!(who.as_str(), "edge-old");
        assert_eq!(got.len(), 2);
        for (g, r) in got.iter().zip(&recs) {
            assert_eq!(g.src_addr, r.0.parse::<IpAddr>().unwrap());
            assert_eq!(g.dst_addr, r.1.parse::<IpAddr>().unwrap());
            assert_eq!((g.src_port, g.dst_port, g.protocol), (r.2, r.3, r.4));
            assert_eq!((g.packets, g.bytes), (r.5, r.6));
            assert_eq!(g.tcp_flags, 0x12);
            assert_eq!(g.direction, Direction::Egress);
            assert_eq!(g.ifindex, 4);
            assert_eq!(
                g.first,
                UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
            );
            // Exported records: a new flow each, counted whole, no opening sizes.
            assert_eq!(g.live, Live::Whole);
            assert_eq!(g.opening, [0; 4]);
            assert!(!g.duplicate);
            assert_eq!(g.origin.label(), "edge-old");
        }
        // A version 1 batch cut short, or read as version 2, is refused whole.
        assert_eq!(
            decode(&msg[..msg.len() - 1]),
            Err(WireError::Short("records"))
        );
        let mut as_v2 = msg.clone();
        as_v2[3] = 2;
        assert_eq!(decode(&as_v2), Err(WireError::Short("records")));
    }

    #[test]
    fn a_bad_batch_is_refused_whole() {
        let recs = sample();
        let msg = encode(&AgentName::new("a"), &recs.iter().collect::<Vec<_>>());
        assert_eq!(
            decode(&msg[..msg.len() - 1]),
            Err(WireError::Short("records"))
        );
        // An unknown live value (the last record's live byte) refuses the whole batch.
        let mut v = msg.to_vec();
        let live_at = v.len() - (4 + 8 + 8) - 1;
        assert_eq!(v[live_at], 3);
        v[live_at] = 4;
        assert_eq!(decode(&v), Err(WireError::Live(4)));
        // A version from a newer edge is refused, naming the version and the way out.
        let mut v = msg.to_vec();
        v[3] = 9;
        assert_eq!(decode(&v), Err(WireError::Version(9)));
        assert!(
            WireError::Version(9)
                .to_string()
                .contains("nodes before the edges")
        );
        v[0] = b'X';
        assert!(matches!(decode(&v), Err(WireError::Magic(_))));
        assert_eq!(decode(b"DT"), Err(WireError::Short("header")));
        // A count no message can hold does not allocate for it.
        let mut huge = msg[..6].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(WireError::Short("records")));
    }

    #[test]
    fn long_agent_names_are_cut_at_a_character_boundary() {
        let long = "a-very-long-router-name-in-dc-ösl-1";
        let n = AgentName::new(long);
        assert!(n.as_str().len() <= AGENT_MAX && n.as_str().len() >= AGENT_MAX - 1);
        assert!(long.starts_with(n.as_str()));
    }
}
