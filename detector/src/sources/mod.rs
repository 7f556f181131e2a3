//! Where flows come from: the local XDP/TC meter, NetFlow/IPFIX exporters, and capture
//! files replayed through either.

pub mod capture;
pub mod netflow;
pub mod xdp;
