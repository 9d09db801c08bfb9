//! The hub: one engine for every job, the worker streams attached to each job,
//! and the routing of advice back to them.
//!
//! Every rank of a job has its own gRPC stream, but cross-rank rules need all
//! ranks of the job in one place, so the engine sits behind one mutex. Holding
//! it costs a few microseconds per summary (the engine does 50 M layer-stats/s
//! on one core), far below what the transport costs, and it makes the order of
//! a job's advice the same on every stream. Nothing under the lock awaits:
//! advice is handed to each stream's bounded send queue with `try_send`, so a
//! slow reader loses advice (counted in `gradguard_advice_dropped_total`)
//! instead of stalling everyone else.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gradguard::engine::{Engine, EngineError, JobSpec, MAX_LAYERS, MAX_RANKS, Output};
use gradguard::model::{Action, JobId, Severity, Summary};
use gradguard::proto::{self, server_message, worker_message};
use gradguard::store::{Ack, JobRow};
use gradguard::wire;
use tokio::sync::mpsc;
use tonic::Status;

use super::metrics::{JobGauges, Metrics};
use super::recorder::{Record, Recorder};
use crate::kafka::relay::Forwarder;

/// Where a stream's server messages go.
pub type Outbox = mpsc::Sender<Result<proto::ServerMessage, Status>>;

/// Longest accepted job id, in bytes (it becomes a metrics label).
pub const MAX_JOB_LEN: usize = 256;

/// A worker's time is used when it is this close to the service's clock;
/// otherwise (a skewed clock, or no time at all) the receive time is.
const MAX_CLOCK_SKEW_SECS: f64 = 60.0;

/// Limits on what the hub tracks.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Jobs tracked at once; a Hello for one more is refused.
    pub max_jobs: usize,
    /// A job with no summary, Hello or disconnect for this long is forgotten,
    /// with its metrics series.
    pub job_ttl: Duration,
}

/// A refused message: the status for the worker, the reason for metrics.
#[derive(Debug)]
pub struct Rejection {
    pub reason: &'static str,
    pub status: Status,
}

impl Rejection {
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            status: Status::invalid_argument(message),
        }
    }

    /// The same refusal of the `index`-th summary of a batch, its message
    /// prefixed with that place (and the summary's step, once decoded).
    pub fn in_batch(self, index: usize, step: Option<u64>) -> Self {
        let step = step.map_or_else(String::new, |s| format!(" (step {s})"));
        Self::invalid(
            self.reason,
            format!("batch.summaries[{index}]{step}: {}", self.status.message()),
        )
    }

    fn engine(e: &EngineError) -> Self {
        let field = match e {
            EngineError::EmptyJob => "job",
            EngineError::RankOutOfRange { .. } => "rank",
            EngineError::DuplicateStep { .. } | EngineError::StepBackwards { .. } => "step",
            EngineError::LayerCount { .. } => "layer_l2",
            EngineError::TooManyLayers { .. } | EngineError::LayerNames { .. } => "layer_names",
            EngineError::Config(_) => "rule_profile",
            EngineError::Snapshot { .. } => "snapshot",
        };
        Self::invalid(e.reason(), format!("field {field}: {e}"))
    }
}

/// What a stream is, once its Hello was accepted.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub stream: u64,
    pub job: JobId,
    pub rank: u32,
    layer_names: Arc<[String]>,
    world_size: Option<u32>,
    profile: Option<String>,
    /// Each summary is answered with a Progress once its advice is sent.
    progress: bool,
}

impl Attachment {
    /// What ends a stream that a newer one of the same job and rank replaced.
    fn replaced(&self) -> Status {
        Status::aborted(format!(
            "replaced by a newer stream of job {:?} rank {}",
            &*self.job, self.rank
        ))
    }

    fn spec(&self) -> JobSpec<'_> {
        JobSpec {
            layer_names: &self.layer_names,
            world_size: self.world_size,
            profile: self.profile.as_deref(),
        }
    }
}

pub struct Hub {
    core: Mutex<Core>,
    pub metrics: Metrics,
    limits: Limits,
    next_stream: AtomicU64,
    /// The store writer; `None` runs without a store (advice goes out at once).
    recorder: Option<Recorder>,
    /// Cluster mode: worker messages go to Kafka, where the job's owner
    /// processes them; advice comes back through [`Hub::deliver_advice`].
    forward: Option<Arc<Forwarder>>,
}

