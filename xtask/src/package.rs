//! `cargo xtask package`: a Debian package of the agent, built with dpkg-deb from a
//! staged tree: the binary, a systemd unit that runs it with capabilities instead of
//! root, a default configuration in /etc/detector (a conffile), /etc/default/detector
//! for the run arguments, the man page generated from the CLI, and a Grafana dashboard
//! and Prometheus alerting rules in /usr/share/detector. `check` installs it with dpkg,
//! verifies the unit with systemd-analyze, runs the installed binary's check-config on
//! the shipped configuration and promtool on the installed rules, then purges it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{say, status, workspace_root};

/// Files of the package that are not built: (source under xtask/package, destination,
/// mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "detector.service",
        "lib/systemd/system/detector.service",
        0o644,
    ),
    ("default", "etc/default/detector", 0o644),
    ("postinst", "DEBIAN/postinst", 0o755),
    ("postrm", "DEBIAN/postrm", 0o755),
    // The Grafana dashboard and the Prometheus alerting rules (with their unit tests).
    (
        "grafana/detector-dashboard.json",
        "usr/share/detector/grafana/detector-dashboard.json",
        0o644,
    ),
    (
        "prometheus/detector-rules.yml",
        "usr/share/detector/prometheus/detector-rules.yml",
        0o644,
    ),
    (
        "prometheus/detector-rules.test.yml",
        "usr/share/detector/prometheus/detector-rules.test.yml",
        0o644,
    ),
];

/// The installed alerting rules and their unit tests.
const RULES: &str = "/usr/share/detector/prometheus/detector-rules.yml";
const RULES_TEST: &str = "/usr/share/detector/prometheus/detector-rules.test.yml";

/// `promtool ARGS` (Debian's `prometheus`): Ok, or an error with what it said.
fn promtool(args: &[&str]) -> Result<()> {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .context("promtool (package prometheus; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "promtool {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds the package from the release binary `bin`; returns the .deb's path.
pub fn build(bin: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = String::from_utf8(output(Command::new("dpkg").arg("--print-architecture"))?)?
        .trim()
        .to_string();
    let stage = root.join("target/debian/stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;

    write(&stage.join("usr/bin/detector"), &fs::read(bin)?, 0o755)?;
    for (src, dst, mode) in FILES {
        let from = root.join("xtask/package").join(src);
        write(
            &stage.join(dst),
            &fs::read(&from).with_context(|| format!("reading {}", from.display()))?,
            *mode,
        )?;
    }
    // The default configuration: every key at its default, as check-config prints it.
    let defaults = output(Command::new(bin).args(["check-config", "/dev/null"]))?;
    let mut conf = b"# detector configuration: every key at its default. Edit, then\n# `systemctl reload detector` (SIGHUP: no flow is lost). Check with\n# `detector check-config /etc/detector/detector.toml`.\n\n".to_vec();
    conf.extend_from_slice(&defaults);
    write(&stage.join("etc/detector/detector.toml"), &conf, 0o644)?;
    write(
        &stage.join("DEBIAN/conffiles"),
        b"/etc/detector/detector.toml\n/etc/default/detector\n",
        0o644,
    )?;
    // The man page, from the CLI itself.
    let man = output(Command::new(bin).arg("man"))?;
    let man_path = stage.join("usr/share/man/man1/detector.1");
    write(&man_path, &man, 0o644)?;
    status(Command::new("gzip").args(["-9n"]).arg(&man_path))?;
    write(
        &stage.join("usr/share/doc/detector/copyright"),
        b"detector: a P2P behaviour monitor and NetFlow/IPFIX exporter.\nLicense: see the project's repository.\n",
        0o644,
    )?;
    let size_kb = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: detector\nVersion: {version}\nArchitecture: {arch}\nMaintainer: detector developers <detector@localhost>\nInstalled-Size: {size_kb}\nDepends: libc6, adduser | passwd\nSection: net\nPriority: optional\nDescription: P2P behaviour monitor and NetFlow/IPFIX exporter\n An XDP/TC flow meter that exports NetFlow v9 or IPFIX, collects NetFlow and\n IPFIX from routers, and alarms on hosts that behave like BitTorrent or other\n P2P clients, from flow behaviour alone.\n"
    );
    write(&stage.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    let deb = root.join(format!("target/debian/detector_{version}_{arch}.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&stage)
            .arg(&deb),
    )?;
    say(&format!("package: {}", deb.display()));
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}

/// Installs `deb`, checks what it installed, and purges it (leaving the machine as it
/// was): the unit passes `systemd-analyze verify`, the installed binary accepts the
/// shipped configuration, the man page and conffiles are in place, and the installed
/// alerting rules pass `promtool check rules` and their unit tests.
pub fn check(deb: &Path) -> Result<()> {
    if Path::new("/usr/bin/detector").exists()
        && output(Command::new("dpkg").args(["-s", "detector"])).is_err()
    {
        bail!("/usr/bin/detector exists and is not from the detector package: not overwriting it");
    }
    say("package: installing with dpkg");
    status(Command::new("dpkg").arg("-i").arg(deb))?;
    let result = (|| -> Result<()> {
        say("package: systemd-analyze verify detector.service");
        let out = Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/detector.service"])
            .output()
            .context("systemd-analyze (package systemd)")?;
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        // Lines about the unit itself; other units of the host are not ours to judge.
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("detector.service"))
            .collect();
        if !out.status.success() || !ours.is_empty() {
            bail!("systemd-analyze verify: {}", text.trim());
        }
        say("package: the installed binary checks the shipped configuration");
        let conf = output(
            Command::new("/usr/bin/detector").args(["check-config", "/etc/detector/detector.toml"]),
        )?;
        if !String::from_utf8_lossy(&conf).contains("[thresholds]") {
            bail!("check-config printed no configuration");
        }
        let listing = String::from_utf8(output(Command::new("dpkg").args(["-L", "detector"]))?)?;
        for f in [
            "/usr/bin/detector",
            "/lib/systemd/system/detector.service",
            "/etc/detector/detector.toml",
            "/usr/share/man/man1/detector.1.gz",
            "/usr/share/detector/grafana/detector-dashboard.json",
            RULES,
            RULES_TEST,
        ] {
            if !listing.lines().any(|l| l == f) {
                bail!("the package does not install {f}");
            }
        }
        output(Command::new("getent").args(["passwd", "detector"]))
            .context("postinst created no `detector` user")?;
        say("package: promtool checks and tests the installed alerting rules");
        promtool(&["check", "rules", RULES]).context("the shipped Prometheus rules do not load")?;
        promtool(&["test", "rules", RULES_TEST])
            .context("the shipped Prometheus rules fail their unit tests")?;
        Ok(())
    })();
    say("package: purging it again");
    let purge = status(Command::new("dpkg").args(["-P", "detector"]));
    result?;
    purge
}
