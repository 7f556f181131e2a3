//! NetFlow/IPFIX datagrams inside a capture file (`replay --netflow`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::decode::Decoder;
use crate::flow::FlowRecord;
use crate::sources::capture::{Capture, CaptureError};

/// A UDP datagram found in a frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub payload: &'a [u8],
}

/// The UDP datagram carried by an Ethernet frame, if any (unfragmented IPv4/IPv6).
pub fn udp_in_frame(frame: &[u8]) -> Option<Datagram<'_>> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match p.net.as_ref()? {
        NetSlice::Ipv4(v4) if !v4.is_payload_fragmented() => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(v6) if !v6.is_payload_fragmented() => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        _ => return None,
    };
    match p.transport? {
        TransportSlice::Udp(u) => Some(Datagram {
            from: SocketAddr::new(src, u.source_port()),
            to: SocketAddr::new(dst, u.destination_port()),
            payload: u.payload(),
        }),
        _ => None,
    }
}

/// Whether a UDP payload starts like a NetFlow v5, v9 or IPFIX message.
pub fn looks_like_netflow(payload: &[u8]) -> bool {
    payload.len() >= 16 && matches!(u16::from_be_bytes([payload[0], payload[1]]), 5 | 9 | 10)
}

/// What a capture held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetflowCaptureStats {
    pub frames: u64,
    pub datagrams: u64,
    /// UDP datagrams on other ports, or not NetFlow-shaped when no port is given.
    pub skipped: u64,
}

/// Decodes every NetFlow/IPFIX datagram of a capture (UDP to `port`, or any UDP payload
/// that looks like NetFlow), in capture order, stamping records received at the frame's
/// timestamp.
pub fn decode_capture(
    path: &Path,
    port: Option<u16>,
    decoder: &mut Decoder,
    mut emit: impl FnMut(Vec<FlowRecord>),
) -> Result<NetflowCaptureStats, CaptureError> {
    let mut cap = Capture::open(path)?;
    let mut stats = NetflowCaptureStats::default();
    let mut out = Vec::new();
    while let Some(frame) = cap.next_frame() {
        let frame = frame?;
        stats.frames += 1;
        let Some(dg) = udp_in_frame(&frame.data) else {
            continue;
        };
        let wanted = match port {
            Some(p) => dg.to.port() == p,
            None => looks_like_netflow(dg.payload),
        };
        if !wanted {
            stats.skipped += 1;
            continue;
        }
        stats.datagrams += 1;
        let received = SystemTime::UNIX_EPOCH + frame.ts.max(Duration::ZERO);
        decoder.decode(dg.from, dg.payload, received, &mut out);
        if !out.is_empty() {
            emit(std::mem::take(&mut out));
        }
    }
    Ok(stats)
}
