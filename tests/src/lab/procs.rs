//! Processes the lab starts: each in a namespace, in a process group of its own (so
//! servers that fork are stopped whole), its output in a log file, stopped on drop.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `program args` inside namespace `ns`, output to `log`.
    pub fn start(ns: &str, name: &str, program: &str, args: &[String], log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        Ok(Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    /// Still running? An exited process is reported with the end of its log.
    pub fn check(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(st) = c.try_wait()?
        {
            self.child = None;
            bail!(
                "{} exited early ({st}); its log ({}) ends with:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// Sends `sig` to the process itself, not its group (a status request such as
    /// pmacctd's SIGUSR1, which its plugin processes would not expect).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        kill(Pid::from_raw(child.id() as i32), sig)
            .with_context(|| format!("signalling {} ({sig})", self.name))
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the whole process group: the lab pauses
    /// its traffic while headless Chromium renders a page (see `drilldown`).
    pub fn pause(&self, paused: bool) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        let sig = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        killpg(Pid::from_raw(child.id() as i32), sig)
            .with_context(|| format!("signalling {} ({sig})", self.name))
    }

    /// Sends `sig` to the process group and waits up to `timeout`, then kills the group.
    /// Returns whether it exited by itself.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pgid = Pid::from_raw(child.id() as i32);
        let _ = killpg(pgid, sig);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                // Children of a server (nginx workers) may outlive the leader briefly.
                let _ = killpg(pgid, Signal::SIGKILL);
                return true;
            }
            if Instant::now() > deadline {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    /// On failure or Ctrl-C: asked to stop first (so a server reaps its workers), then
    /// killed.
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM, Duration::from_secs(3));
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `path` contains `needle`; fails with the log's end after `timeout`, or
/// at once if `proc` exits.
pub fn wait_for(proc: &mut Proc, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(&proc.log)
            .map(|s| s.contains(needle))
            .unwrap_or(false)
        {
            return Ok(());
        }
        proc.check()?;
        if Instant::now() > deadline {
            bail!(
                "{} did not say '{needle}' within {timeout:?}; its log ends with:\n{}",
                proc.name,
                tail(&proc.log, 15)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}
