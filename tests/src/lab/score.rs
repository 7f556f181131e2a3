//! The lab's scorecard: per internal host, its label and what the agent said of it;
//! precision, recall and time to detect; and the agent's export checked against the
//! uplink's interface counters and against nfdump reading the same export.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::topology::Host;
use super::{HOSTS, LabConfig, Label, describe};

/// An alarm event as the agent wrote it, and when the lab read it (UNIX seconds).
pub struct AlarmSeen {
    pub at: f64,
    pub event: Value,
}

pub struct Inputs<'a> {
    pub cfg: &'a LabConfig,
    pub started_at: f64,
    pub hosts: &'a [Host],
    /// First payload byte of each P2P host (UNIX seconds), if it moved any.
    pub first_p2p: &'a [(&'static str, Option<f64>)],
    pub alarms: &'a [AlarmSeen],
    /// The alarm events of the detector node fed by the agent through JetStream (the
    /// agent an edge), when the lab ran one.
    pub central_alarms: Option<&'a [AlarmSeen]>,
    /// Uplink interface counter deltas: packets and bytes in, then out.
    pub uplink: [u64; 4],
    pub flows_json: &'a Path,
    pub nfcapd_dir: &'a Path,
    pub agent_clean: bool,
    pub agent_log: &'a Path,
    /// Every host's peak score, read from the agent's status endpoint.
    pub peaks: &'a Peaks,
    /// UDP datagrams the gateway's kernel dropped (nfcapd's and the agent's listeners).
    pub udp_rcvbuf_errors: Option<u64>,
    /// Packet captures of a host's uplink traffic the lab kept (host, pcap path).
    pub captures: &'a [(&'static str, std::path::PathBuf)],
    /// Seen through sFlow: what pmacctd's own capture said at the end of the run.
    pub exporter_capture: Option<ExporterCapture>,
}

/// pmacctd's report of its packet capture (its SIGUSR1 statistics, libpcap's counts)
/// and of samples it lost between its capture and its sFlow plugin.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExporterCapture {
    pub received: u64,
    /// Packets the kernel dropped before pmacctd read them: its sampler never saw them,
    /// so no sFlow sample pool counts them (a switch's ASIC has no such loss).
    pub dropped: u64,
    /// "Missing data detected" warnings: samples lost between pmacctd's core and plugin.
    pub missing_data_warnings: u64,
}

/// At most this share of the uplink's packets may be lost by the lab's own sFlow
/// exporter (pmacctd's capture on a loaded 2-core machine) for the export check to mean
/// anything (the bytes of lost packets are unknown, so the byte check widens with
/// them); beyond, the check is not met.
pub const MAX_EXPORTER_DROP_SHARE: f64 = 0.10;

/// The P2P alarm kinds: the application named, or `p2p` (other kinds, such as a port
/// scan, would not be P2P verdicts).
const P2P_KINDS: [&str; 4] = ["p2p", "bittorrent", "gnutella", "edonkey"];

fn is_p2p(event: &Value) -> bool {
    event["kind"]
        .as_str()
        .is_some_and(|k| P2P_KINDS.contains(&k))
}
/// An alarm must come within this many seconds of the host's first P2P byte.
pub const DETECT_WITHIN_SECS: f64 = 30.0;
/// ... and within this many when the meter samples packets (issue #22: two minutes).
pub const DETECT_WITHIN_SECS_SAMPLED: f64 = 120.0;
/// Sampled, the export's estimates (raw counts x N) must be within this many standard
/// deviations of the interface's counts: n packets sampled 1 in N give a binomial
/// count, whose estimate has a standard deviation of sqrt(n (N - 1)) packets, and at
/// most 1,514 times that in bytes (no packet is larger on this uplink).
pub const SAMPLED_EXPORT_SIGMAS: f64 = 5.0;

