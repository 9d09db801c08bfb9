//! The service's settings file (`gradguard serve --settings FILE`): where the
//! service listens, what it holds, its store and its Kafka cluster. The rules
//! (what the engine detects) are apart, in the rules file ([`crate::config`]).
//!
//! ```toml
//! version = 1                   # required: the format of this file
//!
//! [listen]
//! grpc = "0.0.0.0:50051"
//! metrics = "0.0.0.0:9464"
//! max_connections = 16384       # within the open-file limit
//! max_streams_per_connection = 256
//! first_request_timeout = "30s" # a connection's first request, after it opens
//!
//! [limits]
//! max_jobs = 1000
//! job_ttl = "15m"
//! hello_timeout = "30s"         # a stream's Hello, after it opens
//! first_summary_timeout = "15m" # its first summary, after the Hello
//! max_message_bytes = 4194304
//! stream_queue = 256
//! max_name_len = 256            # layer names, rule profile, client version
//! max_layers = 65536            # layers a job declares
//! max_world_size = 65536        # a job's world size (ranks are below it)
//! max_batch = 1024              # summaries per batch message
//! max_concurrent_queries = 8    # store reads at once (default: one per CPU)
//! query_timeout = "10s"         # a query's wait for a slot and its read
//!
//! [store]
//! enabled = true                # false: run without a store
//! dir = "gradguard-data"
//! sync = "full"                 # or "normal"
//! retention = "30d"
//! max_mib = 10240
//!
//! [kafka]                       # cluster mode (see cluster::KafkaConfig)
//! brokers = "broker1:9092"
//!
//! [security]
//! tls_cert = "server.pem"       # TLS on the gRPC port (with tls_key)
//! tls_key = "server-key.pem"
//! tls_client_ca = "ca.pem"      # require client certificates it signed
//! metrics_tls = true            # TLS on the metrics port too
//! auth = "auth.toml"            # principals and scopes (crate::auth)
//! ```
//!
//! Every key but `version` is optional, and unknown keys are errors. A
//! [`SettingsFile`] is also what `serve`'s flags set: layered with
//! [`SettingsFile::or`] (flags over the file) and completed with the defaults
//! by [`SettingsFile::resolve`].

use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Deserializer};

use super::{ConnectionLimits, Security, Settings, StoreSettings};
use crate::auth::tls::TlsFiles;
use crate::cluster::KafkaConfig;
use crate::config::RuleBook;
use crate::intake::Limits;
use crate::store::{Retention, SyncMode};

/// The format of the settings file this version reads.
pub const VERSION: i64 = 1;

/// The defaults of what the settings file and `serve`'s flags set.
pub mod defaults {
    pub const GRPC_ADDR: &str = "0.0.0.0:50051";
    pub const METRICS_ADDR: &str = "0.0.0.0:9464";
    pub const MAX_CONNECTIONS: u64 = 16384;
    pub const MAX_STREAMS_PER_CONNECTION: u64 = 256;
    pub const FIRST_REQUEST_TIMEOUT: &str = "30s";
    pub const MAX_JOBS: u64 = 1000;
    pub const JOB_TTL: &str = "15m";
    pub const HELLO_TIMEOUT: &str = "30s";
    pub const FIRST_SUMMARY_TIMEOUT: &str = "15m";
    pub const MAX_MESSAGE_BYTES: u64 = 4 << 20;
    pub const STREAM_QUEUE: u64 = 256;
    pub const DATA_DIR: &str = "gradguard-data";
    pub const RETENTION: &str = "30d";
    pub const STORE_MAX_MIB: u64 = 10240;
    pub const QUERY_TIMEOUT: &str = "10s";

    /// Store reads the Query service runs at once: one per CPU, at least 2.
    pub fn max_concurrent_queries() -> u64 {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get() as u64)
            .max(2)
    }
}

/// The values accepted, in the file as from the flags.
pub mod ranges {
    use std::ops::{RangeFrom, RangeInclusive};

