//! Types shared by the kernel programs (`detector-ebpf`) and the userspace agent.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding and only integer fields
//! (no `bool`, enum or `Option`), so the byte layout is the same on both sides and a
//! key hashes identically whoever builds it. The `user` feature implements
//! `aya::Pod` so userspace can read them from maps.
#![no_std]

/// Flow map of IPv4 packets (compact [`FlowKey4`] keys) in the eBPF object.
pub const FLOWS4_MAP: &str = "FLOWS4";
/// Flow map of IPv6 packets ([`FlowKey`] keys) in the eBPF object.
pub const FLOWS6_MAP: &str = "FLOWS6";
/// Ring buffer carrying packets whose flow could not be inserted (map full).
pub const OVERFLOW_MAP: &str = "OVERFLOW";
/// Per-CPU counters map.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Memory-mappable one-entry array holding the current CLOCK_MONOTONIC time in ns,
/// written by userspace (see the eBPF crate's design notes); 0 means "use the kernel clock".
pub const CLOCK_MAP: &str = "CLOCK";
/// Userspace's export bookkeeping, kept in the kernel only so that it outlives the agent
/// when the maps are pinned (`run --pin-path`): per flow exported at an active timeout,
/// what was exported ([`ExportMark`], keyed by the full [`FlowKey`]). The programs never
/// touch it.
pub const EXPORTED_MAP: &str = "EXPORTED";
/// One-entry array of the drain's own counters ([`DrainState`]), for the same reason.
pub const DRAIN_STATE_MAP: &str = "DRAIN_STATE";
/// Ring buffer of [`NewFlowEvent`]s (live flows).
pub const NEW_FLOWS_MAP: &str = "NEW_FLOWS";
/// Its size in bytes: 65,536 events of 64 bytes between two reads.
pub const NEW_FLOWS_RING_BYTES: u32 = 1 << 22;
/// Global (read-only data): non-zero to announce new flows in `NEW_FLOWS`.
pub const LIVE_FLOWS_GLOBAL: &str = "LIVE_FLOWS";
/// Global (read-only data): non-zero to set payload [`hint`] flags.
pub const PAYLOAD_HINTS_GLOBAL: &str = "PAYLOAD_HINTS";
/// Global (read-only data) holding the 1-in-N sampling rate; 0 or 1 means every packet.
pub const SAMPLING_GLOBAL: &str = "SAMPLING";

/// Benchmark maps (`cargo xtask bench xdp`), one entry each unless a benchmark sizes
/// them: the sequence of indices the sequence-driven programs walk (entry 0 holds its
/// length; memory-mappable so the bench writes millions of entries directly), ...
pub const BENCH_SEQ_MAP: &str = "BENCH_SEQ";
/// ... the array the floor program reads one random entry of per frame, ...
pub const BENCH_FLOOR_MAP: &str = "BENCH_FLOOR";
/// ... and each CPU's position in the sequence.
pub const BENCH_POS_MAP: &str = "BENCH_POS";

/// Globals (read-only data) of the slot table: its slot count minus one (a power of two
/// minus one) and the seed of [`slot::hash`].
pub const SLOT_MASK_GLOBAL: &str = "SLOT_MASK";
pub const SLOT_SEED_GLOBAL: &str = "SLOT_SEED";
/// Global (read-only data): non-zero to count IPv4 flows in [`FLOWS4_SLOTS_MAP`] first
/// (the agent's meter, issue #21), `FLOWS4` taking only the flows whose slots are taken.
pub const FLOW_SLOTS_GLOBAL: &str = "FLOW_SLOTS";
/// The meter's slot table of IPv4 flows: an open-addressed, memory-mappable array of
/// [`FlowSlot`]s (see [`slot`]), sized at load time to a power of two at least twice
/// the flow map size.
pub const FLOWS4_SLOTS_MAP: &str = "FLOWS4_SLOTS";
/// One-entry array holding the seed of [`FLOWS4_SLOTS_MAP`]'s hash, pinned with it so
/// that the next agent finds the flows where the last one put them.
pub const SLOT_SEED_MAP: &str = "SLOT_SEED_MAP";

