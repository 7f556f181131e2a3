//! A hash map for the detection engine's tables (the hosts, each host's peers, the top
//! senders): entries stored by position, found through a compact open-addressing index
//! of slots (a tag of the key's hash, the entry's position).
//!
//! Why not `hashbrown` or `indexmap`: the engine holds millions of peer entries spread
//! over 100k hosts, so every record costs a few cache misses, and the only way to go
//! faster is to ask for the memory early. This map can say where a key's index slot is
//! before it is looked up ([`DenseMap::prefetch`]), which the engine does a few records
//! ahead. It also never leaves tombstones: removing swaps the last entry into the hole
//! and shifts the index back (linear probing), so churn — peers leaving the window while
//! others arrive — never triggers the in-place rehashes that a tombstoning table needs.
//!
//! The index is at most half full; growing it moves slots only (the slot keeps enough
//! of the hash to place it), never the entries. Its slots are 8 bytes ([`u64`]: a 32-bit
//! hash, any number of entries) or 4 ([`u32`]: 16 bits of hash, at most
//! [`Slot::MAX_ENTRIES`] entries, enough for a host's peers).
//!
//! The entries live in a [`Store`]: one vector ([`Vec`]), or chunks of [`CHUNK`] entries
//! ([`Chunked`]) for the per-host tables. A doubling vector leaves its old buffer behind
//! each time it grows; with thousands of tables growing together (every host's peers as
//! the window fills), the allocator keeps those buffers, and a node held about as much
//! again as its tables. Chunks never move.
//!
//! Each entry may carry a stamp (`S`, e.g. when it was last seen) in a vector of its own
//! beside the entries, so that finding the entries to expire reads the stamps only, not
//! every entry ([`DenseMap::stamps`], then [`DenseMap::remove_at`]). Without stamps, `S`
//! is `()` and costs nothing.

use crate::mem::prefetch_read;
use std::hash::{BuildHasher, Hash};

use rustc_hash::FxBuildHasher;

/// An index slot: 0 is empty; otherwise a tag of the key's hash above, the entry's
/// position + 1 below.
pub trait Slot: Copy + Eq + Default + std::fmt::Debug {
    /// The most entries an index of these slots addresses.
    const MAX_ENTRIES: usize;
    fn new(hash: u32, pos: usize) -> Self;
    fn pos(self) -> usize;
    /// Whether the slot's tag is the one of `hash`.
    fn matches(self, hash: u32) -> bool;
    /// Where a key of `hash` starts probing in an index of `mask + 1` slots.
    fn home_of(hash: u32, mask: usize) -> usize;
    /// Where the key of this slot started probing.
    fn home(self, mask: usize) -> usize;
    fn is_empty(self) -> bool {
        self == Self::default()
    }
}

/// The whole 32-bit hash and a 32-bit position.
impl Slot for u64 {
    const MAX_ENTRIES: usize = u32::MAX as usize - 1;
    #[inline]
    fn new(hash: u32, pos: usize) -> Self {
        (u64::from(hash) << 32) | (pos as u64 + 1)
    }
    #[inline]
    fn pos(self) -> usize {
        (self & 0xffff_ffff) as usize - 1
    }
    #[inline]
    fn matches(self, hash: u32) -> bool {
        (self >> 32) as u32 == hash
    }
    #[inline]
    fn home_of(hash: u32, mask: usize) -> usize {
        hash as usize & mask
    }
    #[inline]
    fn home(self, mask: usize) -> usize {
        Self::home_of((self >> 32) as u32, mask)
    }
}

/// The hash's high 16 bits (which also place the slot, so an index holds at most 65,536
/// slots) and a 16-bit position.
impl Slot for u32 {
    const MAX_ENTRIES: usize = 32_768;
    #[inline]
    fn new(hash: u32, pos: usize) -> Self {
        (hash & 0xffff_0000) | (pos as u32 + 1)
    }
    #[inline]
    fn pos(self) -> usize {
        (self & 0xffff) as usize - 1
    }
    #[inline]
    fn matches(self, hash: u32) -> bool {
        (self ^ hash) >> 16 == 0
    }
    #[inline]
    fn home_of(hash: u32, mask: usize) -> usize {
        (hash >> 16) as usize & mask
    }
    #[inline]
    fn home(self, mask: usize) -> usize {
        Self::home_of(self, mask)
    }
}

