//! Flow meter programs: XDP on ingress, TC (tcx/clsact) on egress of the same interface.
//!
//! # Map design
//!
//! - `FLOWS4_SLOTS` (issue #21): IPv4 flows are counted here first. An open-addressed
//!   table of 64-byte [`FlowSlot`]s (a control word with state, probe distance and hash
//!   fingerprint, the 20-byte [`FlowKey4`], the 40-byte [`FlowStats`]: one cache line) in
//!   a `BPF_F_MMAPABLE` array of a power of two at least twice `--map-size` slots (load
//!   factor at most 0.5; 134 MB allocated at load for 2^21 slots), a flow within
//!   `slot::PROBES` (8) slots of its home slot: a packet of a known flow touches one
//!   line, where the hash map touches a bucket and then a 128-byte element. Inserted by
//!   compare-and-swap of the control word, counted with the same atomic adds as the hash
//!   map; a flow that finds no free slot (or meets an insert of a flow with its
//!   fingerprint in progress on another CPU) goes to `FLOWS4`, exactly as before, so the
//!   table is bounded and loses nothing. The seed of its hash is random, kept in
//!   `SLOT_SEED_MAP` and pinned with it. Userspace maps the table and reads the slots in
//!   place; it removes a flow by moving its slot LIVE -> RETIRING (packets pass it by and
//!   insert their flow afresh), exports it, and at a pass at least 20 ms later exports
//!   what packets already in flight added, then marks it TOMBSTONE (free for inserts,
//!   passed by lookups), which becomes EMPTY when the slot after it is EMPTY (see the
//!   `slots` module). The loader's `FLOW_SLOTS` turns the table off (`FLOWS4` alone).
//! - `FLOWS4` (the IPv4 flows the slot table has no room for) and `FLOWS6`:
//!   `BPF_MAP_TYPE_HASH` maps keyed by the flow identity
//!   (addresses, ports, protocol, VLANs, direction, ifindex) -- [`FlowKey4`] (20 bytes, no
//!   ifindex: one object meters one interface) for IPv4 and [`FlowKey`] (48 bytes) for
//!   IPv6, because the kernel hashes and compares the whole key on every packet -- valued
//!   by [`FlowStats`] (packets, bytes, first/last seen, OR of TCP flags, ToS of the first
//!   packet, and the sizes of its first four payload-bearing packets, one byte each:
//!   how a connection opens, see `detector_common::opening`). One entry per flow shared by all CPUs: packets and bytes are added with
//!   atomic adds and new TCP flags with an atomic OR, so counts stay exact whichever CPUs
//!   a flow's packets land on. Per-CPU maps would cost entries x possible CPUs x 40
//!   bytes (2.6 GB for a million flows on a 64-CPU host) and make every read of a flow
//!   touch one cache line per CPU; the atomics cost about 3 ns a packet here. Each map is
//!   sized at load time (`--map-size`, default 1,048,576 keys); its entries are allocated
//!   as flows arrive (`BPF_F_NO_PREALLOC`), so an idle agent holds only the bucket array
//!   (16 MiB a map) and a million IPv4 flows about 150 MB. Never LRU: the kernel never
//!   evicts a flow behind our back, so no packet is lost to eviction.
//! - Eviction is done by userspace only. It reads the maps with `BPF_MAP_LOOKUP_BATCH`
//!   (thousands of entries a syscall; key by key on kernels without it) once a second,
//!   spreading a pass over a large map over a few seconds; it exports deltas of long
//!   flows at each active timeout (it remembers what it already exported, the kernel
//!   keeps cumulative counts), and removes idle flows, and ended (FIN/RST) flows once a
//!   pass finds them quiet, with `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which returns the final
//!   counts: a packet arriving after the delete creates a new entry, so nothing falls
//!   between the two. (A packet being counted on another CPU at the very instant of the
//!   delete could still write into the removed entry; removing only quiet flows makes
//!   that all but impossible, and the agent compares counted and exported packets at
//!   exit.) At exit, with the programs detached, `BPF_MAP_LOOKUP_AND_DELETE_BATCH` empties
//!   the maps, and every live slot of the slot table is exported and emptied.
//! - Overflow path: when inserting a new flow fails (map full), the packet's contribution
//!   (key, IP length, flags, ToS, time) goes into the `OVERFLOW` ring buffer; userspace
//!   aggregates those into flows of its own and exports them like the others. When the
//!   ring buffer is full too, the packet is counted in `ringbuf_dropped` (the only way a
//!   packet can be missing from the export, and it is never silent).
//! - `COUNTERS`: a per-CPU array of one counter block per direction (frames, bytes, packets and
//!   bytes accounted, insert failures, ring-buffer drops, sampled-out packets, non-IP
//!   frames, fragments, parse failures by reason).
//! - `SCRATCH`: a per-CPU word the payload hints pass through (see `forget`).
//!
//! # Parsing
//!
//! Ethernet, up to two VLAN tags (802.1Q 0x8100, 802.1ad 0x88A8, legacy QinQ 0x9100),
//! IPv4 with any IHL, IPv6 with hop-by-hop, routing, fragment, destination-options and AH
//! extension headers (at most 8), then TCP, UDP, UDP-Lite and SCTP ports, ICMP/ICMPv6 type
//! and code (as `dst_port = type << 8 | code`), any other protocol by number with ports 0.
//! Fragments: the first fragment carries the L4 header and is keyed with its ports; the
//! later fragments (IPv4 offset != 0, IPv6 fragment offset != 0) carry none and are
//! accounted in a flow with ports 0 and the same addresses and protocol, as NetFlow
//! meters do; the `fragments` counter counts them.
//!
//! Bytes are IP bytes (IPv4 total length, IPv6 payload length + 40), as NetFlow counts.
//!
//! # Clock
//!
//! Packet times are read from `CLOCK`, a one-entry memory-mapped array into which the
//! agent writes CLOCK_MONOTONIC every millisecond: one memory load per packet instead of a
//! helper call (a clock helper costs more than the whole hash-map update budget). When
//! nobody writes it (0), the program falls back to `bpf_ktime_get_coarse_ns`. `replay`
//! writes the capture's own timestamps there, so flows age on the capture's clock.
//! On egress, a GSO super-packet is counted as the `gso_segs` packets it becomes on the
//! wire, with the headers of every segment.
//!
//! Every program returns `XDP_PASS` / `TC_ACT_OK`, whatever happens: a frame that cannot
//! be parsed is counted by reason and passed untouched.
#![no_std]
#![no_main]
// Atomic read-modify-write: the BPF target has no compare-and-swap, so core's atomic
// types lack fetch_add; the intrinsics compile to BPF_ATOMIC instructions.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic intrinsics, see above")]

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_xdp_get_buff_len},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use detector_common::{
    COUNTERS_LEN, CounterBlock, DEFAULT_MAP_SIZE, DIRECTION_EGRESS, DIRECTION_INGRESS, DrainState,
    ExportMark, FlowKey, FlowKey4, FlowSlot, FlowStats, NEW_FLOWS_RING_BYTES, NewFlowEvent,
    OVERFLOW_RING_BYTES, OverflowEvent, counter, hint,
};

