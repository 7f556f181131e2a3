//! The local flow meter's drain: reads the kernel flow maps, the overflow ring buffer
//! and the new-flow ring through the pure [`FlowTable`] core into flow records (loading
//! the object and attaching XDP on ingress and TC on egress: `load.rs`; pinned state:
//! `pin.rs`; the bpf syscalls aya lacks: `sys.rs`).

pub mod clock;
mod load;
pub mod pin;
pub mod slots;
mod sys;

pub use load::*;

use std::collections::HashMap;
use std::os::fd::AsFd;

use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use detector_common::{
    CLOCK_MAP, COUNTERS_MAP, CounterBlock, DRAIN_STATE_MAP, DrainState, EXPORTED_MAP, ExportMark,
    FLOWS4_MAP, FLOWS4_SLOTS_MAP, FLOWS6_MAP, FlowKey, FlowKey4, FlowStats, NEW_FLOWS_MAP,
    NewFlowEvent, OVERFLOW_MAP, OverflowEvent, counter,
};
use log::warn;

use crate::flow::table::{Action, Delta, FlowTable, Timeouts, add_event, merge_cpus};

/// The compiled eBPF object, built by `build.rs` from `detector-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector"));

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "flow_ingress";
/// Name of the TC egress program in the object.
pub const TC_PROGRAM: &str = "flow_egress";

/// At most this many flows are held in userspace for the overflow path; beyond it,
/// overflow packets are counted in `overflow_table_full` and logged.
pub const OVERFLOW_TABLE_CAP: usize = 1 << 20;

/// Sums of the kernel counters over CPUs, per direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// `[direction][counter]`.
    pub values: [[u64; counter::COUNT as usize]; 2],
}

impl KernelCounters {
    pub fn get(&self, direction: u8, c: u32) -> u64 {
        self.values[direction as usize][c as usize]
    }

    pub fn total(&self, c: u32) -> u64 {
        self.values[0][c as usize] + self.values[1][c as usize]
    }

    /// Sum of parse failures by reason over both directions.
    pub fn parse_failures(&self) -> u64 {
        (counter::FIRST_ERR..counter::COUNT)
            .map(|c| self.total(c))
            .sum()
    }

    /// `name=value` pairs of the non-zero counters, for a log line.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (d, dir) in ["in", "out"].iter().enumerate() {
            for (c, name) in counter::NAMES.iter().enumerate() {
                let v = self.values[d][c];
                if v != 0 {
                    parts.push(format!("{dir}.{name}={v}"));
                }
            }
        }
        parts.join(" ")
    }
}

/// Counters of the userspace side of the meter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainCounters {
    /// Overflow events read from the ring buffer.
    pub overflow_events: u64,
    /// Overflow events dropped because the userspace overflow table was full.
    pub overflow_table_full: u64,
    /// Lookup-and-delete calls that failed.
    pub delete_errors: u64,
    /// Packets in the records taken from the maps and the overflow table (as counted,
    /// before any sampling scale-up).
    pub exported_packets: u64,
}

/// A kernel flow map key: the compact IPv4 key or the full key.
pub trait MapKey: aya::Pod + Eq + std::hash::Hash {
    /// The full key; `ifindex` is the metered interface, for keys that do not carry it.
    fn widen(&self, ifindex: u32) -> FlowKey;
}

impl MapKey for FlowKey {
    fn widen(&self, _ifindex: u32) -> FlowKey {
        *self
    }
}

impl MapKey for FlowKey4 {
    fn widen(&self, ifindex: u32) -> FlowKey {
        FlowKey4::widen(self, ifindex)
    }
}

/// Entries read per batch syscall (grown when one hash bucket holds more).
const BATCH_ENTRIES: usize = 4096;
/// Flows read per one-second tick before a pass over the map is spread over several
/// ticks (at most [`sweep_ticks_max`] of them).
const SWEEP_PER_TICK: usize = 250_000;

