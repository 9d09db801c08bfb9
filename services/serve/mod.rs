//! `gradguard serve`: gRPC ingest with advice streamed back, gRPC health and
//! reflection, and Prometheus metrics over HTTP.
//!
//! Startup order: parse flags and load the rules file (a bad value exits
//! before any port is bound), bind both listeners, print one line
//! `listening grpc=ADDR metrics=ADDR` on stdout (tests and scripts wait for
//! it; with port 0 it tells the ports chosen), then serve until SIGINT or
//! SIGTERM.

mod hub;
mod ingest;
pub mod metrics;
mod query;
pub mod recorder;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use gradguard::config::RuleBook;
use gradguard::engine::Engine;
use gradguard::proto::frames::ingest_server::IngestServer;
use gradguard::proto::{self, query_server::QueryServer};
use gradguard::store::{Retention, Store, SyncMode};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::cli::Failure;
use crate::kafka::KafkaConfig;
use crate::kafka::detector::{Detector, Link};
use crate::kafka::feed::start_feed;
use crate::kafka::relay::{Forwarder, relay_advice};
use hub::{Hub, Limits};
use ingest::IngestService;
use metrics::Metrics;
use query::QueryService;
use recorder::Recorder;

/// Anomalies buffered for `WatchAnomalies` subscribers that fall behind.
const WATCH_BUFFER: usize = 4096;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Rules file (TOML, as for `replay --rules`); the built-in defaults when absent.
    #[arg(long, value_name = "FILE", env = "GRADGUARD_CONFIG")]
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

