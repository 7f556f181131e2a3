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
