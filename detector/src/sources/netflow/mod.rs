//! NetFlow v5/v9 and IPFIX from switches and routers: a pure decoder and the UDP
//! listener around it.

pub mod capture;
mod compiled;
pub mod decode;
pub mod listener;
pub(crate) mod record;