/// The most ticks (seconds) one pass over a map may take: a quarter of the shorter
/// timeout, so a flow is exported at most that much late (15 s inactive: 3 s).
fn sweep_ticks_max(t: &Timeouts) -> usize {
    ((t.inactive_ns.min(t.active_ns) / 4) / 1_000_000_000).max(1) as usize
}

/// How a kernel flow map is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainMode {
    /// `BPF_MAP_LOOKUP_BATCH` to read, `BPF_MAP_LOOKUP_AND_DELETE_BATCH` to empty it.
    Batch,
    /// Get-next-key then a lookup per key (kernels without the batch commands).
    PerKey,
}

/// One kernel flow map and its export bookkeeping.
struct KernelFlows<K: MapKey> {
    map: BpfHashMap<MapData, K, FlowStats>,
    table: FlowTable,
    ifindex: u32,
    /// Batch buffers, or None for the per-key path.
    reader: Option<sys::BatchReader<K>>,
    evict: Vec<K>,
    /// Where the current pass goes on (a bucket index); None when a pass starts.
    cursor: Option<u32>,
    in_pass: bool,
    /// Flows looked at in the current pass, and in the last complete one (the map's fill).
    pass_seen: usize,
    last_pass_len: usize,
    max_ticks: usize,
}

impl<K: MapKey + Default> KernelFlows<K> {
    fn new(
        map: aya::maps::Map,
        timeouts: Timeouts,
        ifindex: u32,
        mode: DrainMode,
    ) -> Result<Self, XdpError> {
        Ok(Self {
            map: BpfHashMap::try_from(map)?,
            table: FlowTable::new(timeouts),
            ifindex,
            reader: (mode == DrainMode::Batch)
                .then(|| sys::BatchReader::new(BATCH_ENTRIES, size_of::<FlowStats>(), 1)),
            evict: Vec::new(),
            cursor: None,
            in_pass: false,
            pass_seen: 0,
            last_pass_len: 0,
            max_ticks: sweep_ticks_max(&timeouts),
        })
    }

    /// Flows to read this tick: all of them up to [`SWEEP_PER_TICK`]; beyond, the pass is
    /// spread over up to `max_ticks` ticks.
    fn quota(&self) -> usize {
        let ticks = self
            .last_pass_len
            .div_ceil(SWEEP_PER_TICK)
            .clamp(1, self.max_ticks);
        if ticks == 1 {
            usize::MAX
        } else {
            self.last_pass_len.div_ceil(ticks).max(BATCH_ENTRIES)
        }
    }

    /// Reads flows' counters (in batches, or key by key), exports what the timeouts say,
    /// then removes the ended flows one by one with lookup-and-delete, whose final
    /// counters are taken atomically. In batches, a pass over a large map is spread over
    /// a few ticks (see [`Self::quota`]): each flow is still looked at once per pass.
    fn scan(
        &mut self,
        now_ns: u64,
        drain: &mut DrainCounters,
        out: &mut Vec<Delta>,
    ) -> Result<(), XdpError> {
        if !self.in_pass {
            self.table.begin_pass(now_ns);
            self.in_pass = true;
            self.pass_seen = 0;
            self.cursor = None;
        }
        let quota = self.quota();
        let mut evict = std::mem::take(&mut self.evict);
        evict.clear();
        let (table, ifindex) = (&mut self.table, self.ifindex);
        let mut observe =
            |key: &K, stats: FlowStats| match table.observe(&key.widen(ifindex), &stats, now_ns) {
                Action::Keep => {}
                Action::Export(d) | Action::Grow(d) => out.push(d),
                Action::Evict => evict.push(*key),
            };
        let finished = match &mut self.reader {
            Some(reader) => {
                let (n, next) = reader
                    .read::<FlowStats>(
                        self.map.map().fd().as_fd(),
                        sys::BatchOp::Lookup,
                        self.cursor,
                        quota,
                        &mut |key, value| observe(key, merge_cpus(value)),
                    )
                    .map_err(XdpError::Batch)?;
                self.pass_seen += n;
                self.cursor = next;
                next.is_none()
            }
            None => {
                for item in self.map.iter() {
                    let (key, value) = item?;
                    observe(&key, value);
                    self.pass_seen += 1;
                }
                true
            }
        };
        for key in &evict {
            self.evict(key, drain, out);
        }
        self.evict = evict;
        if finished {
            self.table.end_pass(now_ns);
            self.last_pass_len = self.pass_seen;
            self.in_pass = false;
        }
        Ok(())
    }

