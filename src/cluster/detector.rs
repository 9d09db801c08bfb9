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
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::BaseProducer;
use rdkafka::{Offset, TopicPartitionList};

use super::link::{Change, Ctx, Link};
use super::pipeline::{Batch, DetectorCtx, Pipeline, ProduceCtx, StateRecord};
use super::{Client, ClusterMetrics, KafkaConfig, RECORD_INDEX_LIMIT, SummariesRecord, record_id, summaries_record};
use crate::clock::unix_now;
use crate::engine::Output;
use crate::intake::{Decoder, Judge, Parts, Reason, Refusal};
use crate::model::{Advice, Finding, JobId, Summary};
use crate::proto;
use crate::wire;

/// Records processed before a batch is closed (snapshots taken) and queued
/// for its acknowledgements and commit.
const MAX_BATCH: usize = 2000;
/// Closed batches waiting for their acknowledgements while the next one is
/// processed; a detector that has this many waits for the oldest.
const MAX_IN_FLIGHT: usize = 3;
/// Records processed between two looks at the producer's acknowledgements.
const ADVANCE_EVERY: usize = 128;
/// How often silent ranks are judged (the stall rule) and idle jobs expire.
const TICK: Duration = Duration::from_secs(1);

/// The running detector; stops (after committing what it processed) on drop.
pub struct Detector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Detector {
    /// Joins the detectors' group and starts processing on a thread of its own.
    pub fn start(config: &KafkaConfig, judge: Judge, link: Arc<Link>) -> anyhow::Result<Self> {
        // Deliveries wait for a broker that is away instead of failing: a
        // batch's offsets stay uncommitted until everything it produced is in.
        let producer: BaseProducer<ProduceCtx> = config
            .client_config(Client::DetectorProducer)
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
        let consumer: BaseConsumer<DetectorCtx> = config
            .client_config(Client::DetectorConsumer)
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
            ttl: judge.limits().job_ttl,
            judge,
            decoder: Decoder::default(),
            pipeline,
            seq: 0,
            metrics: link.metrics.clone(),
            jobs: HashMap::new(),
            positions: HashMap::new(),
            touched: HashSet::new(),
            tombstones: Vec::new(),
            out: Output::default(),
            scratch: Summary::default(),
            stop: stop.clone(),
            last_offset: HashMap::new(),
            tick_index: HashMap::new(),
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
    /// The intake, with the engine of the jobs this replica owns.
    judge: Judge,
    decoder: Decoder,
    pipeline: Arc<Pipeline>,
    /// Sequence number of the batch in progress.
    seq: usize,
    metrics: ClusterMetrics,
    jobs: HashMap<JobId, Owned>,
    /// Next offset to commit, per partition, for the batch in progress.
    positions: HashMap<i32, i64>,
    touched: HashSet<JobId>,
    /// Jobs that expired in the batch in progress, with their partitions.
    tombstones: Vec<(JobId, i32)>,
    out: Output,
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
            if let Some(bytes) = self.judge.engine().snapshot(&job) {
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
                            self.judge.forget(job);
                        }
                        keep
                    });
                    for p in &partitions {
                        self.positions.remove(p);
                        self.last_offset.remove(p);
                        self.tick_index.remove(p);
                    }
                    self.owned.retain(|p| !partitions.contains(p));
                    self.metrics.partitions.set(self.owned.len() as i64);
                    tracing::info!(?partitions, "partitions revoked");
                }
                Change::Assigned(partitions) => {
                    self.owned.extend(&partitions);
                    self.metrics.partitions.set(self.owned.len() as i64);
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
            match self.judge.engine_mut().restore(&job, &bytes) {
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

    /// One summaries-topic record: its key names the job, its header the
    /// rank, its payload is a worker message as on a gRPC stream, taken
    /// apart and checked by the same intake. A refused part is counted and
    /// skipped (the parts before it stay accepted): a record cannot be sent
    /// back.
    fn process(&mut self, m: &BorrowedMessage<'_>) {
        let (partition, offset) = (m.partition(), m.offset());
        self.positions.insert(partition, offset + 1);
        self.last_offset.insert(partition, offset);
        let SummariesRecord { job, rank, payload } = match summaries_record(m.key(), m.headers(), m.payload()) {
            Ok(record) => record,
            Err((job, refusal)) => return self.refused(job, &refusal, partition, offset),
        };
        let id: JobId = match self.jobs.get_key_value(job) {
            Some((id, _)) => id.clone(),
            None => JobId::from(job),
        };
        let mut record = Record {
            judge: &mut self.judge,
            job: &id,
            rank,
            now: unix_now(),
            scratch: &mut self.scratch,
            out: &mut self.out,
            accepted: false,
        };
        let result = self.decoder.decode(payload, &mut record);
        let accepted = record.accepted;
        if let Err(refusal) = result {
            self.refused(Some(job), &refusal, partition, offset);
        }
        if accepted {
            self.jobs.insert(
                id.clone(),
                Owned {
                    partition,
                    last_seen: Instant::now(),
                },
            );
            self.touched.insert(id);
        }
        self.emit(partition, offset);
    }

    fn refused(&self, job: Option<&str>, refusal: &Refusal, partition: i32, offset: i64) {
        self.judge.metrics().refused(refusal);
        if matches!(refusal.reason, Reason::DuplicateStep | Reason::StepBackwards) {
            // Most likely processed before this record was redelivered.
            self.metrics.redelivered.inc();
            tracing::debug!(job, partition, offset, reason = %refusal, "summaries record refused");
        } else {
            tracing::warn!(job, partition, offset, reason = %refusal, "summaries record refused");
        }
    }

    /// Judges silent ranks, and forgets jobs idle past the TTL (leaving a
    /// tombstone in the state topic so no later owner restores them).
    fn tick(&mut self) {
        self.out.clear();
        self.judge.tick(unix_now(), &mut self.out);
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
            self.judge.forget(&job);
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
        self.judge.found(f);
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
        self.judge.advised(&advice);
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

/// One record's parts, handed to the intake as the record's rank of its job.
struct Record<'a> {
    judge: &'a mut Judge,
    job: &'a JobId,
    rank: u32,
    now: f64,
    scratch: &'a mut Summary,
    out: &'a mut Output,
    /// Some part was accepted: the job is this replica's, its state changed.
    accepted: bool,
}

impl Parts for Record<'_> {
    fn hello(&mut self, hello: proto::Hello) -> Result<(), Refusal> {
        if hello.job != **self.job || hello.rank != self.rank {
            return Err(Refusal::new(
                Reason::InvalidHello,
                format!(
                    "field hello: job {} rank {} in a record keyed {} with rank header {}",
                    crate::wire::excerpt(&hello.job),
                    hello.rank,
                    crate::wire::excerpt(self.job),
                    self.rank
                ),
            ));
        }
        let declared = self.judge.limits().check_hello(hello)?;
        self.judge.declare(&declared)?;
        self.accepted = true;
        Ok(())
    }

    fn batch(&mut self, len: usize) -> Result<(), Refusal> {
        self.judge.limits().check_batch(len)
    }

    fn summary(&mut self, summary: &proto::Summary) -> Result<(), Refusal> {
        self.judge
            .summary(self.job, self.rank, summary, self.now, self.scratch, self.out)?;
        self.accepted = true;
        Ok(())
    }

    fn ack(&mut self, ack: proto::AdviceAck) -> Result<(), Refusal> {
        if !self.judge.engine().has_job(self.job) {
            return Err(crate::intake::no_hello("ack"));
        }
        // A rank that applied a rollback reports again from the checkpoint:
        // the engine rewinds it (it remembers the advice in the job's state,
        // so this works after a hand-over too).
        self.judge.ack(self.job, self.rank, &ack);
        self.accepted = true;
        Ok(())
    }
}
