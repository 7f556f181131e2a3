//! The detector agent: sources (the local XDP/TC meter) feed a flow table that produces
//! NetFlow-style records for the sinks (NetFlow v9 export, JSON lines).
//!
//! Pipeline: `sources::xdp` (tracer) -> `flow::table` (accounter) -> `export` (exporter).
//! The flow table and the v9 encoder are pure and take `now` as an argument; sockets,
//! timers and BPF I/O live in `agent` and `sources::xdp`.

pub mod agent;
pub mod cli;
pub mod config;
pub mod detect;
pub mod export;
pub mod flow;
pub mod mem;
pub mod pipeline;
pub mod privileges;
pub mod replay;
pub mod scaleout;
pub mod sources;
pub mod status;
