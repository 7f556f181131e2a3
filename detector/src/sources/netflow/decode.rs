//! NetFlow v5/v9 and IPFIX datagrams to flow records. Pure: it takes datagrams, their
//! source address and the time they were received, and returns records and counters;
//! sockets and captures live around it.
//!
//! - Templates are scoped per exporter address and observation domain (v9 source id,
//!   IPFIX observation domain) by netflow_parser's `AutoScopedParser`; data arriving
//!   before its template is held (bounded) and decoded when the template arrives.
//! - Data sets of templates netflow_parser learned are decoded by a decoder compiled
//!   from each template (`compiled.rs`, [`FastParser`]) into the same [`Message`];
//!   everything else goes to netflow_parser. Each exporter counts its datagrams and
//!   records by path.
//! - Options data carrying a sampling interval (v9/IPFIX fields 34 and 50, IPFIX 305/306
//!   and 309/310; the v5 header) sets the interval of that exporter's domain: records
//!   keep their raw counts and the interval, and estimates are the product.
//! - Memory is bounded: at most `max_exporters` exporters are tracked (later ones are
//!   dropped and counted), templates per exporter are capped, pending data is capped.
//! - Every datagram from a source outside `--exporter-allow` is dropped and counted.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use netflow_parser::variable_versions::field_value::FieldValue;
use netflow_parser::variable_versions::ipfix::FlowSetBody as IpfixBody;
use netflow_parser::variable_versions::v9::FlowSetBody as V9Body;
use netflow_parser::{
    AutoScopedParser, NetflowPacket, NetflowParser, ParseResult, PendingFlowsConfig,
};

pub use super::compiled::FastParser;
use super::record::*;
use crate::flow::{Direction, FlowRecord, Origin};

/// Limits that keep memory bounded whatever the input.
#[derive(Clone, Debug)]
pub struct DecodeLimits {
    /// Exporters (address) tracked at once.
    pub max_exporters: usize,
    /// Templates cached per exporter scope.
    pub max_templates: usize,
    /// Template ids for which early data is held, per exporter scope.
    pub max_pending_templates: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_exporters: 1024,
            max_templates: 512,
            max_pending_templates: 64,
        }
    }
}

/// Counters of one exporter (by address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExporterStats {
    pub datagrams: u64,
    pub bytes: u64,
    pub records: u64,
    pub v5: u64,
    pub v9: u64,
    pub ipfix: u64,
    /// Decode errors by kind (`incomplete`, `unsupported_version`, `parse`, ...), in name
    /// order (the statistics line prints them so).
    pub errors: BTreeMap<&'static str, u64>,
    /// Data sets that arrived without their template (held if possible, else lost).
    pub no_template: u64,
    /// Times the sequence number jumped forward (export datagrams lost on the way).
    pub sequence_gaps: u64,
    /// Units lost according to the sequence numbers: datagrams for v9, records for v5 and
    /// IPFIX (what their sequence numbers count).
    pub sequence_lost: u64,
    /// Records without the fields of a flow (no addresses): counted, not forwarded.
    pub skipped_records: u64,
    /// Options data records (exporter metadata such as sampling), not flows.
    pub options_records: u64,
    /// Templates and options templates received.
    pub templates: u64,
    /// Datagrams decoded by a template compiled for them (`compiled.rs`) rather than by
    /// netflow_parser.
    pub fast_datagrams: u64,
    /// Flow records from those datagrams.
    pub fast_records: u64,
    /// Flow records decoded by netflow_parser (everything the compiled templates do not
    /// take: v5, templates, options, early data, the unusual and the malformed).
    pub slow_records: u64,
}

