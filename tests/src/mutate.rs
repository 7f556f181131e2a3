//! Mutations of a datagram for the decoders' fuzz tests (`netflow_fuzz`, `sflow_fuzz`):
//! each test draws the kinds that suit its format (NetFlow's 16-bit fields, sFlow's
//! 32-bit XDR words, pieces of other seeds) beside the byte edits every format gets
//! ([`byte_edits`]), and applies them here.

use proptest::prelude::*;

/// One change to a datagram; indexes are reduced modulo the datagram's length.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Bits of a byte flipped.
    Flip(usize, u8),
    /// Cut short.
    Truncate(usize),
    /// Bytes put in.
    Insert(usize, Vec<u8>),
    /// A 16-bit field set (lengths, counts, ids: what NetFlow parsers trust).
    SetU16(usize, u16),
    /// A 32-bit word set on a word boundary (XDR's lengths, counts, formats and rates).
    SetU32(usize, u32),
    /// Bytes `at..at+len` of another seed put at `to`.
    Splice {
        from: usize,
        at: usize,
        len: usize,
        to: usize,
    },
}

/// What every format's fuzz test draws: flipped bits, a cut, inserted bytes (equally
/// likely; weigh it 3 beside a test's own kinds to keep each kind's share).
pub fn byte_edits() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

/// `d` with `muts` applied in order; a splice takes its piece from `seeds`.
pub fn apply(mut d: Vec<u8>, muts: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    for m in muts {
        let n = d.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !d.is_empty() {
                    d[i % n] ^= b;
                }
            }
            Mutation::Truncate(i) => d.truncate(i % n),
            Mutation::Insert(i, v) => {
                let at = i % (d.len() + 1);
                d.splice(at..at, v.iter().copied());
            }
            Mutation::SetU16(i, v) => {
                if d.len() >= 2 {
                    let at = i % (d.len() - 1);
                    d[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
            Mutation::SetU32(i, v) => {
                if d.len() >= 4 {
                    let at = (i % (d.len() / 4)) * 4;
                    d[at..at + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            Mutation::Splice { from, at, len, to } => {
                let Some(src) = seeds.get(from % seeds.len().max(1)) else {
                    continue;
                };
                if src.is_empty() {
                    continue;
                }
                let a = at % src.len();
                let piece = &src[a..(a + len).min(src.len())];
                let to = to % (d.len() + 1);
                d.splice(to..to, piece.iter().copied());
            }
        }
    }
    d
}
