//! A decoder compiled from each learned NetFlow v9 / IPFIX template, in front of
//! netflow_parser (issue #21).
//!
//! netflow_parser builds a vector of decoded values for every record (about 80 bytes a
//! field) that [`RawRecord::set`] then picks from: most of the cost of a record. A
//! template says where every field of its records is, so once one is learned it is
//! compiled into its record length and, for each field the pipeline reads
//! ([`record::used`]), its offset, its length and how netflow_parser would have typed it
//! ([`Read`]: a big-endian number of 1 to 8 bytes, a 16-byte one, an address, a time,
//! raw bytes, ...). A datagram made only of data sets of compiled templates is then
//! decoded straight from its bytes into the same [`Message`] netflow_parser's result
//! gives: the same [`RawRecord::set`] (through [`FieldView`]) and the same
//! [`Body::push_record`] make the flows, so what a field means is written once.
//!
//! Correctness first: everything else goes whole through netflow_parser exactly as
//! before ([`FastParser::parse`] falls back before producing anything), so its error
//! and padding rules and counters stay the reference:
//! - datagrams with template, options-template, options-data or reserved sets, data
//!   sets of a template not compiled (unknown, an options template, a v9-format template
//!   inside IPFIX), v5, unknown versions;
//! - anything malformed: sets shorter than their header or running past the message,
//!   sets that do not tile the message exactly, an IPFIX length that differs from the
//!   datagram's (trailing data), a datagram without sets, more records in a set than
//!   netflow_parser decodes (`DEFAULT_MAX_RECORDS_PER_FLOWSET`) or more values in a
//!   message than it allows (`DEFAULT_MAX_DECODED_FIELD_VALUES_PER_MESSAGE`);
//! - templates not compiled: variable-length fields, dataLinkFrameSection (315, its
//!   frame is parsed by [`RawRecord::frame_section`]), a field netflow_parser would fail
//!   to decode, records longer than a datagram, and any field whose compiled reading
//!   differs from netflow_parser's on a set of probe values (checked when compiling, so
//!   a netflow_parser that types a field differently turns its template slow, not
//!   wrong). Fields the pipeline does not read (enterprise ones among them) are skipped
//!   by their length.
//!
//! What a compiled datagram gives, as netflow_parser's would: v9 counts one sequence
//! unit per message and IPFIX one per record; records are `set length / record length`
//! (the rest of a set is padding); an empty data set longer than 7 bytes is an
//! `undecoded_set` error; records without addresses are skipped; biflows are split and
//! records timed in sysUpTime without a header base wait for the exporter's init time
//! ([`Body::push_record`]); sampling intervals are looked up when the message is
//! applied, as for every message.
//!
//! Templates are scoped as `AutoScopedParser` scopes them: exporter address and v9
//! source id or IPFIX observation domain, then template id. They are learned from the
//! templates netflow_parser returns in its results (so only templates it accepted), in
//! the order of the sets: a (re)definition recompiles (an identical one keeps its
//! compiled form), an options template or a v9-format one of the same id removes it, an
//! IPFIX withdrawal (read from the set, as netflow_parser does not return it) removes it
//! or all (after the datagram's definitions: a template withdrawn then defined again
//! is only slower). The cache only ever holds templates netflow_parser holds, with the
//! same definition, within the same bounds:
//! - a scope disappears when netflow_parser drops its source (its source reporter);
//! - a datagram netflow_parser failed on may have given it templates it does not
//!   return: of the template records netflow_parser could have reached, one whose
//!   definition is the compiled one changes nothing, any other drops its id (until it
//!   is defined again) and counts as a template netflow_parser may hold;
//! - a scope whose template ids (counted so, as a superset) could exceed
//!   `max_templates` (netflow_parser would have evicted one, and which is not known)
//!   stops compiling: netflow_parser decodes it from then on.
//!
//! netflow_parser's own state evolves as if it had parsed every datagram: a compiled
//! datagram would have moved its source and its templates to the front of its LRU
//! caches, so before netflow_parser parses anything, the scopes and templates used since
//! are touched again, in the order they were last used, with a copy of the header and
//! one empty data set per template: evictions (sources, templates) stay exactly those of
//! netflow_parser alone.
//!
//! The listener parses one exporter's datagrams on several threads, each with its own
//! [`FastParser`]; each thread parses the [`super::decode::template_sets`] copies of the
//! datagrams it did not get through its own `FastParser`, so its compiled templates
//! follow its parser's (and a copy fails where its datagram's template sets do).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::SystemTime;