mod bench;
mod parse;
mod slots;
use parse::{Frame, Packet, parse, payload_hints};

/// 1-in-N sampling; 0 or 1 accounts every packet. Set by the loader.
#[unsafe(no_mangle)]
static SAMPLING: u32 = 0;

/// Non-zero: announce each new flow in `NEW_FLOWS` (`run`: detection learns of flows as
/// they start). Set by the loader.
#[unsafe(no_mangle)]
static LIVE_FLOWS: u32 = 0;

/// Non-zero: look at the first payload bytes of a flow's first packets for the
/// signatures of [`hint`] (`--payload-hints`). Set by the loader.
#[unsafe(no_mangle)]
static PAYLOAD_HINTS: u32 = 0;

/// Non-zero: IPv4 flows are counted in `FLOWS4_SLOTS` first, `FLOWS4` taking those whose
/// slots are all taken. Set by the loader.
#[unsafe(no_mangle)]
static FLOW_SLOTS: u32 = 0;

/// The meter's slot table of IPv4 flows (see the `slots` module). Sized by the loader.
#[map]
static FLOWS4_SLOTS: Array<FlowSlot> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The seed of `FLOWS4_SLOTS`'s hash, kept here by userspace so that it is pinned with the
/// table; the programs read the seed from `SLOT_SEED` (see the `slots` module).
#[map]
static SLOT_SEED_MAP: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static FLOWS4: HashMap<FlowKey4, FlowStats> =
    HashMap::with_max_entries(DEFAULT_MAP_SIZE, BPF_F_NO_PREALLOC);

