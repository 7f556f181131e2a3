//! Rewrites a capture's ports as a BitTorrent swarm that hides would choose them: every
//! external endpoint's port becomes 443, 80 or a random high port (never one of the P2P
//! families' well-known ports), a third each in turn, every internal endpoint's port a
//! random high port. The
//! mapping is per endpoint and consistent, so connections stay connections; nothing
//! else changes (checksums are left as they were: the meter does not read them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

/// Ports a remapped endpoint never gets: BitTorrent's, Gnutella's, eDonkey's.
fn well_known_p2p(port: u16) -> bool {
    matches!(
        port,
        6881..=6889 | 6969 | 6771 | 51413 | 6346 | 6347 | 4661 | 4662 | 4665 | 4672
    )
}

/// A deterministic 64-bit mix (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What [`remap_ports`] did.
#[derive(Debug, Default)]
pub struct Remapped {
    pub frames: usize,
    /// Frames whose TCP or UDP ports were rewritten.
    pub rewritten: usize,
    /// External endpoints by the port they got: 443, 80, other.
    pub to_443: usize,
    pub to_80: usize,
    pub to_random: usize,
}

struct Mapper<F> {
    seed: u64,
    internal: F,
    map: HashMap<(IpAddr, u16), u16>,
    done: Remapped,
}

impl<F: Fn(IpAddr) -> bool> Mapper<F> {
    fn port(&mut self, addr: IpAddr, port: u16) -> u16 {
        if let Some(p) = self.map.get(&(addr, port)) {
            return *p;
        }
        let h = mix(self.seed
            ^ mix(u64::from(port))
            ^ mix(match addr {
                IpAddr::V4(a) => u64::from(u32::from(a)),
                IpAddr::V6(a) => (u128::from(a) as u64) ^ ((u128::from(a) >> 64) as u64),
            }));
        let random = |h: u64| {
            let mut p = 10_000 + (h % 55_000) as u16;
            while well_known_p2p(p) {
                p += 11;
            }
            p
        };
        let new = if (self.internal)(addr) {
            random(h >> 8)
        } else {
            // In turn (from a place the seed picks), so that a third of the external
            // endpoints gets each: a hash's split of a few dozen endpoints strays by
            // several from a third, and with it how many distinct ports are left.
            let external = (self.done.to_443 + self.done.to_80 + self.done.to_random) as u64;
            match (self.seed + external) % 3 {
                0 => {
                    self.done.to_443 += 1;
                    443
                }
                1 => {
                    self.done.to_80 += 1;
                    80
                }
                _ => {
                    self.done.to_random += 1;
                    random(h >> 8)
                }
            }
        };
        self.map.insert((addr, port), new);
        new
    }

    /// Rewrites the TCP/UDP ports of one Ethernet frame in place.
    fn frame(&mut self, f: &mut [u8]) -> bool {
        let mut off = 14;
        let Some(mut ethertype) = f.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return false;
        };
        while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
            let Some(b) = f.get(off + 2..off + 4) else {
                return false;
            };
            ethertype = u16::from_be_bytes([b[0], b[1]]);
            off += 4;
        }
        let (src, dst, proto, l4) = match ethertype {
            0x0800 => {
                let Some(h) = f.get(off..off + 20) else {
                    return false;
                };
                let ihl = usize::from(h[0] & 0x0f) * 4;
                // Later fragments carry no ports.
                if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                    return false;
                }
                let a = |i: usize| IpAddr::from([h[i], h[i + 1], h[i + 2], h[i + 3]]);
                (a(12), a(16), h[9], off + ihl)
            }
            0x86dd => {
                let Some(h) = f.get(off..off + 40) else {
                    return false;
                };
                let a = |i: usize| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&h[i..i + 16]);
                    IpAddr::from(b)
                };
                (a(8), a(24), h[6], off + 40)
            }
            _ => return false,
        };
        if proto != 6 && proto != 17 {
            return false;
        }
        let Some(p) = f.get(l4..l4 + 4) else {
            return false;
        };
        let (sport, dport) = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
        let (ns, nd) = (self.port(src, sport), self.port(dst, dport));
        f[l4..l4 + 2].copy_from_slice(&ns.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&nd.to_be_bytes());
        true
    }
}

/// Copies the Ethernet pcap `input` to `output` with every TCP and UDP port remapped
/// (see the module's comment); `internal` tells the network's own addresses.
pub fn remap_ports(
    input: &Path,
    output: &Path,
    internal: impl Fn(IpAddr) -> bool,
    seed: u64,
) -> Result<Remapped> {
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut reader = PcapReader::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a pcap file", input.display()))?;
    let header = reader.header();
    if header.datalink != DataLink::ETHERNET {
        bail!(
            "{}: link type {:?}, not Ethernet",
            input.display(),
            header.datalink
        );
    }
    let out =
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut writer = PcapWriter::with_header(std::io::BufWriter::new(out), header)?;
    let mut m = Mapper {
        seed,
        internal,
        map: HashMap::new(),
        done: Remapped::default(),
    };
    while let Some(packet) = reader.next_packet() {
        let packet = packet.with_context(|| format!("reading {}", input.display()))?;
        let mut data = packet.data.into_owned();
        m.done.frames += 1;
        if m.frame(&mut data) {
            m.done.rewritten += 1;
        }
        writer.write_packet(&PcapPacket::new(packet.timestamp, packet.orig_len, &data))?;
    }
    Ok(m.done)
}
