//! Flow meter programs: XDP on ingress, TC (tcx/clsact) on egress of the same interface.
//!
//! # Map design
//!
//! - `FLOWS`: a `BPF_MAP_TYPE_PERCPU_HASH` keyed by [`FlowKey`] (addresses, ports, protocol,
//!   VLANs, direction, ifindex), valued by [`FlowStats`] (packets, bytes, first/last seen,
//!   OR of TCP flags, ToS of the first packet). Per-CPU so that every CPU adds to its own
//!   copy without atomics and without losing a count; userspace sums the copies. Sized at
//!   load time (`--map-size`, default 262,144 keys). Never LRU: the kernel never evicts a
//!   flow behind our back, so no packet is lost to eviction.
//! - Eviction is done by userspace only. It reads the map every second, exports deltas of
//!   long flows at each active timeout (it remembers what it already exported, the kernel
//!   keeps cumulative counts), and removes idle or FIN/RST-ended flows with
//!   `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which returns the final counts atomically: a packet
//!   arriving after the delete creates a new entry, so nothing falls between the two.
//! - Overflow path: when inserting a new flow fails (map full), the packet's contribution
//!   (key, IP length, flags, ToS, time) goes into the `OVERFLOW` ring buffer; userspace
//!   aggregates those into flows of its own and exports them like the others. When the
//!   ring buffer is full too, the packet is counted in `ringbuf_dropped` (the only way a
//!   packet can be missing from the export, and it is never silent).
//! - `COUNTERS`: a per-CPU array of counters per direction (frames, bytes, packets and
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
//! On egress, a GSO super-packet is counted as the `gso_segs` packets it becomes on the
//! wire, with the headers of every segment.
//!
//! Every program returns `XDP_PASS` / `TC_ACT_OK`, whatever happens: a frame that cannot
//! be parsed is counted by reason and passed untouched.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_xdp_get_buff_len},
    macros::{classifier, map, xdp},
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, XdpContext},
};
use detector_common::{
    COUNTERS_LEN, DEFAULT_MAP_SIZE, DIRECTION_EGRESS, DIRECTION_INGRESS, FlowKey, FlowStats,
    OVERFLOW_RING_BYTES, OverflowEvent, counter,
};

/// 1-in-N sampling; 0 or 1 accounts every packet. Set by the loader.
#[unsafe(no_mangle)]
static SAMPLING: u32 = 0;

#[map]
static FLOWS: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAP_SIZE, 0);

#[map]
static OVERFLOW: RingBuf = RingBuf::with_byte_size(OVERFLOW_RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

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
    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        self.load::<u16>(off).map(u16::from_be)
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: bounds checked against the end of the packet just above.
        Some(unsafe { core::ptr::read_unaligned(start as *const T) })
    }
}

/// What the parser extracts from one packet besides the key.
#[derive(Default)]
struct Packet {
    /// IP total length (IPv6: payload length + 40).
    ip_len: u32,
    /// Length of the IP header plus L4 header, for GSO accounting.
    hdr_len: u32,
    tcp_flags: u8,
    tos: u8,
    fragment: bool,
}

/// Parses a frame into `key` and `pkt`; on failure returns the counter to bump.
#[inline(always)]
fn parse(f: &Frame, key: &mut FlowKey, pkt: &mut Packet, offloaded_vlan: u16) -> Result<(), u32> {
    let mut ethertype = f.be16_at(12).ok_or(counter::ERR_ETH_TRUNCATED)?;
    let mut off = ETH_HLEN;
    let mut tags = 0usize;
    if offloaded_vlan != 0 {
        key.vlan = offloaded_vlan;
        tags = 1;
    }
    // Up to two tags in the frame (three with an offloaded one are not accounted further).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD && ethertype != ETH_P_QINQ {
            break;
        }
        let tci = f.be16_at(off).ok_or(counter::ERR_VLAN_TRUNCATED)?;
        let next = f.be16_at(off + 2).ok_or(counter::ERR_VLAN_TRUNCATED)?;
        if tags == 0 {
            key.vlan = tci & 0x0fff;
        } else {
            key.vlan_inner = tci & 0x0fff;
        }
        tags += 1;
        ethertype = next;
        off += 4;
    }
    let (proto, l4) = match ethertype {
        ETH_P_IP => parse_ipv4(f, off, key, pkt)?,
        ETH_P_IPV6 => parse_ipv6(f, off, key, pkt)?,
        _ => return Err(counter::NOT_IP),
    };
    key.protocol = proto;
    if pkt.fragment {
        pkt.hdr_len = (l4 - off) as u32;
        return Ok(());
    }
    let l4_hdr = parse_l4(f, l4, proto, key, pkt)?;
    pkt.hdr_len = (l4 - off + l4_hdr) as u32;
    Ok(())
}

