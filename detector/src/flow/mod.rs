//! The flow record every source produces and every sink consumes, and the flow table
//! that turns cumulative kernel counters into NetFlow-style records.

mod cidr;
pub mod dedup;
pub mod seconds;
pub mod table;

pub use cidr::Cidr;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use detector_common::{DIRECTION_EGRESS, FlowKey};

/// Which way a packet crossed the metered interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// NetFlow v9 DIRECTION (field 61) value.
    pub fn netflow_value(self) -> u8 {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// What a record tells detection about its flow (live flows, see the eBPF crate's
/// `NEW_FLOWS`): the whole of a stretch of it, its start only, its growth while it
/// lives, or more of one whose start was already told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Live {
    /// A record as exported: a new flow for detection (the rule everywhere but for
    /// announced local flows).
    #[default]
    Whole,
    /// A flow just started (no packets or bytes yet): detection counts the flow, its
    /// peer and ports. Never exported.
    Start,
    /// A live flow's packets and bytes since it was last told (every `--live-interval`):
    /// detection counts them, not another flow. Never exported.
    Grow,
    /// An exported record of a flow whose start detection already counted: its packets
    /// and bytes count, not another flow, less what growth reports already told.
    Continued { told_packets: u64, told_bytes: u64 },
}

impl Live {
    /// Start and growth reports go to detection only: never to a sink, never counted
    /// among exported records.
    pub fn detection_only(self) -> bool {
        matches!(self, Live::Start | Live::Grow)
    }

    /// A record of a flow detection already counted.
    pub fn continues(self) -> bool {
        matches!(self, Live::Grow | Live::Continued { .. })
    }
}

/// Agent names are at most this many bytes (an edge refuses a longer one; a reader cuts
/// it).
pub const AGENT_MAX: usize = 32;

/// An edge agent's name as records carry it: at most [`AGENT_MAX`] bytes, inline (so an
/// [`Origin`] stays `Copy`). Edges name themselves with it (`--agent-name`) and the
/// scale-out wire format carries it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName {
    len: u8,
    bytes: [u8; AGENT_MAX],
}

impl AgentName {
    /// `name` cut to [`AGENT_MAX`] bytes (at a character boundary).
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(AGENT_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; AGENT_MAX];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self {
            len: end as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl std::fmt::Debug for AgentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for AgentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a record was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The local XDP/TC meter (or `replay` of a capture through it).
    Local,
    /// A NetFlow v5/v9 or IPFIX exporter: its address and observation domain (v9 source
    /// id; 0 for v5).
    Exporter { addr: SocketAddr, domain: u32 },
    /// A record an edge agent published (`detector central`): the agent, and the
    /// exporter that measured it (none: the agent's own meter).
    Edge {
        agent: AgentName,
        addr: Option<SocketAddr>,
        domain: u32,
    },
}

impl Origin {
    /// A short label, as in logs and JSON: `local` or `ADDR/DOMAIN`.
    pub fn label(&self) -> String {
        match self {
            Origin::Local => "local".to_string(),
            Origin::Exporter { addr, domain } => format!("{}/{domain}", addr.ip()),
            Origin::Edge {
                agent, addr: None, ..
            } => agent.to_string(),
            Origin::Edge {
                agent,
                addr: Some(addr),
                domain,
            } => format!("{agent}:{}/{domain}", addr.ip()),
        }
    }
}

/// One exported flow record: the packets of one flow between two export instants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub src_port: u16,
    /// For ICMP/ICMPv6: `type << 8 | code`.
    pub dst_port: u16,
    pub protocol: u8,
    pub packets: u64,
    /// IP bytes (sum of IP total lengths).
    pub bytes: u64,
    pub first: SystemTime,
    pub last: SystemTime,
    pub direction: Direction,
    pub tcp_flags: u8,
    pub tos: u8,
    /// Outer VLAN id, 0 if untagged.
    pub vlan: u16,
    /// Inner VLAN id (QinQ), 0 if none.
    pub vlan_inner: u16,
    pub ifindex: u32,
    /// 1-in-N sampling interval the counts were taken with (1: every packet). `packets`
    /// and `bytes` are the counts as measured; [`FlowRecord::est_packets`] scales them.
    pub sampling: u32,
    /// Who measured it.
    pub origin: Origin,
    /// Another source already reported this flow for an overlapping time: statistics
    /// must count it once (the record itself is still exported unchanged).
    pub duplicate: bool,
    /// Payload [`detector_common::hint`] flags the local meter set (`--payload-hints`);
    /// 0 otherwise. Not exported.
    pub hints: u8,
    /// The local meter's sizes of the flow's first four payload packets
    /// ([`detector_common::FlowStats::opening`]); zeros from other sources. Not exported.
    pub opening: [u8; 4],
    /// What the record tells detection (live flows). Not exported.
    pub live: Live,
}

