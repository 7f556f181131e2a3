//! Command-line interface.

use clap::{Args, Parser, Subcommand};

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::flow::Cidr;
use crate::sources::xdp::XdpModeArg;

#[derive(Debug, Parser)]
#[command(
    name = "detector",
    version,
    about = "Flow meter and P2P detector: XDP/TC flow records exported as NetFlow v9"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing RunArgs would save nothing worth the churn"
)]
pub enum Command {
    /// Meter an interface and/or collect NetFlow/IPFIX, and export the flows.
    Run(RunArgs),
    /// A detector node: consume the flows edge agents publish to NATS JetStream (the
    /// shards this node holds leases on), detect, and alarm once per host and episode.
    Central(CentralArgs),
    /// Run a capture file through the real XDP program (or its NetFlow datagrams through
    /// the decoder, with --netflow), on the capture's own clock.
    Replay(ReplayArgs),
    /// Validate a configuration file and print the effective configuration (a .yml or
    /// .yaml file: an --http-config file, and what it sets).
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Print the manual page (roff), for packaging.
    #[command(hide = true)]
    Man,
}

/// `--drain`: how the kernel flow maps are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DrainArg {
    Auto,
    Batch,
    PerKey,
}

impl DrainArg {
    /// The forced mode, or None to probe the kernel.
    pub fn mode(self) -> Option<crate::sources::xdp::DrainMode> {
        use crate::sources::xdp::DrainMode;
        match self {
            DrainArg::Auto => None,
            DrainArg::Batch => Some(DrainMode::Batch),
            DrainArg::PerKey => Some(DrainMode::PerKey),
        }
    }
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("source")
        .args(["iface", "netflow_listen", "sflow_listen", "config"])
        .required(true)
        .multiple(true)
))]
pub struct RunArgs {
    /// Interface to meter (XDP on ingress, TC on egress). Optional with --netflow-listen
    /// or --sflow-listen.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,

    /// Receive NetFlow v5/v9 and IPFIX on ADDR:PORT (repeatable), e.g. 0.0.0.0:2055.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub netflow_listen: Vec<SocketAddr>,

    /// Receive sFlow v5 on ADDR:PORT (repeatable), e.g. 0.0.0.0:6343: flow samples
    /// aggregated into flows with --active-timeout and --inactive-timeout.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub sflow_listen: Vec<SocketAddr>,

    /// Accept NetFlow and sFlow only from these sources (repeatable CIDR, e.g. 10.0.0.0/8); others
    /// are dropped and counted. Default: every source.
    #[arg(long, value_name = "CIDR")]
    pub exporter_allow: Vec<Cidr>,

    /// Receive buffer of each NetFlow and sFlow listener, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = crate::sources::netflow::listener::DEFAULT_RCVBUF)]
    pub netflow_rcvbuf: usize,

    /// XDP attach mode: auto tries native (driver) mode and falls back to generic.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeArg,

    /// NetFlow v9 collector HOST:PORT (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub export: Vec<String>,

    /// Protocol of the export: NetFlow v9 or IPFIX (the same content).
    #[arg(long, value_enum, value_name = "v9|ipfix", default_value = "v9")]
    pub export_format: crate::export::netflow_v9::ExportFormat,

    /// Export long-lived flows every SECS seconds (delta records).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub active_timeout: u64,

    /// Export and forget flows idle for SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub inactive_timeout: u64,

    /// Tell detection how each live local flow grew every SECS seconds (detection
    /// only: the export is unchanged); 0 to tell it only of each flow's start and its
    /// exports. Each long flow costs a lookup per interval.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub live_interval: u64,

    /// Pin the maps and the program links under DIR/IFACE on the BPF file system, so the
    /// meter keeps counting if the agent dies and the next run adopts what it counted;
    /// `none` to meter without pinned state.
    #[arg(long, value_name = "DIR|none", default_value = "/sys/fs/bpf/detector")]
    pub pin_path: String,

    /// Read the first bytes of each flow's first packets for the signatures of P2P
    /// protocols (BitTorrent handshake, uTP, DHT, Gnutella, eDonkey): only a flag per
    /// flow leaves the kernel, and it names the application in alarms. Off by default.
    #[arg(long)]
    pub payload_hints: bool,

    /// At SIGINT/SIGTERM, leave the programs attached and the maps pinned (for an
    /// upgrade: the next `run` on the interface adopts them and exports what they
    /// counted meanwhile) instead of detaching and flushing every flow.
    #[arg(long)]
    pub keep_attached: bool,

    /// Flows each kernel map (IPv4, IPv6) holds; packets of flows that do not fit take the
    /// ring-buffer path. Default: 1,048,576, or less when a quarter of the available
    /// memory cannot hold both maps (the size chosen and its kernel memory are logged).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1 << 26))]
    pub map_size: Option<u32>,

