//! Prometheus metrics of the service, and the HTTP endpoint that serves them.
//!
//! Names follow the conventions: `gradguard_` prefix, base units, `_total`
//! counters. Labels are bounded: `job` (capped by `--max-jobs`, and removed
//! with the job), `rule`, `severity`, `action`, `reason`; never a step or a rank.
//! Alerts belong on the counters (`increase(gradguard_anomalies_total[5m]) > 0`):
//! a one-step spike never shows in a gauge scraped every 15 s.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use gradguard::model::{Action, RuleId, Severity};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
    register_gauge_vec_with_registry, register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_with_registry,
};

/// Every metric the service exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub summaries: IntCounter,
    pub layer_stats: IntCounter,
    rejected: IntCounterVec,
    anomalies: IntCounterVec,
    advice: IntCounterVec,
    pub advice_dropped: IntCounter,
    acks: IntCounterVec,
    pub advice_latency: Histogram,
    pub active_jobs: IntGauge,
    pub active_streams: IntGauge,
    pub jobs_refused: IntCounter,
    pub store_commit: Histogram,
    pub store_errors: IntCounter,
    pub store_bytes: IntGauge,
    job_grad_norm: prometheus::GaugeVec,
    job_loss: prometheus::GaugeVec,
    job_lr: prometheus::GaugeVec,
    job_health: prometheus::GaugeVec,
    job_last_summary: prometheus::GaugeVec,
    job_streams: prometheus::GaugeVec,
    job_unacked: prometheus::GaugeVec,
    kafka_lag: prometheus::IntGaugeVec,
    pub kafka_producer_errors: IntCounter,
    pub kafka_redelivered: IntCounter,
    pub kafka_up: IntGauge,
    pub kafka_partitions: IntGauge,
    pub kafka_dropped: IntCounter,
    pub kafka_rebalances: IntCounter,
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

