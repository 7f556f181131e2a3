//! Alarm events to syslog, RFC 5424, over UDP, TCP or a unix socket.

use std::path::PathBuf;

use log::warn;
use syslog::{Facility, Formatter5424, Logger, LoggerBackend};

use crate::detect::AlarmEvent;

/// Where syslog messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogAddr {
    Udp(String),
    Tcp(String),
    Unix(PathBuf),
}

/// `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///PATH`.
pub fn parse_address(s: &str) -> Result<SyslogAddr, String> {
    if let Some(a) = s.strip_prefix("udp://") {
        Ok(SyslogAddr::Udp(a.to_string()))
    } else if let Some(a) = s.strip_prefix("tcp://") {
        Ok(SyslogAddr::Tcp(a.to_string()))
    } else if let Some(p) = s.strip_prefix("unix://") {
        Ok(SyslogAddr::Unix(PathBuf::from(p)))
    } else {
        Err(format!(
            "'{s}' is not a syslog address: give udp://HOST:PORT, tcp://HOST:PORT or unix:///dev/log"
        ))
    }
}

pub struct SyslogSink {
    addr: SyslogAddr,
    logger: Option<Logger<LoggerBackend, Formatter5424>>,
    pub sent: u64,
    pub failures: u64,
}

impl SyslogSink {
    pub fn new(addr: SyslogAddr) -> Self {
        Self {
            addr,
            logger: None,
            sent: 0,
            failures: 0,
        }
    }

    fn connect(&self) -> syslog::Result<Logger<LoggerBackend, Formatter5424>> {
        let f = Formatter5424 {
            facility: Facility::LOG_DAEMON,
            // The machine's name, so that a central syslog server can tell sensors apart.
            hostname: host_name(),
            process: "detector".into(),
            pid: std::process::id(),
        };
        match &self.addr {
            SyslogAddr::Udp(a) => {
                let local = if a.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                };
                syslog::udp(f, local, a.as_str())
            }
            SyslogAddr::Tcp(a) => syslog::tcp(f, a.as_str()),
            SyslogAddr::Unix(p) => syslog::unix_custom(f, p),
        }
    }

    pub fn send(&mut self, e: &AlarmEvent) {
        if self.logger.is_none() {
            match self.connect() {
                Ok(l) => self.logger = Some(l),
                Err(err) => {
                    self.failures += 1;
                    warn!("syslog {:?}: cannot connect: {err}", self.addr);
                    return;
                }
            }
        }
        let sd = structured_data(e);
        let logger = self.logger.as_mut().expect("connected above");
        match logger.warning((1, sd, e.log_line())) {
            Ok(()) => self.sent += 1,
            Err(err) => {
                self.failures += 1;
                warn!("syslog {:?}: {err}; reconnecting next time", self.addr);
                self.logger = None;
            }
        }
    }
}

/// RFC 5424 structured data: SD-ID to PARAM-NAME to PARAM-VALUE (the `syslog` crate's).
pub type StructuredData =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>;

/// The SD-ID of the alarm's RFC 5424 SD-ELEMENT: `name@PEN`, with the private enterprise
/// number RFC 5612 reserves for documentation (32473).
pub const SD_ID: &str = "detector@32473";