impl FlowRecord {
    /// A record of flow `src:src_port -> dst:dst_port` (protocol `protocol`) with no
    /// packets yet: ingress, unsampled, from the local meter; callers set the rest.
    pub fn new(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, protocol: u8) -> Self {
        Self {
            src_addr: src,
            dst_addr: dst,
            src_port,
            dst_port,
            protocol,
            packets: 0,
            bytes: 0,
            first: SystemTime::UNIX_EPOCH,
            last: SystemTime::UNIX_EPOCH,
            direction: Direction::Ingress,
            tcp_flags: 0,
            tos: 0,
            vlan: 0,
            vlan_inner: 0,
            ifindex: 0,
            sampling: 1,
            origin: Origin::Local,
            duplicate: false,
            hints: 0,
            opening: [0; 4],
            live: Live::Whole,
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.src_addr.is_ipv4() && self.dst_addr.is_ipv4()
    }

    /// Packets scaled by the sampling interval.
    pub fn est_packets(&self) -> u64 {
        self.packets.saturating_mul(self.sampling.max(1) as u64)
    }

    /// Bytes scaled by the sampling interval.
    pub fn est_bytes(&self) -> u64 {
        self.bytes.saturating_mul(self.sampling.max(1) as u64)
    }

    /// The packets detection has not been told of yet (growth reports told the rest).
    pub fn new_packets(&self) -> u64 {
        match self.live {
            Live::Continued { told_packets, .. } => self.packets.saturating_sub(told_packets),
            _ => self.packets,
        }
        .saturating_mul(self.sampling.max(1) as u64)
    }

    /// The bytes detection has not been told of yet.
    pub fn new_bytes(&self) -> u64 {
        match self.live {
            Live::Continued { told_bytes, .. } => self.bytes.saturating_sub(told_bytes),
            _ => self.bytes,
        }
        .saturating_mul(self.sampling.max(1) as u64)
    }

    /// ICMP or ICMPv6: `dst_port` holds `type << 8 | code`.
    pub fn is_icmp(&self) -> bool {
        self.protocol == 1 || self.protocol == 58
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Where a source hands its records over (the pipeline's input, which wires sources to
/// detection and the sinks): cloned into each thread of the source.
pub trait Emit: Clone + Send + 'static {
    /// Hands `records` over at `now` (possibly none: the sinks still get `now` for their
    /// periodic work).
    fn emit(&self, records: Vec<FlowRecord>, now: SystemTime);
}

/// Kernel keys carry IPv4 as IPv4-mapped IPv6; give it back as IPv4.
pub fn key_addr(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

/// Turns a key and a [`table::Delta`] into a record, mapping kernel monotonic time to wall time.
pub fn record_from_delta(d: &table::Delta, clock: &WallClock, sampling: u32) -> FlowRecord {
    let k: &FlowKey = &d.key;
    FlowRecord {
        src_addr: key_addr(k.src_addr),
        dst_addr: key_addr(k.dst_addr),
        src_port: k.src_port,
        dst_port: k.dst_port,
        protocol: k.protocol,
        packets: d.packets,
        bytes: d.bytes,
        first: clock.to_wall(d.first_ns),
        last: clock.to_wall(d.last_ns),
        direction: if k.direction == DIRECTION_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        tcp_flags: d.tcp_flags,
        tos: d.tos,
        vlan: k.vlan,
        vlan_inner: k.vlan_inner,
        ifindex: k.ifindex,
        sampling: sampling.max(1),
        origin: Origin::Local,
        duplicate: false,
        hints: d.hints,
        opening: d.opening,
        live: if d.growth {
            Live::Grow
        } else if d.announced {
            Live::Continued {
                told_packets: d.told_packets,
                told_bytes: d.told_bytes,
            }
        } else {
            Live::Whole
        },
    }
}

/// The detection-only record of a flow the kernel announced as it started.
pub fn record_from_start(ev: &detector_common::NewFlowEvent, clock: &WallClock) -> FlowRecord {
    let d = table::Delta {
        key: ev.key,
        packets: 0,
        bytes: 0,
        first_ns: ev.ts_ns,
        last_ns: ev.ts_ns,
        tcp_flags: ev.tcp_flags,
        tos: 0,
        hints: 0,
        opening: [0; 4],
        announced: false,
        growth: false,
        told_packets: 0,
        told_bytes: 0,
    };
    FlowRecord {
        live: Live::Start,
        ..record_from_delta(&d, clock, 1)
    }
}

/// Maps CLOCK_MONOTONIC nanoseconds (the clock of the kernel timestamps) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall time at monotonic zero, in nanoseconds since the Unix epoch.
    epoch_at_mono_zero_ns: i128,
}

impl WallClock {
    /// A mapping from a pair of readings taken at the same instant.
    pub fn from_pair(mono_ns: u64, wall: SystemTime) -> Self {
        let wall_ns = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            epoch_at_mono_zero_ns: wall_ns - mono_ns as i128,
        }
    }

    /// Reads both clocks now.
    pub fn now() -> Self {
        Self::from_pair(monotonic_ns(), SystemTime::now())
    }

    pub fn to_wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (self.epoch_at_mono_zero_ns + mono_ns as i128).max(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the kernel timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_mapped_keys_come_back_as_ipv4() {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(key_addr(b), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let v6: [u8; 16] = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(key_addr(v6), "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn wall_clock_maps_monotonic_offsets() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = WallClock::from_pair(5_000_000_000, wall);
        assert_eq!(c.to_wall(5_000_000_000), wall);
        assert_eq!(c.to_wall(6_500_000_000), wall + Duration::from_millis(1500));
        assert_eq!(c.to_wall(4_000_000_000), wall - Duration::from_secs(1));
    }
}
