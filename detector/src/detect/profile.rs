//! What one internal host did over the sliding window: its external peers and, per peer,
//! bytes each way, flows, transports, ports. Bounded: at most `max_peers` peers are held
//! in full; beyond that, peers are only counted (a HyperLogLog sketch of the addresses).
//!
//! Besides the peers, a profile keeps [`Aggregates`]: the sums over its held peers that the
//! rules need, updated as peers are added, grow and expire, so that a host is scored
//! without walking its peers ([`super::evidence::score`]); the full walk
//! ([`super::evidence::evaluate`]) is only made for the evidence of an alarm event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use super::dense::{Chunked, DenseMap};
use super::opening::Opening;
use super::ports::{PortCounts, PortTable};
use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};

use crate::flow::FlowRecord;

/// At most this many (local, remote) port pairs are kept per peer.
const PORTS_PER_PEER: usize = 8;
/// The first pairs, kept in the peer's entry; the others in its host's [`MorePairs`]
/// (most peers have one or two: a peer's entry is 80 bytes with its key, not 96).
const INLINE_PAIRS: usize = 3;
const MORE_PAIRS: usize = PORTS_PER_PEER - INLINE_PAIRS;

/// The most peers a profile holds in full, whatever its `max_peers`: the per-port counts
/// are 16 bits ([`PortCounts`]), and 8,191 peers of [`PORTS_PER_PEER`] pairs make at most
/// 65,528 pairs on one port.
pub const MAX_PEERS: usize = 8191;

/// A host's peers: chunks of entries (growing never leaves a buffer behind), an index of
/// 4-byte slots, each peer stamped with when it was last seen (see [`stamp_of`]).
pub type Peers = DenseMap<PeerAddr, PeerStat, u32, u32, Chunked<(PeerAddr, PeerStat)>>;

/// A peer's address as its host's table keys it: 16 bytes with no alignment, so that an
/// entry is 80 bytes where an [`IpAddr`] (17 bytes, padded to 24 before the 64-byte
/// [`PeerStat`]) would make it 88. An IPv6 address is itself; an IPv4 address a.b.c.d is
/// ff00::a.b.c.d, a multicast address, which is never a peer
/// ([`super::DetectConfig::usable`]), so the two never meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr([u8; 16]);

/// The hash a host's table of peers files `peer` under.
#[inline]
pub fn peer_hash(peer: &IpAddr) -> u32 {
    super::dense::key_hash(&PeerAddr::new(*peer))
}

impl PeerAddr {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(a) => Self(a.octets()),
            IpAddr::V4(a) => {
                let mut b = [0; 16];
                b[0] = 0xff;
                b[12..].copy_from_slice(&a.octets());
                Self(b)
            }
        }
    }

    pub fn ip(&self) -> IpAddr {
        match self.0 {
            [0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d] => {
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            b => IpAddr::V6(Ipv6Addr::from(b)),
        }
    }
}

// A peer's entry in its host's table: the key and the 64 bytes below.
const _: () = assert!(std::mem::size_of::<(PeerAddr, PeerStat)>() == 80);

/// The default of the rules' `udp_small_size` (bytes): DHT messages are smaller.
pub const DEFAULT_UDP_SMALL_SIZE: f64 = 300.0;
/// The default of `median_peer_bytes_per_min`: a throttled peer sends at most this.
pub const DEFAULT_PEER_BYTES_PER_MIN: f64 = 2e6;

/// The per-peer thresholds the aggregates count against (from the rules' thresholds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// A peer's UDP exchange is "small datagrams" below this mean size.
    pub udp_small_size: f64,
    /// A peer is throttled at or below this many bytes per minute over the window...
    pub peer_bytes_per_min: f64,
    /// ...of this many minutes.
    pub window_min: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            udp_small_size: DEFAULT_UDP_SMALL_SIZE,
            peer_bytes_per_min: DEFAULT_PEER_BYTES_PER_MIN,
            window_min: 5.0,
        }
    }
}

/// Sums over the held peers, kept current by [`HostProfile::add`] and
/// [`HostProfile::expire`].
#[derive(Clone, Debug, Default)]
pub struct Aggregates {
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Peers reached over both TCP and UDP.
    pub tcp_udp: u64,
    pub tcp_attempts: u64,
    pub tcp_failed: u64,
    /// The further failed attempts sampled ones stand for ([`PeerStat::tcp_failed_extra`]).
    pub tcp_failed_extra: u64,
    /// Peers whose non-service UDP datagrams are small on average.
    pub udp_small: u64,
    /// Peers at or below the throttled rate.
    pub throttled: u64,
    /// Peers met on a P2P family's well-known port (either end).
    pub p2p_port: u64,
    /// Peers of a steady small-packet UDP exchange both ways (see [`PeerStat::realtime`]).
    pub realtime: u64,
    /// Peers reached only on web ports from ephemeral local ports ([`PeerStat::web_only`]).
    pub web_only: u64,
    /// Peers whose connection opened with a handshake of BitTorrent's sizes, plain or
    /// encrypted ([`PeerStat::opening`]).
    pub bt_opening: u64,
    /// (local, remote) port pairs by remote port; `high_ports` counts the ports above
    /// 1024.
    pub remote_ports: PortCounts,
    pub high_ports: u64,
    /// Per local port: peers with a pair on it, and pairs on it.
    pub local_ports: PortTable,
    /// The largest per-peer byte total: exact, or an upper bound after its peer expired.
    pub top: u64,
    pub top_exact: bool,
    /// The busiest local port as (peers, port): exact, or an upper bound after expiry.
    pub listen: (u32, u16),
    pub listen_exact: bool,
}