    fn evict(&mut self, key: &K, drain: &mut DrainCounters, out: &mut Vec<Delta>) {
        let fd = self.map.map().fd().as_fd();
        match sys::lookup_and_delete::<K, FlowStats>(fd, key) {
            Ok(Some(stats)) => {
                out.extend(self.table.evict(&key.widen(self.ifindex), &stats));
            }
            Ok(None) => {}
            Err(e) => {
                drain.delete_errors += 1;
                warn!("removing a flow from the kernel map failed: {e}");
            }
        }
    }

    /// Removes and exports every flow (the programs are detached first, so nothing
    /// arrives while the map empties).
    fn flush(&mut self, drain: &mut DrainCounters, out: &mut Vec<Delta>) -> Result<(), XdpError> {
        if let Some(reader) = &mut self.reader {
            let (table, ifindex) = (&mut self.table, self.ifindex);
            reader
                .for_each::<FlowStats>(
                    self.map.map().fd().as_fd(),
                    sys::BatchOp::LookupAndDelete,
                    |key, value| out.extend(table.evict(&key.widen(ifindex), &merge_cpus(value))),
                )
                .map_err(XdpError::Batch)?;
        }
        // The per-key path, and whatever a batch left behind.
        let keys: Vec<K> = self.map.keys().collect::<Result<_, _>>()?;
        for key in keys {
            self.evict(&key, drain, out);
        }
        Ok(())
    }
}

/// The attached meter's maps and the export bookkeeping for them.
pub struct XdpSource {
    /// The slot table of IPv4 flows, when the object was loaded with it.
    slots4: Option<slots::SlotFlows>,
    flows4: KernelFlows<FlowKey4>,
    flows6: KernelFlows<FlowKey>,
    counters: PerCpuArray<MapData, CounterBlock>,
    ring: Option<RingBuf<MapData>>,
    /// Announcements of new flows (live flows).
    new_flows: RingBuf<MapData>,
    overflow: HashMap<FlowKey, FlowStats>,
    overflow_table: FlowTable,
    mode: DrainMode,
    clock: std::sync::Arc<clock::ClockMap>,
    pub drain: DrainCounters,
    /// The bookkeeping maps, until [`XdpSource::keep_pinned_state`] takes them.
    bookkeeping: Option<(aya::maps::Map, aya::maps::Map)>,
    /// With pinned state: where the bookkeeping is written after every scan.
    persist: Option<Persist>,
}

/// Userspace's export bookkeeping, written to pinned maps so that the next agent knows
/// what was exported (see [`pin`]).
struct Persist {
    exported: BpfHashMap<MapData, FlowKey, ExportMark>,
    state: Array<MapData, DrainState>,
    /// Writes that failed (the bookkeeping map full): logged at each doubling.
    failures: u64,
}

/// What adopting pinned state found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Flows whose export marks were taken back.
    pub marks: usize,
    /// Marks of flows no longer in the maps (dropped).
    pub stale: usize,
    /// Packets the earlier agents exported.
    pub exported_packets: u64,
}

impl XdpSource {
    /// Takes the maps out of a loaded object that meters interface `ifindex`.
    pub fn new(bpf: &mut Ebpf, timeouts: Timeouts, ifindex: u32) -> Result<Self, XdpError> {
        Self::with_mode(bpf, timeouts, ifindex, None)
    }

