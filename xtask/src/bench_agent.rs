//! `cargo xtask bench agent`: the agent end to end, with real peers.
//!
//! Part 1, **meter**: two network namespaces joined by a veth pair; a packet generator
//! (an AF_PACKET socket and `sendmmsg`, in a thread of this process that entered the
//! sender namespace) keeps N UDP flows alive, each refreshed every 5 s; the agent meters
//! the receiving veth (native XDP) and exports to a real `nfcapd` in its namespace. It
//! prints the agent's CPU time per second and per flow, and whether every packet sent
//! came out of nfcapd.
//!
//! Part 2, **ingest**: the agent's own NetFlow v9 export of the labelled captures, made
//! new flows on every cycle (addresses, ports and sequence numbers patched), sent over
//! loopback at rising rates to the agent's NetFlow listener, to `nfcapd` and to pmacct's
//! `nfacctd`; the highest rate each takes without losing a record.
//!
//! Nothing is asserted: the figures are printed with "met"/"not met" against the targets.
//! Traffic stays on loopback and in the namespaces this benchmark creates (`dbench-*`),
//! which are removed at exit, also on error.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

/// Which part of the benchmark to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Flow meter in network namespaces: CPU per flow, every packet exported.
    Meter,
    /// NetFlow ingest over loopback: highest loss-free rate against nfcapd and nfacctd.
    Ingest,
    /// Both.
    All,
}

/// Options of `cargo xtask bench agent`.
#[derive(Args)]
pub struct AgentArgs {
    /// Which part to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// Concurrent flows of the meter part (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    flows: Vec<u64>,
    /// Agent worker counts (`--workers`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<u32>,
    /// Seconds the agent's best ingest rate must be sustained in the final confirmation.
    #[arg(long, default_value_t = 60)]
    ingest_secs: u64,
    /// Short durations, for a smoke run (meter window 20 s, ingest trials 3 s).
    #[arg(long)]
    quick: bool,
    /// Ingest: skip the searches (and nfcapd, nfacctd) and run the agent once at this
    /// many records/s for --ingest-secs (to look at its stalls at a given rate).
    #[arg(long)]
    ingest_rate: Option<u64>,
}

/// Runs the benchmark with the agent binary `bin`.
pub fn run(bin: &Path, args: &AgentArgs) -> Result<()> {
    if !crate::is_root() {
        bail!("bench agent creates network namespaces and attaches XDP: run it as root");
    }
    if args.flows.is_empty() || args.workers.is_empty() {
        bail!("--flows and --workers need at least one value each");
    }
    let bin = fs::canonicalize(bin).with_context(|| format!("agent binary {}", bin.display()))?;
    let tmp = std::env::temp_dir().join(format!("dbench-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let _tmp_guard = RemoveDir(tmp.clone());
    // nfcapd and nfacctd ask for large receive buffers with plain SO_RCVBUF, which the
    // kernel caps at net.core.rmem_max (not per namespace): raise it for the run.
    let _rmem = RmemMax::raise(64 << 20)?;
    println!("agent: {}", bin.display());
    let mut meter_ok = Ok(());
    if matches!(args.part, Part::Meter | Part::All) {
        meter_ok = meter::run(&bin, args, &tmp);
        if let Err(e) = &meter_ok {
            eprintln!("xtask: meter part failed: {e:#}");
        }
    }
    if matches!(args.part, Part::Ingest | Part::All) {
        ingest::run(&bin, args, &tmp)?;
    }
    meter_ok
}

/// Removes a directory tree when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Raises net.core.rmem_max for the run and puts the old value back when dropped.
struct RmemMax(Option<String>);

impl RmemMax {
    const PATH: &str = "/proc/sys/net/core/rmem_max";

    fn raise(bytes: u64) -> Result<Self> {
        let old = fs::read_to_string(Self::PATH).context("reading net.core.rmem_max")?;
        if old.trim().parse::<u64>().unwrap_or(0) >= bytes {
            return Ok(Self(None));
        }
        fs::write(Self::PATH, bytes.to_string()).context("raising net.core.rmem_max")?;
        println!(
            "net.core.rmem_max raised from {} to {bytes} for the run (collectors' -B)",
            old.trim()
        );
        Ok(Self(Some(old)))
    }
}

impl Drop for RmemMax {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = fs::write(Self::PATH, old.trim());
        }
    }
}

/// utime + stime from a `/proc/.../stat` line, in seconds.
fn stat_cpu_secs(stat: &str) -> Result<f64> {
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ")".
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / sys::clock_ticks_per_sec())
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_secs(pid: i32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_cpu_secs(&stat)
}

