//! The bus survives a server loss: a three-server JetStream cluster (Debian's
//! nats-server), the record stream, the alarm stream and the key-value buckets replicated
//! three ways; an edge and two nodes given all three URLs. Mid-run, once the
//! BitTorrent-like host's alarm is up, the server that leads the record stream is killed
//! (-9), then the node that owns the host's shard; the other node takes the shards over
//! (leases move while a server is down), the server is restarted and the run goes on.
//! Every record the edge published is in the surviving node's pipeline once, and the host
//! has one alarm, raised once.
//!
//! The truth: the records the test sent, the edge's own count of what it published, and
//! nats-server's monitoring endpoint (replicas, leaders, stored batches).

mod scaleout_support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use scaleout_support as s;
use tests::agent::{Exporter, rec, scratch, wait_for};

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5));
const SHARDS: u32 = 4;

/// A benign host of each shard's share: one HTTPS flow a second.
fn benign(i: u32, at: SystemTime) -> detector::flow::FlowRecord {
    let host = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 1 + i as u8));
    let server = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    rec(host, 40_000 + i as u16, server, 443, 6, 10, 4_000, at)
}

#[test]
#[ignore = "three nats-servers and several processes for a few minutes: run by `cargo xtask test` with the privileged tests"]
fn a_server_loss_loses_no_record_and_keeps_one_alarm() {
    let dir = scratch("scaleout-cluster");
    let servers: Vec<s::Server> = (1..=3)
        .map(|i| s::Server::new(&dir, &format!("nats-{i}"), true))
        .collect();
    let routes: Vec<u16> = servers.iter().map(|s| s.route.unwrap()).collect();
    let others = |i: usize| -> Vec<u16> {
        routes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, r)| *r)
            .collect()
    };
    // Started together: JetStream needs a quorum of them to elect its leader.
    let mut running: Vec<Option<tests::netns::Guarded>> = thread::scope(|sc| {
        let hs: Vec<_> = servers
            .iter()
            .enumerate()
            .map(|(i, srv)| {
                let r = others(i);
                sc.spawn(move || srv.start(&r))
            })
            .collect();
        hs.into_iter().map(|h| Some(h.join().unwrap())).collect()
    });
    let urls = servers
        .iter()
        .map(s::Server::url)
        .collect::<Vec<_>>()
        .join(",");

    let log = |n: &str| dir.join(format!("{n}.log"));
    let mut nodes = [
        Some(s::node(
            &dir,
            "node-a",
            &urls,
            SHARDS,
            &["--nats-replicas", "3"],
        )),
        Some(s::node(
            &dir,
            "node-b",
            &urls,
            SHARDS,
            &["--nats-replicas", "3"],
        )),
    ];
    wait_for(
        "the nodes to share the shards",
        Duration::from_secs(60),
        || {
            (s::holds(&log("node-a")).len() == 2 && s::holds(&log("node-b")).len() == 2)
                .then_some(())
        },
    );
    let nf = tests::netns::free_udp_port();
    let mut edge = s::edge(&dir, "router-1", nf, &urls, SHARDS);

    // Every stream and bucket is replicated three ways (on the first server: it holds a
    // copy of each, being one of the three).
    let j = servers[0].jsz().expect("monitoring");
    for name in [
        "DETECTOR_RECORDS",
        "DETECTOR_ALARMS",
        "KV_detector-leases",
        "KV_detector-alarms",
        "KV_detector-config",
    ] {
        let st = s::stream(&j, name).unwrap_or_else(|| panic!("no stream {name}: {j:#}"));
        // This server's copy and the others' it lists.
        let copies = 1 + st["cluster"]["replicas"].as_array().map_or(0, Vec::len);
        assert_eq!(copies, 3, "{name}: {st:#}");
    }

    // The traffic: a new peer of the torrent host and a flow of each benign host every
    // second, until told to stop.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (sent, stop) = (sent.clone(), stop.clone());
        thread::spawn(move || {
            let mut to = Exporter::new(nf);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let now = SystemTime::now();
                let mut recs = s::peer_records(HOST, i, now);
                recs.extend((0..8).map(|b| benign(b, now)));
                to.send(&recs, now);
                sent.fetch_add(recs.len() as u64, Ordering::SeqCst);
                i += 1;
                thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
            }
        })
    };
    let events = || -> Vec<serde_json::Value> {
        ["node-a", "node-b"]
            .iter()
            .flat_map(|n| s::events(&dir, n, HOST))
            .collect()
    };
    wait_for("the alarm", Duration::from_secs(90), || {
        events()
            .iter()
            .any(|e| e["state"] == "raised")
            .then_some(())
    });

    // Kill the record stream's leader.
    let j = servers[0].jsz().expect("monitoring");
    let leader = s::stream(&j, "DETECTOR_RECORDS").unwrap()["cluster"]["leader"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let li = servers
        .iter()
        .position(|srv| srv.name == leader)
        .unwrap_or_else(|| panic!("no leader of DETECTOR_RECORDS named: {j:#}"));
    running[li]
        .take()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    let server_killed = Instant::now();
    // With a server down, the owner of the host's shard dies too.
    thread::sleep(Duration::from_secs(3));
    let shard = detector::scaleout::shard_of(HOST, SHARDS);
    let vi = if s::holds(&log("node-a")).contains(&shard) {
        0
    } else {
        1
    };
    let (victim, survivor) = [("node-a", "node-b"), ("node-b", "node-a")][vi];
    nodes[vi]
        .take()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    // Leases move while the server is down: the survivor holds every shard.
    wait_for(
        "the survivor to take every shard",
        Duration::from_secs(60),
        || (s::holds(&log(survivor)).len() == SHARDS as usize).then_some(()),
    );
    let moved_after = server_killed.elapsed();
    // The server comes back (its store kept) and catches up.
    thread::sleep(Duration::from_secs(5));
    let others_now = others(li);
    running[li] = Some(servers[li].start(&others_now));
    thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::SeqCst);
    feeder.join().unwrap();
    let sent = sent.load(Ordering::SeqCst);

    // The edge published every record sent, shed none.
    wait_for(
        "the edge to publish every record",
        Duration::from_secs(60),
        || (s::published(&log("router-1")) == sent).then_some(()),
    );
    let st = edge.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "the edge exited with {st}");
    assert_eq!(
        s::last_number(&log("router-1"), "batches, "),
        Some(0),
        "records shed at the edge"
    );
    let batches = s::last_number(&log("router-1"), "records published in ").unwrap();

    // Every record once in the survivor's pipeline: its shards' from the start, the
    // victim's through the replay of the window and what it consumed after.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (consumed, replayed) = s::consumed(&log(survivor));
        if consumed + replayed >= sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{survivor} holds {consumed} + {replayed} of {sent} records"
        );
        thread::sleep(Duration::from_millis(500));
    }
    thread::sleep(Duration::from_secs(3));
    let (consumed, replayed) = s::consumed(&log(survivor));
    // The stream stored each batch once (the edge retried through the leader change
    // with the same message ids).
    let j = servers[(li + 1) % 3].jsz().expect("monitoring");
    let stored = s::stream(&j, "DETECTOR_RECORDS").unwrap()["state"]["messages"]
        .as_u64()
        .unwrap();
    eprintln!(
        "{sent} records sent, published in {batches} batches, {stored} batches stored; {leader} killed and restarted, {victim} killed, every shard on {survivor} {:.1} s after the server loss; {survivor}: {consumed} consumed + {replayed} replayed",
        moved_after.as_secs_f64()
    );
    assert_eq!(stored, batches, "batches stored / published");
    assert_eq!(
        consumed + replayed,
        sent,
        "{survivor}: records consumed + replayed / sent"
    );

    // One alarm: raised once, one id; the survivor continued it.
    let ev = events();
    let raises = ev.iter().filter(|e| e["state"] == "raised").count();
    let ids: std::collections::BTreeSet<_> = ev.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!((raises, ids.len()), (1, 1), "events: {ev:#?}");
    // The victim raised it (it owned the host's shard): the survivor went on with it.
    if s::events(&dir, victim, HOST)
        .iter()
        .any(|e| e["state"] == "raised")
    {
        let continued = s::events(&dir, survivor, HOST);
        assert!(
            !continued.is_empty() && continued.iter().all(|e| e["state"] != "raised"),
            "{survivor} should continue {victim}'s alarm: {ev:#?}"
        );
    }
    assert!(
        ["node-a", "node-b"].iter().all(|n| {
            std::fs::read_to_string(dir.join(format!("{n}.alarms.jsonl")))
                .unwrap_or_default()
                .lines()
                .all(|l| !l.contains("10.20.1."))
        }),
        "a benign host alarmed"
    );
    let st = nodes[1 - vi]
        .as_mut()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "{survivor} exited with {st}");
}