/// One peer's share of the sums.
#[derive(Clone, Copy, Default)]
struct Contribution {
    flows: u64,
    bytes_in: u64,
    bytes_out: u64,
    tcp_udp: u64,
    tcp_attempts: u64,
    tcp_failed: u64,
    tcp_failed_extra: u64,
    udp_small: u64,
    throttled: u64,
    p2p_port: u64,
    realtime: u64,
    web_only: u64,
    bt_opening: u64,
}

impl PeerStat {
    /// `pairs`: this peer's port pairs ([`HostProfile::pairs`]).
    fn contribution(&self, pairs: &[(u16, u16)], lim: &Limits) -> Contribution {
        let total = self.bytes_in + self.bytes_out;
        Contribution {
            flows: u64::from(self.flows),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            tcp_udp: u64::from(self.tcp && self.udp),
            tcp_attempts: u64::from(self.tcp_attempts),
            tcp_failed: u64::from(self.tcp_failed),
            tcp_failed_extra: u64::from(self.tcp_failed_extra),
            // The same expressions as the full evaluation, so both agree exactly.
            udp_small: u64::from(
                self.udp_packets > 0
                    && (self.udp_bytes as f64 / self.udp_packets as f64) < lim.udp_small_size,
            ),
            throttled: u64::from(total as f64 / lim.window_min.max(1.0) <= lim.peer_bytes_per_min),
            p2p_port: u64::from(Self::on_p2p_port(pairs)),
            realtime: u64::from(self.realtime(pairs)),
            web_only: u64::from(Self::web_only(pairs)),
            bt_opening: u64::from(self.opening().is_bittorrent()),
        }
    }

    /// A steady exchange of small datagrams both ways, as a game session or a call
    /// keeps with each of its peers: UDP only, at least [`REALTIME_MIN_PACKETS`] packets
    /// over the window, at most [`REALTIME_MAX_MEAN_BYTES`] a packet on average, and each
    /// direction within [`REALTIME_SYMMETRY`] times the other. A BitTorrent peer is
    /// none of these: its transfers are large packets one way (TCP or uTP), its DHT
    /// contacts a few datagrams each. Name servers and time servers are services, not
    /// sessions. `pairs`: this peer's port pairs ([`HostProfile::pairs`]).
    pub fn realtime(&self, pairs: &[(u16, u16)]) -> bool {
        let (a, b) = (
            self.bytes_in.min(self.bytes_out),
            self.bytes_in.max(self.bytes_out),
        );
        self.udp
            && !self.tcp
            && !pairs.iter().any(|&(_, r)| matches!(r, 53 | 123 | 853))
            && u64::from(self.packets) >= REALTIME_MIN_PACKETS
            && a + b <= REALTIME_MAX_MEAN_BYTES * u64::from(self.packets)
            && a * REALTIME_SYMMETRY >= b
    }

    /// Every port pair seen with this peer is a web port on its side ([`WEB_PORTS`])
    /// and an ephemeral one (above 1024) on the host's: the host is the peer's client.
    /// `pairs`: a peer's port pairs ([`HostProfile::pairs`]).
    pub fn web_only(pairs: &[(u16, u16)]) -> bool {
        !pairs.is_empty()
            && pairs
                .iter()
                .all(|&(l, r)| l > 1024 && WEB_PORTS.contains(&r))
    }

    /// How the first TCP connection seen with this peer opened (see [`Opening`]).
    pub fn opening(&self) -> Opening {
        Opening::of(self.open_out, self.open_in)
    }

    /// Whether one of a peer's (local, remote) port pairs ([`HostProfile::pairs`]) is a
    /// P2P family's well-known port.
    pub fn on_p2p_port(pairs: &[(u16, u16)]) -> bool {
        pairs.iter().any(|&(l, r)| {
            super::kind::family_of_port(l).is_some() || super::kind::family_of_port(r).is_some()
        })
    }
}

/// Packets a peer must exchange before it counts as a steady real-time exchange.
pub const REALTIME_MIN_PACKETS: u64 = 100;
/// Mean IP bytes a packet of a real-time exchange (voice, game state) stays under.
pub const REALTIME_MAX_MEAN_BYTES: u64 = 400;
/// How many times the busier direction of a real-time exchange may carry the other's bytes.
pub const REALTIME_SYMMETRY: u64 = 4;
/// The ports of web servers (HTTP, HTTPS, their alternates), TCP or UDP (QUIC).
pub const WEB_PORTS: [u16; 4] = [80, 443, 8080, 8443];

impl Aggregates {
    fn apply(&mut self, c: &Contribution, add: bool) {
        let f = |acc: &mut u64, v: u64| {
            if add {
                *acc += v;
            } else {
                *acc -= v;
            }
        };
        f(&mut self.flows, c.flows);
        f(&mut self.bytes_in, c.bytes_in);
        f(&mut self.bytes_out, c.bytes_out);
        f(&mut self.tcp_udp, c.tcp_udp);
        f(&mut self.tcp_attempts, c.tcp_attempts);
        f(&mut self.tcp_failed, c.tcp_failed);
        f(&mut self.tcp_failed_extra, c.tcp_failed_extra);
        f(&mut self.udp_small, c.udp_small);
        f(&mut self.throttled, c.throttled);
        f(&mut self.p2p_port, c.p2p_port);
        f(&mut self.realtime, c.realtime);
        f(&mut self.web_only, c.web_only);
        f(&mut self.bt_opening, c.bt_opening);
    }

