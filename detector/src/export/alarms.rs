//! Alarm events: one JSON object per event (`--alarms-json PATH`, `-` for stdout), and
//! the same event as one readable log line.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use log::warn;

use crate::detect::AlarmEvent;

pub struct AlarmSink {
    target: String,
    out: Option<Box<dyn Write + Send>>,
    pub written: u64,
    pub errors: u64,
}

impl AlarmSink {
    /// `path`: `-` for stdout, a file (created or truncated), or none for log lines only.
    pub fn open(path: Option<&str>) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match path {
            None => None,
            Some("-") => Some(Box::new(io::stdout())),
            Some(p) => Some(Box::new(BufWriter::new(File::create(p)?))),
        };
        Ok(Self {
            target: path.unwrap_or("log").to_string(),
            out,
            written: 0,
            errors: 0,
        })
    }

    pub fn send(&mut self, events: &[AlarmEvent]) {
        for e in events {
            warn!("{}", e.log_line());
            if let Some(out) = self.out.as_mut() {
                let r = serde_json::to_writer(&mut *out, e)
                    .map_err(io::Error::from)
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
}
