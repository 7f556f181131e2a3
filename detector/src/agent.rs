//! The `run` shell: sockets, timers, signals and BPF I/O around the pure core.
//!
//! Sources: the local XDP/TC meter (`--iface`) and NetFlow/IPFIX listeners
//! (`--netflow-listen`). Every record, whatever its source, goes through the same
//! pipeline: duplicate marking, then every sink.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::export::Sink;
use crate::export::json::JsonSink;
use crate::export::netflow_v9::{self, V9Config, V9Sink};
use crate::flow::dedup::Dedup;
use crate::flow::table::{Delta, Timeouts};
use crate::flow::{FlowRecord, WallClock, monotonic_ns, record_from_delta};
use crate::sources::netflow::decode::{DecodeLimits, Decoder};
use crate::sources::netflow::listener::{Batch, Listener};
use crate::sources::xdp::{self, KernelCounters, LoadOptions, XdpSource};
use detector_common::counter;

/// How often the kernel map is scanned.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);
/// How long the duplicate marker remembers a flow after its last record.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Flows the duplicate marker tracks at most.
pub const DEDUP_MAX_FLOWS: usize = 4_000_000;

/// Builds the sinks the flags ask for; with neither `--export` nor `--flows-json`, JSON to stdout.
pub fn sinks(
    export: &[String],
    flows_json: Option<&str>,
    v9: V9Config,
    boot: SystemTime,
) -> Result<Vec<Box<dyn Sink + Send>>> {
    let mut sinks: Vec<Box<dyn Sink + Send>> = Vec::new();
    if !export.is_empty() {
        let targets = export
            .iter()
            .map(|t| netflow_v9::resolve(t))
            .collect::<Result<Vec<_>, _>>()?;
        sinks.push(Box::new(V9Sink::new(&targets, v9, boot)?));
    }
    let json = match (flows_json, export.is_empty()) {
        (Some(p), _) => Some(p),
        (None, true) => Some("-"),
        (None, false) => None,
    };
    if let Some(path) = json {
        sinks.push(Box::new(
            JsonSink::open(path).with_context(|| format!("opening --flows-json {path}"))?,
        ));
    }
    Ok(sinks)
}

/// The detection settings and alarm sinks from `--config` and the flags (which win).
pub fn detection(
    a: &crate::cli::DetectArgs,
) -> Result<(
    crate::detect::DetectConfig,
    crate::export::alarms::AlarmSink,
)> {
    use crate::config::FileConfig;
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut cfg = file.detect_config();
    if !a.internal.is_empty() {
        cfg.internal = a.internal.clone();
    }
    let json = a
        .alarms_json
        .clone()
        .or_else(|| file.sinks.alarms_json.clone());
    let mut alarms = crate::export::alarms::AlarmSink::open(json.as_deref())
        .with_context(|| format!("opening the alarms file {json:?}"))?;
    let syslog = a
        .syslog
        .clone()
        .or_else(|| file.sinks.syslog.as_ref().map(|s| s.address.clone()));
    if let Some(addr) = syslog {
        let addr = crate::export::syslog::parse_address(&addr).map_err(anyhow::Error::msg)?;
        alarms.syslog = Some(crate::export::syslog::SyslogSink::new(addr));
    }
    let webhook = match (&a.webhook, &file.sinks.webhook) {
        (Some(url), w) => Some(crate::config::WebhookSink {
            url: url.clone(),
            timeout_secs: w.as_ref().map(|w| w.timeout_secs).unwrap_or(5),
            retries: w.as_ref().map(|w| w.retries).unwrap_or(3),
            queue: w.as_ref().map(|w| w.queue).unwrap_or(1000),
        }),
        (None, w) => w.clone(),
    };
    if let Some(w) = webhook {
        if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
            bail!("--webhook '{}' is not an http:// or https:// URL", w.url);
        }
        alarms.webhook = Some(crate::export::webhook::WebhookSink::new(
            w.url,
            Duration::from_secs(w.timeout_secs),
            w.retries,
            w.queue,
        ));
    }
    Ok((cfg, alarms))
}

/// Dedup, detection, then every sink.
pub struct Pipeline {
    pub sinks: Vec<Box<dyn Sink + Send>>,
    pub dedup: Dedup,
    pub engine: crate::detect::Engine,
    pub alarms: crate::export::alarms::AlarmSink,
    pub exported_records: u64,
    pub exported_packets: u64,
    pub exported_bytes: u64,
    /// What the bounded tables turned away, as last logged: flows the duplicate table
    /// forgot early, records of hosts beyond the profiled limit.
    limits_logged: (u64, u64),
}

