//! Builds Ethernet frames byte by byte, for tables of BPF_PROG_TEST_RUN cases. Checksums
//! are left at zero: the meter does not read them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

/// Ethernet header with optional VLAN tags `(tpid, vid)`, outer first.
pub fn ethernet(tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for &(tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// TCP header (20 bytes) with `flags`.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&1024u16.to_be_bytes());
    h
}

/// UDP header for `payload_len` bytes of payload.
pub fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    h
}

/// ICMP / ICMPv6 header.
pub fn icmp(ty: u8, code: u8) -> Vec<u8> {
    vec![ty, code, 0, 0, 0, 1, 0, 1]
}

/// IPv4 header with `options` (a multiple of 4 bytes) around `payload` (L4 and data).
/// `frag` is the raw flags+offset field.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    tos: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | ihl as u8;
    h[1] = tos;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(options);
    h.extend_from_slice(payload);
    h
}

/// IPv6 extension headers to chain in front of the upper layer.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with this offset (in 8-byte units) and the M flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    pub fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestOpts => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // 16 bytes (hdr ext len 1) to exercise the length arithmetic.
            Ext::HopByHop | Ext::DestOpts => {
                let mut h = vec![next, 1, 1, 12];
                h.resize(16, 0);
                h
            }
            // Type 0 routing header with no addresses left: 8 bytes.
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | more as u16;
                let mut h = vec![next, 0];
                h.extend_from_slice(&field.to_be_bytes());
                h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                h
            }
        }
    }
}

/// IPv6 header, extension headers `exts` in order, then `payload` of protocol `proto`.
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    tclass: u8,
    exts: &[Ext],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(|n| n.number()).unwrap_or(proto);
        chain.extend(e.bytes(next));
    }
    chain.extend_from_slice(payload);
    let first = exts.first().map(|e| e.number()).unwrap_or(proto);
    let mut h = vec![0u8; 40];
    h[0] = 0x60 | (tclass >> 4);
    h[1] = tclass << 4;
    h[4..6].copy_from_slice(&(chain.len() as u16).to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend(chain);
    h
}

/// Concatenates parts into one frame.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// IPv4-mapped 16-byte form, as the flow key stores IPv4.
pub fn mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

/// A small deterministic generator for "random bytes" cases (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Sends raw Ethernet frames out of `dev` (AF_PACKET), from the calling thread's
/// namespace (as root), pausing 1 ms every 64 frames so that a veth's queue keeps up.
pub fn send_frames(dev: &str, frames: &[Vec<u8>]) {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: plain libc calls on a socket this function owns and closes.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert!(ifindex > 0, "no interface {dev}");
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for (i, f) in frames.iter().enumerate() {
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
            if i % 64 == 63 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        libc::close(fd);
    }
}
