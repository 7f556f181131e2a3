//! P2P behaviour detection: host profiles over a sliding window, fed by the pipeline's
//! deduplicated flow records, evaluated every `eval_interval` with the evidence rules,
//! and turned into alarms with a lifecycle (`raised`, `updated`, `cleared`).
//!
//! Pure: records carry their times, and `evaluate` takes `now` (the wall clock under
//! `run`, the capture's clock under `replay`).

pub mod alarm;
pub mod config;
pub mod decisions;
pub mod dense;
pub mod detail;
pub mod evidence;
pub mod kind;
pub mod opening;
pub mod ports;
pub mod profile;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::flow::FlowRecord;
use alarm::{Alarm, alarm_id, event};
pub use alarm::{AlarmEvent, AlarmState};
pub use config::{DetectConfig, SenderEntry, TopSenders};
use evidence::{Thresholds, Verdict};
use profile::HostProfile;

#[derive(Debug)]
struct HostState {
    profile: HostProfile,
    over: u32,
    /// Boxed: most hosts never have one, and a host's state is held for every host.
    alarm: Option<Box<Alarm>>,
    /// The last evaluation's score and guard, for reports.
    last: (f64, Option<&'static str>),
    /// The highest score of an evaluation no guard vetoed, for reports.
    peak: f64,
}

/// Counters of the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub records: u64,
    pub duplicates_skipped: u64,
    /// Records with no single internal side: both ends internal (private to private),
    /// or neither (only public addresses).
    pub both_internal: u64,
    pub neither_internal: u64,
    /// Records on an allow-listed port or of an allow-listed host.
    pub allow_listed: u64,
    pub hosts_over_limit: u64,
    pub evaluations: u64,
}

/// Hosts are expired and scored in chunks of this many, so that a chunk's states are
/// still in the cache from one step to the next.
const CHUNK: usize = 256;

/// What scoring a chunk of hosts needs from the evaluation.
struct Scoring<'a> {
    now: SystemTime,
    top10: &'a HashSet<IpAddr>,
    top10_list: &'a [IpAddr],
    min_peers: usize,
    window_min: f64,
}

/// Buffers of the expiry, kept from chunk to chunk.
#[derive(Default)]
struct ExpiryScratch {
    /// Positions of one host's leaving peers.
    positions: Vec<u32>,
    /// (host, peer position, position of the entry that moves into it)
    work: Vec<(u32, u32, u32)>,
    /// (host, oldest stamp staying)
    oldest: Vec<(u32, u64)>,
}

/// A record's internal host and external peer, with their ports.
#[derive(Clone, Copy)]
struct Sides {
    host: IpAddr,
    peer: IpAddr,
    local: u16,
    remote: u16,
    host_is_src: bool,
    /// [`dense::key_hash`] of `host`, and of `peer` when `!host_is_src` (0 otherwise):
    /// hashed once, not at each look ahead and lookup.
    host_hash: u32,
    peer_hash: u32,
    /// [`profile::peer_hash`] of `peer`, for the host's table of peers.
    peer_key_hash: u32,
}

/// The internal networks as masks, compiled from [`DetectConfig::internal`]: answers
/// [`DetectConfig::is_internal`] with a few integer compares where each [`Cidr`] check
/// canonicalises the address and builds its mask again (twice a record, the engine's
/// own largest cost after the profiles'). An IPv4-mapped IPv6 address is its IPv4
/// address, as [`Cidr::contains`] takes it.
///
/// [`Cidr`]: crate::flow::cidr::Cidr
/// [`Cidr::contains`]: crate::flow::cidr::Cidr::contains
#[derive(Clone, Debug, Default)]
struct Internal {
    /// (network & mask, mask) of each IPv4 prefix.
    v4: Vec<(u32, u32)>,
    /// The same of each IPv6 prefix.
    v6: Vec<(u128, u128)>,
}

