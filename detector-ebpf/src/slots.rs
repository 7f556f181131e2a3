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
//! its fingerprint, or loses the compare-and-swap, may be its own flow being inserted on
//! another CPU (a new flow's first packets reaching two CPUs at once): it waits, up to
//! [`SPIN`] reads, for that slot to turn LIVE and counts there if the slot is its flow
//! (with no wait, `prog_test_run`'s concurrent-insert test split 34 to 7,273 of 20,000
//! flows into two entries; with it, 0 to 3). Otherwise, or when no free slot is seen,
//! [`add`] returns false: the caller counts the packet in the kernel hash map, so nothing
//! is lost. The one wait comes after the probe loop: the verifier explores every path of
//! the loop, and waiting or retrying inside it had multiplied its states past its limit.
//!
//! Userspace never writes a LIVE slot's counters: it moves LIVE -> RETIRING, reads the
//! final counters at a later pass (at least 20 ms later, a second in the agent: any
//! packet that had read LIVE has long finished its atomic adds), then RETIRING ->
//! TOMBSTONE, and TOMBSTONE -> EMPTY at a later pass when the next slot is EMPTY (no
//! probe sequence goes on past an EMPTY slot, so none can need this one).
//!
//! Known limit: one flow can get two entries, each counted exactly and exported apart
//! (two records where there was one flow): an insert that outlasts the other CPU's wait
//! (an interrupt between its compare-and-swap and its publish), a fingerprint shared by
//! two flows inserted at once, an IPv4 flow in the hash map that later finds a free slot,
//! or two CPUs inserting the same new flow at the instant a RETIRING slot on its probe
//! path turns TOMBSTONE (one takes that slot, the other the EMPTY one after it).
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
        let mut wait = NONE;
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
                    // Perhaps this flow, being inserted on another CPU right now: wait
                    // for that insert below rather than insert it a second time.
                    wait = d;
                    break;
                }
                if c & slot::STATE_MASK == slot::LIVE && same_key(s, &w) {
                    update_stats(&raw mut (*s).stats, pkt, packets, bytes, now);
                    return true;
                }
            }
        }
        if wait < NONE {
            return wait_and_add(
                table,
                (home + wait) & mask,
                fp,
                &w,
                (pkt, packets, bytes, now),
            );
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
                // Another CPU took it first, perhaps for this flow: wait for its insert.
                return wait_and_add(
                    table,
                    (home + free) & mask,
                    fp,
                    &w,
                    (pkt, packets, bytes, now),
                );
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

/// How many times [`wait_and_add`] reads a BUSY control word before it gives up. An
/// insert holds its slot BUSY for a few dozen instructions (the key, the first packet's
/// counters and the announcement); 64 reads cover that unless an interrupt comes in
/// between on the inserting CPU (8 reads left up to 658 of `prog_test_run`'s 20,000
/// concurrent inserts split; 64 and 1,024 both 0 to 3). Each read is verified once per
/// path that reaches it: 64 add about 30,000 instructions to the verifier's walk, 128 took
/// the payload-hints program past its limit before [`crate::forget`].
const SPIN: u32 = 64;

/// Slot `i` was seen BUSY with this flow's fingerprint, or another CPU won it first:
/// perhaps this very flow is being inserted there. Waits for the slot to be published
/// and, if it is this flow, adds the packet to it (so one flow that reaches two CPUs at
/// once gets one entry). False, for the hash map, when it is another flow or the insert
/// outlasts [`SPIN`] reads.
/// `(pkt, packets, bytes, now)` is what [`add`] was given.
#[inline(always)]
fn wait_and_add(
    table: &Array<FlowSlot>,
    i: u32,
    fp: u32,
    w: &[u32; 5],
    (pkt, packets, bytes, now): (&Packet, u64, u64, u64),
) -> bool {
    let Some(s) = table.get_ptr_mut(i) else {
        return false;
    };
    // SAFETY: `s` points to a slot of the table; its words are only read here until it is
    // LIVE, and a LIVE slot's counters take atomic adds.
    unsafe {
        let ctrl = &raw const (*s).ctrl;
        for _ in 0..SPIN {
            let c = read_volatile(ctrl);
            if c & slot::STATE_MASK == slot::BUSY {
                continue;
            }
            if c & slot::STATE_MASK == slot::LIVE && c >> slot::FP_SHIFT == fp && same_key(s, w) {
                update_stats(&raw mut (*s).stats, pkt, packets, bytes, now);
                return true;
            }
            return false;
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
