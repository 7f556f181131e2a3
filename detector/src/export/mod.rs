//! Sinks: where flow records go.

pub mod alarms;
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
}
