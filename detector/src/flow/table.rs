//! The accounting core: decides, from cumulative per-flow counters and a caller-supplied
//! `now`, which flows to export, which to keep and which to evict, and computes each
//! exported record as a delta against what was already exported.
//!
//! It never reads a clock or a map itself: the XDP source feeds it the kernel's counters
//! (summed over CPUs), the overflow path feeds it counters it aggregated from the ring
//! buffer, and the tests feed it synthetic counters and a fake clock.
//!
//! NetFlow semantics:
//! - a flow idle for the inactive timeout is exported and evicted;
//! - a TCP flow that saw FIN or RST is exported and evicted at the first scan that finds
//!   it quiet (no packet since the scan before). Removing a flow whose packets are still
//!   arriving could lose one: a packet already being counted on another CPU can write its
//!   per-CPU copy just after the kernel copied the counters out and unlinked the entry
//!   (measured: 1 packet in 251,100 of a flow streaming at 34,000 packets/s, removed
//!   every second). Idle flows are quiet by definition;
//! - a flow still active when its active timeout elapses is exported (the packets since
//!   the previous export) and kept; the kernel keeps counting cumulatively, and the next
//!   record carries only the difference, so no packet is counted twice or missed.

use rustc_hash::FxHashMap;

use detector_common::{ExportMark, FlowKey, FlowStats, OverflowEvent, TCP_FIN, TCP_RST};

/// Timeouts in nanoseconds of the flow clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub active_ns: u64,
    pub inactive_ns: u64,
    /// Live flows: how often detection is told of an announced flow's growth (0: never,
    /// only its start and its exports).
    pub grow_ns: u64,
}

impl Timeouts {
    pub fn from_secs(active: u64, inactive: u64) -> Self {
        Self {
            active_ns: active * 1_000_000_000,
            inactive_ns: inactive * 1_000_000_000,
            grow_ns: 0,
        }
    }

    /// Tells detection of each announced flow's growth every `secs` (0: never).
    pub fn with_growth(self, secs: u64) -> Self {
        Self {
            grow_ns: secs * 1_000_000_000,
            ..self
        }
    }
}

/// The packets of one flow between two exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delta {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub tcp_flags: u8,
    pub tos: u8,
    /// Payload [`detector_common::hint`] flags (payload hints only).
    pub hints: u8,
    /// The sizes of the flow's first payload packets ([`FlowStats::opening`]).
    pub opening: [u8; 4],
    /// The flow's start was announced (live flows): detection already counted it.
    pub announced: bool,
    /// A growth report: detection's only, never exported.
    pub growth: bool,
    /// Of this export's packets and bytes, those growth reports already told detection.
    pub told_packets: u64,
    pub told_bytes: u64,
}

/// What the caller must do with a flow after [`FlowTable::observe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to export yet.
    Keep,
    /// Export this record; the flow stays.
    Export(Delta),
    /// Tell detection of this growth of a live flow (never exported); the flow stays.
    Grow(Delta),
    /// The flow ended: remove it atomically from wherever it lives and pass its final
    /// counters to [`FlowTable::evict`].
    Evict,
}

/// Bookkeeping of a flow that was exported at an active timeout, or that ended (FIN/RST)
/// and waits to be found quiet. Other flows need none: a flow never exported has
/// exported nothing, and its period starts with its first packet.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    exported_packets: u64,
    exported_bytes: u64,
    /// Start of the current export period (flow start, then each active-timeout export).
    period_start_ns: u64,
    /// Packets at the previous look (ended flows): unchanged means quiet in between.
    seen_packets: u64,
    /// When this entry was last used; entries of flows gone from the store without an
    /// eviction are forgotten once stale.
    touched_ns: u64,
    /// Live flows: the counters detection was last told of by a growth report, and when.
    told_packets: u64,
    told_bytes: u64,
    told_at_ns: u64,
}

impl Tracked {
    /// What growth reports told detection beyond the last export (packets, bytes).
    fn told_beyond_export(&self) -> (u64, u64) {
        if self.told_packets > self.exported_packets {
            (
                self.told_packets - self.exported_packets,
                self.told_bytes.saturating_sub(self.exported_bytes),
            )
        } else {
            (0, 0)
        }
    }

