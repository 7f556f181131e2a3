//! The pipeline every record goes through, under `run` and `replay` alike:
//!
//! ```text
//! sources (meter drain, NetFlow decoder threads, replay)
//!     │  Input::emit: partition by internal host
//!     ▼
//! shard workers 1..N (duplicate marking + detection engine, one thread each)
//!     │  records, marked
//!     ▼
//! sink thread (NetFlow v9 export, JSON lines)
//! ```
//!
//! A host's records always reach the same shard (a flow and its copies from other
//! sources involve the same internal host), so duplicate marks and profiles are exactly
//! those one engine fed every record would build. Evaluations run in two phases over all
//! shards, so that the network-wide "top 10 senders" rule sees every shard's bytes (see
//! [`crate::detect::TopSenders`]). A property test holds a sharded pipeline equal to one
//! shard: same records, same alarm events.
//!
//! Channels are bounded. Under `run`, a source never waits behind scoring: when a shard's
//! queue is full, its records go straight to the sinks (exported, but neither checked for
//! duplicates nor profiled), and that is counted and logged. `replay` waits instead.

pub mod build;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::warn;

use crate::detect::detail::HostDetail;
use crate::detect::evidence::Verdict;
use crate::detect::{AlarmEvent, DetectConfig, Engine, EngineStats, EvalSchedule, TopSenders};
use crate::export::Sink;
use crate::export::alarms::AlarmSink;
use crate::flow::FlowRecord;
use crate::flow::dedup::{Dedup, DedupStats};

/// How long the duplicate marker remembers a flow after its last record.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Flows the duplicate marker tracks at most (over all shards).
pub const DEDUP_MAX_FLOWS: usize = 4_000_000;
/// Batches a shard's queue holds before it counts as behind (by default).
pub const SHARD_QUEUE: usize = 256;
/// Batches the sink thread's queue holds (shards wait when it is full).
const SINK_QUEUE: usize = 1024;
/// How long a finishing pipeline lets the webhook's queue drain.
const WEBHOOK_DRAIN: Duration = Duration::from_secs(5);
/// Hosts whose every rule value a finished pipeline reports (`replay` prints them).
pub const EXPLAINED_HOSTS: usize = 10;

/// What a source does when a shard's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenBehind {
    /// Send the records straight to the sinks, unmarked and unprofiled, and count them
    /// (`run`: the meter's drain and the NetFlow listeners never wait behind scoring).
    Shed,
    /// Wait for room (`replay`, tests: nothing may be skipped).
    Wait,
}

/// Pipeline settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Shard worker threads (at least 1).
    pub workers: usize,
    pub when_behind: WhenBehind,
    /// Flows the duplicate marker tracks, over all shards.
    pub dedup_flows: usize,
    /// Batches a shard's queue holds before it counts as behind (the sources' batches:
    /// a few hundred records from the meter, thousands from an edge).
    pub shard_queue: usize,
}

impl PipelineConfig {
    /// `workers` shards (None: one per CPU).
    pub fn new(workers: Option<usize>, when_behind: WhenBehind) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            workers: workers.unwrap_or(cpus).max(1),
            when_behind,
            dedup_flows: DEDUP_MAX_FLOWS,
            shard_queue: SHARD_QUEUE,
        }
    }
}

/// Counters of the sources' side, shared by every [`Input`].
#[derive(Default)]
struct InputCounters {
    records: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    /// Records sent straight to the sinks because their shard was behind.
    shed: AtomicU64,
}

enum ToShard {
    Records(Vec<FlowRecord>, SystemTime),
    Expire(SystemTime),
    Senders(SyncSender<Vec<crate::detect::SenderEntry>>),
    Evaluate {
        now: SystemTime,
        top: Arc<TopSenders>,
        reply: SyncSender<ShardReport>,
    },
    /// A reloaded configuration (the shard's share of the bounded tables).
    Reconfigure(Box<DetectConfig>),
    /// The shard's `n` highest-scored hosts, evaluated in full.
    Explain {
        top: Arc<TopSenders>,
        n: usize,
        reply: SyncSender<Vec<(IpAddr, Verdict)>>,
    },
    /// The same and up to `alarmed` alarmed hosts beyond them, each with its drill-down.
    Detail {
        top: Arc<TopSenders>,
        n: usize,
        alarmed: usize,
        reply: SyncSender<Vec<(IpAddr, Verdict, HostDetail)>>,
    },
}

