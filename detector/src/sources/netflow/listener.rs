//! The UDP sockets NetFlow/IPFIX arrives on (`--netflow-listen`): for each address, one
//! socket per decoder thread, bound with SO_REUSEPORT so the kernel spreads exporters
//! over them (an exporter's datagrams, keyed by its address and port, always reach the
//! same socket, so its templates stay with one decoder). Each thread reads datagrams,
//! decodes them with its own [`Decoder`] and hands the records to the pipeline. Every
//! socket has a large receive buffer and reports the kernel's drop counter
//! (SO_RXQ_OVFL) with each datagram.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::decode::Decoder;
use crate::pipeline::Input;

/// Default receive buffer requested for each listener socket (`--netflow-rcvbuf`).
pub const DEFAULT_RCVBUF: usize = 8 << 20;
/// Datagrams decoded before their records are handed over (fewer when the socket runs
/// dry first).
const BATCH: usize = 64;
/// How often a blocked reader wakes to see whether it should stop.
const WAKE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr}: {source} (is another collector bound to it? choose another --netflow-listen port)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket option on {addr}: {source}")]
    Option { addr: SocketAddr, source: io::Error },
    #[error("starting a decoder thread for {addr}: {source}")]
    Thread { addr: SocketAddr, source: io::Error },
}

/// One bound socket of a listener.
struct Bound {
    sock: UdpSocket,
    /// Receive buffer the kernel granted.
    rcvbuf: usize,
}

fn bind_one(addr: SocketAddr, rcvbuf: usize) -> Result<Bound, ListenError> {
    let opt = |source| ListenError::Option { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(opt)?;
    if addr.is_ipv6() {
        // Listen on IPv4-mapped addresses too when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    sock.set_reuse_port(true).map_err(opt)?;
    // Above net.core.rmem_max only with CAP_NET_ADMIN; fall back to the capped size.
    if setsockopt(&sock, sockopt::RcvBufForce, &rcvbuf).is_err() {
        sock.set_recv_buffer_size(rcvbuf).map_err(opt)?;
    }
    setsockopt(&sock, sockopt::RxqOvfl, &1).map_err(|e| opt(e.into()))?;
    sock.set_read_timeout(Some(WAKE)).map_err(opt)?;
    sock.bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    let granted = sock.recv_buffer_size().map_err(opt)?;
    Ok(Bound {
        sock: sock.into(),
        rcvbuf: granted,
    })
}

/// A running listener: its decoder threads, their decoders (for the statistics) and
/// each socket's kernel drop count.
pub struct Listener {
    pub addr: SocketAddr,
    /// Receive buffer the kernel granted each socket.
    pub rcvbuf: usize,
    pub decoders: Vec<Arc<Mutex<Decoder>>>,
    drops: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Listener {
    /// Binds `threads` sockets on `addr` (port 0: one port the kernel picks, shared by
    /// all) and starts a decoder thread on each, with a decoder made by `decoder`.
    pub fn start(
        addr: SocketAddr,
        rcvbuf: usize,
        threads: usize,
        decoder: impl Fn() -> Decoder,
        input: &Input,
        stop: &Arc<AtomicBool>,
    ) -> Result<Self, ListenError> {
        let first = bind_one(addr, rcvbuf)?;
        let local = first
            .sock
            .local_addr()
            .map_err(|source| ListenError::Option { addr, source })?;
        let rcvbuf = first.rcvbuf;
        let mut socks = vec![first];
        for _ in 1..threads.max(1) {
            socks.push(bind_one(local, rcvbuf)?);
        }
        let mut l = Self {
            addr: local,
            rcvbuf,
            decoders: Vec::new(),
            drops: Vec::new(),
            threads: Vec::new(),
        };
        for (i, b) in socks.into_iter().enumerate() {
            let dec = Arc::new(Mutex::new(decoder()));
            let drops = Arc::new(AtomicU64::new(0));
            let (d2, drops2, input, stop) =
                (dec.clone(), drops.clone(), input.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("netflow-{}-{i}", local.port()))
                .spawn(move || read_loop(b.sock, d2, drops2, input, stop))
                .map_err(|source| ListenError::Thread { addr, source })?;
            l.decoders.push(dec);
            l.drops.push(drops);
            l.threads.push(t);
        }
        Ok(l)
    }

    /// The kernel's count of datagrams dropped (receive buffer full), over the sockets.
    pub fn kernel_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// Waits for the decoder threads (after the stop flag was set): every datagram
    /// already received is decoded and handed over.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads, decodes and hands over until `stop` is set and the socket is empty.
fn read_loop(
    sock: UdpSocket,
    decoder: Arc<Mutex<Decoder>>,
    drops: Arc<AtomicU64>,
    input: Input,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65536];
    let mut records = Vec::new();
    loop {
        // The first read blocks (up to WAKE); the rest of the batch takes what is there.
        let mut n = 0;
        let mut flags = MsgFlags::empty();
        let received = SystemTime::now();
        let mut dec = None;
        while n < BATCH {
            match read_one(&sock, &mut buf, flags) {
                Ok((from, len, d)) => {
                    if let Some(d) = d {
                        drops.store(d, Ordering::Relaxed);
                    }
                    let dec = dec
                        .get_or_insert_with(|| decoder.lock().unwrap_or_else(|p| p.into_inner()));
                    dec.decode(from, &buf[..len], received, &mut records);
                    n += 1;
                    flags = MsgFlags::MSG_DONTWAIT;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    break;
                }
                Err(e) => {
                    log::warn!("listener: receive failed: {e}");
                    break;
                }
            }
        }
        drop(dec);
        if !records.is_empty() {
            input.emit(std::mem::take(&mut records), received);
        }
        if n == 0 && stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// One datagram: its source, its length, and the socket's drop counter if the kernel
/// attached it.
fn read_one(
    sock: &UdpSocket,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<(SocketAddr, usize, Option<u64>)> {
    let fd = sock.as_fd().as_raw_fd();
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u32);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), flags)
        .map_err(io::Error::from)?;
    let mut drops = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::RxqOvfl(n) = c {
            drops = Some(n as u64);
        }
    }
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
                })
        })
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok((from, msg.bytes, drops))
}
