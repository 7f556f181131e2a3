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

#[derive(Clone, Debug, Default)]
pub struct PortTable {
    slots: Vec<Slot>,
    len: usize,
}

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

impl PortTable {
    /// Ports held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }

    /// The slot of `port` (Ok) or the empty slot where it would go (Err).
    #[inline]
    fn find(&self, port: u16) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = home(port, mask);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return Err(i);
            }
            if port_of(s) == port {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, port: u16) -> Option<(u32, u32)> {
        if self.slots.is_empty() {
            return None;
        }
        self.find(port).ok().map(|i| counts_of(self.slots[i]))
    }

    /// Applies `f` to the counts of `port` (0, 0 when absent) and returns what it left;
    /// a port whose counts both fall to 0 is removed.
    #[inline]
    pub fn update(&mut self, port: u16, f: impl FnOnce(&mut u32, &mut u32)) -> (u32, u32) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let (i, (mut a, mut b)) = match self.find(port) {
            Ok(i) => (i, counts_of(self.slots[i])),
            Err(i) => (i, (0, 0)),
        };
        let was = self.slots[i] != 0;
        f(&mut a, &mut b);
        match (was, a == 0 && b == 0) {
            (true, true) => {
                self.len -= 1;
                self.clear(i);
            }
            (_, false) => {
                if !was {
                    self.len += 1;
                }
                self.slots[i] = pack(port, a, b);
            }
            (false, true) => {}
        }
        (a, b)
    }

    /// Empties slot `i`.
    fn clear(&mut self, i: usize) {
        super::dense::clear_linear(&mut self.slots, i, |s, mask| home(port_of(s), mask));
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(8);
        self.rehash(cap);
    }

    fn rehash(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|&s| s != 0) {
            let mut i = home(port_of(s), mask);
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Gives memory back when the table is twice the size an insert would give it.
    pub fn shrink(&mut self) {
        let want = ((self.len + 1) * 2).next_power_of_two().max(8);
        if want * 2 <= self.slots.len() {
            self.rehash(want);
        }
    }

    /// Asks the CPU to fetch the slot where `port` would be found.
    #[inline]
    pub fn prefetch(&self, port: u16) {
        if !self.slots.is_empty() {
            let i = home(port, self.slots.len() - 1);
            crate::mem::prefetch(&self.slots[i]);
        }
    }

    /// (port, first count, second count) for each port held.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32, u32)> + '_ {
        self.slots.iter().filter(|&&s| s != 0).map(|&s| {
            let (a, b) = counts_of(s);
            (port_of(s), a, b)
        })
    }
}

/// 0 is empty; otherwise port << 16 | count, the count at least 1 (a port whose count
/// falls to 0 is removed).
type Slot32 = u32;

/// One count per port, in 4-byte slots (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub struct PortCounts {
    slots: Vec<Slot32>,
    len: usize,
}

impl PortCounts {
    /// Ports held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot32>()
    }

    /// The slot of `port` (Ok) or the empty slot where it would go (Err).
    #[inline]
    fn find(&self, port: u16) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = home(port, mask);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return Err(i);
            }
            if (s >> 16) as u16 == port {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, port: u16) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        self.find(port).ok().map(|i| self.slots[i] & 0xffff)
    }

    /// Applies `f` to the count of `port` (0 when absent) and returns what it left; a
    /// port whose count falls to 0 is removed. The count must stay below 65,536.
    #[inline]
    pub fn update(&mut self, port: u16, f: impl FnOnce(&mut u32)) -> u32 {
        if (self.len + 1) * 2 > self.slots.len() {
            self.rehash((self.slots.len() * 2).max(8));
        }
        let (i, mut n) = match self.find(port) {
            Ok(i) => (i, self.slots[i] & 0xffff),
            Err(i) => (i, 0),
        };
        let was = self.slots[i] != 0;
        f(&mut n);
        assert!(n <= 0xffff, "a port count of {n} (at most 65,535)");
        match (was, n == 0) {
            (true, true) => {
                self.len -= 1;
                super::dense::clear_linear(&mut self.slots, i, |s, mask| {
                    home((s >> 16) as u16, mask)
                });
            }
            (_, false) => {
                if !was {
                    self.len += 1;
                }
                self.slots[i] = (u32::from(port) << 16) | n;
            }
            (false, true) => {}
        }
        n
    }

    fn rehash(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|&s| s != 0) {
            let mut i = home((s >> 16) as u16, mask);
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Gives memory back when the table is twice the size an insert would give it.
    pub fn shrink(&mut self) {
        let want = ((self.len + 1) * 2).next_power_of_two().max(8);
        if want * 2 <= self.slots.len() {
            self.rehash(want);
        }
    }

    /// Asks the CPU to fetch the slot where `port` would be found.
    #[inline]
    pub fn prefetch(&self, port: u16) {
        if !self.slots.is_empty() {
            let i = home(port, self.slots.len() - 1);
            crate::mem::prefetch(&self.slots[i]);
        }
    }

    /// (port, count) for each port held.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.slots
            .iter()
            .filter(|&&s| s != 0)
            .map(|&s| ((s >> 16) as u16, s & 0xffff))
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