impl Pipeline {
    pub fn new(
        sinks: Vec<Box<dyn Sink + Send>>,
        detect: crate::detect::DetectConfig,
        alarms: crate::export::alarms::AlarmSink,
    ) -> Self {
        Self {
            sinks,
            dedup: Dedup::new(DEDUP_WINDOW, DEDUP_MAX_FLOWS),
            engine: crate::detect::Engine::new(detect),
            alarms,
            exported_records: 0,
            exported_packets: 0,
            exported_bytes: 0,
            limits_logged: (0, 0),
        }
    }

    /// Sends records (possibly none: sinks do periodic work) stamped `now`.
    pub fn emit(&mut self, records: &mut [FlowRecord], now: SystemTime) {
        self.dedup.mark_batch(records);
        for r in records.iter() {
            self.exported_packets += r.est_packets();
            self.exported_bytes += r.est_bytes();
        }
        self.engine.observe_batch(records);
        self.exported_records += records.len() as u64;
        for s in &mut self.sinks {
            s.send(records, now);
        }
    }

    /// Runs the detection when its interval has passed at `now` (or always with `force`)
    /// and sends the alarm events.
    pub fn detect(&mut self, now: SystemTime, force: bool) {
        let events = self.engine.tick(now, force);
        self.alarms.send(&events);
        self.log_limits();
    }

    /// Names each increase of what the bounded tables turned away.
    fn log_limits(&mut self) {
        let early = self.dedup.stats.evicted_early;
        if early > self.limits_logged.0 {
            warn!(
                "{early} flows so far forgotten before their {} s were over, to make room: the duplicate table holds {} flows (a later copy of one of them from another source counts twice)",
                DEDUP_WINDOW.as_secs(),
                self.dedup.capacity()
            );
        }
        let over = self.engine.stats.hosts_over_limit;
        if over > self.limits_logged.1 {
            warn!(
                "{over} records so far of internal hosts beyond the {} profiled were not profiled",
                self.engine.max_hosts()
            );
        }
        self.limits_logged = (early, over);
    }

    pub fn describe(&self) -> String {
        let sinks: Vec<_> = self.sinks.iter().map(|s| s.describe()).collect();
        // The hosts closest to an alarm (or in one), so an admin sees the margins.
        let highest: Vec<String> = self
            .engine
            .last_scores()
            .into_iter()
            .take(10)
            .filter(|(_, score, _)| *score > 0.0)
            .map(|(ip, score, guard)| match guard {
                Some(g) => format!("{ip} {score:.1} (vetoed as {g})"),
                None => format!("{ip} {score:.1}"),
            })
            .collect();
        format!(
            "exported {} records ({} packets, {} bytes, {} marked duplicate, {} flows the full duplicate table forgot early); detection: {} hosts profiled ({} records of hosts beyond the limit), highest scores (threshold {:.1}): [{}], {}; {}",
            self.exported_records,
            self.exported_packets,
            self.exported_bytes,
            self.dedup.stats.duplicates,
            self.dedup.stats.evicted_early,
            self.engine.hosts(),
            self.engine.stats.hosts_over_limit,
            self.engine.thresholds().score,
            highest.join(", "),
            self.alarms.describe(),
            sinks.join("; ")
        )
    }
}

/// Remembers the loss counters so that each increase is logged once.
#[derive(Default)]
struct LossWatch {
    insert_failed: u64,
    ringbuf_dropped: u64,
    parse_failures: u64,
}

impl LossWatch {
    fn check(&mut self, k: &KernelCounters) {
        let insert_failed = k.total(counter::INSERT_FAILED);
        if insert_failed > self.insert_failed {
            warn!(
                "flow map full: {insert_failed} packets took the ring-buffer overflow path so far (raise --map-size)"
            );
            self.insert_failed = insert_failed;
        }
        let dropped = k.total(counter::RINGBUF_DROPPED);
        if dropped > self.ringbuf_dropped {
            warn!(
                "overflow ring buffer full: {dropped} packets could not be accounted (raise --map-size)"
            );
            self.ringbuf_dropped = dropped;
        }
        let parse = k.parse_failures();
        if parse > self.parse_failures {
            info!("frames the parser could not read (passed untouched): {parse}");
            self.parse_failures = parse;
        }
    }
}

type Ring = AsyncFd<RingBuf<MapData>>;

/// The local meter, when `--iface` is given. Its overflow ring buffer is kept apart (see
/// [`Meter::start`]) so that waiting on it does not borrow the meter.
struct Meter {
    bpf: Ebpf,
    source: XdpSource,
    ticker: Option<xdp::clock::Ticker>,
    losses: LossWatch,
    sampling: u32,
}