impl ExporterStats {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Data that arrived before its template, per exporter (from the parser's own counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingStats {
    /// Data sets held until their template arrives.
    pub cached: u64,
    /// Held data sets decoded once the template came.
    pub replayed: u64,
    /// Held data sets dropped (cache full, too large, or expired).
    pub dropped: u64,
    /// Held data sets whose late decode failed.
    pub replay_failed: u64,
    /// Data sets held right now.
    pub held: u64,
}

/// Counters that belong to no tracked exporter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Datagrams from sources outside `--exporter-allow`.
    pub rejected: u64,
    /// Datagrams dropped because `max_exporters` exporters are already tracked.
    pub over_exporter_limit: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct SequenceState {
    /// Sequence number the next message should carry.
    expected: u32,
}

pub use crate::flow::Cidr;

/// The decoder of every exporter.
pub struct Decoder {
    parser: FastParser,
    limits: DecodeLimits,
    allow: Vec<Cidr>,
    // Fx-hashed: looked up for every record (a million a second at full rate).
    exporters: FxHashMap<IpAddr, ExporterStats>,
    sequences: FxHashMap<(SocketAddr, u16, u32), SequenceState>,
    sampling: FxHashMap<(SocketAddr, u32), u32>,
    /// Intervals of named samplers (v9 FLOW_SAMPLER_ID 48, IPFIX selectorId 302) per
    /// scope: an exporter may run several at different rates.
    samplers: FxHashMap<(SocketAddr, u32, u64), u32>,
    /// IPFIX systemInitTimeMilliseconds per scope, for records timed in sysUpTime.
    init_time_ms: FxHashMap<(SocketAddr, u32), u64>,
    /// Parsers on other threads whose early data this decoder reports.
    shared: Vec<Arc<Mutex<FastParser>>>,
    pub global: GlobalStats,
}

/// A parser of every exporter within `limits`: templates scoped per exporter address
/// and domain, early data held.
pub fn new_parser(limits: &DecodeLimits) -> AutoScopedParser {
    let builder = NetflowParser::builder()
        .with_cache_size(limits.max_templates)
        .with_pending_flows(PendingFlowsConfig::new(limits.max_pending_templates));
    AutoScopedParser::try_with_builder(builder)
        .and_then(|p| p.with_max_sources(limits.max_exporters * 4))
        .expect("static parser configuration is valid")
}

/// Which datagrams a [`Decoder`] of the same allow-list and limits decodes, decided
/// without it (on the thread that hands datagrams to parsers): the same datagrams in
/// the same order get the same answers as [`Decoder::admit`].
pub struct Admission {
    allow: Vec<Cidr>,
    max_exporters: usize,
    known: rustc_hash::FxHashSet<IpAddr>,
}

impl Admission {
    pub fn new(limits: &DecodeLimits, allow: Vec<Cidr>) -> Self {
        Self {
            allow,
            max_exporters: limits.max_exporters,
            known: Default::default(),
        }
    }

    pub fn admit(&mut self, from: IpAddr) -> bool {
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(from)) {
            return false;
        }
        if self.known.contains(&from) {
            return true;
        }
        if self.known.len() >= self.max_exporters {
            return false;
        }
        self.known.insert(from);
        true
    }
}

/// A copy of a NetFlow v9 or IPFIX datagram with only its header and its template and
/// options-template sets (its length fixed), when it has any: what a parser that does
/// not decode this datagram must still learn. None for v5, for datagrams without
/// templates, and for ones too short to hold a header.
pub fn template_sets(data: &[u8]) -> Option<Vec<u8>> {
    let be16 = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
    if data.len() < 4 {
        return None;
    }
    let (header, templates): (usize, [u16; 2]) = match be16(0) {
        9 => (20, [0, 1]),
        10 => (16, [2, 3]),
        _ => return None,
    };
    if data.len() < header {
        return None;
    }
    // An IPFIX message says its own length; v9 runs to the datagram's end.
    let end = if header == 16 {
        (be16(2) as usize).min(data.len())
    } else {
        data.len()
    };
    let mut copy: Option<Vec<u8>> = None;
    let mut at = header;
    while at + 4 <= end {
        let (id, len) = (be16(at), be16(at + 2) as usize);
        if len < 4 || at + len > end {
            break;
        }
        if templates.contains(&id) {
            copy.get_or_insert_with(|| data[..header].to_vec())
                .extend_from_slice(&data[at..at + len]);
        }
        at += len;
    }
    let mut copy = copy?;
    if header == 16 {
        let len = copy.len().min(u16::MAX as usize) as u16;
        copy[2..4].copy_from_slice(&len.to_be_bytes());
    }
    Some(copy)
}

impl Decoder {
    pub fn new(limits: DecodeLimits, allow: Vec<Cidr>) -> Self {
        Self::with_fast_path(limits, allow, true)
    }

