//! The records' encoding on the `records.<shard>` subjects: one message is one batch from
//! one edge agent. Versioned, little-endian, fixed-size records (no allocation to decode
//! a record, no schema to agree on beyond the version byte).
//!
//! ```text
//! batch   := magic "DTF" | version u8 (1) | agent_len u8 | agent bytes (UTF-8, <= 32)
//!            | count u32 | record * count
//! record  := src [16] | dst [16]          IPv6, or IPv4-mapped IPv6
//!            | src_port u16 | dst_port u16 | protocol u8 | tcp_flags u8 | tos u8
//!            | flags u8                    bit 0 duplicate (marked at the edge),
//!                                          bit 1 egress, bit 2 measured by an exporter
//!            | packets u64 | bytes u64     as measured (sampling not applied)
//!            | first_ms u64 | last_ms u64  UNIX milliseconds
//!            | sampling u32 | ifindex u32 | vlan u16 | vlan_inner u16
//!            | exporter [16] | exporter_port u16 | domain u32   (zero for the local meter)
//!            | hints u8 | reserved u8
//! ```
//! A record is [`RECORD_LEN`] bytes. A reader refuses another magic or version, a count
//! that the message does not hold, and an agent name that is not UTF-8: the batch is
//! counted as malformed and acknowledged (it can never decode), never half-applied.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::flow::{Direction, FlowRecord, Live, Origin};

pub const MAGIC: &[u8; 3] = b"DTF";
pub const VERSION: u8 = 1;
pub const RECORD_LEN: usize = 16 + 16 + 2 + 2 + 4 + 8 * 4 + 4 + 4 + 2 + 2 + 16 + 2 + 4 + 2;
pub use crate::flow::{AGENT_MAX, AgentName};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a flow batch (magic {0:?})")]
    Magic([u8; 3]),
    #[error("flow batch version {0}, this node reads version {VERSION}")]
    Version(u8),
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
        b.put_u8(0);
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
    if b[3] != VERSION {
        return Err(WireError::Version(b[3]));
    }
    let name_len = usize::from(b[4]);
    b.advance(5);
    if b.len() < name_len + 4 {
        return Err(WireError::Short("agent name"));
    }
    let name = std::str::from_utf8(&b[..name_len]).map_err(|_| WireError::Agent)?;
    let agent = AgentName::new(name);
    b.advance(name_len);
    let count = b.get_u32_le() as usize;
    if b.len() != count.saturating_mul(RECORD_LEN) {
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
        b.advance(1);
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
            live: Live::Whole,
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
        vec![a, b]
    }

    #[test]
    fn a_batch_decodes_to_the_records_it_encoded_from_the_named_agent() {
        let recs = sample();
        let agent = AgentName::new("router-1");
        let msg = encode(&agent, &recs.iter().collect::<Vec<_>>());
        assert_eq!(msg.len(), 5 + 8 + 4 + 2 * RECORD_LEN);
        let (who, got) = decode(&msg).unwrap();
        assert_eq!(who.as_str(), "router-1");
        assert_eq!(got.len(), 2);
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
    }

    #[test]
    fn a_bad_batch_is_refused_whole() {
        let recs = sample();
        let msg = encode(&AgentName::new("a"), &recs.iter().collect::<Vec<_>>());
        assert_eq!(
            decode(&msg[..msg.len() - 1]),
            Err(WireError::Short("records"))
        );
        let mut v = msg.to_vec();
        v[3] = 9;
        assert_eq!(decode(&v), Err(WireError::Version(9)));
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
