//! Real NetFlow/IPFIX collectors for the tests: nfdump's `nfcapd` and pmacct's
//! `nfacctd`, each on a loopback port, stopped and read back as totals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::sh;

/// nfcapd writing to its own directory.
pub struct Nfcapd {
    child: Child,
    dir: PathBuf,
}

impl Nfcapd {
    pub fn start(dir: PathBuf, port: u16) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("nfcapd")
            .arg("-w")
            .arg(&dir)
            .args(["-p", &port.to_string(), "-b", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nfcapd (package nfdump)");
        std::thread::sleep(Duration::from_millis(500));
        Self { child, dir }
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

/// nfacctd with `nfacctd_renormalize` (counts scaled by the sampling interval its
/// exporters announce per source id), printing (packets, bytes) per flow key to a CSV.
pub struct Nfacctd {
    child: Child,
    csv: PathBuf,
}

impl Nfacctd {
    pub fn start(dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let csv = dir.join("nfacctd.csv");
        let conf = dir.join("nfacctd.conf");
        std::fs::write(
            &conf,
            format!(
                "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n\
                 nfacctd_renormalize: true\nplugins: print\n\
                 aggregate: src_host, dst_host, src_port, dst_port, proto\n\
                 print_output: csv\nprint_output_file: {}\nprint_output_file_append: true\n\
                 print_refresh_time: 1\n",
                csv.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("nfacctd.log")).unwrap();
        let child = Command::new("nfacctd")
            .arg("-f")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nfacctd (package pmacct)");
        std::thread::sleep(Duration::from_millis(1500));
        Self { child, csv }
    }

    /// Stops nfacctd (its print plugin appends what it holds at every refresh and at
    /// the end) and returns the (packets, bytes) it counted over all keys.
    pub fn totals(mut self) -> (u64, u64) {
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
                .unwrap_or_else(|| panic!("no {name} in nfacctd's CSV: {text}"))
        };
        let (p, b) = (col("PACKETS"), col("BYTES"));
        // Each refresh appends what it purged, after a header of its own.
        lines
            .filter(|l| !l.is_empty() && !l.starts_with("SRC_IP,"))
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[p].parse::<u64>().unwrap(), f[b].parse::<u64>().unwrap())
            })
            .fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1))
    }
}