struct Core {
    engine: Engine,
    jobs: HashMap<JobId, Job>,
    /// Scratch output, reused across calls.
    out: Output,
}

struct Job {
    /// The open stream of each rank.
    streams: HashMap<u32, Stream>,
    last_active: Instant,
    gauges: JobGauges,
    /// When the service first saw it (since this start), seconds since the epoch.
    first_seen: f64,
    last_seen: f64,
    /// Changed since its row was last recorded.
    dirty: bool,
    /// The job's latest advice, to act on acknowledgements.
    recent: VecDeque<Recent>,
    /// Cluster mode: the last step forwarded per rank (steps must increase).
    forwarded: HashMap<u32, u64>,
}

/// An advice remembered for acknowledgements.
struct Recent {
    id: u64,
    /// Some rank acknowledged it (applied or not).
    acked: bool,
}

impl Job {
    fn set_streams(&self) {
        self.gauges.streams.set(self.streams.len() as f64);
    }

    fn set_unacked(&self) {
        let unacked = self.recent.iter().filter(|r| !r.acked).count();
        self.gauges.unacked.set(unacked as f64);
    }

    /// Remembers an advice for its acknowledgements, and returns the queues
    /// of the streams it goes to (its target rank, or all).
    fn advised(&mut self, id: u64, target: Option<u32>) -> Vec<Outbox> {
        if self.recent.len() == RECENT_ADVICE {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent { id, acked: false });
        self.set_unacked();
        self.streams
            .iter()
            .filter(|(rank, _)| target.is_none_or(|t| t == **rank))
            .map(|(_, s)| s.outbox.clone())
            .collect()
    }
}

/// Advice remembered per job for acknowledgements.
const RECENT_ADVICE: usize = 64;

struct Stream {
    id: u64,
    outbox: Outbox,
}

impl Hub {
    pub fn new(
        engine: Engine,
        metrics: Metrics,
        limits: Limits,
        recorder: Option<Recorder>,
        forward: Option<Arc<Forwarder>>,
    ) -> Self {
        Self {
            core: Mutex::new(Core {
                engine,
                jobs: HashMap::new(),
                out: Output::default(),
            }),
            metrics,
            limits,
            next_stream: AtomicU64::new(1),
            recorder,
            forward,
        }
    }

    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The engine and registry; a panic while holding the lock must not take
    /// every later stream down with it, so a poisoned lock is taken as is.
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a Hello: declares the job to the engine, attaches the stream
    /// (replacing an older stream of the same rank), and queues the Welcome.
    pub fn hello(&self, stream: u64, outbox: &Outbox, hello: proto::Hello) -> Result<Attachment, Rejection> {
        let forwarded = self.forward.as_ref().map(|_| hello.clone());
        let mut at = validate_hello(stream, hello)?;
        // Forwarded summaries are decided on elsewhere, later.
        at.progress &= self.forward.is_none();
        let mut core = self.core();
        let core = &mut *core;
        self.ensure_job(core, &at)?;
        let job = core.jobs.get_mut(&at.job).expect("ensured above");
        job.last_active = Instant::now();
        let previous = job.streams.insert(
            at.rank,
            Stream {
                id: stream,
                outbox: outbox.clone(),
            },
        );
        if let Some(old) = previous {
            let _ = old.outbox.try_send(Err(at.replaced()));
        }
        job.set_streams();
        let last_step = match &self.forward {
            Some(_) => job.forwarded.get(&at.rank).copied(),
            None => core.engine.last_step(&at.job, at.rank),
        };
        let welcome = proto::Welcome {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_step,
            reports_progress: at.progress,
        };
        // A fresh queue always has room; the Welcome goes first because any
        // advice for this stream is queued under the same lock, later.
        let _ = outbox.try_send(Ok(proto::ServerMessage {
            body: Some(server_message::Body::Welcome(welcome)),
        }));
        self.metrics.active_streams.inc();
        if let (Some(forward), Some(hello)) = (&self.forward, forwarded) {
            forward.send(&at.job, at.rank, worker_message::Body::Hello(hello));
        }
        Ok(at)
    }