use netflow_parser::variable_versions::ipfix::FlowSetBody as IpfixBody;
use netflow_parser::variable_versions::ipfix::Template as IpfixTemplate;
use netflow_parser::variable_versions::v9::FlowSetBody as V9Body;
use netflow_parser::variable_versions::v9::Template as V9Template;
use netflow_parser::{
    AutoScopedParser, AutoSourceKey, DEFAULT_MAX_DECODED_FIELD_VALUES_PER_MESSAGE,
    DEFAULT_MAX_RECORDS_PER_FLOWSET, DEFAULT_MAX_V9_FRAME_SIZE_BYTES, FieldDataType, FieldValue,
    NetflowPacket, ParseResult, SourceRemoval, SourceRemovalReporterError,
};
use rustc_hash::{FxHashMap, FxHashSet};

use super::decode::{Body, DecodeLimits, Message, new_parser};
use super::record::{self, FRAME_SECTION, FieldView, RawRecord, ipfix_id};

#[cfg(test)]
mod tests;

/// How netflow_parser types one field of a given length, as far as
/// [`RawRecord::set`] can tell: what [`FieldView`] gives for its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// An unsigned number of 1, 2, 3, 4 or 8 bytes (4: also an IPv4 address).
    Unsigned,
    /// An unsigned number of 16 bytes: saturates to `u64::MAX`.
    Unsigned128,
    /// A signed number of 1, 2, 3, 4 or 8 bytes: none when negative.
    Signed,
    /// A signed number of 16 bytes: none when negative or beyond `u64`.
    Signed128,
    /// A number of another length: its bytes, big-endian, when 1 to 8 of them.
    NumBytes,
    /// Raw bytes (a type of another length, an octet array, an unknown field): a number
    /// when 1 to 8 of them, never a time or an address.
    Bytes,
    Ip4,
    Ip6,
    /// A time in seconds, of 2, 4 or 8 bytes.
    Seconds,
    /// A time in milliseconds, of 2, 4 or 8 bytes.
    Millis,
    /// An NTP timestamp (seconds and fraction), 8 bytes.
    Ntp,
    /// A protocol number, 1 byte.
    Protocol,
    /// TCP flags, 1 or 2 bytes: the low byte.
    TcpFlags,
    /// A value that is none of number, address or time (a string, a MAC address, ...).
    Opaque,
}

/// The [`Read`] of a field of netflow_parser type `t` and length `len`, mirroring
/// `FieldValue::from_field_type`; `None` when netflow_parser would fail to decode it
/// whatever its bytes.
fn classify(t: FieldDataType, len: u16) -> Option<Read> {
    use FieldDataType as T;
    Some(match (t, len) {
        (T::UnsignedDataNumber, 1 | 2 | 3 | 4 | 8) => Read::Unsigned,
        (T::UnsignedDataNumber, 16) => Read::Unsigned128,
        (T::SignedDataNumber, 1 | 2 | 3 | 4 | 8) => Read::Signed,
        (T::SignedDataNumber, 16) => Read::Signed128,
        (T::UnsignedDataNumber | T::SignedDataNumber, _) => Read::NumBytes,
        (T::Ip4Addr, 4) => Read::Ip4,
        (T::Ip6Addr, 16) => Read::Ip6,
        (T::DurationSeconds, 2 | 4 | 8) => Read::Seconds,
        (T::DurationMillis, 2 | 4 | 8) => Read::Millis,
        (T::DurationMicrosNTP | T::DurationNanosNTP, 8) => Read::Ntp,
        (T::ProtocolType, 1) => Read::Protocol,
        (T::TcpControlBits, 1 | 2) => Read::TcpFlags,
        // The application id is a byte and a selector: nothing without the byte.
        (T::ApplicationId, 0) => return None,
        (T::ApplicationId | T::String, _) => Read::Opaque,
        (T::MacAddr, 6)
        | (
            T::ForwardingStatus
            | T::FragmentFlags
            | T::IsMulticast
            | T::MplsLabelExp
            | T::FlowEndReason
            | T::NatEvent
            | T::FirewallEvent
            | T::MplsTopLabelType
            | T::NatOriginatingAddressRealm,
            1,
        )
        | (T::Ipv6ExtensionHeaders | T::Ipv4Options, 4)
        | (T::TcpOptions | T::Float64, 8) => Read::Opaque,
        // Unknown fields are raw bytes with netflow_parser's default features; checked
        // once (see `unknown_is_bytes`).
        (T::Unknown, _) if !unknown_is_bytes() => return None,
        // Octet arrays, unknown fields, and typed fields of an unexpected length.
        (
            T::Vec
            | T::Unknown
            | T::Ip4Addr
            | T::Ip6Addr
            | T::MacAddr
            | T::DurationSeconds
            | T::DurationMillis
            | T::DurationMicrosNTP
            | T::DurationNanosNTP
            | T::ProtocolType
            | T::ForwardingStatus
            | T::FragmentFlags
            | T::TcpControlBits
            | T::Ipv6ExtensionHeaders
            | T::Ipv4Options
            | T::TcpOptions
            | T::IsMulticast
            | T::MplsLabelExp
            | T::FlowEndReason
            | T::NatEvent
            | T::FirewallEvent
            | T::MplsTopLabelType
            | T::NatOriginatingAddressRealm
            | T::Float64,
            _,
        ) => Read::Bytes,
    })
}

