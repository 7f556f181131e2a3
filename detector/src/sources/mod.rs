//! Where flows come from.

pub mod xdp;
