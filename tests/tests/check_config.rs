//! `detector check-config FILE`: prints the effective configuration, or an error that
//! names the key and the fix.

use std::process::Command;

#[test]
fn check_config_prints_the_effective_configuration_or_names_the_bad_key() {
    let bin = tests::detector_bin();
    assert!(
        bin.exists(),
        "{} missing: cargo xtask test builds it",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("detector-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[detection]\nwindow_secs = 600\n[thresholds]\nscore = 8.0\n",
    )
    .unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("window_secs = 600") && text.contains("score = 8.0"),
        "{text}"
    );
    assert!(
        text.contains("internal = ["),
        "defaults are printed too: {text}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[allow]\nhosts = [\"10.0.0.300\"]\n").unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("allow.hosts") && e.contains("10.0.0.300"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
