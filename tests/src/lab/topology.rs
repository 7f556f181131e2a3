//! The lab's networks: one namespace per internal host on a LAN bridge in the gateway
//! namespace, and an uplink from the gateway to an "internet" namespace that holds every
//! external address. All namespaces are named `dlab-*`; they are removed on drop, and a
//! new lab first removes any left by a run that was killed.
//!
//! ```text
//!  dlab-<host> eth0 10.10.0.x ─┐
//!  dlab-<host> eth0 10.10.0.y ─┤ br0 10.10.0.1   dlab-gw   up0 192.0.2.1 ══ up1 192.0.2.2   dlab-inet
//!  ...                        ─┘ (softflowd)              (the agent:                  (198.18.0.0/15
//!                                                           XDP in, TC out)              addresses)
//! ```
//!
//! IPv6 is off and the uplink runs without ARP (static neighbours) and without offloads,
//! so every frame on the uplink is an IPv4 packet the meter must account for, and the
//! interface counters are a truth to compare the export with.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub const PREFIX: &str = "dlab-";
pub const GW: &str = "dlab-gw";
pub const INET: &str = "dlab-inet";
pub const UPLINK: &str = "up0";
pub const LAN_BRIDGE: &str = "br0";

/// Runs a command, failing with its output.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ns_run(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Feeds `ip -n NS -batch -` with `lines`.
fn ip_batch(ns: &str, lines: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ip -batch")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(lines.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Removes every `dlab-*` namespace, killing what still runs in it.
pub fn remove_all() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
    {
        if let Ok(pids) = run("ip", &["netns", "pids", name]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

/// An internal host: its namespace and LAN address.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: &'static str,
    pub ns: String,
    pub addr: Ipv4Addr,
}

pub struct Topology {
    pub hosts: Vec<Host>,
}

fn add_ns(name: &str) -> Result<()> {
    run("ip", &["netns", "add", name])?;
    ns_run(name, "ip", &["link", "set", "lo", "up"])?;
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        ns_run(name, "sysctl", &["-qw", key])?;
    }
    Ok(())
}

fn offloads_off(ns: &str, dev: &str) -> Result<()> {
    ns_run(
        ns,
        "ethtool",
        &[
            "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off",
        ],
    )?;
    Ok(())
}

fn mac(ns: &str, dev: &str) -> Result<String> {
    Ok(
        ns_run(ns, "cat", &[&format!("/sys/class/net/{dev}/address")])?
            .trim()
            .to_string(),
    )
}

impl Topology {
    /// Builds the networks for `hosts` (name, last octet of its LAN address) and puts
    /// `external` on the internet side.
    pub fn build(hosts: &[(&'static str, u8)], external: &[Ipv4Addr]) -> Result<Self> {
        remove_all();
        let mut topo = Self { hosts: Vec::new() };
        add_ns(GW)?;
        add_ns(INET)?;
        ns_run(GW, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        ip_batch(
            GW,
            &format!(
                "link add {LAN_BRIDGE} type bridge stp_state 0\n\
                 addr add 10.10.0.1/24 dev {LAN_BRIDGE}\n\
                 link set {LAN_BRIDGE} up\n"
            ),
        )?;
        for (i, (name, octet)) in hosts.iter().enumerate() {
            let ns = format!("{PREFIX}{name}");
            add_ns(&ns)?;
            let port = format!("lan{i}");
            run(
                "ip",
                &[
                    "link", "add", &port, "netns", GW, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            let addr = Ipv4Addr::new(10, 10, 0, *octet);
            offloads_off(GW, &port)?;
            offloads_off(&ns, "eth0")?;
            ip_batch(
                GW,
                &format!("link set {port} master {LAN_BRIDGE}\nlink set {port} up\n"),
            )?;
            ip_batch(
                &ns,
                &format!(
                    "addr add {addr}/24 dev eth0\nlink set eth0 up\nroute add default via 10.10.0.1\n"
                ),
            )?;
            topo.hosts.push(Host { name, ns, addr });
        }
        run(
            "ip",
            &[
                "link", "add", UPLINK, "netns", GW, "type", "veth", "peer", "name", "up1", "netns",
                INET,
            ],
        )?;
        offloads_off(GW, UPLINK)?;
        offloads_off(INET, "up1")?;
        let (gw_mac, inet_mac) = (mac(GW, UPLINK)?, mac(INET, "up1")?);
        ip_batch(
            GW,
            &format!(
                "addr add 192.0.2.1/30 dev {UPLINK}\n\
                 link set {UPLINK} arp off\n\
                 link set {UPLINK} up\n\
                 neigh replace 192.0.2.2 lladdr {inet_mac} dev {UPLINK} nud permanent\n\
                 route add 198.18.0.0/15 via 192.0.2.2\n"
            ),
        )?;
        let mut inet = format!(
            "addr add 192.0.2.2/30 dev up1\n\
             link set up1 arp off\n\
             link set up1 up\n\
             neigh replace 192.0.2.1 lladdr {gw_mac} dev up1 nud permanent\n\
             route add 10.10.0.0/16 via 192.0.2.1\n"
        );
        for a in external {
            inet.push_str(&format!("addr add {a}/32 dev up1\n"));
        }
        ip_batch(INET, &inet)?;
        Ok(topo)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("a host of the lab")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        remove_all();
    }
}

/// The gateway uplink's interface counters: (packets, bytes) received from the internet
/// (the XDP side), then (packets, bytes) sent to it (the TC side).
pub fn uplink_counters() -> Result<[u64; 4]> {
    let read = |f: &str| -> Result<u64> {
        ns_run(
            GW,
            "cat",
            &[&format!("/sys/class/net/{UPLINK}/statistics/{f}")],
        )?
        .trim()
        .parse()
        .context("interface counter")
    };
    Ok([
        read("rx_packets")?,
        read("rx_bytes")?,
        read("tx_packets")?,
        read("tx_bytes")?,
    ])
}

/// Ethernet header bytes in each direction's byte counter (received, sent), which
/// NetFlow (IP total length) does not count. A veth with a native XDP program receives
/// through NAPI and counts each frame after `eth_type_trans` has pulled the Ethernet
/// header; what it sends is counted with the header.
pub const L2_HEADER_IN_COUNTERS: [u64; 2] = [0, 14];

/// UDP datagrams the kernel dropped for want of socket buffer in namespace `ns` (the
/// `RcvbufErrors` of /proc/net/snmp), if readable.
pub fn udp_rcvbuf_errors(ns: &str) -> Option<u64> {
    let snmp = ns_run(ns, "cat", &["/proc/net/snmp"]).ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}