    pub const MAX_JOBS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_STREAMS_PER_CONNECTION: RangeInclusive<u64> = 1..=65536;
    pub const MAX_MESSAGE_BYTES: RangeInclusive<u64> = 1024..=(256 << 20);
    pub const STREAM_QUEUE: RangeInclusive<u64> = 1..=65536;
    pub const MAX_NAME_LEN: RangeInclusive<u64> = 16..=65536;
    pub const MAX_LAYERS: RangeInclusive<u64> = 1..=crate::engine::MAX_LAYERS as u64;
    pub const MAX_WORLD_SIZE: RangeInclusive<u64> = 1..=crate::engine::MAX_RANKS as u64;
    pub const MAX_BATCH: RangeInclusive<u64> = 1..=65536;
    pub const MAX_CONCURRENT_QUERIES: RangeInclusive<u64> = 1..=1024;
    pub const STORE_MAX_MIB: RangeFrom<u64> = 1..;
}

/// Errors from reading a settings file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid settings file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid settings file {path}: version is missing: this gradguard reads `version = {VERSION}`")]
    NoVersion { path: String },
    #[error(
        "invalid settings file {path}: version = {value} is not supported: this gradguard reads `version = {VERSION}`"
    )]
    Version { path: String, value: String },
    #[error("invalid setting in {path}: {field} = {value}: {reason}")]
    Invalid {
        path: String,
        field: String,
        value: String,
        reason: String,
    },
}

/// A settings file, or the settings `serve`'s flags give: what is `None` is
/// not set here.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettingsFile {
    /// The file's format; required in a file, and must be [`VERSION`].
    pub version: Option<i64>,
    pub listen: Listen,
    pub limits: LimitsSection,
    pub store: StoreSection,
    /// Cluster mode; `kafka.brokers` (or `--kafka-brokers`) turns it on.
    pub kafka: Option<KafkaConfig>,
    pub security: SecuritySection,
}

/// `[security]`: TLS and who may call.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// PEM certificate chain of the gRPC port; `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// Its PEM private key; `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to; `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// TLS on the metrics port too, with the same certificate; `--metrics-tls`.
    pub metrics_tls: Option<bool>,
    /// The principals and their scopes; `--auth`.
    pub auth: Option<PathBuf>,
}

impl SecuritySection {
    /// The service's security settings; a half-given TLS setup is an error
    /// naming what is missing.
    fn resolve(&self) -> anyhow::Result<Security> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!("--tls-cert (security.tls_cert) needs --tls-key (security.tls_key)"),
            (None, Some(_)) => anyhow::bail!("--tls-key (security.tls_key) needs --tls-cert (security.tls_cert)"),
        };
        if tls.is_none() {
            if let Some(ca) = &self.tls_client_ca {
                anyhow::bail!(
                    "--tls-client-ca {} (security.tls_client_ca) needs --tls-cert and --tls-key: client certificates are asked for in a TLS handshake",
                    ca.display()
                );
            }
            if self.metrics_tls == Some(true) {
                anyhow::bail!("--metrics-tls (security.metrics_tls) needs --tls-cert and --tls-key");
            }
        }
        Ok(Security {
            tls,
            metrics_tls: self.metrics_tls.unwrap_or(false),
            auth: self.auth.clone(),
        })
    }
}

/// `[listen]`: the addresses the service binds; port 0 picks a free port.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// gRPC (ingest, query, health, reflection); `--grpc-addr`.
    pub grpc: Option<SocketAddr>,
    /// HTTP (`/metrics`, `/healthz`); `--metrics-addr`.
    pub metrics: Option<SocketAddr>,
    /// Open gRPC connections at once (never above what the open-file limit
    /// allows); `--max-connections`.
    pub max_connections: Option<u64>,
    /// Concurrent calls (HTTP/2 streams) per connection; `--max-streams-per-connection`.
    pub max_streams_per_connection: Option<u64>,
    /// A connection must start a request within this, e.g. `"30s"`; `--first-request-timeout`.
    #[serde(deserialize_with = "duration")]
    pub first_request_timeout: Option<Duration>,
}