/// Flows each kernel flow map (IPv4, IPv6) holds in the compiled object and under
/// `replay`; `run` sizes them for an uplink (see [`UPLINK_MAP_SIZE`]).
pub const DEFAULT_MAP_SIZE: u32 = 262_144;
/// `run`'s default flows per kernel map (`--map-size`): a campus uplink holds 0.5 to 2
/// million concurrent flows, most of them IPv4.
pub const UPLINK_MAP_SIZE: u32 = 1 << 20;
/// Ring buffer size for the overflow path, in bytes (a power of two, multiple of the page size).
pub const OVERFLOW_RING_BYTES: u32 = 1 << 22;

/// Packet seen on ingress (XDP). Same value as NetFlow v9 field 61 (DIRECTION).
pub const DIRECTION_INGRESS: u8 = 0;
/// Packet seen on egress (TC). Same value as NetFlow v9 field 61 (DIRECTION).
pub const DIRECTION_EGRESS: u8 = 1;

/// TCP flag bits as carried in NetFlow's TCP_FLAGS field.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// The identity of a flow.
///
/// Addresses are 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
/// For ICMP and ICMPv6, `src_port` is 0 and `dst_port` is `type << 8 | code`, the NetFlow
/// convention. For protocols without ports, and for non-first IPv4/IPv6 fragments (whose
/// L4 header is in the first fragment only), both ports are 0.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Outer VLAN id (802.1Q or 802.1ad S-tag), 0 when untagged.
    pub vlan: u16,
    /// Inner VLAN id with QinQ (C-tag), 0 otherwise.
    pub vlan_inner: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// `DIRECTION_INGRESS` or `DIRECTION_EGRESS`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// The key of the IPv4 flow map: the same identity as [`FlowKey`] in 20 bytes instead of
/// 48, because the kernel hashes and compares the whole key on every packet and most
/// traffic is IPv4. Addresses are the 4 bytes as in the packet. There is no interface
/// index: one loaded object meters one interface, and the agent supplies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vlan: u16,
    pub vlan_inner: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl FlowKey4 {
    /// The full key (IPv4-mapped addresses) of a flow metered on `ifindex`.
    pub fn widen(&self, ifindex: u32) -> FlowKey {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[10] = 0xff;
        src[11] = 0xff;
        dst[10] = 0xff;
        dst[11] = 0xff;
        src[12..].copy_from_slice(&self.src_addr);
        dst[12..].copy_from_slice(&self.dst_addr);
        FlowKey {
            src_addr: src,
            dst_addr: dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            ifindex,
            vlan: self.vlan,
            vlan_inner: self.vlan_inner,
            protocol: self.protocol,
            direction: self.direction,
            _pad: [0; 2],
        }
    }
}

impl FlowKey {
    /// The compact key, when both addresses are IPv4-mapped (the interface index is dropped).
    pub fn narrow(&self) -> Option<FlowKey4> {
        let mapped =
            |a: &[u8; 16]| a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff;
        if !mapped(&self.src_addr) || !mapped(&self.dst_addr) {
            return None;
        }
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&self.src_addr[12..]);
        dst.copy_from_slice(&self.dst_addr[12..]);
        Some(FlowKey4 {
            src_addr: src,
            dst_addr: dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            vlan: self.vlan,
            vlan_inner: self.vlan_inner,
            protocol: self.protocol,
            direction: self.direction,
            _pad: [0; 2],
        })
    }
}

