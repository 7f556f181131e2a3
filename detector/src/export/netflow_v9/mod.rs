//! NetFlow v9 export over UDP to one or more collectors.

pub mod encoder;
pub mod layout;

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::SystemTime;

use bytes::Bytes;
use log::{info, warn};

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
    /// Runs of equal datagrams go out with UDP segmentation offload (see [`send_all`]).
    gso: bool,
}

/// The most observation domains (v9 source ids) the relay opens for distinct sampling
/// intervals; records of further intervals go out unsampled with scaled counts.
pub const MAX_RELAY_DOMAINS: usize = 16;

/// One observation domain of relayed records, all sampled 1 in `interval`.
struct Relay {
    interval: u32,
    encoder: V9Encoder,
}

/// Encodes once per cycle and sends the same datagrams to every collector.
///
/// Records of the local meter go out under `--source-id` with the meter's sampling
/// interval announced and raw counts. Records relayed from other exporters (NetFlow,
/// IPFIX, sFlow) go out with their raw counts under an observation domain per sampling
/// interval, each announcing its interval in the sampling options record (RFC 3954
/// SAMPLING_INTERVAL in v9, RFC 5477 samplingPacketInterval/Space in IPFIX), which is
/// the only way collectors such as nfcapd take a sampling rate: per exporter and domain.
/// Unsampled relayed records take `--source-id + 1`; each further interval, in the
/// order the intervals are first seen, the next id, up to [`MAX_RELAY_DOMAINS`]; past
/// that bound records go out under `--source-id + 1` with counts already scaled (interval
/// 1 announced), counted and logged, so a collector never scales twice nor misses a
/// scale.
pub struct V9Sink {
    encoder: V9Encoder,
    cfg: V9Config,
    boot: SystemTime,
    /// The unsampled relay domain first, then one per interval in order of first sight.
    relays: Vec<Relay>,
    collectors: Vec<Collector>,
    records: u64,
    /// Relayed records exported scaled because every relay domain was taken.
    rescaled: u64,
    /// Each record's domain in [`Self::encode`], kept between batches.
    domains: Vec<u8>,
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
                    gso: true,
                })
            })
            .collect::<Result<_, ExportError>>()?;
        let mut sink = Self {
            encoder: V9Encoder::new(cfg.clone(), boot),
            cfg,
            boot,
            relays: Vec::new(),
            collectors,
            records: 0,
            rescaled: 0,
            domains: Vec::new(),
        };
        // The unsampled domain scales counts: it also carries the overflow.
        sink.open_relay(1, true);
        Ok(sink)
    }

    fn open_relay(&mut self, interval: u32, scale_counts: bool) -> usize {
        let cfg = V9Config {
            source_id: self
                .cfg
                .source_id
                .wrapping_add(1 + self.relays.len() as u32),
            sampling_interval: interval,
            scale_counts,
            ..self.cfg.clone()
        };
        self.relays.push(Relay {
            interval,
            encoder: V9Encoder::new(cfg, self.boot),
        });
        self.relays.len() - 1
    }

    /// The relay domain for records sampled 1 in `interval`: the unsampled one (which
    /// scales) when every domain is taken.
    fn relay_for(&mut self, interval: u32) -> usize {
        let interval = interval.max(1);
        if let Some(i) = self.relays.iter().position(|r| r.interval == interval) {
            return i;
        }
        if self.relays.len() < MAX_RELAY_DOMAINS {
            let i = self.open_relay(interval, false);
            info!(
                "export: records sampled 1 in {interval} relayed under source id {}",
                self.cfg.source_id.wrapping_add(i as u32 + 1)
            );
            return i;
        }
        0
    }

    /// Datagrams that could not be sent, over all collectors.
    pub fn failures(&self) -> u64 {
        self.collectors.iter().map(|c| c.failures).sum()
    }

    /// Relayed records exported with scaled counts because every relay domain was taken.
    pub fn rescaled(&self) -> u64 {
        self.rescaled
    }

    /// This cycle's datagrams: the meter's records, then each relay domain's.
    fn encode(&mut self, records: &[FlowRecord], now: SystemTime) -> Vec<Bytes> {
        // Each record's domain (the meter's, or a relay's) in one pass, and each encoder
        // given its records without a filter when it takes them all (the usual batch:
        // one exporter's records, one sampling interval): 35 instructions a record fewer
        // than a filter for each encoder and the domains chosen apart (callgrind, `micro
        // ingest --in-process`).
        let mut domain = std::mem::take(&mut self.domains);
        domain.clear();
        let mut count = [0usize; MAX_RELAY_DOMAINS];
        let mut local = 0;
        let mut overflow = 0;
        let mut last: Option<(u32, usize)> = None;
        for r in records {
            if r.origin == crate::flow::Origin::Local {
                local += 1;
                domain.push(LOCAL);
                continue;
            }
            // A batch's records mostly share one interval: its domain is asked once.
            let i = match last {
                Some((interval, i)) if interval == r.sampling => i,
                _ => {
                    let i = self.relay_for(r.sampling);
                    last = Some((r.sampling, i));
                    i
                }
            };
            if i == 0 && r.sampling > 1 {
                overflow += 1;
            }
            count[i] += 1;
            domain.push(i as u8);
        }
        let of = |d: u8| {
            records
                .iter()
                .zip(&domain)
                .filter(move |&(_, &x)| x == d)
                .map(|(r, _)| r)
        };
        let mut datagrams = if local == records.len() {
            self.encoder.encode(records, now)
        } else {
            self.encoder.encode(of(LOCAL), now)
        };
        if overflow > 0 {
            if self.rescaled == 0 || (self.rescaled + overflow).ilog2() > self.rescaled.ilog2() {
                warn!(
                    "export: more than {} sampling intervals among relayed records; {} records \
                     so far exported with scaled counts under source id {}",
                    MAX_RELAY_DOMAINS - 1,
                    self.rescaled + overflow,
                    self.cfg.source_id.wrapping_add(1)
                );
            }
            self.rescaled += overflow;
        }
        for (i, relay) in self.relays.iter_mut().enumerate() {
            if count[i] > 0 && count[i] == records.len() {
                datagrams.extend(relay.encoder.encode(records, now));
            } else if count[i] > 0 {
                datagrams.extend(relay.encoder.encode(of(i as u8), now));
            } else if relay.encoder.next_sequence() > 0 {
                // Templates (and sampling options) refreshed while a domain is idle.
                datagrams.extend(relay.encoder.encode(&[], now));
            }
        }
        self.domains = domain;
        datagrams
    }
}

