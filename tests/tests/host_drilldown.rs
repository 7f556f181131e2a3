//! The host drill-down (issue #24) of `run --http`: a torrent-shaped host and a benign
//! web client (30 HTTPS servers, the network's biggest senders) are sent to the agent as
//! NetFlow v9 over loopback, records built here so every figure is known; then
//! - `/api/hosts/{ip}` gives each host's peers (the torrent's 80, none among the top 10
//!   senders; the client's 30, 10 of them), flows, bytes, both port distributions,
//!   the direction of its connections, every rule with its series, every guard with
//!   what it measured; an unknown host is 404, a bad address 400;
//! - the page, rendered by headless Chromium (Debian's `chromium`), links each alarm and
//!   host row to the view, and the view (`/#host=IP`, `/host/IP`) shows the same
//!   figures as the API (read back from the data attributes of `--dump-dom`) with its
//!   bars and lines; screenshots are kept in `target/test-artifacts/host-*.png`.
//!
//! No BPF: runs unprivileged, like `status_http`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use detector::flow::FlowRecord;
use tests::agent::{Exporter, agent_command, scratch, spawn_agent, wait_for, write_config};
use tests::drilldown::{chromium, page_matches_api};
use tests::http::{free_tcp_port, get, json};

const TORRENT: &str = "10.9.0.5";
const CLIENT: &str = "10.9.0.6";
const SERVERS: u32 = 30;

fn peer(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i)) // 203.0.113.0/24
}

fn server(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)) // 198.51.100.0/24
}

fn rec(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    bytes: u64,
    at: SystemTime,
) -> FlowRecord {
    FlowRecord {
        packets: 20,
        bytes,
        first: at - Duration::from_secs(5),
        last: at,
        tcp_flags: if proto == 6 { 0x18 } else { 0 },
        ..FlowRecord::new(src, sport, dst, dport, proto)
    }
}

/// The torrent's remote port for peer `i` (all distinct).
fn rport(i: u32) -> u16 {
    10_000 + (i as u16) * 577
}

/// A BitTorrent client: 80 peers; the even ones came to its port 51413, it went to the
/// odd ones from ports of its own, and met every third one over UDP on 51413 too.
fn torrent(host: IpAddr, at: SystemTime) -> Vec<FlowRecord> {
    let mut v = Vec::new();
    for i in 0..80u32 {
        let (p, r) = (peer(i), rport(i));
        let local = if i % 2 == 0 { 51413 } else { 40_000 + i as u16 };
        v.push(rec(p, r, host, local, 6, 50_000, at));
        v.push(rec(host, local, p, r, 6, 2_000, at));
        if i % 3 == 0 {
            v.push(rec(host, 51413, p, r, 17, 180, at));
            v.push(rec(p, r, host, 51413, 17, 200, at));
        }
    }
    v
}

/// A web client downloading 1 MB from each of 30 HTTPS servers.
fn client(host: IpAddr, at: SystemTime) -> Vec<FlowRecord> {
    let mut v = Vec::new();
    for i in 0..SERVERS {
        let local = 50_000 + i as u16;
        v.push(rec(server(i), 443, host, local, 6, 1_000_000, at));
        v.push(rec(host, local, server(i), 443, 6, 20_000, at));
    }
    v
}

