//! Which P2P application a host runs, from the evidence: `bittorrent`, `gnutella`,
//! `edonkey`, or `p2p` when nothing points at one.
//!
//! In order, the first that holds decides:
//! 1. payload hints (`--payload-hints`): peers whose flows began with a protocol's
//!    signature (BitTorrent handshake, uTP header, DHT message or tracker request;
//!    Gnutella connect; eDonkey hello), at least [`MIN_HINT_PEERS`]; the family with
//!    the most wins;
//! 2. how connections opened (the local meter's first payload sizes each way, see
//!    [`Opening`]): at least [`MIN_OPENING_PEERS`] peers opened with the plaintext
//!    BitTorrent handshake (68 bytes), or with the key exchange of its Message Stream
//!    Encryption (96 to 608 bytes each way) whose sizes vary from peer to peer in both
//!    directions as its random padding makes them (at least half as many distinct
//!    sizes as peers, or [`MSE_DISTINCT`]): behaviour that survives encryption and any
//!    choice of ports. A protocol that opens with such sizes but repeats them (a
//!    Gnutella connect, a resumed TLS session) is not named by it;
//! 3. the family's well-known ports, at least [`MIN_PEERS`] peers met on one of them
//!    (either end): Gnutella 6346-6347, eDonkey 4661/4662/4665/4672, BitTorrent
//!    6881-6889, 6969 (trackers), 6771 (local peer discovery), 51413 (Transmission);
//! 4. BitTorrent's own shape: DHT-style small datagrams to many peers together with
//!    uTP-style UDP beside TCP to the same peers (both rules fired).
//!
//! Every decision lists the evidence that chose it.

use detector_common::hint;

use super::opening::Opening;

/// Peers a port signal needs before it names the application (a port is a weak sign).
pub const MIN_PEERS: u64 = 2;
/// Peers a payload signature needs: one handshake of a protocol is enough to name it.
pub const MIN_HINT_PEERS: u64 = 1;
/// Peers whose connections opened with BitTorrent's handshake sizes before they name it.
pub const MIN_OPENING_PEERS: u64 = 5;
/// Distinct opening sizes each way that are enough for key exchanges with many peers
/// (random padding of 0-512 bytes, in 4-byte steps, gives up to 128).
pub const MSE_DISTINCT: u64 = 24;

pub const BITTORRENT: &str = "bittorrent";
pub const GNUTELLA: &str = "gnutella";
pub const EDONKEY: &str = "edonkey";
pub const P2P: &str = "p2p";

/// Well-known ports of each family.
pub fn family_of_port(port: u16) -> Option<usize> {
    match port {
        6881..=6889 | 6969 | 6771 | 51413 => Some(0),
        6346 | 6347 => Some(1),
        4661 | 4662 | 4665 | 4672 => Some(2),
        _ => None,
    }
}

const FAMILIES: [&str; 3] = [BITTORRENT, GNUTELLA, EDONKEY];

/// What the kind is decided from, counted over a host's peers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KindSignals {
    /// Peers with a flow that carried each hint, in the order of [`hint::NAMES`].
    pub hint_peers: [u64; 6],
    /// Peers met on a well-known port of each family (BitTorrent, Gnutella, eDonkey).
    pub port_peers: [u64; 3],
    /// The DHT-style and uTP-style rules: (fired, value).
    pub udp_small: (bool, f64),
    pub tcp_and_udp: (bool, f64),
    /// Peers whose first connection's opening is known both ways (the local meter).
    pub openings: u64,
    /// Peers whose connection opened with the plaintext BitTorrent handshake.
    pub plain_openings: u64,
    /// Peers whose connection opened with a key exchange's sizes, and the sizes seen
    /// each way (opening slot values: a bit per value).
    pub key_exchanges: u64,
    pub sizes_out: [u64; 4],
    pub sizes_in: [u64; 4],
}

impl KindSignals {
    /// Counts one peer: the OR of its flows' hints, and its (local, remote) port pairs.
    pub fn add_peer(&mut self, hints: u8, ports: &[(u16, u16)]) {
        for (i, (bit, _)) in hint::NAMES.iter().enumerate() {
            if hints & bit != 0 {
                self.hint_peers[i] += 1;
            }
        }
        let mut seen = [false; 3];
        for &(l, r) in ports {
            for f in [family_of_port(l), family_of_port(r)].into_iter().flatten() {
                seen[f] = true;
            }
        }
        for (n, s) in self.port_peers.iter_mut().zip(seen) {
            *n += u64::from(s);
        }
    }

    /// Counts one peer's opening: its first payload sizes each way.
    pub fn add_opening(&mut self, out: u8, inn: u8) {
        let o = Opening::of(out, inn);
        self.openings += u64::from(o != Opening::Unknown);
        match o {
            Opening::PlainBitTorrent => self.plain_openings += 1,
            Opening::KeyExchange => {
                self.key_exchanges += 1;
                for (set, q) in [(&mut self.sizes_out, out), (&mut self.sizes_in, inn)] {
                    set[usize::from(q / 64)] |= 1 << (q % 64);
                }
            }
            _ => {}
        }
    }

    /// Distinct key-exchange sizes seen each way (host to peer, peer to host).
    pub fn distinct_sizes(&self) -> (u64, u64) {
        let n = |set: &[u64; 4]| set.iter().map(|w| u64::from(w.count_ones())).sum();
        (n(&self.sizes_out), n(&self.sizes_in))
    }