    /// [`Self::new`] with the drain mode forced (tests), or probed when `None`: the batch
    /// commands where the kernel has them, else key by key (logged once).
    pub fn with_mode(
        bpf: &mut Ebpf,
        timeouts: Timeouts,
        ifindex: u32,
        mode: Option<DrainMode>,
    ) -> Result<Self, XdpError> {
        let mut take = |name: &'static str| bpf.take_map(name).ok_or(XdpError::Missing(name));
        let map4 = take(FLOWS4_MAP)?;
        let mode = mode.unwrap_or_else(|| {
            let probe = match &map4 {
                aya::maps::Map::HashMap(m) => sys::batch_supported(m.fd().as_fd()),
                _ => false,
            };
            if probe {
                DrainMode::Batch
            } else {
                warn!(
                    "this kernel has no batch commands for BPF maps (Linux 5.6+): the flow maps are read key by key, which costs about five times more CPU per flow"
                );
                DrainMode::PerKey
            }
        });
        let flows4 = KernelFlows::new(map4, timeouts, ifindex, mode)?;
        let slots4 = match take(FLOWS4_SLOTS_MAP)? {
            aya::maps::Map::Array(m) if m.info()?.max_entries() > 1 => Some(slots::SlotFlows::new(
                slots::SlotMemory::map(m).map_err(XdpError::Slots)?,
                timeouts,
                ifindex,
            )),
            _ => None,
        };
        let flows6 = KernelFlows::new(take(FLOWS6_MAP)?, timeouts, ifindex, mode)?;
        let counters = PerCpuArray::try_from(take(COUNTERS_MAP)?)?;
        let ring = RingBuf::try_from(take(OVERFLOW_MAP)?)?;
        let new_flows = RingBuf::try_from(take(NEW_FLOWS_MAP)?)?;
        let clock =
            clock::ClockMap::new(Array::try_from(take(CLOCK_MAP)?)?).map_err(XdpError::Clock)?;
        let bookkeeping = Some((take(EXPORTED_MAP)?, take(DRAIN_STATE_MAP)?));
        Ok(Self {
            bookkeeping,
            persist: None,
            slots4,
            flows4,
            flows6,
            counters,
            ring: Some(ring),
            new_flows,
            overflow: HashMap::new(),
            overflow_table: FlowTable::new(timeouts),
            mode,
            clock: std::sync::Arc::new(clock),
            drain: DrainCounters::default(),
        })
    }

    /// Keeps the export bookkeeping in the (pinned) maps from now on, after taking back
    /// what an earlier agent left there: its drain counters, and the export mark of
    /// each flow still in the maps (a mark whose flow is gone, or was created again
    /// since, is dropped). `now_ns` is the monotonic clock.
    pub fn keep_pinned_state(&mut self, now_ns: u64) -> Result<Adoption, XdpError> {
        let (m, s) = self
            .bookkeeping
            .take()
            .ok_or(XdpError::Missing(EXPORTED_MAP))?;
        let mut exported: BpfHashMap<MapData, FlowKey, ExportMark> = BpfHashMap::try_from(m)?;
        let state: Array<MapData, DrainState> = Array::try_from(s)?;
        let st = state.get(&0, 0)?;
        self.drain = DrainCounters {
            exported_packets: st.exported_packets,
            overflow_events: st.overflow_events,
            overflow_table_full: st.overflow_table_full,
            delete_errors: st.delete_errors,
        };
        let mut found = Adoption {
            exported_packets: st.exported_packets,
            ..Adoption::default()
        };
        let marks: Vec<(FlowKey, ExportMark)> = exported.iter().collect::<Result<_, _>>()?;
        let in_slots = self
            .slots4
            .as_ref()
            .map(|s| s.live_flows())
            .unwrap_or_default();
        for (marked, mark) in marks {
            // One flow may be in the slot table and in FLOWS4 at once: each store's
            // marks are its own (see `mark_key`).
            let (key, in_slot_table) = unmark_key(&marked);
            let (live, table) = match (key.narrow(), in_slot_table) {
                (Some(k4), true) => match &mut self.slots4 {
                    Some(slots) => (in_slots.get(&k4).copied(), &mut slots.table),
                    None => (None, &mut self.flows4.table),
                },
                (Some(k4), false) => (self.flows4.map.get(&k4, 0).ok(), &mut self.flows4.table),
                (None, _) => (self.flows6.map.get(&key, 0).ok(), &mut self.flows6.table),
            };
            match live {
                Some(s) if s.first_ns <= mark.period_start_ns && s.packets >= mark.packets => {
                    table.restore(&key, &mark, now_ns);
                    found.marks += 1;
                }
                _ => {
                    let _ = exported.remove(&marked);
                    found.stale += 1;
                }
            }
        }
        self.flows4.table.keep_journal();
        self.flows6.table.keep_journal();
        if let Some(s) = &mut self.slots4 {
            s.table.keep_journal();
        }
        self.persist = Some(Persist {
            exported,
            state,
            failures: 0,
        });
        Ok(found)
    }

