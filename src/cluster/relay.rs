//! gRPC workers in cluster mode: any replica accepts their streams, forwards
//! what they send to the summaries topic (the job's owner processes it), and
//! relays the advice topic back onto the streams it holds.

use std::sync::Arc;
use std::time::Duration;

use crate::proto;
use anyhow::Context as _;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::link::{Ctx, Link};
use super::{Client, KafkaConfig, worker_record};

/// Worker messages on their way to the summaries topic. While the brokers
/// are away they wait in the producer's queue, bounded by
/// `queue.buffering.max.kbytes`; beyond it a message is dropped and counted.
pub struct Forwarder {
    producer: ThreadedProducer<Ctx>,
    topic: String,
    link: Arc<Link>,
}

impl Forwarder {
    pub fn new(config: &KafkaConfig, link: Arc<Link>) -> anyhow::Result<Self> {
        // Bounded queue (unless a property says otherwise); waits for a
        // broker that is away rather than fail what was accepted.
        let producer = config
            .client_config(Client::Forwarder)
            .create_with_context(Ctx(link.clone()))
            .context("cannot create the forwarding Kafka producer")?;
        Ok(Self {
            producer,
            topic: config.topics.summaries.clone(),
            link,
        })
    }

    /// Queues one worker message of `rank` of `job`. False when the queue is
    /// full (the brokers have been away for long): the message is dropped.
    pub fn send(&self, job: &str, rank: u32, body: proto::worker_message::Body) -> bool {
        let (payload, headers) = worker_record(rank, body);
        let record = BaseRecord::to(&self.topic).key(job).payload(&payload).headers(headers);
        match self.producer.send(record) {
            Ok(()) => true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                self.link.metrics().dropped.inc();
                false
            }
            Err((e, _)) => {
                self.link.metrics().producer_errors.inc();
                tracing::error!(error = %e, "cannot forward a worker message");
                false
            }
        }
    }

    /// Waits until the brokers hold every message queued so far (a stream
    /// that ends waits for this: "ended" means "handed over").
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "forwarded messages still queued");
        }
    }
}

/// Reads the advice topic from its current end, on every partition, and
/// hands each advice to `deliver` (the streams of its job on this replica).
pub async fn relay_advice(
    config: &KafkaConfig,
    link: Arc<Link>,
    deliver: impl Fn(proto::Advice) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let topic = config.topics.advice.clone();
    let cfg = config.clone();
    let t = topic.clone();
    let ends = tokio::task::spawn_blocking(move || super::worker::end_offsets(&cfg, &t))
        .await
        .context("the watermark reader failed")??;
    let consumer: StreamConsumer<Ctx> = config
        .client_config(Client::Relay)
        .create_with_context(Ctx(link))
        .context("cannot create the advice relay's Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for (&p, &end) in &ends {
        tpl.add_partition_offset(&topic, p, Offset::Offset(end))?;
    }
    consumer.assign(&tpl)?;
    Ok(tokio::spawn(async move {
        loop {
            let m = match consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "advice relay");
                    continue;
                }
            };
            match proto::ServerMessage::decode(m.payload().unwrap_or_default()) {
                Ok(proto::ServerMessage {
                    body: Some(proto::server_message::Body::Advice(a)),
                }) => deliver(a),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, offset = m.offset(), "advice record skipped"),
            }
        }
    }))
}
