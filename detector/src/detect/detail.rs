//! A host's drill-down (issue #24): what an analyst looks at once an alarm names a host
//! and its rules. Its peers (how many, the biggest by bytes with their share, how many
//! are outside the network's top 10 senders), its flows, the ports it used on both
//! ends, which way its connections went, and each look-alike guard with what it
//! measured.
//!
//! [`extract`] is a pure function of a [`HostProfile`] (and the network's top senders):
//! the shard workers run it at each evaluation for the hosts the status page can show
//! ([`Engine::explain_detailed`]), so that the HTTP server only ever reads a snapshot.
//! What it returns is bounded whatever the host did: [`TOP_PEERS`] peers, [`TOP_PORTS`]
//! ports each way, and counts for the rest.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde::Serialize;

use super::evidence::Verdict;
use super::profile::{HostProfile, Totals};
use super::{Engine, TopSenders};

/// Peers listed by bytes in a host's detail; the others are counted.
pub const TOP_PEERS: usize = 10;
/// Ports listed each way (remote, local) in a host's detail; the others are counted.
pub const TOP_PORTS: usize = 12;
/// Port pairs listed per peer.
const PAIRS_PER_PEER: usize = 4;

/// One of the host's biggest peers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerRow {
    pub peer: IpAddr,
    /// Bytes the peer sent to the host, and the host to the peer.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub flows: u64,
    /// Its share of the bytes of the host's held peers (0 to 1).
    pub share: f64,
    /// Among the network's 10 biggest senders.
    pub top10_sender: bool,
    pub tcp: bool,
    pub udp: bool,
    /// The first (local, remote) port pairs seen with it.
    pub ports: Vec<(u16, u16)>,
}

/// A port and how many peers the host met on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortCount {
    pub port: u16,
    pub peers: u64,
}

/// The ports of one end of the host's connections: the busiest by peers, and the rest
/// counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortDist {
    /// Distinct ports.
    pub distinct: u64,
    /// The busiest ports, most peers first (ties to the lower port).
    pub top: Vec<PortCount>,
    /// Ports not in `top`, and the peers met on them (a peer met on two of them counts
    /// twice).
    pub other_ports: u64,
    pub other_peers: u64,
}

/// Which way the host's connections went, judged from their ports (flow records do not
/// say who opened a connection): a port pair is inbound, a peer that came to the host,
/// when its local port is a service's (1024 or lower, the peer's above) or one that at
/// least [`SHARED_LOCAL_PEERS`] peers share (a listening port), unless the remote port
/// is a service's and the local one is not (the host is a client, as a resolver asking
/// many servers from one port). Otherwise it is outbound: the host went to the peer
/// from a port of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Direction {
    /// Peers with inbound pairs only, outbound pairs only, and both.
    pub inbound_peers: u64,
    pub outbound_peers: u64,
    pub both_peers: u64,
    /// Port pairs each way.
    pub inbound_pairs: u64,
    pub outbound_pairs: u64,
}

/// A local port this many peers share is one peers come to.
pub const SHARED_LOCAL_PEERS: u64 = 2;

/// A host's drill-down at one evaluation (see the module's documentation).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HostDetail {
    /// The window the profile covers, in seconds.
    pub window_secs: u64,
    /// Distinct external peers in the window (held in full and counted beyond the cap),
    /// and those held in full (what the rest of the detail is made of).
    pub peers: u64,
    pub peers_held: u64,
    /// Flows in the window, and per minute over it.
    pub flows: u64,
    pub flows_per_min: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The biggest peers by bytes (at most [`TOP_PEERS`]); the other held peers and
    /// their bytes; peers counted beyond the cap are in `peers` only.
    pub top_peers: Vec<PeerRow>,
    pub other_peers: u64,
    pub other_bytes: u64,
    /// Held peers among the network's 10 biggest senders, and the peers outside them.
    pub peers_in_top10_senders: u64,
    pub peers_outside_top10_senders: u64,
    /// Held peers reached over TCP, over UDP, over both.
    pub tcp_peers: u64,
    pub udp_peers: u64,
    pub tcp_and_udp_peers: u64,
    /// Ports of the peers and of the host (each peer's first 8 port pairs).
    pub remote_ports: PortDist,
    pub local_ports: PortDist,
    pub direction: Direction,
    /// The host's running totals (see [`Totals`]).
    pub totals: Totals,
}

/// Whether a (local, remote) port pair is a peer that came to the host (see [`Direction`]).
fn inbound(local: u16, remote: u16, local_peers: u64) -> bool {
    if remote <= 1024 && local > 1024 {
        false
    } else if local <= 1024 && remote > 1024 {
        true
    } else {
        local_peers >= SHARED_LOCAL_PEERS
    }
}

/// The busiest `n` of `counts` (port to peers), most peers first, ties to the lower port.
fn port_dist(counts: &HashMap<u16, u64>, n: usize) -> PortDist {
    let mut v: Vec<PortCount> = counts
        .iter()
        .map(|(&port, &peers)| PortCount { port, peers })
        .collect();
    v.sort_by(|a, b| b.peers.cmp(&a.peers).then(a.port.cmp(&b.port)));
    let rest = v.split_off(n.min(v.len()));
    PortDist {
        distinct: counts.len() as u64,
        top: v,
        other_ports: rest.len() as u64,
        other_peers: rest.iter().map(|p| p.peers).sum(),
    }
}

