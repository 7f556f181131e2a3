//! An open-addressed flow table in a memory-mappable array of 64-byte [`FlowSlot`]s
//! (issue #21): a packet of a known flow touches one cache line (the slot holds the
//! control word, the key and the counters), where the kernel's hash map touches the
//! bucket and then the element.
//!
//! A flow lives in one of the [`slot::PROBES`] slots that follow its home slot (the hash
//! of its key). A packet reads the control words in that order: a slot whose
//! fingerprint matches has its key compared; the first empty slot ends the search, and
//! the packet's flow is inserted there by compare-and-swap of the control word
//! (EMPTY -> BUSY), its key and first-packet fields written, then the word set to LIVE.
//! A packet of the same flow on another CPU that finds the slot BUSY with its
//! fingerprint waits (a bounded number of reads) for it to become LIVE. When all the
//! slots are taken, [`add`] returns false and the caller counts the packet elsewhere
//! (the kernel hash map), so nothing is lost.
//!
//! Ordering: every store before the publishing one is volatile, and x86's stores are
//! not reordered with each other (nor loads with loads); on weaker CPUs the publishing
//! store needs BPF's store-release (cpu v4, kernel 6.15+).

use core::intrinsics::{AtomicOrdering, atomic_cxchg};
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::maps::Array;
use detector_common::{FlowKey4, FlowSlot, slot};

use crate::{FlowStats, parse::Packet, update_stats};

/// The table's slot count minus one (a power of two minus one). Set by the loader.
#[unsafe(no_mangle)]
static SLOT_MASK: u32 = 0;

/// The seed of [`slot::hash`]. Set by the loader.
#[unsafe(no_mangle)]
static SLOT_SEED: u64 = 0;

/// Reads of a BUSY slot's control word before giving up on it (the inserting CPU writes
/// 24 bytes between its claim and its publication).
const SPIN: u32 = 64;

/// Adds a packet to its flow's slot, inserting the flow if it has none. False when the
/// flow has no slot and none of its [`slot::PROBES`] slots is free.
#[inline(always)]
pub(crate) fn add(
    table: &Array<FlowSlot>,
    key: &FlowKey4,
    pkt: &Packet,
    packets: u64,
    bytes: u64,
    now: u64,
) -> bool {
    // SAFETY: read-only globals set by the loader; volatile, not constant-folded.
    let (mask, seed) = unsafe { (read_volatile(&SLOT_MASK), read_volatile(&SLOT_SEED)) };
    // SAFETY: FlowKey4 is 20 bytes of plain integers.
    let w = unsafe { core::mem::transmute::<FlowKey4, [u32; 5]>(*key) };
    let h = slot::hash(&w, seed);
    let home = slot::home(h, mask);
    let fp = slot::fingerprint(h);
    for d in 0..slot::PROBES {
        let Some(s) = table.get_ptr_mut((home + d) & mask) else {
            return false;
        };
        // SAFETY: `s` points to a slot of the table (a map value, valid for this run);
        // its control word is only changed by compare-and-swap or by its owner.
        unsafe {
            let ctrl = &raw mut (*s).ctrl;
            let mut c = read_volatile(ctrl);
            if c == slot::EMPTY {
                let busy = fp << slot::FP_SHIFT | d << slot::DIST_SHIFT | slot::BUSY;
                let (old, won) = atomic_cxchg::<
                    u32,
                    { AtomicOrdering::SeqCst },
                    { AtomicOrdering::SeqCst },
                >(ctrl, slot::EMPTY, busy);
                if won {
                    let k = (&raw mut (*s).key).cast::<u32>();
                    for (i, word) in w.iter().enumerate() {
                        write_volatile(k.add(i), *word);
                    }
                    let v: *mut FlowStats = &raw mut (*s).stats;
                    write_volatile(&raw mut (*v).first_ns, now);
                    write_volatile(&raw mut (*v).tos, pkt.tos);
                    write_volatile(ctrl, busy ^ slot::BUSY ^ slot::LIVE);
                    update_stats(v, pkt, packets, bytes, now);
                    return true;
                }
                c = old;
            }
            if c >> slot::FP_SHIFT != fp {
                continue;
            }
            let mut n = 0;
            while c & slot::STATE_MASK == slot::BUSY && n < SPIN {
                c = read_volatile(ctrl);
                n += 1;
            }
            if c & slot::STATE_MASK == slot::LIVE && same_key(s, &w) {
                update_stats(&raw mut (*s).stats, pkt, packets, bytes, now);
                return true;
            }
        }
    }
    false
}

/// Whether slot `s` holds key `w`.
///
/// # Safety
/// `s` points to a slot of the table.
#[inline(always)]
unsafe fn same_key(s: *mut FlowSlot, w: &[u32; 5]) -> bool {
    // SAFETY: see the function's contract; the key is at offset 4, 4-aligned.
    unsafe {
        let k = (&raw const (*s).key).cast::<u32>();
        (read_volatile(k) ^ w[0])
            | (read_volatile(k.add(1)) ^ w[1])
            | (read_volatile(k.add(2)) ^ w[2])
            | (read_volatile(k.add(3)) ^ w[3])
            | (read_volatile(k.add(4)) ^ w[4])
            == 0
    }
}