    fn fresh(first_ns: u64, now_ns: u64) -> Self {
        Self {
            exported_packets: 0,
            exported_bytes: 0,
            period_start_ns: first_ns,
            seen_packets: 0,
            touched_ns: now_ns,
            told_packets: 0,
            told_bytes: 0,
            told_at_ns: 0,
        }
    }
}

/// Export bookkeeping for the flows of one store (the kernel map, or the overflow table).
///
/// Cheap per flow and pass: a flow is looked up in the table only when it ends, when it
/// crosses an active-timeout boundary (`first + k x active`), or while a FIN/RST-ended
/// flow waits to be quiet. A long flow is therefore looked up once per active timeout,
/// not once per pass: with a million concurrent flows read every second, per-flow hash
/// lookups were most of the agent's time.
#[derive(Debug)]
pub struct FlowTable {
    timeouts: Timeouts,
    tracked: FxHashMap<FlowKey, Tracked>,
    /// Start of the current and of the previous pass.
    pass_start_ns: Option<u64>,
    /// How far back the previous look at a flow may be (the time between the last two
    /// pass starts, with a margin); before the second pass, "forever".
    lookback_ns: u64,
    /// With [`FlowTable::keep_journal`]: each change to what was exported of a flow
    /// still in the store (set at an active-timeout export, cleared when the flow goes),
    /// for the caller to persist (see [`FlowTable::take_journal`]).
    journal: Option<Vec<(FlowKey, Option<ExportMark>)>>,
}

/// Sums per-CPU copies of one flow's counters: counts add, first is the earliest, last the
/// latest, flags OR, ToS is that of the earliest packet.
pub fn merge_cpus(values: impl IntoIterator<Item = FlowStats>) -> FlowStats {
    let mut out = FlowStats::default();
    for v in values {
        if v.packets == 0 {
            continue;
        }
        out.packets += v.packets;
        out.bytes += v.bytes;
        if out.first_ns == 0 || v.first_ns < out.first_ns {
            out.first_ns = v.first_ns;
            out.tos = v.tos;
            out.opening = v.opening;
        }
        out.last_ns = out.last_ns.max(v.last_ns);
        out.tcp_flags |= v.tcp_flags;
        out.hints |= v.hints;
        out.announced |= v.announced;
    }
    out
}

/// Adds one overflow event (a packet whose flow did not fit in the kernel map) to a
/// userspace-held counter, exactly as the kernel would have.
pub fn add_event(stats: &mut FlowStats, ev: &OverflowEvent) {
    if stats.packets == 0 || ev.ts_ns < stats.first_ns {
        stats.first_ns = ev.ts_ns;
        stats.tos = ev.tos;
    }
    stats.packets += 1;
    stats.bytes += ev.bytes as u64;
    stats.last_ns = stats.last_ns.max(ev.ts_ns);
    stats.tcp_flags |= ev.tcp_flags;
    stats.hints |= ev.hints;
}

