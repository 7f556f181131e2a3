//! Loading and attaching: the eBPF object loaded with its maps sized (or adopted from
//! their pins), the XDP program attached to the interface's ingress and the TC program
//! to its egress (as pinned links when the state is pinned), and detached again.

use std::os::fd::AsFd;

use aya::maps::MapData;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use detector_common::{
    EXPORTED_MAP, FLOW_SLOTS_GLOBAL, FLOWS4_MAP, FLOWS4_SLOTS_MAP, FLOWS6_MAP, FlowKey, FlowKey4,
    LIVE_FLOWS_GLOBAL, PAYLOAD_HINTS_GLOBAL, SAMPLING_GLOBAL, SLOT_MASK_GLOBAL, SLOT_SEED_GLOBAL,
    SLOT_SEED_MAP, slot,
};
use log::{info, warn};

use super::{EBPF_OBJECT, TC_PROGRAM, XDP_PROGRAM, pin, sys};

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
    #[error("mapping the flow slot table: {0}")]
    Slots(std::io::Error),
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
    /// Count IPv4 flows in the slot table `FLOWS4_SLOTS` first (issue #21), `FLOWS4`
    /// taking those whose slots are all taken; false: `FLOWS4` only, as before.
    pub flow_slots: bool,
}

/// Whether the meter counts IPv4 flows in the slot table on this machine: on x86-64 only,
/// whose stores are not reordered with each other, so a slot published LIVE holds the key
/// and counters written before it (the programs publish with a plain store; weaker CPUs
/// would need BPF's store-release, kernel 6.15+). Elsewhere the hash map alone, as before.
pub const FLOW_SLOTS_HERE: bool = cfg!(target_arch = "x86_64");

/// The slot table's size, hash seed, and whether the programs use it: the table pinned
/// in `pins` if there is one (so the programs find its flows where the last agent put
/// them), else [`slot::slots_for`] the map size and a random seed. A pinned table this
/// agent cannot use (fewer than two slots, not a power of two, or its seed missing: its
/// flows could not be found again) is loaded as it is but left alone by the programs
/// (IPv4 flows go to the flow map) while the drain exports what it holds.
fn slot_geometry(map_size: u32, pins: Option<&pin::PinDir>) -> Result<(u32, u64, bool), XdpError> {
    if let Some(p) = pins
        && p.map(FLOWS4_SLOTS_MAP).exists()
    {
        let table = MapData::from_pin(p.map(FLOWS4_SLOTS_MAP))?;
        let slots = table.info()?.max_entries();
        let seeded = p.map(SLOT_SEED_MAP).exists();
        if slots >= 2 && slots.is_power_of_two() && seeded {
            let seed_map = MapData::from_pin(p.map(SLOT_SEED_MAP))?;
            let seed: aya::maps::Array<MapData, u64> =
                aya::maps::Array::try_from(aya::maps::Map::Array(seed_map))?;
            return Ok((slots, seed.get(&0, 0)?, true));
        }
        warn!(
            "the pinned slot table ({slots} slots{}) cannot be used: IPv4 flows go to the flow map this run, and what the table holds is exported; remove {} for a new table at the next start",
            if seeded { "" } else { ", its seed not pinned" },
            p.map(FLOWS4_SLOTS_MAP).display()
        );
        return Ok((slots, 0, false));
    }
    Ok((slot::slots_for(map_size), random_seed(), true))
}

/// A seed for the slot table's hash, so that nobody can choose keys that collide.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a local buffer of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: a seed from the clock and the process id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (std::process::id() as u64).rotate_left(32);
    }
    u64::from_ne_bytes(b)
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
    let (slots, seed, on) = if opts.flow_slots {
        slot_geometry(opts.map_size, pins)?
    } else {
        (1, 0, false)
    };
    let slots_on = u32::from(on);
    let mask = slots.saturating_sub(1);
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(FLOWS4_SLOTS_MAP, slots)
        .override_global(FLOW_SLOTS_GLOBAL, &slots_on, true)
        .override_global(SLOT_MASK_GLOBAL, &mask, true)
        .override_global(SLOT_SEED_GLOBAL, &seed, true)
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
    let mut bpf = loader.load(EBPF_OBJECT).map_err(|e| match &e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
            if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            XdpError::Permission(e.to_string())
        }
        _ => XdpError::Load(e),
    })?;
    // The seed beside the table (pinned with it): the next agent hashes the same way.
    let mut seed_map: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(
        bpf.map_mut(SLOT_SEED_MAP)
            .ok_or(XdpError::Missing(SLOT_SEED_MAP))?,
    )?;
    if on {
        seed_map.set(0, seed, 0)?;
    }
    Ok(bpf)
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

/// Kernel bytes one flow takes in a flow map, measured on Linux 6.18: the entries are
/// allocated as flows arrive (`BPF_F_NO_PREALLOC`) from the BPF allocator's size
/// classes (element header, key and value: 128 bytes for IPv4, 192 for IPv6), plus the
/// bucket array (16 bytes per possible entry, allocated at load). A million IPv4 flows
/// measured 153.6 MB (fdinfo memlock).
///
/// IPv4 flows also have two 64-byte slots each in the slot table (allocated at load).
pub fn entry_bytes(key_size: usize) -> u64 {
    if key_size <= size_of::<FlowKey4>() {
        160 + 128
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
