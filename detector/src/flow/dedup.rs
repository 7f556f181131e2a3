//! Marks records that another source already reported: the same flow (same 5-tuple, same
//! direction of travel) seen by two exporters, or by an exporter and the local meter, over
//! overlapping time. The first source to report a flow owns it; records of the same flow
//! from other sources whose time range overlaps the owner's are marked `duplicate`, so
//! statistics count the flow once while every raw record is still exported unchanged.
//!
//! Pure: times come from the records and from the caller's `now`.
//!
//! The table is a cache of fixed size: `max_flows` slots of 16 bytes in buckets of four,
//! one cache line each. A slot holds a 48-bit tag of the flow's key (from a hash keyed at
//! random for each process, so no one can aim collisions at it), the owner (an index into
//! the sources seen) and the owner's first and last second. Every record is checked: a
//! flow not found takes an empty slot of its bucket, or the slot idle the longest; when
//! that one was still inside its window, it is counted in `evicted_early` (a later copy of
//! that flow from another source would then count twice). Two different flows share a
//! tag in a bucket with a probability of about 2^-42 a record.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use foldhash::quality::RandomState;
use rustc_hash::FxHashMap;

use super::seconds::SecondClock;
use super::{FlowRecord, Origin};

const WAYS: usize = 4;

/// One flow: tag << 16 | owner (0 is empty), first second (rounded down), last second
/// (rounded up).
#[derive(Clone, Copy, Default)]
struct Slot {
    tag_owner: u64,
    first: u32,
    last: u32,
}

/// Four slots: one cache line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket([Slot; WAYS]);

/// Counters of the deduplicator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub records: u64,
    pub duplicates: u64,
    /// Flows forgotten to make room while still inside their window.
    pub evicted_early: u64,
    /// Records whose source could not get an owner index (more than 65,535 sources):
    /// counted as unique.
    pub too_many_sources: u64,
}

pub struct Dedup {
    window_s: u32,
    /// Slack on overlap tests: exporters' clocks and active timeouts differ.
    slack_s: u32,
    buckets: Box<[Bucket]>,
    hasher: RandomState,
    /// Owner index of each source seen, from 1 (0 marks an empty slot).
    owner_ids: FxHashMap<Origin, u16>,
    /// The last source looked up: the records of a batch come from one source.
    last_owner: Option<(Origin, u16)>,
    /// Occupied slots.
    len: usize,
    /// Expiry walks the table at most every tenth of the window.
    next_expire: Option<SystemTime>,
    /// Records' start and end times in whole seconds (see [`SecondClock`]).
    first_clock: SecondClock,
    last_clock: SecondClock,
    pub stats: DedupStats,
}

/// `n` empty buckets, from memory the kernel hands out zeroed: the table's pages become
/// resident only as flows land in them, instead of all at once.
fn zeroed_buckets(n: usize) -> Box<[Bucket]> {
    // SAFETY: a bucket is integers only, and all-zero integers are valid (and an empty
    // bucket).
    unsafe { Box::<[Bucket]>::new_zeroed_slice(n).assume_init() }
}

fn secs_down(t: SystemTime) -> u32 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

impl Dedup {
    /// A table of `max_flows` slots (rounded up to whole buckets, a power of two of them).
    pub fn new(window: Duration, max_flows: usize) -> Self {
        let buckets = max_flows.div_ceil(WAYS).next_power_of_two().max(1);
        Self {
            window_s: window.as_secs().min(u64::from(u32::MAX)) as u32,
            slack_s: 2,
            buckets: zeroed_buckets(buckets),
            hasher: RandomState::default(),
            last_owner: None,
            owner_ids: FxHashMap::default(),
            len: 0,
            next_expire: None,
            first_clock: SecondClock::default(),
            last_clock: SecondClock::default(),
            stats: DedupStats::default(),
        }
    }

