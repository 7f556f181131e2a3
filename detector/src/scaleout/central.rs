//! A detector node (`detector central --nats URL --shards N`).
//!
//! Leases: every `lease/3` the node renews its heartbeat (`node.NAME`) and the shards it
//! owns (`shard.S`, value its name) in the lease bucket, whose entries expire after
//! `--lease-secs` unless renewed. It aims at its fair part of the shards (shards / live
//! nodes, rounded up): it takes free shards (a create that succeeds only if no one holds
//! the key) and gives extra ones back (stops their consumer, then deletes the key). A
//! node that dies stops renewing: its keys expire and the others take its shards.
//!
//! Consumers: one durable pull consumer per shard (`shard-S`, explicit acks). A batch is
//! acknowledged (and the server's confirmation awaited) once its records are in this
//! node's pipeline; a batch delivered to a node that died unacknowledged is delivered
//! again after the ack wait to the shard's next owner. So no batch is lost, and none is
//! in two profiles: the dead node's profiles died with it.
//!
//! Alarms: the pipeline's events pass through the open-alarm bucket before the sinks: a
//! host whose episode another node raised keeps that alarm's id (the event becomes an
//! update), so a host has one alarm per episode whichever node scores it. Every event is
//! also published to the `alarms` subject.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{Names, bucket, connect, ensure, wire};
use crate::detect::{AlarmEvent, AlarmState};
use crate::pipeline::{Input, Pipeline, PipelineConfig, WhenBehind, build};

/// What a `detector central` node does (the command line gives it).
#[derive(Clone, Debug)]
pub struct CentralOptions {
    /// NATS server URL (JetStream on).
    pub nats: String,
    /// Shards the flows are split in: the same count on every edge and node.
    pub shards: u32,
    /// This node's name in leases and logs (default: host name and process id).
    pub node: Option<String>,
    /// Seconds before a node that stops renewing its leases loses its shards.
    pub lease_secs: u64,
    /// Seconds before an unacknowledged batch is delivered again.
    pub ack_wait_secs: u64,
    /// Seconds between two logs of the node's counters.
    pub stats_interval: u64,
    pub detect: crate::pipeline::build::DetectOptions,
}

/// What the node did so far.
#[derive(Debug, Default)]
pub struct NodeCounters {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    /// Batches that did not decode (acknowledged: they never will).
    pub malformed: AtomicU64,
    pub owned_shards: AtomicU64,
    pub shards_taken: AtomicU64,
    pub shards_given: AtomicU64,
    pub shards_lost: AtomicU64,
    pub alarm_publish_errors: AtomicU64,
    /// The open-alarm bucket could not be read or written (the event went out
    /// unchanged, to the local sinks).
    pub alarm_nats_errors: AtomicU64,
    /// Raises that continued another node's episode.
    pub episodes_continued: AtomicU64,
    /// Events of hosts whose shard this node no longer holds (not sent).
    pub not_owner_events: AtomicU64,
    /// Batches delivered again to this node after a failed acknowledgement (acknowledged
    /// again, not counted twice).
    pub redelivered_skipped: AtomicU64,
}

/// The value kept per open alarm in the open-alarm bucket.
#[derive(Serialize, Deserialize)]
struct OpenAlarm {
    id: String,
    first_seen: String,
    node: String,
}

/// Host addresses as key-value keys (`:` is not allowed in keys).
fn alarm_key(e: &AlarmEvent) -> String {
    format!("host.{}", e.host.to_string().replace(':', "_"))
}

/// How long an open alarm's entry outlives its last event (an update renews it): a
/// node that died with an alarm open leaves no entry that would swallow the host's next
/// episode forever.
const OPEN_ALARM_TTL: Duration = Duration::from_secs(24 * 3600);

/// The shards this node holds now (kept by the leaser, read by the relay).
type OwnedSet = Arc<std::sync::Mutex<std::collections::BTreeSet<u32>>>;

