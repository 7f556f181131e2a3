//! Alarm events POSTed as JSON to an HTTP or HTTPS endpoint, from a worker thread with a
//! bounded queue: a slow or failing endpoint never blocks the pipeline. Each event is
//! tried `retries + 1` times with a growing pause between attempts (200 ms, doubling,
//! at most 10 s); while the endpoint stays down the event is kept and tried again after
//! a pause that keeps growing, whatever else arrives meanwhile. When the queue is full
//! the oldest event is dropped and counted. HTTPS goes through rustls with the system's
//! root certificates plus an optional CA file; a URL that cannot be served (not http or
//! https, a CA file that does not load) is refused when the sink is made, not at the
//! first alarm. At exit the queue is given a bounded time to drain ([`WebhookSink::close`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;

use crate::detect::AlarmEvent;

/// Why a webhook cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook '{0}' is not an http:// or https:// URL")]
    Scheme(String),
    #[error("webhook CA file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("webhook TLS: {0}")]
    Tls(String),
}

/// First pause after a failed attempt, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// Counters of the webhook.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    /// Attempts that failed (timeouts, connection refused, non-2xx answers).
    pub failures: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
}

struct Shared {
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
    stop: AtomicBool,
    /// Deliver what is queued, then end (set by [`WebhookSink::close`]).
    draining: AtomicBool,
    stats: WebhookStats,
}

pub struct WebhookSink {
    shared: Arc<Shared>,
    capacity: usize,
    worker: Option<JoinHandle<()>>,
}

impl WebhookSink {
    /// A sink POSTing to `url` (http or https; for https the system's roots and, if
    /// given, the CA certificates of the PEM file `ca`).
    pub fn new(
        url: String,
        timeout: Duration,
        retries: u32,
        capacity: usize,
        ca: Option<&Path>,
    ) -> Result<Self, WebhookError> {
        let mut builder = ureq::AgentBuilder::new().timeout(timeout);
        if url.starts_with("https://") {
            builder = builder.tls_config(Arc::new(tls_config(ca)?));
        } else if !url.starts_with("http://") {
            return Err(WebhookError::Scheme(url));
        }
        let agent = builder.build();
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            stats: WebhookStats::default(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || {
                crate::privileges::drop_thread_capabilities();
                deliver(s, agent, url, retries)
            })
            .expect("spawn the webhook thread");
        Ok(Self {
            shared,
            capacity: capacity.max(1),
            worker: Some(worker),
        })
    }

    /// Gives the queue up to `within` to drain, then stops the worker; returns how many
    /// events stayed undelivered.
    pub fn close(&mut self, within: Duration) -> usize {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        let end = Instant::now() + within;
        while self.queued() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.queued()
    }

    /// Takes the events `old` still holds (a reload replaces the sink): queued here, in
    /// their order, before anything new.
    pub fn adopt_queue(&self, old: &WebhookSink) {
        let pending: Vec<_> = old
            .shared
            .queue
            .lock()
            .expect("webhook queue")
            .drain(..)
            .collect();
        if pending.is_empty() {
            return;
        }
        let mut q = self.shared.queue.lock().expect("webhook queue");
        for (i, e) in pending.into_iter().enumerate() {
            q.insert(i, e);
        }
        while q.len() > self.capacity {
            q.pop_back();
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(q);
        self.shared.ready.notify_all();
    }

    /// Queues the events (native JSON); never blocks.
    pub fn send(&self, events: &[AlarmEvent]) {
        self.send_encoded(
            events
                .iter()
                .map(|e| serde_json::to_string(e).expect("serialisable")),
        );
    }

    /// Queues bodies already encoded (`--alarm-format`); never blocks.
    pub fn send_encoded(&self, bodies: impl IntoIterator<Item = String>) {
        let mut q = self.shared.queue.lock().expect("webhook queue");
        for body in bodies {
            if q.len() >= self.capacity {
                q.pop_front();
                let n = self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!("webhook queue full: {n} alarm events dropped so far");
                }
            }
            q.push_back(body);
        }
        self.shared.ready.notify_one();
    }

    pub fn stats(&self) -> &WebhookStats {
        &self.shared.stats
    }

    /// Events waiting.
    pub fn queued(&self) -> usize {
        self.shared.queue.lock().expect("webhook queue").len()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The TLS settings of an https webhook: the system's root certificates and those of
/// the PEM file `ca`.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, WebhookError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let err = |message: String| WebhookError::Ca {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("holds no PEM certificate".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(WebhookError::Tls(
            "no root certificate: the system has none (package ca-certificates) and no --webhook-ca was given".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Waits `pause`, unless the sink stops; true when it stops.
fn pause(s: &Shared, pause: Duration) -> bool {
    let end = Instant::now() + pause;
    let mut q = s.queue.lock().expect("webhook queue");
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        // New events wake the condition too: wait on until the pause is over.
        q = s.ready.wait_timeout(q, end - now).expect("webhook queue").0;
    }
}

fn deliver(s: Arc<Shared>, agent: ureq::Agent, url: String, retries: u32) {
    let mut down_pause = FIRST_PAUSE;
    loop {
        let body = {
            let mut q = s.queue.lock().expect("webhook queue");
            while q.is_empty() && !s.stop.load(Ordering::Relaxed) {
                if s.draining.load(Ordering::Relaxed) {
                    return;
                }
                q = s.ready.wait(q).expect("webhook queue");
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            q.front().cloned().expect("not empty")
        };
        let mut ok = false;
        let mut between = FIRST_PAUSE;
        for attempt in 0..=retries {
            if attempt > 0 {
                if pause(&s, between) {
                    return;
                }
                between = (between * 2).min(LONGEST_PAUSE);
            }
            match agent
                .post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body)
            {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    let n = s.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!("webhook {url}: {e} ({n} failed attempts so far)");
                    }
                }
            }
        }
        if ok {
            s.queue.lock().expect("webhook queue").pop_front();
            s.stats.delivered.fetch_add(1, Ordering::Relaxed);
            down_pause = FIRST_PAUSE;
        } else {
            // The endpoint is down: keep the event, pause (longer each time), try again.
            if pause(&s, down_pause) {
                return;
            }
            down_pause = (down_pause * 2).min(LONGEST_PAUSE);
        }
    }
}
