//! One replica's detector: a member of the detectors' consumer group over the
//! summaries topic, running the engine on the jobs of its partitions.
//!
//! A loop on its own thread: poll a batch of records, run them through the
//! engine, produce the anomalies and the advice, and take a snapshot of every
//! job the batch touched. The batch then waits in a short pipeline while the
//! next one is processed: once the broker has acknowledged its anomalies and
//! advice (and those of every batch before it), its snapshots are produced;
//! once those are acknowledged too, its offsets are committed. A crash
//! anywhere before the commit replays the batch; the replay is harmless
//! because the restored snapshots already hold those steps (the engine
//! refuses a step it has seen, and a snapshot is only written once the advice
//! of its steps is out) or, when the snapshot was not written, recomputes the
//! same findings under the same ids.
//!
//! Partitions change hands in rebalances: before a partition is revoked the
//! pipeline is drained (snapshots written, offsets committed), then the
//! partition's jobs leave the engine (their state is in the state topic
//! already); an assigned one's are restored from the state topic before any
//! of its records is processed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gradguard::engine::{Engine, EngineError, JobSpec, Output};
use gradguard::model::{Action, Advice, Finding, JobId, Summary};
use gradguard::proto::{self, worker_message};
use gradguard::wire;
use prost::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaConfig, RECORD_INDEX_LIMIT, rank_of, record_id};
use crate::serve::metrics::Metrics;

/// Records processed before a batch is closed (snapshots taken) and queued
/// for its acknowledgements and commit.
const MAX_BATCH: usize = 2000;
/// Closed batches waiting for their acknowledgements while the next one is
/// processed; a detector that has this many waits for the oldest.
const MAX_IN_FLIGHT: usize = 3;
/// Records processed between two looks at the producer's acknowledgements.
const ADVANCE_EVERY: usize = 128;
/// How long a stopping detector waits for the brokers to take its last batches.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often silent ranks are judged (the stall rule) and idle jobs expire.
const TICK: Duration = Duration::from_secs(1);

/// What the clients of a replica tell about the brokers: reachability, lag,
/// producer errors.
pub struct Link {
    up: AtomicBool,
    metrics: Metrics,
    /// The detector's topic: only its rebalances concern the detector.
    summaries: String,
    changes: Mutex<Vec<Change>>,
}

enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

impl Link {
    pub fn new(metrics: Metrics, summaries: &str) -> Arc<Self> {
        Arc::new(Self {
            up: AtomicBool::new(true),
            metrics,
            summaries: summaries.to_owned(),
            changes: Mutex::new(Vec::new()),
        })
    }

    /// The summaries-topic partitions of a rebalance (the other consumers
    /// of the service share this context).
    fn summaries_partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.summaries)
            .map(|e| e.partition())
            .collect()
    }

    pub fn metrics(&self) -> &Metrics {
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
                    self.0.metrics.kafka_lag(topic, *partition, p.consumer_lag);
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

/// The detector consumer's context: its rebalances move jobs, and a revoke
/// first drains the pipeline so the batches processed so far are written and
/// committed while the partitions are still this replica's.
pub struct DetectorCtx {
    ctx: Ctx,
    pipeline: Arc<Pipeline>,
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
            self.ctx.0.metrics.kafka_rebalances.inc();
            let partitions = self.ctx.0.summaries_partitions(tpl);
            self.ctx.0.changes.lock().unwrap().push(Change::Assigned(partitions));
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.0.metrics.kafka_producer_errors.inc();
            tracing::error!(%error, "kafka delivery failed");
        }
    }
}

/// The detector producer's context: every record carries the sequence number
/// of the batch that produced it, and its acknowledgement is counted there.
pub struct ProduceCtx {
    ctx: Ctx,
    /// Records produced and acknowledged (or failed) per batch.
    counts: Mutex<HashMap<usize, Count>>,
}

