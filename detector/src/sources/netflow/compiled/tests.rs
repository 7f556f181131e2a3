//! The compiled path held equal to netflow_parser: field by field (every type at every
//! length), and datagram by datagram on fuzzed templates, records and datagram splits,
//! v9 and IPFIX, under tight limits too, with the path each datagram took checked
//! against what it should have taken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use netflow_parser::variable_versions::field_value::{DataNumber, DurationValue};
use proptest::prelude::*;
use proptest::sample::{Index, select};

use super::*;
use crate::sources::netflow::decode::{Decoder, ExporterStats, template_sets};

// ---- field readings ----

const TYPES: [FieldDataType; 28] = {
    use FieldDataType as T;
    [
        T::ApplicationId,
        T::String,
        T::SignedDataNumber,
        T::UnsignedDataNumber,
        T::Float64,
        T::DurationSeconds,
        T::DurationMillis,
        T::DurationMicrosNTP,
        T::DurationNanosNTP,
        T::Ip4Addr,
        T::Ip6Addr,
        T::MacAddr,
        T::Vec,
        T::ProtocolType,
        T::ForwardingStatus,
        T::FragmentFlags,
        T::TcpControlBits,
        T::Ipv6ExtensionHeaders,
        T::Ipv4Options,
        T::TcpOptions,
        T::IsMulticast,
        T::MplsLabelExp,
        T::FlowEndReason,
        T::NatEvent,
        T::FirewallEvent,
        T::MplsTopLabelType,
        T::NatOriginatingAddressRealm,
        T::Unknown,
    ]
};

/// A small deterministic generator for byte patterns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every netflow_parser type at every length up to 20 (and a few longer): where a
/// compiled reading exists, it gives for the field's bytes the number, address, time
/// and bytes netflow_parser's decoded value gives, on a thousand values each (random,
/// small, negative, zero, all ones); where none exists, netflow_parser fails too.
#[test]
fn compiled_readings_equal_netflow_parsers_values() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut compared = 0;
    for t in TYPES {
        for len in (0u16..=20).chain([24, 32, 255, 256, 300]) {
            let read = classify(t, len);
            for k in 0..if len > 32 { 50 } else { 1000 } {
                let n = usize::from(len);
                let b: Vec<u8> = (0..n)
                    .map(|i| {
                        let r = rng.next() as u8;
                        match k % 5 {
                            0 => r,
                            // Small positive numbers.
                            1 if i + 2 < n => 0,
                            2 => 0,
                            3 => 0xff,
                            // Seconds or NTP times of this century.
                            4 if i % 8 == 0 => 0xe0 | (r & 0x0f),
                            _ => r,
                        }
                    })
                    .collect();
                let parsed = FieldValue::from_field_type(&b, t, len);
                let Some(read) = read else {
                    assert!(parsed.is_err(), "{t:?}/{len}: netflow_parser decodes {b:?}");
                    continue;
                };
                let (rest, v) = parsed.unwrap_or_else(|e| panic!("{t:?}/{len} {b:?}: {e}"));
                assert!(rest.is_empty(), "{t:?}/{len}");
                let (slow, fast) = (&v, Wire { b: &b, read });
                assert_eq!(slow.num(), fast.num(), "{t:?}/{len} {b:?}: number");
                assert_eq!(slow.addr(), fast.addr(), "{t:?}/{len} {b:?}: address");
                assert_eq!(slow.time_ms(), fast.time_ms(), "{t:?}/{len} {b:?}: time");
                assert_eq!(slow.frame(), fast.frame(), "{t:?}/{len} {b:?}: bytes");
                compared += 1;
            }
        }
    }
    assert!(compared > 500_000, "{compared}");
    // Templates with long fields compile (their probes too).
    let long = compile(
        [(8, 4), (12, 4), (82, 300), (1, 300)]
            .into_iter()
            .map(|(id, len)| Def {
                id: Some(id),
                ty: FieldDataType::from(netflow_parser::V9Field::from(id)),
                len,
            }),
    )
    .expect("compiles");
    assert_eq!(long.len, 608);
}

