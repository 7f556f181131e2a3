//! `/metrics`: the [`State`] in the Prometheus text exposition format, encoded by the
//! `prometheus` crate. Names follow the Prometheus conventions: a `detector_` prefix,
//! base units in the name (`_bytes`, `_seconds`), `_total` on counters; the labels say
//! the direction, reason, exporter, listener, sink or state.

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use super::State;
use detector_common::counter;

/// The content type of the text format.
pub fn content_type() -> String {
    TextEncoder::new().format_type().to_string()
}

/// Registers metric families and their samples; a family without samples is left out.
struct Families {
    registry: Registry,
}

impl Families {
    fn register(&self, c: impl Collector + 'static) {
        // Names are fixed in this file and each registered once.
        self.registry
            .register(Box::new(c))
            .expect("metric names are unique and valid");
    }

    /// A counter family: `name` (ending in `_total`), its help, label names, samples.
    fn counter<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: impl IntoIterator<Item = ([String; N], u64)>,
    ) {
        let vec = IntCounterVec::new(Opts::new(name, help), &labels).expect("valid metric");
        for (values, v) in samples {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            vec.with_label_values(&values).inc_by(v);
        }
        self.register(vec);
    }

    fn gauge<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: impl IntoIterator<Item = ([String; N], f64)>,
    ) {
        let vec = GaugeVec::new(Opts::new(name, help), &labels).expect("valid metric");
        for (values, v) in samples {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            vec.with_label_values(&values).set(v);
        }
        self.register(vec);
    }

    fn counter1(&self, name: &str, help: &str, v: u64) {
        self.counter(name, help, [], [([], v)]);
    }

    fn gauge1(&self, name: &str, help: &str, v: f64) {
        self.gauge(name, help, [], [([], v)]);
    }
}

const DIRECTIONS: [&str; 2] = ["ingress", "egress"];

/// The kernel meter's counters: (index, metric name, help).
const METER: [(u32, &str, &str); 11] = [
    (
        counter::FRAMES,
        "detector_meter_frames_total",
        "Frames the XDP/TC programs saw.",
    ),
    (
        counter::FRAME_BYTES,
        "detector_meter_frame_bytes_total",
        "Bytes of the frames the programs saw (L2 length).",
    ),
    (
        counter::FLOW_PACKETS,
        "detector_meter_flow_packets_total",
        "IP packets accounted in the kernel flow maps.",
    ),
    (
        counter::FLOW_BYTES,
        "detector_meter_flow_bytes_total",
        "IP bytes accounted in the kernel flow maps.",
    ),
    (
        counter::INSERT_FAILED,
        "detector_meter_map_full_packets_total",
        "Packets whose flow did not fit in the full kernel map (sent to the overflow ring buffer).",
    ),
    (
        counter::RINGBUF_DROPPED,
        "detector_meter_ring_buffer_dropped_packets_total",
        "Overflow packets the ring buffer had no room for: lost to the export.",
    ),
    (
        counter::OVERFLOW_PACKETS,
        "detector_meter_overflow_packets_total",
        "IP packets sent through the overflow ring buffer.",
    ),
    (
        counter::OVERFLOW_BYTES,
        "detector_meter_overflow_bytes_total",
        "IP bytes sent through the overflow ring buffer.",
    ),
    (
        counter::SAMPLED_OUT,
        "detector_meter_sampled_out_packets_total",
        "Packets skipped by 1-in-N sampling.",
    ),
    (
        counter::NOT_IP,
        "detector_meter_not_ip_frames_total",
        "Frames that are not IPv4 or IPv6 (passed, not a flow).",
    ),
    (
        counter::NEW_FLOWS_DROPPED,
        "detector_meter_new_flows_dropped_total",
        "New flows whose start could not be announced to detection (ring buffer full): counted when exported instead.",
    ),
];