impl Meter {
    fn start(args: &RunArgs, iface: &str) -> Result<(Self, Ring)> {
        let ifindex = xdp::ifindex(iface)?;
        if let Some(msg) = crate::privileges::check("attaching XDP/TC programs") {
            bail!(msg);
        }
        raise_memlock_limit();
        let map_size = args.map_size.unwrap_or_else(xdp::default_map_size);
        let mut bpf = xdp::load_object(LoadOptions {
            map_size,
            sampling: args.sampling,
        })?;
        let timeouts = Timeouts::from_secs(args.active_timeout, args.inactive_timeout);
        let mut source = XdpSource::with_mode(&mut bpf, timeouts, ifindex, args.drain.mode())?;
        info!(
            "the flow maps are read {}",
            match source.drain_mode() {
                xdp::DrainMode::Batch => "in batches (BPF_MAP_LOOKUP_BATCH)",
                xdp::DrainMode::PerKey => "key by key",
            }
        );
        let ticker = xdp::clock::Ticker::start(source.clock(), Duration::from_millis(1))
            .context("starting the packet clock")?;
        let mode = xdp::attach(&mut bpf, iface, args.xdp_mode)?;
        xdp::log_attached(iface, mode, map_size, args.sampling);
        let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{}", b >> 20));
        let (m4, m6) = source.map_kernel_bytes();
        info!(
            "flow maps: {map_size} IPv4 flows ({} MiB of kernel memory) and {map_size} IPv6 flows ({} MiB), whatever the number of CPUs",
            mib(m4),
            mib(m6)
        );
        let ring = source.take_ring().context("overflow ring buffer")?;
        // SAFETY: the ring buffer owns its file descriptor and keeps it open while the
        // AsyncFd owns the ring buffer.
        let ring =
            unsafe { AsyncFd::register(ring) }.context("polling the overflow ring buffer")?;
        let meter = Self {
            bpf,
            source,
            ticker: Some(ticker),
            losses: LossWatch::default(),
            sampling: args.sampling,
        };
        Ok((meter, ring))
    }

    fn records(&self, deltas: &[Delta]) -> Vec<FlowRecord> {
        let clock = WallClock::now();
        deltas
            .iter()
            .map(|d| record_from_delta(d, &clock, self.sampling))
            .collect()
    }

    fn tick(&mut self, ring: &mut Ring) -> Result<Vec<FlowRecord>> {
        let mut deltas = Vec::new();
        self.source.drain_ring(ring.get_mut());
        self.source.scan(monotonic_ns(), &mut deltas)?;
        let k = self.source.counters()?;
        self.losses.check(&k);
        Ok(self.records(&deltas))
    }

    /// Detaches first, so no packet is counted after the final read, then drains all.
    fn stop(&mut self, ring: &mut Ring) -> Result<Vec<FlowRecord>> {
        xdp::detach(&mut self.bpf);
        self.ticker.take();
        let mut deltas = Vec::new();
        self.source.drain_ring(ring.get_mut());
        self.source.flush(&mut deltas)?;
        let k = self.source.counters()?;
        self.losses.check(&k);
        match xdp::final_check(&k, &self.source.drain) {
            Ok(n) => info!("every packet the kernel counted was exported ({n} packets)"),
            Err(e) => warn!("{e}"),
        }
        Ok(self.records(&deltas))
    }

    fn describe(&self) -> Result<String> {
        let k = self.source.counters()?;
        let (kernel, overflow) = self.source.flow_counts();
        Ok(format!(
            "meter: {kernel} flows in the kernel maps, {overflow} in the overflow table; kernel counters: {}; overflow events read: {}, overflow table full: {}",
            k.describe(),
            self.source.drain.overflow_events,
            self.source.drain.overflow_table_full,
        ))
    }
}

