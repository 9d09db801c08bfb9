//! The store writer: one thread that commits what the service decided and
//! only then lets the advice leave (each record's `then`).
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

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::broadcast;

use crate::clock::unix_now;
use crate::model::{Advice, Finding};
use crate::store::{Ack, Batch, JobRow, Retention, Store, StoredAnomaly};
use crate::{proto, wire};

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
    /// Called once the record is durable (or could not be made so): the
    /// advice in it leaves then.
    pub then: Option<Box<dyn FnOnce() + Send>>,
    /// Told once everything queued up to this record is durable.
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The store writer's series.
#[derive(Clone)]
pub struct StoreMetrics {
    commit: Histogram,
    errors: IntCounter,
    bytes: IntGauge,
}

/// Buckets of the commit time, in seconds: 50 µs to 1 s.
const COMMIT_BUCKETS: [f64; 14] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
];

impl StoreMetrics {
    pub fn register(r: &Registry) -> Self {
        let m = Self {
            commit: Histogram::with_opts(
                HistogramOpts::new(
                    "gradguard_store_commit_seconds",
                    "Time to commit one group of records to the store (advice waits for it).",
                )
                .buckets(COMMIT_BUCKETS.to_vec()),
            )
            .unwrap(),
            errors: IntCounter::new(
                "gradguard_store_errors_total",
                "Store writes that failed (the advice in them was still delivered).",
            )
            .unwrap(),
            bytes: IntGauge::new(
                "gradguard_store_bytes",
                "Bytes of the store in use, measured at each retention pass.",
            )
            .unwrap(),
        };
        // Only a duplicate or malformed name fails, fixed here.
        for c in [
            Box::new(m.commit.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.errors.clone()),
            Box::new(m.bytes.clone()),
        ] {
            r.register(c).expect("store metrics registered once");
        }
        m
    }
}

/// Where stored anomalies are announced (`WatchAnomalies`).
pub type Watchers = broadcast::Sender<Arc<proto::Anomaly>>;

/// The handle on the writer thread.
#[derive(Clone)]
pub struct Recorder {
    tx: Sender<Record>,
}

impl Recorder {
    /// Starts the writer thread over an opened store.
    pub fn start(store: Store, retention: Retention, metrics: StoreMetrics, watchers: Watchers) -> Self {
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
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.record(Record {
            done: Some(tx),
            ..Record::default()
        });
        let _ = rx.await;
    }

    /// Queues a record. If the writer is gone (it never exits while the
    /// service runs), the advice is delivered right away.
    pub fn record(&self, record: Record) {
        if let Err(mpsc::SendError(record)) = self.tx.send(record)
            && let Some(then) = record.then
        {
            then();
        }
    }
}

fn run(mut store: Store, retention: Retention, metrics: StoreMetrics, watchers: Watchers, rx: Receiver<Record>) {
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
                    metrics.commit.observe(started.elapsed().as_secs_f64());
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
                    metrics.errors.inc();
                    tracing::error!(error = %e, rows = batch.anomalies.len() + batch.advice.len(), "store write failed");
                }
            }
        }
        for r in group.drain(..) {
            if let Some(then) = r.then {
                then();
            }
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
                metrics.bytes.set(bytes as i64);
            }
        }
    }
}
