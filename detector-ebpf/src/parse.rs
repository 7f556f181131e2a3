//! The parsers: Ethernet and VLAN tags, IPv4, IPv6 and its extension headers, the L4
//! ports, flags and payload size of one frame, and the payload signatures of
//! `--payload-hints`. Bounds-checked reads the verifier can follow; no map is touched
//! here (the meter in `main.rs` does that).

use detector_common::{FlowKey, FlowKey4, counter, hint, opening};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86DD;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88A8;
pub(crate) const ETH_P_QINQ: u16 = 0x9100;

pub(crate) const IPPROTO_HOPOPTS: u8 = 0;
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_ROUTING: u8 = 43;
pub(crate) const IPPROTO_FRAGMENT: u8 = 44;
pub(crate) const IPPROTO_AH: u8 = 51;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;
pub(crate) const IPPROTO_DSTOPTS: u8 = 60;
pub(crate) const IPPROTO_SCTP: u8 = 132;
pub(crate) const IPPROTO_UDPLITE: u8 = 136;

pub(crate) const MAX_IPV6_EXT: usize = 8;

/// The linear bytes of a frame: `[data, end)`.
pub(crate) struct Frame {
    pub(crate) data: usize,
    pub(crate) end: usize,
}

impl Frame {
    /// The header of `len` bytes at `off`, if it is inside the frame. Reads go through the
    /// returned pointer at constant offsets below `len`, which is what the verifier can
    /// follow.
    #[inline(always)]
    pub(crate) fn at(&self, off: usize, len: usize) -> Option<Hdr> {
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
pub(crate) struct Hdr(usize);

impl Hdr {
    /// # Safety
    /// `i` must be below the length checked by [`Frame::at`].
    #[inline(always)]
    pub(crate) unsafe fn byte(self, i: usize) -> u8 {
        unsafe { *((self.0 + i) as *const u8) }
    }

    /// # Safety
    /// `i + 2` must not exceed the length checked by [`Frame::at`].
    #[inline(always)]
    pub(crate) unsafe fn be16(self, i: usize) -> u16 {
        u16::from_be(unsafe { packet_load((self.0 + i) as *const u16) })
    }

    /// Four bytes as they are in the packet (no byte swap), for addresses.
    ///
    /// # Safety
    /// `i + 4` must not exceed the length checked by [`Frame::at`].
    #[inline(always)]
    pub(crate) unsafe fn word(self, i: usize) -> u32 {
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
pub(crate) unsafe fn packet_load<T: Copy>(p: *const T) -> T {
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
pub(crate) struct Packet {
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) vlan: u16,
    pub(crate) vlan_inner: u16,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
    pub(crate) tos: u8,
    pub(crate) fragment: u8,
    /// 1 for IPv4 (keyed in `FLOWS4`), 0 for IPv6.
    pub(crate) v4: u8,
    /// IP total length (IPv6: payload length + 40).
    pub(crate) ip_len: u32,
    /// Length of the IP header plus L4 header, for GSO accounting.
    pub(crate) hdr_len: u32,
    /// Offset of the IP header in the frame.
    pub(crate) l3_off: u32,
    /// [`hint`] flags of the payload (payload hints only).
    pub(crate) hints: u8,
    /// The L4 payload's size as an opening slot stores it ([`opening::quantize`]); 0
    /// for no payload, a fragment, or a protocol without ports.
    pub(crate) opening: u8,
}

/// `::ffff:0:0/96` as words: bytes 10 and 11 are 0xff.
pub(crate) const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Packet {
    /// The compact key of an IPv4 packet.
    #[inline(always)]
    pub(crate) fn key4(&self, direction: u8) -> FlowKey4 {
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
    pub(crate) fn key(&self, ifindex: u32, direction: u8) -> FlowKey {
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
pub(crate) fn parse(f: &Frame, offloaded_vlan: u16) -> Result<Packet, u32> {
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
pub(crate) fn parse_ipv4(f: &Frame, off: usize, p: &mut Packet) -> Result<usize, u32> {
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
pub(crate) fn parse_ipv6(f: &Frame, off: usize, p: &mut Packet) -> Result<usize, u32> {
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
pub(crate) fn parse_l4(f: &Frame, l4: usize, p: &mut Packet) -> Result<usize, u32> {
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

/// STUN's magic cookie (RFC 5389), bytes 4-7 of every STUN message.
pub(crate) const STUN_COOKIE: u32 = w(&[0x21, 0x12, 0xa4, 0x42]);

/// Four payload bytes as [`Hdr::word`] reads them, for comparisons without loops.
pub(crate) const fn w(b: &[u8; 4]) -> u32 {
    u32::from_ne_bytes(*b)
}

/// The [`hint`] flags of the L4 payload at `off`: only its first 20 bytes are read, as
/// whole words compared with constants (few instructions, few verifier states).
#[inline(always)]
pub(crate) fn payload_hints(f: &Frame, off: usize, pkt: &Packet) -> u8 {
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