/// Whether netflow_parser decodes fields of unknown type as raw bytes (its
/// `parse_unknown_fields` feature) rather than failing on them.
fn unknown_is_bytes() -> bool {
    static BYTES: OnceLock<bool> = OnceLock::new();
    *BYTES.get_or_init(|| {
        matches!(
            FieldValue::from_field_type(&[1, 2], FieldDataType::Unknown, 2),
            Ok((rest, FieldValue::Vec(b))) if rest.is_empty() && b == [1, 2]
        )
    })
}

/// Big-endian unsigned value of up to 8 bytes. Always inlined: called for most fields
/// of every record, it was a call of its own (130 instructions a record).
#[inline(always)]
fn be(b: &[u8]) -> u64 {
    match *b {
        [x] => u64::from(x),
        [x, y] => u64::from(u16::from_be_bytes([x, y])),
        [a, b, c, d] => u64::from(u32::from_be_bytes([a, b, c, d])),
        [a, b, c, d, e, f, g, h] => u64::from_be_bytes([a, b, c, d, e, f, g, h]),
        _ => b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)),
    }
}

/// One field of a record on the wire, read as netflow_parser would have typed it.
#[derive(Clone, Copy)]
struct Wire<'a> {
    b: &'a [u8],
    read: Read,
}

impl FieldView for Wire<'_> {
    // Inlined, with `RawRecord::set`, into the compiled decoder's loop: a call for every
    // field of every record was a sixth of the decoder's instructions.
    #[inline(always)]
    fn num(&self) -> Option<u64> {
        let b = self.b;
        match self.read {
            Read::Unsigned => Some(be(b)),
            Read::NumBytes | Read::Bytes => (1..=8).contains(&b.len()).then(|| be(b)),
            Read::Unsigned128 => {
                let (hi, lo) = b.split_at_checked(8)?;
                Some(if hi.iter().any(|&x| x != 0) {
                    u64::MAX
                } else {
                    be(lo)
                })
            }
            Read::Signed => match b.first() {
                Some(&x) if x & 0x80 == 0 => Some(be(b)),
                _ => None,
            },
            Read::Signed128 => {
                let (hi, lo) = b.split_at_checked(8)?;
                hi.iter().all(|&x| x == 0).then(|| be(lo))
            }
            Read::Seconds | Read::Millis | Read::Ntp => self.time_ms(),
            Read::Protocol => b.first().map(|&x| u64::from(x)),
            Read::TcpFlags => b.last().map(|&x| u64::from(x)),
            Read::Ip4 | Read::Ip6 | Read::Opaque => None,
        }
    }

    #[inline]
    fn addr(&self) -> Option<IpAddr> {
        match (self.read, self.b) {
            (Read::Ip4 | Read::Unsigned, &[a, b, c, d]) => {
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            (Read::Ip6, b) => {
                let o: [u8; 16] = b.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => None,
        }
    }

    // Inlined as `num` is: the times of every record were two calls of their own.
    #[inline(always)]
    fn time_ms(&self) -> Option<u64> {
        const NTP_TO_UNIX: u64 = 2_208_988_800;
        match self.read {
            Read::Unsigned
            | Read::Unsigned128
            | Read::Signed
            | Read::Signed128
            | Read::NumBytes => self.num(),
            Read::Seconds => Some(be(self.b).saturating_mul(1000)),
            Read::Millis => Some(be(self.b)),
            Read::Ntp => {
                let (s, f) = self.b.split_at_checked(4)?;
                Some(be(s).saturating_sub(NTP_TO_UNIX) * 1000 + ((be(f) * 1000) >> 32))
            }
            _ => None,
        }
    }

    fn frame(&self) -> Option<&[u8]> {
        (self.read == Read::Bytes).then_some(self.b)
    }
}

/// A field of a compiled template that [`RawRecord::set`] reads.
#[derive(Clone, Copy, Debug)]
struct Field {
    /// Offset in the record.
    at: usize,
    len: usize,
    /// The id [`RawRecord::set`] knows it by.
    id: u16,
    read: Read,
}

/// A template's definition: (type, length, enterprise number) of every field.
type Definition = Box<[(u16, u16, Option<u32>)]>;

/// A template netflow_parser holds, and its compiled form unless it is not compiled.
struct Entry {
    def: Definition,
    compiled: Option<Compiled>,
}

/// A template compiled.
#[derive(Debug)]
struct Compiled {
    /// Record length.
    len: usize,
    /// Fields in a record (netflow_parser's output limit counts them all).
    values: usize,
    fields: Box<[Field]>,
    /// `FastParser::tick` when a compiled datagram last used it (0: not since
    /// netflow_parser last parsed).
    touched: u64,
}

/// One template field as netflow_parser defines it: the id [`RawRecord::set`] knows it
/// by (none for enterprise fields the pipeline does not read), netflow_parser's type,
/// and its length.
struct Def {
    id: Option<u16>,
    ty: FieldDataType,
    len: u16,
}

/// Probe values of each length: a compiled reading must give what netflow_parser's
/// decoded value gives for each of them.
fn probes(len: usize) -> impl Iterator<Item = Vec<u8>> {
    let patterns: [fn(usize, usize) -> u8; 6] = [
        |_, _| 0,
        |_, _| 0xff,
        |i, _| (i as u8).wrapping_add(1),
        |i, _| if i == 0 { 0x80 } else { 0 },
        |i, n| if i + 1 == n { 0x81 } else { 0 },
        // An NTP or seconds time of this century.
        |i, _| [0xe9, 0x3c, 0x5a, 0x12, 0x80, 0, 0, 1][i % 8],
    ];
    patterns
        .into_iter()
        .map(move |p| (0..len).map(|i| p(i, len)).collect())
}

/// Whether the compiled reading of a field gives what netflow_parser's decoding does, on
/// every probe value: netflow_parser decodes it (whatever its bytes), and the number,
/// address, time and bytes [`RawRecord::set`] may read agree.
fn agrees(ty: FieldDataType, len: u16, read: Option<Read>) -> bool {
    probes(usize::from(len)).all(|b| {
        let Ok((rest, v)) = FieldValue::from_field_type(&b, ty, len) else {
            return false;
        };
        if !rest.is_empty() {
            return false;
        }
        let Some(read) = read else { return true };
        let (slow, fast) = (&v, Wire { b: &b, read });
        slow.num() == fast.num()
            && slow.addr() == fast.addr()
            && slow.time_ms() == fast.time_ms()
            && slow.frame() == fast.frame()
    })
}

/// Compiles a template's fields (`None`: the template stays with netflow_parser).
fn compile(fields: impl Iterator<Item = Def>) -> Option<Compiled> {
    let mut at = 0usize;
    let mut values = 0usize;
    let mut out = Vec::new();
    for f in fields {
        let len = usize::from(f.len);
        // Variable length (IPFIX): records of differing lengths.
        if f.len == u16::MAX {
            return None;
        }
        let read = classify(f.ty, f.len)?;
        match f.id {
            Some(FRAME_SECTION) => return None,
            Some(id) if record::used(id) => {
                if !agrees(f.ty, f.len, Some(read)) {
                    return None;
                }
                out.push(Field { at, len, id, read });
            }
            _ => {
                if !agrees(f.ty, f.len, None) {
                    return None;
                }
            }
        }
        at += len;
        values += 1;
    }
    // A record must fit a datagram (netflow_parser decodes none otherwise).
    if at == 0 || at > usize::from(u16::MAX) {
        return None;
    }
    Some(Compiled {
        len: at,
        values,
        fields: out.into_boxed_slice(),
        touched: 0,
    })
}

fn v9_def(t: &V9Template) -> Definition {
    t.fields
        .iter()
        .map(|f| (f.field_type_number, f.field_length, None))
        .collect()
}

fn ipfix_def(t: &IpfixTemplate) -> Definition {
    t.fields
        .iter()
        .map(|f| (f.field_type_number, f.field_length, f.enterprise_number))
        .collect()
}

fn compile_v9(t: &V9Template) -> Option<Compiled> {
    compile(t.fields.iter().map(|f| Def {
        id: Some(u16::from(f.field_type)),
        ty: FieldDataType::from(f.field_type),
        len: f.field_length,
    }))
}

fn compile_ipfix(t: &IpfixTemplate) -> Option<Compiled> {
    compile(t.fields.iter().map(|f| Def {
        id: ipfix_id(&f.field_type),
        // netflow_parser's parsers carry an empty enterprise registry: the type is the
        // one the field's element gives.
        ty: FieldDataType::from(f.field_type),
        len: f.field_length,
    }))
}

/// A template scope of netflow_parser's `AutoScopedParser`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Scope {
    addr: SocketAddr,
    ipfix: bool,
    /// v9 source id or IPFIX observation domain.
    domain: u32,
}

