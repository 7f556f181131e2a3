//! Edge mode (`detector run ... --nats URL[,URL...]`): a record sink that publishes every
//! record (after local duplicate marking) to JetStream, on `records.<shard>` by internal
//! host, in batches of the [`wire`] encoding. It takes the detection-only records too
//! (live flows: the starts and growth reports of flows still open, which no other sink
//! sees), so detector nodes detect from them as this agent's own detection does, before
//! the flows' exports. Given several server URLs (a cluster), it
//! makes missing streams and buckets with as many replicas as URLs, up to 3.
//!
//! The sink thread never waits on the network: batches go through a bounded queue
//! (`--nats-buffer` batches) to a publisher thread, which publishes each one and waits
//! for JetStream's acknowledgement, retrying with the same message id (JetStream drops a
//! retried copy within its duplicate window: a batch is stored once). While NATS is
//! unreachable the queue fills; what does not fit is shed, counted and logged.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use log::{info, warn};
use tokio::sync::mpsc;

use super::wire::{self, AgentName};
use super::{Bus, Names, shard_of};
use crate::detect::DetectConfig;
use crate::export::{Sink, SinkCounters};
use crate::flow::FlowRecord;

/// Records per message at most (a message of about 256 KB, under NATS's 1 MB default).
pub const BATCH_RECORDS: usize = 2_000;

/// What the edge did so far.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    pub published_records: AtomicU64,
    /// Of them, live flows' starts and growth reports (detection-only records).
    pub published_live: AtomicU64,
    pub published_batches: AtomicU64,
    /// Records shed: the queue was full (NATS unreachable or slow), or left unsent at exit.
    pub shed_records: AtomicU64,
    /// Publish attempts that failed (each retried).
    pub publish_errors: AtomicU64,
}

struct Batch {
    subject: String,
    id: String,
    payload: Bytes,
    records: u64,
    /// Of them, detection-only records.
    live: u64,
}

pub struct NatsSink {
    agent: AgentName,
    shards: u32,
    detect: Arc<DetectConfig>,
    tx: Option<mpsc::Sender<Batch>>,
    counters: Arc<EdgeCounters>,
    seq: u64,
    /// Each process numbers its batches from its start time: ids stay unique across
    /// restarts.
    epoch: u64,
    shed_logged: Option<Instant>,
    publisher: Option<JoinHandle<()>>,
    url: String,
}

impl NatsSink {
    /// Starts the publisher for `url`; records are routed by `detect`'s internal networks.
    pub fn start(
        url: &str,
        agent: &str,
        shards: u32,
        buffer: usize,
        detect: Arc<DetectConfig>,
    ) -> std::io::Result<Self> {
        if agent.is_empty() || agent.len() > wire::AGENT_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the agent name '{agent}' must be 1 to {} bytes (two edges must not share one): give --agent-name",
                    wire::AGENT_MAX
                ),
            ));
        }
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let counters = Arc::new(EdgeCounters::default());
        let c = counters.clone();
        let bus = Bus::new(url, 1);
        let bus = Bus::new(url, bus.list().len().min(3));
        let publisher = std::thread::Builder::new()
            .name("nats-edge".into())
            .spawn(move || publish_loop(&bus, shards, rx, &c))?;
        Ok(Self {
            agent: AgentName::new(agent),
            shards,
            detect,
            tx: Some(tx),
            counters,
            seq: 0,
            epoch: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            shed_logged: None,
            publisher: Some(publisher),
            url: url.to_string(),
        })
    }

    pub fn counters(&self) -> Arc<EdgeCounters> {
        self.counters.clone()
    }

    /// The internal host a record is about (its shard's key): the internal side, else the
    /// source.
    fn host(&self, r: &FlowRecord) -> IpAddr {
        if self.detect.is_internal(r.src_addr) || !self.detect.is_internal(r.dst_addr) {
            r.src_addr
        } else {
            r.dst_addr
        }
    }

    fn shed(&mut self, n: u64, why: &str) {
        let total = self.counters.shed_records.fetch_add(n, Ordering::Relaxed) + n;
        if self
            .shed_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.shed_logged = Some(Instant::now());
            warn!("NATS {}: {why}: {total} records shed so far", self.url);
        }
    }
}

impl Sink for NatsSink {
    fn name(&self) -> String {
        format!("nats {}", self.url)
    }

    fn send(&mut self, records: &[FlowRecord], _now: SystemTime) {
        if records.is_empty() {
            return;
        }
        let mut by_shard: Vec<Vec<&FlowRecord>> = vec![Vec::new(); self.shards as usize];
        for r in records {
            by_shard[shard_of(self.host(r), self.shards) as usize].push(r);
        }
        for (shard, recs) in by_shard.iter().enumerate() {
            for chunk in recs.chunks(BATCH_RECORDS) {
                self.seq += 1;
                let batch = Batch {
                    subject: Names::records(shard as u32),
                    id: format!("{}-{}-{}", self.agent, self.epoch, self.seq),
                    payload: wire::encode(&self.agent, chunk),
                    records: chunk.len() as u64,
                    live: chunk.iter().filter(|r| r.live.detection_only()).count() as u64,
                };
                let n = batch.records;
                match self.tx.as_ref().map(|tx| tx.try_send(batch)) {
                    Some(Ok(())) => {}
                    Some(Err(mpsc::error::TrySendError::Full(_))) => {
                        self.shed(n, "the publish queue is full (NATS unreachable or slow)")
                    }
                    Some(Err(mpsc::error::TrySendError::Closed(_))) | None => {
                        self.shed(n, "the publisher stopped")
                    }
                }
            }
        }
    }

