//! Helpers shared by the integration tests: a frame builder for BPF_PROG_TEST_RUN tables,
//! and network-namespace plumbing for the end-to-end tests.

pub mod export;
pub mod frames;
pub mod lab;
pub mod netns;
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
