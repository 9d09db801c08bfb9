//! `gradguard serve`: the flags, then the library's service
//! ([`gradguard::service`]) until SIGINT or SIGTERM.
//!
//! Startup order: parse flags, load the rules file and the settings file (a
//! bad value exits before any port is bound), bind both listeners, start the
//! service, print one line `listening grpc=ADDR metrics=ADDR` on stdout (tests
//! and scripts wait for it; with port 0 it tells the ports chosen), then serve.
//!
//! A setting comes from its flag (or the flag's environment variable) when
//! given, else from the settings file, else from its default: clap's default
//! values are the library's ([`gradguard::service::settings::defaults`]), so
//! `--help` shows them, and a flag left at its default does not hide the file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use gradguard::auth::Principals;
use gradguard::auth::tls::ServerTls;
use gradguard::config::RuleBook;
use gradguard::service::settings::{LimitsSection, Listen, SecuritySection, StoreSection, defaults, ranges};
use gradguard::service::{Listeners, ServeSettings, Service, SettingsFile};
use gradguard::store::SyncMode;
use tokio::net::TcpListener;

use crate::cli::{self, Failure};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Rules file (TOML, as for `replay --rules`); the built-in defaults when absent.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_RULES")]
    pub rules: Option<PathBuf>,

    /// The old name of `--rules` (and `GRADGUARD_CONFIG` of `GRADGUARD_RULES`),
    /// still accepted with a deprecation note.
    #[arg(long, value_name = "FILE", hide = true, env = "GRADGUARD_CONFIG", hide_env = true)]
    pub config: Option<PathBuf>,

    /// Settings file (TOML, `version = 1`): addresses, limits, store, Kafka.
    /// The flags below override it.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_SETTINGS")]
    pub settings: Option<PathBuf>,

    /// Address for gRPC (ingest, health, reflection); port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = defaults::GRPC_ADDR,
        env = "GRADGUARD_GRPC_ADDR"
    )]
    pub grpc_addr: SocketAddr,

    /// Address for HTTP: `/metrics` (Prometheus) and `/healthz`.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = defaults::METRICS_ADDR,
        env = "GRADGUARD_METRICS_ADDR"
    )]
    pub metrics_addr: SocketAddr,

    /// Open gRPC connections at once; one more is closed when accepted. Never
    /// above what the open-file limit allows (raised to its hard limit at
    /// start, less 256 descriptors kept for the rest).
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS, value_parser = clap::value_parser!(u64).range(ranges::MAX_CONNECTIONS), env = "GRADGUARD_MAX_CONNECTIONS")]
    pub max_connections: u64,

    /// Concurrent calls (HTTP/2 streams) one connection may have open.
    #[arg(long, default_value_t = defaults::MAX_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u64).range(ranges::MAX_STREAMS_PER_CONNECTION), env = "GRADGUARD_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: u64,

    /// A connection that has not started a request this long after it opened
    /// (a raw socket that never speaks) is closed.
    #[arg(long, default_value = defaults::FIRST_REQUEST_TIMEOUT, value_parser = humantime::parse_duration, env = "GRADGUARD_FIRST_REQUEST_TIMEOUT")]
    pub first_request_timeout: Duration,

    /// Jobs tracked at once; the first summary of one more is refused
    /// (RESOURCE_EXHAUSTED): a job takes its slot with its first summary, not
    /// its Hello. Bounds the `job` label of every metric.
    #[arg(long, default_value_t = defaults::MAX_JOBS, value_parser = clap::value_parser!(u64).range(ranges::MAX_JOBS), env = "GRADGUARD_MAX_JOBS")]
    pub max_jobs: u64,

    /// Forget a job (its detection state and metrics series) after this long
    /// without a summary, Hello or disconnect, e.g. `15m`, `90s`.
    #[arg(long, default_value = defaults::JOB_TTL, value_parser = humantime::parse_duration, env = "GRADGUARD_JOB_TTL")]
    pub job_ttl: Duration,

    /// A worker stream must send its Hello within this long of opening, or
    /// it is closed (DEADLINE_EXCEEDED): an opened stream holds nothing for free.
    #[arg(long, default_value = defaults::HELLO_TIMEOUT, value_parser = humantime::parse_duration, env = "GRADGUARD_HELLO_TIMEOUT")]
    pub hello_timeout: Duration,

    /// ... and its first summary within this long of its Hello (a first
    /// training step may take minutes: compilation, data loading).
    #[arg(long, default_value = defaults::FIRST_SUMMARY_TIMEOUT, value_parser = humantime::parse_duration, env = "GRADGUARD_FIRST_SUMMARY_TIMEOUT")]
    pub first_summary_timeout: Duration,

    /// Largest accepted worker message, in bytes.
    #[arg(long, default_value_t = defaults::MAX_MESSAGE_BYTES, value_parser = clap::value_parser!(u64).range(ranges::MAX_MESSAGE_BYTES), env = "GRADGUARD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: u64,

    /// Server messages queued per stream; advice for a worker that does not
    /// read is dropped beyond this (counted in `gradguard_advice_dropped_total`).
    #[arg(long, default_value_t = defaults::STREAM_QUEUE, value_parser = clap::value_parser!(u64).range(ranges::STREAM_QUEUE), env = "GRADGUARD_STREAM_QUEUE")]
    pub stream_queue: u64,

    /// Store reads the Query service runs at once (default: one per CPU, at
    /// least 2); a query waits for one of these slots.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(ranges::MAX_CONCURRENT_QUERIES), env = "GRADGUARD_MAX_CONCURRENT_QUERIES")]
    pub max_concurrent_queries: Option<u64>,

    /// A query's time from arrival to answer: one that waited this long for
    /// a slot is refused (RESOURCE_EXHAUSTED), one still reading the store
    /// then is stopped (DEADLINE_EXCEEDED).
    #[arg(long, default_value = defaults::QUERY_TIMEOUT, value_parser = positive_duration, env = "GRADGUARD_QUERY_TIMEOUT")]
    pub query_timeout: Duration,

    /// Directory of the durable store (created when absent). A damaged store
    /// there is an error, never silently replaced.
    #[arg(
        long,
        value_name = "DIR",
        default_value = defaults::DATA_DIR,
        env = "GRADGUARD_DATA_DIR"
    )]
    pub data_dir: PathBuf,

    /// Run without a store (`--data-dir` is ignored): nothing is persisted,
    /// advice goes out without waiting for a disk, and the Query service
    /// answers FAILED_PRECONDITION.
    #[arg(long, env = "GRADGUARD_NO_STORE")]
    pub no_store: bool,

    /// How a commit waits for the disk before its advice goes out: `full`
    /// fsyncs every commit (survives a power loss); `normal` survives a crash
    /// or kill -9 of the service but not a power loss, and saves an fsync.
    #[arg(long, value_enum, default_value_t = StoreSync::Full, env = "GRADGUARD_STORE_SYNC")]
    pub store_sync: StoreSync,

    /// Delete stored anomalies, advice and jobs older than this, e.g. `30d`.
    #[arg(long, default_value = defaults::RETENTION, value_parser = humantime::parse_duration, env = "GRADGUARD_RETENTION")]
    pub retention: Duration,

    /// Delete the oldest anomalies and advice while the store is larger than this many MiB.
    #[arg(long, value_name = "MIB", default_value_t = defaults::STORE_MAX_MIB, value_parser = clap::value_parser!(u64).range(ranges::STORE_MAX_MIB), env = "GRADGUARD_STORE_MAX_MIB")]
    pub store_max_mib: u64,

    /// Run as one replica of a cluster on these Kafka brokers (`host:port,...`),
    /// overriding the settings file's `[kafka] brokers`. Without either, the
    /// service runs embedded.
    #[arg(long, value_name = "HOST:PORT", env = "GRADGUARD_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Serve gRPC over TLS with this PEM certificate chain (with `--tls-key`).
    /// The files are re-read when they change: replace them to rotate.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate signed by a CA in this
    /// PEM file (needs `--tls-cert`).
    #[arg(long, value_name = "FILE", env = "GRADGUARD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve the metrics port (`/metrics`, `/healthz`) over TLS too, with the
    /// same certificate (no client certificate is asked for).
    #[arg(long, env = "GRADGUARD_METRICS_TLS")]
    pub metrics_tls: bool,

    /// Principals and their scopes (TOML; re-read on SIGHUP). Without it,
    /// anyone who reaches the gRPC port can read and steer every job.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_AUTH")]
    pub auth: Option<PathBuf>,

    /// Worker threads of the async runtime (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024), env = "GRADGUARD_THREADS")]
    pub threads: Option<u64>,

    /// How the log on stderr is written: `text` (for people) or `json` (one
    /// object per line, for a log pipeline). Filtered by `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "GRADGUARD_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreSync {
    Full,
    Normal,
}