    fn add_pair(&mut self, local: u16, remote: u16, new_local_for_peer: bool) {
        let pairs = self.remote_ports.update(remote, |n| *n += 1);
        if pairs == 1 && remote > 1024 {
            self.high_ports += 1;
        }
        let (peers, _) = self.local_ports.update(local, |peers, pairs| {
            *pairs += 1;
            if new_local_for_peer {
                *peers += 1;
            }
        });
        if new_local_for_peer && (peers, local) > self.listen {
            self.listen = (peers, local);
        }
    }

    fn remove_pair(&mut self, local: u16, remote: u16, last_local_for_peer: bool) {
        let pairs = self
            .remote_ports
            .update(remote, |n| *n = n.saturating_sub(1));
        if pairs == 0 && remote > 1024 {
            self.high_ports -= 1;
        }
        self.local_ports.update(local, |peers, pairs| {
            *pairs = pairs.saturating_sub(1);
            if last_local_for_peer {
                *peers = peers.saturating_sub(1);
            }
        });
        if last_local_for_peer && local == self.listen.1 {
            self.listen_exact = false;
        }
    }

    /// The busiest local port (peers, port), exact: rescans the local ports if needed.
    pub fn listen_exact(&mut self) -> (u32, u16) {
        if !self.listen_exact {
            self.listen = self
                .local_ports
                .iter()
                .map(|(port, ips, _)| (ips, port))
                .max()
                .unwrap_or((0, 0));
            self.listen_exact = true;
        }
        self.listen
    }
}

/// One external peer of an internal host: 64 bytes, no allocation of its own (when it
/// was last seen is kept beside it, see [`HostProfile::peers`]; its port pairs beyond
/// the first [`INLINE_PAIRS`] in its host's [`MorePairs`]).
#[derive(Clone, Debug)]
pub struct PeerStat {
    /// Bytes the peer sent to the host.
    pub bytes_in: u64,
    /// Bytes the host sent to the peer.
    pub bytes_out: u64,
    /// UDP bytes to/from non-service ports, and their packets (below).
    pub udp_bytes: u64,
    pub udp_packets: u32,
    /// Packets both ways, all protocols (saturating).
    pub packets: u32,
    pub flows: u32,
    /// Outbound TCP flows that carried SYN but never an ACK: attempts that never
    /// completed (saturating).
    pub tcp_attempts: u16,
    pub tcp_failed: u16,
    /// Under 1-in-N sampling, the N - 1 further attempts each short failed attempt seen
    /// stands for (a SYN and its retry are seen about one time in N): what the
    /// `port_scan` guard adds to the attempts seen (saturating).
    pub tcp_failed_extra: u16,
    pub tcp: bool,
    pub udp: bool,
    /// OR of the payload hint flags of the peer's flows.
    pub hints: u8,
    nports: u8,
    /// The first payload's size (an opening slot value) of the first TCP flow seen
    /// each way, host to peer and peer to host; 0 until seen (see [`Opening`]).
    pub open_out: u8,
    pub open_in: u8,
    ports: [(u16, u16); INLINE_PAIRS],
    /// Its slot in its host's [`MorePairs`] + 1, or 0 while it has no more than
    /// [`INLINE_PAIRS`] pairs.
    more: u32,
}

// The size the documentation above states.
const _: () = assert!(std::mem::size_of::<PeerStat>() == 64);

impl PeerStat {
    fn new() -> Self {
        Self {
            bytes_in: 0,
            bytes_out: 0,
            udp_bytes: 0,
            udp_packets: 0,
            packets: 0,
            flows: 0,
            tcp_attempts: 0,
            tcp_failed: 0,
            tcp_failed_extra: 0,
            tcp: false,
            udp: false,
            hints: 0,
            nports: 0,
            open_out: 0,
            open_in: 0,
            ports: [(0, 0); INLINE_PAIRS],
            more: 0,
        }
    }

    /// (local port, remote port) pairs seen, the first [`PORTS_PER_PEER`] in the order
    /// seen; `more` is its host's [`MorePairs`].
    fn pairs(&self, more: Option<&MorePairs>) -> Pairs {
        let n = usize::from(self.nports);
        let mut p = [(0, 0); PORTS_PER_PEER];
        let inline = n.min(INLINE_PAIRS);
        p[..inline].copy_from_slice(&self.ports[..inline]);
        if n > INLINE_PAIRS {
            let slot = more
                .and_then(|m| m.slots.get((self.more as usize).wrapping_sub(1)))
                .expect("a peer with more than its inline pairs has a slot");
            p[INLINE_PAIRS..n].copy_from_slice(&slot[..n - INLINE_PAIRS]);
        }
        Pairs { n: self.nports, p }
    }
}

