//! What the agent shows an operator while it runs (`--http`): every counter of the
//! statistics line, the open alarms, the highest-scored hosts and the score history of
//! the hosts that alarmed.
//!
//! The run shell writes each part's snapshot into a [`Status`]: the meter and the
//! NetFlow listeners from the main thread once a second, the pipeline's counters, alarm
//! events and verdicts from the evaluator thread after each evaluation. The HTTP server
//! ([`server`]) only reads it, so a scrape never waits on the meter or the engines.
//! [`State`] is plain data with pure updates (`now` is an argument), unit-tested here.

pub mod access;
pub mod decisions;
pub mod detail;
pub mod metrics;
pub mod server;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::detect::evidence::{Evidence, Verdict};
use crate::detect::{AlarmEvent, AlarmState};
use crate::pipeline::PipelineStats;
use crate::sources::netflow::decode::{ExporterStats, PendingStats};
use crate::sources::xdp::{DrainCounters, KernelCounters};

/// Hosts kept in the score history, and points kept per host (at one evaluation every
/// 10 s, an hour).
pub const HISTORY_HOSTS: usize = 64;
pub const HISTORY_POINTS: usize = 360;
/// Hosts with their verdicts kept from each evaluation (`/api/hosts?top=N` caps N here).
pub const TOP_HOSTS: usize = 50;

/// The shared snapshot.
#[derive(Default)]
pub struct Status {
    state: Mutex<State>,
    /// The operators' decisions (acknowledgements, suppressions): their own lock, shared
    /// with the evaluator that marks alarm events with them.
    pub decisions: std::sync::Arc<decisions::Store>,
}

impl Status {
    pub fn new(started: SystemTime) -> Self {
        Self {
            state: Mutex::new(State {
                started: Some(started),
                ..State::default()
            }),
            decisions: Default::default(),
        }
    }

    /// Takes decisions into `store` (in memory by default).
    pub fn with_decisions(mut self, store: std::sync::Arc<decisions::Store>) -> Self {
        self.decisions = store;
        self
    }

    pub fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The local meter's counters.
#[derive(Clone, Debug, Default)]
pub struct MeterStatus {
    pub iface: String,
    pub kernel: KernelCounters,
    pub drain: DrainCounters,
    /// Flows in the kernel maps and in the userspace overflow table now.
    pub kernel_flows: u64,
    pub overflow_flows: u64,
    /// Flows each kernel map (IPv4, IPv6) holds.
    pub map_size: u64,
}

/// A NetFlow/IPFIX listener's counters.
#[derive(Clone, Debug, Default)]
pub struct ListenerStatus {
    pub addr: Option<SocketAddr>,
    /// Datagrams the kernel dropped (receive buffer full).
    pub kernel_drops: u64,
    /// Datagrams from sources outside `--exporter-allow`, and beyond the exporter limit.
    pub rejected: u64,
    pub over_exporter_limit: u64,
    pub exporters: Vec<(IpAddr, ExporterStats, PendingStats)>,
}

/// An sFlow listener's counters.
#[derive(Clone, Debug, Default)]
pub struct SflowStatus {
    pub addr: Option<SocketAddr>,
    /// Datagrams the kernel dropped (receive buffer full).
    pub kernel_drops: u64,
    pub global: crate::sources::sflow::decode::GlobalStats,
    /// Flows being aggregated now.
    pub flows: u64,
    pub sources: Vec<(
        crate::sources::sflow::decode::SourceKey,
        crate::sources::sflow::decode::SourceStats,
    )>,
    /// Generic interface counters by (source, ifIndex), at most
    /// [`metrics::SFLOW_INTERFACES`] of them; `interfaces_left_out` more not shown.
    pub interfaces: Vec<(
        (crate::sources::sflow::decode::SourceKey, u32),
        crate::sources::sflow::decode::IfCounters,
    )>,
    pub interfaces_left_out: u64,
}

/// One host as `/api/hosts` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    pub host: IpAddr,
    pub score: f64,
    /// An open alarm on this host.
    pub alarmed: bool,
    /// The look-alike guard that vetoed an alarm, if any.
    pub vetoed_by: Option<&'static str>,
    /// Each look-alike guard considered: what it measured and whether it held.
    pub guards: Vec<String>,
    /// The application and what named it.
    pub kind: &'static str,
    pub kind_evidence: Vec<String>,
    pub peers: u64,
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub top_peer_share: f64,
    pub evidence: Vec<Evidence>,
}

/// A point of a host's score history: unix time in seconds, score.
pub type Point = (f64, f64);

