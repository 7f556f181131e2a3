//! What the two export formats write: NetFlow v9's field types (RFC 3954 section 8)
//! and IPFIX's information elements (RFC 7011, RFC 5477 for sampling), their templates,
//! options templates and set ids. The encoder writes whichever [`Layout`] its
//! [`ExportFormat`] names; this file is where the two formats differ.

pub const TEMPLATE_IPV4: u16 = 256;
pub const TEMPLATE_IPV6: u16 = 257;
pub const TEMPLATE_OPTIONS: u16 = 258;

pub(super) const HEADER_LEN: usize = 20;
pub(super) const FLOWSET_HEADER_LEN: usize = 4;

// RFC 3954 section 8 field types.
pub(super) const IN_BYTES: u16 = 1;
pub(super) const IN_PKTS: u16 = 2;
pub(super) const PROTOCOL: u16 = 4;
pub(super) const SRC_TOS: u16 = 5;
pub(super) const TCP_FLAGS: u16 = 6;
pub(super) const L4_SRC_PORT: u16 = 7;
pub(super) const IPV4_SRC_ADDR: u16 = 8;
pub(super) const INPUT_SNMP: u16 = 10;
pub(super) const L4_DST_PORT: u16 = 11;
pub(super) const IPV4_DST_ADDR: u16 = 12;
pub(super) const OUTPUT_SNMP: u16 = 14;
pub(super) const LAST_SWITCHED: u16 = 21;
pub(super) const FIRST_SWITCHED: u16 = 22;
pub(super) const IPV6_SRC_ADDR: u16 = 27;
pub(super) const IPV6_DST_ADDR: u16 = 28;
pub(super) const ICMP_TYPE: u16 = 32;
pub(super) const SAMPLING_INTERVAL: u16 = 34;
pub(super) const SAMPLING_ALGORITHM: u16 = 35;
pub(super) const SRC_VLAN: u16 = 58;
pub(super) const DIRECTION: u16 = 61;
/// Options scope type "System" (RFC 3954 6.2).
pub(super) const SCOPE_SYSTEM: u16 = 1;
// IPFIX information elements (IANA registry) where they differ from v9.
pub(super) const FLOW_START_MILLISECONDS: u16 = 152;
pub(super) const FLOW_END_MILLISECONDS: u16 = 153;
pub(super) const OBSERVATION_DOMAIN_ID: u16 = 149;
pub(super) const SAMPLING_PACKET_INTERVAL: u16 = 305;
pub(super) const SAMPLING_PACKET_SPACE: u16 = 306;

/// The export protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// NetFlow v9 (RFC 3954).
    #[default]
    V9,
    /// IPFIX (RFC 7011).
    Ipfix,
}

/// (field type, length) of the data templates; the address and time fields per family
/// and format.
const fn data_fields(
    src: u16,
    dst: u16,
    addr_len: u16,
    first: (u16, u16),
    last: (u16, u16),
) -> [(u16, u16); 16] {
    [
        (IN_BYTES, 8),
        (IN_PKTS, 8),
        first,
        last,
        (src, addr_len),
        (dst, addr_len),
        (L4_SRC_PORT, 2),
        (L4_DST_PORT, 2),
        (PROTOCOL, 1),
        (SRC_TOS, 1),
        (TCP_FLAGS, 1),
        (DIRECTION, 1),
        (INPUT_SNMP, 4),
        (OUTPUT_SNMP, 4),
        (SRC_VLAN, 2),
        (ICMP_TYPE, 2),
    ]
}

pub(super) const V9_TIMES: [(u16, u16); 2] = [(FIRST_SWITCHED, 4), (LAST_SWITCHED, 4)];
pub(super) const IPFIX_TIMES: [(u16, u16); 2] =
    [(FLOW_START_MILLISECONDS, 8), (FLOW_END_MILLISECONDS, 8)];
pub(super) const IPV4_FIELDS: [(u16, u16); 16] =
    data_fields(IPV4_SRC_ADDR, IPV4_DST_ADDR, 4, V9_TIMES[0], V9_TIMES[1]);
pub(super) const IPV6_FIELDS: [(u16, u16); 16] =
    data_fields(IPV6_SRC_ADDR, IPV6_DST_ADDR, 16, V9_TIMES[0], V9_TIMES[1]);
pub(super) const IPFIX_IPV4_FIELDS: [(u16, u16); 16] = data_fields(
    IPV4_SRC_ADDR,
    IPV4_DST_ADDR,
    4,
    IPFIX_TIMES[0],
    IPFIX_TIMES[1],
);
pub(super) const IPFIX_IPV6_FIELDS: [(u16, u16); 16] = data_fields(
    IPV6_SRC_ADDR,
    IPV6_DST_ADDR,
    16,
    IPFIX_TIMES[0],
    IPFIX_TIMES[1],
);
pub(super) const OPTION_SCOPE: [(u16, u16); 1] = [(SCOPE_SYSTEM, 4)];
pub(super) const OPTION_FIELDS: [(u16, u16); 2] = [(SAMPLING_INTERVAL, 4), (SAMPLING_ALGORITHM, 1)];
pub(super) const IPFIX_OPTION_SCOPE: [(u16, u16); 1] = [(OBSERVATION_DOMAIN_ID, 4)];
pub(super) const IPFIX_OPTION_FIELDS: [(u16, u16); 2] =
    [(SAMPLING_PACKET_INTERVAL, 4), (SAMPLING_PACKET_SPACE, 4)];

/// What differs between the two formats.
pub(super) struct Layout {
    pub(super) header_len: usize,
    pub(super) template_set: u16,
    pub(super) options_set: u16,
    pub(super) v4: &'static [(u16, u16); 16],
    pub(super) v6: &'static [(u16, u16); 16],
    pub(super) scope: &'static [(u16, u16); 1],
    pub(super) options: &'static [(u16, u16); 2],
}

pub(super) const V9_LAYOUT: Layout = Layout {
    header_len: HEADER_LEN,
    template_set: 0,
    options_set: 1,
    v4: &IPV4_FIELDS,
    v6: &IPV6_FIELDS,
    scope: &OPTION_SCOPE,
    options: &OPTION_FIELDS,
};

pub(super) const IPFIX_LAYOUT: Layout = Layout {
    header_len: 16,
    template_set: 2,
    options_set: 3,
    v4: &IPFIX_IPV4_FIELDS,
    v6: &IPFIX_IPV6_FIELDS,
    scope: &IPFIX_OPTION_SCOPE,
    options: &IPFIX_OPTION_FIELDS,
};

impl ExportFormat {
    pub(super) fn layout(self) -> &'static Layout {
        match self {
            ExportFormat::V9 => &V9_LAYOUT,
            ExportFormat::Ipfix => &IPFIX_LAYOUT,
        }
    }
}

pub(super) const fn record_len(fields: &[(u16, u16)]) -> usize {
    let mut i = 0;
    let mut n = 0;
    while i < fields.len() {
        n += fields[i].1 as usize;
        i += 1;
    }
    n
}

pub const IPV4_RECORD_LEN: usize = record_len(&IPV4_FIELDS);
pub const IPV6_RECORD_LEN: usize = record_len(&IPV6_FIELDS);
