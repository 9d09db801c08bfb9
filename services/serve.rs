//! `gradguard serve`: the flags, then the library's service
//! ([`gradguard::service`]) until SIGINT or SIGTERM.
//!
//! Startup order: parse flags and load the rules file (a bad value exits
//! before any port is bound), bind both listeners, start the service, print
//! one line `listening grpc=ADDR metrics=ADDR` on stdout (tests and scripts
//! wait for it; with port 0 it tells the ports chosen), then serve.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use gradguard::cluster::KafkaConfig;
use gradguard::config::RuleBook;
use gradguard::intake::Limits;
use gradguard::service::{Listeners, Service, Settings, StoreSettings};
use gradguard::store::{Retention, SyncMode};
use tokio::net::TcpListener;

use crate::cli::{self, Failure};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Rules file (TOML, as for `replay --rules`); the built-in defaults when absent.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_CONFIG")]
    pub rules: Option<PathBuf>,

    /// The old name of `--rules`, still accepted with a deprecation note.
    #[arg(long, value_name = "FILE", hide = true)]
    pub config: Option<PathBuf>,

    /// Address for gRPC (ingest, health, reflection); port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:50051",
        env = "GRADGUARD_GRPC_ADDR"
    )]
    pub grpc_addr: SocketAddr,

    /// Address for HTTP: `/metrics` (Prometheus) and `/healthz`.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9464",
        env = "GRADGUARD_METRICS_ADDR"
    )]
    pub metrics_addr: SocketAddr,

    /// Jobs tracked at once; a Hello for one more is refused (RESOURCE_EXHAUSTED).
    /// Bounds the `job` label of every metric.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000), env = "GRADGUARD_MAX_JOBS")]
    pub max_jobs: u64,

    /// Forget a job (its detection state and metrics series) after this long
    /// without a summary, Hello or disconnect, e.g. `15m`, `90s`.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration, env = "GRADGUARD_JOB_TTL")]
    pub job_ttl: Duration,

    /// Largest accepted worker message, in bytes.
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1024..=(256 << 20)), env = "GRADGUARD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: u64,

    /// Server messages queued per stream; advice for a worker that does not
    /// read is dropped beyond this (counted in `gradguard_advice_dropped_total`).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub stream_queue: u64,

    /// Directory of the durable store (created when absent). A damaged store
    /// there is an error, never silently replaced.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "gradguard-data",
        env = "GRADGUARD_DATA_DIR"
    )]
    pub data_dir: PathBuf,

    /// Run without a store (`--data-dir` is ignored): nothing is persisted,
    /// advice goes out without waiting for a disk, and the Query service
    /// answers FAILED_PRECONDITION.
    #[arg(long)]
    pub no_store: bool,

    /// How a commit waits for the disk before its advice goes out: `full`
    /// fsyncs every commit (survives a power loss); `normal` survives a crash
    /// or kill -9 of the service but not a power loss, and saves an fsync.
    #[arg(long, value_enum, default_value_t = StoreSync::Full, env = "GRADGUARD_STORE_SYNC")]
    pub store_sync: StoreSync,

    /// Delete stored anomalies, advice and jobs older than this, e.g. `30d`.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration, env = "GRADGUARD_RETENTION")]
    pub retention: Duration,

    /// Delete the oldest anomalies and advice while the store is larger than this many MiB.
    #[arg(long, value_name = "MIB", default_value_t = 10240, value_parser = clap::value_parser!(u64).range(1..), env = "GRADGUARD_STORE_MAX_MIB")]
    pub store_max_mib: u64,

    /// Run as one replica of a cluster on these Kafka brokers (`host:port,...`),
    /// overriding the config file's `[kafka] brokers`. Without either, the
    /// service runs embedded.
    #[arg(long, value_name = "HOST:PORT", env = "GRADGUARD_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Worker threads of the async runtime (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreSync {
    Full,
    Normal,
}

pub fn run(args: &ServeArgs, matches: &ArgMatches) -> Result<(), Failure> {
    let rules_on_command_line = matches.value_source("rules") == Some(ValueSource::CommandLine);
    let rules = cli::rules_file(args.rules.as_deref(), args.config.as_deref(), rules_on_command_line)?;
    let book = match &rules {
        Some(path) => RuleBook::load(path)
            .with_context(|| format!("--rules {}", path.display()))
            .map_err(Failure::usage)?,
        None => RuleBook::builtin(),
    };
    let kafka = KafkaConfig::resolve(&book, args.kafka_brokers.as_deref())
        .with_context(|| match &rules {
            Some(path) => format!("--rules {}", path.display()),
            None => "--kafka-brokers".to_owned(),
        })
        .map_err(Failure::usage)?;
    let settings = Settings {
        limits: Limits {
            max_jobs: args.max_jobs as usize,
            job_ttl: args.job_ttl,
            ..Limits::default()
        },
        max_message_bytes: args.max_message_bytes as usize,
        stream_queue: args.stream_queue as usize,
        store: (!args.no_store).then(|| StoreSettings {
            dir: args.data_dir.clone(),
            sync: match args.store_sync {
                StoreSync::Full => SyncMode::Full,
                StoreSync::Normal => SyncMode::Normal,
            },
            retention: Retention {
                max_age_secs: Some(args.retention.as_secs_f64()),
                max_bytes: Some(args.store_max_mib << 20),
            },
        }),
        kafka,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n as usize);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::input)?;
    runtime.block_on(serve(args, settings, book)).map_err(Failure::input)
}

async fn serve(args: &ServeArgs, settings: Settings, book: RuleBook) -> anyhow::Result<()> {
    init_tracing();
    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot bind --grpc-addr {}", args.grpc_addr))?;
    let http = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot bind --metrics-addr {}", args.metrics_addr))?;
    let service = Service::start(settings, book, Listeners { grpc, http }).await?;
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

async fn shutdown_signal() {
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
