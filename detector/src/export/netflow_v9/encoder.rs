//! NetFlow v9 (RFC 3954) and IPFIX (RFC 7011) encoder. Pure: it takes records and the
//! current time and returns datagrams; the UDP socket lives in the sink around it.
//!
//! IPFIX (`ExportFormat::Ipfix`) carries the same content in information elements:
//! the same field numbers for the flow fields, flowStartMilliseconds and
//! flowEndMilliseconds (152/153, absolute) instead of FIRST/LAST_SWITCHED, set ids 2 and
//! 3 for templates and options templates, an options template for sampling scoped by
//! observationDomainId (149) with samplingPacketInterval and samplingPacketSpace
//! (305/306, RFC 5477), a header that gives the message length, and a sequence number
//! that counts the data records sent before the message (RFC 7011 3.1).
//!
//! What counts as one Data Record for the IPFIX sequence number: every record of a
//! Data Set, whether its template is a Template (a flow) or an Options Template (the
//! sampling record): RFC 7011 3.1 counts "all IPFIX Data Records", and tshark's
//! sequence analysis counts both. Template and Options Template records do not count.
//! nfcapd 1.7 counts only the records of flow templates, so every sampling record
//! after the first makes it report one sequence failure; an unsampled IPFIX export
//! therefore carries no sampling options at all (a collector assumes 1:1 without one),
//! and neither reader sees a gap. v9 counts datagrams (RFC 3954 5.1), where none of
//! this arises.
//!
//! - Template 256 describes IPv4 records, 257 IPv6 records, and options template 258 the
//!   exporter's sampling interval and algorithm (scope: System).
//! - Templates (and the sampling options record) are sent in the first datagram, then
//!   again every `template_refresh_packets` datagrams and every `template_refresh_secs`
//!   seconds, whichever comes first, as RFC 3954 section 9 asks of exporters over UDP.
//! - The header sequence number counts export packets of this source id (RFC 3954 5.1).
//! - Every datagram's UDP payload stays under `max_payload` bytes (default 1400).
//! - ICMP and ICMPv6 type/code go in ICMP_TYPE (32) as well as in the destination port.
//! - FIRST/LAST_SWITCHED are milliseconds of sysUptime, measured from the exporter start.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};

use crate::flow::FlowRecord;

pub const TEMPLATE_IPV4: u16 = 256;
pub const TEMPLATE_IPV6: u16 = 257;
pub const TEMPLATE_OPTIONS: u16 = 258;

const HEADER_LEN: usize = 20;
const FLOWSET_HEADER_LEN: usize = 4;

// RFC 3954 section 8 field types.
const IN_BYTES: u16 = 1;
const IN_PKTS: u16 = 2;
const PROTOCOL: u16 = 4;
const SRC_TOS: u16 = 5;
const TCP_FLAGS: u16 = 6;
const L4_SRC_PORT: u16 = 7;
const IPV4_SRC_ADDR: u16 = 8;
const INPUT_SNMP: u16 = 10;
const L4_DST_PORT: u16 = 11;
const IPV4_DST_ADDR: u16 = 12;
const OUTPUT_SNMP: u16 = 14;
const LAST_SWITCHED: u16 = 21;
const FIRST_SWITCHED: u16 = 22;
const IPV6_SRC_ADDR: u16 = 27;
const IPV6_DST_ADDR: u16 = 28;
const ICMP_TYPE: u16 = 32;
const SAMPLING_INTERVAL: u16 = 34;
const SAMPLING_ALGORITHM: u16 = 35;
const SRC_VLAN: u16 = 58;
const DIRECTION: u16 = 61;
/// Options scope type "System" (RFC 3954 6.2).
const SCOPE_SYSTEM: u16 = 1;
// IPFIX information elements (IANA registry) where they differ from v9.
const FLOW_START_MILLISECONDS: u16 = 152;
const FLOW_END_MILLISECONDS: u16 = 153;
const OBSERVATION_DOMAIN_ID: u16 = 149;
const SAMPLING_PACKET_INTERVAL: u16 = 305;
const SAMPLING_PACKET_SPACE: u16 = 306;

/// The export protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// NetFlow v9 (RFC 3954).
    #[default]
    V9,
    /// IPFIX (RFC 7011).
    Ipfix,
}