#[derive(Default, Clone, Copy)]
struct Count {
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
struct Batch {
    seq: usize,
    /// Next offset to commit, per partition.
    positions: HashMap<i32, i64>,
    /// Snapshots (a tombstone when `None`) taken when the batch closed, to
    /// produce once the batch's anomalies and advice are acknowledged.
    state: Vec<StateRecord>,
    /// The state records are produced; the commit waits for them.
    state_sent: bool,
}

struct StateRecord {
    job: JobId,
    partition: i32,
    bytes: Option<Vec<u8>>,
}

/// The detector's producer and its batches in flight, oldest first. Shared
/// by the detector thread and the consumer's rebalance callback (which runs
/// on that thread, inside a consumer poll).
struct Pipeline {
    producer: BaseProducer<ProduceCtx>,
    summaries: String,
    state: String,
    stop: Arc<AtomicBool>,
    /// When the detector was first seen stopping: the grace runs from there.
    stopping_since: OnceLock<Instant>,
    batches: Mutex<VecDeque<Batch>>,
}

impl Pipeline {
    /// Queues one record for `batch`, waiting while the producer's queue is full.
    fn send(&self, batch: usize, topic: &str, key: &str, partition: Option<i32>, payload: Option<&[u8]>) {
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
                    self.producer.context().ctx.0.metrics.kafka_producer_errors.inc();
                    tracing::error!(error = %e, topic, "kafka produce failed");
                    return;
                }
            }
        }
    }

    /// Whether a batch has produced anything.
    fn produced(&self, batch: usize) -> bool {
        self.producer.context().counts.lock().unwrap().contains_key(&batch)
    }

    fn in_flight(&self) -> usize {
        self.batches.lock().unwrap().len()
    }

    /// Queues a closed batch behind the others.
    fn push(&self, batch: Batch) {
        self.batches.lock().unwrap().push_back(batch);
    }

    /// Takes the acknowledgements that came in and moves the oldest batches
    /// on: once all a batch produced is acknowledged, its snapshots go out;
    /// once those are acknowledged too, its offsets are committed. Only the
    /// oldest batch moves, so commits keep the batches' order and a snapshot
    /// never goes out before the advice of an earlier batch.
    fn advance(&self, consumer: &BaseConsumer<DetectorCtx>, mode: CommitMode) {
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
    fn drain(&self, consumer: &BaseConsumer<DetectorCtx>, keep: usize, mode: CommitMode) -> bool {
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
    fn abandon(&self, why: &str) {
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

/// The running detector; stops (after committing what it processed) on drop.
pub struct Detector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Detector {
    /// Joins the detectors' group and starts processing on a thread of its own.
    pub fn start(config: &KafkaConfig, engine: Engine, link: Arc<Link>, ttl: Duration) -> anyhow::Result<Self> {
        // Deliveries wait for a broker that is away instead of failing: a
        // batch's offsets stay uncommitted until everything it produced is in.
        let producer: BaseProducer<ProduceCtx> = config
            .producer_config()
            .set("message.timeout.ms", "0")
            .create_with_context(ProduceCtx {
                ctx: Ctx(link.clone()),
                counts: Mutex::new(HashMap::new()),
            })
            .context("cannot create the detectors' Kafka producer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let pipeline = Arc::new(Pipeline {
            producer,
            summaries: config.topics.summaries.clone(),
            state: config.topics.state.clone(),
            stop: stop.clone(),
            stopping_since: OnceLock::new(),
            batches: Mutex::new(VecDeque::new()),
        });
        let mut c = config.consumer_config();
        c.set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000");
        let consumer: BaseConsumer<DetectorCtx> = c
            .create_with_context(DetectorCtx {
                ctx: Ctx(link.clone()),
                pipeline: pipeline.clone(),
            })
            .context("cannot create the detectors' Kafka consumer")?;
        consumer
            .subscribe(&[&config.topics.summaries])
            .context("cannot subscribe to the summaries topic")?;
        let mut worker = Worker {
            config: config.clone(),
            engine,
            pipeline,
            seq: 0,
            metrics: link.metrics.clone(),
            jobs: HashMap::new(),
            positions: HashMap::new(),
            touched: HashSet::new(),
            tombstones: Vec::new(),
            out: Output::default(),
            wire: proto::Summary::default(),
            scratch: Summary::default(),
            stop: stop.clone(),
            last_offset: HashMap::new(),
            tick_index: HashMap::new(),
            ttl,
            owned: HashSet::new(),
        };
        let thread = std::thread::Builder::new()
            .name("detector".into())
            .spawn(move || worker.run(&consumer))
            .context("cannot start the detector thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A job the detector owns now.
struct Owned {
    partition: i32,
    last_seen: Instant,
}

struct Worker {
    config: KafkaConfig,
    engine: Engine,
    pipeline: Arc<Pipeline>,
    /// Sequence number of the batch in progress.
    seq: usize,
    metrics: Metrics,
    jobs: HashMap<JobId, Owned>,
    /// Next offset to commit, per partition, for the batch in progress.
    positions: HashMap<i32, i64>,
    touched: HashSet<JobId>,
    /// Jobs that expired in the batch in progress, with their partitions.
    tombstones: Vec<(JobId, i32)>,
    out: Output,
    /// The last summary decoded, kept for its vectors' capacity.
    wire: proto::Summary,
    scratch: Summary,
    stop: Arc<AtomicBool>,
    /// Offset of the latest record seen per partition.
    last_offset: HashMap<i32, i64>,
    /// Ids handed out by ticks since a partition's latest record.
    tick_index: HashMap<i32, (i64, usize)>,
    /// A job silent this long is forgotten.
    ttl: Duration,
    /// Partitions of the summaries topic assigned to this replica.
    owned: HashSet<i32>,
}

impl Worker {
    fn run(&mut self, consumer: &BaseConsumer<DetectorCtx>) {
        let mut next_tick = Instant::now() + TICK;
        while !self.stop.load(Ordering::Relaxed) {
            let mut n = 0;
            // With batches in flight, come back soon to move them on.
            let mut wait = if self.pipeline.in_flight() > 0 {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(100)
            };
            while n < MAX_BATCH {
                let polled = consumer.poll(wait);
                self.apply_changes(consumer);
                match polled {
                    None => break,
                    Some(Ok(m)) => self.process(&m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "kafka consume");
                        break;
                    }
                }
                n += 1;
                wait = Duration::ZERO;
                if n % ADVANCE_EVERY == 0 {
                    self.pipeline.advance(consumer, CommitMode::Async);
                }
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
            }
            self.close_batch();
            // The commit is asynchronous while running (its order after the
            // broker's acknowledgements is what makes it safe); a lost
            // commit only means a redelivery.
            self.pipeline.drain(consumer, MAX_IN_FLIGHT - 1, CommitMode::Async);
        }
        // Leaving: the last commit must land before the group moves on.
        self.close_batch();
        if !self.pipeline.drain(consumer, 0, CommitMode::Sync) {
            self.pipeline.abandon("stopping before the brokers took them");
        }
        consumer.unsubscribe();
    }

    /// Ends the batch in progress: takes a snapshot of every job it touched
    /// (the state of its steps, not of the next batch's) and queues it with
    /// its offsets behind the batches in flight.
    fn close_batch(&mut self) {
        let mut state: Vec<StateRecord> = Vec::with_capacity(self.touched.len() + self.tombstones.len());
        for job in self.touched.drain() {
            let Some(owned) = self.jobs.get(&job) else { continue };
            if let Some(bytes) = self.engine.snapshot(&job) {
                state.push(StateRecord {
                    partition: owned.partition,
                    job,
                    bytes: Some(bytes),
                });
            }
        }
        state.extend(self.tombstones.drain(..).map(|(job, partition)| StateRecord {
            job,
            partition,
            bytes: None,
        }));
        if self.positions.is_empty() && state.is_empty() && !self.pipeline.produced(self.seq) {
            return; // nothing to wait for: the next batch keeps the number
        }
        self.pipeline.push(Batch {
            seq: self.seq,
            positions: std::mem::take(&mut self.positions),
            state,
            state_sent: false,
        });
        self.seq += 1;
    }

    /// Drops the jobs of revoked partitions; restores those of assigned ones.
    fn apply_changes(&mut self, consumer: &BaseConsumer<DetectorCtx>) {
        let changes = std::mem::take(&mut *consumer.context().ctx.0.changes.lock().unwrap());
        for change in changes {
            match change {
                Change::Revoked(partitions) => {
                    self.jobs.retain(|job, owned| {
                        let keep = !partitions.contains(&owned.partition);
                        if !keep {
                            self.engine.remove_job(job);
                        }
                        keep
                    });
                    for p in &partitions {
                        self.positions.remove(p);
                        self.last_offset.remove(p);
                        self.tick_index.remove(p);
                    }
                    self.owned.retain(|p| !partitions.contains(p));
                    self.metrics.kafka_partitions.set(self.owned.len() as i64);
                    tracing::info!(?partitions, "partitions revoked");
                }
                Change::Assigned(partitions) => {
                    self.owned.extend(&partitions);
                    self.metrics.kafka_partitions.set(self.owned.len() as i64);
                    let started = Instant::now();
                    match self.restore(&partitions) {
                        Ok(jobs) => tracing::info!(
                            ?partitions,
                            jobs,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "partitions assigned, job state restored"
                        ),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), ?partitions, "cannot restore job state"),
                    }
                }
            }
        }
    }

    /// Reads the state topic's partitions to their end and restores the
    /// latest snapshot of every job there (a tombstone forgets the job).
    fn restore(&mut self, partitions: &[i32]) -> anyhow::Result<usize> {
        let topic = &self.config.topics.state;
        // Read to each partition's end as the consumer sees it (end-of-
        // partition events), not to the high watermark: some brokers report
        // a watermark short of the last batch's records.
        let reader = self.config.reader(true)?;
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        reader.assign(&tpl)?;
        let mut pending: HashSet<i32> = partitions.iter().copied().collect();
        let mut latest: HashMap<String, (i32, Option<Vec<u8>>)> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            anyhow::ensure!(Instant::now() < deadline, "reading {topic} timed out");
            match reader.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
                Some(Ok(m)) => {
                    if let Some(job) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        latest.insert(job.to_owned(), (m.partition(), m.payload().map(<[u8]>::to_vec)));
                    }
                }
            }
        }
        let mut restored = 0;
        for (job, (partition, bytes)) in latest {
            let Some(bytes) = bytes else { continue };
            match self.engine.restore(&job, &bytes) {
                Ok(()) => {
                    restored += 1;
                    self.jobs.insert(
                        Arc::from(job.as_str()),
                        Owned {
                            partition,
                            last_seen: Instant::now(),
                        },
                    );
                }
                Err(e) => tracing::error!(error = %e, "job state skipped"),
            }
        }
        Ok(restored)
    }

    fn process(&mut self, m: &BorrowedMessage<'_>) {
        let (partition, offset) = (m.partition(), m.offset());
        self.positions.insert(partition, offset + 1);
        self.last_offset.insert(partition, offset);
        let Some(job) = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .filter(|j| !j.is_empty())
        else {
            return self.skip("job", "record key is not a job id", partition, offset);
        };
        let Some(rank) = rank_of(m) else {
            return self.skip("rank", "record has no numeric rank header", partition, offset);
        };
        let payload = m.payload().unwrap_or_default();
        let body = match wire::lone_summary(payload) {
            // Decoded into the previous summary's vectors (put back below):
            // the common record allocates nothing.
            Some(bytes) => {
                let mut s = std::mem::take(&mut self.wire);
                s.clear();
                if let Err(e) = s.merge(bytes) {
                    return self.skip("decode", &e.to_string(), partition, offset);
                }
                Some(worker_message::Body::Summary(s))
            }
            None => match proto::WorkerMessage::decode(payload) {
                Ok(msg) => msg.body,
                Err(e) => return self.skip("decode", &e.to_string(), partition, offset),
            },
        };
        let id: JobId = match self.jobs.get_key_value(job) {
            Some((id, _)) => id.clone(),
            None => Arc::from(job),
        };
        self.jobs.insert(
            id.clone(),
            Owned {
                partition,
                last_seen: Instant::now(),
            },
        );
        let result = match body {
            Some(worker_message::Body::Hello(h)) => {
                let profile = (!h.rule_profile.is_empty()).then_some(h.rule_profile.as_str());
                let spec = JobSpec {
                    layer_names: &h.layer_names,
                    world_size: Some(h.world_size),
                    profile,
                };
                self.engine.declare(job, &spec)
            }
            Some(worker_message::Body::Summary(s)) => {
                let converted = wire::summary_into(&s, rank, s.layer_l2.len(), &mut self.scratch);
                self.wire = s;
                if let Err(e) = converted {
                    return self.skip("layers", &e.to_string(), partition, offset);
                }
                self.observe(job)
            }
            Some(worker_message::Body::Batch(batch)) => {
                // Each as if it had come in a record of its own, in order; the
                // record's ids number the output of all of them.
                let mut accepted = false;
                for s in &batch.summaries {
                    if let Err(e) = wire::summary_into(s, rank, s.layer_l2.len(), &mut self.scratch) {
                        self.skip("layers", &format!("step {}: {e}", s.step), partition, offset);
                        continue;
                    }
                    match self.observe(job) {
                        Ok(()) => accepted = true,
                        Err(e) => self.refused(job, rank, offset, &e),
                    }
                }
                if !accepted {
                    return;
                }
                Ok(())
            }
            Some(worker_message::Body::Ack(ack)) => {
                // A rank that applied a rollback reports again from the
                // checkpoint: the engine rewinds it (it remembers the advice
                // in the job's state, so this works after a hand-over too).
                if ack.applied
                    && let Some(to_step) = self.engine.advice_applied(job, rank, ack.advice_id)
                {
                    tracing::info!(job, rank, to_step, "rank rolled back");
                }
                Ok(())
            }
            None => Ok(()),
        };
        if let Err(e) = result {
            return self.refused(job, rank, offset, &e);
        }
        self.touched.insert(id);
        self.emit(partition, offset);
    }

    /// Judges the summary in `scratch`; its output joins `out`.
    fn observe(&mut self, job: &str) -> Result<(), EngineError> {
        let observed = self.engine.observe(job, &self.scratch, &mut self.out);
        if observed.is_ok() {
            self.metrics.summary(self.scratch.layers.len());
        }
        observed
    }

    fn refused(&self, job: &str, rank: u32, offset: i64, e: &EngineError) {
        match e {
            EngineError::DuplicateStep { .. } | EngineError::StepBackwards { .. } => {
                // Processed before this record was redelivered: its effects are out.
                self.metrics.kafka_redelivered.inc();
            }
            e => {
                self.metrics.rejected(e.reason());
                tracing::debug!(job, rank, offset, error = %e, "summary refused");
            }
        }
    }

    fn skip(&self, reason: &'static str, why: &str, partition: i32, offset: i64) {
        self.metrics.rejected(reason);
        tracing::warn!(partition, offset, reason = why, "summaries record skipped");
    }

    /// Judges silent ranks, and forgets jobs idle past the TTL (leaving a
    /// tombstone in the state topic so no later owner restores them).
    fn tick(&mut self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.out.clear();
        self.engine.tick(now, &mut self.out);
        let findings = std::mem::take(&mut self.out.findings);
        let advice = std::mem::take(&mut self.out.advice);
        for f in &findings {
            if let Some(id) = self.tick_id(&f.job) {
                self.send_anomaly(f, id);
            }
        }
        for a in advice {
            if let Some(id) = self.tick_id(&a.job) {
                self.send_advice(a, id);
            }
        }
        let ttl = self.ttl;
        let expired: Vec<(JobId, i32)> = self
            .jobs
            .iter()
            .filter(|(_, o)| o.last_seen.elapsed() >= ttl)
            .map(|(j, o)| (j.clone(), o.partition))
            .collect();
        for (job, partition) in expired {
            self.engine.remove_job(&job);
            self.jobs.remove(&job);
            self.touched.remove(&job);
            // Written with the batch's snapshots, after those of earlier batches.
            tracing::info!(job = &*job, "job expired");
            self.tombstones.push((job, partition));
        }
    }

    /// The id of the next anomaly or advice a tick raised for a job.
    fn tick_id(&mut self, job: &JobId) -> Option<u64> {
        let p = self.jobs.get(job)?.partition;
        self.touched.insert(job.clone());
        let last = self.last_offset.get(&p).copied().unwrap_or(-1);
        let entry = self.tick_index.entry(p).or_insert((last, 0));
        if entry.0 != last {
            *entry = (last, 0);
        }
        let index = entry.1;
        entry.1 += 1;
        (index < RECORD_INDEX_LIMIT).then(|| record_id(p, last, true, index))
    }

    /// Moves a summary's output into producer records, each with its record id.
    fn emit(&mut self, partition: i32, offset: i64) {
        let findings = std::mem::take(&mut self.out.findings);
        let advice = std::mem::take(&mut self.out.advice);
        let mut ids = (0..RECORD_INDEX_LIMIT).map(|i| record_id(partition, offset, false, i));
        for f in &findings {
            let Some(id) = ids.next() else { break };
            self.send_anomaly(f, id);
        }
        for a in advice {
            let Some(id) = ids.next() else { break };
            self.send_advice(a, id);
        }
        self.out.findings = findings;
        self.out.clear();
    }

    fn send_anomaly(&self, f: &Finding, id: u64) {
        let mut a = wire::finding_to_proto(f);
        a.id = id;
        self.metrics.anomaly(&f.job, f.rule, f.severity);
        self.pipeline.send(
            self.seq,
            &self.config.topics.anomalies,
            &f.job,
            None,
            Some(&a.encode_to_vec()),
        );
    }

    fn send_advice(&mut self, mut advice: Advice, id: u64) {
        advice.id = id;
        if let Action::Rollback { to_step } = advice.action {
            self.engine.note_rollback(&advice.job, id, to_step);
        }
        self.metrics.advice(&advice.job, &advice.action);
        let msg = proto::ServerMessage {
            body: Some(proto::server_message::Body::Advice(wire::advice_to_proto(&advice))),
        };
        self.pipeline.send(
            self.seq,
            &self.config.topics.advice,
            &advice.job,
            None,
            Some(&msg.encode_to_vec()),
        );
    }
}
