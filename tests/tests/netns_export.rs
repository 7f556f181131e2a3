//! End to end in network namespaces: the agent meters one end of a veth in native XDP
//! mode (plus TC egress) while known traffic crosses it both ways, and exports NetFlow v9
//! to a real nfcapd. The truth is independent of the agent: a packet capture of the same
//! interface (dumpcap, decoded by tshark) and the senders' own counts. Every flow of the
//! test traffic must be in `nfdump`'s reading of the export with exact packets and bytes
//! per direction, and tshark must decode the export datagrams without a malformed-packet
//! or warning-level expert item.
//!
//! Privileged: run by `cargo xtask test` as root.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use nix::sys::signal::Signal;
use tests::netns::{Guarded, Netns, sh, veth, wait_for_text};

const A4: &str = "10.77.0.1";
const B4: &str = "10.77.0.2";
const A6: &str = "fd77::1";
const B6: &str = "fd77::2";

/// (protocol, src, src port, dst, dst port, egress?) -> (packets, bytes).
type FlowId = (u8, IpAddr, u16, IpAddr, u16, bool);
type Totals = BTreeMap<FlowId, (u64, u64)>;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("detector-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ours(a: IpAddr) -> bool {
    [A4, B4, A6, B6]
        .iter()
        .any(|x| x.parse::<IpAddr>().unwrap() == a)
}

fn a_side(a: IpAddr) -> bool {
    a == A4.parse::<IpAddr>().unwrap() || a == A6.parse::<IpAddr>().unwrap()
}

/// Per-flow totals of the test traffic in a capture, read with tshark. Neighbour
/// discovery (ICMPv6 133-137) is left out: the kernel sends it on its own schedule,
/// possibly outside the agent's lifetime.
fn capture_totals(pcap: &Path) -> Totals {
    let mut t = Totals::new();
    for p in tests::tshark::packets(pcap) {
        let (proto, src, sp, dst, dp) = p.tuple;
        if !ours(src) || !ours(dst) || (proto == 58 && (133 << 8..138 << 8).contains(&dp)) {
            continue;
        }
        let e = t.entry((proto, src, sp, dst, dp, a_side(src))).or_default();
        e.0 += 1;
        e.1 += p.bytes;
    }
    t
}

/// Per-flow totals of what nfcapd stored, read with `nfdump -o json`, summing the
/// several records a long flow is exported as.
fn nfdump_totals(dir: &Path) -> (Totals, u64, u64) {
    let out = sh("nfdump", &["-R", dir.to_str().unwrap(), "-o", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let records: Vec<serde_json::Value> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&text).expect("nfdump json")
    };
    let mut t = Totals::new();
    let (mut all_p, mut all_b) = (0, 0);
    for r in &records {
        let addr = |k4: &str, k6: &str| -> IpAddr {
            r.get(k4)
                .or_else(|| r.get(k6))
                .and_then(|v| v.as_str())
                .expect("address")
                .parse()
                .unwrap()
        };
        let (src, dst) = (
            addr("src4_addr", "src6_addr"),
            addr("dst4_addr", "dst6_addr"),
        );
        let u = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let proto = u("proto") as u8;
        let (sp, dp) = if proto == 1 || proto == 58 {
            (0, (u("icmp_type") << 8 | u("icmp_code")) as u16)
        } else {
            (u("src_port") as u16, u("dst_port") as u16)
        };
        let (p, b) = (u("in_packets"), u("in_bytes"));
        all_p += p;
        all_b += b;
        if !ours(src) || !ours(dst) || (proto == 58 && (133 << 8..138 << 8).contains(&dp)) {
            continue;
        }
        let egress = u("direction") == 1;
        let e = t.entry((proto, src, sp, dst, dp, egress)).or_default();
        e.0 += p;
        e.1 += b;
    }
    (t, all_p, all_b)
}

fn tcp_transfer(
    server_ns: &Netns,
    client_ns: &Netns,
    addr: SocketAddr,
    up: usize,
    down: usize,
    chunks: usize,
    pause: Duration,
) {
    let listener = server_ns.run(move || TcpListener::bind(addr).expect("bind"));
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), up);
        s.write_all(&vec![7u8; down]).unwrap();
    });
    client_ns.run(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        let chunk = up / chunks;
        for i in 0..chunks {
            let n = if i + 1 == chunks {
                up - chunk * i
            } else {
                chunk
            };
            c.write_all(&vec![1u8; n]).unwrap();
            thread::sleep(pause);
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), down);
    });
    server.join().unwrap();
}