/// Per-CPU counters for one flow. Userspace sums the CPUs' copies.
///
/// Counts are cumulative since the entry was created; userspace exports deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    pub packets: u64,
    /// Sum of IP total lengths (IPv4 total length, IPv6 payload length + 40), as NetFlow counts.
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the first packet on
    /// this CPU, 0 if none.
    pub first_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` of the last packet on this CPU.
    pub last_ns: u64,
    /// OR of the TCP flags seen.
    pub tcp_flags: u8,
    /// IPv4 ToS / IPv6 traffic class of the first packet on this CPU.
    pub tos: u8,
    /// With payload hints on: OR of the [`hint`] flags the first packets' payloads matched.
    pub hints: u8,
    /// 1 when the flow's start was announced in `NEW_FLOWS` (live flows), else 0.
    pub announced: u8,
    /// The sizes of the flow's first four payload-bearing packets (L4 payload bytes),
    /// each as [`opening::quantize`] stores it, 0 for a slot not yet filled. How a
    /// connection opens (a handshake's sizes each way) tells protocols apart when their
    /// payload is encrypted; these four bytes are all the meter keeps of it, and no
    /// payload byte leaves the kernel. Filled in the bytes that were padding: a flow's
    /// entry stays 40 bytes.
    pub opening: [u8; 4],
}

/// One flow of an open-addressed flow table: one 64-byte cache line holding the control
/// word, the key and the counters, so that a packet of a known flow touches one line
/// (issue #21; the kernel's hash map touches a bucket and a 128-byte element).
///
/// The control word is `fingerprint << FP_SHIFT | distance << DIST_SHIFT | state` (see
/// [`slot`]); a slot is claimed by compare-and-swap of the control word from
/// [`slot::EMPTY`] (or [`slot::TOMBSTONE`]) to [`slot::BUSY`], its key and counters
/// written, then the word set to [`slot::LIVE`]. The counters are added to atomically,
/// as in the hash map. Userspace removes a flow in two steps, LIVE -> RETIRING (by
/// compare-and-swap), then at its next pass RETIRING -> TOMBSTONE after reading the final
/// counters; a TOMBSTONE becomes EMPTY again when the slot after it is EMPTY.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub ctrl: u32,
    pub key: FlowKey4,
    pub stats: FlowStats,
}

/// The control word and hash of [`FlowSlot`]s.
pub mod slot {
    /// The state: the low three bits.
    pub const STATE_MASK: u32 = 7;
    /// Free (never used, or freed by userspace; ends a probe sequence).
    pub const EMPTY: u32 = 0;
    /// Claimed by an insert that is writing the key and counters.
    pub const BUSY: u32 = 1;
    /// A flow: key and counters valid.
    pub const LIVE: u32 = 2;
    /// Being removed by userspace: packets no longer count into it (a packet of its flow
    /// inserts the flow again further on); its final counters are read at the next pass,
    /// when no packet that saw it LIVE can still be adding to it.
    pub const RETIRING: u32 = 3;
    /// Removed: free for an insert, but probe sequences go on past it (the whole word is
    /// this value: no fingerprint).
    pub const TOMBSTONE: u32 = 4;
    /// The probe distance from the flow's home slot: bits 3-5.
    pub const DIST_SHIFT: u32 = 3;
    /// The hash's fingerprint: bits 6-31.
    pub const FP_SHIFT: u32 = 6;
    /// Slots looked at from a flow's home slot before the flow goes to the overflow path.
    pub const PROBES: u32 = 8;

    /// The hash of a [`super::FlowKey4`] read as five native-endian words.
    #[inline(always)]
    pub const fn hash(w: &[u32; 5], seed: u64) -> u64 {
        let a = (w[0] as u64 | (w[1] as u64) << 32) ^ seed;
        let b = w[2] as u64 | (w[3] as u64) << 32;
        let mut h = a.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ b.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ (w[4] as u64);
        h ^= h >> 29;
        h = h.wrapping_mul(0x1656_67b1_9e37_79f9);
        h ^ (h >> 32)
    }

    /// The home slot of hash `h` in a table of `mask + 1` slots.
    #[inline(always)]
    pub const fn home(h: u64, mask: u32) -> u32 {
        h as u32 & mask
    }

    /// The fingerprint of hash `h` (26 bits, independent of the home slot's bits).
    #[inline(always)]
    pub const fn fingerprint(h: u64) -> u32 {
        (h >> 38) as u32
    }

    /// Slots of a table for `flows` flows: a power of two at least twice as many (load
    /// factor at most 0.5), at least 2.
    pub const fn slots_for(flows: u32) -> u32 {
        let want = (flows as u64) * 2;
        let mut n = 2u64;
        while n < want {
            n *= 2;
        }
        if n > 1 << 31 { 1 << 31 } else { n as u32 }
    }
}

/// The opening sizes of [`FlowStats::opening`].
pub mod opening {
    /// Bytes per step: a slot holds the payload size divided by this, rounded up.
    pub const STEP: u32 = 4;
    /// The slot value of a payload of `MAX * STEP - STEP + 1` bytes or more.
    pub const MAX: u8 = 255;

    /// The slot value of a payload of `bytes` (at least 1): `ceil(bytes / 4)`, at most
    /// 255 (1,017 bytes or more).
    #[inline(always)]
    pub const fn quantize(bytes: u32) -> u8 {
        let q = bytes.div_ceil(STEP);
        if q > MAX as u32 { MAX } else { q as u8 }
    }

    /// The largest payload size a slot value stands for (`u32::MAX` for [`MAX`]).
    pub const fn upper_bytes(q: u8) -> u32 {
        if q == MAX { u32::MAX } else { q as u32 * STEP }
    }
}

/// A flow just inserted in a flow map (live flows, `run`): its key, its first packet's
/// time, IP length and TCP flags. Sent through the `NEW_FLOWS` ring buffer so that
/// detection learns of a flow when it starts, not only when it is exported.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewFlowEvent {
    pub ts_ns: u64,
    pub key: FlowKey,
    pub bytes: u32,
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
}

/// One packet's contribution, sent through the ring buffer when its flow could not be
/// inserted in the map (the map is full).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OverflowEvent {
    pub ts_ns: u64,
    pub key: FlowKey,
    /// IP total length of the packet.
    pub bytes: u32,
    pub tcp_flags: u8,
    pub tos: u8,
    /// [`hint`] flags of the packet's payload.
    pub hints: u8,
    pub _pad: [u8; 1],
}

/// Payload signatures (`--payload-hints`): the programs read the first bytes of the L4
/// payload of a flow's first packets and set these flags in its record; nothing else of
/// the payload leaves the kernel.
pub mod hint {
    /// The BitTorrent peer-wire handshake (`\x13BitTorrent protocol`), TCP.
    pub const BITTORRENT: u8 = 1;
    /// A uTP (BEP 29) header: version 1, type 0-4, extension 0-2, UDP.
    pub const UTP: u8 = 2;
    /// A Mainline DHT KRPC message (a bencoded dictionary, `d1:a`, `d1:r`, ...), UDP.
    pub const DHT: u8 = 4;
    /// `GNUTELLA CONNECT` or a `GNUTELLA/0.6` answer, TCP.
    pub const GNUTELLA: u8 = 8;
    /// An eDonkey/eMule hello (protocol 0xE3 or 0xC5, opcode 0x01 or 0x4C), TCP.
    pub const EDONKEY: u8 = 16;
    /// A BitTorrent tracker request over HTTP (`GET /announce`, `GET /scrape`), TCP.
    pub const TRACKER: u8 = 32;
    /// A flow's first packets whose payloads are looked at.
    pub const FIRST_PACKETS: u64 = 8;
    /// Names, by bit.
    pub const NAMES: [(u8, &str); 6] = [
        (BITTORRENT, "bittorrent_handshake"),
        (UTP, "utp_header"),
        (DHT, "dht_krpc"),
        (GNUTELLA, "gnutella_connect"),
        (EDONKEY, "edonkey_hello"),
        (TRACKER, "tracker_announce"),
    ];
}

/// What userspace already exported of a flow still in the kernel map: the cumulative
/// counts at its last active-timeout export, and when that export's period began.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExportMark {
    pub packets: u64,
    pub bytes: u64,
    pub period_start_ns: u64,
}

/// The drain's counters, persisted beside the maps (see [`DRAIN_STATE_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DrainState {
    /// Packets exported from the maps and the overflow table since the maps were created.
    pub exported_packets: u64,
    pub overflow_events: u64,
    pub overflow_table_full: u64,
    pub delete_errors: u64,
}

