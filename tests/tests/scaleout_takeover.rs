//! A takeover without a gap: the node that owns a BitTorrent-like host's shard is killed
//! (-9) when the host shows half the evidence an alarm needs, and the node that takes the
//! shard over replays the shard's records from the start of the window before it goes
//! on: it raises the alarm within one evaluation interval of the time a single node that
//! never failed raises it, and raises it once.
//!
//! Two worlds fed the same NetFlow records at the same moments: a cluster (one
//! nats-server, an edge, two nodes, one of them killed) and a reference (its own
//! nats-server, an edge, one node that never fails). The truth: the records the test
//! sent (how many before the kill, how many in all, when), the edges' own count of what
//! they published, and the reference node's alarm.

mod scaleout_support;

use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use scaleout_support as s;
use tests::agent::{Exporter, scratch, wait_for};

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5));
const SHARDS: u32 = 4;
/// A new peer every this often: the evidence builds over about half a minute.
const PEER_EVERY: Duration = Duration::from_secs(2);

/// Sends each peer's records to both worlds' edges.
struct Feed {
    to: [Exporter; 2],
    next_peer: u32,
    sent: u64,
}

impl Feed {
    fn send_peer(&mut self) {
        let now = SystemTime::now();
        let recs = s::peer_records(HOST, self.next_peer, now);
        for e in &mut self.to {
            e.send(&recs, now);
        }
        self.sent += recs.len() as u64;
        self.next_peer += 1;
    }
}