/// (field type, length) of the data templates; the address and time fields per family
/// and format.
const fn data_fields(
    src: u16,
    dst: u16,
    addr_len: u16,
    first: (u16, u16),
    last: (u16, u16),
) -> [(u16, u16); 16] {
    [
        (IN_BYTES, 8),
        (IN_PKTS, 8),
        first,
        last,
        (src, addr_len),
        (dst, addr_len),
        (L4_SRC_PORT, 2),
        (L4_DST_PORT, 2),
        (PROTOCOL, 1),
        (SRC_TOS, 1),
        (TCP_FLAGS, 1),
        (DIRECTION, 1),
        (INPUT_SNMP, 4),
        (OUTPUT_SNMP, 4),
        (SRC_VLAN, 2),
        (ICMP_TYPE, 2),
    ]
}

const V9_TIMES: [(u16, u16); 2] = [(FIRST_SWITCHED, 4), (LAST_SWITCHED, 4)];
const IPFIX_TIMES: [(u16, u16); 2] = [(FLOW_START_MILLISECONDS, 8), (FLOW_END_MILLISECONDS, 8)];
const IPV4_FIELDS: [(u16, u16); 16] =
    data_fields(IPV4_SRC_ADDR, IPV4_DST_ADDR, 4, V9_TIMES[0], V9_TIMES[1]);
const IPV6_FIELDS: [(u16, u16); 16] =
    data_fields(IPV6_SRC_ADDR, IPV6_DST_ADDR, 16, V9_TIMES[0], V9_TIMES[1]);
const IPFIX_IPV4_FIELDS: [(u16, u16); 16] = data_fields(
    IPV4_SRC_ADDR,
    IPV4_DST_ADDR,
    4,
    IPFIX_TIMES[0],
    IPFIX_TIMES[1],
);
const IPFIX_IPV6_FIELDS: [(u16, u16); 16] = data_fields(
    IPV6_SRC_ADDR,
    IPV6_DST_ADDR,
    16,
    IPFIX_TIMES[0],
    IPFIX_TIMES[1],
);
const OPTION_SCOPE: [(u16, u16); 1] = [(SCOPE_SYSTEM, 4)];
const OPTION_FIELDS: [(u16, u16); 2] = [(SAMPLING_INTERVAL, 4), (SAMPLING_ALGORITHM, 1)];
const IPFIX_OPTION_SCOPE: [(u16, u16); 1] = [(OBSERVATION_DOMAIN_ID, 4)];
const IPFIX_OPTION_FIELDS: [(u16, u16); 2] =
    [(SAMPLING_PACKET_INTERVAL, 4), (SAMPLING_PACKET_SPACE, 4)];

/// What differs between the two formats.
struct Layout {
    header_len: usize,
    template_set: u16,
    options_set: u16,
    v4: &'static [(u16, u16); 16],
    v6: &'static [(u16, u16); 16],
    scope: &'static [(u16, u16); 1],
    options: &'static [(u16, u16); 2],
}

const V9_LAYOUT: Layout = Layout {
    header_len: HEADER_LEN,
    template_set: 0,
    options_set: 1,
    v4: &IPV4_FIELDS,
    v6: &IPV6_FIELDS,
    scope: &OPTION_SCOPE,
    options: &OPTION_FIELDS,
};

const IPFIX_LAYOUT: Layout = Layout {
    header_len: 16,
    template_set: 2,
    options_set: 3,
    v4: &IPFIX_IPV4_FIELDS,
    v6: &IPFIX_IPV6_FIELDS,
    scope: &IPFIX_OPTION_SCOPE,
    options: &IPFIX_OPTION_FIELDS,
};

impl ExportFormat {
    fn layout(self) -> &'static Layout {
        match self {
            ExportFormat::V9 => &V9_LAYOUT,
            ExportFormat::Ipfix => &IPFIX_LAYOUT,
        }
    }
}

const fn record_len(fields: &[(u16, u16)]) -> usize {
    let mut i = 0;
    let mut n = 0;
    while i < fields.len() {
        n += fields[i].1 as usize;
        i += 1;
    }
    n
}

pub const IPV4_RECORD_LEN: usize = record_len(&IPV4_FIELDS);
pub const IPV6_RECORD_LEN: usize = record_len(&IPV6_FIELDS);

