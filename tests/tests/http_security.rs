//! `run --http` with `--http-config`: TLS and authentication, and the refusals of
//! writes from other sites (issue #24, "an endpoint that lets no one else in").
//!
//! - TLS with a certificate made here (`openssl`, a CA and a leaf for 127.0.0.1 and
//!   localhost), checked by `curl --cacert`; plain HTTP on the TLS port gets a 400; a
//!   renewed certificate is served without a restart;
//! - reads (`/api/alarms`, `/`, `/metrics`) and writes (a POST to any path, refused
//!   before routing) without credentials or with wrong ones: 401 with
//!   `WWW-Authenticate`; with a user's password or a bearer token (sha256 in the file,
//!   bcrypt in `bearer_tokens_file`): through;
//! - a write from another site (`Origin: http://evil.example`, `Sec-Fetch-Site:
//!   cross-site`, a form's content type without either header): 403 even with valid
//!   credentials; every refusal counted on /metrics and logged once a minute a reason;
//! - `metrics_open: true`: GET and HEAD of /metrics answer without credentials, while
//!   the API, the page and every write (an acknowledgement, a suppression, a POST to
//!   /metrics) are still 401; `metrics_open: false`: /metrics without credentials is 401;
//! - a real Prometheus (Debian's `prometheus`) scrapes /metrics over TLS with basic
//!   authentication: `up == 1` by its query API, `up == 0` for a job with a wrong password;
//! - without `--http-config`: `--http PORT` binds 127.0.0.1; cross-site writes and Host
//!   names other than localhost (DNS rebinding) are refused;
//! - a bad file (missing certificate, bad hash, unknown key) is named with its fix by
//!   `detector check-config` and at start.
//!
//! No BPF: the agent runs as a NetFlow collector that receives nothing. Tests skip (with
//! a message) where curl, openssl or prometheus is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::agent::{find_tool, scratch, start_prometheus};
use tests::http::{free_tcp_port, prom_value};
use tests::netns::Guarded;

const PASSWORD: &str = "wonderland";
const TOKEN: &str = "s3cret-bearer-token";
const FILE_TOKEN: &str = "another-token-from-the-file";

/// Whether every tool is here; a message names the missing ones.
fn tools(test: &str, names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipping {test}: {} not installed (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    missing.is_empty()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 and localhost signed by it
/// (`cert.pem`, `key.pem`) in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"])
            .args(["-subj", "/CN=detector test CA"]),
    );
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args(["-keyout", "key.pem", "-out", "server.csr"])
            .args(["-subj", "/CN=localhost"]),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem"])
            .args(["-CAkey", "ca.key", "-set_serial", "2", "-days", "2"])
            .args(["-extfile", "server.ext", "-out", "cert.pem"]),
    );
}

fn sha256_hex(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The `--http-config` file: TLS (paths relative to the file), user alice, a sha256
/// token in the file and a bcrypt one in `tokens.txt`.
fn write_web_config(dir: &Path, extra: &str) -> PathBuf {
    std::fs::write(
        dir.join("tokens.txt"),
        format!(
            "# one hash a line\n{}\n",
            bcrypt::hash(FILE_TOKEN, 4).unwrap()
        ),
    )
    .unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  alice: '{}'\nbearer_tokens:\n  - 'sha256:{}'\nbearer_tokens_file: tokens.txt\n{extra}",
            bcrypt::hash(PASSWORD, 4).unwrap(),
            sha256_hex(TOKEN)
        ),
    )
    .unwrap();
    web
}

/// The agent as a NetFlow collector with `args`; its log in `dir/agent.log`, waited on
/// until the status server is up.
fn start_agent(dir: &Path, args: &[&str], up: &str) -> (Guarded, PathBuf) {
    let log = dir.join("agent.log");
    let nf = format!("127.0.0.1:{}", tests::netns::free_udp_port());
    let child = Command::new(tests::detector_bin())
        .args(["run", "--netflow-listen", &nf, "--stats-interval", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Guarded::new("detector", child);
    tests::netns::wait_for_text(&log, up, Duration::from_secs(20));
    (agent, log)
}

#[derive(Debug)]
struct Reply {
    /// 0 when curl failed (see `exit`).
    code: u16,
    headers: String,
    body: String,
    exit: i32,
}

/// `curl -s -i ARGS`: the status, the headers (lower case) and the body.
fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Reply {
        code,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
        exit: out.status.code().unwrap_or(-1),
    }
}

fn counter(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("detector_http_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}in\n{metrics}"))
        .parse()
        .unwrap()
}