/// Where a map's entries live, by position: appended at the end, removed by moving the
/// last into the hole.
pub trait Store<T>: Default {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, pos: usize) -> &T;
    fn get_mut(&mut self, pos: usize) -> &mut T;
    fn push(&mut self, v: T);
    /// Removes the entry at `pos`; the last takes its place.
    fn swap_remove(&mut self, pos: usize) -> T;
    fn swap(&mut self, a: usize, b: usize);
    fn truncate(&mut self, n: usize);
    fn iter<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a;
    /// Bytes held on the heap, by capacity.
    fn heap_bytes(&self) -> usize;
    /// Where the entry at `pos < len` lies (for prefetching).
    fn addr(&self, pos: usize) -> *const T;
    /// Where the next entry will be appended (for prefetching), or null.
    fn end_addr(&self) -> *const T;
    /// Asks the CPU to fetch what finding an entry's address reads.
    fn prefetch_directory(&self) {}
    /// Gives memory back when much of it is unused.
    fn shrink(&mut self);
}

impl<T> Store<T> for Vec<T> {
    #[inline]
    fn len(&self) -> usize {
        Vec::len(self)
    }
    #[inline]
    fn get(&self, pos: usize) -> &T {
        &self[pos]
    }
    #[inline]
    fn get_mut(&mut self, pos: usize) -> &mut T {
        &mut self[pos]
    }
    #[inline]
    fn push(&mut self, v: T) {
        Vec::push(self, v);
    }
    fn swap_remove(&mut self, pos: usize) -> T {
        Vec::swap_remove(self, pos)
    }
    fn swap(&mut self, a: usize, b: usize) {
        self.as_mut_slice().swap(a, b);
    }
    fn truncate(&mut self, n: usize) {
        Vec::truncate(self, n);
    }
    fn iter<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.as_slice().iter()
    }
    fn heap_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<T>()
    }
    #[inline]
    fn addr(&self, pos: usize) -> *const T {
        self.as_ptr().wrapping_add(pos)
    }
    #[inline]
    fn end_addr(&self) -> *const T {
        self.as_ptr().wrapping_add(Vec::len(self))
    }
    /// Keeps half again the entries as room once at most half of the capacity is used.
    fn shrink(&mut self) {
        let len = Vec::len(self);
        if self.capacity() > 16 && len < self.capacity() / 2 {
            self.shrink_to(len + len / 2);
        }
    }
}

/// Entries a chunk of [`Chunked`] holds.
pub const CHUNK: usize = 16;
const CHUNK_SHIFT: u32 = CHUNK.trailing_zeros();

/// Entries in chunks of [`CHUNK`]: the first grows by doubling up to a chunk (most
/// tables are small), the others are made whole. Position `p` is entry `p % CHUNK` of
/// chunk `p / CHUNK`; every chunk before the last in use is full. Emptied chunks stay
/// until [`Store::shrink`], so a table whose count wanders across a chunk boundary does
/// not free and take a chunk each time.
#[derive(Debug)]
pub struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
    /// Where the next entry goes when its chunk has room, else 0: kept so that asking
    /// for it ahead ([`Store::end_addr`]) reads no chunk pointer.
    end: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            end: 0,
        }
    }
}

impl<T: Clone> Clone for Chunked<T> {
    fn clone(&self) -> Self {
        let mut c = Self {
            chunks: self.chunks.clone(),
            len: self.len,
            end: 0,
        };
        c.note_end();
        c
    }
}

impl<T> Chunked<T> {
    fn note_end(&mut self) {
        self.end = match self.chunks.as_slice().get(self.len >> CHUNK_SHIFT) {
            Some(c) if c.capacity() > c.len() => c.as_ptr().wrapping_add(c.len()) as usize,
            _ => 0,
        };
    }
}