    /// Writes the bookkeeping's changes since the last call (pinned state only), in
    /// batches: a key's last change wins, removals first.
    fn persist(&mut self) {
        let Some(p) = &mut self.persist else { return };
        let mut last: HashMap<FlowKey, Option<ExportMark>> = HashMap::new();
        for table in [&mut self.flows4.table, &mut self.flows6.table] {
            for (key, mark) in table.take_journal() {
                last.insert(key, mark);
            }
        }
        if let Some(s) = &mut self.slots4 {
            for (key, mark) in s.table.take_journal() {
                last.insert(mark_key(&key), mark);
            }
        }
        if !last.is_empty() {
            let (mut set_k, mut set_v, mut del) = (Vec::new(), Vec::new(), Vec::new());
            for (k, m) in last {
                match m {
                    Some(m) => {
                        set_k.push(k);
                        set_v.push(m);
                    }
                    None => del.push(k),
                }
            }
            let fd = p.exported.map().fd().as_fd();
            let r = sys::delete_batch(fd, &del)
                .map(|_| ())
                .and_then(|()| sys::update_batch(fd, &set_k, &set_v));
            if let Err(e) = r {
                p.failures += 1;
                if p.failures.is_power_of_two() {
                    warn!(
                        "writing the pinned export bookkeeping failed {} times ({e}): after a crash, flows exported at an active timeout may be exported again",
                        p.failures
                    );
                }
            }
        }
        let d = &self.drain;
        let st = DrainState {
            exported_packets: d.exported_packets,
            overflow_events: d.overflow_events,
            overflow_table_full: d.overflow_table_full,
            delete_errors: d.delete_errors,
        };
        if let Err(e) = p.state.set(0, st, 0) {
            warn!("writing the pinned drain counters: {e}");
        }
    }

    /// How the flow maps are read.
    pub fn drain_mode(&self) -> DrainMode {
        self.mode
    }

    /// Entries read per batch syscall (tests: 1 makes every bucket of two or more flows
    /// take the kernel's "buffer too small" answer and the buffer grow).
    pub fn set_batch_entries(&mut self, entries: usize) {
        if let Some(r) = &mut self.flows4.reader {
            *r = sys::BatchReader::new(entries, size_of::<FlowStats>(), 1);
        }
        if let Some(r) = &mut self.flows6.reader {
            *r = sys::BatchReader::new(entries, size_of::<FlowStats>(), 1);
        }
    }

    /// The packet clock shared with the programs (see [`clock`]).
    pub fn clock(&self) -> std::sync::Arc<clock::ClockMap> {
        self.clock.clone()
    }

    /// The ring buffer, for the caller to wait on its readiness (taken once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Takes the announcements of flows started since the last call (live flows).
    pub fn drain_new_flows(&mut self, out: &mut Vec<NewFlowEvent>) {
        while let Some(item) = self.new_flows.next() {
            if item.len() >= size_of::<NewFlowEvent>() {
                // SAFETY: the kernel wrote exactly one NewFlowEvent; read unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const NewFlowEvent) });
            }
        }
    }

