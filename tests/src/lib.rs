//! Helpers shared by the integration tests: a frame builder for BPF_PROG_TEST_RUN tables,
//! network-namespace plumbing for the end-to-end tests, and the live agent with its HTTP
//! clients for the tests of what it serves.

pub mod agent;
pub mod collectors;
pub mod drilldown;
pub mod export;
pub mod frames;
pub mod http;
pub mod lab;
pub mod mutate;
pub mod netns;
pub mod release;
pub mod remap;
pub mod sflow;
pub mod sflow_switch;
pub mod tshark;

use std::path::PathBuf;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// `../shared/testdata` beside the workspace, if present.
pub fn shared_testdata() -> Option<PathBuf> {
    // Canonical: some peers (softflowd 1.1) misbehave on paths with `..`.
    std::fs::canonicalize(workspace_root().join("../shared/testdata"))
        .ok()
        .filter(|p| p.is_dir())
}

/// `promtool check metrics` on a scrape: Ok, or what promtool said (it says nothing
/// about a clean text).
pub fn promtool_check(metrics: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("promtool (package prometheus; cargo xtask setup installs it): {e}")
        })?;
    promtool
        .stdin
        .take()
        .expect("piped")
        .write_all(metrics.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = promtool.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The agent binary built by cargo for these tests.
pub fn detector_bin() -> PathBuf {
    // Integration tests of this crate run from target/<profile>/deps.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    profile_dir.join("detector")
}
