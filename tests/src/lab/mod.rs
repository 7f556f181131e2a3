//! The lab: a real BitTorrent swarm and real benign servers and clients in network
//! namespaces, the agent on the gateway's uplink, softflowd as a second exporter on the
//! LAN side, and a scorecard of what the agent alarmed on against what each host was.
//!
//! `cargo xtask lab` runs it (see the binary `lab`); `cargo xtask test` runs a short one.
//! Every process it starts runs in a namespace it created; on exit, on Ctrl-C and on
//! failure, the processes are killed and the namespaces removed.

pub mod drilldown;
pub mod plan;
pub mod procs;
pub mod score;
pub mod topology;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use plan::{Plan, Rng};
use procs::{Proc, wait_for};
use score::{AlarmSeen, Scorecard};
use topology::{GW, INET, LAN_BRIDGE, Topology, UPLINK};

/// Internal hosts: name, last octet of the LAN address, label.
pub const HOSTS: &[(&str, u8, Label)] = &[
    ("leech", 10, Label::P2p),
    ("seed", 11, Label::P2p),
    ("aria", 12, Label::P2p),
    ("private", 13, Label::P2p),
    ("transmission", 14, Label::P2p),
    ("web", 20, Label::Benign),
    ("browser", 21, Label::Benign),
    ("resolver", 22, Label::Benign),
    ("video", 23, Label::Benign),
    ("scanner", 24, Label::Benign),
    ("quic", 25, Label::Benign),
    ("poller", 26, Label::Benign),
    ("sync", 27, Label::Benign),
    ("call", 28, Label::Benign),
    ("game", 29, Label::Benign),
    ("download", 30, Label::Benign),
    ("upload", 31, Label::Benign),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    P2p,
    Benign,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::P2p => "p2p",
            Label::Benign => "benign",
        }
    }
}

/// What each host runs, for the scorecard.
pub fn describe(host: &str) -> &'static str {
    match host {
        "leech" => "libtorrent download, TCP + uTP, encryption forced",
        "seed" => "libtorrent seeding on fixed port 51413",
        "aria" => "aria2c download, encryption required",
        "private" => {
            "libtorrent, private tracker: TCP only, no DHT/PEX/LSD, encryption forced, 50 seeders on 51413"
        }
        "web" => "nginx, HTTP + HTTPS, hundreds of external clients",
        "browser" => "HTTPS pages and assets from 60 sites",
        "resolver" => "dnsmasq resolver, 20 upstream servers",
        "video" => "one long rate-limited HTTPS stream",
        "scanner" => "nmap SYN scan of an external /24",
        "quic" => "UDP 443 to 5 servers",
        "poller" => "monitoring poller scraping 60 hosts on 9100 every 15 s",
        "sync" => "50 long-lived TLS connections to distinct servers",
        "call" => "video call: STUN, then UDP media to 3 peers on one local port",
        "transmission" => {
            "transmission-daemon: encryption required, TCP only, no DHT/PEX/LPD, 75 seeders on 443, 80 and high ports"
        }
        "game" => {
            "P2P game session: one UDP port, 24 peers, 60-200 byte datagrams at 20-30/s each way"
        }
        "download" => "aria2c: one file in ranges from 36 HTTPS mirrors, over and over",
        "upload" => {
            "bulk upload: 30 kept-alive TLS connections PUTting parts to 30 storage endpoints"
        }
        _ => "",
    }
}

pub struct LabConfig {
    pub duration: Duration,
    pub peers: usize,
    pub seed: u64,
    /// Working directory (wiped at the start): logs, torrents, data, exports.
    pub dir: PathBuf,
    /// The agent binary.
    pub detector: PathBuf,
    /// Directory holding torrent.py and benign.py.
    pub scripts: PathBuf,
    /// The meter's 1-in-N packet sampling (`detector run --sampling N`); 1: every packet.
    /// Sampled, the targets are those of detection under sampling (see `score`).
    pub sampling: u32,
    /// See the uplink through sFlow instead of the meter: pmacct's `pmacctd` with its
    /// `sfprobe` plugin samples the uplink 1 in `sampling` and sends sFlow v5 to the
    /// agent's `--sflow-listen` (no XDP meter, no softflowd: the agent sees nothing else).
    pub sflow: bool,
}

/// Where the agent receives the lab's sFlow.
const SFLOW_ADDR: &str = "127.0.0.1:6343";

/// Each peer's upload limit (bytes/s): throttled, as clients are, so that no peer stands
/// out among the network's top senders.
const UPLOAD_RATE: u64 = 24 * 1024;

/// The agent's status endpoint, in the gateway's namespace.
const STATUS_ADDR: &str = "127.0.0.1:9180";

/// The lab's nats-server (JetStream), in the gateway's namespace: the agent publishes to
/// it as an edge (`--nats`), and one detector node (`detector central`) alarms from it,
/// so the scorecard has the time to alarm through edge -> JetStream -> node beside the
/// agent's (issue #25).
const NATS_URL: &str = "nats://127.0.0.1:4250";

/// Reads the agent's `/api/hosts` (every host it scored, with vetoes) into `peaks`.
/// The agent evaluates every 10 s; reading every 2 s sees each evaluation.
fn poll_scores(peaks: &mut score::Peaks) {
    let url = format!("http://{STATUS_ADDR}/api/hosts?top=50");
    match topology::ns_run(GW, "curl", &["-sf", "-m", "2", &url]) {
        Ok(body) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => peaks.take(&v),
            Err(e) => say(&format!("/api/hosts: {e}")),
        },
        Err(e) => say(&format!("/api/hosts: {e:#}")),
    }
}

/// HTTP and HTTPS.
const WEB_PORTS: &[(u16, bool)] = &[(80, false), (443, true)];

/// The certificate of the lab's first web servers: self-signed, ECDSA P-256.
const LAB_CERT: &str = "lab";
/// The certificate of the download mirrors and storage endpoints: RSA 2048, signed by an
/// intermediate CA and served with it (a first flight of a few KB, as a real server's).
const CHAIN_CERT: &str = "lab-chain";

/// Each mirror connection's rate (nginx `limit_rate`).
const MIRROR_RATE: &str = "48k";
/// The file the downloader fetches from the mirrors, in MiB.
const MIRROR_FILE_MIB: u64 = 256;
/// The bulk uploader's rate per connection (bytes/s).
const UPLOAD_CONN_RATE: u64 = 48 * 1024;