enum ToSinks {
    Records(Vec<FlowRecord>, SystemTime),
    Describe(SyncSender<Vec<String>>),
    Counters(SyncSender<Vec<crate::export::SinkCounters>>),
    /// Open output files again (SIGHUP, after log rotation).
    Reopen,
}

/// What a shard tells after an evaluation.
#[derive(Default)]
struct ShardReport {
    events: Vec<AlarmEvent>,
    /// Its ten highest scores.
    scores: Vec<(IpAddr, f64, Option<&'static str>)>,
    dedup: DedupStats,
    dedup_capacity: usize,
    engine: EngineStats,
    hosts: usize,
    max_hosts: usize,
    /// Bytes its engine's and duplicate marker's tables hold on the heap.
    table_bytes: usize,
}

/// Where sources hand their records over: cheap to clone, one per source thread.
#[derive(Clone)]
pub struct Input {
    shards: Arc<[SyncSender<ToShard>]>,
    sinks: SyncSender<ToSinks>,
    /// The configuration records are routed by (internal networks); a reload swaps it.
    route: Arc<std::sync::RwLock<Arc<DetectConfig>>>,
    counters: Arc<InputCounters>,
    when_behind: WhenBehind,
    /// When shedding was last logged (ms since the pipeline started), to log at most
    /// once every few seconds.
    shed_logged: Arc<AtomicU64>,
    started: Instant,
}

impl crate::flow::Emit for Input {
    fn emit(&self, records: Vec<FlowRecord>, now: SystemTime) {
        Input::emit(self, records, now);
    }
}

impl Input {
    /// Hands records over (possibly none: the sinks still get `now`, for their periodic
    /// work such as a template refresh).
    pub fn emit(&self, records: Vec<FlowRecord>, now: SystemTime) {
        let c = &self.counters;
        // Flow starts and growth (live flows) go to detection only: not counted as
        // records. An exporter may claim any count: the totals saturate.
        let (n, p, b) = records.iter().filter(|r| !r.live.detection_only()).fold(
            (0u64, 0u64, 0u64),
            |(n, p, b), r| {
                (
                    n + 1,
                    p.saturating_add(r.est_packets()),
                    b.saturating_add(r.est_bytes()),
                )
            },
        );
        c.records.fetch_add(n, Ordering::Relaxed);
        c.packets.fetch_add(p, Ordering::Relaxed);
        c.bytes.fetch_add(b, Ordering::Relaxed);
        if records.is_empty() {
            let _ = self.sinks.send(ToSinks::Records(records, now));
            return;
        }
        let n = self.shards.len();
        if n == 1 {
            self.to_shard(0, records, now);
            return;
        }
        let route = self.route.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Each part sized once (a part grown record by record is copied at every step).
        let to: Vec<u32> = records
            .iter()
            .map(|r| shard_of(&route, r, n) as u32)
            .collect();
        let mut sizes = vec![0usize; n];
        for &i in &to {
            sizes[i as usize] += 1;
        }
        let mut parts: Vec<Vec<FlowRecord>> = sizes.into_iter().map(Vec::with_capacity).collect();
        for (r, i) in records.into_iter().zip(to) {
            parts[i as usize].push(r);
        }
        for (i, part) in parts.into_iter().enumerate() {
            if !part.is_empty() {
                self.to_shard(i, part, now);
            }
        }
    }

