//! Pinned state (`run --pin-path`): the meter outlives the agent.
//!
//! Each metered interface has a directory on the BPF file system (default
//! `/sys/fs/bpf/detector/IFACE`) holding:
//! - the maps, pinned by name: the flow maps, the overflow ring buffer, the counters, the
//!   packet clock, and userspace's export bookkeeping (`EXPORTED`: what was already
//!   exported of each flow still in the maps; `DRAIN_STATE`: the drain's counters);
//! - the links that attach the XDP and TC programs (`link_xdp`, `link_tc`): a pinned
//!   link keeps its program attached after the process that made it is gone.
//!
//! So after a crash or `kill -9` the programs keep counting into the pinned maps, and the
//! next `detector run` on the interface adopts them: it loads its programs against the
//! same maps, swaps them into the pinned links atomically (`BPF_LINK_UPDATE`, no packet
//! missed, which also upgrades the programs), reads the bookkeeping back and exports what
//! was counted and not yet exported, once. A clean stop removes everything;
//! `--keep-attached` leaves it in place for the next agent (an upgrade).
//!
//! The directory is locked (`flock`) while an agent uses it: a second agent on the same
//! interface is refused.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use detector_common::{
    CLOCK_MAP, COUNTERS_MAP, DRAIN_STATE_MAP, EXPORTED_MAP, FLOWS4_MAP, FLOWS4_SLOTS_MAP,
    FLOWS6_MAP, NEW_FLOWS_MAP, OVERFLOW_MAP, SLOT_SEED_MAP,
};

/// Every map of the object, pinned under its name. A directory an earlier release
/// pinned lacks the slot table and its seed: they are created and pinned beside the rest.
pub const MAPS: [&str; 10] = [
    FLOWS4_MAP,
    FLOWS4_SLOTS_MAP,
    SLOT_SEED_MAP,
    FLOWS6_MAP,
    OVERFLOW_MAP,
    NEW_FLOWS_MAP,
    COUNTERS_MAP,
    CLOCK_MAP,
    EXPORTED_MAP,
    DRAIN_STATE_MAP,
];
/// The pinned links of the XDP and the TC program.
pub const XDP_LINK: &str = "link_xdp";
pub const TC_LINK: &str = "link_tc";

/// Where the BPF file system is usually mounted.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

fn mount_bpf_fs(root: &Path) -> Result<(), PinError> {
    let target = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        log::warn!("mounting the BPF file system at {}: {e}", root.display());
        return Err(PinError::NotBpfFs(root.to_path_buf()));
    }
    log::info!("mounted the BPF file system at {}", root.display());
    Ok(())
}

/// `statfs` magic of the BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on the BPF file system: mount it (`mount -t bpf bpf /sys/fs/bpf`), give --pin-path a directory on it, or run without pinning (--pin-path none)"
    )]
    NotBpfFs(PathBuf),
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another detector already meters {iface} (it holds {path}); stop it first (`systemctl stop detector`, or SIGTERM), or give this one another --pin-path"
    )]
    Busy { iface: String, path: PathBuf },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An interface's pin directory, locked for this agent.
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
    /// Why the pins may not outlive this process, if they may not (see
    /// [`PinDir::private_mount`]); judged when the directory is opened, before the agent
    /// gives up the privileges it takes to look at PID 1.
    pub short_lived: Option<String>,
    /// Holds the `flock` while open.
    _lock: File,
}

impl PinDir {
    /// Creates (if need be) and locks `base/iface`. When `base` is under
    /// `/sys/fs/bpf` and nothing is mounted there, mounts the BPF file system there
    /// first, as systemd and bpftool do.
    pub fn open(base: &Path, iface: &str) -> Result<Self, PinError> {
        let root = Path::new(BPF_FS_ROOT);
        let mut mounted_here = false;
        if base.starts_with(root) && root.is_dir() && !on_bpf_fs(root) {
            mount_bpf_fs(root)?;
            mounted_here = true;
        }
        let path = base.join(iface);
        std::fs::create_dir_all(&path).map_err(|source| PinError::Create {
            path: path.clone(),
            source,
        })?;
        if !on_bpf_fs(&path) {
            return Err(PinError::NotBpfFs(base.to_path_buf()));
        }
        let lock = File::open(&path).map_err(|source| PinError::Lock {
            path: path.clone(),
            source,
        })?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                PinError::Busy {
                    iface: iface.to_string(),
                    path,
                }
            } else {
                PinError::Lock { path, source: e }
            });
        }
        let short_lived = private_mount(&path, mounted_here);
        Ok(Self {
            path,
            short_lived,
            _lock: lock,
        })
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether an earlier agent left pinned maps here (their counts are adopted).
    pub fn has_state(&self) -> bool {
        MAPS.iter().any(|m| self.map(m).exists())
    }

    /// Removes the link pins: once the programs' own descriptors close, they detach.
    pub fn unpin_links(&self) -> std::io::Result<()> {
        for l in [XDP_LINK, TC_LINK] {
            remove_if_present(&self.link(l))?;
        }
        Ok(())
    }

    /// Removes the map pins and the directory (after the maps were emptied); the lock
    /// goes with `self`.
    pub fn remove(self) -> std::io::Result<()> {
        self.unpin_links()?;
        for m in MAPS {
            remove_if_present(&self.map(m))?;
        }
        std::fs::remove_dir(&self.path)
    }
}

/// Why pins under `path` may not outlive this process, if they may not: the BPF file
/// system holding them belongs to a mount namespace other than the host's (PID 1's),
/// and is not the host's own mount seen through it. `ip netns exec` (and containers)
/// give a process a private mount namespace in which /sys is mounted anew; a BPF file
/// system mounted there disappears with the namespace, so do its pins, and the next
/// agent finds nothing to adopt. Where PID 1's mount namespace cannot be read, a BPF
/// file system this process had to mount itself (`mounted_here`) is the sign.
fn private_mount(path: &Path, mounted_here: bool) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok();
    let fix = "Run the agent in the host's mount namespace (`nsenter --net=/var/run/netns/NAME detector run ...` instead of `ip netns exec NAME ...`), or bind-mount the host's /sys/fs/bpf into the namespace or container (`-v /sys/fs/bpf:/sys/fs/bpf`), or give --pin-path a BPF file system the host mounted";
    match (ns("self"), ns("1")) {
        (Some(ours), Some(host)) => {
            if (ours.dev(), ours.ino()) == (host.dev(), host.ino()) {
                return None;
            }
            // The same superblock seen from PID 1 (a bind mount of the host's BPF file
            // system, or a mount made before the namespace was copied) keeps the pins.
            let here = std::fs::metadata(path).ok()?;
            let in_host = Path::new("/proc/1/root").join(path.strip_prefix("/").ok()?);
            if std::fs::metadata(&in_host).is_ok_and(|h| h.dev() == here.dev()) {
                return None;
            }
            Some(format!(
                "the BPF file system holding {} belongs to this process's own mount namespace (not the host's, PID 1's): the pins vanish when the agent exits, and a restarted agent cannot adopt the meter. {fix}",
                path.display()
            ))
        }
        _ if mounted_here => Some(format!(
            "this process had to mount the BPF file system holding {} itself (nothing was mounted at {BPF_FS_ROOT}); if it runs in a mount namespace of its own, as under `ip netns exec` or in a container, the pins vanish when the agent exits and a restarted agent cannot adopt the meter. {fix}",
            path.display()
        )),
        _ => None,
    }
}

fn remove_if_present(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn on_bpf_fs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}
