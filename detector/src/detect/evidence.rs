//! The evidence rules: each turns a host profile into a number, compares it with its
//! threshold, and says whether it fired and with what weight. The score is the sum of
//! the weights of the rules that fired; look-alike guards can veto.
//!
//! The behaviour hunted (a BitTorrent or other P2P client): many external peers, none
//! dominating and none among the top talkers, each throttled to a small rate, remote
//! ports spread over the whole range, the same peers reached over TCP and UDP
//! (Karagiannis et al., IMC 2004), one stable local port that many peers connect to with
//! as many distinct remote ports as remote addresses (the {IP, port} test), a UDP
//! fan-out of small datagrams (DHT), and connection attempts that never complete.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::profile::{HostProfile, PeerStat};

/// Thresholds and weights of the rules; defaults in [`Thresholds::default`]. In the
/// configuration each threshold's key is its rule's name in the alarm's evidence
/// (`high_port_share` and `udp_small_size` qualify the `remote_ports` and
/// `udp_small_datagram_peers` rules); the keys of earlier versions are read too, see
/// [`RENAMED`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    #[serde(rename = "external_peers", alias = "peers")]
    pub peers: f64,
    pub flows: f64,
    pub top_peer_share: f64,
    #[serde(rename = "median_peer_bytes_per_min", alias = "peer_bytes_per_min")]
    pub peer_bytes_per_min: f64,
    pub remote_ports: f64,
    pub high_port_share: f64,
    #[serde(rename = "tcp_and_udp_peers", alias = "tcp_udp_peers")]
    pub tcp_udp_peers: f64,
    pub ip_port_ratio: f64,
    #[serde(rename = "stable_local_port_peers", alias = "listen_peers")]
    pub listen_peers: f64,
    #[serde(rename = "udp_small_datagram_peers", alias = "udp_small_peers")]
    pub udp_small_peers: f64,
    pub udp_small_size: f64,
    #[serde(rename = "failed_connection_share", alias = "failed_share")]
    pub failed_share: f64,
    /// Peers met on a P2P family's well-known port (see [`super::kind::family_of_port`]).
    pub p2p_port_peers: f64,
    /// Score at or above which a host is suspect.
    pub score: f64,
}

/// Threshold keys of earlier versions and the rule names that replaced them: still read,
/// with a warning that names the new key.
pub const RENAMED: &[(&str, &str)] = &[
    ("peers", "external_peers"),
    ("peer_bytes_per_min", "median_peer_bytes_per_min"),
    ("tcp_udp_peers", "tcp_and_udp_peers"),
    ("listen_peers", "stable_local_port_peers"),
    ("udp_small_peers", "udp_small_datagram_peers"),
    ("failed_share", "failed_connection_share"),
];

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            peers: 25.0,
            flows: 60.0,
            top_peer_share: 0.35,
            peer_bytes_per_min: super::profile::DEFAULT_PEER_BYTES_PER_MIN,
            remote_ports: 20.0,
            high_port_share: 0.7,
            tcp_udp_peers: 3.0,
            ip_port_ratio: 1.3,
            listen_peers: 8.0,
            udp_small_peers: 15.0,
            udp_small_size: super::profile::DEFAULT_UDP_SMALL_SIZE,
            failed_share: 0.2,
            p2p_port_peers: 10.0,
            score: 7.0,
        }
    }
}

/// One rule's verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    pub rule: &'static str,
    pub value: f64,
    /// How the value is compared with the threshold for the rule to fire: `>=` or `<=`.
    pub op: &'static str,
    pub threshold: f64,
    pub fired: bool,
    pub weight: f64,
}

/// The rule fires when the value is at least the threshold.
const AT_LEAST: &str = ">=";
/// The rule fires when the value is at most the threshold.
const AT_MOST: &str = "<=";

/// Everything the rules measured on a host, for the alarm.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measures {
    pub peers: u64,
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub top_peer_share: f64,
}

