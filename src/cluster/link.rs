//! What the Kafka clients of a replica tell about the brokers: reachability,
//! lag, producer errors, and the detector's rebalances.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use super::ClusterMetrics;

/// What the clients of a replica tell about the brokers: reachability, lag,
/// producer errors.
pub struct Link {
    up: AtomicBool,
    pub(super) metrics: ClusterMetrics,
    /// The detector's topic: only its rebalances concern the detector.
    summaries: String,
    pub(super) changes: Mutex<Vec<Change>>,
}

pub(super) enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

impl Link {
    pub fn new(metrics: ClusterMetrics, summaries: &str) -> Arc<Self> {
        Arc::new(Self {
            up: AtomicBool::new(true),
            metrics,
            summaries: summaries.to_owned(),
            changes: Mutex::new(Vec::new()),
        })
    }

    /// The summaries-topic partitions of a rebalance (the other consumers
    /// of the service share this context).
    pub(super) fn summaries_partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.summaries)
            .map(|e| e.partition())
            .collect()
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// False while librdkafka reports every broker down.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// The context of every Kafka client of the service (rdkafka wants one type
/// per client; they share the [`Link`]).
#[derive(Clone)]
pub struct Ctx(pub Arc<Link>);

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        if stats.brokers.values().any(|b| b.state == "UP") {
            self.0.up.store(true, Ordering::Relaxed);
        }
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.0.metrics.lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.0.up.store(false, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "kafka");
    }
}

impl ConsumerContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.0.metrics.producer_errors.inc();
            tracing::error!(%error, "kafka delivery failed");
        }
    }
}
