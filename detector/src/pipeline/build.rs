//! Builds the pipeline's parts from plain options (the command line converts its flags
//! into them) and the configuration file: the record sinks, the detection settings and
//! the alarm sinks.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::export::Sink;
use crate::export::json::JsonSink;
use crate::export::netflow_v9::{self, V9Config, V9Sink};

/// What detection and its alarm sinks are built from: the configuration file, and the
/// settings given beside it, which win over it.
#[derive(Clone, Debug, Default)]
pub struct DetectOptions {
    /// Configuration file (TOML).
    pub config: Option<std::path::PathBuf>,
    /// Alarm events as JSON lines to this path (`-` for stdout).
    pub alarms_json: Option<String>,
    /// Their format, and the webhook's (none: the file's `[sinks] alarm_format`).
    pub alarm_format: Option<crate::export::ecs::AlarmFormat>,
    /// Internal networks (replace the configured list when not empty).
    pub internal: Vec<crate::sources::netflow::decode::Cidr>,
    /// Syslog address (`udp://`, `tcp://`, `unix://`).
    pub syslog: Option<String>,
    /// Webhook URL, and a CA file to trust for it.
    pub webhook: Option<String>,
    pub webhook_ca: Option<std::path::PathBuf>,
}

/// Builds the sinks the flags ask for; with neither `--export` nor `--flows-json` (nor,
/// when `other_sink`, another output such as NATS), JSON to stdout.
pub fn sinks(
    export: &[String],
    flows_json: Option<&str>,
    v9: V9Config,
    boot: SystemTime,
    other_sink: bool,
) -> Result<Vec<Box<dyn Sink + Send>>> {
    let mut sinks: Vec<Box<dyn Sink + Send>> = Vec::new();
    if !export.is_empty() {
        let targets = export
            .iter()
            .map(|t| netflow_v9::resolve(t))
            .collect::<Result<Vec<_>, _>>()?;
        sinks.push(Box::new(V9Sink::new(&targets, v9, boot)?));
    }
    let json = match (flows_json, export.is_empty() && !other_sink) {
        (Some(p), _) => Some(p),
        (None, true) => Some("-"),
        (None, false) => None,
    };
    if let Some(path) = json {
        sinks.push(Box::new(
            JsonSink::open(path).with_context(|| format!("opening --flows-json {path}"))?,
        ));
    }
    Ok(sinks)
}

/// The `--http` address, else the configuration file's `[http] listen`, else none.
pub fn http_listen(
    flag: Option<std::net::SocketAddr>,
    a: &DetectOptions,
) -> Result<Option<std::net::SocketAddr>> {
    if flag.is_some() {
        return Ok(flag);
    }
    Ok(match &a.config {
        Some(p) => crate::config::FileConfig::load(p)?.http.listen_addr(),
        None => None,
    })
}

/// The `--http-config` file, else the configuration file's `[http] config`, loaded and
/// checked; none: no TLS, no authentication.
pub fn http_config(
    flag: Option<&std::path::Path>,
    a: &DetectOptions,
) -> Result<crate::status::access::WebConfig> {
    use crate::status::access::WebConfig;
    let path = match (flag, &a.config) {
        (Some(p), _) => Some(p.to_path_buf()),
        (None, Some(c)) => crate::config::FileConfig::load(c)?.http.config_path(c),
        (None, None) => None,
    };
    Ok(match path {
        Some(p) => WebConfig::load(&p)?,
        None => WebConfig::default(),
    })
}

/// The detection settings and alarm sinks from `--config` and the flags (which win).
pub fn detection(
    a: &DetectOptions,
) -> Result<(
    crate::detect::DetectConfig,
    crate::export::alarms::AlarmSink,
)> {
    use crate::config::FileConfig;
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut cfg = file.detect_config();
    if !a.internal.is_empty() {
        cfg.internal = a.internal.clone();
    }
    let json = a
        .alarms_json
        .clone()
        .or_else(|| file.sinks.alarms_json.clone());
    let mut alarms =
        crate::export::alarms::AlarmSink::open(json.as_deref()).with_context(|| {
            format!(
                "opening the alarms file {}",
                json.as_deref().unwrap_or("(none)")
            )
        })?;
    alarms.encoder.format = a.alarm_format.unwrap_or(file.sinks.alarm_format);
    let syslog = a
        .syslog
        .clone()
        .or_else(|| file.sinks.syslog.as_ref().map(|s| s.address.clone()));
    if let Some(addr) = syslog {
        let addr = crate::export::syslog::parse_address(&addr).map_err(anyhow::Error::msg)?;
        alarms.syslog = Some(crate::export::syslog::SyslogSink::new(addr));
    }
    let mut webhook = match (&a.webhook, &file.sinks.webhook) {
        (Some(url), w) => Some(crate::config::WebhookSink {
            url: url.clone(),
            timeout_secs: w.as_ref().map(|w| w.timeout_secs).unwrap_or(5),
            retries: w.as_ref().map(|w| w.retries).unwrap_or(3),
            queue: w.as_ref().map(|w| w.queue).unwrap_or(1000),
            ca: w.as_ref().and_then(|w| w.ca.clone()),
        }),
        (None, w) => w.clone(),
    };
    if let (Some(w), Some(ca)) = (webhook.as_mut(), &a.webhook_ca) {
        w.ca = Some(ca.display().to_string());
    }
    if let Some(w) = webhook {
        // Refused here, at start, if it cannot be served (scheme, CA file, TLS).
        alarms.webhook = Some(crate::export::webhook::WebhookSink::new(
            w.url,
            Duration::from_secs(w.timeout_secs),
            w.retries,
            w.queue,
            w.ca.as_deref().map(std::path::Path::new),
        )?);
    }
    Ok((cfg, alarms))
}
