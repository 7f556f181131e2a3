//! The UDP socket NetFlow/IPFIX arrives on (`--netflow-listen`): a large receive buffer,
//! the kernel's drop counter (SO_RXQ_OVFL) read with every datagram, and batches of
//! datagrams handed to the pipeline.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::SystemTime;

use bytes::Bytes;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Default receive buffer requested for a listener (`--netflow-rcvbuf`).
pub const DEFAULT_RCVBUF: usize = 8 << 20;
/// Datagrams read per wake-up before handing a batch over.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr}: {source} (is another collector bound to it? choose another --netflow-listen port)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket option on {addr}: {source}")]
    Option { addr: SocketAddr, source: io::Error },
}

/// Datagrams read from one listener in one go.
pub struct Batch {
    pub listener: usize,
    pub received: SystemTime,
    pub datagrams: Vec<(SocketAddr, Bytes)>,
    /// The kernel's count of datagrams this socket dropped (buffer full), cumulative.
    pub kernel_drops: u64,
}

pub struct Listener {
    pub addr: SocketAddr,
    /// Receive buffer the kernel granted.
    pub rcvbuf: usize,
    fd: AsyncFd<UdpSocket>,
}

impl Listener {
    pub fn bind(addr: SocketAddr, rcvbuf: usize) -> Result<Self, ListenError> {
        let opt = |source| ListenError::Option { addr, source };
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(opt)?;
        if addr.is_ipv6() {
            // Listen on IPv4-mapped addresses too when bound to [::].
            let _ = sock.set_only_v6(false);
        }
        // Above net.core.rmem_max only with CAP_NET_ADMIN; fall back to the capped size.
        if setsockopt(&sock, sockopt::RcvBufForce, &rcvbuf).is_err() {
            sock.set_recv_buffer_size(rcvbuf).map_err(opt)?;
        }
        setsockopt(&sock, sockopt::RxqOvfl, &1).map_err(|e| opt(e.into()))?;
        sock.set_nonblocking(true).map_err(opt)?;
        sock.bind(&addr.into())
            .map_err(|source| ListenError::Bind { addr, source })?;
        let granted = sock.recv_buffer_size().map_err(opt)?;
        let std_sock: UdpSocket = sock.into();
        let local = std_sock.local_addr().map_err(opt)?;
        // SAFETY: the socket owns its descriptor for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(std_sock) }
            .map_err(|e| opt(io::Error::other(e.to_string())))?;
        Ok(Self {
            addr: local,
            rcvbuf: granted,
            fd,
        })
    }

    /// Reads batches until the channel closes.
    pub async fn run(self, index: usize, tx: mpsc::Sender<Batch>) {
        let mut buf = vec![0u8; 65536];
        let mut drops = 0u64;
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    log::error!("listener {}: {e}", self.addr);
                    return;
                }
            };
            let mut datagrams = Vec::new();
            while datagrams.len() < BATCH {
                match read_one(self.fd.get_ref(), &mut buf) {
                    Ok((from, n, d)) => {
                        if let Some(d) = d {
                            drops = d;
                        }
                        datagrams.push((from, Bytes::copy_from_slice(&buf[..n])));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => {
                        log::warn!("listener {}: receive failed: {e}", self.addr);
                        break;
                    }
                }
            }
            if datagrams.is_empty() {
                continue;
            }
            let batch = Batch {
                listener: index,
                received: SystemTime::now(),
                datagrams,
                kernel_drops: drops,
            };
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }
}

/// One datagram: its source, its length, and the socket's drop counter if the kernel
/// attached it.
fn read_one(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(SocketAddr, usize, Option<u64>)> {
    let fd = sock.as_fd().as_raw_fd();
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u32);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
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