pub fn run(args: &ServeArgs, matches: &ArgMatches) -> Result<(), Failure> {
    let source = |id: &str| matches.value_source(id);
    let rules_on_command_line = source("rules") == Some(ValueSource::CommandLine);
    // GRADGUARD_CONFIG, the old name of GRADGUARD_RULES, counts only when
    // neither --rules nor GRADGUARD_RULES is given.
    let rules = if source("config") == Some(ValueSource::EnvVariable) {
        if args.rules.is_none() {
            cli::warn("gradguard: warning: GRADGUARD_CONFIG is deprecated and will be removed: use GRADGUARD_RULES");
        }
        args.rules.clone().or_else(|| args.config.clone())
    } else {
        cli::rules_file(args.rules.as_deref(), args.config.as_deref(), rules_on_command_line)?
    };
    let book = match &rules {
        Some(path) => RuleBook::load(path)
            .with_context(|| format!("--rules {}", path.display()))
            .map_err(Failure::usage)?,
        None => RuleBook::builtin(),
    };
    let mut file = match &args.settings {
        Some(path) => SettingsFile::load(path)
            .with_context(|| format!("--settings {}", path.display()))
            .map_err(Failure::usage)?,
        None => SettingsFile::default(),
    };
    // The rules file's [kafka] section, where it used to be: still read.
    let mut kafka_from = "--kafka-brokers".to_owned();
    if let Some(path) = &rules
        && file
            .kafka_from_rules(&book)
            .with_context(|| format!("--rules {}", path.display()))
            .map_err(Failure::usage)?
    {
        cli::warn(&cli::kafka_in_rules_note(path));
        kafka_from = format!("--rules {}", path.display());
    }
    let given = |id: &str| matches!(source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    let names = Names::new(&file, args.settings.as_deref(), &given);
    let settings = flags(args, &given)
        .or(file)
        .resolve(args.kafka_brokers.as_deref())
        .context(kafka_from)
        .map_err(Failure::usage)?;
    // The auth file and the certificates are checked before anything starts:
    // a bad one is a usage error naming the file (and the line).
    let security = &settings.service.security;
    if let Some(path) = &security.auth {
        Principals::load(path).map_err(Failure::usage)?;
    }
    if let Some(files) = &security.tls {
        ServerTls::load(files.clone()).map_err(Failure::usage)?;
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n as usize);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::input)?;
    runtime
        .block_on(serve(settings, book, names, args.log_format))
        .map_err(Failure::input)
}

