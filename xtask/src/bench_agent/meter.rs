//! Part 1: the flow meter on a veth between two namespaces, N concurrent flows.

use super::*;

const NS_TX: &str = "dbench-tx";
const NS_RX: &str = "dbench-rx";
const DEV_TX: &str = "dbench-tx0";
const DEV_RX: &str = "dbench-rx0";
const ADDR_TX: [u8; 4] = [10, 99, 0, 1];
const ADDR_RX: [u8; 4] = [10, 99, 0, 2];
/// Not the receiving veth's MAC: the kernel drops the frames as PACKET_OTHERHOST after
/// XDP saw them, so nothing answers (no ICMP, no ARP).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Every flow gets one packet per this many seconds.
const REFRESH_SECS: u64 = 5;
/// Ethernet 14 + IPv4 20 + UDP 8 + 18 bytes of payload: the 60-byte minimum frame.
const FRAME_LEN: usize = 60;
const IP_LEN: usize = FRAME_LEN - 14;
/// nfcapd's port inside the receiving namespace (its own loopback).
const NFCAPD_PORT: u16 = 29995;

/// What the generator sent.
#[derive(Default, Clone, Copy)]
struct Sent {
    packets: u64,
    ip_bytes: u64,
    secs: f64,
    /// sendmmsg calls that sent nothing (queue full); the frames were sent later.
    full_queue: u64,
}

/// The packet generator: a thread in the sender namespace that sends flow `i % n` as
/// packet `i`, paced at n / 5 packets per second.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<Result<Sent>>>,
}