impl Internal {
    fn new(cfg: &DetectConfig) -> Self {
        let mut n = Self::default();
        for c in &cfg.internal {
            match c.addr {
                IpAddr::V4(a) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(c.len)).unwrap_or(0);
                    n.v4.push((u32::from(a) & mask, mask));
                }
                IpAddr::V6(a) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(c.len)).unwrap_or(0);
                    n.v6.push((u128::from(a) & mask, mask));
                }
            }
        }
        n
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4_contains(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.v4_contains(u32::from(v4)),
                None => {
                    let a = u128::from(a);
                    self.v6.iter().any(|&(net, mask)| a & mask == net)
                }
            },
        }
    }

    #[inline]
    fn v4_contains(&self, a: u32) -> bool {
        self.v4.iter().any(|&(net, mask)| a & mask == net)
    }
}

/// The detection engine.
pub struct Engine {
    cfg: DetectConfig,
    /// `cfg.internal`, compiled.
    internal: Internal,
    /// Buffers of [`Self::observe_batch`], kept from batch to batch.
    batch_sides: Vec<Option<Sides>>,
    batch_found: Vec<Option<usize>>,
    /// Records' end times in whole seconds, for the profiles' stamps.
    last_clock: crate::flow::seconds::SecondClock,
    /// A dense map, so that a host's state can be fetched ahead of its records.
    hosts: dense::DenseMap<IpAddr, HostState>,
    /// Bytes each external address sent into the network, and when it last did.
    senders: dense::DenseMap<IpAddr, (u64, SystemTime)>,
    limits: profile::Limits,
    schedule: EvalSchedule,
    pub stats: EngineStats,
}

/// When evaluations are due: every `interval` on a fixed grid from the first (the
/// caller's clock ticks coarsely; the grid keeps evaluations from drifting).
#[derive(Clone, Debug)]
pub struct EvalSchedule {
    next: Option<SystemTime>,
    interval: Duration,
}

impl EvalSchedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            next: None,
            interval,
        }
    }

    /// A new interval, from the next evaluation on.
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Whether an evaluation is due at `now` (always with `force`); if so, the next one
    /// is scheduled.
    pub fn due(&mut self, now: SystemTime, force: bool) -> bool {
        match self.next {
            Some(t) if now < t && !force => return false,
            _ => {}
        }
        let interval = self.interval;
        self.next = Some(match self.next {
            Some(t) if !force && now < t + interval => t + interval,
            _ => now + interval,
        });
        true
    }
}

impl Engine {
    pub fn new(cfg: DetectConfig) -> Self {
        let limits = profile::Limits {
            udp_small_size: cfg.thresholds.udp_small_size,
            peer_bytes_per_min: cfg.thresholds.peer_bytes_per_min,
            window_min: cfg.window.as_secs_f64() / 60.0,
        };
        Self {
            limits,
            schedule: EvalSchedule::new(cfg.eval_interval),
            internal: Internal::new(&cfg),
            batch_sides: Vec::new(),
            batch_found: Vec::new(),
            last_clock: Default::default(),
            cfg,
            hosts: dense::DenseMap::default(),
            senders: dense::DenseMap::default(),
            stats: EngineStats::default(),
        }
    }

    /// Takes a reloaded configuration: thresholds, allow-lists, internal networks,
    /// window and evaluation interval apply from the next record and evaluation; every
    /// profile, open alarm and counter stays. The per-peer limits a profile was built
    /// with (small-datagram size, throttled rate) hold for the peers it already has.
    pub fn reconfigure(&mut self, cfg: DetectConfig) {
        self.limits = profile::Limits {
            udp_small_size: cfg.thresholds.udp_small_size,
            peer_bytes_per_min: cfg.thresholds.peer_bytes_per_min,
            window_min: cfg.window.as_secs_f64() / 60.0,
        };
        self.schedule.set_interval(cfg.eval_interval);
        self.internal = Internal::new(&cfg);
        self.cfg = cfg;
    }

