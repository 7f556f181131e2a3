//! Mutated sFlow datagrams through the decoder, as `netflow_fuzz` does for NetFlow: no
//! panic, every datagram counted once, every sampled packet either in a flow or counted,
//! and every table within its bound however many agents send garbage. Seeds: the
//! hand-built switch datagrams of `tests::sflow_switch` (expanded and compact flow
//! samples, raw headers of 802.1Q, QinQ and MPLS frames and IPv6 with extension headers,
//! sampled IPv4 and IPv6 records, three sources), plus counter samples (compact and
//! expanded, generic interface counters).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use detector::flow::FlowRecord;
use detector::sources::sflow::decode::{Decoder, SflowLimits, SflowTimeouts};
use proptest::prelude::*;
use tests::mutate::{Mutation, apply, byte_edits};
use tests::sflow::{IfCounters, counter_sample, datagram, if_counters};

fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let (mut v, samples) = tests::sflow_switch::build();
        assert!(samples.len() > 15 && v.len() >= 4);
        let c = |if_index: u32| IfCounters {
            if_index,
            speed: 1_000_000_000,
            in_octets: 1 << 40,
            in_ucast: 10,
            out_octets: 5,
            out_ucast: 2,
            ..IfCounters::default()
        };
        v.push(datagram(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            0,
            2,
            9000,
            &[
                counter_sample(false, 1, 3, &[if_counters(&c(3))]),
                counter_sample(true, 1, 70_000, &[if_counters(&c(70_000))]),
            ],
        ));
        // Flow and counter samples in one datagram: one of the switch's, with counters
        // spliced in after its samples and the count raised.
        let mut mixed = v[0].clone();
        let (tag, body) = counter_sample(false, 2, 9, &[if_counters(&c(9))]);
        mixed.extend_from_slice(&tag.to_be_bytes());
        mixed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        mixed.extend_from_slice(&body);
        // The sample count: after version, agent (type + 4 bytes), sub-agent, sequence,
        // uptime.
        let at = 4 + 8 + 12;
        let n = u32::from_be_bytes(mixed[at..at + 4].try_into().unwrap());
        mixed[at..at + 4].copy_from_slice(&(n + 1).to_be_bytes());
        v.push(mixed);
        v
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => byte_edits(),
        1 => (
            any::<usize>(),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(4),
                Just(0x7fff_ffff),
                Just(u32::MAX),
                any::<u32>()
            ]
        )
            .prop_map(|(i, v)| Mutation::SetU32(i, v)),
        1 => (any::<usize>(), any::<usize>(), 1usize..200, any::<usize>())
            .prop_map(|(from, at, len, to)| Mutation::Splice { from, at, len, to }),
    ]
}

fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

/// Datagrams the decoder counted: as a source's, as header errors, over the source
/// limit, or rejected.
fn counted(d: &Decoder) -> u64 {
    d.source_stats()
        .iter()
        .map(|(_, s)| s.datagrams)
        .sum::<u64>()
        + d.global.errors.values().sum::<u64>()
        + d.global.over_source_limit
        + d.global.rejected
}

/// Packets the sources counted, and the packets of the flows that came out.
fn packets(d: &Decoder, out: &[FlowRecord]) -> (u64, u64) {
    (
        d.source_stats().iter().map(|(_, s)| s.packets).sum(),
        out.iter()
            .filter(|r| !r.live.detection_only())
            .map(|r| r.packets)
            .sum(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// A seed, its mutant and the seed again from one agent: no panic, each datagram
    /// counted once, and every packet the sources counted is in a flow once the table
    /// is flushed (sampled packets are neither lost nor made up), live reports or not.
    #[test]
    fn mutated_switch_datagrams_never_panic_and_lose_nothing(
        seed in any::<prop::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 0..6),
        agent in 0u8..4,
        live in any::<bool>(),
    ) {
        let seeds = seeds();
        let original = &seeds[seed.index(seeds.len())];
        let mutant = apply(original.clone(), &muts, seeds);
        let timeouts = SflowTimeouts {
            live: live.then_some(Duration::from_secs(10)),
            ..SflowTimeouts::default()
        };
        let mut dec = Decoder::new(SflowLimits::default(), timeouts, Vec::new());
        let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, agent)), 6343);
        let mut out = Vec::new();
        for (i, dg) in [original, &mutant, original].into_iter().enumerate() {
            dec.decode(from, dg, at(i as u64), &mut out);
            dec.expire(at(i as u64), &mut out);
        }
        prop_assert_eq!(counted(&dec), 3);
        dec.flush(&mut out);
        let (counted_packets, in_flows) = packets(&dec, &out);
        prop_assert_eq!(counted_packets, in_flows);
        prop_assert_eq!(dec.flows(), 0);
    }
}

/// A flood of mutated datagrams from 5,000 agent addresses (and as many agent addresses
/// inside the datagrams): the sources, flows and interfaces stay within their limits,
/// the limits are reached and counted, every datagram is counted once and every sampled
/// packet of a tracked source ends in a flow; no panic.
#[test]
fn a_flood_of_garbage_from_many_agents_stays_bounded() {
    let seeds = seeds();
    let limits = SflowLimits {
        max_sources: 64,
        max_data_sources: 8,
        max_interfaces: 32,
        max_flows: 256,
        ..SflowLimits::default()
    };
    let mut dec = Decoder::new(limits.clone(), SflowTimeouts::default(), Vec::new());
    let mut out = Vec::new();
    let mut rng = tests::frames::Rng(7);
    let sent = 50_000u32;
    for i in 0..sent {
        let mut d = seeds[(rng.next_u64() as usize) % seeds.len()].clone();
        // Another agent address in the header (IPv4 agents: bytes 8..12), and a few
        // flipped bytes past the header in one datagram of two.
        if d[7] == 1 {
            d[8..12].copy_from_slice(&(0x0a00_0000 + (i % 5000)).to_be_bytes());
        }
        if i % 2 == 0 {
            for _ in 0..3 {
                let at = 28 + (rng.next_u64() as usize) % (d.len() - 28);
                d[at] ^= rng.next_u64() as u8;
            }
        }
        let from = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(0xc000_0200 + (i % 5000))),
            1024 + (i % 97) as u16,
        );
        dec.decode(from, &d, at(u64::from(i / 1000)), &mut out);
        assert!(dec.flows() <= limits.max_flows, "{} flows", dec.flows());
        assert!(
            dec.interfaces().len() <= limits.max_interfaces,
            "{} interfaces",
            dec.interfaces().len()
        );
    }
    let sources = dec.source_stats().len();
    assert!(sources <= limits.max_sources, "{sources} sources");
    assert_eq!(counted(&dec), u64::from(sent));
    let g = &dec.global;
    assert!(
        g.over_source_limit > 0,
        "the source limit was never reached"
    );
    assert!(g.over_flow_limit > 0, "the flow limit was never reached");
    assert!(
        g.over_interface_limit > 0,
        "the interface limit was never reached"
    );
    dec.flush(&mut out);
    let (counted_packets, in_flows) = packets(&dec, &out);
    assert_eq!(counted_packets, in_flows);
    assert_eq!(dec.flows(), 0);
}
