//! A live peer: softflowd (Debian) reads a shared capture and exports it as NetFlow v5,
//! v9 and IPFIX to our listener; what we decode must equal what softflowd reports having
//! exported (records, and packets and bytes per protocol).
//!
//! softflowd 1.1 hangs before reading the capture when given its own control-socket or
//! pid-file paths (an uninitialised variable, depending on the argument layout), so it
//! runs with its defaults under /var/run, which needs root: run by `cargo xtask test`.
//! Skips with a message when `../shared` is absent.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tests::netns::{Guarded, free_udp_port, start_collector};

/// softflowd's own report: records exported, and (packets, octets) per protocol number.
struct Report {
    records: u64,
    per_proto: BTreeMap<u8, (u64, u64)>,
}

fn parse_report(text: &str) -> Report {
    let line = text
        .lines()
        .find(|l| l.starts_with("Flows exported:"))
        .unwrap_or_else(|| panic!("no 'Flows exported' line in softflowd output:\n{text}"));
    // "Flows exported: 61 (119 records) in 4 packets (0 failures)"
    let records = line
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("record count");
    let mut per_proto = BTreeMap::new();
    let mut in_table = false;
    for l in text.lines() {
        if l.starts_with("Per-protocol statistics:") {
            in_table = true;
            continue;
        }
        if in_table {
            // "            tcp (6):         974767         1748      11.60s      42.46s"
            let Some((name, rest)) = l.split_once("):") else {
                break;
            };
            let proto: u8 = name.rsplit('(').next().unwrap().trim().parse().unwrap();
            let mut cols = rest.split_whitespace();
            let octets: u64 = cols.next().unwrap().parse().unwrap();
            let packets: u64 = cols.next().unwrap().parse().unwrap();
            per_proto.insert(proto, (packets, octets));
        }
    }
    Report { records, per_proto }
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn softflowd_exports_decode_to_what_softflowd_sent() {
    let Some(data) = tests::shared_testdata() else {
        eprintln!("skipped: ../shared/testdata is absent");
        return;
    };
    assert!(
        Command::new("softflowd").arg("-h").output().is_ok(),
        "softflowd is not installed (cargo xtask setup installs it)"
    );
    let pcap = data.join("pcap/benign/nDPI__netflix.pcap");
    let dir = std::env::temp_dir().join(format!("detector-softflowd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for version in ["5", "9", "10"] {
        let port = free_udp_port();
        let json = dir.join(format!("v{version}.json"));
        let log = dir.join(format!("v{version}.log"));
        let mut agent = start_collector(port, &json, &log);
        // softflowd exports every flow and prints its report at the end of the capture.
        let sf_log = dir.join(format!("softflowd-v{version}.log"));
        let out = std::fs::File::create(&sf_log).unwrap();
        let child = Command::new("softflowd")
            .arg("-D")
            .arg("-r")
            .arg(&pcap)
            .args(["-n", &format!("127.0.0.1:{port}"), "-v", version])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run softflowd");
        let mut sf = Guarded::new("softflowd", child);
        let st = sf.wait(Duration::from_secs(60));
        assert!(st.success(), "softflowd: {st}");
        let report = parse_report(&std::fs::read_to_string(&sf_log).unwrap());
        std::thread::sleep(Duration::from_millis(500));
        let st = agent.stop(Signal::SIGTERM, Duration::from_secs(20));
        let agent_log = std::fs::read_to_string(&log).unwrap();
        assert!(st.success(), "{agent_log}");

        let mut per_proto: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        let mut records = 0u64;
        for line in std::fs::read_to_string(&json).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let e = per_proto
                .entry(v["protocol"].as_u64().unwrap() as u8)
                .or_default();
            e.0 += v["packets"].as_u64().unwrap();
            e.1 += v["bytes"].as_u64().unwrap();
            records += 1;
        }
        assert_eq!(
            records, report.records,
            "v{version}: records decoded vs softflowd's report\n{agent_log}"
        );
        assert_eq!(
            per_proto, report.per_proto,
            "v{version}: packets and octets per protocol"
        );
        assert!(agent_log.contains("errors {}"), "v{version}: {agent_log}");
        // softflowd's IPFIX sequence numbers do not count data records as RFC 7011 says,
        // so only v5 and v9 streams must show no loss.
        if version != "10" {
            assert!(agent_log.contains("lost 0"), "v{version}: {agent_log}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