/// The verdict on one host.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub score: f64,
    pub evidence: Vec<Evidence>,
    pub measures: Measures,
    /// A look-alike guard that vetoed the alarm, if any.
    pub guard: Option<&'static str>,
    /// Each guard considered, with what it measured and whether it held.
    pub guard_evidence: Vec<String>,
    /// The highest score of the host's evaluations that no guard vetoed (the engine
    /// sets it; 0 from [`evaluate`] alone).
    pub peak: f64,
    /// The application (see [`super::kind`]) and the evidence that named it.
    pub kind: &'static str,
    pub kind_evidence: Vec<String>,
}

fn ev(rule: &'static str, value: f64, threshold: f64, fired: bool, weight: f64) -> Evidence {
    // The rules that look for little (a small share, a low rate, few ports per peer,
    // no peer among the top senders) fire at or below their threshold.
    let op = match rule {
        "top_peer_share"
        | "median_peer_bytes_per_min"
        | "ip_port_ratio"
        | "peer_in_top10_senders" => AT_MOST,
        _ => AT_LEAST,
    };
    Evidence {
        rule,
        value,
        op,
        threshold,
        fired,
        weight,
    }
}

/// A scanner sends its probes from one source port to several ports of each target
/// (nmap's SYN scan): its busiest local port carries this many port pairs per peer or
/// more, with little data back (a P2P listening port about one pair per peer: the
/// `ip_port_ratio` rule fires at 1.3 and under). Seen from the probes' starts, before
/// their failures are known at export; in the lab, nmap's first evaluation showed 1.96.
const PROBE_PORTS_PER_PEER: f64 = 1.5;

/// "No peer among the network's top senders" is reported but weighs nothing: it holds
/// for every host with many small peers, benign ones included (in the lab, a monitoring
/// poller, a browser and a port scanner all scored 5.5 on such generic rules alone, 1.5
/// under the threshold; without it they score 5.0 at most).
const TOP10_WEIGHT: f64 = 0.0;
/// Peers met on a P2P family's well-known port: specific evidence, and the one sign a
/// private-tracker client shows beside the generic ones (which give it 5.0).
const P2P_PORT_WEIGHT: f64 = 3.0;

