//! The lab's host drill-down (issue #24): while the agent still runs and the traffic
//! flows, each chosen host's view is rendered by headless Chromium in the gateway's
//! namespace, beside the agent's `/api/hosts/{ip}` of the same evaluation, so that the
//! lab test can check the page's figures against the API on real clients and servers.

use std::fs;
use std::path::Path;

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
/// answer of the same evaluation (the agent evaluates every 10 s: a page is read between
/// two reads of the API, a few times if need be).
pub fn capture(dir: &Path, hosts: &[(&str, String)]) -> Result<()> {
    let profile = dir.join("drilldown/chromium");
    fs::create_dir_all(&profile)?;
    for (name, addr) in hosts {
        let api_url = format!("http://{STATUS_ADDR}/api/hosts/{addr}");
        let page_url = format!("http://{STATUS_ADDR}/#host={addr}");
        let fetch = || -> Result<serde_json::Value> {
            let body = topology::ns_run(GW, "curl", &["-sf", "-m", "5", &api_url])?;
            Ok(serde_json::from_str(&body)?)
        };
        // Up to eight tries: under load one Chromium run can outlast an evaluation (10 s),
        // so that the page's falls between the two API reads (4 tries failed in a check).
        let mut found = None;
        for attempt in 1..=8 {
            let before = fetch()?;
            let out = chromium(Some(GW), &profile, &page_url, &["--dump-dom"])
                .output()
                .context("running chromium")?;
            let dom = String::from_utf8_lossy(&out.stdout).into_owned();
            let after = fetch()?;
            let at = try_attr(&dom, "host-view", "data-evaluated-at");
            let seen = (
                before["evaluated_at"].to_string(),
                after["evaluated_at"].to_string(),
            );
            if let Some(api) = [before, after]
                .into_iter()
                .find(|a| at.is_some() && a["evaluated_at"].as_str() == at.as_deref())
            {
                found = Some((api, dom));
                break;
            }
            say(&format!(
                "drill-down of {name}: the page ({}) and the API (before {}, after {}) were of different evaluations (attempt {attempt} of 8)",
                at.as_deref().unwrap_or("no evaluation shown"),
                seen.0,
                seen.1
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
