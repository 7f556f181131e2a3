//! The UDP socket NetFlow/IPFIX arrives on (`--netflow-listen`), one per address, read
//! with `recvmmsg` (up to 32 datagrams a call) into a large receive buffer whose kernel
//! drop counter (SO_RXQ_OVFL) comes with the datagrams. The reading thread only reads:
//! with `--workers 1` it hands each read's datagrams to one decoding thread through a
//! queue bounded in bytes ([`QUEUE_BYTES`]), so that a decoder slowed down for a moment
//! (the machine busy with evaluations, a table growing) delays records instead of
//! letting the socket overflow. With more workers, the parsing (most of the cost of a
//! record) runs on that many threads, even for a single exporter: see
//! [`Listener::start`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

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
/// Datagram bytes read but not yet decoded, at most (`--workers 1`): beyond it the reader
/// waits, and the socket's buffer (whose overflow the kernel counts) takes the rest.
pub const QUEUE_BYTES: usize = 64 << 20;
/// Reads queued to the decoding thread at most (whatever their size).
const QUEUE_READS: usize = 1 << 16;
/// Emptied reads kept for reuse by the reading thread.
const SPARE_READS: usize = 64;
/// How long a reader waiting for room in the queue sleeps between looks.
const ROOM_POLL: Duration = Duration::from_micros(200);
/// How long a reader that emptied its socket sleeps before it reads again, so that the
/// next read finds a batch waiting rather than a few datagrams, even when the reader
/// keeps up (at 61,000 datagrams a second: at most 2,441 reads a second, where without
/// it some seconds took 10,890; the reader 0.10 -> 0.07 us a record). The socket's
/// buffer holds far more than a millisecond of any exporter's traffic (32 MiB by default:
/// a quarter of a second at 1 Gbit/s), and a flow record waits 1 ms more: nothing else.
pub const PAUSE: Duration = Duration::from_millis(1);

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
    /// How the reading and decoding kept up (see [`ReadStats`]).
    pub read_stats: Arc<ReadStats>,
    drops: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

/// How a listener's reading thread kept up with its socket, and its decoding thread with
/// the reader (`--workers 1`): the longest moments either spent away from its work. A
/// reader away from `recvmmsg` longer than the socket's buffer lasts at the arrival rate
/// loses datagrams (the kernel counts them).
#[derive(Default)]
pub struct ReadStats {
    /// Longest time between two reads (the reader busy, or not scheduled; not counting
    /// its waits for room in the queue), in us.
    pub longest_gap_us: AtomicU64,
    /// Time the reader waited for room in the queue to the decoder, in us.
    pub waited_us: AtomicU64,
    /// Most datagram bytes queued to the decoder at once.
    pub queue_peak: AtomicU64,
    /// Longest time the decoder spent on one read's datagrams (decode and hand-over), in us.
    pub longest_decode_us: AtomicU64,
    /// Datagram bytes queued now.
    queued: AtomicU64,
    /// The decoder's time on reads and its longest read since the reader's last
    /// per-second summary, in us.
    busy_us: AtomicU64,
    busy_longest_us: AtomicU64,
    /// Of that, the time in the hand-over to the pipeline (which waits when the sinks'
    /// queue is full), in us.
    emit_us: AtomicU64,
    /// Longest hand-over of one read's records, in us.
    pub longest_emit_us: AtomicU64,
    /// Queue bound in bytes when not [`QUEUE_BYTES`] (0), for the tests.
    limit: AtomicU64,
}

impl ReadStats {
    fn limit(&self) -> u64 {
        match self.limit.load(Ordering::Relaxed) {
            0 => QUEUE_BYTES as u64,
            n => n,
        }
    }