/// Counter indices in a [`CounterBlock`]. The per-CPU `COUNTERS` array holds one block per
/// direction (index = direction), so a packet costs one map lookup for all its counters.
pub mod counter {
    /// Frames the program saw.
    pub const FRAMES: u32 = 0;
    /// Bytes of those frames (L2 length).
    pub const FRAME_BYTES: u32 = 1;
    /// IP packets accounted in the flow map.
    pub const FLOW_PACKETS: u32 = 2;
    /// IP bytes (NetFlow bytes) accounted in the flow map.
    pub const FLOW_BYTES: u32 = 3;
    /// Packets whose flow could not be inserted (map full); sent to the ring buffer.
    pub const INSERT_FAILED: u32 = 4;
    /// Overflow packets the ring buffer had no room for: these are lost to the export.
    pub const RINGBUF_DROPPED: u32 = 5;
    /// IP packets sent through the ring buffer.
    pub const OVERFLOW_PACKETS: u32 = 6;
    /// IP bytes sent through the ring buffer.
    pub const OVERFLOW_BYTES: u32 = 7;
    /// Packets skipped by 1-in-N sampling.
    pub const SAMPLED_OUT: u32 = 8;
    /// Frames that are not IPv4 or IPv6 (ARP, LLDP, ...): passed, not a flow.
    pub const NOT_IP: u32 = 9;
    /// Non-first fragments (accounted with ports 0).
    pub const FRAGMENTS: u32 = 10;
    /// New flows whose start could not be announced (the `NEW_FLOWS` ring was full):
    /// detection counts them when they are exported, as without live flows.
    pub const NEW_FLOWS_DROPPED: u32 = 11;
    /// Parse failures, by reason. The frame is passed and not accounted in a flow.
    pub const ERR_ETH_TRUNCATED: u32 = 12;
    pub const ERR_VLAN_TRUNCATED: u32 = 13;
    pub const ERR_IPV4_TRUNCATED: u32 = 14;
    /// IP version field does not match the EtherType, or IHL < 5, or total length < IHL.
    pub const ERR_IP_BAD_HEADER: u32 = 15;
    pub const ERR_IPV6_TRUNCATED: u32 = 16;
    pub const ERR_IPV6_EXT_TRUNCATED: u32 = 17;
    pub const ERR_IPV6_TOO_MANY_EXT: u32 = 18;
    pub const ERR_L4_TRUNCATED: u32 = 19;
    /// Number of counters per direction.
    pub const COUNT: u32 = 20;

