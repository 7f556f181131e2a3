//! The Grafana dashboard and the Prometheus alerting rules the package ships
//! (`xtask/package/grafana/detector-dashboard.json`,
//! `xtask/package/prometheus/detector-rules.yml`) held against the agent itself:
//!
//! - every metric their PromQL names exists in the `/metrics` of a live agent (run without
//!   BPF: NetFlow with a torrent-shaped host and broken datagrams, sFlow with lost and
//!   bad datagrams, a flows file, an alarms file and a webhook, so that every family
//!   appears); the meter's families, which only an agent on an interface (BPF) shows,
//!   are held against the agent's own encoder given a meter's state; `up` is
//!   Prometheus's own;
//! - every label they group by, match on or print is carried by one of the metrics
//!   their expression names, and the series a real Prometheus (Debian's `prometheus`)
//!   returns for each dashboard query carry the labels its legend prints;
//! - Prometheus loads the rules, evaluates each without error, and fires
//!   `DetectorP2PHostDetected` for the agent once it raises the host's alarm, with the
//!   agent's address in the description;
//! - `promtool check rules` passes, and `promtool test rules` proves the key alerts fire
//!   on synthetic series (`detector-rules.test.yml`);
//! - the dashboard imports anywhere: one `${DS_PROMETHEUS}` input used by every panel,
//!   target, variable and annotation, unique panel ids, panels inside the 24-column grid
//!   without overlap.
//!
//! No BPF: runs unprivileged; `cargo xtask setup` installs prometheus (promtool).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tests::agent::{
    Exporter, agent_command, scratch, spawn_agent, start_prometheus, torrent, write_config,
};
use tests::http::{free_tcp_port, get, prom_query as query};
use tests::sflow::{SampleHead, SampledIp, datagram, flow_sample, sampled_ip};

const HOST: &str = "10.9.0.5";

fn package_dir() -> PathBuf {
    tests::workspace_root().join("xtask/package")
}

fn rules_file() -> PathBuf {
    package_dir().join("prometheus/detector-rules.yml")
}

fn rules_test_file() -> PathBuf {
    package_dir().join("prometheus/detector-rules.test.yml")
}

fn dashboard() -> Value {
    let path = package_dir().join("grafana/detector-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// PromQL: the metric names and label names an expression uses.

/// PromQL's functions and aggregation operators (a name followed by `(` is one too).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "stdvar_over_time",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
    "year",
];

/// Binary operators and modifiers that read as words.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
];

