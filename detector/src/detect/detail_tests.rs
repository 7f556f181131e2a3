//! The drill-down of a profile built from known records: peers and their shares, the
//! peers outside the top 10 senders, both port distributions, the direction of each
//! connection, totals beyond the held peers; the guards as rows; the hosts the engine
//! details.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use super::*;
use crate::detect::evidence::Guards;
use crate::detect::{AlarmState, DetectConfig};
use crate::flow::FlowRecord;

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn ext(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i)) // 198.18.0.0/15
}

const HOST: &str = "10.0.0.5";

fn host() -> IpAddr {
    HOST.parse().unwrap()
}

/// `src:sport -> dst:dport`, `bytes` over one flow at 100 s.
fn rec(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8, bytes: u64) -> FlowRecord {
    FlowRecord {
        packets: 10,
        bytes,
        first: t(95),
        last: t(100),
        tcp_flags: if proto == 6 { 0x18 } else { 0 },
        ..FlowRecord::new(src, sport, dst, dport, proto)
    }
}

/// The host's records: 30 peers came to its port 51413 (peer 0 over UDP too), it
/// downloaded 1 MB from a web server on 443 (one of the network's top senders), went to
/// 5 peers on 6881 from ports of its own, and met one peer both ways.
fn records() -> Vec<FlowRecord> {
    let h = host();
    let mut v = Vec::new();
    for i in 0..30u32 {
        let rport = 20_000 + i as u16;
        v.push(rec(ext(i), rport, h, 51413, 6, 10_000));
        v.push(rec(h, 51413, ext(i), rport, 6, 1_000));
    }
    v.push(rec(ext(0), 20_000, h, 51413, 17, 200));
    v.push(rec(ext(100), 443, h, 40_000, 6, 1_000_000));
    v.push(rec(h, 40_000, ext(100), 443, 6, 10_000));
    for i in 0..5u32 {
        v.push(rec(ext(200 + i), 6881, h, 50_000 + i as u16, 6, 5_000));
    }
    v.push(rec(ext(300), 30_000, h, 51413, 6, 2_000));
    v.push(rec(h, 45_000, ext(300), 30_000, 6, 3_000));
    v
}

fn profile(max_peers: usize) -> HostProfile {
    let mut p = HostProfile::new(max_peers);
    for r in records() {
        let host_is_src = r.src_addr == host();
        p.add(&r, host_is_src);
    }
    p
}

fn top_senders() -> HashSet<IpAddr> {
    // The web server, and a sender the host never met.
    [ext(100), ext(999)].into_iter().collect()
}

#[test]
fn peers_their_shares_and_those_outside_the_top_senders() {
    let d = extract(&mut profile(1000), &top_senders(), 5.0);
    assert_eq!(d.window_secs, 300);
    assert_eq!((d.peers, d.peers_held), (37, 37));
    assert_eq!(d.flows, 70);
    assert_eq!(d.flows_per_min, 14.0);
    assert_eq!(
        d.bytes_in,
        30 * 10_000 + 200 + 1_000_000 + 5 * 5_000 + 2_000
    );
    assert_eq!(d.bytes_out, 30 * 1_000 + 10_000 + 3_000);
    let total = 1_370_200u64;
    assert_eq!(d.bytes_in + d.bytes_out, total);
    // The biggest peer first, with its share; then peer 0 (its UDP datagram), then the
    // equal ones by address.
    assert_eq!(d.top_peers.len(), TOP_PEERS);
    let first = &d.top_peers[0];
    assert_eq!(first.peer, ext(100));
    assert_eq!(
        (first.bytes_in, first.bytes_out, first.flows),
        (1_000_000, 10_000, 2)
    );
    assert_eq!(first.share, 1_010_000.0 / total as f64);
    assert!(first.top10_sender && first.tcp && !first.udp);
    assert_eq!(first.ports, vec![(40_000, 443)]);
    assert_eq!(d.top_peers[1].peer, ext(0));
    assert!(d.top_peers[1].tcp && d.top_peers[1].udp);
    assert_eq!(d.top_peers[1].share, 11_200.0 / total as f64);
    let rest: Vec<IpAddr> = d.top_peers[2..].iter().map(|p| p.peer).collect();
    assert_eq!(rest, (1..=8).map(ext).collect::<Vec<_>>());
    assert!(d.top_peers[1..].iter().all(|p| !p.top10_sender));
    assert_eq!(d.other_peers, 37 - 10);
    assert_eq!(d.other_bytes, total - 1_010_000 - 11_200 - 8 * 11_000);
    // One peer is among the top senders (the other sender is no peer of the host).
    assert_eq!(d.peers_in_top10_senders, 1);
    assert_eq!(d.peers_outside_top10_senders, 36);
    assert_eq!((d.tcp_peers, d.udp_peers, d.tcp_and_udp_peers), (37, 1, 1));
    assert_eq!(d.totals.flows, 70);
    assert_eq!(d.totals.bytes_in, d.bytes_in);
    assert_eq!(d.totals.bytes_out, d.bytes_out);
}

