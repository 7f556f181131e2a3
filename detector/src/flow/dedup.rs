//! Marks records that another source already reported: the same flow (same 5-tuple, same
//! direction of travel) seen by two exporters, or by an exporter and the local meter, over
//! overlapping time. The first source to report a flow owns it; records of the same flow
//! from other sources whose time range overlaps the owner's are marked `duplicate`, so
//! statistics count the flow once while every raw record is still exported unchanged.
//!
//! Pure: times come from the records and from the caller's `now`. Memory is bounded by
//! `max_flows`; entries are forgotten once idle for `window`.

use std::net::IpAddr;

use std::time::{Duration, SystemTime};

use crate::detect::dense::DenseMap;

use super::{FlowRecord, Origin};

type Tuple = (IpAddr, IpAddr, u16, u16, u8);

#[derive(Clone, Copy, Debug)]
struct Owner {
    origin: Origin,
    first: SystemTime,
    last: SystemTime,
}

/// Counters of the deduplicator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub records: u64,
    pub duplicates: u64,
    /// Records not checked because the table was full (counted as unique).
    pub table_full: u64,
}

pub struct Dedup {
    window: Duration,
    /// Slack on overlap tests: exporters' clocks and active timeouts differ.
    slack: Duration,
    max_flows: usize,
    /// A dense map: its slots can be fetched ahead ([`Dedup::mark_batch`]).
    owners: DenseMap<Tuple, Owner>,
    /// Expiry walks the table at most every tenth of the window.
    next_expire: Option<SystemTime>,
    pub stats: DedupStats,
}

impl Dedup {
    pub fn new(window: Duration, max_flows: usize) -> Self {
        Self {
            window,
            slack: Duration::from_secs(2),
            max_flows,
            owners: DenseMap::default(),
            next_expire: None,
            stats: DedupStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.owners.heap_bytes()
    }

    /// [`Self::mark`] for each record, asking for each one's table slot and entry a few
    /// records ahead (with millions of flows, the table is not in the cache).
    pub fn mark_batch(&mut self, records: &mut [FlowRecord]) {
        const D: usize = 4;
        for i in 0..records.len() {
            if let Some(r) = records.get(i + 2 * D) {
                self.owners.prefetch(&key_of(r));
            }
            if let Some(r) = records.get(i + D) {
                self.owners.prefetch_entry(&key_of(r));
            }
            self.mark(&mut records[i]);
        }
    }

    /// Sets `r.duplicate` when another source owns this flow over an overlapping time.
    pub fn mark(&mut self, r: &mut FlowRecord) {
        self.stats.records += 1;
        let key = key_of(r);
        let full = self.owners.len() >= self.max_flows;
        let slack = self.slack;
        match self.owners.position(&key) {
            Some(pos) => {
                let o = self.owners.at_mut(pos);
                if o.origin != r.origin && overlaps(o, r, slack) {
                    r.duplicate = true;
                    self.stats.duplicates += 1;
                    o.last = o.last.max(r.last);
                } else if o.origin == r.origin {
                    o.first = o.first.min(r.first);
                    o.last = o.last.max(r.last);
                } else {
                    // Another source, but its period is over: this source takes the flow.
                    *o = Owner {
                        origin: r.origin,
                        first: r.first,
                        last: r.last,
                    };
                }
            }
            None if full => self.stats.table_full += 1,
            None => {
                self.owners.insert_new(
                    key,
                    Owner {
                        origin: r.origin,
                        first: r.first,
                        last: r.last,
                    },
                );
            }
        }
    }

    /// Forgets flows idle for the window at `now`. The walk is made at most every tenth
    /// of the window (the caller may call this every second): a flow idle for longer
    /// than the window can no longer overlap a new record, so keeping it a little longer
    /// changes no verdict.
    pub fn expire(&mut self, now: SystemTime) {
        let window = self.window;
        if self.next_expire.is_some_and(|t| now < t) {
            return;
        }
        self.next_expire = Some(now + window / 10);
        self.owners
            .retain(|_, o| now.duration_since(o.last).unwrap_or(Duration::ZERO) < window);
        self.owners.shrink();
    }
}

fn key_of(r: &FlowRecord) -> Tuple {
    (r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.protocol)
}

fn overlaps(o: &Owner, r: &FlowRecord, slack: Duration) -> bool {
    r.first <= o.last + slack && o.first <= r.last + slack
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

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
        for p in 0..500 {
            d.mark(&mut rec(exporter(1), p, 0, 1));
        }
        assert_eq!(d.len(), 100);
        assert_eq!(d.stats.table_full, 400);
        d.expire(t(30));
        assert_eq!(d.len(), 100);
        d.expire(t(62));
        assert!(d.is_empty());
    }
}
