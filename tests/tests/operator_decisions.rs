//! Operators' decisions under `run --http` (issue #24): a torrent-shaped host's flows
//! are sent to the agent as NetFlow v9 over loopback until it alarms; then
//! - the alarm is acknowledged through the API and `/api/alarms` shows who and why, the
//!   alarm still open;
//! - the host's /32 is suppressed: its next alarm event (an update) is marked
//!   `suppressed` in `/api/alarms`, logged, and not written to `--alarms-json`, while
//!   the host is still profiled and listed by `/api/hosts`;
//! - a suppression with a short `for` expires; `/metrics` counts the decisions (checked
//!   by promtool);
//! - a SIGHUP reload keeps the decisions; so does a restart with the same decisions file
//!   (`decisions.json` beside the configuration): the host's new alarm is marked
//!   suppressed (and keeps its acknowledgement), not written to the file;
//! - removing the suppression ends it, and the file says so;
//! - the page's own forms, driven in headless Chromium (Debian's `chromium`, over the
//!   DevTools protocol with `headless_chrome`) behind basic authentication: the alarm
//!   acknowledged and the host suppressed for 8 hours, each with a note typed, then the
//!   suppression removed with its button; `/api`, `decisions.json`, the log and
//!   `/metrics` show each decision by the logged-in user (not the name typed in "by");
//!   a screenshot in `target/test-artifacts/decisions-page.png`.
//!
//! No BPF: runs unprivileged.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use detector::flow::FlowRecord;
use serde_json::{Value, json};
use tests::agent::{
    Exporter, agent_command, rec, scratch, spawn_agent, tool, wait_for, wait_for_every,
    write_config,
};
use tests::http::{free_tcp_port, get, json as json_get};
use tests::netns::Guarded;

const HOST: &str = "10.9.0.5";

// Not `tests::agent::torrent`: peers `from..to` (the host grows during the test) from
// another network, 30 packets a flow.
fn peer(i: u32) -> IpAddr {
    // External by default (outside the private and shared ranges).
    IpAddr::V4(Ipv4Addr::from(0xc633_0000 + i))
}

/// A BitTorrent client's flows with peers `from..to`: throttled peers on high ports, its
/// listening port 51413 on TCP and UDP, peers met both ways.
fn torrent(host: IpAddr, from: u32, to: u32, at: SystemTime) -> Vec<FlowRecord> {
    let mut v = Vec::new();
    for i in from..to {
        let p = peer(i);
        let rport = 10_000 + (i * 577 % 50_000) as u16;
        if i % 2 == 0 {
            v.push(rec(p, rport, host, 51413, 6, 30, 50_000, at));
            v.push(rec(host, 51413, p, rport, 6, 30, 2_000, at));
        } else {
            let local = 40_000 + (i % 20_000) as u16;
            v.push(rec(host, local, p, rport, 6, 30, 2_000, at));
            v.push(rec(p, rport, host, local, 6, 30, 50_000, at));
        }
        if i % 3 == 0 {
            v.push(rec(host, 51413, p, rport, 17, 30, 180, at));
            v.push(rec(p, rport, host, 51413, 17, 30, 200, at));
        }
    }
    v
}

