//! The BPF syscalls aya 0.14 does not wrap for per-CPU hash maps:
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (Linux 5.14+ for hash maps), which removes a flow and
//! returns its final per-CPU counters atomically, and the batch commands
//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_LOOKUP_AND_DELETE_BATCH` (Linux 5.6+), which read
//! (and remove) thousands of entries per syscall.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks up and deletes `key` of a (shared, not per-CPU) hash map; returns its value, or
/// `None` if absent.
pub fn lookup_and_delete<K: Copy, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    // SAFETY: attr points at a valid key and a value of the map's value size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &mut attr as *mut MapElemAttr,
            size_of::<MapElemAttr>() as u32,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(value))
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// The `batch` member of `union bpf_attr` (`BPF_MAP_*_BATCH` commands, Linux 5.6+).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Which batch command a [`BatchReader`] issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// `BPF_MAP_LOOKUP_BATCH`: reads entries, leaves them in the map.
    Lookup,
    /// `BPF_MAP_LOOKUP_AND_DELETE_BATCH`: reads and removes them, a bucket at a time.
    LookupAndDelete,
}

/// Reads a per-CPU hash map in batches of keys and per-CPU values with one syscall per
/// batch, instead of two per key (get-next-key, then lookup).
///
/// The hash map's batch token is the 4-byte bucket index where the next batch starts.
/// A batch ends at a bucket boundary; when a single bucket holds more entries than the
/// buffer, the kernel answers `ENOSPC` and the buffer is doubled.
pub struct BatchReader<K> {
    keys: Vec<K>,
    /// `capacity x ncpus x stride` bytes, 8-aligned.
    values: Vec<u64>,
    stride: usize,
    ncpus: usize,
}

impl<K: Copy + Default> BatchReader<K> {
    /// Buffers for `capacity` entries of a per-CPU map whose value is `value_size` bytes.
    pub fn new(capacity: usize, value_size: usize, ncpus: usize) -> Self {
        let stride = value_size.div_ceil(8) * 8;
        let mut r = Self {
            keys: Vec::new(),
            values: Vec::new(),
            stride,
            ncpus,
        };
        r.resize(capacity.max(1));
        r
    }

    fn resize(&mut self, capacity: usize) {
        self.keys = vec![K::default(); capacity];
        self.values = vec![0u64; capacity * self.ncpus * self.stride / 8];
    }

    fn capacity(&self) -> usize {
        self.keys.len()
    }

    /// Calls `each(key, per_cpu_values)` for every entry of the map, batch by batch.
    /// `V` must be the map's value type (plain old data of `value_size` bytes).
    pub fn for_each<V: Copy>(
        &mut self,
        fd: BorrowedFd<'_>,
        op: BatchOp,
        mut each: impl FnMut(&K, &mut dyn Iterator<Item = V>),
    ) -> io::Result<()> {
        self.read(fd, op, None, usize::MAX, &mut each).map(|_| ())
    }