/// [`record::used`] names exactly the fields [`RawRecord::set`] reads: any other id
/// leaves a record as it was, whatever its value.
#[test]
fn set_reads_exactly_the_used_fields() {
    let values = [
        FieldValue::DataNumber(DataNumber::U32(0x0a00_0001)),
        FieldValue::DataNumber(DataNumber::U8(3)),
        FieldValue::Ip4Addr(Ipv4Addr::new(10, 0, 0, 1)),
        FieldValue::Ip6Addr("2001:db8::1".parse().expect("literal")),
        FieldValue::Duration(DurationValue::Millis { value: 5, width: 8 }),
        FieldValue::Vec(vec![1, 2, 3, 4]),
    ];
    for id in 0..=u16::MAX {
        let changes = values.iter().any(|v| {
            let mut r = RawRecord::default();
            r.set(id, v);
            r != RawRecord::default()
        });
        // A frame too short to hold an Ethernet header says nothing.
        if id != FRAME_SECTION {
            assert_eq!(changes, record::used(id), "field {id}");
        }
    }
}

// ---- datagrams ----

const V9_FROM: &str = "192.0.2.9:2055";

fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// One template field: element id, length, enterprise number (IPFIX).
#[derive(Clone, Copy, Debug)]
struct FieldSpec {
    id: u16,
    len: u16,
    pen: Option<u32>,
}

#[derive(Clone, Debug)]
struct TemplateSpec {
    id: u16,
    fields: Vec<FieldSpec>,
}

impl TemplateSpec {
    /// The fields as encoded for `ipfix` or v9: what each version accepts (v9: no
    /// variable length, no enterprise numbers; IPFIX: no zero length; at least one
    /// byte a record).
    fn fields(&self, ipfix: bool) -> Vec<FieldSpec> {
        let mut out: Vec<FieldSpec> = self
            .fields
            .iter()
            .map(|f| match (ipfix, f.len) {
                (false, 65535) => FieldSpec {
                    len: 5,
                    pen: None,
                    ..*f
                },
                (false, _) => FieldSpec { pen: None, ..*f },
                (true, 0) => FieldSpec { len: 1, ..*f },
                (true, _) => *f,
            })
            .collect();
        if out.iter().all(|f| f.len == 0) {
            out.push(FieldSpec {
                id: 1,
                len: 4,
                pen: None,
            });
        }
        out
    }

    /// Whether the compiled path should take its data: no variable-length field, no
    /// sampled frame, no field netflow_parser cannot decode.
    fn compilable(&self, ipfix: bool) -> bool {
        !self.fields(ipfix).iter().any(|f| {
            f.len == 65535
                || (f.id == FRAME_SECTION && (!ipfix || f.pen.is_none()))
                || (!ipfix && f.id == 95 && f.len == 0)
        })
    }

    fn body(&self, ipfix: bool) -> Vec<u8> {
        let fields = self.fields(ipfix);
        let mut b = Vec::new();
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for f in &fields {
            let enterprise = if f.pen.is_some() { 0x8000 } else { 0 };
            b.extend_from_slice(&(f.id | enterprise).to_be_bytes());
            b.extend_from_slice(&f.len.to_be_bytes());
            if let Some(pen) = f.pen {
                b.extend_from_slice(&pen.to_be_bytes());
            }
        }
        b
    }

    /// One record's bytes from `bytes` (variable-length fields: 3 bytes each).
    fn record(&self, ipfix: bool, bytes: &mut impl Iterator<Item = u8>) -> Vec<u8> {
        let mut r = Vec::new();
        for f in self.fields(ipfix) {
            if f.len == 65535 {
                r.push(3);
                r.extend(bytes.take(3));
            } else {
                r.extend(bytes.take(usize::from(f.len)));
            }
        }
        r
    }
}

fn set(id: u16, body: &[u8], pad: usize) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&id.to_be_bytes());
    s.extend_from_slice(&((4 + body.len() + pad) as u16).to_be_bytes());
    s.extend_from_slice(body);
    s.resize(s.len() + pad, 0);
    s
}