/// The agent, with its log.
struct Agent {
    agent: Guarded,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, nf_port: u16, config: &Path, log: &str) -> Self {
        let log = dir.join(log);
        let agent = spawn_agent(
            agent_command(dir, nf_port, config, &log)
                .arg("--alarms-json")
                .arg(dir.join("alarms.json")),
        );
        tests::netns::wait_for_text(&log, "receiving NetFlow/IPFIX", Duration::from_secs(20));
        Self { agent, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of the log holds every one of `needles`.
    fn wait_logged(&self, what: &str, needles: &[&str]) {
        wait_for(what, Duration::from_secs(10), || {
            self.log_text()
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
                .then_some(())
        });
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.agent.child {
            // SAFETY: signals our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGINT, and waits for the agent to end.
    fn stop(&mut self) {
        self.agent
            .stop(nix::sys::signal::Signal::SIGINT, Duration::from_secs(30));
    }
}

/// A request's status and JSON body, whatever the status.
fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let code = resp.status();
    let text = resp.into_string().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")),
    )
}

fn post(url: &str, body: Value) -> (u16, Value) {
    answer(
        ureq::post(url)
            .timeout(Duration::from_secs(10))
            .send_json(body),
    )
}

/// The open alarm of `HOST`.
fn alarm_of_host(base: &str) -> Option<Value> {
    json_get(&format!("{base}/api/alarms"))["alarms"]
        .as_array()?
        .iter()
        .find(|a| a["host"] == HOST)
        .cloned()
}

fn alarm_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alarms.json"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The page as headless Chromium renders it (Debian's `chromium`; `cargo xtask setup`
/// installs it).
fn render(dir: &Path, base: &str) -> String {
    let out = Command::new(tool("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(format!("{base}/"))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn acknowledge_suppress_expire_and_keep_across_restarts() {
    let dir = scratch("decisions");
    let (nf_port, http_port) = (tests::netns::free_udp_port(), free_tcp_port());
    // Evaluate every second, raise at the first evaluation over the threshold, update at
    // most every second, never clear during the test.
    let config = write_config(
        &dir,
        &format!(
            "update_interval_secs = 1\nclear_after_secs = 600\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n"
        ),
    );
    let decisions = dir.join("decisions.json");
    let base = format!("http://127.0.0.1:{http_port}");
    let host: IpAddr = HOST.parse().unwrap();

    let mut agent = Agent::start(&dir, nf_port, &config, "agent1.log");
    assert!(
        agent.log_text().contains(&format!(
            "operators' decisions kept in {}",
            decisions.display()
        )),
        "{}",
        agent.log_text()
    );
    wait_for("the HTTP server", Duration::from_secs(20), || {
        get(&format!("{base}/metrics"))
    });
    let mut exporter = Exporter::new(nf_port);
    for _ in 0..2 {
        exporter.send(&torrent(host, 0, 80, SystemTime::now()), SystemTime::now());
        std::thread::sleep(Duration::from_secs(2));
    }
    let alarm = wait_for("the host's alarm", Duration::from_secs(30), || {
        alarm_of_host(&base)
    });
    let id = alarm["id"].as_str().unwrap().to_string();
    assert_eq!(alarm["acknowledged"], Value::Null, "{alarm}");
    assert_eq!(alarm["suppressed"], Value::Null, "{alarm}");
    wait_for(
        "the raise in --alarms-json",
        Duration::from_secs(10),
        || {
            alarm_lines(&dir)
                .iter()
                .any(|l| l["id"] == id.as_str() && l["state"] == "raised")
                .then_some(())
        },
    );

    // Acknowledged: who and why on /api/alarms; the alarm stays open.
    let (code, v) = post(
        &format!("{base}/api/alarms/{id}/ack"),
        json!({"note": "known seedbox, ticket 42", "by": "alice"}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["acknowledged"]["by"], "alice", "{v}");
    let (code, v) = post(
        &format!("{base}/api/alarms/0000000000000000/ack"),
        json!({"by": "alice"}),
    );
    assert_eq!(code, 404, "an alarm not open: {v}");
    let (code, v) = post(&format!("{base}/api/alarms/{id}/ack"), json!({"note": "x"}));
    assert_eq!(code, 400, "no author: {v}");
    assert!(v["error"].as_str().unwrap().contains("by"), "{v}");
    let alarm = alarm_of_host(&base).expect("still open");
    assert_eq!(alarm["acknowledged"]["by"], "alice", "{alarm}");
    assert_eq!(alarm["acknowledged"]["note"], "known seedbox, ticket 42");

    // Suppressed for good, with a note; refused without one or with a bad network.
    let (code, sup) = post(
        &format!("{base}/api/suppressions"),
        json!({"cidr": format!("{HOST}/32"), "until": null, "note": "sanctioned Linux mirror", "by": "bob"}),
    );
    assert_eq!(code, 201, "{sup}");
    assert_eq!(sup["cidr"], format!("{HOST}/32"));
    assert_eq!(sup["until"], Value::Null);
    let sid = sup["id"].as_str().unwrap().to_string();
    let (code, v) = post(
        &format!("{base}/api/suppressions"),
        json!({"cidr": "10.9.0.0/40", "note": "x", "by": "bob"}),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = post(
        &format!("{base}/api/suppressions"),
        json!({"cidr": "10.9.0.0/24", "by": "bob"}),
    );
    assert_eq!(code, 400, "a note is needed: {v}");
    // A short one, over in 2 s.
    let (code, short) = post(
        &format!("{base}/api/suppressions"),
        json!({"cidr": "10.77.0.0/16", "for": "2s", "note": "lab for a moment", "by": "carol"}),
    );
    assert_eq!(code, 201, "{short}");
    assert!(short["until"].is_string(), "{short}");
    assert_eq!(
        json_get(&format!("{base}/api/suppressions"))["suppressions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Anything an evaluation under way sent before the decision is written by now.
    std::thread::sleep(Duration::from_millis(1500));
    let written = alarm_lines(&dir).len();

    // The host grows (240 more peers): its update is marked suppressed, logged, and not
    // written; the host is still profiled and listed.
    exporter.send(
        &torrent(host, 80, 320, SystemTime::now()),
        SystemTime::now(),
    );
    let updated = wait_for("the suppressed update", Duration::from_secs(30), || {
        alarm_of_host(&base).filter(|a| a["state"] == "updated")
    });
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["suppressed"]["by"], "bob", "{updated}");
    assert_eq!(updated["suppressed"]["id"], sid.as_str());
    assert_eq!(updated["suppressed"]["note"], "sanctioned Linux mirror");
    assert_eq!(updated["acknowledged"]["by"], "alice", "{updated}");
    assert_eq!(updated["sent_to_sinks"], true, "its raise was: {updated}");
    assert!(updated["peers"].as_u64().unwrap() >= 300, "{updated}");
    agent.wait_logged(
        "the suppressed update logged",
        &[
            "suppressed (not sent to the alarm sinks",
            &format!("alarm {id} updated"),
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let lines = alarm_lines(&dir);
    assert_eq!(lines.len(), written, "nothing more written: {lines:?}");
    assert!(!lines.iter().any(|l| l["state"] == "updated"), "{lines:?}");
    let hosts = json_get(&format!("{base}/api/hosts?top=5"));
    let listed = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == HOST)
        .unwrap_or_else(|| panic!("the suppressed host is still listed: {hosts}"));
    assert_eq!(listed["alarmed"], true, "{listed}");
    assert_eq!(listed["suppressed"]["by"], "bob", "{listed}");
    assert!(
        listed["peers"].as_u64().unwrap() >= 300,
        "still profiled: {listed}"
    );

    // The short suppression is over.
    wait_for(
        "the short suppression to end",
        Duration::from_secs(10),
        || {
            let list = json_get(&format!("{base}/api/suppressions"));
            let ids: Vec<&str> = list["suppressions"]
                .as_array()?
                .iter()
                .filter_map(|s| s["id"].as_str())
                .collect();
            (ids == [sid.as_str()]).then_some(())
        },
    );
    let metrics = wait_for("the expiry counted", Duration::from_secs(10), || {
        let m = get(&format!("{base}/metrics"))?;
        (metric(&m, "detector_suppressions_expired_total") == Some(1.0)).then_some(m)
    });
    for (name, want) in [
        (
            "detector_operator_decisions_total{action=\"acknowledge\"}",
            1.0,
        ),
        (
            "detector_operator_decisions_total{action=\"suppress\"}",
            2.0,
        ),
        ("detector_operator_decisions_total{action=\"remove\"}", 0.0),
        ("detector_suppressions_active", 1.0),
        ("detector_acknowledged_alarms", 1.0),
    ] {
        assert_eq!(metric(&metrics, name), Some(want), "{name}:\n{metrics}");
    }
    assert!(
        metric(&metrics, "detector_suppressed_alarm_events_total").unwrap() >= 1.0,
        "{metrics}"
    );
    if let Err(e) = tests::promtool_check(&metrics) {
        panic!("promtool check metrics: {e}");
    }
    let log = agent.log_text();
    for needle in [
        "decision: \"alice\" acknowledged alarm",
        "decision: \"bob\" suppressed 10.9.0.5/32 for good",
        "sanctioned Linux mirror",
        "decision: suppression s2 of 10.77.0.0/16 until",
    ] {
        assert!(log.contains(needle), "{needle} not logged:\n{log}");
    }

    // A reload keeps the decisions.
    agent.signal(libc::SIGHUP);
    wait_for("the reload", Duration::from_secs(10), || {
        agent.log_text().contains("SIGHUP: reloaded").then_some(())
    });
    let list = json_get(&format!("{base}/api/suppressions"));
    assert_eq!(list["suppressions"][0]["id"], sid.as_str(), "{list}");
    assert_eq!(alarm_of_host(&base).unwrap()["acknowledged"]["by"], "alice");

    // A restart reads them back from the file.
    agent.stop();
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&decisions).unwrap()).unwrap();
    assert_eq!(file["suppressions"].as_array().unwrap().len(), 1, "{file}");
    assert_eq!(
        file["suppressions"][0]["cidr"],
        format!("{HOST}/32"),
        "{file}"
    );
    assert_eq!(file["acknowledgements"][0]["by"], "alice", "{file}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "no temporary file left: {left:?}");
    let written = alarm_lines(&dir).len();

    let agent = Agent::start(&dir, nf_port, &config, "agent2.log");
    wait_for("the HTTP server", Duration::from_secs(20), || {
        get(&format!("{base}/metrics"))
    });
    let list = json_get(&format!("{base}/api/suppressions"));
    assert_eq!(list["suppressions"][0]["id"], sid.as_str(), "{list}");
    assert_eq!(list["suppressions"][0]["by"], "bob", "{list}");
    let mut exporter = Exporter::new(nf_port);
    for _ in 0..2 {
        exporter.send(&torrent(host, 0, 80, SystemTime::now()), SystemTime::now());
        std::thread::sleep(Duration::from_secs(2));
    }
    let again = wait_for(
        "the host's alarm after the restart",
        Duration::from_secs(30),
        || alarm_of_host(&base),
    );
    assert_ne!(again["id"], id.as_str(), "a new alarm");
    assert_eq!(again["sent_to_sinks"], false, "{again}");
    assert_eq!(again["suppressed"]["by"], "bob", "{again}");
    assert_eq!(
        again["acknowledged"]["by"], "alice",
        "the acknowledgement went to the host's new alarm: {again}"
    );
    let new_id = again["id"].as_str().unwrap().to_string();
    agent.wait_logged(
        "the suppressed raise logged",
        &["suppressed (not sent", &format!("alarm {new_id} raised")],
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(alarm_lines(&dir).len(), written, "the raise is not written");

    // The page, rendered by a real browser: the alarm's decisions and buttons, the
    // suppression with its remove button.
    let dom = render(&dir, &base);
    let row_start = dom
        .find(&format!("<tr class=\"alarm\" data-host=\"{HOST}\">"))
        .unwrap_or_else(|| panic!("no alarm row for {HOST}:\n{dom}"));
    let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").unwrap()];
    for needle in [
        "class=\"decision\"",
        "acknowledged by alice: known seedbox, ticket 42",
        "by bob: sanctioned Linux mirror",
        "class=\"d-pick-ack\"",
        "class=\"d-pick-suppress\"",
    ] {
        assert!(
            row.contains(needle),
            "{needle} not in the alarm's row:\n{row}"
        );
    }
    let sup_row = dom
        .find(&format!(
            "<tr class=\"suppression\" data-id=\"{sid}\" data-cidr=\"{HOST}/32\">"
        ))
        .unwrap_or_else(|| panic!("no suppression row:\n{dom}"));
    assert!(
        dom[sup_row..].contains("class=\"d-remove\""),
        "its remove button"
    );

    // Removed: over at once, and the file says so.
    let del = |by: &str| {
        answer(
            ureq::delete(&format!("{base}/api/suppressions/{sid}?by={by}"))
                .timeout(Duration::from_secs(10))
                .call(),
        )
    };
    let (code, v) = del("dave");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["id"], sid.as_str());
    let (code, _) = del("dave");
    assert_eq!(code, 404, "already removed");
    let list = json_get(&format!("{base}/api/suppressions"));
    assert_eq!(list["suppressions"], json!([]), "{list}");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&decisions).unwrap()).unwrap();
    assert_eq!(file["suppressions"], json!([]), "{file}");
    assert_eq!(alarm_of_host(&base).unwrap()["suppressed"], Value::Null);
    assert!(
        agent
            .log_text()
            .contains("decision: \"dave\" removed suppression"),
        "{}",
        agent.log_text()
    );

    // The page carries the decision forms.
    let page = get(&format!("{base}/")).unwrap();
    for needle in ["id=\"decide\"", "/api/suppressions", "decisionCell"] {
        assert!(page.contains(needle), "{needle} not on the page");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

// The page's own forms, driven in headless Chromium over the DevTools protocol.

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";
const ACK_NOTE: &str = "seen on the page, ticket 77";
const SUPPRESS_NOTE: &str = "lab machine, suppressed from the page";

/// `Authorization: Basic` with alice's password.
fn basic() -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    format!("Basic {b64}")
}

/// `GET url` as alice: the JSON body of a 200.
fn get_as_alice(url: &str) -> Value {
    let (code, v) = answer(
        ureq::get(url)
            .set("Authorization", &basic())
            .timeout(Duration::from_secs(10))
            .call(),
    );
    assert_eq!(code, 200, "GET {url}: {v}");
    v
}

/// `/metrics` as alice.
fn metrics_as_alice(base: &str) -> String {
    ureq::get(&format!("{base}/metrics"))
        .set("Authorization", &basic())
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// Debian's `chromium` (headless, no sandbox: the tests run as root), driven by
/// `headless_chrome`; killed when dropped.
fn launch_chromium(profile: &Path) -> headless_chrome::Browser {
    let opts = headless_chrome::LaunchOptions::default_builder()
        .path(Some(tool("chromium")))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1400, 1000)))
        .user_data_dir(Some(profile.to_path_buf()))
        .idle_browser_timeout(Duration::from_secs(120))
        .args(vec![std::ffi::OsStr::new("--disable-gpu")])
        .build()
        .unwrap();
    headless_chrome::Browser::new(opts).expect("launch chromium")
}

/// A string the page computes (a JavaScript expression).
fn page_text(tab: &headless_chrome::Tab, expr: &str) -> String {
    let v = tab.evaluate(expr, false).expect(expr).value;
    match v {
        Some(Value::String(s)) => s,
        other => panic!("{expr}: {other:?}"),
    }
}

/// Records every click event the page receives (capture phase, before its own handlers),
/// for [`click`] to know its click arrived; the page is otherwise untouched.
const CLICK_RECORDER: &str = "window.__clicked = []; window.addEventListener('click', e => window.__clicked.push(e.target), true)";

/// How many of the clicks the page received reached `selector` (or an element in it).
fn clicks_on(tab: &headless_chrome::Tab, selector: &str) -> u64 {
    let sel = serde_json::to_string(selector).unwrap();
    let expr = format!("window.__clicked.filter(t => t.closest({sel}) !== null).length");
    tab.evaluate(&expr, false)
        .expect(&expr)
        .value
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("{expr}: no count"))
}

/// Clicks the element `selector` with the mouse, at its middle, until one click has
/// reached it. The page rebuilds its tables every 2 s: a row's button may be replaced
/// between the press and the release (no click: they were on two elements); it is then
/// found and clicked again. A click that arrived is never repeated.
///
/// The element is found, brought into view and its middle checked to be its own (not
/// covered) in one script, which the page's refresh cannot interleave with (and not with
/// `Element::click`, whose steps take a second and wait 20 s on an element replaced in
/// between).
fn click(tab: &headless_chrome::Tab, selector: &str) {
    let before = clicks_on(tab, selector);
    let sel = serde_json::to_string(selector).unwrap();
    let locate = format!(
        "(() => {{
            const e = document.querySelector({sel});
            if (!e) return '';
            let r = e.getBoundingClientRect();
            if (r.top < 0 || r.bottom > innerHeight) {{
                e.scrollIntoView({{ block: 'center' }});
                r = e.getBoundingClientRect();
            }}
            const x = r.left + r.width / 2, y = r.top + r.height / 2;
            const hit = document.elementFromPoint(x, y);
            return hit && e.contains(hit) ? `${{x}} ${{y}}` : '';
        }})()"
    );
    wait_for_every(
        &format!("a click to reach {selector}"),
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let at = page_text(tab, &locate);
            let (x, y) = at.split_once(' ')?;
            let point = headless_chrome::browser::tab::point::Point {
                x: x.parse().unwrap(),
                y: y.parse().unwrap(),
            };
            tab.click_point(point).unwrap();
            // The page has handled the mouse events when the protocol answers.
            (clicks_on(tab, selector) > before).then_some(())
        },
    );
}

