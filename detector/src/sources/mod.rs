//! Where flows come from: the local XDP/TC meter, NetFlow/IPFIX exporters, sFlow agents,
//! and capture files replayed through the meter or the NetFlow decoder.

pub mod capture;
pub mod netflow;
pub mod sflow;
pub mod xdp;