    /// Account 1 packet in N (random sampling); exported as the sampling interval.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub sampling: u32,

    /// NetFlow v9 source ID (observation domain) of the meter's records; relayed
    /// records take the next ids, one per sampling interval.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub source_id: u32,

    /// Write one JSON object per exported record to PATH (`-` for stdout).
    #[arg(long, value_name = "PATH")]
    pub flows_json: Option<String>,

    #[command(flatten)]
    pub detect: DetectArgs,

    /// Serve Prometheus metrics (/metrics), the open alarms (/api/alarms), the top hosts
    /// (/api/hosts?top=N) and a live status page (/) on ADDR:PORT, or PORT (:PORT) on
    /// 127.0.0.1, e.g. 9750 or 0.0.0.0:9750. Off by default; also `[http] listen` in the
    /// configuration file.
    #[arg(long, value_name = "[ADDR]:PORT", value_parser = crate::status::access::parse_http_listen)]
    pub http: Option<SocketAddr>,

    /// TLS and authentication of --http: a YAML file with Prometheus' web configuration
    /// keys (tls_server_config, basic_auth_users) and bearer_tokens, bearer_tokens_file,
    /// metrics_open; also `[http] config` in the configuration file.
    #[arg(long, value_name = "FILE")]
    pub http_config: Option<PathBuf>,

    /// Resend NetFlow v9 templates every N datagrams.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub template_refresh_packets: u32,

    /// Resend NetFlow v9 templates at least every SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub template_refresh_secs: u64,

    /// Log the meter's counters every SECS seconds (0: only at exit).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,

    /// How the kernel flow maps are read: batch syscalls (thousands of flows per call,
    /// Linux 5.6+), key by key, or auto (batch where the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    pub drain: DrainArg,

    /// Worker threads for duplicate marking and detection (records are sharded over them
    /// by internal host), and parser threads of each NetFlow listener. Default: one per
    /// CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: Option<u32>,

    /// Edge mode: also publish every record (after local duplicate marking) to NATS
    /// JetStream at URL, on `records.<shard>` by internal host, for `detector central`.
    /// Several servers of a cluster: comma-separated (streams it makes get as many
    /// replicas as URLs, up to 3).
    #[arg(long, value_name = "URL[,URL...]")]
    pub nats: Option<String>,

    /// Shards of the flows on NATS: the same count on every edge and node.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nats_shards: u32,

    /// Batches waiting for NATS at most (up to 2,000 records each); beyond, records are
    /// shed and counted.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub nats_buffer: u64,

    /// This agent's name in what it publishes (alarms list who saw a host), at most 32
    /// bytes. Default: the host name.
    #[arg(long, value_name = "NAME")]
    pub agent_name: Option<String>,

    /// File of the operators' decisions (acknowledged alarms, suppressed hosts and
    /// networks, taken on the status page or its API), kept across restarts and reloads.
    /// Default: decisions.json beside --config; without --config, in memory only.
    #[arg(long, value_name = "FILE")]
    pub decisions: Option<PathBuf>,
}

/// Detection and alarm settings shared by `run` and `replay`; flags override the file.
#[derive(Debug, Args, Clone, Default)]
pub struct DetectArgs {
    /// Configuration file (TOML): networks, allow-lists, window, thresholds, sinks.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Write one JSON object per alarm event to PATH (`-` for stdout); alarms are always
    /// logged as readable lines too.
    #[arg(long, value_name = "PATH")]
    pub alarms_json: Option<String>,

    /// Format of the alarm events in --alarms-json and the webhook's bodies: the
    /// detector's own JSON (native, the default) or Elastic Common Schema 8.x (ecs) for
    /// a SIEM; also `[sinks] alarm_format` in the configuration file.
    #[arg(long, value_enum, value_name = "native|ecs")]
    pub alarm_format: Option<crate::export::ecs::AlarmFormat>,

    /// Internal network (repeatable CIDR); replaces the configured list.
    #[arg(long, value_name = "CIDR")]
    pub internal: Vec<Cidr>,

    /// Send alarm events to syslog (RFC 5424): udp://HOST:PORT, tcp://HOST:PORT, unix:///dev/log.
    #[arg(long, value_name = "ADDR")]
    pub syslog: Option<String>,

    /// POST every alarm event as JSON to this http:// or https:// URL.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,

    /// PEM file of CA certificates to trust for an https webhook, beside the system's.
    #[arg(long, value_name = "FILE")]
    pub webhook_ca: Option<std::path::PathBuf>,
}