/// Sends `count` datagrams of `size` bytes from `from` (in `ns`) to `to`; returns the flow
/// key and the totals on the wire (IP length = payload + 8 + IP header).
fn udp_burst(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    count: u64,
    size: usize,
) -> (FlowId, (u64, u64)) {
    ns.run(move || {
        let s = UdpSocket::bind(from).unwrap();
        let payload = vec![0x42u8; size];
        for i in 0..count {
            s.send_to(&payload, to).unwrap();
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let ip_hdr = if to.is_ipv4() { 20 } else { 40 };
    (
        (
            17,
            from.ip(),
            from.port(),
            to.ip(),
            to.port(),
            a_side(from.ip()),
        ),
        (count, count * (size + 8 + ip_hdr) as u64),
    )
}

/// A UDP sink in `ns` so the bursts do not draw ICMP port-unreachable errors.
fn udp_sink(ns: &Netns, at: SocketAddr) {
    let s = ns.run(move || UdpSocket::bind(at).unwrap());
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while s.recv(&mut buf).is_ok() {}
    });
}

struct Lab {
    a: Netns,
    b: Netns,
    dir: PathBuf,
}

/// Where the agents of this test process pin their state: a BPF file system of its own
/// (mounted here when first asked for, unmounted with the lab). `ip netns exec` gives
/// each agent a fresh /sys, so /sys/fs/bpf would be a file system that dies with the
/// agent; this mount belongs to the test's namespace and outlives any agent.
fn pin_base() -> PathBuf {
    let p = PathBuf::from(format!("/tmp/detector-bpffs-{}", std::process::id()));
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&p)
        .output()
        .unwrap();
    if !String::from_utf8_lossy(&fs.stdout).contains("bpf") {
        std::fs::create_dir_all(&p).unwrap();
        let m = sh("mount", &["-t", "bpf", "bpf", p.to_str().unwrap()]);
        assert!(m.status.success(), "mount bpffs: {m:?}");
    }
    p
}

impl Drop for Lab {
    fn drop(&mut self) {
        let p = pin_base();
        let _ = Command::new("umount").arg("-l").arg(&p).status();
        let _ = std::fs::remove_dir(&p);
    }
}

fn lab(name: &str) -> Lab {
    let a = Netns::new(&format!("{name}-a"));
    let b = Netns::new(&format!("{name}-b"));
    veth(
        &a,
        "dta0",
        (&format!("{A4}/24"), &format!("{A6}/64")),
        &b,
        "dtb0",
        (&format!("{B4}/24"), &format!("{B6}/64")),
    );
    Lab {
        a,
        b,
        dir: scratch(name),
    }
}

fn start_capture(ns: &Netns, iface: &str, filter: Option<&str>, out: &Path) -> Guarded {
    let log = out.with_extension("log");
    let mut c = ns.command("dumpcap");
    c.args(["-q", "-i", iface, "-w", out.to_str().unwrap()]);
    if let Some(f) = filter {
        c.args(["-f", f]);
    }
    let child = c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("dumpcap (package tshark/wireshark-common)");
    let g = Guarded::new("dumpcap", child);
    wait_for_text(&log, "Capturing on", Duration::from_secs(10));
    g
}

fn start_agent(ns: &Netns, args: &[&str], log: &Path) -> Guarded {
    start_agent_with(
        ns.command(tests::detector_bin().to_str().unwrap()),
        args,
        log,
    )
}

/// The agent started by `cmd` (in the namespace, one way or another).
fn start_agent_with(mut cmd: Command, args: &[&str], log: &Path) -> Guarded {
    cmd.arg("run").args(args);
    if !args.contains(&"--pin-path") {
        cmd.arg("--pin-path").arg(pin_base());
    }
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start the agent");
    let g = Guarded::new("detector", child);
    wait_for_text(log, "metering dta0", Duration::from_secs(30));
    g
}

/// A hexadecimal capability set of a `/proc/.../status` text.
fn cap_field(status: &str, key: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key}"));
    u64::from_str_radix(line[key.len()..].trim(), 16).unwrap()
}

