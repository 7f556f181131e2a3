//! The UDP socket NetFlow/IPFIX arrives on (`--netflow-listen`), one per address, read
//! with `recvmmsg` (up to 32 datagrams a call) into a large receive buffer whose kernel
//! drop counter (SO_RXQ_OVFL) comes with the datagrams. With `--workers 1` one thread
//! reads, decodes and hands records to the pipeline. With more, the parsing (most of the
//! cost of a record) runs on that many threads, even for a single exporter: see
//! [`Listener::start`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

use super::decode::{Admission, Cidr, DecodeLimits, Decoder, FastParser, Message, template_sets};
use crate::flow::Emit;

/// Default receive buffer requested for each listener socket (`--netflow-rcvbuf`).
pub const DEFAULT_RCVBUF: usize = 32 << 20;
/// Datagrams read with one system call, decoded before their records are handed over
/// (fewer when the socket runs dry first).
pub const BATCH: usize = 32;
/// How often a blocked reader wakes to see whether it should stop.
const WAKE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source} ({})", bind_hint(.source))]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket option on {addr}: {source}")]
    Option { addr: SocketAddr, source: io::Error },
    #[error("starting a decoder thread for {addr}: {source}")]
    Thread { addr: SocketAddr, source: io::Error },
}

/// What to do about a failed bind, by its cause.
fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            "another collector is bound to it: stop it, or choose another --netflow-listen port"
        }
        io::ErrorKind::AddrNotAvailable => {
            "the address is not one of this host's: listen on one of them, or on 0.0.0.0 or [::]"
        }
        io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE: run as root or choose a port above 1023"
        }
        _ => "check the --netflow-listen address",
    }
}

/// One bound socket of a listener (the sFlow listener binds its sockets the same way).
pub(crate) struct Bound {
    pub(crate) sock: UdpSocket,
    /// Receive buffer the kernel granted.
    pub(crate) rcvbuf: usize,
}

