//! SIGHUP: the agent reads its configuration again without losing a flow, and opens its
//! output files again (log rotation); a file that does not load is refused and the
//! running configuration kept. Files are appended to, so a restart keeps what earlier
//! runs wrote. NetFlow from a capture of `../shared/testdata` is sent over loopback
//! (no BPF needed); skips with a message when it is absent.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use detector::sources::capture::Capture;
use detector::sources::netflow::capture::{looks_like_netflow, udp_in_frame};
use detector::sources::netflow::decode::{DecodeLimits, Decoder};

fn datagrams() -> Option<Vec<Vec<u8>>> {
    let p = tests::shared_testdata()?.join(
        "netflow/pmacct-test-automation__401-IPFIXv10-BMP-IPv6-CISCO-MPLS-multiple-sources__traffic-00.pcap",
    );
    let mut cap = Capture::open(&p).ok()?;
    let mut out = Vec::new();
    while let Some(Ok(frame)) = cap.next_frame() {
        if let Some(dg) = udp_in_frame(&frame.data)
            && looks_like_netflow(dg.payload)
        {
            out.push(dg.payload.to_vec());
        }
    }
    Some(out)
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, port: u16, config: &Path, flows: &Path, log: &str) -> Self {
        let log = dir.join(log);
        let child = Command::new(tests::detector_bin())
            .args(["run", "--netflow-listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(config)
            .arg("--flows-json")
            .arg(flows)
            .args(["--stats-interval", "0", "--workers", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("agent starts");
        let a = Self { child, log };
        wait_for("the listener", Duration::from_secs(20), || {
            a.log_text().contains("receiving NetFlow/IPFIX")
        });
        a
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn stop(mut self) -> String {
        self.signal(libc::SIGINT);
        let status = self.child.wait().expect("agent ends");
        let log = self.log_text();
        assert!(status.success(), "agent failed: {status:?}\n{log}");
        log
    }
}

fn send(to: SocketAddr, dgs: &[Vec<u8>]) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, d) in dgs.iter().enumerate() {
        s.send_to(d, to).unwrap();
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[test]
fn sighup_reloads_the_configuration_and_reopens_files_without_losing_a_flow() {
    let Some(dgs) = datagrams() else {
        eprintln!("skipped: ../shared/testdata/netflow is absent");
        return;
    };
    // What every datagram decodes to: the records the agent must export in all.
    let mut want = Vec::new();
    let mut dec = Decoder::new(DecodeLimits::default(), vec![]);
    for d in &dgs {
        dec.decode(
            "127.0.0.1:9".parse().unwrap(),
            d,
            SystemTime::now(),
            &mut want,
        );
    }
    assert!(want.len() > 100, "{} records", want.len());

    let dir = std::env::temp_dir().join(format!("detector-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (config, flows) = (dir.join("detector.toml"), dir.join("flows.json"));
    std::fs::write(&config, "[thresholds]\nscore = 7.0\n").unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = Agent::start(&dir, port, &config, &flows, "agent.log");
    let half = dgs.len() / 2;
    send(to, &dgs[..half]);
    wait_for("the first half's flows", Duration::from_secs(20), || {
        lines(&flows) > 0
    });
    std::thread::sleep(Duration::from_millis(500));

    // A file that does not load: refused, the agent keeps running on what it had.
    std::fs::write(&config, "[thresholds]\nscore = \"high\"\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the refusal", Duration::from_secs(10), || {
        agent
            .log_text()
            .contains("not reloaded, the running configuration is kept")
    });

    // Log rotation and a new threshold: the file moves away, SIGHUP, a new file.
    let rotated = dir.join("flows.json.1");
    std::fs::rename(&flows, &rotated).unwrap();
    std::fs::write(&config, "[thresholds]\nscore = 9.5\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the reload", Duration::from_secs(10), || {
        agent.log_text().contains("reloaded") && agent.log_text().contains("threshold 9.5")
    });
    std::thread::sleep(Duration::from_millis(300));
    send(to, &dgs[half..]);
    std::thread::sleep(Duration::from_secs(1));
    let log = agent.stop();
    assert!(!log.contains("panicked"), "{log}");
    let (old, new) = (lines(&rotated), lines(&flows));
    assert!(new > 0, "nothing in the reopened file:\n{log}");
    assert_eq!(old + new, want.len(), "records lost or doubled:\n{log}");
    // The statistics line after the reload shows the new threshold.
    assert!(log.contains("(threshold 9.5)"), "{log}");

    // A restart appends: what the last run wrote stays.
    let agent = Agent::start(&dir, port, &config, &flows, "agent2.log");
    agent.stop();
    assert_eq!(lines(&flows), new, "the restart truncated the file");
    std::fs::remove_dir_all(&dir).ok();
}
