//! Alarm events: one JSON object per event (`--alarms-json PATH`, `-` for stdout), and
//! the same event as one readable log line.

use std::io::{self, BufWriter, Write};
use std::time::Duration;

use log::warn;

use crate::detect::AlarmEvent;

pub type Relay = Box<dyn FnMut(&[AlarmEvent]) -> Vec<AlarmEvent> + Send>;

pub struct AlarmSink {
    target: String,
    out: Option<Box<dyn Write + Send>>,
    pub syslog: Option<super::syslog::SyslogSink>,
    pub webhook: Option<super::webhook::WebhookSink>,
    /// Sees the events first and may rewrite them (`detector central`: one alarm per
    /// host and episode across nodes; published to the `alarms` subject).
    pub relay: Option<Relay>,
    /// How events are written to the JSON file and the webhook (`--alarm-format`).
    pub encoder: super::ecs::AlarmEncoder,
    pub written: u64,
    pub errors: u64,
    /// Events handed to the sinks.
    pub events: u64,
}

impl AlarmSink {
    /// `path`: `-` for stdout, a file (created or appended to), or none for log lines only.
    pub fn open(path: Option<&str>) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match path {
            None => None,
            Some("-") => Some(Box::new(io::stdout())),
            Some(p) => Some(Box::new(BufWriter::new(super::json::append(
                std::path::Path::new(p),
            )?))),
        };
        Ok(Self {
            target: path.unwrap_or("log").to_string(),
            out,
            syslog: None,
            webhook: None,
            relay: None,
            encoder: super::ecs::AlarmEncoder::default(),
            written: 0,
            errors: 0,
            events: 0,
        })
    }

    pub fn send(&mut self, events: &[AlarmEvent]) {
        let relayed;
        let events = match self.relay.as_mut() {
            Some(relay) if !events.is_empty() => {
                relayed = relay(events);
                &relayed[..]
            }
            _ => events,
        };
        if let Some(w) = &self.webhook {
            w.send_encoded(events.iter().map(|e| self.encoder.encode(e)));
        }
        for e in events {
            self.events += 1;
            if let Some(s) = self.syslog.as_mut() {
                s.send(e);
            }
            warn!("{}", e.log_line());
            if let Some(out) = self.out.as_mut() {
                let r = out
                    .write_all(self.encoder.encode(e).as_bytes())
                    .and_then(|_| out.write_all(b"\n"))
                    .and_then(|_| out.flush());
                match r {
                    Ok(()) => self.written += 1,
                    Err(err) => {
                        self.errors += 1;
                        warn!("writing alarms to {}: {err}", self.target);
                    }
                }
            }
        }
    }

    /// Takes the place of `old` (a reloaded configuration): its counters carry on.
    pub fn succeed(&mut self, old: &mut AlarmSink) {
        if self.relay.is_none() {
            self.relay = old.relay.take();
        }
        // The observer's name comes from the command line, which a reload keeps.
        self.encoder.observer = old.encoder.observer.clone();
        self.events += old.events;
        self.written += old.written;
        self.errors += old.errors;
        // Events still waiting for the webhook are not lost with the old sink.
        if let (Some(new), Some(old)) = (&self.webhook, &old.webhook) {
            new.adopt_queue(old);
        }
    }

    /// Gives the webhook's queue up to `within` to drain (at exit); returns the events
    /// that stayed undelivered (logged).
    pub fn close(&mut self, within: Duration) -> u64 {
        let Some(w) = self.webhook.as_mut() else {
            return 0;
        };
        let left = w.close(within) as u64;
        if left > 0 {
            warn!(
                "webhook: {left} alarm events still undelivered after {} s at exit",
                within.as_secs()
            );
        }
        left
    }

    /// Opens the alarms file again (after log rotation moved it away; SIGHUP).
    pub fn reopen(&mut self) {
        if self.out.is_none() || self.target == "-" {
            return;
        }
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
        match super::json::append(std::path::Path::new(&self.target)) {
            Ok(f) => self.out = Some(Box::new(BufWriter::new(f))),
            Err(e) => warn!(
                "reopening {}: {e}; alarms still go to the file opened before",
                self.target
            ),
        }
    }

    /// The alarm sinks' counters, for `/metrics` and the status page.
    pub fn stats(&self) -> AlarmSinkStats {
        use std::sync::atomic::Ordering::Relaxed;
        AlarmSinkStats {
            file: (self.target != "log").then(|| self.target.clone()),
            events: self.events,
            written: self.written,
            write_errors: self.errors,
            syslog: self.syslog.as_ref().map(|s| (s.sent, s.failures)),
            webhook: self.webhook.as_ref().map(|w| {
                let st = w.stats();
                WebhookCounters {
                    delivered: st.delivered.load(Relaxed),
                    failed_attempts: st.failures.load(Relaxed),
                    dropped: st.dropped.load(Relaxed),
                    queued: w.queued() as u64,
                }
            }),
        }
    }

    /// One line of the alarm sinks' counters.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "{} alarm events ({} written to {}, {} write errors)",
            self.events, self.written, self.target, self.errors
        )];
        if let Some(s) = &self.syslog {
            parts.push(format!("syslog sent {} failed {}", s.sent, s.failures));
        }
        if let Some(w) = &self.webhook {
            use std::sync::atomic::Ordering::Relaxed;
            let st = w.stats();
            parts.push(format!(
                "webhook delivered {} failed attempts {} dropped {} queued {}",
                st.delivered.load(Relaxed),
                st.failures.load(Relaxed),
                st.dropped.load(Relaxed),
                w.queued()
            ));
        }
        parts.join(", ")
    }
}

/// What the alarm sinks did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlarmSinkStats {
    /// Events handed to the sinks.
    pub events: u64,
    /// The JSON file (`-`: stdout), if any.
    pub file: Option<String>,
    /// Events written to the JSON file (or stdout), and the writes that failed.
    pub written: u64,
    pub write_errors: u64,
    /// Messages sent to syslog, and the sends that failed.
    pub syslog: Option<(u64, u64)>,
    pub webhook: Option<WebhookCounters>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookCounters {
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dropped: u64,
    pub queued: u64,
}
