//! `run --http`: a torrent-shaped host's flows are sent to the agent as NetFlow v9 over
//! loopback (records built here, so the count sent is known); then
//! - `/metrics` passes `promtool check metrics`, and a real Prometheus server (Debian's
//!   `prometheus`) scrapes it: its query API gives back the number of records sent;
//! - `/api/alarms` lists the host with the evidence that fired, `/api/hosts?top=N` ranks
//!   it first with every rule's value;
//! - the page `/`, rendered by headless Chromium (Debian's `chromium`), shows the host in
//!   the open alarms with its evidence and draws its score chart; the screenshot is kept
//!   in `target/test-artifacts/status-page.png`.
//!
//! No BPF: runs unprivileged; `cargo xtask setup` installs prometheus and chromium.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use detector::export::netflow_v9::{V9Config, V9Encoder};
use detector::flow::FlowRecord;

const HOST: &str = "10.9.0.5";

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn peer(i: u32) -> IpAddr {
    // Two documentation networks: external by default.
    let base = if i < 200 {
        0xcb00_7100
    } else {
        0xc633_6400 - 200
    };
    IpAddr::V4(Ipv4Addr::from(base + i))
}

#[allow(clippy::too_many_arguments, reason = "a test record builder")]
fn rec(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    packets: u64,
    bytes: u64,
    at: SystemTime,
) -> FlowRecord {
    FlowRecord {
        packets,
        bytes,
        first: at - Duration::from_secs(5),
        last: at,
        tcp_flags: if proto == 6 { 0x18 } else { 0 },
        ..FlowRecord::new(src, sport, dst, dport, proto)
    }
}

/// A BitTorrent client's flows over a few seconds: 80 throttled peers on high ports,
/// its listening port 51413 on TCP and UDP, peers met both ways.
fn torrent(host: IpAddr, at: SystemTime) -> Vec<FlowRecord> {
    let mut v = Vec::new();
    for i in 0..80u32 {
        let p = peer(i);
        let rport = 10_000 + (i as u16 * 577) % 50_000;
        if i % 2 == 0 {
            v.push(rec(p, rport, host, 51413, 6, 40, 50_000, at));
            v.push(rec(host, 51413, p, rport, 6, 30, 2_000, at));
        } else {
            v.push(rec(host, 40_000 + i as u16, p, rport, 6, 30, 2_000, at));
            v.push(rec(p, rport, host, 40_000 + i as u16, 6, 40, 50_000, at));
        }
        if i % 3 == 0 {
            v.push(rec(host, 51413, p, rport, 17, 2, 180, at));
            v.push(rec(p, rport, host, 51413, 17, 2, 200, at));
        }
    }
    v
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(url: &str) -> Option<String> {
    ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()
        .ok()?
        .into_string()
        .ok()
}

fn json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get(url).unwrap_or_else(|| panic!("GET {url}"))).unwrap()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tool(name: &str) -> PathBuf {
    let p = ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    p.unwrap_or_else(|| panic!("{name} is not installed (cargo xtask setup installs it)"))
}

