//! The service: gRPC ingest with advice streamed back, the Query API, gRPC
//! health and reflection, and Prometheus metrics over HTTP; in cluster mode
//! also the Kafka detector, the advice relay and the store feed.
//!
//! [`Service::start`] sets it all up on listeners bound by the caller (so a
//! test can run it in-process on port 0), [`Service::stop`] shuts it down;
//! [`run`] is both around a shutdown future.

pub mod access;
mod attachment;
pub mod connections;
mod forward;
mod hub;
mod ingest;
pub mod metrics;
mod mode;
mod query;
pub mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::auth::tls::{ServerTls, TlsFiles};
use crate::cluster::detector::Detector;
use crate::cluster::feed::start_feed;
use crate::cluster::relay::{Forwarder, relay_advice};
use crate::cluster::{ClusterMetrics, KafkaConfig, Link};
use crate::config::RuleBook;
use crate::engine::Engine;
use crate::intake::{IntakeMetrics, Judge, Limits};
use crate::proto::frames::ingest_server::IngestServer;
use crate::proto::{self, query_server::QueryServer};
use crate::recorder::{Recorder, StoreMetrics};
use crate::store::{Retention, Store, SyncMode};
use access::Gate;
pub use connections::ConnectionLimits;
use connections::PeerInfo;
use forward::Forwarding;
use hub::Hub;
use ingest::IngestService;
use metrics::HubMetrics;
use mode::Mode;
use query::QueryService;
pub use settings::{ServeSettings, SettingsError, SettingsFile};

/// Anomalies buffered for `WatchAnomalies` subscribers that fall behind.
const WATCH_BUFFER: usize = 4096;

/// The service's settings (the rules are apart, in the [`RuleBook`]); `serve`
/// reads them from its flags and its settings file ([`settings`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// What a client can make the service hold.
    pub limits: Limits,
    /// Largest accepted worker message, in bytes.
    pub max_message_bytes: usize,
    /// Server messages queued per stream; advice beyond it is dropped.
    pub stream_queue: usize,
    /// What the gRPC listener's connections can hold.
    pub connections: ConnectionLimits,
    /// How the Query service bounds its store reads.
    pub queries: settings::QueryLimits,
    /// The durable store; `None` runs without one.
    pub store: Option<StoreSettings>,
    /// Cluster mode on these brokers; `None` runs embedded.
    pub kafka: Option<KafkaConfig>,
    /// TLS and who may call.
    pub security: Security,
}

/// TLS on the ports, and the principals that may call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Security {
    /// TLS on the gRPC port (and client certificates when `client_ca` is set).
    pub tls: Option<TlsFiles>,
    /// TLS on the metrics port too, with the same certificate.
    pub metrics_tls: bool,
    /// The auth file; `None` lets anyone who reaches the port do anything.
    pub auth: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_message_bytes: settings::defaults::MAX_MESSAGE_BYTES as usize,
            stream_queue: settings::defaults::STREAM_QUEUE as usize,
            connections: ConnectionLimits::default(),
            queries: settings::QueryLimits::default(),
            store: None,
            kafka: None,
            security: Security::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Directory of the store (created when absent); a cluster replica keeps
    /// its name there too.
    pub dir: PathBuf,
    pub sync: SyncMode,
    pub retention: Retention,
}

/// Where the service listens; bound by the caller.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// A running service.
pub struct Service {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    hub: Arc<Hub>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    cluster: Option<Cluster>,
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    book: RuleBook,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let service = Service::start(settings, book, listeners).await?;
    shutdown.await;
    service.stop().await;
    Ok(())
}