pub fn run(args: &ServeArgs) -> Result<(), Failure> {
    let book = match &args.config {
        Some(path) => RuleBook::load(path)
            .with_context(|| format!("--config {}", path.display()))
            .map_err(Failure::usage)?,
        None => RuleBook::builtin(),
    };
    let kafka = KafkaConfig::resolve(&book, args.kafka_brokers.as_deref())
        .with_context(|| match &args.config {
            Some(path) => format!("--config {}", path.display()),
            None => "--kafka-brokers".to_owned(),
        })
        .map_err(Failure::usage)?;
    let store = if args.no_store {
        None
    } else {
        let sync = match args.store_sync {
            StoreSync::Full => SyncMode::Full,
            StoreSync::Normal => SyncMode::Normal,
        };
        let store = Store::open_with(&args.data_dir, sync)
            .with_context(|| format!("--data-dir {}", args.data_dir.display()))
            .map_err(Failure::input)?;
        Some(store)
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
    runtime.block_on(serve(args, book, store, kafka))
}

async fn serve(
    args: &ServeArgs,
    book: RuleBook,
    store: Option<Store>,
    kafka: Option<KafkaConfig>,
) -> Result<(), Failure> {
    init_tracing();
    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot bind --grpc-addr {}", args.grpc_addr))
        .map_err(Failure::input)?;
    let http = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot bind --metrics-addr {}", args.metrics_addr))
        .map_err(Failure::input)?;
    let grpc_addr = grpc.local_addr().map_err(|e| Failure::input(anyhow::Error::from(e)))?;
    let http_addr = http.local_addr().map_err(|e| Failure::input(anyhow::Error::from(e)))?;

    let metrics = Metrics::new();
    let cluster = match &kafka {
        Some(config) => Some(start_cluster(config, &book, &metrics, args.job_ttl).await?),
        None => None,
    };
    let mut engine = Engine::new(book.clone());
    let (watchers, _) = tokio::sync::broadcast::channel(WATCH_BUFFER);
    let (recorder, reader) = match store {
        Some(store) => {
            let last_id = store
                .max_advice_id()
                .map_err(|e| Failure::input(anyhow::Error::from(e)))?;
            engine.resume_advice_ids(last_id);
            let reader = store.reader().map_err(|e| Failure::input(anyhow::Error::from(e)))?;
            let retention = Retention {
                max_age_secs: Some(args.retention.as_secs_f64()),
                max_bytes: Some(args.store_max_mib << 20),
            };
            let recorder = Recorder::start(store, retention, metrics.clone(), watchers.clone());
            (Some(recorder), Some(Arc::new(reader)))
        }
        None => (None, None),
    };
    let feed = match (&cluster, &kafka, &recorder) {
        (Some(c), Some(config), Some(recorder)) => {
            let replica = replica_id(&args.data_dir).map_err(Failure::input)?;
            let task = start_feed(config, &book, c.link.clone(), recorder.clone(), &replica).map_err(Failure::input)?;
            tracing::info!(%replica, "cluster mode: the store reads the anomalies, advice and state topics");
            Some(task)
        }
        _ => None,
    };
    let hub = Arc::new(Hub::new(
        engine,
        metrics.clone(),
        Limits {
            max_jobs: args.max_jobs as usize,
            job_ttl: args.job_ttl,
        },
        recorder,
        cluster.as_ref().map(|c| c.forward.clone()),
    ));
    let relay = match (&cluster, &kafka) {
        (Some(c), Some(config)) => {
            let hub = hub.clone();
            let task = relay_advice(config, c.link.clone(), move |a| hub.deliver_advice(a))
                .await
                .map_err(Failure::input)?;
            Some(task)
        }
        _ => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let query = QueryServer::new(QueryService::new(hub.clone(), reader, watchers, stop_rx.clone()));
    let max_message = args.max_message_bytes as usize;
    let ingest = IngestServer::new(IngestService::new(hub.clone(), args.stream_queue as usize, max_message))
        .max_decoding_message_size(max_message);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IngestServer<IngestService>>().await;
    let health_task = cluster.as_ref().map(|c| {
        let link = c.link.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            let mut was = None;
            loop {
                every.tick().await;
                let up = link.is_up();
                if was != Some(up) {
                    was = Some(up);
                    if up {
                        health_reporter.set_serving::<IngestServer<IngestService>>().await;
                        health_reporter
                            .set_service_status("", tonic_health::ServingStatus::Serving)
                            .await;
                    } else {
                        tracing::warn!("all Kafka brokers are down: reporting NOT_SERVING");
                        health_reporter.set_not_serving::<IngestServer<IngestService>>().await;
                        health_reporter
                            .set_service_status("", tonic_health::ServingStatus::NotServing)
                            .await;
                    }
                }
                // After the health status: whoever sees the gauge sees the status.
                metrics.kafka_up.set(i64::from(up));
            }
        })
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")
        .map_err(Failure::input)?;

    // Tests and scripts wait for this line: both ports are bound from here on.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening grpc={grpc_addr} metrics={http_addr}");
        let _ = out.flush();
    }
    tracing::info!(%grpc_addr, %http_addr, version = env!("CARGO_PKG_VERSION"), "gradguard serving");

    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let ticker = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                hub.tick();
            }
        })
    };

    // Flow-control windows bound what a flooding worker can make the service
    // buffer: 128 KiB per stream (about a hundred 100-layer summaries in
    // flight) keeps a thousand streams well inside the memory budget.
    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(128 << 10)
        .initial_connection_window_size(1 << 20)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(reflection)
        .add_service(ingest)
        .add_service(query)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopped());
    let http_server = metrics::serve(http, metrics, stopped());
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(http_server);

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    ticker.abort();
    for task in [health_task, relay, feed].into_iter().flatten() {
        task.abort();
    }
    if let Some(cluster) = cluster {
        // The detector commits what it processed before it lets go.
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    }
    // Open worker streams keep a graceful shutdown waiting; give them a moment.
    let drain = async {
        let _ = grpc_task.await;
        let _ = http_task.await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Ok(())
}

/// This replica's name in the cluster, kept in the data directory so a
/// restarted replica resumes its store feed where it stopped.
fn replica_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    let id = format!("{:016x}", h.finish());
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// This replica's part of the cluster.
struct Cluster {
    link: Arc<Link>,
    forward: Arc<Forwarder>,
    _detector: Detector,
}

/// Creates the missing topics and joins the detectors' group.
async fn start_cluster(
    config: &KafkaConfig,
    book: &RuleBook,
    metrics: &Metrics,
    job_ttl: Duration,
) -> Result<Cluster, Failure> {
    config.ensure_topics().await.map_err(Failure::input)?;
    metrics.register_cluster();
    let link = Link::new(metrics.clone(), &config.topics.summaries);
    let detector = Detector::start(config, Engine::new(book.clone()), link.clone(), job_ttl).map_err(Failure::input)?;
    tracing::info!(
        brokers = config.brokers.as_deref().unwrap_or_default(),
        group = %config.group,
        "cluster mode: detector joined its group"
    );
    let forward = Arc::new(Forwarder::new(config, link.clone()).map_err(Failure::input)?);
    Ok(Cluster {
        link,
        forward,
        _detector: detector,
    })
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
