//! Scale-out end to end, in network namespaces, with a real nats-server (JetStream on):
//! three edge agents metering their own uplinks (two of them see the same traffic, like
//! two routers on one path) publish to NATS; two detector nodes share the shards. A
//! BitTorrent-like host seen by both routers gives exactly one alarm that lists both;
//! killing (-9) the node that owns its shard mid-run does not stop the alarm, nor make it
//! twice, and every batch the edges published is stored once and acknowledged.
//!
//! The truth: the frames the test sent (which host, which routers), the edges' own count
//! of what they published, and nats-server's monitoring endpoint (stream and consumer
//! state), independent of the nodes.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::agent::last_number;
use tests::frames::{ETH_P_IP, ethernet, frame, ipv4, send_frames, tcp, udp};
use tests::netns::{Guarded, Netns, sh, wait_for_text};

const TORRENT_HOST: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 5);
const BENIGN_HOST: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 9);
const SHARDS: u32 = 4;

fn scratch() -> PathBuf {
    let d = tests::workspace_root().join("target/scaleout-test");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xc612_0100 + i) // 198.18.1.0/24 and up
}

/// One second of a BitTorrent client's inbound traffic: 60 peers, each on its own port
/// (some on client defaults), TCP payload and small UDP datagrams (DHT) to the client's
/// listening port 51413.
fn torrent_second(second: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..60u32 {
        let port = match i % 10 {
            0 => 6881 + (i % 9) as u16,
            1 => 51413,
            _ => 20_000 + (i * 97 % 40_000) as u16,
        };
        let payload = vec![0x5a; 600];
        let t = [&tcp(port, 51413, 0x18)[..], &payload].concat();
        let ip = ipv4(peer(i), TORRENT_HOST, 6, 0, 0, &[], &t);
        out.push(frame(&[&ethernet(&[], ETH_P_IP), &ip]));
        if (i + second).is_multiple_of(2) {
            let u = [&udp(port, 51413, 90)[..], &[0x64; 90]].concat();
            let ip = ipv4(peer(i), TORRENT_HOST, 17, 0, 0, &[], &u);
            out.push(frame(&[&ethernet(&[], ETH_P_IP), &ip]));
        }
    }
    out
}

/// One second of a benign host: a few HTTPS servers.
fn benign_second() -> Vec<Vec<u8>> {
    (0..4u32)
        .map(|i| {
            let t = [&tcp(443, 40_000 + i as u16, 0x18)[..], &[0u8; 1200]].concat();
            let ip = ipv4(peer(200 + i), BENIGN_HOST, 6, 0, 0, &[], &t);
            frame(&[&ethernet(&[], ETH_P_IP), &ip])
        })
        .collect()
}

/// nats-server's monitoring endpoint, read from inside `ns`.
fn jsz(ns: &Netns) -> Value {
    let out = ns.exec_ok(
        "curl",
        &[
            "-sf",
            "http://127.0.0.1:8222/jsz?accounts=true&streams=true&consumers=true",
        ],
    );
    serde_json::from_slice(&out.stdout).expect("jsz JSON")
}

fn stream<'a>(j: &'a Value, name: &str) -> Option<&'a Value> {
    j["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"] == name)
}

fn start(ns: &Netns, what: &str, args: &[&str], log: &Path) -> Guarded {
    let child = ns
        .command(tests::detector_bin().to_str().unwrap())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("start the detector");
    Guarded::new(what, child)
}

/// Which node holds `shard`'s lease now, from their logs (the last take or give-back).
fn owner(logs: &[(&str, PathBuf)], shard: u32) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for (node, log) in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let took = format!("took shard {shard}\n");
        let gave = format!("gave shard {shard} back");
        let last_take = text.rfind(&took);
        let last_give = text.rfind(&gave);
        if let Some(t) = last_take
            && last_give.is_none_or(|g| g < t)
        {
            best = Some((t, node.to_string()));
        }
    }
    best.map(|b| b.1)
}