impl DetectArgs {
    /// The detection options these flags give.
    pub fn options(&self) -> crate::pipeline::build::DetectOptions {
        crate::pipeline::build::DetectOptions {
            config: self.config.clone(),
            alarms_json: self.alarms_json.clone(),
            alarm_format: self.alarm_format,
            internal: self.internal.clone(),
            syslog: self.syslog.clone(),
            webhook: self.webhook.clone(),
            webhook_ca: self.webhook_ca.clone(),
        }
    }
}

/// `detector replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A pcap or pcapng file (Ethernet, Linux cooked v1/v2, raw IP, BSD loopback).
    #[arg(value_name = "CAPTURE")]
    pub capture: PathBuf,

    /// Decode the NetFlow/IPFIX datagrams inside the capture instead of metering it.
    #[arg(long)]
    pub netflow: bool,

    /// With --netflow: only UDP to this port (default: any UDP that looks like NetFlow).
    #[arg(long, value_name = "PORT", requires = "netflow")]
    pub port: Option<u16>,

    /// With --netflow: accept only these exporters (repeatable CIDR).
    #[arg(long, value_name = "CIDR", requires = "netflow")]
    pub exporter_allow: Vec<Cidr>,

    /// NetFlow v9 collector HOST:PORT (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub export: Vec<String>,

    /// Protocol of the export: NetFlow v9 or IPFIX (the same content).
    #[arg(long, value_enum, value_name = "v9|ipfix", default_value = "v9")]
    pub export_format: crate::export::netflow_v9::ExportFormat,

    /// Write one JSON object per record to PATH (`-` for stdout).
    #[arg(long, value_name = "PATH")]
    pub flows_json: Option<String>,

    #[command(flatten)]
    pub detect: DetectArgs,

    /// Active timeout on the capture's clock.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub active_timeout: u64,

    /// Inactive timeout on the capture's clock.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub inactive_timeout: u64,

    /// Flows each kernel map holds.
    #[arg(long, value_name = "N", default_value_t = detector_common::DEFAULT_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..=1 << 26))]
    pub map_size: u32,

    /// NetFlow v9 source ID (observation domain) of the meter's records; relayed
    /// records take the next ids, one per sampling interval.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub source_id: u32,

    /// Read the first payload bytes of each flow's first packets for P2P protocol
    /// signatures (see `run --payload-hints`).
    #[arg(long)]
    pub payload_hints: bool,

    /// Worker threads for duplicate marking and detection (1 keeps the records in the
    /// capture's order in the output).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
}

impl ReplayArgs {
    /// What `replay` is to do.
    pub fn options(&self) -> crate::replay::ReplayOptions {
        crate::replay::ReplayOptions {
            capture: self.capture.clone(),
            netflow: self.netflow,
            port: self.port,
            exporter_allow: self.exporter_allow.clone(),
            export: self.export.clone(),
            export_format: self.export_format,
            source_id: self.source_id,
            flows_json: self.flows_json.clone(),
            detect: self.detect.options(),
            active_timeout: self.active_timeout,
            inactive_timeout: self.inactive_timeout,
            map_size: self.map_size,
            payload_hints: self.payload_hints,
            workers: self.workers,
        }
    }
}

/// `detector central`.
#[derive(Debug, Args)]
pub struct CentralArgs {
    /// NATS server URL (JetStream on), e.g. nats://127.0.0.1:4222; several servers of a
    /// cluster comma-separated (nats://a:4222,nats://b:4222,nats://c:4222).
    #[arg(long, value_name = "URL[,URL...]")]
    pub nats: String,

    /// Replicas of the streams and key-value buckets this node makes when they do not
    /// exist yet (3 on a three-server cluster). Default: as many as --nats URLs, up to 3.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_replicas: Option<u64>,

    /// Shards the flows are split in: the same count on every edge and node.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub shards: u32,

    /// This node's name in leases and logs (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// A node that stops renewing its leases loses its shards after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub lease_secs: u64,

    /// A batch delivered and not acknowledged (its node died) is delivered again after
    /// SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ack_wait_secs: u64,

    /// Log the node's counters every SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,

    /// Flows the node's duplicate table remembers (the same flow reported through two
    /// edges counts once), 16 bytes each; when it is full, the flow idle the longest
    /// gives way (counted and logged). Edges mark their own sources' duplicates first.
    #[arg(long, value_name = "N", default_value_t = crate::scaleout::central::DEDUP_FLOWS as u64, value_parser = clap::value_parser!(u64).range(1024..=1 << 32))]
    pub dedup_flows: u64,

    #[command(flatten)]
    pub detect: DetectArgs,
}