impl Scope {
    /// The scope netflow_parser parses a datagram from `from` in (none for v5, unknown
    /// versions and datagrams too short for their header).
    fn of(from: SocketAddr, data: &[u8]) -> Option<Self> {
        let be32 = |at: usize| Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?));
        match be16(data, 0)? {
            9 if data.len() >= 20 => Some(Self {
                addr: from,
                ipfix: false,
                domain: be32(16)?,
            }),
            10 if data.len() >= 16 => Some(Self {
                addr: from,
                ipfix: true,
                domain: be32(12)?,
            }),
            _ => None,
        }
    }

    fn of_source(key: &AutoSourceKey) -> Option<Self> {
        match key {
            AutoSourceKey::V9(k) => Some(Self {
                addr: k.addr,
                ipfix: false,
                domain: k.source_id,
            }),
            AutoSourceKey::Ipfix(k) => Some(Self {
                addr: k.addr,
                ipfix: true,
                domain: k.observation_domain_id,
            }),
            _ => None,
        }
    }
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

/// The compiled templates of one scope.
#[derive(Default)]
struct ScopeCache {
    templates: FxHashMap<u16, Entry>,
    /// Every template id netflow_parser may hold as a data template of this scope (a
    /// superset): while there are at most `max_templates`, it evicted none.
    known: FxHashSet<u16>,
    /// Compiling stopped: netflow_parser may hold templates this cache does not know of.
    stopped: bool,
    /// `FastParser::tick` when a compiled datagram last used the scope (0: not since
    /// netflow_parser last parsed).
    touched: u64,
}

