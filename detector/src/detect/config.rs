//! Detection's settings, and the network's top senders that one of its rules compares
//! peers with (merged over the engine's shards).

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::evidence::Thresholds;
use crate::flow::Cidr;

/// Detection settings.
#[derive(Clone, Debug)]
pub struct DetectConfig {
    /// Internal networks; everything else is external.
    pub internal: Vec<Cidr>,
    /// Hosts or networks that never alarm.
    pub allow_hosts: Vec<Cidr>,
    /// Ports (either side) whose flows are ignored.
    pub allow_ports: Vec<u16>,
    pub window: Duration,
    pub eval_interval: Duration,
    /// Consecutive evaluations over the threshold before an alarm is raised.
    pub consecutive: u32,
    /// Minimum time between two `updated` events of one alarm.
    pub update_interval: Duration,
    /// Time under the threshold before an alarm is cleared.
    pub clear_after: Duration,
    pub thresholds: Thresholds,
    /// Hosts tracked at most (beyond: records counted and dropped).
    pub max_hosts: usize,
    /// Peers held in full per host, at most [`super::profile::MAX_PEERS`] (beyond:
    /// counted in a sketch).
    pub max_peers: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        let c = |s: &str| s.parse().expect("static CIDR");
        Self {
            internal: vec![
                c("10.0.0.0/8"),
                c("172.16.0.0/12"),
                c("192.168.0.0/16"),
                c("100.64.0.0/10"),
                c("fc00::/7"),
            ],
            allow_hosts: Vec::new(),
            allow_ports: Vec::new(),
            window: Duration::from_secs(300),
            eval_interval: Duration::from_secs(10),
            consecutive: 2,
            update_interval: Duration::from_secs(60),
            clear_after: Duration::from_secs(120),
            thresholds: Thresholds::default(),
            max_hosts: 100_000,
            max_peers: 4096,
        }
    }
}

impl DetectConfig {
    /// Whether `ip` is in an internal network.
    pub fn is_internal(&self, ip: IpAddr) -> bool {
        self.internal.iter().any(|c| c.contains(ip))
    }

    pub(super) fn usable(ip: IpAddr) -> bool {
        !(ip.is_multicast() || ip.is_unspecified() || ip.is_loopback() || is_broadcast(ip))
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast() || v4.octets()[3] == 255)
}

/// The network's top 10 external senders over the window, merged over the shards of
/// an engine split by internal host (each shard sees a sender's bytes into its own
/// hosts), and the senders idle for the whole window, which every shard forgets.
#[derive(Clone, Debug, Default)]
pub struct TopSenders {
    pub top10: HashSet<IpAddr>,
    pub idle: HashSet<IpAddr>,
}

impl TopSenders {
    /// Sums each sender's bytes over the shards' snapshots (its last time is the latest
    /// of them): exactly what one engine fed every record would hold.
    pub fn from_shards(
        shards: impl IntoIterator<Item = Vec<(IpAddr, u64, SystemTime)>>,
        now: SystemTime,
        window: Duration,
    ) -> Self {
        let mut merged: std::collections::HashMap<IpAddr, (u64, SystemTime)> =
            std::collections::HashMap::new();
        for snapshot in shards {
            for (ip, bytes, last) in snapshot {
                let e = merged.entry(ip).or_insert((0, last));
                e.0 += bytes;
                e.1 = e.1.max(last);
            }
        }
        let mut idle = HashSet::new();
        let mut by_bytes: Vec<(IpAddr, u64)> = Vec::with_capacity(merged.len());
        for (ip, (bytes, last)) in merged {
            if now.duration_since(last).unwrap_or_default() < window {
                by_bytes.push((ip, bytes));
            } else {
                idle.insert(ip);
            }
        }
        // Ties at the tenth place go to the lower address, so the set never depends on
        // a hash map's order (two engines fed the same records agree).
        if by_bytes.len() > 10 {
            by_bytes.select_nth_unstable_by_key(9, |&(ip, b)| (std::cmp::Reverse(b), ip));
            by_bytes.truncate(10);
        }
        Self {
            top10: by_bytes.into_iter().map(|(ip, _)| ip).collect(),
            idle,
        }
    }
}