/// A datagram of `sets`: a v9 or IPFIX header (sysUptime `up`, export time `secs`)
/// with its length.
fn datagram(ipfix: bool, domain: u32, seq: u32, up: u32, secs: u32, sets: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    if ipfix {
        d.extend_from_slice(&10u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d.extend_from_slice(&secs.to_be_bytes());
    } else {
        d.extend_from_slice(&9u16.to_be_bytes());
        d.extend_from_slice(&(sets.len() as u16).to_be_bytes());
        d.extend_from_slice(&up.to_be_bytes());
        d.extend_from_slice(&secs.to_be_bytes());
    }
    d.extend_from_slice(&seq.to_be_bytes());
    d.extend_from_slice(&domain.to_be_bytes());
    for s in sets {
        d.extend_from_slice(s);
    }
    if ipfix {
        let len = (d.len() as u16).to_be_bytes();
        d[2..4].copy_from_slice(&len);
    }
    d
}

/// An options template carrying a sampling interval (kind 0), the exporter's init time
/// (kind 1), or both (kind 2), scoped to the system / observation domain.
fn options_template(ipfix: bool, id: u16, kind: u8) -> Vec<u8> {
    let fields: &[(u16, u16)] = match kind % 3 {
        0 => &[(34, 4)],
        1 => &[(160, 8)],
        _ => &[(34, 4), (160, 8)],
    };
    let mut b = Vec::new();
    b.extend_from_slice(&id.to_be_bytes());
    if ipfix {
        b.extend_from_slice(&(fields.len() as u16 + 1).to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&149u16.to_be_bytes());
        b.extend_from_slice(&4u16.to_be_bytes());
    } else {
        b.extend_from_slice(&4u16.to_be_bytes());
        b.extend_from_slice(&(4 * fields.len() as u16).to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&4u16.to_be_bytes());
    }
    for (ty, len) in fields {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }
    set(if ipfix { 3 } else { 1 }, &b, 0)
}

fn options_record(kind: u8, interval: u32) -> Vec<u8> {
    let mut r = 7u32.to_be_bytes().to_vec();
    let (interval_field, init_field) = match kind % 3 {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    if interval_field {
        r.extend_from_slice(&interval.to_be_bytes());
    }
    if init_field {
        r.extend_from_slice(&1_699_990_000_000u64.to_be_bytes());
    }
    r
}

/// The fast and the reference decoder, fed the same datagrams.
struct Pair {
    fast: Decoder,
    slow: Decoder,
    records: usize,
}

impl Pair {
    fn new(limits: DecodeLimits) -> Self {
        Self {
            fast: Decoder::with_fast_path(limits.clone(), vec![], true),
            slow: Decoder::with_fast_path(limits, vec![], false),
            records: 0,
        }
    }

    /// Decodes `d` with both, asserts the same records, and says whether the compiled
    /// path took it.
    fn decode(&mut self, from: SocketAddr, d: &[u8]) -> Result<bool, TestCaseError> {
        let fast_before = self.fast_datagrams();
        let (mut got, mut want) = (Vec::new(), Vec::new());
        self.fast.decode(from, d, at(), &mut got);
        self.slow.decode(from, d, at(), &mut want);
        prop_assert_eq!(&got, &want, "records of {:?}", d);
        self.records += got.len();
        Ok(self.fast_datagrams() > fast_before)
    }

    fn fast_datagrams(&self) -> u64 {
        self.fast
            .exporters()
            .values()
            .map(|s| s.fast_datagrams)
            .sum()
    }

    /// The counters of both, but the paths' own.
    fn same_counters(&self) -> Result<(), TestCaseError> {
        let strip = |d: &Decoder| -> BTreeMap<IpAddr, ExporterStats> {
            d.exporters()
                .iter()
                .map(|(ip, s)| {
                    let mut s = s.clone();
                    s.fast_datagrams = 0;
                    s.fast_records = 0;
                    s.slow_records = 0;
                    (*ip, s)
                })
                .collect()
        };
        prop_assert_eq!(strip(&self.fast), strip(&self.slow));
        prop_assert_eq!(&self.fast.global, &self.slow.global);
        prop_assert_eq!(self.fast.pending(), self.slow.pending());
        prop_assert_eq!(self.fast.table_sizes(), self.slow.table_sizes());
        prop_assert!(self.fast.compiled_scopes() <= self.fast.table_sizes().4);
        for s in self.fast.exporters().values() {
            prop_assert_eq!(s.fast_records + s.slow_records, s.records);
        }
        Ok(())
    }
}

/// A v9 template of 30-byte IPv4 records with sysUptime times and a data datagram of
/// `n` of its records.
fn v9_template_and_data(n: usize) -> (Vec<u8>, Vec<u8>) {
    let t = TemplateSpec {
        id: 256,
        fields: [
            (8, 4),
            (12, 4),
            (7, 2),
            (11, 2),
            (4, 1),
            (6, 1),
            (2, 4),
            (1, 4),
            (22, 4),
            (21, 4),
        ]
        .iter()
        .map(|&(id, len)| FieldSpec { id, len, pen: None })
        .collect(),
    };
    let template = datagram(
        false,
        0,
        1,
        100_000,
        1_700_000_000,
        &[set(0, &t.body(false), 0)],
    );
    let mut bytes = (0..).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 7) as u8);
    let records: Vec<u8> = (0..n).flat_map(|_| t.record(false, &mut bytes)).collect();
    let data = datagram(
        false,
        0,
        2,
        100_500,
        1_700_000_000,
        &[set(256, &records, 2)],
    );
    (template, data)
}