/// The whole state as a scrape.
pub fn encode(s: &State) -> String {
    let f = Families {
        registry: Registry::new(),
    };
    f.gauge(
        "detector_build_info",
        "The agent's version (always 1).",
        ["version"],
        [([env!("CARGO_PKG_VERSION").to_string()], 1.0)],
    );
    if let Some(t) = s.started {
        f.gauge1(
            "detector_start_time_seconds",
            "When the agent started (Unix time).",
            super::unix_secs(t),
        );
    }
    meter(&f, s);
    ingest(&f, s);
    sflow(&f, s);
    pipeline(&f, s);
    http_refused(&f, s);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&f.registry.gather(), &mut out)
        .expect("text encoding into memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

fn by_direction(k: &crate::sources::xdp::KernelCounters, c: u32) -> Vec<([String; 1], u64)> {
    (0..2)
        .map(|d| ([DIRECTIONS[d].to_string()], k.get(d as u8, c)))
        .collect()
}

fn meter(f: &Families, s: &State) {
    let Some(m) = &s.meter else { return };
    let iface = || [m.iface.clone()];
    for (c, name, help) in METER {
        f.counter(name, help, ["direction"], by_direction(&m.kernel, c));
    }
    f.counter(
        "detector_meter_fragments_total",
        "Non-first IP fragments (accounted with ports 0).",
        ["direction"],
        by_direction(&m.kernel, counter::FRAGMENTS),
    );
    let mut failures = Vec::new();
    for c in counter::FIRST_ERR..counter::COUNT {
        let reason = counter::NAMES[c as usize].trim_start_matches("err_");
        for (d, dir) in DIRECTIONS.iter().enumerate() {
            failures.push((
                [dir.to_string(), reason.to_string()],
                m.kernel.get(d as u8, c),
            ));
        }
    }
    f.counter(
        "detector_meter_parse_failures_total",
        "Frames the parser could not read, by reason (passed untouched, not accounted).",
        ["direction", "reason"],
        failures,
    );
    f.gauge(
        "detector_meter_flows",
        "Flows held now, in the kernel maps and in the userspace overflow table.",
        ["table"],
        [
            (["kernel".to_string()], m.kernel_flows as f64),
            (["overflow".to_string()], m.overflow_flows as f64),
        ],
    );
    f.gauge(
        "detector_meter_map_capacity_flows",
        "Flows each kernel flow map (IPv4, IPv6) holds.",
        ["interface"],
        [(iface(), m.map_size as f64)],
    );
    f.counter1(
        "detector_meter_overflow_events_total",
        "Overflow events read from the ring buffer.",
        m.drain.overflow_events,
    );
    f.counter1(
        "detector_meter_overflow_table_full_total",
        "Overflow events lost because the userspace overflow table was full.",
        m.drain.overflow_table_full,
    );
    f.counter1(
        "detector_meter_delete_errors_total",
        "Kernel map deletions that failed.",
        m.drain.delete_errors,
    );
    f.counter1(
        "detector_meter_exported_packets_total",
        "Packets in the records taken from the kernel maps and the overflow table.",
        m.drain.exported_packets,
    );
}

fn ingest(f: &Families, s: &State) {
    if s.listeners.is_empty() {
        return;
    }
    let listener = |l: &super::ListenerStatus| l.addr.map_or(String::new(), |a| a.to_string());
    let per_listener = |get: fn(&super::ListenerStatus) -> u64| -> Vec<([String; 1], u64)> {
        s.listeners
            .iter()
            .map(|l| ([listener(l)], get(l)))
            .collect()
    };
    f.counter(
        "detector_netflow_kernel_drops_total",
        "Datagrams the kernel dropped because the listener's receive buffer was full.",
        ["listener"],
        per_listener(|l| l.kernel_drops),
    );
    f.counter(
        "detector_netflow_rejected_datagrams_total",
        "Datagrams from sources outside --exporter-allow.",
        ["listener"],
        per_listener(|l| l.rejected),
    );
    f.counter(
        "detector_netflow_over_exporter_limit_datagrams_total",
        "Datagrams dropped because the exporter limit was reached.",
        ["listener"],
        per_listener(|l| l.over_exporter_limit),
    );
    let exporters: Vec<_> = s
        .listeners
        .iter()
        .flat_map(|l| l.exporters.iter().map(move |e| (listener(l), e)))
        .collect();
    type Get = fn(
        &crate::sources::netflow::decode::ExporterStats,
        &crate::sources::netflow::decode::PendingStats,
    ) -> u64;
    let families: [(&str, &str, Get); 13] = [
        (
            "detector_netflow_datagrams_total",
            "Datagrams received from the exporter.",
            |e, _| e.datagrams,
        ),
        (
            "detector_netflow_received_bytes_total",
            "Bytes of the datagrams received from the exporter.",
            |e, _| e.bytes,
        ),
        (
            "detector_netflow_records_total",
            "Flow records decoded from the exporter.",
            |e, _| e.records,
        ),
        (
            "detector_netflow_templates_total",
            "Templates and options templates received.",
            |e, _| e.templates,
        ),
        (
            "detector_netflow_options_records_total",
            "Options data records (exporter metadata such as sampling).",
            |e, _| e.options_records,
        ),
        (
            "detector_netflow_no_template_total",
            "Data sets that arrived before their template (held if possible).",
            |e, p| e.no_template + p.cached,
        ),
        (
            "detector_netflow_late_decoded_total",
            "Held data sets decoded once their template came.",
            |_, p| p.replayed,
        ),
        (
            "detector_netflow_held_dropped_total",
            "Held data sets dropped (cache full, too large or expired): lost.",
            |_, p| p.dropped,
        ),
        (
            "detector_netflow_sequence_gaps_total",
            "Times the exporter's sequence number jumped forward.",
            |e, _| e.sequence_gaps,
        ),
        (
            "detector_netflow_sequence_lost_total",
            "Units lost on the way according to the sequence numbers (v9 datagrams, v5 and IPFIX records).",
            |e, _| e.sequence_lost,
        ),
        (
            "detector_netflow_skipped_records_total",
            "Records without the fields of a flow: counted, not forwarded.",
            |e, _| e.skipped_records,
        ),
        (
            "detector_netflow_decode_errors_total",
            "Datagrams or sets that could not be decoded, over every kind.",
            |e, _| e.error_total(),
        ),
        (
            "detector_netflow_compiled_datagrams_total",
            "Datagrams decoded by the templates compiled for their data sets (not by netflow_parser).",
            |e, _| e.fast_datagrams,
        ),
    ];
    for (name, help, get) in families {
        f.counter(
            name,
            help,
            ["listener", "exporter"],
            exporters
                .iter()
                .map(|(l, (ip, e, p))| ([l.clone(), ip.to_string()], get(e, p))),
        );
    }
    f.counter(
        "detector_netflow_packets_total",
        "Export packets received, by protocol version.",
        ["listener", "exporter", "version"],
        exporters.iter().flat_map(|(l, (ip, e, _))| {
            [("v5", e.v5), ("v9", e.v9), ("ipfix", e.ipfix)]
                .map(|(v, n)| ([l.clone(), ip.to_string(), v.to_string()], n))
        }),
    );
    f.counter(
        "detector_netflow_path_records_total",
        "Flow records by decoder: compiled (templates compiled for their data sets) or parser (netflow_parser).",
        ["listener", "exporter", "path"],
        exporters.iter().flat_map(|(l, (ip, e, _))| {
            [("compiled", e.fast_records), ("parser", e.slow_records)]
                .map(|(p, n)| ([l.clone(), ip.to_string(), p.to_string()], n))
        }),
    );
    f.counter(
        "detector_netflow_errors_total",
        "Decode errors, by kind.",
        ["listener", "exporter", "kind"],
        exporters.iter().flat_map(|(l, (ip, e, _))| {
            e.errors
                .iter()
                .map(|(k, n)| ([l.clone(), ip.to_string(), k.to_string()], *n))
                .collect::<Vec<_>>()
        }),
    );
    f.gauge(
        "detector_netflow_held_data_sets",
        "Data sets held now until their template arrives.",
        ["listener", "exporter"],
        exporters
            .iter()
            .map(|(l, (ip, _, p))| ([l.clone(), ip.to_string()], p.held as f64)),
    );
}

/// Interfaces whose sFlow counters are shown, over all listeners (the cardinality of
/// each interface family); the rest are counted in
/// `detector_sflow_interfaces_left_out`.
pub const SFLOW_INTERFACES: usize = 512;

fn sflow(f: &Families, s: &State) {
    if s.sflow.is_empty() {
        return;
    }
    let listener = |l: &super::SflowStatus| l.addr.map_or(String::new(), |a| a.to_string());
    let per_listener = |get: fn(&super::SflowStatus) -> u64| -> Vec<([String; 1], u64)> {
        s.sflow.iter().map(|l| ([listener(l)], get(l))).collect()
    };
    f.counter(
        "detector_sflow_kernel_drops_total",
        "Datagrams the kernel dropped because the sFlow listener's receive buffer was full.",
        ["listener"],
        per_listener(|l| l.kernel_drops),
    );
    f.counter(
        "detector_sflow_rejected_datagrams_total",
        "sFlow datagrams from senders outside --exporter-allow.",
        ["listener"],
        per_listener(|l| l.global.rejected),
    );
    f.counter(
        "detector_sflow_over_source_limit_datagrams_total",
        "sFlow datagrams dropped because the source limit was reached.",
        ["listener"],
        per_listener(|l| l.global.over_source_limit),
    );
    f.counter(
        "detector_sflow_over_flow_limit_packets_total",
        "Sampled packets exported as flows of their own because the flow table was full.",
        ["listener"],
        per_listener(|l| l.global.over_flow_limit),
    );
    f.counter(
        "detector_sflow_over_interface_limit_total",
        "Interface counter records not kept because the interface limit was reached.",
        ["listener"],
        per_listener(|l| l.global.over_interface_limit),
    );
    f.counter(
        "detector_sflow_header_errors_total",
        "sFlow datagrams whose header could not be read, by kind.",
        ["listener", "kind"],
        s.sflow.iter().flat_map(|l| {
            l.global
                .errors
                .iter()
                .map(|(k, n)| ([listener(l), k.to_string()], *n))
                .collect::<Vec<_>>()
        }),
    );
    f.gauge(
        "detector_sflow_flows",
        "Flows aggregated from sFlow samples now.",
        ["listener"],
        s.sflow.iter().map(|l| ([listener(l)], l.flows as f64)),
    );
    f.gauge(
        "detector_sflow_interfaces_left_out",
        "Interfaces with counters that /metrics does not show (over its limit).",
        ["listener"],
        s.sflow
            .iter()
            .map(|l| ([listener(l)], l.interfaces_left_out as f64)),
    );
    let label = |(agent, sub): &crate::sources::sflow::decode::SourceKey| format!("{agent}/{sub}");
    let sources: Vec<_> = s
        .sflow
        .iter()
        .flat_map(|l| l.sources.iter().map(move |x| (listener(l), x)))
        .collect();
    type Get = fn(&crate::sources::sflow::decode::SourceStats) -> u64;
    let families: [(&str, &str, Get); 13] = [
        (
            "detector_sflow_datagrams_total",
            "Datagrams received from the sFlow source.",
            |e| e.datagrams,
        ),
        (
            "detector_sflow_received_bytes_total",
            "Bytes of the datagrams received from the sFlow source.",
            |e| e.bytes,
        ),
        (
            "detector_sflow_flow_samples_total",
            "Flow samples received.",
            |e| e.flow_samples,
        ),
        (
            "detector_sflow_counter_samples_total",
            "Counter samples received.",
            |e| e.counter_samples,
        ),
        (
            "detector_sflow_other_samples_total",
            "Samples of other formats (counted, unused).",
            |e| e.other_samples,
        ),
        (
            "detector_sflow_packets_total",
            "Flow samples that gave an IP packet of a flow.",
            |e| e.packets,
        ),
        (
            "detector_sflow_not_ip_samples_total",
            "Flow samples without a readable IPv4/IPv6 packet.",
            |e| e.not_ip,
        ),
        (
            "detector_sflow_records_total",
            "Flow records made from the source's samples.",
            |e| e.records,
        ),
        (
            "detector_sflow_lost_datagrams_total",
            "Datagrams lost (gaps in the datagram sequence).",
            |e| e.lost_datagrams,
        ),
        (
            "detector_sflow_sequence_resets_total",
            "Times the datagram sequence went back (restart, reordering).",
            |e| e.sequence_resets,
        ),
        (
            "detector_sflow_lost_samples_total",
            "Flow samples lost (gaps in the data sources' sample sequences).",
            |e| e.lost_samples,
        ),
        (
            "detector_sflow_agent_drops_total",
            "Packets the agent selected and dropped for lack of resources (its drops counter).",
            |e| e.agent_drops,
        ),
        (
            "detector_sflow_errors_total",
            "Bad datagrams of the source, all kinds (by kind: detector_sflow_errors_by_kind_total).",
            |e| e.error_total(),
        ),
    ];
    for (name, help, get) in families {
        f.counter(
            name,
            help,
            ["listener", "source"],
            sources
                .iter()
                .map(|(l, (k, e))| ([l.clone(), label(k)], get(e))),
        );
    }
    f.counter(
        "detector_sflow_errors_by_kind_total",
        "Bad datagrams of the source, by kind.",
        ["listener", "source", "kind"],
        sources.iter().flat_map(|(l, (k, e))| {
            e.errors
                .iter()
                .map(|(kind, n)| ([l.clone(), label(k), kind.to_string()], *n))
                .collect::<Vec<_>>()
        }),
    );
    let interfaces: Vec<_> = s
        .sflow
        .iter()
        .flat_map(|l| l.interfaces.iter().map(move |x| (listener(l), x)))
        .take(SFLOW_INTERFACES)
        .collect();
    type IfGet = fn(&crate::sources::sflow::decode::IfCounters) -> u64;
    let ifs: [(&str, &str, IfGet); 8] = [
        (
            "detector_sflow_if_in_octets",
            "ifInOctets as the agent last reported it.",
            |c| c.in_octets,
        ),
        (
            "detector_sflow_if_in_packets",
            "Packets received (unicast, multicast, broadcast) as last reported.",
            |c| c.in_packets,
        ),
        (
            "detector_sflow_if_in_errors",
            "ifInErrors as last reported.",
            |c| c.in_errors,
        ),
        (
            "detector_sflow_if_in_discards",
            "ifInDiscards as last reported.",
            |c| c.in_discards,
        ),
        (
            "detector_sflow_if_out_octets",
            "ifOutOctets as last reported.",
            |c| c.out_octets,
        ),
        (
            "detector_sflow_if_out_packets",
            "Packets sent (unicast, multicast, broadcast) as last reported.",
            |c| c.out_packets,
        ),
        (
            "detector_sflow_if_out_errors",
            "ifOutErrors as last reported.",
            |c| c.out_errors,
        ),
        (
            "detector_sflow_if_out_discards",
            "ifOutDiscards as last reported.",
            |c| c.out_discards,
        ),
    ];
    // The agent's counters, as it sent them: gauges (they wrap and reset with it).
    for (name, help, get) in ifs {
        f.gauge(
            name,
            help,
            ["listener", "source", "ifindex"],
            interfaces
                .iter()
                .map(|(l, ((k, i), c))| ([l.clone(), label(k), i.to_string()], get(c) as f64)),
        );
    }
}

fn pipeline(f: &Families, s: &State) {
    let p = &s.pipeline;
    f.counter1(
        "detector_records_total",
        "Flow records handed to the pipeline (meter and NetFlow).",
        p.records,
    );
    f.counter1(
        "detector_record_packets_total",
        "Packets in those records.",
        p.packets,
    );
    f.counter1(
        "detector_record_bytes_total",
        "Bytes in those records.",
        p.bytes,
    );
    f.counter1(
        "detector_duplicate_records_total",
        "Records marked duplicate: another source reported the same flow.",
        p.duplicates,
    );
    f.counter1(
        "detector_dedup_evicted_early_total",
        "Flows the full duplicate table forgot before their time.",
        p.dedup_evicted_early,
    );
    f.counter1(
        "detector_shed_records_total",
        "Records sent on unmarked and unprofiled because detection was behind.",
        p.shed,
    );
    f.gauge1(
        "detector_workers",
        "Threads for duplicate marking and detection.",
        p.workers as f64,
    );
    f.gauge1(
        "detector_hosts_profiled",
        "Internal hosts profiled by detection now.",
        p.hosts_profiled as f64,
    );
    f.gauge1(
        "detector_detection_table_bytes",
        "Bytes the detection tables (host profiles, duplicate marker) hold on the heap.",
        p.table_bytes as f64,
    );
    f.gauge1(
        "detector_hosts_limit",
        "Internal hosts detection may profile.",
        p.max_hosts as f64,
    );
    f.counter1(
        "detector_records_over_host_limit_total",
        "Records of internal hosts beyond the profiled limit (not profiled).",
        p.engine.hosts_over_limit,
    );
    let e = &p.engine;
    f.counter(
        "detector_engine_records_total",
        "Records seen by detection, by what became of them.",
        ["outcome"],
        [
            ("profiled", e.records),
            ("duplicate", e.duplicates_skipped),
            ("both_internal", e.both_internal),
            ("neither_internal", e.neither_internal),
            ("allow_listed", e.allow_listed),
        ]
        .map(|(k, v)| ([k.to_string()], v)),
    );
    f.counter1(
        "detector_evaluations_total",
        "Detection evaluations run.",
        e.evaluations,
    );
    f.gauge1(
        "detector_score_threshold",
        "The score at which a host alarms.",
        p.score_threshold,
    );
    f.gauge1(
        "detector_alarms_open",
        "Alarms open now.",
        s.alarms.len() as f64,
    );
    f.counter(
        "detector_alarm_events_total",
        "Alarm events, by state.",
        ["state"],
        ["raised", "updated", "cleared"]
            .into_iter()
            .zip(s.alarm_events)
            .map(|(k, v)| ([k.to_string()], v)),
    );
    f.counter(
        "detector_sink_records_total",
        "Flow records written or sent, by sink.",
        ["sink"],
        p.sinks.iter().map(|k| ([k.sink.clone()], k.records)),
    );
    f.counter(
        "detector_sink_errors_total",
        "Writes or sends of flow records that failed, by sink.",
        ["sink"],
        p.sinks.iter().map(|k| ([k.sink.clone()], k.errors)),
    );
    let a = &p.alarms;
    let (mut sent, mut failed) = (Vec::new(), Vec::new());
    if let Some(file) = &a.file {
        sent.push(([format!("json:{file}")], a.written));
        failed.push(([format!("json:{file}")], a.write_errors));
    }
    if let Some((ok, err)) = a.syslog {
        sent.push((["syslog".to_string()], ok));
        failed.push((["syslog".to_string()], err));
    }
    if let Some(w) = &a.webhook {
        sent.push((["webhook".to_string()], w.delivered));
        failed.push((["webhook".to_string()], w.failed_attempts));
        f.counter1(
            "detector_webhook_dropped_total",
            "Alarm events dropped because the webhook queue was full.",
            w.dropped,
        );
        f.gauge1(
            "detector_webhook_queued",
            "Alarm events waiting for the webhook.",
            w.queued as f64,
        );
    }
    f.counter(
        "detector_alarm_sink_sent_total",
        "Alarm events written or delivered, by alarm sink.",
        ["sink"],
        sent,
    );
    f.counter(
        "detector_alarm_sink_errors_total",
        "Alarm writes, sends or delivery attempts that failed, by alarm sink.",
        ["sink"],
        failed,
    );
}

/// The `--http` server's refusals (see [`super::access`]).
fn http_refused(f: &Families, s: &State) {
    f.counter(
        "detector_http_refused_total",
        "Requests and connections the --http server refused, by reason.",
        ["reason"],
        super::access::REASONS
            .iter()
            .zip(s.http_refused)
            .map(|(r, n)| ([r.to_string()], n)),
    );
}
