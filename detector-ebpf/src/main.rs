//! Flow meter programs: XDP on ingress, TC (tcx/clsact) on egress of the same interface.
//!
//! # Map design
//!
//! - `FLOWS4` and `FLOWS6`: `BPF_MAP_TYPE_HASH` maps keyed by the flow identity
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
//!   the maps.
//! - Overflow path: when inserting a new flow fails (map full), the packet's contribution
//!   (key, IP length, flags, ToS, time) goes into the `OVERFLOW` ring buffer; userspace
//!   aggregates those into flows of its own and exports them like the others. When the
//!   ring buffer is full too, the packet is counted in `ringbuf_dropped` (the only way a
//!   packet can be missing from the export, and it is never silent).
//! - `COUNTERS`: a per-CPU array of one counter block per direction (frames, bytes, packets and
//!   bytes accounted, insert failures, ring-buffer drops, sampled-out packets, non-IP
//!   frames, fragments, parse failures by reason).
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
    ExportMark, FlowKey, FlowKey4, FlowStats, NEW_FLOWS_RING_BYTES, NewFlowEvent,
    OVERFLOW_RING_BYTES, OverflowEvent, counter, hint, opening,
};

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

/// Userspace's bookkeeping, pinned with the maps so that it outlives the agent (see
/// `EXPORTED_MAP` in detector-common); the programs never touch it. Sized by userspace.
#[map]
static EXPORTED: HashMap<FlowKey, ExportMark> =
    HashMap::with_max_entries(DEFAULT_MAP_SIZE, BPF_F_NO_PREALLOC);

#[map]
static DRAIN_STATE: Array<DrainState> = Array::with_max_entries(1, 0);

const EEXIST: i32 = 17;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ: u16 = 0x9100;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

const MAX_IPV6_EXT: usize = 8;

/// The linear bytes of a frame: `[data, end)`.
struct Frame {
    data: usize,
    end: usize,
}

impl Frame {
    /// The header of `len` bytes at `off`, if it is inside the frame. Reads go through the
    /// returned pointer at constant offsets below `len`, which is what the verifier can
    /// follow.
    #[inline(always)]
    fn at(&self, off: usize, len: usize) -> Option<Hdr> {
        let p = self.data + off;
        if p + len > self.end {
            None
        } else {
            Some(Hdr(p))
        }
    }
}

/// A bounds-checked header pointer (see [`Frame::at`]).
#[derive(Clone, Copy)]
struct Hdr(usize);

impl Hdr {
    /// # Safety
    /// `i` must be below the length checked by [`Frame::at`].
    #[inline(always)]
    unsafe fn byte(self, i: usize) -> u8 {
        unsafe { *((self.0 + i) as *const u8) }
    }

    /// # Safety
    /// `i + 2` must not exceed the length checked by [`Frame::at`].
    #[inline(always)]
    unsafe fn be16(self, i: usize) -> u16 {
        u16::from_be(unsafe { packet_load((self.0 + i) as *const u16) })
    }

    /// Four bytes as they are in the packet (no byte swap), for addresses.
    ///
    /// # Safety
    /// `i + 4` must not exceed the length checked by [`Frame::at`].
    #[inline(always)]
    unsafe fn word(self, i: usize) -> u32 {
        unsafe { packet_load((self.0 + i) as *const u32) }
    }
}

/// One BPF load instruction from packet memory.
///
/// Header fields often sit at offsets that are not multiples of their size (the IPv4
/// addresses of an untagged frame start at byte 26). The kernel allows unaligned packet
/// loads on the architectures with efficient unaligned access (x86-64, arm64), and the
/// verifier checks bounds, not alignment, for packet pointers. Rust's `read_unaligned`
/// would make LLVM split each load into byte loads, so this reads through the pointer
/// with a volatile load, which LLVM emits as a single `ldx` of the field's width and does
/// not merge, split or reorder.
///
/// # Safety
/// `p` points into the bounds-checked packet.
#[inline(always)]
unsafe fn packet_load<T: Copy>(p: *const T) -> T {
    // The packet is not typed memory; the load width is what matters here.
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "BPF packet loads may be unaligned; see the function's documentation"
    )]
    unsafe {
        core::ptr::read_volatile(p)
    }
}