/// Encoder settings.
#[derive(Clone, Debug)]
pub struct V9Config {
    /// Source ID (observation domain) in every header.
    pub source_id: u32,
    /// Resend templates every this many datagrams.
    pub template_refresh_packets: u32,
    /// Resend templates at least this often.
    pub template_refresh_secs: u64,
    /// 1-in-N sampling interval announced in the options record (1: unsampled).
    pub sampling_interval: u32,
    /// Largest UDP payload to emit.
    pub max_payload: usize,
    /// Export counts scaled by each record's own sampling interval (for relayed records
    /// whose exporters sampled at various rates; announce `sampling_interval` 1 then).
    pub scale_counts: bool,
    pub format: ExportFormat,
}

impl Default for V9Config {
    fn default() -> Self {
        Self {
            source_id: 0,
            template_refresh_packets: 20,
            template_refresh_secs: 60,
            sampling_interval: 1,
            max_payload: 1400,
            scale_counts: false,
            format: ExportFormat::V9,
        }
    }
}

/// Stateful v9 encoder for one source id.
#[derive(Debug)]
pub struct V9Encoder {
    cfg: V9Config,
    boot: SystemTime,
    sequence: u32,
    packets_since_templates: Option<u32>,
    templates_sent_at: Option<SystemTime>,
}

impl V9Encoder {
    /// `boot` is the exporter's start: sysUptime and FIRST/LAST_SWITCHED count from it.
    pub fn new(cfg: V9Config, boot: SystemTime) -> Self {
        assert!(
            cfg.max_payload >= HEADER_LEN + 512,
            "max_payload too small for templates"
        );
        Self {
            cfg,
            boot,
            sequence: 0,
            packets_since_templates: None,
            templates_sent_at: None,
        }
    }

    pub fn format(&self) -> ExportFormat {
        self.cfg.format
    }

    /// Sequence number the next datagram will carry.
    pub fn next_sequence(&self) -> u32 {
        self.sequence
    }

    fn templates_due(&self, now: SystemTime) -> bool {
        match (self.packets_since_templates, self.templates_sent_at) {
            (Some(n), Some(at)) => {
                n >= self.cfg.template_refresh_packets
                    || now.duration_since(at).unwrap_or(Duration::ZERO)
                        >= Duration::from_secs(self.cfg.template_refresh_secs)
            }
            _ => true,
        }
    }

    fn uptime_ms(&self, t: SystemTime) -> u32 {
        t.duration_since(self.boot)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u32
    }

    /// Encodes `records` into as many datagrams as needed (none if there are no records
    /// and templates are not due).
    pub fn encode(&mut self, records: &[FlowRecord], now: SystemTime) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let with_templates = self.templates_due(now);
            if i >= records.len() && !with_templates {
                break;
            }
            let mut dg = Datagram::start(self, now);
            if with_templates {
                dg.put_templates(self.cfg.source_id, self.cfg.sampling_interval);
            }
            while i < records.len() && dg.try_put_record(&records[i], self, self.cfg.max_payload) {
                i += 1;
            }
            // v9 counts export packets, IPFIX the data records before each message.
            let step = match self.cfg.format {
                ExportFormat::V9 => 1,
                ExportFormat::Ipfix => dg.data_records,
            };
            out.push(dg.finish(self.cfg.format));
            self.sequence = self.sequence.wrapping_add(step);
            if with_templates {
                self.packets_since_templates = Some(1);
                self.templates_sent_at = Some(now);
            } else if let Some(n) = self.packets_since_templates.as_mut() {
                *n += 1;
            }
            if i >= records.len() {
                break;
            }
        }
        out
    }
}

/// One datagram under construction.
struct Datagram {
    buf: BytesMut,
    /// Records of every kind (the v9 header's count).
    count: u16,
    /// Data and options data records (what the IPFIX sequence number counts).
    data_records: u32,
    /// Offset and template id of the open data flowset.
    open: Option<(usize, u16)>,
    layout: &'static Layout,
}