/// `[limits]`: what clients can make the service hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Jobs tracked at once; `--max-jobs`.
    pub max_jobs: Option<u64>,
    /// A job is forgotten after this long without a message, e.g. `"15m"`; `--job-ttl`.
    #[serde(deserialize_with = "duration")]
    pub job_ttl: Option<Duration>,
    /// A stream must send its Hello within this, e.g. `"30s"`; `--hello-timeout`.
    #[serde(deserialize_with = "duration")]
    pub hello_timeout: Option<Duration>,
    /// ... and its first summary within this after the Hello; `--first-summary-timeout`.
    #[serde(deserialize_with = "duration")]
    pub first_summary_timeout: Option<Duration>,
    /// Largest accepted worker message, in bytes; `--max-message-bytes`.
    pub max_message_bytes: Option<u64>,
    /// Server messages queued per stream; `--stream-queue`.
    pub stream_queue: Option<u64>,
    /// Longest layer name, rule profile or client version in a Hello, in bytes.
    pub max_name_len: Option<u64>,
    /// Most layers a job declares (a rank's state is about 190 bytes a layer).
    pub max_layers: Option<u64>,
    /// Highest world size a Hello may declare.
    pub max_world_size: Option<u64>,
    /// Most summaries in one batch message.
    pub max_batch: Option<u64>,
    /// Store reads the Query service runs at once; `--max-concurrent-queries`.
    pub max_concurrent_queries: Option<u64>,
    /// A query's wait for a slot and its read, e.g. `"10s"`; `--query-timeout`.
    #[serde(deserialize_with = "duration")]
    pub query_timeout: Option<Duration>,
}

/// How the Query service bounds its store reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Store reads running at once; a query waits for one of these slots.
    pub max_concurrent: usize,
    /// From a query's arrival to its answer: a query that waited this long
    /// for a slot is refused (RESOURCE_EXHAUSTED), one still reading then is
    /// stopped (DEADLINE_EXCEEDED).
    pub timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_concurrent: defaults::max_concurrent_queries() as usize,
            timeout: humantime::parse_duration(defaults::QUERY_TIMEOUT).expect("a valid default"),
        }
    }
}

/// `[store]`: the durable store.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `false` runs without a store; `--no-store`.
    pub enabled: Option<bool>,
    /// Its directory (relative to the working directory); `--data-dir`.
    pub dir: Option<PathBuf>,
    /// `"full"` or `"normal"`; `--store-sync`.
    #[serde(deserialize_with = "sync_mode")]
    pub sync: Option<SyncMode>,
    /// Rows older than this are deleted, e.g. `"30d"`; `--retention`.
    #[serde(deserialize_with = "duration")]
    pub retention: Option<Duration>,
    /// The oldest rows are deleted while the store is larger; `--store-max-mib`.
    pub max_mib: Option<u64>,
}

/// What `serve` runs with: its addresses and the service's settings.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub service: Settings,
}

