//! Alarms a SIEM reads without a custom parser: the agent (`run`, no BPF) is sent a
//! torrent-shaped host's flows as NetFlow v9 over loopback until it alarms, with
//! `--alarm-format ecs`, `--syslog udp://...` and `--webhook http://...`; then
//! - each line of `--alarms-json` is an Elastic Common Schema document: the ECS fields
//!   with their ECS types and the values of the alarm, the evidence under `detector.*`;
//! - the webhook's body is the same document;
//! - a real RFC 5424 parser, rsyslog's `mmpstrucdata` (Debian's `rsyslog`), reads the
//!   message's structured data: the SD-ELEMENT `detector@32473` with the alarm's id,
//!   state, host, kind, score, peers and the rules that fired, as the ECS line has them;
//!   and values with the characters RFC 5424 escapes (`"`, `\`, `]`) read back as sent.
//!
//! Unprivileged (rsyslogd runs as the test's user); `cargo xtask setup` installs rsyslog.

use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tests::agent::{
    Exporter, agent_command, scratch, spawn_agent, torrent, wait_for, write_config,
};
use tests::netns::Guarded;

const HOST: &str = "10.9.0.6";

/// rsyslogd on 127.0.0.1:`port` (UDP), parsing RFC 5424 structured data with
/// `mmpstrucdata` and writing, per message, `APP-NAME MSGID {parsed JSON}` to the file
/// returned.
fn rsyslog(dir: &Path, port: u16) -> (Guarded, std::path::PathBuf) {
    let out = dir.join("parsed.log");
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            r#"global(workDirectory="{dir}")
module(load="imudp")
module(load="mmpstrucdata")
template(name="parsed" type="list") {{
  property(name="app-name") constant(value=" ")
  property(name="msgid") constant(value=" ")
  property(name="$!") constant(value="\n")
}}
ruleset(name="siem") {{
  action(type="mmpstrucdata")
  action(type="omfile" file="{out}" template="parsed")
}}
input(type="imudp" address="127.0.0.1" port="{port}" ruleset="siem")
"#,
            dir = dir.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let child = Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
        .spawn()
        .expect("rsyslogd (package rsyslog; cargo xtask setup installs it)");
    (Guarded::new("rsyslogd", child), out)
}

fn time(v: &Value, name: &str) -> SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{name} is not a string: {v}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{name} = {s}: {e}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap_or_else(|| panic!("not a string: {x}")))
        .collect()
}

/// An alarm event whose kind is `kind` (the one free-text value a test can set).
fn odd_event(kind: &'static str) -> detector::detect::AlarmEvent {
    detector::detect::AlarmEvent {
        id: "odd".into(),
        state: detector::detect::AlarmState::Raised,
        host: HOST.parse().unwrap(),
        kind,
        kind_evidence: Vec::new(),
        score: 9.0,
        at: "2026-11-30T01:00:20.000Z".into(),
        first_seen: "2026-11-30T01:00:00.000Z".into(),
        last_seen: "2026-11-30T01:00:19.000Z".into(),
        window_secs: 300,
        peers: 80,
        flows: 200,
        bytes_in: 1,
        bytes_out: 2,
        top_peer_share: 0.1,
        evidence: vec![detector::detect::evidence::Evidence {
            rule: "external_peers",
            value: 80.0,
            op: ">=",
            threshold: 25.0,
            fired: true,
            weight: 2.0,
        }],
        guards: Vec::new(),
        exporters: vec!["local".into()],
        suppressed: None,
        acknowledged: None,
    }
}