pub(crate) fn bind_one(addr: SocketAddr, rcvbuf: usize) -> Result<Bound, ListenError> {
    let opt = |source| ListenError::Option { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(opt)?;
    if addr.is_ipv6() {
        // Listen on IPv4-mapped addresses too when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    // Above net.core.rmem_max only with CAP_NET_ADMIN; fall back to the capped size.
    if setsockopt(&sock, sockopt::RcvBufForce, &rcvbuf).is_err() {
        sock.set_recv_buffer_size(rcvbuf).map_err(opt)?;
    }
    setsockopt(&sock, sockopt::RxqOvfl, &1).map_err(|e| opt(e.into()))?;
    sock.set_read_timeout(Some(WAKE)).map_err(opt)?;
    sock.bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    // Linux reports twice the size it was set to (the rest is its bookkeeping).
    let granted = sock.recv_buffer_size().map_err(opt)? / 2;
    Ok(Bound {
        sock: sock.into(),
        rcvbuf: granted,
    })
}

/// A running listener: its threads, its decoder (for the statistics) and its socket's
/// kernel drop count.
pub struct Listener {
    pub addr: SocketAddr,
    /// Receive buffer the kernel granted the socket (what it was set to: the kernel
    /// reports twice that).
    pub rcvbuf: usize,
    pub decoders: Vec<Arc<Mutex<Decoder>>>,
    /// Threads that parse datagrams (1: the reading thread does all the work).
    pub parsers: usize,
    drops: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` (port 0: a port the kernel picks) and starts its threads. With one
    /// parser, one thread reads, decodes and hands records over. With more, one thread
    /// reads and deals the datagrams out in turn to `parsers` threads, which parse them
    /// into flow records (each thread with its own templates: a datagram that carries
    /// templates is parsed whole by the thread it goes to, and the others get a copy of
    /// its template sets before anything that came after it); one thread takes the
    /// parsed datagrams back in the order they arrived and applies what needs that order
    /// (counters, sequence numbers, the sampling and time base that options data set):
    /// the result is what one thread gives, at the parse rate of several.
    pub fn start<E: Emit>(
        addr: SocketAddr,
        rcvbuf: usize,
        parsers: usize,
        limits: &DecodeLimits,
        allow: &[Cidr],
        input: &E,
        stop: &Arc<AtomicBool>,
    ) -> Result<Self, ListenError> {
        let bound = bind_one(addr, rcvbuf)?;
        let local = bound
            .sock
            .local_addr()
            .map_err(|source| ListenError::Option { addr, source })?;
        let parsers = parsers.max(1);
        let mut l = Self {
            addr: local,
            rcvbuf: bound.rcvbuf,
            decoders: Vec::new(),
            parsers,
            drops: Vec::new(),
            threads: Vec::new(),
        };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    crate::privileges::drop_thread_capabilities();
                    f()
                })
                .map_err(|source| ListenError::Thread { addr, source })
        };
        let port = local.port();
        let dec = Arc::new(Mutex::new(Decoder::new(limits.clone(), allow.to_vec())));
        let drops = Arc::new(AtomicU64::new(0));
        l.decoders.push(dec.clone());
        l.drops.push(drops.clone());
        let (input, stop) = (input.clone(), stop.clone());
        if parsers == 1 {
            l.threads.push(spawn(
                format!("netflow-{port}"),
                Box::new(move || read_loop(bound.sock, dec, drops, input, stop)),
            )?);
            return Ok(l);
        }
        let (mut to_parsers, mut from_parsers, mut shared) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..parsers {
            let (tx, rx) = sync_channel::<Chunk>(CHANNEL_CHUNKS);
            let (ptx, prx) = sync_channel::<Parsed>(CHANNEL_CHUNKS);
            let parser = Arc::new(Mutex::new(FastParser::new(limits, true)));
            shared.push(parser.clone());
            to_parsers.push(tx);
            from_parsers.push(prx);
            l.threads.push(spawn(
                format!("nfparse-{port}-{i}"),
                Box::new(move || parse_loop(parser, rx, ptx)),
            )?);
        }
        dec.lock()
            .unwrap_or_else(|p| p.into_inner())
            .share_parsers(shared);
        l.threads.push(spawn(
            format!("nfconv-{port}"),
            Box::new(move || convert_loop(dec, from_parsers, input)),
        )?);
        let admission = Admission::new(limits, allow.to_vec());
        l.threads.push(spawn(
            format!("netflow-{port}"),
            Box::new(move || deal_loop(bound.sock, drops, admission, to_parsers, stop)),
        )?);
        Ok(l)
    }

    /// The kernel's count of datagrams dropped (receive buffer full), over the sockets.
    pub fn kernel_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// Waits for the listener's threads (after the stop flag was set): every datagram
    /// already received is decoded and handed over.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Chunks queued to (and from) each parser thread.
const CHANNEL_CHUNKS: usize = 16;

/// What a parser thread does with a datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Job {
    /// Parse it: it is this thread's to decode.
    Parse,
    /// Learn its templates: a [`template_sets`] copy of a datagram another thread got.
    Learn,
    /// Nothing: its source is not admitted (the converter counts it).
    Skip,
}

struct Item {
    from: SocketAddr,
    /// The datagram's length as received.
    len: usize,
    data: Vec<u8>,
    job: Job,
}

/// Datagrams of one read, for one parser thread.
struct Chunk {
    received: SystemTime,
    items: Vec<Item>,
}

/// A chunk parsed, in the chunk's order: what each datagram says, ready to apply.
struct Parsed {
    received: SystemTime,
    items: Vec<(SocketAddr, usize, Job, Option<Message>)>,
}

/// Reads datagrams and deals each read's datagrams to the next parser thread in turn,
/// with the template sets the other threads got since its last turn put first.
fn deal_loop(
    sock: UdpSocket,
    drops: Arc<AtomicU64>,
    mut admission: Admission,
    parsers: Vec<SyncSender<Chunk>>,
    stop: Arc<AtomicBool>,
) {
    let mut batch = RecvBatch::new(BATCH);
    let mut learn: Vec<Vec<Item>> = parsers.iter().map(|_| Vec::new()).collect();
    let mut next = 0;
    loop {
        let n = recv_or_zero(&mut batch, &sock);
        if n == 0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        let received = SystemTime::now();
        let mut items = std::mem::take(&mut learn[next]);
        for i in 0..n {
            let (from, data, d) = batch.get(i);
            if let Some(d) = d {
                drops.store(d, Ordering::Relaxed);
            }
            let Some(from) = from else { continue };
            let len = data.len();
            if !admission.admit(from.ip()) {
                items.push(Item {
                    from,
                    len,
                    data: Vec::new(),
                    job: Job::Skip,
                });
                continue;
            }
            if let Some(t) = template_sets(data) {
                for (m, l) in learn.iter_mut().enumerate() {
                    if m != next {
                        l.push(Item {
                            from,
                            len: t.len(),
                            data: t.clone(),
                            job: Job::Learn,
                        });
                    }
                }
            }
            items.push(Item {
                from,
                len,
                data: data.to_vec(),
                job: Job::Parse,
            });
        }
        if parsers[next].send(Chunk { received, items }).is_err() {
            return;
        }
        next = (next + 1) % parsers.len();
    }
}

/// Parses the chunks dealt to this thread with its own parser (its compiled templates
/// learn from the template copies as its parser does).
fn parse_loop(parser: Arc<Mutex<FastParser>>, chunks: Receiver<Chunk>, out: SyncSender<Parsed>) {
    while let Ok(chunk) = chunks.recv() {
        let mut p = parser.lock().unwrap_or_else(|e| e.into_inner());
        let items = chunk
            .items
            .into_iter()
            .map(|it| {
                let message =
                    (it.job != Job::Skip).then(|| p.parse(it.from, &it.data, chunk.received));
                (it.from, it.len, it.job, message)
            })
            .collect();
        drop(p);
        let parsed = Parsed {
            received: chunk.received,
            items,
        };
        if out.send(parsed).is_err() {
            return;
        }
    }
}

/// Takes the parsed chunks back in the order they were dealt and turns them into
/// records, until the parser threads are done.
fn convert_loop<E: Emit>(decoder: Arc<Mutex<Decoder>>, parsers: Vec<Receiver<Parsed>>, input: E) {
    let mut records = Vec::new();
    for turn in (0..parsers.len()).cycle() {
        // The parser whose turn it is has ended only when nothing more was dealt.
        let Ok(chunk) = parsers[turn].recv() else {
            return;
        };
        let mut dec = decoder.lock().unwrap_or_else(|p| p.into_inner());
        for (from, len, job, result) in chunk.items {
            match (job, result) {
                (Job::Learn, Some(m)) => dec.apply(from, m, chunk.received, true, &mut records),
                (Job::Parse, Some(m)) => {
                    if dec.admit(from, len) {
                        dec.apply(from, m, chunk.received, false, &mut records);
                    }
                }
                // Not admitted: admit counts why.
                _ => {
                    dec.admit(from, len);
                }
            }
        }
        drop(dec);
        if !records.is_empty() {
            input.emit(hand_over(&mut records), chunk.received);
        }
    }
}

/// The records gathered for a hand-over, leaving in their place an empty vector of the
/// same capacity: the next read's records then go in without growing it step by step
/// (each step a copy of every record so far: a tenth of the decoder's instructions when
/// the vector started empty for every read).
pub fn hand_over<T>(records: &mut Vec<T>) -> Vec<T> {
    let cap = records.capacity();
    std::mem::replace(records, Vec::with_capacity(cap))
}

/// One `recvmmsg`; 0 when the wait ended without a datagram (or on an error, logged).
pub(crate) fn recv_or_zero(batch: &mut RecvBatch, sock: &UdpSocket) -> usize {
    match batch.recv(sock.as_fd().as_raw_fd()) {
        Ok(n) => n,
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                || e.kind() == io::ErrorKind::TimedOut
                || e.kind() == io::ErrorKind::Interrupted =>
        {
            0
        }
        Err(e) => {
            log::warn!("listener: receive failed: {e}");
            std::thread::sleep(Duration::from_millis(10));
            0
        }
    }
}

/// Reads, decodes and hands over until `stop` is set and the socket is empty.
fn read_loop<E: Emit>(
    sock: UdpSocket,
    decoder: Arc<Mutex<Decoder>>,
    drops: Arc<AtomicU64>,
    input: E,
    stop: Arc<AtomicBool>,
) {
    let mut batch = RecvBatch::new(BATCH);
    let mut records = Vec::new();
    loop {
        // One system call waits (up to WAKE) for the first datagram and takes whatever
        // else is queued, up to BATCH.
        let n = recv_or_zero(&mut batch, &sock);
        if n > 0 {
            let received = SystemTime::now();
            let mut dec = decoder.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..n {
                let (from, data, d) = batch.get(i);
                if let Some(d) = d {
                    drops.store(d, Ordering::Relaxed);
                }
                if let Some(from) = from {
                    dec.decode(from, data, received, &mut records);
                }
            }
            drop(dec);
            if !records.is_empty() {
                input.emit(hand_over(&mut records), received);
            }
        } else if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// Largest UDP payload: a datagram is never truncated.
const DATAGRAM_MAX: usize = 65536;
/// Room for the SO_RXQ_OVFL control message (a u32), in 8-byte words for alignment.
const CONTROL_WORDS: usize = 4;

/// Buffers for `recvmmsg`: one datagram buffer, source address and control buffer a
/// message, the headers pointing into them rebuilt before each call.
pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    control: Vec<u64>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    pub(crate) fn new(n: usize) -> Self {
        // SAFETY: these C structs are plain integers and pointers; all-zero is valid.
        let (addr, iov, hdr) = unsafe {
            (
                std::mem::zeroed::<libc::sockaddr_storage>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::mmsghdr>(),
            )
        };
        Self {
            bufs: vec![0; n * DATAGRAM_MAX],
            addrs: vec![addr; n],
            control: vec![0; n * CONTROL_WORDS],
            iovs: vec![iov; n],
            hdrs: vec![hdr; n],
        }
    }

    /// Waits for at least one datagram and returns how many were received.
    fn recv(&mut self, fd: i32) -> io::Result<usize> {
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * DATAGRAM_MAX..].as_mut_ptr().cast(),
                iov_len: DATAGRAM_MAX,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.control[i * CONTROL_WORDS..].as_mut_ptr().cast();
            h.msg_controllen = CONTROL_WORDS * 8;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into this batch's own buffers, of the lengths
        // given, which live (and do not move) for the call.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Message `i` of the last [`Self::recv`]: its source, its bytes, and the socket's
    /// drop counter when the kernel attached it.
    pub(crate) fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8], Option<u64>) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(DATAGRAM_MAX);
        let data = &self.bufs[i * DATAGRAM_MAX..i * DATAGRAM_MAX + len];
        let from = sockaddr(&self.addrs[i]);
        let mut drops = None;
        // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed
        // control messages; the CMSG_* macros walk them within those bounds.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>());
                    drops = Some(u64::from(v));
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        (from, data, drops)
    }
}

/// The address a datagram came from (IPv4 senders of a dual-stack socket keep their
/// mapped IPv6 form, as the socket gives them).
fn sockaddr(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(a.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
