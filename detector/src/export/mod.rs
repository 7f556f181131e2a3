//! Sinks: where flow records go.

pub mod alarms;
pub mod ecs;
pub mod json;
pub mod netflow_v9;
pub mod syslog;
pub mod webhook;

use std::time::SystemTime;

use crate::flow::FlowRecord;

/// A destination for flow records. `flush` is called every drain cycle, with the records
/// of that cycle (possibly none, so a sink can do periodic work such as template refresh).
pub trait Sink {
    fn name(&self) -> String;
    fn send(&mut self, records: &[FlowRecord], now: SystemTime);
    /// One line of the sink's counters for the periodic statistics log.
    fn describe(&self) -> String;
    /// Writes or sends that failed so far (a replay with any ends in an error).
    fn failures(&self) -> u64 {
        0
    }
    /// Opens its output file again (after log rotation moved it away; SIGHUP).
    fn reopen(&mut self) {}
    /// Its counters, for `/metrics` and the status page.
    fn counters(&self) -> SinkCounters;
    /// Whether it takes detection-only records too (flow starts and growth: the NATS
    /// edge, whose detector nodes detect from them); every other sink gets exported
    /// records only.
    fn wants_live(&self) -> bool {
        false
    }
}

/// What a record sink did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SinkCounters {
    /// The sink's name (as [`Sink::name`]).
    pub sink: String,
    /// Records written or sent.
    pub records: u64,
    /// Writes or sends that failed.
    pub errors: u64,
}

/// Counts a sink's failures by kind and says which to log: the first of each kind, then
/// each time its count doubles, so a sink that fails for every record logs a few lines
/// with counts, not one a record.
#[derive(Debug, Default)]
pub struct FailureLog {
    by_kind: std::collections::BTreeMap<String, u64>,
}

impl FailureLog {
    /// Counts one failure of `kind`; returns its count when it is to be logged.
    pub fn count(&mut self, kind: impl Into<String>) -> Option<u64> {
        let n = self.by_kind.entry(kind.into()).or_default();
        *n += 1;
        n.is_power_of_two().then_some(*n)
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}
