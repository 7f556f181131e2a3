//! The local flow meter: loads the eBPF object, attaches XDP (ingress) and TC (egress) to
//! the interface, and drains the kernel flow map and the overflow ring buffer through the
//! pure [`FlowTable`] core.

pub mod clock;
pub mod pin;
mod sys;

use std::collections::HashMap;
use std::os::fd::AsFd;

use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use detector_common::{
    CLOCK_MAP, COUNTERS_MAP, CounterBlock, DRAIN_STATE_MAP, DrainState, EXPORTED_MAP, ExportMark,
    FLOWS4_MAP, FLOWS6_MAP, FlowKey, FlowKey4, FlowStats, LIVE_FLOWS_GLOBAL, NEW_FLOWS_MAP,
    NewFlowEvent, OVERFLOW_MAP, OverflowEvent, PAYLOAD_HINTS_GLOBAL, SAMPLING_GLOBAL, counter,
};
use log::{info, warn};

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

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("interface '{0}' does not exist (list interfaces with `ip link`)")]
    NoSuchInterface(String),
    #[error(
        "loading eBPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or root): run as root, or grant them with `setcap cap_bpf,cap_net_admin,cap_perfmon+ep` on the binary ({0})"
    )]
    Permission(String),
    #[error(
        "native (driver) XDP is not supported on '{iface}': {source}; use --xdp-mode generic (or auto, which falls back to generic)"
    )]
    NativeUnsupported {
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("failed to load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program '{name}': {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the eBPF object has no map or program named '{0}'")]
    Missing(&'static str),
    #[error("reading possible CPUs: {0}")]
    Cpus(String),
    #[error("mapping the packet clock: {0}")]
    Clock(std::io::Error),
    #[error("reading the flow map in batches: {0}")]
    Batch(std::io::Error),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error(
        "pinning the {what} link at {path}: {reason}; run with --pin-path none to meter without pinned state"
    )]
    PinLink {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
}

/// How to attach XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, falling back to generic mode with a warning.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// Load-time settings.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub map_size: u32,
    pub sampling: u32,
    /// Set payload hint flags (`--payload-hints`).
    pub payload_hints: bool,
    /// Announce new flows in `NEW_FLOWS` (`run`; the caller must read them).
    pub live_flows: bool,
}

/// Loads the object with the map sized and the sampling rate set. Programs are not loaded.
pub fn load_object(opts: LoadOptions) -> Result<Ebpf, XdpError> {
    load_pinned(opts, None)
}

/// [`load_object`] with every map pinned in `pins`: maps already pinned there (by an
/// earlier agent) are used as they are, the others created and pinned.
pub fn load_pinned(opts: LoadOptions, pins: Option<&pin::PinDir>) -> Result<Ebpf, XdpError> {
    let sampling = opts.sampling;
    let hints = u32::from(opts.payload_hints);
    let live = u32::from(opts.live_flows);
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(FLOWS4_MAP, opts.map_size)
        .map_max_entries(FLOWS6_MAP, opts.map_size)
        // The bookkeeping holds only flows exported at an active timeout and still in
        // the maps; without pins it is not used.
        .map_max_entries(EXPORTED_MAP, if pins.is_some() { opts.map_size } else { 1 })
        .override_global(SAMPLING_GLOBAL, &sampling, true)
        .override_global(PAYLOAD_HINTS_GLOBAL, &hints, true)
        .override_global(LIVE_FLOWS_GLOBAL, &live, true);
    if let Some(p) = pins {
        for name in pin::MAPS {
            loader.map_pin_path(name, p.map(name));
        }
    }
    loader.load(EBPF_OBJECT).map_err(|e| match &e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
            if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            XdpError::Permission(e.to_string())
        }
        _ => XdpError::Load(e),
    })
}

fn program_error(name: &'static str, e: aya::programs::ProgramError) -> XdpError {
    let text = format!("{e:?}");
    if text.contains("PermissionDenied") || text.contains("Operation not permitted") {
        XdpError::Permission(e.to_string())
    } else {
        XdpError::Program { name, source: e }
    }
}

/// Interface index of `iface`, or a clear error.
pub fn ifindex(iface: &str) -> Result<u32, XdpError> {
    let c = std::ffi::CString::new(iface).map_err(|_| XdpError::NoSuchInterface(iface.into()))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(XdpError::NoSuchInterface(iface.into()))
    } else {
        Ok(idx)
    }
}

/// How the programs came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Attached now, in this XDP mode.
    Fresh(XdpMode),
    /// Swapped into the links an earlier agent pinned (which keep their XDP mode).
    Adopted,
}

