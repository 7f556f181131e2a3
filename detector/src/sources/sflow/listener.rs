//! The UDP socket sFlow arrives on (`--sflow-listen`), one per address: one thread
//! reads it with `recvmmsg` (the NetFlow listener's socket setup and receive batch,
//! with the kernel's drop counter), decodes, and once a second hands the flows that
//! ended to the pipeline. At stop it reads what the socket holds, then flushes every
//! flow.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::decode::{Decoder, SflowLimits, SflowTimeouts};
use crate::flow::{Cidr, Emit};
use crate::sources::netflow::listener::{
    BATCH, ListenError, RecvBatch, bind_one, pause_when_dry, recv_or_zero,
};

/// How often the flows that ended are handed over.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// A running sFlow listener.
pub struct SflowListener {
    pub addr: SocketAddr,
    /// Receive buffer the kernel granted.
    pub rcvbuf: usize,
    pub decoder: Arc<Mutex<Decoder>>,
    drops: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl SflowListener {
    /// Binds `addr` (port 0: a port the kernel picks) and starts its thread.
    pub fn start<E: Emit>(
        addr: SocketAddr,
        rcvbuf: usize,
        limits: SflowLimits,
        timeouts: SflowTimeouts,
        allow: &[Cidr],
        input: &E,
        stop: &Arc<AtomicBool>,
    ) -> Result<Self, ListenError> {
        let bound = bind_one(addr, rcvbuf)?;
        let local = bound
            .sock
            .local_addr()
            .map_err(|source| ListenError::Option { addr, source })?;
        let decoder = Arc::new(Mutex::new(Decoder::new(limits, timeouts, allow.to_vec())));
        let drops = Arc::new(AtomicU64::new(0));
        let (d, k, i, s) = (decoder.clone(), drops.clone(), input.clone(), stop.clone());
        let sock = bound.sock;
        let thread = std::thread::Builder::new()
            .name(format!("sflow-{}", local.port()))
            .spawn(move || {
                crate::privileges::drop_thread_capabilities();
                read_loop(sock, d, k, i, s)
            })
            .map_err(|source| ListenError::Thread { addr, source })?;
        Ok(Self {
            addr: local,
            rcvbuf: bound.rcvbuf,
            decoder,
            drops,
            thread: Some(thread),
        })
    }

    /// The kernel's count of datagrams dropped (receive buffer full).
    pub fn kernel_drops(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    /// Waits for the thread (after the stop flag was set): every datagram already
    /// received is decoded and every flow handed over.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_loop<E: Emit>(
    sock: UdpSocket,
    decoder: Arc<Mutex<Decoder>>,
    drops: Arc<AtomicU64>,
    input: E,
    stop: Arc<AtomicBool>,
) {
    let mut batch = RecvBatch::new(BATCH);
    let mut records = Vec::new();
    let mut last_expiry = SystemTime::now();
    loop {
        let n = recv_or_zero(&mut batch, &sock);
        let now = SystemTime::now();
        let mut dec = decoder.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..n {
            let (from, data, d) = batch.get(i);
            if let Some(d) = d {
                drops.store(d, Ordering::Relaxed);
            }
            if let Some(from) = from {
                dec.decode(from, data, now, &mut records);
            }
        }
        let stopping = n == 0 && stop.load(Ordering::Relaxed);
        if stopping {
            dec.flush(&mut records);
        } else if now.duration_since(last_expiry).unwrap_or_default() >= EXPIRE_EVERY {
            dec.expire(now, &mut records);
            last_expiry = now;
        }
        drop(dec);
        if !records.is_empty() {
            input.emit(std::mem::take(&mut records), now);
        }
        if stopping {
            return;
        }
        pause_when_dry(n, &stop);
    }
}