impl ScopeCache {
    fn stop(&mut self) {
        self.stopped = true;
        self.templates.clear();
        self.known.clear();
    }
}

/// netflow_parser's `AutoScopedParser` with a decoder compiled from each template it
/// learns in front of it (see the module's documentation).
pub struct FastParser {
    parser: AutoScopedParser,
    /// Whether compiled templates decode (off: every datagram goes to netflow_parser).
    fast: bool,
    max_templates: usize,
    scopes: FxHashMap<Scope, ScopeCache>,
    /// Counts uses of compiled templates, to touch them again in order.
    tick: u64,
    /// Scopes used by compiled datagrams since netflow_parser last parsed.
    dirty: Vec<Scope>,
    /// Sources netflow_parser dropped during a parse.
    removed: Vec<AutoSourceKey>,
    /// The datagram that touches a scope's templates again.
    touch: Vec<u8>,
    touch_ids: Vec<(u64, u16)>,
}

impl FastParser {
    /// A parser of every exporter within `limits` ([`new_parser`]); `fast` decodes data
    /// sets of compiled templates directly.
    pub fn new(limits: &DecodeLimits, fast: bool) -> Self {
        Self {
            parser: new_parser(limits),
            fast,
            max_templates: limits.max_templates,
            scopes: FxHashMap::default(),
            tick: 0,
            dirty: Vec::new(),
            removed: Vec::new(),
            touch: Vec::new(),
            touch_ids: Vec::new(),
        }
    }

    /// netflow_parser's parser (for its counters).
    pub fn parser(&self) -> &AutoScopedParser {
        &self.parser
    }

    /// Template scopes kept (each one of a source netflow_parser keeps).
    pub fn compiled_scopes(&self) -> usize {
        self.scopes.len()
    }

    /// What the datagram from `from`, received at `received`, says: decoded by its
    /// compiled templates when it is made only of their data sets, else by
    /// netflow_parser.
    pub fn parse(&mut self, from: SocketAddr, data: &[u8], received: SystemTime) -> Message {
        if self.fast
            && let Some(m) = self.compiled(from, data, received)
        {
            return m;
        }
        self.touch_used();
        let result = self.parse_slow(from, data);
        if self.fast {
            self.learn(from, data, &result);
        }
        Message::from_parse(from, result, received)
    }

    /// netflow_parser's parse, dropping the scopes of the sources it drops.
    fn parse_slow(&mut self, from: SocketAddr, data: &[u8]) -> ParseResult {
        let removed = &mut self.removed;
        let mut reporter =
            |r: &SourceRemoval<AutoSourceKey>| -> Result<(), SourceRemovalReporterError> {
                removed.push(r.source);
                Ok(())
            };
        let result = self
            .parser
            .parse_from_source_with_reporter(from, data, &mut reporter);
        for key in self.removed.drain(..) {
            if let Some(scope) = Scope::of_source(&key) {
                self.scopes.remove(&scope);
            }
        }
        result
    }