/// Modifiers followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// What an expression names: metrics, and labels (in matchers and grouping lists).
#[derive(Debug, Default, PartialEq)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Parses the metric and label names out of a PromQL expression (Grafana's `$variables`
/// allowed): string literals, range and subquery brackets, numbers and durations are
/// skipped; a name followed by `(` or listed in [`FUNCTIONS`] is a function, one in
/// [`KEYWORDS`] an operator; names in `{...}` before a match operator and in the lists
/// after [`GROUPING`] modifiers are labels; every other name is a metric.
fn promql_names(expr: &str) -> Names {
    let c: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let ident_end = |mut i: usize| {
        while i < c.len() && is_ident(c[i]) {
            i += 1;
        }
        i
    };
    // Skips a string literal starting at `i`; returns the index after it.
    let skip_string = |mut i: usize| {
        let q = c[i];
        i += 1;
        while i < c.len() && c[i] != q {
            if c[i] == '\\' && q != '`' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(i);
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch == '{' {
            // Label matchers: NAME OP "value", ...
            i += 1;
            while i < c.len() && c[i] != '}' {
                if c[i] == '"' || c[i] == '\'' || c[i] == '`' {
                    i = skip_string(i);
                } else if is_ident_start(c[i]) {
                    let end = ident_end(i);
                    names.labels.insert(c[i..end].iter().collect());
                    i = end;
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if ch == '$' {
            // A Grafana variable: $name or ${name}.
            i += 1;
            if i < c.len() && c[i] == '{' {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                i = ident_end(i);
            }
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration (1e3, 0x1f, 5m, 1h30m).
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(ch) {
            let end = ident_end(i);
            let word: String = c[i..end].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = skip_ws(end);
            let called = c.get(next) == Some(&'(');
            if GROUPING.contains(&lower.as_str()) {
                if called {
                    let mut j = next + 1;
                    while j < c.len() && c[j] != ')' {
                        if is_ident_start(c[j]) {
                            let e = ident_end(j);
                            names.labels.insert(c[j..e].iter().collect());
                            j = e;
                        } else {
                            j += 1;
                        }
                    }
                    i = j + 1;
                } else {
                    i = end;
                }
                continue;
            }
            if !called && !KEYWORDS.contains(&lower.as_str()) && !FUNCTIONS.contains(&word.as_str())
            {
                names.metrics.insert(word);
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_parsed() {
    let n = |e: &str| {
        let n = promql_names(e);
        (
            n.metrics.into_iter().collect::<Vec<_>>(),
            n.labels.into_iter().collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        n(
            r#"sum by (instance, exporter) (rate(detector_netflow_records_total{job="$job", instance=~"$instance"}[$__rate_interval]))"#
        ),
        (
            vec!["detector_netflow_records_total".into()],
            vec!["exporter".into(), "instance".into(), "job".into()]
        )
    );
    assert_eq!(
        n(r#"sum by (instance) (detector_meter_flows{table="kernel"}) / on (instance) (2 * max by (instance) (detector_meter_map_capacity_flows))"#).0,
        vec![
            "detector_meter_flows".to_string(),
            "detector_meter_map_capacity_flows".into()
        ]
    );
    assert_eq!(
        n("time() - detector_start_time_seconds"),
        (vec!["detector_start_time_seconds".into()], vec![])
    );
    assert_eq!(
        n(
            r#"increase(x_total[10m] offset 1h) > 0 and on(instance) group_left(version) y or absent(up{job="a}b"})"#
        ),
        (
            vec!["up".into(), "x_total".into(), "y".into()],
            vec!["instance".into(), "job".into(), "version".into()]
        )
    );
    assert_eq!(
        n("sum without (direction) (rate(a[5m:1m])) * 1e3 + 0.5 / 8 bool == c{d!~'e\\'f'}").0,
        vec!["a".to_string(), "c".into()]
    );
    assert_eq!(
        n("label_replace(m, \"dst\", \"$1\", \"src\", \"(.*)\") unless ignoring (x) n").0,
        vec!["m".to_string(), "n".into()]
    );
}

// ---------------------------------------------------------------------------------------
// The dashboard and the rules.

/// Every PromQL expression of the dashboard: panel targets, annotations, and the metric
/// selectors of its `label_values(...)` variables.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap_or_default().to_string());
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["expr"].as_str() {
            out.push(e.to_string());
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or_default();
        // label_values(SELECTOR, LABEL): the selector is PromQL.
        if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        {
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push(selector.trim().to_string());
        }
    }
    out
}

/// Panels, including those inside collapsed rows.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        for q in p["panels"].as_array().into_iter().flatten() {
            out.push(q);
        }
    }
    out
}

/// The rules file's expressions, as promtool-checked YAML lines `expr: ...` (the file
/// keeps each expression on one line; Prometheus's own reading of them is held against
/// this in the live test).
fn rule_exprs_from_file() -> Vec<String> {
    rules_from_file().into_values().collect()
}

/// The rules file's alerts: name, expression (`- alert: NAME` then `expr: ...`).
fn rules_from_file() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(rules_file()).unwrap();
    let mut out = BTreeMap::new();
    let mut name = None;
    for l in text.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("- alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = l.strip_prefix("expr:") {
            let n = name.take().expect("an expr: line after each `- alert:`");
            assert!(
                out.insert(n.clone(), e.trim().to_string()).is_none(),
                "alert {n} twice"
            );
        }
    }
    out
}

/// Runs promtool with `args`; Ok(output) or what it said.
fn promtool(args: &[&str], cwd: &Path) -> Result<String, String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|e| {
            format!("promtool (package prometheus; cargo xtask setup installs it): {e}")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "promtool {}: {}\n{text}",
            args.join(" "),
            out.status
        ))
    }
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let dir = rules_file().parent().unwrap().to_path_buf();
    let checked = promtool(&["check", "rules", rules_file().to_str().unwrap()], &dir)
        .unwrap_or_else(|e| panic!("{e}"));
    let n = rule_exprs_from_file().len();
    assert!(
        checked.contains(&format!("SUCCESS: {n} rules found")),
        "promtool found other rules than the file's {n} `expr:` lines:\n{checked}"
    );
    let tested = promtool(
        &["test", "rules", rules_test_file().to_str().unwrap()],
        &dir,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The unit tests cover the key alerts.
    let tests = std::fs::read_to_string(rules_test_file()).unwrap();
    for alert in [
        "DetectorDown",
        "DetectorRecordsShed",
        "DetectorMeterRingBufferDrops",
        "DetectorNetflowKernelDrops",
        "DetectorExportFailures",
        "DetectorNetflowSequenceLoss",
        "DetectorSflowLostDatagrams",
        "DetectorP2PHostDetected",
    ] {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "{alert} is not shown firing in {}",
            rules_test_file().display()
        );
    }
}

#[test]
fn dashboard_imports_anywhere() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        (38..=41).contains(&schema),
        "schemaVersion {schema}: Grafana 10 and 11 write 38 to 41"
    );
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input: {inputs:?}"
    );
    assert!(
        d["id"].is_null(),
        "no database id: it imports as a new dashboard"
    );
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});

    // Every datasource anywhere is the input (or Grafana's built-in annotations).
    fn datasources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" {
                        out.push(x);
                    } else {
                        datasources(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| datasources(x, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    datasources(&d, &mut found);
    for x in found {
        assert!(
            *x == ds || x["uid"] == "-- Grafana --",
            "a datasource other than ${{DS_PROMETHEUS}}: {x}"
        );
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut graphs = 0;
    for p in all_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} twice");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(p["datasource"], ds, "{title}: the panel's datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}: a target's datasource");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: an empty expression");
            assert!(
                !promql_names(expr).metrics.is_empty(),
                "{title}: {expr} names no metric"
            );
            let r = t["refId"].as_str().expect("refId");
            assert!(refs.insert(r), "{title}: refId {r} twice");
        }
    }
    assert!(graphs >= 20, "{graphs} panels");
    for v in d["templating"]["list"].as_array().expect("templating") {
        assert_eq!(v["datasource"], ds, "variable {}", v["name"]);
    }
}