/// Loads and attaches both programs; returns the XDP mode actually used. With `pins`,
/// the links are pinned there, and links already pinned there get the new programs
/// swapped in atomically instead.
pub fn attach(
    bpf: &mut Ebpf,
    iface: &str,
    mode: XdpModeArg,
    pins: Option<&pin::PinDir>,
) -> Result<Attached, XdpError> {
    let index = ifindex(iface)?;
    let xdp: &mut Xdp = bpf
        .program_mut(XDP_PROGRAM)
        .ok_or(XdpError::Missing(XDP_PROGRAM))?
        .try_into()
        .map_err(|e| program_error(XDP_PROGRAM, e))?;
    xdp.load().map_err(|e| program_error(XDP_PROGRAM, e))?;
    let xdp_pin = pins.map(|p| p.link(pin::XDP_LINK));
    let tc_pin = pins.map(|p| p.link(pin::TC_LINK));
    let adopt_xdp = xdp_pin.as_ref().is_some_and(|p| live_link(p, index, "XDP"));
    let adopt_tc = tc_pin.as_ref().is_some_and(|p| live_link(p, index, "TC"));
    if adopt_xdp {
        let path = xdp_pin.clone().expect("checked");
        let fail = |reason: String| XdpError::PinLink {
            what: "XDP",
            path: path.clone(),
            reason,
        };
        let pinned = PinnedLink::from_pin(&path).map_err(|e| fail(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| fail(e.to_string()))?;
        xdp.attach_to_link(link)
            .map_err(|e| program_error(XDP_PROGRAM, e))?;
    }
    let used = if adopt_xdp {
        Attached::Adopted
    } else {
        let (used, id) = attach_xdp(xdp, iface, mode)?;
        if let Some(path) = &xdp_pin {
            pin_link(xdp, id, path)?;
        }
        Attached::Fresh(used)
    };
    let tc: &mut SchedClassifier = bpf
        .program_mut(TC_PROGRAM)
        .ok_or(XdpError::Missing(TC_PROGRAM))?
        .try_into()
        .map_err(|e| program_error(TC_PROGRAM, e))?;
    tc.load().map_err(|e| program_error(TC_PROGRAM, e))?;
    if adopt_tc {
        let path = tc_pin.clone().expect("checked");
        let fail = |reason: String| XdpError::PinLink {
            what: "TC",
            path: path.clone(),
            reason,
        };
        let pinned = PinnedLink::from_pin(&path).map_err(|e| fail(e.to_string()))?;
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| fail(e.to_string()))?;
        tc.attach_to_link(link)
            .map_err(|e| program_error(TC_PROGRAM, e))?;
        return Ok(used);
    }
    // tcx on kernels >= 6.6; older kernels attach through netlink, which needs clsact.
    let id = match tc.attach(iface, TcAttachType::Egress) {
        Ok(id) => id,
        Err(first) => {
            if aya::programs::tc::qdisc_add_clsact(iface).is_err() {
                return Err(program_error(TC_PROGRAM, first));
            }
            tc.attach(iface, TcAttachType::Egress)
                .map_err(|e| program_error(TC_PROGRAM, e))?
        }
    };
    if let Some(path) = &tc_pin {
        let link = tc.take_link(id).map_err(|e| program_error(TC_PROGRAM, e))?;
        let fd = FdLink::try_from(link).map_err(|e| XdpError::PinLink {
            what: "TC",
            path: path.clone(),
            reason: format!("{e} (the egress hook needs tcx, Linux 6.6+, to be pinned)"),
        })?;
        fd.pin(path).map_err(|e| XdpError::PinLink {
            what: "TC",
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(used)
}

/// Whether the link pinned at `path` is attached to interface `index`. A link left
/// attached to nothing (its interface deleted) or to another interface of the same name
/// is stale: its pin is removed, and the program attached afresh.
fn live_link(path: &std::path::Path, index: u32, what: &str) -> bool {
    if !path.exists() {
        return false;
    }
    match sys::pinned_link_ifindex(path) {
        Ok(i) if i == index => true,
        r => {
            warn!(
                "the {what} link pinned at {} is attached to {}: removed, attaching afresh",
                path.display(),
                match r {
                    Ok(0) => "no interface any more".to_string(),
                    Ok(i) => format!("interface index {i}, not {index}"),
                    Err(e) => format!("something unreadable ({e})"),
                }
            );
            let _ = std::fs::remove_file(path);
            false
        }
    }
}

/// Pins the XDP link `id` at `path`: it stays attached as long as the pin.
fn pin_link(
    xdp: &mut Xdp,
    id: aya::programs::xdp::XdpLinkId,
    path: &std::path::Path,
) -> Result<(), XdpError> {
    let fail = |reason: String| XdpError::PinLink {
        what: "XDP",
        path: path.to_path_buf(),
        reason,
    };
    let link = xdp.take_link(id).map_err(|e| fail(e.to_string()))?;
    let fd = FdLink::try_from(link).map_err(|e| fail(e.to_string()))?;
    fd.pin(path).map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Attaches XDP in the mode asked for (auto: native, else generic with a warning).
fn attach_xdp(
    xdp: &mut Xdp,
    iface: &str,
    mode: XdpModeArg,
) -> Result<(XdpMode, aya::programs::xdp::XdpLinkId), XdpError> {
    let native = |xdp: &mut Xdp| xdp.attach(iface, XdpMode::Driver);
    let generic = |xdp: &mut Xdp| {
        xdp.attach(iface, XdpMode::Skb)
            .map_err(|e| program_error(XDP_PROGRAM, e))
    };
    Ok(match mode {
        XdpModeArg::Generic => (XdpMode::Skb, generic(xdp)?),
        XdpModeArg::Native => (
            XdpMode::Driver,
            native(xdp).map_err(|source| XdpError::NativeUnsupported {
                iface: iface.into(),
                source,
            })?,
        ),
        XdpModeArg::Auto => match native(xdp) {
            Ok(id) => (XdpMode::Driver, id),
            Err(e) => {
                warn!(
                    "native XDP is not available on {iface} ({e}); falling back to generic (skb) mode, which is slower"
                );
                (XdpMode::Skb, generic(xdp)?)
            }
        },
    })
}

/// Detaches both programs (dropping their links).
pub fn detach(bpf: &mut Ebpf) {
    if let Some(p) = bpf.program_mut(XDP_PROGRAM)
        && let Ok(x) = <&mut Xdp>::try_from(p)
        && let Err(e) = x.unload()
    {
        warn!("detaching {XDP_PROGRAM}: {e}");
    }
    if let Some(p) = bpf.program_mut(TC_PROGRAM)
        && let Ok(t) = <&mut SchedClassifier>::try_from(p)
        && let Err(e) = t.unload()
    {
        warn!("detaching {TC_PROGRAM}: {e}");
    }
}

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
        for (key, mark) in marks {
            let (live, table) = match key.narrow() {
                Some(k4) => (self.flows4.map.get(&k4, 0).ok(), &mut self.flows4.table),
                None => (self.flows6.map.get(&key, 0).ok(), &mut self.flows6.table),
            };
            match live {
                Some(s) if s.first_ns <= mark.period_start_ns && s.packets >= mark.packets => {
                    table.restore(&key, &mark, now_ns);
                    found.marks += 1;
                }
                _ => {
                    let _ = exported.remove(&key);
                    found.stale += 1;
                }
            }
        }
        self.flows4.table.keep_journal();
        self.flows6.table.keep_journal();
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
        for (key, stats) in std::mem::take(&mut self.overflow) {
            out.extend(self.overflow_table.evict(&key, &stats));
        }
        self.drain.exported_packets += out[from..].iter().map(|d| d.packets).sum::<u64>();
        self.persist();
    }

    fn flush_all(&mut self, out: &mut Vec<Delta>) -> Result<(), XdpError> {
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
            self.flows4.last_pass_len.max(self.flows4.pass_seen)
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

/// Kernel bytes one flow takes in a flow map, measured on Linux 6.18: the entries are
/// allocated as flows arrive (`BPF_F_NO_PREALLOC`) from the BPF allocator's size
/// classes (element header, key and value: 128 bytes for IPv4, 192 for IPv6), plus the
/// bucket array (16 bytes per possible entry, allocated at load). A million IPv4 flows
/// measured 153.6 MB (fdinfo memlock).
pub fn entry_bytes(key_size: usize) -> u64 {
    if key_size <= size_of::<FlowKey4>() {
        160
    } else {
        224
    }
}

/// `run`'s map size when `--map-size` is not given: [`UPLINK_MAP_SIZE`] flows per map,
/// halved until both maps fit in a quarter of the memory available now.
pub fn default_map_size() -> u32 {
    let per_flow = entry_bytes(size_of::<FlowKey4>()) + entry_bytes(size_of::<FlowKey>());
    let available = mem_available_bytes().unwrap_or(u64::MAX);
    let mut size = detector_common::UPLINK_MAP_SIZE;
    while size > detector_common::DEFAULT_MAP_SIZE / 4 && size as u64 * per_flow > available / 4 {
        size /= 2;
    }
    if size < detector_common::UPLINK_MAP_SIZE {
        warn!(
            "only {} MiB of memory available: the flow maps hold {size} flows each instead of {} (set --map-size to choose)",
            available >> 20,
            detector_common::UPLINK_MAP_SIZE
        );
    }
    size
}

fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The kernel memory a loaded map is charged for (`memlock` of its fdinfo), in bytes.
pub fn map_kernel_bytes(map: &MapData) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let fd = map.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

impl XdpSource {
    /// Kernel memory of the IPv4 and IPv6 flow maps, in bytes.
    pub fn map_kernel_bytes(&self) -> (Option<u64>, Option<u64>) {
        (
            map_kernel_bytes(self.flows4.map.map()),
            map_kernel_bytes(self.flows6.map.map()),
        )
    }
}

/// Logs what the meter attached with.
pub fn log_attached(iface: &str, mode: XdpMode, map_size: u32, sampling: u32) {
    info!(
        "metering {iface}: XDP ingress ({} mode) + TC egress, flow map {map_size} entries, sampling {}",
        match mode {
            XdpMode::Driver => "native",
            XdpMode::Skb => "generic",
            _ => "other",
        },
        if sampling > 1 {
            format!("1 in {sampling}")
        } else {
            "off".to_string()
        }
    );
}