impl FlowTable {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            tracked: FxHashMap::default(),
            pass_start_ns: None,
            lookback_ns: u64::MAX,
            journal: None,
        }
    }

    /// Records every change to what was exported of the flows (pinned state).
    pub fn keep_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// The changes since the last call, in order: the mark to keep for a flow, or none.
    pub fn take_journal(&mut self) -> Vec<(FlowKey, Option<ExportMark>)> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Takes back what an earlier agent exported of a flow still in the store (its
    /// persisted mark), at `now_ns`.
    pub fn restore(&mut self, key: &FlowKey, mark: &ExportMark, now_ns: u64) {
        self.tracked.insert(
            *key,
            Tracked {
                exported_packets: mark.packets,
                exported_bytes: mark.bytes,
                period_start_ns: mark.period_start_ns,
                seen_packets: 0,
                touched_ns: now_ns,
                told_packets: 0,
                told_bytes: 0,
                told_at_ns: 0,
            },
        );
    }

    /// Flows with bookkeeping (exported at an active timeout, or ended and not yet quiet).
    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    /// Starts a pass over every flow of the store at `now_ns` (the pass may be spread
    /// over several reads; each flow is looked at once per pass).
    pub fn begin_pass(&mut self, now_ns: u64) {
        if let Some(prev) = self.pass_start_ns {
            // Half again the last interval, plus a second: a pass that runs a little
            // later than the one before still sees every boundary. A boundary seen twice
            // is exported once (the bookkeeping says the period was exported).
            let interval = now_ns.saturating_sub(prev);
            self.lookback_ns = interval + interval / 2 + 1_000_000_000;
        }
        self.pass_start_ns = Some(now_ns);
    }

    /// Ends a pass: forgets the bookkeeping of flows not used for longer than a live
    /// flow can go without (removed from the store by someone else), so the table
    /// cannot grow without bound.
    pub fn end_pass(&mut self, now_ns: u64) {
        let stale = self
            .timeouts
            .active_ns
            .saturating_add(self.timeouts.inactive_ns)
            .saturating_add(self.lookback_ns.saturating_mul(2));
        let journal = &mut self.journal;
        self.tracked.retain(|key, t| {
            let keep = now_ns.saturating_sub(t.touched_ns) <= stale;
            if !keep
                && t.exported_packets > 0
                && let Some(j) = journal
            {
                j.push((*key, None));
            }
            keep
        });
    }

    /// Looks at a flow's cumulative counters at `now_ns` and says what to do.
    pub fn observe(&mut self, key: &FlowKey, stats: &FlowStats, now_ns: u64) -> Action {
        if stats.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let t = self.track(key, stats.first_ns, now_ns);
            let quiet = t.seen_packets == stats.packets;
            t.seen_packets = stats.packets;
            if quiet {
                return Action::Evict;
            }
        }
        if now_ns.saturating_sub(stats.last_ns) >= self.timeouts.inactive_ns {
            return Action::Evict;
        }
        // Active timeout: export periods start at first + k x active. Only a flow that
        // crossed a boundary since the previous look needs its bookkeeping.
        let active = self.timeouts.active_ns.max(1);
        let age = now_ns.saturating_sub(stats.first_ns);
        let Some(period) = self.crossed(age, active) else {
            return match self.grow(key, stats, now_ns, age) {
                Some(d) => Action::Grow(d),
                None => Action::Keep,
            };
        };
        let boundary = stats.first_ns + period * active;
        let t = self.track(key, stats.first_ns, now_ns);
        if t.period_start_ns >= boundary {
            // Already exported in this period.
            return Action::Keep;
        }
        let delta = delta_since(key, t, stats);
        t.exported_packets = stats.packets;
        t.exported_bytes = stats.bytes;
        t.period_start_ns = now_ns;
        let mark = ExportMark {
            packets: t.exported_packets,
            bytes: t.exported_bytes,
            period_start_ns: t.period_start_ns,
        };
        if let Some(j) = &mut self.journal {
            j.push((*key, Some(mark)));
        }
        match delta {
            Some(d) => Action::Export(d),
            None => Action::Keep,
        }
    }

    /// Live flows: when an announced flow crossed a growth boundary (`first + k x grow`)
    /// since the previous look, what it moved since detection was last told. Like the
    /// active timeout, a flow is looked up only around its boundaries.
    fn grow(&mut self, key: &FlowKey, stats: &FlowStats, now_ns: u64, age: u64) -> Option<Delta> {
        let grow = self.timeouts.grow_ns;
        if grow == 0 || stats.announced == 0 {
            return None;
        }
        let boundary = stats.first_ns + self.crossed(age, grow)? * grow;
        let t = self.track(key, stats.first_ns, now_ns);
        if t.told_at_ns >= boundary {
            return None;
        }
        t.told_at_ns = now_ns;
        let told = t.told_beyond_export();
        let (base_p, base_b) = (t.exported_packets + told.0, t.exported_bytes + told.1);
        let packets = stats.packets.checked_sub(base_p).filter(|p| *p > 0)?;
        t.told_packets = stats.packets;
        t.told_bytes = stats.bytes;
        Some(Delta {
            key: *key,
            packets,
            bytes: stats.bytes.saturating_sub(base_b),
            first_ns: t.period_start_ns.max(stats.first_ns),
            last_ns: stats.last_ns,
            tcp_flags: stats.tcp_flags,
            tos: stats.tos,
            hints: stats.hints,
            opening: stats.opening,
            announced: true,
            growth: true,
            told_packets: 0,
            told_bytes: 0,
        })
    }

    /// The `k`th boundary (`first + k x interval`, k >= 1) when a flow of age `age` crossed
    /// one since the previous look at it; none otherwise.
    fn crossed(&self, age: u64, interval: u64) -> Option<u64> {
        let k = age / interval;
        (k > 0 && age.saturating_sub(self.lookback_ns) / interval != k).then_some(k)
    }

    /// The flow's bookkeeping (made fresh when it has none), marked used at `now_ns`.
    fn track(&mut self, key: &FlowKey, first_ns: u64, now_ns: u64) -> &mut Tracked {
        let t = self
            .tracked
            .entry(*key)
            .or_insert_with(|| Tracked::fresh(first_ns, now_ns));
        t.touched_ns = now_ns;
        t
    }

    /// The flow was removed from its store with these final counters: returns what is
    /// left to export (nothing if every packet was already exported) and forgets it.
    pub fn evict(&mut self, key: &FlowKey, final_stats: &FlowStats) -> Option<Delta> {
        let t = self
            .tracked
            .remove(key)
            .unwrap_or_else(|| Tracked::fresh(final_stats.first_ns, 0));
        if t.exported_packets > 0
            && let Some(j) = &mut self.journal
        {
            j.push((*key, None));
        }
        delta_since(key, &t, final_stats)
    }
}

