//! Alarm events for a SIEM: `--alarm-format ecs` writes each event of `--alarms-json`
//! and each webhook body as an Elastic Common Schema (ECS 8.x) document that Elastic,
//! Splunk and Wazuh read as JSON without a custom parser. The default, `native`, is the
//! [`AlarmEvent`] as it always was.
//!
//! The mapping ([`to_ecs`]) is a pure function of the event and the observer (the
//! agent). What ECS has a field for goes there; the detector's own evidence goes under
//! the custom namespace `detector.*`, which no ECS field set uses. The internal host
//! under suspicion is `host.ip`, not `source.ip`: an alarm is about one host across many
//! flows in both directions (peers connect to it as much as it connects to them), while
//! `source.*` names one side of a single connection; `host.*` describes the host an
//! event is about, and with the agent in `observer.*` nothing else competes for it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::detect::evidence::Evidence;
use crate::detect::{AlarmEvent, AlarmState};

/// The ECS release the documents follow (`ecs.version`).
pub const ECS_VERSION: &str = "8.17.0";

/// `rule.id` of every alarm: the detector's one detection (its sub-rules are in
/// `detector.evidence`).
pub const RULE_ID: &str = "detector-p2p-host";

/// The format of the alarm events in `--alarms-json` and the webhook's bodies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AlarmFormat {
    /// The detector's own JSON object (`id, state, host, ...`).
    #[default]
    Native,
    /// Elastic Common Schema 8.x.
    Ecs,
}

impl AlarmFormat {
    pub fn is_native(&self) -> bool {
        *self == AlarmFormat::Native
    }
}

/// The agent that raised the alarm (`observer.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observer {
    /// `--agent-name`, else the machine's host name.
    pub name: String,
    /// The machine's host name.
    pub hostname: Option<String>,
}

impl Observer {
    /// This machine, named by its host name.
    pub fn local() -> Self {
        let hostname = super::syslog::host_name();
        Self {
            name: hostname.clone().unwrap_or_else(|| "detector".into()),
            hostname,
        }
    }
}

/// Turns alarm events into the JSON text of the chosen format.
#[derive(Clone, Debug)]
pub struct AlarmEncoder {
    pub format: AlarmFormat,
    pub observer: Observer,
}

impl Default for AlarmEncoder {
    fn default() -> Self {
        Self {
            format: AlarmFormat::Native,
            observer: Observer::local(),
        }
    }
}

impl AlarmEncoder {
    /// One event as one line of JSON (no newline).
    pub fn encode(&self, e: &AlarmEvent) -> String {
        match self.format {
            AlarmFormat::Native => serde_json::to_string(e),
            AlarmFormat::Ecs => serde_json::to_string(&to_ecs(e, &self.observer)),
        }
        .expect("alarm events serialise")
    }
}

/// An alarm event as an ECS document (serialised as nested objects, which Elasticsearch,
/// Splunk's JSON extraction and Wazuh's JSON decoder all read as dotted field names).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsAlarm {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub ecs: EcsVersion,
    pub event: EcsEvent,
    pub rule: EcsRule,
    pub host: EcsIps,
    pub related: EcsIps,
    pub observer: EcsObserver,
    pub message: String,
    pub labels: EcsLabels,
    pub tags: Vec<String>,
    pub detector: DetectorFields,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsVersion {
    pub version: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsEvent {
    pub kind: &'static str,
    pub category: Vec<&'static str>,
    #[serde(rename = "type")]
    pub type_: Vec<&'static str>,
    pub action: &'static str,
    pub id: String,
    pub module: &'static str,
    pub dataset: &'static str,
    pub severity: i64,
    pub risk_score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_score_norm: Option<f64>,
    pub start: String,
    pub end: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsRule {
    pub id: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub category: &'static str,
    pub ruleset: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsIps {
    pub ip: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsObserver {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub product: &'static str,
    pub version: &'static str,
}

/// `labels`: keyword values only, as ECS wants them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EcsLabels {
    pub alarm_id: String,
    pub p2p_kind: String,
}

/// `detector.*`: the detector's own fields, those ECS has no place for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetectorFields {
    pub alarm_id: String,
    pub state: &'static str,
    pub kind: &'static str,
    pub kind_evidence: Vec<String>,
    pub score: f64,
    /// The highest score the rules can give (the sum of their weights).
    pub score_max: f64,
    pub window_secs: u64,
    pub peers: u64,
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub top_peer_share: f64,
    pub rules_fired: Vec<&'static str>,
    pub evidence: Vec<Evidence>,
    pub guards: Vec<String>,
    pub exporters: Vec<String>,
    /// The operator's suppression of the host or acknowledgement of the alarm, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<crate::detect::decisions::Suppressed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<crate::detect::decisions::Acknowledged>,
}

/// `raised`, `updated` or `cleared`.
pub fn state_name(s: AlarmState) -> &'static str {
    match s {
        AlarmState::Raised => "raised",
        AlarmState::Updated => "updated",
        AlarmState::Cleared => "cleared",
    }
}

/// The names of the rules that fired, in the evidence's order.
pub fn rules_fired(e: &AlarmEvent) -> Vec<&'static str> {
    e.evidence
        .iter()
        .filter(|x| x.fired)
        .map(|x| x.rule)
        .collect()
}

