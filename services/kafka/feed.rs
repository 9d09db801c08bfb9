//! Every replica's store reads the whole cluster's findings, so any replica
//! answers queries about any job: the anomalies and advice topics as they
//! are, and the state topic as job rows (ranks, last step, health).
//!
//! A consumer group of its own per replica (`GROUP-store-REPLICA`), offsets
//! stored only after the store committed what they carried: at-least-once,
//! and harmless twice, since anomalies and advice keep their cluster ids.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gradguard::config::RuleBook;
use gradguard::engine::Engine;
use gradguard::proto;
use gradguard::store::JobRow;
use gradguard::wire;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};

use super::KafkaConfig;
use super::detector::{Ctx, Link};
use crate::serve::recorder::{Record, Recorder};

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
    let mut c = config.consumer_config();
    c.set("group.id", format!("{}-store-{replica}", config.group))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer<Ctx> = c
        .create_with_context(Ctx(link.clone()))
        .context("cannot create the store feed's Kafka consumer")?;
    let t = &config.topics;
    consumer
        .subscribe(&[&t.anomalies, &t.advice, &t.state])
        .context("cannot subscribe the store feed")?;
    let mut feed = Feed {
        topics: t.clone(),
        scratch: Engine::new(book.clone()),
        link,
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
            recorder.record(record, feed.link.metrics());
            recorder.flush(feed.link.metrics()).await;
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
    link: Arc<Link>,
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
            self.job_row(m, time).map(|row| record.jobs.extend(row))
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::warn!(topic, partition = m.partition(), offset = m.offset(), error = %e, "record skipped by the store feed");
        }
    }

    /// A job's row from its snapshot; `None` for a tombstone.
    fn job_row(&mut self, m: &BorrowedMessage<'_>, time: f64) -> Result<Option<JobRow>, String> {
        let job = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or("the record key is not a job id")?;
        let Some(bytes) = m.payload() else { return Ok(None) };
        self.scratch.restore(job, bytes).map_err(|e| e.to_string())?;
        let status = self.scratch.status(job).ok_or("restored job is missing")?;
        let row = JobRow {
            job: job.to_owned(),
            first_seen: time,
            last_seen: time,
            ranks: status.ranks as u32,
            world_size: status.world_size,
            layers: status.layers as u32,
            last_step: status.max_step,
            health: self.scratch.health(job),
        };
        self.scratch.remove_job(job);
        Ok(Some(row))
    }
}
