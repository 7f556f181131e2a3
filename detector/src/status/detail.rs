//! The host drill-down's snapshot (`/api/hosts/{ip}`, the page's host view): for the
//! hosts the page can show, the last [`HostDetail`] the shard workers extracted with
//! the host's verdict, and a time series of the host over the evaluations (score, peers,
//! bytes in and out per second, flows per minute, every rule's value).
//!
//! Bounded: at most [`DETAIL_HOSTS`] hosts (the top-scored hosts and those with open
//! alarms of each evaluation; beyond the bound, the hosts detailed least recently go
//! first, open alarms last), each with its last detail and verdict (at most 10 peers,
//! 12 ports each way, 12 rules, 5 guards: about 4 KB) and at most [`DETAIL_POINTS`]
//! points of 56 bytes and 12 rule values (about 120 bytes with their allocation): about
//! 64 × (360 × 120 B + 4 KB) ≈ 3 MB at most.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State as Shared};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde::Serialize;

use super::{HostStatus, State, Status, TOP_HOSTS, unix_secs};
use crate::detect::detail::{HostDetail, guard_rows};
use crate::detect::evidence::Verdict;
use crate::detect::profile::Totals;

/// Hosts whose drill-down is kept.
pub const DETAIL_HOSTS: usize = 64;
/// Points kept per host (at one evaluation every 10 s, an hour).
pub const DETAIL_POINTS: usize = 360;

/// The drill-downs kept (see the module's documentation).
#[derive(Default)]
pub struct Drill {
    hosts: BTreeMap<IpAddr, HostView>,
}

impl Drill {
    /// Hosts kept.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Points kept for `host`.
    pub fn points(&self, host: &IpAddr) -> usize {
        self.hosts.get(host).map_or(0, |v| v.series.len())
    }
}

struct HostView {
    /// The evaluation the detail and verdict are from.
    at: SystemTime,
    status: HostStatus,
    detail: HostDetail,
    /// The rules, in the order of each point's values.
    rules: Vec<Rule>,
    series: VecDeque<Point>,
    /// The time and running totals of the last point, for the next one's rates.
    last: Option<(f64, Totals)>,
}

/// A rule as the series charts it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    pub rule: &'static str,
    pub op: &'static str,
    pub threshold: f64,
    pub weight: f64,
}

/// A host at one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Unix time in seconds.
    pub t: f64,
    pub score: f32,
    /// Distinct external peers in the window.
    pub peers: u32,
    /// Since the previous point (none at the first, or when the host's profile began
    /// again in between): bytes in and out per second, flows per minute.
    pub bytes_in_per_s: Option<f32>,
    pub bytes_out_per_s: Option<f32>,
    pub flows_per_min: Option<f32>,
    /// Each rule's value, in the order of the host's `rules`.
    pub values: Box<[f32]>,
}

/// A verdict as `/api/hosts` shows it.
fn host_status(host: IpAddr, v: &Verdict, alarmed: bool) -> HostStatus {
    HostStatus {
        host,
        score: v.score,
        alarmed,
        vetoed_by: v.guard,
        guards: v.guard_evidence.clone(),
        kind: v.kind,
        kind_evidence: v.kind_evidence.clone(),
        peers: v.measures.peers,
        flows: v.measures.flows,
        bytes_in: v.measures.bytes_in,
        bytes_out: v.measures.bytes_out,
        top_peer_share: v.measures.top_peer_share,
        evidence: v.evidence.clone(),
    }
}

/// `now - before` over `dt` seconds, scaled by `per`; none when the totals went back.
fn rate(now: u64, before: u64, dt: f64, per: f64) -> Option<f32> {
    (dt > 0.0 && now >= before).then(|| ((now - before) as f64 / dt * per) as f32)
}

impl State {
    /// Takes an evaluation's detailed hosts, highest score first (the top ones, then
    /// hosts with open alarms beyond them): the top [`TOP_HOSTS`] as
    /// [`State::evaluated`] does, and each one's drill-down.
    pub fn evaluated_detailed(&mut self, now: SystemTime, all: Vec<(IpAddr, Verdict, HostDetail)>) {
        let top = all
            .iter()
            .take(TOP_HOSTS)
            .map(|(ip, v, _)| (*ip, v.clone()))
            .collect();
        self.evaluated(now, top);
        self.detailed(now, all);
    }