#[derive(Default)]
pub struct State {
    pub started: Option<SystemTime>,
    pub meter: Option<MeterStatus>,
    pub listeners: Vec<ListenerStatus>,
    pub sflow: Vec<SflowStatus>,
    pub pipeline: PipelineStats,
    /// Open alarms by host: the last event raised or updated for each.
    pub alarms: BTreeMap<IpAddr, AlarmEvent>,
    /// Alarm events by state: raised, updated, cleared.
    pub alarm_events: [u64; 3],
    /// The highest-scored hosts of the last evaluation, highest first.
    pub hosts: Vec<HostStatus>,
    /// When the last evaluation ran.
    pub evaluated_at: Option<SystemTime>,
    /// The score at each evaluation of the hosts that were among the top hosts or
    /// alarmed (bounded: [`HISTORY_HOSTS`] hosts, [`HISTORY_POINTS`] points each).
    pub history: BTreeMap<IpAddr, VecDeque<Point>>,
    /// Hosts raised in this run whose history is kept.
    pub alarmed: BTreeSet<IpAddr>,
    /// Requests and connections the `--http` server refused, by [`access::Reason`].
    pub http_refused: [u64; access::REASONS.len()],
    /// The host drill-downs (`/api/hosts/{ip}`; bounded, see [`detail`]).
    pub drill: detail::Drill,
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl State {
    /// Takes the events of an evaluation: raised and updated alarms are open (their
    /// last event kept), cleared ones closed.
    pub fn apply_events(&mut self, events: &[AlarmEvent]) {
        for e in events {
            let i = match e.state {
                AlarmState::Raised => 0,
                AlarmState::Updated => 1,
                AlarmState::Cleared => 2,
            };
            self.alarm_events[i] += 1;
            if e.state == AlarmState::Raised {
                self.alarmed.insert(e.host);
            }
            if e.state == AlarmState::Cleared {
                self.alarms.remove(&e.host);
            } else {
                self.alarms.insert(e.host, e.clone());
            }
        }
    }

    /// Takes an evaluation's highest-scored hosts at `now`, and adds a history point
    /// for each of them and each alarmed host (the alarm's score when the host is not
    /// among the top ones).
    pub fn evaluated(&mut self, now: SystemTime, top: Vec<(IpAddr, Verdict)>) {
        self.evaluated_at = Some(now);
        self.hosts = top
            .into_iter()
            .take(TOP_HOSTS)
            .map(|(host, v)| HostStatus {
                host,
                score: v.score,
                alarmed: self.alarms.contains_key(&host),
                vetoed_by: v.guard,
                guards: v.guard_evidence,
                kind: v.kind,
                kind_evidence: v.kind_evidence,
                peers: v.measures.peers,
                flows: v.measures.flows,
                bytes_in: v.measures.bytes_in,
                bytes_out: v.measures.bytes_out,
                top_peer_share: v.measures.top_peer_share,
                evidence: v.evidence,
            })
            .collect();
        let t = unix_secs(now);
        let mut points: BTreeMap<IpAddr, f64> = self
            .hosts
            .iter()
            .filter(|h| h.score > 0.0)
            .map(|h| (h.host, h.score))
            .collect();
        for (host, e) in &self.alarms {
            points.entry(*host).or_insert(e.score);
        }
        for (host, score) in points {
            let h = self.history.entry(host).or_default();
            if h.len() == HISTORY_POINTS {
                h.pop_front();
            }
            h.push_back((t, score));
        }
        // Beyond the bound, the hosts heard of least recently go first, alarmed ones last.
        while self.history.len() > HISTORY_HOSTS {
            let oldest = self
                .history
                .iter()
                .min_by(|a, b| {
                    let key = |(ip, h): (&IpAddr, &VecDeque<Point>)| {
                        (self.alarms.contains_key(ip), h.back().map_or(0.0, |p| p.0))
                    };
                    let (ka, kb) = (key(*a), key(*b));
                    ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
                })
                .map(|(ip, _)| *ip);
            match oldest {
                Some(ip) => {
                    self.history.remove(&ip);
                    self.alarmed.remove(&ip);
                }
                None => break,
            }
        }
    }

    /// `/api/alarms`: the open alarms, highest score first.
    pub fn alarms_json(&self) -> serde_json::Value {
        let mut open: Vec<&AlarmEvent> = self.alarms.values().collect();
        open.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.host.cmp(&b.host)));
        serde_json::json!({
            "score_threshold": self.pipeline.score_threshold,
            "alarms": open,
        })
    }

    /// `/api/hosts?top=N`.
    pub fn hosts_json(&self, top: usize) -> serde_json::Value {
        serde_json::json!({
            "evaluated_at": self.evaluated_at.map(crate::flow::rfc3339),
            "score_threshold": self.pipeline.score_threshold,
            "hosts": &self.hosts[..top.min(self.hosts.len())],
        })
    }

    /// `/api/history`: the score history of every host that alarmed in this run and is
    /// still kept, with whether its alarm is open.
    pub fn history_json(&self) -> serde_json::Value {
        let hosts: Vec<serde_json::Value> = self
            .history
            .iter()
            .filter(|(ip, _)| self.alarmed.contains(ip))
            .map(|(ip, points)| {
                serde_json::json!({
                    "host": ip,
                    "open": self.alarms.contains_key(ip),
                    "points": points,
                })
            })
            .collect();
        serde_json::json!({
            "score_threshold": self.pipeline.score_threshold,
            "hosts": hosts,
        })
    }
}

#[cfg(test)]
mod tests;