/// Waits until the form field `id` holds `want` (a button filled it).
fn wait_field(tab: &headless_chrome::Tab, id: &str, want: &str) {
    let expr = format!("document.getElementById('{id}').value");
    wait_for(
        &format!("#{id} to hold {want:?}"),
        Duration::from_secs(5),
        || (page_text(tab, &expr) == want).then_some(()),
    );
}

/// The page's answer to a decision, once it says `expect` (or an error): `#d-result`'s
/// class (`ok`, `err`) and text.
fn decision_result(tab: &headless_chrome::Tab, expect: &str) -> (String, String) {
    wait_for(
        &format!("the page to say {expect:?}"),
        Duration::from_secs(10),
        || {
            // Both at once: the page sets them together.
            let both = page_text(
                tab,
                "(r => r.className + '\\n' + r.textContent)(document.getElementById('d-result'))",
            );
            let (class, text) = both.split_once('\n').unwrap();
            (class == "err" || text.starts_with(expect))
                .then(|| (class.to_string(), text.to_string()))
        },
    )
}

#[test]
fn the_page_acknowledges_suppresses_and_removes_through_its_own_forms() {
    let dir = scratch("decisions-page");
    let (nf_port, http_port) = (tests::netns::free_udp_port(), free_tcp_port());
    // Basic authentication (bcrypt), as in Prometheus' web configuration file: who did it
    // is the user the browser logged in as.
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "basic_auth_users:\n  {USER}: '{}'\n",
            bcrypt::hash(PASSWORD, 4).unwrap()
        ),
    )
    .unwrap();
    let config = write_config(
        &dir,
        &format!(
            "update_interval_secs = 1\nclear_after_secs = 600\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\nconfig = \"web.yml\"\n"
        ),
    );
    let decisions = dir.join("decisions.json");
    let base = format!("http://127.0.0.1:{http_port}");
    let host: IpAddr = HOST.parse().unwrap();
    let agent = Agent::start(&dir, nf_port, &config, "agent.log");
    wait_for("the HTTP server", Duration::from_secs(20), || {
        ureq::get(&format!("{base}/metrics"))
            .set("Authorization", &basic())
            .call()
            .ok()
    });
    let mut exporter = Exporter::new(nf_port);
    for _ in 0..2 {
        exporter.send(&torrent(host, 0, 80, SystemTime::now()), SystemTime::now());
        std::thread::sleep(Duration::from_secs(2));
    }
    let alarm = wait_for("the host's alarm", Duration::from_secs(30), || {
        get_as_alice(&format!("{base}/api/alarms"))["alarms"]
            .as_array()?
            .iter()
            .find(|a| a["host"] == HOST)
            .cloned()
    });
    let id = alarm["id"].as_str().unwrap().to_string();
    assert_eq!(alarm["acknowledged"], Value::Null, "{alarm}");

    // The browser answers the server's challenge with alice's password, as a person
    // would in its dialog; the page's own requests then carry it.
    let browser = launch_chromium(&dir.join("chromium"));
    let tab = browser.new_tab().unwrap();
    tab.set_default_timeout(Duration::from_secs(20));
    tab.enable_fetch(None, Some(true)).unwrap();
    tab.authenticate(Some(USER.into()), Some(PASSWORD.into()))
        .unwrap();
    tab.navigate_to(&format!("{base}/"))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    tab.evaluate(CLICK_RECORDER, false).unwrap();
    let row = format!("tr.alarm[data-host=\"{HOST}\"]");
    tab.wait_for_element(&format!("{row} button.d-pick-ack"))
        .expect("the alarm's acknowledge button");

    // Acknowledge: the alarm's button fills the form, a note is typed, the form's
    // button sends it. The "by" field is left empty: the login says who.
    click(&tab, &format!("{row} button.d-pick-ack"));
    wait_field(&tab, "d-alarm", &id);
    tab.wait_for_element("#d-note")
        .unwrap()
        .type_into(ACK_NOTE)
        .unwrap();
    click(&tab, "#d-ack");
    let (class, text) = decision_result(&tab, &format!("alarm {id} acknowledged"));
    assert_eq!(class, "ok", "the page says: {text}");

    // Suppress the host for 8 hours: its button fills the host's /32; another note
    // (the field cleared first); a name typed in "by" that is not the login's.
    click(&tab, &format!("{row} button.d-pick-suppress"));
    wait_field(&tab, "d-cidr", &format!("{HOST}/32"));
    wait_field(&tab, "d-alarm", &id);
    // Cleared and chosen by script: typing appends, and a <select>'s list is not keyboard
    // driven here.
    tab.evaluate(
        "document.getElementById('d-note').value = ''; document.getElementById('d-for').value = '8h'",
        false,
    )
    .unwrap();
    tab.wait_for_element("#d-note")
        .unwrap()
        .type_into(SUPPRESS_NOTE)
        .unwrap();
    tab.wait_for_element("#d-by")
        .unwrap()
        .type_into("mallory")
        .unwrap();
    let asked = SystemTime::now();
    click(&tab, "#d-suppress");
    let (class, text) = decision_result(&tab, &format!("{HOST}/32 suppressed until "));
    let answered = SystemTime::now();
    assert_eq!(class, "ok", "the page says: {text}");

    // The page shows both decisions on the alarm's row and the suppression in its table.
    let sup_row = format!("tr.suppression[data-cidr=\"{HOST}/32\"]");
    let decided = wait_for("the decisions on the page", Duration::from_secs(10), || {
        let cell = page_text(
            &tab,
            &format!("(document.querySelector('{row} td.decision') || {{}}).textContent || ''"),
        );
        let listed = page_text(
            &tab,
            &format!("(document.querySelector('{sup_row}') || {{}}).textContent || ''"),
        );
        (cell.contains(SUPPRESS_NOTE) && !listed.is_empty()).then_some((cell, listed))
    });
    assert!(
        decided
            .0
            .contains(&format!("acknowledged by {USER}: {ACK_NOTE}")),
        "{decided:?}"
    );
    assert!(
        decided.0.contains(&format!("by {USER}: {SUPPRESS_NOTE}")),
        "{decided:?}"
    );
    assert!(
        decided.1.contains(USER) && decided.1.contains(SUPPRESS_NOTE),
        "{decided:?}"
    );
    let artifacts = tests::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = tab
        .capture_screenshot(
            headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption::Png,
            None,
            None,
            true,
        )
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    std::fs::write(artifacts.join("decisions-page.png"), &png).unwrap();

    // The API: both decisions on the alarm, by the login (not the name typed), with the
    // notes typed; the suppression's end 8 hours after it was asked for.
    let alarm = get_as_alice(&format!("{base}/api/alarms"))["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["host"] == HOST)
        .cloned()
        .expect("still open");
    assert_eq!(alarm["id"], id.as_str(), "{alarm}");
    assert_eq!(alarm["acknowledged"]["by"], USER, "{alarm}");
    assert_eq!(alarm["acknowledged"]["note"], ACK_NOTE, "{alarm}");
    assert_eq!(alarm["suppressed"]["by"], USER, "{alarm}");
    assert_eq!(alarm["suppressed"]["note"], SUPPRESS_NOTE, "{alarm}");
    assert_eq!(alarm["suppressed"]["cidr"], format!("{HOST}/32"), "{alarm}");
    let list = get_as_alice(&format!("{base}/api/suppressions"));
    let sups = list["suppressions"].as_array().unwrap();
    assert_eq!(sups.len(), 1, "{list}");
    let until = humantime::parse_rfc3339_weak(sups[0]["until"].as_str().unwrap()).unwrap();
    // (Kept to the millisecond.)
    let eight_hours = Duration::from_secs(8 * 3600);
    let slack = Duration::from_millis(1);
    assert!(
        until + slack >= asked + eight_hours && until <= answered + eight_hours,
        "until {until:?}: not 8 hours after the click ({asked:?}) nor the answer ({answered:?})"
    );
    let sid = sups[0]["id"].as_str().unwrap().to_string();
    // The file beside the configuration, and the log.
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&decisions).unwrap()).unwrap();
    assert_eq!(file["acknowledgements"][0]["by"], USER, "{file}");
    assert_eq!(file["acknowledgements"][0]["note"], ACK_NOTE, "{file}");
    assert_eq!(file["suppressions"][0]["by"], USER, "{file}");
    assert_eq!(file["suppressions"][0]["note"], SUPPRESS_NOTE, "{file}");
    assert_eq!(
        file["suppressions"][0]["cidr"],
        format!("{HOST}/32"),
        "{file}"
    );
    let log = agent.log_text();
    for needle in [
        format!("decision: \"{USER}\" acknowledged alarm {id}"),
        format!("decision: \"{USER}\" suppressed {HOST}/32 until"),
    ] {
        assert!(log.contains(&needle), "{needle} not logged:\n{log}");
    }
    assert!(!log.contains("mallory"), "{log}");

    // Remove, with the suppression's own button.
    click(&tab, &format!("{sup_row} button.d-remove"));
    let (class, text) = decision_result(&tab, &format!("suppression of {HOST}/32 removed"));
    assert_eq!(class, "ok", "the page says: {text}");
    let list = get_as_alice(&format!("{base}/api/suppressions"));
    assert_eq!(list["suppressions"], json!([]), "{list}");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&decisions).unwrap()).unwrap();
    assert_eq!(file["suppressions"], json!([]), "{file}");
    assert!(
        agent
            .log_text()
            .contains(&format!("decision: \"{USER}\" removed suppression {sid}")),
        "{}",
        agent.log_text()
    );
    let metrics = metrics_as_alice(&base);
    for (name, want) in [
        (
            "detector_operator_decisions_total{action=\"acknowledge\"}",
            1.0,
        ),
        (
            "detector_operator_decisions_total{action=\"suppress\"}",
            1.0,
        ),
        ("detector_operator_decisions_total{action=\"remove\"}", 1.0),
        ("detector_suppressions_active", 0.0),
        ("detector_acknowledged_alarms", 1.0),
    ] {
        assert_eq!(metric(&metrics, name), Some(want), "{name}:\n{metrics}");
    }
    drop(tab);
    drop(browser);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
