//! `detector replay` on the labelled captures of `../shared/testdata/pcap`: every frame
//! goes through the real XDP program (BPF_PROG_TEST_RUN), and per flow the packets and
//! bytes of the exported records equal tshark's own dissection of the same file.
//!
//! Flow timeouts only split a flow into several records; summed per 5-tuple they must
//! match exactly. Frames that are not IP (ARP, LLDP, ...) are in neither. Privileged:
//! run by `cargo xtask test` as root; skips with a message when `../shared` is absent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use tests::tshark::{self, Tuple};

fn replay(pcap: &Path, json: &Path) -> String {
    // The output is appended to: start each replay on an empty file.
    let _ = std::fs::remove_file(json);
    let out = Command::new(tests::detector_bin())
        .arg("replay")
        .arg(pcap)
        .arg("--flows-json")
        .arg(json)
        .output()
        .expect("run detector replay");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "replay {} failed: {stderr}",
        pcap.display()
    );
    stderr
}

fn exported(json: &Path) -> (BTreeMap<Tuple, (u64, u64)>, usize) {
    let text = std::fs::read_to_string(json).unwrap();
    let mut m = BTreeMap::new();
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ip = |k: &str| v[k].as_str().unwrap().parse::<IpAddr>().unwrap();
        let u = |k: &str| v[k].as_u64().unwrap();
        let key = (
            u("protocol") as u8,
            ip("src_addr"),
            u("src_port") as u16,
            ip("dst_addr"),
            u("dst_port") as u16,
        );
        let e = m.entry(key).or_insert((0, 0));
        e.0 += u("packets");
        e.1 += u("bytes");
        n += 1;
    }
    (m, n)
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn replayed_captures_match_tshark_flow_by_flow() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let dir = std::env::temp_dir().join(format!("detector-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    let mut report = Vec::new();
    for sub in ["pcap/p2p", "pcap/benign"] {
        let mut files: Vec<_> = std::fs::read_dir(data.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.to_string_lossy();
                n.ends_with(".pcap") || n.ends_with(".pcapng")
            })
            .collect();
        files.sort();
        for pcap in files {
            let json = dir.join("flows.json");
            let summary = replay(&pcap, &json);
            let (ours, records) = exported(&json);
            let truth = tshark::totals(&tshark::packets(&pcap));
            let mut diffs = Vec::new();
            for (k, v) in &truth {
                if ours.get(k) != Some(v) {
                    diffs.push(format!("  {k:?}: tshark {v:?}, ours {:?}", ours.get(k)));
                }
            }
            for (k, v) in &ours {
                if !truth.contains_key(k) {
                    diffs.push(format!("  {k:?}: ours {v:?}, not in tshark"));
                }
            }
            let name = pcap.file_name().unwrap().to_string_lossy().to_string();
            eprintln!(
                "{name}: {} flows in tshark, {} in our export ({records} records); {}",
                truth.len(),
                ours.len(),
                summary.lines().next().unwrap_or("")
            );
            if !diffs.is_empty() {
                diffs.truncate(10);
                report.push(format!("{name}:\n{}", diffs.join("\n")));
            }
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(checked >= 20, "only {checked} captures");
    assert!(report.is_empty(), "{}", report.join("\n"));
}

/// What the detector must decide on each labelled capture, and why.
const VERDICTS: &[(&str, Option<&str>, &str)] = &[
    // (capture, host that must alarm, why)
    (
        "p2p/nDPI__gnutella.pcap",
        Some("10.0.2.15"),
        "a Gnutella client with ~500 peers over 10 minutes",
    ),
    (
        "p2p/nDPI__bittorrent.pcap",
        None,
        "15 s of peer-wire traffic with about 20 peers, TCP only, no listening port seen: below every threshold; too little behaviour to convict",
    ),
    (
        "p2p/nDPI__bittorrent_utp.pcap",
        None,
        "one uTP transfer with a single peer",
    ),
    (
        "p2p/nDPI__bt-http.pcapng",
        None,
        "one HTTP tracker announce",
    ),
    (
        "p2p/nDPI__bt_search.pcap",
        None,
        "one LSD multicast, no external peer",
    ),
    (
        "p2p/zeek__bittorrent-tracker.pcap",
        None,
        "one tracker announce",
    ),
    (
        "p2p/suricata-verify__bittorrent-dht__input.pcap",
        None,
        "crafted DHT messages between two public hosts",
    ),
    (
        "p2p/nDPI__edonkey.pcap",
        None,
        "the client side of a single flow",
    ),
];

fn alarms(pcap: &Path, dir: &Path) -> (Vec<serde_json::Value>, String) {
    let json = dir.join("alarms.json");
    // The alarms file is appended to: start each replay on an empty one.
    let _ = std::fs::remove_file(&json);
    let out = Command::new(tests::detector_bin())
        .arg("replay")
        .arg(pcap)
        .args(["--flows-json", "/dev/null", "--alarms-json"])
        .arg(&json)
        .output()
        .expect("run detector replay");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let events = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (events, stderr)
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn labelled_captures_get_the_expected_verdicts() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let dir = std::env::temp_dir().join(format!("detector-verdicts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (capture, host, why) in VERDICTS {
        let (events, stderr) = alarms(&data.join("pcap").join(capture), &dir);
        let raised: Vec<&str> = events
            .iter()
            .filter(|e| e["state"] == "raised")
            .map(|e| e["host"].as_str().unwrap())
            .collect();
        match host {
            Some(h) => {
                assert_eq!(raised, vec![*h], "{capture} ({why}): {stderr}");
                let e = events.iter().find(|e| e["state"] == "raised").unwrap();
                for f in [
                    "id",
                    "state",
                    "host",
                    "kind",
                    "score",
                    "at",
                    "first_seen",
                    "last_seen",
                    "window_secs",
                    "peers",
                    "flows",
                    "bytes_in",
                    "bytes_out",
                    "top_peer_share",
                    "evidence",
                    "exporters",
                ] {
                    assert!(e.get(f).is_some(), "{capture}: alarm without {f}");
                }
                // The client reaches hundreds of peers: the alarm's events say so (the
                // raise itself may come before the last of the first ones are exported).
                let peers = events
                    .iter()
                    .filter_map(|e| e["peers"].as_u64())
                    .max()
                    .unwrap();
                assert!(peers >= 100, "{capture}: {e}");
                // Named from its ports without payload hints (28 peers on 6346/6347).
                assert_eq!(e["kind"], "gnutella", "{capture}: {e}");
                assert!(stderr.contains(&format!(
                    "alarm {} raised gnutella: host {h}",
                    e["id"].as_str().unwrap()
                )));
                // The end of the replay lists the host with every rule's value, the
                // fired ones marked.
                let line = stderr
                    .lines()
                    .find(|l| l.trim_start().starts_with(&format!("host {h} score ")))
                    .unwrap_or_else(|| panic!("{capture}: no report line for {h}: {stderr}"));
                assert!(
                    line.contains("+external_peers=") && line.contains("failed_connection_share="),
                    "{capture}: {line}"
                );
            }
            None => assert!(raised.is_empty(), "{capture} ({why}) alarmed: {stderr}"),
        }
        eprintln!(
            "{capture}: {} ({why})",
            if raised.is_empty() {
                "no alarm"
            } else {
                "alarm"
            }
        );
    }
    // Benign captures: not one alarm.
    let mut benign: Vec<_> = std::fs::read_dir(data.join("pcap/benign"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".txt"))
        .collect();
    benign.sort();
    assert!(benign.len() >= 14);
    for pcap in benign {
        let (events, stderr) = alarms(&pcap, &dir);
        assert!(events.is_empty(), "{} alarmed: {stderr}", pcap.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Records but no internal host: the replay says why, with the counts, and points at
/// `--internal`. With the internal network set where no address of the capture is,
/// every record has neither end internal; with every address internal, both ends.
#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn a_replay_without_internal_hosts_says_why() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let pcap = data.join("pcap/benign/nDPI__netflix.pcap");
    for (internal, side) in [
        ("203.0.113.0/24", "neither end"),
        ("0.0.0.0/0", "both ends"),
    ] {
        let out = Command::new(tests::detector_bin())
            .arg("replay")
            .arg(&pcap)
            .args(["--flows-json", "/dev/null", "--internal", internal])
            .output()
            .expect("run detector replay");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("no host counted as internal"))
            .unwrap_or_else(|| panic!("--internal {internal}: no explanation: {stderr}"));
        assert!(
            line.contains("--internal CIDR") && line.contains(internal),
            "{line}"
        );
        // The count on the named side is every record the engine saw; the other is 0.
        let count = |label: &str| -> u64 {
            let after = line.split(label).nth(1).unwrap_or_else(|| panic!("{line}"));
            after
                .trim_start_matches(": ")
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{label} in {line}"))
        };
        let records: u64 = line
            .split("detection: ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(records > 0, "{line}");
        let (both, neither) = (
            count("both ends internal, private to private"),
            count("neither end internal, public addresses only"),
        );
        if side == "both ends" {
            assert_eq!((both, neither), (records, 0), "{line}");
        } else {
            assert_eq!((both, neither), (0, records), "{line}");
        }
    }
}

/// The kind `replay --payload-hints --internal HOST/32` reports for a capture's host:
/// `(kind, why)` from its report line, or None when the host is not reported.
fn reported_kind(pcap: &Path, host: &str) -> Option<(String, String)> {
    kind_of(pcap, host, true)
}

/// The same, with or without `--payload-hints`.
fn kind_of(pcap: &Path, host: &str, hints: bool) -> Option<(String, String)> {
    let mut cmd = Command::new(tests::detector_bin());
    cmd.arg("replay")
        .arg(pcap)
        .args(["--flows-json", "/dev/null"]);
    if hints {
        cmd.arg("--payload-hints");
    }
    let out = cmd
        .arg("--internal")
        .arg(format!("{host}/32"))
        .output()
        .expect("run detector replay");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("host {host} score ")))?;
    let rest = line.split(" kind ").nth(1)?;
    let kind = rest.split([' ', ':']).next()?.to_string();
    let why = rest
        .strip_prefix(&kind)?
        .trim_start()
        .strip_prefix('(')
        .and_then(|w| w.split(')').next())
        .unwrap_or("")
        .to_string();
    Some((kind, why))
}

/// Captures of `LABELS.tsv` whose host the report cannot name, and why.
const UNNAMED: &[(&str, &str)] = &[
    (
        "pcap/p2p/nDPI__bittorrent_utp.pcap",
        "stitched: its uTP flows end years before the capture's last frame, so the host has left the window when the replay ends",
    ),
    (
        "pcap/p2p/nDPI__bt_search.pcap",
        "one local peer discovery multicast: no external peer, no profile",
    ),
];

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn labelled_captures_show_the_kind_they_hold() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let labels = std::fs::read_to_string(data.join("LABELS.tsv")).unwrap();
    let mut named = 0;
    for line in labels.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (capture, host, class) = (cols[0], cols[1], cols[2]);
        let pcap = data.join(capture);
        let got = reported_kind(&pcap, host);
        if class == "benign" {
            // No payload signature in benign traffic, so no host named by one.
            if let Some((kind, why)) = got {
                assert!(!why.contains("payload"), "{capture} {host}: {kind} ({why})");
            }
            continue;
        }
        if let Some((_, reason)) = UNNAMED.iter().find(|(c, _)| *c == capture) {
            assert!(
                got.is_none(),
                "{capture}: now reported ({got:?}); was: {reason}"
            );
            eprintln!("{capture}: not named ({reason})");
            continue;
        }
        let want = if class.starts_with("bittorrent") {
            "bittorrent"
        } else if capture.contains("gnutella") {
            "gnutella"
        } else if capture.contains("edonkey") {
            "edonkey"
        } else {
            panic!("{capture}: a P2P class without a known kind: {class}");
        };
        let (kind, why) = got.unwrap_or_else(|| panic!("{capture}: {host} not reported"));
        assert_eq!(kind, want, "{capture} {host} ({why})");
        assert!(
            why.contains("payload"),
            "{capture}: named by its payload: {why}"
        );
        eprintln!("{capture}: {kind} ({why})");
        named += 1;
    }
    assert!(named >= 6, "only {named} captures named");
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn without_payload_hints_bittorrent_is_named_from_how_it_opens_whatever_its_ports() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    let dir = std::env::temp_dir().join(format!("detector-remap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Real peer-wire traffic with plaintext handshakes; one of its peers listens on
    // 51413, the others on random ports.
    let (capture, host) = ("pcap/p2p/nDPI__bittorrent.pcap", "192.168.1.3");
    let pcap = data.join(capture);
    let (kind, why) = kind_of(&pcap, host, false).expect("reported");
    assert_eq!(kind, "bittorrent", "{why}");
    assert!(
        why.contains("opened with the BitTorrent handshake"),
        "{why}"
    );
    // Every port remapped: peers on 443, 80 and random high ports, none of a P2P
    // family's; the host's own ports random. The kind does not move.
    let internal = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if v4.is_private());
    for seed in [1u64, 2, 3] {
        let remapped = dir.join(format!("remapped-{seed}.pcap"));
        let done = tests::remap::remap_ports(&pcap, &remapped, internal, seed).unwrap();
        assert!(
            done.rewritten > 250 && done.to_443 > 0 && done.to_80 > 0 && done.to_random > 0,
            "{done:?}"
        );
        // tshark, an independent reader, finds no P2P well-known port left.
        let p2p_port = |p: u16| matches!(p, 6881..=6889 | 6969 | 51413 | 6346 | 6347 | 4662);
        let left: Vec<Tuple> = tshark::packets(&remapped)
            .into_iter()
            .map(|p| p.tuple)
            .filter(|t| p2p_port(t.2) || p2p_port(t.4))
            .collect();
        assert!(left.is_empty(), "well-known ports survived: {left:?}");
        let (kind, why) = kind_of(&remapped, host, false).expect("reported");
        assert_eq!(kind, "bittorrent", "seed {seed}: {why}");
        assert!(!why.contains("ports"), "named by ports: {why}");
        eprintln!("{capture} remapped (seed {seed}, {done:?}): {kind} ({why})");
    }
    std::fs::remove_dir_all(&dir).ok();
    // No benign host of the labelled captures is named by how its connections open.
    let labels = std::fs::read_to_string(data.join("LABELS.tsv")).unwrap();
    for line in labels.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols[2] != "benign" {
            continue;
        }
        if let Some((kind, why)) = kind_of(&data.join(cols[0]), cols[1], false) {
            assert!(
                !why.contains("opened with"),
                "{} {}: {kind} ({why})",
                cols[0],
                cols[1]
            );
        }
    }
}