/// What the parser extracts from one packet. Addresses are kept as four words holding the
/// address bytes in packet order (IPv4 as IPv4-mapped IPv6), so building them costs word
/// moves instead of byte loops.
#[derive(Clone, Copy)]
struct Packet {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    vlan: u16,
    vlan_inner: u16,
    proto: u8,
    tcp_flags: u8,
    tos: u8,
    fragment: u8,
    /// 1 for IPv4 (keyed in `FLOWS4`), 0 for IPv6.
    v4: u8,
    /// IP total length (IPv6: payload length + 40).
    ip_len: u32,
    /// Length of the IP header plus L4 header, for GSO accounting.
    hdr_len: u32,
    /// Offset of the IP header in the frame.
    l3_off: u32,
    /// [`hint`] flags of the payload (payload hints only).
    hints: u8,
    /// The L4 payload's size as an opening slot stores it ([`opening::quantize`]); 0
    /// for no payload, a fragment, or a protocol without ports.
    opening: u8,
}

/// `::ffff:0:0/96` as words: bytes 10 and 11 are 0xff.
const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Packet {
    /// The compact key of an IPv4 packet.
    #[inline(always)]
    fn key4(&self, direction: u8) -> FlowKey4 {
        FlowKey4 {
            src_addr: self.src[3].to_ne_bytes(),
            dst_addr: self.dst[3].to_ne_bytes(),
            src_port: self.sport,
            dst_port: self.dport,
            vlan: self.vlan,
            vlan_inner: self.vlan_inner,
            protocol: self.proto,
            direction,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn key(&self, ifindex: u32, direction: u8) -> FlowKey {
        FlowKey {
            // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
            src_addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.src) },
            dst_addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.dst) },
            src_port: self.sport,
            dst_port: self.dport,
            ifindex,
            vlan: self.vlan,
            vlan_inner: self.vlan_inner,
            protocol: self.proto,
            direction,
            _pad: [0; 2],
        }
    }
}

/// Parses a frame; on failure returns the counter to bump.
#[inline(always)]
fn parse(f: &Frame, offloaded_vlan: u16) -> Result<Packet, u32> {
    let mut p = Packet {
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        vlan: offloaded_vlan,
        vlan_inner: 0,
        proto: 0,
        tcp_flags: 0,
        tos: 0,
        fragment: 0,
        v4: 0,
        ip_len: 0,
        hdr_len: 0,
        l3_off: 0,
        hints: 0,
        opening: 0,
    };
    let eth = f.at(0, ETH_HLEN).ok_or(counter::ERR_ETH_TRUNCATED)?;
    // SAFETY: each read below stays inside the length its `at` checked.
    let mut ethertype = unsafe { eth.be16(12) };
    let mut off = ETH_HLEN;
    // With an offloaded tag (skb metadata), the first in-frame tag is the inner one.
    let mut outer_free = offloaded_vlan == 0;
    // Up to two tags in the frame.
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD && ethertype != ETH_P_QINQ {
            break;
        }
        let tag = f.at(off, 4).ok_or(counter::ERR_VLAN_TRUNCATED)?;
        let tci = unsafe { tag.be16(0) } & 0x0fff;
        if outer_free {
            p.vlan = tci;
            outer_free = false;
        } else {
            p.vlan_inner = tci;
        }
        ethertype = unsafe { tag.be16(2) };
        off += 4;
    }
    p.l3_off = off as u32;
    let l4 = match ethertype {
        ETH_P_IP => parse_ipv4(f, off, &mut p)?,
        ETH_P_IPV6 => parse_ipv6(f, off, &mut p)?,
        _ => return Err(counter::NOT_IP),
    };
    if p.fragment != 0 {
        p.hdr_len = (l4 - off) as u32;
        return Ok(p);
    }
    let l4_hdr = parse_l4(f, l4, &mut p)?;
    p.hdr_len = (l4 - off + l4_hdr) as u32;
    if (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) && p.ip_len > p.hdr_len {
        p.opening = opening::quantize(p.ip_len - p.hdr_len);
    }
    Ok(p)
}