    fn to_shard(&self, i: usize, records: Vec<FlowRecord>, now: SystemTime) {
        let msg = ToShard::Records(records, now);
        let msg = match self.when_behind {
            WhenBehind::Wait => {
                let _ = self.shards[i].send(msg);
                return;
            }
            WhenBehind::Shed => match self.shards[i].try_send(msg) {
                Ok(()) => return,
                Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => m,
            },
        };
        let ToShard::Records(mut records, now) = msg else {
            unreachable!("a records message came back")
        };
        // Flow starts are for detection only, which is what is behind.
        records.retain(|r| !r.live.detection_only());
        let shed = self
            .counters
            .shed
            .fetch_add(records.len() as u64, Ordering::Relaxed)
            + records.len() as u64;
        let ms = self.started.elapsed().as_millis() as u64;
        let last = self.shed_logged.load(Ordering::Relaxed);
        if (last == 0 || ms >= last + 10_000)
            && self
                .shed_logged
                .compare_exchange(last, ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                "detection is behind: {shed} records so far went straight to the export without duplicate marking or profiling (shard {i}'s queue was full; more --workers, or fewer records)"
            );
        }
        let _ = self.sinks.send(ToSinks::Records(records, now));
    }
}

/// Which of `n` shards a record belongs to: its internal host's, or for a record with
/// no single internal side, the lower of its two addresses' (copies of one flow agree).
fn shard_of(cfg: &DetectConfig, r: &FlowRecord, n: usize) -> usize {
    use std::hash::BuildHasher;
    let host = match (cfg.is_internal(r.src_addr), cfg.is_internal(r.dst_addr)) {
        (true, false) => r.src_addr,
        (false, true) => r.dst_addr,
        _ => r.src_addr.min(r.dst_addr),
    };
    // A hash that mixes every input bit into every output bit: an Fx hash's high bits
    // barely move with an address's last bytes, which sent every host of 10.0.0.0/17 to
    // the same one of two workers.
    (foldhash::fast::FixedState::with_seed(0x5eed).hash_one(host) % n as u64) as usize
}

/// One shard: a duplicate marker and an engine for the hosts routed to it.
/// `keep_live`: a sink takes detection-only records too ([`Sink::wants_live`]): they go
/// on to the sink thread, which gives them to that sink only.
fn shard_worker(
    mut dedup: Dedup,
    mut engine: Engine,
    rx: Receiver<ToShard>,
    sinks: Option<SyncSender<ToSinks>>,
    keep_live: bool,
) {
    while let Ok(msg) = rx.recv() {
        match msg {
            ToShard::Records(mut records, now) => {
                dedup.mark_batch(&mut records);
                engine.observe_batch(&records);
                // Without a record sink (`detector central`), the records end here
                // rather than queue for a thread that would only drop them.
                if let Some(sinks) = &sinks {
                    // Flow starts are for detection only (and a sink that wants them).
                    if !keep_live {
                        records.retain(|r| !r.live.detection_only());
                    }
                    if sinks.send(ToSinks::Records(records, now)).is_err() {
                        return;
                    }
                }
            }
            ToShard::Expire(now) => dedup.expire(now),
            ToShard::Senders(reply) => {
                let _ = reply.send(engine.senders_snapshot());
            }
            ToShard::Reconfigure(cfg) => engine.reconfigure(*cfg),
            ToShard::Explain { top, n, reply } => {
                let _ = reply.send(engine.explain(&top, n));
            }
            ToShard::Detail {
                top,
                n,
                alarmed,
                reply,
            } => {
                let _ = reply.send(engine.explain_detailed(&top, n, alarmed));
            }
            ToShard::Evaluate { now, top, reply } => {
                let events = engine.evaluate_with(now, &top);
                let mut scores = engine.last_scores();
                scores.truncate(10);
                let _ = reply.send(ShardReport {
                    events,
                    scores,
                    dedup: dedup.stats.clone(),
                    dedup_capacity: dedup.capacity(),
                    engine: engine.stats.clone(),
                    hosts: engine.hosts(),
                    max_hosts: engine.max_hosts(),
                    table_bytes: engine.heap_bytes() + dedup.heap_bytes(),
                });
            }
        }
    }
}