#[map]
static FLOWS6: HashMap<FlowKey, FlowStats> =
    HashMap::with_max_entries(DEFAULT_MAP_SIZE, BPF_F_NO_PREALLOC);

#[map]
static OVERFLOW: RingBuf = RingBuf::with_byte_size(OVERFLOW_RING_BYTES, 0);

/// New flows, announced as they are inserted (live flows only).
#[map]
static NEW_FLOWS: RingBuf = RingBuf::with_byte_size(NEW_FLOWS_RING_BYTES, 0);

#[map]
static CLOCK: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static COUNTERS: PerCpuArray<CounterBlock> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// One word a CPU that a packet's payload hints pass through (see [`forget`]).
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `v`, read back from this CPU's [`SCRATCH`] word, so that the verifier no longer knows
/// it: the payload hints are one of seven constants, one per path through
/// [`payload_hints`], and the verifier, carrying each constant down its own path, walked
/// everything after the parse once a constant (824,000 instructions of its 1,000,000 for
/// the ingress program with hints on; about 560,000 with this, the slot table's wait
/// for a concurrent insert included).
#[inline(always)]
fn forget(v: u8) -> u8 {
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return v;
    };
    // SAFETY: this CPU's word; programs do not nest on a CPU.
    unsafe {
        core::ptr::write_volatile(p, v as u64);
        core::ptr::read_volatile(p) as u8
    }
}

/// Userspace's bookkeeping, pinned with the maps so that it outlives the agent (see
/// `EXPORTED_MAP` in detector-common); the programs never touch it. Sized by userspace.
#[map]
static EXPORTED: HashMap<FlowKey, ExportMark> =
    HashMap::with_max_entries(DEFAULT_MAP_SIZE, BPF_F_NO_PREALLOC);

#[map]
static DRAIN_STATE: Array<DrainState> = Array::with_max_entries(1, 0);

const EEXIST: i32 = 17;

#[inline(always)]
fn count(c: &mut CounterBlock, idx: u32, n: u64) {
    if let Some(v) = c.get_mut(idx as usize) {
        *v += n;
    }
}

