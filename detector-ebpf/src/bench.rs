//! Benchmark programs, loaded only by `cargo xtask bench xdp` (the agent loads the
//! meter alone). Their maps hold one entry unless the benchmark sizes them, so they cost
//! the agent nothing.
//!
//! Under BPF_PROG_TEST_RUN with `repeat = N`, the kernel runs a program N times on the
//! same frame; the sequence-driven programs make each run another packet: run `k` of a
//! CPU takes index `BENCH_SEQ[1 + (pos + k) mod BENCH_SEQ[0]]`, so the figures carry no
//! per-syscall cost and the frames follow any order the benchmark writes (uniformly
//! spread flows, a heavy-tailed trace):
//!
//! - [`bench_floor`]: one read at that index of `BENCH_FLOOR`, an array as large as the
//!   flow map: what one cache and TLB miss costs on this machine, the floor of a lookup.
//! - [`bench_floor_chain`]: the same, each read's place depending on the previous read's
//!   value, so that no two misses overlap: the latency of one miss.
//! - [`bench_floor_add`]: one atomic add to the entry at that index: the least an exact
//!   meter on a table shared by every CPU does to a packet's flow (read the line, write
//!   it back with a locked add).
//! - [`bench_seq_pass`]: the sequence read and the frame rewrite of [`bench_meter_seq`],
//!   then PASS: what the meter's rows carry beyond the meter itself.
//! - [`bench_meter_seq`]: writes flow `i`'s source address and port into the frame (an
//!   IPv4 TCP frame from the benchmark: address `10.64.0.0 + (i >> 8)`, port `i & 0xffff`)
//!   and meters it with the agent's own code, as `flow_ingress` does.
//!   With the slot table on (the loader's `FLOW_SLOTS`, as in the agent), IPv4 flows go
//!   to `FLOWS4_SLOTS` first; off, to the kernel hash map alone (the reference).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, xdp_action},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// The sequence: entry 0 its length, then the indices. u64 entries: an array map's
/// elements are 8 bytes apart in memory whatever their size, and userspace writes them
/// through the memory mapping.
#[map]
static BENCH_SEQ: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static BENCH_FLOOR: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: the position in the sequence (slot 0) and the last value the chained floor
/// read (slot 1).
#[map]
static BENCH_POS: PerCpuArray<u32> = PerCpuArray::with_max_entries(2, 0);

/// This CPU's next index of the sequence (`None` when the sequence is empty). The
/// position wraps with a compare, not a division (a `%` a packet was in every row).
#[inline(always)]
fn next_index() -> Option<u32> {
    let pos = BENCH_POS.get_ptr_mut(0)?;
    let len = *BENCH_SEQ.get(0)? as u32;
    if len == 0 {
        return None;
    }
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let p = unsafe {
        let p = *pos;
        *pos = if p + 1 >= len { 0 } else { p + 1 };
        p
    };
    // Userspace starts each CPU below `len`; a position past it reads nothing and wraps.
    BENCH_SEQ.get(1 + p).map(|&i| i as u32)
}

/// One read of a random entry of `BENCH_FLOOR` per run.
#[xdp]
pub fn bench_floor(_ctx: XdpContext) -> u32 {
    if let Some(i) = next_index()
        && let Some(v) = BENCH_FLOOR.get(i)
    {
        // SAFETY: reading a map value; volatile so the load is really made.
        let _ = unsafe { core::ptr::read_volatile(v) };
    }
    xdp_action::XDP_PASS
}

/// One read of a random entry of `BENCH_FLOOR` per run, each read's place depending on
/// the value the previous one read (always 0, which the CPU cannot know): the reads cannot
/// overlap, so this is the latency of one miss rather than the throughput of many.
#[xdp]
pub fn bench_floor_chain(_ctx: XdpContext) -> u32 {
    if let Some(i) = next_index()
        && let Some(last) = BENCH_POS.get_ptr_mut(1)
    {
        // SAFETY: this CPU's slot; programs do not nest on a CPU.
        let prev = unsafe { *last };
        if let Some(v) = BENCH_FLOOR.get(i.wrapping_add(prev)) {
            // SAFETY: as above; a map value read.
            unsafe { *last = core::ptr::read_volatile(v) as u32 };
        }
    }
    xdp_action::XDP_PASS
}

/// One atomic add of 1 to a random entry of `BENCH_FLOOR` per run: the memory work an
/// exact meter on a shared table cannot do without.
#[xdp]
pub fn bench_floor_add(_ctx: XdpContext) -> u32 {
    if let Some(i) = next_index()
        && let Some(v) = BENCH_FLOOR.get_ptr_mut(i)
    {
        // SAFETY: a map value, valid for this run; shared entries take atomic adds only.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
    }
    xdp_action::XDP_PASS
}

/// The sequence programs' own work without the meter: the frame rewrite of
/// [`bench_meter_seq`], then PASS (what its rows carry beyond the meter).
#[xdp]
pub fn bench_seq_pass(ctx: XdpContext) -> u32 {
    write_flow(&ctx);
    xdp_action::XDP_PASS
}

/// Offsets in the benchmark's frame (Ethernet, IPv4 without options, TCP).
const SRC_ADDR: usize = 14 + 12;
const SRC_PORT: usize = 14 + 20;

/// The flow meter on flow `BENCH_SEQ[...]` of the sequence per run.
#[xdp]
pub fn bench_meter_seq(ctx: XdpContext) -> u32 {
    write_flow(&ctx);
    crate::ingress(&ctx)
}

/// Writes the address and port of flow `BENCH_SEQ[...]` into the frame: one store each,
/// of the width the parser loads them with (byte stores had the parser's loads wait for
/// them to reach the cache instead of taking their values from the store buffer).
#[inline(always)]
fn write_flow(ctx: &XdpContext) {
    let (data, end) = (ctx.data(), ctx.data_end());
    if let Some(i) = next_index()
        && data + SRC_PORT + 2 <= end
    {
        let addr = (0x0a40_0000u32 + (i >> 8)).to_be();
        let port = ((i & 0xffff) as u16).to_be();
        // SAFETY: within the frame (checked above); the frame is the benchmark's own.
        unsafe {
            packet_store((data + SRC_ADDR) as *mut u32, addr);
            packet_store((data + SRC_PORT) as *mut u16, port);
        }
    }
}

/// One BPF store instruction to packet memory, of `T`'s width (the counterpart of
/// `parse::packet_load`, whose documentation says why unaligned packet access is fine).
///
/// # Safety
/// `p` points into the bounds-checked packet.
#[inline(always)]
unsafe fn packet_store<T: Copy>(p: *mut T, v: T) {
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "BPF packet stores may be unaligned; see parse::packet_load"
    )]
    unsafe {
        core::ptr::write_volatile(p, v)
    }
}