#[test]
#[ignore = "several processes and nats-servers for a minute, timing-sensitive: run by `cargo xtask test` with the privileged tests"]
fn a_takeover_replays_the_window_and_alarms_as_a_node_that_never_failed() {
    let dir = scratch("scaleout-takeover");
    let cluster_nats = s::Server::new(&dir, "nats-cluster", false);
    let ref_nats = s::Server::new(&dir, "nats-ref", false);
    let _servers = [cluster_nats.start(&[]), ref_nats.start(&[])];

    let mut nodes = [
        Some(s::node(&dir, "node-a", &cluster_nats.url(), SHARDS, &[])),
        Some(s::node(&dir, "node-b", &cluster_nats.url(), SHARDS, &[])),
    ];
    let _reference = s::node(&dir, "node-ref", &ref_nats.url(), SHARDS, &[]);
    let log = |n: &str| dir.join(format!("{n}.log"));
    // Both cluster nodes hold their fair part (two shards each), the reference all four.
    wait_for(
        "the nodes to share the shards",
        Duration::from_secs(40),
        || {
            (s::holds(&log("node-a")).len() == 2
                && s::holds(&log("node-b")).len() == 2
                && s::holds(&log("node-ref")).len() == 4)
                .then_some(())
        },
    );
    let shard = detector::scaleout::shard_of(HOST, SHARDS);
    let (vi, victim, survivor) = if s::holds(&log("node-a")).contains(&shard) {
        (0, "node-a", "node-b")
    } else {
        (1, "node-b", "node-a")
    };

    let (nf_cluster, nf_ref) = (tests::netns::free_udp_port(), tests::netns::free_udp_port());
    let _edges = [
        s::edge(&dir, "router-1", nf_cluster, &cluster_nats.url(), SHARDS),
        s::edge(&dir, "router-ref", nf_ref, &ref_nats.url(), SHARDS),
    ];
    // One new peer every PEER_EVERY, the same records to both worlds.
    let mut feed = Feed {
        to: [Exporter::new(nf_cluster), Exporter::new(nf_ref)],
        next_peer: 0,
        sent: 0,
    };
    // Until the victim scores the host at half the threshold or more (and below it).
    let threshold = detector::detect::evidence::Thresholds::default().score;
    let half_at = loop {
        assert!(
            feed.next_peer < 40,
            "{victim} never scored {HOST} at half the threshold"
        );
        let t = Instant::now();
        feed.send_peer();
        if let Some(sc) = s::score(&log(victim), HOST)
            && sc >= threshold / 2.0
        {
            break sc;
        }
        thread::sleep(PEER_EVERY.saturating_sub(t.elapsed()));
    };
    assert!(
        half_at < threshold,
        "{victim} scored {HOST} {half_at} already (threshold {threshold})"
    );
    // Every record sent so far is in the victim's pipeline and acknowledged (the
    // durable consumer will not deliver them again: only a replay brings them back).
    wait_for(
        "the victim to consume every record sent",
        Duration::from_secs(10),
        || (s::consumed(&log(victim)).0 == feed.sent).then_some(()),
    );
    let before_kill = feed.sent;
    let killed_at = SystemTime::now();
    nodes[vi]
        .take()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    assert!(
        s::events(&dir, victim, HOST).is_empty(),
        "{victim} alarmed before it was killed: the kill came too late for this test"
    );

    // The same pace on, until the reference and the survivor both raised.
    let raised = |n: &str| {
        s::events(&dir, n, HOST)
            .into_iter()
            .find(|e| e["state"] == "raised")
    };
    loop {
        assert!(
            feed.next_peer < 80,
            "no alarm for {HOST}: reference {:?}, survivor {:?}; survivor log:\n{}",
            raised("node-ref"),
            raised(survivor),
            std::fs::read_to_string(log(survivor)).unwrap_or_default()
        );
        let t = Instant::now();
        feed.send_peer();
        if raised("node-ref").is_some() && raised(survivor).is_some() {
            break;
        }
        thread::sleep(PEER_EVERY.saturating_sub(t.elapsed()));
    }
    let reference = raised("node-ref").unwrap();
    let took_over = raised(survivor).unwrap();
    let (t_ref, t_sur) = (s::time_of(&reference, "at"), s::time_of(&took_over, "at"));
    let gap = t_sur.duration_since(t_ref).unwrap_or_else(|e| e.duration());
    eprintln!(
        "killed {victim} at {half_at} of {threshold} ({before_kill} records); reference raised at {}, {survivor} at {} ({:.1} s apart)",
        reference["at"],
        took_over["at"],
        gap.as_secs_f64()
    );
    // The two worlds evaluate at their own phase: up to one interval apart (and the
    // records' way through two edges and servers, a few milliseconds).
    assert!(
        gap <= Duration::from_secs(s::EVAL_SECS) + Duration::from_millis(500),
        "the survivor raised {:.1} s away from the reference",
        gap.as_secs_f64()
    );
    // Its episode began where the host's activity began, before the kill: the replay
    // gave it the evidence the victim held.
    let (f_ref, f_sur) = (
        s::time_of(&reference, "first_seen"),
        s::time_of(&took_over, "first_seen"),
    );
    assert!(f_sur < killed_at, "first_seen {f_sur:?} after the kill");
    let apart = f_sur.duration_since(f_ref).unwrap_or_else(|e| e.duration());
    assert!(
        apart < Duration::from_secs(1),
        "first_seen: reference {}, survivor {}",
        reference["first_seen"],
        took_over["first_seen"]
    );
    let sent = feed.sent;
    // Both edges published every record sent (NetFlow over loopback lost none).
    wait_for(
        "the edges to publish every record",
        Duration::from_secs(10),
        || {
            (s::published(&log("router-1")) == sent && s::published(&log("router-ref")) == sent)
                .then_some(())
        },
    );
    // The survivor took the shard over and replayed exactly what the victim had taken
    // in; with what it consumed since, it counted every record once.
    assert!(s::holds(&log(survivor)).contains(&shard));
    let replays = s::numbers(&log(survivor), &format!("shard {shard}: replayed "));
    assert!(
        replays.last() == Some(&before_kill) && replays.iter().sum::<u64>() == before_kill,
        "{survivor}'s replays of shard {shard}: {replays:?}; records sent before the kill: {before_kill}"
    );
    wait_for(
        "the survivor to count every record once",
        Duration::from_secs(10),
        || {
            let (consumed, replayed) = s::consumed(&log(survivor));
            (consumed + replayed == sent).then_some(())
        },
    );
    let (consumed, replayed) = s::consumed(&log(survivor));
    assert_eq!(
        (consumed, replayed),
        (sent - before_kill, before_kill),
        "records sent {sent}, {before_kill} of them before the kill"
    );

    // Raised once, one id, in the whole cluster.
    thread::sleep(Duration::from_secs(s::EVAL_SECS * 2));
    let all: Vec<_> = [victim, survivor]
        .iter()
        .flat_map(|n| s::events(&dir, n, HOST))
        .collect();
    let raises = all.iter().filter(|e| e["state"] == "raised").count();
    let ids: std::collections::BTreeSet<_> = all.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!((raises, ids.len()), (1, 1), "events: {all:#?}");
    let st = nodes[1 - vi]
        .as_mut()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "{survivor} exited with {st}");
}