/// The score and guard of [`evaluate`], from the profile's aggregates instead of a walk
/// over its peers: the same rules, the same thresholds, the same result (a property test
/// holds the two equal). The thresholds that depend on each peer (small datagrams, the
/// throttled rate) are those the profile was built with.
pub fn score(
    p: &mut HostProfile,
    t: &Thresholds,
    top_senders: &HashSet<IpAddr>,
) -> (f64, Option<&'static str>) {
    let peers = p.peer_count();
    let held = p.peers.len() as u64;
    let many = peers as f64 >= t.peers;
    let a = &p.agg;
    let (flows, bytes_in) = (a.flows, a.bytes_in);
    let total = a.bytes_in + a.bytes_out;
    let (attempts, failed) = (a.tcp_attempts, a.tcp_failed);
    let failed_share = share(failed, attempts);
    let extra = a.tcp_failed_extra;
    let distinct_remote = a.remote_ports.len() as u64;
    let high_share = if distinct_remote == 0 {
        0.0
    } else {
        a.high_ports as f64 / distinct_remote as f64
    };
    let (tcp_udp, udp_small, throttled) = (a.tcp_udp, a.udp_small, a.throttled);
    let p2p_port = a.p2p_port;
    let mut score = 0.0;
    let mut fire = |fired: bool, weight: f64| {
        if fired {
            score += weight;
        }
    };
    fire(many, 2.0);
    fire(flows as f64 >= t.flows, 1.0);
    if many {
        // top_peer_share <= threshold; an upper bound of the top that passes settles it.
        let share = |top: u64| {
            if total > 0 {
                top as f64 / total as f64
            } else {
                1.0
            }
        };
        let top_ok = share(p.agg.top) <= t.top_peer_share
            || (!p.agg.top_exact && share(p.top_exact()) <= t.top_peer_share);
        fire(top_ok, 1.0);
        let in_top = top_senders
            .iter()
            .any(|ip| p.peers.contains_key(&super::profile::PeerAddr::new(*ip)));
        fire(!in_top, TOP10_WEIGHT);
        // The median of the held peers' rates is at or below the threshold when more
        // than half of them are.
        fire(held > 0 && throttled > held / 2 || held == 0, 1.0);
    }
    fire(
        distinct_remote as f64 >= t.remote_ports && high_share >= t.high_port_share,
        2.0,
    );
    fire(tcp_udp as f64 >= t.tcp_udp_peers, 2.0);
    // The listening endpoint matters only with enough peers on it.
    let (mut listen_ips, mut listen_port) = p.agg.listen;
    if listen_ips as f64 >= t.listen_peers {
        (listen_ips, listen_port) = p.agg.listen_exact();
    }
    let busy_listener = listen_ips as f64 >= t.listen_peers;
    let mut probing = false;
    if busy_listener && listen_port > 1024 {
        let pairs = p.agg.local_ports.get(listen_port).map_or(0, |l| l.1);
        let ratio = pairs as f64 / listen_ips as f64;
        fire(ratio <= t.ip_port_ratio, 2.0);
        fire(true, 1.0);
        probing = ratio >= PROBE_PORTS_PER_PEER;
    }
    fire(udp_small as f64 >= t.udp_small_peers, 2.0);
    fire(attempts >= 20 && failed_share >= t.failed_share, 1.0);
    fire(p2p_port as f64 >= t.p2p_port_peers, P2P_PORT_WEIGHT);
    let guard = Guards {
        bytes_in,
        attempts: attempts + extra,
        failed_share: share(failed + extra, attempts + extra),
        probing,
        listen_port,
        listen_ips: u64::from(listen_ips),
        busy_listener,
        held,
        realtime: p.agg.realtime,
        web_only: p.agg.web_only,
        bt_opening: p.agg.bt_opening,
        p2p_signs: tcp_udp as f64 >= t.tcp_udp_peers
            || udp_small as f64 >= t.udp_small_peers
            || p2p_port as f64 >= t.p2p_port_peers,
        remote_ports: distinct_remote,
    }
    .veto();
    (score, guard)
}

/// `part` over `whole`, 0 when there is no whole.
fn share(part: u64, whole: u64) -> f64 {
    if whole > 0 {
        part as f64 / whole as f64
    } else {
        0.0
    }
}

/// What the look-alike guards look at, from the aggregates ([`score`]) or the walk
/// ([`evaluate`]), which agree.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Guards {
    pub bytes_in: u64,
    /// Outbound TCP attempts and the share that failed, each failed attempt seen under
    /// 1-in-N sampling standing for N ([`super::profile::PeerStat::tcp_failed_extra`]).
    pub attempts: u64,
    pub failed_share: f64,
    /// The busiest local port carries many port pairs per peer (a scan's probes).
    pub probing: bool,
    /// The busiest local port, its peers, and whether they are enough to call it one.
    pub listen_port: u16,
    pub listen_ips: u64,
    pub busy_listener: bool,
    /// Peers held in full, and of them: steady small-packet UDP exchanges, web servers
    /// reached as their client, connections opened with BitTorrent's handshake sizes.
    pub held: u64,
    pub realtime: u64,
    pub web_only: u64,
    pub bt_opening: u64,
    /// A P2P sign no server shows: the same peers over TCP and UDP, a DHT's small
    /// datagrams, peers on a P2P family's well-known port (those rules fired).
    pub p2p_signs: bool,
    /// Distinct remote ports.
    pub remote_ports: u64,
}

/// The share of a listening port's peers that must be real-time exchanges to call the
/// host a game or a call.
const REALTIME_SHARE: f64 = 0.75;
/// The share of a host's peers that must be web servers it is the client of.
const WEB_CLIENT_SHARE: f64 = 0.9;
/// The share of a host's peers that must come to its busy high port to call it a server.
const SERVER_SHARE: f64 = 0.9;

impl Guards {
    /// A scanner: connections that fail on many ports of few hosts, or one source port
    /// probing many ports of each target, with little data back.
    fn port_scan(&self) -> bool {
        self.bytes_in < 1_000_000
            && (self.attempts >= 20 && self.failed_share >= 0.8 || self.probing)
    }