    fn describe(&self) -> String {
        let c = &self.counters;
        format!(
            "nats: {} records ({} live flow reports) in {} batches published, {} shed, {} publish errors",
            c.published_records.load(Ordering::Relaxed),
            c.published_live.load(Ordering::Relaxed),
            c.published_batches.load(Ordering::Relaxed),
            c.shed_records.load(Ordering::Relaxed),
            c.publish_errors.load(Ordering::Relaxed)
        )
    }

    fn failures(&self) -> u64 {
        self.counters.shed_records.load(Ordering::Relaxed)
    }

    /// Flow starts and growth reports: the nodes' detection needs them to alarm as
    /// early as this agent's.
    fn wants_live(&self) -> bool {
        true
    }

    fn counters(&self) -> SinkCounters {
        SinkCounters {
            sink: self.name(),
            records: self.counters.published_records.load(Ordering::Relaxed),
            errors: self.counters.shed_records.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NatsSink {
    /// Closes the queue and lets the publisher send what is queued (it gives up after a
    /// few seconds and counts the rest as shed).
    fn drop(&mut self) {
        self.tx = None;
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
        let c = &self.counters;
        info!(
            "NATS {}: {} records published in {} batches, {} shed",
            self.url,
            c.published_records.load(Ordering::Relaxed),
            c.published_batches.load(Ordering::Relaxed),
            c.shed_records.load(Ordering::Relaxed)
        );
    }
}

/// How long the publisher keeps trying at exit before it sheds what is left.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long a batch is retried: under the stream's duplicate window (120 s).
const RETRY_FOR: Duration = Duration::from_secs(100);

fn publish_loop(bus: &Bus, shards: u32, mut rx: mpsc::Receiver<Batch>, c: &EdgeCounters) {
    let url = bus.urls.as_str();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("NATS publisher: {e}");
            return;
        }
    };
    rt.block_on(async {
        let js = super::connect(bus).await;
        let mut ready = false;
        let mut closed_at: Option<Instant> = None;
        let mut logged: Option<Instant> = None;
        while let Some(batch) = rx.recv().await {
            let mut backoff = Duration::from_millis(100);
            let first_try = Instant::now();
            loop {
                // JetStream drops a retried copy only within its duplicate window: a
                // batch not acknowledged by then is shed rather than risk being stored
                // twice.
                if first_try.elapsed() >= RETRY_FOR {
                    c.shed_records.fetch_add(batch.records, Ordering::Relaxed);
                    warn!(
                        "NATS {url}: a batch of {} records not acknowledged in {} s: shed",
                        batch.records,
                        RETRY_FOR.as_secs()
                    );
                    break;
                }
                if !ready {
                    match super::ensure(&js, shards, bus.replicas).await {
                        Ok(()) => ready = true,
                        Err(e) => {
                            c.publish_errors.fetch_add(1, Ordering::Relaxed);
                            if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                                logged = Some(Instant::now());
                                warn!("NATS {url}: {e:#}");
                            }
                        }
                    }
                }
                if ready {
                    match publish(&js, &batch).await {
                        Ok(()) => {
                            c.published_records
                                .fetch_add(batch.records, Ordering::Relaxed);
                            c.published_live.fetch_add(batch.live, Ordering::Relaxed);
                            c.published_batches.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            c.publish_errors.fetch_add(1, Ordering::Relaxed);
                            if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                                logged = Some(Instant::now());
                                warn!(
                                    "NATS {url}: publishing to {}: {e:#} (retrying)",
                                    batch.subject
                                );
                            }
                        }
                    }
                }
                // At exit (the queue closed), stop trying after a grace period.
                if rx.is_closed() {
                    let t = *closed_at.get_or_insert_with(Instant::now);
                    if t.elapsed() >= EXIT_GRACE {
                        let mut lost = batch.records;
                        while let Ok(b) = rx.try_recv() {
                            lost += b.records;
                        }
                        c.shed_records.fetch_add(lost, Ordering::Relaxed);
                        warn!("NATS {url}: unreachable at exit: {lost} records not published");
                        return;
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    });
}

async fn publish(js: &async_nats::jetstream::Context, b: &Batch) -> anyhow::Result<()> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", b.id.as_str());
    let ack = js
        .publish_with_headers(b.subject.clone(), headers, b.payload.clone())
        .await?;
    tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| anyhow::anyhow!("no acknowledgement within 5 s"))??;
    Ok(())
}
