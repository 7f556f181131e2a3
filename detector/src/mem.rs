//! Memory hints the hot tables share (the detection engine's, the duplicate table's):
//! asking the CPU to fetch what a record will touch a few records ahead.

#[inline]
pub fn prefetch_read<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the CPU to fetch the memory at `r` (a value about to be updated).
#[inline]
pub fn prefetch<T>(r: &T) {
    prefetch_read(r as *const T);
}