    /// Creates the job (engine state, registry entry, gauges) unless it is
    /// tracked, and declares this rank's view of it.
    fn ensure_job(&self, core: &mut Core, at: &Attachment) -> Result<(), Rejection> {
        let known = core.jobs.contains_key(&at.job);
        if !known && core.jobs.len() >= self.limits.max_jobs {
            self.metrics.jobs_refused.inc();
            return Err(Rejection {
                reason: "too_many_jobs",
                status: Status::resource_exhausted(format!(
                    "field job: cannot track job {:?}: {} jobs are tracked, the limit (--max-jobs)",
                    &*at.job, self.limits.max_jobs
                )),
            });
        }
        core.engine
            .declare(&at.job, &at.spec())
            .map_err(|e| Rejection::engine(&e))?;
        if !known {
            core.jobs.insert(
                at.job.clone(),
                Job {
                    streams: HashMap::new(),
                    last_active: Instant::now(),
                    gauges: self.metrics.job_gauges(&at.job),
                    first_seen: unix_now(),
                    last_seen: unix_now(),
                    dirty: true,
                    recent: VecDeque::new(),
                    forwarded: HashMap::new(),
                },
            );
            self.metrics.active_jobs.set(core.jobs.len() as i64);
        }
        Ok(())
    }

    /// Runs one summary through the engine and sends any advice to every
    /// stream of the job.
    pub fn summary(
        &self,
        at: &Attachment,
        outbox: &Outbox,
        p: &proto::Summary,
        scratch: &mut Summary,
        received: Instant,
    ) -> Result<(), Rejection> {
        wire::summary_into(p, at.rank, at.layer_names.len(), scratch)
            .map_err(|e| Rejection::invalid("layer_count", e.to_string()))?;
        scratch.time = Some(effective_time(scratch.time));
        let s: &Summary = scratch;

        let mut core = self.core();
        let core = &mut *core;
        self.reattach(core, at, outbox)?;
        if let Some(forward) = &self.forward {
            let job = core.jobs.get_mut(&at.job).expect("attached above");
            let (worker, step) = (at.rank, p.step);
            match job.forwarded.get(&at.rank) {
                Some(&last) if step == last => {
                    return Err(Rejection::engine(&EngineError::DuplicateStep { worker, step }));
                }
                Some(&last) if step < last => {
                    return Err(Rejection::engine(&EngineError::StepBackwards { worker, step, last }));
                }
                _ => {}
            }
            job.forwarded.insert(at.rank, step);
            job.last_active = received;
            job.last_seen = s.time.unwrap_or(job.last_seen);
            update_gauges(&job.gauges, s, None);
            // Queued under the lock: a rank's messages keep their order.
            forward.send(&at.job, at.rank, worker_message::Body::Summary(p.clone()));
            return Ok(());
        }
        let mut out = std::mem::take(&mut core.out);
        out.clear();
        let result = core.engine.observe(&at.job, s, &mut out);
        if let Err(e) = result {
            core.out = out;
            return Err(Rejection::engine(&e));
        }
        self.metrics.summary(s.layers.len());
        let job = core.jobs.get_mut(&at.job).expect("attached above");
        job.last_active = received;
        job.last_seen = s.time.unwrap_or(job.last_seen);
        job.dirty = true;
        update_gauges(&job.gauges, s, core.engine.health(&at.job));
        let progress = at.progress.then(|| Delivery {
            message: proto::ServerMessage {
                body: Some(server_message::Body::Progress(proto::Progress { step: p.step })),
            },
            outboxes: vec![outbox.clone()],
        });
        self.publish(core, &out, progress, received);
        core.out = out;
        Ok(())
    }

    /// Makes sure this stream is the one attached for its rank. A job that was
    /// forgotten while idle is tracked again; a stream replaced by a newer one
    /// of the same rank is told so.
    fn reattach(&self, core: &mut Core, at: &Attachment, outbox: &Outbox) -> Result<(), Rejection> {
        if let Some(job) = core.jobs.get(&at.job) {
            match job.streams.get(&at.rank) {
                Some(s) if s.id == at.stream => return Ok(()),
                Some(_) => {
                    return Err(Rejection {
                        reason: "replaced",
                        status: at.replaced(),
                    });
                }
                None => {}
            }
        }
        self.ensure_job(core, at)?;
        let job = core.jobs.get_mut(&at.job).expect("ensured above");
        job.streams.insert(
            at.rank,
            Stream {
                id: at.stream,
                outbox: outbox.clone(),
            },
        );
        job.set_streams();
        Ok(())
    }

