//! The hub's metrics, and the HTTP endpoint that serves every metric of the
//! service's registry.
//!
//! Each component registers its own series in the one registry: the intake
//! (`intake::IntakeMetrics`: summaries, refusals, anomalies, advice, acks),
//! the hub (here: streams, jobs, per-job gauges, advice delivery), the store
//! writer (`recorder::StoreMetrics`), the cluster (`cluster::ClusterMetrics`).
//!
//! Names follow the conventions: `gradguard_` prefix, base units, `_total`
//! counters. Labels are bounded: `training_job` (the training job, capped by `--max-jobs`, and removed
//! with the job), `rule`, `severity`, `action`, `reason`; never a step or a rank.
//! Alerts belong on the counters (`increase(gradguard_anomalies_total[5m]) > 0`):
//! a one-step spike never shows in a gauge scraped every 15 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::auth::tls::ServerTls;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

use crate::intake::IntakeMetrics;
use crate::model::{Severity, Summary};

/// The hub's series.
#[derive(Clone)]
pub struct HubMetrics {
    pub advice_dropped: IntCounter,
    pub advice_latency: Histogram,
    pub active_jobs: IntGauge,
    pub active_streams: IntGauge,
    job_grad_norm: GaugeVec,
    job_loss: GaugeVec,
    job_lr: GaugeVec,
    job_health: GaugeVec,
    job_last_summary: GaugeVec,
    job_start: GaugeVec,
    job_streams: GaugeVec,
    job_unacked: GaugeVec,
    /// The intake's per-job series start and end with the hub's jobs.
    intake: IntakeMetrics,
}

/// One job's gauges, looked up once when the job appears.
#[derive(Clone)]
pub struct JobGauges {
    pub grad_norm: Gauge,
    pub loss: Gauge,
    pub lr: Gauge,
    pub health: Gauge,
    pub last_summary: Gauge,
    pub streams: Gauge,
    pub unacked: Gauge,
}

impl JobGauges {
    /// Sets the job's gauges from its latest summary and its health.
    pub fn update(&self, s: &Summary, health: Option<Severity>) {
        let g = self;
        let norm = s.grad_norm.or_else(|| {
            (!s.layers.is_empty()).then(|| {
                s.layers
                    .iter()
                    .map(|l| f64::from(l.l2) * f64::from(l.l2))
                    .sum::<f64>()
                    .sqrt()
            })
        });
        if let Some(n) = norm {
            g.grad_norm.set(n);
        }
        if let Some(l) = s.loss {
            g.loss.set(l);
        }
        if let Some(lr) = s.lr {
            g.lr.set(lr);
        }
        if let Some(t) = s.time {
            g.last_summary.set(t);
        }
        g.health.set(match health {
            None => 0.0,
            Some(Severity::Info) => 1.0,
            Some(Severity::Warning) => 2.0,
            Some(Severity::Critical) => 3.0,
        });
    }
}

/// Buckets of latencies, in seconds: 50 µs to 1 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
];

/// `gradguard_build_info{version,revision} 1`: which build a target runs
/// (`revision` is the commit it was built from, see build.rs).
pub fn register_build_info(r: &Registry) {
    let opts = Opts::new(
        "gradguard_build_info",
        "The running build: its version and revision; always 1.",
    )
    .const_label("version", env!("CARGO_PKG_VERSION"))
    .const_label("revision", env!("GRADGUARD_REVISION"));
    registered(r, prometheus::Gauge::with_opts(opts).unwrap()).set(1.0);
}

/// Registers a collector; only a duplicate or malformed name fails, fixed here.
pub fn registered<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("a metric registered once");
    c
}