#[test]
fn metrics_api_and_page_show_a_known_alarm() {
    let dir = std::env::temp_dir().join(format!("detector-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (nf_port, http_port, prom_port) = (
        tests::netns::free_udp_port(),
        free_tcp_port(),
        free_tcp_port(),
    );
    let config = dir.join("detector.toml");
    // Evaluate every second and raise at the first evaluation over the threshold, so the
    // test does not wait for the defaults; the address comes from the file's key.
    std::fs::write(
        &config,
        format!(
            "[detection]\nwindow_secs = 120\neval_interval_secs = 1\nconsecutive = 1\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n"
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let agent = Command::new(tests::detector_bin())
        .args(["run", "--netflow-listen", &format!("127.0.0.1:{nf_port}")])
        .arg("--config")
        .arg(&config)
        .arg("--flows-json")
        .arg(dir.join("flows.json"))
        .args(["--stats-interval", "0", "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Killed(agent);
    let base = format!("http://127.0.0.1:{http_port}");
    wait_for("the agent's HTTP server", Duration::from_secs(20), || {
        get(&format!("{base}/metrics"))
    });

    // Two batches of the torrent's flows, a few seconds apart, from one exporter.
    let host: IpAddr = HOST.parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to: SocketAddr = format!("127.0.0.1:{nf_port}").parse().unwrap();
    let boot = SystemTime::now() - Duration::from_secs(600);
    let mut enc = V9Encoder::new(V9Config::default(), boot);
    let mut sent = 0u64;
    for _ in 0..2 {
        let now = SystemTime::now();
        let records = torrent(host, now);
        sent += records.len() as u64;
        for dg in enc.encode(&records, now) {
            sock.send_to(&dg, to).unwrap();
        }
        std::thread::sleep(Duration::from_secs(2));
    }

    // The counters: every record sent, from this exporter.
    let metrics = wait_for("every record counted", Duration::from_secs(20), || {
        let m = get(&format!("{base}/metrics"))?;
        m.lines()
            .any(|l| l == format!("detector_records_total {sent}"))
            .then_some(m)
    });
    assert!(
        metrics.lines().any(|l| l
            == format!(
                "detector_netflow_records_total{{exporter=\"127.0.0.1\",listener=\"127.0.0.1:{nf_port}\"}} {sent}"
            )),
        "per-exporter records:\n{metrics}"
    );
    if let Err(e) = tests::promtool_check(&metrics) {
        panic!("promtool check metrics: {e}");
    }

    // The alarm, with the evidence that fired.
    let alarms = wait_for("the host's alarm", Duration::from_secs(30), || {
        let a = json(&format!("{base}/api/alarms"));
        (a["alarms"].as_array()?.iter().any(|x| x["host"] == HOST)).then_some(a)
    });
    let alarm = alarms["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["host"] == HOST)
        .unwrap();
    let fired: Vec<&str> = alarm["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["fired"] == true)
        .map(|e| e["rule"].as_str().unwrap())
        .collect();
    for rule in [
        "external_peers",
        "stable_local_port_peers",
        "tcp_and_udp_peers",
    ] {
        assert!(fired.contains(&rule), "{rule} did not fire: {alarm}");
    }
    assert!(alarm["peers"].as_u64().unwrap() >= 80, "{alarm}");
    // The exporter, with its source id.
    assert_eq!(alarm["exporters"][0], "127.0.0.1/0", "{alarm}");

    let hosts = json(&format!("{base}/api/hosts?top=1"));
    let ranked = hosts["hosts"].as_array().unwrap();
    assert_eq!(ranked.len(), 1, "{hosts}");
    assert_eq!(ranked[0]["host"], HOST);
    assert_eq!(ranked[0]["alarmed"], true);
    assert!(
        ranked[0]["score"].as_f64().unwrap() >= alarms["score_threshold"].as_f64().unwrap(),
        "{hosts}"
    );
    assert!(
        ranked[0]["evidence"].as_array().unwrap().len() > fired.len(),
        "every rule's value, fired or not: {hosts}"
    );
    let bad = ureq::get(&format!("{base}/api/hosts?top=lots")).call();
    assert!(
        matches!(bad, Err(ureq::Error::Status(400, _))),
        "a bad query is refused"
    );

    // A real Prometheus scrapes the agent; its query API gives the count back.
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: detector\n    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n"
        ),
    )
    .unwrap();
    let prometheus = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let _prometheus = Killed(prometheus);
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=detector_records_total%7Bjob%3D%22detector%22%7D"
    );
    let scraped = wait_for(
        "Prometheus to scrape the agent",
        Duration::from_secs(60),
        || {
            let v: serde_json::Value = serde_json::from_str(&get(&query)?).ok()?;
            let value = v["data"]["result"][0]["value"][1].as_str()?.to_string();
            Some(value)
        },
    );
    assert_eq!(scraped, sent.to_string(), "Prometheus read back");
    let up = json(&format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=up%7Bjob%3D%22detector%22%7D"
    ));
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");

    // The page, rendered by a real browser: the host's alarm, its evidence, its chart.
    let artifacts = tests::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let chromium = |extra: &[&str]| {
        Command::new(tool("chromium"))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=5000",
                "--window-size=1280,1600",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .args(extra)
            .arg(format!("{base}/"))
            .stderr(Stdio::null())
            .output()
            .unwrap()
    };
    let dom = String::from_utf8(chromium(&["--dump-dom"]).stdout).unwrap();
    let row_start = dom
        .find(&format!("<tr class=\"alarm\" data-host=\"{HOST}\">"))
        .unwrap_or_else(|| panic!("no alarm row for {HOST} in the rendered page:\n{dom}"));
    let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").unwrap()];
    for rule in &fired {
        assert!(
            row.contains(&format!("data-rule=\"{rule}\"")),
            "evidence {rule} not shown:\n{row}"
        );
    }
    let chart = dom
        .find(&format!("<div class=\"chart\" data-host=\"{HOST}\">"))
        .unwrap_or_else(|| panic!("no score chart for {HOST}:\n{dom}"));
    assert!(dom[chart..].contains("<polyline"), "the chart has its line");
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
