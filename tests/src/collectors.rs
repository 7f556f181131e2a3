//! Real flow collectors for the tests, each on a loopback port, stopped and read back as
//! totals or per flow key: nfdump's `nfcapd` (NetFlow/IPFIX) and `sfcapd` (sFlow), and
//! pmacct's `nfacctd` (NetFlow/IPFIX) and `sfacctd` (sFlow).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::sh;
use crate::tshark::Tuple;

/// (packets, bytes) per flow key (protocol, source, source port, destination,
/// destination port).
pub type ByKey = BTreeMap<Tuple, (u64, u64)>;

/// nfcapd (or sfcapd, its sFlow twin) writing to its own directory.
pub struct Nfcapd {
    child: Child,
    dir: PathBuf,
}

impl Nfcapd {
    pub fn start(dir: PathBuf, port: u16) -> Self {
        Self::spawn("nfcapd", "nfdump", dir, port)
    }

    /// sfcapd: nfdump's sFlow collector, one record per flow sample, its counts scaled
    /// by the sample's sampling rate.
    pub fn start_sfcapd(dir: PathBuf, port: u16) -> Self {
        Self::spawn("sfcapd", "nfdump-sflow", dir, port)
    }

    fn spawn(bin: &str, package: &str, dir: PathBuf, port: u16) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(bin)
            .arg("-w")
            .arg(&dir)
            .args(["-p", &port.to_string(), "-b", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin} (package {package}): {e}"));
        std::thread::sleep(Duration::from_millis(500));
        Self { child, dir }
    }

    /// Stops the collector and returns its records summed per flow key (`nfdump -o
    /// json`; ICMP and ICMPv6 with ports 0: nfdump keeps their type and code apart) and
    /// the sequence failures it counted.
    pub fn by_key(self) -> (ByKey, u64) {
        let dir = self.dir.clone();
        let (_, failures) = self.totals();
        let out = sh("nfdump", &["-R", dir.to_str().unwrap(), "-o", "json"]);
        let records: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "nfdump -o json: {e}: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
        let mut by_key = ByKey::new();
        for r in &records {
            let num = |f: &str| r[f].as_u64().unwrap_or(0);
            let addr = |v4: &str, v6: &str| -> IpAddr {
                r[v4]
                    .as_str()
                    .or_else(|| r[v6].as_str())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no {v4}/{v6}: {r}"))
            };
            let proto = num("proto") as u8;
            let key = (
                proto,
                addr("src4_addr", "src6_addr"),
                num("src_port") as u16,
                addr("dst4_addr", "dst6_addr"),
                num("dst_port") as u16,
            );
            let e = by_key.entry(key).or_insert((0, 0));
            e.0 += num("in_packets");
            e.1 += num("in_bytes");
        }
        (by_key, failures)
    }

    /// Stops nfcapd (it writes its file) and returns nfdump's (flows, packets, bytes)
    /// and the sequence failures nfcapd counted. nfcapd scales a record's counts by
    /// the sampling its exporter's options announce for the record's domain.
    pub fn totals(mut self) -> ((u64, u64, u64), u64) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let out = sh("nfdump", &["-R", self.dir.to_str().unwrap(), "-I"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {k} in nfdump -I: {text}"))
        };
        (
            (get("Flows:"), get("Packets:"), get("Bytes:")),
            get("Sequence failures:"),
        )
    }
}

/// A test that fails before reading a collector back leaves no daemon behind.
impl Drop for Nfcapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nfacctd with `nfacctd_renormalize` (counts scaled by the sampling interval its
/// exporters announce per source id), printing (packets, bytes) per flow key to a CSV.
pub struct Nfacctd(Pmacct);

impl Nfacctd {
    pub fn start(dir: &Path, port: u16) -> Self {
        Self(Pmacct::start("nfacctd", dir, port))
    }

    /// Stops nfacctd (its print plugin appends what it holds at every refresh and at
    /// the end) and returns the (packets, bytes) it counted over all keys.
    pub fn totals(self) -> (u64, u64) {
        self.0
            .by_key()
            .values()
            .fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1))
    }
}

