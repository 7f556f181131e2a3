//! Output that cannot be written fails well: a replay into a full device logs its write
//! errors a few times with counts (not once a record) and exits non-zero; a replay whose
//! reader goes away ends as Unix tools do, without a panic.
//!
//! Uses `replay --netflow` (no BPF needed) on a capture of `../shared/testdata`; skips
//! with a message when it is absent.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn capture() -> Option<PathBuf> {
    let p = tests::shared_testdata()?.join(
        "netflow/pmacct-test-automation__401-IPFIXv10-BMP-IPv6-CISCO-MPLS-multiple-sources__traffic-00.pcap",
    );
    p.is_file().then_some(p)
}

#[test]
fn a_full_device_is_reported_a_few_times_with_counts_and_fails_the_replay() {
    let Some(cap) = capture() else {
        eprintln!("skipped: ../shared/testdata/netflow is absent");
        return;
    };
    let out = Command::new(tests::detector_bin())
        .args(["replay", "--netflow"])
        .arg(&cap)
        .args(["--flows-json", "/dev/full"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The failures the run reports at its end, and the warnings it logged on the way.
    let failed: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no final error line: {stderr}"));
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("writing flow records to /dev/full"))
        .count() as u64;
    assert!(failed >= 16, "{failed} failures: {stderr}");
    // One line at each power of two of the count.
    assert_eq!(warnings, u64::from(failed.ilog2()) + 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{failed} write errors")),
        "the statistics line counts them: {stderr}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_replay_without_a_panic() {
    let Some(cap) = capture() else {
        eprintln!("skipped: ../shared/testdata/netflow is absent");
        return;
    };
    let mut child = Command::new(tests::detector_bin())
        .args(["replay", "--netflow"])
        .arg(&cap)
        .args(["--flows-json", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    // Like `2>&1 | head -1`: read one line of the log, then close the pipe.
    let mut first = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut first)
        .expect("reads a line");
    assert!(!first.is_empty(), "a first line");
    let status = child.wait().expect("ends");
    assert_ne!(status.code(), Some(101), "panicked: {status:?}");
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}"
    );
}

/// Errors read cleanly: the OS error once, no debug formatting, the hint that fits the
/// cause, TOML errors with the line and the caret under the fault.
#[test]
fn error_messages_say_the_cause_once_with_the_fitting_hint() {
    let run = |args: &[&str]| -> String {
        let out = Command::new(tests::detector_bin())
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    if let Some(cap) = capture() {
        let e = run(&[
            "replay",
            "--netflow",
            cap.to_str().unwrap(),
            "--alarms-json",
            "/nonexistent/dir/a.json",
        ]);
        let line = e
            .lines()
            .find(|l| l.starts_with("error: "))
            .expect("error line");
        assert!(line.contains("/nonexistent/dir/a.json"), "{line}");
        assert!(!line.contains("Some("), "{line}");
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
    }
    // 192.0.2.0/24 is documentation space: never an address of this host.
    let e = run(&["run", "--netflow-listen", "192.0.2.1:2055"]);
    let line = e
        .lines()
        .find(|l| l.starts_with("error: "))
        .expect("error line");
    assert!(line.contains("not one of this host's"), "{line}");
    assert!(!line.contains("another collector"), "{line}");
    assert_eq!(line.matches("os error 99").count(), 1, "{line}");

    let dir = std::env::temp_dir().join(format!("detector-errs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[detection]\nwindow_secs = \"x\"\n").unwrap();
    let e = run(&["check-config", bad.to_str().unwrap()]);
    assert!(e.contains("line 2"), "{e}");
    assert!(
        e.lines()
            .any(|l| l.trim_start().starts_with('|') && l.contains('^')),
        "the caret line: {e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