impl SettingsFile {
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_str(&text, &path.display().to_string())
    }

    /// Parses and checks a settings file: its version first (a file of
    /// another version is refused as such, whatever its keys), then its keys
    /// and their ranges.
    pub fn parse_str(text: &str, origin: &str) -> Result<Self, SettingsError> {
        let parse_err = |message: String| SettingsError::Parse {
            path: origin.to_owned(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        match table.get("version") {
            None => {
                return Err(SettingsError::NoVersion {
                    path: origin.to_owned(),
                });
            }
            Some(toml::Value::Integer(VERSION)) => {}
            Some(other) => {
                return Err(SettingsError::Version {
                    path: origin.to_owned(),
                    value: other.to_string(),
                });
            }
        }
        let file: SettingsFile = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        file.validate()
            .map_err(|(field, value, reason)| SettingsError::Invalid {
                path: origin.to_owned(),
                field: field.to_owned(),
                value,
                reason,
            })?;
        if let Some(kafka) = &file.kafka {
            kafka.validate().map_err(|e| parse_err(format!("{e:#}")))?;
        }
        Ok(file)
    }

    /// Checks the ranges the TOML types cannot express (the same as the flags').
    fn validate(&self) -> Result<(), (&'static str, String, String)> {
        let (listen, limits) = (&self.listen, &self.limits);
        within(
            "listen.max_connections",
            listen.max_connections,
            ranges::MAX_CONNECTIONS,
        )?;
        within(
            "listen.max_streams_per_connection",
            listen.max_streams_per_connection,
            ranges::MAX_STREAMS_PER_CONNECTION,
        )?;
        within("limits.max_jobs", limits.max_jobs, ranges::MAX_JOBS)?;
        within(
            "limits.max_message_bytes",
            limits.max_message_bytes,
            ranges::MAX_MESSAGE_BYTES,
        )?;
        within("limits.stream_queue", limits.stream_queue, ranges::STREAM_QUEUE)?;
        within("limits.max_name_len", limits.max_name_len, ranges::MAX_NAME_LEN)?;
        within("limits.max_layers", limits.max_layers, ranges::MAX_LAYERS)?;
        within("limits.max_world_size", limits.max_world_size, ranges::MAX_WORLD_SIZE)?;
        within("limits.max_batch", limits.max_batch, ranges::MAX_BATCH)?;
        within(
            "limits.max_concurrent_queries",
            limits.max_concurrent_queries,
            ranges::MAX_CONCURRENT_QUERIES,
        )?;
        if limits.query_timeout.is_some_and(|t| t.is_zero()) {
            return Err(("limits.query_timeout", "\"0s\"".into(), "must be more than 0".into()));
        }
        within("store.max_mib", self.store.max_mib, ranges::STORE_MAX_MIB)
    }

    /// Field by field, what `self` sets, else what `lower` sets: flags over
    /// a file (`[kafka]` is taken whole; `--kafka-brokers` goes to
    /// [`resolve`](Self::resolve)).
    pub fn or(self, lower: SettingsFile) -> SettingsFile {
        SettingsFile {
            version: self.version.or(lower.version),
            listen: Listen {
                grpc: self.listen.grpc.or(lower.listen.grpc),
                metrics: self.listen.metrics.or(lower.listen.metrics),
                max_connections: self.listen.max_connections.or(lower.listen.max_connections),
                max_streams_per_connection: self
                    .listen
                    .max_streams_per_connection
                    .or(lower.listen.max_streams_per_connection),
                first_request_timeout: self.listen.first_request_timeout.or(lower.listen.first_request_timeout),
            },
            limits: LimitsSection {
                max_jobs: self.limits.max_jobs.or(lower.limits.max_jobs),
                job_ttl: self.limits.job_ttl.or(lower.limits.job_ttl),
                hello_timeout: self.limits.hello_timeout.or(lower.limits.hello_timeout),
                first_summary_timeout: self.limits.first_summary_timeout.or(lower.limits.first_summary_timeout),
                max_message_bytes: self.limits.max_message_bytes.or(lower.limits.max_message_bytes),
                stream_queue: self.limits.stream_queue.or(lower.limits.stream_queue),
                max_name_len: self.limits.max_name_len.or(lower.limits.max_name_len),
                max_layers: self.limits.max_layers.or(lower.limits.max_layers),
                max_world_size: self.limits.max_world_size.or(lower.limits.max_world_size),
                max_batch: self.limits.max_batch.or(lower.limits.max_batch),
                max_concurrent_queries: self
                    .limits
                    .max_concurrent_queries
                    .or(lower.limits.max_concurrent_queries),
                query_timeout: self.limits.query_timeout.or(lower.limits.query_timeout),
            },
            store: StoreSection {
                enabled: self.store.enabled.or(lower.store.enabled),
                dir: self.store.dir.or(lower.store.dir),
                sync: self.store.sync.or(lower.store.sync),
                retention: self.store.retention.or(lower.store.retention),
                max_mib: self.store.max_mib.or(lower.store.max_mib),
            },
            kafka: self.kafka.or(lower.kafka),
            security: SecuritySection {
                tls_cert: self.security.tls_cert.or(lower.security.tls_cert),
                tls_key: self.security.tls_key.or(lower.security.tls_key),
                tls_client_ca: self.security.tls_client_ca.or(lower.security.tls_client_ca),
                metrics_tls: self.security.metrics_tls.or(lower.security.metrics_tls),
                auth: self.security.auth.or(lower.security.auth),
            },
        }
    }

    /// Takes the `[kafka]` section of a rules file, where it used to be, when
    /// this file has none. `true` when it did: the caller tells the user to
    /// move it. A section in both is an error rather than a silent choice.
    pub fn kafka_from_rules(&mut self, book: &RuleBook) -> anyhow::Result<bool> {
        let Some(table) = book.section("kafka") else {
            return Ok(false);
        };
        if self.kafka.is_some() {
            anyhow::bail!("[kafka] is in both the settings file and the rules file: keep it in the settings file only");
        }
        self.kafka = Some(table.clone().try_into().context("[kafka]")?);
        Ok(true)
    }

    /// The settings `serve` runs with: what is set here, the defaults for the
    /// rest, `kafka_brokers` (the flag) over `kafka.brokers`.
    pub fn resolve(&self, kafka_brokers: Option<&str>) -> anyhow::Result<ServeSettings> {
        let addr =
            |set: Option<SocketAddr>, default: &str| set.unwrap_or_else(|| default.parse().expect("a valid default"));
        let duration = |set: Option<Duration>, default: &str| {
            set.unwrap_or_else(|| humantime::parse_duration(default).expect("a valid default"))
        };
        let (listen, limits, store) = (&self.listen, &self.limits, &self.store);
        let kafka = self.kafka.clone().unwrap_or_default().with_brokers(kafka_brokers)?;
        Ok(ServeSettings {
            grpc_addr: addr(self.listen.grpc, defaults::GRPC_ADDR),
            metrics_addr: addr(self.listen.metrics, defaults::METRICS_ADDR),
            service: Settings {
                limits: Limits {
                    max_jobs: limits.max_jobs.unwrap_or(defaults::MAX_JOBS) as usize,
                    job_ttl: duration(limits.job_ttl, defaults::JOB_TTL),
                    hello_timeout: duration(limits.hello_timeout, defaults::HELLO_TIMEOUT),
                    first_summary_timeout: duration(limits.first_summary_timeout, defaults::FIRST_SUMMARY_TIMEOUT),
                    max_name_len: limits
                        .max_name_len
                        .map_or(Limits::default().max_name_len, |n| n as usize),
                    max_layers: limits.max_layers.map_or(Limits::default().max_layers, |n| n as usize),
                    max_world_size: limits
                        .max_world_size
                        .map_or(Limits::default().max_world_size, |n| n as u32),
                    max_batch: limits.max_batch.map_or(Limits::default().max_batch, |n| n as usize),
                    ..Limits::default()
                },
                max_message_bytes: limits.max_message_bytes.unwrap_or(defaults::MAX_MESSAGE_BYTES) as usize,
                stream_queue: limits.stream_queue.unwrap_or(defaults::STREAM_QUEUE) as usize,
                connections: ConnectionLimits {
                    max_connections: listen.max_connections.unwrap_or(defaults::MAX_CONNECTIONS) as usize,
                    max_streams_per_connection: listen
                        .max_streams_per_connection
                        .unwrap_or(defaults::MAX_STREAMS_PER_CONNECTION)
                        as u32,
                    first_request_timeout: duration(listen.first_request_timeout, defaults::FIRST_REQUEST_TIMEOUT),
                },
                queries: QueryLimits {
                    max_concurrent: limits
                        .max_concurrent_queries
                        .unwrap_or_else(defaults::max_concurrent_queries) as usize,
                    timeout: duration(limits.query_timeout, defaults::QUERY_TIMEOUT),
                },
                store: store.enabled.unwrap_or(true).then(|| StoreSettings {
                    dir: store.dir.clone().unwrap_or_else(|| defaults::DATA_DIR.into()),
                    sync: store.sync.unwrap_or_default(),
                    retention: Retention {
                        max_age_secs: Some(duration(store.retention, defaults::RETENTION).as_secs_f64()),
                        max_bytes: Some(store.max_mib.unwrap_or(defaults::STORE_MAX_MIB).saturating_mul(1 << 20)),
                    },
                }),
                kafka,
                security: self.security.resolve()?,
            },
        })
    }
}

/// `Ok` unless `value` is set and outside `range`; the error names the field
/// and the value, and says the range.
fn within(
    field: &'static str,
    value: Option<u64>,
    range: impl RangeBounds<u64>,
) -> Result<(), (&'static str, String, String)> {
    let Some(value) = value else { return Ok(()) };
    if range.contains(&value) {
        return Ok(());
    }
    let bound = |b: Bound<&u64>| match b {
        Bound::Included(x) => Some(x.to_string()),
        Bound::Excluded(_) | Bound::Unbounded => None,
    };
    let reason = match (bound(range.start_bound()), bound(range.end_bound())) {
        (Some(lo), Some(hi)) => format!("must be between {lo} and {hi}"),
        (Some(lo), None) => format!("must be at least {lo}"),
        (None, Some(hi)) => format!("must be at most {hi}"),
        (None, None) => "is out of range".to_owned(),
    };
    Err((field, value.to_string(), reason))
}

/// A duration written as text, e.g. `"15m"`, `"90s"`, `"30d"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}): write e.g. \"15m\" or \"30d\""
        ))
    })
}