#[test]
fn api_and_page_drill_into_a_torrent_host_and_a_web_client() {
    let dir = scratch("drill");
    let (nf_port, http_port) = (tests::netns::free_udp_port(), free_tcp_port());
    let config = write_config(
        &dir,
        &format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n"),
    );
    let _agent = spawn_agent(&mut agent_command(
        &dir,
        nf_port,
        &config,
        &dir.join("agent.log"),
    ));
    let base = format!("http://127.0.0.1:{http_port}");
    wait_for("the agent's HTTP server", Duration::from_secs(20), || {
        get(&format!("{base}/metrics"))
    });

    let (t_host, c_host): (IpAddr, IpAddr) = (TORRENT.parse().unwrap(), CLIENT.parse().unwrap());
    let mut exporter = Exporter::new(nf_port);
    let mut sent = 0u64;
    for _ in 0..2 {
        let now = SystemTime::now();
        let records = [torrent(t_host, now), client(c_host, now)].concat();
        sent += records.len() as u64;
        exporter.send(&records, now);
        std::thread::sleep(Duration::from_secs(2));
    }
    wait_for("every record counted", Duration::from_secs(20), || {
        let m = get(&format!("{base}/metrics"))?;
        m.lines()
            .any(|l| l == format!("detector_records_total {sent}"))
            .then_some(())
    });
    // An evaluation after the last record, then a few more points of series.
    std::thread::sleep(Duration::from_secs(3));
    let t_api = wait_for("the torrent's alarm", Duration::from_secs(30), || {
        let v = json(&format!("{base}/api/hosts/{TORRENT}"));
        (v["alarmed"] == true && v["detail"]["flows"].as_u64()? >= 2 * 214).then_some(v)
    });

    // The torrent: what was sent, measured back.
    let d = &t_api["detail"];
    assert_eq!(d["peers"], 80, "{t_api}");
    assert_eq!(d["flows"], 2 * (80 * 2 + 27 * 2), "{d}");
    assert_eq!(d["bytes_in"], 2 * (80 * 50_000 + 27 * 200), "{d}");
    assert_eq!(d["bytes_out"], 2 * (80 * 2_000 + 27 * 180), "{d}");
    // No peer among the network's top 10 senders (the client's servers are).
    assert_eq!(d["peers_in_top10_senders"], 0, "{d}");
    assert_eq!(d["peers_outside_top10_senders"], 80, "{d}");
    assert_eq!(d["top_peers"].as_array().unwrap().len(), 10);
    assert_eq!(d["other_peers"], 70);
    let shares: f64 = d["top_peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["share"].as_f64().unwrap())
        .sum();
    let held = (d["bytes_in"].as_u64().unwrap() + d["bytes_out"].as_u64().unwrap()) as f64;
    let other = d["other_bytes"].as_f64().unwrap() / held;
    assert!((shares + other - 1.0).abs() < 1e-9, "{shares} + {other}");
    // 80 remote ports, one peer each; locally 51413 with 53 peers and 40 ports of its own.
    assert_eq!(d["remote_ports"]["distinct"], 80);
    assert_eq!(d["remote_ports"]["other_ports"], 80 - 12);
    assert_eq!(d["local_ports"]["distinct"], 41);
    assert_eq!(d["local_ports"]["top"][0]["port"], 51413);
    assert_eq!(d["local_ports"]["top"][0]["peers"], 40 + 13);
    assert_eq!(d["direction"]["inbound_peers"], 40, "{d}");
    assert_eq!(d["direction"]["outbound_peers"], 27, "{d}");
    assert_eq!(d["direction"]["both_peers"], 13, "{d}");
    assert!(t_api["score"].as_f64().unwrap() >= 7.0);
    assert_eq!(t_api["guards"].as_array().unwrap().len(), 5);
    let rules = t_api["rules"].as_array().unwrap();
    assert_eq!(rules.len(), t_api["evidence"].as_array().unwrap().len());
    let series = t_api["series"].as_array().unwrap();
    assert!(series.len() >= 2, "{t_api}");
    assert_eq!(series[0]["values"].as_array().unwrap().len(), rules.len());
    assert!(
        series
            .iter()
            .any(|p| p["bytes_in_per_s"].as_f64() > Some(0.0)),
        "a rate between two points: {series:?}"
    );

    // The web client: 30 servers, 10 of them the network's top senders, all on 443, all
    // gone to; vetoed as a web client.
    let c_api = json(&format!("{base}/api/hosts/{CLIENT}"));
    let d = &c_api["detail"];
    assert_eq!(d["peers"], SERVERS, "{c_api}");
    assert_eq!(d["peers_in_top10_senders"], 10, "{d}");
    assert_eq!(d["peers_outside_top10_senders"], SERVERS - 10, "{d}");
    assert_eq!(d["remote_ports"]["distinct"], 1);
    assert_eq!(d["remote_ports"]["top"][0]["port"], 443);
    assert_eq!(d["remote_ports"]["top"][0]["peers"], SERVERS);
    assert_eq!(d["direction"]["outbound_peers"], SERVERS);
    assert_eq!(d["direction"]["inbound_peers"], 0);
    assert_eq!(c_api["alarmed"], false);
    assert_eq!(c_api["vetoed_by"], "web_client", "{c_api}");
    let web = c_api["guards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["guard"] == "web_client")
        .unwrap();
    assert_eq!(web["holds"], true);
    assert!(
        web["measured"].as_str().unwrap().contains("30 of 30 peers"),
        "{web}"
    );

    // Unknown and malformed hosts.
    let status = |url: String| match ureq::get(&url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{url}: {e}"),
    };
    assert_eq!(status(format!("{base}/api/hosts/10.9.9.9")), 404);
    assert_eq!(status(format!("{base}/api/hosts/not-an-address")), 400);

    // The page, rendered by a real browser.
    let artifacts = tests::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let profile = dir.join("chromium");
    let render = |url: &str, extra: &[&str]| {
        let out = chromium(None, &profile, url, extra).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    // Every alarm and host row links to its view.
    let front = render(&format!("{base}/"), &["--dump-dom"]);
    for host in [TORRENT, CLIENT] {
        assert!(
            front.contains(&format!(
                "<a href=\"#host={host}\" class=\"host-link\">{host}</a>"
            )),
            "no link to {host}'s view:\n{front}"
        );
    }
    let alarm_row = front
        .find(&format!("<tr class=\"alarm\" data-host=\"{TORRENT}\">"))
        .expect("the torrent's alarm row");
    assert!(front[alarm_row..].starts_with(&format!(
        "<tr class=\"alarm\" data-host=\"{TORRENT}\"><td><a href=\"#host={TORRENT}\""
    )));
    for (host, url, name) in [
        (
            TORRENT,
            format!("{base}/#host={TORRENT}"),
            "host-torrent.png",
        ),
        (
            CLIENT,
            format!("{base}/host/{CLIENT}"),
            "host-web-client.png",
        ),
    ] {
        let dom = render(&url, &["--dump-dom"]);
        // The figures stopped moving once the records were in: the API now says what
        // the page read.
        let api = json(&format!("{base}/api/hosts/{host}"));
        page_matches_api(&dom, &api, host, false);
        let shot = artifacts.join(name);
        let _ = std::fs::remove_file(&shot);
        render(&url, &[&format!("--screenshot={}", shot.display())]);
        let png = std::fs::read(&shot).expect("the screenshot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "a real screenshot"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
