//! JSON lines sink: one object per record (`--flows-json PATH`, `-` for stdout).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use log::warn;
use serde::Serialize;

use super::{FailureLog, Sink};
use crate::flow::FlowRecord;

/// The JSON form of a record. The first twelve fields are the documented interface;
/// `packets` and `bytes` are scaled by the sampling interval, `raw_packets` and
/// `raw_bytes` are as measured.
#[derive(Serialize)]
pub struct JsonFlow {
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub packets: u64,
    pub bytes: u64,
    pub first: String,
    pub last: String,
    pub direction: &'static str,
    pub tcp_flags: u8,
    pub vlan: u16,
    pub vlan_inner: u16,
    pub tos: u8,
    pub ifindex: u32,
    pub sampling: u32,
    pub raw_packets: u64,
    pub raw_bytes: u64,
    /// `local`, or the exporter as `ADDR/DOMAIN`.
    pub source: String,
    pub duplicate: bool,
}

impl From<&FlowRecord> for JsonFlow {
    fn from(r: &FlowRecord) -> Self {
        Self {
            src_addr: r.src_addr,
            dst_addr: r.dst_addr,
            src_port: r.src_port,
            dst_port: r.dst_port,
            protocol: r.protocol,
            packets: r.est_packets(),
            bytes: r.est_bytes(),
            first: rfc3339(r.first),
            last: rfc3339(r.last),
            direction: r.direction.as_str(),
            tcp_flags: r.tcp_flags,
            vlan: r.vlan,
            vlan_inner: r.vlan_inner,
            tos: r.tos,
            ifindex: r.ifindex,
            sampling: r.sampling,
            raw_packets: r.packets,
            raw_bytes: r.bytes,
            source: r.origin.label(),
            duplicate: r.duplicate,
        }
    }
}

pub use crate::flow::rfc3339;

pub struct JsonSink {
    target: String,
    out: Box<dyn Write + Send>,
    written: u64,
    /// Writes that failed, and the records they lost.
    errors: u64,
    lost: u64,
    failures: FailureLog,
}

impl JsonSink {
    /// `-` is stdout; anything else a file, created or appended to.
    pub fn open(path: &str) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(io::stdout())
        } else {
            Box::new(BufWriter::new(append(Path::new(path))?))
        };
        Ok(Self {
            target: path.to_string(),
            out,
            written: 0,
            errors: 0,
            lost: 0,
            failures: FailureLog::default(),
        })
    }

    fn write_all(&mut self, records: &[FlowRecord]) -> io::Result<()> {
        for r in records {
            serde_json::to_writer(&mut self.out, &JsonFlow::from(r))?;
            self.out.write_all(b"\n")?;
            self.written += 1;
        }
        self.out.flush()
    }
}

impl Sink for JsonSink {
    fn name(&self) -> String {
        format!("json:{}", self.target)
    }

    fn send(&mut self, records: &[FlowRecord], _now: SystemTime) {
        if records.is_empty() {
            return;
        }
        let before = self.written;
        if let Err(e) = self.write_all(records) {
            // The batch did not reach the file (what was buffered of it went with the
            // failed flush): all of it counts as lost.
            self.errors += 1;
            self.written = before;
            self.lost += records.len() as u64;
            if let Some(n) = self.failures.count(format!("{:?}", e.kind())) {
                warn!(
                    "writing flow records to {}: {e} ({n} failed writes of this kind so far, {} records lost in all)",
                    self.target, self.lost
                );
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "json {}: {} records, {} write errors ({} records lost)",
            self.target, self.written, self.errors, self.lost
        )
    }

    fn failures(&self) -> u64 {
        self.errors
    }

    fn counters(&self) -> super::SinkCounters {
        super::SinkCounters {
            sink: self.name(),
            records: self.written,
            errors: self.errors,
        }
    }

    fn reopen(&mut self) {
        if self.target == "-" {
            return;
        }
        let _ = self.out.flush();
        match append(Path::new(&self.target)) {
            Ok(f) => self.out = Box::new(BufWriter::new(f)),
            Err(e) => warn!(
                "reopening {}: {e}; records still go to the file opened before",
                self.target
            ),
        }
    }
}

/// Opens `path` for appending, creating it: a restart keeps what earlier runs wrote.
pub fn append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Direction;
    use std::time::Duration;

    #[test]
    fn json_has_the_documented_fields_and_rfc3339_times() {
        let r = FlowRecord {
            packets: 3,
            bytes: 4,
            first: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_466_200_123),
            last: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_466_201_000),
            direction: Direction::Egress,
            vlan: 5,
            ifindex: 2,
            sampling: 10,
            ..FlowRecord::new(
                "10.0.0.1".parse().unwrap(),
                1,
                "2001:db8::1".parse().unwrap(),
                2,
                17,
            )
        };
        let v: serde_json::Value = serde_json::to_value(JsonFlow::from(&r)).unwrap();
        assert_eq!(v["src_addr"], "10.0.0.1");
        assert_eq!(v["dst_addr"], "2001:db8::1");
        assert_eq!(v["first"], "2025-11-30T01:30:00.123Z");
        assert_eq!(v["last"], "2025-11-30T01:30:01.000Z");
        assert_eq!(v["direction"], "egress");
        assert_eq!(
            (v["packets"].as_u64(), v["raw_packets"].as_u64()),
            (Some(30), Some(3))
        );
        assert_eq!(
            (v["bytes"].as_u64(), v["raw_bytes"].as_u64()),
            (Some(40), Some(4))
        );
        assert_eq!(v["source"], "local");
        for f in [
            "src_port",
            "dst_port",
            "protocol",
            "packets",
            "bytes",
            "tcp_flags",
            "vlan",
        ] {
            assert!(v[f].is_u64(), "{f} missing");
        }
    }
}
