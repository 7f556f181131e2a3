//! Counts per port for one host, in arrays of slots that hold the port and its counts
//! together: finding a port reads one cache line, where a map with separate entries
//! reads two. [`PortTable`] keeps two counts per port (for instance peers and pairs on a
//! local port) in 8-byte slots; [`PortCounts`] one count (pairs on a remote port) in
//! 4-byte slots. Open addressing with linear probing, at most half full; removal shifts
//! the following slots back, so there are no tombstones.
//!
//! The engine holds at most [`super::profile::MAX_PEERS`] peers of 8 port pairs per host,
//! so no count passes 65,528: 16 bits hold it, and [`PortTable`]'s 23 bits with room.

/// 0 is empty; otherwise (port + 1) << 47 | first count << 24 | second count: 17, 23 and
/// 24 bits.
type Slot = u64;

const PORT_SHIFT: u32 = 47;
const B_BITS: u32 = 24;
const COUNT_MAX: u32 = (1 << 23) - 1;

#[inline]
fn home(port: u16, mask: usize) -> usize {
    // Fibonacci hashing: neighbouring ports land far apart.
    (u32::from(port).wrapping_mul(0x9e37_79b9) >> 16) as usize & mask
}

#[inline]
fn pack(port: u16, a: u32, b: u32) -> Slot {
    debug_assert!(a <= COUNT_MAX && b <= COUNT_MAX);
    ((u64::from(port) + 1) << PORT_SHIFT) | (u64::from(a) << B_BITS) | u64::from(b)
}

#[inline]
fn port_of(s: Slot) -> u16 {
    ((s >> PORT_SHIFT) - 1) as u16
}

#[inline]
fn counts_of(s: Slot) -> (u32, u32) {
    (
        ((s >> B_BITS) as u32) & COUNT_MAX,
        (s as u32) & ((1 << B_BITS) - 1),
    )
}

/// 0 is empty; otherwise port << 16 | count, the count at least 1 (a port whose count
/// falls to 0 is removed).
type Slot32 = u32;

/// A slot of one of the tables: 0 is empty, any other value names its port.
trait PortSlot: Copy + Default + PartialEq {
    fn port(self) -> u16;
}

impl PortSlot for Slot {
    #[inline]
    fn port(self) -> u16 {
        port_of(self)
    }
}

impl PortSlot for Slot32 {
    #[inline]
    fn port(self) -> u16 {
        (self >> 16) as u16
    }
}

/// What both tables share: the slots, open addressing with linear probing from the
/// port's home, at most half full, removal by shifting back.
#[derive(Clone, Debug, Default)]
struct Slots<S> {
    slots: Vec<S>,
    len: usize,
}

