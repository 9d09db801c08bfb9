//! Every replica's store reads the whole cluster's findings, so any replica
//! answers queries about any job: the anomalies and advice topics as they
//! are, and the state topic as job rows (ranks, last step, health).
//!
//! A consumer group of its own per replica (`GROUP-store-REPLICA`), offsets
//! stored only after the store committed what they carried: at-least-once,
//! and harmless twice, since anomalies and advice keep their cluster ids.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RuleBook;
use crate::engine::Engine;
use crate::proto;
use crate::store::JobRow;
use crate::wire;
use anyhow::Context as _;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};

use super::link::{Ctx, Link};
use super::{Client, KafkaConfig};
use crate::recorder::{Record, Recorder};

/// Records written to the store per commit, at most.
const MAX_BATCH: usize = 1000;

/// Starts feeding this replica's store.
pub fn start_feed(
    config: &KafkaConfig,
    book: &RuleBook,
    link: Arc<Link>,
    recorder: Recorder,
    replica: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: StreamConsumer<Ctx> = config
        .client_config(Client::StoreFeed { replica })
        .create_with_context(Ctx(link.clone()))
        .context("cannot create the store feed's Kafka consumer")?;
    let t = &config.topics;
    consumer
        .subscribe(&[&t.anomalies, &t.advice, &t.state])
        .context("cannot subscribe the store feed")?;
    let mut feed = Feed {
        topics: t.clone(),
        scratch: Engine::new(book.clone()),
        snapshots: HashMap::new(),
    };
    Ok(tokio::spawn(async move {
        loop {
            let mut record = Record::default();
            let mut taken = Vec::new();
            let first = consumer.recv().await;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Ok(m) => {
                        feed.take(&m, &mut record);
                        taken.push((m.topic().to_owned(), m.partition(), m.offset()));
                    }
                    Err(e) => tracing::warn!(error = %e, "store feed"),
                }
                if taken.len() < MAX_BATCH {
                    // Whatever else is already here joins the same commit.
                    next = tokio::time::timeout(Duration::ZERO, consumer.recv()).await.ok();
                }
            }
            feed.job_rows(&mut record);
            recorder.record(record);
            recorder.flush().await;
            for (topic, partition, offset) in taken {
                if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                    tracing::warn!(error = %e, "store feed offset");
                }
            }
        }
    }))
}

struct Feed {
    topics: super::Topics,
    /// Turns snapshots into job rows.
    scratch: Engine,
    /// The batch's snapshots: per job, the time of its first record, and the
    /// time and bytes of its latest (only that one is restored).
    snapshots: HashMap<String, (f64, f64, Vec<u8>)>,
}

impl Feed {
    fn take(&mut self, m: &BorrowedMessage<'_>, record: &mut Record) {
        let payload = m.payload().unwrap_or_default();
        let time = m.timestamp().to_millis().map_or(0.0, |ms| ms as f64 / 1000.0);
        let t = &self.topics;
        let topic = m.topic();
        let result = if topic == t.anomalies {
            proto::Anomaly::decode(payload)
                .map_err(|e| e.to_string())
                .and_then(|a| wire::anomaly_from_proto(&a))
                .map(|a| record.keyed.push(a))
        } else if topic == t.advice {
            match proto::ServerMessage::decode(payload) {
                Ok(proto::ServerMessage {
                    body: Some(proto::server_message::Body::Advice(a)),
                }) => wire::advice_from_proto(&a).map(|a| record.advice.push((a, time))),
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        } else if topic == t.state {
            self.snapshot(m, time)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::warn!(topic, partition = m.partition(), offset = m.offset(), error = %e, "record skipped by the store feed");
        }
    }

    /// Keeps a job's latest snapshot of the batch (a tombstone adds no row).
    fn snapshot(&mut self, m: &BorrowedMessage<'_>, time: f64) -> Result<(), String> {
        let job = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or("the record key is not a job id")?;
        let Some(bytes) = m.payload() else { return Ok(()) };
        let entry = self
            .snapshots
            .entry(job.to_owned())
            .or_insert_with(|| (time, time, Vec::new()));
        entry.1 = time;
        entry.2.clear();
        entry.2.extend_from_slice(bytes);
        Ok(())
    }

    /// The job rows of the batch's snapshots.
    fn job_rows(&mut self, record: &mut Record) {
        for (job, (first_seen, last_seen, bytes)) in self.snapshots.drain() {
            if let Err(e) = self.scratch.restore(&job, &bytes) {
                tracing::warn!(job, error = %e, "snapshot skipped by the store feed");
                continue;
            }
            let Some(status) = self.scratch.status(&job) else {
                continue;
            };
            record.jobs.push(JobRow {
                job: job.clone(),
                first_seen,
                last_seen,
                ranks: status.ranks as u32,
                world_size: status.world_size,
                layers: status.layers as u32,
                last_step: status.max_step,
                health: self.scratch.health(&job),
            });
            self.scratch.remove_job(&job);
        }
    }
}
