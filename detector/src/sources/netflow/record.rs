//! One data record's fields, as the decoder collects them from a v5, v9 or IPFIX
//! message, made into a flow record: addresses, ports and counters from whichever
//! fields the template carries, times from absolute, uptime-relative or export-relative
//! fields, biflows split (RFC 5103), and sampled frames (RFC 7133 dataLinkFrameSection)
//! read down to their innermost packet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use netflow_parser::variable_versions::field_value::{DataNumber, DurationValue, FieldValue};
use netflow_parser::variable_versions::ipfix::lookup::IPFixField;

use crate::flow::{Direction, FlowRecord, Origin};

/// What a message says about its records' timing.
pub(super) struct Ctx {
    pub(super) from: SocketAddr,
    pub(super) domain: u32,
    /// Export time of the message, ms since the epoch.
    pub(super) export_ms: u64,
    /// v9 header sysUptime (ms), the base of FIRST/LAST_SWITCHED.
    pub(super) sys_up_time: Option<u32>,
    pub(super) received: SystemTime,
}

impl Ctx {
    pub(super) fn scope(&self) -> (SocketAddr, u32) {
        (self.from, self.domain)
    }
}

/// One field's value as [`RawRecord::set`] reads it: a number, an address, a time, or a
/// sampled frame's bytes. Implemented by netflow_parser's decoded values (the general
/// path) and by the compiled decoder's view of the wire bytes (`compiled.rs`), so what
/// a field means is written once, here.
pub(super) trait FieldView {
    /// The value as an unsigned number, if it is one (times in milliseconds).
    fn num(&self) -> Option<u64>;
    /// The value as an address, if it is one.
    fn addr(&self) -> Option<IpAddr>;
    /// The value as a time in milliseconds, if it is one.
    fn time_ms(&self) -> Option<u64>;
    /// The raw bytes of an octet-array value.
    fn frame(&self) -> Option<&[u8]>;
}

impl FieldView for &FieldValue {
    fn num(&self) -> Option<u64> {
        num(self)
    }
    fn addr(&self) -> Option<IpAddr> {
        addr(self)
    }
    fn time_ms(&self) -> Option<u64> {
        time_ms(self)
    }
    fn frame(&self) -> Option<&[u8]> {
        match self {
            FieldValue::Vec(b) => Some(b),
            _ => None,
        }
    }
}

/// Whether [`RawRecord::set`] reads field `id` at all (for every other id it does
/// nothing): the fields a compiled template keeps.
pub(super) fn used(id: u16) -> bool {
    matches!(
        id,
        1 | 2
            | 4..=8
            | 10..=12
            | 14
            | 21..=24
            | 27
            | 28
            | 32
            | 34
            | 48
            | 50
            | 58
            | 61
            | 85
            | 86
            | 139
            | 150..=159
            | 243
            | 302
            | 315
            | REV_BYTES
            | REV_PACKETS
            | REV_TCP_FLAGS
            | REV_BYTES_TOTAL
            | REV_PACKETS_TOTAL
    )
}

/// dataLinkFrameSection (RFC 7133): a sampled frame, read by [`RawRecord::frame_section`].
pub(super) const FRAME_SECTION: u16 = 315;

/// The flow fields of one sampled frame (sFlow's raw packet header record), read as
/// [`RawRecord::frame_section`] reads an IPFIX dataLinkFrameSection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) src_port: u16,
    /// ICMP/ICMPv6: `type << 8 | code`.
    pub(crate) dst_port: u16,
    pub(crate) protocol: u8,
    pub(crate) tcp_flags: u8,
    pub(crate) tos: u8,
    /// Outer VLAN id, 0 if untagged.
    pub(crate) vlan: u16,
    /// The (outer) IP packet's length from its header.
    pub(crate) ip_len: u64,
}

/// An Ethernet frame's flow fields, when it holds an IPv4 or IPv6 packet.
pub(crate) fn read_frame(b: &[u8]) -> Option<Frame> {
    let mut r = RawRecord::default();
    r.frame_section(b);
    let (src, dst) = r.addresses()?;
    Some(Frame {
        src,
        dst,
        src_port: if r.icmp.is_some() { 0 } else { r.src_port },
        dst_port: r.icmp.unwrap_or(r.dst_port),
        protocol: r.protocol,
        tcp_flags: r.tcp_flags,
        tos: r.tos,
        vlan: r.vlan,
        ip_len: r.bytes.unwrap_or(0),
    })
}

