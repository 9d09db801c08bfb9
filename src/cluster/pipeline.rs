//! The detector's way out: its producer, and the batches in flight between
//! processing and the commit of their offsets (see `detector`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::link::{Change, Ctx};
use crate::model::JobId;

/// How long a stopping detector waits for the brokers to take its last batches.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The detector consumer's context: its rebalances move jobs, and a revoke
/// first drains the pipeline so the batches processed so far are written and
/// committed while the partitions are still this replica's.
pub struct DetectorCtx {
    pub(super) ctx: Ctx,
    pub(super) pipeline: Arc<Pipeline>,
}

impl ClientContext for DetectorCtx {
    fn stats(&self, stats: Statistics) {
        self.ctx.stats(stats);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.ctx.error(error, reason);
    }
}

impl ConsumerContext for DetectorCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let in_flight = self.pipeline.in_flight();
            if consumer.assignment_lost() {
                // Another member may own the partitions already: a snapshot
                // written now could land after its newer ones.
                self.pipeline.abandon("the assignment was lost");
            } else if self.pipeline.drain(consumer, 0, CommitMode::Async) {
                if in_flight > 0 {
                    tracing::info!(batches = in_flight, "batches in flight committed before the revoke");
                }
            } else {
                self.pipeline.abandon("stopping before the brokers took them");
            }
            let partitions = self.ctx.0.summaries_partitions(tpl);
            self.ctx.0.changes.lock().unwrap().push(Change::Revoked(partitions));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Counted even when empty: the replica is in the group.
            self.ctx.0.metrics.rebalances.inc();
            let partitions = self.ctx.0.summaries_partitions(tpl);
            self.ctx.0.changes.lock().unwrap().push(Change::Assigned(partitions));
        }
    }
}

/// The detector producer's context: every record carries the sequence number
/// of the batch that produced it, and its acknowledgement is counted there.
pub struct ProduceCtx {
    pub(super) ctx: Ctx,
    /// Records produced and acknowledged (or failed) per batch.
    pub(super) counts: Mutex<HashMap<usize, Count>>,
}

#[derive(Default, Clone, Copy)]
pub(super) struct Count {
    sent: usize,
    acked: usize,
}

impl ClientContext for ProduceCtx {
    fn stats(&self, stats: Statistics) {
        self.ctx.stats(stats);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.ctx.error(error, reason);
    }
}

impl ProducerContext for ProduceCtx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: usize) {
        // A failed record counts as settled, as it always has: it is counted
        // in the producer errors, and waiting on it would stall the partition.
        self.ctx.delivery(result, ());
        self.counts.lock().unwrap().entry(batch).or_default().acked += 1;
    }
}

/// A closed batch waiting for the broker.
pub(super) struct Batch {
    pub(super) seq: usize,
    /// Next offset to commit, per partition.
    pub(super) positions: HashMap<i32, i64>,
    /// Snapshots (a tombstone when `None`) taken when the batch closed, to
    /// produce once the batch's anomalies and advice are acknowledged.
    pub(super) state: Vec<StateRecord>,
    /// The state records are produced; the commit waits for them.
    pub(super) state_sent: bool,
}

pub(super) struct StateRecord {
    pub(super) job: JobId,
    pub(super) partition: i32,
    pub(super) bytes: Option<Vec<u8>>,
}

/// The detector's producer and its batches in flight, oldest first. Shared
/// by the detector thread and the consumer's rebalance callback (which runs
/// on that thread, inside a consumer poll).
pub(super) struct Pipeline {
    pub(super) producer: BaseProducer<ProduceCtx>,
    pub(super) summaries: String,
    pub(super) state: String,
    pub(super) stop: Arc<AtomicBool>,
    /// When the detector was first seen stopping: the grace runs from there.
    pub(super) stopping_since: OnceLock<Instant>,
    pub(super) batches: Mutex<VecDeque<Batch>>,
}

