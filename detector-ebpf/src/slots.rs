//! An open-addressed flow table in a memory-mappable array of 64-byte [`FlowSlot`]s
//! (issue #21): a packet of a known flow touches one cache line (the slot holds the
//! control word, the key and the counters), where the kernel's hash map touches the
//! bucket and then the element. The meter counts IPv4 flows in `FLOWS4_SLOTS` first
//! (when the loader sets `FLOW_SLOTS`, as the agent does).
//!
//! A flow lives in one of the [`slot::PROBES`] slots that follow its home slot (the hash
//! of its key). A packet reads the control words in that order: a LIVE slot whose
//! fingerprint matches has its key compared; RETIRING and TOMBSTONE slots are passed (a
//! RETIRING flow is being removed by userspace: its packets go to a new entry); the first
//! EMPTY slot ends the search. The packet's flow is then inserted in the first free slot
//! seen (EMPTY or TOMBSTONE) by compare-and-swap of the control word (-> BUSY), its key
//! and counters written, then the word set to LIVE. A packet that meets a BUSY slot with
//! its fingerprint (perhaps its own flow, being inserted on another CPU), or loses the
//! compare-and-swap, or finds no free slot, makes [`add`] return false: the caller counts
//! it in the kernel hash map, so nothing is lost (a flow may then have two entries, one
//! in each store, exported apart). No waiting and no retry: the verifier explores every
//! path of the probe loop, and both multiplied its states past its limit.
//!
//! Userspace never writes a LIVE slot's counters: it moves LIVE -> RETIRING, reads the
//! final counters at a later pass (at least 20 ms later, a second in the agent: any
//! packet that had read LIVE has long finished its atomic adds), then RETIRING ->
//! TOMBSTONE, and TOMBSTONE -> EMPTY at a later pass when the next slot is EMPTY (no
//! probe sequence goes on past an EMPTY slot, so none can need this one).
//!
//! Known limit: one flow can get two entries, each counted exactly and exported apart
//! (two records where there was one flow): a packet that finds a BUSY slot with its
//! fingerprint or loses a compare-and-swap (the hash map takes it), an IPv4 flow in the
//! hash map that later finds a free slot, or two CPUs inserting the same new flow at the
//! instant a RETIRING slot on its probe path turns TOMBSTONE (one takes that slot, the
//! other the EMPTY one after it).
//!
//! Ordering: every store before the publishing one is volatile, and x86's stores are
//! not reordered with each other (nor loads with loads); on weaker CPUs the publishing
//! store needs BPF's store-release (cpu v4, kernel 6.15+).

use core::intrinsics::{AtomicOrdering, atomic_cxchg};
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::maps::Array;
use detector_common::{CounterBlock, FlowKey4, FlowSlot, slot};

use crate::{parse::Packet, update_stats};

/// The table's slot count minus one (a power of two minus one). Set by the loader.
#[unsafe(no_mangle)]
static SLOT_MASK: u32 = 0;

/// The seed of [`slot::hash`]. Set by the loader.
#[unsafe(no_mangle)]
static SLOT_SEED: u64 = 0;

/// No free slot seen. (A small sentinel: compared with `u32::MAX`, the BPF backend
/// tested a zero-extended register against a sign-extended immediate, never equal.)
const NONE: u32 = slot::PROBES;

/// Adds a packet to its flow's slot, inserting the flow if it has none (announcing it
/// when live flows are on, see [`crate::announce`]). False when the flow has no slot and
/// none of its [`slot::PROBES`] slots is free.
#[allow(clippy::too_many_arguments, reason = "inlined; one call per table")]
#[inline(always)]
pub(crate) fn add(
    counters: &mut CounterBlock,
    table: &Array<FlowSlot>,
    key: &FlowKey4,
    pkt: &Packet,
    (ifindex, direction): (u32, u8),
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
    {
        let mut free = NONE;
        let mut free_ctrl = 0;
        for d in 0..slot::PROBES {
            let Some(s) = table.get_ptr_mut((home + d) & mask) else {
                return false;
            };
            // SAFETY: `s` points to a slot of the table (a map value, valid for this
            // run); its control word is only changed by compare-and-swap or by its owner.
            unsafe {
                let ctrl = &raw mut (*s).ctrl;
                let c = read_volatile(ctrl);
                let state = c & slot::STATE_MASK;
                if state == slot::EMPTY || state == slot::TOMBSTONE {
                    if free == NONE {
                        free = d;
                        free_ctrl = c;
                    }
                    if state == slot::EMPTY {
                        break;
                    }
                    continue;
                }
                if c >> slot::FP_SHIFT != fp {
                    continue;
                }
                if state == slot::BUSY {
                    // Perhaps this flow, being written on another CPU right now: count
                    // in the hash map (exact: the two entries are exported apart).
                    return false;
                }
                if c & slot::STATE_MASK == slot::LIVE && same_key(s, &w) {
                    update_stats(&raw mut (*s).stats, pkt, packets, bytes, now);
                    return true;
                }
            }
        }
        if free >= NONE {
            return false;
        }
        let Some(s) = table.get_ptr_mut((home + free) & mask) else {
            return false;
        };
        let busy = fp << slot::FP_SHIFT | free << slot::DIST_SHIFT | slot::BUSY;
        // SAFETY: as above.
        unsafe {
            let ctrl = &raw mut (*s).ctrl;
            let (_, won) =
                atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    ctrl, free_ctrl, busy,
                );
            if !won {
                // Another CPU took it first (perhaps for this flow): the hash map.
                return false;
            }
            // The slot is ours: nobody else writes it until it is published.
            let mut event = crate::announce(counters, packets);
            let k = (&raw mut (*s).key).cast::<u32>();
            for (i, word) in w.iter().enumerate() {
                write_volatile(k.add(i), *word);
            }
            write_volatile(
                &raw mut (*s).stats,
                crate::first_packet(pkt, packets, bytes, now, event.is_some()),
            );
            write_volatile(ctrl, busy ^ slot::BUSY ^ slot::LIVE);
            crate::announced(&mut event, true, pkt, (ifindex, direction), bytes, now);
        }
    }
    true
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