/// How long the Transmission host's uplink traffic is captured after its first payload
/// byte, and the capture's packet cap.
const CAPTURE_SECS: u64 = 90;
const CAPTURE_PACKETS: u64 = 200_000;

/// Command-line arguments from anything printable.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($a.to_string()),*] };
}

/// One process the lab starts: in which namespace, under which name (its log is
/// `NAME.log` in the lab's directory), the program and its arguments.
struct Launch {
    ns: String,
    name: String,
    program: String,
    args: Vec<String>,
}

/// Builds [`Launch`]es with the lab's directory, scripts and seed.
struct Launcher {
    dir: PathBuf,
    scripts: PathBuf,
    seed: u64,
}

const PYTHON: &str = "/usr/bin/python3";

impl Launcher {
    fn tool(&self, ns: &str, name: &str, program: &str, args: Vec<String>) -> Launch {
        Launch {
            ns: ns.to_string(),
            name: name.to_string(),
            program: program.to_string(),
            args,
        }
    }

    /// torrent.py (libtorrent) under Debian's python, the one with the module.
    fn torrent(&self, ns: &str, name: &str, args: Vec<String>) -> Launch {
        let mut all = args![self.scripts.join("torrent.py").display()];
        all.extend(args);
        self.tool(ns, name, PYTHON, all)
    }

    /// benign.py MODE ARGS, seeded.
    fn benign(&self, ns: &str, name: &str, args: Vec<String>) -> Launch {
        let mut all = args![
            self.scripts.join("benign.py").display(),
            "--seed",
            self.seed
        ];
        all.extend(args);
        self.tool(ns, name, PYTHON, all)
    }

    fn start(&self, l: &Launch) -> Result<Proc> {
        Proc::start(
            &l.ns,
            &l.name,
            &l.program,
            &l.args,
            &self.dir.join(format!("{}.log", l.name)),
        )
    }
}

/// What each internal host runs (with the external clients of the web server), by host.
fn host_launches(
    l: &Launcher,
    topo: &Topology,
    plan: &Plan,
    content: &Content,
) -> Result<Vec<(&'static str, Launch)>> {
    let Content {
        torrent_a,
        torrent_b,
        torrent_c,
        torrent_d,
        data_b,
        www,
        ..
    } = content;
    let dir = &l.dir;
    let h = |n: &str| topo.host(n);
    let dht = plan.peers[..8]
        .iter()
        .map(|(a, p)| format!("{a}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let (leech_data, aria_data) = (dir.join("leech-data"), dir.join("aria-data"));
    let private_data = dir.join("private-data");
    let download_data = dir.join("download-data");
    for d in [&leech_data, &aria_data, &private_data, &download_data] {
        fs::create_dir_all(d)?;
    }
    // The multi-source download: aria2c splits one file over every mirror (one
    // connection each), and starts over when it has it.
    let mirror_urls: Vec<String> = plan
        .mirrors
        .iter()
        .map(|a| format!("https://{a}/dist/image.iso"))
        .collect();
    let download = format!(
        "while :; do rm -f {d}/image.iso {d}/image.iso.aria2; \
         aria2c --dir={d} --out=image.iso --split={n} --max-connection-per-server=1 \
         --min-split-size=4M --check-certificate=false --file-allocation=none \
         --allow-overwrite=true --auto-file-renaming=false --disable-ipv6=true \
         --summary-interval=0 --show-console-readout=false --console-log-level=warn {urls} || sleep 5; done",
        d = download_data.display(),
        n = plan.mirrors.len(),
        urls = mirror_urls.join(" "),
    );
    let web_conf = nginx_conf(dir, "web", www, &[], WEB_PORTS, LAB_CERT, "")?;
    let (first_peer, first_port) = plan.peers[0];
    let mut resolver = args![
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        format!("--pid-file={}/dnsmasq-resolver.pid", dir.display()),
        "--all-servers",
        "--cache-size=0",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--log-facility=-",
    ];
    resolver.extend(plan.dns_upstreams.iter().map(|a| format!("--server={a}")));
    Ok(vec![
        ("leech", l.torrent(&h("leech").ns, "leech", args![
            "client", "--addr", h("leech").addr, "--port", plan.leech_port,
            "--torrent", torrent_a.display(), "--save", leech_data.display(),
            "--encryption", "forced", "--utp", "--dht", dht,
            "--events", dir.join("leech.events").display(),
        ])),
        ("seed", l.torrent(&h("seed").ns, "seed", args![
            "client", "--addr", h("seed").addr, "--port", 51413,
            "--torrent", torrent_b.display(), "--save", data_b.display(), "--seed",
            "--upload-rate", 1_000_000, "--dht", dht,
            "--events", dir.join("seed.events").display(),
        ])),
        // A private-tracker client: the torrent is private (no DHT, PEX or local
        // discovery for it), and the session has DHT and uTP off and encryption forced.
        ("private", l.torrent(&h("private").ns, "private", args![
            "client", "--addr", h("private").addr, "--port", plan.private_client_port,
            "--torrent", torrent_c.display(), "--save", private_data.display(),
            "--encryption", "forced", "--no-utp",
            "--events", dir.join("private.events").display(),
        ])),
        ("aria", l.tool(&h("aria").ns, "aria", "aria2c", args![
            format!("--dir={}", aria_data.display()),
            "--bt-require-crypto=true", "--file-allocation=none", "--seed-ratio=0.0",
            "--listen-port=6881-6889", "--enable-dht=true", "--dht-listen-port=6881-6889",
            format!("--dht-entry-point={first_peer}:{first_port}"),
            format!("--dht-file-path={}/aria-dht.dat", dir.display()),
            "--disable-ipv6=true", "--summary-interval=10", "--console-log-level=warn",
            torrent_a.display(),
        ])),
        ("web", l.tool(&h("web").ns, "web", "nginx", args![
            "-c", web_conf.display(), "-g", "daemon off;"
        ])),
        ("web", l.benign(INET, "web-clients", args![
            "webclients", "--addrs", dir.join("webclients.txt").display(),
            "--server", h("web").addr, "--rate", 15,
        ])),
        ("browser", l.benign(&h("browser").ns, "browser", args![
            "browser", "--hosts", dir.join("sites.txt").display()
        ])),
        ("resolver", l.tool(&h("resolver").ns, "resolver", "dnsmasq", resolver)),
        ("resolver", l.benign(&h("resolver").ns, "resolver-load", args![
            "dnsload", "--rate", 10
        ])),
        ("video", l.tool(&h("video").ns, "video", "curl", args![
            "-sk", "--limit-rate", "400k", "-o", "/dev/null",
            format!("https://{}/video.bin", plan.video),
        ])),
        ("scanner", l.tool(&h("scanner").ns, "scanner", "sh", args![
            "-c",
            format!(
                "while :; do nmap -sS -Pn -n -T4 --max-rate 150 --top-ports 200 {} >/dev/null; done",
                plan.scan_target
            ),
        ])),
        ("quic", l.benign(&h("quic").ns, "quic", args![
            "udp-client", "--servers", dir.join("quic.txt").display()
        ])),
        ("poller", l.benign(&h("poller").ns, "poller", args![
            "poller", "--targets", dir.join("pollees.txt").display(),
            "--port", plan::POLL_PORT, "--interval", 15,
        ])),
        ("sync", l.benign(&h("sync").ns, "sync", args![
            "sync", "--hosts", dir.join("sites.txt").display(), "--count", 50,
        ])),
        ("call", l.benign(&h("call").ns, "call", args![
            "call", "--stun", plan.stun, "--peers", dir.join("call-peers.txt").display(),
        ])),
        // Transmission: its daemon, driven through transmission-remote and its RPC.
        ("transmission", l.tool(&h("transmission").ns, "transmission", PYTHON, args![
            l.scripts.join("transmission.py").display(),
            "--addr", h("transmission").addr, "--port", plan.transmission_port,
            "--torrent", torrent_d.display(), "--dir", dir.join("transmission").display(),
            "--events", dir.join("transmission.events").display(),
        ])),
        ("game", l.benign(&h("game").ns, "game", args![
            "game", "--peers", dir.join("game-peers.txt").display(), "--port", plan::GAME_PORT,
        ])),
        ("download", l.tool(&h("download").ns, "download", "sh", args!["-c", download])),
        ("upload", l.benign(&h("upload").ns, "upload", args![
            "upload", "--endpoints", dir.join("storage.txt").display(),
            "--rate", UPLOAD_CONN_RATE,
        ])),
    ])
}

/// Set by SIGINT/SIGTERM: the run stops and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs SIGINT/SIGTERM handlers that make [`run`] stop early and clean up.
pub fn catch_interrupts() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let _ = sigaction(sig, &act);
        }
    }
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: stopping the lab and removing its namespaces");
    }
    Ok(())
}