impl CentralArgs {
    /// What the node is to do.
    pub fn options(&self) -> crate::scaleout::central::CentralOptions {
        crate::scaleout::central::CentralOptions {
            nats: self.nats.clone(),
            replicas: self.nats_replicas.map(|r| r as usize),
            shards: self.shards,
            node: self.node.clone(),
            lease_secs: self.lease_secs,
            ack_wait_secs: self.ack_wait_secs,
            stats_interval: self.stats_interval,
            dedup_flows: self.dedup_flows as usize,
            detect: self.detect.options(),
        }
    }
}

impl RunArgs {
    /// The pin directory's base, or none with `--pin-path none`.
    pub fn pin_base(&self) -> Option<std::path::PathBuf> {
        (self.pin_path != "none" && !self.pin_path.is_empty())
            .then(|| std::path::PathBuf::from(&self.pin_path))
    }
}

impl RunArgs {
    /// `--netflow-listen` and `--sflow-listen`, each else the configuration file's
    /// `[netflow] listen` and `[sflow] listen`; an error if no source is left.
    pub fn with_file_listeners(mut self) -> Result<Self, crate::config::ConfigError> {
        let Some(path) = &self.detect.config else {
            return Ok(self);
        };
        let file = crate::config::FileConfig::load(path)?;
        self.netflow_listen = file.netflow.or_flags(&self.netflow_listen);
        self.sflow_listen = file.sflow.or_flags(&self.sflow_listen);
        if self.iface.is_none() && self.netflow_listen.is_empty() && self.sflow_listen.is_empty() {
            return Err(crate::config::ConfigError::NoSource {
                path: path.display().to_string(),
            });
        }
        Ok(self)
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "'{s}' is not ADDR:PORT; give an address and a port, e.g. 0.0.0.0:2055 or [::]:4739"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["detector", "run", "--iface", "eth0"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.iface.as_deref(), Some("eth0"));
        assert_eq!((a.active_timeout, a.inactive_timeout), (60, 15));
        assert_eq!(a.map_size, None);
        assert_eq!(a.sampling, 1);
        assert_eq!(a.xdp_mode, XdpModeArg::Auto);
        assert!(a.export.is_empty() && a.flows_json.is_none());
    }

    #[test]
    fn a_pure_collector_needs_no_interface() {
        let cli = Cli::try_parse_from([
            "detector",
            "run",
            "--netflow-listen",
            "127.0.0.1:2055",
            "--netflow-listen",
            "[::1]:4739",
            "--exporter-allow",
            "192.0.2.0/24",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!()
        };
        assert!(a.iface.is_none());
        assert_eq!(a.netflow_listen.len(), 2);
        assert!(a.exporter_allow[0].contains("192.0.2.7".parse().unwrap()));
        assert!(!a.exporter_allow[0].contains("192.0.3.7".parse().unwrap()));
    }

    #[test]
    fn an_sflow_collector_needs_no_interface() {
        let cli = Cli::try_parse_from([
            "detector",
            "run",
            "--sflow-listen",
            "127.0.0.1:6343",
            "--sflow-listen",
            "[::1]:6343",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!()
        };
        assert!(a.iface.is_none() && a.netflow_listen.is_empty());
        assert_eq!(a.sflow_listen.len(), 2);
    }

    #[test]
    fn the_alarm_format_is_native_unless_asked() {
        use crate::export::ecs::AlarmFormat;
        let parse = |extra: &[&str]| {
            let mut args = vec!["detector", "run", "--iface", "eth0"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).map(|c| c.command) {
                Ok(Command::Run(a)) => Ok(a.detect.alarm_format),
                Ok(_) => panic!(),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(
            parse(&["--alarm-format", "ecs"]),
            Ok(Some(AlarmFormat::Ecs))
        );
        assert_eq!(
            parse(&["--alarm-format", "native"]),
            Ok(Some(AlarmFormat::Native))
        );
        let e = parse(&["--alarm-format", "cef"]).unwrap_err();
        assert!(e.contains("native") && e.contains("ecs"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_flag_named() {
        let e = Cli::try_parse_from(["detector", "run", "--iface", "x", "--map-size", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--map-size"), "{e}");
        let e = Cli::try_parse_from(["detector", "run", "--iface", "x", "--xdp-mode", "turbo"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto") && e.contains("generic"), "{e}");
        let e = Cli::try_parse_from(["detector", "run"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--iface") && e.contains("--netflow-listen"),
            "{e}"
        );
        let e = Cli::try_parse_from(["detector", "run", "--netflow-listen", "2055"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.0.0.0:2055"), "{e}");
        let e = Cli::try_parse_from([
            "detector",
            "run",
            "--netflow-listen",
            "0.0.0.0:2055",
            "--exporter-allow",
            "10.0.0.0/33",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("prefix length"), "{e}");
    }
}
