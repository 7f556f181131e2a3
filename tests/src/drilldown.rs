//! The host drill-down page (issue #24) read back: its figures from the data attributes
//! Chromium's `--dump-dom` gives, checked against the agent's `/api/hosts/{ip}`. Shared
//! by the `host_drilldown` test (NetFlow sent to the agent) and the lab (real clients).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Chromium, where Debian installs it.
pub fn chromium_path() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Headless Chromium's command line for `url` (`extra`: `--dump-dom` or
/// `--screenshot=PATH`), with its profile in `profile`; `netns`: run it in that network
/// namespace (as root).
pub fn chromium(netns: Option<&str>, profile: &Path, url: &str, extra: &[&str]) -> Command {
    let exe = chromium_path().expect("chromium is not installed (cargo xtask setup installs it)");
    // Headless Chromium was seen to hang for good on a loaded machine (a lab run's
    // drill-down, 16 minutes): each run is killed after 60 s, and the callers' checks
    // (an empty page, no screenshot) say so.
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "60"]);
    if let Some(ns) = netns {
        c.args(["ip", "netns", "exec", ns]);
    }
    c.arg(exe);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=5000",
        "--window-size=1280,2600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// The opening tag of the element with `id` in `dom`.
pub fn tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in the page"));
    let start = dom[..at].rfind('<').unwrap();
    &dom[start..at + dom[at..].find('>').unwrap()]
}

/// Attribute `name` of the element with `id`, if it has it.
pub fn try_attr(dom: &str, id: &str, name: &str) -> Option<String> {
    if !dom.contains(&format!("id=\"{id}\"")) {
        return None;
    }
    let t = tag(dom, id);
    let key = format!(" {name}=\"");
    let at = t.find(&key)? + key.len();
    Some(t[at..at + t[at..].find('"')?].replace("&amp;", "&"))
}

/// Attribute `name` of the element with `id`.
pub fn attr(dom: &str, id: &str, name: &str) -> String {
    try_attr(dom, id, name).unwrap_or_else(|| panic!("no {name} on {id}: {}", tag(dom, id)))
}

/// The `data-value` of the element with `id`.
pub fn value(dom: &str, id: &str) -> f64 {
    attr(dom, id, "data-value").parse().unwrap()
}

/// Whether two figures agree: equal, or (values computed in floating point, such as a
/// share, fetched in two responses) within a relative 1e-9.
fn agree(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The bars drawn in the chart `id`: (port, peers).
pub fn bars(dom: &str, id: &str) -> Vec<(u64, u64)> {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap();
    let chart = &dom[at..at + dom[at..].find("</svg>").unwrap()];
    chart
        .split("data-port=\"")
        .skip(1)
        .map(|s| {
            let port = s[..s.find('"').unwrap()].parse().unwrap();
            let p = &s[s.find("data-peers=\"").unwrap() + 12..];
            (port, p[..p.find('"').unwrap()].parse().unwrap())
        })
        .collect()
}

fn api_bars(dist: &serde_json::Value) -> Vec<(u64, u64)> {
    dist["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["peers"].as_u64().unwrap()))
        .collect()
}

/// Panics unless the host view in `dom` shows the figures of `api` (the host's
/// `/api/hosts/{ip}` of the same evaluation): its score, peers, the peers outside the
/// top 10 senders, flows, bytes, its biggest peers in order, both port distributions,
/// the direction of its connections, each rule's value and threshold line, each guard,
/// and its lines over time. With `same_evaluation`, the page must be of the API's
/// evaluation (figures that still move); without, only the figures must agree (a host
/// whose records are all in, evaluated again and again).
pub fn page_matches_api(dom: &str, api: &serde_json::Value, host: &str, same_evaluation: bool) {
    let d = &api["detail"];
    assert_eq!(attr(dom, "host-view", "data-host"), host);
    assert_eq!(
        attr(dom, "host-view", "data-ready"),
        "1",
        "{host}: not rendered"
    );
    if same_evaluation {
        assert_eq!(
            attr(dom, "host-view", "data-evaluated-at"),
            api["evaluated_at"].as_str().unwrap(),
            "{host}: the page and the API are of different evaluations"
        );
    }
    let (page, json) = (value(dom, "hv-score"), api["score"].as_f64().unwrap());
    assert!(
        agree(page, json),
        "{host}: score {page} on the page, {json} in the API"
    );
    for (id, key) in [
        ("hv-peers", "peers"),
        ("hv-outside-top10", "peers_outside_top10_senders"),
        ("hv-flows", "flows"),
        ("hv-bytes-in", "bytes_in"),
        ("hv-bytes-out", "bytes_out"),
    ] {
        let (page, json) = (value(dom, id), d[key].as_f64().unwrap());
        assert!(
            agree(page, json),
            "{host}: {id} {page} on the page, {json} in the API"
        );
    }
    assert_eq!(
        attr(dom, "hv-peers-note", "data-in-top10"),
        d["peers_in_top10_senders"].to_string()
    );
    assert_eq!(
        attr(dom, "hv-peers-note", "data-other-peers"),
        d["other_peers"].to_string()
    );
    for (id, key) in [
        ("hv-remote-ports", "remote_ports"),
        ("hv-local-ports", "local_ports"),
    ] {
        assert_eq!(bars(dom, id), api_bars(&d[key]), "{host}: {id}");
        assert_eq!(
            attr(dom, id, "data-distinct"),
            d[key]["distinct"].to_string()
        );
        assert_eq!(
            attr(dom, id, "data-other-ports"),
            d[key]["other_ports"].to_string()
        );
    }
    let dir = &d["direction"];
    for (a, key) in [
        ("data-inbound", "inbound_peers"),
        ("data-outbound", "outbound_peers"),
        ("data-both", "both_peers"),
    ] {
        assert_eq!(attr(dom, "hv-direction", a), dir[key].to_string(), "{a}");
    }
    // The peers' table: the API's top peers, in order.
    let shown: Vec<&str> = dom
        .split("class=\"hv-peer\" data-peer=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect();
    let listed: Vec<&str> = d["top_peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer"].as_str().unwrap())
        .collect();
    assert_eq!(shown, listed, "{host}: peers");
    // Every rule charted with its current value and threshold line; every guard.
    for e in api["evidence"].as_array().unwrap() {
        let id = format!("hv-rule-{}", e["rule"].as_str().unwrap());
        let (page, json) = (value(dom, &id), e["value"].as_f64().unwrap());
        assert!(
            agree(page, json),
            "{host}: {id} {page} on the page, {json} in the API"
        );
    }
    let rules = dom.find("id=\"hv-rules\"").unwrap();
    assert!(dom[rules..].contains("class=\"threshold\""));
    for g in api["guards"].as_array().unwrap() {
        let row = format!(
            "data-guard=\"{}\" data-holds=\"{}\"",
            g["guard"].as_str().unwrap(),
            g["holds"]
        );
        assert!(dom.contains(&row), "{host}: guard {row} not shown");
    }
    // The lines over time.
    for id in ["hv-score-chart", "hv-peers-chart"] {
        let at = dom.find(&format!("id=\"{id}\"")).unwrap();
        let chart = &dom[at..at + dom[at..].find("</svg>").unwrap()];
        assert!(chart.contains("<polyline"), "{host}: {id} has no line");
    }
}