/// The structured data of an alarm's message: one SD-ELEMENT, [`SD_ID`], with the
/// alarm's `id`, `state`, `host`, `kind`, `score` (one decimal), `peers` and `rules`
/// (the rules that fired, comma-separated). The values are raw: the formatter escapes
/// `"`, `\` and `]` in PARAM-VALUEs (RFC 5424 section 6.3.3; a unit test checks it).
pub fn structured_data(e: &AlarmEvent) -> StructuredData {
    let params = [
        ("id", e.id.clone()),
        ("state", super::ecs::state_name(e.state).to_string()),
        ("host", e.host.to_string()),
        ("kind", e.kind.to_string()),
        ("score", format!("{:.1}", e.score)),
        ("peers", e.peers.to_string()),
        ("rules", super::ecs::rules_fired(e).join(",")),
    ];
    let mut sd = StructuredData::new();
    sd.insert(
        SD_ID.to_string(),
        params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    sd
}

/// This machine's host name, if it has one.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid; the kernel writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &'static str, id: &str) -> AlarmEvent {
        use crate::detect::AlarmState;
        use crate::detect::evidence::Evidence;
        let ev = |rule, fired| Evidence {
            rule,
            value: 1.0,
            op: ">=",
            threshold: 1.0,
            fired,
            weight: 1.0,
        };
        AlarmEvent {
            id: id.into(),
            state: AlarmState::Updated,
            host: "10.9.0.5".parse().unwrap(),
            kind,
            kind_evidence: Vec::new(),
            score: 9.3,
            at: "2026-11-30T01:00:20.000Z".into(),
            first_seen: "2026-11-30T01:00:00.000Z".into(),
            last_seen: "2026-11-30T01:00:19.000Z".into(),
            window_secs: 300,
            peers: 80,
            flows: 240,
            bytes_in: 1,
            bytes_out: 2,
            top_peer_share: 0.1,
            evidence: vec![
                ev("external_peers", true),
                ev("flows", false),
                ev("tcp_and_udp_peers", true),
            ],
            guards: Vec::new(),
            exporters: vec!["local".into()],
            suppressed: None,
            acknowledged: None,
        }
    }

    fn formatter() -> Formatter5424 {
        Formatter5424 {
            facility: Facility::LOG_DAEMON,
            hostname: Some("box7".into()),
            process: "detector".into(),
            pid: 42,
        }
    }

    #[test]
    fn the_structured_data_names_the_alarm() {
        let e = event("bittorrent", "00c0ffee00c0ffee");
        let sd = structured_data(&e);
        assert_eq!(sd.len(), 1);
        let p = &sd[SD_ID];
        let get = |k: &str| p.get(k).map(String::as_str);
        assert_eq!(get("id"), Some("00c0ffee00c0ffee"));
        assert_eq!(get("state"), Some("updated"));
        assert_eq!(get("host"), Some("10.9.0.5"));
        assert_eq!(get("kind"), Some("bittorrent"));
        assert_eq!(get("score"), Some("9.3"));
        assert_eq!(get("peers"), Some("80"));
        assert_eq!(get("rules"), Some("external_peers,tcp_and_udp_peers"));
        // SD-NAMEs: 1 to 32 printable US-ASCII characters but `=`, space, `]` and `"`.
        for name in p.keys().map(String::as_str).chain([SD_ID]) {
            assert!(
                (1..=32).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| (33..=126).contains(&b) && !b"= ]\"".contains(&b)),
                "{name}"
            );
        }
        // The whole message, as it goes on the wire.
        let mut wire = Vec::new();
        syslog::LogFormat::warning(&mut formatter(), &mut wire, (1u32, sd, e.log_line())).unwrap();
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.starts_with("<28>1 "), "{wire}");
        assert!(
            wire.contains(" box7 detector 42 1 [detector@32473 host=\"10.9.0.5\" id=\"00c0ffee00c0ffee\" kind=\"bittorrent\" peers=\"80\" rules=\"external_peers,tcp_and_udp_peers\" score=\"9.3\" state=\"updated\"] alarm 00c0ffee00c0ffee updated"),
            "{wire}"
        );
    }

    #[test]
    fn param_values_are_escaped_as_rfc_5424_says() {
        // `"`, `\` and `]` are escaped with a backslash (section 6.3.3); nothing else is.
        let e = event("a\"b]c\\d[e=f", "x");
        let sd = formatter().format_5424_structured_data(structured_data(&e));
        assert!(sd.contains(r#" kind="a\"b\]c\\d[e=f" "#), "{sd}");
        assert!(
            sd.starts_with("[detector@32473 ") && sd.ends_with(']'),
            "{sd}"
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("udp://127.0.0.1:514"),
            Ok(SyslogAddr::Udp("127.0.0.1:514".into()))
        );
        assert_eq!(
            parse_address("unix:///dev/log"),
            Ok(SyslogAddr::Unix("/dev/log".into()))
        );
        assert!(
            parse_address("127.0.0.1:514")
                .unwrap_err()
                .contains("udp://")
        );
    }
}