#[test]
fn remote_and_local_port_distributions() {
    let d = extract(&mut profile(1000), &top_senders(), 5.0);
    // Remote: 30 ports of the peers that came in, 443, 6881 (5 peers), 30000 (one peer,
    // counted once for its two pairs).
    let r = &d.remote_ports;
    assert_eq!(r.distinct, 33);
    assert_eq!(r.top.len(), TOP_PORTS);
    assert_eq!(
        r.top[0],
        PortCount {
            port: 6881,
            peers: 5
        }
    );
    assert_eq!(
        r.top[1],
        PortCount {
            port: 443,
            peers: 1
        }
    );
    assert_eq!(
        r.top[2],
        PortCount {
            port: 20_000,
            peers: 1
        }
    );
    assert_eq!(r.top[11].port, 20_009);
    assert_eq!((r.other_ports, r.other_peers), (21, 21));
    // Local: the listening port with 31 peers, then each port of its own once.
    let l = &d.local_ports;
    assert_eq!(l.distinct, 8);
    assert_eq!(
        l.top[0],
        PortCount {
            port: 51413,
            peers: 31
        }
    );
    let ones: Vec<u16> = l.top[1..].iter().map(|p| p.port).collect();
    assert_eq!(
        ones,
        vec![40_000, 45_000, 50_000, 50_001, 50_002, 50_003, 50_004]
    );
    assert!(l.top[1..].iter().all(|p| p.peers == 1));
    assert_eq!((l.other_ports, l.other_peers), (0, 0));
}

#[test]
fn direction_by_ports() {
    let d = extract(&mut profile(1000), &top_senders(), 5.0);
    // 30 peers came to 51413; the web server and the 6881 peers were gone to; peer 300
    // both ways.
    assert_eq!(
        d.direction,
        Direction {
            inbound_peers: 30,
            outbound_peers: 6,
            both_peers: 1,
            inbound_pairs: 31,
            outbound_pairs: 7,
        }
    );
    // The rule itself: a service's port either end, else a shared local port.
    assert!(inbound(80, 50_000, 1));
    assert!(
        !inbound(50_000, 53, 40),
        "a resolver asking from one port is a client"
    );
    assert!(inbound(51413, 30_000, 2));
    assert!(!inbound(40_001, 30_000, 1));
}

#[test]
fn bounded_beyond_the_held_peers_with_totals_of_every_record() {
    // Only 3 peers held: the others are counted, not listed; the totals count all.
    let d = extract(&mut profile(3), &top_senders(), 5.0);
    assert_eq!(d.peers_held, 3);
    assert!(d.peers >= 36 && d.peers <= 38, "{}", d.peers);
    assert_eq!(d.top_peers.len(), 3);
    assert_eq!(d.other_peers, 0);
    assert_eq!(d.totals.flows, 70);
    assert_eq!(d.totals.bytes_in + d.totals.bytes_out, 1_370_200);
    assert!(d.bytes_in + d.bytes_out < 1_370_200);
    // An empty profile.
    let d = extract(&mut HostProfile::new(10), &HashSet::new(), 5.0);
    assert_eq!((d.peers, d.flows, d.top_peers.len()), (0, 0, 0));
    assert_eq!(d.remote_ports, PortDist::default());
}

#[test]
fn guards_become_rows_with_what_they_measured() {
    let g = Guards {
        bytes_in: 500,
        attempts: 40,
        failed_share: 0.9,
        listen_port: 443,
        listen_ips: 12,
        busy_listener: true,
        held: 40,
        ..Guards::default()
    };
    let rows = guard_rows(&g.explain());
    let names: Vec<&str> = rows.iter().map(|r| r.guard.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "port_scan",
            "server_on_well_known_port",
            "server_on_high_port",
            "realtime_session",
            "web_client"
        ]
    );
    assert!(rows[0].holds && rows[1].holds && !rows[2].holds && !rows[4].holds);
    assert_eq!(
        rows[0].measured,
        "500 bytes in, 36 of 40 outbound attempts failed, probing false"
    );
    assert_eq!(rows[1].measured, "busiest local port 443 with 12 peers");
}

#[test]
fn the_engine_details_its_top_hosts_and_its_alarmed_ones() {
    let mut cfg = DetectConfig {
        consecutive: 1,
        ..DetectConfig::default()
    };
    cfg.window = Duration::from_secs(300);
    let mut e = Engine::new(cfg);
    let quiet: IpAddr = "10.0.0.9".parse().unwrap();
    let mut events = Vec::new();
    for s in [0u64, 10, 20] {
        for mut r in records() {
            r.first = t(s);
            r.last = t(s + 1);
            e.observe(&r);
        }
        e.observe(&rec(quiet, 40_000, ext(1), 443, 6, 500));
        events.extend(e.tick(t(s + 6), false));
    }
    assert!(
        events
            .iter()
            .any(|x| x.host == host() && x.state == AlarmState::Raised),
        "{events:?}"
    );
    let top = TopSenders::default();
    let all = e.explain_detailed(&top, 2, 8);
    let hosts: Vec<IpAddr> = all.iter().map(|x| x.0).collect();
    assert_eq!(hosts, vec![host(), quiet]);
    let (_, v, d) = &all[0];
    assert!(v.score >= 7.0, "{v:?}");
    assert_eq!(d.peers, 37);
    assert_eq!(d.totals.flows, 3 * 70);
    // Only the highest one: the alarmed host is it.
    assert_eq!(e.explain_detailed(&top, 1, 8).len(), 1);
    // None by score: the alarmed host still comes, beyond them.
    let alarmed = e.explain_detailed(&top, 0, 8);
    assert_eq!(alarmed.len(), 1);
    assert_eq!(alarmed[0].0, host());
    assert!(e.explain_detailed(&top, 0, 0).is_empty());
}