#[test]
fn tls_and_authentication_guard_reads_and_writes() {
    if !tools(
        "tls_and_authentication_guard_reads_and_writes",
        &["openssl", "curl", "sha256sum"],
    ) {
        return;
    }
    let dir = scratch("http-security");
    make_certificates(&dir);
    let web = write_web_config(&dir, "");
    let port = free_tcp_port();
    // `:PORT`: on 127.0.0.1.
    let (_agent, log) = start_agent(
        &dir,
        &[
            "--http",
            &format!(":{port}"),
            "--http-config",
            web.to_str().unwrap(),
        ],
        &format!("status on https://127.0.0.1:{port}/"),
    );
    let base = format!("https://127.0.0.1:{port}");
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let get = |path: &str, extra: &[&str]| {
        let url = format!("{base}{path}");
        let mut args = vec!["--cacert", ca];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    };
    let post = |path: &str, extra: &[&str]| {
        let mut args = vec!["-X", "POST"];
        args.extend_from_slice(extra);
        get(path, &args)
    };
    let alice = format!("alice:{PASSWORD}");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let file_bearer = format!("Authorization: Bearer {FILE_TOKEN}");

    // Reads without credentials, or with wrong ones: 401 and the schemes to use.
    for path in ["/api/alarms", "/", "/metrics"] {
        let r = get(path, &[]);
        assert_eq!(r.code, 401, "GET {path} without credentials: {r:?}");
        assert!(
            r.headers
                .contains("www-authenticate: basic realm=\"detector\"")
                && r.headers
                    .contains("www-authenticate: bearer realm=\"detector\""),
            "{r:?}"
        );
        for wrong in [
            vec!["-u", "alice:wrong"],
            vec!["-u", "bob:wonderland"],
            vec!["-H", "Authorization: Bearer not-the-token"],
        ] {
            let r = get(path, &wrong);
            assert_eq!(r.code, 401, "GET {path} with {wrong:?}: {r:?}");
        }
    }
    // With a password or either token: through.
    let r = get("/api/alarms", &["-u", &alice]);
    assert_eq!(r.code, 200, "{r:?}");
    let alarms: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(alarms["alarms"].is_array(), "{alarms}");
    let r = get("/", &["-u", &alice]);
    assert!(r.code == 200 && r.body.contains("<html"), "{r:?}");
    for token in [&bearer, &file_bearer] {
        let r = get("/api/alarms", &["-H", token]);
        assert_eq!(r.code, 200, "{token}: {r:?}");
    }

    // Writes, to any path: refused before routing without credentials.
    for path in ["/api/no-such-endpoint", "/api/alarms", "/anything"] {
        let r = post(path, &[]);
        assert_eq!(r.code, 401, "POST {path}: {r:?}");
        let r = post(path, &["-u", "alice:wrong"]);
        assert_eq!(r.code, 401, "POST {path} with a wrong password: {r:?}");
    }
    // With credentials the request reaches the routes (none takes this POST).
    let r = post("/api/no-such-endpoint", &["-u", &alice]);
    assert!(r.code == 404 || r.code == 405, "{r:?}");
    let r = post("/api/no-such-endpoint", &["-H", &bearer]);
    assert!(r.code == 404 || r.code == 405, "{r:?}");
    let own = format!("Origin: {base}");
    let r = post("/api/no-such-endpoint", &["-u", &alice, "-H", &own]);
    assert!(r.code == 404 || r.code == 405, "same origin: {r:?}");
    // From another site: 403 whatever the credentials.
    for cross in [
        vec!["-H", "Origin: http://evil.example"],
        vec!["-H", "Origin: null"],
        vec!["-H", "Sec-Fetch-Site: cross-site"],
        vec!["-H", "Sec-Fetch-Site: same-site"],
        // A form's body without Origin or Sec-Fetch-Site (curl -d: urlencoded).
        vec!["-d", "host=10.0.0.1"],
    ] {
        for creds in [vec!["-u", alice.as_str()], vec!["-H", bearer.as_str()]] {
            let args: Vec<&str> = creds.iter().chain(&cross).copied().collect();
            let r = post("/api/alarms", &args);
            assert_eq!(r.code, 403, "{args:?}: {r:?}");
            assert!(r.body.contains("Cross-site"), "{r:?}");
        }
    }

    // TLS: plain HTTP on the port gets a 400 that says https; a client that does not
    // trust the CA does not connect.
    let r = curl(&[&format!("http://127.0.0.1:{port}/api/alarms")]);
    assert_eq!(r.code, 400, "{r:?}");
    assert!(r.body.contains("HTTPS"), "{r:?}");
    let r = curl(&[
        "--capath",
        "/nonexistent",
        "--cacert",
        "/etc/ssl/certs/ca-certificates.crt",
        &format!("{base}/api/alarms"),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.exit, 60, "curl: the certificate is not trusted: {r:?}");
    // The name in the certificate is checked too: localhost is in it.
    let r = curl(&[
        "--cacert",
        ca,
        "-u",
        &alice,
        "--resolve",
        &format!("localhost:{port}:127.0.0.1"),
        &format!("https://localhost:{port}/api/alarms"),
    ]);
    assert_eq!(r.code, 200, "{r:?}");

    // Each refusal counted, and logged once a minute a reason.
    let metrics = get("/metrics", &["-u", &alice]).body;
    assert!(counter(&metrics, "unauthenticated") >= 6, "{metrics}");
    assert!(counter(&metrics, "bad_credentials") >= 12, "{metrics}");
    assert_eq!(counter(&metrics, "cross_site"), 10, "{metrics}");
    assert_eq!(counter(&metrics, "plain_http"), 1, "{metrics}");
    assert!(counter(&metrics, "tls_handshake") >= 1, "{metrics}");
    assert_eq!(counter(&metrics, "host"), 0, "{metrics}");
    if let Err(e) = tests::promtool_check(&metrics) {
        panic!("promtool check metrics: {e}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |reason: &str| {
        text.lines()
            .filter(|l| l.contains("--http: refused") && l.contains(&format!("({reason})")))
            .count()
    };
    assert_eq!(lines("unauthenticated"), 1, "{text}");
    assert_eq!(lines("cross_site"), 1, "{text}");
    assert!(
        text.contains("POST /api/alarms from 127.0.0.1:")
            && text.contains("Origin http://evil.example"),
        "{text}"
    );

    // A renewed certificate (here from another CA) is served without a restart.
    let renewed = dir.join("renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    make_certificates(&renewed);
    std::fs::copy(renewed.join("key.pem"), dir.join("key.pem")).unwrap();
    std::fs::copy(renewed.join("cert.pem"), dir.join("cert.pem")).unwrap();
    let new_ca = renewed.join("ca.pem");
    let url = format!("{base}/api/alarms");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = curl(&["--cacert", new_ca.to_str().unwrap(), "-u", &alice, &url]);
        if r.code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not served: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = curl(&["--cacert", ca, "-u", &alice, &url]);
    assert_eq!(r.exit, 60, "the old CA no longer verifies it: {r:?}");
    tests::netns::wait_for_text(&log, "read again (changed)", Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_open_leaves_only_get_metrics_without_credentials() {
    if !tools(
        "metrics_open_leaves_only_get_metrics_without_credentials",
        &["openssl", "curl", "sha256sum"],
    ) {
        return;
    }
    let dir = scratch("http-metrics-open");
    make_certificates(&dir);
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let alice = format!("alice:{PASSWORD}");
    for open in [true, false] {
        let web = write_web_config(&dir, &format!("metrics_open: {open}\n"));
        let port = free_tcp_port();
        let (agent, log) = start_agent(
            &dir,
            &[
                "--http",
                &format!("127.0.0.1:{port}"),
                "--http-config",
                web.to_str().unwrap(),
            ],
            &format!("status on https://127.0.0.1:{port}/"),
        );
        let req = |method: &str, path: &str, extra: &[&str]| {
            let url = format!("https://127.0.0.1:{port}{path}");
            let mut args = vec!["--cacert", ca, "-X", method];
            args.extend_from_slice(extra);
            args.push(&url);
            curl(&args)
        };
        let scrape = req("GET", "/metrics", &[]);
        if open {
            // Open: the agent's metrics, to anyone (HEAD too).
            assert_eq!(scrape.code, 200, "metrics_open: {scrape:?}");
            assert!(
                scrape
                    .body
                    .contains("detector_http_refused_total{reason=\"unauthenticated\"} 0"),
                "{scrape:?}"
            );
            let head = curl(&[
                "--cacert",
                ca,
                "-I",
                &format!("https://127.0.0.1:{port}/metrics"),
            ]);
            assert_eq!(head.code, 200, "HEAD /metrics: {head:?}");
        } else {
            assert_eq!(scrape.code, 401, "metrics_open: false: {scrape:?}");
            assert!(
                scrape.headers.contains("www-authenticate: basic"),
                "{scrape:?}"
            );
        }
        // Everything else still needs credentials: the API, the page, and every write,
        // to /metrics too.
        let json = ["-H", "Content-Type: application/json"];
        let refused = [
            req("GET", "/api/alarms", &[]),
            req("GET", "/api/hosts", &[]),
            req("GET", "/api/suppressions", &[]),
            req("GET", "/", &[]),
            req(
                "POST",
                "/api/alarms/0000000000000000/ack",
                &[&json[..], &["-d", r#"{"note":"x","by":"mallory"}"#]].concat(),
            ),
            req(
                "POST",
                "/api/suppressions",
                &[
                    &json[..],
                    &["-d", r#"{"cidr":"10.0.0.0/8","note":"x","by":"mallory"}"#],
                ]
                .concat(),
            ),
            req("POST", "/metrics", &[]),
        ];
        for r in &refused {
            assert_eq!(r.code, 401, "metrics_open: {open}: {r:?}");
            assert!(r.body.contains("Authentication required"), "{r:?}");
        }
        // With a password the API answers, and nothing was decided above.
        let r = req("GET", "/api/suppressions", &["-u", &alice]);
        assert_eq!(r.code, 200, "{r:?}");
        let list: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(list["suppressions"], serde_json::json!([]), "{list}");
        // Every refusal counted (the scrape without credentials among them when closed),
        // the open scrapes not.
        let metrics = req("GET", "/metrics", &["-u", &alice]).body;
        let want = refused.len() as u64 + u64::from(!open);
        assert_eq!(counter(&metrics, "unauthenticated"), want, "{metrics}");
        drop(agent);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("decision:"), "nothing decided:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth() {
    if !tools(
        "prometheus_scrapes_over_tls_with_basic_auth",
        &["openssl", "curl", "sha256sum", "prometheus"],
    ) {
        return;
    }
    let dir = scratch("http-prometheus");
    make_certificates(&dir);
    // /metrics needs credentials too (metrics_open is false by default).
    let web = write_web_config(&dir, "metrics_open: false\n");
    let (port, prom_port) = (free_tcp_port(), free_tcp_port());
    let (_agent, _log) = start_agent(
        &dir,
        &[
            "--http",
            &format!("127.0.0.1:{port}"),
            "--http-config",
            web.to_str().unwrap(),
        ],
        "status on https://",
    );
    let ca = dir.join("ca.pem");
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: alice\n      password: {password}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            ca.display()
        )
    };
    let prom_dir = dir.join("prometheus");
    let _prometheus = start_prometheus(
        &prom_dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{}{}",
            job("detector", PASSWORD),
            job("wrong_password", "not-it")
        ),
        prom_port,
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    let query = |q: &str| prom_value(&prom, q);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (up, wrong) = loop {
        let (up, wrong) = (
            query("up{job=\"detector\"}"),
            query("up{job=\"wrong_password\"}"),
        );
        if up.as_deref() == Some("1") && wrong.is_some() {
            break (up, wrong);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the agent over TLS: up {up:?}, wrong password {wrong:?}; its log:\n{}",
            std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(up.as_deref(), Some("1"));
    assert_eq!(wrong.as_deref(), Some("0"), "a wrong password is refused");
    // What it scraped: the agent's metrics, with the wrong job's refusals among them.
    let q = "detector_http_refused_total{job=\"detector\",reason=\"bad_credentials\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = query(q);
        if refused
            .as_deref()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{q}: {refused:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_config_the_server_is_on_loopback_and_refuses_other_sites() {
    if !tools(
        "without_a_config_the_server_is_on_loopback_and_refuses_other_sites",
        &["curl"],
    ) {
        return;
    }
    let dir = scratch("http-plain");
    let port = free_tcp_port();
    // A bare port: 127.0.0.1.
    let (_agent, log) = start_agent(
        &dir,
        &["--http", &port.to_string()],
        &format!("status on http://127.0.0.1:{port}/"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let req = |method: &str, path: &str, extra: &[&str]| {
        let url = format!("{base}{path}");
        let mut args = vec!["-X", method];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    };
    assert_eq!(req("GET", "/api/alarms", &[]).code, 200);
    // A non-browser client's write reaches the routes.
    let r = req("POST", "/api/no-such-endpoint", &[]);
    assert!(r.code == 404 || r.code == 405, "{r:?}");
    let r = req(
        "POST",
        "/api/no-such-endpoint",
        &["-H", "Content-Type: application/json", "-d", "{}"],
    );
    assert!(r.code == 404 || r.code == 405, "{r:?}");
    let own = format!("Origin: {base}");
    let r = req("POST", "/api/no-such-endpoint", &["-H", &own]);
    assert!(r.code == 404 || r.code == 405, "{r:?}");
    // Other sites' writes are not.
    for cross in [
        vec!["-H", "Origin: http://evil.example"],
        vec!["-H", "Sec-Fetch-Site: cross-site"],
        vec!["-d", "x=1"],
        vec!["-H", "Content-Type: text/plain", "-d", "x"],
    ] {
        let r = req("POST", "/api/alarms", &cross);
        assert_eq!(r.code, 403, "{cross:?}: {r:?}");
    }
    // A name rebound to this host: not without authentication (but /metrics).
    let r = req("GET", "/api/alarms", &["-H", "Host: evil.example"]);
    assert_eq!(r.code, 403, "{r:?}");
    assert!(r.body.contains("authentication"), "{r:?}");
    let r = req("GET", "/metrics", &["-H", "Host: evil.example"]);
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(counter(&r.body, "cross_site"), 4, "{}", r.body);
    assert_eq!(counter(&r.body, "host"), 1, "{}", r.body);
    assert_eq!(counter(&r.body, "unauthenticated"), 0, "{}", r.body);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("without authentication: whoever"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the agent (or check-config) and returns its exit status and standard error,
/// failing the test if it does not end within 20 s.
fn run_to_end(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(tests::detector_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("detector {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_bad_http_config_is_named_with_its_fix() {
    let dir = scratch("http-config-errors");
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let cases = [
        (
            "missing-cert.yml",
            "tls_server_config:\n  cert_file: nowhere/cert.pem\n  key_file: nowhere/key.pem\n"
                .to_string(),
            vec![
                "tls_server_config.cert_file",
                "cannot read",
                "nowhere/cert.pem",
            ],
        ),
        (
            "bad-hash.yml",
            "basic_auth_users:\n  alice: wonderland\n".to_string(),
            vec!["basic_auth_users.alice", "not a bcrypt hash", "htpasswd"],
        ),
        (
            "bad-token.yml",
            "bearer_tokens: ['s3cret']\n".to_string(),
            vec!["bearer_tokens[0]", "sha256sum"],
        ),
        (
            "unknown-key.yml",
            format!("basic_auth_user:\n  alice: '{hash}'\n"),
            vec!["unknown key `basic_auth_user`", "basic_auth_users"],
        ),
        (
            "client-certs.yml",
            "tls_server_config:\n  client_ca_file: ca.pem\n".to_string(),
            vec!["tls_server_config.client_ca_file", "not supported"],
        ),
    ];
    let port = free_tcp_port().to_string();
    for (name, text, expect) in &cases {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        let f = f.to_str().unwrap();
        // check-config, on the file itself.
        let (ok, out) = run_to_end(&["check-config", f]);
        assert!(!ok, "{name}: {out}");
        for e in expect {
            assert!(
                out.contains(e),
                "{name}: check-config does not say {e:?}:\n{out}"
            );
        }
        // At start: the agent does not run.
        let nf = format!("127.0.0.1:{}", tests::netns::free_udp_port());
        let (ok, out) = run_to_end(&[
            "run",
            "--netflow-listen",
            &nf,
            "--http",
            &port,
            "--http-config",
            f,
        ]);
        assert!(!ok, "{name}: {out}");
        for e in expect {
            assert!(out.contains(e), "{name}: run does not say {e:?}:\n{out}");
        }
    }
    // Through the configuration file's `[http] config`, relative to it.
    let toml = dir.join("detector.toml");
    std::fs::write(
        &toml,
        "[http]\nlisten = \"9750\"\nconfig = \"bad-hash.yml\"\n",
    )
    .unwrap();
    let (ok, out) = run_to_end(&["check-config", toml.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("http.config") && out.contains("basic_auth_users.alice"),
        "{out}"
    );
    // A good file is described.
    let good = dir.join("good.yml");
    std::fs::write(
        &good,
        format!("basic_auth_users:\n  alice: '{hash}'\nmetrics_open: true\n"),
    )
    .unwrap();
    let (ok, out) = run_to_end(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("alice") && out.contains("metrics_open"),
        "{out}"
    );
    std::fs::write(&toml, "[http]\nlisten = \":9750\"\nconfig = \"good.yml\"\n").unwrap();
    let (ok, out) = run_to_end(&["check-config", toml.to_str().unwrap()]);
    assert!(ok && out.contains("config = \"good.yml\""), "{out}");
    // --http-config alone serves nothing: said so.
    let nf = format!("127.0.0.1:{}", tests::netns::free_udp_port());
    let (ok, out) = run_to_end(&[
        "run",
        "--netflow-listen",
        &nf,
        "--http-config",
        good.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("without --http"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
