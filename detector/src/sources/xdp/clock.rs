//! The packet clock: the agent writes CLOCK_MONOTONIC into the eBPF `CLOCK` map (memory
//! mapped, so a write is a store, not a syscall) every millisecond, and the programs read
//! it with one load instead of calling a clock helper per packet.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use aya::maps::{Array, IterableMap, MapData};

use crate::flow::monotonic_ns;

/// The mapped `CLOCK` value.
pub struct ClockMap {
    mem: memmap2::MmapRaw,
    _map: Array<MapData, u64>,
}

impl ClockMap {
    pub fn new(map: Array<MapData, u64>) -> io::Result<Self> {
        // A BPF_F_MMAPABLE array map of one u64: its page, shared.
        let mem = memmap2::MmapOptions::new()
            .len(size_of::<u64>())
            .map_raw(map.map().fd().as_fd().as_raw_fd())?;
        Ok(Self { mem, _map: map })
    }

    fn cell(&self) -> &AtomicU64 {
        // SAFETY: a page-aligned mapping of at least 8 bytes, alive as long as self.
        unsafe { AtomicU64::from_ptr(self.mem.as_mut_ptr().cast()) }
    }

    /// Sets the time the programs stamp packets with (CLOCK_MONOTONIC ns; 0: kernel clock).
    pub fn set(&self, ns: u64) {
        self.cell().store(ns, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.cell().load(Ordering::Relaxed)
    }
}

/// A thread that keeps the clock current; stops (and hands the clock back to the kernel's)
/// when dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    clock: Arc<ClockMap>,
}

impl Ticker {
    pub fn start(clock: Arc<ClockMap>, period: Duration) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        clock.set(monotonic_ns());
        let (c, s) = (clock.clone(), stop.clone());
        let handle = thread::Builder::new()
            .name("packet-clock".into())
            .spawn(move || {
                crate::privileges::drop_thread_capabilities();
                while !s.load(Ordering::Relaxed) {
                    c.set(monotonic_ns());
                    thread::sleep(period);
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
            clock,
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.clock.set(0);
    }
}