    /// Metrics for the findings; the advice to the job's streams, through
    /// the store when there is one (durable before it leaves), then the
    /// stream's Progress, if it asked for one: the same path keeps it behind
    /// every advice before it.
    fn publish(&self, core: &mut Core, out: &Output, progress: Option<Delivery>, received: Instant) {
        if out.is_empty() && progress.is_none() {
            return;
        }
        for f in &out.findings {
            self.metrics.anomaly(&f.job, f.rule, f.severity);
        }
        let mut deliveries = Vec::with_capacity(out.advice.len());
        for a in &out.advice {
            self.metrics.advice(&a.job, &a.action);
            if let Action::Rollback { to_step } = a.action {
                core.engine.note_rollback(&a.job, a.id, to_step);
            }
            let Some(job) = core.jobs.get_mut(&a.job) else { continue };
            let outboxes = job.advised(a.id, a.target);
            deliveries.push(Delivery {
                message: proto::ServerMessage {
                    body: Some(server_message::Body::Advice(wire::advice_to_proto(a))),
                },
                outboxes,
            });
        }
        deliveries.extend(progress);
        match &self.recorder {
            Some(recorder) => {
                let now = unix_now();
                recorder.record(
                    Record {
                        anomalies: out.findings.clone(),
                        advice: out.advice.iter().map(|a| (a.clone(), now)).collect(),
                        deliveries,
                        received: Some(received),
                        ..Record::default()
                    },
                    &self.metrics,
                );
            }
            None => deliver(&self.metrics, &deliveries, Some(received)),
        }
    }

    /// Records a worker's acknowledgement of advice: the advice no longer
    /// counts as unacknowledged (whether applied or not). A rank that applied
    /// a rollback reports its steps again from the checkpoint, so the engine
    /// rewinds that rank.
    pub fn ack(&self, at: &Attachment, ack: &proto::AdviceAck) {
        self.metrics.ack(ack.applied);
        // The lock is released before the store is handed the ack.
        {
            let mut core = self.core();
            let core = &mut *core;
            if let Some(job) = core.jobs.get_mut(&at.job)
                && let Some(r) = job.recent.iter_mut().find(|r| r.id == ack.advice_id)
            {
                r.acked = true;
                job.set_unacked();
            }
            if let Some(forward) = &self.forward {
                // The job's owner acts on it (a rollback rewinds its engine).
                forward.send(&at.job, at.rank, worker_message::Body::Ack(ack.clone()));
            } else if ack.applied
                && let Some(to_step) = core.engine.advice_applied(&at.job, at.rank, ack.advice_id)
            {
                tracing::info!(job = &*at.job, rank = at.rank, to_step, "rank rolled back");
            }
        }
        if let Some(recorder) = &self.recorder {
            let ack = Ack {
                advice_id: ack.advice_id,
                job: at.job.to_string(),
                rank: at.rank,
                applied_step: ack.applied_step,
                applied: ack.applied,
                note: ack.note.clone(),
                time: unix_now(),
            };
            recorder.record(
                Record {
                    acks: vec![ack],
                    ..Record::default()
                },
                &self.metrics,
            );
        }
        tracing::debug!(
            job = &*at.job,
            rank = at.rank,
            advice = ack.advice_id,
            applied = ack.applied,
            step = ack.applied_step,
            "advice acknowledged"
        );
    }

    /// Records the job's current row, then waits until everything recorded
    /// so far is durable (at once without a store).
    pub async fn flush(&self, job: &str) {
        // Cluster mode: job rows come from the job's owner (the state topic).
        if let Some(forward) = &self.forward {
            let forward = forward.clone();
            let _ = tokio::task::spawn_blocking(move || forward.flush(Duration::from_secs(30))).await;
            return;
        }
        let Some(recorder) = &self.recorder else { return };
        let row = {
            let mut core = self.core();
            let core = &mut *core;
            core.jobs.get_mut(job).and_then(|j| {
                j.dirty = false;
                live_row(&core.engine, job, j)
            })
        };
        if let Some(row) = row {
            recorder.record(
                Record {
                    jobs: vec![row],
                    ..Record::default()
                },
                &self.metrics,
            );
        }
        recorder.flush(&self.metrics).await;
    }