impl<T> Store<T> for Chunked<T> {
    #[inline]
    fn len(&self) -> usize {
        self.len
    }
    #[inline]
    fn get(&self, pos: usize) -> &T {
        debug_assert!(pos < self.len);
        &self.chunks[pos >> CHUNK_SHIFT][pos & (CHUNK - 1)]
    }
    #[inline]
    fn get_mut(&mut self, pos: usize) -> &mut T {
        debug_assert!(pos < self.len);
        &mut self.chunks[pos >> CHUNK_SHIFT][pos & (CHUNK - 1)]
    }
    #[inline]
    fn push(&mut self, v: T) {
        let c = self.len >> CHUNK_SHIFT;
        if c == self.chunks.len() {
            self.chunks.push(Vec::new());
        }
        let chunk = &mut self.chunks[c];
        if chunk.len() == chunk.capacity() {
            // Doubling from 4 within the first chunk; a later one at once in full.
            let want = if c == 0 {
                (chunk.capacity() * 2).clamp(4, CHUNK)
            } else {
                CHUNK
            };
            chunk.reserve_exact(want - chunk.len());
        }
        chunk.push(v);
        self.len += 1;
        self.note_end();
    }
    fn swap_remove(&mut self, pos: usize) -> T {
        assert!(pos < self.len, "position {pos} of {}", self.len);
        let last = self.len - 1;
        let tail = self.chunks[last >> CHUNK_SHIFT]
            .pop()
            .expect("the last chunk in use holds the last entry");
        self.len = last;
        self.note_end();
        if pos == last {
            tail
        } else {
            std::mem::replace(self.get_mut(pos), tail)
        }
    }
    fn swap(&mut self, a: usize, b: usize) {
        let (lo, hi) = (a.min(b), a.max(b));
        let (cl, ch) = (lo >> CHUNK_SHIFT, hi >> CHUNK_SHIFT);
        if cl == ch {
            self.chunks[cl].swap(lo & (CHUNK - 1), hi & (CHUNK - 1));
        } else {
            let (head, tail) = self.chunks.split_at_mut(ch);
            std::mem::swap(
                &mut head[cl][lo & (CHUNK - 1)],
                &mut tail[0][hi & (CHUNK - 1)],
            );
        }
    }
    fn truncate(&mut self, n: usize) {
        while self.len > n {
            self.chunks[(self.len - 1) >> CHUNK_SHIFT].pop();
            self.len -= 1;
        }
        self.note_end();
    }
    fn iter<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.chunks.as_slice().iter().flatten()
    }
    fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<T>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<T>())
                .sum::<usize>()
    }
    #[inline]
    fn addr(&self, pos: usize) -> *const T {
        self.chunks[pos >> CHUNK_SHIFT]
            .as_ptr()
            .wrapping_add(pos & (CHUNK - 1))
    }
    #[inline]
    fn end_addr(&self) -> *const T {
        self.end as *const T
    }
    /// The first four lines of chunk pointers (ten chunks).
    #[inline]
    fn prefetch_directory(&self) {
        let bytes = self.chunks.len() * std::mem::size_of::<Vec<T>>();
        let base = self.chunks.as_ptr().cast::<u8>();
        for l in 0..bytes.div_ceil(64).min(4) {
            prefetch_read(base.wrapping_add(l * 64));
        }
    }
    /// Frees the emptied chunks; a first chunk that is the only one keeps half again its
    /// entries as room once at most half of it is used.
    fn shrink(&mut self) {
        self.chunks.truncate(self.len.div_ceil(CHUNK));
        if self.chunks.capacity() > 2 * self.chunks.len().max(2) {
            self.chunks.shrink_to(self.chunks.len());
        }
        if let [only] = self.chunks.as_mut_slice() {
            let len = only.len();
            if only.capacity() > 4 && len < only.capacity() / 2 {
                only.shrink_to(len + len / 2);
            }
        }
        self.note_end();
    }
}

