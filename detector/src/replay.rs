//! `detector replay CAPTURE`: every frame of a capture through the real XDP program with
//! BPF_PROG_TEST_RUN, the flow maps drained on the capture's own clock; or, with
//! `--netflow`, the NetFlow/IPFIX datagrams of a capture through the decoder. Same sinks
//! as `run`.
//!
//! The capture clock: before each frame the packet clock map is set to the frame's
//! timestamp, and the maps are scanned whenever that clock passes a second. Timestamps
//! that go backwards are held at the latest seen (flows never age backwards); a jump
//! forward, even by years, simply ages out every flow, as it would live.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use log::info;

use crate::export::netflow_v9::V9Config;
use crate::flow::table::Timeouts;
use crate::flow::{FlowRecord, WallClock, record_from_delta};
use crate::pipeline::{Pipeline, PipelineConfig, WhenBehind, build};
use crate::sources::capture::Capture;
use crate::sources::netflow::capture::decode_capture;
use crate::sources::netflow::decode::{Cidr, DecodeLimits, Decoder};
use crate::sources::xdp::{self, LoadOptions, XDP_PROGRAM, XdpSource};
use detector_common::counter;

/// BPF_PROG_TEST_RUN runs XDP programs on the loopback device.
const TEST_RUN_IFINDEX: u32 = 1;
/// The kernel refuses XDP test runs shorter than an Ethernet header.
const MIN_FRAME: usize = 14;

/// What `replay` does (the command line's `detector replay` gives it).
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// A pcap or pcapng file.
    pub capture: PathBuf,
    /// Decode the NetFlow/IPFIX datagrams inside the capture instead of metering it,
    /// only UDP to `port` if given, from `exporter_allow` if not empty.
    pub netflow: bool,
    pub port: Option<u16>,
    pub exporter_allow: Vec<Cidr>,
    /// NetFlow v9/IPFIX collectors, the protocol and source id of the export.
    pub export: Vec<String>,
    pub export_format: crate::export::netflow_v9::ExportFormat,
    pub source_id: u32,
    /// JSON lines of the records to this path (`-` for stdout).
    pub flows_json: Option<String>,
    pub detect: crate::pipeline::build::DetectOptions,
    /// Active and inactive timeouts on the capture's clock, seconds.
    pub active_timeout: u64,
    pub inactive_timeout: u64,
    /// Flows each kernel map holds.
    pub map_size: u32,
    /// Payload signatures of the first packets (see `run --payload-hints`).
    pub payload_hints: bool,
    /// Worker threads for duplicate marking and detection.
    pub workers: u32,
}

pub fn replay(args: ReplayOptions) -> Result<()> {
    let boot = SystemTime::now();
    let v9 = V9Config {
        source_id: args.source_id,
        format: args.export_format,
        ..V9Config::default()
    };
    let (detect, alarms) = build::detection(&args.detect)?;
    let cfg = PipelineConfig::new(Some(args.workers as usize), WhenBehind::Wait);
    let pipeline = Pipeline::new(
        &cfg,
        build::sinks(&args.export, args.flows_json.as_deref(), v9, boot, false)?,
        detect,
        alarms,
    );
    if args.netflow {
        replay_netflow(&args, pipeline)
    } else {
        replay_frames(&args, pipeline)
    }
}

fn replay_netflow(args: &ReplayOptions, mut pipeline: Pipeline) -> Result<()> {
    let mut decoder = Decoder::new(DecodeLimits::default(), args.exporter_allow.clone());
    let mut latest = SystemTime::UNIX_EPOCH;
    let stats = decode_capture(&args.capture, args.port, &mut decoder, |records| {
        for r in &records {
            latest = latest.max(r.last);
        }
        pipeline.emit(records, latest);
        pipeline.tick(latest, false);
    })?;
    pipeline.emit(Vec::new(), latest);
    let done = pipeline.finish(latest);
    eprintln!(
        "replay --netflow {}: {} frames, {} NetFlow/IPFIX datagrams, {} other UDP skipped",
        args.capture.display(),
        stats.frames,
        stats.datagrams,
        stats.skipped
    );
    for line in decoder.describe_exporters() {
        eprintln!("  {line}");
    }
    report_suspects(&done);
    eprintln!("{}", done.describe);
    sinks_ok(&done)
}

/// Counters of a frame replay.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub frames: u64,
    pub too_short: u64,
    pub unsupported_link: u64,
    pub backwards: u64,
}

