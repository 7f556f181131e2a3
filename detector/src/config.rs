//! The configuration file (`--config FILE`, TOML): networks, allow-lists, detection
//! window and thresholds, alarm sinks. Flags override it. `detector check-config FILE`
//! validates a file and prints the effective configuration; every error names the key
//! and the fix.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detect::DetectConfig;
use crate::detect::evidence::Thresholds;
use crate::flow::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Value {
        path: String,
        key: String,
        message: String,
    },
    #[error(
        "{path} names no source and no flag does: give --iface, --netflow-listen or --sflow-listen, or `listen` in the file's [netflow] or [sflow] section, e.g. [sflow] listen = [\"0.0.0.0:6343\"]"
    )]
    NoSource { path: String },
}

/// The file, as written. Every section and key is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub networks: Networks,
    pub allow: Allow,
    pub detection: Detection,
    pub thresholds: Thresholds,
    pub sinks: Sinks,
    pub http: Http,
    pub netflow: Listen,
    pub sflow: Listen,
    /// What the file says in an outdated way (logged when it is loaded; `check-config`
    /// prints them).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Networks {
    /// Internal networks (CIDR); everything else is external.
    pub internal: Vec<String>,
}

impl Default for Networks {
    fn default() -> Self {
        Self {
            internal: DetectConfig::default()
                .internal
                .iter()
                .map(|c| format!("{}/{}", c.addr, c.len))
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Allow {
    /// Hosts or networks (CIDR) that never alarm.
    pub hosts: Vec<String>,
    /// Ports whose flows are ignored.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Detection {
    pub window_secs: u64,
    pub eval_interval_secs: u64,
    pub consecutive: u32,
    pub update_interval_secs: u64,
    pub clear_after_secs: u64,
}

impl Default for Detection {
    fn default() -> Self {
        let d = DetectConfig::default();
        Self {
            window_secs: d.window.as_secs(),
            eval_interval_secs: d.eval_interval.as_secs(),
            consecutive: d.consecutive,
            update_interval_secs: d.update_interval.as_secs(),
            clear_after_secs: d.clear_after.as_secs(),
        }
    }
}

/// The status server of `run` (`--http` wins over it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// `ADDR:PORT` (or `PORT`, on 127.0.0.1) to serve /metrics, /api/alarms, /api/hosts
    /// and the status page on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The server's TLS and authentication: a YAML file (`--http-config` wins over it),
    /// relative to this file's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl Http {
    /// The address to listen on, if any.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen
            .as_deref()
            .and_then(|a| crate::status::access::parse_http_listen(a).ok())
    }

    /// `config`, relative to the directory of the configuration file at `file`.
    pub fn config_path(&self, file: &Path) -> Option<std::path::PathBuf> {
        let c = Path::new(self.config.as_deref()?);
        Some(match file.parent() {
            Some(dir) if c.is_relative() => dir.join(c),
            _ => c.to_path_buf(),
        })
    }
}

/// The NetFlow/IPFIX (`[netflow]`) or sFlow (`[sflow]`) listeners of `run`
/// (`--netflow-listen`, `--sflow-listen` win over them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// `ADDR:PORT`s to receive on, e.g. `["0.0.0.0:2055"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
}

