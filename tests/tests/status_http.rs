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

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use tests::agent::{
    Exporter, agent_command, scratch, spawn_agent, start_prometheus, tool, torrent, wait_for,
    write_config,
};
use tests::http::{free_tcp_port, get, json, prom_value};

const HOST: &str = "10.9.0.5";

#[test]
fn metrics_api_and_page_show_a_known_alarm() {
    let dir = scratch("http");
    let (nf_port, http_port, prom_port) = (
        tests::netns::free_udp_port(),
        free_tcp_port(),
        free_tcp_port(),
    );
    // Evaluate every second and raise at the first evaluation over the threshold, so the
    // test does not wait for the defaults; the address comes from the file's key.
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

    // Two batches of the torrent's flows, a few seconds apart, from one exporter.
    let host: IpAddr = HOST.parse().unwrap();
    let mut exporter = Exporter::new(nf_port);
    let mut sent = 0u64;
    for _ in 0..2 {
        let now = SystemTime::now();
        let records = torrent(host, now);
        sent += records.len() as u64;
        exporter.send(&records, now);
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
    let _prometheus = start_prometheus(
        &dir.join("prometheus"),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: detector\n    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n"
        ),
        prom_port,
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    let scraped = wait_for(
        "Prometheus to scrape the agent",
        Duration::from_secs(60),
        || prom_value(&prom, r#"detector_records_total{job="detector"}"#),
    );
    assert_eq!(scraped, sent.to_string(), "Prometheus read back");
    let up = json(&format!(
        "{prom}/api/v1/query?query=up%7Bjob%3D%22detector%22%7D"
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