/// sfacctd with `sfacctd_renormalize`, printing (packets, bytes) per flow key to a CSV.
/// It counts a sample's frame length (the sFlow record's, FCS included) and scales each
/// sample by the effective rate pmacct derives per data source: the growth of the
/// sample pool over the growth of the sample sequence number since the source's last
/// sample, or the sample's sampling rate for a source's first sample (or when pool or
/// sequence did not grow); ICMP keys carry ports 0.
pub struct Sfacctd(Pmacct);

impl Sfacctd {
    pub fn start(dir: &Path, port: u16) -> Self {
        Self(Pmacct::start("sfacctd", dir, port))
    }

    /// Stops sfacctd and returns what it counted per flow key.
    pub fn by_key(self) -> ByKey {
        self.0.by_key()
    }
}

/// A pmacct collector (`nfacctd` or `sfacctd`) with renormalisation on and the print
/// plugin aggregating by the 5-tuple.
struct Pmacct {
    child: Child,
    csv: PathBuf,
}

impl Pmacct {
    fn start(daemon: &str, dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let csv = dir.join(format!("{daemon}.csv"));
        let conf = dir.join(format!("{daemon}.conf"));
        // nfacctd_ip/port and sfacctd_ip/port name the same settings.
        let kind = &daemon[..2];
        std::fs::write(
            &conf,
            format!(
                "daemonize: false\n{kind}acctd_ip: 127.0.0.1\n{kind}acctd_port: {port}\n\
                 {kind}acctd_renormalize: true\nplugins: print\n\
                 aggregate: src_host, dst_host, src_port, dst_port, proto\n\
                 print_num_protos: true\n\
                 print_output: csv\nprint_output_file: {}\nprint_output_file_append: true\n\
                 print_refresh_time: 1\n",
                csv.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{daemon}.log"))).unwrap();
        let child = Command::new(daemon)
            .arg("-f")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{daemon} (package pmacct): {e}"));
        std::thread::sleep(Duration::from_millis(1500));
        Self { child, csv }
    }

    /// Stops the daemon (its print plugin appends what it holds at every refresh and
    /// at the end) and returns the (packets, bytes) it counted per flow key.
    fn by_key(mut self) -> ByKey {
        // Let the last refresh run, then stop (SIGINT: the plugin purges its cache).
        std::thread::sleep(Duration::from_millis(2500));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(500));
        let text = std::fs::read_to_string(&self.csv).unwrap_or_default();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no {name} in {}: {text}", self.csv.display()))
        };
        let cols = [
            "PROTOCOL", "SRC_IP", "SRC_PORT", "DST_IP", "DST_PORT", "PACKETS", "BYTES",
        ]
        .map(col);
        let mut by_key = ByKey::new();
        // Each refresh appends what it purged, after a header of its own.
        for l in lines.filter(|l| !l.is_empty() && !l.starts_with("SRC_IP,")) {
            let f: Vec<&str> = l.split(',').collect();
            let get = |i: usize| f[cols[i]];
            let bad = || format!("{}: {l}", self.csv.display());
            let num = |i: usize| {
                get(i)
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{}", bad()))
            };
            let addr = |i: usize| {
                get(i)
                    .parse::<IpAddr>()
                    .unwrap_or_else(|_| panic!("{}", bad()))
            };
            let key = (num(0) as u8, addr(1), num(2) as u16, addr(3), num(4) as u16);
            let e = by_key.entry(key).or_insert((0, 0));
            e.0 += num(5);
            e.1 += num(6);
        }
        by_key
    }
}

impl Drop for Pmacct {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's view of the IPv4 UDP socket bound to `port` (`/proc/net/udp`): bytes
/// waiting in its receive queue and datagrams dropped because the queue was full.
pub fn udp_socket_queue(port: u16) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let suffix = format!(":{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if !f.get(1)?.ends_with(&suffix) {
            return None;
        }
        let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
        let drops = f.get(12)?.parse().ok()?;
        Some((rx, drops))
    })
}

/// Waits (up to `limit`) until at most `bytes` wait in the receive queue of the UDP
/// socket on `port`: back-pressure for a relay feeding a collector whose receive buffer
/// it cannot grow (`net.core.rmem_max` caps what the collector asks for).
pub fn wait_for_udp_queue(port: u16, bytes: u64, limit: Duration) {
    let start = std::time::Instant::now();
    while udp_socket_queue(port).is_some_and(|(rx, _)| rx > bytes) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_micros(200));
    }
}