/// Buckets of the advice latency, in seconds: 50 µs to 1 s.
const LATENCY_BUCKETS: [f64; 14] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
];

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registers once");
        // Registration only fails on duplicate or malformed names, fixed here.
        let m = Self {
            summaries: register_int_counter_with_registry!(
                "gradguard_summaries_total",
                "Summaries accepted from workers.",
                r
            )
            .unwrap(),
            layer_stats: register_int_counter_with_registry!(
                "gradguard_layer_stats_total",
                "Per-layer statistics accepted (one per layer of each summary).",
                r
            )
            .unwrap(),
            rejected: register_int_counter_vec_with_registry!(
                "gradguard_summaries_rejected_total",
                "Worker messages refused, by reason.",
                &["reason"],
                r
            )
            .unwrap(),
            anomalies: register_int_counter_vec_with_registry!(
                "gradguard_anomalies_total",
                "Anomalies found, by job, rule and severity.",
                &["job", "rule", "severity"],
                r
            )
            .unwrap(),
            advice: register_int_counter_vec_with_registry!(
                "gradguard_advice_total",
                "Advice decided, by job and action.",
                &["job", "action"],
                r
            )
            .unwrap(),
            advice_dropped: register_int_counter_with_registry!(
                "gradguard_advice_dropped_total",
                "Advice not delivered to a stream because its send queue was full.",
                r
            )
            .unwrap(),
            acks: register_int_counter_vec_with_registry!(
                "gradguard_advice_acks_total",
                "Advice acknowledgements from workers, by whether they applied it.",
                &["applied"],
                r
            )
            .unwrap(),
            advice_latency: register_histogram_with_registry!(
                HistogramOpts::new(
                    "gradguard_advice_latency_seconds",
                    "Time from receiving a summary to queueing the advice it triggered on the worker streams."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                r
            )
            .unwrap(),
            active_jobs: register_int_gauge_with_registry!("gradguard_active_jobs", "Jobs tracked.", r).unwrap(),
            active_streams: register_int_gauge_with_registry!(
                "gradguard_active_streams",
                "Worker streams open (after their Hello).",
                r
            )
            .unwrap(),
            jobs_refused: register_int_counter_with_registry!(
                "gradguard_jobs_refused_total",
                "New jobs refused because --max-jobs jobs were already tracked.",
                r
            )
            .unwrap(),
            store_commit: register_histogram_with_registry!(
                HistogramOpts::new(
                    "gradguard_store_commit_seconds",
                    "Time to commit one group of records to the store (advice waits for it)."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                r
            )
            .unwrap(),
            store_errors: register_int_counter_with_registry!(
                "gradguard_store_errors_total",
                "Store writes that failed (the advice in them was still delivered).",
                r
            )
            .unwrap(),
            // Cluster mode only: registered by `register_cluster`.
            kafka_lag: prometheus::IntGaugeVec::new(
                Opts::new(
                    "gradguard_kafka_consumer_lag_messages",
                    "Cluster mode: records of a partition this replica has yet to consume.",
                ),
                &["topic", "partition"],
            )
            .unwrap(),
            kafka_producer_errors: IntCounter::new(
                "gradguard_kafka_producer_errors_total",
                "Cluster mode: records the service failed to produce to Kafka.",
            )
            .unwrap(),
            kafka_redelivered: IntCounter::new(
                "gradguard_kafka_redelivered_total",
                "Cluster mode: summaries records skipped because their step was already processed (redelivery).",
            )
            .unwrap(),
            kafka_up: IntGauge::new(
                "gradguard_kafka_up",
                "Cluster mode: 1 while the Kafka brokers are reachable, 0 while all are down.",
            )
            .unwrap(),
            kafka_partitions: IntGauge::new(
                "gradguard_kafka_partitions_owned",
                "Cluster mode: partitions of the summaries topic this replica's detector owns.",
            )
            .unwrap(),
            kafka_rebalances: IntCounter::new(
                "gradguard_kafka_rebalances_total",
                "Cluster mode: partition assignments the detector received (one per group rebalance).",
            )
            .unwrap(),
            kafka_dropped: IntCounter::new(
                "gradguard_kafka_dropped_total",
                "Cluster mode: worker messages dropped because the Kafka producer's queue was full (brokers away too long).",
            )
            .unwrap(),
            store_bytes: register_int_gauge_with_registry!(
                "gradguard_store_bytes",
                "Bytes of the store in use, measured at each retention pass.",
                r
            )
            .unwrap(),
            job_grad_norm: register_gauge_vec_with_registry!(
                Opts::new(
                    "gradguard_job_grad_norm",
                    "Latest global gradient L2 norm of a job (any rank); for dashboards, not alerts."
                ),
                &["job"],
                r
            )
            .unwrap(),
            job_loss: register_gauge_vec_with_registry!(
                Opts::new("gradguard_job_loss", "Latest loss of a job (any rank)."),
                &["job"],
                r
            )
            .unwrap(),
            job_lr: register_gauge_vec_with_registry!(
                Opts::new(
                    "gradguard_job_learning_rate",
                    "Latest learning rate of a job (any rank)."
                ),
                &["job"],
                r
            )
            .unwrap(),
            job_health: register_gauge_vec_with_registry!(
                Opts::new(
                    "gradguard_job_health",
                    "Worst open problem of a job: 0 healthy, 1 info, 2 warning, 3 critical."
                ),
                &["job"],
                r
            )
            .unwrap(),
            job_last_summary: register_gauge_vec_with_registry!(
                Opts::new(
                    "gradguard_job_last_summary_timestamp_seconds",
                    "When the latest summary of a job (any rank) was taken, seconds since the epoch."
                ),
                &["job"],
                r
            )
            .unwrap(),
            job_streams: register_gauge_vec_with_registry!(
                Opts::new("gradguard_job_streams", "Worker streams of a job open now."),
                &["job"],
                r
            )
            .unwrap(),
            job_unacked: register_gauge_vec_with_registry!(
                Opts::new(
                    "gradguard_job_advice_unacked",
                    "Advice of a job (among its latest 64) that no rank has acknowledged yet."
                ),
                &["job"],
                r
            )
            .unwrap(),
            registry: r,
        };
        for reason in REJECT_REASONS {
            m.rejected.with_label_values(&[reason]);
        }
        for applied in ["true", "false"] {
            m.acks.with_label_values(&[applied]);
        }
        m
    }

    /// A new job's gauges. Its warning and critical anomaly counters start at
    /// 0 here: `increase()` only sees a series change between two scrapes, so
    /// a counter born at 1 would never fire the alert built on it.
    pub fn job_gauges(&self, job: &str) -> JobGauges {
        for rule in RuleId::ALL {
            for severity in ALERTED_SEVERITIES {
                self.anomalies
                    .with_label_values(&[job, rule.as_str(), severity.as_str()]);
            }
        }
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

    /// Exports the cluster-mode series (an embedded service has none).
    pub fn register_cluster(&self) {
        let r = &self.registry;
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(self.kafka_rebalances.clone()),
            Box::new(self.kafka_lag.clone()),
            Box::new(self.kafka_producer_errors.clone()),
            Box::new(self.kafka_redelivered.clone()),
            Box::new(self.kafka_up.clone()),
            Box::new(self.kafka_partitions.clone()),
            Box::new(self.kafka_dropped.clone()),
        ];
        for c in collectors {
            // Fails only when called twice: the series are then there already.
            let _ = r.register(c);
        }
    }

    /// One summary of `layers` layers accepted.
    pub fn summary(&self, layers: usize) {
        self.summaries.inc();
        self.layer_stats.inc_by(layers as u64);
    }

    /// Consumer lag of one partition (cluster mode), from librdkafka's statistics.
    pub fn kafka_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.kafka_lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    pub fn anomaly(&self, job: &str, rule: RuleId, severity: Severity) {
        self.anomalies
            .with_label_values(&[job, rule.as_str(), severity.as_str()])
            .inc();
    }

    pub fn advice(&self, job: &str, action: &Action) {
        self.advice.with_label_values(&[job, action.name()]).inc();
    }

    pub fn ack(&self, applied: bool) {
        self.acks
            .with_label_values(&[if applied { "true" } else { "false" }])
            .inc();
    }

    /// Removes every series labelled with this job.
    pub fn forget_job(&self, job: &str) {
        for v in [
            &self.job_grad_norm,
            &self.job_loss,
            &self.job_lr,
            &self.job_health,
            &self.job_last_summary,
            &self.job_streams,
            &self.job_unacked,
        ] {
            let _ = v.remove_label_values(&[job]);
        }
        for rule in RuleId::ALL {
            for severity in [Severity::Info, Severity::Warning, Severity::Critical] {
                let _ = self
                    .anomalies
                    .remove_label_values(&[job, rule.as_str(), severity.as_str()]);
            }
        }
        for action in Action::NAMES {
            let _ = self.advice.remove_label_values(&[job, action]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf).expect("the text format is UTF-8"))
    }
}

/// Severities that alerts are built on; their counters exist from a job's start.
const ALERTED_SEVERITIES: [Severity; 2] = [Severity::Warning, Severity::Critical];

/// Every `reason` label of rejected messages, so each series exists from the start.
pub const REJECT_REASONS: [&str; 15] = [
    "undecodable",
    "empty_message",
    "replaced",
    "no_hello",
    "hello_twice",
    "invalid_hello",
    "layer_count",
    "layer_names",
    "duplicate_step",
    "step_backwards",
    "empty_job",
    "rank_out_of_range",
    "too_many_layers",
    "message_too_large",
    "too_many_jobs",
];

/// `/metrics` (Prometheus text format) and `/healthz`.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.render() {
                        Ok(text) => {
                            (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
                        }
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// Serves the router on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}
