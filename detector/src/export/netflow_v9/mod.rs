//! NetFlow v9 export over UDP to one or more collectors.

pub mod encoder;
pub mod layout;

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::SystemTime;

use log::warn;

use super::Sink;
use crate::flow::FlowRecord;
pub use encoder::{ExportFormat, V9Config, V9Encoder};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot resolve collector '{target}': {reason} (give HOST:PORT, e.g. 127.0.0.1:2055)")]
    Resolve { target: String, reason: String },
    #[error("cannot open a UDP socket towards {0}: {1}")]
    Socket(SocketAddr, std::io::Error),
}

/// Resolves `HOST:PORT` to the first address, or a clear error.
pub fn resolve(target: &str) -> Result<SocketAddr, ExportError> {
    let err = |reason: String| ExportError::Resolve {
        target: target.to_string(),
        reason,
    };
    let mut addrs = target.to_socket_addrs().map_err(|e| err(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| err("no address found".to_string()))
}

struct Collector {
    addr: SocketAddr,
    socket: UdpSocket,
    sent: u64,
    failures: u64,
}

/// Encodes once per cycle and sends the same datagrams to every collector.
///
/// Records of the local meter go out under `--source-id` with the meter's sampling
/// interval announced and raw counts; records relayed from other exporters go out under
/// `--source-id + 1` with counts already scaled by their exporters' sampling intervals
/// (announced interval 1), so a collector scales neither twice.
pub struct V9Sink {
    encoder: V9Encoder,
    relay: V9Encoder,
    collectors: Vec<Collector>,
    records: u64,
}

impl V9Sink {
    pub fn new(
        targets: &[SocketAddr],
        cfg: V9Config,
        boot: SystemTime,
    ) -> Result<Self, ExportError> {
        let collectors = targets
            .iter()
            .map(|&addr| {
                let bind: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let socket = UdpSocket::bind(bind).map_err(|e| ExportError::Socket(addr, e))?;
                Ok(Collector {
                    addr,
                    socket,
                    sent: 0,
                    failures: 0,
                })
            })
            .collect::<Result<_, ExportError>>()?;
        let relay_cfg = V9Config {
            source_id: cfg.source_id.wrapping_add(1),
            sampling_interval: 1,
            scale_counts: true,
            ..cfg.clone()
        };
        Ok(Self {
            encoder: V9Encoder::new(cfg, boot),
            relay: V9Encoder::new(relay_cfg, boot),
            collectors,
            records: 0,
        })
    }

    /// Datagrams that could not be sent, over all collectors.
    pub fn failures(&self) -> u64 {
        self.collectors.iter().map(|c| c.failures).sum()
    }
}

impl Sink for V9Sink {
    fn name(&self) -> String {
        let addrs: Vec<_> = self.collectors.iter().map(|c| c.addr.to_string()).collect();
        let proto = match self.encoder.format() {
            ExportFormat::V9 => "netflow-v9",
            ExportFormat::Ipfix => "ipfix",
        };
        format!("{proto}:{}", addrs.join(","))
    }

    fn send(&mut self, records: &[FlowRecord], now: SystemTime) {
        let is_local = |r: &FlowRecord| r.origin == crate::flow::Origin::Local;
        let mut datagrams;
        if records.iter().all(is_local) {
            datagrams = self.encoder.encode(records, now);
            if self.relay.next_sequence() > 0 {
                datagrams.extend(self.relay.encode(&[], now));
            }
        } else if !records.iter().any(is_local) {
            // Only relayed records (a NetFlow ingest without a meter): no copy.
            datagrams = self.encoder.encode(&[], now);
            datagrams.extend(self.relay.encode(records, now));
        } else {
            let (local, relayed): (Vec<FlowRecord>, Vec<FlowRecord>) =
                records.iter().cloned().partition(is_local);
            datagrams = self.encoder.encode(&local, now);
            datagrams.extend(self.relay.encode(&relayed, now));
        }
        self.records += records.len() as u64;
        for c in &mut self.collectors {
            for dg in &datagrams {
                match c.socket.send_to(dg, c.addr) {
                    Ok(_) => c.sent += 1,
                    Err(e) => {
                        c.failures += 1;
                        if c.failures.is_power_of_two() {
                            warn!(
                                "export to {} failed ({e}); {} datagrams lost so far",
                                c.addr, c.failures
                            );
                        }
                    }
                }
            }
        }
    }

    fn failures(&self) -> u64 {
        V9Sink::failures(self)
    }

    fn counters(&self) -> crate::export::SinkCounters {
        crate::export::SinkCounters {
            sink: self.name(),
            records: self.records,
            errors: self.failures(),
        }
    }

    fn describe(&self) -> String {
        let per: Vec<_> = self
            .collectors
            .iter()
            .map(|c| format!("{} sent={} failed={}", c.addr, c.sent, c.failures))
            .collect();
        format!(
            "netflow v9: {} records, sequence {}; {}",
            self.records,
            self.encoder.next_sequence(),
            per.join("; ")
        )
    }
}
