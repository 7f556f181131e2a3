//! A rolling upgrade: three detector nodes and an edge of the previous release
//! ([`tests::release::PREVIOUS`], built from git once) run while the edge publishes a
//! BitTorrent-like host's growing swarm and a few benign hosts; once the host's alarm is
//! up, the nodes are upgraded one at a time (SIGTERM, then the binary of this tree started
//! under the same name), then the edge (in the README's order). Shards move away from
//! each stopping node and back to it when it returns (each move a replay of the window,
//! skipping what the taker holds already), old and new nodes share the leases and the
//! alarm's state meanwhile: no record is lost, none is counted twice, and the host keeps
//! one alarm, raised once.
//!
//! The truth: the records the test sent (the host's flows: four per peer), the edges'
//! count of what they published, nats-server's monitoring endpoint (batches stored, the
//! durable consumers drained), and the host's alarm events, whose `flows` and `peers` are
//! what the profile of its current owner holds.

mod scaleout_support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use scaleout_support as s;
use tests::agent::{Exporter, rec, scratch, wait_for};

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5));
const SHARDS: u32 = 6;
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

#[test]
#[ignore = "several processes and a nats-server for a minute: run by `cargo xtask test` with the privileged tests"]
fn a_rolling_upgrade_loses_no_record_and_raises_no_second_alarm() {
    // Built before anything starts: the first run builds it (minutes), later ones reuse it.
    let old = tests::release::previous_detector();
    let new = tests::detector_bin();
    let dir = scratch("scaleout-rolling");
    // Updates every evaluation: the last one says what the host's owner holds at the end.
    std::fs::write(
        dir.join("detector.toml"),
        format!("{}update_interval_secs = 2\n", s::CONFIG),
    )
    .unwrap();
    let server = s::Server::new(&dir, "nats", false);
    let _server = server.start(&[]);
    let url = server.url();
    let log = |n: &str| dir.join(format!("{n}.log"));
    let start = |bin: &std::path::Path, n: &str| s::node_of(bin, &dir, n, &url, SHARDS, &[]);
    let mut nodes: Vec<Option<tests::netns::Guarded>> =
        NODES.iter().map(|n| Some(start(&old, n))).collect();
    let all_held = || {
        let held: Vec<_> = NODES.iter().map(|n| s::holds(&log(n))).collect();
        held.iter().all(|h| h.len() == 2) && held.iter().map(|h| h.len()).sum::<usize>() == 6
    };
    wait_for(
        "the nodes to share the shards",
        Duration::from_secs(60),
        || all_held().then_some(()),
    );
    let nf = tests::netns::free_udp_port();
    let edge_log = |n: &str| dir.join(format!("router-1.{n}.log"));
    let mut old_edge = s::edge_of(&old, &dir, "router-1", nf, &url, SHARDS);

    // A new peer of the host and a flow of each benign host every second; held (the gate
    // taken) while the edge is upgraded, and a new exporter (templates first) after it.
    let sent = Arc::new(AtomicU64::new(0));
    let peers = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Mutex::new(0u32));
    let feeder = {
        let (sent, peers, stop, gate) = (sent.clone(), peers.clone(), stop.clone(), gate.clone());
        thread::spawn(move || {
            let mut to = Exporter::new(nf);
            let mut epoch = 0;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let g = gate.lock().unwrap();
                if *g != epoch {
                    (to, epoch) = (Exporter::new(nf), *g);
                }
                let now = SystemTime::now();
                let i = peers.load(Ordering::SeqCst);
                let mut recs = s::peer_records(HOST, i, now);
                recs.extend((0..6u8).map(|b| {
                    let host = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 1 + b));
                    let server = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
                    rec(host, 40_000 + u16::from(b), server, 443, 6, 10, 4_000, now)
                }));
                to.send(&recs, now);
                sent.fetch_add(recs.len() as u64, Ordering::SeqCst);
                peers.store(i + 1, Ordering::SeqCst);
                drop(g);
                thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
            }
        })
    };
    let events = || -> Vec<serde_json::Value> {
        NODES
            .iter()
            .flat_map(|n| s::events(&dir, n, HOST))
            .collect()
    };
    wait_for("the alarm", Duration::from_secs(60), || {
        events()
            .iter()
            .any(|e| e["state"] == "raised")
            .then_some(())
    });

    // One node at a time: stopped (it hands its shards back), started again by the new
    // binary, and the next only once the shards are shared again.
    let t0 = Instant::now();
    for (i, n) in NODES.iter().enumerate() {
        let st = nodes[i]
            .take()
            .unwrap()
            .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
        assert!(st.success(), "{n} exited with {st}");
        // Its log goes on in a new file; the old one is kept beside it.
        std::fs::rename(log(n), dir.join(format!("{n}.before-restart-{i}.log"))).unwrap();
        let alarms = dir.join(format!("{n}.alarms.jsonl"));
        let _ = std::fs::rename(
            &alarms,
            dir.join(format!("{n}.alarms.before-restart.jsonl")),
        );
        // As a package upgrade would: the others take its shards over meanwhile (and
        // give some back when it returns).
        wait_for(
            "the other nodes to take its shards",
            Duration::from_secs(30),
            || {
                let others: usize = NODES
                    .iter()
                    .filter(|o| *o != n)
                    .map(|o| s::holds(&log(o)).len())
                    .sum();
                (others == SHARDS as usize).then_some(())
            },
        );
        nodes[i] = Some(start(&new, n));
        wait_for(
            "the shards to be shared again",
            Duration::from_secs(60),
            || all_held().then_some(()),
        );
    }
    // Then the edge: the exporter held, the old edge publishes what it received and stops
    // (its log kept), the new one listens on the same port.
    let mut edge = {
        let mut g = gate.lock().unwrap();
        let held = sent.load(Ordering::SeqCst);
        wait_for(
            "the old edge to publish every record",
            Duration::from_secs(30),
            || (s::published(&log("router-1")) == held).then_some(()),
        );
        let st = old_edge.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
        assert!(st.success(), "the old edge exited with {st}");
        std::fs::rename(log("router-1"), edge_log("before-upgrade")).unwrap();
        let e = s::edge_of(&new, &dir, "router-1", nf, &url, SHARDS);
        *g += 1;
        e
    };
    let rolled = t0.elapsed();
    let old_published = s::published(&edge_log("before-upgrade"));
    thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    feeder.join().unwrap();
    let (sent, peers) = (sent.load(Ordering::SeqCst), peers.load(Ordering::SeqCst));
    assert!(
        t0.elapsed() < Duration::from_secs(100),
        "the run outlasted the 120 s window: the profile forgot its first records"
    );

    // A last burst of new peers (a fifth more, and some), after the restarts: the
    // host's owner sends an update, whose peers and flows are what its profile holds.
    let burst_from = SystemTime::now();
    let burst = peers / 4 + 2;
    let mut to = Exporter::new(nf);
    let mut burst_recs = Vec::new();
    for i in peers..peers + burst {
        burst_recs.extend(s::peer_records(HOST, i, burst_from));
    }
    to.send(&burst_recs, burst_from);
    let (sent, peers) = (sent + burst_recs.len() as u64, peers + burst);
    // The latest update (by its time, across the nodes' files) once it holds every peer,
    // or after 30 s: an evaluation just after the burst may precede some of its records
    // (seen in a CI check at load 80: 68 of 69 peers), and one that never gets there
    // lost a record; more would be counted twice.
    let expected = u64::from(peers);
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let latest = events()
            .into_iter()
            .filter(|e| s::time_of(e, "at") > burst_from)
            .max_by_key(|e| s::time_of(e, "at"));
        match latest {
            Some(e) if e["peers"].as_u64() >= Some(expected) || Instant::now() > deadline => {
                break e;
            }
            None if Instant::now() > deadline => {
                panic!("no update of the alarm within 30 s of the burst")
            }
            _ => thread::sleep(Duration::from_millis(250)),
        }
    };
    eprintln!(
        "{sent} records sent ({peers} peers of the host), {old_published} of them to the previous release's edge; three nodes and the edge upgraded one by one in {:.1} s; the update after the burst: {} peers, {} flows",
        rolled.as_secs_f64(),
        last["peers"],
        last["flows"]
    );
    // Every peer, four records each, once: none lost in the moves, none counted twice.
    assert_eq!(
        (last["peers"].as_u64(), last["flows"].as_u64()),
        (Some(u64::from(peers)), Some(4 * u64::from(peers))),
        "the profile of {HOST} after the restarts: {last:#}"
    );

    // The edges published every record, and the stream stored each batch once.
    wait_for(
        "the new edge to publish every record",
        Duration::from_secs(30),
        || (old_published + s::published(&log("router-1")) == sent).then_some(()),
    );
    let st = edge.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "the edge exited with {st}");
    let batches = s::last_number(&edge_log("before-upgrade"), "records published in ").unwrap()
        + s::last_number(&log("router-1"), "records published in ").unwrap();
    // Every shard's durable consumer delivered and saw acknowledged every batch.
    let drained = wait_for("the consumers to drain", Duration::from_secs(60), || {
        let j = server.jsz()?;
        let st = s::stream(&j, "DETECTOR_RECORDS")?.clone();
        let cs = st["consumer_detail"].as_array()?;
        let done = cs
            .iter()
            .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("shard-")))
            .filter(|c| c["num_pending"] == 0 && c["num_ack_pending"] == 0)
            .count();
        (done == SHARDS as usize).then_some(st)
    });
    assert_eq!(
        drained["state"]["messages"].as_u64(),
        Some(batches),
        "batches stored / published"
    );

    // One alarm, raised once, across every node and restart.
    let mut all = events();
    for n in NODES {
        let before = dir.join(format!("{n}.alarms.before-restart.jsonl"));
        all.extend(
            std::fs::read_to_string(before)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|e| e["host"] == HOST.to_string()),
        );
    }
    let raises = all.iter().filter(|e| e["state"] == "raised").count();
    let ids: std::collections::BTreeSet<_> = all.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!((raises, ids.len()), (1, 1), "events: {all:#?}");
    assert!(
        all.iter().all(|e| e["state"] != "cleared"),
        "the alarm was cleared during the restarts"
    );
}
