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

use super::layout::*;
pub use super::layout::{
    ExportFormat, IPV4_RECORD_LEN, IPV6_RECORD_LEN, TEMPLATE_IPV4, TEMPLATE_IPV6, TEMPLATE_OPTIONS,
};
use crate::flow::FlowRecord;

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
    pub fn encode<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a FlowRecord>,
        now: SystemTime,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut records = records.into_iter().peekable();
        loop {
            let with_templates = self.templates_due(now);
            if records.peek().is_none() && !with_templates {
                break;
            }
            let mut dg = Datagram::start(self, now);
            if with_templates {
                dg.put_templates(self.cfg.source_id, self.cfg.sampling_interval);
            }
            // A record always fits an empty datagram (max_payload >= HEADER_LEN + 512).
            while let Some(r) = records.peek() {
                if !dg.try_put_record(r, self, self.cfg.max_payload) {
                    break;
                }
                records.next();
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
            if records.peek().is_none() {
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
    /// The layout's IPv4 and IPv6 record lengths (summed once, not for every record).
    record_lens: (usize, usize),
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
            record_lens: (record_len(layout.v4), record_len(layout.v6)),
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
            (TEMPLATE_IPV4, self.record_lens.0)
        } else {
            (TEMPLATE_IPV6, self.record_lens.1)
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
        // The record is written into a buffer of its own at offsets known when compiled,
        // and appended at once: one capacity check instead of one for each of its
        // sixteen fields.
        let (input, output) = match r.direction {
            crate::flow::Direction::Ingress => (r.ifindex, 0),
            crate::flow::Direction::Egress => (0, r.ifindex),
        };
        let mut tail = [0u8; 20];
        tail[0..2].copy_from_slice(&r.src_port.to_be_bytes());
        tail[2..4].copy_from_slice(&r.dst_port.to_be_bytes());
        tail[4..8].copy_from_slice(&[r.protocol, r.tos, r.tcp_flags, r.direction.netflow_value()]);
        tail[8..12].copy_from_slice(&input.to_be_bytes());
        tail[12..16].copy_from_slice(&output.to_be_bytes());
        tail[16..18].copy_from_slice(&r.vlan.to_be_bytes());
        // ICMP type and code (type * 256 + code), which collectors read from this field
        // rather than from the destination port.
        tail[18..20].copy_from_slice(&(if r.is_icmp() { r.dst_port } else { 0 }).to_be_bytes());
        let counts = (bytes, packets);
        let n = match (enc.cfg.format, r.src_addr, r.dst_addr) {
            (ExportFormat::V9, IpAddr::V4(s), IpAddr::V4(d)) => fill(
                &mut self.buf,
                counts,
                enc.uptime_ms(r.first).to_be_bytes(),
                enc.uptime_ms(r.last).to_be_bytes(),
                (s.octets(), d.octets()),
                &tail,
            ),
            (ExportFormat::V9, s, d) => fill(
                &mut self.buf,
                counts,
                enc.uptime_ms(r.first).to_be_bytes(),
                enc.uptime_ms(r.last).to_be_bytes(),
                (to_v6(s), to_v6(d)),
                &tail,
            ),
            (ExportFormat::Ipfix, IpAddr::V4(s), IpAddr::V4(d)) => fill(
                &mut self.buf,
                counts,
                unix_ms(r.first).to_be_bytes(),
                unix_ms(r.last).to_be_bytes(),
                (s.octets(), d.octets()),
                &tail,
            ),
            (ExportFormat::Ipfix, s, d) => fill(
                &mut self.buf,
                counts,
                unix_ms(r.first).to_be_bytes(),
                unix_ms(r.last).to_be_bytes(),
                (to_v6(s), to_v6(d)),
                &tail,
            ),
        };
        debug_assert_eq!(n, len);
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

/// Appends a data record to `buf` (the template's field order: counts, times of `T`
/// bytes each, addresses of `A` bytes each, then the 20 bytes from the ports on) and
/// returns its length; every offset is a constant once `T` and `A` are known.
#[inline(always)]
fn fill<const T: usize, const A: usize>(
    buf: &mut BytesMut,
    (bytes, packets): (u64, u64),
    first: [u8; T],
    last: [u8; T],
    (src, dst): ([u8; A], [u8; A]),
    tail: &[u8; 20],
) -> usize {
    let mut rec = [0u8; 96];
    let out = &mut rec;
    out[0..8].copy_from_slice(&bytes.to_be_bytes());
    out[8..16].copy_from_slice(&packets.to_be_bytes());
    out[16..16 + T].copy_from_slice(&first);
    out[16 + T..16 + 2 * T].copy_from_slice(&last);
    let at = 16 + 2 * T;
    out[at..at + A].copy_from_slice(&src);
    out[at + A..at + 2 * A].copy_from_slice(&dst);
    let at = at + 2 * A;
    out[at..at + 20].copy_from_slice(tail);
    // A constant length once `T` and `A` are known: copied inline, not by a call.
    buf.put_slice(&rec[..at + 20]);
    at + 20
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
mod tests;