/// Adds one packet (or `segs` GSO segments) to its flow, or to the overflow ring.
#[inline(always)]
fn account(c: &mut CounterBlock, pkt: &Packet, ifindex: u32, direction: u8, segs: u32) {
    let now = now_ns();
    let packets = segs as u64;
    let bytes = pkt.ip_len as u64 + (segs as u64 - 1) * pkt.hdr_len as u64;
    if pkt.fragment != 0 {
        count(c, counter::FRAGMENTS, packets);
    }
    // SAFETY: a read-only global set by the loader; volatile, not constant-folded.
    let slots_on = unsafe { core::ptr::read_volatile(&FLOW_SLOTS) } != 0;
    let added = if pkt.v4 != 0
        && slots_on
        && slots::add(
            c,
            &FLOWS4_SLOTS,
            &pkt.key4(direction),
            pkt,
            (ifindex, direction),
            packets,
            bytes,
            now,
        ) {
        true
    } else if pkt.v4 != 0 {
        add_to_flow(
            c,
            &FLOWS4,
            &pkt.key4(direction),
            pkt,
            (ifindex, direction),
            packets,
            bytes,
            now,
        )
    } else {
        add_to_flow(
            c,
            &FLOWS6,
            &pkt.key(ifindex, direction),
            pkt,
            (ifindex, direction),
            packets,
            bytes,
            now,
        )
    };
    if added {
        count(c, counter::FLOW_PACKETS, packets);
        count(c, counter::FLOW_BYTES, bytes);
        return;
    }
    count(c, counter::INSERT_FAILED, packets);
    match OVERFLOW.reserve::<OverflowEvent>(0) {
        Some(mut entry) => {
            entry.write(OverflowEvent {
                ts_ns: now,
                key: pkt.key(ifindex, direction),
                bytes: bytes as u32,
                tcp_flags: pkt.tcp_flags,
                tos: pkt.tos,
                hints: pkt.hints,
                _pad: [0; 1],
            });
            entry.submit(0);
            count(c, counter::OVERFLOW_PACKETS, packets);
            count(c, counter::OVERFLOW_BYTES, bytes);
        }
        None => count(c, counter::RINGBUF_DROPPED, packets),
    }
}