/// Returns the offset of the L4 header.
#[inline(always)]
fn parse_ipv4(f: &Frame, off: usize, p: &mut Packet) -> Result<usize, u32> {
    let h = f.at(off, 20).ok_or(counter::ERR_IPV4_TRUNCATED)?;
    // SAFETY: 20 bytes checked.
    let (vihl, tos, total, frag, proto, src, dst) = unsafe {
        (
            h.byte(0),
            h.byte(1),
            h.be16(2) as usize,
            h.be16(6),
            h.byte(9),
            h.word(12),
            h.word(16),
        )
    };
    if vihl >> 4 != 4 {
        return Err(counter::ERR_IP_BAD_HEADER);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 || total < ihl {
        return Err(counter::ERR_IP_BAD_HEADER);
    }
    // Options must be present in full.
    if f.at(off, ihl).is_none() {
        return Err(counter::ERR_IPV4_TRUNCATED);
    }
    p.tos = tos;
    p.ip_len = total as u32;
    p.fragment = (frag & 0x1fff != 0) as u8;
    p.proto = proto;
    p.v4 = 1;
    p.src = [0, 0, V4_MAPPED_WORD2, src];
    p.dst = [0, 0, V4_MAPPED_WORD2, dst];
    Ok(off + ihl)
}

/// Walks the extension headers; returns the offset of the upper-layer header.
#[inline(always)]
fn parse_ipv6(f: &Frame, off: usize, p: &mut Packet) -> Result<usize, u32> {
    let h = f.at(off, 40).ok_or(counter::ERR_IPV6_TRUNCATED)?;
    // SAFETY: 40 bytes checked.
    unsafe {
        let b0 = h.byte(0);
        if b0 >> 4 != 6 {
            return Err(counter::ERR_IP_BAD_HEADER);
        }
        p.tos = (b0 << 4) | (h.byte(1) >> 4);
        p.ip_len = h.be16(4) as u32 + 40;
        p.proto = h.byte(6);
        p.src = [h.word(8), h.word(12), h.word(16), h.word(20)];
        p.dst = [h.word(24), h.word(28), h.word(32), h.word(36)];
    }
    let mut l4 = off + 40;
    for _ in 0..MAX_IPV6_EXT {
        match p.proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let e = f.at(l4, 2).ok_or(counter::ERR_IPV6_EXT_TRUNCATED)?;
                // SAFETY: 2 bytes checked.
                let (next, len) = unsafe { (e.byte(0), e.byte(1) as usize) };
                l4 += if p.proto == IPPROTO_AH {
                    (len + 2) * 4
                } else {
                    (len + 1) * 8
                };
                p.proto = next;
            }
            IPPROTO_FRAGMENT => {
                let e = f.at(l4, 4).ok_or(counter::ERR_IPV6_EXT_TRUNCATED)?;
                // SAFETY: 4 bytes checked.
                let (next, offset) = unsafe { (e.byte(0), e.be16(2) & 0xfff8) };
                p.proto = next;
                l4 += 8;
                if offset != 0 {
                    p.fragment = 1;
                    return Ok(l4);
                }
            }
            _ => return Ok(l4),
        }
    }
    match p.proto {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(counter::ERR_IPV6_TOO_MANY_EXT)
        }
        _ => Ok(l4),
    }
}