#[inline(always)]
fn parse_ipv4(
    f: &Frame,
    off: usize,
    key: &mut FlowKey,
    pkt: &mut Packet,
) -> Result<(u8, usize), u32> {
    let hdr: [u8; 20] = f.load(off).ok_or(counter::ERR_IPV4_TRUNCATED)?;
    if hdr[0] >> 4 != 4 {
        return Err(counter::ERR_IP_BAD_HEADER);
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < 20 || total < ihl {
        return Err(counter::ERR_IP_BAD_HEADER);
    }
    // Options must be present in full.
    if f.data + off + ihl > f.end {
        return Err(counter::ERR_IPV4_TRUNCATED);
    }
    pkt.tos = hdr[1];
    pkt.ip_len = total as u32;
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    pkt.fragment = frag_offset != 0;
    key.src_addr[10] = 0xff;
    key.src_addr[11] = 0xff;
    key.src_addr[12..16].copy_from_slice(&hdr[12..16]);
    key.dst_addr[10] = 0xff;
    key.dst_addr[11] = 0xff;
    key.dst_addr[12..16].copy_from_slice(&hdr[16..20]);
    Ok((hdr[9], off + ihl))
}

#[inline(always)]
fn parse_ipv6(
    f: &Frame,
    off: usize,
    key: &mut FlowKey,
    pkt: &mut Packet,
) -> Result<(u8, usize), u32> {
    let hdr: [u8; 8] = f.load(off).ok_or(counter::ERR_IPV6_TRUNCATED)?;
    let src: [u8; 16] = f.load(off + 8).ok_or(counter::ERR_IPV6_TRUNCATED)?;
    let dst: [u8; 16] = f.load(off + 24).ok_or(counter::ERR_IPV6_TRUNCATED)?;
    if hdr[0] >> 4 != 6 {
        return Err(counter::ERR_IP_BAD_HEADER);
    }
    pkt.tos = (hdr[0] << 4) | (hdr[1] >> 4);
    pkt.ip_len = u16::from_be_bytes([hdr[4], hdr[5]]) as u32 + 40;
    key.src_addr = src;
    key.dst_addr = dst;
    let mut next = hdr[6];
    let mut l4 = off + 40;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: [u8; 2] = f.load(l4).ok_or(counter::ERR_IPV6_EXT_TRUNCATED)?;
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: [u8; 2] = f.load(l4).ok_or(counter::ERR_IPV6_EXT_TRUNCATED)?;
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let ext: [u8; 4] = f.load(l4).ok_or(counter::ERR_IPV6_EXT_TRUNCATED)?;
                next = ext[0];
                l4 += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    pkt.fragment = true;
                    return Ok((next, l4));
                }
            }
            _ => return Ok((next, l4)),
        }
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(counter::ERR_IPV6_TOO_MANY_EXT)
        }
        _ => Ok((next, l4)),
    }
}

/// Fills ports / ICMP type and code and TCP flags; returns the L4 header length.
#[inline(always)]
fn parse_l4(
    f: &Frame,
    l4: usize,
    proto: u8,
    key: &mut FlowKey,
    pkt: &mut Packet,
) -> Result<usize, u32> {
    match proto {
        IPPROTO_TCP => {
            let h: [u8; 14] = f.load(l4).ok_or(counter::ERR_L4_TRUNCATED)?;
            key.src_port = u16::from_be_bytes([h[0], h[1]]);
            key.dst_port = u16::from_be_bytes([h[2], h[3]]);
            pkt.tcp_flags = h[13];
            Ok(((h[12] >> 4) as usize) * 4)
        }
        IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP => {
            let h: [u8; 4] = f.load(l4).ok_or(counter::ERR_L4_TRUNCATED)?;
            key.src_port = u16::from_be_bytes([h[0], h[1]]);
            key.dst_port = u16::from_be_bytes([h[2], h[3]]);
            Ok(if proto == IPPROTO_SCTP { 12 } else { 8 })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; 2] = f.load(l4).ok_or(counter::ERR_L4_TRUNCATED)?;
            key.dst_port = u16::from_be_bytes(h);
            Ok(8)
        }
        _ => Ok(0),
    }
}

#[inline(always)]
fn count(direction: u8, idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(direction as u32 * counter::COUNT + idx) {
        // SAFETY: per-CPU slot, only this CPU writes it, and programs do not nest on a CPU.
        unsafe { *p += n };
    }
}