    /// A decoder that decodes data sets of compiled templates itself (`fast`), or one
    /// that leaves every datagram to netflow_parser: the reference the compiled path is
    /// held equal to.
    pub fn with_fast_path(limits: DecodeLimits, allow: Vec<Cidr>, fast: bool) -> Self {
        Self {
            parser: FastParser::new(&limits, fast),
            limits,
            allow,
            exporters: FxHashMap::default(),
            sequences: FxHashMap::default(),
            sampling: FxHashMap::default(),
            samplers: FxHashMap::default(),
            init_time_ms: FxHashMap::default(),
            shared: Vec::new(),
            global: GlobalStats::default(),
        }
    }

    /// Counters per exporter address.
    pub fn exporters(&self) -> &FxHashMap<IpAddr, ExporterStats> {
        &self.exporters
    }

    /// Entries held in each of the decoder's tables, to check that memory stays bounded:
    /// (exporters, sequence streams, sampling scopes, init-time scopes, parser scopes).
    pub fn table_sizes(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.exporters.len(),
            self.sequences.len(),
            self.sampling.len(),
            self.init_time_ms.len(),
            self.parser.parser().source_count(),
        )
    }

    /// Template scopes the compiled path keeps (at most one per scope netflow_parser
    /// keeps: [`Self::table_sizes`]).
    pub fn compiled_scopes(&self) -> usize {
        self.parser.compiled_scopes()
    }

    /// The limits this decoder was built with.
    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Early data (before its template) per exporter address. Reads every scope's parser
    /// counters: call it for reports, not per datagram.
    pub fn pending(&self) -> HashMap<IpAddr, PendingStats> {
        let mut out: HashMap<IpAddr, PendingStats> = HashMap::new();
        let mut add = |ip: IpAddr, info: netflow_parser::ParserCacheInfo| {
            let p = out.entry(ip).or_default();
            for c in [info.v9, info.ipfix] {
                p.cached += c.metrics.pending_cached;
                p.replayed += c.metrics.pending_replayed;
                p.dropped += c.metrics.pending_dropped;
                p.replay_failed += c.metrics.pending_replay_failed;
                p.held += c.pending_flow_count as u64;
            }
        };
        let mut read = |p: &AutoScopedParser| {
            for (k, info) in p.v9_info() {
                add(k.addr.ip(), info);
            }
            for (k, info) in p.ipfix_info() {
                add(k.addr.ip(), info);
            }
        };
        read(self.parser.parser());
        for p in &self.shared {
            read(p.lock().unwrap_or_else(|e| e.into_inner()).parser());
        }
        out
    }

    /// Decodes one datagram received from `from` at `received`, appending its flows.
    pub fn decode(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        received: SystemTime,
        out: &mut Vec<FlowRecord>,
    ) {
        if !self.admit(from, data.len()) {
            return;
        }
        let message = self.parser.parse(from, data, received);
        self.apply(from, message, received, false, out);
    }

    /// Counts a datagram of `len` bytes from `from` and says whether it is decoded: not
    /// when its source is outside the allow-list or over the exporter limit (counted).
    /// Given the same datagrams in the same order, an [`Admission`] of the same limits
    /// answers the same.
    pub fn admit(&mut self, from: SocketAddr, len: usize) -> bool {
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(from.ip())) {
            self.global.rejected += 1;
            return false;
        }
        if !self.exporters.contains_key(&from.ip())
            && self.exporters.len() >= self.limits.max_exporters
        {
            self.global.over_exporter_limit += 1;
            return false;
        }
        let stats = self.exporters.entry(from.ip()).or_default();
        stats.datagrams += 1;
        stats.bytes += len as u64;
        true
    }

    /// Lets [`Self::pending`] report the early data held by parsers on other threads
    /// (a listener that parses one exporter's datagrams in parallel).
    pub fn share_parsers(&mut self, parsers: Vec<Arc<Mutex<FastParser>>>) {
        self.shared = parsers;
    }

    /// Applies what an admitted datagram says to its exporter's running state, in the
    /// order the datagrams arrived: counters, sequence numbers, sampling and time bases,
    /// and appends its flows. `learned` marks a [`template_sets`] copy parsed by a thread
    /// that did not get the datagram itself: it only taught that thread the templates
    /// (and brings the data it held for them), so it counts neither as a datagram nor as
    /// templates received.
    pub fn apply(
        &mut self,
        from: SocketAddr,
        message: Message,
        received: SystemTime,
        learned: bool,
        out: &mut Vec<FlowRecord>,
    ) {
        let Message {
            error,
            trailing,
            body,
            fast,
        } = message;
        if !learned {
            if let Some(kind) = error {
                self.count_error(from, kind);
            }
            if trailing {
                self.count_error(from, "trailing_data");
            }
        }
        let Some(b) = body else { return };
        if b.version == 0 {
            self.count_error(from, "unsupported_version");
            return;
        }
        if !learned {
            let stats = self.stats(from);
            match b.version {
                5 => stats.v5 += 1,
                9 => stats.v9 += 1,
                _ => stats.ipfix += 1,
            }
            stats.templates += b.templates;
            self.sequence(from, b.version, b.domain, b.seq, b.units);
        }
        let stats = self.stats(from);
        stats.options_records += b.options_records;
        stats.no_template += b.no_template;
        stats.skipped_records += b.skipped;
        for kind in b.errors {
            self.count_error(from, kind);
        }
        let ctx = Ctx {
            from,
            domain: b.domain,
            export_ms: b.export_ms,
            sys_up_time: b.sys_up_time,
            received,
        };
        let scope = ctx.scope();
        // Counted once for the message, not looked up again for every record.
        let before = out.len();
        // The scope's own interval, looked up once for the message's records that name no
        // sampler (until options in the message set it).
        let mut scope_interval = None;
        // The flows ahead of every event, taken whole (see `Body::flows`).
        let mut flows = b.flows;
        for &(i, id) in &b.samplers {
            let r = &mut flows[i as usize];
            if r.sampling == 0 {
                r.sampling = self.interval_of(&scope, Some(id));
            }
        }
        for r in flows.iter_mut().filter(|r| r.sampling == 0) {
            r.sampling = *scope_interval.get_or_insert_with(|| self.interval_of(&scope, None));
        }
        out.append(&mut flows);
        for e in b.events {
            match e {
                Event::Flow(mut r, sampler) => {
                    if r.sampling == 0 {
                        r.sampling = match sampler {
                            Some(_) => self.interval_of(&scope, sampler),
                            None => *scope_interval
                                .get_or_insert_with(|| self.interval_of(&scope, None)),
                        };
                    }
                    out.push(r);
                }
                Event::Raw(raw) => {
                    let init = self.init_time_ms.get(&scope).copied();
                    let mut r = raw.flow(&ctx, init);
                    if r.sampling == 0 {
                        r.sampling = self.interval_of(&scope, raw.sampler);
                    }
                    out.push(r);
                }
                Event::Options {
                    interval,
                    init_ms,
                    sampler,
                } => {
                    scope_interval = None;
                    if let Some(ms) = init_ms {
                        self.remember(&scope, ms, |d| &mut d.init_time_ms);
                    }
                    match (interval, sampler) {
                        (Some(n), Some(id)) => {
                            let key = (scope.0, scope.1, id);
                            let cap = self.limits.max_exporters * 16;
                            if self.samplers.len() < cap || self.samplers.contains_key(&key) {
                                self.samplers.insert(key, n);
                            }
                        }
                        (Some(n), None) => self.remember(&scope, n, |d| &mut d.sampling),
                        _ => {}
                    }
                }
            }
        }
        let stats = self.stats(from);
        let records = (out.len() - before) as u64;
        stats.records += records;
        if fast {
            stats.fast_datagrams += 1;
            stats.fast_records += records;
        } else {
            stats.slow_records += records;
        }
    }

    /// The sampling interval of a record of `scope` that does not carry its own: its
    /// named sampler's, else the scope's, else 1 (unsampled).
    fn interval_of(&self, scope: &(SocketAddr, u32), sampler: Option<u64>) -> u32 {
        sampler
            .and_then(|id| self.samplers.get(&(scope.0, scope.1, id)))
            .or_else(|| self.sampling.get(scope))
            .copied()
            .unwrap_or(1)
            .max(1)
    }

    /// The counters of a tracked exporter (every datagram's source is tracked before its
    /// packets are handled).
    fn stats(&mut self, from: SocketAddr) -> &mut ExporterStats {
        self.exporters.get_mut(&from.ip()).expect("tracked")
    }

    /// One line per exporter: its counters and its early-data counters.
    pub fn describe_exporters(&self) -> Vec<String> {
        self.exporter_stats()
            .into_iter()
            .map(|(ip, s, p)| {
                format!(
                    "exporter {ip}: datagrams {} bytes {} records {} (v5 {} v9 {} ipfix {}) templates {} options {} errors {:?} no-template {} held {} late-decoded {} dropped-early {} sequence gaps {} lost {} skipped {} compiled {} datagrams {} records, parser {} records",
                    s.datagrams,
                    s.bytes,
                    s.records,
                    s.v5,
                    s.v9,
                    s.ipfix,
                    s.templates,
                    s.options_records,
                    s.errors,
                    s.no_template + p.cached,
                    p.held,
                    p.replayed,
                    p.dropped,
                    s.sequence_gaps,
                    s.sequence_lost,
                    s.skipped_records,
                    s.fast_datagrams,
                    s.fast_records,
                    s.slow_records
                )
            })
            .collect()
    }

    /// Each tracked exporter's counters and early-data counters, by address.
    pub fn exporter_stats(&self) -> Vec<(IpAddr, ExporterStats, PendingStats)> {
        let mut pending = self.pending();
        let mut out: Vec<_> = self
            .exporters
            .iter()
            .map(|(ip, s)| (*ip, s.clone(), pending.remove(ip).unwrap_or_default()))
            .collect();
        out.sort_by_key(|(ip, ..)| *ip);
        out
    }

    fn count_error(&mut self, from: SocketAddr, kind: &'static str) {
        if let Some(s) = self.exporters.get_mut(&from.ip()) {
            *s.errors.entry(kind).or_default() += 1;
        }
    }

    /// Tracks the sequence number of one stream; `units` is what this message adds to it
    /// (datagrams for v9, records for v5 and IPFIX).
    fn sequence(&mut self, from: SocketAddr, version: u16, domain: u32, seq: u32, units: u32) {
        let key = (from, version, domain);
        if !self.sequences.contains_key(&key)
            && self.sequences.len() >= self.limits.max_exporters * 16
        {
            return;
        }
        let next = seq.wrapping_add(units);
        match self.sequences.get_mut(&key) {
            None => {
                self.sequences.insert(key, SequenceState { expected: next });
            }
            Some(st) => {
                let gap = seq.wrapping_sub(st.expected);
                // A forward jump below 2^31 is loss; anything else is a reordered or
                // restarted stream, which resynchronises without counting.
                if gap != 0 && gap < (1 << 31) {
                    let stats = self.exporters.get_mut(&from.ip()).expect("tracked");
                    stats.sequence_gaps += 1;
                    stats.sequence_lost += gap as u64;
                }
                st.expected = next;
            }
        }
    }

    /// Stores a per-scope value unless that would grow the map past its bound.
    fn remember<V>(
        &mut self,
        scope: &(SocketAddr, u32),
        value: V,
        map: impl FnOnce(&mut Self) -> &mut FxHashMap<(SocketAddr, u32), V>,
    ) {
        let cap = self.limits.max_exporters * 16;
        let m = map(self);
        if m.len() < cap || m.contains_key(scope) {
            m.insert(*scope, value);
        }
    }
}

