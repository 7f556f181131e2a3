//! The `run` shell: sockets, timers, signals and BPF I/O around the pure core.
//!
//! Sources: the local XDP/TC meter (`--iface`), drained every second on this thread,
//! and NetFlow/IPFIX listeners (`--netflow-listen`), decoded on threads of their own.
//! Both hand their records to the [`Pipeline`] (duplicate marking and detection on the
//! shard workers, then the sinks); the evaluations run on a thread of their own too, so
//! the drain never waits behind scoring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;
use crate::export::netflow_v9::V9Config;
use crate::flow::table::{Delta, Timeouts};
use crate::flow::{FlowRecord, WallClock, monotonic_ns, record_from_delta};
use crate::pipeline::{Pipeline, PipelineConfig, WhenBehind, build};
use crate::sources::netflow::decode::DecodeLimits;
use crate::sources::netflow::listener::Listener;
use crate::sources::sflow::decode::{SflowLimits, SflowTimeouts};
use crate::sources::sflow::listener::SflowListener;
use crate::sources::xdp::{self, KernelCounters, LoadOptions, XdpSource};
use crate::status::Status;
use detector_common::counter;

/// How often the kernel map is scanned.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Remembers the loss counters so that each increase is logged once.
#[derive(Default)]
struct LossWatch {
    insert_failed: u64,
    ringbuf_dropped: u64,
    parse_failures: u64,
    new_flows_dropped: u64,
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
        let unannounced = k.total(counter::NEW_FLOWS_DROPPED);
        if unannounced > 0 && unannounced >= self.new_flows_dropped.saturating_mul(2).max(1) {
            warn!(
                "{unannounced} new flows so far could not be announced to detection (the NEW_FLOWS ring buffer was full): detection counts them when they are exported"
            );
            self.new_flows_dropped = unannounced;
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
    iface: String,
    map_size: u32,
    /// The pin directory (`--pin-path`), and whether to leave it at exit.
    pins: Option<xdp::pin::PinDir>,
    keep_attached: bool,
}

impl Meter {
    fn start(args: &RunArgs, iface: &str) -> Result<(Self, Ring)> {
        let ifindex = xdp::ifindex(iface)?;
        if let Some(msg) = crate::privileges::check("attaching XDP/TC programs") {
            bail!(msg);
        }
        raise_memlock_limit();
        let map_size = args.map_size.unwrap_or_else(xdp::default_map_size);
        let pins = match args.pin_base() {
            Some(base) => Some(xdp::pin::PinDir::open(&base, iface)?),
            None => None,
        };
        let adopting = pins.as_ref().is_some_and(|p| p.has_state());
        let mut bpf = xdp::load_pinned(
            LoadOptions {
                map_size,
                sampling: args.sampling,
                payload_hints: args.payload_hints,
                live_flows: true,
                flow_slots: xdp::FLOW_SLOTS_HERE,
            },
            pins.as_ref(),
        )?;
        let timeouts = Timeouts::from_secs(args.active_timeout, args.inactive_timeout)
            .with_growth(args.live_interval);
        let mut source = XdpSource::with_mode(&mut bpf, timeouts, ifindex, args.drain.mode())?;
        if let Some(p) = &pins {
            let found = source.keep_pinned_state(monotonic_ns())?;
            if adopting {
                info!(
                    "adopted the state pinned at {}: the meter kept counting while no agent ran; {} packets were exported by earlier agents, {} flows carry their export marks ({} stale marks dropped); what they counted since is exported now, once",
                    p.path.display(),
                    found.exported_packets,
                    found.marks,
                    found.stale
                );
            } else if let Some(why) = &p.short_lived {
                log::warn!("maps and links pinned, but not for long: {why}");
            } else {
                info!(
                    "maps and links pinned at {}: the meter outlives the agent (--pin-path none to not pin)",
                    p.path.display()
                );
            }
        }
        info!(
            "the flow maps are read {}",
            match source.drain_mode() {
                xdp::DrainMode::Batch => "in batches (BPF_MAP_LOOKUP_BATCH)",
                xdp::DrainMode::PerKey => "key by key",
            }
        );
        let ticker = xdp::clock::Ticker::start(source.clock(), Duration::from_millis(1))
            .context("starting the packet clock")?;
        match xdp::attach(&mut bpf, iface, args.xdp_mode, pins.as_ref())? {
            xdp::Attached::Fresh(mode) => xdp::log_attached(iface, mode, map_size, args.sampling),
            xdp::Attached::Adopted => info!(
                "metering {iface}: this agent's programs swapped into the pinned links (no packet missed); sampling {}",
                args.sampling
            ),
        }
        let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{}", b >> 20));
        let (m4, m6) = source.map_kernel_bytes();
        let full = |key: usize| (map_size as u64 * xdp::entry_bytes(key)) >> 20;
        info!(
            "flow maps: {map_size} IPv4 and {map_size} IPv6 flows; kernel memory now {} + {} MiB, growing with the flows to about {} + {} MiB when full, whatever the number of CPUs",
            mib(m4),
            mib(m6),
            full(size_of::<detector_common::FlowKey4>()),
            full(size_of::<detector_common::FlowKey>())
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
            iface: iface.to_string(),
            map_size,
            pins,
            keep_attached: args.keep_attached,
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

    /// The flows started since the last call (detection-only records), then the records
    /// the timeouts export, in that order: a flow's start comes before its export.
    fn tick(&mut self, ring: &mut Ring) -> Result<Vec<FlowRecord>> {
        let mut deltas = Vec::new();
        let mut out = self.started();
        self.source.drain_ring(ring.get_mut());
        self.source.scan(monotonic_ns(), &mut deltas)?;
        let k = self.source.counters()?;
        self.losses.check(&k);
        out.extend(self.records(&deltas));
        Ok(out)
    }

    /// Detection-only records of the flows the kernel announced as they started.
    fn started(&mut self) -> Vec<FlowRecord> {
        let mut events = Vec::new();
        self.source.drain_new_flows(&mut events);
        let clock = WallClock::now();
        events
            .iter()
            .map(|e| crate::flow::record_from_start(e, &clock))
            .collect()
    }

    /// Detaches first, so no packet is counted after the final read, then drains all and
    /// removes the pins. With `--keep-attached` (and pins), leaves the programs counting
    /// for the next agent and exports only what is held in userspace.
    fn stop(&mut self, ring: &mut Ring) -> Result<Vec<FlowRecord>> {
        if self.keep_attached
            && let Some(p) = &self.pins
        {
            self.ticker.take();
            // No agent writes the packet clock until the next one: the kernel's own.
            self.source.clock().set(0);
            let mut deltas = Vec::new();
            self.source.drain_ring(ring.get_mut());
            self.source.flush_userspace(&mut deltas);
            info!(
                "--keep-attached: the programs stay attached to {} and keep counting into the maps pinned at {}; the next `detector run --iface {}` adopts them",
                self.iface,
                p.path.display(),
                self.iface
            );
            return Ok(self.records(&deltas));
        }
        if let Some(p) = &self.pins
            && let Err(e) = p.unpin_links()
        {
            warn!("removing the pinned links at {}: {e}", p.path.display());
        }
        xdp::detach(&mut self.bpf);
        self.ticker.take();
        let mut out = self.started();
        let mut deltas = Vec::new();
        self.source.drain_ring(ring.get_mut());
        self.source.flush(&mut deltas)?;
        let k = self.source.counters()?;
        self.losses.check(&k);
        match xdp::final_check(&k, &self.source.drain) {
            Ok(n) => info!("every packet the kernel counted was exported ({n} packets)"),
            Err(e) => warn!("{e}"),
        }
        if let Some(p) = self.pins.take() {
            let path = p.path.clone();
            if let Err(e) = p.remove() {
                warn!("removing the pinned state at {}: {e}", path.display());
            }
        }
        out.extend(self.records(&deltas));
        Ok(out)
    }

    fn status(&self) -> Result<crate::status::MeterStatus> {
        let (kernel_flows, overflow_flows) = self.source.flow_counts();
        Ok(crate::status::MeterStatus {
            iface: self.iface.clone(),
            kernel: self.source.counters()?,
            drain: self.source.drain.clone(),
            kernel_flows: kernel_flows as u64,
            overflow_flows: overflow_flows as u64,
            map_size: self.map_size.into(),
        })
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

/// NetFlow/IPFIX ingest: the listeners, and their kernel drop counts as last logged.
struct Ingest {
    listeners: Vec<Listener>,
    drops_logged: Vec<u64>,
    /// sFlow listeners (`--sflow-listen`), and their kernel drops as last logged.
    sflow: Vec<SflowListener>,
    sflow_drops_logged: Vec<u64>,
}

impl Ingest {
    /// Logs each increase of a listener's kernel drops.
    fn check(&mut self) {
        for (l, logged) in self.listeners.iter().zip(&mut self.drops_logged) {
            let drops = l.kernel_drops();
            if drops > *logged {
                warn!(
                    "listener {}: the kernel dropped {drops} datagrams so far (receive buffer full; raise --netflow-rcvbuf, or more --workers)",
                    l.addr
                );
                *logged = drops;
            }
        }
        for (l, logged) in self.sflow.iter().zip(&mut self.sflow_drops_logged) {
            let drops = l.kernel_drops();
            if drops > *logged {
                warn!(
                    "sflow listener {}: the kernel dropped {drops} datagrams so far (receive buffer full; raise --netflow-rcvbuf)",
                    l.addr
                );
                *logged = drops;
            }
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                format!(
                    "listener {}: kernel drops {}, {}",
                    l.addr,
                    l.kernel_drops(),
                    l.read_stats.describe()
                )
            })
            .collect();
        let (mut rejected, mut over) = (0, 0);
        for d in self.listeners.iter().flat_map(|l| &l.decoders) {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            parts.extend(d.describe_exporters());
            rejected += d.global.rejected;
            over += d.global.over_exporter_limit;
        }
        if !self.listeners.is_empty() {
            parts.push(format!(
                "rejected by --exporter-allow {rejected}, over the exporter limit {over}"
            ));
        }
        for l in &self.sflow {
            let d = l.decoder.lock().unwrap_or_else(|p| p.into_inner());
            let g = &d.global;
            parts.push(format!(
                "sflow listener {}: kernel drops {} rejected by --exporter-allow {} over the source limit {} header errors {:?} flows {} over the flow limit {} over the interface limit {}",
                l.addr,
                l.kernel_drops(),
                g.rejected,
                g.over_source_limit,
                g.errors,
                d.flows(),
                g.over_flow_limit,
                g.over_interface_limit
            ));
            parts.extend(d.describe_sources());
        }
        parts.join("; ")
    }

    fn status(&self) -> Vec<crate::status::ListenerStatus> {
        self.listeners
            .iter()
            .map(|l| {
                let (mut exporters, mut rejected, mut over) = (Vec::new(), 0, 0);
                for d in &l.decoders {
                    let d = d.lock().unwrap_or_else(|p| p.into_inner());
                    exporters.extend(d.exporter_stats());
                    rejected += d.global.rejected;
                    over += d.global.over_exporter_limit;
                }
                crate::status::ListenerStatus {
                    addr: Some(l.addr),
                    kernel_drops: l.kernel_drops(),
                    rejected,
                    over_exporter_limit: over,
                    exporters,
                }
            })
            .collect()
    }

    fn sflow_status(&self) -> Vec<crate::status::SflowStatus> {
        let mut room = crate::status::metrics::SFLOW_INTERFACES;
        self.sflow
            .iter()
            .map(|l| {
                let d = l.decoder.lock().unwrap_or_else(|p| p.into_inner());
                let all = d.interfaces();
                let interfaces: Vec<_> = all.iter().take(room).map(|(k, c)| (*k, *c)).collect();
                room -= interfaces.len();
                crate::status::SflowStatus {
                    addr: Some(l.addr),
                    kernel_drops: l.kernel_drops(),
                    global: d.global.clone(),
                    flows: d.flows() as u64,
                    sources: d.source_stats(),
                    interfaces_left_out: (all.len() - interfaces.len()) as u64,
                    interfaces,
                }
            })
            .collect()
    }

    /// Stops reading (after the sockets are empty) and waits for the decoder threads
    /// (the sFlow listeners hand over every flow they hold).
    fn stop(&mut self, stop: &AtomicBool) {
        stop.store(true, Ordering::Relaxed);
        for l in &mut self.listeners {
            l.join();
        }
        for l in &mut self.sflow {
            l.join();
        }
    }
}

/// What the main loop tells the evaluator thread.
enum Control {
    Stop,
    /// A reloaded configuration (SIGHUP).
    Reload(
        Box<(
            crate::detect::DetectConfig,
            crate::export::alarms::AlarmSink,
        )>,
    ),
    /// Open the output files again (SIGHUP without --config).
    Reopen,
}

/// Runs the pipeline's periodic work (duplicate expiry, evaluations, alarm events, its
/// statistics line, the `--http` status) every second on a thread of its own, until
/// told to stop; then hands the pipeline back.
fn start_evaluator(
    mut pipeline: Pipeline,
    stats_every: Duration,
    status: Option<Arc<Status>>,
) -> (
    std::sync::mpsc::Sender<Control>,
    std::thread::JoinHandle<Pipeline>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<Control>();
    let handle = std::thread::Builder::new()
        .name("evaluator".into())
        .spawn(move || {
            crate::privileges::drop_thread_capabilities();
            let mut last_stats = std::time::Instant::now();
            let mut evaluations = 0;
            loop {
                match rx.recv_timeout(DRAIN_INTERVAL) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(Control::Reload(new)) => {
                        let (detect, alarms) = *new;
                        pipeline.reconfigure(detect, alarms);
                        continue;
                    }
                    Ok(Control::Reopen) => {
                        pipeline.reopen();
                        continue;
                    }
                    Ok(Control::Stop) | Err(_) => return pipeline,
                }
                let now = SystemTime::now();
                let events = pipeline.tick(now, false);
                if let Some(status) = &status {
                    let stats = pipeline.stats();
                    let evaluated = stats.engine.evaluations != evaluations;
                    evaluations = stats.engine.evaluations;
                    // The top hosts and the open alarms, with their drill-downs.
                    let top = evaluated.then(|| {
                        pipeline.explain_detailed(
                            crate::status::TOP_HOSTS,
                            crate::status::detail::DETAIL_HOSTS,
                        )
                    });
                    status.update(|s| {
                        s.pipeline = stats;
                        s.apply_events(&events);
                        if let Some(top) = top {
                            s.evaluated_detailed(now, top);
                        }
                    });
                }
                if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
                    last_stats = std::time::Instant::now();
                    info!("{}", pipeline.describe());
                }
            }
        })
        .expect("spawn the evaluator thread");
    (tx, handle)
}

pub async fn run(args: RunArgs) -> Result<()> {
    if let Some(iface) = &args.iface {
        xdp::ifindex(iface)?;
    }
    let boot = SystemTime::now();
    let v9 = V9Config {
        source_id: args.source_id,
        format: args.export_format,
        template_refresh_packets: args.template_refresh_packets,
        template_refresh_secs: args.template_refresh_secs,
        sampling_interval: args.sampling,
        ..V9Config::default()
    };
    let (detect, mut alarms) = build::detection(&args.detect.options())?;
    if let Some(name) = &args.agent_name {
        // `observer.name` of the ECS alarms (a reload keeps it).
        alarms.encoder.observer.name = name.clone();
    }
    let mut sinks = build::sinks(
        &args.export,
        args.flows_json.as_deref(),
        v9,
        boot,
        args.nats.is_some(),
    )?;
    if let Some(url) = &args.nats {
        let name = args.agent_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "agent".into())
        });
        let sink = crate::scaleout::edge::NatsSink::start(
            url,
            &name,
            args.nats_shards,
            args.nats_buffer as usize,
            Arc::new(detect.clone()),
        )
        .with_context(|| format!("starting the NATS publisher for {url}"))?;
        info!(
            "edge {name}: publishing every record to {url} ({} shards)",
            args.nats_shards
        );
        sinks.push(Box::new(sink));
    }
    let cfg = PipelineConfig::new(args.workers.map(|w| w as usize), WhenBehind::Shed);
    let mut pipeline = Pipeline::new(&cfg, sinks, detect, alarms);
    let input = pipeline.input();
    // Operators' decisions: read now, kept across reloads (SIGHUP leaves them be).
    let decisions = Arc::new(crate::status::decisions::Store::for_run(
        args.decisions.as_deref(),
        args.detect.config.as_deref(),
        SystemTime::now(),
    )?);
    pipeline.set_decisions(decisions.clone());

    // Served on a thread of its own, which holds no capability.
    let http = match build::http_listen(args.http, &args.detect.options())? {
        Some(addr) => {
            // TLS and authentication (--http-config), checked before anything binds.
            let web = build::http_config(args.http_config.as_deref(), &args.detect.options())?;
            let listener = crate::status::server::bind(addr)?;
            let status = Arc::new(Status::new(boot).with_decisions(decisions.clone()));
            let local = listener.local_addr().unwrap_or(addr);
            info!(
                "status on {}://{local}/ (also /metrics, /api/alarms, /api/hosts?top=N); {}",
                web.scheme(),
                web.describe().trim_end().replace('\n', "; ")
            );
            if !web.authenticates() && !local.ip().is_loopback() {
                warn!(
                    "--http on {local} without authentication: whoever reaches the port reads the alarms and the hosts (and writes, from outside a browser); give --http-config with basic_auth_users or bearer_tokens, or bind 127.0.0.1"
                );
            }
            Some((
                status.clone(),
                crate::status::server::HttpThread::start(listener, status, web)
                    .context("starting the --http server's thread")?,
            ))
        }
        None => {
            if let Some(f) = &args.http_config {
                bail!(
                    "--http-config {} is given without --http: add --http [ADDR:]PORT (or [http] listen in --config)",
                    f.display()
                );
            }
            None
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut ingest = None;
    if !args.netflow_listen.is_empty() {
        let mut listeners = Vec::new();
        for addr in &args.netflow_listen {
            let allow = args.exporter_allow.clone();
            let l = Listener::start(
                *addr,
                args.netflow_rcvbuf,
                cfg.workers,
                &DecodeLimits::default(),
                &allow,
                &input,
                &stop,
            )?;
            info!(
                "receiving NetFlow/IPFIX on {} ({} parser threads, receive buffer {} bytes)",
                l.addr, l.parsers, l.rcvbuf
            );
            // Less than asked: net.core.rmem_max capped it (raising past it needs
            // CAP_NET_ADMIN).
            if l.rcvbuf < args.netflow_rcvbuf {
                warn!(
                    "listener {}: asked for a {} byte receive buffer, the kernel granted {} (net.core.rmem_max); bursts beyond it are dropped: run with CAP_NET_ADMIN or `sysctl -w net.core.rmem_max={}`",
                    l.addr, args.netflow_rcvbuf, l.rcvbuf, args.netflow_rcvbuf
                );
            }
            listeners.push(l);
        }
        let n = listeners.len();
        ingest = Some(Ingest {
            listeners,
            drops_logged: vec![0; n],
            sflow: Vec::new(),
            sflow_drops_logged: Vec::new(),
        });
    }
    if !args.sflow_listen.is_empty() {
        let timeouts = SflowTimeouts {
            active: Duration::from_secs(args.active_timeout),
            inactive: Duration::from_secs(args.inactive_timeout),
            // Detection hears of sampled flows as they start and grow, as of the meter's.
            // (--live-interval 0: starts only.)
            live: Some(match args.live_interval {
                0 => Duration::MAX,
                s => Duration::from_secs(s),
            }),
        };
        let i = ingest.get_or_insert_with(|| Ingest {
            listeners: Vec::new(),
            drops_logged: Vec::new(),
            sflow: Vec::new(),
            sflow_drops_logged: Vec::new(),
        });
        for addr in &args.sflow_listen {
            let l = SflowListener::start(
                *addr,
                args.netflow_rcvbuf,
                SflowLimits::default(),
                timeouts,
                &args.exporter_allow,
                &input,
                &stop,
            )?;
            info!(
                "receiving sFlow on {} (receive buffer {} bytes; flows cut at {} s active, {} s inactive)",
                l.addr, l.rcvbuf, args.active_timeout, args.inactive_timeout
            );
            if l.rcvbuf < args.netflow_rcvbuf {
                warn!(
                    "sflow listener {}: asked for a {} byte receive buffer, the kernel granted {} (net.core.rmem_max): run with CAP_NET_ADMIN or `sysctl -w net.core.rmem_max={}`",
                    l.addr, args.netflow_rcvbuf, l.rcvbuf, args.netflow_rcvbuf
                );
            }
            i.sflow.push(l);
            i.sflow_drops_logged.push(0);
        }
    }

    let (mut meter, mut ring) = match &args.iface {
        Some(iface) => {
            let (m, r) = Meter::start(&args, iface)?;
            (Some(m), Some(r))
        }
        None => (None, None),
    };
    // Attached, maps and sockets open: keep only what the rest of the run needs.
    match crate::privileges::keep_only(crate::privileges::KEPT_WHILE_RUNNING) {
        Ok(()) => info!(
            "privileges: dropped every capability but CAP_NET_ADMIN (to detach at exit); no_new_privs set"
        ),
        Err(e) => warn!("privileges: could not drop capabilities: {e}"),
    }
    // The server's thread is joined when `run` returns.
    let (status, _http_thread) = http.unzip();
    for s in pipeline.sink_names() {
        info!("exporting to {s}");
    }
    info!(
        "duplicate marking and detection on {} worker threads",
        pipeline.workers()
    );
    let stats_every = Duration::from_secs(args.stats_interval);
    let (stop_evaluator, evaluator) = start_evaluator(pipeline, stats_every, status.clone());

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stats = tokio::time::Instant::now();

    loop {
        tokio::select! {
            _ = tick.tick() => {
                let records = match (meter.as_mut(), ring.as_mut()) {
                    (Some(m), Some(r)) => m.tick(r)?,
                    _ => Vec::new(),
                };
                input.emit(records, SystemTime::now());
                if let Some(i) = ingest.as_mut() {
                    i.check();
                }
                if let Some(status) = &status {
                    // A failed read keeps the last counters (and is logged).
                    let meter = match meter.as_ref().map(Meter::status).transpose() {
                        Ok(m) => Some(m),
                        Err(e) => {
                            warn!("reading the meter's counters: {e}");
                            None
                        }
                    };
                    let listeners = ingest.as_ref().map(Ingest::status).unwrap_or_default();
                    let sflow = ingest.as_ref().map(Ingest::sflow_status).unwrap_or_default();
                    status.update(|s| {
                        if let Some(m) = meter {
                            s.meter = m;
                        }
                        s.listeners = listeners;
                        s.sflow = sflow;
                    });
                }
                if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
                    last_stats = tokio::time::Instant::now();
                    log_stats(meter.as_ref(), ingest.as_ref());
                }
            }
            guard = ring_ready(&mut ring) => {
                let mut guard = guard.context("waiting on the overflow ring buffer")?;
                if let Some(m) = meter.as_mut() {
                    m.source.drain_ring(guard.get_inner_mut());
                }
                guard.clear_ready();
            }
            _ = sighup.recv() => reload(&args, &stop_evaluator),
            _ = sigint.recv() => { info!("SIGINT: detaching and flushing every flow"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching and flushing every flow"); break; }
        }
    }

    // Datagrams already received are decoded, then the meter's flows flushed, then the
    // pipeline finishes what it was handed.
    if let Some(i) = ingest.as_mut() {
        i.stop(&stop);
        i.check();
    }
    if let (Some(m), Some(r)) = (meter.as_mut(), ring.as_mut()) {
        input.emit(m.stop(r)?, SystemTime::now());
    }
    drop(input);
    let _ = stop_evaluator.send(Control::Stop);
    let pipeline = evaluator
        .join()
        .map_err(|_| anyhow::anyhow!("the evaluator thread panicked"))?;
    log_stats(meter.as_ref(), ingest.as_ref());
    let done = pipeline.finish(SystemTime::now());
    info!("{}", done.describe);
    Ok(())
}

/// SIGHUP: reads `--config` again and hands it to the pipeline (flows held, profiles and
/// open alarms stay); a file that does not load is refused and the running
/// configuration kept. Output files are opened again either way (log rotation).
fn reload(args: &RunArgs, evaluator: &std::sync::mpsc::Sender<Control>) {
    let Some(path) = &args.detect.config else {
        info!("SIGHUP: no --config to reload; output files reopened");
        let _ = evaluator.send(Control::Reopen);
        return;
    };
    match build::detection(&args.detect.options()) {
        Ok((detect, alarms)) => {
            info!(
                "SIGHUP: reloaded {} (alarm threshold {:.1}, {} internal networks, window {} s); flows, profiles and open alarms kept; output files reopened",
                path.display(),
                detect.thresholds.score,
                detect.internal.len(),
                detect.window.as_secs()
            );
            let _ = evaluator.send(Control::Reload(Box::new((detect, alarms))));
        }
        Err(e) => {
            warn!(
                "SIGHUP: {} not reloaded, the running configuration is kept: {e:#}",
                path.display()
            );
            let _ = evaluator.send(Control::Reopen);
        }
    }
}

fn log_stats(meter: Option<&Meter>, ingest: Option<&Ingest>) {
    if let Some(m) = meter {
        match m.describe() {
            Ok(s) => info!("{s}"),
            Err(e) => warn!("reading the meter's counters: {e}"),
        }
    }
    if let Some(i) = ingest {
        info!("ingest: {}", i.describe());
    }
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
