//! A hash map for the detection engine's tables (the hosts, each host's peers, the top
//! senders): entries in one dense vector, found through a compact open-addressing index
//! of 8-byte slots (hash, position).
//!
//! Why not `hashbrown` or `indexmap`: the engine holds millions of peer entries spread
//! over 100k hosts, so every record costs a few cache misses, and the only way to go
//! faster is to ask for the memory early. This map can say where a key's index slot is
//! before it is looked up ([`DenseMap::prefetch`]), which the engine does a few records
//! ahead. It also never leaves tombstones: removing swaps the last entry into the hole
//! and shifts the index back (linear probing), so churn — peers leaving the window while
//! others arrive — never triggers the in-place rehashes that a tombstoning table needs.
//!
//! The index is at most half full; growing it moves 8-byte slots only (the hash is kept
//! in the slot), never the entries.
//!
//! Each entry may carry a stamp (`S`, e.g. when it was last seen) in a vector of its own
//! beside the entries, so that finding the entries to expire reads the stamps only, not
//! every entry ([`DenseMap::stamps`], then [`DenseMap::remove_at`]). Without stamps, `S`
//! is `()` and costs nothing.

use crate::mem::prefetch_read;
use std::hash::{BuildHasher, Hash};

use rustc_hash::FxBuildHasher;

/// A slot: 0 is empty; otherwise the key's 32-bit hash above, its position + 1 below.
type Slot = u64;

#[derive(Clone, Debug)]
pub struct DenseMap<K, V, S = ()> {
    entries: Vec<(K, V)>,
    /// One stamp per entry, at the same position.
    stamps: Vec<S>,
    index: Vec<Slot>,
}

impl<K, V, S> Default for DenseMap<K, V, S> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            stamps: Vec::new(),
            index: Vec::new(),
        }
    }
}

#[inline]
fn hash_of<K: Hash>(k: &K) -> u32 {
    let h = FxBuildHasher.hash_one(k);
    // Fx leaves the low bits weak for small integer keys: fold the high half in.
    (h ^ (h >> 32)) as u32
}

#[inline]
fn slot(hash: u32, pos: usize) -> Slot {
    (u64::from(hash) << 32) | (pos as u64 + 1)
}

#[inline]
fn slot_pos(s: Slot) -> usize {
    (s & 0xffff_ffff) as usize - 1
}

#[inline]
fn slot_hash(s: Slot) -> u32 {
    (s >> 32) as u32
}