impl Service {
    /// Opens the store, joins the cluster when there is one, and serves on
    /// the listeners. Errors (a damaged store, unreachable brokers) come
    /// before anything is served.
    pub async fn start(settings: Settings, book: RuleBook, listeners: Listeners) -> anyhow::Result<Self> {
        let grpc_addr = listeners.grpc.local_addr()?;
        let http_addr = listeners.http.local_addr()?;
        let registry = prometheus::Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        metrics::register_build_info(&registry);
        let intake = IntakeMetrics::register(&registry);
        let hub_metrics = HubMetrics::register(&registry, intake.clone());
        let limits = settings.limits.clone();
        let security = &settings.security;
        let tls = match &security.tls {
            Some(files) => Some(Arc::new(ServerTls::load(files.clone())?)),
            None => None,
        };
        let gate = Arc::new(Gate::new(security.auth.clone(), &registry)?);
        if gate.is_open() {
            tracing::warn!(
                "no --auth: anyone who can reach the gRPC port can read and steer every job (rollback, halt)"
            );
        }

        let store = match &settings.store {
            Some(s) => Some((
                Store::open_with(&s.dir, s.sync).with_context(|| format!("--data-dir {}", s.dir.display()))?,
                s,
            )),
            None => None,
        };
        let cluster = match &settings.kafka {
            Some(config) => {
                let judge = Judge::new(Engine::new(book.clone()), limits.clone(), intake.clone());
                Some(Cluster::start(config, &registry, judge).await?)
            }
            None => None,
        };
        let (watchers, _) = tokio::sync::broadcast::channel(WATCH_BUFFER);
        // Embedded advice ids continue the store's (cluster ones come from records).
        let mut last_advice_id = 0;
        let (recorder, reader) = match store {
            Some((store, s)) => {
                last_advice_id = store.max_advice_id()?;
                let reader = store.reader()?;
                let recorder = Recorder::start(store, s.retention, StoreMetrics::register(&registry), watchers.clone());
                (Some(recorder), Some(Arc::new(reader)))
            }
            None => (None, None),
        };
        let mut background = Vec::new();
        let mode: Box<dyn Mode> = match (&cluster, &settings.kafka) {
            (Some(c), Some(config)) => {
                if let (Some(recorder), Some(s)) = (&recorder, &settings.store) {
                    let replica = replica_id(&s.dir)?;
                    background.push(start_feed(config, &book, c.link.clone(), recorder.clone(), &replica)?);
                    tracing::info!(%replica, "cluster mode: the store reads the anomalies, advice and state topics");
                }
                Box::new(Forwarding::new(
                    c.forward.clone(),
                    book.clone(),
                    limits.clone(),
                    intake.clone(),
                ))
            }
            _ => {
                let mut engine = Engine::new(book.clone());
                engine.resume_advice_ids(last_advice_id);
                Box::new(Judge::new(engine, limits.clone(), intake.clone()))
            }
        };
        let hub = Arc::new(Hub::new(mode, hub_metrics, limits, recorder));
        if let (Some(c), Some(config)) = (&cluster, &settings.kafka) {
            let hub = hub.clone();
            background.push(relay_advice(config, c.link.clone(), move |a| hub.deliver_advice(a)).await?);
        }

        let (stop, stopping) = tokio::sync::watch::channel(false);
        let query = QueryServer::new(QueryService::new(
            hub.clone(),
            reader,
            watchers,
            stopping.clone(),
            settings.queries,
            gate.clone(),
        ));
        let max_message = settings.max_message_bytes;
        let ingest = IngestServer::new(IngestService::new(
            hub.clone(),
            intake,
            settings.stream_queue,
            max_message,
            gate.clone(),
            stopping.clone(),
        ))
        .max_decoding_message_size(max_message);
        let check = access::Check(gate.clone());
        let ingest = InterceptedService::new(ingest, check.clone());
        let query = InterceptedService::new(query, check.clone());
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<IngestServer<IngestService>>().await;
        // `/readyz` says what gRPC health says, for probes that cannot speak TLS gRPC.
        let ready = Arc::new(AtomicBool::new(true));
        if let Some(c) = &cluster {
            background.push(tokio::spawn(report_brokers(
                c.link.clone(),
                c.metrics.clone(),
                health_reporter,
                ready.clone(),
            )));
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("cannot build the reflection service")?;
        let reflection = InterceptedService::new(reflection, check);
        background.push(tokio::spawn(reload_security(gate.clone(), tls.clone())));
        background.push({
            let hub = hub.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    hub.tick();
                }
            })
        });

        let stopped = move || {
            let mut rx = stopping.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        // Flow-control windows bound what a flooding worker can make the service
        // buffer: 128 KiB per stream (about a hundred 100-layer summaries in
        // flight) keeps a thousand streams well inside the memory budget.
        // Connections are capped and must start a request in time
        // (`connections`); keep-alive pings find dead peers.
        let limits = &settings.connections;
        let waiting = Arc::new(connections::Waiting::default());
        let incoming = connections::accept(
            listeners.grpc,
            limits,
            connections::ConnectionMetrics::register(&registry),
            waiting.clone(),
            tls.clone(),
            stopped(),
        );
        let grpc = tonic::transport::Server::builder()
            .initial_stream_window_size(128 << 10)
            .initial_connection_window_size(1 << 20)
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(tonic::service::InterceptorLayer::new(move |req: tonic::Request<()>| {
                waiting.started(req.extensions().get::<PeerInfo>().map(|p| p.remote_addr));
                Ok(req)
            }))
            .add_service(health)
            .add_service(reflection)
            .add_service(ingest)
            .add_service(query)
            .serve_with_incoming_shutdown(incoming, stopped());
        let metrics_tls = tls.clone().filter(|_| security.metrics_tls);
        let http = metrics::serve(listeners.http, registry, ready, metrics_tls, stopped());
        let servers = vec![
            tokio::spawn(async move {
                if let Err(e) = grpc.await {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            }),
            tokio::spawn(async move {
                if let Err(e) = http.await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }),
        ];
        tracing::info!(
            %grpc_addr,
            %http_addr,
            tls = tls.is_some(),
            metrics_tls = security.metrics_tls,
            auth = !gate.is_open(),
            version = env!("CARGO_PKG_VERSION"),
            "gradguard serving"
        );
        Ok(Self {
            grpc_addr,
            http_addr,
            hub,
            stop,
            servers,
            background,
            cluster,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops serving: the cluster's detector commits what it processed, and
    /// open worker streams get a few seconds to end.
    /// Stops serving: every open worker stream is answered for what it sent
    /// (made durable, its advice sent), then ended with UNAVAILABLE so its
    /// worker reconnects; the servers get [`DRAIN_TIMEOUT`] to finish.
    pub async fn stop(self) {
        let streams = self.hub.open_streams();
        let started = std::time::Instant::now();
        tracing::info!(
            open_streams = streams,
            timeout = ?DRAIN_TIMEOUT,
            "shutting down: ending the open worker streams once what they sent is stored"
        );
        let _ = self.stop.send(true);
        for task in &self.background {
            task.abort();
        }
        if let Some(cluster) = self.cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
        let drain = async {
            for server in self.servers {
                let _ = server.await;
            }
        };
        match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
            Ok(()) => tracing::info!(took = ?started.elapsed(), "stopped"),
            Err(_) => tracing::warn!(
                open_streams = self.hub.open_streams(),
                "stopped after {DRAIN_TIMEOUT:?}: connections still open were cut"
            ),
        }
    }
}

/// How long [`Service::stop`] waits for the servers to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Re-reads the auth file on SIGHUP, and the TLS files when they change
/// (checked every few seconds, and on SIGHUP). What does not load is logged
/// and the previous principals or certificates stay.
async fn reload_security(gate: Arc<Gate>, tls: Option<Arc<ServerTls>>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the auth file will not be re-read");
            None
        }
    };
    let mut every = tokio::time::interval(TLS_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hup = tokio::select! {
            _ = every.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        if hup {
            match gate.reload() {
                Ok(Some(n)) => tracing::info!(principals = n, "SIGHUP: auth file re-read"),
                Ok(None) => tracing::info!("SIGHUP: no auth file to re-read (no --auth)"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: the auth file does not load; the previous principals stay")
                }
            }
        }
        if let Some(tls) = &tls {
            match tls.reload(hup) {
                Ok(true) => tracing::info!(cert = %tls.files().cert.display(), "TLS certificate re-read"),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "the TLS files do not load; the previous certificate stays"),
            }
        }
    }
}

