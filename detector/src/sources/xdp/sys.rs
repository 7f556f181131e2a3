//! The one BPF syscall aya 0.14 does not wrap for per-CPU hash maps:
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (Linux 5.14+ for hash maps), which removes a flow and
//! returns its final per-CPU counters atomically.

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

/// Looks up and deletes `key`; returns each possible CPU's value, or `None` if absent.
pub fn lookup_and_delete_percpu<K: Copy, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    key: &K,
    ncpus: usize,
) -> io::Result<Option<Vec<V>>> {
    // The kernel copies each CPU's value rounded up to 8 bytes.
    let stride = size_of::<V>().div_ceil(8) * 8;
    let mut buf = vec![0u8; stride * ncpus];
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: buf.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at a valid key and a buffer of ncpus * stride bytes, the size the
    // kernel writes for a per-CPU map of this value size.
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
    let values = (0..ncpus)
        .map(|i| {
            // SAFETY: in bounds; V is plain old data written by the kernel.
            unsafe { std::ptr::read_unaligned(buf.as_ptr().add(i * stride) as *const V) }
        })
        .collect();
    Ok(Some(values))
}