/// What one datagram says, taken from its parse on whichever thread parsed it, before
/// the exporter's running state (counters, sequence numbers, sampling, time bases) is
/// applied by [`Decoder::apply`] in arrival order. Compact: flows are already records.
pub struct Message {
    /// Why the parser stopped early, if it did.
    error: Option<&'static str>,
    /// Bytes after the first export message (counted as trailing data).
    trailing: bool,
    /// The first export message, if one was parsed.
    body: Option<Body>,
    /// Decoded by a compiled template (`compiled.rs`), not by netflow_parser.
    fast: bool,
}

pub(super) struct Body {
    /// 5, 9 or 10 (IPFIX); 0 for a version this decoder does not handle.
    version: u16,
    /// v9 source id or IPFIX observation domain (0 for v5).
    domain: u32,
    seq: u32,
    /// What this message adds to its sequence: records for v5 and IPFIX, 1 for v9.
    pub(super) units: u32,
    export_ms: u64,
    sys_up_time: Option<u32>,
    /// The message's first flows, before any other event (an options record, a flow
    /// waiting for its exporter's init time): appended to the output whole, where each
    /// event is moved on its own. Once an event is held, flows are events too.
    flows: Vec<FlowRecord>,
    /// (position in `flows`, sampler id) of those that name a sampler.
    samplers: Vec<(u32, u64)>,
    events: Vec<Event>,
    templates: u64,
    options_records: u64,
    no_template: u64,
    skipped: u64,
    pub(super) errors: Vec<&'static str>,
}