const TOOLS: &[(&str, &str)] = &[
    ("opentracker", "opentracker"),
    ("transmission-daemon", "transmission-daemon"),
    ("transmission-remote", "transmission-cli"),
    ("tcpdump", "tcpdump"),
    ("mktorrent", "mktorrent"),
    ("aria2c", "aria2"),
    ("nginx", "nginx-light"),
    ("dnsmasq", "dnsmasq"),
    ("nmap", "nmap"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("softflowd", "softflowd"),
    ("pmacctd", "pmacct"),
    ("nfcapd", "nfdump"),
    ("nfdump", "nfdump"),
    ("ethtool", "ethtool"),
    ("nats-server", "nats-server"),
];

/// Names what is missing and how to get it.
pub fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in TOOLS {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(tool).exists());
        if !found {
            missing.push(*package);
        }
    }
    let lt = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import libtorrent"])
        .output();
    if !matches!(lt, Ok(o) if o.status.success()) {
        missing.push("python3-libtorrent");
    }
    if !missing.is_empty() {
        missing.dedup();
        bail!(
            "the lab needs {}: run `cargo xtask setup` (or apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn write_lines<T: std::fmt::Display>(
    path: &Path,
    items: impl IntoIterator<Item = T>,
) -> Result<()> {
    let mut s = String::new();
    for i in items {
        writeln!(s, "{i}").expect("string");
    }
    fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// A file of `mib` MiB of seeded pseudo-random bytes (incompressible, reproducible).
fn make_payload(path: &Path, mib: u64, rng: &mut Rng) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

/// Makes a torrent of `data` announcing to `tracker`; returns its info-hash (hex).
/// A private torrent (`-p`) tells clients to get peers from its tracker only.
fn make_torrent(data: &Path, torrent: &Path, tracker: &str, private: bool) -> Result<String> {
    let _ = fs::remove_file(torrent);
    let mut args = vec!["-a", tracker, "-l", "18"];
    if private {
        args.push("-p");
    }
    args.extend(["-o", torrent.to_str().context("path")?]);
    args.push(data.to_str().context("path")?);
    topology::run("mktorrent", &args)?;
    let out = topology::run(
        "/usr/bin/python3",
        &[
            "-c",
            "import sys, libtorrent as lt; print(lt.torrent_info(sys.argv[1]).info_hash())",
            torrent.to_str().context("path")?,
        ],
    )?;
    Ok(out.trim().to_string())
}

/// nginx serving `root` on `ports` (port, TLS) of `addrs` (all addresses if empty: the
/// swarm's peers on ports 80 and 443 share the internet namespace), with the TLS
/// certificate `cert` (`CERT.crt` and `CERT.key` in the lab's directory: [`LAB_CERT`],
/// [`CHAIN_CERT`]) and `extra` directives in its server block.
fn nginx_conf(
    dir: &Path,
    name: &str,
    root: &Path,
    addrs: &[Ipv4Addr],
    ports: &[(u16, bool)],
    cert: &str,
    extra: &str,
) -> Result<PathBuf> {
    let conf = dir.join(format!("nginx-{name}.conf"));
    let tmp = dir.join(format!("nginx-{name}"));
    fs::create_dir_all(&tmp)?;
    let d = dir.display();
    let t = tmp.display();
    let r = root.display();
    let listen_on = |at: String| -> String {
        ports
            .iter()
            .map(|(port, tls)| {
                let ssl = if *tls { " ssl" } else { "" };
                format!("    listen {at}{port}{ssl};\n")
            })
            .collect()
    };
    let listen: String = if addrs.is_empty() {
        listen_on(String::new())
    } else {
        addrs.iter().map(|a| listen_on(format!("{a}:"))).collect()
    };
    fs::write(
        &conf,
        format!(
            "user root;\nworker_processes 1;\npid {t}/nginx.pid;\nerror_log {t}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
               fastcgi_temp_path {t}/fcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
               keepalive_requests 100;\n  sendfile on;\n\
               server {{\n{listen}\
                 ssl_certificate {d}/{cert}.crt;\n    ssl_certificate_key {d}/{cert}.key;\n    root {r};\n{extra}  }}\n}}\n"
        ),
    )?;
    Ok(conf)
}