/// The sink thread: every record, in the order its shard sent it. Returns the sinks'
/// failures (writes or sends that failed).
/// Detection-only records (sent on when a sink wants them) reach only the sinks that
/// want them; the others get the batch's exported records.
fn sink_worker(mut sinks: Vec<Box<dyn Sink + Send>>, rx: Receiver<ToSinks>) -> u64 {
    let wants: Vec<bool> = sinks.iter().map(|s| s.wants_live()).collect();
    // Without such a sink, the shards sent exported records only.
    let any_wants = wants.contains(&true);
    let mut exported = Vec::new();
    while let Ok(msg) = rx.recv() {
        match msg {
            ToSinks::Records(records, now) => {
                let live = any_wants && records.iter().any(|r| r.live.detection_only());
                if live {
                    exported.clear();
                    exported.extend(records.iter().filter(|r| !r.live.detection_only()).cloned());
                }
                for (s, &w) in sinks.iter_mut().zip(&wants) {
                    if live && !w {
                        s.send(&exported, now);
                    } else {
                        s.send(&records, now);
                    }
                }
            }
            ToSinks::Describe(reply) => {
                let _ = reply.send(sinks.iter().map(|s| s.describe()).collect());
            }
            ToSinks::Counters(reply) => {
                let _ = reply.send(sinks.iter().map(|s| s.counters()).collect());
            }
            ToSinks::Reopen => {
                for s in &mut sinks {
                    s.reopen();
                }
            }
        }
    }
    sinks.iter().map(|s| s.failures()).sum()
}

/// The pipeline's owner: starts the threads, runs the evaluations over the shards,
/// sends the alarm events, and stops everything in order.
pub struct Pipeline {
    input: Input,
    shard_threads: Vec<JoinHandle<()>>,
    sink_thread: Option<JoinHandle<u64>>,
    sink_names: Vec<String>,
    alarms: AlarmSink,
    schedule: EvalSchedule,
    window: Duration,
    score_threshold: f64,
    /// The shards' reports of the last evaluation (their counters, their top scores).
    reports: Vec<ShardReport>,
    /// The top senders of the last evaluation.
    last_top: Arc<TopSenders>,
    /// What the bounded tables turned away, as last logged: flows the duplicate table
    /// forgot early, records of hosts beyond the profiled limit.
    limits_logged: (u64, u64),
    /// Operators' decisions: alarm events of suppressed hosts are marked and kept from
    /// the alarm sinks (`run`; see [`Self::set_decisions`]).
    decisions: Option<Arc<crate::status::decisions::Store>>,
    /// Flows the shards' duplicate tables hold, together.
    dedup_capacity: usize,
}

impl Pipeline {
    pub fn new(
        cfg: &PipelineConfig,
        sinks: Vec<Box<dyn Sink + Send>>,
        detect: DetectConfig,
        alarms: AlarmSink,
    ) -> Self {
        let n = cfg.workers.max(1);
        let has_sinks = !sinks.is_empty();
        let keep_live = sinks.iter().any(|s| s.wants_live());
        let sink_names = sinks.iter().map(|s| s.name()).collect();
        let (sink_tx, sink_rx) = sync_channel(SINK_QUEUE);
        let sink_thread = std::thread::Builder::new()
            .name("sinks".into())
            .spawn(move || {
                crate::privileges::drop_thread_capabilities();
                sink_worker(sinks, sink_rx)
            })
            .expect("spawn the sink thread");
        // Each shard holds its share of the bounded tables.
        let mut shard_cfg = detect.clone();
        shard_cfg.max_hosts = detect.max_hosts.div_ceil(n);
        let mut senders = Vec::with_capacity(n);
        let mut shard_threads = Vec::with_capacity(n);
        let mut dedup_capacity = 0;
        for i in 0..n {
            let (tx, rx) = sync_channel(cfg.shard_queue.max(1));
            let dedup = Dedup::new(DEDUP_WINDOW, cfg.dedup_flows.div_ceil(n));
            dedup_capacity += dedup.capacity();
            let engine = Engine::new(shard_cfg.clone());
            let sinks = has_sinks.then(|| sink_tx.clone());
            shard_threads.push(
                std::thread::Builder::new()
                    .name(format!("shard-{i}"))
                    .spawn(move || {
                        crate::privileges::drop_thread_capabilities();
                        shard_worker(dedup, engine, rx, sinks, keep_live)
                    })
                    .expect("spawn a shard thread"),
            );
            senders.push(tx);
        }
        Self {
            input: Input {
                shards: senders.into(),
                sinks: sink_tx,
                route: Arc::new(std::sync::RwLock::new(Arc::new(detect.clone()))),
                counters: Arc::default(),
                when_behind: cfg.when_behind,
                shed_logged: Arc::default(),
                started: Instant::now(),
            },
            shard_threads,
            sink_thread: Some(sink_thread),
            sink_names,
            alarms,
            schedule: EvalSchedule::new(detect.eval_interval),
            window: detect.window,
            score_threshold: detect.thresholds.score,
            reports: Vec::new(),
            last_top: Arc::default(),
            limits_logged: (0, 0),
            decisions: None,
            dedup_capacity,
        }
    }