fn sync_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SyncMode>, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "full" => Ok(Some(SyncMode::Full)),
        "normal" => Ok(Some(SyncMode::Normal)),
        _ => Err(serde::de::Error::custom(format!(
            "{text:?} is not a sync mode: write \"full\" or \"normal\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SettingsFile, String> {
        SettingsFile::parse_str(text, "gg.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_bare_version_gives_the_serve_defaults() {
        let s = parse("version = 1\n").unwrap().resolve(None).unwrap();
        assert_eq!(s.grpc_addr, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(s.metrics_addr, "0.0.0.0:9464".parse().unwrap());
        let limits = Limits::default();
        assert_eq!(s.service.limits.max_jobs, limits.max_jobs);
        assert_eq!(s.service.limits.job_ttl, limits.job_ttl);
        let service = Settings::default();
        assert_eq!(s.service.max_message_bytes, service.max_message_bytes);
        assert_eq!(s.service.stream_queue, service.stream_queue);
        assert_eq!(s.service.queries, QueryLimits::default());
        assert_eq!(s.service.queries.timeout, Duration::from_secs(10));
        assert!(s.service.queries.max_concurrent >= 2);
        let store = s.service.store.expect("a store by default");
        assert_eq!(store.dir, PathBuf::from("gradguard-data"));
        assert_eq!(store.sync, SyncMode::Full);
        assert_eq!(store.retention.max_age_secs, Some(30.0 * 86400.0));
        assert_eq!(store.retention.max_bytes, Some(10240 << 20));
        assert_eq!(s.service.kafka, None);
    }

    #[test]
    fn every_section_maps_onto_the_settings() {
        let file = parse(
            r#"
            version = 1
            [listen]
            grpc = "127.0.0.1:7000"
            metrics = "127.0.0.1:7001"
            max_connections = 100
            max_streams_per_connection = 10
            first_request_timeout = "5s"
            [limits]
            max_jobs = 5
            job_ttl = "90s"
            max_message_bytes = 2048
            stream_queue = 8
            max_name_len = 64
            max_layers = 100
            max_world_size = 8
            max_batch = 16
            max_concurrent_queries = 3
            query_timeout = "250ms"
            [store]
            dir = "/var/lib/gradguard"
            sync = "normal"
            retention = "7d"
            max_mib = 64
            [kafka]
            brokers = "b:9092"
            partitions = 3
            [kafka.topics]
            advice = "adv"
            "#,
        )
        .unwrap();
        let s = file.resolve(None).unwrap();
        assert_eq!(s.grpc_addr, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(s.metrics_addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(s.service.limits.max_jobs, 5);
        assert_eq!(s.service.limits.job_ttl, Duration::from_secs(90));
        assert_eq!((s.service.max_message_bytes, s.service.stream_queue), (2048, 8));
        assert_eq!((s.service.limits.max_name_len, s.service.limits.max_batch), (64, 16));
        assert_eq!((s.service.limits.max_layers, s.service.limits.max_world_size), (100, 8));
        let c = &s.service.connections;
        assert_eq!((c.max_connections, c.max_streams_per_connection), (100, 10));
        assert_eq!(c.first_request_timeout, Duration::from_secs(5));
        assert_eq!(
            s.service.queries,
            QueryLimits {
                max_concurrent: 3,
                timeout: Duration::from_millis(250)
            }
        );
        let store = s.service.store.unwrap();
        assert_eq!(store.dir, PathBuf::from("/var/lib/gradguard"));
        assert_eq!(store.sync, SyncMode::Normal);
        assert_eq!(store.retention.max_age_secs, Some(7.0 * 86400.0));
        assert_eq!(store.retention.max_bytes, Some(64 << 20));
        let kafka = s.service.kafka.unwrap();
        assert_eq!(kafka.brokers.as_deref(), Some("b:9092"));
        assert_eq!((kafka.partitions, kafka.topics.advice.as_str()), (3, "adv"));
        assert_eq!(kafka.topics.summaries, "gradguard.summaries");

        // The flag's brokers win; without brokers there is no cluster.
        let s = file.resolve(Some("c:1")).unwrap();
        assert_eq!(s.service.kafka.unwrap().brokers.as_deref(), Some("c:1"));
        let embedded = parse("version = 1\n[kafka]\npartitions = 3\n").unwrap();
        assert_eq!(embedded.resolve(None).unwrap().service.kafka, None);
        assert!(
            parse("version = 1\n[store]\nenabled = false\n")
                .unwrap()
                .resolve(None)
                .unwrap()
                .service
                .store
                .is_none()
        );
    }

    #[test]
    fn flags_override_the_file_field_by_field() {
        let file = parse("version = 1\n[limits]\nmax_jobs = 5\nstream_queue = 8\n[store]\ndir = \"d\"\n").unwrap();
        let flags = SettingsFile {
            limits: LimitsSection {
                max_jobs: Some(7),
                ..LimitsSection::default()
            },
            store: StoreSection {
                enabled: Some(false),
                ..StoreSection::default()
            },
            ..SettingsFile::default()
        };
        let s = flags.or(file).resolve(None).unwrap();
        assert_eq!((s.service.limits.max_jobs, s.service.stream_queue), (7, 8));
        assert!(s.service.store.is_none());
    }

    #[test]
    fn the_version_is_required_and_must_be_1() {
        assert_eq!(
            parse("[limits]\nmax_jobs = 5\n").unwrap_err(),
            "invalid settings file gg.toml: version is missing: this gradguard reads `version = 1`"
        );
        assert_eq!(
            parse("version = 2\n[listen]\nnew_key = 1\n").unwrap_err(),
            "invalid settings file gg.toml: version = 2 is not supported: this gradguard reads `version = 1`"
        );
        assert_eq!(
            parse("version = \"1\"\n").unwrap_err(),
            "invalid settings file gg.toml: version = \"1\" is not supported: this gradguard reads `version = 1`"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_them() {
        for (text, key) in [
            ("version = 1\ngrpc_addr = \"127.0.0.1:1\"\n", "grpc_addr"),
            ("version = 1\n[listen]\ngrcp = \"127.0.0.1:1\"\n", "grcp"),
            ("version = 1\n[limits]\nmax_job = 5\n", "max_job"),
            ("version = 1\n[store]\nno_store = true\n", "no_store"),
            ("version = 1\n[kafka]\ngroupp = \"g\"\n", "groupp"),
            ("version = 1\n[grad_spike]\nz = 3.0\n", "grad_spike"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with("invalid settings file gg.toml") && err.contains(&format!("unknown field `{key}`")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn bad_values_are_errors_naming_the_field_and_value() {
        for (text, expected) in [
            (
                "version = 1\n[limits]\nmax_jobs = 0\n",
                "invalid setting in gg.toml: limits.max_jobs = 0: must be between 1 and 1000000",
            ),
            (
                "version = 1\n[limits]\nmax_message_bytes = 10\n",
                "invalid setting in gg.toml: limits.max_message_bytes = 10: must be between 1024 and 268435456",
            ),
            (
                "version = 1\n[limits]\nstream_queue = 100000\n",
                "invalid setting in gg.toml: limits.stream_queue = 100000: must be between 1 and 65536",
            ),
            (
                "version = 1\n[limits]\nmax_concurrent_queries = 0\n",
                "invalid setting in gg.toml: limits.max_concurrent_queries = 0: must be between 1 and 1024",
            ),
            (
                "version = 1\n[limits]\nquery_timeout = \"0s\"\n",
                "invalid setting in gg.toml: limits.query_timeout = \"0s\": must be more than 0",
            ),
            (
                "version = 1\n[store]\nmax_mib = 0\n",
                "invalid setting in gg.toml: store.max_mib = 0: must be at least 1",
            ),
            (
                "version = 1\n[kafka]\npartitions = 0\n",
                "invalid settings file gg.toml: kafka.partitions: 0 is out of range 1..=4096",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err(), expected, "{text}");
        }
        for (text, shown) in [
            ("version = 1\n[limits]\njob_ttl = \"soon\"\n", "\"soon\""),
            ("version = 1\n[store]\nsync = \"always\"\n", "\"always\""),
            ("version = 1\n[listen]\ngrpc = \"localhost\"\n", "grpc = \"localhost\""),
            ("version = 1\n[limits]\nmax_jobs = -1\n", "max_jobs = -1"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(shown), "{text}: {err}");
        }
    }

    #[test]
    fn kafka_from_a_rules_file_is_taken_unless_the_settings_have_it() {
        let rules = RuleBook::parse_str("[kafka]\nbrokers = \"a:1\"\n", "rules.toml").unwrap();
        let mut file = SettingsFile::default();
        assert!(file.kafka_from_rules(&rules).unwrap());
        let kafka = file.resolve(None).unwrap().service.kafka.unwrap();
        assert_eq!(kafka.brokers.as_deref(), Some("a:1"));

        let mut file = SettingsFile::default();
        assert!(!file.kafka_from_rules(&RuleBook::builtin()).unwrap());
        assert_eq!(file.kafka, None);

        let mut both = parse("version = 1\n[kafka]\nbrokers = \"b:1\"\n").unwrap();
        let err = both.kafka_from_rules(&rules).unwrap_err().to_string();
        assert!(err.contains("both"), "{err}");

        let bad = RuleBook::parse_str("[kafka]\ngroupp = \"g\"\n", "rules.toml").unwrap();
        let err = format!("{:#}", SettingsFile::default().kafka_from_rules(&bad).unwrap_err());
        assert!(err.contains("groupp"), "{err}");
    }
}