    /// The datagram decoded by compiled templates, or `None` (nothing changed) when it
    /// is not only well-formed data sets of compiled templates.
    fn compiled(&mut self, from: SocketAddr, data: &[u8], received: SystemTime) -> Option<Message> {
        let scope = Scope::of(from, data)?;
        let sc = self.scopes.get_mut(&scope)?;
        let (header, end) = if scope.ipfix {
            // One message, exactly the datagram: no trailing data.
            (16, usize::from(be16(data, 2)?))
        } else {
            (20, data.len())
        };
        if end != data.len() || end > DEFAULT_MAX_V9_FRAME_SIZE_BYTES {
            return None;
        }
        // First every set's shape, so that nothing is produced for a datagram that goes
        // to netflow_parser after all.
        let (mut at, mut sets, mut values, mut records) = (header, 0usize, 0usize, 0usize);
        while at < end {
            let (id, len) = (be16(data, at)?, usize::from(be16(data, at + 2)?));
            if id < 256 || len < 4 || at + len > end {
                return None;
            }
            let t = sc.templates.get(&id)?.compiled.as_ref()?;
            let n = (len - 4) / t.len;
            if n > DEFAULT_MAX_RECORDS_PER_FLOWSET {
                return None;
            }
            values += n * t.values;
            records += n;
            at += len;
            sets += 1;
        }
        if sets == 0 || values > DEFAULT_MAX_DECODED_FIELD_VALUES_PER_MESSAGE {
            return None;
        }

        let be32 = |at: usize| -> u32 {
            data.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_be_bytes)
        };
        let mut b = if scope.ipfix {
            Body::new(10, be32(12), be32(8), u64::from(be32(4)) * 1000, None)
        } else {
            let mut b = Body::new(
                9,
                be32(16),
                be32(12),
                u64::from(be32(8)) * 1000,
                Some(be32(4)),
            );
            b.units = 1;
            b
        };
        b.reserve(records);
        let ctx = b.ctx(from, received);
        let mut at = header;
        while at < end {
            let (id, len) = (be16(data, at)?, usize::from(be16(data, at + 2)?));
            let set = data.get(at + 4..at + len)?;
            at += len;
            let t = sc.templates.get_mut(&id)?.compiled.as_mut()?;
            self.tick += 1;
            t.touched = self.tick;
            let records = set.len() / t.len;
            if records == 0 {
                if len > 7 {
                    b.errors.push("undecoded_set");
                }
                continue;
            }
            if scope.ipfix {
                b.units += records as u32;
            }
            for rec in set.chunks_exact(t.len) {
                let mut r = RawRecord::default();
                for f in &t.fields {
                    if let Some(v) = rec.get(f.at..f.at + f.len) {
                        r.set(f.id, Wire { b: v, read: f.read });
                    }
                }
                b.push_record(&ctx, &r);
            }
        }
        if sc.touched == 0 {
            self.dirty.push(scope);
        }
        sc.touched = self.tick;
        Some(Message::compiled(b))
    }

    /// Moves the sources and templates compiled datagrams used since netflow_parser last
    /// parsed to the front of its LRU caches, in the order they were last used: what
    /// parsing those datagrams would have done.
    fn touch_used(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_by_key(|s| self.scopes.get(s).map_or(0, |c| c.touched));
        for scope in dirty.drain(..) {
            let Some(sc) = self.scopes.get_mut(&scope) else {
                continue;
            };
            sc.touched = 0;
            self.touch_ids.clear();
            for (id, t) in sc.templates.iter_mut() {
                if let Some(t) = t.compiled.as_mut()
                    && t.touched > 0
                {
                    self.touch_ids.push((t.touched, *id));
                    t.touched = 0;
                }
            }
            if self.touch_ids.is_empty() {
                continue;
            }
            self.touch_ids.sort_unstable();
            let d = &mut self.touch;
            d.clear();
            if scope.ipfix {
                let len = 16 + 4 * self.touch_ids.len();
                d.extend_from_slice(&10u16.to_be_bytes());
                d.extend_from_slice(&(len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
                d.extend_from_slice(&[0; 8]);
            } else {
                d.extend_from_slice(&9u16.to_be_bytes());
                d.extend_from_slice(&(self.touch_ids.len() as u16).to_be_bytes());
                d.extend_from_slice(&[0; 12]);
            }
            d.extend_from_slice(&scope.domain.to_be_bytes());
            for &(_, id) in &self.touch_ids {
                d.extend_from_slice(&id.to_be_bytes());
                d.extend_from_slice(&4u16.to_be_bytes());
            }
            let touch = std::mem::take(&mut self.touch);
            let result = self.parse_slow(scope.addr, &touch);
            self.touch = touch;
            debug_assert!(
                result.error.is_none() && !has_no_template(&result),
                "a compiled template netflow_parser does not hold: {:?}",
                result.error
            );
        }
        self.dirty = dirty;
    }

    /// Learns from netflow_parser's parse of a datagram of `from` the templates it
    /// defined, redefined, replaced or withdrew.
    fn learn(&mut self, from: SocketAddr, data: &[u8], result: &ParseResult) {
        let Some(scope) = Scope::of(from, data) else {
            return;
        };
        let max = self.max_templates;
        // Templates are defined in the result's order (the sets'); a trailing message
        // is parsed by the same scope's parser.
        for p in &result.packets {
            match (p, scope.ipfix) {
                (NetflowPacket::V9(v9), false) => {
                    for fs in &v9.flowsets {
                        match &fs.body {
                            V9Body::Template(t) => {
                                for t in &t.templates {
                                    self.define(scope, t.template_id, max, v9_def(t), || {
                                        compile_v9(t)
                                    });
                                }
                            }
                            V9Body::OptionsTemplate(t) => {
                                for t in &t.templates {
                                    self.replace(scope, t.template_id);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                (NetflowPacket::IPFix(ipfix), true) => {
                    for fs in &ipfix.flowsets {
                        match &fs.body {
                            IpfixBody::Template(t) => {
                                self.define(scope, t.template_id, max, ipfix_def(t), || {
                                    compile_ipfix(t)
                                });
                            }
                            IpfixBody::Templates(ts) => {
                                for t in ts {
                                    self.define(scope, t.template_id, max, ipfix_def(t), || {
                                        compile_ipfix(t)
                                    });
                                }
                            }
                            IpfixBody::OptionsTemplate(t) => self.replace(scope, t.template_id),
                            IpfixBody::OptionsTemplates(ts) => {
                                ts.iter().for_each(|t| self.replace(scope, t.template_id))
                            }
                            IpfixBody::V9Template(t) => self.replace(scope, t.template_id),
                            IpfixBody::V9Templates(ts) => {
                                ts.iter().for_each(|t| self.replace(scope, t.template_id))
                            }
                            IpfixBody::V9OptionsTemplate(t) => self.replace(scope, t.template_id),
                            IpfixBody::V9OptionsTemplates(ts) => {
                                ts.iter().for_each(|t| self.replace(scope, t.template_id))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // Then what the result does not show, from the datagram's template records in
        // their order: IPFIX withdrawals; and when the parse failed, every template it
        // may have taken before failing. A template whose definition is the one compiled
        // is that one whether it was taken again or not; any other is dropped, and
        // counted as one netflow_parser may hold (which only makes it slower).
        let failed = result.error.is_some();
        let sc = self.scopes.entry(scope).or_default();
        let walked = for_each_set(data, scope.ipfix, |set, body| {
            for r in template_records(set, body, scope.ipfix) {
                match r {
                    Record::Withdrawal(2) => sc.templates.clear(),
                    Record::Withdrawal(id) => {
                        sc.templates.remove(&id);
                    }
                    Record::Data(id, def)
                        if failed && sc.templates.get(&id).is_none_or(|e| e.def != def) =>
                    {
                        sc.templates.remove(&id);
                        sc.known.insert(id);
                    }
                    Record::Other(id) if failed => {
                        sc.templates.remove(&id);
                    }
                    _ => {}
                }
            }
        });
        if !walked || sc.known.len() > max {
            sc.stop();
        }
        if !sc.stopped && sc.known.is_empty() {
            self.scopes.remove(&scope);
        }
    }

    /// A (re)definition of data template `id` in `scope`.
    fn define(
        &mut self,
        scope: Scope,
        id: u16,
        max: usize,
        def: Definition,
        compile: impl FnOnce() -> Option<Compiled>,
    ) {
        let sc = self.scopes.entry(scope).or_default();
        if sc.stopped {
            return;
        }
        sc.known.insert(id);
        if sc.known.len() > max {
            // netflow_parser evicted a template, which one is not known.
            sc.stop();
            return;
        }
        // A refresh keeps what was compiled (or not).
        if sc.templates.get(&id).is_some_and(|e| e.def == def) {
            return;
        }
        // Data sets with a reserved id are not data.
        let compiled = if id >= 256 { compile() } else { None };
        sc.templates.insert(id, Entry { def, compiled });
    }

    /// Template `id` of `scope` redefined as one that is not compiled (an options
    /// template, a v9-format one inside IPFIX): netflow_parser drops the data template.
    fn replace(&mut self, scope: Scope, id: u16) {
        if let Some(sc) = self.scopes.get_mut(&scope) {
            sc.templates.remove(&id);
            sc.known.remove(&id);
        }
    }
}

fn has_no_template(result: &ParseResult) -> bool {
    result.packets.iter().any(|p| match p {
        NetflowPacket::V9(v9) => v9
            .flowsets
            .iter()
            .any(|f| matches!(f.body, V9Body::NoTemplate(_))),
        NetflowPacket::IPFix(ipfix) => ipfix
            .flowsets
            .iter()
            .any(|f| matches!(f.body, IpfixBody::NoTemplate(_))),
        _ => false,
    })
}

/// Calls `f(set id, body)` for every set of a datagram that netflow_parser reaches: v9
/// sets until one is malformed; the sets of every IPFIX message (a trailing one is
/// parsed too) until one is malformed. Returns false when a trailing message of another
/// NetFlow version was not followed.
fn for_each_set(data: &[u8], ipfix: bool, mut f: impl FnMut(u16, &[u8])) -> bool {
    let mut sets = |from: usize, end: usize| {
        let mut at = from;
        while let (Some(id), Some(len)) = (be16(data, at), be16(data, at + 2)) {
            let len = usize::from(len);
            if len < 4 || at + len > end {
                return;
            }
            if let Some(body) = data.get(at + 4..at + len) {
                f(id, body);
            }
            at += len;
        }
    };
    if !ipfix {
        sets(20, data.len());
        return true;
    }
    let mut msg = 0;
    loop {
        match be16(data, msg) {
            Some(10) => {}
            Some(5 | 7 | 9) => return false,
            _ => return true,
        }
        match be16(data, msg + 2).map(usize::from) {
            Some(len) if len >= 16 && msg + len <= data.len() => {
                sets(msg + 16, msg + len);
                msg += len;
            }
            _ => return true,
        }
    }
}

/// A template record of a template set, as netflow_parser reads it.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    /// A data template of the scope's version (the kind compiled): id, definition.
    Data(u16, Definition),
    /// An IPFIX withdrawal of a data template (2: of all) that netflow_parser applies
    /// (not one whose set also defines the id).
    Withdrawal(u16),
    /// A template of another kind that replaces a data template of its id (an options
    /// template, a v9-format template inside IPFIX).
    Other(u16),
}

/// The template records of a set of template set id `set` (none for other sets), read
/// as netflow_parser reads them: one after another until one is cut short.
fn template_records(set: u16, body: &[u8], ipfix: bool) -> Vec<Record> {
    // (id, field count, definition) of each record; IPFIX fields may carry an
    // enterprise number, options templates a scope field count (IPFIX) or their scope
    // and option lengths (v9).
    let mut records: Vec<(u16, u16, Definition)> = Vec::new();
    let (ipfix_fields, options) = match (ipfix, set) {
        (false, 0) | (true, 0) => (false, false),
        (false, 1) | (true, 1) => (false, true),
        (true, 2) => (true, false),
        (true, 3) => (true, true),
        _ => return Vec::new(),
    };
    let mut at = 0;
    'records: while let (Some(id), Some(n)) = (be16(body, at), be16(body, at + 2)) {
        let mut p = at + 4;
        let count = match (ipfix_fields, options) {
            (false, false) | (true, false) => usize::from(n),
            (true, true) => {
                if be16(body, p).is_none() {
                    break;
                }
                p += 2;
                usize::from(n)
            }
            (false, true) => {
                // Scope and option lengths in bytes, 4 a field.
                let Some(options_len) = be16(body, p) else {
                    break;
                };
                p += 2;
                usize::from(n / 4) + usize::from(options_len / 4)
            }
        };
        let mut def = Vec::new();
        for _ in 0..count {
            let (Some(ty), Some(len)) = (be16(body, p), be16(body, p + 2)) else {
                break 'records;
            };
            p += 4;
            let pen = if ipfix_fields && ty & 0x8000 != 0 {
                let Some(pen) = body.get(p..p + 4) else {
                    break 'records;
                };
                p += 4;
                Some(u32::from_be_bytes([pen[0], pen[1], pen[2], pen[3]]))
            } else {
                None
            };
            let ty = if ipfix_fields { ty & 0x7fff } else { ty };
            def.push((ty, len, pen));
        }
        records.push((id, n, def.into_boxed_slice()));
        at = p;
    }
    let data = (!ipfix && set == 0) || (ipfix && set == 2);
    records
        .iter()
        .filter_map(|(id, n, def)| match (data, *n) {
            // An IPFIX withdrawal, unless the set defines the id again (then netflow_parser
            // takes the new definition only; all-templates ids always apply).
            (true, 0) if ipfix => {
                let redefined =
                    *id != 2 && *id != 3 && records.iter().any(|(o, m, _)| o == id && *m > 0);
                (!redefined).then_some(Record::Withdrawal(*id))
            }
            (true, _) => Some(Record::Data(*id, def.clone())),
            // Withdrawing options templates leaves data templates alone.
            (false, 0) if ipfix && set == 3 => None,
            (false, _) => Some(Record::Other(*id)),
        })
        .collect()
}
