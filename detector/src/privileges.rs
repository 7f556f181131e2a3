//! Early, clear answers to "am I allowed to load BPF and attach to interfaces?".

use std::fs;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Names of the capabilities the meter needs and this process lacks (empty when fine).
pub fn missing_capabilities() -> Vec<&'static str> {
    let Some(eff) = effective_capabilities() else {
        return Vec::new();
    };
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// An error message naming the missing capabilities and the fix, or `None`.
pub fn check(what: &str) -> Option<String> {
    let missing = missing_capabilities();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "{what} needs {} (missing: {}); run as root (sudo), or grant them with `sudo setcap cap_bpf,cap_perfmon,cap_net_admin+ep PATH-TO-detector`",
        "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
        missing.join(", ")
    ))
}

/// The capabilities a running agent keeps once its programs are attached and its maps
/// and sockets open: CAP_NET_ADMIN, to detach the programs at exit. Reading and
/// emptying the maps goes through the file descriptors it already holds.
pub const KEPT_WHILE_RUNNING: &[u32] = &[CAP_NET_ADMIN];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the calling thread's effective and permitted capabilities to `keep` (inheritable
/// and ambient none). Linux keeps capabilities per thread: every thread must drop its own.
fn set_thread_capabilities(keep: &[u32]) -> std::io::Result<()> {
    // A thread cannot gain what it does not hold: keep only what is permitted now.
    let permitted = fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapPrm:"))?.to_string();
            u64::from_str_radix(line.trim_start_matches("CapPrm:").trim(), 16).ok()
        })
        .unwrap_or(u64::MAX);
    let mask: u64 = keep.iter().fold(0, |m, &c| m | (1u64 << c)) & permitted;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        CapData {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a clear of the ambient set takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    // SAFETY: header and data are valid for the call (version 3 takes two data words).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// For a thread that needs no privilege (shards, sinks, decoders, timers): drops all of
/// its capabilities. Harmless when there were none.
pub fn drop_thread_capabilities() {
    if let Err(e) = set_thread_capabilities(&[]) {
        log::debug!("dropping this thread's capabilities: {e}");
    }
}

/// For the main thread once the programs are attached and the maps and sockets open:
/// keeps `keep` only, drops the rest from the bounding set too, and forbids gaining
/// privileges again (no_new_privs). Threads started before must have dropped their own.
pub fn keep_only(keep: &[u32]) -> std::io::Result<()> {
    let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if !keep.contains(&cap) {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    set_thread_capabilities(keep)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
