//! How long each test took, for the ten slowest printed at the end of `cargo xtask test`.
//!
//! A test run's standard output is passed through unchanged while it is read: run one
//! test at a time (`--test-threads=1`), libtest prints `test NAME ... ` when a test
//! starts and the result when it ends, so the time between the two is the test's own.
//! Runs on several threads print a test only when it ends: those are timed as a whole,
//! like the steps that are not cargo tests (the package check, the soak).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Default)]
pub struct Timings {
    done: Vec<(String, Duration)>,
}

/// The test named by a libtest line `test NAME ... ` (started) or `test NAME ... RESULT`.
fn test_name(line: &str) -> Option<&str> {
    line.strip_prefix("test ")?
        .split_once(" ... ")
        .map(|(n, _)| n)
}

impl Timings {
    /// Runs `cmd` (a cargo test), passing its output through, timing each test that
    /// runs alone; the whole run is timed under `what`.
    pub fn cargo_test(&mut self, what: &str, cmd: &mut Command) -> Result<()> {
        let began = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut out = child.stdout.take().context("the test run's output")?;
        let (mut line, mut buf) = (Vec::<u8>::new(), [0u8; 4096]);
        let mut started: Option<(String, Instant)> = None;
        let stdout = std::io::stdout();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the test run's output"),
            };
            let mut o = stdout.lock();
            o.write_all(&buf[..n])?;
            o.flush()?;
            for &b in &buf[..n] {
                if b != b'\n' {
                    line.push(b);
                    // A test that runs alone announces itself before it runs.
                    if b == b' '
                        && started.is_none()
                        && line.ends_with(b" ... ")
                        && let Some(name) = test_name(&String::from_utf8_lossy(&line))
                    {
                        started = Some((name.to_string(), Instant::now()));
                    }
                    continue;
                }
                let text = String::from_utf8_lossy(&line).to_string();
                if let (Some(name), Some((s, at))) = (test_name(&text), &started)
                    && name == s
                {
                    self.done.push((name.to_string(), at.elapsed()));
                }
                started = None;
                line.clear();
            }
        }
        let st = child.wait()?;
        self.done
            .push((format!("({what}, whole run)"), began.elapsed()));
        if !st.success() {
            bail!("{cmd:?} failed ({st})");
        }
        Ok(())
    }

    /// Runs a step that is not a cargo test, timed as a whole.
    pub fn step<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let began = Instant::now();
        let r = f();
        self.done.push((what.to_string(), began.elapsed()));
        r
    }

    /// The `n` slowest, slowest first, as lines.
    pub fn slowest(&self, n: usize) -> Vec<String> {
        let mut v: Vec<&(String, Duration)> = self.done.iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.into_iter()
            .take(n)
            .map(|(name, d)| format!("{:>8.1} s  {name}", d.as_secs_f64()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_name_their_test() {
        assert_eq!(test_name("test a::b ... "), Some("a::b"));
        assert_eq!(test_name("test a::b ... ok"), Some("a::b"));
        assert_eq!(test_name("test result: ok. 3 passed"), None);
        assert_eq!(test_name("running 3 tests"), None);
    }

    #[test]
    fn a_test_run_alone_is_timed_from_its_start_to_its_result() {
        let mut t = Timings::default();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "printf 'test slow ... '; sleep 0.3; echo ok; printf 'test quick ... '; echo ok",
        ]);
        t.cargo_test("fake", &mut cmd).unwrap();
        let got: std::collections::HashMap<_, _> = t.done.iter().cloned().collect();
        assert!(got["slow"] >= Duration::from_millis(250), "{got:?}");
        assert!(got["quick"] < Duration::from_millis(250), "{got:?}");
        assert!(t.slowest(1)[0].ends_with("(fake, whole run)"));
    }
}