    /// `reader: longest gap 0.4 ms, queue peak 1.2 MB, waited 0 ms; decoder: longest read 3.1 ms`.
    pub fn describe(&self) -> String {
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
        format!(
            "reader: longest gap {:.1} ms, queue peak {:.1} MB of {} MB, waited for room {:.1} ms; decoder: longest read {:.1} ms (hand-over {:.1} ms)",
            ms(&self.longest_gap_us),
            self.queue_peak.load(Ordering::Relaxed) as f64 / 1e6,
            QUEUE_BYTES >> 20,
            ms(&self.waited_us),
            ms(&self.longest_decode_us),
            ms(&self.longest_emit_us),
        )
    }
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
            read_stats: Arc::default(),
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
        let stats = l.read_stats.clone();
        if parsers == 1 {
            let (tx, rx) = sync_channel::<Read>(QUEUE_READS);
            let (spare_tx, spare_rx) = sync_channel::<Read>(SPARE_READS);
            let s = stats.clone();
            l.threads.push(spawn(
                format!("nfdecode-{port}"),
                Box::new(move || decode_loop(rx, spare_tx, dec, input, s)),
            )?);
            l.threads.push(spawn(
                format!("netflow-{port}"),
                Box::new(move || {
                    receive_loop(bound.sock, drops, tx, spare_rx, stop, stats);
                }),
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
            Box::new(move || deal_loop(bound.sock, drops, admission, to_parsers, stop, stats)),
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
    stats: Arc<ReadStats>,
) {
    let mut batch = RecvBatch::new(BATCH);
    let mut learn: Vec<Vec<Item>> = parsers.iter().map(|_| Vec::new()).collect();
    let mut next = 0;
    let mut gaps = Gaps::new();
    loop {
        gaps.before_read(&stats);
        let n = recv_or_zero(&mut batch, &sock);
        gaps.after_read();
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
        pause_if_dry(n, &stop, &mut gaps);
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

/// One read's datagrams, copied out of the receive buffers for the decoding thread.
#[derive(Default)]
struct Read {
    received: Option<SystemTime>,
    bytes: Vec<u8>,
    /// Each datagram's source and where its bytes end in `bytes`.
    ends: Vec<(SocketAddr, usize)>,
}

/// The reading thread's time away from `recvmmsg`, and a per-second summary in the
/// debug log (`RUST_LOG=detector::sources::netflow::listener=debug`).
struct Gaps {
    returned: Option<Instant>,
    second: Instant,
    /// Over the current second: time away from reads, the longest such time, reads.
    away: Duration,
    longest: Duration,
    reads: u64,
    /// Over the current second: time waiting for room in the queue (not counted away).
    waited: Duration,
}

impl Gaps {
    fn new() -> Self {
        Self {
            returned: None,
            second: Instant::now(),
            away: Duration::ZERO,
            longest: Duration::ZERO,
            reads: 0,
            waited: Duration::ZERO,
        }
    }

    /// Just before a read: the time since the last one returned counts as a gap.
    fn before_read(&mut self, stats: &ReadStats) {
        let now = Instant::now();
        if let Some(r) = self.returned.take() {
            let gap = now - r;
            self.away += gap;
            self.longest = self.longest.max(gap);
            self.reads += 1;
            stats
                .longest_gap_us
                .fetch_max(gap.as_micros() as u64, Ordering::Relaxed);
        }
        if now - self.second >= Duration::from_secs(1) {
            let busy = stats.busy_us.swap(0, Ordering::Relaxed);
            let busy_longest = stats.busy_longest_us.swap(0, Ordering::Relaxed);
            let emit = stats.emit_us.swap(0, Ordering::Relaxed);
            if self.reads > 0 {
                log::debug!(
                    "reader: {} reads in {:.0} ms, away from reading {:.1} ms (longest {:.2} ms), waited for room {:.1} ms, queued to the decoder {:.1} MB; decoder busy {:.1} ms (longest read {:.2} ms), of which hand-over {:.1} ms",
                    self.reads,
                    (now - self.second).as_secs_f64() * 1e3,
                    self.away.as_secs_f64() * 1e3,
                    self.longest.as_secs_f64() * 1e3,
                    self.waited.as_secs_f64() * 1e3,
                    stats.queued.load(Ordering::Relaxed) as f64 / 1e6,
                    busy as f64 / 1e3,
                    busy_longest as f64 / 1e3,
                    emit as f64 / 1e3,
                );
            }
            self.waited = Duration::ZERO;
            self.second = now;
            self.away = Duration::ZERO;
            self.longest = Duration::ZERO;
            self.reads = 0;
        }
    }

    fn after_read(&mut self) {
        self.returned = Some(Instant::now());
    }

    /// The reader paused `d` after emptying its socket ([`PAUSE`]): not a gap that
    /// risks the socket's buffer, so not counted as one.
    fn paused(&mut self, d: Duration) {
        if let Some(r) = &mut self.returned {
            *r += d;
        }
    }

    /// The reader waited `d` for room in the queue: not a gap of its own making.
    fn waited(&mut self, d: Duration, stats: &ReadStats) {
        self.waited += d;
        if let Some(r) = &mut self.returned {
            *r += d;
        }
        stats
            .waited_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Reads datagrams and queues each read's to the decoding thread (`--workers 1`), until
/// `stop` is set and the socket is empty. Waits while [`QUEUE_BYTES`] are queued.
fn receive_loop(
    sock: UdpSocket,
    drops: Arc<AtomicU64>,
    queue: SyncSender<Read>,
    spare: Receiver<Read>,
    stop: Arc<AtomicBool>,
    stats: Arc<ReadStats>,
) {
    let mut batch = RecvBatch::new(BATCH);
    let mut gaps = Gaps::new();
    loop {
        gaps.before_read(&stats);
        // One system call waits (up to WAKE) for the first datagram and takes whatever
        // else is queued, up to BATCH.
        let n = recv_or_zero(&mut batch, &sock);
        gaps.after_read();
        if n == 0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        let mut read = spare.try_recv().unwrap_or_default();
        read.received = Some(SystemTime::now());
        read.bytes.clear();
        read.ends.clear();
        for i in 0..n {
            let (from, data, d) = batch.get(i);
            if let Some(d) = d {
                drops.store(d, Ordering::Relaxed);
            }
            if let Some(from) = from {
                read.bytes.extend_from_slice(data);
                read.ends.push((from, read.bytes.len()));
            }
        }
        let len = read.bytes.len() as u64;
        if len == 0 {
            continue;
        }
        // Room for it (a read larger than the whole queue goes in alone).
        let mut waited = None;
        while stats.queued.load(Ordering::Relaxed) > 0
            && stats.queued.load(Ordering::Relaxed) + len > stats.limit()
        {
            waited.get_or_insert_with(Instant::now);
            std::thread::sleep(ROOM_POLL);
        }
        if let Some(w) = waited {
            gaps.waited(w.elapsed(), &stats);
        }
        let queued = stats.queued.fetch_add(len, Ordering::Relaxed) + len;
        stats.queue_peak.fetch_max(queued, Ordering::Relaxed);
        if queue.send(read).is_err() {
            return;
        }
        pause_if_dry(n, &stop, &mut gaps);
    }
}

/// After a read of `n` datagrams: when the socket ran dry before the batch was full
/// (and the listener is not stopping), sleeps [`PAUSE`] so that datagrams gather, and
/// returns how long it slept.
pub(crate) fn pause_when_dry(n: usize, stop: &AtomicBool) -> Option<Duration> {
    if n == 0 || n >= BATCH || stop.load(Ordering::Relaxed) {
        return None;
    }
    let t = Instant::now();
    std::thread::sleep(PAUSE);
    Some(t.elapsed())
}

fn pause_if_dry(n: usize, stop: &AtomicBool, gaps: &mut Gaps) {
    if let Some(d) = pause_when_dry(n, stop) {
        gaps.paused(d);
    }
}

/// Decodes the reads queued by the reading thread and hands their records over, until
/// the reader is done; returns the emptied reads for reuse.
fn decode_loop<E: Emit>(
    queue: Receiver<Read>,
    spare: SyncSender<Read>,
    decoder: Arc<Mutex<Decoder>>,
    input: E,
    stats: Arc<ReadStats>,
) {
    // Room is made even if this thread ends early (a panic): the reader must not wait
    // for it forever.
    struct Release(Arc<ReadStats>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.queued.store(0, Ordering::Relaxed);
        }
    }
    let _release = Release(stats.clone());
    let mut records = Vec::new();
    while let Ok(read) = queue.recv() {
        let started = Instant::now();
        let received = read.received.unwrap_or(SystemTime::UNIX_EPOCH);
        let mut dec = decoder.lock().unwrap_or_else(|p| p.into_inner());
        let mut start = 0;
        for &(from, end) in &read.ends {
            dec.decode(from, &read.bytes[start..end], received, &mut records);
            start = end;
        }
        drop(dec);
        if !records.is_empty() {
            let emitting = Instant::now();
            input.emit(hand_over(&mut records), received);
            let took = emitting.elapsed().as_micros() as u64;
            stats.emit_us.fetch_add(took, Ordering::Relaxed);
            stats.longest_emit_us.fetch_max(took, Ordering::Relaxed);
        }
        stats
            .queued
            .fetch_sub(read.bytes.len() as u64, Ordering::Relaxed);
        let took = started.elapsed().as_micros() as u64;
        stats.longest_decode_us.fetch_max(took, Ordering::Relaxed);
        stats.busy_us.fetch_add(took, Ordering::Relaxed);
        stats.busy_longest_us.fetch_max(took, Ordering::Relaxed);
        let _ = spare.try_send(read);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowRecord;
    use std::net::IpAddr;

    /// Collects what the listener hands over.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<FlowRecord>>>);

    impl Emit for Collect {
        fn emit(&self, records: Vec<FlowRecord>, _now: SystemTime) {
            self.0.lock().unwrap().extend(records);
        }
    }

    /// A NetFlow v5 datagram (sequence `seq`) of records from 10.0.`d`.`j` to
    /// 192.0.2.1, j = 1..=`n`.
    fn v5(d: u8, n: u8, seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&5u16.to_be_bytes());
        b.extend_from_slice(&u16::from(n).to_be_bytes());
        b.extend_from_slice(&1_000u32.to_be_bytes()); // uptime, ms
        b.extend_from_slice(&1_800_000_000u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]); // engine, sampling
        for j in 1..=n {
            b.extend_from_slice(&[10, 0, d, j]);
            b.extend_from_slice(&[192, 0, 2, 1]);
            b.extend_from_slice(&[0; 4]); // next hop
            b.extend_from_slice(&[0; 4]); // interfaces
            b.extend_from_slice(&3u32.to_be_bytes()); // packets
            b.extend_from_slice(&300u32.to_be_bytes()); // bytes
            b.extend_from_slice(&500u32.to_be_bytes()); // first
            b.extend_from_slice(&900u32.to_be_bytes()); // last
            b.extend_from_slice(&40_000u16.to_be_bytes());
            b.extend_from_slice(&6_881u16.to_be_bytes());
            b.extend_from_slice(&[0, 0x18, 6, 0]); // pad, flags, TCP, tos
            b.extend_from_slice(&[0; 8]); // AS, masks, pad
        }
        b
    }

    /// With one parser, the reader queues each read to the decoding thread; with a
    /// queue too small for two reads it waits for each to be decoded. Every record
    /// sent comes out, in the order sent, and nothing is dropped on the way.
    #[test]
    fn one_parser_hands_every_datagram_over_in_order_through_a_full_queue() {
        let collect = Collect::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut l = Listener::start(
            "127.0.0.1:0".parse().unwrap(),
            4 << 20,
            1,
            &DecodeLimits::default(),
            &[],
            &collect,
            &stop,
        )
        .unwrap();
        l.read_stats.limit.store(1, Ordering::Relaxed);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (datagrams, per) = (200u32, 5u8);
        let mut seq = 0;
        for d in 0..datagrams {
            tx.send_to(&v5(d as u8, per, seq), l.addr).unwrap();
            seq += u32::from(per);
        }
        let want = datagrams as usize * per as usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while collect.0.lock().unwrap().len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        l.join();
        assert_eq!(l.kernel_drops(), 0);
        let got = collect.0.lock().unwrap();
        let sources: Vec<IpAddr> = got.iter().map(|r| r.src_addr).collect();
        let sent: Vec<IpAddr> = (0..datagrams)
            .flat_map(|d| (1..=per).map(move |j| IpAddr::from([10, 0, d as u8, j])))
            .collect();
        assert_eq!(sources, sent);
        assert!(l.read_stats.queue_peak.load(Ordering::Relaxed) > 0);
    }
}