#[test]
fn a_v9_datagram_of_30_records_takes_the_compiled_path() -> Result<(), TestCaseError> {
    let from: SocketAddr = V9_FROM.parse().expect("literal");
    let (template, data) = v9_template_and_data(30);
    let mut p = Pair::new(DecodeLimits::default());
    prop_assert!(!p.decode(from, &template)?);
    for _ in 0..3 {
        prop_assert!(p.decode(from, &data)?);
    }
    p.same_counters()?;
    let s = &p.fast.exporters()[&from.ip()];
    prop_assert_eq!(
        (s.fast_datagrams, s.fast_records, s.slow_records),
        (3, 90, 0)
    );
    Ok(())
}

/// With room for two templates, a template the compiled path kept using stays while
/// the one not used since is evicted by a third: netflow_parser's LRU order is that of
/// the datagrams, whichever path decoded them.
#[test]
fn template_evictions_follow_every_datagram() -> Result<(), TestCaseError> {
    let from: SocketAddr = "192.0.2.10:2055".parse().expect("literal");
    let limits = DecodeLimits {
        max_templates: 2,
        ..DecodeLimits::default()
    };
    let t = |id| TemplateSpec {
        id,
        fields: vec![
            FieldSpec {
                id: 8,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 12,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 1,
                len: 4,
                pen: None,
            },
        ],
    };
    let define = |id| {
        datagram(
            true,
            0,
            0,
            0,
            1_700_000_000,
            &[set(2, &t(id).body(true), 0)],
        )
    };
    let data = |id: u16| {
        let r: Vec<u8> = [10, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, id as u8].to_vec();
        datagram(true, 0, 0, 0, 1_700_000_000, &[set(id, &r, 0)])
    };
    let mut p = Pair::new(limits);
    for d in [define(256), define(257)] {
        p.decode(from, &d)?;
    }
    // 256 defined first, but used since: 257 is the least recently used.
    prop_assert!(p.decode(from, &data(256))?);
    p.decode(from, &define(258))?;
    let before = p.records;
    p.decode(from, &data(256))?;
    p.decode(from, &data(257))?;
    prop_assert_eq!(p.records - before, 1, "257 evicted, 256 kept");
    p.same_counters()?;
    Ok(())
}

/// A datagram netflow_parser fails on after taking a template from it (it returns
/// nothing) counts that template as one netflow_parser may hold: here it pushes a
/// compiled one out of netflow_parser's cache (two templates fit), and the compiled
/// path, unable to tell which, leaves the exporter to netflow_parser.
#[test]
fn templates_a_failed_parse_may_have_taken_count() -> Result<(), TestCaseError> {
    let from: SocketAddr = V9_FROM.parse().expect("literal");
    let limits = DecodeLimits {
        max_templates: 2,
        ..DecodeLimits::default()
    };
    let t = |id| TemplateSpec {
        id,
        fields: vec![
            FieldSpec {
                id: 8,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 12,
                len: 4,
                pen: None,
            },
        ],
    };
    let define = |id| {
        datagram(
            false,
            0,
            0,
            0,
            1_700_000_000,
            &[set(0, &t(id).body(false), 0)],
        )
    };
    // A byte after the template set: no set header fits, the whole datagram fails.
    let failing = |id| {
        let mut d = define(id);
        d.push(0);
        d
    };
    let data = |id: u16| {
        let r = [10, 0, 0, 1, 10, 0, 0, 2];
        datagram(false, 0, 0, 0, 1_700_000_000, &[set(id, &r, 0)])
    };
    let mut p = Pair::new(limits);
    p.decode(from, &failing(256))?;
    p.decode(from, &define(257))?;
    // Decoded by netflow_parser: 256 is more recently used than 257.
    p.decode(from, &data(256))?;
    // 258 evicts 257, the least recently used.
    p.decode(from, &define(258))?;
    prop_assert_eq!(p.records, 1);
    prop_assert!(!p.decode(from, &data(257))?);
    prop_assert_eq!(p.records, 1, "257 is gone");
    p.same_counters()?;
    Ok(())
}