    /// Flows the shards' duplicate tables hold, together (`dedup_flows` rounded up to
    /// whole tables).
    pub fn dedup_capacity(&self) -> usize {
        self.dedup_capacity
    }

    /// Takes a reloaded configuration without losing anything held: routing, every
    /// shard's engine (profiles, open alarms and duplicate marks stay), the evaluation
    /// interval, and the alarm sinks (their counters carry on). Output files are opened
    /// again, for log rotation.
    pub fn reconfigure(&mut self, detect: DetectConfig, mut alarms: AlarmSink) {
        let n = self.input.shards.len();
        let mut shard_cfg = detect.clone();
        shard_cfg.max_hosts = detect.max_hosts.div_ceil(n);
        for s in self.input.shards.iter() {
            let _ = s.send(ToShard::Reconfigure(Box::new(shard_cfg.clone())));
        }
        self.schedule.set_interval(detect.eval_interval);
        self.window = detect.window;
        self.score_threshold = detect.thresholds.score;
        *self.input.route.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(detect);
        alarms.succeed(&mut self.alarms);
        self.alarms = alarms;
        let _ = self.input.sinks.send(ToSinks::Reopen);
    }

    /// Marks the alarm events with the operators' decisions from now on: those of a
    /// suppressed host are logged and kept from the alarm sinks (see
    /// [`crate::detect::decisions`]); suppressions over are dropped at each tick.
    pub fn set_decisions(&mut self, store: Arc<crate::status::decisions::Store>) {
        self.decisions = Some(store);
    }

    /// Opens the output files again (SIGHUP without a configuration file).
    pub fn reopen(&mut self) {
        self.alarms.reopen();
        let _ = self.input.sinks.send(ToSinks::Reopen);
    }

    /// A handle for a source thread.
    pub fn input(&self) -> Input {
        self.input.clone()
    }

    /// Names of the sinks, for the start-up log.
    pub fn sink_names(&self) -> &[String] {
        &self.sink_names
    }

    pub fn workers(&self) -> usize {
        self.shard_threads.len()
    }

    /// Hands records over (see [`Input::emit`]).
    pub fn emit(&self, records: Vec<FlowRecord>, now: SystemTime) {
        self.input.emit(records, now);
    }