impl<K: Hash + Eq, V, S> DenseMap<K, V, S> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the map holds on the heap (entries, stamps and index, by capacity).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(K, V)>()
            + self.stamps.capacity() * std::mem::size_of::<S>()
            + self.index.capacity() * std::mem::size_of::<Slot>()
    }

    /// Asks the CPU to fetch the index slot where `k` would be found.
    #[inline]
    pub fn prefetch(&self, k: &K) {
        if self.index.is_empty() {
            return;
        }
        let i = hash_of(k) as usize & (self.index.len() - 1);
        prefetch_read(self.index.as_ptr().wrapping_add(i));
    }

    /// Asks the CPU to fetch where the next entry would be appended.
    #[inline]
    pub fn prefetch_end(&self) {
        prefetch_read(self.entries.as_ptr().wrapping_add(self.entries.len()));
        prefetch_read(self.stamps.as_ptr().wrapping_add(self.stamps.len()));
    }

    /// The index slot of `k` (Ok) or the empty slot where it would go (Err).
    #[inline]
    fn find_slot(&self, k: &K, h: u32) -> Result<usize, usize> {
        let mask = self.index.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let s = self.index[i];
            if s == 0 {
                return Err(i);
            }
            if slot_hash(s) == h && self.entries[slot_pos(s)].0 == *k {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Position of `k` in the dense entries.
    #[inline]
    pub fn position(&self, k: &K) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        self.find_slot(k, hash_of(k))
            .ok()
            .map(|i| slot_pos(self.index[i]))
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.position(k).is_some()
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.position(k).map(|p| &self.entries[p].1)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.position(k).map(|p| &mut self.entries[p].1)
    }

    /// The entry at a position from [`Self::position`] or [`Self::insert_new`].
    pub fn at_mut(&mut self, pos: usize) -> &mut V {
        &mut self.entries[pos].1
    }

    /// The stamp of the entry at `pos`.
    pub fn stamp_mut(&mut self, pos: usize) -> &mut S {
        &mut self.stamps[pos]
    }

    /// Entries with their stamps.
    pub fn iter_stamped(&self) -> impl Iterator<Item = (&K, &V, &S)> {
        self.entries
            .iter()
            .zip(&self.stamps)
            .map(|((k, v), s)| (k, v, s))
    }

    /// Inserts a key known to be absent; returns its position.
    pub fn insert_new(&mut self, k: K, v: V) -> usize
    where
        S: Default,
    {
        self.insert_stamped(k, v, S::default())
    }

    /// Inserts a key known to be absent, with its stamp; returns its position.
    pub fn insert_stamped(&mut self, k: K, v: V, stamp: S) -> usize {
        if (self.entries.len() + 1) * 2 > self.index.len() {
            self.grow_index();
        }
        let h = hash_of(&k);
        let i = match self.find_slot(&k, h) {
            Err(i) => i,
            Ok(_) => panic!("insert_new: key already present"),
        };
        let pos = self.entries.len();
        self.entries.push((k, v));
        self.stamps.push(stamp);
        self.index[i] = slot(h, pos);
        pos
    }

    fn grow_index(&mut self) {
        self.resize_index((self.index.len() * 2).max(8));
    }

    /// Moves the slots into an index of `cap` slots (a power of two), by their hashes.
    fn resize_index(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.index, vec![0; cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|&s| s != 0) {
            let mut i = slot_hash(s) as usize & mask;
            while self.index[i] != 0 {
                i = (i + 1) & mask;
            }
            self.index[i] = s;
        }
    }

    /// The stamps, by position.
    pub fn stamps(&self) -> &[S] {
        &self.stamps
    }

    /// The entry at `pos`.
    pub fn at(&self, pos: usize) -> (&K, &V) {
        let (k, v) = &self.entries[pos];
        (k, v)
    }

    /// The entry at `pos`, its value mutable.
    pub fn pair_mut(&mut self, pos: usize) -> (&K, &mut V) {
        let (k, v) = &mut self.entries[pos];
        (&*k, v)
    }

    /// Removes the entry at `pos`; the last entry takes its place.
    pub fn remove_at(&mut self, pos: usize) -> (K, V) {
        let h = hash_of(&self.entries[pos].0);
        let i = self
            .find_slot(&self.entries[pos].0, h)
            .expect("every entry has a slot");
        self.remove_at_slot(i)
    }

    /// Asks the CPU to fetch the entry at `pos` (when it exists).
    #[inline]
    pub fn prefetch_at(&self, pos: usize) {
        if pos < self.entries.len() {
            // Every line the entry spans (it need not start on a line).
            let start = self.entries.as_ptr().wrapping_add(pos) as usize;
            let end = start + std::mem::size_of::<(K, V)>();
            let mut line = start & !63;
            while line < end {
                prefetch_read(line as *const u8);
                line += 64;
            }
        }
    }

    /// Asks the CPU to fetch the stamp of the entry at `pos`.
    #[inline]
    pub fn prefetch_stamp_at(&self, pos: usize) {
        prefetch_read(self.stamps.as_ptr().wrapping_add(pos));
    }

    /// Asks the CPU to fetch the index slot of the entry at `pos` (the entry itself
    /// should be in the cache).
    #[inline]
    pub fn prefetch_slot_at(&self, pos: usize) {
        if pos < self.entries.len() {
            self.prefetch(&self.entries[pos].0);
        }
    }

    /// Asks the CPU to fetch the first stamps.
    #[inline]
    pub fn prefetch_stamps(&self) {
        let n = (self.stamps.len() * std::mem::size_of::<S>())
            .div_ceil(64)
            .min(16);
        for l in 0..n {
            prefetch_read(self.stamps.as_ptr().cast::<u8>().wrapping_add(l * 64));
        }
    }

    /// Removes `k`; returns its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        if self.entries.is_empty() {
            return None;
        }
        let i = self.find_slot(k, hash_of(k)).ok()?;
        Some(self.remove_at_slot(i).1)
    }

    fn remove_at_slot(&mut self, i: usize) -> (K, V) {
        let pos = slot_pos(self.index[i]);
        self.clear_slot(i);
        let last = self.entries.len() - 1;
        if pos != last {
            // The last entry moves into the hole: its slot points to it there.
            let h = hash_of(&self.entries[last].0);
            let j = self
                .find_slot(&self.entries[last].0, h)
                .expect("every entry has a slot");
            self.index[j] = slot(h, pos);
        }
        self.stamps.swap_remove(pos);
        self.entries.swap_remove(pos)
    }

    /// Empties slot `i` of the index.
    fn clear_slot(&mut self, i: usize) {
        clear_linear(&mut self.index, i, |s, mask| slot_hash(s) as usize & mask);
    }

    /// Keeps the entries for which `keep` is true, in their order, in one pass: the kept
    /// entries move up over the others, then the index is rebuilt.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let n = self.entries.len();
        let mut kept = 0;
        for pos in 0..n {
            let (k, v) = &mut self.entries[pos];
            if keep(k, v) {
                if kept != pos {
                    self.entries.swap(kept, pos);
                    self.stamps.swap(kept, pos);
                }
                kept += 1;
            }
        }
        if kept == n {
            return;
        }
        self.entries.truncate(kept);
        self.stamps.truncate(kept);
        self.index.iter_mut().for_each(|s| *s = 0);
        let mask = self.index.len() - 1;
        for (pos, (k, _)) in self.entries.iter().enumerate() {
            let h = hash_of(k);
            let mut i = h as usize & mask;
            while self.index[i] != 0 {
                i = (i + 1) & mask;
            }
            self.index[i] = slot(h, pos);
        }
    }

    /// Removes the entries whose stamp fails `keep`, handing each to `removed`: the
    /// plain walk the tests hold the engine's expiry against.
    #[cfg(test)]
    pub fn retain_by_stamp(
        &mut self,
        mut keep: impl FnMut(&S) -> bool,
        mut removed: impl FnMut(K, V),
    ) {
        let mut pos = 0;
        while pos < self.stamps.len() {
            if keep(&self.stamps[pos]) {
                pos += 1;
                continue;
            }
            let h = hash_of(&self.entries[pos].0);
            let i = self
                .find_slot(&self.entries[pos].0, h)
                .expect("every entry has a slot");
            // The last entry moves to `pos`, which is examined next.
            let (k, v) = self.remove_at_slot(i);
            removed(k, v);
        }
    }

    /// Asks the CPU to fetch the entry of `k` (its index slot should already be in the
    /// cache, from [`Self::prefetch`]): the entries whose slot hash matches, without
    /// comparing keys.
    #[inline]
    pub fn prefetch_entry(&self, k: &K) {
        if self.index.is_empty() {
            return;
        }
        let h = hash_of(k);
        let mask = self.index.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let s = self.index[i];
            if s == 0 {
                return;
            }
            if slot_hash(s) == h {
                self.prefetch_at(slot_pos(s));
                return;
            }
            i = (i + 1) & mask;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Gives memory back when at most half of it is used: the entries keep half again
    /// their number as room, the index the size an insert would give it. (Keeping a
    /// doubled capacity until a quarter is used let capacities creep up: a table whose
    /// count wanders around a power of two passes it now and then and kept the double.)
    pub fn shrink(&mut self) {
        let len = self.entries.len();
        if self.entries.capacity() > 16 && len < self.entries.capacity() / 2 {
            self.entries.shrink_to(len + len / 2);
            self.stamps.shrink_to(len + len / 2);
        }
        let want = ((len + 1) * 2).next_power_of_two().max(8);
        if want * 2 <= self.index.len() {
            self.resize_index(want);
        }
    }
}