/// A failed parse leaves compiled a template whose definition it repeats (it is that
/// one whether netflow_parser took it again or not), and drops one it redefines.
#[test]
fn a_failed_parse_drops_only_templates_it_may_have_changed() -> Result<(), TestCaseError> {
    let from: SocketAddr = V9_FROM.parse().expect("literal");
    let t = |id, len| TemplateSpec {
        id,
        fields: vec![
            FieldSpec {
                id: 8,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 12,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 1,
                len,
                pen: None,
            },
        ],
    };
    let dg = |sets: &[Vec<u8>]| datagram(false, 0, 0, 0, 1_700_000_000, sets);
    // A set header too short to be one after the template: the datagram fails.
    let failing = |t: &TemplateSpec| {
        let mut d = dg(&[set(0, &t.body(false), 0)]);
        d.extend_from_slice(&[1, 0, 0, 2]);
        d
    };
    let data = dg(&[set(256, &[10, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 9], 0)]);
    let mut p = Pair::new(DecodeLimits::default());
    p.decode(from, &dg(&[set(0, &t(256, 4).body(false), 0)]))?;
    prop_assert!(p.decode(from, &data)?);
    p.decode(from, &failing(&t(256, 4)))?;
    prop_assert!(p.decode(from, &data)?, "the same definition stays compiled");
    p.decode(from, &failing(&t(256, 2)))?;
    prop_assert!(!p.decode(from, &data)?, "another definition is not known");
    p.same_counters()?;
    Ok(())
}

/// A parser that only saw the template sets of a datagram another thread parsed (the
/// listener's copies) decodes the data that follows by the compiled path.
#[test]
fn template_copies_teach_another_parser() {
    let from: SocketAddr = V9_FROM.parse().expect("literal");
    let (template, data) = v9_template_and_data(5);
    let mut with_data = template.clone();
    with_data.extend_from_slice(&data[20..]);
    let copy = template_sets(&with_data).expect("template sets");
    let mut other = FastParser::new(&DecodeLimits::default(), true);
    assert!(!other.parse(from, &copy, at()).is_fast());
    assert!(other.parse(from, &data, at()).is_fast());
    assert_eq!(other.compiled_scopes(), 1);
}

/// An IPFIX template withdrawn (RFC 7011 8.1) is no longer compiled: its data waits
/// for a new definition, as netflow_parser has it.
#[test]
fn withdrawn_templates_are_not_decoded() -> Result<(), TestCaseError> {
    let from: SocketAddr = "192.0.2.11:4739".parse().expect("literal");
    let t = TemplateSpec {
        id: 300,
        fields: vec![
            FieldSpec {
                id: 8,
                len: 4,
                pen: None,
            },
            FieldSpec {
                id: 12,
                len: 4,
                pen: None,
            },
        ],
    };
    let dg = |sets: &[Vec<u8>]| datagram(true, 5, 0, 0, 1_700_000_000, sets);
    let data = dg(&[set(300, &[10, 0, 0, 1, 10, 0, 0, 2], 0)]);
    let withdraw = |id: u16| dg(&[set(2, &[(id >> 8) as u8, id as u8, 0, 0], 0)]);
    let mut p = Pair::new(DecodeLimits::default());
    p.decode(from, &dg(&[set(2, &t.body(true), 0)]))?;
    prop_assert!(p.decode(from, &data)?);
    p.decode(from, &withdraw(300))?;
    prop_assert!(!p.decode(from, &data)?);
    p.decode(from, &dg(&[set(2, &t.body(true), 0)]))?;
    prop_assert!(p.decode(from, &data)?);
    p.decode(from, &withdraw(2))?;
    prop_assert!(!p.decode(from, &data)?);
    p.same_counters()?;
    Ok(())
}

// ---- fuzzed templates, records and datagram splits ----

