//! The lab's address and timing plan: every choice drawn from one seeded generator, so a
//! run with the same `--seed` and `--peers` has the same addresses, ports and start times.

use std::net::Ipv4Addr;

/// SplitMix64: small, fast, and reproducible across platforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The port every seeder of the private-tracker swarm listens on (Transmission's default).
pub const PRIVATE_PORT: u16 = 51413;
/// Seeders in the private-tracker swarm.
pub const PRIVATE_PEERS: usize = 50;
/// The port the monitoring poller scrapes (node_exporter's).
pub const POLL_PORT: u16 = 9100;
/// Seeders of the swarm the Transmission client joins.
pub const TRANSMISSION_PEERS: usize = 75;
/// Players of the game session besides the internal one.
pub const GAME_PEERS: usize = 24;
/// The game's UDP port (Xbox Live's and many console and PC games').
pub const GAME_PORT: u16 = 3074;
/// Mirrors the multi-source downloader fetches from.
pub const MIRRORS: usize = 36;
/// Storage endpoints the bulk uploader sends to.
pub const STORAGE_ENDPOINTS: usize = 30;

/// Ports a BitTorrent-port rule could know: 6881-6889, the tracker's 6969, local
/// discovery's 6771, Transmission's 51413.
pub fn is_bittorrent_port(port: u16) -> bool {
    matches!(port, 6881..=6889 | 6969 | 6771 | 51413)
}