/// Runs the pipeline's events through the open-alarm bucket (one alarm per host and
/// episode across nodes) and publishes them to the `alarms` subject.
struct Relay {
    js: jetstream::Context,
    open: kv::Store,
    node: String,
    rt: tokio::runtime::Handle,
    counters: Arc<NodeCounters>,
    shards: u32,
    owned: OwnedSet,
    /// This node's open alarms: its engine's id, and the episode's id and first_seen
    /// that its events go out under (another node's, when it took the host over).
    episodes: std::collections::HashMap<String, (String, String)>,
}

/// `f` within 5 s (a NATS request that hangs is an error, not a stall).
async fn within<F: std::future::Future>(f: F) -> Result<F::Output> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from NATS within 5 s"))
}

impl Relay {
    fn apply(&mut self, events: &[AlarmEvent]) -> Vec<AlarmEvent> {
        let rt = self.rt.clone();
        rt.block_on(async {
            let mut out = Vec::with_capacity(events.len());
            // After one failure of NATS, the rest of this evaluation's events go to the
            // local sinks only (counted): the main loop does not wait on every event.
            let mut nats_ok = true;
            for e in events {
                let mut e = e.clone();
                let owner = self
                    .owned
                    .lock()
                    .map(|o| o.contains(&super::shard_of(e.host, self.shards)))
                    .unwrap_or(true);
                if !owner {
                    // The host's shard went to another node: it speaks for the host now
                    // (this node's profile of it only ages out).
                    self.episodes.remove(&e.id);
                    self.counters
                        .not_owner_events
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if nats_ok && let Err(err) = self.track(&mut e).await {
                    nats_ok = false;
                    self.counters
                        .alarm_nats_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "open-alarm bucket: {err:#}: alarm {} goes to the local sinks only",
                        e.id
                    );
                }
                if let Some((id, first)) = self.episodes.get(&e.id) {
                    e.first_seen = first.clone();
                    let engine_id = std::mem::replace(&mut e.id, id.clone());
                    if e.state == AlarmState::Cleared {
                        self.episodes.remove(&engine_id);
                    }
                }
                if nats_ok && let Err(err) = self.publish(&e).await {
                    nats_ok = false;
                    warn!(
                        "publishing alarm {} to {}: {err:#}",
                        e.id,
                        Names::ALARMS_SUBJECT
                    );
                }
                if !nats_ok {
                    self.counters
                        .alarm_publish_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                out.push(e);
            }
            out
        })
    }

    /// Keeps the bucket's entry of `e`'s host, and the episode `e` belongs to: a raise
    /// claims the host, or continues (as an update) the episode another node raised.
    async fn track(&mut self, e: &mut AlarmEvent) -> Result<()> {
        let key = alarm_key(e);
        let value = |id: &str, first: &str| -> Bytes {
            serde_json::to_vec(&OpenAlarm {
                id: id.to_string(),
                first_seen: first.to_string(),
                node: self.node.clone(),
            })
            .unwrap_or_default()
            .into()
        };
        match e.state {
            AlarmState::Raised => {
                let mine = value(&e.id, &e.first_seen);
                match within(self.open.create(&key, mine)).await? {
                    Ok(_) => {
                        self.episodes
                            .insert(e.id.clone(), (e.id.clone(), e.first_seen.clone()));
                    }
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let held = within(self.open.get(&key))
                            .await?
                            .map_err(|err| anyhow::anyhow!("{err}"))?
                            .and_then(|v| serde_json::from_slice::<OpenAlarm>(&v).ok());
                        let (id, first) = held
                            .map(|h| (h.id, h.first_seen))
                            .unwrap_or_else(|| (e.id.clone(), e.first_seen.clone()));
                        if id != e.id {
                            // Another node raised this episode: carry on with its alarm,
                            // and claim it.
                            e.state = AlarmState::Updated;
                            self.counters
                                .episodes_continued
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        within(self.open.put(&key, value(&id, &first)))
                            .await?
                            .map_err(|err| anyhow::anyhow!("{err}"))?;
                        self.episodes.insert(e.id.clone(), (id, first));
                    }
                    Err(err) => return Err(anyhow::anyhow!("{err}")),
                }
            }
            AlarmState::Updated => {
                if let Some((id, first)) = self.episodes.get(&e.id) {
                    // Renews the entry (it expires OPEN_ALARM_TTL after the last event).
                    within(self.open.put(&key, value(id, first)))
                        .await?
                        .map_err(|err| anyhow::anyhow!("{err}"))?;
                }
            }
            AlarmState::Cleared => {
                let id = self
                    .episodes
                    .get(&e.id)
                    .map_or(e.id.as_str(), |x| x.0.as_str());
                let entry = within(self.open.entry(&key))
                    .await?
                    .map_err(|err| anyhow::anyhow!("{err}"))?;
                // Only the entry of this episode (not one a newer owner wrote since).
                if let Some(en) = entry
                    && serde_json::from_slice::<OpenAlarm>(&en.value).is_ok_and(|h| h.id == id)
                {
                    within(self.open.delete_expect_revision(&key, Some(en.revision)))
                        .await?
                        .map_err(|err| anyhow::anyhow!("{err}"))?;
                }
            }
        }
        Ok(())
    }

    async fn publish(&self, e: &AlarmEvent) -> Result<()> {
        let json = serde_json::to_vec(e)?;
        let ack = tokio::time::timeout(
            Duration::from_secs(5),
            self.js.publish(Names::ALARMS_SUBJECT, json.into()),
        )
        .await??;
        tokio::time::timeout(Duration::from_secs(5), ack).await??;
        Ok(())
    }
}

fn default_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}