impl Datagram {
    fn start(enc: &V9Encoder, now: SystemTime) -> Self {
        let mut buf = BytesMut::with_capacity(enc.cfg.max_payload);
        let unix_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs() as u32;
        match enc.cfg.format {
            ExportFormat::V9 => {
                buf.put_u16(9);
                buf.put_u16(0); // count, patched in finish()
                buf.put_u32(enc.uptime_ms(now));
                buf.put_u32(unix_secs);
            }
            ExportFormat::Ipfix => {
                buf.put_u16(10);
                buf.put_u16(0); // length, patched in finish()
                buf.put_u32(unix_secs);
            }
        }
        buf.put_u32(enc.sequence);
        buf.put_u32(enc.cfg.source_id);
        let layout = enc.cfg.format.layout();
        debug_assert_eq!(buf.len(), layout.header_len);
        Self {
            buf,
            count: 0,
            data_records: 0,
            open: None,
            layout,
        }
    }

    fn put_templates(&mut self, source_id: u32, sampling: u32) {
        let l = self.layout;
        let ipfix = l.template_set == 2;
        // Template set with both data templates.
        let start = self.buf.len();
        self.buf.put_u16(l.template_set);
        self.buf.put_u16(0);
        for (id, fields) in [(TEMPLATE_IPV4, l.v4), (TEMPLATE_IPV6, l.v6)] {
            self.buf.put_u16(id);
            self.buf.put_u16(fields.len() as u16);
            for &(t, len) in fields.iter() {
                self.buf.put_u16(t);
                self.buf.put_u16(len);
            }
            self.count += 1;
        }
        self.close_flowset(start);
        if ipfix && sampling <= 1 {
            // Unsampled IPFIX: no sampling options (see the module's comment).
            return;
        }
        // Options template set: v9 gives the scope and option lengths in bytes, IPFIX
        // the field count and the scope field count.
        let start = self.buf.len();
        self.buf.put_u16(l.options_set);
        self.buf.put_u16(0);
        self.buf.put_u16(TEMPLATE_OPTIONS);
        if ipfix {
            self.buf.put_u16((l.scope.len() + l.options.len()) as u16);
            self.buf.put_u16(l.scope.len() as u16);
        } else {
            self.buf.put_u16((l.scope.len() * 4) as u16);
            self.buf.put_u16((l.options.len() * 4) as u16);
        }
        for &(t, len) in l.scope.iter().chain(l.options.iter()) {
            self.buf.put_u16(t);
            self.buf.put_u16(len);
        }
        self.count += 1;
        self.close_flowset(start);
        // Options data: this exporter's sampling.
        let start = self.buf.len();
        self.buf.put_u16(TEMPLATE_OPTIONS);
        self.buf.put_u16(0);
        self.buf.put_u32(source_id);
        let n = sampling.max(1);
        if ipfix {
            // 1 packet selected, then n - 1 skipped: 1 in n (RFC 5477 systematic
            // count-based sampling).
            self.buf.put_u32(1);
            self.buf.put_u32(n - 1);
        } else {
            self.buf.put_u32(n);
            // 0x02: random 1-in-N sampling (RFC 3954 field 35); 0x01 deterministic when
            // unsampled.
            self.buf.put_u8(if n > 1 { 2 } else { 1 });
        }
        self.count += 1;
        self.data_records += 1;
        debug_assert_eq!(
            self.buf.len() - start,
            FLOWSET_HEADER_LEN + record_len(l.scope) + record_len(l.options)
        );
        self.close_flowset(start);
    }