/// The static content of the lab's web servers: pages, assets, and a long "video".
fn web_content(root: &Path, rng: &mut Rng) -> Result<()> {
    fs::create_dir_all(root.join("a"))?;
    for (name, kib) in [
        ("index.html", 24u64),
        ("a/1", 60),
        ("a/2", 180),
        ("a/3", 6),
        ("big", 1500),
        // A node_exporter page, about the size of a real one.
        ("metrics", 40),
    ] {
        let mut v = vec![0u8; (kib * 1024) as usize];
        for c in v.chunks_mut(8) {
            let b = rng.next_u64().to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        fs::write(root.join(name), v)?;
    }
    // Sparse: read as zeros, costs no disk.
    let f = fs::File::create(root.join("video.bin"))?;
    f.set_len(8 << 30)?;
    Ok(())
}

/// The first moment each P2P host moved payload (UNIX seconds), from the clients' own
/// event logs; aria2c's from the size of the file it writes.
fn first_payload(events: &Path) -> Option<f64> {
    let text = fs::read_to_string(events).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "first_payload")
        .and_then(|v| v["t"].as_f64())
}

/// Reads new alarm lines from the agent's `--alarms-json` file, stamping their arrival.
struct AlarmTail {
    path: PathBuf,
    pos: u64,
    seen: Vec<AlarmSeen>,
}

impl AlarmTail {
    fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut r = BufReader::new(f);
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line) {
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.pos += n as u64;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                self.seen.push(AlarmSeen {
                    at: unix_now(),
                    event: v,
                });
            }
            line.clear();
        }
    }
}

/// Progress, on stderr (the scorecard goes to stdout).
fn say(msg: &str) {
    eprintln!("lab: {msg}");
}

/// What the lab serves, made fresh (and reproducibly) for each run.
struct Content {
    /// Torrent A: seeded by the swarm, downloaded by the internal P2P hosts.
    torrent_a: PathBuf,
    /// Torrent B: seeded by the internal seeder, downloaded by part of the swarm.
    torrent_b: PathBuf,
    /// Torrent C: private, on the private tracker, seeded by the private swarm.
    torrent_c: PathBuf,
    data_a: PathBuf,
    data_b: PathBuf,
    data_c: PathBuf,
    /// Torrent D: on the Transmission swarm's tracker (port 80), seeded by that swarm.
    torrent_d: PathBuf,
    data_d: PathBuf,
    /// The web servers' pages and assets.
    www: PathBuf,
    /// The mirrors' root (one large file) and the storage endpoints' root.
    mirror: PathBuf,
    storage: PathBuf,
}

/// Makes the torrents, the tracker's configuration, the web content, a TLS certificate
/// and the address lists the scripts read.
fn prepare(cfg: &LabConfig, dir: &Path, plan: &Plan) -> Result<Content> {
    let mut rng = Rng::new(cfg.seed.wrapping_add(1));

    // Content: two torrents (A from the swarm, B from the internal seeder), web pages.
    // A is sized so a download lasts longer than the run: a client fetches about 3 MB/s
    // from 200 peers throttled to 24 KiB/s (measured: 600 MiB in 275 s).
    // C: 50 seeders at 24 KiB/s give the private client about 1.2 MB/s; so do D's (the
    // Transmission client keeps 50 of its 75 seeders, its default).
    let a_mib = (cfg.duration.as_secs() * 3).clamp(64, 4096);
    let c_mib = (cfg.duration.as_secs() * 3 / 2).clamp(48, 2048);
    say(&format!(
        "making torrents ({a_mib} MiB, 48 MiB, a private one of {c_mib} MiB and Transmission's of {c_mib} MiB) and web content"
    ));
    let data_a = dir.join("swarm-data");
    let data_b = dir.join("seed-data");
    fs::create_dir_all(&data_a)?;
    fs::create_dir_all(&data_b)?;
    make_payload(&data_a.join("lab-a.bin"), a_mib, &mut rng)?;
    make_payload(&data_b.join("lab-b.bin"), 48, &mut rng)?;
    let announce = format!("http://{}:6969/announce", plan.tracker);
    let torrent_a = dir.join("a.torrent");
    let torrent_b = dir.join("b.torrent");
    let hash_a = make_torrent(&data_a.join("lab-a.bin"), &torrent_a, &announce, false)?;
    let hash_b = make_torrent(&data_b.join("lab-b.bin"), &torrent_b, &announce, false)?;
    // A swarm's own data and torrent (`X.torrent`, its data in `data_dir/lab-X.bin`).
    let mut swarm = |name: &str, data_dir: &str, tracker: String, private: bool| {
        let data = dir.join(data_dir);
        fs::create_dir_all(&data)?;
        let bin = data.join(format!("lab-{name}.bin"));
        make_payload(&bin, c_mib, &mut rng)?;
        let torrent = dir.join(format!("{name}.torrent"));
        let hash = make_torrent(&bin, &torrent, &tracker, private)?;
        anyhow::Ok((data, torrent, hash))
    };
    // The private swarm's torrent: its own tracker, the private flag set.
    let (data_c, torrent_c, hash_c) = swarm(
        "c",
        "private-swarm-data",
        format!("http://{}:6969/announce", plan.private_tracker),
        true,
    )?;
    // D: the Transmission client's swarm, its tracker on port 80 (as trackers behind
    // web ports are), sized like C (about 50 connected seeders at 24 KiB/s).
    let (data_d, torrent_d, hash_d) = swarm(
        "d",
        "transmission-swarm-data",
        format!("http://{}/announce", plan.transmission_tracker),
        false,
    )?;
    for (name, addr, port, hashes) in [
        ("opentracker", plan.tracker, 6969, vec![&hash_a, &hash_b]),
        (
            "opentracker-private",
            plan.private_tracker,
            6969,
            vec![&hash_c],
        ),
        (
            "opentracker-transmission",
            plan.transmission_tracker,
            80,
            vec![&hash_d],
        ),
    ] {
        let whitelist = dir.join(format!("{name}.whitelist"));
        write_lines(&whitelist, hashes)?;
        fs::write(
            dir.join(format!("{name}.conf")),
            format!(
                "listen.tcp_udp {addr}:{port}\naccess.whitelist {}\n",
                whitelist.display()
            ),
        )?;
    }
    let www = dir.join("www");
    web_content(&www, &mut rng)?;
    // The mirrors' file: sparse (read as zeros, costs no disk; TLS makes it noise).
    let mirror = dir.join("mirror");
    fs::create_dir_all(mirror.join("dist"))?;
    fs::File::create(mirror.join("dist/image.iso"))?.set_len(MIRROR_FILE_MIB << 20)?;
    let storage = dir.join("storage");
    fs::create_dir_all(&storage)?;
    cert_chain(dir)?;
    topology::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lab",
            "-keyout",
            dir.join("lab.key").to_str().context("path")?,
            "-out",
            dir.join("lab.crt").to_str().context("path")?,
        ],
    )?;
    write_lines(
        &dir.join("peers.txt"),
        plan.peers.iter().map(|(a, p)| format!("{a} {p}")),
    )?;
    write_lines(&dir.join("webclients.txt"), &plan.web_clients)?;
    write_lines(&dir.join("sites.txt"), &plan.sites)?;
    write_lines(&dir.join("quic.txt"), &plan.quic)?;
    write_lines(
        &dir.join("private-peers.txt"),
        plan.private_peers
            .iter()
            .map(|a| format!("{a} {}", plan::PRIVATE_PORT)),
    )?;
    write_lines(&dir.join("pollees.txt"), &plan.pollees)?;
    write_lines(
        &dir.join("call-peers.txt"),
        plan.call_peers.iter().map(|(a, p)| format!("{a} {p}")),
    )?;
    write_lines(
        &dir.join("transmission-peers.txt"),
        plan.transmission_peers
            .iter()
            .map(|(a, p)| format!("{a} {p}")),
    )?;
    write_lines(
        &dir.join("game-peers.txt"),
        plan.game_peers.iter().map(|(a, p)| format!("{a} {p}")),
    )?;
    write_lines(&dir.join("storage.txt"), &plan.storage)?;

    Ok(Content {
        torrent_a,
        torrent_b,
        torrent_c,
        data_a,
        data_b,
        data_c,
        torrent_d,
        data_d,
        www,
        mirror,
        storage,
    })
}

