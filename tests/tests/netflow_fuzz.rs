//! Mutated real datagrams through the decoder: no panic, and every table stays within its
//! bound however many sources send garbage. Seeds: every NetFlow/IPFIX datagram of
//! `../shared/testdata/netflow` when present, plus datagrams of our own v9 encoder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use detector::export::netflow_v9::{V9Config, V9Encoder};
use detector::flow::FlowRecord;
use detector::sources::capture::Capture;
use detector::sources::netflow::capture::udp_in_frame;
use detector::sources::netflow::decode::{DecodeLimits, Decoder};
use proptest::prelude::*;
use tests::mutate::{Mutation, apply, byte_edits};

fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut v = own_datagrams();
        if let Some(d) = tests::shared_testdata() {
            for e in std::fs::read_dir(d.join("netflow")).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "pcap") {
                    v.extend(datagrams(&p));
                }
            }
        } else {
            eprintln!("../shared/testdata is absent: fuzzing from our own datagrams only");
        }
        v
    })
}

fn datagrams(p: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(mut cap) = Capture::open(p) else {
        return out;
    };
    while let Some(Ok(f)) = cap.next_frame() {
        if let Some(dg) = udp_in_frame(&f.data) {
            out.push(dg.payload.to_vec());
        }
    }
    out
}

fn own_datagrams() -> Vec<Vec<u8>> {
    let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let records: Vec<FlowRecord> = (0..40u32)
        .map(|i| {
            let dst = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
            } else {
                "2001:db8::1".parse().unwrap()
            };
            FlowRecord {
                packets: i as u64,
                bytes: 100 * i as u64,
                first: boot,
                last: boot,
                ifindex: 1,
                ..FlowRecord::new(
                    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                    i as u16,
                    dst,
                    443,
                    6,
                )
            }
        })
        .collect();
    let mut enc = V9Encoder::new(V9Config::default(), boot);
    enc.encode(&records, boot)
        .into_iter()
        .map(|b| b.to_vec())
        .collect()
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => byte_edits(),
        // Lengths, counts, ids: the 16-bit fields parsers trust.
        1 => (
            any::<usize>(),
            prop_oneof![Just(0u16), Just(1), Just(0xffff), any::<u16>()]
        )
            .prop_map(|(i, v)| Mutation::SetU16(i, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_datagrams_never_panic(
        seed in any::<prop::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 0..6),
        source in 0u8..8,
    ) {
        let seeds = seeds();
        let d = apply(seeds[seed.index(seeds.len())].clone(), &muts, &[]);
        let mut dec = Decoder::new(DecodeLimits::default(), vec![]);
        let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, source)), 2055);
        let mut out = Vec::new();
        // The template-carrying original first, then the mutant, then the original again.
        dec.decode(from, &seeds[seed.index(seeds.len())], SystemTime::now(), &mut out);
        dec.decode(from, &d, SystemTime::now(), &mut out);
        dec.decode(from, &seeds[seed.index(seeds.len())], SystemTime::now(), &mut out);
    }
}

#[test]
fn a_flood_of_garbage_from_many_sources_stays_bounded() {
    let seeds = seeds();
    let limits = DecodeLimits {
        max_exporters: 64,
        ..DecodeLimits::default()
    };
    let mut dec = Decoder::new(limits.clone(), vec![]);
    let mut out = Vec::new();
    let mut rng = tests::frames::Rng(42);
    for i in 0..50_000u32 {
        let seed = &seeds[(rng.next_u64() as usize) % seeds.len()];
        let mut d = seed.clone();
        for _ in 0..3 {
            let n = d.len().max(1);
            let at = (rng.next_u64() as usize) % n;
            if !d.is_empty() {
                d[at] ^= rng.next_u64() as u8;
            }
        }
        // Thousands of sources, ports and observation domains.
        let from = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i % 5000))),
            1024 + (i % 97) as u16,
        );
        dec.decode(from, &d, SystemTime::now(), &mut out);
        out.clear();
    }
    let (exporters, sequences, sampling, init, parsers) = dec.table_sizes();
    assert!(exporters <= limits.max_exporters, "{exporters} exporters");
    assert!(
        sequences <= limits.max_exporters * 16,
        "{sequences} sequence streams"
    );
    assert!(sampling <= limits.max_exporters * 16 && init <= limits.max_exporters * 16);
    assert!(
        parsers <= limits.max_exporters * 4 * 3,
        "{parsers} parser scopes"
    );
    assert!(
        dec.compiled_scopes() <= parsers,
        "{} compiled scopes",
        dec.compiled_scopes()
    );
    assert!(
        dec.global.over_exporter_limit > 0,
        "the exporter limit was never reached"
    );
}

/// Counters per exporter without the two decoding paths' own.
fn counters_but_paths(
    d: &Decoder,
) -> Vec<(IpAddr, detector::sources::netflow::decode::ExporterStats)> {
    let mut v: Vec<_> = d
        .exporters()
        .iter()
        .map(|(ip, s)| {
            let mut s = s.clone();
            s.fast_datagrams = 0;
            s.fast_records = 0;
            s.slow_records = 0;
            (*ip, s)
        })
        .collect();
    v.sort_by_key(|(ip, _)| *ip);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Mutants decode alike with templates compiled and by netflow_parser alone: the
    /// datagrams before a seed (its templates, mostly), the mutant, then the seed again,
    /// through both; the same records, counters and early data.
    #[test]
    fn mutated_datagrams_decode_alike_on_both_paths(
        seed in any::<prop::sample::Index>(),
        context in 0usize..8,
        muts in proptest::collection::vec(mutation(), 0..6),
    ) {
        let seeds = seeds();
        let i = seed.index(seeds.len());
        let mutant = apply(seeds[i].clone(), &muts, &[]);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 2055);
        let mut fast = Decoder::new(DecodeLimits::default(), vec![]);
        let mut slow = Decoder::with_fast_path(DecodeLimits::default(), vec![], false);
        let stream = seeds[i.saturating_sub(context)..=i]
            .iter()
            .chain([&mutant, &seeds[i]]);
        for dg in stream {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            fast.decode(from, dg, at, &mut got);
            slow.decode(from, dg, at, &mut want);
            prop_assert_eq!(got, want);
        }
        prop_assert_eq!(counters_but_paths(&fast), counters_but_paths(&slow));
        prop_assert_eq!(fast.pending(), slow.pending());
    }
}
