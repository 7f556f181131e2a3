//! `--export-format ipfix`: the same flows as the v9 export, in IPFIX. A NetFlow capture
//! of `../shared/testdata` is replayed (`replay --netflow`, no BPF needed) and exported
//! both ways to two nfcapd; nfdump must read the same flows, packets and bytes from each,
//! and tshark must decode every IPFIX message without a malformed packet or an expert
//! warning, to the same packet and byte totals. Skips with a message when `../shared` is
//! absent.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::collectors::Nfcapd;
use tests::netns::sh;

fn capture() -> Option<PathBuf> {
    let p = tests::shared_testdata()?.join(
        "netflow/pmacct-test-automation__401-IPFIXv10-BMP-IPv6-CISCO-MPLS-multiple-sources__traffic-00.pcap",
    );
    p.is_file().then_some(p)
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

/// Writes `datagrams` (sent from 127.0.0.1:`from` to 127.0.0.1:`to`) as a pcap of raw
/// IPv4 packets.
fn write_pcap(path: &Path, datagrams: &[Vec<u8>], from: u16, to: u16) {
    use tests::export::{LINKTYPE_RAW, udp_packets, write_pcap};
    let local = std::net::Ipv4Addr::LOCALHOST;
    write_pcap(
        path,
        LINKTYPE_RAW,
        &udp_packets((local, from), (local, to), datagrams),
    );
}

#[test]
fn ipfix_export_carries_the_v9_export_s_flows_and_decodes_cleanly() {
    let Some(cap) = capture() else {
        eprintln!("skipped: ../shared/testdata/netflow is absent");
        return;
    };
    let dir = std::env::temp_dir().join(format!("detector-ipfix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut totals = Vec::new();
    let mut ipfix_datagrams = Vec::new();
    let (mut from, mut to) = (0, 0);
    for format in ["v9", "ipfix"] {
        let nf_port = free_port();
        let nfcapd = Nfcapd::start(dir.join(format), nf_port);
        let mine = UdpSocket::bind("127.0.0.1:0").unwrap();
        mine.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let (mine_addr, reader) = (mine.local_addr().unwrap(), mine.try_clone().unwrap());
        // Read while the replay sends (a socket left unread drops what overflows it).
        let collect = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let (mut got, mut from) = (Vec::new(), 0);
            let mut idle = 0;
            while idle < 4 {
                match reader.recv_from(&mut buf) {
                    Ok((n, src)) => {
                        got.push(buf[..n].to_vec());
                        from = src.port();
                        idle = 0;
                    }
                    Err(_) => idle += 1,
                }
            }
            (got, from)
        });
        let out = Command::new(tests::detector_bin())
            .args(["replay", "--netflow"])
            .arg(&cap)
            .args(["--export", &format!("127.0.0.1:{nf_port}")])
            .args(["--export", &mine_addr.to_string()])
            .args(["--export-format", format, "--flows-json", "/dev/null"])
            .output()
            .expect("replay runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (got, src) = collect.join().expect("reader");
        from = src;
        assert!(!got.is_empty(), "{format}: nothing exported");
        std::thread::sleep(Duration::from_millis(300));
        totals.push(nfcapd.totals());
        if format == "ipfix" {
            assert!(got.iter().all(|d| d[..2] == [0, 10]), "IPFIX version");
            to = mine_addr.port();
            ipfix_datagrams = got;
        }
    }
    assert!(totals[0].0.0 > 100, "v9: {:?}", totals[0]);
    assert_eq!(totals[1].0, totals[0].0, "nfdump totals: ipfix vs v9");
    // Sequence numbers as each collector counts them: nfcapd sees no gap in either.
    assert_eq!(
        (totals[0].1, totals[1].1),
        (0, 0),
        "nfcapd sequence failures (v9, ipfix)"
    );
    let totals: Vec<(u64, u64, u64)> = totals.into_iter().map(|t| t.0).collect();

    let pcap = dir.join("ipfix.pcap");
    write_pcap(&pcap, &ipfix_datagrams, from, to);
    let decode = format!("udp.port=={to},cflow");
    let p = pcap.to_str().unwrap();
    let listing = sh("tshark", &["-r", p, "-d", &decode]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(!listing.to_lowercase().contains("malformed"), "{listing}");
    let expert = sh(
        "tshark",
        &["-r", p, "-d", &decode, "-q", "-z", "expert,warn"],
    );
    let expert = String::from_utf8_lossy(&expert.stdout).to_string();
    assert!(
        !expert.contains("Warn") && !expert.contains("Error"),
        "tshark expert info: {expert}"
    );
    // tshark's sequence analysis (RFC 7011 3.1: the Data Records before each message,
    // per observation domain) finds no message out of sequence.
    let unexpected = sh(
        "tshark",
        &[
            "-r",
            p,
            "-d",
            &decode,
            "-Y",
            "cflow.sequence_analysis.expected_sn",
            "-T",
            "fields",
            "-e",
            "frame.number",
        ],
    );
    let unexpected = String::from_utf8_lossy(&unexpected.stdout).to_string();
    assert!(
        unexpected.trim().is_empty(),
        "out of sequence in tshark: frames {unexpected}"
    );
    let sum = |field: &str| -> u64 {
        let out = sh(
            "tshark",
            &["-r", p, "-d", &decode, "-T", "fields", "-e", field],
        );
        String::from_utf8_lossy(&out.stdout)
            .split([',', '\n'])
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        (sum("cflow.packets"), sum("cflow.octets")),
        (totals[1].1, totals[1].2),
        "tshark's packets and octets vs nfdump's"
    );
    std::fs::remove_dir_all(&dir).ok();
}