    /// A server answering many clients on a well-known port.
    fn server(&self) -> bool {
        self.listen_port != 0 && self.busy_listener && self.listen_port <= 1024
    }

    /// A server on a high port (a game server, a media or chat server, SSH on 2222):
    /// nearly every peer comes to the one busy local port, and nothing P2P besides: no
    /// outbound connections to peers of its own (a client in a swarm connects out to
    /// most of its peers), no UDP beside TCP with the same peers, no DHT, no P2P
    /// family's port, no BitTorrent handshake. A seeder whose peers all connect to it
    /// over TCP, without DHT or uTP, seen only through NetFlow (no openings), looks the
    /// same.
    fn server_on_high_port(&self) -> bool {
        self.busy_listener
            && self.listen_port > 1024
            && self.listen_ips as f64 >= SERVER_SHARE * self.held as f64
            // Clients come from ports of their own; a host that goes to one service
            // port of many servers from one port of its own (a resolver) is no server.
            && 2 * self.remote_ports >= self.listen_ips
            && !self.p2p_signs
            && self.bt_opening < (self.held / 5).max(3)
    }

    /// A game session or a call: most peers of the busy local port exchange small
    /// datagrams both ways at a steady rate (a stable peer set held for the session).
    /// A swarm's listening port carries transfers and DHT contacts, neither of them.
    fn realtime_session(&self) -> bool {
        self.busy_listener && self.realtime as f64 >= REALTIME_SHARE * self.listen_ips as f64
    }

    /// A client of many web servers (a multi-source download, a bulk upload, a
    /// browser): nearly every peer reached on a web port from an ephemeral port, no
    /// local port that peers come to, and no BitTorrent handshake among its
    /// connections (a swarm whose peers listen on 80 and 443 still opens with one).
    fn web_client(&self) -> bool {
        self.held > 0
            && self.web_only as f64 >= WEB_CLIENT_SHARE * self.held as f64
            && !self.busy_listener
            && self.bt_opening < (self.held / 5).max(3)
    }

    /// The guard that vetoes an alarm, if any, first match in this order.
    pub fn veto(&self) -> Option<&'static str> {
        if self.port_scan() {
            Some("port_scan")
        } else if self.server() {
            Some("server_on_well_known_port")
        } else if self.realtime_session() {
            Some("realtime_session")
        } else if self.server_on_high_port() {
            Some("server_on_high_port")
        } else if self.web_client() {
            Some("web_client")
        } else {
            None
        }
    }

    /// Each guard with what it measured and whether it holds, for the evidence.
    pub fn explain(&self) -> Vec<String> {
        let held = |b: bool| if b { "holds" } else { "does not hold" };
        vec![
            format!(
                "port_scan {}: {} bytes in, {} of {} outbound attempts failed, probing {}",
                held(self.port_scan()),
                self.bytes_in,
                (self.failed_share * self.attempts as f64).round(),
                self.attempts,
                self.probing
            ),
            format!(
                "server_on_well_known_port {}: busiest local port {} with {} peers",
                held(self.server()),
                self.listen_port,
                self.listen_ips
            ),
            format!(
                "server_on_high_port {}: {} of {} peers come to local port {}, P2P signs (TCP and UDP, DHT, P2P ports) {}, {} BitTorrent-sized handshakes",
                held(self.server_on_high_port()),
                self.listen_ips,
                self.held,
                self.listen_port,
                if self.p2p_signs { "yes" } else { "none" },
                self.bt_opening
            ),
            format!(
                "realtime_session {}: {} peers in steady small-packet UDP exchanges both ways, busiest local port {} with {} peers",
                held(self.realtime_session()),
                self.realtime,
                self.listen_port,
                self.listen_ips
            ),
            format!(
                "web_client {}: {} of {} peers reached only on web ports, {} BitTorrent-sized handshakes, {} local port peers come to",
                held(self.web_client()),
                self.web_only,
                self.held,
                self.bt_opening,
                if self.busy_listener { "a" } else { "no" }
            ),
        ]
    }
}