/// One record of a message, in order (options change the sampling of later records).
enum Event {
    /// A flow, and the sampler it names; `sampling` 0 takes the interval the
    /// exporter's options set for that sampler (or for the whole exporter).
    Flow(FlowRecord, Option<u64>),
    /// A flow timed in sysUpTime without a header base: its times wait for the
    /// exporter's systemInitTimeMilliseconds.
    Raw(Box<RawRecord>),
    /// Options data: a sampling interval (of the named sampler, if any) and/or the
    /// exporter's init time.
    Options {
        interval: Option<u32>,
        init_ms: Option<u64>,
        sampler: Option<u64>,
    },
}

impl Message {
    /// Takes what the datagram from `from`, received at `received`, says from its parse.
    pub fn from_parse(from: SocketAddr, result: ParseResult, received: SystemTime) -> Self {
        // One UDP datagram carries one export message; bytes after it are not another
        // message (the parser would read them as one) but trailing garbage.
        let mut packets = result.packets.into_iter();
        let body = packets.next().map(|p| Body::from_packet(from, p, received));
        Self {
            error: result.error.as_ref().map(error_kind),
            trailing: packets.next().is_some(),
            body,
            fast: false,
        }
    }

    /// A whole export message decoded by a compiled template.
    pub(super) fn compiled(body: Body) -> Self {
        Self {
            error: None,
            trailing: false,
            body: Some(body),
            fast: true,
        }
    }