impl<S: PortSlot> Slots<S> {
    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<S>()
    }

    /// The slot of `port` (Ok) or the empty slot where it would go (Err); the table must
    /// have slots.
    #[inline]
    fn find(&self, port: u16) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = home(port, mask);
        loop {
            let s = self.slots[i];
            if s == S::default() {
                return Err(i);
            }
            if s.port() == port {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot holding `port`, if any.
    #[inline]
    fn get(&self, port: u16) -> Option<S> {
        if self.slots.is_empty() {
            return None;
        }
        self.find(port).ok().map(|i| self.slots[i])
    }

    /// Where `port` is, or would go, with room for one more port.
    #[inline]
    fn place(&mut self, port: u16) -> Result<usize, usize> {
        if (self.len + 1) * 2 > self.slots.len() {
            self.rehash((self.slots.len() * 2).max(8));
        }
        self.find(port)
    }

    /// Writes slot `i`, which held `was` (empty or not): `Some` a new value, `None` the
    /// port removed.
    #[inline]
    fn set(&mut self, i: usize, was: bool, to: Option<S>) {
        match (was, to) {
            (true, None) => {
                self.len -= 1;
                super::dense::clear_linear(&mut self.slots, i, |s: S, mask| home(s.port(), mask));
            }
            (_, Some(s)) => {
                if !was {
                    self.len += 1;
                }
                self.slots[i] = s;
            }
            (false, None) => {}
        }
    }

    fn rehash(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.slots, vec![S::default(); cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|&s| s != S::default()) {
            let mut i = home(s.port(), mask);
            while self.slots[i] != S::default() {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    fn shrink(&mut self) {
        let want = ((self.len + 1) * 2).next_power_of_two().max(8);
        if want * 2 <= self.slots.len() {
            self.rehash(want);
        }
    }

    #[inline]
    fn prefetch(&self, port: u16) {
        if !self.slots.is_empty() {
            let i = home(port, self.slots.len() - 1);
            crate::mem::prefetch(&self.slots[i]);
        }
    }

    fn held(&self) -> impl Iterator<Item = S> + '_ {
        self.slots.iter().copied().filter(|&s| s != S::default())
    }
}

/// Two counts per port, in 8-byte slots (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub struct PortTable(Slots<Slot>);

impl PortTable {
    /// Ports held.
    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }

    pub fn get(&self, port: u16) -> Option<(u32, u32)> {
        self.0.get(port).map(counts_of)
    }

    /// Applies `f` to the counts of `port` (0, 0 when absent) and returns what it left;
    /// a port whose counts both fall to 0 is removed.
    #[inline]
    pub fn update(&mut self, port: u16, f: impl FnOnce(&mut u32, &mut u32)) -> (u32, u32) {
        let (i, was) = match self.0.place(port) {
            Ok(i) => (i, true),
            Err(i) => (i, false),
        };
        let (mut a, mut b) = if was {
            counts_of(self.0.slots[i])
        } else {
            (0, 0)
        };
        f(&mut a, &mut b);
        let to = (a != 0 || b != 0).then(|| pack(port, a, b));
        self.0.set(i, was, to);
        (a, b)
    }

    /// Gives memory back when the table is twice the size an insert would give it.
    pub fn shrink(&mut self) {
        self.0.shrink();
    }

    /// Asks the CPU to fetch the slot where `port` would be found.
    #[inline]
    pub fn prefetch(&self, port: u16) {
        self.0.prefetch(port);
    }

    /// (port, first count, second count) for each port held.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32, u32)> + '_ {
        self.0.held().map(|s| {
            let (a, b) = counts_of(s);
            (port_of(s), a, b)
        })
    }
}

/// One count per port, in 4-byte slots (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub struct PortCounts(Slots<Slot32>);

impl PortCounts {
    /// Ports held.
    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }

    pub fn get(&self, port: u16) -> Option<u32> {
        self.0.get(port).map(|s| s & 0xffff)
    }

    /// Applies `f` to the count of `port` (0 when absent) and returns what it left; a
    /// port whose count falls to 0 is removed. The count must stay below 65,536.
    #[inline]
    pub fn update(&mut self, port: u16, f: impl FnOnce(&mut u32)) -> u32 {
        let (i, was) = match self.0.place(port) {
            Ok(i) => (i, true),
            Err(i) => (i, false),
        };
        let mut n = if was { self.0.slots[i] & 0xffff } else { 0 };
        f(&mut n);
        assert!(n <= 0xffff, "a port count of {n} (at most 65,535)");
        self.0
            .set(i, was, (n != 0).then(|| (u32::from(port) << 16) | n));
        n
    }

    /// Gives memory back when the table is twice the size an insert would give it.
    pub fn shrink(&mut self) {
        self.0.shrink();
    }

    /// Asks the CPU to fetch the slot where `port` would be found.
    #[inline]
    pub fn prefetch(&self, port: u16) {
        self.0.prefetch(port);
    }

    /// (port, count) for each port held.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.0.held().map(|s| (s.port(), s & 0xffff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// The table holds what a map of counts holds under any sequence of increments and
        /// decrements (ports absent at 0 counts), with few distinct ports so that probe
        /// runs are long and removals shift them, the highest ports among them.
        #[test]
        fn counts_like_a_map(
            ops in proptest::collection::vec(
                (prop_oneof![0u16..48, 65_500u16..=65_535], 0u8..4),
                1..800,
            )
        ) {
            let mut t = PortTable::default();
            let mut r: HashMap<u16, (u32, u32)> = HashMap::new();
            for (port, op) in ops {
                let e = r.entry(port).or_insert((0, 0));
                let (da, db): (i64, i64) = match op {
                    0 => (1, 0),
                    1 => (0, 1),
                    2 => (if e.0 > 0 { -1 } else { 0 }, 0),
                    _ => (0, if e.1 > 0 { -1 } else { 0 }),
                };
                e.0 = (i64::from(e.0) + da) as u32;
                e.1 = (i64::from(e.1) + db) as u32;
                let want = *e;
                if want == (0, 0) {
                    r.remove(&port);
                }
                let got = t.update(port, |a, b| {
                    *a = (i64::from(*a) + da) as u32;
                    *b = (i64::from(*b) + db) as u32;
                });
                prop_assert_eq!(got, want);
                if port % 7 == 0 {
                    t.shrink();
                }
                prop_assert_eq!(t.len(), r.len());
                for (p, c) in &r {
                    prop_assert_eq!(t.get(*p), Some(*c));
                }
            }
            let mut held: Vec<(u16, u32, u32)> = t.iter().collect();
            let mut want: Vec<(u16, u32, u32)> = r.iter().map(|(p, (a, b))| (*p, *a, *b)).collect();
            held.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(held, want);
        }

        /// The one-count table holds what a map of counts holds under any sequence of
        /// increments and decrements, the same way.
        #[test]
        fn one_count_like_a_map(
            ops in proptest::collection::vec(
                (prop_oneof![0u16..48, 65_500u16..=65_535], any::<bool>()),
                1..800,
            )
        ) {
            let mut t = PortCounts::default();
            let mut r: HashMap<u16, u32> = HashMap::new();
            for (port, up) in ops {
                let e = r.entry(port).or_insert(0);
                let d: i64 = if up { 1 } else if *e > 0 { -1 } else { 0 };
                *e = (i64::from(*e) + d) as u32;
                let want = *e;
                if want == 0 {
                    r.remove(&port);
                }
                let got = t.update(port, |n| *n = (i64::from(*n) + d) as u32);
                prop_assert_eq!(got, want);
                if port % 7 == 0 {
                    t.shrink();
                }
                prop_assert_eq!(t.len(), r.len());
                for (p, c) in &r {
                    prop_assert_eq!(t.get(*p), Some(*c));
                }
            }
            let mut held: Vec<(u16, u32)> = t.iter().collect();
            let mut want: Vec<(u16, u32)> = r.iter().map(|(p, c)| (*p, *c)).collect();
            held.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(held, want);
        }
    }
}