/// The ECS document of an alarm event seen by `observer`.
pub fn to_ecs(e: &AlarmEvent, observer: &Observer) -> EcsAlarm {
    let state = state_name(e.state);
    let score_max: f64 = e.evidence.iter().map(|x| x.weight.max(0.0)).sum();
    let norm = (score_max > 0.0).then(|| (e.score / score_max * 100.0).clamp(0.0, 100.0));
    EcsAlarm {
        timestamp: e.at.clone(),
        ecs: EcsVersion {
            version: ECS_VERSION,
        },
        event: EcsEvent {
            kind: "alert",
            category: vec!["network", "intrusion_detection"],
            type_: vec!["info"],
            action: state,
            // Unique per event; the alarm (the episode) is `detector.alarm_id`.
            id: format!("{}-{}-{}", e.id, state, e.at),
            module: "detector",
            dataset: "detector.alarm",
            severity: norm.unwrap_or(e.score).round() as i64,
            risk_score: e.score,
            risk_score_norm: norm,
            start: e.first_seen.clone(),
            end: e.last_seen.clone(),
        },
        rule: EcsRule {
            id: RULE_ID,
            name: "P2P application on an internal host",
            description: "The host's flows over the detection window score at or above the alarm threshold on the P2P rules (external peers, remote ports, peers over TCP and UDP, DHT-like datagrams, P2P ports...) and no look-alike guard holds; detector.evidence lists every rule with its value.",
            category: "policy-violation",
            ruleset: "detector",
        },
        host: EcsIps { ip: vec![e.host] },
        // The event names no peer address: the host is the one address it relates to.
        related: EcsIps { ip: vec![e.host] },
        observer: EcsObserver {
            name: observer.name.clone(),
            hostname: observer.hostname.clone(),
            type_: "sensor",
            product: "detector",
            version: env!("CARGO_PKG_VERSION"),
        },
        message: e.log_line(),
        labels: EcsLabels {
            alarm_id: e.id.clone(),
            p2p_kind: e.kind.to_string(),
        },
        tags: vec!["p2p".into(), e.kind.to_string()],
        detector: DetectorFields {
            alarm_id: e.id.clone(),
            state,
            kind: e.kind,
            kind_evidence: e.kind_evidence.clone(),
            score: e.score,
            score_max,
            window_secs: e.window_secs,
            peers: e.peers,
            flows: e.flows,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            top_peer_share: e.top_peer_share,
            rules_fired: rules_fired(e),
            evidence: e.evidence.clone(),
            guards: e.guards.clone(),
            exporters: e.exporters.clone(),
            suppressed: e.suppressed.clone(),
            acknowledged: e.acknowledged.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A known event: a BitTorrent host over two rules out of three.
    fn known() -> AlarmEvent {
        let ev = |rule, value, op, threshold, fired, weight| Evidence {
            rule,
            value,
            op,
            threshold,
            fired,
            weight,
        };
        AlarmEvent {
            id: "00c0ffee00c0ffee".into(),
            state: AlarmState::Raised,
            host: "10.9.0.5".parse().unwrap(),
            kind: "bittorrent",
            kind_evidence: vec!["3 peers on BitTorrent ports".into()],
            score: 9.0,
            at: "2026-11-30T01:00:20.000Z".into(),
            first_seen: "2026-11-30T01:00:00.000Z".into(),
            last_seen: "2026-11-30T01:00:19.500Z".into(),
            window_secs: 300,
            peers: 80,
            flows: 240,
            bytes_in: 4_000_000,
            bytes_out: 160_000,
            top_peer_share: 0.0125,
            evidence: vec![
                ev("external_peers", 80.0, ">=", 25.0, true, 2.0),
                ev("tcp_and_udp_peers", 27.0, ">=", 3.0, true, 2.0),
                ev("flows", 240.0, ">=", 60.0, false, 14.0),
            ],
            guards: vec!["port_scan: 0 failed of 80 (no)".into()],
            exporters: vec!["127.0.0.1/0".into()],
            suppressed: None,
            acknowledged: None,
        }
    }

    fn observer() -> Observer {
        Observer {
            name: "sensor-7".into(),
            hostname: Some("box7".into()),
        }
    }

    /// ECS field types, as the ECS 8.x field reference gives them.
    #[derive(Clone, Copy, Debug)]
    enum Ty {
        Keyword,
        Text,
        Long,
        Float,
        Date,
        Ip,
    }

    /// Every ECS field the mapping writes, with its ECS type and whether the value is
    /// an array (ECS allows arrays of any field; these are the ones ECS says are).
    const ECS_FIELDS: &[(&str, Ty, bool)] = &[
        ("@timestamp", Ty::Date, false),
        ("ecs.version", Ty::Keyword, false),
        ("event.kind", Ty::Keyword, false),
        ("event.category", Ty::Keyword, true),
        ("event.type", Ty::Keyword, true),
        ("event.action", Ty::Keyword, false),
        ("event.id", Ty::Keyword, false),
        ("event.module", Ty::Keyword, false),
        ("event.dataset", Ty::Keyword, false),
        ("event.severity", Ty::Long, false),
        ("event.risk_score", Ty::Float, false),
        ("event.risk_score_norm", Ty::Float, false),
        ("event.start", Ty::Date, false),
        ("event.end", Ty::Date, false),
        ("rule.id", Ty::Keyword, false),
        ("rule.name", Ty::Keyword, false),
        ("rule.description", Ty::Keyword, false),
        ("rule.category", Ty::Keyword, false),
        ("rule.ruleset", Ty::Keyword, false),
        ("host.ip", Ty::Ip, true),
        ("related.ip", Ty::Ip, true),
        ("observer.name", Ty::Keyword, false),
        ("observer.hostname", Ty::Keyword, false),
        ("observer.type", Ty::Keyword, false),
        ("observer.product", Ty::Keyword, false),
        ("observer.version", Ty::Keyword, false),
        ("message", Ty::Text, false),
        ("tags", Ty::Keyword, true),
    ];

    /// The leaves of a JSON document as dotted names (arrays are leaves).
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&name, v, out);
                }
            }
            _ => out.push((prefix.to_string(), v.clone())),
        }
    }

    /// An RFC 3339 time as ECS dates take it: `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
    fn is_date(s: &str) -> bool {
        humantime::parse_rfc3339(s).is_ok()
    }

    fn has_type(v: &Value, ty: Ty) -> bool {
        match ty {
            Ty::Keyword | Ty::Text => v.as_str().is_some_and(|s| !s.is_empty()),
            Ty::Long => v.is_i64() || v.is_u64(),
            Ty::Float => v.is_number(),
            Ty::Date => v.as_str().is_some_and(is_date),
            Ty::Ip => v.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        }
    }

    #[test]
    fn every_ecs_field_is_there_with_its_ecs_type() {
        let doc = serde_json::to_value(to_ecs(&known(), &observer())).unwrap();
        let mut all = Vec::new();
        leaves("", &doc, &mut all);
        for (name, ty, array) in ECS_FIELDS {
            let (_, v) = all
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name} missing: {doc}"));
            if *array {
                let a = v
                    .as_array()
                    .unwrap_or_else(|| panic!("{name} not an array"));
                assert!(!a.is_empty(), "{name} empty");
                for x in a {
                    assert!(has_type(x, *ty), "{name}: {x} is not {ty:?}");
                }
            } else {
                assert!(has_type(v, *ty), "{name}: {v} is not {ty:?}");
            }
        }
        // Nothing outside the list above but `labels.*` (keywords) and `detector.*`:
        // no made-up ECS field.
        for (name, v) in &all {
            if let Some(label) = name.strip_prefix("labels.") {
                assert!(!label.contains('.') && v.is_string(), "{name}: {v}");
            } else {
                assert!(
                    name.starts_with("detector.") || ECS_FIELDS.iter().any(|(n, ..)| n == name),
                    "{name} is neither an ECS field of the mapping nor under detector.*"
                );
            }
        }
    }

    #[test]
    fn values_come_from_the_event() {
        let e = known();
        let v = serde_json::to_value(to_ecs(&e, &observer())).unwrap();
        assert_eq!(v["@timestamp"], "2026-11-30T01:00:20.000Z");
        assert_eq!(v["ecs"]["version"], ECS_VERSION);
        assert!(ECS_VERSION.starts_with("8."));
        assert_eq!(v["event"]["kind"], "alert");
        assert_eq!(
            v["event"]["category"],
            serde_json::json!(["network", "intrusion_detection"])
        );
        assert_eq!(v["event"]["type"], serde_json::json!(["info"]));
        assert_eq!(v["event"]["action"], "raised");
        assert_eq!(
            v["event"]["id"],
            "00c0ffee00c0ffee-raised-2026-11-30T01:00:20.000Z"
        );
        // 9 of a possible 18: 50 on ECS's 0-100 scale.
        assert_eq!(v["event"]["risk_score"], 9.0);
        assert_eq!(v["event"]["risk_score_norm"], 50.0);
        assert_eq!(v["event"]["severity"], 50);
        assert_eq!(v["event"]["start"], "2026-11-30T01:00:00.000Z");
        assert_eq!(v["event"]["end"], "2026-11-30T01:00:19.500Z");
        assert_eq!(v["rule"]["id"], RULE_ID);
        assert_eq!(v["host"]["ip"], serde_json::json!(["10.9.0.5"]));
        assert_eq!(v["related"]["ip"], serde_json::json!(["10.9.0.5"]));
        assert_eq!(v["observer"]["name"], "sensor-7");
        assert_eq!(v["observer"]["hostname"], "box7");
        assert_eq!(v["observer"]["type"], "sensor");
        assert_eq!(v["observer"]["product"], "detector");
        assert_eq!(v["message"], e.log_line());
        assert_eq!(v["labels"]["alarm_id"], "00c0ffee00c0ffee");
        assert_eq!(v["labels"]["p2p_kind"], "bittorrent");
        assert_eq!(v["tags"], serde_json::json!(["p2p", "bittorrent"]));
        let d = &v["detector"];
        assert_eq!(d["alarm_id"], "00c0ffee00c0ffee");
        assert_eq!(d["state"], "raised");
        assert_eq!(d["kind"], "bittorrent");
        assert_eq!(d["kind_evidence"][0], "3 peers on BitTorrent ports");
        assert_eq!(d["score"], 9.0);
        assert_eq!(d["score_max"], 18.0);
        assert_eq!(d["window_secs"], 300);
        assert_eq!(d["peers"], 80);
        assert_eq!(d["flows"], 240);
        assert_eq!(d["bytes_in"], 4_000_000);
        assert_eq!(d["bytes_out"], 160_000);
        assert_eq!(d["top_peer_share"], 0.0125);
        assert_eq!(
            d["rules_fired"],
            serde_json::json!(["external_peers", "tcp_and_udp_peers"])
        );
        assert_eq!(d["evidence"].as_array().unwrap().len(), 3);
        assert_eq!(d["evidence"][0]["rule"], "external_peers");
        assert_eq!(d["evidence"][2]["fired"], false);
        assert_eq!(d["guards"][0], "port_scan: 0 failed of 80 (no)");
        assert_eq!(d["exporters"], serde_json::json!(["127.0.0.1/0"]));
    }

    #[test]
    fn each_state_is_its_action_with_its_own_event_id() {
        let mut e = known();
        let mut ids = Vec::new();
        for (s, name) in [
            (AlarmState::Raised, "raised"),
            (AlarmState::Updated, "updated"),
            (AlarmState::Cleared, "cleared"),
        ] {
            e.state = s;
            let doc = to_ecs(&e, &observer());
            assert_eq!(doc.event.action, name);
            assert_eq!(doc.detector.state, name);
            assert_eq!(doc.event.kind, "alert");
            ids.push(doc.event.id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 3, "{ids:?}");
    }

    #[test]
    fn an_ipv6_host_and_an_event_without_evidence() {
        let mut e = known();
        e.host = "fd00::5".parse().unwrap();
        e.evidence.clear();
        e.score = 7.6;
        let v = serde_json::to_value(to_ecs(&e, &observer())).unwrap();
        assert_eq!(v["host"]["ip"][0], "fd00::5");
        // No rules, no scale to normalise on: the score alone, rounded.
        assert!(v["event"].get("risk_score_norm").is_none(), "{v}");
        assert_eq!(v["event"]["severity"], 8);
        assert_eq!(v["detector"]["rules_fired"], serde_json::json!([]));
    }

    #[test]
    fn the_encoder_writes_one_line_of_the_chosen_format() {
        let mut enc = AlarmEncoder {
            format: AlarmFormat::Native,
            observer: observer(),
        };
        let native: Value = serde_json::from_str(&enc.encode(&known())).unwrap();
        assert_eq!(native["id"], "00c0ffee00c0ffee");
        assert_eq!(native["state"], "raised");
        assert!(native.get("@timestamp").is_none());
        enc.format = AlarmFormat::Ecs;
        let line = enc.encode(&known());
        assert!(!line.contains('\n'));
        let ecs: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ecs["event"]["kind"], "alert");
        assert!(ecs.get("id").is_none());
    }
}