impl Generator {
    fn start(n: u64) -> Result<Self> {
        let frames = build_frames(n);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), sent.clone());
        let handle = thread::Builder::new()
            .name("dbench-gen".into())
            .spawn(move || generate(&frames, n, &s, &c))?;
        Ok(Self {
            stop,
            sent,
            handle: Some(handle),
        })
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    fn finish(mut self) -> Result<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take().expect("joined once");
        h.join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))?
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// N distinct 60-byte IPv4/UDP frames: source addresses cycle through 198.18.0.0/15,
/// then the source port moves on; destination 10.99.0.2:5001.
fn build_frames(n: u64) -> Vec<u8> {
    const SPAN: u64 = 1 << 17; // 198.18.0.0/15
    let mut buf = vec![0u8; n as usize * FRAME_LEN];
    for (i, f) in buf.chunks_exact_mut(FRAME_LEN).enumerate() {
        let i = i as u64;
        f[0..6].copy_from_slice(&DST_MAC);
        f[6..12].copy_from_slice(&SRC_MAC);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(IP_LEN as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = 17;
        let src = u32::from_be_bytes([198, 18, 0, 0]) + (i % SPAN) as u32;
        ip[12..16].copy_from_slice(&src.to_be_bytes());
        ip[16..20].copy_from_slice(&ADDR_RX);
        let sum = ip_checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp = &mut f[34..42];
        udp[0..2].copy_from_slice(&(10_000 + (i / SPAN) as u16).to_be_bytes());
        udp[2..4].copy_from_slice(&5001u16.to_be_bytes());
        udp[4..6].copy_from_slice(&((IP_LEN - 20) as u16).to_be_bytes());
        // UDP checksum 0: none (allowed over IPv4).
    }
    buf
}

fn generate(frames: &[u8], n: u64, stop: &AtomicBool, sent_ctr: &AtomicU64) -> Result<Sent> {
    let (sock, dest) = frame_sender(NS_TX, DEV_TX, DST_MAC)?;
    let frames: Vec<&[u8]> = frames.chunks_exact(FRAME_LEN).collect();
    let mut out = Sent::default();
    let start = Instant::now();
    let mut batch: Vec<&[u8]> = Vec::with_capacity(256);
    while !stop.load(Ordering::Relaxed) {
        let due =
            (start.elapsed().as_nanos() as u64).saturating_mul(n) / (REFRESH_SECS * 1_000_000_000);
        if out.packets >= due {
            thread::sleep(Duration::from_micros(200));
            continue;
        }
        let want = (due - out.packets).min(256);
        batch.clear();
        batch.extend((0..want).map(|k| frames[((out.packets + k) % n) as usize]));
        match sys::send_batch(sock.0, &batch, Some(&dest)) {
            Ok(k) => {
                out.packets += k as u64;
                sent_ctr.store(out.packets, Ordering::Relaxed);
            }
            Err(e) if matches!(e.raw_os_error(), Some(105 | 11)) => {
                // ENOBUFS / EAGAIN: the queue is full; nothing left, retry shortly.
                out.full_queue += 1;
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) => return Err(e).context("sending frames"),
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    out.ip_bytes = out.packets * IP_LEN as u64;
    Ok(out)
}

/// Udp RcvbufErrors of the namespace `pid` lives in.
fn rcvbuf_errors(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Counters of a veth seen from inside its namespace: (tx_dropped, rx_dropped).
fn veth_drops(ns: &str, dev: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/statistics/tx_dropped"))
        .arg(format!("/sys/class/net/{dev}/statistics/rx_dropped"))
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut it = text.lines().map(|l| l.trim().parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Flows, packets and bytes nfcapd wrote into `dir` (`nfdump -I`).
fn nfdump_totals(dir: &Path) -> Result<(u64, u64, u64)> {
    let text = sh(Command::new("nfdump").arg("-R").arg(dir).arg("-I"))
        .context("nfdump (package nfdump)")?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((get("Flows:"), get("Packets:"), get("Bytes:")))
}

/// One measurement's figures.
struct Row {
    flows: u64,
    workers: u32,
    cpu_per_s: f64,
    gen_pps: f64,
    sent: Sent,
    exported_pkts: u64,
    exported_bytes: u64,
    nfdump_flows: u64,
    agent_records: Option<u64>,
    agent_pkts: Option<u64>,
    rcvbuf_errors: Option<u64>,
    veth: (u64, u64),
}

pub(super) fn run(bin: &Path, args: &AgentArgs, tmp: &Path) -> Result<()> {
    let window = if args.quick { 20 } else { 70 };
    println!(
        "\n== meter: N UDP flows each refreshed every {REFRESH_SECS} s ({FRAME_LEN}-byte frames over a veth, AF_PACKET + sendmmsg), \
         agent on native XDP exporting to nfcapd; CPU over a {window} s window =="
    );
    let mut rows = Vec::new();
    let mut failed = 0;
    for &n in &args.flows {
        for &w in &args.workers {
            match measure(bin, n, w, window, tmp) {
                Ok(r) => {
                    print_row_detail(&r);
                    rows.push(r);
                }
                Err(e) => {
                    println!("  N={n} workers={w}: FAILED: {e:#}");
                    failed += 1;
                }
            }
        }
    }
    println!();
    println!(
        "| N flows | workers | agent CPU s/s | us per flow per s | gen pps (asked) | sent pkts | exported pkts (nfcapd) | equal? |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {} ({}) | {} | {} | {} |",
            thousands(r.flows),
            r.workers,
            r.cpu_per_s,
            r.cpu_per_s / r.flows as f64 * 1e6,
            thousands(r.gen_pps as u64),
            thousands(r.flows / REFRESH_SECS),
            thousands(r.sent.packets),
            thousands(r.exported_pkts),
            if r.sent.packets == r.exported_pkts {
                "yes"
            } else {
                "NO"
            }
        );
    }
    let at_1m: Vec<&Row> = rows.iter().filter(|r| r.flows == 1_000_000).collect();
    if at_1m.is_empty() {
        println!(
            "1M flows: <= 0.2 core and every packet exported: not measured (add 1000000 to --flows)"
        );
    } else {
        for r in at_1m {
            let met = r.cpu_per_s <= 0.2 && r.sent.packets == r.exported_pkts;
            println!(
                "1M flows: <= 0.2 core and every packet exported: {} (workers {}: {:.3} core, {} of {} packets)",
                if met { "met" } else { "not met" },
                r.workers,
                r.cpu_per_s,
                thousands(r.exported_pkts),
                thousands(r.sent.packets)
            );
        }
    }
    if failed > 0 {
        bail!("{failed} meter run(s) failed (see above)");
    }
    Ok(())
}

fn print_row_detail(r: &Row) {
    let asked = r.flows / REFRESH_SECS;
    println!(
        "  N={} workers={}: agent {:.3} CPU-s/s = {:.3} us per flow per s; generator {} pps in the window (asked {}){}, {} full-queue waits",
        thousands(r.flows),
        r.workers,
        r.cpu_per_s,
        r.cpu_per_s / r.flows as f64 * 1e6,
        thousands(r.gen_pps as u64),
        thousands(asked),
        if r.gen_pps < asked as f64 * 0.98 {
            " GENERATOR BELOW RATE"
        } else {
            ""
        },
        r.sent.full_queue
    );
    println!(
        "    sent {} packets / {} IP bytes in {:.1} s; nfcapd: {} flows, {} packets, {} bytes; agent's stats: exported {} records ({} packets); \
         Udp RcvbufErrors in the namespace {}; veth drops tx-side {} rx-side {}",
        thousands(r.sent.packets),
        thousands(r.sent.ip_bytes),
        r.sent.secs,
        thousands(r.nfdump_flows),
        thousands(r.exported_pkts),
        thousands(r.exported_bytes),
        r.agent_records.map_or("?".into(), thousands),
        r.agent_pkts.map_or("?".into(), thousands),
        r.rcvbuf_errors.map_or("?".into(), |v| v.to_string()),
        r.veth.0,
        r.veth.1
    );
}

/// One run: topology, nfcapd, agent, generator; CPU over `window` seconds; totals.
fn measure(bin: &Path, n: u64, workers: u32, window: u64, tmp: &Path) -> Result<Row> {
    let topo = VethPair::create([NS_TX, NS_RX, DEV_TX, DEV_RX], [ADDR_TX, ADDR_RX], true)
        .context("building the namespaces")?;
    let nfdir = tmp.join(format!("nfcapd-{n}-{workers}"));
    let _ = fs::remove_dir_all(&nfdir);
    fs::create_dir_all(&nfdir)?;
    let mut nfcapd = Proc::spawn(
        "nfcapd",
        Command::new("ip")
            .args(["netns", "exec", NS_RX, "nfcapd", "-w"])
            .arg(&nfdir)
            .args(["-p", &NFCAPD_PORT.to_string(), "-b", "127.0.0.1"])
            .args(["-B", "67108864"]),
        tmp.join(format!("nfcapd-{n}-{workers}.log")),
    )?;
    thread::sleep(Duration::from_millis(300));
    nfcapd.check_running()?;

    let map_size = (2 * n).max(262_144);
    let mut agent = Proc::spawn(
        "agent",
        Command::new("ip")
            .args(["netns", "exec", NS_RX])
            .arg(bin)
            .args(["run", "--iface", DEV_RX, "--xdp-mode", "native"])
            .args(["--map-size", &map_size.to_string()])
            .args(["--export", &format!("127.0.0.1:{NFCAPD_PORT}")])
            .args(["--workers", &workers.to_string()])
            .args(["--stats-interval", "0"])
            .args(["--inactive-timeout", "15", "--active-timeout", "60"]),
        tmp.join(format!("agent-{n}-{workers}.log")),
    )?;
    // Wait for the XDP program on the receiving veth.
    let start = Instant::now();
    loop {
        agent.check_running()?;
        let link = ip(&["-n", NS_RX, "link", "show", "dev", DEV_RX])?;
        if link.contains("xdp") {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "the agent did not attach XDP within 60 s; log:\n{}",
                agent.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    // `ip netns exec` execs the command: the child should be the agent itself.
    let exe = fs::read_link(format!("/proc/{}/exe", agent.pid())).unwrap_or_default();
    if exe != bin {
        bail!(
            "the child of `ip netns exec` runs {}, not the agent: cannot read its CPU time",
            exe.display()
        );
    }

    let gen_ = Generator::start(n)?;
    // Warm-up: every flow sent once (one 5 s cycle), then a few seconds more.
    let start = Instant::now();
    while gen_.sent() < n {
        if !gen_.running() {
            return Err(gen_
                .finish()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("generator stopped")));
        }
        agent.check_running()?;
        if start.elapsed() > Duration::from_secs(REFRESH_SECS * 4) {
            bail!(
                "the generator sent only {} of {n} flows in {} s",
                gen_.sent(),
                REFRESH_SECS * 4
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(3));

    let (cpu0, pkts0, t0) = (cpu_secs(agent.pid())?, gen_.sent(), Instant::now());
    thread::sleep(Duration::from_secs(window));
    agent.check_running()?;
    let (cpu1, pkts1, secs) = (
        cpu_secs(agent.pid())?,
        gen_.sent(),
        t0.elapsed().as_secs_f64(),
    );
    let cpu_per_s = (cpu1 - cpu0) / secs;
    let gen_pps = (pkts1 - pkts0) as f64 / secs;

    let sent = gen_.finish().context("packet generator")?;
    thread::sleep(Duration::from_millis(500));
    let veth = {
        let (tx_drop, _) = veth_drops(NS_TX, DEV_TX);
        let (_, rx_drop) = veth_drops(NS_RX, DEV_RX);
        (tx_drop, rx_drop)
    };
    // SIGINT: the agent detaches, exports every flow it holds and exits.
    agent
        .stop(SIGINT, Duration::from_secs(180))
        .context("stopping the agent")?;
    thread::sleep(Duration::from_secs(2));
    let rcvbuf_errors = rcvbuf_errors(nfcapd.pid());
    nfcapd
        .stop(SIGTERM, Duration::from_secs(60))
        .context("stopping nfcapd")?;
    let (nfdump_flows, exported_pkts, exported_bytes) = nfdump_totals(&nfdir)?;
    let log = agent.log_text();
    let agent_records = number_after(&log, "exported ");
    let agent_pkts = number_after(&log, " records (");
    let _ = fs::remove_dir_all(&nfdir);
    drop(topo);
    Ok(Row {
        flows: n,
        workers,
        cpu_per_s,
        gen_pps,
        sent,
        exported_pkts,
        exported_bytes,
        nfdump_flows,
        agent_records,
        agent_pkts,
        rcvbuf_errors,
        veth,
    })
}