    /// True in cluster mode, where detection runs on the job's owner.
    pub fn is_cluster(&self) -> bool {
        self.forward.is_some()
    }

    /// Cluster mode: an advice from the advice topic, to this replica's
    /// streams of its job (a replayed advice, same id, is sent once).
    pub fn deliver_advice(&self, advice: proto::Advice) {
        let mut core = self.core();
        let Some(job) = core.jobs.get_mut(advice.job.as_str()) else {
            return;
        };
        if job.recent.iter().any(|r| r.id == advice.id) {
            return;
        }
        if advice.action.is_none() {
            return;
        }
        let outboxes = job.advised(advice.id, advice.target_rank);
        drop(core);
        let delivery = Delivery {
            message: proto::ServerMessage {
                body: Some(server_message::Body::Advice(advice)),
            },
            outboxes,
        };
        deliver(&self.metrics, &[delivery], None);
    }

    /// A stream ended: it leaves its job (unless a newer stream replaced it).
    pub fn detach(&self, at: &Attachment) {
        let mut core = self.core();
        if let Some(job) = core.jobs.get_mut(&at.job) {
            if job.streams.get(&at.rank).is_some_and(|s| s.id == at.stream) {
                job.streams.remove(&at.rank);
                job.set_streams();
            }
            job.last_active = Instant::now();
        }
        self.metrics.active_streams.dec();
    }

    /// Every tracked job's row as the engine sees it now, with its open streams.
    pub fn live_jobs(&self) -> Vec<(JobRow, u32)> {
        let core = self.core();
        core.jobs
            .iter()
            .filter_map(|(id, j)| Some((live_row(&core.engine, id, j)?, j.streams.len() as u32)))
            .collect()
    }

    pub fn live_job(&self, job: &str) -> Option<(JobRow, u32)> {
        let core = self.core();
        let (id, j) = core.jobs.get_key_value(job)?;
        Some((live_row(&core.engine, id, j)?, j.streams.len() as u32))
    }

    /// A job's effective rules as TOML: the tracked job's own, else what its
    /// `[jobs]` override in the rules file would give it.
    pub fn rules_toml(&self, job: &str) -> Result<String, String> {
        let core = self.core();
        let rules = if core.jobs.contains_key(job) {
            core.engine.rules(job).clone()
        } else if job.is_empty() {
            core.engine.rule_book().defaults().clone()
        } else {
            core.engine.rule_book().for_job(job, None).map_err(|e| e.to_string())?
        };
        toml::to_string(&rules).map_err(|e| e.to_string())
    }

    /// Periodic work against the service's clock: stalled ranks, and jobs
    /// idle for longer than the TTL are forgotten with their metrics series.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        let mut out = std::mem::take(&mut core.out);
        out.clear();
        core.engine.tick(unix_now(), &mut out);
        self.publish(core, &out, None, now);
        core.out = out;

        // Cluster mode: job rows come from the job's owner (the state topic).
        if let (Some(recorder), None) = (&self.recorder, &self.forward) {
            let rows: Vec<JobRow> = core
                .jobs
                .iter_mut()
                .filter(|(_, j)| j.dirty)
                .filter_map(|(id, j)| {
                    j.dirty = false;
                    live_row(&core.engine, id, j)
                })
                .collect();
            if !rows.is_empty() {
                recorder.record(
                    Record {
                        jobs: rows,
                        ..Record::default()
                    },
                    &self.metrics,
                );
            }
        }

        let ttl = self.limits.job_ttl;
        let expired: Vec<JobId> = core
            .jobs
            .iter()
            .filter(|(_, j)| now.duration_since(j.last_active) >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            core.jobs.remove(&id);
            core.engine.remove_job(&id);
            self.metrics.forget_job(&id);
            tracing::info!(job = &*id, "forgot idle job");
        }
        self.metrics.active_jobs.set(core.jobs.len() as i64);
    }
}