/// A peer's port pairs, copied out of its entry and its host's [`MorePairs`]
/// ([`HostProfile::pairs`]); derefs to the pairs in the order seen.
#[derive(Clone, Copy, Debug)]
pub struct Pairs {
    n: u8,
    p: [(u16, u16); PORTS_PER_PEER],
}

impl std::ops::Deref for Pairs {
    type Target = [(u16, u16)];
    fn deref(&self) -> &[(u16, u16)] {
        &self.p[..usize::from(self.n)]
    }
}

/// A host's peers' port pairs beyond their first [`INLINE_PAIRS`]: a slot of
/// [`MORE_PAIRS`] for each such peer ([`PeerStat::more`]), freed slots reused.
#[derive(Debug, Default)]
struct MorePairs {
    slots: Vec<[(u16, u16); MORE_PAIRS]>,
    free: Vec<u32>,
}

impl MorePairs {
    /// A slot for a peer: its [`PeerStat::more`] value.
    fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i + 1,
            None => {
                self.slots.push([(0, 0); MORE_PAIRS]);
                u32::try_from(self.slots.len()).expect("at most MAX_PEERS slots")
            }
        }
    }

    fn give_back(&mut self, more: u32) {
        if more != 0 {
            self.free.push(more - 1);
        }
    }

    fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<[(u16, u16); MORE_PAIRS]>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }
}

/// A peer's stamp: when it was last seen, in whole seconds since the UNIX epoch rounded
/// up, so that a peer leaves the window up to a second late, never early. Four bytes
/// instead of eight: expiry reads every stamp of a host that has a peer leaving.
pub fn stamp_of(last_ms: u64) -> u32 {
    last_ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32
}

/// A stamp back in milliseconds since the UNIX epoch.
pub fn stamp_ms(stamp: u32) -> u64 {
    u64::from(stamp) * 1000
}

/// Milliseconds since the UNIX epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// UDP ports whose many small exchanges are services, not a DHT.
fn service_udp_port(port: u16) -> bool {
    matches!(
        port,
        53 | 67 | 68 | 123 | 137 | 138 | 443 | 853 | 1900 | 3478 | 5353 | 5355 | 19302
    )
}

/// Takes an expiring peer (with its port pairs) out of the aggregates.
fn remove_from(agg: &mut Aggregates, limits: &Limits, p: &PeerStat, ports: &[(u16, u16)]) {
    agg.apply(&p.contribution(ports, limits), false);
    for (i, &(l, r)) in ports.iter().enumerate() {
        let last_local = !ports[i + 1..].iter().any(|&(l2, _)| l2 == l);
        agg.remove_pair(l, r, last_local);
    }
    if p.bytes_in + p.bytes_out >= agg.top {
        agg.top_exact = false;
    }
}

/// The sliding-window profile of one internal host.
#[derive(Debug)]
pub struct HostProfile {
    /// The peers, stamped with when each was last seen: whole seconds since the UNIX
    /// epoch, rounded up (see [`stamp_of`]).
    pub peers: Peers,
    /// Distinct peers beyond `peers` (counted, not held). Hashed with foldhash, keyed at
    /// random for each process as the standard library's SipHash was: a host past
    /// `max_peers` meets a new peer with most of its records, and SipHash was about 150
    /// instructions of each (callgrind, `micro ingest --in-process --hosts 16`).
    overflow: Option<Box<Overflow<foldhash::quality::RandomState>>>,
    /// The port pairs of peers that have more than [`INLINE_PAIRS`].
    more_pairs: Option<Box<MorePairs>>,
    /// At most [`MAX_PEERS`].
    max_peers: usize,
    /// Sources (exporters, the local meter) whose records fed this profile, at most 16.
    /// The first source inline (most hosts have one), the others beside it.
    first_source: Option<crate::flow::Origin>,
    more_sources: Vec<crate::flow::Origin>,
    /// When the host's current activity began: the earliest start of a record since the
    /// profile last held no peer.
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// No held peer was last seen before this (ms since the epoch): a lower bound, exact
    /// after each walk.
    oldest_ms: u64,
    pub agg: Aggregates,
    limits: Limits,
    /// What the host exchanged since this profile began, never expiring (see [`Totals`]).
    pub totals: Totals,
}

