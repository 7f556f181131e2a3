//! Capture files (pcap and pcapng) as a stream of Ethernet frames with timestamps, for
//! `replay`. Link types other than Ethernet (Linux cooked v1 and v2, raw IP, BSD
//! loopback) get a synthetic Ethernet header carrying the right EtherType, so the same
//! XDP program parses them.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{
    Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption,
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open capture {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is not a pcap or pcapng file (magic {magic:02x?})")]
    NotACapture { path: String, magic: [u8; 4] },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: pcap_file::PcapError,
    },
}

/// One frame, as Ethernet, with its capture timestamp (since the Unix epoch).
#[derive(Clone, Debug)]
pub struct Frame {
    pub ts: Duration,
    pub data: Vec<u8>,
}

/// Frames skipped because their link type is not supported, by link type.
#[derive(Clone, Debug, Default)]
pub struct CaptureStats {
    pub frames: u64,
    pub unsupported_link: u64,
}

enum Inner {
    Pcap(PcapReader<BufReader<File>>),
    PcapNg(Box<PcapNgReader<BufReader<File>>>),
}

/// A capture opened for reading.
pub struct Capture {
    path: String,
    inner: Inner,
    pub stats: CaptureStats,
    /// Size of the file, for progress.
    pub file_len: u64,
}

impl Capture {
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let name = path.display().to_string();
        let open_err = |source| CaptureError::Open {
            path: name.clone(),
            source,
        };
        let mut f = File::open(path).map_err(open_err)?;
        let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic).map_err(open_err)?;
        let f = File::open(path).map_err(open_err)?;
        let reader = BufReader::with_capacity(1 << 20, f);
        let read_err = |source| CaptureError::Read {
            path: name.clone(),
            source,
        };
        let inner = match magic {
            [0xa1, 0xb2, 0xc3, 0xd4]
            | [0xd4, 0xc3, 0xb2, 0xa1]
            | [0xa1, 0xb2, 0x3c, 0x4d]
            | [0x4d, 0x3c, 0xb2, 0xa1] => Inner::Pcap(PcapReader::new(reader).map_err(read_err)?),
            [0x0a, 0x0d, 0x0d, 0x0a] => {
                Inner::PcapNg(Box::new(PcapNgReader::new(reader).map_err(read_err)?))
            }
            _ => return Err(CaptureError::NotACapture { path: name, magic }),
        };
        Ok(Self {
            path: name,
            inner,
            stats: CaptureStats::default(),
            file_len,
        })
    }

    /// The next frame, converted to Ethernet; `None` at the end of the file.
    pub fn next_frame(&mut self) -> Option<Result<Frame, CaptureError>> {
        loop {
            let (ts, link, data) = match &mut self.inner {
                Inner::Pcap(r) => {
                    let link = r.header().datalink;
                    match r.next_packet()? {
                        Ok(p) => (p.timestamp, link, p.data.into_owned()),
                        Err(e) => return Some(Err(self.read_error(e))),
                    }
                }
                Inner::PcapNg(r) => {
                    let (iface_id, ticks, data) = match r.next_block()? {
                        Ok(Block::EnhancedPacket(epb)) => (
                            epb.interface_id as usize,
                            // pcap-file reads the raw count as nanoseconds; it is scaled
                            // below by the interface's resolution (default microseconds).
                            Some(epb.timestamp.as_nanos()),
                            epb.data.into_owned(),
                        ),
                        Ok(Block::SimplePacket(spb)) => (0, None, spb.data.into_owned()),
                        Ok(_) => continue,
                        Err(e) => {
                            let path = self.path.clone();
                            return Some(Err(CaptureError::Read { path, source: e }));
                        }
                    };
                    let Some(iface) = r.interfaces().get(iface_id) else {
                        continue;
                    };
                    let ts = ticks
                        .map(|t| scale_ticks(t, tsresol(&iface.options)))
                        .unwrap_or_default();
                    (ts, iface.linktype, data)
                }
            };
            self.stats.frames += 1;
            match to_ethernet(link, data) {
                Some(data) => return Some(Ok(Frame { ts, data })),
                None => self.stats.unsupported_link += 1,
            }
        }
    }

    fn read_error(&self, source: pcap_file::PcapError) -> CaptureError {
        CaptureError::Read {
            path: self.path.clone(),
            source,
        }
    }
}

fn tsresol(options: &[InterfaceDescriptionOption]) -> u8 {
    options
        .iter()
        .find_map(|o| match o {
            InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
            _ => None,
        })
        .unwrap_or(6)
}

/// Converts a pcapng timestamp count to a duration given `if_tsresol` (RFC: the high bit
/// set means a power of two, else a power of ten).
fn scale_ticks(ticks: u128, resol: u8) -> Duration {
    if resol & 0x80 != 0 {
        let exp = (resol & 0x7f) as u32;
        let secs = ticks >> exp.min(127);
        let frac = ticks - (secs << exp.min(127));
        let nanos = (frac * 1_000_000_000) >> exp.min(127);
        Duration::new(secs.min(u64::MAX as u128) as u64, nanos as u32)
    } else {
        let per_sec = 10u128.pow(resol.min(19) as u32);
        let secs = ticks / per_sec;
        let rem = ticks % per_sec;
        let nanos = rem * 1_000_000_000 / per_sec;
        Duration::new(secs.min(u64::MAX as u128) as u64, nanos as u32)
    }
}

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];

fn with_ethertype(ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&[0u8; 12]);
    f.extend_from_slice(&ethertype);
    f.extend_from_slice(payload);
    f
}

fn by_ip_version(payload: &[u8]) -> Option<Vec<u8>> {
    match payload.first()? >> 4 {
        4 => Some(with_ethertype(ETH_P_IP, payload)),
        6 => Some(with_ethertype(ETH_P_IPV6, payload)),
        _ => None,
    }
}

/// The frame as Ethernet, or `None` for a link type this tool does not read.
pub fn to_ethernet(link: DataLink, data: Vec<u8>) -> Option<Vec<u8>> {
    match link {
        DataLink::ETHERNET => Some(data),
        // Linux cooked v1: 16-byte header, protocol in the last two bytes.
        DataLink::LINUX_SLL if data.len() >= 16 => {
            Some(with_ethertype([data[14], data[15]], &data[16..]))
        }
        // Linux cooked v2: 20-byte header, protocol first.
        DataLink::LINUX_SLL2 if data.len() >= 20 => {
            Some(with_ethertype([data[0], data[1]], &data[20..]))
        }
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => by_ip_version(&data),
        // BSD loopback: 4-byte address family in host order, then IP.
        DataLink::NULL | DataLink::LOOP if data.len() >= 4 => by_ip_version(&data[4..]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcapng_resolutions() {
        assert_eq!(scale_ticks(1_500_000, 6), Duration::from_millis(1500));
        assert_eq!(scale_ticks(1_500_000_000, 9), Duration::from_millis(1500));
        assert_eq!(scale_ticks(3 << 10, 0x80 | 10), Duration::from_secs(3));
    }

    #[test]
    fn cooked_and_raw_captures_become_ethernet() {
        let ip = vec![0x45, 0, 0, 20];
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        let e = to_ethernet(DataLink::LINUX_SLL, sll).unwrap();
        assert_eq!(&e[12..14], &[0x08, 0x00]);
        assert_eq!(&e[14..], &ip[..]);
        let e = to_ethernet(DataLink::RAW, vec![0x60, 0, 0, 0]).unwrap();
        assert_eq!(&e[12..14], &[0x86, 0xdd]);
        assert!(to_ethernet(DataLink::LINUX_SLL, vec![0; 3]).is_none());
    }
}