/// An RSA-2048 certificate chain as a public server's: a root CA, an intermediate CA it
/// signs, and a leaf the intermediate signs; `lab-chain.crt` holds the leaf and the
/// intermediate (what such a server sends), `lab-chain.key` the leaf's key.
fn cert_chain(dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).display().to_string();
    fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )?;
    fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:mirror.lab.test,DNS:*.lab.test\n",
    )?;
    let openssl = |args: &[&str]| topology::run("openssl", args).map(|_| ());
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/O=Lab Trust/CN=Lab Root CA",
        "-keyout",
        &p("ca-root.key"),
        "-out",
        &p("ca-root.crt"),
    ])?;
    // A key and a request for `subject` (the key in `key`), then the certificate
    // `ca` signs for it (`NAME.crt`, from `NAME.csr`) with the extensions of `ext`.
    let issue =
        |subject: &str, name: &str, key: &str, ca: &str, serial: &str, days: &str, ext: &str| {
            let csr = p(&format!("{name}.csr"));
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &p(key),
                "-out",
                &csr,
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &p(&format!("{ca}.crt")),
                "-CAkey",
                &p(&format!("{ca}.key")),
                "-set_serial",
                serial,
                "-days",
                days,
                "-sha256",
                "-extfile",
                &p(ext),
                "-out",
                &p(&format!("{name}.crt")),
            ])
        };
    issue(
        "/O=Lab Trust/CN=Lab TLS CA R1",
        "ca-int",
        "ca-int.key",
        "ca-root",
        "4096",
        "30",
        "ca.ext",
    )?;
    issue(
        "/CN=mirror.lab.test",
        "leaf",
        "lab-chain.key",
        "ca-int",
        "65537",
        "2",
        "leaf.ext",
    )?;
    let chain =
        fs::read_to_string(dir.join("leaf.crt"))? + &fs::read_to_string(dir.join("ca-int.crt"))?;
    fs::write(dir.join("lab-chain.crt"), chain)?;
    Ok(())
}

/// What a run writes at its peak (measured: 2.3 GB), with room to spare.
const LAB_DISK_BYTES: u64 = 3 << 30;

/// Files at least this large in a lab's folder are payload (torrent content, web
/// downloads, their partial copies), rewritten by every run.
const PAYLOAD_BYTES: u64 = 4 << 20;

/// Removes a lab run's payload when the run ends: a run writes about 2.3 GB of torrent
/// content and downloads, and five runs in one test pass filled a CI machine's disk. What
/// a person reads after a run stays: logs, the agent's flows and alarms (`.jsonl`), the
/// capture kept for replay (`.pcap`), nfcapd's files, the scorecard, screenshots.
struct ShedPayloads(PathBuf);

impl Drop for ShedPayloads {
    fn drop(&mut self) {
        fn walk(dir: &Path, freed: &mut u64) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let Ok(kind) = e.file_type() else { continue };
                let path = e.path();
                if kind.is_dir() {
                    walk(&path, freed);
                    continue;
                }
                let keep = matches!(
                    path.extension().and_then(|x| x.to_str()),
                    Some("pcap" | "jsonl" | "log")
                );
                // Apparent size decides (a preallocated download is sparse); what is freed
                // is what the file held on disk.
                let Ok(meta) = e.metadata() else { continue };
                if kind.is_file()
                    && !keep
                    && meta.len() >= PAYLOAD_BYTES
                    && fs::remove_file(&path).is_ok()
                {
                    *freed += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                }
            }
        }
        let mut freed = 0;
        walk(&self.0, &mut freed);
        say(&format!(
            "removed {} MB of payload (on disk) from {} (logs, flows, alarms, captures kept)",
            freed >> 20,
            self.0.display()
        ));
    }
}

