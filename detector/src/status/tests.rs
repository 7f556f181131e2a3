//! The status snapshot with a fake clock: alarms open and close with their events, the
//! score history stays bounded and keeps alarmed hosts, the scrape carries the counters.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use super::*;
use crate::detect::evidence::Measures;

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn event(host: IpAddr, state: AlarmState, score: f64) -> AlarmEvent {
    AlarmEvent {
        exporters: vec!["local".into()],
        ..AlarmEvent::sample(host, state, score)
    }
}

fn verdict(score: f64) -> Verdict {
    Verdict {
        score,
        evidence: Vec::new(),
        measures: Measures {
            peers: 7,
            ..Measures::default()
        },
        guard: None,
        guard_evidence: Vec::new(),
        peak: 0.0,
        kind: "p2p",
        kind_evidence: Vec::new(),
    }
}

#[test]
fn alarms_open_with_their_raise_and_close_with_their_clear() {
    let mut s = State::default();
    s.apply_events(&[
        event(ip(1), AlarmState::Raised, 9.0),
        event(ip(2), AlarmState::Raised, 8.0),
    ]);
    s.apply_events(&[event(ip(1), AlarmState::Updated, 11.0)]);
    assert_eq!(s.alarms.len(), 2);
    assert_eq!(s.alarms[&ip(1)].score, 11.0, "the last event is kept");
    s.apply_events(&[event(ip(2), AlarmState::Cleared, 1.0)]);
    assert_eq!(s.alarms.keys().copied().collect::<Vec<_>>(), vec![ip(1)]);
    assert_eq!(s.alarm_events, [2, 1, 1]);
    let json = s.alarms_json();
    assert_eq!(json["alarms"].as_array().unwrap().len(), 1);
    assert_eq!(json["alarms"][0]["host"], "10.0.0.1");
}

#[test]
fn history_keeps_top_and_alarmed_hosts_within_its_bounds() {
    let mut s = State::default();
    s.apply_events(&[event(ip(1), AlarmState::Raised, 9.0)]);
    // Host 1 is alarmed but drops out of the top; its alarm score is charted.
    for i in 0..(HISTORY_POINTS as u64 + 5) {
        s.evaluated(t(i * 10), vec![(ip(2), verdict(3.0))]);
    }
    assert_eq!(s.history[&ip(1)].len(), HISTORY_POINTS);
    assert_eq!(
        s.history[&ip(1)].back(),
        Some(&(unix_secs(t(HISTORY_POINTS as u64 * 10 + 40)), 9.0))
    );
    assert_eq!(s.hosts.len(), 1);
    assert!(!s.hosts[0].alarmed);
    assert_eq!(s.hosts[0].peers, 7);
    // Many more hosts: the bound holds, and the alarmed host stays.
    for round in 0..2u32 {
        let many: Vec<_> = (0..TOP_HOSTS as u32)
            .map(|n| (ip(100 + round * 1000 + n), verdict(1.0)))
            .collect();
        s.evaluated(t(100_000 + u64::from(round)), many);
    }
    assert_eq!(s.history.len(), HISTORY_HOSTS);
    assert!(s.history.contains_key(&ip(1)));
    assert_eq!(s.hosts.len(), TOP_HOSTS);
    // Only hosts that alarmed are charted.
    let h = s.history_json();
    let charted: Vec<_> = h["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["host"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(charted, vec!["10.0.0.1"]);
    assert_eq!(h["hosts"][0]["open"], true);
    assert_eq!(s.hosts_json(3)["hosts"].as_array().unwrap().len(), 3);
}

#[test]
fn a_scrape_carries_every_part_with_its_labels() {
    let mut s = State {
        started: Some(t(0)),
        ..State::default()
    };
    s.apply_events(&[event(ip(1), AlarmState::Raised, 9.0)]);
    s.pipeline.records = 1234;
    s.pipeline.sinks = vec![crate::export::SinkCounters {
        sink: "netflow-v9:127.0.0.1:2055".into(),
        records: 1200,
        errors: 3,
    }];
    let mut kernel = crate::sources::xdp::KernelCounters::default();
    kernel.values[1][counter_index("err_l4_truncated")] = 5;
    kernel.values[0][0] = 42;
    s.meter = Some(MeterStatus {
        iface: "eth0".into(),
        kernel,
        map_size: 1 << 20,
        ..MeterStatus::default()
    });
    let mut e = ExporterStats {
        records: 77,
        fast_datagrams: 3,
        fast_records: 70,
        slow_records: 7,
        ..ExporterStats::default()
    };
    e.errors.insert("parse", 2);
    s.listeners = vec![ListenerStatus {
        addr: Some("127.0.0.1:2055".parse().unwrap()),
        kernel_drops: 4,
        exporters: vec![(ip(9), e, PendingStats::default())],
        ..ListenerStatus::default()
    }];
    let text = metrics::encode(&s);
    for line in [
        "detector_records_total 1234",
        "detector_alarm_events_total{state=\"raised\"} 1",
        "detector_alarms_open 1",
        "detector_sink_errors_total{sink=\"netflow-v9:127.0.0.1:2055\"} 3",
        "detector_meter_frames_total{direction=\"ingress\"} 42",
        "detector_meter_parse_failures_total{direction=\"egress\",reason=\"l4_truncated\"} 5",
        "detector_netflow_kernel_drops_total{listener=\"127.0.0.1:2055\"} 4",
        "detector_netflow_records_total{exporter=\"10.0.0.9\",listener=\"127.0.0.1:2055\"} 77",
        "detector_netflow_errors_total{exporter=\"10.0.0.9\",kind=\"parse\",listener=\"127.0.0.1:2055\"} 2",
        "detector_netflow_path_records_total{exporter=\"10.0.0.9\",listener=\"127.0.0.1:2055\",path=\"compiled\"} 70",
        "detector_netflow_path_records_total{exporter=\"10.0.0.9\",listener=\"127.0.0.1:2055\",path=\"parser\"} 7",
        "detector_netflow_compiled_datagrams_total{exporter=\"10.0.0.9\",listener=\"127.0.0.1:2055\"} 3",
        "detector_start_time_seconds 1800000000",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    assert!(text.contains("# TYPE detector_records_total counter"));
    assert!(text.contains("# HELP detector_records_total "));
}

fn counter_index(name: &str) -> usize {
    detector_common::counter::NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap()
}