/// utime + stime of each thread of a process, in seconds, summed by thread name with
/// the digits after its last '-' dropped (`shard-0` and `shard-1` count as `shard`).
fn thread_cpu_secs(pid: i32) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for t in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = t?.path();
        // A thread may end between the listing and the read.
        let (Ok(stat), Ok(comm)) = (
            fs::read_to_string(path.join("stat")),
            fs::read_to_string(path.join("comm")),
        ) else {
            continue;
        };
        let comm = comm.trim();
        let name = match comm.split_once('-') {
            Some((head, _)) => head,
            None => comm,
        };
        *out.entry(name.to_string()).or_insert(0.0) += stat_cpu_secs(&stat)?;
    }
    Ok(out)
}

/// A child process that is killed (SIGKILL) and reaped if still running when dropped,
/// so an error path leaves nothing behind.
pub(crate) struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { child, name, log })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the end of its log when the process has already exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited early ({st}); log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Sends `sig` and waits up to `timeout` for the exit, then kills it.
    pub(crate) fn stop(&mut self, sig: i32, timeout: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        sys::signal_pid(self.pid(), sig);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!(
            "{} did not exit within {:?} of signal {sig}; killed",
            self.name,
            timeout
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Two network namespaces joined by a veth pair, IPv6 off, addresses set, and a queue on
/// the sending side (a full receiver stops it instead of dropping, so a generator counts
/// only what really left); removed when dropped, also on error.
pub(crate) struct VethPair {
    pub names: [&'static str; 4],
}

impl VethPair {
    /// `ns_tx`, `ns_rx`, `dev_tx`, `dev_rx`; with `offloads_off`, TSO/GSO/GRO and
    /// checksum offloads are turned off on both ends.
    pub(crate) fn create(
        names: [&'static str; 4],
        addrs: [[u8; 4]; 2],
        offloads_off: bool,
    ) -> Result<Self> {
        let [ns_tx, ns_rx, dev_tx, dev_rx] = names;
        Self::remove(names);
        ip(&["netns", "add", ns_tx])?;
        // From here on, Drop cleans up whatever exists.
        let pair = Self { names };
        ip(&["netns", "add", ns_rx])?;
        ip(&[
            "link", "add", dev_tx, "netns", ns_tx, "type", "veth", "peer", "name", dev_rx, "netns",
            ns_rx,
        ])?;
        for ((ns, dev), addr) in [(ns_tx, dev_tx), (ns_rx, dev_rx)].into_iter().zip(addrs) {
            for key in ["all", "default", dev] {
                sh(Command::new("ip").args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ]))?;
            }
            if offloads_off {
                sh(Command::new("ip")
                    .args(["netns", "exec", ns, "ethtool", "-K", dev])
                    .args([
                        "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off",
                    ]))
                .context("ethtool (package ethtool)")?;
            }
            let a = format!("{}.{}.{}.{}/24", addr[0], addr[1], addr[2], addr[3]);
            ip(&["-n", ns, "addr", "add", &a, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        sh(Command::new("tc").args([
            "-n", ns_tx, "qdisc", "replace", "dev", dev_tx, "root", "pfifo", "limit", "10000",
        ]))?;
        Ok(pair)
    }

    fn remove(names: [&'static str; 4]) {
        for ns in &names[..2] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", names[2]])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        Self::remove(self.names);
    }
}

/// For the calling thread: enters namespace `ns` and opens a raw AF_PACKET socket on
/// `dev` (16 MiB send buffer), with the destination of frames to `dst_mac`.
pub(crate) fn frame_sender(
    ns: &str,
    dev: &str,
    dst_mac: [u8; 6],
) -> Result<(sys::Fd, sys::SockaddrLl)> {
    sys::enter_netns(ns).with_context(|| format!("entering namespace {ns}"))?;
    let ifindex = sys::ifindex(dev).with_context(|| format!("interface {dev}"))?;
    let sock = sys::packet_socket(ifindex)?;
    sys::set_int_opt(sock.0, sys::SOL_SOCKET, sys::SO_SNDBUFFORCE, 16 << 20)?;
    let m = dst_mac;
    let dest = sys::SockaddrLl {
        family: sys::AF_PACKET as u16,
        protocol: sys::ETH_P_IP.to_be(),
        ifindex,
        hatype: 0,
        pkttype: 0,
        halen: 6,
        addr: [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0],
    };
    Ok((sock, dest))
}

/// The IPv4 header checksum.
pub(crate) fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Runs a command to completion; fails with its output when it fails.
pub(crate) fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    sh(Command::new("ip").args(args))
}

/// Formats an integer with thousands separators.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A free UDP port on 127.0.0.1 (bound and released; good enough for a benchmark).
fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One row of /proc/net/udp (or a namespace's) for a socket bound to `port`:
/// (receive queue bytes, drops).
fn udp_socket_state(proc_net_udp: &str, port: u16) -> Option<(u64, u64)> {
    let hex = format!(":{port:04X}");
    let text = fs::read_to_string(proc_net_udp).ok()?;
    text.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.get(1).is_some_and(|a| a.ends_with(&hex)) {
            let rx_queue = cols
                .get(4)
                .and_then(|q| q.split(':').nth(1))
                .and_then(|h| u64::from_str_radix(h, 16).ok())?;
            let drops = cols.last()?.parse().ok()?;
            Some((rx_queue, drops))
        } else {
            None
        }
    })
}

/// Waits until some process has a UDP socket bound to `port` (in the current namespace).
fn wait_udp_bound(port: u16, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while udp_socket_state("/proc/net/udp", port).is_none() {
        proc.check_running()?;
        if start.elapsed() > timeout {
            bail!(
                "{} did not bind UDP port {port} within {timeout:?}",
                proc.name
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits (up to `timeout`) until the receive queue of the socket on `port` is empty.
fn wait_udp_drained(port: u16, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        match udp_socket_state("/proc/net/udp", port) {
            Some((0, _)) | None => return,
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The number that follows `key` in `text` (the last occurrence), e.g. "records " -> 42.
fn number_after(text: &str, key: &str) -> Option<u64> {
    text.rmatch_indices(key).find_map(|(i, _)| {
        let rest = &text[i + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    })
}

/// Thin layer over the few libc calls the packet generator and senders need (declared
/// here so xtask keeps its two dependencies).
pub(crate) mod sys {
    use std::ffi::{CString, c_void};
    use std::io;

    pub const AF_PACKET: i32 = 17;
    pub const SOCK_RAW: i32 = 3;
    pub const SOL_SOCKET: i32 = 1;
    pub const SO_SNDBUFFORCE: i32 = 32;
    pub const SO_RCVBUFFORCE: i32 = 33;
    pub const ETH_P_IP: u16 = 0x0800;
    const CLONE_NEWNET: i32 = 0x4000_0000;
    const SC_CLK_TCK: i32 = 2;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct SockaddrLl {
        pub family: u16,
        pub protocol: u16,
        pub ifindex: i32,
        pub hatype: u16,
        pub pkttype: u8,
        pub halen: u8,
        pub addr: [u8; 8],
    }

    #[repr(C)]
    pub struct Iovec {
        pub base: *mut c_void,
        pub len: usize,
    }

    #[repr(C)]
    pub struct Msghdr {
        pub name: *mut c_void,
        pub namelen: u32,
        pub iov: *mut Iovec,
        pub iovlen: usize,
        pub control: *mut c_void,
        pub controllen: usize,
        pub flags: i32,
    }

    #[repr(C)]
    pub struct Mmsghdr {
        pub hdr: Msghdr,
        pub len: u32,
    }

    unsafe extern "C" {
        fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
        fn bind(fd: i32, addr: *const c_void, len: u32) -> i32;
        fn close(fd: i32) -> i32;
        fn setsockopt(fd: i32, level: i32, name: i32, val: *const c_void, len: u32) -> i32;
        fn sendmmsg(fd: i32, msgs: *mut Mmsghdr, n: u32, flags: i32) -> i32;
        fn recvmmsg(fd: i32, msgs: *mut Mmsghdr, n: u32, flags: i32, timeout: *mut c_void) -> i32;
        fn setns(fd: i32, nstype: i32) -> i32;
        fn if_nametoindex(name: *const i8) -> u32;
        fn kill(pid: i32, sig: i32) -> i32;
        fn sysconf(name: i32) -> i64;
    }

    /// An owned file descriptor closed on drop.
    pub struct Fd(pub i32);

    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: we own the descriptor.
            unsafe { close(self.0) };
        }
    }

    fn check(ret: i32, what: &str) -> io::Result<i32> {
        if ret < 0 {
            let e = io::Error::last_os_error();
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        } else {
            Ok(ret)
        }
    }

    /// Moves the calling thread into the network namespace `ip netns` calls `name`.
    pub fn enter_netns(name: &str) -> io::Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{name}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace descriptor; affects only this thread.
        check(unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) }, "setns").map(drop)
    }

    pub fn ifindex(dev: &str) -> io::Result<i32> {
        let c = CString::new(dev).expect("no NUL in device name");
        // SAFETY: valid C string.
        let i = unsafe { if_nametoindex(c.as_ptr()) };
        if i == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(i as i32)
    }

    /// An AF_PACKET raw socket bound to `ifindex`, sending only (protocol 0 receives
    /// nothing).
    pub fn packet_socket(ifindex: i32) -> io::Result<Fd> {
        // SAFETY: plain socket call.
        let fd = Fd(check(
            unsafe { socket(AF_PACKET, SOCK_RAW, 0) },
            "socket(AF_PACKET)",
        )?);
        let addr = SockaddrLl {
            family: AF_PACKET as u16,
            protocol: 0,
            ifindex,
            hatype: 0,
            pkttype: 0,
            halen: 0,
            addr: [0; 8],
        };
        // SAFETY: addr is a valid sockaddr_ll of the given length.
        check(
            unsafe {
                bind(
                    fd.0,
                    (&addr as *const SockaddrLl).cast(),
                    size_of::<SockaddrLl>() as u32,
                )
            },
            "bind(AF_PACKET)",
        )?;
        Ok(fd)
    }

    pub fn set_int_opt(fd: i32, level: i32, name: i32, val: i32) -> io::Result<()> {
        // SAFETY: val outlives the call.
        check(
            unsafe { setsockopt(fd, level, name, (&val as *const i32).cast(), 4) },
            "setsockopt",
        )
        .map(drop)
    }

    /// One message header a buffer (`iov`), each to `name` (none when null).
    fn headers(iov: &mut [Iovec], name: *mut c_void, namelen: u32) -> Vec<Mmsghdr> {
        iov.iter_mut()
            .map(|v| Mmsghdr {
                hdr: Msghdr {
                    name,
                    namelen,
                    iov: v,
                    iovlen: 1,
                    control: std::ptr::null_mut(),
                    controllen: 0,
                    flags: 0,
                },
                len: 0,
            })
            .collect()
    }

    /// `sendmmsg` of whole buffers, each its own datagram or frame, to `dest` (or the
    /// connected peer when None). Returns how many were sent; Err only when none was.
    pub fn send_batch(fd: i32, bufs: &[&[u8]], dest: Option<&SockaddrLl>) -> io::Result<usize> {
        const MAX: usize = 256;
        let n = bufs.len().min(MAX);
        let mut iov: Vec<Iovec> = bufs[..n]
            .iter()
            .map(|b| Iovec {
                base: b.as_ptr() as *mut c_void,
                len: b.len(),
            })
            .collect();
        let (name, namelen) = match dest {
            Some(d) => (
                d as *const SockaddrLl as *mut c_void,
                size_of::<SockaddrLl>() as u32,
            ),
            None => (std::ptr::null_mut(), 0),
        };
        let mut msgs = headers(&mut iov, name, namelen);
        // SAFETY: msgs, their iovecs and the buffers they point to outlive the call; the
        // kernel only reads the buffers.
        let r = unsafe { sendmmsg(fd, msgs.as_mut_ptr(), n as u32, 0) };
        check(r, "sendmmsg").map(|r| r as usize)
    }

    /// `recvmmsg` without waiting into `bufs` (each datagram truncated to its buffer):
    /// how many were read, 0 when none was queued.
    pub fn recv_batch_now(fd: i32, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        const MSG_DONTWAIT: i32 = 0x40;
        let mut iov: Vec<Iovec> = bufs
            .iter_mut()
            .map(|b| Iovec {
                base: b.as_mut_ptr() as *mut c_void,
                len: b.len(),
            })
            .collect();
        let mut msgs = headers(&mut iov, std::ptr::null_mut(), 0);
        // SAFETY: msgs, their iovecs and the buffers they point to outlive the call; the
        // kernel writes at most each iovec's length into its buffer.
        let r = unsafe {
            recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as u32,
                MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        match check(r, "recvmmsg") {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub fn signal_pid(pid: i32, sig: i32) {
        // SAFETY: signalling a child we started.
        unsafe { kill(pid, sig) };
    }

    pub fn clock_ticks_per_sec() -> f64 {
        // SAFETY: no preconditions.
        let t = unsafe { sysconf(SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    }
}

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

mod ingest;
mod meter;