// ---------------------------------------------------------------------------------------
// The live agent.

/// [`tests::agent::wait_for`] at this test's own pace: every 250 ms, each a scrape or a
/// query of Prometheus.
fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    tests::agent::wait_for_every(what, timeout, Duration::from_millis(250), f)
}

/// Metric families and the label names of their samples, from the text format.
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            out.entry(name.to_string()).or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, labels) = match line.find('{') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line.split_whitespace().next().unwrap_or_default(), ""),
        };
        let set = out.entry(name.to_string()).or_default();
        // name="value",... with escapes inside the values.
        let c: Vec<char> = labels.chars().collect();
        let mut i = 0;
        while i < c.len() && c[i] != '}' {
            let start = i;
            while i < c.len() && c[i] != '=' {
                i += 1;
            }
            set.insert(c[start..i].iter().collect::<String>().trim().to_string());
            i += 2; // ="
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1; // "
            if i < c.len() && c[i] == ',' {
                i += 1;
            }
        }
    }
    out
}

/// A scrape of the agent's own encoder given a meter's state: the families only an agent
/// metering an interface (BPF) shows.
fn meter_families() -> String {
    use detector::status::{MeterStatus, State, metrics};
    let state = State {
        started: Some(SystemTime::now()),
        meter: Some(MeterStatus {
            iface: "eth0".into(),
            map_size: 1 << 20,
            ..MeterStatus::default()
        }),
        ..State::default()
    };
    metrics::encode(&state)
}

