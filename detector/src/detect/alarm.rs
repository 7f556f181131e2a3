//! Alarms: the events an alarm's lifecycle emits (`raised`, `updated`, `cleared`), what
//! each carries, and the state the engine keeps of an open alarm.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

use super::DetectConfig;
use super::evidence::{Evidence, Verdict};
use super::profile::HostProfile;

/// Alarm lifecycle states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    Raised,
    Updated,
    Cleared,
}

/// One alarm event, as written to `--alarms-json`.
#[derive(Clone, Debug, Serialize)]
pub struct AlarmEvent {
    pub id: String,
    pub state: AlarmState,
    pub host: IpAddr,
    /// The application: `bittorrent`, `gnutella`, `edonkey`, or `p2p` (see [`kind`]).
    pub kind: &'static str,
    /// What named the application.
    pub kind_evidence: Vec<String>,
    pub score: f64,
    /// When this event happened (the evaluation that raised, updated or cleared it).
    pub at: String,
    /// When the host's activity of this episode began (its first record).
    pub first_seen: String,
    /// The end of the host's last record seen.
    pub last_seen: String,
    pub window_secs: u64,
    pub peers: u64,
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub top_peer_share: f64,
    pub evidence: Vec<Evidence>,
    /// Each look-alike guard considered, with what it measured (none held: the alarm
    /// stands).
    pub guards: Vec<String>,
    pub exporters: Vec<String>,
    /// The operator's suppression of the host (see [`super::decisions`]): the event is
    /// logged, not sent to the sinks (but for the end of an alarm they saw begin).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<super::decisions::Suppressed>,
    /// The operator's acknowledgement of the alarm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<super::decisions::Acknowledged>,
}

#[cfg(test)]
impl AlarmEvent {
    /// An event for tests: host, state and score given, the rest plausible and fixed
    /// (80 peers, 200 flows, no evidence, no exporter).
    pub(crate) fn sample(host: IpAddr, state: AlarmState, score: f64) -> Self {
        Self {
            id: format!("{host}"),
            state,
            host,
            kind: "p2p",
            kind_evidence: Vec::new(),
            guards: Vec::new(),
            score,
            at: String::new(),
            first_seen: String::new(),
            last_seen: String::new(),
            window_secs: 300,
            peers: 80,
            flows: 200,
            bytes_in: 1,
            bytes_out: 1,
            top_peer_share: 0.1,
            evidence: Vec::new(),
            exporters: Vec::new(),
            suppressed: None,
            acknowledged: None,
        }
    }
}

impl AlarmEvent {
    /// The same event as one readable log line.
    pub fn log_line(&self) -> String {
        let fired: Vec<String> = self
            .evidence
            .iter()
            .filter(|e| e.fired)
            .map(|e| format!("{}={:.2} ({} {:.2})", e.rule, e.value, e.op, e.threshold))
            .collect();
        format!(
            "alarm {} {} {}: host {} score {:.1}, {} peers, {} flows, {} bytes in, {} bytes out, top peer {:.0}%; {}{}; seen by {}",
            self.id,
            match self.state {
                AlarmState::Raised => "raised",
                AlarmState::Updated => "updated",
                AlarmState::Cleared => "cleared",
            },
            self.kind,
            self.host,
            self.score,
            self.peers,
            self.flows,
            self.bytes_in,
            self.bytes_out,
            self.top_peer_share * 100.0,
            fired.join(", "),
            if self.kind_evidence.is_empty() {
                String::new()
            } else {
                format!("; {} because {}", self.kind, self.kind_evidence.join(", "))
            },
            self.exporters.join(", ")
        )
    }
}

#[derive(Debug)]
pub(super) struct Alarm {
    pub(super) id: String,
    pub(super) first_seen: SystemTime,
    pub(super) last_over: SystemTime,
    pub(super) last_event: SystemTime,
    pub(super) last_score: f64,
    pub(super) last_peers: u64,
    /// The verdict of the last event, reported again when the alarm clears after the
    /// host's profile has emptied (its last state, not an empty one).
    pub(super) last_verdict: Verdict,
    /// When that verdict's records were last seen.
    pub(super) last_seen: SystemTime,
}

pub(super) fn alarm_id(host: IpAddr, at: SystemTime) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    host.hash(&mut h);
    at.hash(&mut h);
    format!("{:016x}", h.finish())
}

pub(super) fn event(
    a: &Alarm,
    state: AlarmState,
    host: IpAddr,
    v: &Verdict,
    p: &HostProfile,
    now: SystemTime,
    cfg: &DetectConfig,
) -> AlarmEvent {
    let rfc = crate::flow::rfc3339;
    AlarmEvent {
        id: a.id.clone(),
        state,
        host,
        kind: v.kind,
        kind_evidence: v.kind_evidence.clone(),
        score: v.score,
        at: rfc(now),
        first_seen: rfc(a.first_seen),
        last_seen: rfc(now.min(p.last_seen.max(a.last_seen).max(a.first_seen))),
        window_secs: cfg.window.as_secs(),
        peers: v.measures.peers,
        flows: v.measures.flows,
        bytes_in: v.measures.bytes_in,
        bytes_out: v.measures.bytes_out,
        top_peer_share: v.measures.top_peer_share,
        evidence: v.evidence.clone(),
        guards: v.guard_evidence.clone(),
        exporters: p.sources().map(|o| o.label()).collect(),
        suppressed: None,
        acknowledged: None,
    }
}