    /// Reads every pending overflow event into the userspace overflow table.
    pub fn drain_ring(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<OverflowEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote exactly one OverflowEvent; read unaligned.
            let ev: OverflowEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr() as *const OverflowEvent) };
            self.add_overflow(&ev);
        }
    }

    fn add_overflow(&mut self, ev: &OverflowEvent) {
        self.drain.overflow_events += 1;
        if self.overflow.len() >= OVERFLOW_TABLE_CAP && !self.overflow.contains_key(&ev.key) {
            self.drain.overflow_table_full += 1;
            if self.drain.overflow_table_full.is_power_of_two() {
                warn!(
                    "userspace overflow table full ({OVERFLOW_TABLE_CAP} flows): {} packets not accounted; raise --map-size",
                    self.drain.overflow_table_full
                );
            }
            return;
        }
        add_event(self.overflow.entry(ev.key).or_default(), ev);
    }

    /// One pass over every store at `now_ns` (kernel monotonic clock).
    pub fn scan(&mut self, now_ns: u64, out: &mut Vec<Delta>) -> Result<(), XdpError> {
        let from = out.len();
        let r = self.scan_all(now_ns, out);
        // Growth reports are detection's: not exported.
        self.drain.exported_packets += out[from..]
            .iter()
            .filter(|d| !d.growth)
            .map(|d| d.packets)
            .sum::<u64>();
        self.persist();
        r
    }

    fn scan_all(&mut self, now_ns: u64, out: &mut Vec<Delta>) -> Result<(), XdpError> {
        if let Some(s) = &mut self.slots4 {
            s.scan(now_ns, out);
        }
        self.flows4.scan(now_ns, &mut self.drain, out)?;
        self.flows6.scan(now_ns, &mut self.drain, out)?;
        self.overflow_table.begin_pass(now_ns);
        let mut evict = Vec::new();
        for (key, stats) in &self.overflow {
            match self.overflow_table.observe(key, stats, now_ns) {
                Action::Keep => {}
                Action::Export(d) | Action::Grow(d) => out.push(d),
                Action::Evict => evict.push(*key),
            }
        }
        for key in evict {
            if let Some(stats) = self.overflow.remove(&key) {
                out.extend(self.overflow_table.evict(&key, &stats));
            }
        }
        self.overflow_table.end_pass(now_ns);
        Ok(())
    }

    /// Removes and exports every flow (shutdown).
    pub fn flush(&mut self, out: &mut Vec<Delta>) -> Result<(), XdpError> {
        let from = out.len();
        let r = self.flush_all(out);
        self.drain.exported_packets += out[from..].iter().map(|d| d.packets).sum::<u64>();
        self.persist();
        r
    }

    /// Exports the flows held in userspace (the overflow table) and leaves the kernel
    /// maps as they are, for the next agent (`--keep-attached`).
    pub fn flush_userspace(&mut self, out: &mut Vec<Delta>) {
        let from = out.len();
        // Flows this agent moved to RETIRING: their last packets, then TOMBSTONE (the
        // next agent could not tell what was exported of them).
        if let Some(s) = &mut self.slots4 {
            s.finish_retiring(out, true);
        }
        for (key, stats) in std::mem::take(&mut self.overflow) {
            out.extend(self.overflow_table.evict(&key, &stats));
        }
        self.drain.exported_packets += out[from..].iter().map(|d| d.packets).sum::<u64>();
        self.persist();
    }

    fn flush_all(&mut self, out: &mut Vec<Delta>) -> Result<(), XdpError> {
        if let Some(s) = &mut self.slots4 {
            s.flush(out);
        }
        self.flows4.flush(&mut self.drain, out)?;
        self.flows6.flush(&mut self.drain, out)?;
        for (key, stats) in std::mem::take(&mut self.overflow) {
            out.extend(self.overflow_table.evict(&key, &stats));
        }
        Ok(())
    }

    /// Flows currently tracked from the kernel maps and in the overflow table.
    /// Flows in the kernel maps (as of the last complete pass over them) and in the
    /// overflow table.
    pub fn flow_counts(&self) -> (usize, usize) {
        (
            self.slots4.as_ref().map_or(0, |s| s.live)
                + self.flows4.last_pass_len.max(self.flows4.pass_seen)
                + self.flows6.last_pass_len.max(self.flows6.pass_seen),
            self.overflow.len(),
        )
    }

    /// Reads the kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<KernelCounters, XdpError> {
        let mut out = KernelCounters::default();
        for d in 0..2u32 {
            for block in self.counters.get(&d, 0)?.iter() {
                for (sum, v) in out.values[d as usize].iter_mut().zip(block) {
                    *sum += v;
                }
            }
        }
        Ok(out)
    }
}