/// External addresses, all in 198.18.0.0/15 (RFC 2544: reserved for benchmark tests), and
/// the ports the swarm's peers listen on.
pub struct Plan {
    pub tracker: Ipv4Addr,
    /// BitTorrent peers and their listening ports.
    pub peers: Vec<(Ipv4Addr, u16)>,
    /// Clients of the internal web server.
    pub web_clients: Vec<Ipv4Addr>,
    /// HTTPS sites the browser-like client visits.
    pub sites: Vec<Ipv4Addr>,
    /// Upstream DNS servers of the internal resolver.
    pub dns_upstreams: Vec<Ipv4Addr>,
    /// The video server.
    pub video: Ipv4Addr,
    /// UDP 443 servers.
    pub quic: Vec<Ipv4Addr>,
    /// The private tracker of the private-tracker swarm.
    pub private_tracker: Ipv4Addr,
    /// Its seeders: all on one common port ([`PRIVATE_PORT`], a client default).
    pub private_peers: Vec<Ipv4Addr>,
    /// Hosts the monitoring poller scrapes (on [`POLL_PORT`]).
    pub pollees: Vec<Ipv4Addr>,
    /// The video call's STUN server (UDP 3478) and its media peers with their ports.
    pub stun: Ipv4Addr,
    pub call_peers: Vec<(Ipv4Addr, u16)>,
    /// The network the port scanner sweeps (a /24 that holds some of the addresses above).
    pub scan_target: String,
    /// Seconds after the start at which each internal host begins, by host name.
    pub start_offsets: Vec<(&'static str, u64)>,
    /// Listening port of the downloading libtorrent client.
    pub leech_port: u16,
    /// Listening port of the private-tracker client (not a client default: what gives
    /// it away must be its peers).
    pub private_client_port: u16,
    /// The tracker of the Transmission client's swarm (on port 80).
    pub transmission_tracker: Ipv4Addr,
    /// Its seeders and their ports: 443, 80 or a random high port, never a BitTorrent
    /// default.
    pub transmission_peers: Vec<(Ipv4Addr, u16)>,
    /// The Transmission client's listening port (high, random, not a client default).
    pub transmission_port: u16,
    /// The game session's other players and their ports (the game's port, or the port
    /// a home router mapped).
    pub game_peers: Vec<(Ipv4Addr, u16)>,
    /// HTTPS mirrors of the multi-source download.
    pub mirrors: Vec<Ipv4Addr>,
    /// HTTPS storage endpoints of the bulk upload.
    pub storage: Vec<Ipv4Addr>,
}

impl Plan {
    pub fn new(seed: u64, peers: usize, hosts: &[&'static str]) -> Self {
        let mut rng = Rng::new(seed);
        // 198.18.1.0 .. 198.19.255.255: the pool, shuffled; 198.18.0.0/24 holds the tracker.
        let mut pool: Vec<Ipv4Addr> = (0xC612_0100u32..=0xC613_FFFF)
            .map(Ipv4Addr::from)
            .filter(|a| a.octets()[3] != 0 && a.octets()[3] != 255)
            .collect();
        rng.shuffle(&mut pool);
        let mut take = |n: usize| pool.drain(..n).collect::<Vec<_>>();
        let peer_addrs = take(peers);
        let web_clients = take(300);
        let sites = take(60);
        let dns_upstreams = take(20);
        let video = take(1)[0];
        let quic = take(5);
        let private_peers = take(PRIVATE_PEERS);
        let pollees = take(60);
        let stun = take(1)[0];
        let call_addrs = take(3);
        let peers = peer_addrs
            .into_iter()
            .map(|a| {
                // Mostly high ports, as clients pick; a few on 80 and 443 (clients that
                // hide behind web ports) and the classic 6881-6889.
                let port = match rng.range(0, 100) {
                    0..=1 => 80,
                    2..=3 => 443,
                    4..=13 => rng.range(6881, 6890) as u16,
                    _ => rng.range(10_000, 65_000) as u16,
                };
                (a, port)
            })
            .collect::<Vec<_>>();
        let o = peers[0].0.octets();
        let scan_target = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
        let call_peers = call_addrs
            .into_iter()
            .map(|a| (a, rng.range(16_384, 60_000) as u16))
            .collect();
        let start_offsets = hosts.iter().map(|h| (*h, rng.range(0, 10))).collect();
        let leech_port = rng.range(20_000, 60_000) as u16;
        let private_client_port = rng.range(20_000, 60_000) as u16;
        // The hosts of issue #20: drawn after everything above, so the earlier addresses
        // stay as they were.
        let transmission_peers = take(TRANSMISSION_PEERS)
            .into_iter()
            .map(|a| {
                let port = match rng.range(0, 100) {
                    0..=9 => 443,
                    10..=17 => 80,
                    _ => loop {
                        let p = rng.range(10_000, 65_000) as u16;
                        if !is_bittorrent_port(p) {
                            break p;
                        }
                    },
                };
                (a, port)
            })
            .collect();
        // Transmission's own range for a random port (49152-65535).
        let transmission_port = loop {
            let p = rng.range(49_152, 65_536) as u16;
            if !is_bittorrent_port(p) {
                break p;
            }
        };
        let game_peers = take(GAME_PEERS)
            .into_iter()
            .map(|a| {
                let port = if rng.range(0, 100) < 40 {
                    GAME_PORT
                } else {
                    rng.range(1024, 65_536) as u16
                };
                (a, port)
            })
            .collect();
        let mirrors = take(MIRRORS);
        let storage = take(STORAGE_ENDPOINTS);
        Self {
            tracker: Ipv4Addr::new(198, 18, 0, 1),
            peers,
            web_clients,
            sites,
            dns_upstreams,
            video,
            quic,
            private_tracker: Ipv4Addr::new(198, 18, 0, 2),
            private_peers,
            pollees,
            stun,
            call_peers,
            scan_target,
            start_offsets,
            leech_port,
            private_client_port,
            transmission_tracker: Ipv4Addr::new(198, 18, 0, 3),
            transmission_peers,
            transmission_port,
            game_peers,
            mirrors,
            storage,
        }
    }

    /// Every external address the internet namespace must hold.
    pub fn external_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v = vec![
            self.tracker,
            self.private_tracker,
            self.transmission_tracker,
            self.video,
            self.stun,
        ];
        v.extend(self.peers.iter().map(|p| p.0));
        v.extend(&self.web_clients);
        v.extend(&self.sites);
        v.extend(&self.dns_upstreams);
        v.extend(&self.quic);
        v.extend(&self.private_peers);
        v.extend(&self.pollees);
        v.extend(self.call_peers.iter().map(|p| p.0));
        v.extend(self.transmission_peers.iter().map(|p| p.0));
        v.extend(self.game_peers.iter().map(|p| p.0));
        v.extend(&self.mirrors);
        v.extend(&self.storage);
        v
    }

    pub fn offset(&self, host: &str) -> u64 {
        self.start_offsets
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, o)| *o)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_addresses_never_repeat() {
        let hosts = ["a", "b"];
        let p1 = Plan::new(7, 200, &hosts);
        let p2 = Plan::new(7, 200, &hosts);
        let p3 = Plan::new(8, 200, &hosts);
        assert_eq!(p1.peers, p2.peers);
        assert_eq!(p1.start_offsets, p2.start_offsets);
        assert_ne!(p1.peers, p3.peers);
        let mut all = p1.external_addrs();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an address was handed out twice");
        for a in &all {
            let o = a.octets();
            assert!(
                o[0] == 198 && (o[1] == 18 || o[1] == 19),
                "{a} outside 198.18.0.0/15"
            );
            assert!(o[3] != 0 && o[3] != 255);
        }
        assert!(p1.peers.iter().any(|p| p.1 == 80 || p.1 == 443));
        // The Transmission swarm hides behind web ports and random high ones.
        assert!(
            p1.transmission_peers
                .iter()
                .all(|p| p.1 == 80 || p.1 == 443 || (p.1 >= 10_000 && !is_bittorrent_port(p.1)))
        );
        assert!(!is_bittorrent_port(p1.transmission_port) && p1.transmission_port >= 49_152);
    }
}