    /// Whether the compiled path decoded it.
    pub fn is_fast(&self) -> bool {
        self.fast
    }
}

impl Body {
    pub(super) fn new(
        version: u16,
        domain: u32,
        seq: u32,
        export_ms: u64,
        up: Option<u32>,
    ) -> Self {
        Self {
            version,
            domain,
            seq,
            units: 0,
            export_ms,
            sys_up_time: up,
            flows: Vec::new(),
            samplers: Vec::new(),
            events: Vec::new(),
            templates: 0,
            options_records: 0,
            no_template: 0,
            skipped: 0,
            errors: Vec::new(),
        }
    }

    fn from_packet(from: SocketAddr, packet: NetflowPacket, received: SystemTime) -> Self {
        match packet {
            NetflowPacket::V5(v5) => {
                let h = v5.header;
                let export_ms = h.unix_secs as u64 * 1000 + h.unix_nsecs as u64 / 1_000_000;
                let mut b = Self::new(5, 0, h.flow_sequence, export_ms, Some(h.sys_up_time));
                // The header's count is authoritative: bytes after its records are padding.
                let mut flowsets = v5.flowsets;
                flowsets.truncate(h.count as usize);
                b.units = flowsets.len() as u32;
                let sampling = ((h.sampling_interval & 0x3fff) as u32).max(1);
                let at = |up: u32| uptime_to_wall(export_ms, h.sys_up_time, up);
                b.events = flowsets
                    .into_iter()
                    .map(|f| {
                        Event::Flow(
                            FlowRecord {
                                src_addr: IpAddr::V4(f.src_addr),
                                dst_addr: IpAddr::V4(f.dst_addr),
                                src_port: f.src_port,
                                dst_port: f.dst_port,
                                protocol: f.protocol_number,
                                packets: f.d_pkts as u64,
                                bytes: f.d_octets as u64,
                                first: at(f.first),
                                last: at(f.last),
                                direction: Direction::Ingress,
                                tcp_flags: f.tcp_flags,
                                tos: f.tos,
                                vlan: 0,
                                vlan_inner: 0,
                                ifindex: f.input as u32,
                                sampling,
                                origin: Origin::Exporter {
                                    addr: from,
                                    domain: 0,
                                },
                                duplicate: false,
                                hints: 0,
                                opening: [0; 4],
                                live: crate::flow::Live::Whole,
                            },
                            None,
                        )
                    })
                    .collect();
                b
            }
            NetflowPacket::V9(v9) => {
                let h = v9.header;
                let mut b = Self::new(
                    9,
                    h.source_id,
                    h.sequence_number,
                    h.unix_secs as u64 * 1000,
                    Some(h.sys_up_time),
                );
                b.units = 1;
                let ctx = b.ctx(from, received);
                for fs in v9.flowsets {
                    let (set_id, set_len) = (fs.header.flowset_id, fs.header.length);
                    match fs.body {
                        V9Body::Data(_) if set_id < 256 => b.errors.push("reserved_set_id"),
                        V9Body::Data(d) if d.fields.is_empty() && set_len > 7 => {
                            b.errors.push("undecoded_set")
                        }
                        V9Body::Data(d) => {
                            // By reference: a parsed field is 80 bytes, moving each one
                            // cost more than reading it.
                            for r in &d.fields {
                                b.record(&ctx, r.iter().map(|(k, v)| (u16::from(*k), v)));
                            }
                        }
                        V9Body::OptionsData(o) => {
                            b.options_records += o.fields.len() as u64;
                            for r in &o.fields {
                                let f = r.options_fields.iter().map(|(k, v)| (u16::from(*k), v));
                                b.options(f);
                            }
                        }
                        V9Body::Template(t) => b.templates += t.templates.len() as u64,
                        V9Body::OptionsTemplate(t) => b.templates += t.templates.len() as u64,
                        V9Body::NoTemplate(_) => b.no_template += 1,
                        _ => {}
                    }
                }
                b
            }
            NetflowPacket::IPFix(ipfix) => {
                let h = ipfix.header;
                let mut b = Self::new(
                    10,
                    h.observation_domain_id,
                    h.sequence_number,
                    h.export_time as u64 * 1000,
                    None,
                );
                let ctx = b.ctx(from, received);
                for fs in ipfix.flowsets {
                    let (set_id, set_len) = (fs.header.header_id, fs.header.length);
                    let reserved = set_id < 256;
                    match fs.body {
                        // Set ids 4-255 are reserved (RFC 7011 3.3.2): ignore them.
                        IpfixBody::Data(_) | IpfixBody::V9Data(_) if reserved => {
                            b.errors.push("reserved_set_id")
                        }
                        IpfixBody::Data(d) if d.fields.is_empty() && set_len > 7 => {
                            b.errors.push("undecoded_set")
                        }
                        IpfixBody::V9Data(d) if d.fields.is_empty() && set_len > 7 => {
                            b.errors.push("undecoded_set")
                        }
                        IpfixBody::Data(d) => {
                            b.units += d.fields.len() as u32;
                            for r in &d.fields {
                                let f = r.iter().filter_map(|(k, v)| ipfix_id(k).map(|id| (id, v)));
                                b.record(&ctx, f);
                            }
                        }
                        IpfixBody::V9Data(d) => {
                            b.units += d.fields.len() as u32;
                            for r in &d.fields {
                                b.record(&ctx, r.iter().map(|(k, v)| (u16::from(*k), v)));
                            }
                        }
                        IpfixBody::OptionsData(o) => {
                            b.units += o.fields.len() as u32;
                            b.options_records += o.fields.len() as u64;
                            for r in &o.fields {
                                b.options(
                                    r.iter().filter_map(|(k, v)| ipfix_id(k).map(|id| (id, v))),
                                );
                            }
                        }
                        IpfixBody::V9OptionsData(o) => {
                            b.units += o.fields.len() as u32;
                            b.options_records += o.fields.len() as u64;
                            for r in &o.fields {
                                let f = r.options_fields.iter().map(|(k, v)| (u16::from(*k), v));
                                b.options(f);
                            }
                        }
                        IpfixBody::Template(_)
                        | IpfixBody::V9Template(_)
                        | IpfixBody::OptionsTemplate(_)
                        | IpfixBody::V9OptionsTemplate(_) => b.templates += 1,
                        IpfixBody::Templates(t) => b.templates += t.len() as u64,
                        IpfixBody::V9Templates(t) => b.templates += t.len() as u64,
                        IpfixBody::OptionsTemplates(t) => b.templates += t.len() as u64,
                        IpfixBody::V9OptionsTemplates(t) => b.templates += t.len() as u64,
                        IpfixBody::NoTemplate(_) => b.no_template += 1,
                        _ => {}
                    }
                }
                b
            }
            _ => Self::new(0, 0, 0, 0, None),
        }
    }