/// The ECS document of a raised alarm, field by field (types and values).
fn check_ecs(doc: &Value) {
    let at = time(&doc["@timestamp"], "@timestamp");
    assert!(
        doc["ecs"]["version"].as_str().unwrap().starts_with("8."),
        "{doc}"
    );
    let event = &doc["event"];
    assert_eq!(event["kind"], "alert");
    assert_eq!(
        strings(&event["category"]),
        ["network", "intrusion_detection"]
    );
    assert_eq!(strings(&event["type"]), ["info"]);
    assert_eq!(event["action"], "raised");
    assert!(event["severity"].is_i64(), "{event}");
    let score = event["risk_score"].as_f64().unwrap();
    assert!(score >= 7.0, "over the default threshold: {event}");
    let norm = event["risk_score_norm"].as_f64().unwrap();
    assert!(norm > 0.0 && norm <= 100.0, "{event}");
    assert_eq!(event["severity"].as_i64().unwrap(), norm.round() as i64);
    let (start, end) = (
        time(&event["start"], "event.start"),
        time(&event["end"], "event.end"),
    );
    assert!(start <= end && end <= at, "{event}");
    for f in ["id", "name", "description"] {
        assert!(
            doc["rule"][f].as_str().is_some_and(|s| !s.is_empty()),
            "rule.{f}"
        );
    }
    assert_eq!(strings(&doc["host"]["ip"]), [HOST]);
    assert!(strings(&doc["related"]["ip"]).contains(&HOST));
    assert_eq!(doc["observer"]["name"], "sensor-7");
    assert_eq!(doc["observer"]["type"], "sensor");
    assert_eq!(doc["observer"]["product"], "detector");
    let d = &doc["detector"];
    let id = d["alarm_id"].as_str().unwrap();
    assert_eq!(doc["labels"]["alarm_id"], id);
    assert!(event["id"].as_str().unwrap().starts_with(id), "{event}");
    let message = doc["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("alarm {id} raised "))
            && message.contains(&format!("host {HOST} ")),
        "{message}"
    );
    assert_eq!(d["state"], "raised");
    assert_eq!(d["score"].as_f64(), Some(score));
    assert!(d["peers"].as_u64().unwrap() >= 80, "{d}");
    let fired = strings(&d["rules_fired"]);
    for rule in [
        "external_peers",
        "stable_local_port_peers",
        "tcp_and_udp_peers",
    ] {
        assert!(fired.contains(&rule), "{rule} did not fire: {d}");
    }
    let in_evidence: Vec<&str> = d["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["fired"] == true)
        .map(|e| e["rule"].as_str().unwrap())
        .collect();
    assert_eq!(fired, in_evidence);
    assert_eq!(strings(&d["exporters"]), ["127.0.0.1/0"]);
    // Not the native format.
    for native in ["id", "state", "at", "score", "evidence"] {
        assert!(doc.get(native).is_none(), "native field {native}: {doc}");
    }
}

#[test]
fn ecs_alarms_and_rfc_5424_structured_data_reach_real_receivers() {
    let dir = scratch("siem");
    let (nf_port, syslog_port) = (tests::netns::free_udp_port(), tests::netns::free_udp_port());
    let (mut rsyslogd, parsed) = rsyslog(&dir, syslog_port);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    tests::http::post_receiver(hook, bodies.clone());
    // Evaluate every second and raise at the first evaluation over the threshold.
    let config = write_config(&dir, "");
    let alarms = dir.join("alarms.json");
    let _agent = spawn_agent(
        agent_command(&dir, nf_port, &config, &dir.join("agent.log"))
            .arg("--alarms-json")
            .arg(&alarms)
            .args(["--alarm-format", "ecs", "--agent-name", "sensor-7"])
            .args(["--syslog", &format!("udp://127.0.0.1:{syslog_port}")])
            .args(["--webhook", &format!("http://127.0.0.1:{hook_port}/alarms")]),
    );

    // The torrent's flows, a batch every 2 s, until the alarm is written.
    let host: IpAddr = HOST.parse().unwrap();
    let mut exporter = Exporter::new(nf_port);
    let raised = wait_for("the ECS alarm line", Duration::from_secs(60), || {
        let now = SystemTime::now();
        exporter.send(&torrent(host, now), now);
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            let text = std::fs::read_to_string(&alarms).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| {
                // The last line may be half written yet.
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| v["event"]["action"] == "raised" && v["host"]["ip"][0] == HOST)
            }) {
                return Some(line.to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    });
    let doc: Value = serde_json::from_str(&raised).unwrap();
    check_ecs(&doc);
    // Every line written so far is an ECS alert.
    let text = std::fs::read_to_string(&alarms).unwrap();
    for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["event"]["kind"], "alert", "{l}");
        assert_eq!(v["ecs"]["version"], doc["ecs"]["version"], "{l}");
    }
    let d = &doc["detector"];
    let id = d["alarm_id"].as_str().unwrap().to_string();

    // The webhook's body: the same document, byte for byte.
    let body = wait_for("the webhook's body", Duration::from_secs(20), || {
        bodies
            .lock()
            .unwrap()
            .iter()
            .find(|b| b.as_str() == raised)
            .cloned()
    });
    check_ecs(&serde_json::from_str(&body).unwrap());

    // rsyslog parsed the structured data of the same event.
    let (header, sd) = wait_for("rsyslog's parse", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&parsed).ok()?;
        text.lines().find_map(|l| {
            let (header, json) = l.split_at(l.find('{')?);
            let v: Value = serde_json::from_str(json).ok()?;
            let sd = v["rfc5424-sd"]["detector@32473"].clone();
            (sd["id"] == id.as_str() && sd["state"] == "raised")
                .then(|| (header.trim().to_string(), sd))
        })
    });
    assert_eq!(header, "detector 1", "APP-NAME and MSGID");
    assert_eq!(sd["host"], HOST);
    assert_eq!(sd["kind"], d["kind"]);
    assert_eq!(
        sd["score"].as_str().unwrap(),
        format!("{:.1}", d["score"].as_f64().unwrap())
    );
    assert_eq!(sd["peers"].as_str().unwrap(), d["peers"].to_string());
    assert_eq!(
        sd["rules"].as_str().unwrap(),
        strings(&d["rules_fired"]).join(",")
    );
    let params: Vec<&String> = sd.as_object().unwrap().keys().collect();
    assert_eq!(
        params,
        ["host", "id", "kind", "peers", "rules", "score", "state"],
        "{sd}"
    );

    // PARAM-VALUEs with the three characters RFC 5424 escapes (`"`, `\`, `]`) and others
    // it does not: the parser reads back what was sent.
    let odd = "a\"b]c\\d[e=f g";
    let mut sink = detector::export::syslog::SyslogSink::new(
        detector::export::syslog::SyslogAddr::Udp(format!("127.0.0.1:{syslog_port}")),
    );
    sink.send(&odd_event(odd));
    let sd = wait_for(
        "rsyslog's parse of escaped values",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&parsed).ok()?;
            text.lines().find_map(|l| {
                let v: Value = serde_json::from_str(&l[l.find('{')?..]).ok()?;
                let sd = v["rfc5424-sd"]["detector@32473"].clone();
                (sd["id"] == "odd").then_some(sd)
            })
        },
    );
    assert_eq!(sd["kind"], odd, "{sd}");
    assert_eq!(sd["rules"], "external_peers", "{sd}");
    rsyslogd.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