/// [`V9Sink::encode`]'s mark of a record of the local meter (relay domains are below
/// [`MAX_RELAY_DOMAINS`]).
const LOCAL: u8 = u8::MAX;
const _: () = assert!(MAX_RELAY_DOMAINS < LOCAL as usize);

/// Most messages one `sendmmsg` takes (the kernel's UIO_MAXIOV).
const SEND_BATCH: usize = 1024;

/// Most datagrams one UDP GSO send carries (the kernel's UDP_MAX_SEGMENTS).
const GSO_SEGMENTS: usize = 64;

/// Most payload bytes of one UDP GSO send: an IP packet's 65,535 less the IPv6 and UDP
/// headers.
const GSO_BYTES: usize = 65_535 - 40 - 8;

/// Splits `datagrams` into the runs one UDP GSO send carries (`UDP_SEGMENT`, Linux 4.18):
/// consecutive datagrams all of the first one's size except the last, which may be
/// shorter, at most [`GSO_SEGMENTS`] of them and [`GSO_BYTES`] in all. The kernel cuts
/// the run back into those datagrams; a run of one goes as it is.
fn gso_runs(datagrams: &[Bytes]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < datagrams.len() {
        let size = datagrams[start].len();
        let (mut end, mut bytes) = (start + 1, size);
        while size > 0 && end < datagrams.len() && end - start < GSO_SEGMENTS {
            let len = datagrams[end].len();
            if len > size || bytes + len > GSO_BYTES {
                break;
            }
            bytes += len;
            end += 1;
            if len < size {
                break;
            }
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// Whether a send with `UDP_SEGMENT` failed because the kernel or the route cannot
/// segment (an old kernel, a device without checksum offload), not the datagrams.
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Control-message room for one `UDP_SEGMENT` (a u16), aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SegmentCmsg([u8; 32]);

/// Sends `datagrams` to `addr` in order with as few system calls and as little kernel
/// work as the kernel allows: `sendmmsg` of up to [`SEND_BATCH`] messages, each a run of
/// equal datagrams sent with UDP segmentation offload while `gso` holds (the kernel walks
/// its output path once a run instead of once a datagram; turned off, with a log line, the
/// first time the kernel refuses it); returns how many datagrams went, and tells `failed`
/// the error of each one that did not.
fn send_all(
    socket: &UdpSocket,
    addr: SocketAddr,
    datagrams: &[Bytes],
    gso: &mut bool,
    failed: &mut impl FnMut(&std::io::Error),
) -> u64 {
    use std::os::fd::AsRawFd;
    let to = socket2::SockAddr::from(addr);
    let runs = if *gso {
        gso_runs(datagrams)
    } else {
        (0..datagrams.len()).map(|i| i..i + 1).collect()
    };
    let mut iovs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic on their argument.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2), libc::CMSG_LEN(2)) };
    debug_assert!(space as usize <= size_of::<SegmentCmsg>());
    let mut sent = 0;
    for batch in runs.chunks(SEND_BATCH) {
        let mut cmsgs = vec![SegmentCmsg([0; 32]); batch.len()];
        let mut hdrs: Vec<libc::mmsghdr> = batch
            .iter()
            .zip(&mut cmsgs)
            .map(|(run, cmsg)| {
                // SAFETY: a C struct of integers and pointers; all-zero is valid.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = to.len();
                h.msg_hdr.msg_iov = iovs[run.start..].as_mut_ptr();
                h.msg_hdr.msg_iovlen = run.len() as _;
                if run.len() > 1 {
                    h.msg_hdr.msg_control = cmsg.0.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = space as _;
                    // SAFETY: the header's control buffer is `cmsg`, of `space` bytes
                    // and aligned for a cmsghdr; the u16 fits in the room CMSG_SPACE(2)
                    // gives after the header.
                    unsafe {
                        let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = len as _;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(c).cast::<u16>(),
                            datagrams[run.start].len() as u16,
                        );
                    }
                }
                h
            })
            .collect();
        let mut at = 0;
        while at < hdrs.len() {
            // SAFETY: every header points at `to`, at iovecs of datagrams of
            // `datagrams` and at a control buffer of `cmsgs`, all of which outlive the
            // call; the count is that of the headers from `at` on.
            let rc = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    hdrs[at..].as_mut_ptr(),
                    (hdrs.len() - at) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let run = batch[at].clone();
                if run.len() > 1 && gso_refused(&e) {
                    warn!(
                        "export to {addr}: the kernel refused UDP segmentation offload ({e}); \
                         sending datagram by datagram from now on"
                    );
                    *gso = false;
                    return sent + send_all(socket, addr, &datagrams[run.start..], gso, failed);
                }
                // The message at `at` failed: count its datagrams and go on.
                for _ in run {
                    failed(&e);
                }
                at += 1;
            } else {
                let rc = rc as usize;
                sent += batch[at..at + rc]
                    .iter()
                    .map(|r| r.len() as u64)
                    .sum::<u64>();
                at += rc;
            }
        }
    }
    sent
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
        let datagrams = self.encode(records, now);
        self.records += records.len() as u64;
        for c in &mut self.collectors {
            let (addr, failures) = (c.addr, &mut c.failures);
            c.sent += send_all(&c.socket, addr, &datagrams, &mut c.gso, &mut |e| {
                *failures += 1;
                if failures.is_power_of_two() {
                    warn!("export to {addr} failed ({e}); {failures} datagrams lost so far");
                }
            });
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
        let domains: Vec<_> = self
            .relays
            .iter()
            .enumerate()
            .filter(|(_, r)| r.encoder.next_sequence() > 0)
            .map(|(i, r)| {
                format!(
                    "source id {} 1:{}",
                    self.cfg.source_id.wrapping_add(i as u32 + 1),
                    r.interval
                )
            })
            .collect();
        format!(
            "netflow v9: {} records, sequence {}; relayed: [{}], {} rescaled; {}",
            self.records,
            self.encoder.next_sequence(),
            domains.join(", "),
            self.rescaled,
            per.join("; ")
        )
    }
}

#[cfg(test)]
mod tests;
