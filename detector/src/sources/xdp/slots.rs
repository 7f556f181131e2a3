//! The drain of the slot table `FLOWS4_SLOTS` (issue #21): the array is memory-mapped and
//! its slots read in place, through the same [`FlowTable`] bookkeeping as the hash maps.
//!
//! Removal is safe against packets being counted on other CPUs: a flow to evict is moved
//! LIVE -> RETIRING by compare-and-swap (packets that read RETIRING pass it by and insert
//! their flow afresh further on), its counters read and exported at once; at a later pass,
//! [`GRACE`] at least after the move, when no packet that read LIVE can still be adding
//! to it, the counters are read again, whatever arrived in between exported as a record
//! of its own, and the slot set to TOMBSTONE. A TOMBSTONE becomes EMPTY again when the
//! slot after it is EMPTY (see the eBPF crate's `slots` module for the insert side).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aya::maps::MapData;
use detector_common::{FlowKey4, FlowSlot, FlowStats, slot};

use crate::flow::table::{Action, Delta, FlowTable, Timeouts};

/// How long after LIVE -> RETIRING the final counters are read: far longer than a
/// program run (microseconds), so every packet that read LIVE has finished its adds.
pub const GRACE: Duration = Duration::from_millis(20);

/// The grace waited out when the agent stops (or leaves the table to the next agent):
/// longer than [`GRACE`] since it costs nothing then, so that a program run stalled a
/// while (a virtual CPU descheduled) still finishes before the last read.
pub const EXIT_GRACE: Duration = Duration::from_millis(200);

/// A memory-mapped array of [`FlowSlot`]s (the kernel lays them out 64 bytes apart).
pub struct SlotMemory {
    ptr: *mut FlowSlot,
    cap: usize,
    /// The mapping of the map's memory, and the map (None: memory of the tests' own).
    _mapped: Option<(memmap2::MmapRaw, MapData)>,
    _owned: Option<Vec<FlowSlot>>,
}

// SAFETY: the memory lives as long as the struct; slots are read with volatile loads and
// control words changed only through atomics.
unsafe impl Send for SlotMemory {}

impl SlotMemory {
    /// Maps a `BPF_F_MMAPABLE` array map of [`FlowSlot`]s, shared.
    pub fn map(map: MapData) -> io::Result<Self> {
        let cap = map
            .info()
            .map_err(|e| io::Error::other(e.to_string()))?
            .max_entries() as usize;
        let mem = memmap2::MmapOptions::new()
            .len(cap * size_of::<FlowSlot>())
            .map_raw(map.fd().as_fd().as_raw_fd())?;
        Ok(Self {
            ptr: mem.as_mut_ptr().cast(),
            cap,
            _mapped: Some((mem, map)),
            _owned: None,
        })
    }

    /// Memory of `cap` slots (a power of two) of the caller's own (tests).
    pub fn owned(cap: usize) -> Self {
        let mut v = vec![FlowSlot::default(); cap];
        Self {
            ptr: v.as_mut_ptr(),
            cap,
            _mapped: None,
            _owned: Some(v),
        }
    }

    /// The kernel memory of the map (fdinfo `memlock`), if it is a map.
    pub fn kernel_bytes(&self) -> Option<u64> {
        self._mapped
            .as_ref()
            .and_then(|(_, m)| super::map_kernel_bytes(m))
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Slot `i`'s control word.
    pub fn ctrl(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.cap);
        // SAFETY: within the mapping, 4-aligned (slots are 64 bytes apart, page aligned).
        unsafe { AtomicU32::from_ptr(&raw mut (*self.ptr.add(i)).ctrl) }
    }

    /// Slot `i`'s key and counters as they are now.
    pub fn read(&self, i: usize) -> (FlowKey4, FlowStats) {
        assert!(i < self.cap);
        // SAFETY: within the mapping; plain integers, any bit pattern is valid.
        unsafe {
            let s = self.ptr.add(i);
            (
                std::ptr::read_volatile(&raw const (*s).key),
                std::ptr::read_volatile(&raw const (*s).stats),
            )
        }
    }

    /// Writes slot `i` whole (tests: the kernel's side).
    pub fn write(&self, i: usize, key: FlowKey4, stats: FlowStats) {
        assert!(i < self.cap);
        // SAFETY: within the mapping.
        unsafe {
            let s = self.ptr.add(i);
            std::ptr::write_volatile(&raw mut (*s).key, key);
            std::ptr::write_volatile(&raw mut (*s).stats, stats);
        }
    }

    /// Empties slot `i` (programs detached, or tests).
    fn clear(&self, i: usize) {
        self.write(i, FlowKey4::default(), FlowStats::default());
        self.ctrl(i).store(slot::EMPTY, Ordering::Release);
    }
}

/// A flow moved to RETIRING, exported as of `exported`, waiting for its final counters.
struct Retiring {
    index: usize,
    exported: FlowStats,
    since: Instant,
}

/// The slot table and its export bookkeeping.
pub struct SlotFlows {
    pub(super) mem: SlotMemory,
    pub(super) table: FlowTable,
    ifindex: u32,
    retiring: Vec<Retiring>,
    /// LIVE slots seen by the last pass.
    pub(super) live: usize,
}

