//! Scale-out over NATS JetStream: edge agents publish their flow records, sharded by
//! internal host, and detector nodes (`detector central`) consume the shards, one node
//! per shard at a time.
//!
//! - `wire`: the records' encoding on the `flows.<shard>` subjects (versioned).

pub mod wire;

use std::net::IpAddr;

/// The shard of an internal host: FNV-1a of its address (as IPv6; IPv4 mapped) modulo
/// `shards`. Stable across processes, machines and versions: edges and nodes must agree.
pub fn shard_of(host: IpAddr, shards: u32) -> u32 {
    let v6 = match host {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut h: u32 = 0x811c_9dc5;
    for b in v6.octets() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Fixed values: a change would split a host's records between two shards across
        // a rolling upgrade.
        // (The values of FNV-1a over the mapped address, worked out independently.)
        let at = |ip: &str, n| shard_of(ip.parse().unwrap(), n);
        assert_eq!(at("10.0.0.1", 16), 14);
        assert_eq!(at("10.0.0.2", 16), 11);
        assert_eq!(at("2001:db8::1", 16), 4);
        assert_eq!(at("10.0.0.1", 1000), 782);
        let mut counts = [0u32; 8];
        for i in 0..8_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            counts[shard_of(ip, 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
