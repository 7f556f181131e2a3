//! The lab's host drill-down (issue #24): while the agent still runs, right after the
//! traffic (paused by the caller: see `run` in the lab's module), each chosen host's view
//! is rendered by headless Chromium in the gateway's namespace, beside the agent's
//! `/api/hosts/{ip}` of the same evaluation, so that the lab test can check the page's
//! figures against the API on real clients and servers.

use std::fs;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::topology::{self, GW};
use super::{STATUS_ADDR, say};
use crate::drilldown::{chromium, try_attr};

/// The hosts whose view the lab renders: a BitTorrent client and a benign server with
/// hundreds of clients.
pub const HOSTS: &[&str] = &["leech", "web"];

/// Where a host's files are: `DIR/drilldown/NAME.json` (its `/api/hosts/{ip}`),
/// `NAME.html` (the page's DOM, of the same evaluation), `NAME.png` (a screenshot).
pub fn path(dir: &Path, name: &str, ext: &str) -> std::path::PathBuf {
    dir.join("drilldown").join(format!("{name}.{ext}"))
}

/// Renders the view of each of `hosts` (name, address) and keeps it with the API's
/// answer of the same evaluation. The agent evaluates every 10 s and a headless Chromium
/// run on a loaded machine can take a minute, so the API is read once a second for as
/// long as the page renders, every answer kept, and the one of the page's evaluation is
/// chosen; a few tries if the page shows none.
pub fn capture(dir: &Path, hosts: &[(&str, String)]) -> Result<()> {
    let profile = dir.join("drilldown/chromium");
    fs::create_dir_all(&profile)?;
    for (name, addr) in hosts {
        let api_url = format!("http://{STATUS_ADDR}/api/hosts/{addr}");
        let page_url = format!("http://{STATUS_ADDR}/#host={addr}");
        const TRIES: u32 = 6;
        let mut found = None;
        for attempt in 1..=TRIES {
            let log = path(dir, name, "chromium.log");
            let (out, answers, secs) = render_while_polling(&api_url, || {
                let mut c = chromium(
                    Some(GW),
                    &profile,
                    &page_url,
                    &["--dump-dom", "--enable-logging=stderr", "--v=0"],
                );
                c.stderr(fs::File::create(&log)?);
                c.output().context("running chromium")
            })?;
            let dom = String::from_utf8_lossy(&out.stdout).into_owned();
            let at = try_attr(&dom, "host-view", "data-evaluated-at").filter(|a| !a.is_empty());
            if let Some(api) = answers
                .iter()
                .find(|a| at.is_some() && a["evaluated_at"].as_str() == at.as_deref())
            {
                found = Some((api.clone(), dom));
                break;
            }
            let mut seen: Vec<String> = answers
                .iter()
                .map(|a| a["evaluated_at"].as_str().unwrap_or("none").to_owned())
                .collect();
            seen.dedup();
            let failed = path(dir, name, &format!("attempt{attempt}.html"));
            fs::write(&failed, &dom)?;
            say(&format!(
                "drill-down of {name}: the page showed {} and the API, read {} times in the {secs:.0} s \
                 Chromium took ({}, {} bytes of page, host view {}), showed {}; page kept in {} and \
                 Chromium's log in {} (attempt {attempt} of {TRIES})",
                at.as_deref().unwrap_or("no evaluation"),
                answers.len(),
                out.status,
                dom.len(),
                host_view_state(&dom),
                seen.join(", "),
                failed.display(),
                log.display(),
            ));
        }
        let (api, dom) = found
            .with_context(|| format!("no page of {name} of the same evaluation as its API"))?;
        fs::write(path(dir, name, "json"), serde_json::to_string_pretty(&api)?)?;
        fs::write(path(dir, name, "html"), &dom)?;
        // Up to three tries: on a loaded machine a Chromium run may be killed at its
        // time limit before it writes the screenshot (seen at load 100).
        let shot = path(dir, name, "png");
        for attempt in 1..=3 {
            let _ = fs::remove_file(&shot);
            let out = chromium(
                Some(GW),
                &profile,
                &page_url,
                &[&format!("--screenshot={}", shot.display())],
            )
            .output()
            .context("running chromium")?;
            let written = fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
            if out.status.success() && written > 0 {
                say(&format!(
                    "drill-down of {name} ({addr}) rendered: {}",
                    shot.display()
                ));
                break;
            }
            say(&format!(
                "drill-down of {name}: no screenshot from Chromium ({}, {written} bytes written; attempt {attempt} of 3)",
                out.status
            ));
        }
    }
    Ok(())
}

/// Runs `render` while another thread reads `api_url` once a second; returns what
/// `render` returned, every answer of the API (one before and one after included) and
/// the seconds `render` took.
fn render_while_polling(
    api_url: &str,
    render: impl FnOnce() -> Result<Output>,
) -> Result<(Output, Vec<serde_json::Value>, f64)> {
    let fetch = || -> Result<serde_json::Value> {
        let body = topology::ns_run(GW, "curl", &["-sf", "-m", "5", api_url])?;
        Ok(serde_json::from_str(&body)?)
    };
    let mut answers = vec![fetch()?];
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (out, polled) = thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut got = Vec::new();
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_secs(1));
                // A read that fails under load is only a missing sample.
                if let Ok(a) = fetch() {
                    got.push(a);
                }
            }
            got
        });
        let out = render();
        done.store(true, Ordering::Relaxed);
        (out, poller.join().expect("the API poller panicked"))
    });
    let secs = started.elapsed().as_secs_f64();
    answers.extend(polled);
    answers.push(fetch()?);
    Ok((out?, answers, secs))
}

/// What the page's host view showed, for a failed try's message: whether it rendered,
/// its error and its status line.
fn host_view_state(dom: &str) -> String {
    if !dom.contains("id=\"host-view\"") {
        return "absent".into();
    }
    let meta = dom
        .find("id=\"hv-meta\"")
        .and_then(|at| {
            let rest = &dom[at..];
            let open = rest.find('>')? + 1;
            Some(rest[open..open + rest[open..].find('<')?].to_owned())
        })
        .unwrap_or_default();
    format!(
        "ready {}, error {}, status line {meta:?}",
        try_attr(dom, "host-view", "data-ready").unwrap_or_else(|| "no".into()),
        try_attr(dom, "host-view", "data-error").unwrap_or_else(|| "none".into()),
    )
}
