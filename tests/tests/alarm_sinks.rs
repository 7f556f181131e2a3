//! Alarm sinks against real receivers: a local HTTP receiver gets every webhook event,
//! including the ones sent while it was down, and a queue that overflows drops the oldest
//! and counts them; a real rsyslog (Debian) receives the RFC 5424 message over UDP and
//! TCP (privileged: rsyslogd is run as root by `cargo xtask test`).

use std::net::{IpAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detector::detect::evidence::Evidence;
use detector::detect::{AlarmEvent, AlarmState};
use detector::export::syslog::{SyslogAddr, SyslogSink};
use detector::export::webhook::WebhookSink;
use tests::http::{free_tcp_port, post_receiver, serve_post};

fn event(n: u32) -> AlarmEvent {
    AlarmEvent {
        id: format!("{n:016x}"),
        state: AlarmState::Raised,
        host: IpAddr::from([10, 0, 0, n as u8]),
        kind: "p2p",
        kind_evidence: Vec::new(),
        guards: Vec::new(),
        score: 9.5,
        at: "2026-11-30T01:00:20.000Z".into(),
        first_seen: "2026-11-30T01:00:00.000Z".into(),
        last_seen: "2026-11-30T01:05:00.000Z".into(),
        window_secs: 300,
        peers: 120,
        flows: 800,
        bytes_in: 5_000_000,
        bytes_out: 200_000,
        top_peer_share: 0.05,
        evidence: vec![Evidence {
            rule: "external_peers",
            value: 120.0,
            op: ">=",
            threshold: 25.0,
            fired: true,
            weight: 2.0,
        }],
        exporters: vec!["local".into()],
        suppressed: None,
        acknowledged: None,
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The alarm ids of the bodies a receiver kept, in order.
fn received_ids(bodies: &Mutex<Vec<String>>) -> Vec<String> {
    bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn the_webhook_delivers_after_the_endpoint_was_down_and_bounds_its_queue() {
    // A port nobody listens on yet.
    let port = free_tcp_port();
    let url = format!("http://127.0.0.1:{port}/alarms");
    let sink = WebhookSink::new(url.clone(), Duration::from_secs(2), 1, 100, None).unwrap();
    let start = Instant::now();
    sink.send(&[event(1), event(2), event(3)]);
    // Never blocks the caller.
    assert!(start.elapsed() < Duration::from_millis(100));
    wait_until(
        "failed attempts while the endpoint is down",
        Duration::from_secs(10),
        || sink.stats().failures.load(Relaxed) >= 2,
    );
    assert_eq!(sink.stats().delivered.load(Relaxed), 0);
    assert_eq!(sink.queued(), 3);
    // The endpoint comes up: everything queued is delivered, in order.
    let bodies = Arc::new(Mutex::new(Vec::new()));
    post_receiver(
        TcpListener::bind(("127.0.0.1", port)).unwrap(),
        bodies.clone(),
    );
    wait_until(
        "delivery after the endpoint came back",
        Duration::from_secs(30),
        || sink.stats().delivered.load(Relaxed) == 3,
    );
    assert_eq!(
        received_ids(&bodies),
        vec![event(1).id, event(2).id, event(3).id]
    );

    // A bounded queue: with the endpoint unreachable, the oldest events are dropped.
    let dead = free_tcp_port();
    let small = WebhookSink::new(
        format!("http://127.0.0.1:{dead}/"),
        Duration::from_secs(1),
        0,
        2,
        None,
    )
    .unwrap();
    small.send(&(0..5).map(event).collect::<Vec<_>>());
    assert_eq!(small.queued(), 2);
    assert_eq!(small.stats().dropped.load(Relaxed), 3);
}

fn rsyslog(
    dir: &std::path::Path,
    proto: &str,
    port: u16,
) -> (tests::netns::Guarded, std::path::PathBuf) {
    let out = dir.join(format!("{proto}.log"));
    let conf = dir.join(format!("{proto}.conf"));
    let module = if proto == "udp" { "imudp" } else { "imtcp" };
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{dir}\")\nmodule(load=\"{module}\")\ninput(type=\"{module}\" port=\"{port}\" address=\"127.0.0.1\")\n*.* action(type=\"omfile\" file=\"{out}\" template=\"RSYSLOG_SyslogProtocol23Format\")\n",
            dir = dir.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join(format!("{proto}.pid")))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rsyslogd (package rsyslog; cargo xtask setup installs it)");
    (tests::netns::Guarded::new("rsyslogd", child), out)
}

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn rsyslog_receives_the_alarm_over_udp_and_tcp() {
    let dir = std::env::temp_dir().join(format!("detector-rsyslog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for proto in ["udp", "tcp"] {
        let port = free_tcp_port();
        let (mut rs, out) = rsyslog(&dir, proto, port);
        std::thread::sleep(Duration::from_millis(800));
        let addr = format!("127.0.0.1:{port}");
        let mut sink = SyslogSink::new(if proto == "udp" {
            SyslogAddr::Udp(addr)
        } else {
            SyslogAddr::Tcp(addr)
        });
        let e = event(7);
        // rsyslog may still be starting: send until it shows up.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            sink.send(&e);
            std::thread::sleep(Duration::from_millis(300));
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains(&e.id) {
                assert!(
                    text.contains("detector@32473"),
                    "{proto}: structured data missing: {text}"
                );
                assert!(text.contains("host 10.0.0.7"), "{proto}: {text}");
                assert!(
                    text.contains("detector"),
                    "{proto}: app name missing: {text}"
                );
                // The machine's name, so that a central server tells sensors apart.
                let name = detector::export::syslog::host_name().expect("a host name");
                assert!(
                    text.contains(&format!(" {name} detector ")),
                    "{proto}: host name {name} missing: {text}"
                );
                break;
            }
            assert!(
                Instant::now() < end,
                "{proto}: rsyslog did not receive the alarm"
            );
        }
        rs.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A test CA and a certificate it signed for localhost and 127.0.0.1 (openssl), in
/// `dir`: (ca.pem, server.pem, server.key).
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=detector test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// An HTTPS receiver (rustls) with the certificate `cert`/`key`: answers 200 to every
/// POST and keeps the bodies; returns its port.
fn tls_receiver(
    cert: &std::path::Path,
    key: &std::path::Path,
    bodies: Arc<Mutex<Vec<String>>>,
) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let (config, bodies) = (config.clone(), bodies.clone());
            std::thread::spawn(move || {
                let server = rustls::ServerConnection::new(config).unwrap();
                serve_post(rustls::StreamOwned::new(server, tcp), &bodies);
            });
        }
    });
    port
}

/// HTTPS webhooks: delivered to a receiver whose certificate a test CA signed when
/// that CA is given (`--webhook-ca`), refused by TLS without it (counted, nothing
/// delivered), and a CA file that does not load is refused when the sink is made.
#[test]
fn https_webhooks_trust_the_given_ca_and_refuse_what_they_cannot_serve_at_start() {
    let dir = std::env::temp_dir().join(format!("detector-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = test_pki(&dir);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let port = tls_receiver(&cert, &key, bodies.clone());
    let url = format!("https://localhost:{port}/alarms");

    let sink = WebhookSink::new(url.clone(), Duration::from_secs(2), 1, 100, Some(&ca)).unwrap();
    sink.send(&[event(1), event(2)]);
    wait_until("delivery over TLS", Duration::from_secs(20), || {
        sink.stats().delivered.load(Relaxed) == 2
    });
    assert_eq!(received_ids(&bodies), vec![event(1).id, event(2).id]);

    // Without the test CA the receiver's certificate is not trusted.
    let untrusted = WebhookSink::new(url.clone(), Duration::from_secs(2), 0, 100, None).unwrap();
    untrusted.send(&[event(3)]);
    wait_until("a refused TLS handshake", Duration::from_secs(20), || {
        untrusted.stats().failures.load(Relaxed) >= 1
    });
    assert_eq!(untrusted.stats().delivered.load(Relaxed), 0);
    assert_eq!(bodies.lock().unwrap().len(), 2);

    // Refused at once: a CA file that is not PEM, and a URL that is not http(s).
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let e = WebhookSink::new(url.clone(), Duration::from_secs(2), 0, 1, Some(&junk))
        .err()
        .expect("a CA file without a certificate is refused")
        .to_string();
    assert!(e.contains("junk.pem"), "{e}");
    assert!(WebhookSink::new("ftp://x/".into(), Duration::from_secs(1), 0, 1, None).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Retries pause, growing: against a closed port with `retries = 3`, an event takes four
/// attempts 200, 400 and 800 ms apart (it used to take hundreds in half a second);
/// events arriving meanwhile do not cut the pauses short. At exit the queue gets a
/// bounded time and what stays is counted.
#[test]
fn retries_back_off_and_what_stays_at_exit_is_counted() {
    let dead = free_tcp_port();
    let mut sink = WebhookSink::new(
        format!("http://127.0.0.1:{dead}/"),
        Duration::from_secs(1),
        3,
        100,
        None,
    )
    .unwrap();
    sink.send(&[event(1)]);
    for i in 2..10 {
        std::thread::sleep(Duration::from_millis(50));
        sink.send(&[event(i)]);
    }
    std::thread::sleep(Duration::from_millis(100));
    // 500 ms in: the first attempt and the one after the 200 ms pause, no more.
    let attempts = sink.stats().failures.load(Relaxed);
    assert!((1..=2).contains(&attempts), "{attempts} attempts in 500 ms");
    let left = sink.close(Duration::from_millis(300));
    assert_eq!(left, 9, "every event still queued at exit");
}