fn replay_frames(args: &ReplayOptions, mut pipeline: Pipeline) -> Result<()> {
    if let Some(msg) =
        crate::privileges::check("replay (it runs the XDP program with BPF_PROG_TEST_RUN)")
    {
        bail!(msg);
    }
    let mut cap = Capture::open(&args.capture)?;
    let mut bpf = xdp::load_object(LoadOptions {
        map_size: args.map_size,
        sampling: 1,
        payload_hints: args.payload_hints,
        live_flows: false,
        flow_slots: xdp::FLOW_SLOTS_HERE,
    })?;
    let timeouts = Timeouts::from_secs(args.active_timeout, args.inactive_timeout);
    let mut source = XdpSource::new(&mut bpf, timeouts, TEST_RUN_IFINDEX)?;
    let mut ring = source.take_ring().context("overflow ring buffer")?;
    let clock = source.clock();
    {
        let prog: &mut Xdp = bpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program")?
            .try_into()?;
        prog.load().context("loading the XDP program")?;
    }
    let prog: &Xdp = bpf
        .program(XDP_PROGRAM)
        .context("XDP program")?
        .try_into()?;

    // Kernel timestamps here are the capture's, in ns since the epoch: wall = kernel.
    let wall = WallClock::from_pair(0, SystemTime::UNIX_EPOCH);
    let started = Instant::now();
    let bar = ProgressBar::with_draw_target(Some(cap.file_len), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
            .expect("static template"),
    );
    let mut shown = false;
    let mut summary = ReplaySummary::default();
    let mut now_ns = 0u64;
    let mut next_scan_ns = 0u64;
    let mut deltas = Vec::new();
    let mut read_bytes = 0u64;
    let emit = |deltas: &mut Vec<_>, pipeline: &mut Pipeline, now_ns: u64| {
        let records: Vec<FlowRecord> = deltas
            .drain(..)
            .map(|d| record_from_delta(&d, &wall, 1))
            .collect();
        let now = wall.to_wall(now_ns);
        pipeline.emit(records, now);
        pipeline.tick(now, false);
    };

    while let Some(frame) = cap.next_frame() {
        let frame = frame?;
        summary.frames += 1;
        read_bytes += frame.data.len() as u64 + 16;
        if !shown && started.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        if summary.frames % 1024 == 0 {
            bar.set_position(read_bytes.min(cap.file_len));
        }
        let ts = frame.ts.as_nanos().min(u64::MAX as u128) as u64;
        if ts < now_ns {
            summary.backwards += 1;
        } else {
            now_ns = ts;
        }
        if now_ns >= next_scan_ns {
            if next_scan_ns != 0 {
                source.drain_ring(&mut ring);
                source.scan(now_ns, &mut deltas)?;
                emit(&mut deltas, &mut pipeline, now_ns);
            }
            next_scan_ns = now_ns + 1_000_000_000;
        }
        if frame.data.len() < MIN_FRAME {
            summary.too_short += 1;
            continue;
        }
        clock.set(now_ns.max(1));
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame.data);
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        debug_assert_eq!(r.return_value, 2, "the meter passes every frame");
    }
    summary.unsupported_link = cap.stats.unsupported_link;
    source.drain_ring(&mut ring);
    source.flush(&mut deltas)?;
    emit(&mut deltas, &mut pipeline, now_ns);
    let done = pipeline.finish(wall.to_wall(now_ns));
    clock.set(0);
    bar.finish_and_clear();

    let k = source.counters()?;
    let failures: Vec<String> = (counter::FIRST_ERR..counter::COUNT)
        .filter_map(|c| {
            let v = k.total(c);
            (v > 0).then(|| format!("{}={v}", counter::NAMES[c as usize]))
        })
        .collect();
    eprintln!(
        "replay {}: {} frames ({} too short, {} of unsupported link type, {} with timestamps going backwards), {} packets in {} flow records, non-IP {}, parse failures: {}",
        args.capture.display(),
        summary.frames,
        summary.too_short,
        summary.unsupported_link,
        summary.backwards,
        k.total(counter::FLOW_PACKETS) + k.total(counter::OVERFLOW_PACKETS),
        done.records,
        k.total(counter::NOT_IP),
        if failures.is_empty() {
            "none".to_string()
        } else {
            failures.join(" ")
        }
    );
    report_suspects(&done);
    info!("{}", done.describe);
    sinks_ok(&done)
}

/// A replay whose output was not all written failed, whatever it read.
fn sinks_ok(done: &crate::pipeline::Finished) -> Result<()> {
    if done.sink_failures > 0 {
        bail!(
            "{} writes or sends of the output failed (see the warnings above and the statistics line)",
            done.sink_failures
        );
    }
    Ok(())
}

/// The hosts with the highest detection scores at the end of a replay.
fn report_suspects(done: &crate::pipeline::Finished) {
    for line in detection_report(done) {
        eprintln!("  {line}");
    }
}

/// What detection made of the replay: each profiled host's score and rule values (the
/// highest first), or, when records came but no host was profiled, why.
pub fn detection_report(done: &crate::pipeline::Finished) -> Vec<String> {
    let t = done.score_threshold;
    let e = &done.engine;
    let mut out = Vec::new();
    if done.hosts_profiled == 0 {
        if e.records > 0 {
            out.push(format!(
                "detection: {} records, but no host counted as internal, so none was profiled (records with both ends internal, private to private: {}; with neither end internal, public addresses only: {}; allow-listed: {}); the internal networks were {}: name yours with --internal CIDR (repeatable) or [networks] internal in --config",
                e.records,
                e.both_internal,
                e.neither_internal,
                e.allow_listed,
                done.internal.join(", ")
            ));
        }
        return out;
    }
    out.push(format!(
        "detection: {} hosts profiled; the {} highest scores (alarm threshold {t:.1}):",
        done.hosts_profiled,
        done.hosts.len()
    ));
    for (ip, v) in &done.hosts {
        let rules: Vec<String> = v
            .evidence
            .iter()
            .map(|x| {
                format!(
                    "{}{}={} ({} {})",
                    if x.fired { "+" } else { "" },
                    x.rule,
                    short(x.value),
                    x.op,
                    short(x.threshold)
                )
            })
            .collect();
        out.push(format!(
            "host {ip} score {:.1} (peak {:.1} unvetoed) kind {}{}{}: {}",
            v.score,
            v.peak,
            v.kind,
            if v.kind_evidence.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.kind_evidence.join(", "))
            },
            v.guard
                .map(|g| {
                    let why = v
                        .guard_evidence
                        .iter()
                        .find(|e| e.starts_with(g))
                        .map_or("", |e| e.as_str());
                    format!(" (vetoed: {why})")
                })
                .unwrap_or_default(),
            rules.join(", ")
        ));
    }
    out.push("(+ marks the rules that fired)".to_string());
    out
}

/// A rule value as a person reads it: whole numbers without decimals, shares with two.
fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
