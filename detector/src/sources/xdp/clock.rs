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
    ptr: *mut u8,
    len: usize,
    _map: Array<MapData, u64>,
}

// SAFETY: the mapping stays valid as long as the struct lives; it is only accessed through
// an AtomicU64 at offset 0, which is 8-byte aligned (page aligned).
unsafe impl Send for ClockMap {}
unsafe impl Sync for ClockMap {}

impl ClockMap {
    pub fn new(map: Array<MapData, u64>) -> io::Result<Self> {
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: sysconf has no preconditions.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: mapping a BPF_F_MMAPABLE array map of one u64: one page, shared.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
            _map: map,
        })
    }

    fn cell(&self) -> &AtomicU64 {
        // SAFETY: page-aligned mapping of at least 8 bytes, alive as long as self.
        unsafe { AtomicU64::from_ptr(self.ptr as *mut u64) }
    }

    /// Sets the time the programs stamp packets with (CLOCK_MONOTONIC ns; 0: kernel clock).
    pub fn set(&self, ns: u64) {
        self.cell().store(ns, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.cell().load(Ordering::Relaxed)
    }
}

impl Drop for ClockMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
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