    /// Reads from the bucket `start` (None: the first) until at least `quota` entries
    /// were read or the map ends, calling `each` on every entry. Returns how many were
    /// read and where the next read starts (None: the map ended).
    pub fn read<V: Copy>(
        &mut self,
        fd: BorrowedFd<'_>,
        op: BatchOp,
        start: Option<u32>,
        quota: usize,
        each: &mut dyn FnMut(&K, &mut dyn Iterator<Item = V>),
    ) -> io::Result<(usize, Option<u32>)> {
        let cmd = match op {
            BatchOp::Lookup => BPF_MAP_LOOKUP_BATCH,
            BatchOp::LookupAndDelete => BPF_MAP_LOOKUP_AND_DELETE_BATCH,
        };
        let mut token_in: Option<u32> = start;
        let mut token_out: u32 = 0;
        let mut read = 0usize;
        // Raised to the whole buffer when a bucket holds more than the quota's rest.
        let mut at_least = 1;
        while read < quota {
            let want = (quota - read).max(at_least).min(self.capacity());
            let mut attr = BatchAttr {
                in_batch: match &token_in {
                    Some(t) => t as *const u32 as u64,
                    None => 0,
                },
                out_batch: &mut token_out as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: want as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: the key buffer holds `count` keys and the value buffer `count`
            // per-CPU values of `ncpus x stride` bytes, what the kernel writes at most;
            // the tokens are 4-byte bucket indices as the hash map's batch ops use.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd,
                    &mut attr as *mut BatchAttr,
                    size_of::<BatchAttr>() as u32,
                )
            };
            let err = (rc < 0).then(io::Error::last_os_error);
            match err.as_ref().and_then(|e| e.raw_os_error()) {
                None | Some(libc::ENOENT) => {}
                Some(libc::ENOSPC) if attr.count == 0 => {
                    // One bucket holds more entries than asked for: ask for the whole
                    // buffer, and grow it when that was not enough either.
                    if want < self.capacity() {
                        at_least = self.capacity();
                    } else {
                        let bigger = self.capacity() * 2;
                        self.resize(bigger);
                        at_least = bigger;
                    }
                    continue;
                }
                Some(_) => return Err(err.expect("checked")),
            }
            let per_entry = self.ncpus * self.stride;
            let bytes = self.values.as_ptr() as *const u8;
            for i in 0..attr.count as usize {
                let base = i * per_entry;
                let stride = self.stride;
                let mut cpus = (0..self.ncpus).map(|c| {
                    // SAFETY: in bounds (count <= capacity); V is plain old data the
                    // kernel wrote at each CPU's stride.
                    unsafe { std::ptr::read_unaligned(bytes.add(base + c * stride) as *const V) }
                });
                each(&self.keys[i], &mut cpus);
            }
            read += attr.count as usize;
            if err.is_some() {
                // ENOENT: that was the last bucket.
                return Ok((read, None));
            }
            token_in = Some(token_out);
        }
        Ok((read, token_in))
    }
}

/// Whether the kernel implements the batch commands for this map. A lookup batch of zero
/// entries succeeds where they exist (Linux 5.6+ for hash and per-CPU hash maps); an
/// older kernel answers `EINVAL` for the unknown command.
pub fn batch_supported(fd: BorrowedFd<'_>) -> bool {
    let mut token_out: u32 = 0;
    let mut attr = BatchAttr {
        out_batch: &mut token_out as *mut u32 as u64,
        count: 0,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: a count of 0 asks the kernel to copy nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    rc >= 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The interface a (pinned) XDP or tcx link is attached to: `ifindex` of its
/// `bpf_link_info` (0 once the interface is gone and the link defunct).
pub fn link_ifindex(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8
    // whose xdp and tcx members start with the ifindex. Zeroed beyond what the kernel
    // knows, as it requires.
    let mut info = [0u64; 32];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a zeroed buffer of info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            size_of::<InfoAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[2] as u32)
}

const BPF_OBJ_GET: libc::c_long = 7;

/// The `obj` member of `union bpf_attr`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned BPF object.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjAttr,
            size_of::<ObjAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// The interface index a pinned link at `path` is attached to (0: none any more).
pub fn pinned_link_ifindex(path: &std::path::Path) -> io::Result<u32> {
    use std::os::fd::AsFd;
    link_ifindex(obj_get(path)?.as_fd())
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr points at key (and value) arrays of `count` entries of the map's sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `keys[i] -> values[i]` into a (shared) hash map with `BPF_MAP_UPDATE_BATCH`:
/// one syscall for them all.
pub fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr);
        // `count` says how many went in before an error.
        done += attr.count as usize;
        r?;
        if attr.count == 0 {
            break;
        }
    }
    Ok(())
}

/// Removes `keys` from a hash map with `BPF_MAP_DELETE_BATCH`; keys already absent are
/// skipped (the kernel stops at the first, which is stepped over). Returns the keys
/// removed.
pub fn delete_batch<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let (mut at, mut removed) = (0, 0);
    while at < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[at..].as_ptr() as u64,
            count: (keys.len() - at) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = batch_call(BPF_MAP_DELETE_BATCH, &mut attr);
        at += attr.count as usize;
        removed += attr.count as usize;
        match r {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}
