//! `micro drain`: what one pass of the meter's drain over the slot table costs in
//! userspace (issue #21), at a given table size and number of live flows, beside two
//! references measured in the same run: the bookkeeping alone (the same flows observed
//! from a vector, as if the kernel's memory cost nothing), and reading one word of every
//! slot (the memory a pass must touch whatever the flows).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use detector::flow::table::{FlowTable, Timeouts};
use detector::sources::xdp::slots::{SlotFlows, SlotMemory};
use detector_common::{FlowKey4, FlowStats, slot};

#[derive(Args)]
pub struct DrainArgs {
    /// Slots in the table (a power of two; the agent makes 2 x --map-size).
    #[arg(long, default_value_t = 1 << 21)]
    slots: usize,
    /// Live flows in it.
    #[arg(long, default_value_t = 1_000_000)]
    flows: usize,
    /// Passes measured (after one that warms the bookkeeping).
    #[arg(long, default_value_t = 5)]
    passes: u32,
}

const SEC: u64 = 1_000_000_000;

fn key(n: usize) -> FlowKey4 {
    let n = n as u32;
    FlowKey4 {
        src_addr: (0x0a00_0000 | (n >> 8)).to_be_bytes(),
        dst_addr: [192, 0, 2, n as u8],
        src_port: 40_000 + (n % 20_000) as u16,
        dst_port: 443,
        protocol: 6,
        ..FlowKey4::default()
    }
}

fn stats(pass: u64) -> FlowStats {
    FlowStats {
        packets: 10 + pass,
        bytes: 1500 * (10 + pass),
        first_ns: SEC,
        last_ns: SEC + pass * SEC,
        ..FlowStats::default()
    }
}

pub fn drain(a: DrainArgs) -> Result<()> {
    if !a.slots.is_power_of_two() || a.flows > a.slots {
        bail!("--slots must be a power of two and at least --flows");
    }
    // Long timeouts: every pass observes every flow, none leaves.
    let timeouts = Timeouts::from_secs(3600, 3600);
    let mem = SlotMemory::owned(a.slots);
    // Spread over the table as the hash places them: every slot/flows-th, jittered.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut placed = 0;
    let mut i = 0usize;
    while placed < a.flows {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let idx = (i + (rng as usize % 2)) % a.slots;
        if mem.ctrl(idx).load(Ordering::Relaxed) == slot::EMPTY {
            mem.write(idx, key(placed), stats(0));
            mem.ctrl(idx)
                .store(5 << slot::FP_SHIFT | slot::LIVE, Ordering::Release);
            placed += 1;
        }
        i = (i + a.slots / a.flows.max(1)).max(i + 1);
        if i >= a.slots {
            i %= a.slots;
            i += 1;
        }
    }
    let mut flows = SlotFlows::new(mem, timeouts, 4);
    let mut out = Vec::new();
    flows.scan(SEC, &mut out);
    let t = Instant::now();
    for p in 1..=a.passes {
        out.clear();
        flows.scan(SEC + u64::from(p) * SEC, &mut out);
    }
    let pass = t.elapsed().as_secs_f64() / f64::from(a.passes);

    // Reference 1: the bookkeeping alone, the same flows from a vector.
    let keys: Vec<_> = (0..a.flows).map(|n| key(n).widen(4)).collect();
    let mut table = FlowTable::new(timeouts);
    let s0 = stats(0);
    table.begin_pass(SEC);
    for k in &keys {
        black_box(table.observe(k, &s0, SEC));
    }
    table.end_pass(SEC);
    let t = Instant::now();
    for p in 1..=u64::from(a.passes) {
        let s = stats(p);
        table.begin_pass(SEC + p * SEC);
        for k in &keys {
            black_box(table.observe(k, &s, SEC + p * SEC));
        }
        table.end_pass(SEC + p * SEC);
    }
    let bookkeeping = t.elapsed().as_secs_f64() / f64::from(a.passes);

    // Reference 2: one word of every slot, nothing else.
    let mem = SlotMemory::owned(a.slots);
    let t = Instant::now();
    for _ in 0..a.passes {
        let mut x = 0u32;
        for i in 0..a.slots {
            x ^= mem.ctrl(i).load(Ordering::Relaxed);
        }
        black_box(x);
    }
    let sweep = t.elapsed().as_secs_f64() / f64::from(a.passes);

    let ms = |s: f64| s * 1e3;
    println!(
        "slot table drain, {} slots ({} MiB), {} live flows, {} passes",
        a.slots,
        (a.slots * size_of::<detector_common::FlowSlot>()) >> 20,
        a.flows,
        a.passes
    );
    println!(
        "  a pass:                        {:8.1} ms ({:.0} ns a flow)",
        ms(pass),
        pass * 1e9 / a.flows.max(1) as f64
    );
    println!(
        "  bookkeeping alone (reference): {:8.1} ms  -> pass / it = {:.2}",
        ms(bookkeeping),
        pass / bookkeeping
    );
    println!(
        "  one word a slot (reference):   {:8.1} ms  -> pass / it = {:.2}",
        ms(sweep),
        pass / sweep
    );
    Ok(())
}
