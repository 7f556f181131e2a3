//! Operators' decisions under `run`: the [`Store`] that holds them (the pure rules are
//! [`crate::detect::decisions`]), keeps them in a file across restarts and reloads,
//! logs and counts each; and their HTTP API:
//!
//! - `POST /api/alarms/{id}/ack` `{"note", "by"}`: acknowledges an open alarm;
//! - `GET /api/suppressions`: the suppressions in force;
//! - `POST /api/suppressions` `{"cidr", "until" | "for", "note", "by"}`: suppresses a
//!   host or network until `until` (RFC 3339, or Unix seconds), for `for` (`"2h"`,
//!   `"7days"`), or for good (neither, or `"until": null`);
//! - `DELETE /api/suppressions/{id}` (`?by=NAME`), or `POST /api/suppressions/{id}/remove`
//!   `{"by", "note"}`: ends one.
//!
//! Who decided: the authenticated user when the request carries one (an [`Operator`]
//! extension set by an authentication layer, else the user name of HTTP Basic
//! credentials), else `by`.
//!
//! The file (`decisions.json`) is written whole at each decision: a temporary file in the
//! same directory, synced, then renamed over it (a crash leaves the old or the new one).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use anyhow::Context;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{delete, get, post};
use log::{info, warn};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Status;
use crate::detect::AlarmEvent;
use crate::detect::decisions::{
    DecisionError, Decisions, DecisionsFile, Suppression, author_and_note,
};

/// The user an authentication layer vouches for: put into the request's extensions, it
/// is taken as who decided, whatever the request's `by` says.
#[derive(Clone, Debug)]
pub struct Operator(pub String);

/// What the store counted (for `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub acknowledged: u64,
    pub suppressed: u64,
    pub removed: u64,
    /// Suppressions that ended at their time.
    pub expired: u64,
    /// Alarm events of suppressed hosts kept from the sinks.
    pub suppressed_events: u64,
    /// Writes of the file that failed.
    pub save_errors: u64,
}

#[derive(Default)]
struct Inner {
    d: Decisions,
    counts: Counts,
    /// Changed since the file was last written (by the evaluation: an acknowledgement
    /// given to a new alarm or forgotten with its alarm; by expiry).
    dirty: bool,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

/// The decisions in force, shared by the evaluator (which marks alarm events) and the
/// HTTP server (which takes decisions), and their file.
#[derive(Default)]
pub struct Store {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

/// A refused request: its status and a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<DecisionError> for ApiError {
    fn from(e: DecisionError) -> Self {
        let code = match e {
            DecisionError::Invalid(_) => StatusCode::BAD_REQUEST,
            DecisionError::NoAlarm(_) | DecisionError::NoSuppression(_) => StatusCode::NOT_FOUND,
        };
        Self(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed over
/// it, and the directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("decisions".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

impl Store {
    /// Decisions kept in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Decisions kept in `path`, read now if it exists (a file that does not read is an
    /// error: fix it or move it away).
    pub fn open(path: PathBuf, now: SystemTime) -> anyhow::Result<Self> {
        let d = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: DecisionsFile = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "reading the decisions file {}: fix it or move it away",
                        path.display()
                    )
                })?;
                Decisions::from_file(f, now)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Decisions::default(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the decisions file {}", path.display()));
            }
        };
        Ok(Self {
            path: Some(path),
            inner: Mutex::new(Inner {
                d,
                ..Inner::default()
            }),
        })
    }