#[derive(Clone, Debug)]
pub struct DenseMap<K, V, S = (), I = u64, E = Vec<(K, V)>> {
    entries: E,
    /// One stamp per entry, at the same position.
    stamps: Vec<S>,
    index: Vec<I>,
    _kv: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K, V, S, I, E: Default> Default for DenseMap<K, V, S, I, E> {
    fn default() -> Self {
        Self {
            entries: E::default(),
            stamps: Vec::new(),
            index: Vec::new(),
            _kv: std::marker::PhantomData,
        }
    }
}

/// The hash a [`DenseMap`] files `k` under (the same in every map: no seed), for the
/// `*_hashed` lookups of a caller that asks for one key several times.
#[inline]
pub fn key_hash<K: Hash>(k: &K) -> u32 {
    hash_of(k)
}

#[inline]
fn hash_of<K: Hash>(k: &K) -> u32 {
    let h = FxBuildHasher.hash_one(k);
    // Fx leaves the low bits weak for small integer keys: fold the high half in.
    (h ^ (h >> 32)) as u32
}

impl<K: Hash + Eq, V, S, I: Slot, E: Store<(K, V)>> DenseMap<K, V, S, I, E> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// Bytes the map holds on the heap (entries, stamps and index, by capacity).
    pub fn heap_bytes(&self) -> usize {
        self.entries.heap_bytes()
            + self.stamps.capacity() * std::mem::size_of::<S>()
            + self.index.capacity() * std::mem::size_of::<I>()
    }

    /// Asks the CPU to fetch the index slot where `k` would be found.
    #[inline]
    pub fn prefetch(&self, k: &K) {
        self.prefetch_hashed(hash_of(k));
    }

    /// [`Self::prefetch`] of the key whose [`key_hash`] is `h`.
    #[inline]
    pub fn prefetch_hashed(&self, h: u32) {
        if self.index.is_empty() {
            return;
        }
        let i = I::home_of(h, self.index.len() - 1);
        prefetch_read(self.index.as_ptr().wrapping_add(i));
    }

    /// Asks the CPU to fetch what finding an entry's address reads (a chunked store's
    /// chunk pointers).
    #[inline]
    pub fn prefetch_directory(&self) {
        self.entries.prefetch_directory();
    }

    /// Asks the CPU to fetch where the next entry would be appended.
    #[inline]
    pub fn prefetch_end(&self) {
        let end = self.entries.end_addr();
        if !end.is_null() {
            prefetch_read(end);
        }
        prefetch_read(self.stamps.as_ptr().wrapping_add(self.stamps.len()));
    }

