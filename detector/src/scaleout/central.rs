//! A detector node (`detector central --nats URL[,URL...] --shards N`).
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
//! node's pipeline. The record stream keeps batches by age, acknowledged or not
//! ([`super::KEEP`]), so a node that takes a shard over first rebuilds the profiles the
//! previous owner held: it reads the durable's last delivered sequence D, replays the
//! shard's batches from the start of the detection window (JetStream delivery by start
//! time, an ephemeral consumer without acks) up to D, then goes on with the durable,
//! acknowledging without counting the batches up to D it delivers again (those the dead
//! node held unacknowledged: replayed already). Batches this node holds from an earlier
//! time it owned the shard (it gave the shard away and takes it back) are skipped in the
//! replay: each batch is in this node's profiles once.
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

use super::{Bus, Names, bucket, connect, ensure, wire};
use crate::detect::{AlarmEvent, AlarmState};
use crate::pipeline::{Input, Pipeline, PipelineConfig, WhenBehind, build};

/// What a `detector central` node does (the command line gives it).
#[derive(Clone, Debug)]
pub struct CentralOptions {
    /// NATS server URLs (JetStream on), comma-separated.
    pub nats: String,
    /// Replicas of the streams and buckets this node makes (None: as many as URLs, up
    /// to 3).
    pub replicas: Option<usize>,
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
    /// Flows the duplicate table remembers, over all the pipeline's workers.
    pub dedup_flows: usize,
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
    /// Takeovers' replays: records and batches taken into the pipeline from the start of
    /// the window.
    pub replayed_records: AtomicU64,
    pub replayed_batches: AtomicU64,
    /// Batches the replay skipped: this node held them already (an earlier ownership).
    pub replay_held: AtomicU64,
    /// Batches the durable delivered that were replayed already (or older than the
    /// window): acknowledged, not counted again.
    pub replayed_skipped: AtomicU64,
    /// Replays cut short by NATS errors after their retries (the profiles miss the rest
    /// of that window).
    pub replay_errors: AtomicU64,
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

/// Per shard, the stream sequences whose batches this node's pipeline holds: one range
/// per time it owned the shard (every batch of the shard between the two ends is in its
/// profiles). A replay skips them.
type Held = Arc<std::sync::Mutex<std::collections::HashMap<u32, Vec<HeldRange>>>>;

/// Ranges of [`Held`] kept per shard (the oldest go first; a range older than the
/// window no replay reaches anyway).
const HELD_RANGES: usize = 16;

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

/// Asks the kernel for no transparent huge pages in this process from now on
/// (`PR_SET_THP_DISABLE`): a node holds tens of thousands of small per-host tables spread
/// over its heap, and a huge page made resident for a few of them holds 2 MiB
/// (`cargo xtask bench scaleout`: about 3 KB a host of 27 at 20,000 hosts; the records'
/// rate did not drop). Says what it did, in a line for the log.
fn no_huge_pages() -> std::result::Result<&'static str, std::io::Error> {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and changes a flag of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok("transparent huge pages off for this process (PR_SET_THP_DISABLE)")
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn run(args: &CentralOptions) -> Result<()> {
    match no_huge_pages() {
        Ok(what) => info!("{what}"),
        Err(e) => warn!(
            "could not turn transparent huge pages off for this process: {e} (the node holds more memory than it uses)"
        ),
    }
    let (detect, mut alarms) = build::detection(&args.detect)?;
    let window = detect.window;
    let node = key_safe(&args.node.clone().unwrap_or_else(default_node));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let bus = {
        let urls = Bus::new(&args.nats, 1).list().len();
        Bus::new(&args.nats, args.replicas.unwrap_or(urls.min(3)))
    };
    info!(
        "node {node}: connecting to {} (streams and buckets it makes: {} replicas)",
        bus.urls, bus.replicas
    );
    let js = rt.block_on(connect(&bus));
    let want_ttl = Duration::from_secs(args.lease_secs);
    // NATS may come up after the node: keep trying, except on a setting no retry fixes.
    let (leases, open, ttl, keep) = rt.block_on(async {
        let mut logged: Option<Instant> = None;
        loop {
            let setup = async {
                ensure(&js, args.shards, bus.replicas).await?;
                let leases = bucket(&js, Names::LEASE_BUCKET, Some(want_ttl), bus.replicas).await?;
                let open =
                    bucket(&js, Names::ALARM_BUCKET, Some(OPEN_ALARM_TTL), bus.replicas).await?;
                let keep = js
                    .get_stream(Names::RECORDS_STREAM)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .cached_info()
                    .config
                    .max_age;
                let ttl = leases
                    .status()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .max_age();
                Ok::<_, super::EnsureError>((leases, open, ttl, keep))
            };
            match setup.await {
                Ok(x) => break Ok(x),
                Err(super::EnsureError::ShardMismatch(m)) => break Err(anyhow::anyhow!(m)),
                Err(e) => {
                    if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        logged = Some(Instant::now());
                        warn!("node {node}: NATS {}: {e} (retrying)", bus.urls);
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
    // A takeover replays the window: what the stream no longer keeps cannot be.
    let replay = if !keep.is_zero() && keep < window {
        warn!(
            "node {node}: the record stream keeps {} s, the detection window is {} s: a takeover replays the last {} s only",
            keep.as_secs(),
            window.as_secs(),
            keep.as_secs()
        );
        keep
    } else {
        window
    };
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
    cfg.dedup_flows = args.dedup_flows;
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
        replay,
        feed,
        counters: counters.clone(),
        stop: stop.clone(),
        owned,
        held: Held::default(),
        stopping: Default::default(),
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
        "node {node}: detecting over {} shards (lease {} s); duplicate table: {} flows",
        args.shards,
        args.lease_secs,
        pipeline.dedup_capacity()
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
        "owns {} shards ({} taken, {} given back, {} lost); consumed {} records in {} batches ({} malformed, {} delivered again after a failed acknowledgement and not counted again); takeovers replayed {} records in {} batches ({} batches held already, {} delivered again after the replay and not counted again, {} replays cut short); alarms: {} episodes continued from another node, {} events of hosts no longer held, {} not published, {} open-alarm bucket errors",
        l(&c.owned_shards),
        l(&c.shards_taken),
        l(&c.shards_given),
        l(&c.shards_lost),
        l(&c.records),
        l(&c.batches),
        l(&c.malformed),
        l(&c.redelivered_skipped),
        l(&c.replayed_records),
        l(&c.replayed_batches),
        l(&c.replay_held),
        l(&c.replayed_skipped),
        l(&c.replay_errors),
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
    /// How far back a takeover replays (the detection window, or what the stream keeps).
    replay: Duration,
    feed: tokio::sync::mpsc::Sender<Feed>,
    counters: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    owned: OwnedSet,
    held: Held,
    /// Consumers of shards whose lease was lost, until they have stopped.
    stopping: std::sync::Mutex<BTreeMap<u32, tokio::task::JoinHandle<()>>>,
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
                // From here the node speaks for no shard (what the pipeline still says
                // at its end goes to the local sinks only).
                if let Ok(mut set) = self.owned.lock() {
                    set.clear();
                }
                self.counters.owned_shards.store(0, Ordering::Relaxed);
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
                    if let Some(r) = self.still_mine(*shard, &me).await {
                        o.revision = r;
                        continue;
                    }
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
                // Not taken again by this node before this consumer has stopped (two
                // of its consumers of one shard could count a batch twice).
                if let Ok(mut st) = self.stopping.lock() {
                    st.insert(shard, o.task);
                }
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
            if let Ok(mut st) = self.stopping.lock() {
                st.retain(|_, t| !t.is_finished());
                if st.contains_key(&shard) {
                    continue;
                }
            }
            if let Some(revision) = self.claim(shard, &me).await {
                info!("node {}: took shard {shard}", self.node);
                self.counters.shards_taken.fetch_add(1, Ordering::Relaxed);
                let stop = Arc::new(AtomicBool::new(false));
                let task = tokio::spawn(
                    ShardConsumer {
                        js: self.js.clone(),
                        shard,
                        ack_wait: self.ack_wait,
                        replay: self.replay,
                        feed: self.feed.clone(),
                        c: self.counters.clone(),
                        stop: stop.clone(),
                        node: self.node.clone(),
                        held: self.held.clone(),
                    }
                    .run(),
                );
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

    /// Takes a shard's lease if it is free: its key missing, or not renewed for twice the
    /// lease time by the server's clock (the server expires entries late after the
    /// bucket's leader changed: a dead node's leases were seen to outlive their age by
    /// 15 s), replaced on its revision (so only if no one renewed it meanwhile).
    async fn claim(&self, shard: u32, me: &Bytes) -> Option<u64> {
        let key = lease_key(shard);
        match self.leases.create(&key, me.clone()).await {
            Ok(r) => return Some(r),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        let en = self.leases.entry(&key).await.ok()??;
        let age = SystemTime::now()
            .duration_since(SystemTime::from(en.created))
            .ok()?;
        if age < self.ttl * 2 {
            return None;
        }
        let r = self
            .leases
            .update(&key, me.clone(), en.revision)
            .await
            .ok()?;
        info!(
            "node {}: the lease of shard {shard} ({}) was not renewed for {:.1} s: taking it",
            self.node,
            String::from_utf8_lossy(&en.value),
            age.as_secs_f64()
        );
        Some(r)
    }

    /// After a renewal refused for its revision: the lease's new revision when the entry
    /// still names this node (a renewal whose answer was lost when a server went, during
    /// a leader change, had landed), renewed again under it, or when no one holds the
    /// key (it expired while the cluster was electing a leader) and this node gets it
    /// back; None when another node holds it (or NATS does not answer). The shard's
    /// consumer goes on: no replay, nothing counted again.
    async fn still_mine(&self, shard: u32, me: &Bytes) -> Option<u64> {
        let key = lease_key(shard);
        match self.leases.entry(&key).await.ok()? {
            Some(en) if en.operation == kv::Operation::Put => {
                if en.value != *me {
                    return None;
                }
                self.leases.update(&key, me.clone(), en.revision).await.ok()
            }
            _ => self.leases.create(&key, me.clone()).await.ok(),
        }
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
        // A key written again while the listing runs comes twice: count names, not
        // keys (counted twice, a node gave shards back, and took them again next round).
        let mut nodes = std::collections::HashSet::new();
        while let Some(k) = keys.next().await {
            let k = k.ok()?;
            if k.starts_with("node.") {
                nodes.insert(k);
            }
        }
        Some(nodes.len())
    }
}

/// Flows a node's duplicate table remembers by default (`--dedup-flows`): 16 MiB, a
/// quarter of an agent's ([`crate::pipeline::DEDUP_MAX_FLOWS`]). A node marks only the
/// copies that reach it through two edges (each edge marked its own sources' copies
/// first), and its memory goes to the hosts' profiles: at 20,000 hosts the agent's 64 MiB
/// table was 3.4 KB a host of the 20 a node may hold.
pub const DEDUP_FLOWS: usize = 1 << 20;

/// Batches each shard consumer fetches at once: one, so that a batch (up to 2,000
/// records, 256 KB) waits in the node only while its consumer hands it to the feeder;
/// the shards' consumers fetch side by side. With four, a node's peak in `bench
/// scaleout` (16 shards, 20,000 hosts) was 19.5 to 20.4 KB a host instead of 19.0 to
/// 19.7 (the faster it ingested, the higher).
const FETCH_BATCHES: usize = 1;
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

/// Batches a takeover's replay fetches at once.
const REPLAY_FETCH: usize = 64;
/// Times a replay cut short by NATS starts again (from the batch after the last one it
/// took) before it gives up.
const REPLAY_RETRIES: u32 = 3;

/// One of [`Held`]'s ranges: an ownership period's, by its id.
#[derive(Clone, Copy, Debug)]
struct HeldRange {
    id: u64,
    lo: u64,
    hi: u64,
}

impl HeldRange {
    fn contains(&self, seq: u64) -> bool {
        self.lo <= seq && seq <= self.hi
    }
}

/// Numbers ownership periods (unique in the process).
static PERIODS: AtomicU64 = AtomicU64::new(1);

/// Starts an ownership period of `shard`: its range of held batches, empty; the oldest
/// range goes beyond [`HELD_RANGES`]. Returns the period's id.
fn open_period(held: &Held, shard: u32) -> u64 {
    let id = PERIODS.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut h) = held.lock() {
        let v = h.entry(shard).or_default();
        v.push(HeldRange {
            id,
            lo: u64::MAX,
            hi: 0,
        });
        if v.len() > HELD_RANGES {
            v.remove(0);
        }
    }
    id
}

/// The batch `seq` of `shard` is in the pipeline: period `id`'s range grows to it.
fn note(held: &Held, shard: u32, id: u64, seq: u64) {
    if let Ok(mut h) = held.lock()
        && let Some(r) = h
            .get_mut(&shard)
            .and_then(|v| v.iter_mut().rev().find(|r| r.id == id))
    {
        r.lo = r.lo.min(seq);
        r.hi = r.hi.max(seq);
    }
}

/// Whether the pipeline holds the batch `seq` of `shard` (from any ownership period).
fn holds(held: &Held, shard: u32, seq: u64) -> bool {
    held.lock().is_ok_and(|h| {
        h.get(&shard)
            .is_some_and(|v| v.iter().any(|r| r.contains(seq)))
    })
}

/// How a replay ended.
enum Replayed {
    /// Up to the durable's last delivered batch, or the end of the stream.
    Done,
    /// Cut short by NATS errors (the profiles miss the rest of the window).
    Partial,
    /// The feeder is gone: the node is stopping.
    Gone,
}

/// A replay's running tally.
#[derive(Default)]
struct Tally {
    records: u64,
    batches: u64,
    held: u64,
    malformed: u64,
    /// The sequence after the last batch seen (where a retry starts).
    next: Option<u64>,
}

/// The consumer of one shard this node owns, until `stop`.
struct ShardConsumer {
    js: jetstream::Context,
    shard: u32,
    ack_wait: Duration,
    replay: Duration,
    feed: tokio::sync::mpsc::Sender<Feed>,
    c: Arc<NodeCounters>,
    stop: Arc<AtomicBool>,
    node: String,
    held: Held,
}

impl ShardConsumer {
    /// Hands a batch to the feeder thread: its records' count, or why it did not decode;
    /// None when the feeder is gone (the node stops).
    async fn emit(&self, payload: Bytes) -> Option<Result<usize, wire::WireError>> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.feed.send(Feed { payload, done }).await.ok()?;
        result.await.ok()
    }

    /// Starts an ownership period of the shard (see [`open_period`]).
    fn open_period(&self) -> u64 {
        open_period(&self.held, self.shard)
    }

    /// The batch `seq` is in the pipeline (see [`note`]).
    fn note(&self, id: u64, seq: u64) {
        note(&self.held, self.shard, id, seq);
    }

    /// Whether the pipeline holds the batch `seq` (see [`holds`]).
    fn holds(&self, seq: u64) -> bool {
        holds(&self.held, self.shard, seq)
    }

    /// Replays the shard's batches from the start of the window up to `upto` (the
    /// durable's last delivered sequence) into the pipeline, skipping those this node
    /// holds; retried from where it stopped after a NATS error.
    async fn replay(&self, stream: &jetstream::stream::Stream, upto: u64, period: u64) -> Replayed {
        let started = Instant::now();
        let from = SystemTime::now()
            .checked_sub(self.replay)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut t = Tally::default();
        let mut errors = 0;
        let end = loop {
            let policy = match t.next {
                None => consumer::DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::from(from),
                },
                Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
            };
            match self.replay_from(stream, policy, upto, period, &mut t).await {
                Ok(r) => break Some(r),
                Err(e) => {
                    errors += 1;
                    warn!(
                        "node {}: shard {}: replay: {e:#}{}",
                        self.node,
                        self.shard,
                        if errors > REPLAY_RETRIES {
                            " (giving up: the profiles miss the rest of the window)"
                        } else {
                            " (retrying)"
                        }
                    );
                    if errors > REPLAY_RETRIES {
                        self.c.replay_errors.fetch_add(1, Ordering::Relaxed);
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        self.c
            .replayed_records
            .fetch_add(t.records, Ordering::Relaxed);
        self.c
            .replayed_batches
            .fetch_add(t.batches, Ordering::Relaxed);
        self.c.replay_held.fetch_add(t.held, Ordering::Relaxed);
        info!(
            "node {}: shard {}: replayed {} records in {} batches from the last {} s (up to stream sequence {upto}; {} batches held already, {} malformed) in {} ms",
            self.node,
            self.shard,
            t.records,
            t.batches,
            self.replay.as_secs(),
            t.held,
            t.malformed,
            started.elapsed().as_millis()
        );
        end.unwrap_or(Replayed::Partial)
    }

    /// One attempt of [`Self::replay`], from `policy`'s start.
    async fn replay_from(
        &self,
        stream: &jetstream::stream::Stream,
        policy: consumer::DeliverPolicy,
        upto: u64,
        period: u64,
        t: &mut Tally,
    ) -> Result<Replayed> {
        let mut cons = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: Names::records(self.shard),
                deliver_policy: policy,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("making the replay's consumer")?;
        let name = cons.cached_info().name.clone();
        let left = cons.cached_info().num_pending;
        let r = self.replay_messages(&mut cons, left, upto, period, t).await;
        // It would go by itself after a minute without use.
        let _ = stream.delete_consumer(&name).await;
        r
    }

    async fn replay_messages(
        &self,
        cons: &mut consumer::Consumer<consumer::pull::Config>,
        mut left: u64,
        upto: u64,
        period: u64,
        t: &mut Tally,
    ) -> Result<Replayed> {
        while left > 0 {
            let mut batch = cons
                .fetch()
                .max_messages(REPLAY_FETCH)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("fetching")?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                got += 1;
                let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                if seq > upto {
                    return Ok(Replayed::Done);
                }
                if self.holds(seq) {
                    t.held += 1;
                } else {
                    match self.emit(m.payload.clone()).await {
                        None => return Ok(Replayed::Gone),
                        Some(Ok(n)) => {
                            t.records += n as u64;
                            t.batches += 1;
                        }
                        // Counted by the node that consumed it first.
                        Some(Err(_)) => t.malformed += 1,
                    }
                }
                self.note(period, seq);
                t.next = Some(seq + 1);
                left = pending;
                if seq == upto || pending == 0 {
                    return Ok(Replayed::Done);
                }
            }
            if got == 0 {
                // Nothing came although the server counted some: the stream aged them
                // out meanwhile.
                return Ok(Replayed::Done);
            }
        }
        Ok(Replayed::Done)
    }

    /// Consumes the shard until `stop`: first the replay of the window up to what the
    /// durable delivered before, then each batch the durable delivers, decoded into the
    /// pipeline (by the feeder thread) and acknowledged (awaiting the server's
    /// confirmation).
    async fn run(self) {
        let (shard, node) = (self.shard, self.node.clone());
        let mut logged: Option<Instant> = None;
        let mut warn_once = |msg: String| {
            if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                logged = Some(Instant::now());
                warn!("node {node}: shard {shard}: {msg}");
            }
        };
        let mut period = self.open_period();
        let mut pull: Option<consumer::Consumer<consumer::pull::Config>> = None;
        // The durable's last delivered batch when this node took the shard: batches up to
        // it are replayed (or older than the window), never counted again.
        let mut floor: Option<u64> = None;
        // Stream sequences of batches emitted whose acknowledgement failed.
        let mut unacked: std::collections::HashSet<u64> = Default::default();
        while !self.stop.load(Ordering::SeqCst) {
            let cons = match &pull {
                Some(p) => p,
                None => {
                    let made = async {
                        let stream = self.js.get_stream(Names::RECORDS_STREAM).await?;
                        let name = Names::consumer(shard);
                        let mut cons = stream
                            .get_or_create_consumer(
                                &name,
                                consumer::pull::Config {
                                    durable_name: Some(name.clone()),
                                    filter_subject: Names::records(shard),
                                    ack_policy: consumer::AckPolicy::Explicit,
                                    ack_wait: self.ack_wait,
                                    max_ack_pending: 10_000,
                                    ..Default::default()
                                },
                            )
                            .await?;
                        let delivered = cons.info().await?.delivered.stream_sequence;
                        anyhow::Ok((stream, cons, delivered))
                    };
                    match made.await {
                        Ok((stream, p, delivered)) => {
                            if floor.is_none() {
                                if delivered > 0 {
                                    match self.replay(&stream, delivered, period).await {
                                        Replayed::Done => {}
                                        // The range must not claim what the replay missed.
                                        Replayed::Partial => period = self.open_period(),
                                        Replayed::Gone => return,
                                    }
                                }
                                floor = Some(delivered);
                            }
                            pull.insert(p)
                        }
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
                if seq <= floor.unwrap_or(0) {
                    // Delivered to the previous owner, which died before acknowledging:
                    // the replay took it in.
                    self.c.replayed_skipped.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = m.double_ack().await {
                        warn_once(format!("acknowledging: {e} (the batch comes again)"));
                    }
                    continue;
                }
                if unacked.remove(&seq) {
                    // Emitted already, its acknowledgement failed: acknowledge, do not count
                    // it again.
                    self.c.redelivered_skipped.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = m.double_ack().await {
                        unacked.insert(seq);
                        warn_once(format!("acknowledging: {e} (the batch comes again)"));
                    }
                    continue;
                }
                // The feeder is gone only when the node stops: the batch stays
                // unacknowledged and comes again to the shard's next owner.
                let Some(decoded) = self.emit(m.payload.clone()).await else {
                    return;
                };
                self.note(period, seq);
                match decoded {
                    Ok(n) => {
                        self.c.records.fetch_add(n as u64, Ordering::Relaxed);
                        self.c.batches.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.c.malformed.fetch_add(1, Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_sizes_its_duplicate_table_by_dedup_flows() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut args = vec!["detector", "central", "--nats", "nats://127.0.0.1:4222"];
            args.extend_from_slice(extra);
            crate::cli::Cli::try_parse_from(args).map(|c| match c.command {
                crate::cli::Command::Central(a) => a.options(),
                _ => panic!("not `central`"),
            })
        };
        // 16 MiB of 16-byte slots by default.
        assert_eq!(parse(&[]).unwrap().dedup_flows, 1 << 20);
        let o = parse(&["--dedup-flows", "10000"]).unwrap();
        assert_eq!(o.dedup_flows, 10_000);
        assert!(parse(&["--dedup-flows", "10"]).is_err());
        // Two workers of 5,000 flows each: 1,250 buckets of four, rounded up to 2,048.
        let mut cfg = PipelineConfig::new(Some(2), WhenBehind::Wait);
        cfg.dedup_flows = o.dedup_flows;
        let p = Pipeline::new(
            &cfg,
            Vec::new(),
            crate::detect::DetectConfig::default(),
            crate::export::alarms::AlarmSink::open(None).unwrap(),
        );
        assert_eq!(p.dedup_capacity(), 2 * 2048 * 4);
        p.finish(SystemTime::now());
    }

    #[test]
    fn held_ranges_cover_each_ownership_period_and_nothing_between() {
        let held = Held::default();
        // Shard 3 owned, its batches 10 to 20 taken in (replayed or consumed).
        let first = open_period(&held, 3);
        assert!(!holds(&held, 3, 10), "an empty period holds nothing");
        for seq in [10, 12, 15, 20] {
            note(&held, 3, first, seq);
        }
        // Given away; others consumed 21 to 40; taken back: its replay skips 10..=20.
        let second = open_period(&held, 3);
        assert!(holds(&held, 3, 10) && holds(&held, 3, 17) && holds(&held, 3, 20));
        assert!(!holds(&held, 3, 9) && !holds(&held, 3, 21) && !holds(&held, 3, 40));
        assert!(
            !holds(&held, 4, 15),
            "another shard's sequences are not held"
        );
        for seq in 21..=45 {
            note(&held, 3, second, seq);
        }
        assert!(holds(&held, 3, 40) && !holds(&held, 3, 46));
        // Each period's notes grow its own range only.
        let ranges: Vec<(u64, u64)> = held.lock().unwrap()[&3]
            .iter()
            .map(|r| (r.lo, r.hi))
            .collect();
        assert_eq!(ranges, [(10, 20), (21, 45)]);
    }

    #[test]
    fn the_oldest_held_range_goes_first() {
        let held = Held::default();
        let oldest = open_period(&held, 0);
        note(&held, 0, oldest, 1);
        for i in 0..HELD_RANGES as u64 {
            let id = open_period(&held, 0);
            note(&held, 0, id, 100 + i);
        }
        assert!(!holds(&held, 0, 1), "the oldest range was dropped");
        assert!(holds(&held, 0, 100) && holds(&held, 0, 100 + HELD_RANGES as u64 - 1));
        assert_eq!(held.lock().unwrap()[&0].len(), HELD_RANGES);
    }
}