    /// Forgets the peers of the hosts in `range` silent for the window at `now_ms` (a
    /// host is skipped when its oldest peer is still inside the window). In two passes,
    /// so that the memory of each removal can be asked for ahead: first which peers leave,
    /// from the stamps alone; then the removals, fetching each peer and the entry that
    /// takes its place, then their index and port slots, a few removals ahead.
    fn expire_chunk(
        &mut self,
        range: std::ops::Range<usize>,
        now_ms: u64,
        window_ms: u64,
        scratch: &mut ExpiryScratch,
    ) {
        const D: usize = 3;
        let ExpiryScratch {
            positions,
            work,
            oldest,
        } = scratch;
        work.clear();
        oldest.clear();
        let end = range.end;
        for hi in range {
            if hi + 4 < end {
                self.hosts.prefetch_at(hi + 4);
            }
            if hi + 2 < end {
                self.hosts.at(hi + 2).1.profile.prefetch_stamps();
            }
            let p = &self.hosts.at(hi).1.profile;
            positions.clear();
            if let Some(o) = p.expiring(now_ms, window_ms, positions) {
                let len = p.peers.len();
                for (k, &pos) in positions.iter().enumerate() {
                    work.push((hi as u32, pos, (len - 1 - k) as u32));
                }
                oldest.push((hi as u32, o));
            }
        }
        for j in 0..work.len() {
            if let Some(&(h, pos, tail)) = work.get(j + 2 * D) {
                let p = &self.hosts.at(h as usize).1.profile;
                p.prefetch_expiring(pos as usize, tail as usize);
            }
            if let Some(&(h, pos, tail)) = work.get(j + D) {
                let p = &self.hosts.at(h as usize).1.profile;
                p.prefetch_expiring_slots(pos as usize, tail as usize);
            }
            let (h, pos, _) = work[j];
            self.hosts
                .at_mut(h as usize)
                .profile
                .remove_expired(pos as usize);
        }
        for &(h, o) in oldest.iter() {
            self.hosts.at_mut(h as usize).profile.expired(o);
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.cfg.thresholds
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// The most internal hosts profiled at once.
    pub fn max_hosts(&self) -> usize {
        self.cfg.max_hosts
    }

    /// Bytes the engine's tables hold on the heap: the hosts' states and profiles, the
    /// top senders.
    pub fn heap_bytes(&self) -> usize {
        self.hosts.heap_bytes()
            + self
                .hosts
                .iter()
                .map(|(_, h)| h.profile.heap_bytes())
                .sum::<usize>()
            + self.senders.heap_bytes()
    }

    /// Peer entries held over all profiles (the engine's memory is proportional to it).
    pub fn peer_entries(&self) -> usize {
        self.hosts.iter().map(|(_, h)| h.profile.peers.len()).sum()
    }

    /// The `n` hosts of the highest last scores (ties to the lower address), each
    /// evaluated in full against the top senders `top`: score, vetoing guard, every
    /// rule's value and threshold.
    pub fn explain(&mut self, top: &TopSenders, n: usize) -> Vec<(IpAddr, Verdict)> {
        let mut order = self.ranked();
        order.truncate(n);
        order
            .into_iter()
            .map(|(_, ip, i, _)| (ip, self.verdict_at(i, top)))
            .collect()
    }

    /// Every host as (last score, address, position, has an open alarm), highest score
    /// first, ties to the lower address.
    pub(super) fn ranked(&self) -> Vec<(f64, IpAddr, usize, bool)> {
        let mut order: Vec<(f64, IpAddr, usize, bool)> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (ip, h))| (h.last.0, *ip, i, h.alarm.is_some()))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        order
    }

    /// The host at position `i` evaluated in full against the top senders `top`, with
    /// its peak.
    pub(super) fn verdict_at(&mut self, i: usize, top: &TopSenders) -> Verdict {
        let window_min = self.cfg.window.as_secs_f64() / 60.0;
        let h = self.hosts.at_mut(i);
        let mut v =
            evidence::evaluate(&mut h.profile, &self.cfg.thresholds, &top.top10, window_min);
        v.peak = h.peak;
        v
    }

