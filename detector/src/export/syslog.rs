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
        let mut sd: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
            std::collections::BTreeMap::new();
        let mut p = std::collections::BTreeMap::new();
        p.insert("id".to_string(), e.id.clone());
        p.insert("state".to_string(), format!("{:?}", e.state).to_lowercase());
        p.insert("host".to_string(), e.host.to_string());
        p.insert("score".to_string(), format!("{:.1}", e.score));
        p.insert("peers".to_string(), e.peers.to_string());
        sd.insert("p2p@32473".to_string(), p);
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