impl SlotFlows {
    pub fn new(mem: SlotMemory, timeouts: Timeouts, ifindex: u32) -> Self {
        Self {
            mem,
            table: FlowTable::new(timeouts),
            ifindex,
            retiring: Vec::new(),
            live: 0,
        }
    }

    /// One pass: the flows retired by an earlier pass are finished, then every LIVE slot
    /// observed (exports at active timeouts, ended and idle flows retired), and
    /// tombstones freed where they can be.
    pub fn scan(&mut self, now_ns: u64, out: &mut Vec<Delta>) {
        self.table.begin_pass(now_ns);
        // Slots made TOMBSTONE now stay so until the next pass: an insert that read one
        // while it was RETIRING (and so went on past it) may be claiming the EMPTY slot
        // after it right now, and emptying this one too would cut that flow off.
        let fresh = self.finish_retiring(out, false);
        let pending: std::collections::HashSet<usize> =
            self.retiring.iter().map(|r| r.index).collect();
        let mask = self.mem.cap() - 1;
        let mut live = 0;
        // Backwards, so that a run of tombstones empties in one pass.
        for i in (0..self.mem.cap()).rev() {
            let c = self.mem.ctrl(i).load(Ordering::Acquire);
            match c & slot::STATE_MASK {
                slot::LIVE => {
                    live += 1;
                    let (k, stats) = self.mem.read(i);
                    let key = k.widen(self.ifindex);
                    match self.table.observe(&key, &stats, now_ns) {
                        Action::Keep => {}
                        Action::Export(d) | Action::Grow(d) => out.push(d),
                        Action::Evict => self.retire(i, c, out),
                    }
                }
                slot::TOMBSTONE
                    if !fresh.contains(&i)
                        && self.mem.ctrl((i + 1) & mask).load(Ordering::Acquire) == slot::EMPTY =>
                {
                    let _ = self.mem.ctrl(i).compare_exchange(
                        slot::TOMBSTONE,
                        slot::EMPTY,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                slot::RETIRING if !pending.contains(&i) => {
                    // Left by an earlier agent (pinned state), which exported it when it
                    // retired it: what arrives from now on is exported at the finish.
                    let (_, exported) = self.mem.read(i);
                    self.retiring.push(Retiring {
                        index: i,
                        exported,
                        since: Instant::now(),
                    });
                }
                _ => {}
            }
        }
        self.live = live;
        self.table.end_pass(now_ns);
    }

    /// LIVE -> RETIRING, and the flow exported as it is now.
    fn retire(&mut self, i: usize, c: u32, out: &mut Vec<Delta>) {
        let retiring = c & !slot::STATE_MASK | slot::RETIRING;
        if self
            .mem
            .ctrl(i)
            .compare_exchange(c, retiring, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let (k, exported) = self.mem.read(i);
        out.extend(self.table.evict(&k.widen(self.ifindex), &exported));
        self.retiring.push(Retiring {
            index: i,
            exported,
            since: Instant::now(),
        });
    }

    /// Finishes the retired flows past [`GRACE`] (all of them with `wait`, sleeping out
    /// [`EXIT_GRACE`]): what they counted since their export, then TOMBSTONE. Returns the
    /// slots it made TOMBSTONE.
    pub fn finish_retiring(
        &mut self,
        out: &mut Vec<Delta>,
        wait: bool,
    ) -> std::collections::HashSet<usize> {
        if wait && let Some(last) = self.retiring.iter().map(|r| r.since).max() {
            let left = EXIT_GRACE.saturating_sub(last.elapsed());
            std::thread::sleep(left);
        }
        let ifindex = self.ifindex;
        let mem = &self.mem;
        let mut finished = std::collections::HashSet::new();
        self.retiring.retain(|r| {
            if r.since.elapsed() < GRACE {
                return true;
            }
            let (k, last) = mem.read(r.index);
            if let Some(d) = residual(&k.widen(ifindex), &r.exported, &last) {
                out.push(d);
            }
            mem.ctrl(r.index).store(slot::TOMBSTONE, Ordering::Release);
            finished.insert(r.index);
            false
        });
        finished
    }

    /// Exports every flow and empties the table (the programs are detached first).
    pub fn flush(&mut self, out: &mut Vec<Delta>) {
        self.finish_retiring(out, true);
        for i in 0..self.mem.cap() {
            let c = self.mem.ctrl(i).load(Ordering::Acquire);
            if c == slot::EMPTY {
                continue;
            }
            if c & slot::STATE_MASK == slot::LIVE {
                let (k, stats) = self.mem.read(i);
                out.extend(self.table.evict(&k.widen(self.ifindex), &stats));
            }
            self.mem.clear(i);
        }
        self.live = 0;
    }

    /// The LIVE flows now (adopting pinned state).
    pub fn live_flows(&self) -> HashMap<FlowKey4, FlowStats> {
        let mut m = HashMap::new();
        for i in 0..self.mem.cap() {
            if self.mem.ctrl(i).load(Ordering::Acquire) & slot::STATE_MASK == slot::LIVE {
                let (k, s) = self.mem.read(i);
                m.insert(k, s);
            }
        }
        m
    }
}

/// What a retired flow counted after it was exported as `exported` (packets that had
/// read LIVE just before the move), as a record of its own; None if nothing.
fn residual(
    key: &detector_common::FlowKey,
    exported: &FlowStats,
    last: &FlowStats,
) -> Option<Delta> {
    let packets = last.packets.checked_sub(exported.packets)?;
    if packets == 0 {
        return None;
    }
    Some(Delta {
        key: *key,
        packets,
        bytes: last.bytes.saturating_sub(exported.bytes),
        first_ns: exported.last_ns,
        last_ns: last.last_ns,
        tcp_flags: last.tcp_flags,
        tos: last.tos,
        hints: last.hints,
        opening: [0; 4],
        // Detection counted the flow with its first record.
        announced: true,
        growth: false,
        told_packets: 0,
        told_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey4 {
        FlowKey4 {
            src_addr: [10, 0, 0, 1],
            dst_addr: [10, 0, 0, 2],
            src_port: port,
            dst_port: 53,
            protocol: 17,
            ..FlowKey4::default()
        }
    }

    fn stats(packets: u64, last_ns: u64) -> FlowStats {
        FlowStats {
            packets,
            bytes: packets * 100,
            first_ns: 1,
            last_ns,
            ..FlowStats::default()
        }
    }

    /// What the kernel's insert leaves: key, counters, then the word LIVE.
    fn insert(mem: &SlotMemory, i: usize, port: u16, s: FlowStats) {
        mem.write(i, key(port), s);
        mem.ctrl(i)
            .store(7 << slot::FP_SHIFT | slot::LIVE, Ordering::Release);
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_retired_flow_is_exported_then_what_arrived_late_then_its_slot_freed() {
        let mem = SlotMemory::owned(8);
        insert(&mem, 2, 1000, stats(5, SEC));
        insert(&mem, 3, 1001, stats(7, 20 * SEC));
        let mut f = SlotFlows::new(mem, Timeouts::from_secs(60, 15), 4);
        let mut out = Vec::new();
        f.scan(20 * SEC, &mut out);
        // The idle flow: exported whole and RETIRING; the other kept.
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].key.src_port, out[0].packets), (1000, 5));
        assert_eq!(
            f.mem.ctrl(2).load(Ordering::Relaxed) & slot::STATE_MASK,
            slot::RETIRING
        );
        assert_eq!(f.live, 2);
        // A packet that had read LIVE before the move adds to it.
        let (k, mut s) = f.mem.read(2);
        s.packets += 2;
        s.bytes += 200;
        s.last_ns = 20 * SEC + 5;
        f.mem.write(2, k, s);
        // Within the grace: not finished yet.
        out.clear();
        f.scan(20 * SEC + 1, &mut out);
        assert!(out.is_empty(), "{out:?}");
        std::thread::sleep(GRACE);
        f.scan(21 * SEC, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].packets, out[0].bytes), (2, 200));
        assert!(out[0].announced);
        // TOMBSTONE, but the next slot holds a flow: a probe may need to go past it.
        assert_eq!(f.mem.ctrl(2).load(Ordering::Relaxed), slot::TOMBSTONE);
        // The other flow goes; at the pass after its finish, both runs empty backwards.
        out.clear();
        f.scan(40 * SEC, &mut out);
        assert_eq!((out.len(), out[0].packets), (1, 7));
        std::thread::sleep(GRACE);
        f.scan(41 * SEC, &mut out);
        // Made TOMBSTONE by this pass: kept until the next (an insert that passed it
        // while it was RETIRING may be taking the slot after it).
        assert_eq!(f.mem.ctrl(3).load(Ordering::Relaxed), slot::TOMBSTONE);
        assert_eq!(f.mem.ctrl(2).load(Ordering::Relaxed), slot::TOMBSTONE);
        f.scan(42 * SEC, &mut out);
        assert_eq!(f.mem.ctrl(3).load(Ordering::Relaxed), slot::EMPTY);
        assert_eq!(f.mem.ctrl(2).load(Ordering::Relaxed), slot::EMPTY);
        assert_eq!(f.live, 0);
    }

    #[test]
    fn flush_exports_every_live_and_retiring_flow_once_and_empties_the_table() {
        let mem = SlotMemory::owned(4);
        insert(&mem, 0, 1, stats(3, SEC));
        insert(&mem, 3, 2, stats(4, 10 * SEC));
        let mut f = SlotFlows::new(mem, Timeouts::from_secs(60, 5), 4);
        let mut out = Vec::new();
        f.scan(8 * SEC, &mut out);
        assert_eq!(out.len(), 1);
        f.flush(&mut out);
        let total: u64 = out.iter().map(|d| d.packets).sum();
        assert_eq!((out.len(), total), (2, 7));
        for i in 0..4 {
            assert_eq!(f.mem.ctrl(i).load(Ordering::Relaxed), slot::EMPTY);
        }
    }
}