    /// The store of `run`: `--decisions FILE`, else `decisions.json` beside the
    /// configuration file, else in memory (with a warning).
    pub fn for_run(
        flag: Option<&Path>,
        config: Option<&Path>,
        now: SystemTime,
    ) -> anyhow::Result<Self> {
        let path = flag.map(Path::to_path_buf).or_else(|| {
            config.map(|c| {
                c.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .join("decisions.json")
            })
        });
        let Some(path) = path else {
            warn!(
                "operators' decisions (acknowledged alarms, suppressed hosts) are kept in memory only and lost at exit: give --decisions FILE (or --config, beside which decisions.json is kept)"
            );
            return Ok(Self::in_memory());
        };
        let store = Self::open(path, now)?;
        let (s, a) = store.read(|d| {
            (
                d.suppressions(now).count(),
                d.to_file().acknowledgements.len(),
            )
        });
        info!(
            "operators' decisions kept in {}: {s} suppressions, {a} acknowledged alarms",
            store.path.as_deref().unwrap_or(Path::new("")).display()
        );
        Ok(store)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&Decisions) -> R) -> R {
        f(&self.lock().d)
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    fn save(&self, inner: &mut Inner, d: &Decisions) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = serde_json::to_vec_pretty(&d.to_file()).expect("serialisable");
        text.push(b'\n');
        let r = write_atomically(path, &text);
        match &r {
            Ok(()) => {
                if inner.failing {
                    info!("decisions: {} written again", path.display());
                }
                inner.failing = false;
            }
            Err(e) => {
                inner.counts.save_errors += 1;
                if !inner.failing {
                    warn!("decisions: cannot write {}: {e}", path.display());
                }
                inner.failing = true;
            }
        }
        r
    }

    /// Takes a decision: applied to a copy, written, then in force (a decision that
    /// cannot be written is refused and changes nothing).
    fn decide<R>(
        &self,
        f: impl FnOnce(&mut Decisions) -> Result<R, DecisionError>,
    ) -> Result<R, ApiError> {
        let mut inner = self.lock();
        let mut next = inner.d.clone();
        let r = f(&mut next)?;
        if let Err(e) = self.save(&mut inner, &next) {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "not decided: cannot write {}: {e}",
                    self.path.as_deref().unwrap_or(Path::new("")).display()
                ),
            ));
        }
        inner.d = next;
        inner.dirty = false;
        Ok(r)
    }

    /// Periodic work at `now`: ends the suppressions over (logged), and writes the file
    /// if the evaluation changed it.
    pub fn tick(&self, now: SystemTime) {
        let mut inner = self.lock();
        let gone = inner.d.expire(now);
        for s in &gone.suppressions {
            info!(
                "decision: suppression {} of {} by {:?} is over: {:?}",
                s.id,
                s.describe(),
                s.by,
                s.note
            );
        }
        for a in &gone.acks {
            info!(
                "decision: the acknowledgement by {:?} of host {}'s alarm before the restart found no new alarm; dropped",
                a.by, a.host
            );
        }
        inner.counts.expired += gone.suppressions.len() as u64;
        if !gone.is_empty() {
            inner.dirty = true;
        }
        if inner.dirty {
            let d = inner.d.clone();
            if self.save(&mut inner, &d).is_ok() {
                inner.dirty = false;
            }
        }
    }

    /// Marks an evaluation's events (suppression, acknowledgement) and returns those that
    /// go to the sinks; the others are logged as suppressed and counted.
    pub fn route(&self, events: &mut [AlarmEvent], now: SystemTime) -> Vec<AlarmEvent> {
        if events.is_empty() {
            return Vec::new();
        }
        let mut inner = self.lock();
        let acks_before = inner.d.to_file().acknowledgements;
        let deliver = inner.d.route(events, now);
        if inner.d.to_file().acknowledgements != acks_before {
            inner.dirty = true;
        }
        let mut out = Vec::new();
        for (e, send) in events.iter().zip(deliver) {
            if send {
                out.push(e.clone());
            } else {
                inner.counts.suppressed_events += 1;
                let s = e.suppressed.as_ref();
                info!(
                    "suppressed (not sent to the alarm sinks; suppression {} by {:?}: {:?}): {}",
                    s.map_or("?", |s| &s.id),
                    s.map_or("", |s| &s.by),
                    s.map_or("", |s| &s.note),
                    e.log_line()
                );
            }
        }
        out
    }

    /// Acknowledges the open alarm `id`.
    pub fn acknowledge(
        &self,
        id: &str,
        by: Option<&str>,
        note: &str,
        now: SystemTime,
    ) -> Result<Value, ApiError> {
        let (by, note) = author_and_note(by, note, false)?;
        let ack = self.decide(|d| d.acknowledge(id, by, note, now))?;
        self.lock().counts.acknowledged += 1;
        info!(
            "decision: {:?} acknowledged alarm {} of host {}: {:?}",
            ack.by, ack.alarm, ack.host, ack.note
        );
        Ok(json!({ "alarm": ack.alarm, "host": ack.host, "acknowledged": ack.mark() }))
    }

    /// Suppresses a host or network.
    pub fn suppress(
        &self,
        cidr: &str,
        until: Option<SystemTime>,
        by: Option<&str>,
        note: &str,
        now: SystemTime,
    ) -> Result<Suppression, ApiError> {
        let (by, note) = author_and_note(by, note, true)?;
        let cidr = cidr.trim().parse().map_err(|m: String| bad(m))?;
        let (s, replaced) = self.decide(|d| d.suppress(cidr, until, by, note, now))?;
        self.lock().counts.suppressed += 1;
        info!(
            "decision: {:?} suppressed {} ({}){}: {:?}",
            s.by,
            s.describe(),
            s.id,
            replaced.map_or(String::new(), |r| format!(", in place of {}", r.id)),
            s.note
        );
        Ok(s)
    }

    /// Ends suppression `id` (who and why are logged).
    pub fn remove(&self, id: &str, by: Option<&str>, note: &str) -> Result<Suppression, ApiError> {
        let (by, note) = author_and_note(by, note, false)?;
        let s = self.decide(|d| d.remove(id))?;
        self.lock().counts.removed += 1;
        info!(
            "decision: {by:?} removed suppression {} of {} (by {:?}: {:?}): {note:?}",
            s.id,
            s.describe(),
            s.by,
            s.note
        );
        Ok(s)
    }

    /// `GET /api/suppressions`.
    pub fn suppressions_json(&self, now: SystemTime) -> Value {
        self.read(|d| {
            let list: Vec<&Suppression> = d.suppressions(now).collect();
            json!({
                "file": self.path.as_ref().map(|p| p.display().to_string()),
                "suppressions": list,
            })
        })
    }

    /// Adds to each alarm of `/api/alarms` its acknowledgement and the suppression in
    /// force for its host now (`null` when none), and whether any of its events went to
    /// the alarm sinks (`sent_to_sinks`).
    pub fn decorate_alarms(&self, v: &mut Value, now: SystemTime) {
        let Some(list) = v.get_mut("alarms").and_then(Value::as_array_mut) else {
            return;
        };
        self.read(|d| {
            for a in list {
                let id = a.get("id").and_then(Value::as_str).unwrap_or_default();
                let ack = d.ack(id).map(|a| a.mark());
                let sent = d.sent(id);
                let host = a
                    .get("host")
                    .and_then(Value::as_str)
                    .and_then(|h| h.parse().ok());
                let Some(obj) = a.as_object_mut() else {
                    continue;
                };
                obj.insert("acknowledged".into(), json!(ack));
                // (The event's own mark said what was in force when it happened.)
                let s = host.and_then(|h: IpAddr| d.suppression_for(h, now));
                obj.insert("suppressed".into(), json!(s.map(Suppression::mark)));
                if let Some(sent) = sent {
                    obj.insert("sent_to_sinks".into(), json!(sent));
                }
            }
        });
    }

    /// Adds to each host of `/api/hosts` the suppression in force for it, `null` when none.
    pub fn decorate_hosts(&self, v: &mut Value, now: SystemTime) {
        let Some(list) = v.get_mut("hosts").and_then(Value::as_array_mut) else {
            return;
        };
        self.read(|d| {
            for h in list {
                let host = h
                    .get("host")
                    .and_then(Value::as_str)
                    .and_then(|h| h.parse().ok());
                if let Some(obj) = h.as_object_mut() {
                    let s = host.and_then(|h: IpAddr| d.suppression_for(h, now).map(|s| s.mark()));
                    obj.insert("suppressed".into(), json!(s));
                }
            }
        });
    }

    /// The store's families in the Prometheus text format (appended to `/metrics`).
    pub fn metrics(&self, now: SystemTime) -> String {
        use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
        let (c, active, acked) = {
            let inner = self.lock();
            (
                inner.counts.clone(),
                inner.d.suppressions(now).count(),
                inner.d.acknowledged_open(),
            )
        };
        let registry = Registry::new();
        let decisions = IntCounterVec::new(
            Opts::new(
                "detector_operator_decisions_total",
                "Operators' decisions taken, by action (acknowledge, suppress, remove).",
            ),
            &["action"],
        )
        .expect("valid metric");
        for (action, n) in [
            ("acknowledge", c.acknowledged),
            ("suppress", c.suppressed),
            ("remove", c.removed),
        ] {
            decisions.with_label_values(&[action]).inc_by(n);
        }
        let counter = |name: &str, help: &str, n: u64| {
            let v = IntCounterVec::new(Opts::new(name, help), &[]).expect("valid metric");
            v.with_label_values(&[] as &[&str]).inc_by(n);
            v
        };
        let gauge = |name: &str, help: &str, n: usize| {
            let g = IntGauge::new(name, help).expect("valid metric");
            g.set(n as i64);
            g
        };
        let families: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(decisions),
            Box::new(counter(
                "detector_suppressed_alarm_events_total",
                "Alarm events of suppressed hosts kept from the alarm sinks (logged only).",
                c.suppressed_events,
            )),
            Box::new(counter(
                "detector_suppressions_expired_total",
                "Suppressions that ended at their time.",
                c.expired,
            )),
            Box::new(counter(
                "detector_decisions_write_errors_total",
                "Writes of the decisions file that failed.",
                c.save_errors,
            )),
            Box::new(gauge(
                "detector_suppressions_active",
                "Suppressions in force.",
                active,
            )),
            Box::new(gauge(
                "detector_acknowledged_alarms",
                "Open alarms acknowledged by an operator.",
                acked,
            )),
        ];
        for f in families {
            registry
                .register(f)
                .expect("metric names are unique and valid");
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The routes of the decisions API (merged into the status router).
pub fn routes() -> Router<Arc<Status>> {
    Router::new()
        .route("/api/alarms/{id}/ack", post(ack))
        .route("/api/suppressions", get(list).post(create))
        .route("/api/suppressions/{id}", delete(remove_delete))
        .route("/api/suppressions/{id}/remove", post(remove_post))
}

/// Who decided: the [`Operator`] an authentication layer set, else the user of HTTP
/// Basic credentials, else `by`.
fn author(
    op: Option<Extension<Operator>>,
    headers: &HeaderMap,
    by: Option<String>,
) -> Option<String> {
    if let Some(Extension(Operator(name))) = op {
        return Some(name);
    }
    basic_user(headers).or(by)
}

/// The user name of an `Authorization: Basic` header.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let text = String::from_utf8(base64_decode(b64.trim())?).ok()?;
    let user = text.split_once(':')?.0;
    (!user.is_empty()).then(|| user.to_string())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| bad(e.body_text()))
}