    /// BitTorrent from how connections opened, with the evidence; None when the
    /// openings do not show it.
    fn bittorrent_by_openings(&self) -> Option<Vec<String>> {
        // Key exchanges count when their sizes vary as random padding makes them.
        let (out, inn) = self.distinct_sizes();
        let varied = |d: u64| d >= (self.key_exchanges / 2).min(MSE_DISTINCT);
        let kx = if varied(out) && varied(inn) {
            self.key_exchanges
        } else {
            0
        };
        // Most of the host's connections open so, plain or encrypted (a client may
        // speak both): a client talks to its swarm, while a web client's small
        // exchanges sit among responses larger than any handshake.
        let bt = self.plain_openings + kx;
        if bt < MIN_OPENING_PEERS || 2 * bt <= self.openings {
            return None;
        }
        let mut why = Vec::new();
        if self.plain_openings > 0 {
            why.push(format!(
                "{} of {} peers opened with the BitTorrent handshake's 68 bytes",
                self.plain_openings, self.openings
            ));
        }
        if kx > 0 {
            why.push(format!(
                "{kx} of {} peers opened with an encrypted handshake's key exchange (96-608 bytes each way, {out} and {inn} distinct sizes out and in: random padding)",
                self.openings
            ));
        }
        Some(why)
    }

    /// The kind and the evidence that chose it.
    pub fn decide(&self) -> (&'static str, Vec<String>) {
        // 1. Payload hints, by family: BitTorrent's three, Gnutella's, eDonkey's.
        let h = &self.hint_peers;
        let by_family = [h[0].max(h[1]).max(h[2]).max(h[5]), h[3], h[4]];
        if let Some((f, &n)) = by_family
            .iter()
            .enumerate()
            .filter(|(_, n)| **n >= MIN_HINT_PEERS)
            .max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))
        {
            let which: Vec<String> = hint::NAMES
                .iter()
                .zip(h)
                .filter(|((bit, _), n)| **n > 0 && hint_family(*bit) == f)
                .map(|((_, name), n)| format!("payload {name} with {n} peers"))
                .collect();
            debug_assert!(n >= MIN_HINT_PEERS);
            return (FAMILIES[f], which);
        }
        // 2. How connections opened; the ports, when they agree, as more evidence.
        if let Some(mut why) = self.bittorrent_by_openings() {
            if self.port_peers[0] >= MIN_PEERS {
                why.push(format!(
                    "{} peers on {} ports",
                    self.port_peers[0],
                    port_names(0)
                ));
            }
            return (BITTORRENT, why);
        }
        // 3. Well-known ports.
        if let Some((f, &n)) = self
            .port_peers
            .iter()
            .enumerate()
            .filter(|(_, n)| **n >= MIN_PEERS)
            .max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))
        {
            return (
                FAMILIES[f],
                vec![format!("{n} peers on {} ports", port_names(f))],
            );
        }
        // 4. BitTorrent's shape without its ports.
        if self.udp_small.0 && self.tcp_and_udp.0 {
            return (
                BITTORRENT,
                vec![
                    format!(
                        "DHT-style small datagrams with {} peers",
                        self.udp_small.1 as u64
                    ),
                    format!(
                        "uTP-style UDP beside TCP with {} peers",
                        self.tcp_and_udp.1 as u64
                    ),
                ],
            );
        }
        (P2P, Vec::new())
    }
}

fn hint_family(bit: u8) -> usize {
    match bit {
        hint::BITTORRENT | hint::UTP | hint::DHT | hint::TRACKER => 0,
        hint::GNUTELLA => 1,
        _ => 2,
    }
}

fn port_names(f: usize) -> &'static str {
    match f {
        0 => "BitTorrent (6881-6889, 6969, 6771, 51413)",
        1 => "Gnutella (6346, 6347)",
        _ => "eDonkey (4661, 4662, 4665, 4672)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(peers: &[(u8, &[(u16, u16)])]) -> KindSignals {
        let mut k = KindSignals::default();
        for (h, p) in peers {
            k.add_peer(*h, p);
        }
        k
    }

    #[test]
    fn hints_name_the_family_with_the_most_peers() {
        let k = signals(&[
            (hint::BITTORRENT, &[(40000, 50001)]),
            (hint::DHT, &[(40000, 50002)]),
            (hint::UTP | hint::DHT, &[(40000, 50003)]),
            (hint::GNUTELLA, &[(40000, 6346)]),
        ]);
        let (kind, why) = k.decide();
        assert_eq!(kind, BITTORRENT);
        assert!(
            why.iter().any(|w| w == "payload dht_krpc with 2 peers"),
            "{why:?}"
        );
        // One handshake names it; one peer on a well-known port does not.
        let k = signals(&[(hint::EDONKEY, &[(1, 2)])]);
        assert_eq!(k.decide().0, EDONKEY);
        let k = signals(&[(0, &[(40000, 6881)])]);
        assert_eq!(k.decide().0, P2P);
    }

    #[test]
    fn ports_then_shape_decide_without_hints() {
        let k = signals(&[(0, &[(6346, 40000)]), (0, &[(50000, 6347)]), (0, &[(1, 2)])]);
        assert_eq!(
            k.decide(),
            (
                GNUTELLA,
                vec!["2 peers on Gnutella (6346, 6347) ports".to_string()]
            )
        );
        let k = signals(&[(0, &[(4662, 1)]), (0, &[(4672, 1)]), (0, &[(4662, 2)])]);
        assert_eq!(k.decide().0, EDONKEY);
        let mut k = signals(&[(0, &[(40000, 50001)])]);
        assert_eq!(k.decide().0, P2P);
        k.udp_small = (true, 30.0);
        assert_eq!(k.decide().0, P2P, "both rules are needed");
        k.tcp_and_udp = (true, 12.0);
        let (kind, why) = k.decide();
        assert_eq!(kind, BITTORRENT);
        assert_eq!(why.len(), 2, "{why:?}");
    }
}