/// CLOCK_MONOTONIC ns: the agent's clock if it runs, else the kernel's coarse clock.
#[inline(always)]
fn now_ns() -> u64 {
    match CLOCK.get(0) {
        Some(&t) if t != 0 => t,
        // SAFETY: helper without arguments.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// A new flow's counters, of its first packet (`packets` > 1 when sampled), in either
/// store (the hash maps, the slot table).
#[inline(always)]
fn first_packet(pkt: &Packet, packets: u64, bytes: u64, now: u64, announced: bool) -> FlowStats {
    FlowStats {
        packets,
        bytes,
        first_ns: now,
        last_ns: now,
        tcp_flags: pkt.tcp_flags,
        tos: pkt.tos,
        hints: pkt.hints,
        announced: announced as u8,
        opening: [pkt.opening, 0, 0, 0],
    }
}

#[allow(clippy::too_many_arguments, reason = "inlined; one call per map")]
#[inline(always)]
fn add_to_flow<K>(
    c: &mut CounterBlock,
    map: &HashMap<K, FlowStats>,
    key: &K,
    pkt: &Packet,
    (ifindex, direction): (u32, u8),
    packets: u64,
    bytes: u64,
    now: u64,
) -> bool {
    if update(map, key, pkt, packets, bytes, now) {
        return true;
    }
    let mut event = announce(c, packets);
    let fresh = first_packet(pkt, packets, bytes, now, event.is_some());
    let r = map.insert(key, fresh, BPF_NOEXIST as u64);
    announced(&mut event, r.is_ok(), pkt, (ifindex, direction), bytes, now);
    match r {
        Ok(()) => true,
        // Another CPU created the key between our lookup and insert: add to it.
        Err(e) if e == -EEXIST => update(map, key, pkt, packets, bytes, now),
        Err(_) => false,
    }
}

/// Live flows: a reserved announcement of a new flow if there is room in the ring (the
/// new entry says whether it was, so that userspace counts the flow once either way).
#[inline(always)]
fn announce(
    c: &mut CounterBlock,
    packets: u64,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<NewFlowEvent>> {
    // SAFETY: a read-only global set by the loader; volatile, not constant-folded.
    if unsafe { core::ptr::read_volatile(&LIVE_FLOWS) } == 0 {
        return None;
    }
    let e = NEW_FLOWS.reserve::<NewFlowEvent>(0);
    if e.is_none() {
        count(c, counter::NEW_FLOWS_DROPPED, packets);
    }
    e
}

/// Sends the announcement [`announce`] reserved if the flow was `inserted`, else drops it.
#[inline(always)]
fn announced(
    event: &mut Option<aya_ebpf::maps::ring_buf::RingBufEntry<NewFlowEvent>>,
    inserted: bool,
    pkt: &Packet,
    (ifindex, direction): (u32, u8),
    bytes: u64,
    now: u64,
) {
    if let Some(mut e) = event.take() {
        if inserted {
            e.write(NewFlowEvent {
                ts_ns: now,
                key: pkt.key(ifindex, direction),
                bytes: bytes as u32,
                tcp_flags: pkt.tcp_flags,
                _pad: [0; 3],
            });
            e.submit(0);
        } else {
            e.discard(0);
        }
    }
}

/// Adds to a flow's shared entry: counts with atomic adds (exact whichever CPUs the
/// flow's packets arrive on), the TCP flags with an atomic OR only when a new flag shows
/// up. `last_ns` is a plain store: two CPUs racing leave one of two nearly equal times.
/// `first_ns` and `tos` were set by the insert.
#[inline(always)]
fn update<K>(
    map: &HashMap<K, FlowStats>,
    key: &K,
    pkt: &Packet,
    packets: u64,
    bytes: u64,
    now: u64,
) -> bool {
    let Some(v) = map.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a pointer to the entry's value, valid for this program run (RCU).
    unsafe { update_stats(v, pkt, packets, bytes, now) };
    true
}

/// [`update`] on a flow's counters wherever they live (a hash-map entry, a slot).
///
/// # Safety
/// `v` points to a flow's counters, valid for this program run; the counters are only
/// changed through atomic operations, as every CPU shares them.
#[inline(always)]
unsafe fn update_stats(v: *mut FlowStats, pkt: &Packet, packets: u64, bytes: u64, now: u64) {
    // SAFETY: see the function's contract.
    unsafe {
        // A plain read: fetching the old value in the add needs BPF v3 atomics, and "one
        // of the flow's first packets" need not be exact.
        let before = (*v).packets;
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).packets, packets);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).bytes, bytes);
        (*v).last_ns = now;
        // tcp_flags is the low byte of the 8-aligned word at offset 32 (little endian),
        // hints its third byte.
        let mut or = 0u64;
        if (*v).tcp_flags & pkt.tcp_flags != pkt.tcp_flags {
            or |= pkt.tcp_flags as u64;
        }
        if pkt.hints != 0 && before < hint::FIRST_PACKETS && (*v).hints & pkt.hints != pkt.hints {
            or |= (pkt.hints as u64) << 16;
        }
        if or != 0 {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
                (&raw mut (*v).tcp_flags).cast::<u64>(),
                or,
            );
        }
        // The opening: the first four payload sizes, each in the first free slot. One
        // byte read per packet once they are filled; plain stores (two CPUs racing on a
        // flow's first packets may leave one of two sizes, which need not be exact).
        let o = &raw mut (*v).opening;
        if pkt.opening != 0 && (*o)[3] == 0 {
            if (*o)[0] == 0 {
                (*o)[0] = pkt.opening;
            } else if (*o)[1] == 0 {
                (*o)[1] = pkt.opening;
            } else if (*o)[2] == 0 {
                (*o)[2] = pkt.opening;
            } else {
                (*o)[3] = pkt.opening;
            }
        }
    }
}

#[inline(always)]
fn sampled_out(c: &mut CounterBlock) -> bool {
    // SAFETY: a read-only global set by the loader; volatile so it is not constant-folded.
    let rate = unsafe { core::ptr::read_volatile(&SAMPLING) };
    if rate > 1 && unsafe { bpf_get_prandom_u32() } % rate != 0 {
        count(c, counter::SAMPLED_OUT, 1);
        return true;
    }
    false
}

/// Where the full length of a frame comes from.
#[derive(Clone, Copy)]
enum FrameLen {
    /// An XDP frame: the linear part, unless the frame has fragments (multi-buffer), which
    /// only a helper call can tell; the call is made only when the headers say the frame
    /// is longer than its linear part.
    Xdp(*mut aya_ebpf::bindings::xdp_md),
    /// An skb: its length is known.
    Skb(u32),
}