/// Waits for the ring buffer of the meter, or forever without one.
async fn ring_ready(
    ring: &mut Option<Ring>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match ring {
        Some(r) => r.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// NetFlow/IPFIX ingest: the decoder and the listeners' kernel drop counters.
struct Ingest {
    decoder: Decoder,
    listeners: Vec<(std::net::SocketAddr, u64)>,
}

impl Ingest {
    fn batch(&mut self, b: Batch, out: &mut Vec<FlowRecord>) {
        for (from, data) in &b.datagrams {
            self.decoder.decode(*from, data, b.received, out);
        }
        let (addr, drops) = &mut self.listeners[b.listener];
        if b.kernel_drops > *drops {
            warn!(
                "listener {addr}: the kernel dropped {} datagrams so far (receive buffer full; raise --netflow-rcvbuf)",
                b.kernel_drops
            );
            *drops = b.kernel_drops;
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .listeners
            .iter()
            .map(|(a, d)| format!("listener {a}: kernel drops {d}"))
            .collect();
        parts.extend(self.decoder.describe_exporters());
        let g = &self.decoder.global;
        parts.push(format!(
            "rejected by --exporter-allow {}, over the exporter limit {}",
            g.rejected, g.over_exporter_limit
        ));
        parts.join("; ")
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    if let Some(iface) = &args.iface {
        xdp::ifindex(iface)?;
    }
    let boot = SystemTime::now();
    let v9 = V9Config {
        source_id: args.source_id,
        template_refresh_packets: args.template_refresh_packets,
        template_refresh_secs: args.template_refresh_secs,
        sampling_interval: args.sampling,
        ..V9Config::default()
    };
    let (detect, alarms) = detection(&args.detect)?;
    let mut pipeline = Pipeline::new(
        sinks(&args.export, args.flows_json.as_deref(), v9, boot)?,
        detect,
        alarms,
    );

    let (tx, mut rx) = mpsc::channel::<Batch>(256);
    let mut ingest = None;
    if !args.netflow_listen.is_empty() {
        let mut listeners = Vec::new();
        for (i, addr) in args.netflow_listen.iter().enumerate() {
            let l = Listener::bind(*addr, args.netflow_rcvbuf)?;
            info!(
                "receiving NetFlow/IPFIX on {} (receive buffer {} bytes)",
                l.addr, l.rcvbuf
            );
            listeners.push((l.addr, 0));
            tokio::spawn(l.run(i, tx.clone()));
        }
        ingest = Some(Ingest {
            decoder: Decoder::new(DecodeLimits::default(), args.exporter_allow.clone()),
            listeners,
        });
    }
    drop(tx);

    let (mut meter, mut ring) = match &args.iface {
        Some(iface) => {
            let (m, r) = Meter::start(&args, iface)?;
            (Some(m), Some(r))
        }
        None => (None, None),
    };
    for s in &pipeline.sinks {
        info!("exporting to {}", s.name());
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats_every = Duration::from_secs(args.stats_interval);
    let mut last_stats = tokio::time::Instant::now();
    let mut records = Vec::new();

    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let (Some(m), Some(r)) = (meter.as_mut(), ring.as_mut()) {
                    records.extend(m.tick(r)?);
                }
                let now = SystemTime::now();
                pipeline.emit(&mut records, now);
                records.clear();
                pipeline.dedup.expire(now);
                pipeline.detect(now, false);
                if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
                    last_stats = tokio::time::Instant::now();
                    log_stats(meter.as_ref(), ingest.as_ref(), &pipeline);
                }
            }
            guard = ring_ready(&mut ring) => {
                let mut guard = guard.context("waiting on the overflow ring buffer")?;
                if let Some(m) = meter.as_mut() {
                    m.source.drain_ring(guard.get_inner_mut());
                }
                guard.clear_ready();
            }
            Some(batch) = rx.recv(), if ingest.is_some() => {
                let ing = ingest.as_mut().expect("checked by the branch condition");
                ing.batch(batch, &mut records);
                if !records.is_empty() {
                    pipeline.emit(&mut records, SystemTime::now());
                    records.clear();
                }
            }
            _ = sigint.recv() => { info!("SIGINT: detaching and flushing every flow"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching and flushing every flow"); break; }
        }
    }

    // Datagrams already received are decoded, then the meter's flows flushed.
    while let Ok(batch) = rx.try_recv() {
        if let Some(ing) = ingest.as_mut() {
            ing.batch(batch, &mut records);
        }
    }
    if let (Some(m), Some(r)) = (meter.as_mut(), ring.as_mut()) {
        records.extend(m.stop(r)?);
    }
    pipeline.emit(&mut records, SystemTime::now());
    pipeline.detect(SystemTime::now(), true);
    log_stats(meter.as_ref(), ingest.as_ref(), &pipeline);
    Ok(())
}

fn log_stats(meter: Option<&Meter>, ingest: Option<&Ingest>, pipeline: &Pipeline) {
    if let Some(m) = meter {
        match m.describe() {
            Ok(s) => info!("{s}"),
            Err(e) => warn!("reading the meter's counters: {e}"),
        }
    }
    if let Some(i) = ingest {
        info!("ingest: {}", i.describe());
    }
    info!("{}", pipeline.describe());
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raise it so large maps load.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}
