//! Cluster mode's series: the brokers' reachability, lag, producer errors,
//! the detector's partitions and rebalances. Registered by the cluster, in
//! the service's registry, only when the service runs as a cluster replica.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct ClusterMetrics {
    lag: IntGaugeVec,
    pub producer_errors: IntCounter,
    pub redelivered: IntCounter,
    pub up: IntGauge,
    pub partitions: IntGauge,
    pub dropped: IntCounter,
    pub rebalances: IntCounter,
}

impl ClusterMetrics {
    pub fn register(r: &Registry) -> Self {
        let m = Self {
            lag: IntGaugeVec::new(
                Opts::new(
                    "gradguard_kafka_consumer_lag_messages",
                    "Cluster mode: records of a partition this replica has yet to consume.",
                ),
                &["topic", "partition"],
            )
            .unwrap(),
            producer_errors: IntCounter::new(
                "gradguard_kafka_producer_errors_total",
                "Cluster mode: records the service failed to produce to Kafka.",
            )
            .unwrap(),
            redelivered: IntCounter::new(
                "gradguard_kafka_redelivered_total",
                "Cluster mode: summaries records skipped because their step was already processed (redelivery).",
            )
            .unwrap(),
            up: IntGauge::new(
                "gradguard_kafka_up",
                "Cluster mode: 1 while the Kafka brokers are reachable, 0 while all are down.",
            )
            .unwrap(),
            partitions: IntGauge::new(
                "gradguard_kafka_partitions_owned",
                "Cluster mode: partitions of the summaries topic this replica's detector owns.",
            )
            .unwrap(),
            dropped: IntCounter::new(
                "gradguard_kafka_dropped_total",
                "Cluster mode: worker messages dropped because the Kafka producer's queue was full (brokers away too long).",
            )
            .unwrap(),
            rebalances: IntCounter::new(
                "gradguard_kafka_rebalances_total",
                "Cluster mode: partition assignments the detector received (one per group rebalance).",
            )
            .unwrap(),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(m.rebalances.clone()),
            Box::new(m.lag.clone()),
            Box::new(m.producer_errors.clone()),
            Box::new(m.redelivered.clone()),
            Box::new(m.up.clone()),
            Box::new(m.partitions.clone()),
            Box::new(m.dropped.clone()),
        ];
        for c in collectors {
            // Only a duplicate or malformed name fails, fixed here.
            r.register(c).expect("cluster metrics registered once");
        }
        m
    }

    /// Consumer lag of one partition, from librdkafka's statistics.
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag.with_label_values(&[topic, &partition.to_string()]).set(lag);
    }
}
