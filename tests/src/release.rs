//! The previous release's agent, for upgrade tests: the source of a pinned commit of this
//! repository taken out of git (`git archive`, so the clone's state is untouched), built
//! once with its own target directory, its binary kept beside the tests' target as
//! `target/previous-release/detector-<commit>`. Later runs reuse that binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The last release that landed on main before the scale-out wire and state this tree
/// writes; an upgrade test starts its processes with it and replaces them with the binary
/// cargo built for the tests.
pub const PREVIOUS: &str = "ce27ede19da346861c2d9db282b3a7b3d3d24d01";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the tests crate")
        .to_path_buf()
}

/// The previous release's `detector` binary, built on the first call (several minutes:
/// its dependencies are built again in a target directory of their own, so the tests'
/// build is never touched). Panics naming the fix when the commit is not in this clone
/// (a shallow clone) or the build fails.
pub fn previous_detector() -> PathBuf {
    let target = crate::detector_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/detector")
        .join("previous-release");
    let short = &PREVIOUS[..12];
    let bin = target.join(format!("detector-{short}"));
    if bin.exists() {
        return bin;
    }
    let root = repo_root();
    let known = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        known,
        "the previous release {PREVIOUS} is not in this clone's history (a shallow clone?): \
         run `git fetch --unshallow` (or clone without --depth) and run the test again"
    );
    let src = target.join(format!("src-{short}"));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let t = Instant::now();
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive {PREVIOUS} | tar -x -C '{}'",
            root.display(),
            src.display()
        ))
        .status()
        .expect("git and tar");
    assert!(
        archive.success(),
        "git archive {PREVIOUS} failed: {archive}"
    );
    eprintln!(
        "building the previous release's detector ({short}) once, into {}",
        target.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .current_dir(&src)
        .args(["build", "-q", "-p", "detector", "--target-dir"])
        .arg(target.join("target"))
        // What the outer cargo set for this test must not steer the inner build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("RUSTFLAGS")
        .status()
        .expect("cargo");
    assert!(
        build.success(),
        "building the previous release {PREVIOUS} failed ({build}); its sources are in {}",
        src.display()
    );
    let built = target.join("target/debug/detector");
    // Copied under a name of its own, so a half-written file is never taken for it.
    let partial = target.join(format!("detector-{short}.partial"));
    std::fs::copy(&built, &partial).expect("the built binary");
    std::fs::rename(&partial, &bin).unwrap();
    eprintln!(
        "the previous release's detector built in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    bin
}