/// After the final flush (programs detached), compares the packets the kernel counted
/// into the maps and the ring buffer with the packets exported from them. They are equal
/// unless a packet was written into a flow's entry while it was being removed (which the
/// quiet-before-removal rule makes all but impossible) or the userspace overflow table
/// was full (counted apart).
pub fn final_check(k: &KernelCounters, drain: &DrainCounters) -> Result<u64, String> {
    let counted = k.total(counter::FLOW_PACKETS) + k.total(counter::OVERFLOW_PACKETS);
    let expected = counted.saturating_sub(drain.overflow_table_full);
    if drain.exported_packets == expected {
        Ok(expected)
    } else {
        Err(format!(
            "the kernel counted {counted} packets into the flow maps and the ring buffer ({} of them turned away by the full overflow table), but {} were exported: {} missing",
            drain.overflow_table_full,
            drain.exported_packets,
            expected as i128 - drain.exported_packets as i128
        ))
    }
}

impl XdpSource {
    /// Kernel memory of the IPv4 flow stores (the slot table with the flow map) and of
    /// the IPv6 flow map, in bytes.
    pub fn map_kernel_bytes(&self) -> (Option<u64>, Option<u64>) {
        let slots = self
            .slots4
            .as_ref()
            .map_or(Some(0), |s| s.mem.kernel_bytes());
        (
            map_kernel_bytes(self.flows4.map.map())
                .zip(slots)
                .map(|(m, s)| m + s),
            map_kernel_bytes(self.flows6.map.map()),
        )
    }
}

/// The key under which the slot table's export marks are pinned in `EXPORTED`: the
/// flow's key with [`MARK_OF_SLOT_TABLE`] in its first padding byte, so that a flow held
/// in the slot table and in FLOWS4 at once (a probe sequence full for a while) keeps one
/// mark per store. Marks of FLOWS4 and FLOWS6 keep the zero padding they always had.
fn mark_key(key: &FlowKey) -> FlowKey {
    let mut k = *key;
    k._pad[0] = MARK_OF_SLOT_TABLE;
    k
}

/// The flow's key of a pinned mark, and whether the mark is the slot table's.
fn unmark_key(marked: &FlowKey) -> (FlowKey, bool) {
    let mut k = *marked;
    let of_slots = k._pad[0] == MARK_OF_SLOT_TABLE;
    k._pad = [0; 2];
    (k, of_slots)
}

/// See [`mark_key`].
const MARK_OF_SLOT_TABLE: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_in_both_ipv4_stores_keeps_one_mark_each_and_both_read_back() {
        let key = FlowKey4 {
            src_addr: [10, 0, 0, 1],
            dst_addr: [192, 0, 2, 7],
            src_port: 51_413,
            dst_port: 443,
            protocol: 6,
            ..FlowKey4::default()
        }
        .widen(3);
        let of_slots = mark_key(&key);
        // Two entries in EXPORTED, not one overwriting the other.
        assert_ne!(of_slots, key);
        assert_eq!(unmark_key(&of_slots), (key, true));
        assert_eq!(unmark_key(&key), (key, false));
    }
}