    /// Keeps the drill-down of `all` (open alarms first, then in the order given) within
    /// the bounds.
    pub fn detailed(&mut self, now: SystemTime, mut all: Vec<(IpAddr, Verdict, HostDetail)>) {
        // Stable: the given order among alarmed hosts and among the others.
        all.sort_by_key(|x| !self.alarms.contains_key(&x.0));
        all.truncate(DETAIL_HOSTS);
        let t = unix_secs(now);
        for (ip, v, d) in all {
            let alarmed = self.alarms.contains_key(&ip);
            let status = host_status(ip, &v, alarmed);
            let view = self.drill.hosts.entry(ip).or_insert_with(|| HostView {
                at: now,
                status: status.clone(),
                detail: HostDetail::default(),
                rules: Vec::new(),
                series: VecDeque::new(),
                last: None,
            });
            let (bytes_in_per_s, bytes_out_per_s, flows_per_min) = match view.last {
                Some((t0, before)) => {
                    let dt = t - t0;
                    let now = d.totals;
                    (
                        rate(now.bytes_in, before.bytes_in, dt, 1.0),
                        rate(now.bytes_out, before.bytes_out, dt, 1.0),
                        rate(now.flows, before.flows, dt, 60.0),
                    )
                }
                None => (None, None, None),
            };
            if view.series.len() == DETAIL_POINTS {
                view.series.pop_front();
            }
            view.series.push_back(Point {
                t,
                score: v.score as f32,
                peers: u32::try_from(d.peers).unwrap_or(u32::MAX),
                bytes_in_per_s,
                bytes_out_per_s,
                flows_per_min,
                values: v.evidence.iter().map(|e| e.value as f32).collect(),
            });
            view.rules = v
                .evidence
                .iter()
                .map(|e| Rule {
                    rule: e.rule,
                    op: e.op,
                    threshold: e.threshold,
                    weight: e.weight,
                })
                .collect();
            view.last = Some((t, d.totals));
            view.at = now;
            view.status = status;
            view.detail = d;
        }
        // Beyond the bound, the hosts detailed least recently go first, alarmed ones last.
        while self.drill.hosts.len() > DETAIL_HOSTS {
            let oldest = self
                .drill
                .hosts
                .iter()
                .min_by_key(|(ip, v)| (self.alarms.contains_key(ip), v.at))
                .map(|(ip, _)| *ip);
            match oldest {
                Some(ip) => {
                    self.drill.hosts.remove(&ip);
                }
                None => break,
            }
        }
    }

    /// `/api/hosts/{ip}`: the host's last drill-down, verdict, guards, open alarm and
    /// time series; None when neither a drill-down nor an open alarm is kept for it.
    pub fn host_json(&self, ip: IpAddr) -> Option<serde_json::Value> {
        let alarm = self.alarms.get(&ip);
        let view = self.drill.hosts.get(&ip);
        if view.is_none() && alarm.is_none() {
            return None;
        }
        let (no_evidence, no_guards) = (Vec::new(), Vec::new());
        let evidence = view.map_or(&no_evidence, |v| &v.status.evidence);
        let guards = view.map_or(&no_guards, |v| &v.status.guards);
        Some(serde_json::json!({
            "host": ip,
            "evaluated_at": view.map(|v| crate::flow::rfc3339(v.at)),
            "latest": view.is_some_and(|v| Some(v.at) == self.evaluated_at),
            "score_threshold": self.pipeline.score_threshold,
            "alarmed": alarm.is_some(),
            "alarm": alarm,
            "score": view.map(|v| v.status.score),
            "vetoed_by": view.and_then(|v| v.status.vetoed_by),
            "kind": view.map(|v| v.status.kind),
            "kind_evidence": view.map(|v| &v.status.kind_evidence),
            "top_peer_share": view.map(|v| v.status.top_peer_share),
            "evidence": evidence,
            "guards": guard_rows(guards),
            "detail": view.map(|v| &v.detail),
            "rules": view.map(|v| &v.rules),
            "series": view.map(|v| &v.series),
        }))
    }
}

/// `GET /api/hosts/{ip}`: 400 for an address that does not parse, 404 for a host with
/// nothing kept.
pub async fn host(Shared(s): Shared<Arc<Status>>, Path(ip): Path<String>) -> Response {
    let Ok(addr) = ip.parse::<IpAddr>() else {
        let e = serde_json::json!({ "error": format!("not an IP address: {ip}") });
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    };
    match s.read(|st| st.host_json(addr)) {
        Some(v) => Json(v).into_response(),
        None => {
            let e = serde_json::json!({
                "error": format!("no detail kept for {addr}: it is neither among the top-scored hosts of the recent evaluations nor alarmed"),
                "host": addr,
            });
            (StatusCode::NOT_FOUND, Json(e)).into_response()
        }
    }
}

#[cfg(test)]
#[path = "detail_tests.rs"]
mod tests;