/// The drill-down of the host `p` profiles; `top_senders` are the network's 10 biggest
/// senders, `window_min` the window's length in minutes.
pub fn extract(p: &mut HostProfile, top_senders: &HashSet<IpAddr>, window_min: f64) -> HostDetail {
    let peers = p.peer_count();
    let mut d = HostDetail {
        window_secs: (window_min * 60.0).round() as u64,
        peers,
        peers_held: p.peers.len() as u64,
        totals: p.totals,
        ..HostDetail::default()
    };
    let mut remote: HashMap<u16, u64> = HashMap::new();
    let mut local: HashMap<u16, u64> = HashMap::new();
    let mut by_bytes: Vec<(u64, IpAddr, usize)> = Vec::with_capacity(p.peers.len());
    for (i, (key, s)) in p.peers.iter().enumerate() {
        let ip = &key.ip();
        d.flows += u64::from(s.flows);
        d.bytes_in += s.bytes_in;
        d.bytes_out += s.bytes_out;
        d.peers_in_top10_senders += u64::from(top_senders.contains(ip));
        d.tcp_peers += u64::from(s.tcp);
        d.udp_peers += u64::from(s.udp);
        d.tcp_and_udp_peers += u64::from(s.tcp && s.udp);
        by_bytes.push((s.bytes_in + s.bytes_out, *ip, i));
        let pairs = p.pairs(s);
        for (k, &(l, r)) in pairs.iter().enumerate() {
            // Each port once per peer.
            if !pairs[..k].iter().any(|&(_, r2)| r2 == r) {
                *remote.entry(r).or_default() += 1;
            }
            if !pairs[..k].iter().any(|&(l2, _)| l2 == l) {
                *local.entry(l).or_default() += 1;
            }
        }
    }
    d.peers_outside_top10_senders = peers.saturating_sub(d.peers_in_top10_senders);
    d.flows_per_min = d.flows as f64 / window_min.max(1.0 / 60.0);
    let total = d.bytes_in + d.bytes_out;
    by_bytes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(bytes, ip, i) in by_bytes.iter().take(TOP_PEERS) {
        let s = p.peers.at(i).1;
        d.top_peers.push(PeerRow {
            peer: ip,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            flows: u64::from(s.flows),
            share: if total > 0 {
                bytes as f64 / total as f64
            } else {
                0.0
            },
            top10_sender: top_senders.contains(&ip),
            tcp: s.tcp,
            udp: s.udp,
            ports: p.pairs(s).iter().take(PAIRS_PER_PEER).copied().collect(),
        });
    }
    d.other_peers = by_bytes.len().saturating_sub(TOP_PEERS) as u64;
    d.other_bytes = by_bytes.iter().skip(TOP_PEERS).map(|x| x.0).sum();
    for (_, s) in p.peers.iter() {
        let (mut has_in, mut has_out) = (false, false);
        for &(l, r) in p.pairs(s).iter() {
            if inbound(l, r, local.get(&l).copied().unwrap_or(0)) {
                has_in = true;
                d.direction.inbound_pairs += 1;
            } else {
                has_out = true;
                d.direction.outbound_pairs += 1;
            }
        }
        match (has_in, has_out) {
            (true, false) => d.direction.inbound_peers += 1,
            (false, true) => d.direction.outbound_peers += 1,
            (true, true) => d.direction.both_peers += 1,
            (false, false) => {}
        }
    }
    d.remote_ports = port_dist(&remote, TOP_PORTS);
    d.local_ports = port_dist(&local, TOP_PORTS);
    d
}

/// One look-alike guard as the drill-down shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardRow {
    pub guard: String,
    pub holds: bool,
    /// What it measured.
    pub measured: String,
}

/// The guards of a verdict (`guard_evidence`, from [`evidence::Guards::explain`]: "NAME
/// holds: ..." or "NAME does not hold: ...") as rows.
pub fn guard_rows(explained: &[String]) -> Vec<GuardRow> {
    explained
        .iter()
        .map(|line| {
            let (head, measured) = line.split_once(": ").unwrap_or((line.as_str(), ""));
            let (guard, state) = head.split_once(' ').unwrap_or((head, ""));
            GuardRow {
                guard: guard.to_string(),
                holds: state == "holds",
                measured: measured.to_string(),
            }
        })
        .collect()
}

impl Engine {
    /// The hosts the status page can drill into, each evaluated in full against the top
    /// senders `top` and with its [`HostDetail`]: the `n` of the highest last scores
    /// (as [`Engine::explain`]) and, beyond them, up to `alarmed` hosts with an open
    /// alarm, highest first. Ties to the lower address.
    pub fn explain_detailed(
        &mut self,
        top: &TopSenders,
        n: usize,
        alarmed: usize,
    ) -> Vec<(IpAddr, Verdict, HostDetail)> {
        let mut order = self.ranked();
        let beyond: Vec<_> = order
            .iter()
            .skip(n)
            .filter(|x| x.3)
            .take(alarmed)
            .copied()
            .collect();
        order.truncate(n);
        order.extend(beyond);
        let window_min = self.cfg.window.as_secs_f64() / 60.0;
        order
            .into_iter()
            .map(|(_, ip, i, _)| {
                let v = self.verdict_at(i, top);
                let d = extract(&mut self.hosts.at_mut(i).profile, &top.top10, window_min);
                (ip, v, d)
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "detail_tests.rs"]
mod tests;
