//! Alarm events POSTed as JSON to an HTTP endpoint, from a worker thread with a bounded
//! queue: a slow or failing endpoint never blocks the pipeline. Each event is retried
//! until delivered (backing off while the endpoint is down); when the queue is full the
//! oldest event is dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::warn;

use crate::detect::AlarmEvent;

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
    stats: WebhookStats,
}

pub struct WebhookSink {
    shared: Arc<Shared>,
    capacity: usize,
    worker: Option<JoinHandle<()>>,
}

impl WebhookSink {
    pub fn new(url: String, timeout: Duration, retries: u32, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: WebhookStats::default(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver(s, url, timeout, retries))
            .expect("spawn the webhook thread");
        Self {
            shared,
            capacity: capacity.max(1),
            worker: Some(worker),
        }
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

    /// Queues the events; never blocks.
    pub fn send(&self, events: &[AlarmEvent]) {
        let mut q = self.shared.queue.lock().expect("webhook queue");
        for e in events {
            if q.len() >= self.capacity {
                q.pop_front();
                let n = self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!("webhook queue full: {n} alarm events dropped so far");
                }
            }
            q.push_back(serde_json::to_string(e).expect("serialisable"));
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

fn deliver(s: Arc<Shared>, url: String, timeout: Duration, retries: u32) {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let mut backoff = Duration::from_millis(200);
    loop {
        let body = {
            let mut q = s.queue.lock().expect("webhook queue");
            while q.is_empty() && !s.stop.load(Ordering::Relaxed) {
                q = s.ready.wait(q).expect("webhook queue");
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            q.front().cloned().expect("not empty")
        };
        let mut ok = false;
        for _ in 0..=retries {
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
            backoff = Duration::from_millis(200);
        } else {
            // The endpoint is down: keep the event, wait, try again.
            let q = s.queue.lock().expect("webhook queue");
            let _ = s.ready.wait_timeout(q, backoff).expect("webhook queue");
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