/// Runs a decision off the runtime's threads (it writes and syncs a file).
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    #[serde(default)]
    note: String,
    by: Option<String>,
}

async fn ack(
    State(s): State<Arc<Status>>,
    UrlPath(id): UrlPath<String>,
    op: Option<Extension<Operator>>,
    headers: HeaderMap,
    b: Result<Json<AckBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = body(b)?;
    let by = author(op, &headers, b.by);
    let store = s.decisions.clone();
    let v =
        blocking(move || store.acknowledge(&id, by.as_deref(), &b.note, SystemTime::now())).await?;
    Ok(Json(v))
}

async fn list(State(s): State<Arc<Status>>) -> Json<Value> {
    Json(s.decisions.suppressions_json(SystemTime::now()))
}

/// `until`: RFC 3339 text or Unix seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum Until {
    Unix(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressBody {
    #[serde(alias = "host")]
    cidr: String,
    #[serde(default)]
    until: Option<Until>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    note: String,
    by: Option<String>,
}

/// The last time RFC 3339 can write (9999-12-31T23:59:59Z), in Unix seconds.
const LAST_TIME: u64 = 253_402_300_799;

fn until(b: &SuppressBody, now: SystemTime) -> Result<Option<SystemTime>, ApiError> {
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(LAST_TIME);
    let t = until_unbounded(b, now)?;
    if t.is_some_and(|t| t > last) {
        return Err(bad(
            "`until` is beyond the year 9999: for good is `\"until\": null`",
        ));
    }
    Ok(t)
}

fn until_unbounded(b: &SuppressBody, now: SystemTime) -> Result<Option<SystemTime>, ApiError> {
    let far = || bad("`until` is beyond the year 9999: for good is `\"until\": null`");
    match (&b.until, &b.for_) {
        (Some(_), Some(_)) => Err(bad("give `until` or `for`, not both")),
        (None, None) => Ok(None),
        (None, Some(f)) => {
            let d = humantime::parse_duration(f.trim())
                .map_err(|e| bad(format!("`for` '{f}': {e} (e.g. \"2h\", \"7days\")")))?;
            now.checked_add(d).map(Some).ok_or_else(far)
        }
        (Some(Until::Unix(secs)), None) if secs.is_finite() && *secs >= 0.0 => {
            let d = std::time::Duration::try_from_secs_f64(*secs).map_err(|_| far())?;
            SystemTime::UNIX_EPOCH
                .checked_add(d)
                .map(Some)
                .ok_or_else(far)
        }
        (Some(Until::Unix(secs)), None) => Err(bad(format!("`until` {secs} is no time"))),
        (Some(Until::Text(t)), None) => {
            humantime::parse_rfc3339_weak(t.trim())
                .map(Some)
                .map_err(|e| {
                    bad(format!(
                        "`until` '{t}': {e} (RFC 3339 in UTC, e.g. \"2026-12-31T23:00:00Z\")"
                    ))
                })
        }
    }
}

async fn create(
    State(s): State<Arc<Status>>,
    op: Option<Extension<Operator>>,
    headers: HeaderMap,
    b: Result<Json<SuppressBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Suppression>), ApiError> {
    let b = body(b)?;
    let now = SystemTime::now();
    let until = until(&b, now)?;
    let by = author(op, &headers, b.by);
    let store = s.decisions.clone();
    let sup = blocking(move || store.suppress(&b.cidr, until, by.as_deref(), &b.note, now)).await?;
    Ok((StatusCode::CREATED, Json(sup)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    by: Option<String>,
    #[serde(default)]
    note: String,
}

async fn remove_delete(
    State(s): State<Arc<Status>>,
    UrlPath(id): UrlPath<String>,
    op: Option<Extension<Operator>>,
    headers: HeaderMap,
    Query(q): Query<RemoveBody>,
) -> Result<Json<Suppression>, ApiError> {
    remove(s, id, author(op, &headers, q.by), q.note).await
}

async fn remove_post(
    State(s): State<Arc<Status>>,
    UrlPath(id): UrlPath<String>,
    op: Option<Extension<Operator>>,
    headers: HeaderMap,
    b: Result<Json<RemoveBody>, JsonRejection>,
) -> Result<Json<Suppression>, ApiError> {
    let b = body(b)?;
    remove(s, id, author(op, &headers, b.by), b.note).await
}

async fn remove(
    s: Arc<Status>,
    id: String,
    by: Option<String>,
    note: String,
) -> Result<Json<Suppression>, ApiError> {
    let store = s.decisions.clone();
    let sup = blocking(move || store.remove(&id, by.as_deref(), &note)).await?;
    Ok(Json(sup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_a_time_a_duration_or_never() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let b = |v: Value| serde_json::from_value::<SuppressBody>(v).unwrap();
        let secs = |t: Option<SystemTime>| {
            t.map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs())
        };
        let ok = |v: Value| secs(until(&b(v), now).unwrap());
        assert_eq!(ok(json!({"cidr": "10.0.0.5", "until": null})), None);
        assert_eq!(ok(json!({"cidr": "10.0.0.5"})), None);
        assert_eq!(
            ok(json!({"host": "10.0.0.5", "for": "2h"})),
            Some(1_800_007_200)
        );
        assert_eq!(
            ok(json!({"cidr": "10.0.0.5", "until": 1_900_000_000})),
            Some(1_900_000_000)
        );
        assert_eq!(
            ok(json!({"cidr": "10.0.0.5", "until": "2030-01-01T00:00:00Z"})),
            Some(1_893_456_000)
        );
        for wrong in [
            json!({"cidr": "10.0.0.5", "until": 1e30}),
            json!({"cidr": "10.0.0.5", "until": -1}),
            json!({"cidr": "10.0.0.5", "for": "100000000years"}),
            json!({"cidr": "10.0.0.5", "for": "soon"}),
            json!({"cidr": "10.0.0.5", "until": "tomorrow"}),
            json!({"cidr": "10.0.0.5", "until": 1_900_000_000, "for": "2h"}),
        ] {
            let e = until(&b(wrong.clone()), now).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{wrong}: {}", e.1);
        }
    }

    #[test]
    fn basic_credentials_name_the_user() {
        let mut h = HeaderMap::new();
        // "alice:secret"
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6c2VjcmV0".parse().unwrap(),
        );
        assert_eq!(basic_user(&h).as_deref(), Some("alice"));
        assert_eq!(
            author(None, &h, Some("mallory".into())).as_deref(),
            Some("alice")
        );
        let op = Some(Extension(Operator("root".into())));
        assert_eq!(author(op, &h, None).as_deref(), Some("root"));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(author(None, &h, Some("bob".into())).as_deref(), Some("bob"));
        assert_eq!(base64_decode("Ym9i").unwrap(), b"bob");
        assert_eq!(base64_decode("Ym8=").unwrap(), b"bo");
        assert_eq!(base64_decode("Yg==").unwrap(), b"b");
        assert!(base64_decode("Y*==").is_none());
    }

    #[test]
    fn the_file_is_written_atomically_and_read_back() {
        let dir = std::env::temp_dir().join(format!("detector-decisions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.json");
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let store = Store::for_run(None, Some(&dir.join("detector.toml")), t0).unwrap();
        assert_eq!(store.path(), Some(path.as_path()));
        assert!(!path.exists(), "written at the first decision only");
        let s = store
            .suppress("10.0.0.5", None, Some("bob"), "mirror", t0)
            .unwrap();
        assert!(path.exists());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        let e = store.suppress("10.0.0.6", None, None, "x", t0).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        let again = Store::open(path.clone(), t0).unwrap();
        assert_eq!(again.suppressions_json(t0)["suppressions"][0]["id"], s.id);
        assert_eq!(again.counts(), Counts::default());
        // A decision that cannot be written is refused and changes nothing.
        std::fs::remove_dir_all(&dir).unwrap();
        let e = store
            .suppress("10.0.0.7", None, Some("bob"), "lab", t0)
            .unwrap_err();
        assert_eq!(e.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", e.1);
        assert_eq!(store.read(|d| d.suppressions(t0).count()), 1);
        assert_eq!(store.counts().save_errors, 1);
        let m = store.metrics(t0);
        assert!(
            m.contains("detector_operator_decisions_total{action=\"suppress\"} 1"),
            "{m}"
        );
        assert!(m.contains("detector_suppressions_active 1"), "{m}");
        // In memory: nothing written.
        let mem = Store::for_run(None, None, t0).unwrap();
        assert!(mem.path().is_none());
        mem.suppress("10.0.0.5", None, Some("bob"), "mirror", t0)
            .unwrap();
        // A broken file is refused, named.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, "{not json").unwrap();
        let e = Store::open(path.clone(), t0).err().unwrap();
        assert!(format!("{e:#}").contains("decisions.json"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