/// The fields of one data record that make a flow.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct RawRecord {
    pub(super) src4: Option<IpAddr>,
    pub(super) dst4: Option<IpAddr>,
    pub(super) src6: Option<IpAddr>,
    pub(super) dst6: Option<IpAddr>,
    pub(super) src_port: u16,
    pub(super) dst_port: u16,
    pub(super) protocol: u8,
    pub(super) bytes: Option<u64>,
    pub(super) packets: Option<u64>,
    pub(super) out_bytes: Option<u64>,
    pub(super) out_packets: Option<u64>,
    pub(super) tcp_flags: u8,
    pub(super) tos: u8,
    pub(super) vlan: u16,
    pub(super) input: u32,
    pub(super) output: u32,
    pub(super) direction: Option<u64>,
    pub(super) icmp: Option<u16>,
    pub(super) sampling: Option<u32>,
    /// The sampler the record names (FLOW_SAMPLER_ID 48, selectorId 302).
    pub(super) sampler: Option<u64>,
    /// An IPFIX biflow's reverse direction (RFC 5103): its counts and TCP flags.
    pub(super) rev_bytes: Option<u64>,
    pub(super) rev_packets: Option<u64>,
    pub(super) rev_tcp_flags: u8,
    /// sysUpTime-relative (21/22), absolute (150-155) or export-relative (158/159).
    pub(super) first_uptime: Option<u64>,
    pub(super) last_uptime: Option<u64>,
    pub(super) first_abs_ms: Option<u64>,
    pub(super) last_abs_ms: Option<u64>,
    pub(super) first_delta_us: Option<u64>,
    pub(super) last_delta_us: Option<u64>,
}

impl RawRecord {
    /// The flow's addresses. Templates may carry both IPv4 and IPv6 address fields (one
    /// pair zero, or IPv4 inside an SRv6/IPv6 transport): the IPv4 pair wins when it is
    /// set, as nfacctd does, else the IPv6 pair.
    /// Pair by pair, so that a record with its IPv4 pair set looks at nothing else.
    #[inline]
    pub(super) fn addresses(&self) -> Option<(IpAddr, IpAddr)> {
        let set = |a: Option<IpAddr>| a.filter(|x| !x.is_unspecified());
        if let (Some(s), Some(d)) = (set(self.src4), set(self.dst4)) {
            return Some((s, d));
        }
        if let (Some(s), Some(d)) = (set(self.src6), set(self.dst6)) {
            return Some((s, d));
        }
        match (self.src4.or(self.src6), self.dst4.or(self.dst6)) {
            (Some(s), Some(d)) => Some((s, d)),
            _ => None,
        }
    }

    /// Takes field `id` of the record (fields later in the template overwrite earlier
    /// ones, except where said).
    #[inline(always)]
    pub(super) fn set(&mut self, id: u16, v: impl FieldView) {
        match id {
            1 => self.bytes = v.num(),
            2 => self.packets = v.num(),
            // Egress counters stand in for the ingress ones a record lacks.
            23 => {
                self.out_bytes = v.num();
                if self.bytes.is_none() {
                    self.bytes = self.out_bytes;
                }
            }
            24 => {
                self.out_packets = v.num();
                if self.packets.is_none() {
                    self.packets = self.out_packets;
                }
            }
            85 if self.bytes.is_none() => self.bytes = v.num(),
            86 if self.packets.is_none() => self.packets = v.num(),
            4 => self.protocol = v.num().unwrap_or(0) as u8,
            5 => self.tos = v.num().unwrap_or(0) as u8,
            6 => self.tcp_flags = v.num().unwrap_or(0) as u8,
            7 => self.src_port = v.num().unwrap_or(0) as u16,
            11 => self.dst_port = v.num().unwrap_or(0) as u16,
            8 => self.src4 = v.addr(),
            12 => self.dst4 = v.addr(),
            27 => self.src6 = v.addr(),
            28 => self.dst6 = v.addr(),
            10 => self.input = v.num().unwrap_or(0) as u32,
            14 => self.output = v.num().unwrap_or(0) as u32,
            32 | 139 => self.icmp = v.num().map(|n| n as u16),
            34 | 50 => self.sampling = v.num().map(|n| n.clamp(1, u32::MAX as u64) as u32),
            48 | 302 => self.sampler = v.num(),
            // dataLinkFrameSection (RFC 7133): the sampled frame's own headers.
            FRAME_SECTION => {
                if let Some(b) = v.frame() {
                    self.frame_section(b);
                }
            }
            REV_BYTES => self.rev_bytes = v.num(),
            REV_PACKETS => self.rev_packets = v.num(),
            REV_BYTES_TOTAL if self.rev_bytes.is_none() => self.rev_bytes = v.num(),
            REV_PACKETS_TOTAL if self.rev_packets.is_none() => self.rev_packets = v.num(),
            REV_TCP_FLAGS => self.rev_tcp_flags = v.num().unwrap_or(0) as u8,
            58 | 243 if self.vlan == 0 => self.vlan = v.num().unwrap_or(0) as u16,
            61 => self.direction = v.num(),
            21 => self.last_uptime = v.time_ms(),
            22 => self.first_uptime = v.time_ms(),
            150 | 152 | 154 | 156 => self.first_abs_ms = v.time_ms(),
            151 | 153 | 155 | 157 => self.last_abs_ms = v.time_ms(),
            158 => self.first_delta_us = v.num(),
            159 => self.last_delta_us = v.num(),
            _ => {}
        }
    }