fn delta_since(key: &FlowKey, t: &Tracked, s: &FlowStats) -> Option<Delta> {
    let packets = s.packets.checked_sub(t.exported_packets)?;
    if packets == 0 {
        return None;
    }
    // What growth reports told of this period (none once it was exported).
    let (told_packets, told_bytes) = t.told_beyond_export();
    Some(Delta {
        key: *key,
        packets,
        bytes: s.bytes.saturating_sub(t.exported_bytes),
        first_ns: t.period_start_ns.max(s.first_ns),
        last_ns: s.last_ns,
        tcp_flags: s.tcp_flags,
        tos: s.tos,
        hints: s.hints,
        opening: s.opening,
        announced: s.announced != 0,
        growth: false,
        told_packets,
        told_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const S: u64 = 1_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            src_port: port,
            dst_port: 80,
            protocol: 6,
            ..FlowKey::default()
        }
    }

    /// A fake flow store: cumulative counters advanced by simulated packets.
    struct Store {
        table: FlowTable,
        flows: HashMap<FlowKey, FlowStats>,
        exported: Vec<Delta>,
        grown: Vec<Delta>,
    }

    impl Store {
        fn new(active: u64, inactive: u64) -> Self {
            Self::with(Timeouts::from_secs(active, inactive))
        }

        fn with(timeouts: Timeouts) -> Self {
            Self {
                table: FlowTable::new(timeouts),
                flows: HashMap::new(),
                exported: Vec::new(),
                grown: Vec::new(),
            }
        }

        fn packet(&mut self, k: FlowKey, bytes: u32, flags: u8, now: u64) {
            let s = self.flows.entry(k).or_default();
            add_event(
                s,
                &OverflowEvent {
                    ts_ns: now,
                    key: k,
                    bytes,
                    tcp_flags: flags,
                    tos: 0,
                    hints: 0,
                    _pad: [0; 1],
                },
            );
        }

        fn scan(&mut self, now: u64) {
            self.table.begin_pass(now);
            let keys: Vec<_> = self.flows.keys().copied().collect();
            for k in keys {
                let s = self.flows[&k];
                match self.table.observe(&k, &s, now) {
                    Action::Keep => {}
                    Action::Export(d) => self.exported.push(d),
                    Action::Grow(d) => self.grown.push(d),
                    Action::Evict => {
                        let fin = self.flows.remove(&k).unwrap();
                        self.exported.extend(self.table.evict(&k, &fin));
                    }
                }
            }
            self.table.end_pass(now);
        }

        fn totals(&self, k: FlowKey) -> (u64, u64) {
            self.exported
                .iter()
                .filter(|d| d.key == k)
                .fold((0, 0), |(p, b), d| (p + d.packets, b + d.bytes))
        }
    }

    #[test]
    fn a_live_flow_grows_for_detection_every_interval_and_its_exports_say_what_was_told() {
        let mut st = Store::with(Timeouts::from_secs(60, 15).with_growth(10));
        let (live, quiet) = (key(4000), key(4001));
        let mut sent = (0u64, 0u64);
        // Two flows, one packet a second each for 200 s, scanning every second; the
        // kernel announced the first one's start.
        for sec in 1..=200u64 {
            for k in [live, quiet] {
                st.packet(k, 100 + sec as u32, 0x10, sec * S);
            }
            st.flows.get_mut(&live).unwrap().announced = 1;
            sent.0 += 1;
            sent.1 += 100 + sec;
            st.scan(sec * S + S / 2);
        }
        st.scan(300 * S);
        // The export is as without growth reports: every packet once.
        assert_eq!(st.totals(live), sent);
        assert_eq!(st.totals(quiet), sent);
        assert!(st.grown.iter().all(|d| d.key == live && d.growth));
        // A report at each 10 s boundary that is not an active-timeout export's.
        assert!(
            (16..=20).contains(&st.grown.len()),
            "{} growth reports",
            st.grown.len()
        );
        let gaps: Vec<u64> = st
            .grown
            .windows(2)
            .map(|w| (w[1].last_ns - w[0].last_ns) / S)
            .collect();
        assert!(gaps.iter().all(|g| (10..=20).contains(g)), "{gaps:?}");
        // Detection is told every packet exactly once: growth, plus each export less
        // what growth had told of it.
        let told: (u64, u64) = st
            .grown
            .iter()
            .fold((0, 0), |(p, b), d| (p + d.packets, b + d.bytes));
        let rest = st
            .exported
            .iter()
            .filter(|d| d.key == live)
            .fold((0, 0), |(p, b), d| {
                (p + d.packets - d.told_packets, b + d.bytes - d.told_bytes)
            });
        assert_eq!((told.0 + rest.0, told.1 + rest.1), sent);
        assert!(st.exported.iter().any(|d| d.told_packets > 0));
    }

    #[test]
    fn idle_flow_is_exported_once_after_inactive_timeout() {
        let mut st = Store::new(60, 15);
        let k = key(1000);
        for i in 0..5 {
            st.packet(k, 100, 0x10, S + i * S / 10);
        }
        st.scan(10 * S);
        assert!(
            st.exported.is_empty(),
            "exported before the inactive timeout"
        );
        st.scan(S + 4 * S / 10 + 15 * S);
        assert_eq!(st.exported.len(), 1);
        let d = st.exported[0];
        assert_eq!((d.packets, d.bytes), (5, 500));
        assert_eq!(d.first_ns, S);
        assert_eq!(d.last_ns, S + 4 * S / 10);
        assert!(st.flows.is_empty() && st.table.is_empty());
    }

    #[test]
    fn long_flow_exports_deltas_at_each_active_timeout_without_double_counting() {
        let mut st = Store::new(60, 15);
        let k = key(2000);
        let mut sent = (0u64, 0u64);
        // One packet a second for 200 s, scanning every second.
        for sec in 1..=200u64 {
            st.packet(k, 60 + sec as u32, 0x10, sec * S);
            sent.0 += 1;
            sent.1 += 60 + sec;
            st.scan(sec * S + S / 2);
        }
        // Active timeout at 61, 121, 181 s after the first packet: three partial records.
        assert_eq!(st.exported.len(), 3);
        assert_eq!(st.exported[0].first_ns, S);
        assert_eq!(st.exported[1].first_ns, st.exported[0].last_ns + S / 2);
        st.scan(200 * S + 15 * S);
        assert_eq!(st.exported.len(), 4);
        assert_eq!(st.totals(k), sent);
        for w in st.exported.windows(2) {
            assert!(w[0].last_ns < w[1].first_ns, "records overlap: {w:?}");
        }
    }

    #[test]
    fn fin_or_rst_ends_the_flow_at_the_first_scan_that_finds_it_quiet() {
        let mut st = Store::new(60, 15);
        let (a, b) = (key(1), key(2));
        st.packet(a, 60, 0x02, S);
        st.packet(a, 52, 0x11, 2 * S);
        st.packet(b, 60, 0x02, S);
        st.packet(b, 40, 0x04, 2 * S);
        st.packet(key(3), 60, 0x02, S);
        st.scan(2 * S + S / 2);
        assert!(st.exported.is_empty(), "removed while it could be busy");
        st.scan(3 * S);
        assert_eq!(st.totals(a), (2, 112));
        assert_eq!(st.totals(b), (2, 100));
        assert_eq!(st.totals(key(3)), (0, 0));
        // A late ACK after FIN starts a new flow record.
        st.packet(a, 52, 0x10, 3 * S);
        st.scan(20 * S);
        assert_eq!(st.totals(a), (3, 164));
        assert_eq!(st.totals(key(3)), (1, 60));
    }

    #[test]
    fn a_finished_flow_whose_packets_keep_coming_is_removed_only_once_quiet() {
        let mut st = Store::new(5, 15);
        let k = key(11);
        let mut sent = 0;
        // FIN seen at once, then a packet every 100 ms for 20 s, scanned every second.
        for i in 0..200u64 {
            st.packet(k, 40, 0x11, S + i * S / 10);
            sent += 1;
            if i % 10 == 9 {
                st.scan(S + i * S / 10 + S / 20);
                assert!(st.flows.contains_key(&k), "removed while busy at {i}");
            }
        }
        // Exported by the active timeout meanwhile, then removed once quiet.
        assert!(st.exported.len() >= 3);
        st.scan(22 * S);
        st.scan(23 * S);
        assert!(st.flows.is_empty());
        assert_eq!(st.totals(k), (sent, sent * 40));
    }

    #[test]
    fn silent_period_after_active_export_emits_no_empty_record() {
        let mut st = Store::new(10, 30);
        let k = key(7);
        st.packet(k, 100, 0, S);
        st.packet(k, 100, 0, 5 * S);
        st.scan(11 * S);
        assert_eq!(st.exported.len(), 1);
        st.scan(22 * S);
        assert_eq!(
            st.exported.len(),
            1,
            "a record with zero packets was exported"
        );
        st.scan(36 * S);
        assert_eq!(st.exported.len(), 1);
        assert_eq!(st.totals(k), (2, 200));
        assert!(st.flows.is_empty());
    }

    #[test]
    fn bookkeeping_of_vanished_flows_is_forgotten() {
        let mut t = FlowTable::new(Timeouts::from_secs(60, 15));
        let s = FlowStats {
            packets: 1,
            bytes: 1,
            first_ns: S,
            last_ns: 70 * S,
            tcp_flags: 0x10,
            ..Default::default()
        };
        t.begin_pass(70 * S);
        // Exported at its first active timeout: it has bookkeeping from now on.
        assert!(matches!(t.observe(&key(1), &s, 70 * S), Action::Export(_)));
        t.end_pass(70 * S);
        assert_eq!(t.len(), 1);
        // The flow vanishes from the store; its bookkeeping goes once stale.
        for sec in 71..200 {
            t.begin_pass(sec * S);
            t.end_pass(sec * S);
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_long_flow_is_looked_up_only_around_its_active_timeouts() {
        let mut st = Store::new(60, 15);
        let k = key(12);
        for sec in 1..=300u64 {
            st.packet(k, 100, 0x10, sec * S);
            st.scan(sec * S + S / 2);
            // Bookkeeping only once exported, and the delta records follow the period
            // boundaries first + k x 60 s exactly once each.
            assert_eq!(st.table.len(), usize::from(sec >= 61));
        }
        assert_eq!(st.exported.len(), 4);
        for (i, d) in st.exported.iter().enumerate() {
            assert_eq!(d.last_ns, (61 + 60 * i as u64) * S);
        }
    }

    #[test]
    fn evicting_an_unseen_flow_exports_all_of_it() {
        let mut t = FlowTable::new(Timeouts::from_secs(60, 15));
        let s = FlowStats {
            packets: 3,
            bytes: 300,
            first_ns: S,
            last_ns: 2 * S,
            ..Default::default()
        };
        let d = t.evict(&key(9), &s).unwrap();
        assert_eq!(
            (d.packets, d.bytes, d.first_ns, d.last_ns),
            (3, 300, S, 2 * S)
        );
    }

    #[test]
    fn per_cpu_copies_merge() {
        let a = FlowStats {
            packets: 2,
            bytes: 200,
            first_ns: 5,
            last_ns: 9,
            tcp_flags: 0x02,
            tos: 4,
            hints: 0,
            announced: 0,
            opening: [17, 0, 0, 0],
        };
        let b = FlowStats {
            packets: 1,
            bytes: 50,
            first_ns: 3,
            last_ns: 7,
            tcp_flags: 0x10,
            tos: 8,
            hints: 0,
            announced: 0,
            opening: [24, 200, 0, 0],
        };
        let m = merge_cpus([a, FlowStats::default(), b]);
        assert_eq!((m.packets, m.bytes, m.first_ns, m.last_ns), (3, 250, 3, 9));
        assert_eq!((m.tcp_flags, m.tos), (0x12, 8));
        // The opening is that of the copy that saw the first packet.
        assert_eq!(m.opening, [24, 200, 0, 0]);
    }
}
