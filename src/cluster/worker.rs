//! The worker side of cluster mode, with no gRPC at all: a job's ranks
//! produce to the summaries topic and read their advice from the advice topic.
//! `gradguard simulate --kafka-brokers` plays a job through it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{self, worker_message};
use anyhow::{Context, anyhow, bail};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::{Client, KafkaConfig, worker_record};

/// One job's connection to the cluster.
pub struct KafkaWorker {
    config: KafkaConfig,
    job: String,
    producer: FutureProducer,
    /// Deliveries not yet confirmed.
    pending: Mutex<Vec<DeliveryFuture>>,
    /// The highest offset each partition confirmed for this job's records.
    produced: Arc<Mutex<HashMap<i32, i64>>>,
    /// Where the advice reader must get to before it reports [`FromCluster::Drained`].
    drain: watch::Sender<Option<HashMap<i32, i64>>>,
}

/// What the advice reader forwards.
#[derive(Debug)]
pub enum FromCluster {
    Advice(proto::Advice),
    /// Every advice caused by the records settled so far was forwarded.
    Drained,
}

impl KafkaWorker {
    /// Connects, and starts reading the advice topic from its current end:
    /// every advice for `job` decided from now on comes out of the receiver.
    pub async fn open(config: &KafkaConfig, job: &str) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<FromCluster>)> {
        let producer: FutureProducer = config
            .client_config(Client::WorkerProducer)
            .create()
            .context("cannot create a Kafka producer")?;
        let (drain, drain_rx) = watch::channel(None);
        let advice = advice_reader(config, job, drain_rx).await?;
        let worker = Self {
            config: config.clone(),
            job: job.to_owned(),
            producer,
            pending: Mutex::new(Vec::new()),
            produced: Arc::new(Mutex::new(HashMap::new())),
            drain,
        };
        Ok((worker, advice))
    }

    /// Queues one message of a rank; [`KafkaWorker::settle`] waits for it.
    pub fn send(&self, rank: u32, body: worker_message::Body) -> anyhow::Result<()> {
        let (payload, headers) = worker_record(rank, body);
        let record = FutureRecord::to(&self.config.topics.summaries)
            .key(&self.job)
            .payload(&payload)
            .headers(headers);
        let future = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| anyhow!("cannot queue a record for {}: {e}", self.config.topics.summaries))?;
        self.pending.lock().unwrap().push(future);
        Ok(())
    }

    /// Waits until the broker has every record sent so far, then until the
    /// detectors have committed past them: by then every advice they caused
    /// is in the advice topic, and the advice reader reports
    /// [`FromCluster::Drained`] once it has read that far.
    pub async fn settle(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for future in pending {
            let delivered = tokio::time::timeout_at(deadline.into(), future)
                .await
                .context("the Kafka brokers did not confirm the records in time")?;
            match delivered {
                Ok(Ok(d)) => {
                    let mut produced = self.produced.lock().unwrap();
                    let last = produced.entry(d.partition).or_insert(d.offset);
                    *last = (*last).max(d.offset);
                }
                Ok(Err((e, _))) => bail!("a record was not delivered: {e}"),
                Err(_) => bail!("the producer went away"),
            }
        }
        let produced = self.produced.lock().unwrap().clone();
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || wait_committed(&config, &produced, deadline))
            .await
            .context("the commit watcher failed")??;
        let config = self.config.clone();
        let ends = tokio::task::spawn_blocking(move || end_offsets(&config, &config.topics.advice))
            .await
            .context("the watermark reader failed")??;
        let _ = self.drain.send(Some(ends));
        Ok(())
    }
}

/// Polls the detectors' committed offsets until they pass `produced`.
fn wait_committed(config: &KafkaConfig, produced: &HashMap<i32, i64>, deadline: Instant) -> anyhow::Result<()> {
    let watcher: BaseConsumer = config
        .client_config(Client::WorkerCommits)
        .create()
        .context("cannot create a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for &p in produced.keys() {
        tpl.add_partition(&config.topics.summaries, p);
    }
    loop {
        let committed = watcher.committed_offsets(tpl.clone(), Duration::from_secs(5))?;
        let done = produced.iter().all(|(&p, &last)| {
            matches!(committed.find_partition(&config.topics.summaries, p).map(|e| e.offset()),
                Some(Offset::Offset(o)) if o > last)
        });
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the detectors (group {}) did not process this job's records in time: is a `gradguard serve --kafka-brokers` running?",
                config.group
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The end offset (high watermark) of every partition of a topic.
pub fn end_offsets(config: &KafkaConfig, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let reader = config.reader(false)?;
    let n = config.partition_count(topic)?;
    let mut ends = HashMap::new();
    for p in 0..n as i32 {
        let (_, high) = reader
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{p}"))?;
        ends.insert(p, high);
    }
    Ok(ends)
}

/// Reads every partition of the advice topic from its current end on, and
/// forwards the advice for `job`. The positions are fixed before this
/// returns, so nothing decided afterwards is missed.
async fn advice_reader(
    config: &KafkaConfig,
    job: &str,
    mut drain: watch::Receiver<Option<HashMap<i32, i64>>>,
) -> anyhow::Result<mpsc::UnboundedReceiver<FromCluster>> {
    let topic = config.topics.advice.clone();
    let cfg = config.clone();
    let t = topic.clone();
    let ends = tokio::task::spawn_blocking(move || end_offsets(&cfg, &t))
        .await
        .context("the watermark reader failed")??;
    let consumer: StreamConsumer = config
        .client_config(Client::WorkerAdvice)
        .create()
        .context("cannot create a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for (&p, &end) in &ends {
        tpl.add_partition_offset(&topic, p, Offset::Offset(end))?;
    }
    consumer.assign(&tpl)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = job.to_owned();
    let mut positions = ends;
    // Partitions read to their end (an end-of-partition event since their
    // last record). Drained means: past the watermark taken at settle time,
    // and at the end. The watermark alone is not enough: some brokers report
    // one short of the last batch's records.
    let mut at_end: HashSet<i32> = HashSet::new();
    tokio::spawn(async move {
        loop {
            let drained = drain.borrow().as_ref().is_some_and(|target| {
                target
                    .iter()
                    .all(|(p, end)| positions.get(p).is_some_and(|at| at >= end) && at_end.contains(p))
            });
            if drained {
                let _ = tx.send(FromCluster::Drained);
                return;
            }
            let m = tokio::select! {
                m = consumer.recv() => m,
                changed = drain.changed() => {
                    if changed.is_err() {
                        return; // the worker is gone
                    }
                    continue;
                }
            };
            let m = match m {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "advice topic");
                    continue;
                }
            };
            at_end.remove(&m.partition());
            positions.insert(m.partition(), m.offset() + 1);
            if m.key() != Some(job.as_bytes()) {
                continue;
            }
            let Ok(msg) = proto::ServerMessage::decode(m.payload().unwrap_or_default()) else {
                continue;
            };
            if let Some(proto::server_message::Body::Advice(a)) = msg.body
                && tx.send(FromCluster::Advice(a)).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}