impl Listen {
    /// The addresses of `listen` (the ones that parse: `validate` refused the file
    /// otherwise).
    pub fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listen.iter().filter_map(|a| a.parse().ok()).collect()
    }

    /// The addresses given by flag, else the file's.
    pub fn or_flags(&self, flags: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
        if flags.is_empty() {
            self.addrs()
        } else {
            flags.to_vec()
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sinks {
    /// One JSON object per alarm event to this path (`-` for stdout).
    pub alarms_json: Option<String>,
    /// The format of the alarms file's events and the webhook's bodies: `native` or
    /// `ecs` (Elastic Common Schema); `--alarm-format` wins.
    pub alarm_format: crate::export::ecs::AlarmFormat,
    pub syslog: Option<SyslogSink>,
    pub webhook: Option<WebhookSink>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSink {
    /// `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///dev/log`.
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSink {
    /// `http://HOST[:PORT]/PATH`: each alarm event is POSTed as JSON.
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Events held while the endpoint is unreachable; beyond, the oldest are dropped
    /// and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// PEM file of CA certificates trusted for an https URL, beside the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

fn default_timeout() -> u64 {
    5
}
fn default_retries() -> u32 {
    3
}
fn default_queue() -> usize {
    1000
}

/// The threshold keys of earlier versions that `text` uses, with their new names.
fn renamed_keys(text: &str) -> Vec<(&'static str, &'static str)> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let Some(t) = table.get("thresholds").and_then(|v| v.as_table()) else {
        return Vec::new();
    };
    crate::detect::evidence::RENAMED
        .iter()
        .filter(|(old, _)| t.contains_key(*old))
        .copied()
        .collect()
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let mut cfg: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: p.clone(),
            // TOML's message shows the line with a caret under the fault: keep its lines.
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(&p)?;
        cfg.warnings = renamed_keys(&text)
            .into_iter()
            .map(|(old, new)| {
                format!(
                    "{p}: thresholds.{old} is now thresholds.{new} (the rule's name in alarms); the old key still works"
                )
            })
            .collect();
        for w in &cfg.warnings {
            log::warn!("{w}");
        }
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError::Value {
            path: path.to_string(),
            key: key.to_string(),
            message,
        };
        self.cidrs(&self.networks.internal, "networks.internal", path)?;
        if let Some(a) = &self.http.listen
            && self.http.listen_addr().is_none()
        {
            return Err(err(
                "http.listen",
                format!(
                    "'{a}' is not ADDR:PORT; give an address and a port, e.g. \"127.0.0.1:9750\", or a port (on 127.0.0.1), e.g. \"9750\""
                ),
            ));
        }
        for (key, l, port) in [
            ("netflow.listen", &self.netflow, 2055),
            ("sflow.listen", &self.sflow, 6343),
        ] {
            if let Some(a) = l
                .listen
                .iter()
                .find(|a| a.parse::<std::net::SocketAddr>().is_err())
            {
                return Err(err(
                    key,
                    format!(
                        "'{a}' is not ADDR:PORT; give an address and a port, e.g. \"0.0.0.0:{port}\" or \"[::]:{port}\""
                    ),
                ));
            }
        }
        if let Some(web) = self.http.config_path(Path::new(path)) {
            crate::status::access::WebConfig::load(&web)
                .map_err(|e| err("http.config", e.to_string()))?;
        }
        self.cidrs(&self.allow.hosts, "allow.hosts", path)?;
        let d = &self.detection;
        if d.eval_interval_secs == 0 {
            return Err(err(
                "detection.eval_interval_secs",
                "must be at least 1 (seconds between evaluations)".into(),
            ));
        }
        if d.window_secs < d.eval_interval_secs {
            return Err(err(
                "detection.window_secs",
                format!(
                    "{} is shorter than detection.eval_interval_secs ({}): make the window longer",
                    d.window_secs, d.eval_interval_secs
                ),
            ));
        }
        if d.consecutive == 0 {
            return Err(err(
                "detection.consecutive",
                "must be at least 1 evaluation".into(),
            ));
        }
        if self.thresholds.score <= 0.0 {
            return Err(err(
                "thresholds.score",
                "must be above 0 or every host would alarm".into(),
            ));
        }
        if let Some(s) = &self.sinks.syslog {
            crate::export::syslog::parse_address(&s.address)
                .map_err(|m| err("sinks.syslog.address", m))?;
        }
        if let Some(w) = &self.sinks.webhook
            && !(w.url.starts_with("http://") || w.url.starts_with("https://"))
        {
            return Err(err(
                "sinks.webhook.url",
                format!("'{}' is not an http:// or https:// URL", w.url),
            ));
        }
        Ok(())
    }

    fn cidrs(&self, list: &[String], key: &str, path: &str) -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .map(|s| {
                s.parse::<Cidr>().map_err(|m| ConfigError::Value {
                    path: path.to_string(),
                    key: key.to_string(),
                    message: m,
                })
            })
            .collect()
    }

    /// The detection settings this file describes.
    pub fn detect_config(&self) -> DetectConfig {
        let parse = |v: &[String]| v.iter().filter_map(|s| s.parse().ok()).collect::<Vec<_>>();
        let d = &self.detection;
        DetectConfig {
            internal: parse(&self.networks.internal),
            allow_hosts: parse(&self.allow.hosts),
            allow_ports: self.allow.ports.clone(),
            window: Duration::from_secs(d.window_secs),
            eval_interval: Duration::from_secs(d.eval_interval_secs),
            consecutive: d.consecutive,
            update_interval: Duration::from_secs(d.update_interval_secs),
            clear_after: Duration::from_secs(d.clear_after_secs),
            thresholds: self.thresholds.clone(),
            ..DetectConfig::default()
        }
    }

    /// The effective configuration, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("serialisable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<FileConfig, ConfigError> {
        let dir = std::env::temp_dir().join(format!("detector-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&p, text).unwrap();
        FileConfig::load(&p)
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let c = load("").unwrap();
        assert_eq!(c, FileConfig::default());
        let d = c.detect_config();
        assert_eq!(d.window, Duration::from_secs(300));
        assert_eq!(d.internal.len(), 5);
    }

    #[test]
    fn every_section_is_read_and_printed_back() {
        let c = load(
            r#"
[networks]
internal = ["10.0.0.0/8"]
[allow]
hosts = ["10.0.0.10", "10.1.0.0/16"]
ports = [3478]
[detection]
window_secs = 600
consecutive = 2
[thresholds]
external_peers = 40.0
score = 8.0
[sinks]
alarms_json = "/tmp/alarms.json"
alarm_format = "ecs"
syslog = { address = "udp://127.0.0.1:514" }
webhook = { url = "http://127.0.0.1:8080/alarms" }
"#,
        )
        .unwrap();
        assert_eq!(c.sinks.alarm_format, crate::export::ecs::AlarmFormat::Ecs);
        let d = c.detect_config();
        assert_eq!(d.window, Duration::from_secs(600));
        assert_eq!(d.consecutive, 2);
        assert_eq!(d.thresholds.peers, 40.0);
        assert_eq!(d.allow_ports, vec![3478]);
        assert!(d.allow_hosts[1].contains("10.1.2.3".parse().unwrap()));
        let back: FileConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.sinks.webhook.as_ref().unwrap().retries, 3);
    }

    #[test]
    fn threshold_keys_are_the_rule_names_and_old_keys_still_work_with_a_warning() {
        // Every threshold key printed back is the name of a rule in the alarms' evidence
        // (or one of the two qualifiers of a rule).
        let printed = FileConfig::default().to_toml();
        let section = printed.split("[thresholds]").nth(1).unwrap();
        let keys: Vec<&str> = section
            .lines()
            .take_while(|l| !l.starts_with('['))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim()))
            .collect();
        let mut p = crate::detect::profile::HostProfile::new(16);
        let ev = crate::detect::evidence::evaluate(
            &mut p,
            &Thresholds::default(),
            &Default::default(),
            1.0,
        );
        let rules: Vec<&str> = ev.evidence.iter().map(|e| e.rule).collect();
        for k in &keys {
            assert!(
                rules.contains(k) || ["score", "high_port_share", "udp_small_size"].contains(k),
                "threshold key {k} is no rule's name ({rules:?})"
            );
        }
        assert_eq!(keys.len(), 14, "{keys:?}");
        // An old key sets the same threshold, with a warning that names the new key.
        let old = load("[thresholds]\nlisten_peers = 12.0\npeers = 30.0\n").unwrap();
        let new =
            load("[thresholds]\nstable_local_port_peers = 12.0\nexternal_peers = 30.0\n").unwrap();
        assert_eq!(old.thresholds, new.thresholds);
        assert_eq!(old.thresholds.listen_peers, 12.0);
        assert!(new.warnings.is_empty(), "{:?}", new.warnings);
        assert_eq!(old.warnings.len(), 2, "{:?}", old.warnings);
        assert!(
            old.warnings[0].contains("thresholds.peers is now thresholds.external_peers"),
            "{:?}",
            old.warnings
        );
        // Both names at once is one key given twice.
        let e = load("[thresholds]\npeers = 30.0\nexternal_peers = 30.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("external_peers"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let e = load("[detection]\nwindow = 5\n").unwrap_err().to_string();
        assert!(
            e.contains("unknown field `window`") && e.contains("window_secs"),
            "{e}"
        );
        let e = load("[networks]\ninternal = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("networks.internal") && e.contains("prefix length"),
            "{e}"
        );
        let e = load("[detection]\nwindow_secs = 5\neval_interval_secs = 10\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("detection.window_secs") && e.contains("longer"),
            "{e}"
        );
        let e = load("[sinks]\nsyslog = { address = \"127.0.0.1:514\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sinks.syslog.address") && e.contains("udp://"),
            "{e}"
        );
        let e = load("[sinks]\nalarm_format = \"cef\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("alarm_format") && e.contains("native") && e.contains("ecs"),
            "{e}"
        );
        let e = load("[thresholds]\npeers = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("peers"), "{e}");
    }

    #[test]
    fn listeners_are_read_printed_back_and_lose_to_the_flags() {
        let c = load(
            "[netflow]\nlisten = [\"0.0.0.0:2055\", \"[::1]:4739\"]\n[sflow]\nlisten = [\"127.0.0.1:6343\"]\n",
        )
        .unwrap();
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(c.netflow.addrs(), [a("0.0.0.0:2055"), a("[::1]:4739")]);
        assert_eq!(c.sflow.addrs(), [a("127.0.0.1:6343")]);
        // The file's list when no flag is given; the flags' alone when one is.
        assert_eq!(c.sflow.or_flags(&[]), [a("127.0.0.1:6343")]);
        assert_eq!(
            c.netflow.or_flags(&[a("10.0.0.1:9995")]),
            [a("10.0.0.1:9995")]
        );
        // `check-config` prints them, and what it prints reads back the same.
        let printed = c.to_toml();
        assert!(
            printed.contains("[netflow]\nlisten = [\n    \"0.0.0.0:2055\",")
                && printed.contains("[sflow]\nlisten = [\"127.0.0.1:6343\"]"),
            "{printed}"
        );
        let back: FileConfig = toml::from_str(&printed).unwrap();
        assert_eq!(back, c);
        // Unset, they are not printed and name nothing.
        let none = load("").unwrap();
        assert!(!none.to_toml().contains("listen"), "{}", none.to_toml());
        assert!(none.sflow.or_flags(&[]).is_empty());
    }

    #[test]
    fn run_takes_the_files_listeners_unless_a_flag_gives_them() {
        use clap::Parser;
        let dir = std::env::temp_dir().join(format!("detector-cfg-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (both, none) = (dir.join("both.toml"), dir.join("none.toml"));
        std::fs::write(
            &both,
            "[netflow]\nlisten = [\"127.0.0.1:2055\"]\n[sflow]\nlisten = [\"127.0.0.1:6343\"]\n",
        )
        .unwrap();
        std::fs::write(&none, "[detection]\nwindow_secs = 600\n").unwrap();
        let run = |args: &[&str]| match crate::cli::Cli::try_parse_from(
            ["detector", "run"].iter().chain(args),
        )
        .map_err(|e| e.to_string())?
        .command
        {
            crate::cli::Command::Run(a) => a.with_file_listeners().map_err(|e| e.to_string()),
            _ => unreachable!(),
        };
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let f = both.to_str().unwrap();
        // The file alone is a source.
        let r = run(&["--config", f]).unwrap();
        assert_eq!(r.netflow_listen, [a("127.0.0.1:2055")]);
        assert_eq!(r.sflow_listen, [a("127.0.0.1:6343")]);
        // A flag wins over its key; the other key still holds.
        let r = run(&["--config", f, "--sflow-listen", "127.0.0.1:7000"]).unwrap();
        assert_eq!(r.sflow_listen, [a("127.0.0.1:7000")]);
        assert_eq!(r.netflow_listen, [a("127.0.0.1:2055")]);
        // Without the file, the flags as they are.
        let r = run(&["--netflow-listen", "127.0.0.1:9995"]).unwrap();
        assert_eq!(r.netflow_listen, [a("127.0.0.1:9995")]);
        assert!(r.sflow_listen.is_empty());
        // A file with no listener and no flag: no source, said so with the fix.
        let e = run(&["--config", none.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("names no source") && e.contains("--sflow-listen") && e.contains("[sflow]"),
            "{e}"
        );
        // Neither file nor flag: clap's error, as before.
        let e = run(&[]).unwrap_err();
        assert!(
            e.contains("--iface") && e.contains("--netflow-listen"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn listener_errors_name_the_key_and_the_fix() {
        let e = load("[sflow]\nlisten = [\"6343\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sflow.listen")
                && e.contains("'6343' is not ADDR:PORT")
                && e.contains("0.0.0.0:6343"),
            "{e}"
        );
        let e = load("[netflow]\nlisten = [\"0.0.0.0:2055\", \"host:2055\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("netflow.listen") && e.contains("'host:2055'") && e.contains("0.0.0.0:2055"),
            "{e}"
        );
        let e = load("[sflow]\nlistens = [\"0.0.0.0:6343\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `listens`") && e.contains("`listen`"),
            "{e}"
        );
        let e = load("[sflow]\nlisten = \"0.0.0.0:6343\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen") && e.contains("sequence"), "{e}");
    }
}