    /// Periodic work at `now`: the duplicate markers forget old flows, and when the
    /// evaluation interval has passed (or always with `force`), every shard is evaluated
    /// and the alarm events are sent. Records handed over before this call are all
    /// counted in the evaluation (each shard's queue is in order).
    /// Returns the events of the evaluation (marked with the operators' decisions, those
    /// of suppressed hosts included).
    pub fn tick(&mut self, now: SystemTime, force: bool) -> Vec<AlarmEvent> {
        for s in self.input.shards.iter() {
            let _ = s.send(ToShard::Expire(now));
        }
        if let Some(d) = &self.decisions {
            d.tick(now);
        }
        if !self.schedule.due(now, force) {
            return Vec::new();
        }
        let mut events = self.evaluate(now);
        match &self.decisions {
            Some(d) => {
                let deliver = d.route(&mut events, now);
                self.alarms.send(&deliver);
            }
            None => self.alarms.send(&events),
        }
        self.log_limits();
        events
    }

    /// Both phases of an evaluation over every shard; the events sorted by host, as one
    /// engine gives them.
    fn evaluate(&mut self, now: SystemTime) -> Vec<AlarmEvent> {
        let mut replies = Vec::new();
        for s in self.input.shards.iter() {
            let (tx, rx) = sync_channel(1);
            let _ = s.send(ToShard::Senders(tx));
            replies.push(rx);
        }
        let snapshots = replies.iter().filter_map(|rx| rx.recv().ok());
        let top = Arc::new(TopSenders::from_shards(snapshots, now, self.window));
        self.last_top = top.clone();
        let mut replies = Vec::new();
        for s in self.input.shards.iter() {
            let (tx, rx) = sync_channel(1);
            let _ = s.send(ToShard::Evaluate {
                now,
                top: top.clone(),
                reply: tx,
            });
            replies.push(rx);
        }
        self.reports = replies.iter().filter_map(|rx| rx.recv().ok()).collect();
        let mut events: Vec<AlarmEvent> = self
            .reports
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.events))
            .collect();
        events.sort_by_key(|e| e.host);
        events
    }

    /// Names what the bounded tables turned away: the first time, then each time the
    /// count has at least doubled (a steady trickle would otherwise log at every
    /// evaluation; `/metrics` and the statistics line carry the exact counts).
    fn log_limits(&mut self) {
        let due = |now: u64, logged: u64| now > 0 && now >= logged.saturating_mul(2).max(1);
        let early: u64 = self.reports.iter().map(|r| r.dedup.evicted_early).sum();
        if due(early, self.limits_logged.0) {
            warn!(
                "{early} flows so far forgotten before their {} s were over, to make room: the duplicate table holds {} flows (a later copy of one of them from another source counts twice)",
                DEDUP_WINDOW.as_secs(),
                self.reports.iter().map(|r| r.dedup_capacity).sum::<usize>()
            );
            self.limits_logged.0 = early;
        }
        let over: u64 = self.reports.iter().map(|r| r.engine.hosts_over_limit).sum();
        if due(over, self.limits_logged.1) {
            warn!(
                "{over} records so far of internal hosts beyond the {} profiled were not profiled",
                self.reports.iter().map(|r| r.max_hosts).sum::<usize>()
            );
            self.limits_logged.1 = over;
        }
    }

    /// The highest scores of the last evaluation, over all shards, highest first.
    pub fn top_scores(&self) -> Vec<(IpAddr, f64, Option<&'static str>)> {
        let mut v: Vec<_> = self
            .reports
            .iter()
            .flat_map(|r| r.scores.iter().copied())
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    pub fn score_threshold(&self) -> f64 {
        self.score_threshold
    }

    /// Records handed over so far.
    pub fn records(&self) -> u64 {
        self.input.counters.records.load(Ordering::Relaxed)
    }

    /// Records that went to the sinks unmarked and unprofiled because a shard was behind.
    pub fn shed(&self) -> u64 {
        self.input.counters.shed.load(Ordering::Relaxed)
    }

    /// The statistics line (the shards' counters as of the last evaluation).
    pub fn describe(&self) -> String {
        let c = &self.input.counters;
        let (tx, rx) = sync_channel(1);
        let sinks = match self.input.sinks.send(ToSinks::Describe(tx)) {
            Ok(()) => rx.recv().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let sum = |f: fn(&ShardReport) -> u64| self.reports.iter().map(f).sum::<u64>();
        let highest: Vec<String> = self
            .top_scores()
            .into_iter()
            .take(10)
            .filter(|(_, score, _)| *score > 0.0)
            .map(|(ip, score, guard)| match guard {
                Some(g) => format!("{ip} {score:.1} (vetoed as {g})"),
                None => format!("{ip} {score:.1}"),
            })
            .collect();
        format!(
            "exported {} records ({} packets, {} bytes, {} marked duplicate, {} flows the full duplicate table forgot early, {} not marked or profiled because detection was behind); detection on {} workers: {} hosts profiled ({} records of hosts beyond the limit, tables {} MiB), highest scores (threshold {:.1}): [{}], {}; {}",
            c.records.load(Ordering::Relaxed),
            c.packets.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
            sum(|r| r.dedup.duplicates),
            sum(|r| r.dedup.evicted_early),
            c.shed.load(Ordering::Relaxed),
            self.workers(),
            sum(|r| r.hosts as u64),
            sum(|r| r.engine.hosts_over_limit),
            sum(|r| r.table_bytes as u64) >> 20,
            self.score_threshold,
            highest.join(", "),
            self.alarms.describe(),
            sinks.join("; ")
        )
    }

    /// The `n` highest-scored hosts over the shards, evaluated in full against the top
    /// senders of the last evaluation; highest first, ties to the lower address.
    pub fn explain(&self, n: usize) -> Vec<(IpAddr, Verdict)> {
        let mut replies = Vec::new();
        for s in self.input.shards.iter() {
            let (tx, rx) = sync_channel(1);
            let _ = s.send(ToShard::Explain {
                top: self.last_top.clone(),
                n,
                reply: tx,
            });
            replies.push(rx);
        }
        let mut all: Vec<(IpAddr, Verdict)> = replies
            .iter()
            .filter_map(|rx| rx.recv().ok())
            .flatten()
            .collect();
        all.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// [`Self::explain`] with each host's drill-down, and beyond the `n` hosts up to
    /// `alarmed` hosts with an open alarm: for the status page, which can show any of
    /// them. Highest score first over the shards, ties to the lower address.
    pub fn explain_detailed(&self, n: usize, alarmed: usize) -> Vec<(IpAddr, Verdict, HostDetail)> {
        let mut replies = Vec::new();
        for s in self.input.shards.iter() {
            let (tx, rx) = sync_channel(1);
            let _ = s.send(ToShard::Detail {
                top: self.last_top.clone(),
                n,
                alarmed,
                reply: tx,
            });
            replies.push(rx);
        }
        let mut all: Vec<(IpAddr, Verdict, HostDetail)> = replies
            .iter()
            .filter_map(|rx| rx.recv().ok())
            .flatten()
            .collect();
        all.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        all
    }

    /// Every counter of the pipeline (the shards' as of the last evaluation), for
    /// `/metrics` and the status page.
    pub fn stats(&self) -> PipelineStats {
        let c = &self.input.counters;
        let (tx, rx) = sync_channel(1);
        let sinks = match self.input.sinks.send(ToSinks::Counters(tx)) {
            Ok(()) => rx.recv().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let sum = |f: fn(&ShardReport) -> u64| self.reports.iter().map(f).sum::<u64>();
        PipelineStats {
            records: c.records.load(Ordering::Relaxed),
            packets: c.packets.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            shed: c.shed.load(Ordering::Relaxed),
            duplicates: sum(|r| r.dedup.duplicates),
            dedup_evicted_early: sum(|r| r.dedup.evicted_early),
            workers: self.workers() as u64,
            hosts_profiled: sum(|r| r.hosts as u64),
            max_hosts: sum(|r| r.max_hosts as u64),
            table_bytes: sum(|r| r.table_bytes as u64),
            engine: self.engine_stats(),
            score_threshold: self.score_threshold,
            sinks,
            alarms: self.alarms.stats(),
        }
    }

    /// The engines' counters of the last evaluation, summed over the shards.
    pub fn engine_stats(&self) -> EngineStats {
        let mut t = EngineStats::default();
        for r in &self.reports {
            let e = &r.engine;
            t.records += e.records;
            t.duplicates_skipped += e.duplicates_skipped;
            t.both_internal += e.both_internal;
            t.neither_internal += e.neither_internal;
            t.allow_listed += e.allow_listed;
            t.hosts_over_limit += e.hosts_over_limit;
            t.evaluations = t.evaluations.max(e.evaluations);
        }
        t
    }

    /// Evaluates once more at `now` (forced), then stops the shards and the sinks after
    /// everything handed over has gone through. Sources must have stopped first.
    pub fn finish(mut self, now: SystemTime) -> Finished {
        let final_events = self.tick(now, true);
        let line = self.describe();
        let scores = self.top_scores();
        let hosts = self.explain(EXPLAINED_HOSTS);
        let engine = self.engine_stats();
        let hosts_profiled = self.reports.iter().map(|r| r.hosts as u64).sum();
        let route = self
            .input
            .route
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let internal = route
            .internal
            .iter()
            .map(|c| format!("{}/{}", c.addr, c.len))
            .collect();
        let records = self.records();
        let undelivered = self.alarms.close(WEBHOOK_DRAIN);
        let alarm_events = self.alarms.events;
        let alarm_errors = self.alarms.errors + undelivered;
        let score_threshold = self.score_threshold;
        // Dropping the senders ends the shard threads once their queues are empty; the
        // last shard to end drops the last sender of the sink queue, which ends the sink
        // thread after it wrote everything.
        let Pipeline {
            input,
            shard_threads,
            mut sink_thread,
            ..
        } = self;
        drop(input);
        for t in shard_threads {
            let _ = t.join();
        }
        let mut sink_failures = alarm_errors;
        if let Some(t) = sink_thread.take() {
            sink_failures += t.join().unwrap_or(1);
        }
        Finished {
            sink_failures,
            describe: line,
            top_scores: scores,
            hosts,
            engine,
            hosts_profiled,
            internal,
            score_threshold,
            records,
            alarm_events,
            final_events,
        }
    }
}

/// The pipeline's counters (see [`Pipeline::stats`]).
#[derive(Clone, Debug, Default)]
pub struct PipelineStats {
    /// Records handed over, their packets and bytes.
    pub records: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Records that went to the sinks unmarked and unprofiled (detection was behind).
    pub shed: u64,
    /// Records marked duplicate (another source reported the same flow).
    pub duplicates: u64,
    /// Flows the full duplicate table forgot before their time.
    pub dedup_evicted_early: u64,
    pub workers: u64,
    pub hosts_profiled: u64,
    /// Hosts the engines may profile (`--max-hosts`).
    pub max_hosts: u64,
    /// Bytes the detection tables (profiles, duplicate marker) hold on the heap.
    pub table_bytes: u64,
    pub engine: EngineStats,
    pub score_threshold: f64,
    pub sinks: Vec<crate::export::SinkCounters>,
    pub alarms: crate::export::alarms::AlarmSinkStats,
}

/// What a finished pipeline reports.
pub struct Finished {
    /// The final statistics line.
    pub describe: String,
    pub top_scores: Vec<(IpAddr, f64, Option<&'static str>)>,
    /// The highest-scored hosts of the last evaluation (at most [`EXPLAINED_HOSTS`]),
    /// each with every rule's value, highest first.
    pub hosts: Vec<(IpAddr, Verdict)>,
    /// The engines' counters, summed over the shards.
    pub engine: EngineStats,
    pub hosts_profiled: u64,
    /// The internal networks detection used.
    pub internal: Vec<String>,
    pub score_threshold: f64,
    pub records: u64,
    pub alarm_events: u64,
    /// The events of the last (forced) evaluation.
    pub final_events: Vec<AlarmEvent>,
    /// Writes or sends that failed, over the record sinks and the alarm sink.
    pub sink_failures: u64,
}

#[cfg(test)]
mod tests;