/// Empties slot `i` of a linear-probing table of nonzero 8-byte slots (0 is empty) and
/// shifts back the slots after it that probed past it, so that no tombstone is needed.
/// `home(slot, mask)` is where a slot's key hashes to.
pub(super) fn clear_linear(slots: &mut [u64], mut i: usize, home: impl Fn(u64, usize) -> usize) {
    let mask = slots.len() - 1;
    let mut j = i;
    loop {
        j = (j + 1) & mask;
        let s = slots[j];
        if s == 0 {
            break;
        }
        let h = home(s, mask);
        // `s` may fill the hole at `i` unless its home lies cyclically in (i, j].
        let stays = if i <= j {
            i < h && h <= j
        } else {
            i < h || h <= j
        };
        if !stays {
            slots[i] = s;
            i = j;
        }
    }
    slots[i] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        Retain(u16),
        /// Removes the entries stamped below this.
        Expire(u32),
        Shrink,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small keys: many collisions, removals of present keys, long probe runs.
        prop_oneof![
            4 => (0u16..200, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => (0u16..200).prop_map(Op::Remove),
            1 => (1u16..5).prop_map(Op::Retain),
            1 => any::<u32>().prop_map(Op::Expire),
            1 => Just(Op::Shrink),
        ]
    }

    proptest! {
        /// The map holds exactly what a std HashMap holds under any sequence of inserts,
        /// removals, retains and shrinks, and every key is found through the index.
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 1..600)) {
            // The stamp of each entry is its value: it must follow the entry around.
            let mut m: DenseMap<u16, u32, u32> = DenseMap::default();
            let mut r: HashMap<u16, u32> = HashMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => {
                        prop_assert_eq!(m.position(&k).is_some(), r.contains_key(&k));
                        match m.position(&k) {
                            Some(p) => {
                                *m.at_mut(p) = v;
                                *m.stamp_mut(p) = v;
                            }
                            None => {
                                m.insert_stamped(k, v, v);
                            }
                        }
                        r.insert(k, v);
                    }
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), r.remove(&k)),
                    Op::Retain(d) => {
                        m.retain(|k, _| k % d != 0);
                        r.retain(|k, _| k % d != 0);
                    }
                    Op::Expire(below) => {
                        let mut gone = Vec::new();
                        m.retain_by_stamp(|s| *s >= below, |k, v| gone.push((k, v)));
                        let mut want: Vec<(u16, u32)> =
                            r.iter().filter(|(_, v)| **v < below).map(|(k, v)| (*k, *v)).collect();
                        r.retain(|_, v| *v >= below);
                        gone.sort_unstable();
                        want.sort_unstable();
                        prop_assert_eq!(gone, want);
                    }
                    Op::Shrink => m.shrink(),
                }
                prop_assert_eq!(m.len(), r.len());
                for (k, v) in &r {
                    prop_assert_eq!(m.get(k), Some(v));
                }
                let occupied = m.index.iter().filter(|&&s| s != 0).count();
                prop_assert_eq!(occupied, r.len());
                for (_, v, s) in m.iter_stamped() {
                    prop_assert_eq!(v, s);
                }
            }
            for k in 0u16..200 {
                prop_assert_eq!(m.contains_key(&k), r.contains_key(&k));
            }
        }
    }
}