/// When an event happened: its `at` (the evaluation's time), else when the lab read it.
fn event_at(a: &AlarmSeen) -> f64 {
    a.event["at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(a.at, |d| d.as_secs_f64())
}

pub struct Scorecard {
    pub json: Value,
    pub pass: bool,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    packets: u64,
    bytes: u64,
}

/// Packets and bytes by direction (ingress, egress) of the agent's own records.
/// Raw counts, then estimates (raw x the sampling interval; the same unsampled).
/// `all`: every record (the lab seen through sFlow has no local records), else only
/// the local meter's.
fn exported_totals(flows_json: &Path, all: bool) -> Result<([Totals; 2], [Totals; 2])> {
    let text = std::fs::read_to_string(flows_json)
        .with_context(|| format!("reading {}", flows_json.display()))?;
    let mut raw = [Totals::default(); 2];
    let mut est = [Totals::default(); 2];
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).context("flow record")?;
        if !all && v["source"] != "local" {
            continue;
        }
        let i = usize::from(v["direction"] == "egress");
        raw[i].packets += v["raw_packets"].as_u64().unwrap_or(0);
        raw[i].bytes += v["raw_bytes"].as_u64().unwrap_or(0);
        est[i].packets += v["packets"].as_u64().unwrap_or(0);
        est[i].bytes += v["bytes"].as_u64().unwrap_or(0);
    }
    Ok((raw, est))
}

/// How far `est` is from `truth`, in percent of it.
fn pct(est: u64, truth: u64) -> f64 {
    (est as f64 - truth as f64) * 100.0 / truth.max(1) as f64
}

/// Whether an estimate `est` of a truth known to lie in `lo..=hi` units, from packets
/// sampled 1 in `n`, is within [`SAMPLED_EXPORT_SIGMAS`] standard deviations of that
/// range (`unit`: the largest a packet adds). The range is one value unless the
/// exporter lost packets before sampling them (bytes of lost packets are unknown).
fn within_sampling_error(est: u64, lo: u64, hi: u64, packets: u64, n: u32, unit: f64) -> bool {
    let sd = (packets as f64 * f64::from(n.saturating_sub(1))).sqrt() * unit;
    let slack = SAMPLED_EXPORT_SIGMAS * sd.max(unit);
    let est = est as f64;
    est >= lo as f64 - slack && est <= hi as f64 + slack
}

/// What nfcapd stored, read back by nfdump, by exporter then direction.
fn nfdump_totals(dir: &Path) -> Result<BTreeMap<String, [Totals; 2]>> {
    let out = super::topology::run(
        "nfdump",
        &["-R", dir.to_str().context("path")?, "-o", "json"],
    )?;
    let records: Vec<Value> = if out.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&out).context("nfdump -o json")?
    };
    let mut by: BTreeMap<String, [Totals; 2]> = BTreeMap::new();
    for r in &records {
        let exporter = r["export_sysid"].to_string();
        let i = usize::from(r["direction"].as_u64() == Some(1));
        let e = by.entry(exporter).or_default();
        e[i].packets += r["in_packets"].as_u64().unwrap_or(0);
        e[i].bytes += r["in_bytes"].as_u64().unwrap_or(0);
    }
    Ok(by)
}

/// A host's highest score over the run among the evaluations no guard vetoed, and the
/// guards that vetoed others (each with the highest score it vetoed).
#[derive(Clone, Debug, Default)]
pub struct Peak {
    pub clear: f64,
    /// The rules that fired at that peak.
    pub fired: Vec<String>,
    pub vetoed: BTreeMap<String, f64>,
}

/// Every host's [`Peak`], from the agent's `/api/hosts` snapshots (one per evaluation:
/// a snapshot read twice counts once).
#[derive(Debug, Default)]
pub struct Peaks {
    pub by_host: BTreeMap<String, Peak>,
    pub threshold: Option<f64>,
    pub evaluations: u64,
    last_eval: Option<String>,
}