/// sFlow from agent 192.0.2.3: datagrams 1, 2 and 5 (two lost on the way), then one whose
/// samples are cut off (a bad datagram of the source), then one that is not sFlow v5 (a
/// header error of the listener).
fn sflow_datagrams() -> Vec<Vec<u8>> {
    let agent = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
    let sample = |seq: u32| {
        let head = SampleHead {
            sequence: seq,
            source_type: 0,
            source_index: 3,
            rate: 100,
            pool: 100 * seq,
            drops: 0,
            input: 3,
            output: 4,
        };
        let ip = SampledIp {
            length: 1_200,
            protocol: 6,
            src: IpAddr::V4(Ipv4Addr::new(10, 9, 0, 7)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 50)),
            src_port: 50_000,
            dst_port: 443,
            tcp_flags: 0x18,
            tos: 0,
        };
        flow_sample(&head, &[sampled_ip(&ip)])
    };
    let mut out = Vec::new();
    for seq in [1, 2, 5] {
        out.push(datagram(agent, 0, seq, 1_000 * seq, &[sample(seq)]));
    }
    let mut cut = datagram(agent, 0, 6, 6_000, &[sample(6)]);
    cut.truncate(cut.len() - 20);
    out.push(cut);
    out.push(vec![0, 0, 0, 4, 0, 0, 0, 1]);
    out
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// `{{label}}` (Grafana legends) or `$labels.label` (rule templates) names in `text`.
fn printed_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in text.split("{{").skip(1) {
        let inner = part.split("}}").next().unwrap_or_default().trim();
        if let Some(l) = inner.strip_prefix("$labels.") {
            out.insert(l.split_whitespace().next().unwrap_or_default().to_string());
        } else if inner.chars().all(is_ident) && !inner.is_empty() {
            out.insert(inner.to_string());
        } else {
            for piece in inner.split("$labels.").skip(1) {
                out.insert(piece.chars().take_while(|c| is_ident(*c)).collect());
            }
        }
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_rules_name_is_served() {
    let dir = scratch("dashboards");
    let (nf_port, sflow_port) = (tests::netns::free_udp_port(), tests::netns::free_udp_port());
    let (http_port, prom_port, closed_port) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let config = write_config(&dir, "");
    let _agent = spawn_agent(
        agent_command(&dir, nf_port, &config, &dir.join("agent.log"))
            .args(["--sflow-listen", &format!("127.0.0.1:{sflow_port}")])
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .arg("--alarms-json")
            .arg(dir.join("alarms.json"))
            // Nobody listens there: the webhook's families appear, its attempts fail.
            .args([
                "--webhook",
                &format!("http://127.0.0.1:{closed_port}/alarms"),
            ]),
    );
    let base = format!("http://127.0.0.1:{http_port}");
    wait_for("the agent's HTTP server", Duration::from_secs(30), || {
        get(&format!("{base}/metrics"))
    });

    // A real Prometheus with the shipped rules scrapes the agent every second.
    let _prometheus = start_prometheus(
        &dir.join("prometheus"),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: detector\n    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n",
            rules_file().display()
        ),
        prom_port,
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    // The alert needs a scrape from before the alarm.
    wait_for(
        "Prometheus to scrape the agent before the alarm",
        Duration::from_secs(60),
        || {
            let r = query(
                &prom,
                r#"detector_alarm_events_total{job="detector", state="raised"}"#,
            )
            .ok()?;
            (r.first()?["value"][1] == "0").then_some(())
        },
    );

    // NetFlow: the torrent's flows twice, and datagrams that do not decode.
    let host: IpAddr = HOST.parse().unwrap();
    let mut exporter = Exporter::new(nf_port);
    for _ in 0..2 {
        let now = SystemTime::now();
        exporter.send(&torrent(host, now), now);
        std::thread::sleep(Duration::from_secs(1));
    }
    for junk in [
        vec![0u8, 9, 0, 1],
        vec![
            0, 7, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ] {
        exporter.sock.send_to(&junk, exporter.to).unwrap();
    }
    // sFlow.
    let sflow_to: SocketAddr = format!("127.0.0.1:{sflow_port}").parse().unwrap();
    for dg in sflow_datagrams() {
        exporter.sock.send_to(&dg, sflow_to).unwrap();
    }

    let needed_live = [
        "detector_netflow_errors_total",
        "detector_sflow_errors_by_kind_total",
        "detector_sflow_header_errors_total",
        "detector_sflow_lost_datagrams_total",
    ];
    let scrape = wait_for(
        "the alarm, the NetFlow errors and the sFlow source",
        Duration::from_secs(30),
        || {
            let m = get(&format!("{base}/metrics"))?;
            let raised = m
                .lines()
                .any(|l| l == "detector_alarm_events_total{state=\"raised\"} 1");
            let fams = families(&m);
            (raised && needed_live.iter().all(|f| fams.contains_key(*f))).then_some(m)
        },
    );
    let live = families(&scrape);
    let meter = families(&meter_families());
    let mut known = live.clone();
    for (name, labels) in &meter {
        known
            .entry(name.clone())
            .or_default()
            .extend(labels.iter().cloned());
    }

    // Every metric named, served; every label used, carried.
    let d = dashboard();
    let dash_exprs = dashboard_exprs(&d);
    let rule_exprs = rule_exprs_from_file();
    let mut problems = Vec::new();
    let mut named = BTreeSet::new();
    for (whence, expr) in dash_exprs
        .iter()
        .map(|e| ("dashboard", e))
        .chain(rule_exprs.iter().map(|e| ("rules", e)))
    {
        let n = promql_names(expr);
        for m in &n.metrics {
            named.insert(m.clone());
            if m == "up" || live.contains_key(m) {
                continue;
            }
            if m.starts_with("detector_meter_") && meter.contains_key(m) {
                continue; // only an agent on an interface serves it
            }
            problems.push(format!("{whence}: {m} is not served ({expr})"));
        }
        for l in &n.labels {
            let carried = TARGET_LABELS.contains(&l.as_str())
                || n.metrics
                    .iter()
                    .any(|m| known.get(m).is_some_and(|s| s.contains(l)));
            if !carried {
                problems.push(format!(
                    "{whence}: no metric of {expr} carries the label {l}"
                ));
            }
        }
    }
    let live_named = named.iter().filter(|m| live.contains_key(*m)).count();
    assert!(
        problems.is_empty(),
        "{}\n\nserved:\n{scrape}",
        problems.join("\n")
    );
    assert!(named.len() >= 60, "{} metrics named", named.len());

    // Prometheus reads the same rules, and evaluates each without error.
    let rules: Value =
        serde_json::from_str(&get(&format!("{prom}/api/v1/rules")).unwrap()).unwrap();
    let mut loaded = Vec::new();
    for g in rules["data"]["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().unwrap() {
            loaded.push((
                r["name"].as_str().unwrap().to_string(),
                r["query"].as_str().unwrap().to_string(),
                r["annotations"].clone(),
            ));
        }
    }
    assert_eq!(loaded.len(), rule_exprs.len(), "rules loaded: {rules}");
    let by_name = rules_from_file();
    for (name, q, annotations) in &loaded {
        // The file's line and Prometheus's own reading name the same metrics and labels.
        let ours = by_name
            .get(name)
            .unwrap_or_else(|| panic!("Prometheus loaded {name}, not in the file"));
        let n = promql_names(q);
        assert_eq!(
            n,
            promql_names(ours),
            "{name}: Prometheus reads {q}, the file says {ours}"
        );
        // What its annotations print is in the expression's series.
        let text = annotations
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        for l in printed_labels(&text) {
            let carried = TARGET_LABELS.contains(&l.as_str())
                || n.labels.contains(&l)
                || n.metrics
                    .iter()
                    .any(|m| known.get(m).is_some_and(|s| s.contains(&l)));
            assert!(
                carried,
                "{name}: prints $labels.{l}, which {q} does not carry"
            );
        }
    }
    let healthy = wait_for("every rule evaluated", Duration::from_secs(20), || {
        let v: Value = serde_json::from_str(&get(&format!("{prom}/api/v1/rules"))?).ok()?;
        let all: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        all.iter().all(|r| r["health"] != "unknown").then_some(all)
    });
    for r in &healthy {
        assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
    }

    // The alarm the agent raised fires the alert, naming the agent.
    let instance = format!("127.0.0.1:{http_port}");
    let alert = wait_for(
        "DetectorP2PHostDetected firing",
        Duration::from_secs(30),
        || {
            let v: Value = serde_json::from_str(&get(&format!("{prom}/api/v1/alerts"))?).ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "DetectorP2PHostDetected" && a["state"] == "firing"
                })
                .cloned()
        },
    );
    assert_eq!(alert["labels"]["instance"], instance.as_str(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains(&format!("http://{instance}/api/alarms")),
        "{alert}"
    );

    // Every dashboard query is valid PromQL, and the series of those that answer carry
    // the labels their legends print.
    let subst = |e: &str| {
        e.replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$__interval", "15s")
            .replace("$instance", ".*")
            .replace("$job", "detector")
    };
    let mut answered = 0;
    for p in all_panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let result = query(&prom, &subst(expr))
                .unwrap_or_else(|e| panic!("{}: {expr}: {e}", p["title"]));
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            if !result.is_empty() {
                answered += 1;
            }
            for series in &result {
                for l in printed_labels(legend) {
                    assert!(
                        series["metric"].get(&l).is_some(),
                        "{}: legend {legend} prints {l}, the series {} of {expr} has no such label",
                        p["title"],
                        series["metric"]
                    );
                }
            }
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(expr) = a["expr"].as_str() {
            query(&prom, &subst(expr)).unwrap_or_else(|e| panic!("annotation {expr}: {e}"));
        }
    }
    assert!(answered >= 30, "only {answered} dashboard queries answered");
    eprintln!(
        "{} metrics named ({live_named} served live, the rest the meter's), {answered} dashboard queries answered, {} rules",
        named.len(),
        loaded.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