impl HubMetrics {
    pub fn register(r: &Registry, intake: IntakeMetrics) -> Self {
        let job_gauge =
            |name: &str, help: &str| registered(r, GaugeVec::new(Opts::new(name, help), &["training_job"]).unwrap());
        Self {
            advice_dropped: registered(
                r,
                IntCounter::new(
                    "gradguard_advice_dropped_total",
                    "Advice not delivered to a stream because its send queue was full.",
                )
                .unwrap(),
            ),
            advice_latency: registered(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "gradguard_advice_latency_seconds",
                        "Time from receiving a summary to queueing the advice it triggered on the worker streams.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            active_jobs: registered(r, IntGauge::new("gradguard_active_jobs", "Jobs tracked.").unwrap()),
            active_streams: registered(
                r,
                IntGauge::new("gradguard_active_streams", "Worker streams open (after their Hello).").unwrap(),
            ),
            job_grad_norm: job_gauge(
                "gradguard_job_grad_norm",
                "Latest global gradient L2 norm of a job (any rank); for dashboards, not alerts.",
            ),
            job_loss: job_gauge("gradguard_job_loss", "Latest loss of a job (any rank)."),
            job_lr: job_gauge(
                "gradguard_job_learning_rate",
                "Latest learning rate of a job (any rank).",
            ),
            job_health: job_gauge(
                "gradguard_job_health",
                "Worst open problem of a job: 0 healthy, 1 info, 2 warning, 3 critical.",
            ),
            job_last_summary: job_gauge(
                "gradguard_job_last_step_timestamp_seconds",
                "When the latest summary of a job (any rank) was taken, seconds since the epoch.",
            ),
            job_start: job_gauge(
                "gradguard_job_start_timestamp_seconds",
                "When this service began tracking a job (its first stream), seconds since the epoch; \
                 the alerts count a young job's anomaly counters whole, as Prometheus never saw them at 0.",
            ),
            job_streams: job_gauge("gradguard_job_streams", "Worker streams of a job open now."),
            job_unacked: job_gauge(
                "gradguard_job_advice_unacked",
                "Advice of a job (among its latest 64) that no rank has acknowledged yet.",
            ),
            intake,
        }
    }

    /// A new job's gauges (and its alerted anomaly counters, at 0).
    pub fn job_gauges(&self, job: &str) -> JobGauges {
        self.intake.new_job(job);
        self.job_start.with_label_values(&[job]).set(crate::clock::unix_now());
        JobGauges {
            grad_norm: self.job_grad_norm.with_label_values(&[job]),
            loss: self.job_loss.with_label_values(&[job]),
            lr: self.job_lr.with_label_values(&[job]),
            health: self.job_health.with_label_values(&[job]),
            last_summary: self.job_last_summary.with_label_values(&[job]),
            streams: self.job_streams.with_label_values(&[job]),
            unacked: self.job_unacked.with_label_values(&[job]),
        }
    }

    /// Removes every series labelled with this job.
    pub fn forget_job(&self, job: &str) {
        for v in [
            &self.job_grad_norm,
            &self.job_loss,
            &self.job_lr,
            &self.job_health,
            &self.job_last_summary,
            &self.job_start,
            &self.job_streams,
            &self.job_unacked,
        ] {
            let _ = v.remove_label_values(&[job]);
        }
        self.intake.forget_job(job);
    }
}

/// The text exposition of every metric of a registry.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    Ok(String::from_utf8(buf).expect("the text format is UTF-8"))
}

/// `/metrics` (Prometheus text format), `/healthz` (the process answers)
/// and `/readyz` (it serves: 503 while `ready` is false, as gRPC health says
/// NOT_SERVING, e.g. with every Kafka broker unreachable).
pub fn router(registry: Registry, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    match render(&registry) {
                        Ok(text) => {
                            (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
                        }
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not serving: no Kafka broker is reachable\n",
                        )
                    }
                }
            }),
        )
}

/// Serves the router on an already bound listener until `shutdown`
/// resolves, over TLS when `tls` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, router(registry, ready))
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            axum::serve(TlsListener::new(listener, tls)?, router(registry, ready))
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// The metrics port over TLS: connections accepted and their handshakes run
/// apart (at most [`HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]),
/// so one slow client holds up no scrape.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

const HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn new(listener: tokio::net::TcpListener, tls: Arc<ServerTls>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(HANDSHAKES);
        let slots = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, remote) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::debug!(error = %e, "metrics port: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let acceptor = TlsAcceptor::from(tls.http());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, remote)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "metrics port: TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "metrics port: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