impl FrameLen {
    #[inline(always)]
    fn resolve(self, linear: u64, needed: u64) -> u64 {
        match self {
            FrameLen::Skb(len) => len as u64,
            FrameLen::Xdp(_) if needed <= linear => linear,
            // SAFETY: helper on the program's own context.
            FrameLen::Xdp(ctx) => unsafe { bpf_xdp_get_buff_len(ctx) },
        }
    }
}

#[inline(always)]
fn meter(f: &Frame, ifindex: u32, direction: u8, len: FrameLen, (vlan_tci, segs): (u16, u32)) {
    let Some(c) = COUNTERS.get_ptr_mut(direction as u32) else {
        return;
    };
    // SAFETY: this CPU's block; only this CPU writes it, and programs do not nest on a CPU.
    let c = unsafe { &mut *c };
    let linear = (f.end - f.data) as u64;
    count(c, counter::FRAMES, 1);
    if sampled_out(c) {
        count(c, counter::FRAME_BYTES, len.resolve(linear, u64::MAX));
        return;
    }
    match parse(f, vlan_tci) {
        Ok(mut pkt) => {
            // SAFETY: a read-only global set by the loader; volatile, not constant-folded.
            if unsafe { core::ptr::read_volatile(&PAYLOAD_HINTS) } != 0 && pkt.fragment == 0 {
                pkt.hints = forget(payload_hints(f, (pkt.l3_off + pkt.hdr_len) as usize, &pkt));
            }
            let needed = pkt.l3_off as u64 + pkt.ip_len as u64;
            count(c, counter::FRAME_BYTES, len.resolve(linear, needed));
            account(
                c,
                &pkt,
                ifindex,
                direction,
                if segs == 0 { 1 } else { segs },
            );
        }
        Err(reason) => {
            count(c, counter::FRAME_BYTES, len.resolve(linear, u64::MAX));
            count(c, reason, 1);
        }
    }
}

/// Multi-buffer aware (`xdp.frags`): jumbo frames on drivers that split them work, and
/// the headers the parser reads are always in the first buffer.
#[xdp(frags)]
pub fn flow_ingress(ctx: XdpContext) -> u32 {
    ingress(&ctx)
}

/// What `flow_ingress` does (the benchmark's sequence-driven programs call it too).
#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    let f = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    meter(
        &f,
        ctx.ingress_ifindex() as u32,
        DIRECTION_INGRESS,
        FrameLen::Xdp(ctx.ctx),
        (0, 1),
    );
    xdp_action::XDP_PASS
}

/// Bytes of headers the parser may need in the linear part of an skb.
const TC_PULL_LEN: u32 = 128;

#[classifier]
pub fn flow_egress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the __sk_buff context the kernel gave us.
    let (len, ifindex, vlan_present, vlan_tci, segs) = unsafe {
        (
            (*skb).len,
            (*skb).ifindex,
            (*skb).vlan_present,
            (*skb).vlan_tci,
            (*skb).gso_segs,
        )
    };
    let want = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // Linearise the headers only; the packet's content is unchanged.
        let _ = ctx.pull_data(want);
    }
    let f = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let tci = if vlan_present != 0 {
        (vlan_tci & 0x0fff) as u16
    } else {
        0
    };
    meter(
        &f,
        ifindex,
        DIRECTION_EGRESS,
        FrameLen::Skb(len),
        (tci, segs),
    );
    TC_ACT_OK
}

/// Benchmark reference: returns PASS and does nothing else.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark reference: parses to the flow key (the 5-tuple with VLANs, direction and
/// interface) with the same parser, and stops: no clock, no map, no counter.
#[xdp]
pub fn bench_parse(ctx: XdpContext) -> u32 {
    let f = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    if let Ok(p) = parse(&f, 0) {
        let key = p.key(ctx.ingress_ifindex() as u32, DIRECTION_INGRESS);
        let mut sink = FlowKey::default();
        // SAFETY: writing a local; volatile so the key is really built.
        unsafe { core::ptr::write_volatile(&mut sink, key) };
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