impl Peaks {
    pub fn take(&mut self, snapshot: &Value) {
        // Before the first evaluation there is nothing to read.
        let Some(at) = snapshot["evaluated_at"].as_str() else {
            return;
        };
        if self.last_eval.as_deref() == Some(at) {
            return;
        }
        self.last_eval = Some(at.to_string());
        self.evaluations += 1;
        if let Some(t) = snapshot["score_threshold"].as_f64() {
            self.threshold = Some(t);
        }
        for h in snapshot["hosts"].as_array().into_iter().flatten() {
            let (Some(host), Some(score)) = (h["host"].as_str(), h["score"].as_f64()) else {
                continue;
            };
            let p = self.by_host.entry(host.to_string()).or_default();
            match h["vetoed_by"].as_str() {
                Some(guard) => {
                    let v = p.vetoed.entry(guard.to_string()).or_insert(0.0);
                    *v = v.max(score);
                }
                None if score > p.clear => {
                    p.clear = score;
                    p.fired = h["evidence"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|e| e["fired"] == true || e["rule"] == "ip_port_ratio")
                        .filter_map(|e| {
                            let v = e["value"].as_f64().unwrap_or(0.0);
                            e["rule"].as_str().map(|r| format!("{r}={}", short(v)))
                        })
                        .collect();
                }
                None => {}
            }
        }
    }
}

/// Every benign host's peak must stay this far under the threshold.
pub const MIN_MARGIN: f64 = 2.0;

/// What an alarm on each P2P host of the lab must name: every P2P client there runs
/// BitTorrent.
const P2P_KIND: &str = "bittorrent";

/// The SysIDs nfcapd gave to exporters with source id 0 (the agent's own records), from
/// `nfdump -E` on each file: lines like `SysID: 1, IP: 127.0.0.1, version: 9, ID:  0, ...`.
fn local_sysids(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with("nfcapd.") || name.contains("current") {
            continue;
        }
        let text = super::topology::run("nfdump", &["-E", path.to_str().context("path")?])?;
        for line in text.lines().filter(|l| l.starts_with("SysID:")) {
            let field = |key: &str| {
                line.split(", ")
                    .find_map(|f| f.trim().strip_prefix(key))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(sysid), Some("0")) = (field("SysID:"), field("ID:").as_deref()) {
                out.insert(sysid);
            }
        }
    }
    Ok(out)
}