fn live_row(engine: &Engine, id: &str, j: &Job) -> Option<JobRow> {
    let status = engine.status(id)?;
    Some(JobRow {
        job: id.to_owned(),
        first_seen: j.first_seen,
        last_seen: j.last_seen,
        ranks: status.ranks as u32,
        world_size: status.world_size,
        layers: status.layers as u32,
        last_step: status.max_step,
        health: engine.health(id),
    })
}

/// One advice and the streams it goes to.
pub struct Delivery {
    pub message: proto::ServerMessage,
    pub outboxes: Vec<Outbox>,
}

/// Hands advice to its streams' queues without waiting: a full queue (a
/// worker that does not read) loses it, a closed one is a stream ending.
pub fn deliver(metrics: &Metrics, deliveries: &[Delivery], received: Option<Instant>) {
    for d in deliveries {
        let advice = matches!(d.message.body, Some(server_message::Body::Advice(_)));
        for outbox in &d.outboxes {
            if let Err(mpsc::error::TrySendError::Full(_)) = outbox.try_send(Ok(d.message.clone()))
                && advice
            {
                metrics.advice_dropped.inc();
            }
        }
        if let Some(received) = received
            && advice
        {
            metrics.advice_latency.observe(received.elapsed().as_secs_f64());
        }
    }
}

/// Checks a Hello field by field.
fn validate_hello(stream: u64, h: proto::Hello) -> Result<Attachment, Rejection> {
    let bad = |m: String| Rejection::invalid("invalid_hello", m);
    if h.job.is_empty() {
        return Err(Rejection::invalid("empty_job", "field job: must not be empty"));
    }
    if h.job.len() > MAX_JOB_LEN {
        return Err(bad(format!(
            "field job: {} bytes, longer than the limit of {MAX_JOB_LEN}",
            h.job.len()
        )));
    }
    if h.world_size > MAX_RANKS {
        return Err(bad(format!(
            "field world_size: {} is above the limit of {MAX_RANKS}",
            h.world_size
        )));
    }
    if h.world_size > 0 && h.rank >= h.world_size {
        return Err(Rejection::invalid(
            "rank_out_of_range",
            format!("field rank: {} is not below world_size {}", h.rank, h.world_size),
        ));
    }
    if h.rank >= MAX_RANKS {
        return Err(Rejection::invalid(
            "rank_out_of_range",
            format!("field rank: {} is above the limit of {MAX_RANKS}", h.rank),
        ));
    }
    if h.layer_names.len() > MAX_LAYERS {
        return Err(Rejection::invalid(
            "too_many_layers",
            format!(
                "field layer_names: {} names, more than the limit of {MAX_LAYERS}",
                h.layer_names.len()
            ),
        ));
    }
    Ok(Attachment {
        stream,
        job: Arc::from(h.job),
        rank: h.rank,
        layer_names: h.layer_names.into(),
        world_size: (h.world_size > 0).then_some(h.world_size),
        profile: (!h.rule_profile.is_empty()).then_some(h.rule_profile),
        progress: h.report_progress,
    })
}

fn update_gauges(g: &JobGauges, s: &Summary, health: Option<Severity>) {
    let norm = s.grad_norm.or_else(|| {
        (!s.layers.is_empty()).then(|| {
            s.layers
                .iter()
                .map(|l| f64::from(l.l2) * f64::from(l.l2))
                .sum::<f64>()
                .sqrt()
        })
    });
    if let Some(n) = norm {
        g.grad_norm.set(n);
    }
    if let Some(l) = s.loss {
        g.loss.set(l);
    }
    if let Some(lr) = s.lr {
        g.lr.set(lr);
    }
    if let Some(t) = s.time {
        g.last_summary.set(t);
    }
    g.health.set(match health {
        None => 0.0,
        Some(Severity::Info) => 1.0,
        Some(Severity::Warning) => 2.0,
        Some(Severity::Critical) => 3.0,
    });
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The worker's time when it agrees with the service's clock, else the
/// receive time: stalls are judged against the service's clock, so a worker
/// with a skewed or missing clock must not look silent.
fn effective_time(worker: Option<f64>) -> f64 {
    let now = unix_now();
    match worker {
        Some(t) if t.is_finite() && (t - now).abs() <= MAX_CLOCK_SKEW_SECS => t,
        _ => now,
    }
}