/// Fields the pipeline reads, with lengths exporters use and odd ones (3-byte counters,
/// 1-byte ports, reduced-size encoding, addresses of the wrong size).
const USED_FIELDS: &[(u16, &[u16])] = &[
    (1, &[4, 8, 1, 2, 3, 5, 16]),
    (2, &[4, 8, 2, 3]),
    (4, &[1, 2]),
    (5, &[1]),
    (6, &[1, 2]),
    (7, &[2, 1, 4]),
    (11, &[2, 3]),
    (8, &[4, 16]),
    (12, &[4]),
    (27, &[16, 4]),
    (28, &[16]),
    (10, &[2, 4]),
    (14, &[4, 2]),
    (21, &[4, 8]),
    (22, &[4, 8, 2]),
    (150, &[4, 8]),
    (151, &[4]),
    (152, &[8, 4]),
    (153, &[8]),
    (154, &[8, 4]),
    (155, &[8]),
    (156, &[8]),
    (157, &[8]),
    (158, &[4]),
    (159, &[4]),
    (23, &[4, 8]),
    (24, &[4, 8]),
    (85, &[8]),
    (86, &[8]),
    (32, &[2]),
    (139, &[2]),
    (34, &[4, 1]),
    (50, &[4]),
    (48, &[1, 2]),
    (302, &[4, 8]),
    (58, &[2]),
    (243, &[2]),
    (61, &[1]),
];

fn field() -> impl Strategy<Value = FieldSpec> {
    prop_oneof![
        12 => (select(USED_FIELDS), any::<Index>()).prop_map(|((id, lens), i)| FieldSpec {
            id,
            len: lens[i.index(lens.len())],
            pen: None,
        }),
        // Any element at any length (zero too: v9 allows it).
        5 => (0u16..=500, 0u16..=20).prop_map(|(id, len)| FieldSpec { id, len, pen: None }),
        // RFC 5103 reverse elements.
        3 => (
            select(&[1u16, 2, 4, 6, 8, 12, 21, 22, 85, 86, 150, 152][..]),
            select(&[1u16, 2, 4, 8, 16][..]),
        )
            .prop_map(|(id, len)| FieldSpec { id, len, pen: Some(29305) }),
        // Vendors' elements, known to netflow_parser or not.
        2 => (0u16..=300, 1u16..=12, select(&[9u32, 5951, 6876, 12345][..]))
            .prop_map(|(id, len, pen)| FieldSpec { id, len, pen: Some(pen) }),
    ]
}

/// A field that keeps a template on netflow_parser: a sampled frame, a variable-length
/// element (a fixed 5 bytes in v9), an application id without its byte (v9).
fn odd_field() -> impl Strategy<Value = FieldSpec> {
    prop_oneof![
        Just(FieldSpec {
            id: FRAME_SECTION,
            len: 64,
            pen: None
        }),
        (0u16..=500).prop_map(|id| FieldSpec {
            id,
            len: 65535,
            pen: None
        }),
        Just(FieldSpec {
            id: 95,
            len: 0,
            pen: None
        }),
    ]
}

fn template() -> impl Strategy<Value = TemplateSpec> {
    (
        0u16..6,
        0u8..3,
        prop::collection::vec(field(), 0..10),
        prop::option::weighted(0.15, (odd_field(), any::<Index>())),
    )
        .prop_map(|(id, addresses, mut fields, odd)| {
            let f = |id, len| FieldSpec { id, len, pen: None };
            match addresses {
                0 => drop(fields.splice(0..0, [f(8, 4), f(12, 4)])),
                1 => drop(fields.splice(0..0, [f(27, 16), f(28, 16)])),
                _ => {}
            }
            if let Some((odd, at)) = odd {
                fields.insert(at.index(fields.len() + 1), odd);
            }
            TemplateSpec {
                id: 256 + id,
                fields,
            }
        })
}

#[derive(Clone, Debug)]
enum SetPlan {
    /// The pool's template.
    Template(Index),
    /// Data of the pool's template (or of template `256 + id`): records, padding.
    Data(Index, Option<u16>, u8, u8),
    /// An options template `260 + id` (some collide with data templates) of a kind.
    OptionsTemplate(u16, u8),
    OptionsData(u16, u8),
    /// IPFIX withdrawal of template `256 + id`, or of all (6).
    Withdraw(u16),
}

fn set_plan() -> impl Strategy<Value = SetPlan> {
    prop_oneof![
        3 => any::<Index>().prop_map(SetPlan::Template),
        16 => (any::<Index>(), prop::option::weighted(0.2, 0u16..7), 0u8..6, 0u8..4)
            .prop_map(|(t, id, n, pad)| SetPlan::Data(t, id, n, pad)),
        1 => (0u16..4, any::<u8>()).prop_map(|(id, k)| SetPlan::OptionsTemplate(id, k)),
        2 => (0u16..4, 1u8..3).prop_map(|(id, n)| SetPlan::OptionsData(id, n)),
        1 => (0u16..7).prop_map(SetPlan::Withdraw),
    ]
}