/// Running totals of a host since its profile began: every record's flows and bytes,
/// peers beyond the held ones included. They only grow (the host drill-down's rates
/// over time are their differences between evaluations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl HostProfile {
    pub fn new(max_peers: usize) -> Self {
        Self::with_limits(max_peers, Limits::default())
    }

    pub fn with_limits(max_peers: usize, limits: Limits) -> Self {
        Self {
            peers: DenseMap::default(),
            overflow: None,
            more_pairs: None,
            max_peers: max_peers.min(MAX_PEERS),
            first_source: None,
            more_sources: Vec::new(),
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            oldest_ms: u64::MAX,
            agg: Aggregates {
                top_exact: true,
                listen_exact: true,
                ..Aggregates::default()
            },
            limits,
            totals: Totals::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A held peer's (local port, remote port) pairs, the first [`PORTS_PER_PEER`] in
    /// the order seen.
    pub fn pairs(&self, p: &PeerStat) -> Pairs {
        p.pairs(self.more_pairs.as_deref())
    }

    /// Starts fetching what [`Self::add`] will touch for this peer and port pair.
    pub fn prefetch(&self, peer: &IpAddr, local_port: u16, remote_port: u16) {
        self.prefetch_keyed(peer_hash(peer), local_port, remote_port);
    }

    /// [`Self::prefetch`] with the peer's [`peer_hash`] already taken.
    #[inline]
    pub fn prefetch_keyed(&self, peer_hash: u32, local_port: u16, remote_port: u16) {
        self.peers.prefetch_hashed(peer_hash);
        self.peers.prefetch_directory();
        self.peers.prefetch_end();
        self.agg.remote_ports.prefetch(remote_port);
        self.agg.local_ports.prefetch(local_port);
    }

    /// Starts fetching the entries [`Self::add`] will update (after [`Self::prefetch`]).
    pub fn prefetch_entries(&self, peer: &IpAddr) {
        self.prefetch_entries_keyed(peer_hash(peer));
    }

    /// [`Self::prefetch_entries`] with the peer's [`peer_hash`] already taken.
    #[inline]
    pub fn prefetch_entries_keyed(&self, peer_hash: u32) {
        self.peers.prefetch_entry_hashed(peer_hash);
    }

    /// Adds a record in which `host` (internal) talks with `peer` (external).
    pub fn add(&mut self, r: &FlowRecord, host_is_src: bool) {
        self.add_stamped(r, host_is_src, stamp_of(unix_ms(r.last)));
    }

    /// [`Self::add`] with the record's stamp, `stamp_of(unix_ms(r.last))`, already
    /// taken (the engine converts times with a [`crate::flow::seconds::SecondClock`]).
    #[inline]
    pub fn add_stamped(&mut self, r: &FlowRecord, host_is_src: bool, stamp: u32) {
        let peer = if host_is_src { r.dst_addr } else { r.src_addr };
        self.add_stamped_keyed(r, host_is_src, stamp, peer_hash(&peer));
    }

    /// [`Self::add_stamped`] with the peer's [`peer_hash`] already taken (the engine
    /// hashes a record's peer once for its looks ahead and this).
    pub fn add_stamped_keyed(
        &mut self,
        r: &FlowRecord,
        host_is_src: bool,
        stamp: u32,
        peer_hash: u32,
    ) {
        let peer = if host_is_src { r.dst_addr } else { r.src_addr };
        let (local_port, remote_port) = if host_is_src {
            (r.src_port, r.dst_port)
        } else {
            (r.dst_port, r.src_port)
        };
        self.first_seen = if self.peers.is_empty() && self.overflow.is_none() {
            r.first
        } else {
            self.first_seen.min(r.first)
        };
        self.last_seen = self.last_seen.max(r.last);
        self.note_source(r);
        let t = &mut self.totals;
        if host_is_src {
            t.bytes_out = t.bytes_out.saturating_add(r.new_bytes());
        } else {
            t.bytes_in = t.bytes_in.saturating_add(r.new_bytes());
        }
        if !r.live.continues() {
            t.flows += 1;
        }
        let held = self.peers.len();
        let key = PeerAddr::new(peer);
        debug_assert_eq!(key.ip(), peer, "a multicast peer");
        let (pos, fresh) = match self.peers.position_hashed(&key, peer_hash) {
            Some(pos) => (pos, false),
            None if held >= self.max_peers => {
                self.count_overflow(&peer);
                return;
            }
            None => (self.peers.insert_stamped(key, PeerStat::new(), stamp), true),
        };
        let seen = self.peers.stamp_mut(pos);
        *seen = (*seen).max(stamp);
        let p = self.peers.at_mut(pos);
        let mut pairs = p.pairs(self.more_pairs.as_deref());
        let before = if fresh {
            Contribution::default()
        } else {
            p.contribution(&pairs, &self.limits)
        };
        self.oldest_ms = self.oldest_ms.min(stamp_ms(stamp));
        let bytes = r.new_bytes();
        if host_is_src {
            p.bytes_out += bytes;
        } else {
            p.bytes_in += bytes;
        }
        // A flow counts once: at its start when that was announced (live flows), else
        // with each record as exported.
        if !r.live.continues() {
            p.flows = p.flows.saturating_add(1);
        }
        p.hints |= r.hints;
        let packets = r.new_packets();
        p.packets = p
            .packets
            .saturating_add(u32::try_from(packets).unwrap_or(u32::MAX));
        match r.protocol {
            6 => {
                p.tcp = true;
                // The first payload each way of the first flows that show one.
                let first = r.opening[0];
                let side = if host_is_src {
                    &mut p.open_out
                } else {
                    &mut p.open_in
                };
                if *side == 0 {
                    *side = first;
                }
                // Whether a connection completed is known from its export, not its start.
                if host_is_src && !r.live.detection_only() && r.tcp_flags & 0x02 != 0 {
                    p.tcp_attempts = p.tcp_attempts.saturating_add(1);
                    if r.tcp_flags & 0x10 == 0 {
                        p.tcp_failed = p.tcp_failed.saturating_add(1);
                        // Under 1-in-N sampling a failed attempt (a SYN and its retry)
                        // is seen about one time in N: for the port_scan guard one seen
                        // stands for N. The failed-connection rule keeps what was seen:
                        // a sampled SYN of a connection that completed looks failed too.
                        if r.packets <= 2 {
                            let more = u16::try_from(r.sampling.max(1) - 1).unwrap_or(u16::MAX);
                            p.tcp_failed_extra = p.tcp_failed_extra.saturating_add(more);
                        }
                    }
                }
            }
            17 => {
                p.udp = true;
                if !service_udp_port(remote_port) && !service_udp_port(local_port) {
                    p.udp_packets = p
                        .udp_packets
                        .saturating_add(u32::try_from(packets).unwrap_or(u32::MAX));
                    p.udp_bytes += bytes;
                }
            }
            _ => {}
        }
        let n = usize::from(p.nports);
        if n < PORTS_PER_PEER && !pairs.contains(&(local_port, remote_port)) {
            let new_local = !pairs.iter().any(|&(l, _)| l == local_port);
            if n < INLINE_PAIRS {
                p.ports[n] = (local_port, remote_port);
            } else {
                let more = self.more_pairs.get_or_insert_with(Box::default);
                if n == INLINE_PAIRS {
                    p.more = more.take();
                }
                more.slots[p.more as usize - 1][n - INLINE_PAIRS] = (local_port, remote_port);
            }
            p.nports += 1;
            pairs.p[n] = (local_port, remote_port);
            pairs.n += 1;
            self.agg.add_pair(local_port, remote_port, new_local);
        }
        let after = p.contribution(&pairs, &self.limits);
        self.agg.apply(&before, false);
        self.agg.apply(&after, true);
        self.agg.top = self.agg.top.max(p.bytes_in + p.bytes_out);
    }

    /// Counts a peer beyond the held ones. Not inlined: kept out of [`Self::add_stamped`],
    /// the rest of which then inlines what it calls.
    #[inline(never)]
    fn count_overflow(&mut self, peer: &IpAddr) {
        let hll = self
            .overflow
            .get_or_insert_with(|| Box::new(Overflow::new(Default::default())));
        hll.insert(peer);
    }

    /// Remembers who reported a record of this host (at most 16 sources).
    pub fn note_source(&mut self, r: &FlowRecord) {
        match &self.first_source {
            Some(o) if *o == r.origin => {}
            None => self.first_source = Some(r.origin),
            Some(_) => {
                if self.more_sources.len() < 15 && !self.more_sources.contains(&r.origin) {
                    self.more_sources.push(r.origin);
                }
            }
        }
    }

    /// Who reported this host's records, first first.
    pub fn sources(&self) -> impl Iterator<Item = &crate::flow::Origin> {
        self.first_source.iter().chain(&self.more_sources)
    }

    /// Forgets peers silent for `window` at `now`, taking them out of the aggregates.
    /// Walks the peers only when the oldest may have left the window.
    pub fn expire(&mut self, now: SystemTime, window: Duration) {
        let (now_ms, window_ms) = (unix_ms(now), window.as_millis() as u64);
        let mut leaving = Vec::new();
        if let Some(oldest) = self.expiring(now_ms, window_ms, &mut leaving) {
            for pos in leaving {
                self.remove_expired(pos as usize);
            }
            self.expired(oldest);
        }
    }

    /// The first step of [`Self::expire`], which the engine runs over all hosts before
    /// it removes anything: appends the positions of the peers silent for the window,
    /// highest first (so removing them in that order moves none of the others), and
    /// returns the oldest stamp of those that stay. None when no peer can be leaving.
    pub fn expiring(&self, now_ms: u64, window_ms: u64, out: &mut Vec<u32>) -> Option<u64> {
        if now_ms.saturating_sub(self.oldest_ms) < window_ms {
            return None;
        }
        let mut oldest = u64::MAX;
        let first = out.len();
        for (pos, &stamp) in self.peers.stamps().iter().enumerate() {
            let last_ms = stamp_ms(stamp);
            if now_ms.saturating_sub(last_ms) < window_ms {
                oldest = oldest.min(last_ms);
            } else {
                out.push(pos as u32);
            }
        }
        out[first..].reverse();
        Some(oldest)
    }

    /// Removes the peer at `pos` (from [`Self::expiring`]) and its share of the sums.
    pub fn remove_expired(&mut self, pos: usize) {
        let (_, p) = self.peers.remove_at(pos);
        let pairs = p.pairs(self.more_pairs.as_deref());
        remove_from(&mut self.agg, &self.limits, &p, &pairs);
        if let Some(m) = &mut self.more_pairs {
            m.give_back(p.more);
        }
    }

    /// The last step of an expiry: `oldest` is from [`Self::expiring`].
    pub fn expired(&mut self, oldest: u64) {
        self.oldest_ms = oldest;
        self.after_expiry();
    }

    /// Starts fetching what removing the peer at `pos` touches: the peer, and `tail`,
    /// the entry that will move into its place.
    pub fn prefetch_expiring(&self, pos: usize, tail: usize) {
        self.peers.prefetch_at(pos);
        self.peers.prefetch_at(tail);
        self.peers.prefetch_stamp_at(pos);
        self.peers.prefetch_stamp_at(tail);
    }

    /// Then the index slots of both and of the peer's ports.
    pub fn prefetch_expiring_slots(&self, pos: usize, tail: usize) {
        self.peers.prefetch_slot_at(pos);
        self.peers.prefetch_slot_at(tail);
        if pos < self.peers.len() {
            for &(l, r) in self.pairs(self.peers.at(pos).1).iter() {
                self.agg.remote_ports.prefetch(r);
                self.agg.local_ports.prefetch(l);
            }
        }
    }

    /// Starts fetching the index slots where these peers would be.
    pub fn prefetch_peers(&self, peers: &[IpAddr]) {
        for p in peers {
            self.peers.prefetch(&PeerAddr::new(*p));
        }
    }

    /// Starts fetching the first stamps, which [`Self::expiring`] reads, and the chunk
    /// pointers, which removing the leaving peers reads.
    pub fn prefetch_stamps(&self) {
        self.peers.prefetch_stamps();
        self.peers.prefetch_directory();
    }

    /// Memory back after peers expired.
    fn after_expiry(&mut self) {
        self.agg.remote_ports.shrink();
        self.agg.local_ports.shrink();
        if self.peers.is_empty() {
            self.agg.top = 0;
            self.agg.top_exact = true;
        }
        // Give memory back once most of the window has rolled out.
        self.peers.shrink();
        if self.more_pairs.as_ref().is_some_and(|m| m.in_use() == 0) {
            self.more_pairs = None;
        }
        if self.peers.len() < self.max_peers / 2 {
            self.overflow = None;
        }
    }

    /// The largest per-peer byte total, exact: walks the peers if the largest expired.
    pub fn top_exact(&mut self) -> u64 {
        if !self.agg.top_exact {
            self.agg.top = self
                .peers
                .values()
                .map(|p| p.bytes_in + p.bytes_out)
                .max()
                .unwrap_or(0);
            self.agg.top_exact = true;
        }
        self.agg.top
    }

    /// Bytes this profile holds on the heap (its tables; the HyperLogLog sketch of peers
    /// beyond the cap, when there is one, counts as its 16 KiB of registers and the
    /// most its staging sketch's list holds, [`STAGE`] codes of 5 bytes).
    pub fn heap_bytes(&self) -> usize {
        self.peers.heap_bytes()
            + self.agg.remote_ports.heap_bytes()
            + self.agg.local_ports.heap_bytes()
            + self.more_sources.capacity() * std::mem::size_of::<crate::flow::Origin>()
            + self
                .more_pairs
                .as_ref()
                .map_or(0, |m| std::mem::size_of::<MorePairs>() + m.heap_bytes())
            + self.overflow.as_ref().map_or(0, |_| (16 << 10) + STAGE * 5)
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

/// Peers put in [`Overflow`]'s staging sketch before it is merged into the main one
/// (the sketches' work a record at `--hosts 16`: 1,360 instructions with 512, 1,309
/// with 1,024, 1,586 with 2,048: the staging sketch's own merges grow with it). The
/// staging sketch must stay sparse: its list of at most this many codes, 5 bytes
/// each at most, is well under the 12,288 bytes at which a sketch turns dense.
const STAGE: usize = 1024;
const _: () = assert!(STAGE * 5 < 12_288);

/// The distinct peers of a host beyond the ones it holds: a HyperLogLog++ sketch
/// (precision 14) whose estimate is the one of the same sketch given every peer in turn,
/// at a fraction of the cost while it is sparse.
///
/// The `hyperloglogplus` sketch is sparse until its encoded list of codes passes 12,288
/// bytes (a few thousand peers), and every 123 new codes it decodes, merges and
/// re-encodes that whole list: with a few thousand peers past `max_peers` that was about
/// 2,090 instructions a record, more than the rest of the shard's work (callgrind,
/// `micro ingest --in-process --hosts 16`). Here the peers go first into a small sketch
/// of the same hash, merged into the main one every [`STAGE`] peers (one merge of the
/// main list for those, not eight) and before every count. What a count gives depends
/// only on the codes the sketch was given, not on when they were merged: a merged sparse
/// list is the set of all of them, the list only grows, so it turns dense exactly when
/// the set's list passes the bound (checked at every merge, and a count merges first),
/// and registers made from a sparse code are those the same hash sets directly (the
/// sparse encoding keeps the bits a register needs). The test
/// `overflow_counts_as_one_sketch_fed_in_turn` holds the two equal.
#[derive(Debug)]
pub struct Overflow<B: std::hash::BuildHasher + Clone> {
    sketch: HyperLogLogPlus<IpAddr, B>,
    staged: HyperLogLogPlus<IpAddr, B>,
    /// Peers put in `staged` since it was last merged.
    staged_n: usize,
    hasher: B,
}

impl<B: std::hash::BuildHasher + Clone> Overflow<B> {
    pub fn new(hasher: B) -> Self {
        Self {
            sketch: Self::sketch(&hasher),
            staged: Self::sketch(&hasher),
            staged_n: 0,
            hasher,
        }
    }

    fn sketch(hasher: &B) -> HyperLogLogPlus<IpAddr, B> {
        HyperLogLogPlus::new(14, hasher.clone()).expect("precision 14 is valid")
    }

    pub fn insert(&mut self, peer: &IpAddr) {
        self.staged.insert(peer);
        self.staged_n += 1;
        if self.staged_n >= STAGE {
            self.merge_staged();
        }
    }

    fn merge_staged(&mut self) {
        if self.staged_n == 0 {
            return;
        }
        let staged = std::mem::replace(&mut self.staged, Self::sketch(&self.hasher));
        self.sketch
            .merge(&staged)
            .expect("both sketches have precision 14");
        self.staged_n = 0;
    }

    /// The estimated number of distinct peers given.
    pub fn count(&mut self) -> f64 {
        self.merge_staged();
        self.sketch.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::DetectConfig;
    use proptest::prelude::*;

    /// The staged sketch against the crate's sketch given every peer in turn (the truth),
    /// with the same hash: every count equal to the bit, while both are sparse, across
    /// the turn to dense and after; counts at uneven points
    /// (a count merges what is staged), repeated peers, IPv4 and IPv6. About 35,000 distinct
    /// peers: the sketches turn dense after a few thousand.
    #[test]
    fn overflow_counts_as_one_sketch_fed_in_turn() {
        for seed in [1u64, 2, 3] {
            let hasher = foldhash::quality::FixedState::with_seed(seed);
            let mut staged = Overflow::new(hasher.clone());
            let mut plain: HyperLogLogPlus<IpAddr, _> =
                HyperLogLogPlus::new(14, hasher).expect("precision 14 is valid");
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let (mut counted, mut dense_seen) = (0, false);
            for i in 0..40_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // One peer in eight seen before; one in four IPv6.
                let n = if x % 8 == 0 { x % (i + 1) } else { i };
                let peer = if x % 4 == 0 {
                    IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(n)))
                } else {
                    IpAddr::V4(Ipv4Addr::from(0xc612_0000u32.wrapping_add(n as u32)))
                };
                staged.insert(&peer);
                plain.insert(&peer);
                if x % 997 == 0 || i % 5_000 == 4_999 || i == 39_999 {
                    let (a, b) = (staged.count(), plain.count());
                    assert_eq!(a.to_bits(), b.to_bits(), "seed {seed}, after {i} peers");
                    counted += 1;
                    dense_seen |= b > 20_000.0;
                }
            }
            assert!(counted > 30, "counted {counted} times");
            assert!(
                dense_seen,
                "the sketches never passed the sparse bound (a code is 1 byte of the list at least: past 12,288 codes a sketch is dense)"
            );
        }
    }

    proptest! {
        /// Every usable address (IPv6, IPv4, IPv4-mapped IPv6) comes back from its key,
        /// and an IPv4 address and an IPv6 one never share a key: the IPv6 address whose
        /// bytes the IPv4 key takes is one no peer can have.
        #[test]
        fn peer_keys_are_the_addresses(a in any::<[u8; 16]>(), b in any::<[u8; 4]>()) {
            let six = IpAddr::V6(Ipv6Addr::from(a));
            let four = IpAddr::V4(Ipv4Addr::from(b));
            let mapped = IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped());
            for ip in [six, four, mapped] {
                if DetectConfig::usable(ip) {
                    prop_assert_eq!(PeerAddr::new(ip).ip(), ip);
                }
            }
            if DetectConfig::usable(six) {
                prop_assert_ne!(PeerAddr::new(six), PeerAddr::new(four));
            }
            prop_assert_ne!(PeerAddr::new(mapped), PeerAddr::new(four));
            let taken = IpAddr::V6(Ipv6Addr::from(PeerAddr::new(four).0));
            prop_assert!(!DetectConfig::usable(taken));
        }

        /// A peer's port pairs, its first three in its entry and the others in its
        /// host's slots, are the first [`PORTS_PER_PEER`] distinct pairs seen with it in
        /// the order seen, held in a plain map beside the profile, through records and
        /// expiries that free slots and reuse them; once no peer has more than three,
        /// the slots are gone.
        #[test]
        fn port_pairs_are_the_first_seen_in_order(
            ops in proptest::collection::vec((0u8..8, 0u16..4, 0u16..6, 0u64..4, any::<bool>()), 1..300),
        ) {
            use std::collections::HashMap;
            let window = Duration::from_secs(10);
            let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
            let mut p = HostProfile::new(1000);
            // Peer -> (last second seen, its pairs).
            let mut model: HashMap<IpAddr, (u64, Vec<(u16, u16)>)> = HashMap::new();
            let mut now = 0u64;
            for (peer, local, remote, step, outbound) in ops {
                now += step;
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + now);
                let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, peer));
                let (local, remote) = (6881 + local, 40_000 + remote);
                let mut r = if outbound {
                    FlowRecord::new(host, local, ip, remote, 17)
                } else {
                    FlowRecord::new(ip, remote, host, local, 17)
                };
                (r.first, r.last, r.packets, r.bytes) = (at, at, 1, 100);
                p.expire(at, window);
                model.retain(|_, (last, _)| now - *last < window.as_secs());
                p.add(&r, outbound);
                let (last, pairs) = model.entry(ip).or_default();
                *last = now;
                if pairs.len() < PORTS_PER_PEER && !pairs.contains(&(local, remote)) {
                    pairs.push((local, remote));
                }
                prop_assert_eq!(p.peers.len(), model.len());
                for (k, s) in p.peers.iter() {
                    prop_assert_eq!(&*p.pairs(s), model[&k.ip()].1.as_slice());
                }
                let more = model.values().filter(|(_, v)| v.len() > INLINE_PAIRS).count();
                let slots = p.more_pairs.as_ref().map_or(0, |m| m.in_use());
                prop_assert_eq!(slots, more);
            }
            let end = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + now + 60);
            p.expire(end, window);
            prop_assert!(p.peers.is_empty());
            prop_assert!(p.more_pairs.is_none(), "slots left after every peer expired");
        }
    }
}
