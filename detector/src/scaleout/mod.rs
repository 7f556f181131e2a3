//! Scale-out over NATS JetStream: edge agents publish their flow records, sharded by
//! internal host, and detector nodes (`detector central`) consume the shards, one node
//! per shard at a time.
//!
//! - `wire`: the records' encoding on the `records.<shard>` subjects (versioned; version
//!   2 carries live flows: starts, growth reports and continued exports).
//! - `edge`: the record sink of `detector run --nats URL`, the one sink that takes the
//!   detection-only records of live flows, so nodes detect from them as a single agent
//!   does (a node's pipeline counts them with the same code).
//! - `central`: a detector node: leases, consumers, the takeover's replay, the shared
//!   pipeline, alarms.
//!
//! What lives in JetStream: the stream `DETECTOR_RECORDS` (subjects `records.*`, kept by
//! age, [`KEEP`]: acknowledged batches stay, so a node that takes a shard over replays
//! the detection window of it from the start of the window), the stream
//! `DETECTOR_ALARMS` (subject `alarms`), and three key-value buckets: `detector-config`
//! (the shard count every edge and node must agree on), `detector-leases` (which node owns
//! which shard; entries expire unless renewed) and `detector-alarms` (the open alarm of
//! each host, so a node that takes a shard over continues its episode instead of raising
//! it again). Streams and buckets are made with the replicas asked for (`--nats-replicas`,
//! 3 on a three-server cluster).

pub mod central;
pub mod edge;
pub mod wire;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, stream};

/// Subjects, streams and buckets.
pub struct Names;

impl Names {
    pub const RECORDS_STREAM: &str = "DETECTOR_RECORDS";
    pub const ALARMS_STREAM: &str = "DETECTOR_ALARMS";
    pub const ALARMS_SUBJECT: &str = "alarms";
    pub const CONFIG_BUCKET: &str = "detector-config";
    pub const LEASE_BUCKET: &str = "detector-leases";
    pub const ALARM_BUCKET: &str = "detector-alarms";

    pub fn records(shard: u32) -> String {
        format!("records.{shard}")
    }

    /// The durable consumer of a shard.
    pub fn consumer(shard: u32) -> String {
        format!("shard-{shard}")
    }
}

/// How long the record stream keeps a batch (acknowledged or not): at least a detection
/// window (the default 5 minutes; a node whose window is longer says so at start and
/// replays what is kept), and room for a node to fall behind; beyond it, batches no node
/// consumed in time are gone (nats-server's monitoring shows the consumer's first
/// sequence move past them).
pub const KEEP: Duration = Duration::from_secs(15 * 60);

/// What an edge or a node needs to reach JetStream.
#[derive(Clone, Debug)]
pub struct Bus {
    /// Server URLs, comma-separated (`nats://a:4222,nats://b:4222`): the client tries
    /// them in turn and learns the rest of the cluster from the server.
    pub urls: String,
    /// Replicas of the streams and buckets this process makes (1, or 3 on a cluster;
    /// what exists already is used as it is).
    pub replicas: usize,
}

impl Bus {
    pub fn new(urls: &str, replicas: usize) -> Self {
        Self {
            urls: urls.to_string(),
            replicas: replicas.max(1),
        }
    }

    /// The URLs, one by one.
    pub fn list(&self) -> Vec<String> {
        self.urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()
    }
}

/// A JetStream context on the bus's servers; the client reconnects by itself (to any of
/// them), and keeps trying when none is up yet.
pub async fn connect(bus: &Bus) -> jetstream::Context {
    let urls = bus.list();
    let client = loop {
        match async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(urls.clone())
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                log::warn!("NATS {}: {e} (retrying)", bus.urls);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    jetstream::new(client)
}

/// Why [`ensure`] failed: a setting no retry will fix, or NATS (retry).
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error("{0}")]
    ShardMismatch(String),
    #[error("{0:#}")]
    Nats(#[from] anyhow::Error),
}

/// Makes (or finds) the record and alarm streams, and checks that `shards` is the shard
/// count every other edge and node uses (the first one to come records it).
pub async fn ensure(
    js: &jetstream::Context,
    shards: u32,
    replicas: usize,
) -> Result<(), EnsureError> {
    js.get_or_create_stream(stream::Config {
        name: Names::RECORDS_STREAM.into(),
        subjects: vec!["records.*".into()],
        // Kept by age, acknowledged or not: a takeover replays the window from here.
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        // A retried publish within this window is stored once.
        duplicate_window: Duration::from_secs(120),
        max_age: KEEP,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("making the stream {}", Names::RECORDS_STREAM))?;
    js.get_or_create_stream(stream::Config {
        name: Names::ALARMS_STREAM.into(),
        subjects: vec![Names::ALARMS_SUBJECT.into()],
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(30 * 24 * 3600),
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("making the stream {}", Names::ALARMS_STREAM))?;
    let cfg = bucket(js, Names::CONFIG_BUCKET, None, replicas).await?;
    let want = shards.to_string();
    match cfg.create("shards", want.clone().into()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let have = cfg
                .get("shards")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("reading the shard count")?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .context("the shard count vanished while read")?;
            if have != want {
                return Err(EnsureError::ShardMismatch(format!(
                    "this NATS holds flows in {have} shards, and this process was started with {shards}: give every edge and node the same count (--nats-shards / --shards {have})"
                )));
            }
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("{e}")
            .context("recording the shard count")
            .into()),
    }
}

/// A key-value bucket, made if missing; entries expire after `ttl` when given.
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    ttl: Option<Duration>,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(b) = js.get_key_value(name).await {
        return Ok(b);
    }
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history: 1,
        max_age: ttl.unwrap_or_default(),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("making the key-value bucket {name}"))
}

/// The shard of an internal host: FNV-1a of its address (as IPv6; IPv4 mapped) modulo
/// `shards`. Stable across processes, machines and versions: edges and nodes must agree.
pub fn shard_of(host: IpAddr, shards: u32) -> u32 {
    let v6 = match host {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    fnv1a(&v6.octets()) % shards.max(1)
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// A name's place among `n` (FNV-1a): where a node starts looking for free shards.
pub fn shard_of_name(name: &str, n: u32) -> u32 {
    fnv1a(name.as_bytes()) % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_lists_each_url_of_a_comma_separated_list() {
        let bus = Bus::new(" nats://a:4222, nats://b:4222,,nats://c:4222 ", 0);
        assert_eq!(
            bus.list(),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        // At least one replica.
        assert_eq!(bus.replicas, 1);
        assert_eq!(Bus::new("nats://a:4222", 3).list(), ["nats://a:4222"]);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Fixed values: a change would split a host's records between two shards across
        // a rolling upgrade.
        // (The values of FNV-1a over the mapped address, worked out independently.)
        let at = |ip: &str, n| shard_of(ip.parse().unwrap(), n);
        assert_eq!(at("10.0.0.1", 16), 14);
        assert_eq!(at("10.0.0.2", 16), 11);
        assert_eq!(at("2001:db8::1", 16), 4);
        assert_eq!(at("10.0.0.1", 1000), 782);
        let mut counts = [0u32; 8];
        for i in 0..8_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            counts[shard_of(ip, 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