#[derive(Clone, Debug)]
struct Step {
    /// From the run's main scope (port 0, domain 0, the run's version), else from the
    /// following one.
    main: bool,
    /// Exporter port, IPFIX or v9, domain.
    port: u16,
    ipfix: bool,
    domain: u32,
    /// Sets in one datagram (a template and its data in one, or data in later ones).
    sets: Vec<SetPlan>,
    /// Cut short, trailing bytes, a last set too long or too short (kind, 1 to 3).
    malform: Option<(u8, u8)>,
    up: u32,
    secs: u32,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop::bool::weighted(0.7),
        0u16..2,
        any::<bool>(),
        0u32..2,
        prop::collection::vec(set_plan(), 1..4),
        prop::option::weighted(0.1, (0u8..4, 1u8..4)),
        any::<u32>(),
        prop_oneof![Just(1_700_000_000u32), any::<u32>()],
    )
        .prop_map(
            |(main, port, ipfix, domain, sets, malform, up, secs)| Step {
                main,
                port,
                ipfix,
                domain,
                sets,
                malform,
                up,
                secs,
            },
        )
}

/// What the compiled path should hold of one scope.
#[derive(Default)]
struct Model {
    /// Data templates defined, and whether they compile.
    defined: HashMap<u16, bool>,
    /// Data template ids defined (the compiled cache's bound).
    distinct: HashSet<u16>,
}

