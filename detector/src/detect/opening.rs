//! How a TCP connection opened, from the local meter's first payload sizes each way
//! (`detector_common::opening`): what a meter sees of a handshake without reading it.

/// How a TCP connection opened, from the first payload each way (opening slot values,
/// see `detector_common::opening`): what a meter sees of a handshake without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// One side or both not seen with payload yet (or no local meter: NetFlow).
    Unknown,
    /// The plaintext BitTorrent handshake opens one side: exactly 68 bytes (1 + 19 + 8 +
    /// 20 + 20), answered by at least as much (the other side's handshake, with its
    /// bitfield when they travel together).
    PlainBitTorrent,
    /// Both sides open with 96 to 608 bytes: a 768-bit Diffie-Hellman public key (96
    /// bytes) and 0 to 512 bytes of random padding each way, the key exchange of
    /// BitTorrent's Message Stream Encryption. Other protocols can open with such sizes
    /// too (a Gnutella connect and its answer, a resumed TLS session); their sizes
    /// repeat from one connection to the next, the random padding's do not, which the
    /// naming checks over the host's peers ([`super::kind`]).
    KeyExchange,
    /// A side opened with more than 608 bytes at once: a TLS server's first flight (its
    /// certificate chain), an HTTP response, a post-quantum TLS ClientHello.
    Large,
    /// Anything else (smaller openings: SSH banners, plain-text protocol greetings).
    Other,
}

impl Opening {
    pub const PLAIN_HANDSHAKE: u8 = detector_common::opening::quantize(68);
    pub const KEY_EXCHANGE: std::ops::RangeInclusive<u8> =
        detector_common::opening::quantize(96)..=detector_common::opening::quantize(608);

    pub fn of(out: u8, inn: u8) -> Self {
        if out == 0 || inn == 0 {
            return Opening::Unknown;
        }
        let large = |q: u8| q > *Self::KEY_EXCHANGE.end();
        if (out == Self::PLAIN_HANDSHAKE && inn >= out)
            || (inn == Self::PLAIN_HANDSHAKE && out >= inn)
        {
            // The answer may carry the bitfield and extension handshake with it.
            Opening::PlainBitTorrent
        } else if Self::KEY_EXCHANGE.contains(&out) && Self::KEY_EXCHANGE.contains(&inn) {
            Opening::KeyExchange
        } else if large(out) || large(inn) {
            Opening::Large
        } else {
            Opening::Other
        }
    }

    /// A BitTorrent handshake's sizes, plain or encrypted.
    pub fn is_bittorrent(self) -> bool {
        matches!(self, Opening::PlainBitTorrent | Opening::KeyExchange)
    }
}