    /// Names, indexed by counter, as printed by the agent.
    pub const NAMES: [&str; COUNT as usize] = [
        "frames",
        "frame_bytes",
        "flow_packets",
        "flow_bytes",
        "insert_failed",
        "ringbuf_dropped",
        "overflow_packets",
        "overflow_bytes",
        "sampled_out",
        "not_ip",
        "fragments",
        "new_flows_dropped",
        "err_eth_truncated",
        "err_vlan_truncated",
        "err_ipv4_truncated",
        "err_ip_bad_header",
        "err_ipv6_truncated",
        "err_ipv6_ext_truncated",
        "err_ipv6_too_many_ext",
        "err_l4_truncated",
    ];

    /// First parse-failure counter.
    pub const FIRST_ERR: u32 = ERR_ETH_TRUNCATED;
}

/// One direction's counters, indexed by the constants of [`counter`].
pub type CounterBlock = [u64; counter::COUNT as usize];

/// Entries of the `COUNTERS` array: one [`CounterBlock`] per direction.
pub const COUNTERS_LEN: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are repr(C), contain only integers and explicit padding fields,
    // so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::OverflowEvent {}
    unsafe impl aya::Pod for super::NewFlowEvent {}
    unsafe impl aya::Pod for super::ExportMark {}
    unsafe impl aya::Pod for super::DrainState {}
    unsafe impl aya::Pod for super::FlowSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn flow_key_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(align_of::<FlowKey>(), 4);
        assert_eq!(offset_of!(FlowKey, src_addr), 0);
        assert_eq!(offset_of!(FlowKey, dst_addr), 16);
        assert_eq!(offset_of!(FlowKey, src_port), 32);
        assert_eq!(offset_of!(FlowKey, dst_port), 34);
        assert_eq!(offset_of!(FlowKey, ifindex), 36);
        assert_eq!(offset_of!(FlowKey, vlan), 40);
        assert_eq!(offset_of!(FlowKey, vlan_inner), 42);
        assert_eq!(offset_of!(FlowKey, protocol), 44);
        assert_eq!(offset_of!(FlowKey, direction), 45);
        assert_eq!(offset_of!(FlowKey, _pad), 46);
    }

    #[test]
    fn flow_key4_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey4>(), 20);
        assert_eq!(align_of::<FlowKey4>(), 2);
        assert_eq!(offset_of!(FlowKey4, src_addr), 0);
        assert_eq!(offset_of!(FlowKey4, dst_addr), 4);
        assert_eq!(offset_of!(FlowKey4, src_port), 8);
        assert_eq!(offset_of!(FlowKey4, dst_port), 10);
        assert_eq!(offset_of!(FlowKey4, vlan), 12);
        assert_eq!(offset_of!(FlowKey4, vlan_inner), 14);
        assert_eq!(offset_of!(FlowKey4, protocol), 16);
        assert_eq!(offset_of!(FlowKey4, direction), 17);
        assert_eq!(offset_of!(FlowKey4, _pad), 18);
    }

    #[test]
    fn compact_keys_round_trip_and_only_for_ipv4() {
        let k4 = FlowKey4 {
            src_addr: [10, 0, 0, 1],
            dst_addr: [198, 18, 3, 4],
            src_port: 1,
            dst_port: 2,
            vlan: 4,
            vlan_inner: 5,
            protocol: 6,
            direction: 1,
            _pad: [0; 2],
        };
        let k = k4.widen(3);
        assert_eq!(&k.src_addr[10..], &[0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(k.ifindex, 3);
        assert_eq!(k.narrow(), Some(k4));
        let mut v6 = k;
        v6.dst_addr[0] = 0x20;
        assert_eq!(v6.narrow(), None);
    }

    #[test]
    fn flow_stats_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<FlowStats>(), 40);
        assert_eq!(align_of::<FlowStats>(), 8);
        assert_eq!(offset_of!(FlowStats, packets), 0);
        assert_eq!(offset_of!(FlowStats, bytes), 8);
        assert_eq!(offset_of!(FlowStats, first_ns), 16);
        assert_eq!(offset_of!(FlowStats, last_ns), 24);
        assert_eq!(offset_of!(FlowStats, tcp_flags), 32);
        assert_eq!(offset_of!(FlowStats, tos), 33);
        assert_eq!(offset_of!(FlowStats, hints), 34);
        assert_eq!(offset_of!(FlowStats, announced), 35);
        assert_eq!(offset_of!(FlowStats, opening), 36);
    }

    #[test]
    fn flow_slot_is_one_cache_line_without_implicit_padding() {
        assert_eq!(size_of::<FlowSlot>(), 64);
        assert_eq!(offset_of!(FlowSlot, ctrl), 0);
        assert_eq!(offset_of!(FlowSlot, key), 4);
        assert_eq!(offset_of!(FlowSlot, stats), 24);
        // The fingerprint fills the bits above the state and the distance.
        assert_eq!(
            slot::fingerprint(u64::MAX) << slot::FP_SHIFT >> slot::FP_SHIFT,
            slot::fingerprint(u64::MAX)
        );
        const { assert!(slot::PROBES <= 1 << (slot::FP_SHIFT - slot::DIST_SHIFT)) };
    }

    #[test]
    fn slot_tables_are_powers_of_two_at_half_load_at_most() {
        assert_eq!(slot::slots_for(0), 2);
        assert_eq!(slot::slots_for(1), 2);
        assert_eq!(slot::slots_for(3), 8);
        assert_eq!(slot::slots_for(65_536), 131_072);
        assert_eq!(slot::slots_for(1_000_000), 1 << 21);
        assert_eq!(slot::slots_for(u32::MAX), 1 << 31);
        // The states fit under the distance, and a tombstone carries nothing else.
        for s in [
            slot::EMPTY,
            slot::BUSY,
            slot::LIVE,
            slot::RETIRING,
            slot::TOMBSTONE,
        ] {
            assert_eq!(s & slot::STATE_MASK, s);
        }
        assert_eq!(slot::STATE_MASK + 1, 1 << slot::DIST_SHIFT);
    }

    #[test]
    fn slot_hash_spreads_neighbouring_keys() {
        // Keys that differ in one port or one address bit land in different homes of a
        // 2^21-slot table and differ in fingerprint: the benchmark's keys are such keys.
        let mask = (1u32 << 21) - 1;
        let mut homes = [0u32; 64];
        for (i, h) in homes.iter_mut().enumerate() {
            let w = [
                0x0a40_0000u32.to_be(),
                0xc612_0101u32.to_be(),
                i as u32 | 443 << 16,
                0,
                6,
            ];
            *h = slot::home(slot::hash(&w, 7), mask);
        }
        homes.sort_unstable();
        assert!(homes.windows(2).all(|p| p[0] != p[1]), "{homes:?}");
        let w = [1, 2, 3, 4, 5];
        assert_ne!(slot::hash(&w, 1), slot::hash(&w, 2));
        assert_ne!(
            slot::fingerprint(slot::hash(&w, 1)),
            slot::fingerprint(slot::hash(&[1, 2, 3, 4, 4], 1))
        );
    }

    #[test]
    fn overflow_event_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<OverflowEvent>(), 64);
        assert_eq!(offset_of!(OverflowEvent, ts_ns), 0);
        assert_eq!(offset_of!(OverflowEvent, key), 8);
        assert_eq!(offset_of!(OverflowEvent, bytes), 56);
        assert_eq!(offset_of!(OverflowEvent, tcp_flags), 60);
        assert_eq!(offset_of!(OverflowEvent, tos), 61);
        assert_eq!(offset_of!(OverflowEvent, hints), 62);
        assert_eq!(offset_of!(OverflowEvent, _pad), 63);
    }

    #[test]
    fn counter_names_cover_every_counter() {
        assert_eq!(counter::NAMES.len(), counter::COUNT as usize);
        assert_eq!(
            counter::NAMES[counter::ERR_L4_TRUNCATED as usize],
            "err_l4_truncated"
        );
        assert_eq!(COUNTERS_LEN, 2);
        assert_eq!(
            core::mem::size_of::<CounterBlock>(),
            8 * counter::COUNT as usize
        );
    }

    #[test]
    fn opening_sizes_round_up_in_steps_of_four_and_saturate() {
        assert_eq!(opening::quantize(1), 1);
        assert_eq!(opening::quantize(4), 1);
        assert_eq!(opening::quantize(5), 2);
        // The plaintext BitTorrent handshake, and an MSE key exchange's bounds.
        assert_eq!(opening::quantize(68), 17);
        assert_eq!(opening::quantize(96), 24);
        assert_eq!(opening::quantize(608), 152);
        assert_eq!(opening::quantize(1016), 254);
        assert_eq!(opening::quantize(1017), 255);
        assert_eq!(opening::quantize(65_000), 255);
        assert_eq!(opening::upper_bytes(17), 68);
        assert_eq!(opening::upper_bytes(255), u32::MAX);
    }
}
