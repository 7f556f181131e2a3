//! RFC 7133 dataLinkFrameSection (IE 315): routers that export sampled frames instead
//! of flow fields (Juniper inline monitoring, Cisco sampled-frame export). Each frame's
//! headers (Ethernet, 802.1Q and QinQ tags, MPLS labels, IPv4, IPv6, TCP, UDP, ICMP)
//! become a flow record of one packet of its IP length, scaled by the exporter's
//! sampling rate (samplingPacketInterval/Space options). The frames are built here; the
//! truth is tshark's dissection of the same frames in a capture of their own, and
//! `replay --netflow` of the IPFIX capture must give those flows times the rate.

use std::collections::BTreeMap;
use std::process::Command;

use tests::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ethernet, ipv4, ipv6, tcp, udp,
};

fn be16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// The sampled frames, whole.
fn frames() -> Vec<Vec<u8>> {
    let a4 = [10, 1, 0, 5].into();
    let b4 = [198, 51, 100, 7].into();
    let a6 = "2001:db8::5".parse().unwrap();
    let b6 = "2001:db8:1::7".parse().unwrap();
    let tcp4 = |sport, payload: usize| {
        let mut t = tcp(sport, 443, 0x12);
        t.extend(vec![0u8; payload]);
        ipv4(a4, b4, 6, 0x28, 0, &[], &t)
    };
    let udp4 = |sport, payload: usize| {
        let mut u = udp(sport, 6881, payload);
        u.extend(vec![0u8; payload]);
        ipv4(a4, b4, 17, 0, 0, &[], &u)
    };
    let mut mpls = ethernet(&[], 0x8847);
    mpls.extend_from_slice(&[0x00, 0x01, 0x20, 0x40]); // label 18, not bottom
    mpls.extend_from_slice(&[0x00, 0x02, 0x31, 0x40]); // label 35, bottom of stack
    mpls.extend(udp4(40_003, 200));
    let mut t6 = tcp(40_004, 443, 0x10);
    t6.extend(vec![0u8; 300]);
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend(vec![0u8; 56]);
    vec![
        [ethernet(&[], ETH_P_IP), tcp4(40_001, 1000)].concat(),
        [ethernet(&[(ETH_P_8021Q, 100)], ETH_P_IP), udp4(40_002, 500)].concat(),
        mpls,
        [ethernet(&[], ETH_P_IPV6), ipv6(a6, b6, 0, &[], 6, &t6)].concat(),
        [
            ethernet(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)], ETH_P_IP),
            ipv4(a4, b4, 1, 0, 0, &[], &icmp),
        ]
        .concat(),
        [ethernet(&[], ETH_P_IP), udp4(40_006, 18)].concat(),
    ]
}

/// IPFIX: 1-in-100 sampling options, then one record per frame holding its first 96
/// bytes (variable length) and the ingress interface.
fn messages(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let message = |sets: Vec<(u16, Vec<u8>)>| {
        let mut d = Vec::new();
        be16(&mut d, 10);
        be16(&mut d, 0);
        be32(&mut d, 1_800_000_000);
        be32(&mut d, 0);
        be32(&mut d, 7);
        for (id, body) in sets {
            be16(&mut d, id);
            be16(&mut d, (body.len() + 4) as u16);
            d.extend_from_slice(&body);
        }
        let len = d.len() as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        d
    };
    let mut t = Vec::new();
    be16(&mut t, 256);
    be16(&mut t, 2);
    for (ie, len) in [(10u16, 4u16), (315, 65_535)] {
        be16(&mut t, ie);
        be16(&mut t, len);
    }
    let mut ot = Vec::new();
    be16(&mut ot, 257);
    be16(&mut ot, 3); // fields
    be16(&mut ot, 1); // scope fields
    for (ie, len) in [(149u16, 4u16), (305, 4), (306, 4)] {
        be16(&mut ot, ie);
        be16(&mut ot, len);
    }
    let mut od = Vec::new();
    be32(&mut od, 7); // observation domain
    be32(&mut od, 1); // one packet selected
    be32(&mut od, 99); // then 99 skipped
    let mut data = Vec::new();
    for f in frames {
        be32(&mut data, 3);
        let section = &f[..f.len().min(96)];
        data.push(section.len() as u8);
        data.extend_from_slice(section);
    }
    vec![
        message(vec![(2, t), (3, ot), (257, od)]),
        message(vec![(256, data)]),
    ]
}

/// A pcap of `packets` with link type `linktype`.
fn pcap(path: &std::path::Path, linktype: u32, packets: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&linktype.to_le_bytes());
    for (i, p) in packets.iter().enumerate() {
        out.extend_from_slice(&(1_800_000_000u32 + i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn sampled_frame_sections_become_flows_scaled_by_the_sampling_rate() {
    let dir = std::env::temp_dir().join(format!("detector-frames-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let frames = frames();

    // The truth: tshark's dissection of the frames themselves.
    let truth_pcap = dir.join("frames.pcap");
    pcap(&truth_pcap, 1, &frames);
    let truth = tests::tshark::totals(&tests::tshark::packets(&truth_pcap));
    assert_eq!(truth.len(), frames.len(), "one flow per frame: {truth:?}");
    let want: BTreeMap<_, _> = truth
        .into_iter()
        .map(|(k, (p, b))| (k, (p * 100, b * 100)))
        .collect();

    // The export: IPFIX in UDP to 4739, in raw IPv4 packets.
    let export: Vec<Vec<u8>> = messages(&frames)
        .into_iter()
        .map(|m| {
            let mut u = udp(40_000, 4739, m.len());
            u.extend_from_slice(&m);
            ipv4(
                [192, 0, 2, 1].into(),
                [192, 0, 2, 2].into(),
                17,
                0,
                0,
                &[],
                &u,
            )
        })
        .collect();
    let export_pcap = dir.join("ipfix.pcap");
    pcap(&export_pcap, 101, &export);
    let json = dir.join("flows.json");
    let out = Command::new(tests::detector_bin())
        .args(["replay", "--netflow"])
        .arg(&export_pcap)
        .arg("--flows-json")
        .arg(&json)
        .output()
        .expect("replay runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = BTreeMap::new();
    for l in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let n = |k: &str| v[k].as_u64().unwrap();
        let ip = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        assert_eq!(n("sampling"), 100, "{l}");
        got.insert(
            (
                n("protocol") as u8,
                ip("src_addr"),
                n("src_port") as u16,
                ip("dst_addr"),
                n("dst_port") as u16,
            ),
            (n("packets"), n("bytes")),
        );
    }
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).ok();
}