    /// Each tracked host's last score and the guard that vetoed it, highest first.
    pub fn last_scores(&self) -> Vec<(IpAddr, f64, Option<&'static str>)> {
        let mut v: Vec<_> = self
            .hosts
            .iter()
            .map(|(ip, h)| (*ip, h.last.0, h.last.1))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Feeds records in order, asking for each one's memory a few records ahead: with a
    /// hundred thousand hosts, their tables are not in the cache, and waiting for them
    /// one record at a time is most of the cost of a record. Each stage of the lookahead
    /// fetches what the one before made findable: the host's index slot, the host's
    /// state, the peer's and ports' index slots, then their entries.
    pub fn observe_batch(&mut self, records: &[FlowRecord]) {
        const D: usize = 4;
        let mut keys = std::mem::take(&mut self.batch_sides);
        keys.clear();
        keys.extend(records.iter().map(|r| self.sides(r)));
        // Duplicates only note their source: nothing to fetch for them.
        // By reference: the sides are not copied for each of the four looks ahead.
        let at = |i: usize| match keys.get(i) {
            Some(Some(k)) if !records[i].duplicate => Some(k),
            _ => None,
        };
        // The host's position, once looked up for the lookahead (hosts are only appended
        // while records come in, so a position found stays right; one not found yet is
        // looked up again).
        let mut found = std::mem::take(&mut self.batch_found);
        found.clear();
        found.resize(records.len(), None);
        for (i, r) in records.iter().enumerate() {
            if let Some(k) = at(i + 4 * D) {
                self.hosts.prefetch_hashed(k.host_hash);
            }
            if let Some(k) = at(i + 3 * D) {
                self.hosts.prefetch_entry_hashed(k.host_hash);
            }
            if let Some(k) = at(i + 2 * D) {
                found[i + 2 * D] = self.hosts.position_hashed(&k.host, k.host_hash);
                if let Some(pos) = found[i + 2 * D] {
                    self.hosts
                        .at(pos)
                        .1
                        .profile
                        .prefetch_keyed(k.peer_key_hash, k.local, k.remote);
                }
                if !k.host_is_src {
                    self.senders.prefetch_hashed(k.peer_hash);
                }
            }
            if let Some(k) = at(i + D) {
                if !k.host_is_src {
                    self.senders.prefetch_entry_hashed(k.peer_hash);
                }
                if let Some(pos) = found[i + D] {
                    self.hosts
                        .at(pos)
                        .1
                        .profile
                        .prefetch_entries_keyed(k.peer_key_hash);
                }
            }
            self.observe_found(r, keys[i], found[i]);
        }
        self.batch_sides = keys;
        self.batch_found = found;
    }

    /// Which side of `r` is the internal host (None unless exactly one is).
    fn sides(&self, r: &FlowRecord) -> Option<Sides> {
        match (
            self.internal.contains(r.src_addr),
            self.internal.contains(r.dst_addr),
        ) {
            (true, false) => Some(Sides {
                host: r.src_addr,
                peer: r.dst_addr,
                local: r.src_port,
                remote: r.dst_port,
                host_is_src: true,
                host_hash: dense::key_hash(&r.src_addr),
                peer_hash: 0,
                peer_key_hash: profile::peer_hash(&r.dst_addr),
            }),
            (false, true) => Some(Sides {
                host: r.dst_addr,
                peer: r.src_addr,
                local: r.dst_port,
                remote: r.src_port,
                host_is_src: false,
                host_hash: dense::key_hash(&r.dst_addr),
                peer_hash: dense::key_hash(&r.src_addr),
                peer_key_hash: profile::peer_hash(&r.src_addr),
            }),
            _ => None,
        }
    }

    /// Feeds one record. A duplicate (another source's copy was counted) only adds its
    /// source to the host's list of reporters.
    pub fn observe(&mut self, r: &FlowRecord) {
        self.observe_found(r, self.sides(r), None);
    }

    /// [`Self::observe`] with the sides already found, and maybe the host's position.
    fn observe_found(&mut self, r: &FlowRecord, sides: Option<Sides>, found: Option<usize>) {
        self.stats.records += 1;
        // The empty list (the default) asked first: `contains` is a call of its own, two
        // of them 36 instructions a record (callgrind, `micro ingest --in-process`).
        let ports = &self.cfg.allow_ports;
        if !ports.is_empty() && (ports.contains(&r.src_port) || ports.contains(&r.dst_port)) {
            self.stats.allow_listed += 1;
            return;
        }
        let Some(Sides {
            host,
            peer,
            host_is_src,
            host_hash,
            peer_hash,
            peer_key_hash,
            ..
        }) = sides
        else {
            if self.internal.contains(r.src_addr) {
                self.stats.both_internal += 1;
            } else {
                self.stats.neither_internal += 1;
            }
            return;
        };
        if !DetectConfig::usable(peer) || !DetectConfig::usable(host) {
            return;
        }
        if self.cfg.allow_hosts.iter().any(|c| c.contains(host)) {
            self.stats.allow_listed += 1;
            return;
        }
        if r.duplicate {
            self.stats.duplicates_skipped += 1;
            if let Some(h) = self.hosts.get_mut(&host) {
                h.profile.note_source(r);
            }
            return;
        }
        let n_hosts = self.hosts.len();
        let (max_peers, limits) = (self.cfg.max_peers, self.limits);
        let pos = match found.or_else(|| self.hosts.position_hashed(&host, host_hash)) {
            Some(pos) => pos,
            None if n_hosts >= self.cfg.max_hosts => {
                self.stats.hosts_over_limit += 1;
                return;
            }
            None => self.hosts.insert_new(
                host,
                HostState {
                    profile: HostProfile::with_limits(max_peers, limits),
                    over: 0,
                    alarm: None,
                    last: (0.0, None),
                    peak: 0.0,
                },
            ),
        };
        let h = self.hosts.at_mut(pos);
        // Bounded like the hosts: a new sender is tracked only while there is room.
        if !host_is_src {
            let e = match self.senders.position_hashed(&peer, peer_hash) {
                Some(pos) => Some(self.senders.at_mut(pos)),
                None if self.senders.len() < self.cfg.max_hosts * 4 => {
                    let pos = self.senders.insert_new(peer, (0, r.last));
                    Some(self.senders.at_mut(pos))
                }
                None => None,
            };
            if let Some(e) = e {
                e.0 = e.0.saturating_add(r.new_bytes());
                e.1 = e.1.max(r.last);
            }
        }
        let stamp = self.last_clock.ms_secs_up(r.last).min(u64::from(u32::MAX)) as u32;
        h.profile
            .add_stamped_keyed(r, host_is_src, stamp, peer_key_hash);
    }

    /// Evaluates when `eval_interval` has passed since the last evaluation (or always
    /// with `force`); returns the alarm events.
    pub fn tick(&mut self, now: SystemTime, force: bool) -> Vec<AlarmEvent> {
        if !self.schedule.due(now, force) {
            return Vec::new();
        }
        self.evaluate(now)
    }

    fn evaluate(&mut self, now: SystemTime) -> Vec<AlarmEvent> {
        let top = TopSenders::from_shards([self.senders_snapshot()], now, self.cfg.window);
        self.evaluate_with(now, &top)
    }

    /// Phase one of an evaluation split over shards: every external sender this engine
    /// has seen, with its bytes into the network and when it last sent.
    pub fn senders_snapshot(&self) -> Vec<SenderEntry> {
        self.senders
            .iter()
            .map(|(ip, (b, last))| SenderEntry::new(*ip, *b, *last))
            .collect()
    }

    /// Phase two: forgets the senders idle for the window over all shards, then expires
    /// and scores every host with the network's top 10 senders.
    pub fn evaluate_with(&mut self, now: SystemTime, top: &TopSenders) -> Vec<AlarmEvent> {
        self.stats.evaluations += 1;
        let window = self.cfg.window;
        if !top.idle.is_empty() {
            self.senders.retain(|ip, _| !top.idle.contains(ip));
        }
        let top10 = &top.top10;
        let window_min = window.as_secs_f64() / 60.0;
        let mut events = Vec::new();
        let cfg = &self.cfg;
        // With fewer peers than the smallest peer-count threshold, only `flows`,
        // `remote_ports`, `tcp_and_udp_peers` and `failed_connection_share` can fire
        // (weights 1 + 2 + 2 + 1): when that cannot reach the score, such hosts are
        // skipped without the full evaluation.
        let min_peers = if cfg.thresholds.score > 6.0 {
            cfg.thresholds
                .listen_peers
                .min(cfg.thresholds.udp_small_peers)
                .min(cfg.thresholds.peers)
                .min(cfg.thresholds.p2p_port_peers) as usize
        } else {
            0
        };
        let top10_list: Vec<IpAddr> = top10.iter().copied().collect();
        let (now_ms, window_ms) = (profile::unix_ms(now), window.as_millis() as u64);
        let scoring = Scoring {
            now,
            top10,
            top10_list: &top10_list,
            min_peers,
            window_min,
        };
        let mut scratch = ExpiryScratch::default();
        // Host by host in chunks: a chunk's peers expire, then its hosts are scored while
        // their states are still in the cache.
        let n = self.hosts.len();
        for chunk in (0..n).step_by(CHUNK) {
            let range = chunk..(chunk + CHUNK).min(n);
            self.expire_chunk(range.clone(), now_ms, window_ms, &mut scratch);
            self.score_chunk(range, &scoring, &mut events);
        }
        // Hosts with nothing left in the window and no alarm are forgotten.
        self.hosts
            .retain(|_, h| !h.profile.peers.is_empty() || h.alarm.is_some());
        events.sort_by_key(|e| e.host);
        events
    }

    /// Scores the hosts of `range` (after their expiry) and runs their alarms' lifecycle.
    fn score_chunk(
        &mut self,
        range: std::ops::Range<usize>,
        sc: &Scoring,
        events: &mut Vec<AlarmEvent>,
    ) {
        let cfg = &self.cfg;
        let end = range.end;
        for i in range {
            // Scoring looks the top senders up among the host's peers: ask for those index
            // slots two hosts ahead.
            if i + 2 < end {
                self.hosts.at(i + 2).1.profile.prefetch_peers(sc.top10_list);
            }
            let (host, h) = self.hosts.pair_mut(i);
            if h.alarm.is_none()
                && h.profile.peers.len() < sc.min_peers
                && h.profile.peer_count() < sc.min_peers as u64
            {
                h.over = 0;
                h.last = (0.0, None);
                continue;
            }
            // Scored from the aggregates; the full walk only for an event's evidence.
            let (score, guard) = evidence::score(&mut h.profile, &cfg.thresholds, sc.top10);
            let suspect = guard.is_none() && score >= cfg.thresholds.score;
            h.last = (score, guard);
            if guard.is_none() {
                h.peak = h.peak.max(score);
            }
            let full = |p: &mut HostProfile| {
                evidence::evaluate(p, &cfg.thresholds, sc.top10, sc.window_min)
            };
            if suspect {
                h.over += 1;
                if h.over == 1 && h.alarm.is_none() && cfg.consecutive > 1 {
                    log::info!(
                        "host {host} over the threshold (score {:.1} >= {:.1}): an alarm follows if it stays over for {} evaluations",
                        score,
                        cfg.thresholds.score,
                        cfg.consecutive
                    );
                }
            } else {
                h.over = 0;
            }
            match &mut h.alarm {
                None if suspect && h.over >= cfg.consecutive => {
                    let v = full(&mut h.profile);
                    // The episode began with the host's first record of this activity.
                    let began = if h.profile.first_seen == SystemTime::UNIX_EPOCH {
                        sc.now
                    } else {
                        h.profile.first_seen.min(sc.now)
                    };
                    let alarm = Alarm {
                        id: alarm_id(*host, sc.now),
                        first_seen: began,
                        last_over: sc.now,
                        last_event: sc.now,
                        last_score: v.score,
                        last_peers: v.measures.peers,
                        last_verdict: v.clone(),
                        last_seen: h.profile.last_seen,
                    };
                    events.push(event(
                        &alarm,
                        AlarmState::Raised,
                        *host,
                        &v,
                        &h.profile,
                        sc.now,
                        cfg,
                    ));
                    h.alarm = Some(Box::new(alarm));
                }
                Some(a) if suspect => {
                    a.last_over = sc.now;
                    let peers = h.profile.peer_count();
                    let changed = (score - a.last_score).abs() >= 1.0
                        || peers.abs_diff(a.last_peers) * 5 >= a.last_peers.max(1);
                    let due = sc.now.duration_since(a.last_event).unwrap_or_default()
                        >= cfg.update_interval;
                    if changed && due {
                        let v = full(&mut h.profile);
                        a.last_event = sc.now;
                        a.last_score = v.score;
                        a.last_peers = v.measures.peers;
                        a.last_verdict = v.clone();
                        a.last_seen = h.profile.last_seen;
                        events.push(event(
                            a,
                            AlarmState::Updated,
                            *host,
                            &v,
                            &h.profile,
                            sc.now,
                            cfg,
                        ));
                    }
                }
                Some(a)
                    if sc.now.duration_since(a.last_over).unwrap_or_default()
                        >= cfg.clear_after =>
                {
                    let mut v = full(&mut h.profile);
                    // A profile emptied by the window says nothing of the host: report
                    // the state of the alarm's last event.
                    if v.measures.peers == 0 {
                        v = a.last_verdict.clone();
                    }
                    events.push(event(
                        a,
                        AlarmState::Cleared,
                        *host,
                        &v,
                        &h.profile,
                        sc.now,
                        cfg,
                    ));
                    h.alarm = None;
                }
                _ => {}
            }
        }
    }

    /// Ends every open alarm's evaluation (end of a replay): evaluates once more at `now`.
    pub fn finish(&mut self, now: SystemTime) -> Vec<AlarmEvent> {
        self.evaluate(now)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_behaviour;
#[cfg(test)]
mod tests_sampling;

#[cfg(test)]
mod internal_tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            // Near the default networks' edges.
            (
                prop::sample::select(vec![10u8, 100, 172, 192, 9, 11]),
                any::<[u8; 3]>()
            )
                .prop_map(|(a, [b, c, d])| IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            (0xfc00u16..0xfe00, any::<u64>()).prop_map(|(h, l)| IpAddr::V6(Ipv6Addr::from(
                (u128::from(h) << 112) | u128::from(l)
            ))),
            // IPv4-mapped: the IPv4 address, as `Cidr::contains` takes it.
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
            prop::sample::select(vec![10u32 << 24 | 7, 0xc0a8_0101, 0x0808_0808])
                .prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
        ]
    }

    fn prefix() -> impl Strategy<Value = crate::flow::Cidr> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| crate::flow::Cidr {
                addr: IpAddr::V4(Ipv4Addr::from(a)),
                len,
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| crate::flow::Cidr {
                addr: IpAddr::V6(Ipv6Addr::from(a)),
                len,
            }),
            // A mapped prefix: never matches, as `Cidr::contains` canonicalises first.
            (any::<u32>(), 96u8..=128).prop_map(|(a, len)| crate::flow::Cidr {
                addr: IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped()),
                len,
            }),
        ]
    }

    proptest! {
        /// The compiled networks answer as `DetectConfig::is_internal` (each `Cidr`)
        /// does, for the default networks and for any prefixes.
        #[test]
        fn compiled_networks_answer_as_is_internal(
            extra in proptest::collection::vec(prefix(), 0..6),
            defaults in any::<bool>(),
            ips in proptest::collection::vec(addr(), 1..40),
        ) {
            let mut cfg = DetectConfig::default();
            if !defaults {
                cfg.internal.clear();
            }
            cfg.internal.extend(extra);
            let compiled = Internal::new(&cfg);
            for ip in ips {
                prop_assert_eq!(compiled.contains(ip), cfg.is_internal(ip), "{}", ip);
            }
        }
    }
}