    /// Pads the flowset that starts at `start` to 4 bytes and writes its length.
    fn close_flowset(&mut self, start: usize) {
        while !(self.buf.len() - start).is_multiple_of(4) {
            self.buf.put_u8(0);
        }
        let len = (self.buf.len() - start) as u16;
        self.buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn close_open(&mut self) {
        if let Some((start, _)) = self.open.take() {
            self.close_flowset(start);
        }
    }

    /// Appends a record if it fits (with the padding its flowset may need).
    fn try_put_record(&mut self, r: &FlowRecord, enc: &V9Encoder, max: usize) -> bool {
        let (template, len) = if r.is_ipv4() {
            (TEMPLATE_IPV4, record_len(self.layout.v4))
        } else {
            (TEMPLATE_IPV6, record_len(self.layout.v6))
        };
        let needs_header = self.open.map(|(_, t)| t) != Some(template);
        let pad_open = if needs_header {
            self.open
                .map(|(s, _)| (4 - (self.buf.len() - s) % 4) % 4)
                .unwrap_or(0)
        } else {
            0
        };
        let header = if needs_header { FLOWSET_HEADER_LEN } else { 0 };
        // Worst case the flowset then needs 3 bytes of padding.
        if self.buf.len() + pad_open + header + len + 3 > max {
            return false;
        }
        if needs_header {
            self.close_open();
            self.open = Some((self.buf.len(), template));
            self.buf.put_u16(template);
            self.buf.put_u16(0);
        }
        let (bytes, packets) = if enc.cfg.scale_counts {
            (r.est_bytes(), r.est_packets())
        } else {
            (r.bytes, r.packets)
        };
        let b = &mut self.buf;
        b.put_u64(bytes);
        b.put_u64(packets);
        match enc.cfg.format {
            ExportFormat::V9 => {
                b.put_u32(enc.uptime_ms(r.first));
                b.put_u32(enc.uptime_ms(r.last));
            }
            ExportFormat::Ipfix => {
                b.put_u64(unix_ms(r.first));
                b.put_u64(unix_ms(r.last));
            }
        }
        match (r.src_addr, r.dst_addr) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                b.put_slice(&s.octets());
                b.put_slice(&d.octets());
            }
            (s, d) => {
                b.put_slice(&to_v6(s));
                b.put_slice(&to_v6(d));
            }
        }
        b.put_u16(r.src_port);
        b.put_u16(r.dst_port);
        b.put_u8(r.protocol);
        b.put_u8(r.tos);
        b.put_u8(r.tcp_flags);
        b.put_u8(r.direction.netflow_value());
        let (input, output) = match r.direction {
            crate::flow::Direction::Ingress => (r.ifindex, 0),
            crate::flow::Direction::Egress => (0, r.ifindex),
        };
        b.put_u32(input);
        b.put_u32(output);
        b.put_u16(r.vlan);
        // ICMP type and code (type * 256 + code), which collectors read from this field
        // rather than from the destination port.
        b.put_u16(if r.is_icmp() { r.dst_port } else { 0 });
        self.count += 1;
        self.data_records += 1;
        true
    }

    fn finish(mut self, format: ExportFormat) -> Bytes {
        self.close_open();
        let word = match format {
            ExportFormat::V9 => self.count,
            ExportFormat::Ipfix => self.buf.len() as u16,
        };
        self.buf[2..4].copy_from_slice(&word.to_be_bytes());
        self.buf.freeze()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn to_v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Direction;
    use netflow_parser::variable_versions::field_value::FieldValue;
    use netflow_parser::variable_versions::v9::FlowSetBody;
    use netflow_parser::variable_versions::v9::lookup::V9Field;
    use netflow_parser::{NetflowPacket, NetflowParser};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn boot() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn rec(i: u32, v6: bool) -> FlowRecord {
        let (src, dst) = if v6 {
            (
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)),
            )
        } else {
            (
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            )
        };
        let proto = [6, 17, if v6 { 58 } else { 1 }][i as usize % 3];
        FlowRecord {
            packets: 10 + i as u64,
            bytes: 5_000_000_000 + i as u64,
            first: boot() + Duration::from_millis(1000 + i as u64),
            last: boot() + Duration::from_millis(9000 + i as u64),
            direction: if i.is_multiple_of(3) {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            tcp_flags: 0x1b,
            tos: 0x20,
            vlan: (i % 4000) as u16,
            ifindex: 7,
            ..FlowRecord::new(src, 1024 + i as u16, dst, 443, proto)
        }
    }

    #[derive(Debug, Default, PartialEq)]
    struct Decoded {
        bytes: u64,
        packets: u64,
        first: u32,
        last: u32,
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        sport: u16,
        dport: u16,
        proto: u8,
        tos: u8,
        flags: u8,
        dir: u8,
        input: u32,
        output: u32,
        vlan: u16,
        icmp: u16,
    }

    fn num(v: &FieldValue) -> u64 {
        use netflow_parser::variable_versions::field_value::{DataNumber, DurationValue};
        match v {
            FieldValue::DataNumber(DataNumber::U8(x)) => *x as u64,
            FieldValue::DataNumber(DataNumber::U16(x)) => *x as u64,
            FieldValue::DataNumber(DataNumber::U24(x)) => *x as u64,
            FieldValue::DataNumber(DataNumber::U32(x)) => *x as u64,
            FieldValue::DataNumber(DataNumber::U64(x)) => *x,
            FieldValue::Duration(DurationValue::Millis { value, .. }) => *value,
            FieldValue::ProtocolType(p) => u8::from(*p) as u64,
            FieldValue::TcpControlBits(b, _) => {
                let bits = [b.fin, b.syn, b.rst, b.psh, b.ack, b.urg, b.ece, b.cwr];
                bits.iter()
                    .enumerate()
                    .map(|(i, &on)| (on as u64) << i)
                    .sum()
            }
            other => panic!("unexpected value {other:?}"),
        }
    }

    fn decode(parser: &mut NetflowParser, dg: &[u8]) -> (Vec<Decoded>, Vec<u32>, usize) {
        let res = parser.parse_bytes(dg);
        assert!(res.error.is_none(), "parse error: {:?}", res.error);
        let mut out = Vec::new();
        let mut seq = Vec::new();
        let mut sampling = Vec::new();
        for p in res.packets {
            let NetflowPacket::V9(v9) = p else {
                panic!("not v9")
            };
            seq.push(v9.header.sequence_number);
            for fs in v9.flowsets {
                match fs.body {
                    FlowSetBody::Data(d) => {
                        for r in d.fields {
                            let mut x = Decoded::default();
                            for (f, v) in r {
                                match f {
                                    V9Field::InBytes => x.bytes = num(&v),
                                    V9Field::InPkts => x.packets = num(&v),
                                    V9Field::FirstSwitched => x.first = num(&v) as u32,
                                    V9Field::LastSwitched => x.last = num(&v) as u32,
                                    V9Field::Ipv4SrcAddr | V9Field::Ipv6SrcAddr => {
                                        x.src = Some(IpAddr::try_from(&v).unwrap())
                                    }
                                    V9Field::Ipv4DstAddr | V9Field::Ipv6DstAddr => {
                                        x.dst = Some(IpAddr::try_from(&v).unwrap())
                                    }
                                    V9Field::L4SrcPort => x.sport = num(&v) as u16,
                                    V9Field::L4DstPort => x.dport = num(&v) as u16,
                                    V9Field::Protocol => x.proto = num(&v) as u8,
                                    V9Field::SrcTos => x.tos = num(&v) as u8,
                                    V9Field::TcpFlags => x.flags = num(&v) as u8,
                                    V9Field::Direction => x.dir = num(&v) as u8,
                                    V9Field::InputSnmp => x.input = num(&v) as u32,
                                    V9Field::OutputSnmp => x.output = num(&v) as u32,
                                    V9Field::SrcVlan => x.vlan = num(&v) as u16,
                                    V9Field::IcmpType => x.icmp = num(&v) as u16,
                                    other => panic!("unexpected field {other:?}"),
                                }
                            }
                            out.push(x);
                        }
                    }
                    FlowSetBody::OptionsData(o) => {
                        for f in o.fields {
                            for (k, v) in f.options_fields {
                                if k == V9Field::SamplingInterval {
                                    sampling.push(num(&v));
                                }
                            }
                        }
                    }
                    FlowSetBody::NoTemplate(_) => panic!("data before template"),
                    _ => {}
                }
            }
        }
        let n = sampling.len();
        (out, seq, n)
    }

    fn expected(r: &FlowRecord) -> Decoded {
        let (input, output) = match r.direction {
            Direction::Ingress => (r.ifindex, 0),
            Direction::Egress => (0, r.ifindex),
        };
        Decoded {
            bytes: r.bytes,
            packets: r.packets,
            first: r.first.duration_since(boot()).unwrap().as_millis() as u32,
            last: r.last.duration_since(boot()).unwrap().as_millis() as u32,
            src: Some(r.src_addr),
            dst: Some(r.dst_addr),
            sport: r.src_port,
            dport: r.dst_port,
            proto: r.protocol,
            tos: r.tos,
            flags: r.tcp_flags,
            dir: r.direction.netflow_value(),
            input,
            output,
            vlan: r.vlan,
            icmp: if r.is_icmp() { r.dst_port } else { 0 },
        }
    }

    #[test]
    fn round_trips_ipv4_and_ipv6_records_through_netflow_parser() {
        let records: Vec<_> = (0..300).map(|i| rec(i, i % 5 == 0)).collect();
        let mut enc = V9Encoder::new(V9Config::default(), boot());
        let now = boot() + Duration::from_secs(10);
        let dgs = enc.encode(&records, now);
        assert!(dgs.len() > 1, "300 records must need several datagrams");
        let mut parser = NetflowParser::default();
        let mut decoded = Vec::new();
        let mut seqs = Vec::new();
        for dg in &dgs {
            assert!(dg.len() <= 1400, "datagram of {} bytes", dg.len());
            let (d, s, _) = decode(&mut parser, dg);
            decoded.extend(d);
            seqs.extend(s);
        }
        let want: Vec<_> = records.iter().map(expected).collect();
        assert_eq!(decoded, want);
        assert_eq!(seqs, (0..dgs.len() as u32).collect::<Vec<_>>());
    }

    /// An unsampled IPFIX export carries no sampling options record, at the first
    /// message or at a template refresh, so every reader counts the same Data Records:
    /// each message's sequence number is the number of flow records before it.
    #[test]
    fn unsampled_ipfix_sends_no_options_and_counts_flow_records() {
        let cfg = V9Config {
            format: ExportFormat::Ipfix,
            sampling_interval: 1,
            template_refresh_packets: 3,
            ..V9Config::default()
        };
        let mut enc = V9Encoder::new(cfg, boot());
        let now = boot() + Duration::from_secs(10);
        let mut sent = 0u32;
        for round in 0..4u32 {
            let records: Vec<_> = (0..60).map(|i| rec(round * 60 + i, i % 7 == 0)).collect();
            for dg in enc.encode(&records, now) {
                assert_eq!(u32::from_be_bytes(dg[8..12].try_into().unwrap()), sent);
                let mut at = 16;
                while at + 4 <= dg.len() {
                    let set = u16::from_be_bytes([dg[at], dg[at + 1]]);
                    let len = usize::from(u16::from_be_bytes([dg[at + 2], dg[at + 3]]));
                    assert_ne!(set, 3, "an options template in an unsampled export");
                    assert_ne!(set, TEMPLATE_OPTIONS, "an options record");
                    if set == TEMPLATE_IPV4 || set == TEMPLATE_IPV6 {
                        let layout = ExportFormat::Ipfix.layout();
                        let fields = if set == TEMPLATE_IPV4 {
                            layout.v4
                        } else {
                            layout.v6
                        };
                        sent += ((len - 4) / record_len(fields)) as u32;
                    }
                    at += len;
                }
            }
        }
        assert_eq!(sent, 240);
    }

    /// IPFIX carries what v9 carries: our decoder (netflow_parser underneath) reads every
    /// record back, times to the millisecond from flowStart/EndMilliseconds; each
    /// header's sequence number counts the data records before it, so the decoder sees
    /// no gap; every message says its own length.
    #[test]
    fn ipfix_round_trips_records_with_sequence_numbers_counting_records() {
        use crate::sources::netflow::decode::{DecodeLimits, Decoder};
        let records: Vec<_> = (0..300).map(|i| rec(i, i % 5 == 0)).collect();
        let cfg = V9Config {
            format: ExportFormat::Ipfix,
            source_id: 7,
            sampling_interval: 10,
            ..V9Config::default()
        };
        let mut enc = V9Encoder::new(cfg, boot());
        let now = boot() + Duration::from_secs(10);
        let dgs = enc.encode(&records, now);
        assert!(dgs.len() > 1, "300 records must need several messages");
        let from = "192.0.2.9:4739".parse().unwrap();
        let mut dec = Decoder::new(DecodeLimits::default(), vec![]);
        let mut out = Vec::new();
        let mut expected_seq = 0u32;
        for dg in &dgs {
            assert_eq!(u16::from_be_bytes([dg[0], dg[1]]), 10);
            assert_eq!(u16::from_be_bytes([dg[2], dg[3]]) as usize, dg.len());
            assert!(dg.len() <= 1400);
            let seq = u32::from_be_bytes(dg[8..12].try_into().unwrap());
            assert_eq!(seq, expected_seq);
            let before = out.len();
            dec.decode(from, dg, now, &mut out);
            // The first message also carries the sampling options record.
            let options = u32::from(expected_seq == 0);
            expected_seq += (out.len() - before) as u32 + options;
        }
        let stats = &dec.exporters()[&from.ip()];
        assert_eq!(stats.sequence_gaps, 0, "{stats:?}");
        assert_eq!(stats.ipfix, dgs.len() as u64);
        assert_eq!(stats.options_records, 1);
        assert_eq!(out.len(), records.len());
        for (got, want) in out.iter().zip(&records) {
            assert_eq!(
                (
                    got.src_addr,
                    got.dst_addr,
                    got.src_port,
                    got.dst_port,
                    got.protocol
                ),
                (
                    want.src_addr,
                    want.dst_addr,
                    want.src_port,
                    want.dst_port,
                    want.protocol
                )
            );
            assert_eq!((got.packets, got.bytes), (want.packets, want.bytes));
            assert_eq!((got.first, got.last), (want.first, want.last));
            assert_eq!(
                (got.tos, got.tcp_flags, got.vlan),
                (want.tos, want.tcp_flags, want.vlan)
            );
            assert_eq!(got.direction, want.direction);
            // samplingPacketInterval 1, samplingPacketSpace 9: 1 in 10.
            assert_eq!(got.sampling, 10);
        }
    }

    #[test]
    fn header_count_matches_records_and_templates() {
        let records: Vec<_> = (0..3).map(|i| rec(i, false)).collect();
        let mut enc = V9Encoder::new(V9Config::default(), boot());
        let dgs = enc.encode(&records, boot());
        assert_eq!(dgs.len(), 1);
        // 2 data templates + 1 options template + 1 options record + 3 data records.
        assert_eq!(u16::from_be_bytes([dgs[0][2], dgs[0][3]]), 7);
        let dgs = enc.encode(&records, boot());
        assert_eq!(u16::from_be_bytes([dgs[0][2], dgs[0][3]]), 3);
        assert_eq!(u32::from_be_bytes(dgs[0][12..16].try_into().unwrap()), 1);
    }

    #[test]
    fn templates_are_resent_every_n_packets_and_every_m_seconds() {
        let cfg = V9Config {
            template_refresh_packets: 3,
            template_refresh_secs: 30,
            sampling_interval: 100,
            ..V9Config::default()
        };
        let mut enc = V9Encoder::new(cfg, boot());
        let mut parser = NetflowParser::default();
        let one = [rec(1, false)];
        let mut with_templates = Vec::new();
        for i in 0..7 {
            let dg = enc.encode(&one, boot() + Duration::from_secs(i));
            let (_, _, n_opts) = decode(&mut parser, &dg[0]);
            with_templates.push(n_opts == 1);
        }
        assert_eq!(
            with_templates,
            [true, false, false, true, false, false, true]
        );
        // Time-based: next datagram 30 s after the last templates carries them again.
        let dg = enc.encode(&one, boot() + Duration::from_secs(36));
        assert_eq!(decode(&mut parser, &dg[0]).2, 1);
        let dg = enc.encode(&one, boot() + Duration::from_secs(37));
        assert_eq!(decode(&mut parser, &dg[0]).2, 0);
    }

    #[test]
    fn no_datagram_without_records_unless_templates_are_due() {
        let mut enc = V9Encoder::new(V9Config::default(), boot());
        assert_eq!(
            enc.encode(&[], boot()).len(),
            1,
            "first call announces templates"
        );
        assert!(enc.encode(&[], boot()).is_empty());
        assert_eq!(enc.encode(&[], boot() + Duration::from_secs(61)).len(), 1);
    }

    #[test]
    fn every_datagram_fits_any_family_mix() {
        for pattern in 0..4 {
            let records: Vec<_> = (0..500)
                .map(|i| rec(i, (i as usize + pattern).is_multiple_of(pattern + 2)))
                .collect();
            let mut enc = V9Encoder::new(V9Config::default(), boot());
            let mut parser = NetflowParser::default();
            let mut n = 0;
            for dg in enc.encode(&records, boot()) {
                assert!(dg.len() <= 1400);
                assert_eq!(dg.len() % 4, 0);
                n += decode(&mut parser, &dg).0.len();
            }
            assert_eq!(n, 500);
        }
    }
}