pub fn build(inp: Inputs) -> Result<Scorecard> {
    let threshold = inp.peaks.threshold;
    // Sampled, a host is seen through one packet in N: the targets of detection under
    // sampling (alarmed within two minutes, no benign host alarmed; the kind and the
    // benign margins are reported, not required: a flow's first packets, which name the
    // application, are rarely the sampled ones).
    let sampling = inp.cfg.sampling.max(1);
    let sampled = sampling > 1;
    let within_secs = if sampled {
        DETECT_WITHIN_SECS_SAMPLED
    } else {
        DETECT_WITHIN_SECS
    };
    let mut hosts_json = Vec::new();
    let mut table = String::new();
    writeln!(
        table,
        "{:<12} {:<15} {:<7} {:<8} {:>9} {:>7} {:>6} {:<10} {:>6} {:>6} {:>5}  evidence / note",
        "host",
        "address",
        "label",
        "alarmed",
        "detect_s",
        "node_s",
        "score",
        "kind",
        "peak",
        "margin",
        "srcs"
    )?;
    let mut right_kind = true;
    let mut margins_ok = threshold.is_some();
    let (mut tp, mut fp, mut p2p_hosts) = (0u32, 0u32, 0u32);
    let mut detect_times = Vec::new();
    let mut within = true;
    let mut one_each = true;
    // The detector node's (through JetStream): its times, every P2P host within the
    // target, benign hosts it alarmed.
    let mut central_times = Vec::new();
    let mut central_within = inp.central_alarms.is_some();
    let mut central_fp = 0u32;
    for (name, _, label) in HOSTS {
        let host = inp.hosts.iter().find(|h| h.name == *name).context("host")?;
        let addr = host.addr.to_string();
        let mine: Vec<&AlarmSeen> = inp
            .alarms
            .iter()
            .filter(|a| a.event["host"] == addr.as_str())
            .collect();
        let p2p: Vec<&AlarmSeen> = mine.iter().copied().filter(|a| is_p2p(&a.event)).collect();
        let ids: BTreeSet<String> = p2p
            .iter()
            .map(|a| a.event["id"].as_str().unwrap_or("").to_string())
            .collect();
        let other_kinds: BTreeSet<String> = mine
            .iter()
            .filter(|a| !is_p2p(&a.event))
            .map(|a| a.event["kind"].as_str().unwrap_or("").to_string())
            .collect();
        let raised = p2p.iter().find(|a| a.event["state"] == "raised");
        let first_p2p = inp
            .first_p2p
            .iter()
            .find(|(h, _)| h == name)
            .and_then(|(_, t)| *t);
        // When the agent raised it: the `raised` event's `at` is the evaluation's time
        // (the moment the lab read the line is the fallback).
        let raised_at = raised.map(|r| {
            r.event["at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(r.at, |d| d.as_secs_f64())
        });
        let detect = match (raised_at, first_p2p) {
            (Some(r), Some(f)) => Some(r - f),
            _ => None,
        };
        let central_raised = inp.central_alarms.and_then(|seen| {
            seen.iter().find(|a| {
                a.event["host"] == addr.as_str() && is_p2p(&a.event) && a.event["state"] == "raised"
            })
        });
        let central_detect = match (central_raised, first_p2p) {
            (Some(r), Some(f)) => Some(event_at(r) - f),
            _ => None,
        };
        let alarmed = raised.is_some();
        // The latest event of the episode carries the fullest evidence.
        let last = p2p.last();
        let evidence: Vec<String> = last
            .map(|a| {
                a.event["evidence"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter(|e| e["fired"] == true)
                            .map(|e| {
                                format!(
                                    "{}={}",
                                    e["rule"].as_str().unwrap_or(""),
                                    short(e["value"].as_f64().unwrap_or(0.0))
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let exporters: Vec<String> = last
            .and_then(|a| a.event["exporters"].as_array())
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        match label {
            Label::P2p => {
                p2p_hosts += 1;
                if alarmed {
                    tp += 1;
                }
                match detect {
                    Some(d) if d <= within_secs => detect_times.push(d),
                    Some(d) => {
                        detect_times.push(d);
                        within = false;
                    }
                    None => within = false,
                }
                if ids.len() != 1 {
                    one_each = false;
                }
                if inp.central_alarms.is_some() {
                    match central_detect {
                        Some(d) => {
                            central_times.push(d);
                            central_within &= d <= within_secs;
                        }
                        None => central_within = false,
                    }
                }
            }
            Label::Benign => {
                if alarmed {
                    fp += 1;
                }
                if central_raised.is_some() {
                    central_fp += 1;
                }
            }
        }
        let score = last.and_then(|a| a.event["score"].as_f64());
        let kind = last.and_then(|a| a.event["kind"].as_str()).unwrap_or("-");
        let kind_why: Vec<String> = last
            .and_then(|a| a.event["kind_evidence"].as_array())
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let Peak {
            clear: peak,
            fired: peak_fired,
            vetoed,
        } = inp.peaks.by_host.get(&addr).cloned().unwrap_or_default();
        let margin = threshold.map(|t| t - peak);
        let vetoes: Vec<String> = vetoed
            .iter()
            .map(|(g, s)| format!("{g} (up to {s:.1})"))
            .collect();
        match label {
            Label::P2p => right_kind &= sampled || kind == P2P_KIND,
            Label::Benign => {
                margins_ok &= sampled || margin.is_some_and(|m| m >= MIN_MARGIN);
            }
        }
        let mut notes = Vec::new();
        if !other_kinds.is_empty() {
            notes.push(format!(
                "other alarm kinds: {}",
                other_kinds.iter().cloned().collect::<Vec<_>>().join(",")
            ));
        }
        if !alarmed && !peak_fired.is_empty() {
            notes.push(format!("at its peak: {}", peak_fired.join(" ")));
        }
        if !vetoes.is_empty() {
            notes.push(format!("vetoed as {}", vetoes.join(", ")));
        }
        if !kind_why.is_empty() {
            notes.push(format!("{kind}: {}", kind_why.join(", ")));
        }
        let note = notes.join("; ");
        writeln!(
            table,
            "{:<12} {:<15} {:<7} {:<8} {:>9} {:>7} {:>6} {:<10} {:>6} {:>6} {:>5}  {}{}",
            name,
            addr,
            label.as_str(),
            if alarmed {
                format!("yes({})", ids.len())
            } else {
                "no".into()
            },
            detect.map(|d| format!("{d:.1}")).unwrap_or("-".into()),
            match (central_detect, central_raised) {
                (Some(d), _) => format!("{d:.1}"),
                (None, Some(_)) => "yes".into(),
                (None, None) => "-".into(),
            },
            score.map(|s| format!("{s:.1}")).unwrap_or("-".into()),
            kind,
            format!("{peak:.1}"),
            margin.map(|m| format!("{m:.1}")).unwrap_or("-".into()),
            exporters.len(),
            evidence.join(" "),
            if note.is_empty() || evidence.is_empty() {
                note
            } else {
                format!("; {note}")
            }
        )?;
        hosts_json.push(json!({
            "host": name,
            "addr": addr,
            "label": label.as_str(),
            "runs": describe(name),
            "alarmed": alarmed,
            "alarm_ids": ids,
            "first_p2p_byte": first_p2p,
            "raised_at": raised_at,
            "seconds_to_detect": detect,
            "central_seconds_to_detect": central_detect,
            "central_alarmed": central_raised.is_some(),
            "score": score,
            "kind": kind,
            "kind_evidence": kind_why,
            "peak_score": peak,
            "peak_fired": peak_fired,
            "margin": margin,
            "vetoed_as": vetoed,
            "evidence": evidence,
            "exporters": exporters,
            "other_alarm_kinds": other_kinds,
            "events": p2p.len() + mine.len() - p2p.len(),
        }));
    }
    let precision = if tp + fp == 0 {
        0.0
    } else {
        f64::from(tp) / f64::from(tp + fp)
    };
    let recall = if p2p_hosts == 0 {
        0.0
    } else {
        f64::from(tp) / f64::from(p2p_hosts)
    };
    let max_detect = detect_times.iter().copied().fold(f64::NAN, f64::max);
    let mean_detect = if detect_times.is_empty() {
        f64::NAN
    } else {
        detect_times.iter().sum::<f64>() / detect_times.len() as f64
    };

    // The export against the interface and against nfdump.
    let sflow = inp.cfg.sflow;
    let (mut exported, mut estimated) = exported_totals(inp.flows_json, sflow)?;
    let nf = nfdump_totals(inp.nfcapd_dir)?;
    // The local meter exports under source id 0 (records relayed from softflowd go out
    // under source id 1); nfcapd numbers exporters itself (SysID), and `nfdump -E` says
    // which SysID had which source id.
    let local = local_sysids(inp.nfcapd_dir)?;
    let mut nf_local = [Totals::default(); 2];
    for (sysid, t) in &nf {
        if sflow || local.contains(sysid) {
            for i in 0..2 {
                nf_local[i].packets += t[i].packets;
                nf_local[i].bytes += t[i].bytes;
            }
        }
    }
    let [rx_p, rx_b, tx_p, tx_b] = inp.uplink;
    let l3 =
        |i: usize, p: u64, b: u64| b.saturating_sub(super::topology::L2_HEADER_IN_COUNTERS[i] * p);
    let mut dirs = vec![
        ("ingress", rx_p, rx_b, l3(0, rx_p, rx_b), 0usize),
        ("egress", tx_p, tx_b, l3(1, tx_p, tx_b), 1usize),
    ];
    if sflow {
        // sFlow samples carry no direction: both directions as one.
        for t in [&mut exported, &mut estimated, &mut nf_local] {
            t[0].packets += t[1].packets;
            t[0].bytes += t[1].bytes;
        }
        dirs = vec![(
            "both",
            rx_p + tx_p,
            rx_b + tx_b,
            l3(0, rx_p, rx_b) + l3(1, tx_p, tx_b),
            0,
        )];
    }
    let mut export_ok = inp.agent_clean;
    let mut export_json = serde_json::Map::new();
    writeln!(
        table,
        "\n{:<8} {:>12} {:>14} {:>12} {:>14} {:>12} {:>14}{}",
        "uplink",
        "iface pkts",
        "iface IP bytes",
        "export pkts",
        "export bytes",
        "nfdump pkts",
        "nfdump bytes",
        if sampled {
            format!("   estimated (x{sampling}) pkts, bytes")
        } else {
            String::new()
        }
    )?;
    // Packets the lab's sFlow exporter never saw are not the agent's to estimate: the
    // truth is the packets pmacctd's capture received (the bytes of those it dropped
    // are unknown, at most a full frame each), provided it lost few.
    let capture_lost = inp.exporter_capture.map_or(0, |c| c.dropped);
    let uplink_packets: u64 = dirs.iter().map(|d| d.1).sum();
    let exporter_kept_up =
        (capture_lost as f64) <= MAX_EXPORTER_DROP_SHARE * uplink_packets.max(1) as f64;
    let capture_note = match inp.exporter_capture {
        Some(c) => Some(format!(
            "pmacctd's capture: received {} packets, the kernel dropped {} ({:.2} % of the uplink's; at most {:.0} % for the check to count: {}), {} missing-data warnings between its core and sfprobe; the estimates are held against the packets it received",
            c.received,
            c.dropped,
            c.dropped as f64 * 100.0 / uplink_packets.max(1) as f64,
            MAX_EXPORTER_DROP_SHARE * 100.0,
            yes(exporter_kept_up),
            c.missing_data_warnings
        )),
        None if sflow => {
            Some("pmacctd's capture statistics: missing (its log had no SIGUSR1 report)".into())
        }
        None => None,
    };
    if inp.exporter_capture.is_some() {
        export_ok &= exporter_kept_up;
    }
    for (d, p, b, l3, i) in dirs {
        let ok = if sampled {
            // nfcapd keeps what it was sent (raw counts and the interval) or scales it.
            let nf_same = (nf_local[i].packets == exported[i].packets
                && nf_local[i].bytes == exported[i].bytes)
                || (nf_local[i].packets == estimated[i].packets
                    && nf_local[i].bytes == estimated[i].bytes);
            nf_same
                && within_sampling_error(
                    estimated[i].packets,
                    p.saturating_sub(capture_lost),
                    p.saturating_sub(capture_lost),
                    p,
                    sampling,
                    1.0,
                )
                && within_sampling_error(
                    estimated[i].bytes,
                    l3.saturating_sub(capture_lost * 1514),
                    l3,
                    p,
                    sampling,
                    1514.0,
                )
        } else {
            exported[i].packets == p
                && exported[i].bytes == l3
                && nf_local[i].packets == p
                && nf_local[i].bytes == l3
        };
        export_ok &= ok;
        writeln!(
            table,
            "{:<8} {:>12} {:>14} {:>12} {:>14} {:>12} {:>14}{}",
            d,
            p,
            l3,
            exported[i].packets,
            exported[i].bytes,
            nf_local[i].packets,
            nf_local[i].bytes,
            if sampled {
                format!(
                    "   {} ({:+.1} %), {} ({:+.1} %)",
                    estimated[i].packets,
                    pct(estimated[i].packets, p),
                    estimated[i].bytes,
                    pct(estimated[i].bytes, l3)
                )
            } else {
                String::new()
            }
        )?;
        export_json.insert(
            d.into(),
            json!({
                "interface_packets": p,
                "interface_bytes": b,
                "interface_ip_bytes": l3,
                "exported_packets": exported[i].packets,
                "exported_bytes": exported[i].bytes,
                "nfdump_packets": nf_local[i].packets,
                "nfdump_bytes": nf_local[i].bytes,
                "estimated_packets": estimated[i].packets,
                "estimated_bytes": estimated[i].bytes,
                "equal": ok,
            }),
        );
    }
    if let Some(note) = capture_note {
        writeln!(table, "{note}")?;
    }
    let zero_benign = fp == 0;
    // The node must meet the agent's time target; with no node run, nothing to meet.
    let central_ok = inp.central_alarms.is_none() || central_within;
    let pass =
        within && zero_benign && one_each && export_ok && right_kind && margins_ok && central_ok;
    writeln!(
        table,
        "\nprecision {precision:.2}  recall {recall:.2}  time to detect: mean {mean_detect:.1} s, max {max_detect:.1} s"
    )?;
    if inp.central_alarms.is_some() {
        let max = central_times.iter().copied().fold(f64::NAN, f64::max);
        let mean = central_times.iter().sum::<f64>() / central_times.len().max(1) as f64;
        writeln!(
            table,
            "detector node (the agent an edge -> JetStream -> node; node_s): time to detect: mean {mean:.1} s, max {max:.1} s; every P2P host alarmed by the node within {within_secs:.0} s of its first payload byte: {}; benign hosts it alarmed: {central_fp}",
            yes(central_within)
        )?;
    }
    writeln!(
        table,
        "targets{}: every P2P host within {within_secs:.0} s: {}; kind {P2P_KIND} for each: {}; no benign host alarmed: {}; every benign margin >= {MIN_MARGIN:.0}: {}; one alarm per P2P host: {}; {}: {}",
        if sampled {
            format!(
                " ({} 1 packet in {sampling}: kind and margins reported, not required)",
                if sflow {
                    "seen through sFlow, pmacctd's sfprobe sampling"
                } else {
                    "the meter sampling"
                }
            )
        } else {
            String::new()
        },
        yes(within),
        if sampled { "reported" } else { yes(right_kind) },
        yes(zero_benign),
        if sampled { "reported" } else { yes(margins_ok) },
        yes(one_each),
        if sampled {
            format!(
                "export estimates within {SAMPLED_EXPORT_SIGMAS:.0} standard deviations of the interface, nfdump equal to the export"
            )
        } else {
            "export equals interface and nfdump".to_string()
        },
        yes(export_ok)
    )?;
    writeln!(
        table,
        "peak: the highest score over {} evaluations no guard vetoed (threshold {}); margin: threshold - peak",
        inp.peaks.evaluations,
        threshold.map_or("unknown: /api/hosts never answered".into(), |t| format!(
            "{t:.1}"
        ))
    )?;
    if let Some(n) = inp.udp_rcvbuf_errors.filter(|n| *n > 0) {
        writeln!(
            table,
            "the gateway's kernel dropped {n} UDP datagrams for want of socket buffer (export to nfcapd, or softflowd to the agent)"
        )?;
    }
    let mut captures_json = Vec::new();
    for (host, path) in inp.captures {
        let bytes = std::fs::metadata(path).map(|m| m.len()).ok();
        writeln!(
            table,
            "capture of {host}'s uplink traffic (for replay): {} ({})",
            path.display(),
            bytes.map_or("missing".into(), |b| format!("{b} bytes"))
        )?;
        captures_json.push(json!({"host": host, "path": path, "bytes": bytes}));
    }
    if !inp.agent_clean {
        writeln!(
            table,
            "the agent did not exit cleanly on SIGTERM; see {}",
            inp.agent_log.display()
        )?;
    }
    let json = json!({
        "date": chrono_like(inp.started_at),
        "commit": commit(),
        "duration_secs": inp.cfg.duration.as_secs(),
        "peers": inp.cfg.peers,
        "seed": inp.cfg.seed,
        "sampling": sampling,
        "sflow": sflow,
        "score_threshold": threshold,
        "evaluations": inp.peaks.evaluations,
        "hosts": hosts_json,
        "precision": precision,
        "recall": recall,
        "seconds_to_detect_mean": finite(mean_detect),
        "seconds_to_detect_max": finite(max_detect),
        "export": export_json,
        "gateway_udp_rcvbuf_errors": inp.udp_rcvbuf_errors,
        "exporter_capture": inp.exporter_capture.map(|c| json!({
            "received_packets": c.received,
            "dropped_packets": c.dropped,
            "missing_data_warnings": c.missing_data_warnings,
        })),
        "captures": captures_json,
        "targets": {
            "p2p_within_target": within,
            "p2p_central_within_target": inp.central_alarms.map(|_| central_within),
            "central_benign_alarmed": inp.central_alarms.map(|_| central_fp),
            "target_secs": within_secs,
            "zero_benign_alarmed": zero_benign,
            "p2p_kind_right": right_kind,
            "benign_margin_at_least": MIN_MARGIN,
            "benign_margins_met": margins_ok,
            "one_alarm_per_p2p_host": one_each,
            "export_equals_interface": export_ok,
        },
        "pass": pass,
        "table": table,
    });
    Ok(Scorecard { json, pass })
}

impl Scorecard {
    pub fn table(&self) -> &str {
        self.json["table"].as_str().unwrap_or("")
    }
}

fn yes(b: bool) -> &'static str {
    if b { "met" } else { "NOT MET" }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

fn short(x: f64) -> String {
    if x.fract() == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// UTC date and time of a UNIX timestamp, as `date -u` would print it (RFC 3339).
fn chrono_like(t: f64) -> String {
    super::topology::run(
        "date",
        &["-u", "-d", &format!("@{}", t as u64), "+%Y-%m-%dT%H:%M:%SZ"],
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

/// The commit the lab ran from (with `+dirty` if the tree has changes).
fn commit() -> String {
    let root = crate::workspace_root();
    let root = root.to_str().unwrap_or(".");
    let head = super::topology::run("git", &["-C", root, "rev-parse", "--short", "HEAD"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = super::topology::run("git", &["-C", root, "status", "--porcelain"])
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    if dirty { format!("{head}+dirty") } else { head }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(at: &str, hosts: &[(&str, f64, Option<&str>)]) -> Value {
        json!({
            "evaluated_at": at,
            "score_threshold": 7.0,
            "hosts": hosts
                .iter()
                .map(|(h, s, g)| json!({"host": h, "score": s, "vetoed_by": g}))
                .collect::<Vec<_>>(),
        })
    }

    #[test]
    fn a_peak_counts_only_evaluations_no_guard_vetoed_and_each_evaluation_once() {
        let mut p = Peaks::default();
        // Before the first evaluation: nothing.
        p.take(&json!({"evaluated_at": null, "score_threshold": 7.0, "hosts": []}));
        assert_eq!(p.evaluations, 0);
        p.take(&snapshot(
            "t1",
            &[
                ("10.0.0.20", 9.0, Some("server_on_well_known_port")),
                ("10.0.0.11", 3.0, None),
            ],
        ));
        p.take(&snapshot(
            "t2",
            &[("10.0.0.20", 4.5, None), ("10.0.0.11", 2.0, None)],
        ));
        // The same evaluation read again changes nothing.
        p.take(&snapshot("t2", &[("10.0.0.11", 99.0, None)]));
        assert_eq!(p.evaluations, 2);
        assert_eq!(p.threshold, Some(7.0));
        assert_eq!(p.by_host["10.0.0.11"].clear, 3.0);
        let web = &p.by_host["10.0.0.20"];
        assert_eq!(web.clear, 4.5, "a vetoed 9.0 is not the peak");
        assert_eq!(web.vetoed["server_on_well_known_port"], 9.0);
    }
}
