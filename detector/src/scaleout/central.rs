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

/// `detector central`.
#[derive(Debug, clap::Args)]
pub struct CentralArgs {
    /// NATS server URL (JetStream on), e.g. nats://127.0.0.1:4222.
    #[arg(long, value_name = "URL")]
    pub nats: String,

    /// Shards the flows are split in: the same count on every edge and node.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub shards: u32,

    /// This node's name in leases and logs (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// A node that stops renewing its leases loses its shards after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub lease_secs: u64,

    /// A batch delivered and not acknowledged (its node died) is delivered again after
    /// SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ack_wait_secs: u64,

    /// Log the node's counters every SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,

    #[command(flatten)]
    pub detect: crate::cli::DetectArgs,
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

/// Runs the pipeline's events through the open-alarm bucket (one alarm per host and
/// episode across nodes) and publishes them to the `alarms` subject.
struct Relay {
    js: jetstream::Context,
    open: kv::Store,
    node: String,
    rt: tokio::runtime::Handle,
    counters: Arc<NodeCounters>,
}

impl Relay {
    fn apply(&self, events: &[AlarmEvent]) -> Vec<AlarmEvent> {
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                let mut e = e.clone();
                let key = alarm_key(&e);
                let mine = OpenAlarm {
                    id: e.id.clone(),
                    first_seen: e.first_seen.clone(),
                    node: self.node.clone(),
                };
                let value: Bytes = serde_json::to_vec(&mine).unwrap_or_default().into();
                let held = match e.state {
                    AlarmState::Raised => match self.open.create(&key, value).await {
                        Ok(_) => None,
                        Err(_) => self.held(&key).await,
                    },
                    _ => self.held(&key).await,
                };
                if let Some(h) = held.filter(|h| h.id != e.id) {
                    // Another node raised this episode: carry on with its alarm.
                    if e.state == AlarmState::Raised {
                        e.state = AlarmState::Updated;
                    }
                    e.id = h.id;
                    e.first_seen = h.first_seen;
                }
                if e.state == AlarmState::Cleared {
                    let _ = self.open.delete(&key).await;
                }
                match serde_json::to_vec(&e) {
                    Ok(json) => {
                        let sent = async {
                            self.js
                                .publish(Names::ALARMS_SUBJECT, json.into())
                                .await?
                                .await?;
                            anyhow::Ok(())
                        };
                        if let Err(err) = sent.await {
                            self.counters
                                .alarm_publish_errors
                                .fetch_add(1, Ordering::Relaxed);
                            warn!(
                                "publishing alarm {} to {}: {err:#}",
                                e.id,
                                Names::ALARMS_SUBJECT
                            );
                        }
                    }
                    Err(err) => warn!("alarm {}: {err}", e.id),
                }
                out.push(e);
            }
            out
        })
    }

    async fn held(&self, key: &str) -> Option<OpenAlarm> {
        let v = self.open.get(key).await.ok().flatten()?;
        serde_json::from_slice(&v).ok()
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

pub fn run(args: &CentralArgs) -> Result<()> {
    let (detect, mut alarms) = build::detection(&args.detect)?;
    let node = key_safe(&args.node.clone().unwrap_or_else(default_node));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    info!("node {node}: connecting to {}", args.nats);
    let js = rt.block_on(connect(&args.nats));
    rt.block_on(ensure(&js, args.shards))?;
    let ttl = Duration::from_secs(args.lease_secs);
    let leases = rt.block_on(bucket(&js, Names::LEASE_BUCKET, Some(ttl)))?;
    let open = rt.block_on(bucket(&js, Names::ALARM_BUCKET, None))?;
    let counters = Arc::new(NodeCounters::default());
    let relay = Relay {
        js: js.clone(),
        open,
        node: node.clone(),
        rt: rt.handle().clone(),
        counters: counters.clone(),
    };
    alarms.relay = Some(Box::new(move |events: &[AlarmEvent]| relay.apply(events)));
    let mut pipeline = Pipeline::new(
        &PipelineConfig::new(None, WhenBehind::Wait),
        Vec::new(),
        detect,
        alarms,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let leaser = Leaser {
        js: js.clone(),
        leases,
        node: node.clone(),
        shards: args.shards,
        ttl,
        ack_wait: Duration::from_secs(args.ack_wait_secs),
        input: pipeline.input(),
        counters: counters.clone(),
        stop: stop.clone(),
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
    let done = pipeline.finish(SystemTime::now());
    info!("node {node}: {}; {}", describe(&counters), done.describe);
    Ok(())
}

fn describe(c: &NodeCounters) -> String {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "owns {} shards ({} taken, {} given back, {} lost); consumed {} records in {} batches ({} malformed); {} alarm events not published",
        l(&c.owned_shards),
        l(&c.shards_taken),
        l(&c.shards_given),
        l(&c.shards_lost),
        l(&c.records),
        l(&c.batches),
        l(&c.malformed),
        l(&c.alarm_publish_errors)
    )
}

struct Leaser {
    js: jetstream::Context,
    leases: kv::Store,
    node: String,
    shards: u32,
    ttl: Duration,
    ack_wait: Duration,
    input: Input,
    counters: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
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
                for (shard, o) in std::mem::take(&mut owned) {
                    self.give_back(shard, o).await;
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
        }
    }

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
                let _ = o.task.await;
                self.counters.shards_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        let live = self.live_nodes().await.max(1);
        let fair = (self.shards as usize).div_ceil(live);
        // Give back what is over the fair part (the highest shards first).
        while owned.len() > fair {
            let Some((&shard, _)) = owned.iter().next_back() else {
                break;
            };
            if let Some(o) = owned.remove(&shard) {
                self.give_back(shard, o).await;
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
                    self.input.clone(),
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

    async fn give_back(&self, shard: u32, o: Owned) {
        o.stop.store(true, Ordering::SeqCst);
        let _ = o.task.await;
        let _ = self.leases.delete(lease_key(shard)).await;
        self.counters.shards_given.fetch_add(1, Ordering::Relaxed);
        info!("node {}: gave shard {shard} back", self.node);
    }

    async fn live_nodes(&self) -> usize {
        let Ok(mut keys) = self.leases.keys().await else {
            return 1;
        };
        let mut n = 0;
        while let Some(k) = keys.next().await {
            if k.is_ok_and(|k| k.starts_with("node.")) {
                n += 1;
            }
        }
        n
    }
}

/// Consumes shard `shard` until `stop`: each batch decoded into the pipeline, then
/// acknowledged (awaiting the server's confirmation).
async fn consume(
    js: jetstream::Context,
    shard: u32,
    ack_wait: Duration,
    input: Input,
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
            .max_messages(64)
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
            match wire::decode(&m.payload) {
                Ok((_, records)) => {
                    c.records.fetch_add(records.len() as u64, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    let input = input.clone();
                    // The pipeline waits for room: never on a runtime thread's time.
                    tokio::task::block_in_place(|| input.emit(records, SystemTime::now()));
                }
                Err(e) => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                    warn_once(format!("a batch on {} did not decode: {e}", m.subject));
                }
            }
            if let Err(e) = m.double_ack().await {
                warn_once(format!("acknowledging: {e} (the batch comes again)"));
            }
        }
    }
}