    /// Fills what the record lacks from a sampled frame's headers (dataLinkFrameSection,
    /// usually the first 64 to 128 bytes): Ethernet, 802.1Q/802.1ad tags, an MPLS label
    /// stack, IPv4 or IPv6 (with its extension headers; IP in IP, as SRv6 encapsulates,
    /// down to the innermost packet), then TCP/UDP ports and flags or the ICMP type and
    /// code. The frame counts as one packet of its (outer) IP length unless the record
    /// says otherwise.
    pub(super) fn frame_section(&mut self, b: &[u8]) {
        use etherparse::{LaxNetSlice, LaxSlicedPacket};
        if b.len() < 14 {
            return;
        }
        let be16 = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
        let (mut ethertype, mut at, mut vlan) = (be16(12), 14, 0u16);
        while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) && b.len() >= at + 4 {
            if vlan == 0 {
                vlan = be16(at) & 0x0fff;
            }
            ethertype = be16(at + 2);
            at += 4;
        }
        if matches!(ethertype, 0x8847 | 0x8848) {
            // Labels until the bottom of the stack; the payload's version nibble says
            // which IP follows.
            loop {
                if b.len() < at + 4 {
                    return;
                }
                let bottom = b[at + 2] & 1 == 1;
                at += 4;
                if bottom {
                    break;
                }
            }
            ethertype = match b.get(at).map(|x| x >> 4) {
                Some(4) => 0x0800,
                Some(6) => 0x86dd,
                _ => return,
            };
        }
        if !matches!(ethertype, 0x0800 | 0x86dd) {
            return;
        }
        // IP in IP (SRv6 and other IPv6 or IPv4 encapsulations: the outer header's
        // extension headers, a segment routing header among them, skipped like the
        // others): the flow is the innermost packet's, its size on the wire the outer.
        let (mut ip, mut outer) = (&b[at..], None);
        let (ip_len, payload, first) = loop {
            let Ok(p) = LaxSlicedPacket::from_ip(ip) else {
                return;
            };
            let (ip_len, payload, first, tos) = match &p.net {
                Some(LaxNetSlice::Ipv4(v4)) => {
                    let h = v4.header();
                    let first = h.fragments_offset().value() == 0;
                    (
                        u64::from(h.total_len()),
                        v4.payload().clone(),
                        first,
                        h.slice()[1],
                    )
                }
                Some(LaxNetSlice::Ipv6(v6)) => {
                    let h = v6.header();
                    // The first fragment (offset 0) carries the transport header and
                    // is keyed with its ports, as IPv4's is and the XDP meter keys it;
                    // only later fragments have none. The offset is read from the
                    // header's bytes (RFC 8200: the top 13 bits of bytes 2-3):
                    // etherparse 0.18's fragment_offset() and payload().fragmented
                    // take the M flag for offset bits (etherparse issue #150).
                    // The kept extension bytes are walked here, bounds-checked:
                    // etherparse 0.18.2's iterator over them follows the last kept
                    // header's next-header field into bytes a cut chain does not have
                    // (an unchecked read past the slice), as a sampled header cut by
                    // its snap length is.
                    let first = {
                        let ext = v6.extensions();
                        let mut rest = ext.slice();
                        let mut next = ext.first_header().map_or(255, |n| n.0);
                        let mut first = true;
                        while rest.len() >= 8 {
                            let size = match next {
                                0 | 43 | 60 => (usize::from(rest[1]) + 1) * 8,
                                44 => {
                                    first &= u16::from_be_bytes([rest[2], rest[3]]) >> 3 == 0;
                                    8
                                }
                                51 => (usize::from(rest[1]) + 2) * 4,
                                _ => break,
                            };
                            next = rest[0];
                            rest = rest.get(size..).unwrap_or_default();
                        }
                        first
                    };
                    (
                        u64::from(h.payload_length()) + 40,
                        v6.payload().clone(),
                        first,
                        h.traffic_class(),
                    )
                }
                _ => return,
            };
            let (ip_len, tos) = *outer.get_or_insert((ip_len, tos));
            if first && matches!(payload.ip_number.0, 4 | 41) && ip.len() > payload.payload.len() {
                ip = payload.payload;
                continue;
            }
            self.tos = tos;
            match &p.net {
                Some(LaxNetSlice::Ipv4(v4)) => {
                    let h = v4.header();
                    self.src4 = Some(IpAddr::V4(h.source_addr()));
                    self.dst4 = Some(IpAddr::V4(h.destination_addr()));
                }
                Some(LaxNetSlice::Ipv6(v6)) => {
                    let h = v6.header();
                    self.src6 = Some(IpAddr::V6(h.source_addr()));
                    self.dst6 = Some(IpAddr::V6(h.destination_addr()));
                }
                _ => return,
            }
            break (ip_len, payload, first);
        };
        self.protocol = payload.ip_number.0;
        let l4 = payload.payload;
        if first {
            match (self.protocol, l4.len()) {
                (6, n) if n >= 14 => {
                    self.src_port = u16::from_be_bytes([l4[0], l4[1]]);
                    self.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
                    self.tcp_flags = l4[13];
                }
                (17 | 136, n) if n >= 4 => {
                    self.src_port = u16::from_be_bytes([l4[0], l4[1]]);
                    self.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
                }
                (1 | 58, n) if n >= 2 => {
                    self.icmp = Some(u16::from_be_bytes([l4[0], l4[1]]));
                }
                _ => {}
            }
        }
        if self.vlan == 0 {
            self.vlan = vlan;
        }
        self.packets.get_or_insert(1);
        self.bytes.get_or_insert(ip_len);
    }

    /// The reverse direction of a biflow record (RFC 5103), when it carried traffic:
    /// addresses, ports and interfaces swapped, the reverse counts and flags.
    pub(super) fn reverse(&self) -> Option<RawRecord> {
        if self.rev_packets.unwrap_or(0) == 0 && self.rev_bytes.unwrap_or(0) == 0 {
            return None;
        }
        Some(RawRecord {
            src4: self.dst4,
            dst4: self.src4,
            src6: self.dst6,
            dst6: self.src6,
            src_port: self.dst_port,
            dst_port: self.src_port,
            bytes: self.rev_bytes,
            packets: self.rev_packets,
            out_bytes: None,
            out_packets: None,
            tcp_flags: self.rev_tcp_flags,
            input: self.output,
            output: self.input,
            rev_bytes: None,
            rev_packets: None,
            rev_tcp_flags: 0,
            ..self.clone()
        })
    }

    /// Whether a time of this record is sysUpTime-relative with no header base (IPFIX):
    /// it needs the exporter's systemInitTimeMilliseconds, known in arrival order.
    pub(super) fn needs_init_time(&self, ctx: &Ctx) -> bool {
        ctx.sys_up_time.is_none()
            && ((self.first_abs_ms.is_none() && self.first_uptime.is_some())
                || (self.last_abs_ms.is_none() && self.last_uptime.is_some()))
    }

    /// The flow record (call only when [`Self::addresses`] has them); `sampling` 0 when
    /// the record does not carry its interval.
    pub(super) fn flow(&self, ctx: &Ctx, init_ms: Option<u64>) -> FlowRecord {
        let addresses = self.addresses().unwrap_or((
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ));
        self.flow_between(addresses, ctx, init_ms)
    }

    /// [`Self::flow`] with the record's [`Self::addresses`] already taken.
    pub(super) fn flow_between(
        &self,
        (src, dst): (IpAddr, IpAddr),
        ctx: &Ctx,
        init_ms: Option<u64>,
    ) -> FlowRecord {
        let (first, last) = self.times(ctx, init_ms);
        let icmp = self.protocol == 1 || self.protocol == 58;
        let dst_port = if icmp && self.dst_port == 0 {
            self.icmp.unwrap_or(0)
        } else {
            self.dst_port
        };
        let egress = self.direction == Some(1);
        FlowRecord {
            src_addr: src,
            dst_addr: dst,
            src_port: self.src_port,
            dst_port,
            protocol: self.protocol,
            packets: self.packets.unwrap_or(0),
            bytes: self.bytes.unwrap_or(0),
            first,
            last,
            direction: if egress {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            tcp_flags: self.tcp_flags,
            tos: self.tos,
            vlan: self.vlan,
            vlan_inner: 0,
            ifindex: if egress { self.output } else { self.input },
            sampling: self.sampling.unwrap_or(0),
            origin: Origin::Exporter {
                addr: ctx.from,
                domain: ctx.domain,
            },
            duplicate: false,
            hints: 0,
            opening: [0; 4],
            live: crate::flow::Live::Whole,
        }
    }

    /// First and last packet times: from absolute fields, or sysUpTime-relative ones with
    /// the v9 header (or IPFIX systemInitTimeMilliseconds), or export-relative deltas; the
    /// export time when the record says nothing.
    pub(super) fn times(&self, ctx: &Ctx, init_ms: Option<u64>) -> (SystemTime, SystemTime) {
        let export = if ctx.export_ms > 0 {
            ctx.export_ms
        } else {
            ms_since_epoch(ctx.received)
        };
        let one = |abs: Option<u64>, up: Option<u64>, delta_us: Option<u64>| -> u64 {
            if let Some(ms) = abs {
                return ms;
            }
            if let Some(up) = up {
                if let Some(sys) = ctx.sys_up_time {
                    return export.saturating_sub(sys as u64).saturating_add(up);
                }
                if let Some(init) = init_ms {
                    return init.saturating_add(up);
                }
            }
            if let Some(d) = delta_us {
                return export.saturating_sub(d / 1000);
            }
            export
        };
        let first = one(self.first_abs_ms, self.first_uptime, self.first_delta_us);
        let last = one(self.last_abs_ms, self.last_uptime, self.last_delta_us).max(first);
        (
            SystemTime::UNIX_EPOCH + Duration::from_millis(first),
            SystemTime::UNIX_EPOCH + Duration::from_millis(last),
        )
    }
}

