//! The store writer: one thread that commits what the hub decided and only
//! then hands the advice to the worker streams.
//!
//! Group commit: the thread takes everything queued since its last commit and
//! writes it in one transaction (one fsync), so a burst of anomalies costs one
//! disk flush, not one each. Advice leaves the service after the commit that
//! holds it; if the store fails (a full disk), the advice is still delivered
//! (a training run matters more than its record), the error is logged and
//! counted in `gradguard_store_errors_total`.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use gradguard::model::{Advice, Finding};
use gradguard::proto;
use gradguard::store::{Ack, Batch, JobRow, Retention, Store, StoredAnomaly};
use gradguard::wire;
use tokio::sync::broadcast;

use super::hub::{Delivery, deliver, unix_now};
use super::metrics::Metrics;

/// Most records merged into one transaction.
const MAX_GROUP: usize = 4096;
/// How often the WAL is copied into the database, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What one engine call (or one ack, or one job update) leaves to record.
#[derive(Default)]
pub struct Record {
    pub jobs: Vec<JobRow>,
    pub anomalies: Vec<Finding>,
    /// Anomalies with their cluster-wide ids (cluster mode's store feed).
    pub keyed: Vec<StoredAnomaly>,
    pub advice: Vec<(Advice, f64)>,
    pub acks: Vec<Ack>,
    /// Sent once the record is durable.
    pub deliveries: Vec<Delivery>,
    /// When the summary behind it arrived (advice latency).
    pub received: Option<Instant>,
    /// Told once everything queued up to this record is durable.
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Where stored anomalies are announced (`WatchAnomalies`).
pub type Watchers = broadcast::Sender<Arc<proto::Anomaly>>;

/// The hub's handle on the writer thread.
#[derive(Clone)]
pub struct Recorder {
    tx: Sender<Record>,
}

impl Recorder {
    /// Starts the writer thread over an opened store.
    pub fn start(store: Store, retention: Retention, metrics: Metrics, watchers: Watchers) -> Self {
        let (tx, rx) = mpsc::channel();
        match store.checkpointer() {
            Ok(checkpointer) => {
                std::thread::Builder::new()
                    .name("gradguard-checkpoint".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(CHECKPOINT_EVERY);
                            if let Err(e) = checkpointer.run() {
                                tracing::warn!(error = %e, "store checkpoint failed");
                            }
                        }
                    })
                    .expect("spawn the store checkpoint thread");
            }
            Err(e) => tracing::warn!(error = %e, "no background checkpoints; commits will checkpoint"),
        }
        std::thread::Builder::new()
            .name("gradguard-store".into())
            .spawn(move || run(store, retention, metrics, watchers, rx))
            .expect("spawn the store writer thread");
        Self { tx }
    }

    /// Resolves once everything recorded before the call is durable.
    pub async fn flush(&self, metrics: &Metrics) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.record(
            Record {
                done: Some(tx),
                ..Record::default()
            },
            metrics,
        );
        let _ = rx.await;
    }

    /// Queues a record. If the writer is gone (it never exits while the
    /// service runs), the advice is delivered right away.
    pub fn record(&self, record: Record, metrics: &Metrics) {
        if let Err(mpsc::SendError(record)) = self.tx.send(record) {
            deliver(metrics, &record.deliveries, record.received);
        }
    }
}

fn run(mut store: Store, retention: Retention, metrics: Metrics, watchers: Watchers, rx: Receiver<Record>) {
    let mut batch = Batch::default();
    let mut group: Vec<Record> = Vec::new();
    let mut last_prune = Instant::now();
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        batch.clear();
        for r in &mut group {
            batch.jobs.append(&mut r.jobs);
            batch.anomalies.append(&mut r.anomalies);
            batch.keyed.append(&mut r.keyed);
            batch.advice.append(&mut r.advice);
            batch.acks.append(&mut r.acks);
        }
        // Records with nothing to store (flushes, progress) need no commit.
        if !batch.is_empty() {
            let started = Instant::now();
            match store.write(&batch) {
                Ok(ids) => {
                    metrics.store_commit.observe(started.elapsed().as_secs_f64());
                    if watchers.receiver_count() > 0 {
                        let (local, keyed) = ids.split_at(batch.anomalies.len());
                        for (f, &id) in batch.anomalies.iter().zip(local) {
                            let _ = watchers.send(Arc::new(proto::Anomaly {
                                id,
                                ..wire::finding_to_proto(f)
                            }));
                        }
                        // Only the new ones: a redelivered anomaly was announced.
                        for a in batch.keyed.iter().filter(|a| keyed.contains(&a.id)) {
                            let _ = watchers.send(Arc::new(wire::stored_anomaly_to_proto(a)));
                        }
                    }
                }
                Err(e) => {
                    metrics.store_errors.inc();
                    tracing::error!(error = %e, rows = batch.anomalies.len() + batch.advice.len(), "store write failed");
                }
            }
        }
        for r in group.drain(..) {
            deliver(&metrics, &r.deliveries, r.received);
            if let Some(done) = r.done {
                let _ = done.send(());
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match store.prune(&retention, unix_now()) {
                Ok(p) if p.anomalies + p.advice > 0 => {
                    tracing::info!(anomalies = p.anomalies, advice = p.advice, "retention pruned the store");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
            if let Ok(bytes) = store.used_bytes() {
                metrics.store_bytes.set(bytes as i64);
            }
        }
    }
}
