//! The drill-down snapshot with a fake clock: rates between evaluations from the running
//! totals, the JSON of a host, the bounds on hosts and points, open alarms kept.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use super::*;
use crate::detect::evidence::{Evidence, Guards, Measures};
use crate::detect::{AlarmEvent, AlarmState};

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn verdict(score: f64, peers: u64) -> Verdict {
    Verdict {
        score,
        evidence: vec![
            Evidence {
                rule: "external_peers",
                value: peers as f64,
                op: ">=",
                threshold: 25.0,
                fired: peers >= 25,
                weight: 2.0,
            },
            Evidence {
                rule: "top_peer_share",
                value: 0.25,
                op: "<=",
                threshold: 0.35,
                fired: true,
                weight: 1.0,
            },
        ],
        measures: Measures {
            peers,
            ..Measures::default()
        },
        guard: None,
        guard_evidence: Guards::default().explain(),
        peak: 0.0,
        kind: "p2p",
        kind_evidence: Vec::new(),
    }
}

fn detail(peers: u64, flows: u64, bytes_in: u64, bytes_out: u64) -> HostDetail {
    HostDetail {
        window_secs: 300,
        peers,
        peers_held: peers,
        totals: Totals {
            flows,
            bytes_in,
            bytes_out,
        },
        ..HostDetail::default()
    }
}

fn alarm(host: IpAddr) -> AlarmEvent {
    AlarmEvent {
        exporters: vec!["local".into()],
        ..AlarmEvent::sample(host, AlarmState::Raised, 9.0)
    }
}

#[test]
fn rates_come_from_the_totals_between_evaluations() {
    let mut s = State::default();
    s.pipeline.score_threshold = 7.0;
    s.evaluated_detailed(
        t(0),
        vec![
            (ip(1), verdict(9.0, 40), detail(40, 100, 10_000, 1_000)),
            (ip(2), verdict(1.0, 3), detail(3, 5, 100, 100)),
        ],
    );
    // Ten seconds later: 50 more flows, 20 KB in, 5 KB out.
    s.evaluated_detailed(
        t(10),
        vec![(ip(1), verdict(10.0, 42), detail(42, 150, 30_000, 6_000))],
    );
    // The hosts table is the top of the evaluation, as before.
    assert_eq!(s.hosts.len(), 1);
    assert_eq!(s.hosts[0].host, ip(1));
    assert_eq!(s.drill.len(), 2);
    assert_eq!(s.drill.points(&ip(1)), 2);
    let j = s.host_json(ip(1)).unwrap();
    assert_eq!(j["host"], "10.0.0.1");
    assert_eq!(j["latest"], true);
    assert_eq!(j["score"], 10.0);
    assert_eq!(j["score_threshold"], 7.0);
    assert_eq!(j["detail"]["peers"], 42);
    let series = j["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    assert!(
        series[0]["bytes_in_per_s"].is_null(),
        "no rate at the first point"
    );
    assert_eq!(series[1]["bytes_in_per_s"], 2_000.0);
    assert_eq!(series[1]["bytes_out_per_s"], 500.0);
    assert_eq!(series[1]["flows_per_min"], 300.0);
    assert_eq!(series[1]["score"], 10.0);
    assert_eq!(series[1]["values"][0], 42.0);
    assert_eq!(j["rules"][1]["rule"], "top_peer_share");
    assert_eq!(j["rules"][1]["op"], "<=");
    assert_eq!(j["rules"][1]["threshold"], 0.35);
    // Every guard, as rows.
    let guards = j["guards"].as_array().unwrap();
    assert_eq!(guards.len(), 5);
    assert_eq!(guards[0]["guard"], "port_scan");
    assert_eq!(guards[0]["holds"], false);
    // Host 2 was not detailed at the last evaluation: its view stays, marked so.
    let j2 = s.host_json(ip(2)).unwrap();
    assert_eq!(j2["latest"], false);
    assert!(s.host_json(ip(3)).is_none());
    // A profile that began again (totals went back): no rate rather than a wrong one.
    s.evaluated_detailed(t(20), vec![(ip(1), verdict(2.0, 2), detail(2, 3, 10, 10))]);
    let j = s.host_json(ip(1)).unwrap();
    assert!(j["series"][2]["bytes_in_per_s"].is_null());
}

#[test]
fn hosts_and_points_stay_within_their_bounds_and_open_alarms_stay() {
    let mut s = State::default();
    s.apply_events(&[alarm(ip(1))]);
    for i in 0..(DETAIL_POINTS as u64 + 3) {
        s.evaluated_detailed(
            t(i * 10),
            vec![(ip(1), verdict(9.0, 40), detail(40, i, i, i))],
        );
    }
    assert_eq!(s.drill.points(&ip(1)), DETAIL_POINTS);
    // Many more hosts than the bound: the alarmed host comes first and stays.
    for round in 0..3u32 {
        let many: Vec<_> = (0..(DETAIL_HOSTS as u32 + 10))
            .map(|n| {
                (
                    ip(100 + round * 1000 + n),
                    verdict(5.0, 30),
                    detail(30, 1, 1, 1),
                )
            })
            .chain([(ip(1), verdict(0.5, 40), detail(40, 1, 1, 1))])
            .collect();
        s.evaluated_detailed(t(100_000 + u64::from(round)), many);
        assert_eq!(s.drill.len(), DETAIL_HOSTS);
        assert!(s.host_json(ip(1)).unwrap()["latest"] == true);
    }
    let j = s.host_json(ip(1)).unwrap();
    assert_eq!(j["alarmed"], true);
    assert_eq!(j["alarm"]["score"], 9.0);
    // The first round's hosts went first.
    assert!(s.host_json(ip(100)).is_none());
    assert!(s.host_json(ip(2100)).is_some());
    // The hosts table keeps its own bound.
    assert_eq!(s.hosts.len(), TOP_HOSTS);
    // The size the bound is stated with.
    assert_eq!(std::mem::size_of::<Point>(), 56);
}