fn count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn one_alarm_across_routers_and_a_killed_node() {
    let dir = scratch();
    // Namespaces: ctl (nats-server and both nodes), three edges, and the generator that
    // feeds each edge's uplink.
    let ctl = Netns::new("dsctl");
    let gen_ns = Netns::new("dsgen");
    let edges: Vec<Netns> = (1..=3).map(|i| Netns::new(&format!("dsedge{i}"))).collect();
    // A veth pair between two namespaces, both ends up.
    let link = |a: &Netns, a_if: &str, b: &Netns, b_if: &str| {
        sh(
            "ip",
            &[
                "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
                "netns", &b.name,
            ],
        );
        a.exec_ok("ip", &["link", "set", a_if, "up"]);
        b.exec_ok("ip", &["link", "set", b_if, "up"]);
    };
    for (i, e) in edges.iter().enumerate() {
        let i = i + 1;
        // The edge's uplink, fed by the generator; its way to NATS.
        link(e, "up0", &gen_ns, &format!("gen{i}"));
        link(e, "ctl0", &ctl, &format!("e{i}"));
        e.exec_ok(
            "ip",
            &["addr", "add", &format!("10.98.{i}.1/30"), "dev", "ctl0"],
        );
        ctl.exec_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.98.{i}.2/30"),
                "dev",
                &format!("e{i}"),
            ],
        );
    }

    // nats-server with JetStream, its store in the scratch directory.
    let store = dir.join("jetstream");
    let nats_log = dir.join("nats-server.log");
    let nats = ctl
        .command("nats-server")
        .args(["-js", "-a", "0.0.0.0", "-p", "4222", "-m", "8222", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(File::create(&nats_log).unwrap())
        .spawn()
        .expect("nats-server (package nats-server)");
    let _nats = Guarded::new("nats-server", nats);
    wait_for_text(&nats_log, "Server is ready", Duration::from_secs(20));

    // Two detector nodes.
    let node_args = |name: &str| -> Vec<String> {
        [
            "central",
            "--nats",
            "nats://127.0.0.1:4222",
            "--shards",
            &SHARDS.to_string(),
            "--node",
            name,
            "--lease-secs",
            "3",
            "--ack-wait-secs",
            "3",
            "--internal",
            "10.20.0.0/16",
            "--stats-interval",
            "1",
            "--alarms-json",
            dir.join(format!("{name}.alarms.jsonl")).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let logs: Vec<(&str, PathBuf)> = ["node-a", "node-b"]
        .iter()
        .map(|n| (*n, dir.join(format!("{n}.log"))))
        .collect();
    let mut nodes: Vec<Option<Guarded>> = logs
        .iter()
        .map(|(n, log)| {
            let a = node_args(n);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            Some(start(&ctl, n, &a, log))
        })
        .collect();
    for (_, log) in &logs {
        wait_for_text(log, "took shard", Duration::from_secs(30));
    }

    // Three edges; 1 and 2 are routers on one path (they get the same frames).
    let edge_logs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("edge{i}.log"))).collect();
    let mut agents: Vec<Guarded> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let i = i + 1;
            let url = format!("nats://10.98.{i}.2:4222");
            let name = format!("router-{i}");
            let json = dir.join(format!("edge{i}.flows.jsonl"));
            let g = start(
                e,
                &name,
                &[
                    "run",
                    "--iface",
                    "up0",
                    "--xdp-mode",
                    "native",
                    "--pin-path",
                    "none",
                    "--internal",
                    "10.20.0.0/16",
                    "--nats",
                    &url,
                    "--nats-shards",
                    &SHARDS.to_string(),
                    "--agent-name",
                    &name,
                    "--active-timeout",
                    "4",
                    "--inactive-timeout",
                    "2",
                    "--flows-json",
                    json.to_str().unwrap(),
                    "--stats-interval",
                    "1",
                ],
                &edge_logs[i - 1],
            );
            wait_for_text(&edge_logs[i - 1], "metering up0", Duration::from_secs(30));
            g
        })
        .collect();

    // Both nodes hold their fair part before traffic starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..SHARDS).any(|s| owner(&logs, s).is_none())
        || logs.iter().any(|(_, l)| count(l, "took shard") < 2)
    {
        assert!(
            Instant::now() < deadline,
            "the nodes did not share the shards"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let shard = detector::scaleout::shard_of(TORRENT_HOST.into(), SHARDS);
    let victim = owner(&logs, shard).expect("an owner");

    // Traffic; the owner of the torrent host's shard is killed once it raised the alarm
    // (the hard case: the next owner must continue that episode, not raise another).
    let feed = |seconds: std::ops::Range<u32>| {
        let g = gen_ns.spawn(move || {
            for s in seconds {
                let t = Instant::now();
                let f = torrent_second(s);
                send_frames("gen1", &f);
                send_frames("gen2", &f);
                send_frames("gen3", &benign_second());
                if let Some(rest) = Duration::from_secs(1).checked_sub(t.elapsed()) {
                    thread::sleep(rest);
                }
            }
        });
        g.join().unwrap();
    };
    let vi = logs.iter().position(|(n, _)| *n == victim).unwrap();
    let victim_alarms = dir.join(format!("{victim}.alarms.jsonl"));
    let mut second = 0;
    while !std::fs::read_to_string(&victim_alarms)
        .is_ok_and(|t| t.contains("\"raised\"") && t.contains(&TORRENT_HOST.to_string()))
    {
        assert!(second < 60, "{victim} never raised the alarm");
        feed(second..second + 1);
        second += 1;
    }
    let mut killed = nodes[vi].take().unwrap();
    killed.stop(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    let survivor = &logs[1 - vi];
    let survivor_alarms = dir.join(format!("{}.alarms.jsonl", survivor.0));
    feed(second..second + 30);

    // The survivor takes the shard over and the alarm comes (or came before the kill).
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = || -> Vec<Value> {
        logs.iter()
            .flat_map(|(n, _)| {
                std::fs::read_to_string(dir.join(format!("{n}.alarms.jsonl")))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect::<Vec<_>>()
            })
            .filter(|e| e["host"] == TORRENT_HOST.to_string())
            .collect()
    };
    loop {
        let ev = events();
        let both = ev.iter().any(|e| {
            let ex = e["exporters"].to_string();
            ex.contains("router-1") && ex.contains("router-2")
        });
        // The survivor scored the host too (it holds the shard and alarms on it).
        let continued = std::fs::read_to_string(&survivor_alarms)
            .is_ok_and(|t| t.contains(&TORRENT_HOST.to_string()));
        if both && continued && owner(&logs[1 - vi..=1 - vi], shard).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alarm for {TORRENT_HOST} listing both routers; events: {ev:?}\nsurvivor log:\n{}",
            std::fs::read_to_string(&survivor.1).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(500));
    }

    // Stop the edges (they publish what they hold), then let the survivor drain.
    for a in agents.iter_mut() {
        let st = a.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
        assert!(st.success(), "{} exited with {st}", a.what);
    }
    let published: u64 = edge_logs
        .iter()
        .map(|l| last_number(l, "records published in ").unwrap_or(0))
        .sum();
    let records_published: u64 = edge_logs
        .iter()
        .map(|l| {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            let line = text
                .lines()
                .rev()
                .find(|l| l.contains("records published in"))
                .unwrap_or_default()
                .to_string();
            line.split("NATS ")
                .nth(1)
                .and_then(|r| r.split(": ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(records_published > 0, "the edges published nothing");
    let shed: u64 = edge_logs
        .iter()
        .map(|l| last_number(l, "batches, ").unwrap_or(0))
        .sum();
    assert_eq!(shed, 0, "records shed at the edges");

    let deadline = Instant::now() + Duration::from_secs(60);
    let j = loop {
        let j = jsz(&ctl);
        let flows = stream(&j, "DETECTOR_RECORDS")
            .expect("the record stream")
            .clone();
        // The stream keeps consumed batches (a takeover replays them): drained is every
        // shard's durable consumer with nothing left to deliver or to see acknowledged.
        let drained = flows["consumer_detail"].as_array().is_some_and(|cs| {
            cs.iter()
                .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("shard-")))
                .map(|c| (c["num_pending"] == 0 && c["num_ack_pending"] == 0) as usize)
                .sum::<usize>()
                == SHARDS as usize
        });
        if drained {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "batches left unacknowledged: {flows:#}"
        );
        thread::sleep(Duration::from_millis(500));
    };
    // Every batch the edges published was stored once (retries dropped by message id)
    // and acknowledged by a node.
    let flows = stream(&j, "DETECTOR_RECORDS").unwrap();
    assert_eq!(
        flows["state"]["last_seq"].as_u64(),
        Some(published),
        "stored batches differ from the edges' published count"
    );
    let alarms_stream = stream(&j, "DETECTOR_ALARMS").expect("the alarm stream");
    assert!(alarms_stream["state"]["messages"].as_u64().unwrap_or(0) >= 1);

    // One alarm for the host: one id, raised once, whoever scored it.
    let ev = events();
    let ids: std::collections::BTreeSet<String> = ev
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("").to_string())
        .collect();
    let raised = ev.iter().filter(|e| e["state"] == "raised").count();
    assert_eq!(ids.len(), 1, "alarm ids: {ids:?}");
    assert_eq!(raised, 1, "raised {raised} times: {ev:#?}");
    let survivor_states: Vec<String> = std::fs::read_to_string(&survivor_alarms)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["host"] == TORRENT_HOST.to_string())
        .map(|e| e["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !survivor_states.is_empty() && survivor_states.iter().all(|s| s != "raised"),
        "the survivor should continue the episode: {survivor_states:?}"
    );
    // The benign host never alarmed; nothing failed to decode.
    for (n, log) in &logs {
        let text =
            std::fs::read_to_string(dir.join(format!("{n}.alarms.jsonl"))).unwrap_or_default();
        assert!(
            !text.contains(&BENIGN_HOST.to_string()),
            "{n} alarmed the benign host"
        );
        assert_eq!(
            last_number(log, "batches (").unwrap_or(0),
            0,
            "{n}: malformed"
        );
    }
    // The survivor stops cleanly and hands its shards back.
    let si = 1 - vi;
    let st = nodes[si]
        .as_mut()
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(st.success());
    eprintln!(
        "{published} batches ({records_published} records) published by 3 edges, all acknowledged; {victim} killed; one alarm {ids:?}"
    );
    drop(gen_ns);
    drop(edges);
}