/// Key-value keys allow `[-/_=.a-zA-Z0-9]`.
fn key_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn run(args: &CentralOptions) -> Result<()> {
    let (detect, mut alarms) = build::detection(&args.detect)?;
    let node = key_safe(&args.node.clone().unwrap_or_else(default_node));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    info!("node {node}: connecting to {}", args.nats);
    let js = rt.block_on(connect(&args.nats));
    let want_ttl = Duration::from_secs(args.lease_secs);
    // NATS may come up after the node: keep trying, except on a setting no retry fixes.
    let (leases, open, ttl) = rt.block_on(async {
        let mut logged: Option<Instant> = None;
        loop {
            let setup = async {
                ensure(&js, args.shards).await?;
                let leases = bucket(&js, Names::LEASE_BUCKET, Some(want_ttl)).await?;
                let open = bucket(&js, Names::ALARM_BUCKET, Some(OPEN_ALARM_TTL)).await?;
                let ttl = leases
                    .status()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .max_age();
                Ok::<_, super::EnsureError>((leases, open, ttl))
            };
            match setup.await {
                Ok(x) => break Ok(x),
                Err(super::EnsureError::ShardMismatch(m)) => break Err(anyhow::anyhow!(m)),
                Err(e) => {
                    if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        logged = Some(Instant::now());
                        warn!("node {node}: NATS {}: {e} (retrying)", args.nats);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })?;
    if ttl != want_ttl {
        warn!(
            "node {node}: the lease bucket expires entries after {} s (made by a node with another --lease-secs); this node renews for that",
            ttl.as_secs()
        );
    }
    let counters = Arc::new(NodeCounters::default());
    let owned: OwnedSet = Arc::default();
    let mut relay = Relay {
        js: js.clone(),
        open,
        node: node.clone(),
        rt: rt.handle().clone(),
        counters: counters.clone(),
        shards: args.shards,
        owned: owned.clone(),
        episodes: Default::default(),
    };
    alarms.relay = Some(Box::new(move |events: &[AlarmEvent]| relay.apply(events)));
    // Batches of thousands of records: a short queue per shard is enough to keep the
    // workers busy, and a long one only holds memory.
    let mut cfg = PipelineConfig::new(None, WhenBehind::Wait);
    cfg.shard_queue = CENTRAL_SHARD_QUEUE;
    let mut pipeline = Pipeline::new(&cfg, Vec::new(), detect, alarms);
    let (feed, feed_rx) = tokio::sync::mpsc::channel(FEED_QUEUE);
    let feeding = {
        let input = pipeline.input();
        std::thread::Builder::new()
            .name("feeder".into())
            .spawn(move || feeder(input, feed_rx))
            .context("starting the feeder thread")?
    };
    let stop = Arc::new(AtomicBool::new(false));
    let leaser = Leaser {
        js: js.clone(),
        leases,
        node: node.clone(),
        shards: args.shards,
        ttl,
        ack_wait: Duration::from_secs(args.ack_wait_secs),
        feed,
        counters: counters.clone(),
        stop: stop.clone(),
        owned,
    };
    let leasing = rt.spawn(leaser.run());
    {
        let stop = stop.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    info!(
        "node {node}: detecting over {} shards (lease {} s)",
        args.shards, args.lease_secs
    );
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        pipeline.tick(SystemTime::now(), false);
        if last_stats.elapsed() >= Duration::from_secs(args.stats_interval.max(1)) {
            last_stats = Instant::now();
            info!(
                "node {node}: {}; {}",
                describe(&counters),
                pipeline.describe()
            );
        }
    }
    info!("node {node}: stopping: handing its shards back");
    let _ = rt.block_on(leasing);
    // Every consumer has stopped: the feeder's queue closes once the runtime drops the
    // last sender, which the leaser held.
    let _ = feeding.join();
    let done = pipeline.finish(SystemTime::now());
    info!("node {node}: {}; {}", describe(&counters), done.describe);
    Ok(())
}

fn describe(c: &NodeCounters) -> String {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "owns {} shards ({} taken, {} given back, {} lost); consumed {} records in {} batches ({} malformed, {} delivered again after a failed acknowledgement and not counted again); alarms: {} episodes continued from another node, {} events of hosts no longer held, {} not published, {} open-alarm bucket errors",
        l(&c.owned_shards),
        l(&c.shards_taken),
        l(&c.shards_given),
        l(&c.shards_lost),
        l(&c.records),
        l(&c.batches),
        l(&c.malformed),
        l(&c.redelivered_skipped),
        l(&c.episodes_continued),
        l(&c.not_owner_events),
        l(&c.alarm_publish_errors),
        l(&c.alarm_nats_errors)
    )
}

struct Leaser {
    js: jetstream::Context,
    leases: kv::Store,
    node: String,
    shards: u32,
    ttl: Duration,
    ack_wait: Duration,
    feed: tokio::sync::mpsc::Sender<Feed>,
    counters: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    owned: OwnedSet,
}

/// A shard this node owns: its lease's revision and its consumer.
struct Owned {
    revision: u64,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn lease_key(shard: u32) -> String {
    format!("shard.{shard}")
}

impl Leaser {
    async fn run(self) {
        let mut owned: BTreeMap<u32, Owned> = BTreeMap::new();
        let mut tick = tokio::time::interval(self.ttl / 3);
        let mut logged: Option<Instant> = None;
        loop {
            tick.tick().await;
            if self.stop.load(Ordering::SeqCst) {
                let handovers: Vec<_> = std::mem::take(&mut owned)
                    .into_iter()
                    .map(|(shard, o)| self.give_back(shard, o))
                    .collect();
                for h in handovers {
                    let _ = h.await;
                }
                let _ = self.leases.delete(format!("node.{}", self.node)).await;
                return;
            }
            if let Err(e) = self.round(&mut owned).await
                && logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                logged = Some(Instant::now());
                warn!("node {}: leases: {e:#}", self.node);
            }
            self.counters
                .owned_shards
                .store(owned.len() as u64, Ordering::Relaxed);
            if let Ok(mut set) = self.owned.lock() {
                *set = owned.keys().copied().collect();
            }
        }
    }

    /// One round: heartbeat, renewals, give-backs and takes. Never waits for a
    /// consumer to stop (a consumer waiting for room in the pipeline must not delay the
    /// renewals: the other leases would expire meanwhile).
    async fn round(&self, owned: &mut BTreeMap<u32, Owned>) -> Result<()> {
        let me: Bytes = self.node.clone().into_bytes().into();
        self.leases
            .put(format!("node.{}", self.node), me.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("heartbeat")?;
        // Renew; a lease that cannot be renewed was lost (expired and taken).
        let mut lost = Vec::new();
        for (shard, o) in owned.iter_mut() {
            match self
                .leases
                .update(lease_key(*shard), me.clone(), o.revision)
                .await
            {
                Ok(r) => o.revision = r,
                Err(e) => {
                    warn!(
                        "node {}: lost the lease of shard {shard} ({e}): stopping its consumer",
                        self.node
                    );
                    lost.push(*shard);
                }
            }
        }
        for shard in lost {
            if let Some(o) = owned.remove(&shard) {
                o.stop.store(true, Ordering::SeqCst);
                self.counters.shards_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Without the count of live nodes, hold what is held: no rebalancing.
        let Some(live) = self.live_nodes().await else {
            return Ok(());
        };
        let fair = (self.shards as usize).div_ceil(live.max(1));
        // Give back what is over the fair part (the highest shards first).
        while owned.len() > fair {
            let Some((&shard, _)) = owned.iter().next_back() else {
                break;
            };
            if let Some(o) = owned.remove(&shard) {
                drop(self.give_back(shard, o));
            }
        }
        // Take free shards up to the fair part, starting from this node's own offset so
        // that nodes starting together do not all race for shard 0.
        let offset = super::shard_of_name(&self.node, self.shards);
        for i in 0..self.shards {
            if owned.len() >= fair {
                break;
            }
            let shard = (offset + i) % self.shards;
            if owned.contains_key(&shard) {
                continue;
            }
            if let Ok(revision) = self.leases.create(lease_key(shard), me.clone()).await {
                info!("node {}: took shard {shard}", self.node);
                self.counters.shards_taken.fetch_add(1, Ordering::Relaxed);
                let stop = Arc::new(AtomicBool::new(false));
                let task = tokio::spawn(consume(
                    self.js.clone(),
                    shard,
                    self.ack_wait,
                    self.feed.clone(),
                    self.counters.clone(),
                    stop.clone(),
                    self.node.clone(),
                ));
                owned.insert(
                    shard,
                    Owned {
                        revision,
                        stop,
                        task,
                    },
                );
            }
        }
        Ok(())
    }

    /// Stops the shard's consumer, then frees its lease (in that order: never two
    /// consumers on one shard by this node's doing); runs on its own.
    fn give_back(&self, shard: u32, o: Owned) -> tokio::task::JoinHandle<()> {
        let (leases, node, counters) = (
            self.leases.clone(),
            self.node.clone(),
            self.counters.clone(),
        );
        tokio::spawn(async move {
            o.stop.store(true, Ordering::SeqCst);
            let _ = o.task.await;
            // Only our own lease: had it expired meanwhile, it may be another node's.
            let _ = leases
                .delete_expect_revision(lease_key(shard), Some(o.revision))
                .await;
            counters.shards_given.fetch_add(1, Ordering::Relaxed);
            info!("node {node}: gave shard {shard} back");
        })
    }

    /// Nodes with a live heartbeat, or none when the bucket cannot be read.
    async fn live_nodes(&self) -> Option<usize> {
        let mut keys = self.leases.keys().await.ok()?;
        let mut n = 0;
        while let Some(k) = keys.next().await {
            if k.ok()?.starts_with("node.") {
                n += 1;
            }
        }
        Some(n)
    }
}

/// Batches each shard consumer fetches at once.
const FETCH_BATCHES: usize = 4;
/// Batches waiting for the feeder thread (beyond the one each consumer awaits).
const FEED_QUEUE: usize = 4;
/// Batches a pipeline shard's queue holds on a detector node.
const CENTRAL_SHARD_QUEUE: usize = 8;

/// A batch on its way into the pipeline, and where to say how it went: its records'
/// count, or why it did not decode.
struct Feed {
    payload: Bytes,
    done: tokio::sync::oneshot::Sender<Result<usize, wire::WireError>>,
}

/// The one thread that decodes batches and hands their records to the pipeline (which
/// waits for room): the consumers await it instead of blocking a runtime thread, and
/// every record vector is allocated on this one thread, which keeps allocating, so the
/// memory the shard workers free comes back to it at once (vectors allocated on many
/// runtime threads, some of them idle afterwards, stayed with those threads: a node held
/// 1.3 GiB for 20,000 hosts).
fn feeder(input: Input, mut rx: tokio::sync::mpsc::Receiver<Feed>) {
    while let Some(f) = rx.blocking_recv() {
        let r = wire::decode(&f.payload).map(|(_, records)| {
            let n = records.len();
            input.emit(records, SystemTime::now());
            n
        });
        let _ = f.done.send(r);
    }
}

/// Consumes shard `shard` until `stop`: each batch decoded into the pipeline (by the
/// feeder thread), then acknowledged (awaiting the server's confirmation).
async fn consume(
    js: jetstream::Context,
    shard: u32,
    ack_wait: Duration,
    feed: tokio::sync::mpsc::Sender<Feed>,
    c: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    node: String,
) {
    let mut logged: Option<Instant> = None;
    let mut warn_once = |msg: String| {
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            logged = Some(Instant::now());
            warn!("node {node}: shard {shard}: {msg}");
        }
    };
    let mut pull: Option<consumer::Consumer<consumer::pull::Config>> = None;
    // Stream sequences of batches emitted whose acknowledgement failed.
    let mut unacked: std::collections::HashSet<u64> = Default::default();
    while !stop.load(Ordering::SeqCst) {
        let cons = match &pull {
            Some(p) => p,
            None => {
                let made = async {
                    let stream = js.get_stream(Names::FLOWS_STREAM).await?;
                    let name = Names::consumer(shard);
                    let cons = stream
                        .get_or_create_consumer(
                            &name,
                            consumer::pull::Config {
                                durable_name: Some(name.clone()),
                                filter_subject: Names::flows(shard),
                                ack_policy: consumer::AckPolicy::Explicit,
                                ack_wait,
                                max_ack_pending: 10_000,
                                ..Default::default()
                            },
                        )
                        .await?;
                    anyhow::Ok(cons)
                };
                match made.await {
                    Ok(p) => pull.insert(p),
                    Err(e) => {
                        warn_once(format!("consumer: {e:#}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        let mut batch = match cons
            .fetch()
            .max_messages(FETCH_BATCHES)
            .expires(Duration::from_millis(500))
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn_once(format!("fetch: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(m) = batch.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    warn_once(format!("message: {e}"));
                    break;
                }
            };
            let seq = m.info().map_or(0, |i| i.stream_sequence);
            if unacked.remove(&seq) {
                // Emitted already, its acknowledgement failed: acknowledge, do not count
                // it again.
                c.redelivered_skipped.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = m.double_ack().await {
                    unacked.insert(seq);
                    warn_once(format!("acknowledging: {e} (the batch comes again)"));
                }
                continue;
            }
            let (done, result) = tokio::sync::oneshot::channel();
            let sent = feed.send(Feed {
                payload: m.payload.clone(),
                done,
            });
            // The feeder is gone only when the node stops: the batch stays unacknowledged
            // and comes again to the shard's next owner.
            if sent.await.is_err() {
                return;
            }
            let Ok(decoded) = result.await else {
                return;
            };
            match decoded {
                Ok(n) => {
                    c.records.fetch_add(n as u64, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                    warn_once(format!("a batch on {} did not decode: {e}", m.subject));
                }
            }
            if let Err(e) = m.double_ack().await {
                // Bounded: beyond it, a batch whose acknowledgement keeps failing could
                // be counted twice on this node (and the counter would say so).
                if unacked.len() < 100_000 {
                    unacked.insert(seq);
                }
                warn_once(format!("acknowledging: {e} (the batch comes again)"));
            }
        }
    }
}