    /// The index slot of `k` (Ok) or the empty slot where it would go (Err).
    #[inline]
    fn find_slot(&self, k: &K, h: u32) -> Result<usize, usize> {
        let mask = self.index.len() - 1;
        let mut i = I::home_of(h, mask);
        loop {
            let s = self.index[i];
            if s.is_empty() {
                return Err(i);
            }
            if s.matches(h) && self.entries.get(s.pos()).0 == *k {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Position of `k` in the dense entries.
    #[inline]
    pub fn position(&self, k: &K) -> Option<usize> {
        self.position_hashed(k, hash_of(k))
    }

    /// [`Self::position`] of `k`, whose [`key_hash`] is `h`.
    #[inline]
    pub fn position_hashed(&self, k: &K, h: u32) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        debug_assert_eq!(h, hash_of(k), "a hash of another key");
        self.find_slot(k, h).ok().map(|i| self.index[i].pos())
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.position(k).is_some()
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.position(k).map(|p| &self.entries.get(p).1)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.position(k).map(|p| &mut self.entries.get_mut(p).1)
    }

    /// The entry at a position from [`Self::position`] or [`Self::insert_new`].
    pub fn at_mut(&mut self, pos: usize) -> &mut V {
        &mut self.entries.get_mut(pos).1
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

    /// Inserts a key known to be absent, with its stamp; returns its position. Panics
    /// beyond [`Slot::MAX_ENTRIES`] entries (the caller bounds its table below that).
    /// Always inlined: a call of its own for every new peer when the profile's code
    /// around it grew.
    #[inline(always)]
    pub fn insert_stamped(&mut self, k: K, v: V, stamp: S) -> usize {
        let pos = self.len();
        assert!(
            pos < I::MAX_ENTRIES,
            "a table of at most {} entries",
            I::MAX_ENTRIES
        );
        if (pos + 1) * 2 > self.index.len() {
            self.grow_index();
        }
        let h = hash_of(&k);
        let i = match self.find_slot(&k, h) {
            Err(i) => i,
            Ok(_) => panic!("insert_new: key already present"),
        };
        self.entries.push((k, v));
        self.stamps.push(stamp);
        self.index[i] = I::new(h, pos);
        pos
    }

    fn grow_index(&mut self) {
        self.resize_index((self.index.len() * 2).max(8));
    }

    /// Moves the slots into an index of `cap` slots (a power of two), by their hashes.
    fn resize_index(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.index, vec![I::default(); cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|s| !s.is_empty()) {
            let mut i = s.home(mask);
            while !self.index[i].is_empty() {
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
        let (k, v) = self.entries.get(pos);
        (k, v)
    }

    /// The entry at `pos`, its value mutable.
    pub fn pair_mut(&mut self, pos: usize) -> (&K, &mut V) {
        let (k, v) = self.entries.get_mut(pos);
        (&*k, v)
    }

    /// Removes the entry at `pos`; the last entry takes its place.
    pub fn remove_at(&mut self, pos: usize) -> (K, V) {
        let k = &self.entries.get(pos).0;
        let i = self
            .find_slot(k, hash_of(k))
            .expect("every entry has a slot");
        self.remove_at_slot(i)
    }

    /// Asks the CPU to fetch the entry at `pos` (when it exists).
    #[inline]
    pub fn prefetch_at(&self, pos: usize) {
        if pos < self.len() {
            // Every line the entry spans (it need not start on a line).
            let start = self.entries.addr(pos) as usize;
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
        if pos < self.len() {
            self.prefetch(&self.entries.get(pos).0);
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
        if self.is_empty() {
            return None;
        }
        let i = self.find_slot(k, hash_of(k)).ok()?;
        Some(self.remove_at_slot(i).1)
    }

    fn remove_at_slot(&mut self, i: usize) -> (K, V) {
        let pos = self.index[i].pos();
        self.clear_slot(i);
        let last = self.len() - 1;
        if pos != last {
            // The last entry moves into the hole: its slot points to it there.
            let k = &self.entries.get(last).0;
            let h = hash_of(k);
            let j = self.find_slot(k, h).expect("every entry has a slot");
            self.index[j] = I::new(h, pos);
        }
        self.stamps.swap_remove(pos);
        self.entries.swap_remove(pos)
    }

    /// Empties slot `i` of the index.
    fn clear_slot(&mut self, i: usize) {
        clear_linear(&mut self.index, i, |s, mask| s.home(mask));
    }

    /// Keeps the entries for which `keep` is true, in their order, in one pass: the kept
    /// entries move up over the others, then the index is rebuilt.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let n = self.len();
        let mut kept = 0;
        for pos in 0..n {
            let (k, v) = self.entries.get_mut(pos);
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
        self.index.iter_mut().for_each(|s| *s = I::default());
        let mask = self.index.len() - 1;
        for pos in 0..kept {
            let h = hash_of(&self.entries.get(pos).0);
            let mut i = I::home_of(h, mask);
            while !self.index[i].is_empty() {
                i = (i + 1) & mask;
            }
            self.index[i] = I::new(h, pos);
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
            // The last entry moves to `pos`, which is examined next.
            let (k, v) = self.remove_at(pos);
            removed(k, v);
        }
    }

    /// Asks the CPU to fetch the entry of `k` (its index slot should already be in the
    /// cache, from [`Self::prefetch`]): the entries whose slot tag matches, without
    /// comparing keys.
    #[inline]
    pub fn prefetch_entry(&self, k: &K) {
        self.prefetch_entry_hashed(hash_of(k));
    }

    /// [`Self::prefetch_entry`] of the key whose [`key_hash`] is `h`.
    #[inline]
    pub fn prefetch_entry_hashed(&self, h: u32) {
        if self.index.is_empty() {
            return;
        }
        let mask = self.index.len() - 1;
        let mut i = I::home_of(h, mask);
        loop {
            let s = self.index[i];
            if s.is_empty() {
                return;
            }
            if s.matches(h) {
                self.prefetch_at(s.pos());
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

    /// Gives memory back when at most half of it is used (see each [`Store::shrink`]),
    /// and the index when it is twice the size an insert would give it. (Keeping a
    /// doubled capacity until a quarter is used let capacities creep up: a table whose
    /// count wanders around a power of two passes it now and then and kept the double.)
    pub fn shrink(&mut self) {
        let len = self.len();
        self.entries.shrink();
        if self.stamps.capacity() > 16 && len < self.stamps.capacity() / 2 {
            self.stamps.shrink_to(len + len / 2);
        }
        let want = ((len + 1) * 2).next_power_of_two().max(8);
        if want * 2 <= self.index.len() {
            self.resize_index(want);
        }
    }
}

/// Empties slot `i` of a linear-probing table of slots (the default value is empty) and
/// shifts back the slots after it that probed past it, so that no tombstone is needed.
/// `home(slot, mask)` is where a slot's key hashes to.
pub(super) fn clear_linear<T: Copy + Default + PartialEq>(
    slots: &mut [T],
    mut i: usize,
    home: impl Fn(T, usize) -> usize,
) {
    let mask = slots.len() - 1;
    let empty = T::default();
    let mut j = i;
    loop {
        j = (j + 1) & mask;
        let s = slots[j];
        if s == empty {
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
    slots[i] = empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
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

    /// Runs `ops` on a map with slots `I` and store `E` and on a std HashMap: both hold
    /// the same after each, every key is found through the index, and every stamp follows
    /// its entry (the stamp of each entry is its value).
    fn check<I: Slot, E: Store<(u16, u32)>>(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut m: DenseMap<u16, u32, u32, I, E> = DenseMap::default();
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
                    let mut want: Vec<(u16, u32)> = r
                        .iter()
                        .filter(|(_, v)| **v < below)
                        .map(|(k, v)| (*k, *v))
                        .collect();
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
            let occupied = m.index.iter().filter(|s| !s.is_empty()).count();
            prop_assert_eq!(occupied, r.len());
            prop_assert_eq!(m.iter().count(), r.len());
            for (_, v, s) in m.iter_stamped() {
                prop_assert_eq!(v, s);
            }
        }
        for k in 0u16..200 {
            prop_assert_eq!(m.contains_key(&k), r.contains_key(&k));
        }
        Ok(())
    }

    proptest! {
        /// The map holds exactly what a std HashMap holds under any sequence of inserts,
        /// removals, retains and shrinks: with 8-byte slots and one vector (the hosts)...
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 1..600)) {
            check::<u64, Vec<(u16, u32)>>(ops)?;
        }

        /// ...and with 4-byte slots and chunks (a host's peers; 200 keys span 13 chunks).
        #[test]
        fn behaves_like_a_hash_map_chunked(ops in proptest::collection::vec(op(), 1..600)) {
            check::<u32, Chunked<(u16, u32)>>(ops)?;
        }
    }

    /// A chunked table grows without moving its entries: an entry's address stays while
    /// others are appended, and only the first chunk is ever smaller than a chunk.
    #[test]
    fn chunks_never_move() {
        let mut m: DenseMap<u32, u64, (), u32, Chunked<(u32, u64)>> = DenseMap::default();
        for k in 0..CHUNK as u32 {
            m.insert_new(k, u64::from(k));
        }
        let first = m.entries.addr(0);
        for k in CHUNK as u32..1000 {
            m.insert_new(k, u64::from(k));
        }
        assert_eq!(m.entries.addr(0), first);
        // The next entry's place, as asked for ahead, is where it lands (1000 entries
        // leave room in the last chunk).
        let end = m.entries.end_addr();
        m.insert_new(1000, 1000);
        assert_eq!(m.entries.addr(1000), end);
        let caps: Vec<usize> = m.entries.chunks.iter().map(Vec::capacity).collect();
        assert_eq!(caps.len(), 1000usize.div_ceil(CHUNK));
        assert!(caps.iter().all(|&c| c == CHUNK), "{caps:?}");
        // Removing all but 5 and shrinking frees all chunks but the first.
        for k in 5..=1000 {
            assert_eq!(m.remove(&k), Some(u64::from(k)));
        }
        m.shrink();
        assert_eq!(m.entries.chunks.len(), 1);
        for k in 0..5 {
            assert!(m.contains_key(&k));
        }
    }
}