/// Runs the lab and returns its scorecard. Everything is torn down before it returns.
pub fn run(cfg: &LabConfig) -> Result<Scorecard> {
    check_tools()?;
    let dir = &cfg.dir;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("wiping {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let dir = fs::canonicalize(dir)?;
    let st = nix::sys::statvfs::statvfs(&dir)
        .with_context(|| format!("reading free space under {}", dir.display()))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < LAB_DISK_BYTES {
        bail!(
            "the lab needs about {} GB free under {} for its torrents and downloads, and {} MB are \
             free: free some space (`cargo clean`, or old target/lab-* folders) and run it again",
            LAB_DISK_BYTES >> 30,
            dir.display(),
            free >> 20
        );
    }
    // Declared before the processes and namespaces, so dropped after them: whether the
    // run passes or fails, the payloads go and the evidence stays.
    let _shed = ShedPayloads(dir.clone());
    let names: Vec<&'static str> = HOSTS.iter().map(|h| h.0).collect();
    let plan = Plan::new(cfg.seed, cfg.peers, &names);
    let content = prepare(cfg, &dir, &plan)?;

    say(&format!(
        "building namespaces: {} internal hosts, {} external addresses",
        HOSTS.len(),
        plan.external_addrs().len()
    ));
    let host_spec: Vec<(&'static str, u8)> = HOSTS.iter().map(|h| (h.0, h.1)).collect();
    let topo = Topology::build(&host_spec, &plan.external_addrs())?;
    let l = Launcher {
        dir: dir.clone(),
        scripts: cfg.scripts.clone(),
        seed: cfg.seed,
    };

    // The internet side: tracker, swarm, web sites, DNS servers, UDP 443 servers.
    let leechers = (cfg.peers / 5).max(1);
    let mut procs: Vec<Proc> = Vec::new();
    for name in [
        "opentracker",
        "opentracker-private",
        "opentracker-transmission",
    ] {
        procs.push(l.start(&l.tool(
            INET,
            name,
            "opentracker",
            args!["-f", dir.join(format!("{name}.conf")).display()],
        ))?);
    }
    // Swarm peers: libtorrent sessions seeding one torrent from `addrs`, and `extra`.
    let swarm_of = |name: &str, addrs: &str, torrent: &Path, data: &Path, extra: Vec<String>| {
        let mut a = args![
            "swarm",
            "--addrs",
            dir.join(addrs).display(),
            "--seed-torrent",
            torrent.display(),
            "--seed-data",
            data.display(),
            "--upload-rate",
            UPLOAD_RATE,
        ];
        a.extend(extra);
        l.start(&l.torrent(INET, name, a))
    };
    let mut swarm = swarm_of(
        "swarm",
        "peers.txt",
        &content.torrent_a,
        &content.data_a,
        args![
            "--leech-torrent",
            content.torrent_b.display(),
            "--leech-dir",
            dir.join("swarm-leech").display(),
            "--leechers",
            leechers,
        ],
    )?;
    say(&format!(
        "starting {} BitTorrent peers ({leechers} also download from the internal seeder)",
        cfg.peers
    ));
    // The private tracker's seeders: TCP only, no DHT, encryption forced, one port.
    let mut private_swarm = swarm_of(
        "private-swarm",
        "private-peers.txt",
        &content.torrent_c,
        &content.data_c,
        args!["--encryption", "forced", "--no-utp", "--no-dht"],
    )?;
    // The Transmission client's seeders: TCP only, no DHT, encryption forced, on 443,
    // 80 and random high ports.
    let mut transmission_swarm = swarm_of(
        "transmission-swarm",
        "transmission-peers.txt",
        &content.torrent_d,
        &content.data_d,
        args!["--encryption", "forced", "--no-utp", "--no-dht"],
    )?;
    wait_for(&mut swarm, "peers up", Duration::from_secs(120))?;
    procs.push(swarm);
    wait_for(&mut private_swarm, "peers up", Duration::from_secs(60))?;
    procs.push(private_swarm);
    wait_for(&mut transmission_swarm, "peers up", Duration::from_secs(60))?;
    procs.push(transmission_swarm);
    let sites: Vec<Ipv4Addr> = [&plan.sites[..], &[plan.video]].concat();
    let nginx_inet = nginx_conf(&dir, "inet", &content.www, &sites, WEB_PORTS, LAB_CERT, "")?;
    let nginx_exporters = nginx_conf(
        &dir,
        "exporters",
        &content.www,
        &plan.pollees,
        &[(plan::POLL_PORT, false)],
        LAB_CERT,
        "",
    )?;
    // The download's mirrors: each connection throttled, as a busy mirror (or the
    // client's share of a link) would be.
    let nginx_mirrors = nginx_conf(
        &dir,
        "mirrors",
        &content.mirror,
        &plan.mirrors,
        &[(443, true)],
        CHAIN_CERT,
        &format!("    limit_rate {MIRROR_RATE};\n"),
    )?;
    // The upload's storage endpoints: WebDAV PUT, any size.
    let nginx_storage = nginx_conf(
        &dir,
        "storage",
        &content.storage,
        &plan.storage,
        &[(443, true)],
        CHAIN_CERT,
        "    location /upload/ {\n      dav_methods PUT;\n      create_full_put_path on;\n      \
         client_max_body_size 0;\n    }\n",
    )?;
    for (name, conf) in [
        ("nginx-internet", nginx_inet),
        ("nginx-exporters", nginx_exporters),
        ("nginx-mirrors", nginx_mirrors),
        ("nginx-storage", nginx_storage),
    ] {
        procs.push(l.start(&l.tool(
            INET,
            name,
            "nginx",
            args!["-c", conf.display(), "-g", "daemon off;"],
        ))?);
    }
    procs.push(l.start(&l.benign(
        INET,
        "call-server",
        args![
            "call-server",
            "--stun",
            plan.stun,
            "--peers",
            dir.join("call-peers.txt").display(),
        ],
    ))?);
    procs.push(l.start(&l.benign(
        INET,
        "game-peers",
        args![
            "game-peers",
            "--peers",
            dir.join("game-peers.txt").display()
        ],
    ))?);
    procs.push(l.start(&l.tool(
        INET,
        "dns-upstreams",
        "dnsmasq",
        args![
            "-k",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            format!("--pid-file={}/dnsmasq-inet.pid", dir.display()),
            "--address=/#/198.19.255.1",
            "--log-facility=-",
        ],
    ))?);
    procs.push(l.start(&l.benign(
        INET,
        "udp443-servers",
        args![
            "udp-server",
            "--addrs",
            dir.join("quic.txt").display(),
            "--port",
            443
        ],
    ))?);

    // The gateway: nfcapd (the upstream analyzer), the agent, softflowd on the LAN side.
    let nfdir = dir.join("nfcapd");
    fs::create_dir_all(&nfdir)?;
    let mut nfcapd = l.start(&l.tool(
        GW,
        "nfcapd",
        "nfcapd",
        // The agent flushes every flow at once when it stops: a socket buffer as large
        // as the host allows (net.core.rmem_max) so that burst is not dropped.
        args![
            "-w",
            nfdir.display(),
            "-p",
            9996,
            "-b",
            "127.0.0.1",
            "-B",
            4 << 20
        ],
    ))?;
    // A detector node on the agent's records through JetStream (the unsampled XDP lab;
    // the sampled and sFlow variants leave it out): nats-server with its store in the
    // lab's directory, then the node, holding a shard before the agent starts.
    let central_alarms = dir.join("central.alarms.jsonl");
    let mut central = if cfg.sflow || cfg.sampling > 1 {
        None
    } else {
        let mut nats = l.start(&l.tool(
            GW,
            "nats-server",
            "nats-server",
            args![
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                4250,
                "-sd",
                dir.join("jetstream").display()
            ],
        ))?;
        wait_for(&mut nats, "Server is ready", Duration::from_secs(30))?;
        let mut node = l.start(&l.tool(
            GW,
            "central",
            &cfg.detector.display().to_string(),
            args![
                "central",
                "--nats",
                NATS_URL,
                "--node",
                "lab-node",
                "--alarms-json",
                central_alarms.display(),
                "--stats-interval",
                10
            ],
        ))?;
        wait_for(&mut node, "took shard", Duration::from_secs(30))?;
        Some((nats, node))
    };
    let alarms = dir.join("alarms.jsonl");
    let flows = dir.join("flows.jsonl");
    let mut agent = l.start(
        &l.tool(
            GW,
            "agent",
            &cfg.detector.display().to_string(),
            [
                if cfg.sflow {
                    args!["run", "--sflow-listen", SFLOW_ADDR]
                } else {
                    args![
                        "run",
                        "--iface",
                        UPLINK,
                        "--xdp-mode",
                        "native",
                        "--sampling",
                        cfg.sampling.max(1)
                    ]
                },
                args![
                    "--export",
                    "127.0.0.1:9996",
                    "--netflow-listen",
                    "127.0.0.1:9995",
                    "--alarms-json",
                    alarms.display(),
                    "--flows-json",
                    flows.display(),
                    "--stats-interval",
                    10,
                    // Long flows are exported only every 5 minutes: detection must not wait
                    // for exports (it learns of each flow as it starts).
                    "--active-timeout",
                    300,
                    // What the scorecard reads every host's score from, as an operator would.
                    "--http",
                    STATUS_ADDR,
                ],
                if central.is_some() {
                    args!["--nats", NATS_URL, "--agent-name", "lab-gw"]
                } else {
                    Vec::new()
                },
            ]
            .concat(),
        ),
    )?;
    wait_for(
        &mut agent,
        &if cfg.sflow {
            "receiving sFlow".to_string()
        } else {
            format!("metering {UPLINK}")
        },
        Duration::from_secs(30),
    )?;
    // softflowd 1.1 keeps its pid and control files under /var/run (see the softflowd
    // test): a killed run may have left them.
    let _ = fs::remove_file("/var/run/softflowd.pid");
    let _ = fs::remove_file("/var/run/softflowd.ctl");
    let mut softflowd = if cfg.sflow {
        // A switch's sFlow agent on the uplink, sampling 1 in N. The queue between its
        // core and the sfprobe plugin at 64 MB (4 MB by default; still unbuffered, so no
        // sample waits for a chunk to fill): on a loaded 2-core machine the plugin may lag
        // behind for seconds.
        let conf = dir.join("pmacctd.conf");
        fs::write(
            &conf,
            format!(
                "daemonize: false\npcap_interface: {UPLINK}\nplugins: sfprobe\nsfprobe_receiver: {SFLOW_ADDR}\nsfprobe_agentip: 127.0.0.1\nsampling_rate: {}\nplugin_pipe_size: 65536000\npidfile: {}\n",
                cfg.sampling.max(1),
                dir.join("pmacctd.pid").display()
            ),
        )?;
        // At a higher priority than the swarm (nice -10): a switch samples in hardware,
        // and libpcap's ring overflows when pmacctd waits for a CPU (4.4 % of the packets
        // dropped at 1:100 in a run at load 80; counted below either way).
        l.start(&l.tool(
            GW,
            "pmacctd",
            "nice",
            args!["-n", "-10", "pmacctd", "-f", conf.display()],
        ))?
    } else {
        l.start(&l.tool(
            GW,
            "softflowd",
            "softflowd",
            args![
                "-d",
                "-i",
                LAN_BRIDGE,
                "-n",
                "127.0.0.1:9995",
                "-v",
                9,
                "-t",
                "maxlife=60",
                "-t",
                "general=15",
            ],
        ))?
    };
    let counters_start = topology::uplink_counters()?;

    // The internal hosts, each started at its planned offset.
    let mut pending = host_launches(&l, &topo, &plan, &content)?;
    let t0 = Instant::now();
    let started_at = unix_now();
    say(&format!(
        "running for {} s (the agent's alarms land in {})",
        cfg.duration.as_secs(),
        alarms.display()
    ));
    let mut tail = AlarmTail {
        path: alarms.clone(),
        pos: 0,
        seen: Vec::new(),
    };
    let mut central_tail = AlarmTail {
        path: central_alarms.clone(),
        pos: 0,
        seen: Vec::new(),
    };
    let mut aria_first: Option<f64> = None;
    // The Transmission host's traffic on the uplink, from its start to CAPTURE_SECS
    // after its first payload byte, for replay.
    let capture_path = dir.join("transmission.pcap");
    let mut capture: Option<Proc> = None;
    let mut transmission_first: Option<f64> = None;
    // Full frames; immediate mode (no ring blocks held back), a 16 MiB ring, each packet
    // written as it comes.
    let mut capture_args: Vec<String> = "-n -s 0 -Z root --immediate-mode -B 16384 -U"
        .split(' ')
        .map(String::from)
        .collect();
    capture_args.extend(args![
        "-i",
        UPLINK,
        "-c",
        CAPTURE_PACKETS,
        "-w",
        capture_path.display(),
        "host",
        topo.host("transmission").addr,
    ]);
    let mut last_note = Instant::now();
    let mut peaks = score::Peaks::default();
    let mut last_poll = Instant::now();
    while t0.elapsed() < cfg.duration {
        interrupted()?;
        let elapsed = t0.elapsed().as_secs();
        let (due, later): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(host, _)| plan.offset(host) <= elapsed);
        pending = later;
        for (host, launch) in &due {
            if *host == "transmission" {
                capture = Some(l.start(&l.tool(
                    GW,
                    "tcpdump-transmission",
                    "tcpdump",
                    capture_args.clone(),
                ))?);
            }
            procs.push(l.start(launch)?);
        }
        if capture.is_some() {
            if transmission_first.is_none() {
                transmission_first = first_payload(&dir.join("transmission.events"));
            }
            if transmission_first.is_some_and(|f| unix_now() - f >= CAPTURE_SECS as f64)
                && let Some(mut c) = capture.take()
            {
                c.stop(Signal::SIGINT, Duration::from_secs(5));
                say(&format!(
                    "captured transmission's first {CAPTURE_SECS} s of transfer in {}",
                    capture_path.display()
                ));
            }
        }
        for p in procs.iter_mut() {
            p.check()?;
        }
        agent.check()?;
        if let Some((nats, node)) = central.as_mut() {
            nats.check()?;
            node.check()?;
        }
        softflowd.check()?;
        nfcapd.check()?;
        if aria_first.is_none()
            && fs::metadata(dir.join("aria-data/lab-a.bin"))
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        {
            aria_first = Some(unix_now());
        }
        tail.poll();
        central_tail.poll();
        if last_poll.elapsed() >= Duration::from_secs(2) {
            last_poll = Instant::now();
            poll_scores(&mut peaks);
        }
        if last_note.elapsed() >= Duration::from_secs(30) {
            last_note = Instant::now();
            say(&format!(
                "{elapsed} s: {} alarm events so far",
                tail.seen.len()
            ));
        }
        thread::sleep(Duration::from_millis(250));
    }

    // The host drill-down of a BitTorrent client and a server, rendered while the agent
    // runs, its window still full of their traffic (the lab test checks it; a failure
    // here is only told). The traffic is paused meanwhile: on two cores the swarm's
    // hundred runnable threads left headless Chromium so little CPU that every run was
    // killed at its 60 s limit (load average 240, a full check of 82e2db0 and a run
    // after it), and the agent's evaluations came a minute or two apart.
    if cfg.sampling <= 1 && !cfg.sflow && crate::drilldown::chromium_path().is_some() {
        let hosts: Vec<(&str, String)> = drilldown::HOSTS
            .iter()
            .map(|h| (*h, topo.host(h).addr.to_string()))
            .collect();
        for p in &procs {
            p.pause(true)?;
        }
        say(&format!(
            "traffic paused ({} processes) for the drill-down",
            procs.len()
        ));
        let drill = drilldown::capture(&dir, &hosts);
        for p in &procs {
            p.pause(false)?;
        }
        if let Err(e) = drill {
            say(&format!("drill-down: {e:#}"));
        }
    }

    // Stop the traffic, let the uplink go quiet, read its counters, then stop the meter
    // (which flushes every flow) and the collector.
    say("stopping traffic");
    if let Some(mut c) = capture.take() {
        c.stop(Signal::SIGINT, Duration::from_secs(5));
    }
    for p in procs.iter_mut().rev() {
        p.stop(Signal::SIGTERM, Duration::from_secs(10));
    }
    let mut counters_end = topology::uplink_counters()?;
    let quiet = Instant::now();
    loop {
        thread::sleep(Duration::from_secs(2));
        let now = topology::uplink_counters()?;
        if now == counters_end || quiet.elapsed() > Duration::from_secs(30) {
            break;
        }
        counters_end = now;
    }
    tail.poll();
    poll_scores(&mut peaks);
    // Through sFlow: what pmacctd's capture lost (its sampler never saw those packets).
    let exporter_capture = if cfg.sflow {
        pmacctd_capture(&softflowd)
            .map_err(|e| say(&format!("pmacctd's capture statistics: {e:#}")))
            .ok()
    } else {
        None
    };
    softflowd.stop(Signal::SIGTERM, Duration::from_secs(10));
    thread::sleep(Duration::from_secs(1));
    let agent_clean = agent.stop(Signal::SIGTERM, Duration::from_secs(60));
    tail.poll();
    // The node has had the agent's last batches; then it and nats-server stop.
    if let Some((nats, node)) = central.as_mut() {
        thread::sleep(Duration::from_secs(1));
        central_tail.poll();
        node.stop(Signal::SIGTERM, Duration::from_secs(30));
        nats.stop(Signal::SIGTERM, Duration::from_secs(10));
        central_tail.poll();
    }
    thread::sleep(Duration::from_secs(1));
    nfcapd.stop(Signal::SIGTERM, Duration::from_secs(20));
    let uplink: [u64; 4] = std::array::from_fn(|i| counters_end[i] - counters_start[i]);
    let udp_rcvbuf_errors = topology::udp_rcvbuf_errors(GW);

    let first: Vec<(&'static str, Option<f64>)> = vec![
        ("leech", first_payload(&dir.join("leech.events"))),
        ("seed", first_payload(&dir.join("seed.events"))),
        ("private", first_payload(&dir.join("private.events"))),
        ("aria", aria_first),
        (
            "transmission",
            first_payload(&dir.join("transmission.events")),
        ),
    ];
    let card = score::build(score::Inputs {
        cfg,
        started_at,
        hosts: &topo.hosts,
        first_p2p: &first,
        alarms: &tail.seen,
        central_alarms: central.is_some().then_some(&central_tail.seen[..]),
        uplink,
        flows_json: &flows,
        nfcapd_dir: &nfdir,
        agent_clean,
        agent_log: &dir.join("agent.log"),
        peaks: &peaks,
        udp_rcvbuf_errors,
        captures: &[("transmission", capture_path.clone())],
        exporter_capture,
    })?;
    drop(procs);
    drop(topo);
    Ok(card)
}

/// Asks pmacctd for its statistics (SIGUSR1: a `stats [iface,idx] ... received_packets=R
/// dropped_packets=D` line from libpcap's counts) and reads them, with the number of
/// "Missing data detected" warnings (samples lost between its core and plugin).
fn pmacctd_capture(pmacctd: &Proc) -> Result<score::ExporterCapture> {
    let count = |text: &str| text.matches("received_packets=").count();
    let before = count(&fs::read_to_string(&pmacctd.log).unwrap_or_default());
    pmacctd.signal(Signal::SIGUSR1)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(&pmacctd.log).unwrap_or_default();
        if count(&text) > before {
            let line = text
                .lines()
                .rev()
                .find(|l| l.contains("received_packets="))
                .unwrap_or_default();
            let field = |name: &str| -> Result<u64> {
                let v = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .with_context(|| format!("no {name} in '{line}'"))?;
                v.parse().with_context(|| format!("{name}{v} in '{line}'"))
            };
            return Ok(score::ExporterCapture {
                received: field("received_packets=")?,
                dropped: field("dropped_packets=")?,
                missing_data_warnings: text.matches("Missing data detected").count() as u64,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "no statistics in {} within 10 s of SIGUSR1",
                pmacctd.log.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}
