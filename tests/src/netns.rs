//! Network namespaces for the end-to-end tests: created by the test, removed when dropped
//! (also when the test fails), with veth pairs whose offloads are off so that the packets
//! on the wire are the packets the programs see.

use std::fs::File;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// Runs `cmd` and panics with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>` with `lo` up.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `program` in this network namespace but in the caller's mount namespace
    /// (`nsenter --net`), where `ip netns exec` gives it a private one with /sys
    /// mounted anew.
    pub fn command_keeping_mounts(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread), so
    /// sockets it opens live in the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread panicked")
    }

    /// Like [`Netns::run`] without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::spawn(move || {
            let fd = File::open(&path).expect("open namespace");
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects `a` and `b` with a veth pair, addresses both ends (IPv4 /24 and IPv6 /64,
/// without DAD), turns offloads off on both, and brings them up.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: (&str, &str),
    b: &Netns,
    b_if: &str,
    b_addrs: (&str, &str),
) {
    sh(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    );
    for (ns, dev, (v4, v6)) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        ns.exec_ok("ip", &["addr", "add", v4, "dev", dev]);
        ns.exec_ok("ip", &["addr", "add", v6, "dev", dev, "nodad"]);
        ns.exec_ok(
            "ethtool",
            &[
                "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off",
            ],
        );
        ns.exec_ok("ip", &["link", "set", dev, "up"]);
    }
}

/// A child process killed (SIGKILL) on drop unless it was stopped first.
pub struct Guarded {
    pub child: Option<Child>,
    pub what: String,
}

impl Guarded {
    pub fn new(what: &str, child: Child) -> Self {
        Self {
            child: Some(child),
            what: what.to_string(),
        }
    }

    /// Sends `signal`, waits up to `timeout`, returns the exit status.
    pub fn stop(
        &mut self,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let child = self.child.as_ref().expect("already stopped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        self.wait(timeout)
    }

    /// Waits for the process to exit (SIGKILL and a panic after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `path` contains `needle` (a log line), or panics after `timeout`.
pub fn wait_for_text(path: &std::path::Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path)
            .map(|s| s.contains(needle))
            .unwrap_or(false)
        {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "'{needle}' did not appear in {} within {timeout:?}; it holds:\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the agent as a pure NetFlow/IPFIX collector on `127.0.0.1:port` writing its
/// records to `json` (log to `log`), and waits until it listens.
pub fn start_collector(port: u16, json: &std::path::Path, log: &std::path::Path) -> Guarded {
    let child = Command::new(crate::detector_bin())
        .args(["run", "--netflow-listen", &format!("127.0.0.1:{port}")])
        .arg("--flows-json")
        .arg(json)
        .args(["--stats-interval", "0"])
        .stderr(File::create(log).expect("agent log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let agent = Guarded::new("detector", child);
    wait_for_text(log, "receiving NetFlow/IPFIX", Duration::from_secs(20));
    agent
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP port")
        .port()
}

/// Asks for a receive buffer of `bytes` on a UDP socket (past `net.core.rmem_max` when
/// root), so a test's relay or collector does not drop a burst it reads a little late.
pub fn grow_receive_buffer(socket: &std::net::UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    let set = |opt| unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if set(libc::SO_RCVBUFFORCE) != 0 {
        set(libc::SO_RCVBUF);
    }
}