/// The settings the flags give: only those given on the command line or by
/// their environment variables, so that the settings file fills the rest.
fn flags(args: &ServeArgs, given: &impl Fn(&str) -> bool) -> SettingsFile {
    SettingsFile {
        listen: Listen {
            grpc: given("grpc_addr").then_some(args.grpc_addr),
            metrics: given("metrics_addr").then_some(args.metrics_addr),
            max_connections: given("max_connections").then_some(args.max_connections),
            max_streams_per_connection: given("max_streams_per_connection").then_some(args.max_streams_per_connection),
            first_request_timeout: given("first_request_timeout").then_some(args.first_request_timeout),
        },
        limits: LimitsSection {
            max_jobs: given("max_jobs").then_some(args.max_jobs),
            job_ttl: given("job_ttl").then_some(args.job_ttl),
            hello_timeout: given("hello_timeout").then_some(args.hello_timeout),
            first_summary_timeout: given("first_summary_timeout").then_some(args.first_summary_timeout),
            max_message_bytes: given("max_message_bytes").then_some(args.max_message_bytes),
            stream_queue: given("stream_queue").then_some(args.stream_queue),
            max_concurrent_queries: args.max_concurrent_queries,
            query_timeout: given("query_timeout").then_some(args.query_timeout),
            // File-only: no flag yet.
            max_name_len: None,
            max_layers: None,
            max_world_size: None,
            max_batch: None,
        },
        store: StoreSection {
            enabled: args.no_store.then_some(false),
            dir: given("data_dir").then(|| args.data_dir.clone()),
            sync: given("store_sync").then_some(match args.store_sync {
                StoreSync::Full => SyncMode::Full,
                StoreSync::Normal => SyncMode::Normal,
            }),
            retention: given("retention").then_some(args.retention),
            max_mib: given("store_max_mib").then_some(args.store_max_mib),
        },
        security: SecuritySection {
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_client_ca: args.tls_client_ca.clone(),
            metrics_tls: args.metrics_tls.then_some(true),
            auth: args.auth.clone(),
        },
        ..SettingsFile::default()
    }
}

/// A duration flag that must be more than 0, e.g. `10s`, `500ms`.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// How an error names the listen addresses: by the flag, or by the settings
/// file's key when the address came from there.
struct Names {
    grpc: String,
    metrics: String,
}

impl Names {
    fn new(file: &SettingsFile, path: Option<&Path>, given: &impl Fn(&str) -> bool) -> Self {
        let name = |flag: &str, id: &str, key: &str, in_file: bool| match path {
            Some(path) if in_file && !given(id) => format!("{key} (--settings {})", path.display()),
            _ => flag.to_owned(),
        };
        Self {
            grpc: name("--grpc-addr", "grpc_addr", "listen.grpc", file.listen.grpc.is_some()),
            metrics: name(
                "--metrics-addr",
                "metrics_addr",
                "listen.metrics",
                file.listen.metrics.is_some(),
            ),
        }
    }
}

async fn serve(settings: ServeSettings, book: RuleBook, names: Names, log: LogFormat) -> anyhow::Result<()> {
    init_tracing(log);
    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("cannot bind {} {}", names.grpc, settings.grpc_addr))?;
    let http = TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("cannot bind {} {}", names.metrics, settings.metrics_addr))?;
    let service = Service::start(settings.service, book, Listeners { grpc, http }).await?;
    // Tests and scripts wait for this line: the service is up from here on.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "listening grpc={} metrics={}",
            service.grpc_addr(),
            service.http_addr()
        );
        let _ = out.flush();
    }
    shutdown_signal().await;
    service.stop().await;
    Ok(())
}

/// Ctrl-C or SIGTERM (`follow` stops on them too).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): text, or one
/// JSON object per line with the event's fields at the top level.
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}