    pub(super) fn ctx(&self, from: SocketAddr, received: SystemTime) -> Ctx {
        Ctx {
            from,
            domain: self.domain,
            export_ms: self.export_ms,
            sys_up_time: self.sys_up_time,
            received,
        }
    }

    /// One data record decoded by netflow_parser.
    fn record<'a>(&mut self, ctx: &Ctx, fields: impl Iterator<Item = (u16, &'a FieldValue)>) {
        let mut r = RawRecord::default();
        for (id, v) in fields {
            r.set(id, v);
        }
        self.push_record(ctx, &r);
    }

    /// One data record's fields, taken (by either path): a flow when it has addresses
    /// (timed now unless its times wait for the exporter's init time), else counted as
    /// skipped.
    pub(super) fn push_record(&mut self, ctx: &Ctx, r: &RawRecord) {
        let Some(addresses) = r.addresses() else {
            self.skipped += 1;
            return;
        };
        self.push_flow(ctx, r, addresses);
        // A biflow (RFC 5103) is two flows: the reverse one from the other end.
        if let Some(reverse) = r.reverse()
            && let Some(addresses) = reverse.addresses()
        {
            self.push_flow(ctx, &reverse, addresses);
        }
    }

    fn push_flow(&mut self, ctx: &Ctx, r: &RawRecord, addresses: (IpAddr, IpAddr)) {
        if r.needs_init_time(ctx) {
            self.flows_into_events();
            self.events.push(Event::Raw(Box::new(r.clone())));
        } else if self.events.is_empty() {
            if let Some(id) = r.sampler {
                self.samplers.push((self.flows.len() as u32, id));
            }
            self.flows.push(r.flow_between(addresses, ctx, None));
        } else {
            let flow = r.flow_between(addresses, ctx, None);
            self.events.push(Event::Flow(flow, r.sampler));
        }
    }

    /// Moves the flows held ahead of the events into them (an event follows), in order.
    fn flows_into_events(&mut self) {
        if self.flows.is_empty() {
            return;
        }
        let mut named = self.samplers.drain(..).peekable();
        let flows = self.flows.drain(..).enumerate().map(|(i, f)| {
            let id = named.next_if(|&(at, _)| at as usize == i).map(|(_, id)| id);
            Event::Flow(f, id)
        });
        self.events.extend(flows);
    }

    /// Room for `n` more records.
    pub(super) fn reserve(&mut self, n: usize) {
        self.flows.reserve(n);
    }

    /// One options data record: the sampling interval (fields 34/50, or 305/306 packet
    /// interval and space, or 309/310 sample size and population) and the exporter's
    /// systemInitTimeMilliseconds (160) it carries.
    fn options<'a>(&mut self, fields: impl Iterator<Item = (u16, &'a FieldValue)>) {
        let mut interval = None;
        let (mut pkt_interval, mut pkt_space) = (None, None);
        let (mut size, mut population) = (None, None);
        let (mut init_ms, mut sampler) = (None, None);
        for (id, v) in fields {
            match id {
                34 | 50 => interval = num(v),
                // FLOW_SAMPLER_ID (v9), samplerId and selectorId (IPFIX).
                48 | 302 => sampler = num(v),
                305 => pkt_interval = num(v),
                306 => pkt_space = num(v),
                309 => size = num(v),
                310 => population = num(v),
                160 => init_ms = time_ms(v),
                _ => {}
            }
        }
        let n = match (interval, pkt_interval, pkt_space, size, population) {
            (Some(n), ..) => Some(n),
            (_, Some(i), Some(s), ..) if i > 0 => Some((i + s) / i),
            (.., Some(sz), Some(pop)) if sz > 0 => Some(pop / sz),
            _ => None,
        };
        let interval = n.map(|n| n.clamp(1, u32::MAX as u64) as u32);
        if interval.is_some() || init_ms.is_some() {
            self.flows_into_events();
            self.events.push(Event::Options {
                interval,
                init_ms,
                sampler,
            });
        }
    }
}

/// A stable name for each kind of decode error.
fn error_kind(e: &netflow_parser::NetflowError) -> &'static str {
    use netflow_parser::NetflowError as E;
    match e {
        E::Incomplete { .. } => "incomplete",
        E::UnsupportedVersion { .. } => "unsupported_version",
        E::FilteredVersion { .. } => "filtered_version",
        E::ParseError { .. } => "parse",
        E::Partial { .. } => "partial",
        E::DecodedOutputLimitExceeded { .. } => "output_limit",
        _ => "other",
    }
}