/// Adds one packet (or `segs` GSO segments) to its flow, or to the overflow ring.
#[inline(always)]
fn account(key: &FlowKey, pkt: &Packet, segs: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let dir = key.direction;
    let packets = segs as u64;
    let bytes = pkt.ip_len as u64 + (segs as u64 - 1) * pkt.hdr_len as u64;
    if pkt.fragment {
        count(dir, counter::FRAGMENTS, packets);
    }
    if add_to_flow(key, pkt, packets, bytes, now) {
        count(dir, counter::FLOW_PACKETS, packets);
        count(dir, counter::FLOW_BYTES, bytes);
        return;
    }
    count(dir, counter::INSERT_FAILED, packets);
    match OVERFLOW.reserve::<OverflowEvent>(0) {
        Some(mut entry) => {
            entry.write(OverflowEvent {
                ts_ns: now,
                key: *key,
                bytes: bytes as u32,
                tcp_flags: pkt.tcp_flags,
                tos: pkt.tos,
                _pad: [0; 2],
            });
            entry.submit(0);
            count(dir, counter::OVERFLOW_PACKETS, packets);
            count(dir, counter::OVERFLOW_BYTES, bytes);
        }
        None => count(dir, counter::RINGBUF_DROPPED, packets),
    }
}

#[inline(always)]
fn add_to_flow(key: &FlowKey, pkt: &Packet, packets: u64, bytes: u64, now: u64) -> bool {
    if update(key, pkt, packets, bytes, now) {
        return true;
    }
    let fresh = FlowStats {
        packets,
        bytes,
        first_ns: now,
        last_ns: now,
        tcp_flags: pkt.tcp_flags,
        tos: pkt.tos,
        _pad: [0; 6],
    };
    match FLOWS.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // Another CPU created the key between our lookup and insert: add to our copy.
        Err(e) if e == -EEXIST => update(key, pkt, packets, bytes, now),
        Err(_) => false,
    }
}

#[inline(always)]
fn update(key: &FlowKey, pkt: &Packet, packets: u64, bytes: u64, now: u64) -> bool {
    let Some(v) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: this CPU's copy of the value; only this CPU writes it.
    let v = unsafe { &mut *v };
    if v.first_ns == 0 {
        v.first_ns = now;
        v.tos = pkt.tos;
    }
    v.packets += packets;
    v.bytes += bytes;
    v.last_ns = now;
    v.tcp_flags |= pkt.tcp_flags;
    true
}

#[inline(always)]
fn sampled_out(direction: u8) -> bool {
    // SAFETY: a read-only global set by the loader; volatile so it is not constant-folded.
    let rate = unsafe { core::ptr::read_volatile(&SAMPLING) };
    if rate > 1 && unsafe { bpf_get_prandom_u32() } % rate != 0 {
        count(direction, counter::SAMPLED_OUT, 1);
        return true;
    }
    false
}

#[inline(always)]
fn meter(f: &Frame, ifindex: u32, direction: u8, frame_len: u64, vlan_tci: u16, segs: u32) {
    count(direction, counter::FRAMES, 1);
    count(direction, counter::FRAME_BYTES, frame_len);
    if sampled_out(direction) {
        return;
    }
    let mut key = FlowKey {
        ifindex,
        direction,
        ..FlowKey::default()
    };
    let mut pkt = Packet::default();
    match parse(f, &mut key, &mut pkt, vlan_tci) {
        Ok(()) => account(&key, &pkt, if segs == 0 { 1 } else { segs }),
        Err(reason) => count(direction, reason, 1),
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
    // SAFETY: helper on our own context; counts the fragments of a multi-buffer frame too.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) };
    meter(
        &f,
        ctx.ingress_ifindex() as u32,
        DIRECTION_INGRESS,
        len,
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
    meter(&f, ifindex, DIRECTION_EGRESS, len as u64, tci, segs);
    TC_ACT_OK
}

/// Benchmark reference: returns PASS and does nothing else.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark reference: parses to the 5-tuple with the same parser, touches no map.
#[xdp]
pub fn bench_parse(ctx: XdpContext) -> u32 {
    let f = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let mut key = FlowKey::default();
    let mut pkt = Packet::default();
    let ok = parse(&f, &mut key, &mut pkt, 0).is_ok();
    // Keep the parse from being optimised away: fold the tuple into a volatile sink.
    let mut sink = 0u32;
    let folded = (key.src_port as u32)
        ^ (key.dst_port as u32)
        ^ (key.protocol as u32)
        ^ u32::from_ne_bytes([
            key.src_addr[12],
            key.src_addr[13],
            key.src_addr[14],
            key.src_addr[15],
        ])
        ^ u32::from_ne_bytes([
            key.dst_addr[12],
            key.dst_addr[13],
            key.dst_addr[14],
            key.dst_addr[15],
        ])
        ^ pkt.ip_len
        ^ ok as u32;
    // SAFETY: writing a local.
    unsafe { core::ptr::write_volatile(&mut sink, folded) };
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