    /// Flows held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flows the table can hold.
    pub fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<Bucket>()
    }

    /// The hash of a record's flow key (addresses, ports, protocol), from three words
    /// rather than field by field (each address with its variant, each port and the
    /// protocol on their own): with the ring of [`Self::mark_batch`], 25 instructions a
    /// record fewer (callgrind, `micro ingest --in-process`). An IPv4 address and an IPv6
    /// one of the same bits stay apart (their kinds are in the last word).
    #[inline]
    fn hash(&self, r: &FlowRecord) -> u64 {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(a) => (u128::from(a.to_bits()), 1u64),
            IpAddr::V6(a) => (a.to_bits(), 0),
        };
        let ((src, src_v4), (dst, dst_v4)) = (bits(r.src_addr), bits(r.dst_addr));
        let rest = u64::from(r.src_port)
            | u64::from(r.dst_port) << 16
            | u64::from(r.protocol) << 32
            | src_v4 << 40
            | dst_v4 << 41;
        self.hasher.hash_one((src, dst, rest))
    }

    /// [`Self::mark`] for each record, asking for each one's bucket a few records ahead
    /// (with millions of flows, the table is not in the cache).
    pub fn mark_batch(&mut self, records: &mut [FlowRecord]) {
        const D: usize = 4;
        // The hashes of the records from `i` to `i + D`, in a ring (not a vector
        // allocated for every batch).
        let mut ring = [0u64; D + 1];
        let mask = self.buckets.len() - 1;
        for (i, r) in records.iter().take(D).enumerate() {
            ring[i] = self.hash(r);
        }
        for i in 0..records.len() {
            if let Some(ahead) = records.get(i + D) {
                let h = self.hash(ahead);
                ring[(i + D) % (D + 1)] = h;
                crate::mem::prefetch(&self.buckets[h as usize & mask]);
            }
            self.mark_hashed(&mut records[i], ring[i % (D + 1)]);
        }
    }

    /// Sets `r.duplicate` when another source owns this flow over an overlapping time.
    pub fn mark(&mut self, r: &mut FlowRecord) {
        let h = self.hash(r);
        self.mark_hashed(r, h);
    }

    fn owner_id(&mut self, origin: Origin) -> Option<u16> {
        match self.last_owner {
            Some((o, id)) if o == origin => return Some(id),
            _ => {}
        }
        let id = match self.owner_ids.get(&origin) {
            Some(&id) => id,
            None => {
                let id = u16::try_from(self.owner_ids.len() + 1).ok()?;
                self.owner_ids.insert(origin, id);
                id
            }
        };
        self.last_owner = Some((origin, id));
        Some(id)
    }

    fn mark_hashed(&mut self, r: &mut FlowRecord, h: u64) {
        self.stats.records += 1;
        let Some(owner) = self.owner_id(r.origin) else {
            self.stats.too_many_sources += 1;
            return;
        };
        // The low bits chose the bucket; the tag is from the high 48 (never 0).
        let tag = (h >> 16).max(1);
        // As secs_down and secs_up, without a conversion when the second is the last one's.
        let clamp = |s: u64| s.min(u64::from(u32::MAX)) as u32;
        let (first, last) = (
            clamp(self.first_clock.secs_down(r.first)),
            clamp(self.last_clock.secs_up(r.last)),
        );
        let (window, slack) = (self.window_s, self.slack_s);
        let mask = self.buckets.len() - 1;
        let bucket = &mut self.buckets[h as usize & mask].0;
        if let Some(slot) = bucket.iter_mut().find(|s| s.tag_owner >> 16 == tag) {
            let held = (slot.tag_owner & 0xffff) as u16;
            let overlap = first <= slot.last.saturating_add(slack)
                && slot.first <= last.saturating_add(slack);
            if held != owner && overlap {
                r.duplicate = true;
                self.stats.duplicates += 1;
                slot.last = slot.last.max(last);
            } else if held == owner {
                slot.first = slot.first.min(first);
                slot.last = slot.last.max(last);
            } else {
                // Another source, but its period is over: this source takes the flow.
                *slot = Slot {
                    tag_owner: tag << 16 | u64::from(owner),
                    first,
                    last,
                };
            }
            return;
        }
        // A new flow: an empty slot, or the one idle the longest.
        let victim = bucket
            .iter_mut()
            .min_by_key(|s| (s.tag_owner != 0, s.last))
            .expect("a bucket has slots");
        if victim.tag_owner == 0 {
            self.len += 1;
        } else if victim.last.saturating_add(window) > last {
            self.stats.evicted_early += 1;
        }
        *victim = Slot {
            tag_owner: tag << 16 | u64::from(owner),
            first,
            last,
        };
    }

    /// Empties the slots of flows idle for the window at `now`, so that `len` counts the
    /// flows still remembered. The walk is made at most every tenth of the window (the
    /// caller may call this every second): an idle flow can no longer overlap a new
    /// record, and a new flow takes its slot anyway.
    pub fn expire(&mut self, now: SystemTime) {
        if self.next_expire.is_some_and(|t| now < t) {
            return;
        }
        self.next_expire = Some(now + Duration::from_secs(u64::from(self.window_s)) / 10);
        let now_s = secs_down(now);
        let window = self.window_s;
        let mut emptied = 0;
        for b in &mut self.buckets {
            for s in &mut b.0 {
                if s.tag_owner != 0 && s.last.saturating_add(window) <= now_s {
                    *s = Slot::default();
                    emptied += 1;
                }
            }
        }
        self.len -= emptied;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn exporter(n: u8) -> Origin {
        Origin::Exporter {
            addr: SocketAddr::new(IpAddr::from([192, 0, 2, n]), 2055),
            domain: 0,
        }
    }

    fn rec(origin: Origin, sport: u16, first: u64, last: u64) -> FlowRecord {
        FlowRecord {
            packets: 10,
            bytes: 1000,
            first: t(first),
            last: t(last),
            ifindex: 1,
            origin,
            ..FlowRecord::new(
                "10.0.0.1".parse().unwrap(),
                sport,
                "198.18.0.1".parse().unwrap(),
                6881,
                6,
            )
        }
    }

    #[test]
    fn the_same_flow_from_three_sources_counts_once() {
        let mut d = Dedup::new(Duration::from_secs(300), 1000);
        let mut a = rec(exporter(1), 5000, 0, 30);
        let mut b = rec(exporter(2), 5000, 1, 31);
        let mut c = rec(Origin::Local, 5000, 0, 29);
        d.mark(&mut a);
        d.mark(&mut b);
        d.mark(&mut c);
        assert!(!a.duplicate && b.duplicate && c.duplicate);
        // The owner's next record of the same flow is not a duplicate.
        let mut a2 = rec(exporter(1), 5000, 31, 60);
        d.mark(&mut a2);
        assert!(!a2.duplicate);
        assert_eq!(d.stats.duplicates, 2);
    }

    #[test]
    fn different_flows_and_later_periods_are_not_duplicates() {
        let mut d = Dedup::new(Duration::from_secs(300), 1000);
        let mut a = rec(exporter(1), 5000, 0, 10);
        let mut other_port = rec(exporter(2), 5001, 0, 10);
        let mut later = rec(exporter(2), 5000, 100, 110);
        d.mark(&mut a);
        d.mark(&mut other_port);
        d.mark(&mut later);
        assert!(!a.duplicate && !other_port.duplicate && !later.duplicate);
    }

    #[test]
    fn memory_is_bounded_and_idle_flows_are_forgotten() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        assert_eq!(d.capacity(), 128, "100 flows round up to 32 buckets of 4");
        // 5,000 flows over 32 buckets (the hash is seeded at random): a bucket left
        // with fewer than its 4 flows is all but impossible (with 500, about 1 run in
        // 250 left one short).
        for p in 0..5000 {
            d.mark(&mut rec(exporter(1), p, 0, 1));
        }
        assert_eq!(d.len(), 128, "every slot taken, none more");
        assert_eq!(d.heap_bytes(), 128 * 16);
        // Every flow was still inside its window when it lost its slot.
        assert_eq!(d.stats.evicted_early, 5000 - 128);
        d.expire(t(30));
        assert_eq!(d.len(), 128);
        d.expire(t(62));
        assert!(d.is_empty());
    }

    #[test]
    fn every_copy_is_found_among_many_flows_and_no_other() {
        // 10,000 flows from one exporter, then the same from a second and 10,000 others:
        // with ample room (a bucket of four overflows with a chance of about 1e-8 here),
        // exactly the 10,000 copies are duplicates.
        let mut d = Dedup::new(Duration::from_secs(600), 1_000_000);
        for p in 0..10_000u16 {
            d.mark(&mut rec(exporter(1), p, 0, 30));
        }
        let mut dups = 0;
        for p in 0..20_000u16 {
            let mut r = rec(exporter(2), p, 1, 31);
            d.mark(&mut r);
            dups += u32::from(r.duplicate);
            assert_eq!(r.duplicate, p < 10_000, "port {p}");
        }
        assert_eq!(dups, 10_000);
        assert_eq!(d.stats.duplicates, 10_000);
        assert_eq!(d.stats.evicted_early, 0);
    }

    #[test]
    fn batches_mark_as_single_records_do() {
        let (mut one, mut batch) = (
            Dedup::new(Duration::from_secs(600), 1000),
            Dedup::new(Duration::from_secs(600), 1000),
        );
        // One process, one hash key: both tables see the same buckets.
        batch.hasher = one.hasher.clone();
        let mut recs: Vec<FlowRecord> = (0..3000u16)
            .map(|i| {
                rec(
                    exporter((i % 3) as u8 + 1),
                    i % 700,
                    u64::from(i % 50),
                    u64::from(i % 50) + 5,
                )
            })
            .collect();
        let mut singles = recs.clone();
        for r in &mut singles {
            one.mark(r);
        }
        batch.mark_batch(&mut recs);
        let flags = |v: &[FlowRecord]| v.iter().map(|r| r.duplicate).collect::<Vec<_>>();
        assert_eq!(flags(&singles), flags(&recs));
        assert_eq!(one.stats, batch.stats);
    }
}