pub(super) fn uptime_to_wall(export_ms: u64, sys_up_time: u32, at_uptime: u32) -> SystemTime {
    // sysUptime values wrap after 49.7 days; the record time is before the export.
    let back = sys_up_time.wrapping_sub(at_uptime) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_millis(export_ms.saturating_sub(back))
}

pub(super) fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The IANA element id of an IPFIX field (enterprise fields have none here).
/// netflow_parser maps ids to names only; the reverse table is built once from it.
pub(super) fn ipfix_id(f: &IPFixField) -> Option<u16> {
    use netflow_parser::variable_versions::ipfix::lookup::IANAIPFixField;
    static IDS: std::sync::OnceLock<rustc_hash::FxHashMap<IANAIPFixField, u16>> =
        std::sync::OnceLock::new();
    match f {
        IPFixField::IANA(IANAIPFixField::Unknown(id)) => Some(*id),
        IPFixField::IANA(i) => IDS
            .get_or_init(|| {
                (0..1024u16)
                    .map(|id| (IANAIPFixField::from(id), id))
                    .collect()
            })
            .get(i)
            .copied(),
        // RFC 5103 reverse elements (enterprise 29305): the IANA id with REVERSE set.
        IPFixField::ReverseInformationElement(r) => {
            use netflow_parser::variable_versions::ipfix::lookup::ReverseInformationElement;
            static REV: std::sync::OnceLock<rustc_hash::FxHashMap<ReverseInformationElement, u16>> =
                std::sync::OnceLock::new();
            match r {
                ReverseInformationElement::Unknown(id) => Some(REVERSE | *id),
                r => REV
                    .get_or_init(|| {
                        (0..1024u16)
                            .map(|id| (ReverseInformationElement::from(id), id))
                            .collect()
                    })
                    .get(r)
                    .map(|id| REVERSE | *id),
            }
        }
        _ => None,
    }
}