/// How often the TLS files are checked for a change.
const TLS_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Reports the brokers' reachability: gRPC health (NOT_SERVING while every
/// broker is down, so a load balancer moves workers away) and the gauge.
async fn report_brokers(
    link: Arc<Link>,
    metrics: ClusterMetrics,
    reporter: tonic_health::server::HealthReporter,
    ready: Arc<AtomicBool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut was = None;
    loop {
        every.tick().await;
        let up = link.is_up();
        if was != Some(up) {
            was = Some(up);
            let status = if up {
                tonic_health::ServingStatus::Serving
            } else {
                tracing::warn!("all Kafka brokers are down: reporting NOT_SERVING");
                tonic_health::ServingStatus::NotServing
            };
            if up {
                reporter.set_serving::<IngestServer<IngestService>>().await;
            } else {
                reporter.set_not_serving::<IngestServer<IngestService>>().await;
            }
            reporter.set_service_status("", status).await;
            ready.store(up, std::sync::atomic::Ordering::Relaxed);
        }
        // After the health status: whoever sees the gauge sees the status.
        metrics.up.set(i64::from(up));
    }
}

/// This replica's part of the cluster.
struct Cluster {
    link: Arc<Link>,
    metrics: ClusterMetrics,
    forward: Arc<Forwarder>,
    _detector: Detector,
}

impl Cluster {
    /// Creates the missing topics and joins the detectors' group.
    async fn start(config: &KafkaConfig, registry: &prometheus::Registry, judge: Judge) -> anyhow::Result<Self> {
        config.ensure_topics().await?;
        let metrics = ClusterMetrics::register(registry);
        let link = Link::new(metrics.clone(), &config.topics.summaries);
        let detector = Detector::start(config, judge, link.clone())?;
        tracing::info!(
            brokers = config.brokers.as_deref().unwrap_or_default(),
            group = %config.group,
            "cluster mode: detector joined its group"
        );
        let forward = Arc::new(Forwarder::new(config, link.clone())?);
        Ok(Self {
            link,
            metrics,
            forward,
            _detector: detector,
        })
    }
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