/// Evaluates every rule on `p`. `top_senders` are the external addresses that sent the
/// most bytes to the internal network over the window; `window_min` is the window length.
pub fn evaluate(
    p: &mut HostProfile,
    t: &Thresholds,
    top_senders: &HashSet<IpAddr>,
    window_min: f64,
) -> Verdict {
    let peers = p.peer_count();
    let mut m = Measures {
        peers,
        ..Measures::default()
    };
    let mut per_peer_rate = Vec::with_capacity(p.peers.len());
    let mut top = 0u64;
    let mut remote_ports: Vec<u16> = Vec::with_capacity(p.peers.len() * 2);
    let mut tcp_udp = 0u64;
    let (mut attempts, mut failed, mut extra) = (0u64, 0u64, 0u64);
    let mut udp_small = 0u64;
    let mut p2p_port = 0u64;
    // (local port, remote address, remote port) of every peer's connections.
    let mut endpoints: Vec<(u16, IpAddr, u16)> = Vec::with_capacity(p.peers.len() * 2);
    let mut in_top = false;
    let mut kind = super::kind::KindSignals::default();
    let (mut realtime, mut web_only, mut bt_opening) = (0u64, 0u64, 0u64);
    for (key, s) in p.peers.iter() {
        let ip = &key.ip();
        let pairs = p.pairs(s);
        kind.add_peer(s.hints, &pairs);
        kind.add_opening(s.open_out, s.open_in);
        realtime += u64::from(s.realtime(&pairs));
        web_only += u64::from(PeerStat::web_only(&pairs));
        bt_opening += u64::from(s.opening().is_bittorrent());
        m.flows += u64::from(s.flows);
        m.bytes_in += s.bytes_in;
        m.bytes_out += s.bytes_out;
        let total = s.bytes_in + s.bytes_out;
        top = top.max(total);
        per_peer_rate.push(total as f64 / window_min.max(1.0));
        for &(l, r) in pairs.iter() {
            remote_ports.push(r);
            endpoints.push((l, *ip, r));
        }
        if s.tcp && s.udp {
            tcp_udp += 1;
        }
        if PeerStat::on_p2p_port(&pairs) {
            p2p_port += 1;
        }
        attempts += u64::from(s.tcp_attempts);
        failed += u64::from(s.tcp_failed);
        extra += u64::from(s.tcp_failed_extra);
        if s.udp_packets > 0 && (s.udp_bytes as f64 / s.udp_packets as f64) < t.udp_small_size {
            udp_small += 1;
        }
        in_top |= top_senders.contains(ip);
    }
    let total = m.bytes_in + m.bytes_out;
    m.top_peer_share = if total > 0 {
        top as f64 / total as f64
    } else {
        1.0
    };
    per_peer_rate.sort_by(f64::total_cmp);
    let median_rate = per_peer_rate
        .get(per_peer_rate.len() / 2)
        .copied()
        .unwrap_or(0.0);
    remote_ports.sort_unstable();
    remote_ports.dedup();
    let high_share = if remote_ports.is_empty() {
        0.0
    } else {
        remote_ports.iter().filter(|&&p| p > 1024).count() as f64 / remote_ports.len() as f64
    };
    // The listening endpoint: the local port with the most distinct peers, with its
    // distinct remote addresses and (address, port) pairs (one sorted pass).
    endpoints.sort_unstable();
    endpoints.dedup();
    let (mut listen_port, mut listen_ips, mut listen_pairs) = (0u16, 0usize, 0usize);
    let mut i = 0;
    while i < endpoints.len() {
        let l = endpoints[i].0;
        let (mut ips, mut pairs) = (0usize, 0usize);
        let mut last_ip = None;
        while i < endpoints.len() && endpoints[i].0 == l {
            pairs += 1;
            if last_ip != Some(endpoints[i].1) {
                ips += 1;
                last_ip = Some(endpoints[i].1);
            }
            i += 1;
        }
        if (ips, l) > (listen_ips, listen_port) {
            (listen_port, listen_ips, listen_pairs) = (l, ips, pairs);
        }
    }
    let ip_port_ratio = if listen_ips > 0 {
        listen_pairs as f64 / listen_ips as f64
    } else {
        0.0
    };
    let failed_share = share(failed, attempts);
    let many = peers as f64 >= t.peers;
    let evidence = vec![
        ev("external_peers", peers as f64, t.peers, many, 2.0),
        ev(
            "flows",
            m.flows as f64,
            t.flows,
            m.flows as f64 >= t.flows,
            1.0,
        ),
        ev(
            "top_peer_share",
            m.top_peer_share,
            t.top_peer_share,
            many && m.top_peer_share <= t.top_peer_share,
            1.0,
        ),
        ev(
            "peer_in_top10_senders",
            in_top as u8 as f64,
            0.0,
            many && !in_top,
            TOP10_WEIGHT,
        ),
        ev(
            "median_peer_bytes_per_min",
            median_rate,
            t.peer_bytes_per_min,
            many && median_rate <= t.peer_bytes_per_min,
            1.0,
        ),
        ev(
            "remote_ports",
            remote_ports.len() as f64,
            t.remote_ports,
            remote_ports.len() as f64 >= t.remote_ports && high_share >= t.high_port_share,
            2.0,
        ),
        ev(
            "tcp_and_udp_peers",
            tcp_udp as f64,
            t.tcp_udp_peers,
            tcp_udp as f64 >= t.tcp_udp_peers,
            2.0,
        ),
        ev(
            "ip_port_ratio",
            ip_port_ratio,
            t.ip_port_ratio,
            listen_ips as f64 >= t.listen_peers
                && listen_port > 1024
                && ip_port_ratio <= t.ip_port_ratio,
            2.0,
        ),
        ev(
            "stable_local_port_peers",
            listen_ips as f64,
            t.listen_peers,
            listen_ips as f64 >= t.listen_peers && listen_port > 1024,
            1.0,
        ),
        ev(
            "udp_small_datagram_peers",
            udp_small as f64,
            t.udp_small_peers,
            udp_small as f64 >= t.udp_small_peers,
            2.0,
        ),
        ev(
            "failed_connection_share",
            failed_share,
            t.failed_share,
            attempts >= 20 && failed_share >= t.failed_share,
            1.0,
        ),
        ev(
            "p2p_port_peers",
            p2p_port as f64,
            t.p2p_port_peers,
            p2p_port as f64 >= t.p2p_port_peers,
            P2P_PORT_WEIGHT,
        ),
    ];
    let score = evidence
        .iter()
        .filter(|e| e.fired)
        .map(|e| e.weight)
        .fold(0.0, |a, w| a + w);
    // Look-alikes (see [`Guards`]).
    let busy_listener = listen_ips as f64 >= t.listen_peers;
    let probing = busy_listener && listen_port > 1024 && ip_port_ratio >= PROBE_PORTS_PER_PEER;
    let guards = Guards {
        bytes_in: m.bytes_in,
        attempts: attempts + extra,
        failed_share: share(failed + extra, attempts + extra),
        probing,
        listen_port,
        listen_ips: listen_ips as u64,
        busy_listener,
        held: p.peers.len() as u64,
        realtime,
        web_only,
        bt_opening,
        p2p_signs: tcp_udp as f64 >= t.tcp_udp_peers
            || udp_small as f64 >= t.udp_small_peers
            || p2p_port as f64 >= t.p2p_port_peers,
        remote_ports: remote_ports.len() as u64,
    };
    let guard = guards.veto();
    let guard_evidence = guards.explain();
    let fired = |rule: &str| {
        evidence
            .iter()
            .find(|e| e.rule == rule)
            .map_or((false, 0.0), |e| (e.fired, e.value))
    };
    kind.udp_small = fired("udp_small_datagram_peers");
    kind.tcp_and_udp = fired("tcp_and_udp_peers");
    let (kind, kind_evidence) = kind.decide();
    Verdict {
        score,
        evidence,
        measures: m,
        guard,
        guard_evidence,
        peak: 0.0,
        kind,
        kind_evidence,
    }
}