/// Marks a reverse information element (RFC 5103) among field ids: IANA ids stay below
/// it (bit 15 is the enterprise bit on the wire).
pub(super) const REVERSE: u16 = 0x8000;
// The reverse elements a biflow record is split by (their IANA ids with REVERSE set).
pub(super) const REV_BYTES: u16 = REVERSE | 1;
pub(super) const REV_PACKETS: u16 = REVERSE | 2;
pub(super) const REV_TCP_FLAGS: u16 = REVERSE | 6;
pub(super) const REV_BYTES_TOTAL: u16 = REVERSE | 85;
pub(super) const REV_PACKETS_TOTAL: u16 = REVERSE | 86;

pub(super) fn num(v: &FieldValue) -> Option<u64> {
    match v {
        FieldValue::DataNumber(d) => match d {
            DataNumber::U8(x) => Some(*x as u64),
            DataNumber::U16(x) => Some(*x as u64),
            DataNumber::U24(x) | DataNumber::U32(x) => Some(*x as u64),
            DataNumber::U64(x) => Some(*x),
            DataNumber::U128(x) => Some((*x).min(u64::MAX as u128) as u64),
            DataNumber::I8(x) => u64::try_from(*x).ok(),
            DataNumber::I16(x) => u64::try_from(*x).ok(),
            DataNumber::I24(x) | DataNumber::I32(x) => u64::try_from(*x).ok(),
            DataNumber::I64(x) => u64::try_from(*x).ok(),
            DataNumber::I128(x) => u64::try_from(*x).ok(),
            DataNumber::Vec(b) if !b.is_empty() && b.len() <= 8 => {
                Some(b.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
            }
            DataNumber::Vec(_) => None,
        },
        FieldValue::ProtocolType(p) => Some(u8::from(*p) as u64),
        FieldValue::TcpControlBits(b, _) => {
            let bits = [b.fin, b.syn, b.rst, b.psh, b.ack, b.urg, b.ece, b.cwr];
            Some(
                bits.iter()
                    .enumerate()
                    .map(|(i, &on)| (on as u64) << i)
                    .sum(),
            )
        }
        FieldValue::Duration(_) => time_ms(v),
        FieldValue::Vec(b) if !b.is_empty() && b.len() <= 8 => {
            Some(b.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
        }
        _ => None,
    }
}

/// A time field in milliseconds (since the epoch for absolute fields, of uptime for
/// sysUpTime fields).
pub(super) fn time_ms(v: &FieldValue) -> Option<u64> {
    const NTP_TO_UNIX: u64 = 2_208_988_800;
    match v {
        FieldValue::Duration(DurationValue::Millis { value, .. }) => Some(*value),
        // Saturating: an 8-byte seconds field may hold anything.
        FieldValue::Duration(DurationValue::Seconds { value, .. }) => {
            Some(value.saturating_mul(1000))
        }
        FieldValue::Duration(DurationValue::MicrosNtp { seconds, fraction })
        | FieldValue::Duration(DurationValue::NanosNtp { seconds, fraction }) => Some(
            (*seconds as u64).saturating_sub(NTP_TO_UNIX) * 1000
                + (((*fraction as u64) * 1000) >> 32),
        ),
        FieldValue::DataNumber(_) => num(v),
        _ => None,
    }
}

pub(super) fn addr(v: &FieldValue) -> Option<IpAddr> {
    match v {
        FieldValue::Ip4Addr(a) => Some(IpAddr::V4(*a)),
        FieldValue::Ip6Addr(a) => Some(IpAddr::V6(*a)),
        FieldValue::DataNumber(DataNumber::U32(x)) => Some(IpAddr::V4(Ipv4Addr::from(*x))),
        _ => None,
    }
}
