//! Detection's settings, and the network's top senders that one of its rules compares
//! peers with (merged over the engine's shards).

use std::cmp::Reverse;
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::evidence::Thresholds;
use super::profile::PeerAddr;
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

/// One external sender in a shard's snapshot: its address, its bytes into the shard's
/// hosts and when it last sent, in 32 bytes (an `(IpAddr, u64, SystemTime)` is 48, and a
/// central node holds one per sender per shard at the peak of an evaluation). The time
/// is kept in nanoseconds since the epoch, so nothing is rounded (times before the
/// epoch are taken as the epoch, times after 2554 as 2554). The address round-trips
/// through [`PeerAddr`] since a sender is never multicast (`DetectConfig::usable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderEntry {
    addr: PeerAddr,
    bytes: u64,
    last_ns: u64,
}

const _: () = assert!(std::mem::size_of::<SenderEntry>() == 32);

impl SenderEntry {
    pub fn new(ip: IpAddr, bytes: u64, last: SystemTime) -> Self {
        let last_ns = last
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            addr: PeerAddr::new(ip),
            bytes,
            last_ns,
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn last(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.last_ns)
    }
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
    ///
    /// Each snapshot is sorted by address in place and the snapshots are merged in
    /// address order, so the sum allocates nothing beyond the snapshots themselves (a
    /// map summing them was two thirds of a central node's peak at 20,000 hosts).
    pub fn from_shards(
        shards: impl IntoIterator<Item = Vec<SenderEntry>>,
        now: SystemTime,
        window: Duration,
    ) -> Self {
        let runs: Vec<Vec<SenderEntry>> = shards
            .into_iter()
            .map(|mut s| {
                s.sort_unstable_by_key(SenderEntry::ip);
                s
            })
            .collect();
        let mut at = vec![0usize; runs.len()];
        let mut idle = HashSet::new();
        // The ten best so far, sorted; ties go to the lower address, so the set never
        // depends on the shards' order (two engines fed the same records agree).
        let mut best: Vec<(Reverse<u64>, IpAddr)> = Vec::with_capacity(11);
        loop {
            let next = runs
                .iter()
                .zip(&at)
                .filter_map(|(run, &i)| run.get(i).map(SenderEntry::ip))
                .min();
            let Some(ip) = next else { break };
            let key = PeerAddr::new(ip);
            let mut bytes = 0u64;
            let mut last_ns = 0u64;
            for (run, i) in runs.iter().zip(at.iter_mut()) {
                while let Some(e) = run.get(*i) {
                    if e.addr != key {
                        break;
                    }
                    bytes += e.bytes;
                    last_ns = last_ns.max(e.last_ns);
                    *i += 1;
                }
            }
            let last = SystemTime::UNIX_EPOCH + Duration::from_nanos(last_ns);
            if now.duration_since(last).unwrap_or_default() < window {
                let key = (Reverse(bytes), ip);
                if best.len() < 10 || best.last().is_some_and(|worst| key < *worst) {
                    let place = best.partition_point(|k| *k < key);
                    best.insert(place, key);
                    best.truncate(10);
                }
            } else {
                idle.insert(ip);
            }
        }
        Self {
            top10: best.into_iter().map(|(_, ip)| ip).collect(),
            idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The sum by hash map that `from_shards` replaced, kept as the reference.
    fn reference(
        shards: Vec<Vec<(IpAddr, u64, SystemTime)>>,
        now: SystemTime,
        window: Duration,
    ) -> TopSenders {
        let mut merged: HashMap<IpAddr, (u64, SystemTime)> = HashMap::new();
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
        if by_bytes.len() > 10 {
            by_bytes.select_nth_unstable_by_key(9, |&(ip, b)| (Reverse(b), ip));
            by_bytes.truncate(10);
        }
        TopSenders {
            top10: by_bytes.into_iter().map(|(ip, _)| ip).collect(),
            idle,
        }
    }

    /// A sender from a small pool of IPv4 and IPv6 addresses (so shards share senders),
    /// few distinct byte counts (ties at the tenth place) and times around the window's
    /// edge (idle and live senders, and times after `now`).
    fn entry() -> impl Strategy<Value = (IpAddr, u64, SystemTime)> {
        (0u32..40, any::<bool>(), 0u64..6, 0u64..12).prop_map(|(n, v6, b, t)| {
            let ip = if v6 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n as u16))
            } else {
                IpAddr::V4(Ipv4Addr::from(0xc633_6400 + n))
            };
            (
                ip,
                b * 1000,
                SystemTime::UNIX_EPOCH + Duration::from_secs(t * 100),
            )
        })
    }

    proptest! {
        #[test]
        fn from_shards_equals_the_hash_map_sum(
            shards in prop::collection::vec(prop::collection::vec(entry(), 0..60), 0..5),
            now in 0u64..1300,
            window in 1u64..700,
        ) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
            let window = Duration::from_secs(window);
            let entries = shards
                .iter()
                .map(|s| s.iter().map(|&(ip, b, l)| SenderEntry::new(ip, b, l)).collect());
            let got = TopSenders::from_shards(entries, now, window);
            let want = reference(shards, now, window);
            prop_assert_eq!(got.top10, want.top10);
            prop_assert_eq!(got.idle, want.idle);
        }
    }

    #[test]
    fn a_sender_in_several_shards_is_summed_and_ties_go_to_the_lower_address() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let ip = |n: u32| IpAddr::V4(Ipv4Addr::from(0xc633_6400 + n));
        // Senders 0..12 send 100 bytes each; sender 20 sends 60 in each of two shards
        // (120: first), so the nine lowest of the ties 0..12 make the rest.
        let a: Vec<_> = (0..12)
            .map(|n| SenderEntry::new(ip(n), 100, t))
            .chain([SenderEntry::new(ip(20), 60, t)])
            .collect();
        let b = vec![SenderEntry::new(ip(20), 60, t)];
        let top = TopSenders::from_shards([b, a], t, Duration::from_secs(300));
        let want: HashSet<IpAddr> = (0..9).map(ip).chain([ip(20)]).collect();
        assert_eq!(top.top10, want);
        assert!(top.idle.is_empty());
    }
}
