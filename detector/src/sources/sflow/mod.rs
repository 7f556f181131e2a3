//! sFlow v5 from switches: a pure decoder (samples aggregated into flows) and the UDP
//! listener around it (`--sflow-listen`).

pub mod decode;
pub mod listener;

#[cfg(test)]
mod tests;