impl Pipeline {
    /// Queues one record for `batch`, waiting while the producer's queue is full.
    pub(super) fn send(&self, batch: usize, topic: &str, key: &str, partition: Option<i32>, payload: Option<&[u8]>) {
        let mut record = BaseRecord::with_opaque_to(topic, batch).key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.producer
                        .context()
                        .counts
                        .lock()
                        .unwrap()
                        .entry(batch)
                        .or_default()
                        .sent += 1;
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => {
                    self.producer.context().ctx.0.metrics.producer_errors.inc();
                    tracing::error!(error = %e, topic, "kafka produce failed");
                    return;
                }
            }
        }
    }

    /// Whether a batch has produced anything.
    pub(super) fn produced(&self, batch: usize) -> bool {
        self.producer.context().counts.lock().unwrap().contains_key(&batch)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.batches.lock().unwrap().len()
    }

    /// Queues a closed batch behind the others.
    pub(super) fn push(&self, batch: Batch) {
        self.batches.lock().unwrap().push_back(batch);
    }

    /// Takes the acknowledgements that came in and moves the oldest batches
    /// on: once all a batch produced is acknowledged, its snapshots go out;
    /// once those are acknowledged too, its offsets are committed. Only the
    /// oldest batch moves, so commits keep the batches' order and a snapshot
    /// never goes out before the advice of an earlier batch.
    pub(super) fn advance(&self, consumer: &BaseConsumer<DetectorCtx>, mode: CommitMode) {
        self.producer.poll(Duration::ZERO);
        let mut batches = self.batches.lock().unwrap();
        while let Some(front) = batches.front_mut() {
            let settled = {
                let counts = self.producer.context().counts.lock().unwrap();
                counts.get(&front.seq).is_none_or(|c| c.acked >= c.sent)
            };
            if !settled {
                return;
            }
            if !front.state_sent {
                front.state_sent = true;
                for r in std::mem::take(&mut front.state) {
                    self.send(front.seq, &self.state, &r.job, Some(r.partition), r.bytes.as_deref());
                }
                continue;
            }
            let batch = batches.pop_front().expect("the front batch");
            // Older numbers are those of abandoned batches, whose late
            // acknowledgements would otherwise stay counted forever.
            self.producer
                .context()
                .counts
                .lock()
                .unwrap()
                .retain(|&seq, _| seq > batch.seq);
            if batch.positions.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for (&p, &next) in &batch.positions {
                let _ = tpl.add_partition_offset(&self.summaries, p, Offset::Offset(next));
            }
            if let Err(e) = consumer.commit(&tpl, mode) {
                tracing::warn!(error = %e, "kafka offset commit failed; the batch may be redelivered");
            }
        }
    }

    /// Moves the batches on until at most `keep` are in flight. While the
    /// brokers are away this waits for them; once the replica is stopping,
    /// until [`STOP_GRACE`] after it began to. False when it gave up.
    pub(super) fn drain(&self, consumer: &BaseConsumer<DetectorCtx>, keep: usize, mode: CommitMode) -> bool {
        let mut warned = Instant::now();
        loop {
            self.advance(consumer, mode);
            if self.in_flight() <= keep {
                return true;
            }
            // Short polls: rdkafka's own flush polls in 100 ms slices, which
            // would add up to 100 ms to every batch.
            self.producer.poll(Duration::from_millis(1));
            if warned.elapsed() >= Duration::from_secs(5) {
                warned = Instant::now();
                tracing::warn!(
                    in_flight = self.producer.in_flight_count(),
                    batches = self.in_flight(),
                    "waiting for the Kafka brokers to take the detector's records"
                );
            }
            if self.stop.load(Ordering::Relaxed)
                && self.stopping_since.get_or_init(Instant::now).elapsed() >= STOP_GRACE
            {
                return false;
            }
        }
    }

    /// Forgets the batches in flight, uncommitted: their records are
    /// redelivered to the partitions' next owner, and their snapshots that
    /// are not out yet never go out.
    pub(super) fn abandon(&self, why: &str) {
        let abandoned = std::mem::take(&mut *self.batches.lock().unwrap());
        if !abandoned.is_empty() {
            tracing::warn!(
                batches = abandoned.len(),
                why,
                "uncommitted batches left for redelivery"
            );
        }
    }
}