/// Every thread of `pid`: the main one holds CAP_NET_ADMIN only, the others nothing.
fn check_capabilities(pid: u32, log: &Path) {
    const CAP_NET_ADMIN: u64 = 1 << 12;
    wait_for_text(log, "privileges: dropped", Duration::from_secs(10));
    let mut threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let name = std::fs::read_to_string(t.join("comm")).unwrap();
        let (eff, prm) = (cap_field(&status, "CapEff:"), cap_field(&status, "CapPrm:"));
        let main = t.file_name().unwrap().to_str().unwrap() == pid.to_string();
        if main {
            assert_eq!((eff, prm), (CAP_NET_ADMIN, CAP_NET_ADMIN), "main thread");
            assert_eq!(cap_field(&status, "CapBnd:"), CAP_NET_ADMIN, "bounding set");
            assert!(status.contains("NoNewPrivs:\t1"), "no_new_privs");
        } else {
            assert_eq!((eff, prm), (0, 0), "thread {}", name.trim());
        }
        threads += 1;
    }
    assert!(threads > 3, "{threads} threads");
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn every_packet_crossing_the_interface_is_exported_exactly_to_nfcapd() {
    let lab = lab("dte2e");
    let (a, b, dir) = (&lab.a, &lab.b, &lab.dir);
    let nfdir = dir.join("nfcapd");
    std::fs::create_dir_all(&nfdir).unwrap();
    let port = "9995";
    let nfcapd = a
        .command("nfcapd")
        .args(["-w", nfdir.to_str().unwrap(), "-p", port, "-b", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nfcapd (package nfdump)");
    let mut nfcapd = Guarded::new("nfcapd", nfcapd);
    let mut truth_cap = start_capture(a, "dta0", None, &dir.join("truth.pcapng"));
    let mut export_cap = start_capture(
        a,
        "lo",
        Some(&format!("udp port {port}")),
        &dir.join("export.pcapng"),
    );
    let log = dir.join("agent.log");
    let json = dir.join("flows.json");
    let mut agent = start_agent(
        a,
        &[
            "--iface",
            "dta0",
            "--xdp-mode",
            "native",
            "--export",
            &format!("127.0.0.1:{port}"),
            "--flows-json",
            json.to_str().unwrap(),
            "--active-timeout",
            "3",
            "--inactive-timeout",
            "2",
            "--stats-interval",
            "0",
            "--http",
            "127.0.0.1:9751",
        ],
        &log,
    );

    // Least privilege: once attached, the agent's main thread holds CAP_NET_ADMIN only
    // (to detach at exit), in its bounding set too, with no_new_privs; every other
    // thread holds nothing. The export below shows it still meters and exports exactly.
    check_capabilities(agent.child.as_ref().unwrap().id(), &log);

    // Known traffic, both directions.
    let mut sent = Totals::new();
    udp_sink(a, format!("{A4}:6001").parse().unwrap());
    udp_sink(b, format!("{B4}:6002").parse().unwrap());
    udp_sink(a, format!("[{A6}]:6003").parse().unwrap());
    for (ns, from, to, n, size) in [
        (b, format!("{B4}:7001"), format!("{A4}:6001"), 500, 1000),
        (a, format!("{A4}:7002"), format!("{B4}:6002"), 300, 200),
        (b, format!("[{B6}]:7003"), format!("[{A6}]:6003"), 200, 1200),
    ] {
        let (k, v) = udp_burst(ns, from.parse().unwrap(), to.parse().unwrap(), n, size);
        sent.insert(k, v);
    }
    tcp_transfer(
        a,
        b,
        format!("{A4}:5001").parse().unwrap(),
        300_000,
        50_000,
        1,
        Duration::ZERO,
    );
    tcp_transfer(
        a,
        b,
        format!("[{A6}]:5002").parse().unwrap(),
        123_457,
        999,
        1,
        Duration::ZERO,
    );
    // A slow flow that outlives the active timeout: exported as several delta records.
    tcp_transfer(
        b,
        a,
        format!("{B4}:5003").parse().unwrap(),
        1200,
        10,
        12,
        Duration::from_millis(500),
    );
    b.exec_ok("ping", &["-c", "5", "-i", "0.2", A4]);
    b.exec_ok("ping", &["-6", "-c", "4", "-i", "0.2", A6]);
    // The status server's meter counters, a second after the traffic (they are read
    // once a second).
    thread::sleep(Duration::from_millis(1500));
    let metrics = a.run(|| {
        ureq::get("http://127.0.0.1:9751/metrics")
            .call()
            .expect("GET /metrics")
            .into_string()
            .unwrap()
    });

    let st = agent.stop(Signal::SIGINT, Duration::from_secs(20));
    assert!(
        st.success(),
        "agent exit status {st}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    thread::sleep(Duration::from_millis(500));
    truth_cap.stop(Signal::SIGINT, Duration::from_secs(10));
    export_cap.stop(Signal::SIGINT, Duration::from_secs(10));
    nfcapd.stop(Signal::SIGTERM, Duration::from_secs(10));
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(!agent_log.contains("ringbuf_dropped"), "{agent_log}");

    let truth = capture_totals(&dir.join("truth.pcapng"));
    let (exported, all_p, all_b) = nfdump_totals(&nfdir);
    // The capture is the reference; the senders' counts confirm it for UDP.
    for (k, v) in &sent {
        assert_eq!(truth.get(k), Some(v), "capture vs sender for {k:?}");
    }
    let icmp_echo = truth.keys().filter(|k| k.0 == 1 || k.0 == 58).count();
    assert_eq!(
        icmp_echo, 4,
        "echo request/reply flows for v4 and v6: {truth:?}"
    );
    assert!(
        truth.len() >= 13,
        "test traffic missing from the capture: {truth:?}"
    );
    let mut diffs = Vec::new();
    for (k, v) in &truth {
        if exported.get(k) != Some(v) {
            diffs.push(format!(
                "{k:?}: capture {v:?}, nfdump {:?}",
                exported.get(k)
            ));
        }
    }
    for (k, v) in &exported {
        if !truth.contains_key(k) {
            diffs.push(format!("{k:?}: nfdump {v:?}, not in the capture"));
        }
    }
    assert!(diffs.is_empty(), "mismatches:\n{}", diffs.join("\n"));
    // /metrics counted every test packet in the kernel before the stop, and no more than
    // was exported in the end; promtool finds nothing to say about the text.
    let sample = |name: &str, direction: &str| -> u64 {
        let prefix = format!("{name}{{direction=\"{direction}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{prefix} not in /metrics:\n{metrics}"))
            .parse()
            .unwrap()
    };
    let scraped: u64 = ["ingress", "egress"]
        .iter()
        .map(|d| {
            sample("detector_meter_flow_packets_total", d)
                + sample("detector_meter_overflow_packets_total", d)
        })
        .sum();
    let test_packets: u64 = truth.values().map(|v| v.0).sum();
    assert!(
        test_packets <= scraped && scraped <= all_p,
        "/metrics counted {scraped} packets: the test sent {test_packets}, nfcapd got {all_p}"
    );
    if let Err(e) = tests::promtool_check(&metrics) {
        panic!("promtool check metrics on the meter's counters: {e}");
    }
    // The long flow was exported as more than one record (active timeout).
    let json_text = std::fs::read_to_string(&json).unwrap();
    let slow = json_text
        .lines()
        .filter(|l| l.contains("\"dst_port\":5003") && l.contains("\"direction\":\"egress\""))
        .count();
    assert!(
        slow >= 2,
        "the 6-second flow was not split by the 3 s active timeout"
    );

    // tshark decodes the same datagrams: no malformed packet, no warning or error, and the
    // same totals as nfdump.
    let export = dir.join("export.pcapng");
    let bad = sh(
        "tshark",
        &[
            "-r",
            export.to_str().unwrap(),
            "-d",
            &format!("udp.port=={port},cflow"),
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 0x00600000",
        ],
    );
    let bad = String::from_utf8_lossy(&bad.stdout);
    assert!(
        bad.trim().is_empty(),
        "tshark flags export datagrams:\n{bad}"
    );
    let fields = sh(
        "tshark",
        &[
            "-r",
            export.to_str().unwrap(),
            "-d",
            &format!("udp.port=={port},cflow"),
            "-T",
            "fields",
            "-e",
            "cflow.packets",
            "-e",
            "cflow.octets",
        ],
    );
    let (mut tp, mut tb) = (0u64, 0u64);
    for line in String::from_utf8_lossy(&fields.stdout).lines() {
        let mut cols = line.split('\t');
        let sum = |c: Option<&str>| -> u64 {
            c.unwrap_or("")
                .split(',')
                .filter_map(|x| x.parse::<u64>().ok())
                .sum()
        };
        tp += sum(cols.next());
        tb += sum(cols.next());
    }
    assert_eq!(
        (tp, tb),
        (all_p, all_b),
        "tshark and nfdump disagree on the export"
    );
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn a_full_map_loses_nothing_through_the_overflow_path() {
    let lab = lab("dtovf");
    let (a, b, dir) = (&lab.a, &lab.b, &lab.dir);
    let log = dir.join("agent.log");
    let json = dir.join("flows.json");
    let mut agent = start_agent(
        a,
        &[
            "--iface",
            "dta0",
            "--xdp-mode",
            "native",
            "--map-size",
            "1024",
            "--flows-json",
            json.to_str().unwrap(),
            "--inactive-timeout",
            "2",
            "--stats-interval",
            "0",
        ],
        &log,
    );
    let flows = 20_000u16;
    let size = 16usize;
    b.run(move || {
        let s = UdpSocket::bind(format!("{B4}:4000")).unwrap();
        for i in 0..flows {
            s.send_to(&[0x55u8; 16], format!("{A4}:{}", 20_000 + i))
                .unwrap();
            if i % 200 == 199 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
    thread::sleep(Duration::from_millis(500));
    let st = agent.stop(Signal::SIGINT, Duration::from_secs(30));
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "agent exit status {st}: {agent_log}");

    let mut packets = 0u64;
    let mut bytes = 0u64;
    let mut distinct = HashMap::new();
    for line in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let dport = v["dst_port"].as_u64().unwrap();
        if v["protocol"] == 17
            && v["direction"] == "ingress"
            && v["src_addr"] == B4
            && (20_000..20_000 + flows as u64).contains(&dport)
        {
            packets += v["packets"].as_u64().unwrap();
            bytes += v["bytes"].as_u64().unwrap();
            *distinct.entry(dport).or_insert(0u64) += v["packets"].as_u64().unwrap();
        }
    }
    assert_eq!(distinct.len(), flows as usize);
    assert!(distinct.values().all(|&p| p == 1));
    assert_eq!(packets, flows as u64);
    assert_eq!(bytes, flows as u64 * (20 + 8 + size as u64));
    // The overflow path was taken, and nothing fell off it.
    let count = |name: &str| -> u64 {
        agent_log
            .rsplit(&format!("in.{name}="))
            .next()
            .filter(|_| agent_log.contains(&format!("in.{name}=")))
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    // Room for 1,024 flows in the flow map and 2,048 in the slot table before it.
    let room = 1024 + detector_common::slot::slots_for(1024) as u64;
    assert!(
        count("insert_failed") >= (flows as u64 - room),
        "{agent_log}"
    );
    assert_eq!(
        count("insert_failed"),
        count("overflow_packets"),
        "{agent_log}"
    );
    assert_eq!(count("ringbuf_dropped"), 0, "{agent_log}");
    assert!(
        agent_log.contains("flow map full"),
        "no log line for the overflow: {agent_log}"
    );
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn clear_errors_for_a_missing_interface_and_an_unresolvable_collector() {
    let run = |args: &[&str]| {
        let out = Command::new(tests::detector_bin())
            .arg("run")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--iface", "no-such-if0"]);
    assert!(e.contains("interface 'no-such-if0' does not exist"), "{e}");
    let e = run(&["--iface", "lo", "--export", "no-such-host.invalid:2055"]);
    assert!(
        e.contains("cannot resolve collector 'no-such-host.invalid:2055'"),
        "{e}"
    );
    let e = run(&["--iface", "lo", "--export", "127.0.0.1"]);
    assert!(e.contains("HOST:PORT"), "{e}");
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn xdp_mode_errors_and_fallback_are_explained() {
    // The loopback device has no native XDP: native mode fails with the fix named,
    // auto mode falls back to generic with a warning and runs.
    let ns = Netns::new("dtmode");
    let out = ns
        .command(tests::detector_bin().to_str().unwrap())
        .args([
            "run",
            "--iface",
            "lo",
            "--xdp-mode",
            "native",
            "--flows-json",
            "/dev/null",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("native (driver) XDP is not supported on 'lo'")
            && e.contains("--xdp-mode generic"),
        "{e}"
    );
    let dir = scratch("dtmode");
    let log = dir.join("agent.log");
    let child = ns
        .command(tests::detector_bin().to_str().unwrap())
        .args([
            "run",
            "--iface",
            "lo",
            "--xdp-mode",
            "auto",
            "--flows-json",
            "/dev/null",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = Guarded::new("detector", child);
    wait_for_text(&log, "metering lo", Duration::from_secs(30));
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{text}");
    assert!(text.contains("falling back to generic"), "{text}");
    assert!(text.contains("XDP ingress (generic mode)"), "{text}");
}

/// The agent, run as nobody with every capability dropped.
fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(tests::detector_bin());
    c
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn missing_capabilities_are_named() {
    // Drop every capability and run as nobody.
    let out = as_nobody()
        .args(["run", "--iface", "lo"])
        .output()
        .expect("setpriv (util-linux)");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("CAP_BPF") && e.contains("CAP_NET_ADMIN") && e.contains("setcap"),
        "{e}"
    );
    // replay runs the program with BPF_PROG_TEST_RUN: the same capabilities, named.
    let pcap = std::env::temp_dir().join(format!("detector-empty-{}.pcap", std::process::id()));
    let mut header = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    header.extend_from_slice(&[0; 8]);
    header.extend_from_slice(&65535u32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    std::fs::write(&pcap, header).unwrap();
    let out = as_nobody().arg("replay").arg(&pcap).output().unwrap();
    std::fs::remove_file(&pcap).ok();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("replay") && e.contains("CAP_BPF"), "{e}");
}

/// Sends TCP segments with FIN set from `B4:sport` to `A4:80` through a raw socket (the
/// kernel adds the IP header; the checksum is left at zero, so A's stack drops them after
/// the meter has counted them).
fn raw_fin_sender() -> impl FnMut(u16) {
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(A4.parse::<std::net::Ipv4Addr>().unwrap().octets()),
        },
        sin_zero: [0; 8],
    };
    move |sport: u16| {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&80u16.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = 0x11; // FIN + ACK
        h[14..16].copy_from_slice(&1024u16.to_be_bytes());
        // SAFETY: valid buffer and address for the call.
        let n = unsafe {
            libc::sendto(
                fd,
                h.as_ptr().cast(),
                h.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(n, 20, "raw send: {}", std::io::Error::last_os_error());
    }
}

/// The agent removes flows while their packets keep arriving, through both drain paths
/// (batch and key by key): FIN-flagged TCP flows are removed at every scan while
/// segments of them stream in, and UDP flows pause for about the inactive timeout (1 s)
/// and resume around the moment they are removed. Per flow, the exported packets and
/// bytes must equal what the senders sent: nothing lost between a read and a removal,
/// nothing counted twice.
#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn flows_removed_while_their_packets_keep_arriving_lose_nothing() {
    for drain in ["batch", "per-key"] {
        let lab = lab(&format!("dtdel{}", &drain[..1]));
        let (a, b, dir) = (&lab.a, &lab.b, &lab.dir);
        let log = dir.join("agent.log");
        let json = dir.join("flows.json");
        let mut agent = start_agent(
            a,
            &[
                "--iface",
                "dta0",
                "--xdp-mode",
                "native",
                "--drain",
                drain,
                "--flows-json",
                json.to_str().unwrap(),
                "--inactive-timeout",
                "1",
                "--active-timeout",
                "2",
                "--stats-interval",
                "0",
            ],
            &log,
        );
        let agent_log = std::fs::read_to_string(&log).unwrap();
        let expected_mode = if drain == "batch" {
            "in batches"
        } else {
            "key by key"
        };
        assert!(agent_log.contains(expected_mode), "{agent_log}");

        // FIN flows 0..8 stream in bursts of 300 ms with pauses of 1.1 to 1.6 s (they are
        // removed in a pause, and the next burst may meet the removal); flow 8 streams
        // without a pause (never quiet: exported by the active timeout, removed at the end).
        const FIN_FLOWS: u16 = 9;
        const UDP_FLOWS: u16 = 8;
        const SECS: u64 = 8;
        let fin = b.spawn(move || {
            let mut send = raw_fin_sender();
            let mut counts = vec![0u64; FIN_FLOWS as usize];
            let start = std::time::Instant::now();
            let mut pause_until = vec![start; FIN_FLOWS as usize - 1];
            let mut burst_from = vec![start; FIN_FLOWS as usize - 1];
            let mut round = 0u64;
            while start.elapsed() < Duration::from_secs(SECS) {
                let now = std::time::Instant::now();
                for i in 0..FIN_FLOWS as usize {
                    if i + 1 < FIN_FLOWS as usize {
                        if now < pause_until[i] {
                            continue;
                        }
                        if now.duration_since(burst_from[i]) > Duration::from_millis(300) {
                            round += 1;
                            let pause = 1100 + (round * 131 + i as u64 * 71) % 500;
                            pause_until[i] = now + Duration::from_millis(pause);
                            burst_from[i] = pause_until[i];
                            continue;
                        }
                    }
                    for _ in 0..20 {
                        send(7000 + i as u16);
                    }
                    counts[i] += 20;
                }
                thread::sleep(Duration::from_micros(500));
            }
            counts
        });
        let udp = b.spawn(move || {
            let s = UdpSocket::bind(format!("{B4}:0")).unwrap();
            let mut counts = vec![0u64; UDP_FLOWS as usize];
            let start = std::time::Instant::now();
            let mut round = 0u64;
            while start.elapsed() < Duration::from_secs(SECS) {
                for (i, c) in counts.iter_mut().enumerate() {
                    for _ in 0..20 {
                        s.send_to(&[0x33u8; 100], format!("{A4}:{}", 8000 + i))
                            .unwrap();
                        *c += 1;
                    }
                }
                // Pauses around the inactive timeout, so removals and new packets meet.
                round += 1;
                thread::sleep(Duration::from_millis(850 + (round * 97) % 400));
            }
            counts
        });
        let fin_sent = fin.join().unwrap();
        let udp_sent = udp.join().unwrap();
        thread::sleep(Duration::from_millis(300));
        let st = agent.stop(Signal::SIGINT, Duration::from_secs(30));
        let agent_log = std::fs::read_to_string(&log).unwrap();
        assert!(st.success(), "agent exit status {st}: {agent_log}");

        // (protocol, destination port) -> (records, packets, bytes)
        let mut got: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
        for line in std::fs::read_to_string(&json).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["direction"] != "ingress" || v["src_addr"] != B4 {
                continue;
            }
            let key = (
                v["protocol"].as_u64().unwrap(),
                v["dst_port"].as_u64().unwrap(),
            );
            let e = got.entry(key).or_default();
            e.0 += 1;
            e.1 += v["packets"].as_u64().unwrap();
            e.2 += v["bytes"].as_u64().unwrap();
        }
        // The FIN flows all go to port 80: summed per source port.
        let mut fin_got: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        for line in std::fs::read_to_string(&json).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["direction"] == "ingress" && v["src_addr"] == B4 && v["protocol"] == 6 {
                let e = fin_got.entry(v["src_port"].as_u64().unwrap()).or_default();
                e.0 += 1;
                e.1 += v["packets"].as_u64().unwrap();
                e.2 += v["bytes"].as_u64().unwrap();
            }
        }
        for (i, &n) in fin_sent.iter().enumerate() {
            let (records, packets, bytes) = fin_got[&(7000 + i as u64)];
            assert_eq!((packets, bytes), (n, n * 40), "{drain}: FIN flow {i}");
            // Bursty ones removed in (nearly) every pause; the streaming one exported
            // every active timeout (2 s) and removed at the end.
            assert!(
                records >= 3,
                "{drain}: FIN flow {i} exported only {records} times"
            );
        }
        for (i, &n) in udp_sent.iter().enumerate() {
            let (records, packets, bytes) = got[&(17, 8000 + i as u64)];
            assert_eq!((packets, bytes), (n, n * 128), "{drain}: UDP flow {i}");
            assert!(records >= 2, "{drain}: UDP flow {i}: {records} records");
        }
        assert!(
            agent_log.contains("every packet the kernel counted was exported"),
            "{agent_log}"
        );
        eprintln!(
            "{drain}: FIN flows sent {:?} packets, in {:?} records; UDP flows sent {:?}",
            fin_sent,
            fin_got.values().map(|v| v.0).collect::<Vec<_>>(),
            udp_sent
        );
    }
}

/// Sends `count` datagrams of `size` bytes from `from` to `to`, one every 2 ms, on a
/// thread of its own; joins to the flow key and the totals on the wire.
fn udp_stream(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    count: u64,
    size: usize,
) -> thread::JoinHandle<(FlowId, (u64, u64))> {
    let sent = ns.spawn(move || {
        let s = UdpSocket::bind(from).unwrap();
        let payload = vec![0x42u8; size];
        for _ in 0..count {
            s.send_to(&payload, to).unwrap();
            thread::sleep(Duration::from_millis(2));
        }
    });
    thread::spawn(move || {
        sent.join().unwrap();
        let ip_hdr = if to.is_ipv4() { 20 } else { 40 };
        (
            (
                17,
                from.ip(),
                from.port(),
                to.ip(),
                to.port(),
                a_side(from.ip()),
            ),
            (count, count * (size + 8 + ip_hdr) as u64),
        )
    })
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn a_killed_agent_loses_no_counted_packet_and_the_next_one_adopts_the_meter() {
    let lab = lab("dtpin");
    let (a, b, dir) = (&lab.a, &lab.b, &lab.dir);
    let nfdir = dir.join("nfcapd");
    std::fs::create_dir_all(&nfdir).unwrap();
    let port = "9996";
    let nfcapd = a
        .command("nfcapd")
        .args(["-w", nfdir.to_str().unwrap(), "-p", port, "-b", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nfcapd (package nfdump)");
    let mut nfcapd = Guarded::new("nfcapd", nfcapd);
    let pins = pin_base().join("dta0");
    let pin_arg = pin_base();
    let export = format!("127.0.0.1:{port}");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--iface",
            "dta0",
            "--xdp-mode",
            "native",
            "--export",
            &export,
            "--active-timeout",
            "2",
            "--inactive-timeout",
            "4",
            "--stats-interval",
            "0",
            "--pin-path",
            pin_arg.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // In the namespace's network, the host's mounts: `nsenter --net`, as an operator
    // whose pins must outlive the agent runs it (see the next test for `ip netns exec`).
    let start = |extra: &[&'static str], log: &str| {
        let v = args(extra);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        let cmd = a.command_keeping_mounts(tests::detector_bin().to_str().unwrap());
        start_agent_with(cmd, &refs, &dir.join(log))
    };

    // Two streams of known size, both ways, that outlive three agents.
    udp_sink(a, format!("{A4}:6101").parse().unwrap());
    udp_sink(b, format!("{B4}:6102").parse().unwrap());
    let mut first = start(&[], "agent1.log");
    let log1 = std::fs::read_to_string(dir.join("agent1.log")).unwrap();
    assert!(
        log1.contains("the meter outlives the agent") && !log1.contains("not for long"),
        "{log1}"
    );
    let streams = [
        udp_stream(
            b,
            format!("{B4}:7101").parse().unwrap(),
            format!("{A4}:6101").parse().unwrap(),
            4000,
            300,
        ),
        udp_stream(
            a,
            format!("{A4}:7102").parse().unwrap(),
            format!("{B4}:6102").parse().unwrap(),
            3500,
            120,
        ),
    ];
    // Past an active timeout and the drain after it, so part of each flow was exported
    // before the crash.
    thread::sleep(Duration::from_millis(3600));

    // A second agent on the same interface is refused, and says why.
    let v = args(&[]);
    let second = a
        .command(tests::detector_bin().to_str().unwrap())
        .arg("run")
        .args(&v)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("another detector already meters dta0"),
        "second agent: {} {err}",
        second.status
    );

    first.stop(Signal::SIGKILL, Duration::from_secs(5));
    assert!(
        pins.join("link_xdp").exists() && pins.join("FLOWS4").exists(),
        "the pinned state outlives the agent"
    );
    thread::sleep(Duration::from_millis(1500));

    // The next agent adopts the meter; stopped with --keep-attached, it leaves it counting.
    let mut upgrade = start(&["--keep-attached"], "agent2.log");
    let log2 = std::fs::read_to_string(dir.join("agent2.log")).unwrap();
    let before: u64 = log2
        .split("ran; ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no adoption in the log:\n{log2}"));
    assert!(
        before > 0 && log2.contains("flows carry their export marks"),
        "the killed agent had exported part of the flows, and its marks are read back:\n{log2}"
    );
    thread::sleep(Duration::from_millis(1500));
    let st = upgrade.stop(Signal::SIGTERM, Duration::from_secs(20));
    assert!(st.success(), "agent 2: {st}");
    assert!(
        pins.join("link_tc").exists(),
        "--keep-attached keeps the links"
    );
    thread::sleep(Duration::from_millis(500));

    // The last one adopts it again, then stops cleanly: flush, detach, unpin.
    let mut last = start(&[], "agent3.log");
    let sent: Vec<(FlowId, (u64, u64))> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    thread::sleep(Duration::from_millis(500));
    let st = last.stop(Signal::SIGINT, Duration::from_secs(20));
    let log3 = std::fs::read_to_string(dir.join("agent3.log")).unwrap();
    assert!(st.success(), "agent 3: {st}\n{log3}");
    assert!(log3.contains("adopted the state pinned at"), "{log3}");
    assert!(
        log3.contains("every packet the kernel counted was exported"),
        "the counted and exported packets agree over the three agents:\n{log3}"
    );
    assert!(!pins.exists(), "a clean stop removes the pinned state");
    let link = a.exec_ok("ip", &["link", "show", "dta0"]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "a clean stop detaches"
    );
    thread::sleep(Duration::from_millis(500));
    nfcapd.stop(Signal::SIGTERM, Duration::from_secs(10));

    let (exported, _, _) = nfdump_totals(&nfdir);
    for (k, v) in &sent {
        assert_eq!(
            exported.get(k),
            Some(v),
            "flow {k:?}: exported by the three agents vs sent"
        );
    }
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn pins_in_a_mount_namespace_of_their_own_are_called_out() {
    let lab = lab("dtmnt");
    let (a, dir) = (&lab.a, &lab.dir);
    // `ip netns exec` gives the agent a private mount namespace with /sys mounted anew:
    // a BPF file system it mounts under /sys/fs/bpf there is its own, and goes with it.
    let pins = format!("/sys/fs/bpf/detector-test-{}", std::process::id());
    let log = dir.join("private.log");
    let mut agent = start_agent(
        a,
        &[
            "--iface",
            "dta0",
            "--xdp-mode",
            "native",
            "--stats-interval",
            "0",
            "--pin-path",
            &pins,
        ],
        &log,
    );
    let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{st}: {text}");
    assert!(
        text.contains("maps and links pinned, but not for long")
            && text.contains("mount namespace")
            && text.contains("nsenter --net="),
        "the agent says its pins will not outlive it, and the fix:\n{text}"
    );
    assert!(!text.contains("the meter outlives the agent"), "{text}");
    // Nothing of it is left in the host's /sys/fs/bpf.
    assert!(
        !std::path::Path::new(&pins).exists(),
        "{pins} leaked into the host"
    );
}
