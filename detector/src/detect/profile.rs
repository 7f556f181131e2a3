//! What one internal host did over the sliding window: its external peers and, per peer,
//! bytes each way, flows, transports, ports. Bounded: at most `max_peers` peers are held
//! in full; beyond that, peers are only counted (a HyperLogLog sketch of the addresses).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use rustc_hash::FxHashMap;

use crate::flow::FlowRecord;

/// Ports whose many small UDP exchanges are services, not a DHT.
pub const SERVICE_UDP_PORTS: &[u16] = &[
    53, 67, 68, 123, 137, 138, 443, 853, 1900, 3478, 5353, 5355, 19302,
];

/// At most this many (local, remote) port pairs are kept per peer.
const PORTS_PER_PEER: usize = 8;

/// One external peer of an internal host.
#[derive(Clone, Debug)]
pub struct PeerStat {
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Bytes the peer sent to the host.
    pub bytes_in: u64,
    /// Bytes the host sent to the peer.
    pub bytes_out: u64,
    pub flows: u64,
    pub tcp: bool,
    pub udp: bool,
    /// (local port, remote port) pairs seen, a few.
    pub ports: Vec<(u16, u16)>,
    /// Outbound TCP flows that carried SYN but never an ACK: attempts that never completed.
    pub tcp_attempts: u64,
    pub tcp_failed: u64,
    /// UDP packets and bytes to/from non-service ports.
    pub udp_packets: u64,
    pub udp_bytes: u64,
}

/// The sliding-window profile of one internal host.
#[derive(Debug)]
pub struct HostProfile {
    pub peers: FxHashMap<IpAddr, PeerStat>,
    /// Distinct peers beyond `peers` (counted, not held).
    overflow: Option<Box<HyperLogLogPlus<IpAddr, std::hash::RandomState>>>,
    max_peers: usize,
    /// Sources (exporters, the local meter) whose records fed this profile, at most 16.
    pub sources: Vec<crate::flow::Origin>,
    pub last_seen: SystemTime,
}

impl HostProfile {
    pub fn new(max_peers: usize) -> Self {
        Self {
            peers: FxHashMap::default(),
            overflow: None,
            max_peers,
            sources: Vec::new(),
            last_seen: SystemTime::UNIX_EPOCH,
        }
    }

    /// Adds a record in which `host` (internal) talks with `peer` (external).
    pub fn add(&mut self, r: &FlowRecord, host_is_src: bool) {
        let peer = if host_is_src { r.dst_addr } else { r.src_addr };
        let (local_port, remote_port) = if host_is_src {
            (r.src_port, r.dst_port)
        } else {
            (r.dst_port, r.src_port)
        };
        self.last_seen = self.last_seen.max(r.last);
        self.note_source(r);
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            let hll = self.overflow.get_or_insert_with(|| {
                Box::new(
                    HyperLogLogPlus::new(14, std::hash::RandomState::new())
                        .expect("precision 14 is valid"),
                )
            });
            hll.insert(&peer);
            return;
        }
        let p = self.peers.entry(peer).or_insert_with(|| PeerStat {
            first_seen: r.first,
            last_seen: r.last,
            bytes_in: 0,
            bytes_out: 0,
            flows: 0,
            tcp: false,
            udp: false,
            ports: Vec::new(),
            tcp_attempts: 0,
            tcp_failed: 0,
            udp_packets: 0,
            udp_bytes: 0,
        });
        p.first_seen = p.first_seen.min(r.first);
        p.last_seen = p.last_seen.max(r.last);
        let bytes = r.est_bytes();
        if host_is_src {
            p.bytes_out += bytes;
        } else {
            p.bytes_in += bytes;
        }
        p.flows += 1;
        match r.protocol {
            6 => {
                p.tcp = true;
                if host_is_src && r.tcp_flags & 0x02 != 0 {
                    p.tcp_attempts += 1;
                    if r.tcp_flags & 0x10 == 0 {
                        p.tcp_failed += 1;
                    }
                }
            }
            17 => {
                p.udp = true;
                if !SERVICE_UDP_PORTS.contains(&remote_port)
                    && !SERVICE_UDP_PORTS.contains(&local_port)
                {
                    p.udp_packets += r.est_packets();
                    p.udp_bytes += bytes;
                }
            }
            _ => {}
        }
        if p.ports.len() < PORTS_PER_PEER && !p.ports.contains(&(local_port, remote_port)) {
            p.ports.push((local_port, remote_port));
        }
    }

    /// Remembers who reported a record of this host (at most 16 sources).
    pub fn note_source(&mut self, r: &FlowRecord) {
        if self.sources.len() < 16 && !self.sources.contains(&r.origin) {
            self.sources.push(r.origin);
        }
    }

    /// Forgets peers silent for `window` at `now`.
    pub fn expire(&mut self, now: SystemTime, window: Duration) {
        self.peers
            .retain(|_, p| now.duration_since(p.last_seen).unwrap_or(Duration::ZERO) < window);
        // Give memory back once most of the window has rolled out.
        if self.peers.capacity() > 64 && self.peers.len() < self.peers.capacity() / 4 {
            self.peers.shrink_to_fit();
        }
        if self.peers.len() < self.max_peers / 2 {
            self.overflow = None;
        }
    }

    /// Distinct peers, held and counted.
    pub fn peer_count(&mut self) -> u64 {
        let extra = self
            .overflow
            .as_mut()
            .map(|h| h.count() as u64)
            .unwrap_or(0);
        self.peers.len() as u64 + extra
    }
}