/// Runs `steps` through both decoders: the same records and counters, and while the
/// model can tell (no templates lost to a limit, no template in a malformed datagram),
/// the compiled path takes exactly the well-formed datagrams made only of data of
/// compilable templates it was taught.
fn run(
    pool: &[TemplateSpec],
    steps: &[Step],
    main_ipfix: bool,
    bytes: &[u8],
    limits: DecodeLimits,
) -> Result<u64, TestCaseError> {
    let mut p = Pair::new(limits.clone());
    let mut models: HashMap<(u16, bool, u32), Model> = HashMap::new();
    let mut sent: HashMap<(u16, bool, u32, u16), TemplateSpec> = HashMap::new();
    let mut options: HashMap<(u16, bool, u32, u16), u8> = HashMap::new();
    let mut bytes = bytes.iter().copied().cycle();
    let mut certain = true;
    let mut taken = 0;
    for (n, s) in steps.iter().enumerate() {
        let s = &if s.main {
            Step {
                port: 0,
                ipfix: main_ipfix,
                domain: 0,
                ..s.clone()
            }
        } else {
            s.clone()
        };
        let scope = (s.port, s.ipfix, s.domain);
        let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 2055 + s.port);
        let mut sets = Vec::new();
        let mut all_data = true;
        let mut templates = false;
        let model = models.entry(scope).or_default();
        for plan in &s.sets {
            match plan {
                SetPlan::Template(i) => {
                    let t = &pool[i.index(pool.len())];
                    sets.push(set(if s.ipfix { 2 } else { 0 }, &t.body(s.ipfix), 0));
                    sent.insert((s.port, s.ipfix, s.domain, t.id), t.clone());
                    all_data = false;
                    templates = true;
                }
                SetPlan::Data(t, id, records, pad) => {
                    let id = id.map_or(pool[t.index(pool.len())].id, |id| 256 + id);
                    let t = sent
                        .get(&(s.port, s.ipfix, s.domain, id))
                        .unwrap_or(&pool[usize::from(id) % pool.len()]);
                    let body: Vec<u8> = (0..*records)
                        .flat_map(|_| t.record(s.ipfix, &mut bytes))
                        .collect();
                    sets.push(set(id, &body, usize::from(*pad)));
                    all_data &= model.defined.get(&id) == Some(&true);
                }
                SetPlan::OptionsTemplate(id, kind) => {
                    sets.push(options_template(s.ipfix, 260 + id, *kind));
                    options.insert((s.port, s.ipfix, s.domain, 260 + id), *kind);
                    all_data = false;
                    templates = true;
                }
                SetPlan::OptionsData(id, records) => {
                    let kind = options
                        .get(&(s.port, s.ipfix, s.domain, 260 + id))
                        .copied()
                        .unwrap_or(0);
                    let body: Vec<u8> = (0..*records)
                        .flat_map(|r| options_record(kind, u32::from(r) * 100 + 1))
                        .collect();
                    sets.push(set(260 + id, &body, 0));
                    // A set is data of whichever template holds its id now.
                    all_data &= model.defined.get(&(260 + id)) == Some(&true);
                }
                SetPlan::Withdraw(id) if s.ipfix => {
                    let id = if *id == 6 { 2 } else { 256 + id };
                    sets.push(set(2, &[(id >> 8) as u8, id as u8, 0, 0], 0));
                    all_data = false;
                    templates = true;
                }
                SetPlan::Withdraw(_) => {}
            }
        }
        if sets.is_empty() {
            continue;
        }
        let mut d = datagram(s.ipfix, s.domain, n as u32, s.up, s.secs, &sets);
        if let Some((kind, k)) = s.malform {
            let k = usize::from(k);
            let last = d.len() - sets.last().map_or(0, Vec::len);
            let last_len = u16::from_be_bytes([d[last + 2], d[last + 3]]);
            match kind {
                0 => d.truncate(d.len() - k),
                1 => d.extend(std::iter::repeat_n(0x5a, k)),
                2 => d[last + 2..last + 4].copy_from_slice(&(last_len + k as u16).to_be_bytes()),
                _ => d[last + 2..last + 4]
                    .copy_from_slice(&last_len.saturating_sub(k as u16).to_be_bytes()),
            }
            if templates {
                certain = false;
            }
        }
        let fast = p.decode(from, &d)?;
        if certain {
            prop_assert_eq!(
                fast,
                s.malform.is_none() && all_data,
                "datagram {} {:?} took the {} path",
                n,
                s,
                if fast { "compiled" } else { "general" }
            );
        }
        taken += u64::from(fast);
        if s.malform.is_none() {
            let model = models.entry(scope).or_default();
            for plan in &s.sets {
                match plan {
                    SetPlan::Template(i) => {
                        let t = &pool[i.index(pool.len())];
                        model.defined.insert(t.id, t.compilable(s.ipfix));
                        model.distinct.insert(t.id);
                        certain &= model.distinct.len() <= limits.max_templates;
                    }
                    SetPlan::OptionsTemplate(id, _) => {
                        model.defined.remove(&(260 + id));
                        model.distinct.remove(&(260 + id));
                    }
                    _ => {}
                }
            }
            // Withdrawals after every definition of the datagram (see `learn`).
            for plan in &s.sets {
                match plan {
                    SetPlan::Withdraw(6) if s.ipfix => model.defined.clear(),
                    SetPlan::Withdraw(id) if s.ipfix => {
                        model.defined.remove(&(256 + id));
                    }
                    _ => {}
                }
            }
        }
        // Sources beyond the parser's bound are evicted (least recently used).
        certain &= models.len() <= limits.max_exporters * 4;
        p.same_counters()?;
    }
    Ok(taken)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn fuzzed_templates_and_records_decode_as_netflow_parser_does(
        pool in prop::collection::vec(template(), 1..6),
        steps in prop::collection::vec(step(), 1..30),
        ipfix in any::<bool>(),
        bytes in prop::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => Just(0u8), 1 => Just(0xffu8)],
            64..512,
        ),
    ) {
        run(&pool, &steps, ipfix, &bytes, DecodeLimits::default())?;
    }

    /// Room for 3 templates a scope and 4 scopes: netflow_parser evicts templates and
    /// sources, the compiled path follows.
    #[test]
    fn under_tight_limits_too(
        pool in prop::collection::vec(template(), 1..6),
        steps in prop::collection::vec(step(), 1..40),
        ipfix in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 64..256),
    ) {
        let limits = DecodeLimits {
            max_exporters: 1,
            max_templates: 3,
            ..DecodeLimits::default()
        };
        run(&pool, &steps, ipfix, &bytes, limits)?;
    }
}

/// The fuzzing above does reach the compiled path (a sample of it, with a fixed seed).
#[test]
fn the_fuzzing_takes_the_compiled_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut taken = 0;
    for i in 0..50 {
        let pool = prop::collection::vec(template(), 1..6)
            .new_tree(&mut runner)
            .expect("pool")
            .current();
        let steps = prop::collection::vec(step(), 10..30)
            .new_tree(&mut runner)
            .expect("steps")
            .current();
        let bytes: Vec<u8> = (0..=255).collect();
        taken +=
            run(&pool, &steps, i % 2 == 0, &bytes, DecodeLimits::default()).expect("equal paths");
    }
    assert!(taken > 100, "{taken} datagrams took the compiled path");
}
