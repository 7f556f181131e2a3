//! Estimates under sampling, at the profile: a record sampled 1 in N stands for N times
//! its packets and bytes, while its peer and its flow count once (a peer seen once at
//! 1:100 is one peer, not 100 flows).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use super::profile::{HostProfile, PeerAddr};
use crate::flow::FlowRecord;

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7));

/// One sampled packet of `bytes` IP bytes from the host to the peer, on flow `sport`.
fn sampled(sport: u16, bytes: u64, sampling: u32) -> FlowRecord {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    FlowRecord {
        packets: 1,
        bytes,
        first: at,
        last: at,
        tcp_flags: 0x18,
        sampling,
        ..FlowRecord::new(HOST, sport, PEER, 51413, 6)
    }
}

#[test]
fn one_record_sampled_1_in_100_is_one_peer_one_flow_and_its_bytes_times_100() {
    let mut p = HostProfile::new(1000);
    p.add(&sampled(40_000, 1_400, 100), true);
    assert_eq!(p.peer_count(), 1);
    assert_eq!(p.totals.flows, 1);
    assert_eq!(p.totals.bytes_out, 140_000);
    assert_eq!(p.totals.bytes_in, 0);
    let s = p.peers.get(&PeerAddr::new(PEER)).expect("the peer is held");
    assert_eq!((s.flows, s.packets, s.bytes_out), (1, 100, 140_000));
    assert_eq!((p.agg.flows, p.agg.bytes_out), (1, 140_000));

    // A second sampled flow to the same peer: still one peer, two flows, the bytes
    // summed (each times 100); an unsampled record beside them counts as it is.
    p.add(&sampled(40_001, 60, 100), true);
    p.add(&sampled(40_002, 500, 1), true);
    assert_eq!(p.peer_count(), 1);
    assert_eq!(p.totals.flows, 3);
    assert_eq!(p.totals.bytes_out, 140_000 + 6_000 + 500);
    let s = p.peers.get(&PeerAddr::new(PEER)).unwrap();
    assert_eq!((s.flows, s.packets), (3, 100 + 100 + 1));
}