/// Fills ports / ICMP type and code and TCP flags; returns the L4 header length.
#[inline(always)]
fn parse_l4(f: &Frame, l4: usize, p: &mut Packet) -> Result<usize, u32> {
    match p.proto {
        IPPROTO_TCP => {
            let h = f.at(l4, 14).ok_or(counter::ERR_L4_TRUNCATED)?;
            // SAFETY: 14 bytes checked.
            unsafe {
                p.sport = h.be16(0);
                p.dport = h.be16(2);
                p.tcp_flags = h.byte(13);
                Ok(((h.byte(12) >> 4) as usize) * 4)
            }
        }
        IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP => {
            let h = f.at(l4, 4).ok_or(counter::ERR_L4_TRUNCATED)?;
            // SAFETY: 4 bytes checked.
            unsafe {
                p.sport = h.be16(0);
                p.dport = h.be16(2);
            }
            Ok(if p.proto == IPPROTO_SCTP { 12 } else { 8 })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h = f.at(l4, 2).ok_or(counter::ERR_L4_TRUNCATED)?;
            // SAFETY: 2 bytes checked.
            p.dport = unsafe { h.be16(0) };
            Ok(8)
        }
        _ => Ok(0),
    }
}

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
    let added = if pkt.v4 != 0 {
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
    // Live flows: the start is announced if there is room in the ring; the entry says
    // whether it was, so that userspace counts the flow once either way.
    // SAFETY: a read-only global set by the loader; volatile, not constant-folded.
    let live = unsafe { core::ptr::read_volatile(&LIVE_FLOWS) } != 0;
    let mut event = if live {
        let e = NEW_FLOWS.reserve::<NewFlowEvent>(0);
        if e.is_none() {
            count(c, counter::NEW_FLOWS_DROPPED, packets);
        }
        e
    } else {
        None
    };
    let fresh = FlowStats {
        packets,
        bytes,
        first_ns: now,
        last_ns: now,
        tcp_flags: pkt.tcp_flags,
        tos: pkt.tos,
        hints: pkt.hints,
        announced: event.is_some() as u8,
        opening: [pkt.opening, 0, 0, 0],
    };
    let r = map.insert(key, fresh, BPF_NOEXIST as u64);
    if let Some(mut e) = event.take() {
        if r.is_ok() {
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
    match r {
        Ok(()) => true,
        // Another CPU created the key between our lookup and insert: add to it.
        Err(e) if e == -EEXIST => update(map, key, pkt, packets, bytes, now),
        Err(_) => false,
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
    // SAFETY: a pointer to the entry's value, valid for this program run (RCU); the
    // counters are only changed through atomic operations, as every CPU shares them.
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
    true
}

/// STUN's magic cookie (RFC 5389), bytes 4-7 of every STUN message.
const STUN_COOKIE: u32 = w(&[0x21, 0x12, 0xa4, 0x42]);

/// Four payload bytes as [`Hdr::word`] reads them, for comparisons without loops.
const fn w(b: &[u8; 4]) -> u32 {
    u32::from_ne_bytes(*b)
}

/// The [`hint`] flags of the L4 payload at `off`: only its first 20 bytes are read, as
/// whole words compared with constants (few instructions, few verifier states).
#[inline(always)]
fn payload_hints(f: &Frame, off: usize, pkt: &Packet) -> u8 {
    match pkt.proto {
        IPPROTO_TCP => {
            if let Some(h) = f.at(off, 20) {
                // SAFETY: 20 bytes checked; every read below ends within them.
                let (w0, w1, w2, w3, w4) =
                    unsafe { (h.word(0), h.word(4), h.word(8), h.word(12), h.word(16)) };
                // "\x13BitTorrent protocol"
                if w0 == w(b"\x13Bit")
                    && w1 == w(b"Torr")
                    && w2 == w(b"ent ")
                    && w3 == w(b"prot")
                    && w4 == w(b"ocol")
                {
                    return hint::BITTORRENT;
                }
                // "GET /announce", "GET /scrape"
                if w0 == w(b"GET ")
                    && ((w1 == w(b"/ann") && w2 == w(b"ounc"))
                        || (w1 == w(b"/scr") && w2 & 0x00ff_ffff == w(b"ape\0")))
                {
                    return hint::TRACKER;
                }
            }
            if let Some(h) = f.at(off, 8) {
                // SAFETY: 8 bytes checked.
                let (w0, w1) = unsafe { (h.word(0), h.word(4)) };
                if w0 == w(b"GNUT") && w1 == w(b"ELLA") {
                    return hint::GNUTELLA;
                }
            }
            if let Some(h) = f.at(off, 6) {
                // eDonkey: protocol, 4-byte little-endian length (small), opcode.
                // SAFETY: 6 bytes checked.
                let (proto, len_hi, opcode) = unsafe { (h.byte(0), h.be16(3), h.byte(5)) };
                if (proto == 0xe3 || proto == 0xc5)
                    && len_hi == 0
                    && (opcode == 0x01 || opcode == 0x4c)
                {
                    return hint::EDONKEY;
                }
            }
            0
        }
        // QUIC (443, 80) has first bytes a uTP or DHT test could take for its own.
        IPPROTO_UDP
            if pkt.sport != 443 && pkt.dport != 443 && pkt.sport != 80 && pkt.dport != 80 =>
        {
            if let Some(h) = f.at(off, 4) {
                // SAFETY: 4 bytes checked.
                let w0 = unsafe { h.word(0) };
                // A bencoded dictionary whose first key is one letter: "d1:a", "d1:r", ...
                let key = (w0 >> 24) as u8;
                if w0 & 0x00ff_ffff == w(b"d1:\0")
                    && matches!(key, b'a' | b'e' | b'q' | b'r' | b't' | b'v' | b'y')
                {
                    return hint::DHT;
                }
            }
            if let Some(h) = f.at(off, 20) {
                // uTP: type 0-4 in the high nibble, version 1, extension 0-2; not STUN,
                // whose success response (0x0101) starts the same way but carries the
                // magic cookie next.
                // SAFETY: 20 bytes checked.
                let (b0, b1, cookie) = unsafe { (h.byte(0), h.byte(1), h.word(4)) };
                if b0 & 0x0f == 1 && b0 >> 4 <= 4 && b1 <= 2 && cookie != STUN_COOKIE {
                    return hint::UTP;
                }
            }
            0
        }
        _ => 0,
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
fn meter(f: &Frame, ifindex: u32, direction: u8, len: FrameLen, vlan_tci: u16, segs: u32) {
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
                pkt.hints = payload_hints(f, (pkt.l3_off + pkt.hdr_len) as usize, &pkt);
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
    let f = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    meter(
        &f,
        ctx.ingress_ifindex() as u32,
        DIRECTION_INGRESS,
        FrameLen::Xdp(ctx.ctx),
        0,
        1,
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
    meter(&f, ifindex, DIRECTION_EGRESS, FrameLen::Skb(len), tci, segs);
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
