//! The `run` shell: sockets, timers, signals and BPF I/O around the pure core.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use log::{info, warn};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;
use crate::export::Sink;
use crate::export::json::JsonSink;
use crate::export::netflow_v9::{self, V9Config, V9Sink};
use crate::flow::table::{Delta, Timeouts};
use crate::flow::{FlowRecord, WallClock, monotonic_ns, record_from_delta};
use crate::sources::xdp::{self, KernelCounters, LoadOptions, XdpSource};
use detector_common::counter;

/// How often the kernel map is scanned.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the sinks the flags ask for; with neither `--export` nor `--flows-json`, JSON to stdout.
fn sinks(args: &RunArgs, boot: SystemTime) -> Result<Vec<Box<dyn Sink + Send>>> {
    let mut sinks: Vec<Box<dyn Sink + Send>> = Vec::new();
    if !args.export.is_empty() {
        let targets = args
            .export
            .iter()
            .map(|t| netflow_v9::resolve(t))
            .collect::<Result<Vec<_>, _>>()?;
        let cfg = V9Config {
            source_id: args.source_id,
            template_refresh_packets: args.template_refresh_packets,
            template_refresh_secs: args.template_refresh_secs,
            sampling_interval: args.sampling,
            ..V9Config::default()
        };
        sinks.push(Box::new(V9Sink::new(&targets, cfg, boot)?));
    }
    let json = match (&args.flows_json, args.export.is_empty()) {
        (Some(p), _) => Some(p.as_str()),
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

struct Pipeline {
    sinks: Vec<Box<dyn Sink + Send>>,
    sampling: u32,
    exported_records: u64,
    exported_packets: u64,
    exported_bytes: u64,
}

impl Pipeline {
    fn emit(&mut self, deltas: &[Delta]) {
        let clock = WallClock::now();
        let records: Vec<FlowRecord> = deltas
            .iter()
            .map(|d| record_from_delta(d, &clock, self.sampling))
            .collect();
        for r in &records {
            self.exported_packets += r.packets;
            self.exported_bytes += r.bytes;
        }
        self.exported_records += records.len() as u64;
        let now = SystemTime::now();
        for s in &mut self.sinks {
            s.send(&records, now);
        }
    }

    fn describe(&self) -> String {
        let sinks: Vec<_> = self.sinks.iter().map(|s| s.describe()).collect();
        format!(
            "exported {} records ({} packets, {} bytes); {}",
            self.exported_records,
            self.exported_packets,
            self.exported_bytes,
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
                "flow map full: {} packets took the ring-buffer overflow path so far (raise --map-size)",
                insert_failed
            );
            self.insert_failed = insert_failed;
        }
        let dropped = k.total(counter::RINGBUF_DROPPED);
        if dropped > self.ringbuf_dropped {
            warn!(
                "overflow ring buffer full: {} packets could not be accounted (raise --map-size)",
                dropped
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

pub async fn run(args: RunArgs) -> Result<()> {
    let ifindex = xdp::ifindex(&args.iface)?;
    if let Some(msg) = crate::privileges::check("attaching XDP/TC programs") {
        bail!(msg);
    }
    let boot = SystemTime::now();
    let mut pipeline = Pipeline {
        sinks: sinks(&args, boot)?,
        sampling: args.sampling,
        exported_records: 0,
        exported_packets: 0,
        exported_bytes: 0,
    };
    raise_memlock_limit();
    let mut bpf = xdp::load_object(LoadOptions {
        map_size: args.map_size,
        sampling: args.sampling,
    })?;
    let timeouts = Timeouts::from_secs(args.active_timeout, args.inactive_timeout);
    let mut source = XdpSource::new(&mut bpf, timeouts, ifindex)?;
    let ticker = xdp::clock::Ticker::start(source.clock(), Duration::from_millis(1))
        .context("starting the packet clock")?;
    let mode = xdp::attach(&mut bpf, &args.iface, args.xdp_mode)?;
    xdp::log_attached(&args.iface, mode, args.map_size, args.sampling);
    for s in &pipeline.sinks {
        info!("exporting to {}", s.name());
    }

    let ring = source.take_ring().context("overflow ring buffer")?;
    // SAFETY: the ring buffer owns its file descriptor and keeps it open while the AsyncFd
    // owns the ring buffer.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.context("polling the overflow ring buffer")?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats_every = Duration::from_secs(args.stats_interval);
    let mut last_stats = tokio::time::Instant::now();
    let mut losses = LossWatch::default();
    let mut deltas = Vec::new();

    loop {
        tokio::select! {
            _ = tick.tick() => {
                source.drain_ring(ring.get_mut());
                source.scan(monotonic_ns(), &mut deltas)?;
                pipeline.emit(&deltas);
                deltas.clear();
                let k = source.counters()?;
                losses.check(&k);
                if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
                    last_stats = tokio::time::Instant::now();
                    log_stats(&source, &k, &pipeline);
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the overflow ring buffer")?;
                source.drain_ring(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = sigint.recv() => { info!("SIGINT: detaching and flushing every flow"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching and flushing every flow"); break; }
        }
    }

    // Detach first so no packet is counted after the final read, then drain everything.
    xdp::detach(&mut bpf);
    drop(ticker);
    source.drain_ring(ring.get_mut());
    source.flush(&mut deltas)?;
    pipeline.emit(&deltas);
    let k = source.counters()?;
    losses.check(&k);
    log_stats(&source, &k, &pipeline);
    Ok(())
}

fn log_stats(source: &XdpSource, k: &KernelCounters, pipeline: &Pipeline) {
    let (kernel, overflow) = source.flow_counts();
    info!(
        "flows: {kernel} in the kernel map, {overflow} in the overflow table; kernel counters: {}; overflow events read: {}, overflow table full: {}; {}",
        k.describe(),
        source.drain.overflow_events,
        source.drain.overflow_table_full,
        pipeline.describe()
    );
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
