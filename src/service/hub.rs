//! The hub: the worker streams attached to each job, and the routing of
//! advice back to them. What happens to the messages is the [`Mode`]'s:
//! judged here ([`Judge`], embedded) or handed to the job's owner
//! (`forward::Forwarding`), whose advice comes back through
//! [`Hub::deliver_advice`].
//!
//! Every rank of a job has its own gRPC stream, but cross-rank rules need all
//! ranks of the job in one place, so the mode sits behind one mutex. Holding
//! it costs a few microseconds per summary (the engine does 50 M layer-stats/s
//! on one core), far below what the transport costs, and it makes the order of
//! a job's advice the same on every stream. Nothing under the lock awaits:
//! advice is handed to each stream's bounded send queue with `try_send`, so a
//! slow reader loses advice (counted in `gradguard_advice_dropped_total`)
//! instead of stalling everyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

mod job;

pub use super::attachment::Attachment;
use super::metrics::HubMetrics;
use super::mode::{Greeting, Mode, Shape};
use crate::clock::unix_now;
use crate::engine::Output;
use crate::intake::{Declared, Limits, Refusal};
use crate::model::Summary;
use crate::proto::{self, server_message};
use crate::recorder::{Record, Recorder};
use crate::store::{Ack, JobRow};
use crate::wire;
use job::{Job, Stream};

/// Where a stream's server messages go.
pub type Outbox = mpsc::Sender<Result<proto::ServerMessage, Status>>;

pub struct Hub {
    core: Mutex<Core>,
    metrics: HubMetrics,
    limits: Limits,
    next_stream: AtomicU64,
    /// The store writer; `None` runs without a store (advice goes out at once).
    recorder: Option<Recorder>,
}

struct Core {
    mode: Box<dyn Mode>,
    jobs: HashMap<crate::model::JobId, Job>,
    /// Scratch output, reused across calls.
    out: Output,
}

impl Hub {
    pub fn new(mode: Box<dyn Mode>, metrics: HubMetrics, limits: Limits, recorder: Option<Recorder>) -> Self {
        Self {
            core: Mutex::new(Core {
                mode,
                jobs: HashMap::new(),
                out: Output::default(),
            }),
            metrics,
            limits,
            next_stream: AtomicU64::new(1),
            recorder,
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic under the lock would be a bug; the state is still usable.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Worker streams open now (past their Hello).
    pub fn open_streams(&self) -> i64 {
        self.metrics.active_streams.get()
    }

    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a stream's Hello and queues its Welcome. A stream of a job
    /// already held is attached now (replacing an older stream of its rank);
    /// one of a new job only when its first summary takes the job's slot, so
    /// Hellos alone hold no job and no slot.
    pub fn hello(
        &self,
        stream: u64,
        principal: Option<Arc<str>>,
        outbox: &Outbox,
        hello: proto::Hello,
    ) -> Result<Attachment, Refusal> {
        let mut declared = self.limits.check_hello(hello.clone())?;
        let mut core = self.core();
        let core = &mut *core;
        // Forwarded summaries are decided on elsewhere, later.
        declared.progress &= core.mode.decides();
        let at = Attachment {
            stream,
            declared,
            principal,
        };
        let (last_step, missed) = match core.mode.hello(&at.declared, &hello)? {
            Greeting::Held { last_step } => (last_step, self.attach(core, &at, outbox)?),
            Greeting::Pending => (None, Vec::new()),
        };
        let welcome = proto::Welcome {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_step,
            reports_progress: at.declared.progress,
            urgency: core
                .mode
                .rules_for(&at.declared)
                .ok()
                .map(|r| wire::urgency_to_proto(&r)),
        };
        // A fresh queue always has room; the Welcome goes first because any
        // advice for this stream is queued under the same lock, later.
        let _ = outbox.try_send(Ok(proto::ServerMessage {
            body: Some(server_message::Body::Welcome(welcome)),
        }));
        deliver(&self.metrics, &missed_deliveries(missed, outbox), None);
        self.metrics.active_streams.inc();
        Ok(at)
    }

    /// Attaches the stream to its job's entry as its rank's stream; an older
    /// stream of the rank is told it was replaced. A rank another
    /// principal's stream holds is refused, and that stream goes on.
    /// Returns the job-wide advice given before a rank's first stream
    /// attached (a rank that joined late, or whose first summary came after
    /// its peers' advice): it is in force for the job, and every rank must
    /// apply it alike.
    fn attach(&self, core: &mut Core, at: &Attachment, outbox: &Outbox) -> Result<Vec<proto::ServerMessage>, Refusal> {
        if let Some(held) = core
            .jobs
            .get(&at.declared.job)
            .and_then(|j| j.streams.get(&at.declared.rank))
            && held.id != at.stream
            && held.principal != at.principal
        {
            return Err(at.held());
        }
        let job = self.track(core, &at.declared);
        let previous = job.streams.insert(
            at.declared.rank,
            Stream {
                id: at.stream,
                outbox: outbox.clone(),
                principal: at.principal.clone(),
            },
        );
        if let Some(old) = previous.filter(|old| old.id != at.stream) {
            let _ = old.outbox.try_send(Err(at.replaced().status()));
        }
        job.set_streams();
        let missed = if job.ranks_seen.insert(at.declared.rank) {
            job.in_force.iter().cloned().collect()
        } else {
            Vec::new()
        };
        Ok(missed)
    }

    /// The hub's entry of a job the mode accepted, created when new.
    fn track<'a>(&self, core: &'a mut Core, d: &Declared) -> &'a mut Job {
        let jobs = core.jobs.len() + usize::from(!core.jobs.contains_key(&d.job));
        self.metrics.active_jobs.set(jobs as i64);
        let job = core
            .jobs
            .entry(d.job.clone())
            .or_insert_with(|| Job::new(self.metrics.job_gauges(&d.job)));
        job.last_active = Instant::now();
        job
    }

    /// Runs one summary through the mode and sends any advice to every
    /// stream of the job.
    pub fn summary(
        &self,
        at: &Attachment,
        outbox: &Outbox,
        p: &proto::Summary,
        scratch: &mut Summary,
        received: Instant,
    ) -> Result<(), Refusal> {
        let now = unix_now();
        let mut core = self.core();
        let core = &mut *core;
        self.reattach(core, at, outbox)?;
        let mut out = std::mem::take(&mut core.out);
        out.clear();
        if let Err(r) = core.mode.summary(&at.declared, p, now, scratch, &mut out) {
            core.out = out;
            return Err(r);
        }
        let health = core.mode.health(&at.declared.job);
        let job = core.jobs.get_mut(&at.declared.job).expect("attached above");
        job.last_active = received;
        job.last_seen = scratch.time.unwrap_or(job.last_seen);
        job.dirty = true;
        job.gauges.update(scratch, health);
        let progress = at.declared.progress.then(|| Delivery {
            message: proto::ServerMessage {
                body: Some(server_message::Body::Progress(proto::Progress { step: p.step })),
            },
            outboxes: vec![outbox.clone()],
        });
        self.publish(core, &out, progress, received);
        core.out = out;
        Ok(())
    }

    /// Makes sure this stream is the one attached for its rank. A stream not
    /// attached yet (its job was not held at its Hello, or was forgotten
    /// while idle) declares its rank now, the job taking its slot if it is
    /// new; a stream that a newer one of its rank replaced is told so.
    fn reattach(&self, core: &mut Core, at: &Attachment, outbox: &Outbox) -> Result<(), Refusal> {
        let d = &at.declared;
        if let Some(s) = core.jobs.get(&d.job).and_then(|job| job.streams.get(&d.rank)) {
            if s.id == at.stream {
                return Ok(());
            }
            if s.id > at.stream {
                return Err(at.replaced());
            }
            // Before the rank is declared or the job takes a slot.
            if s.principal != at.principal {
                return Err(at.held());
            }
        }
        let hello = proto::Hello {
            job: d.job.to_string(),
            rank: d.rank,
            world_size: d.world_size.unwrap_or(0),
            layer_names: d.layer_names.to_vec(),
            rule_profile: d.profile.clone().unwrap_or_default(),
            report_progress: d.progress,
            layout: d.layout(),
            ..Default::default()
        };
        core.mode.admit(d, &hello)?;
        let missed = self.attach(core, at, outbox)?;
        deliver(&self.metrics, &missed_deliveries(missed, outbox), None);
        Ok(())
    }

    /// The findings' and advice's books; the advice to the job's streams,
    /// through the store when there is one (durable before it leaves), then
    /// the stream's Progress, if it asked for one: the same path keeps it
    /// behind every advice before it.
    fn publish(&self, core: &mut Core, out: &Output, progress: Option<Delivery>, received: Instant) {
        if out.is_empty() && progress.is_none() {
            return;
        }
        core.mode.published(out);
        let mut deliveries = Vec::with_capacity(out.advice.len() + 1);
        for a in &out.advice {
            let Some(job) = core.jobs.get_mut(&a.job) else { continue };
            let message = proto::ServerMessage {
                body: Some(server_message::Body::Advice(wire::advice_to_proto(a))),
            };
            let outboxes = job.advised(a.id, a.target, &message);
            deliveries.push(Delivery { message, outboxes });
        }
        deliveries.extend(progress);
        let then = self.deliver_later(deliveries, Some(received));
        match &self.recorder {
            Some(recorder) => {
                let now = unix_now();
                recorder.record(Record {
                    anomalies: out.findings.clone(),
                    advice: out.advice.iter().map(|a| (a.clone(), now)).collect(),
                    then,
                    ..Record::default()
                });
            }
            None => {
                if let Some(then) = then {
                    then();
                }
            }
        }
    }

    /// The deliveries as one call to make once what they carry is durable.
    fn deliver_later(&self, deliveries: Vec<Delivery>, received: Option<Instant>) -> Option<Box<dyn FnOnce() + Send>> {
        if deliveries.is_empty() {
            return None;
        }
        let metrics = self.metrics.clone();
        Some(Box::new(move || deliver(&metrics, &deliveries, received)))
    }

    /// Records a worker's acknowledgement of advice: the advice no longer
    /// counts as unacknowledged (whether applied or not), and the mode acts
    /// on it (a rollback rewinds the rank).
    pub fn ack(&self, at: &Attachment, ack: &proto::AdviceAck) {
        let d = &at.declared;
        // The lock is released before the store is handed the ack.
        {
            let mut core = self.core();
            let core = &mut *core;
            if let Some(job) = core.jobs.get_mut(&d.job)
                && let Some(r) = job.recent.iter_mut().find(|r| r.id == ack.advice_id)
            {
                r.acked = true;
                job.set_unacked();
            }
            core.mode.ack(d, ack);
        }
        if let Some(recorder) = &self.recorder {
            recorder.record(Record {
                acks: vec![Ack {
                    advice_id: ack.advice_id,
                    job: d.job.to_string(),
                    rank: d.rank,
                    applied_step: ack.applied_step,
                    applied: ack.applied,
                    note: ack.note.clone(),
                    time: unix_now(),
                }],
                ..Record::default()
            });
        }
        tracing::debug!(
            job = &*d.job,
            rank = d.rank,
            advice = ack.advice_id,
            applied = ack.applied,
            step = ack.applied_step,
            "advice acknowledged"
        );
    }

    /// Records the job's current row, then waits until everything accepted
    /// so far is durable: in the store, or with the job's owner.
    pub async fn flush(&self, job: &str) {
        let (row, handover) = {
            let mut core = self.core();
            let core = &mut *core;
            let handover = core.mode.handover();
            let row = if core.mode.decides() {
                let shape = core.mode.shape(job);
                core.jobs.get_mut(job).zip(shape).map(|(j, shape)| {
                    j.dirty = false;
                    j.row(job, shape)
                })
            } else {
                None
            };
            (row, handover)
        };
        if let Some(handover) = handover {
            let _ = tokio::task::spawn_blocking(handover).await;
            return;
        }
        let Some(recorder) = &self.recorder else { return };
        if let Some(row) = row {
            recorder.record(Record {
                jobs: vec![row],
                ..Record::default()
            });
        }
        recorder.flush().await;
    }

    /// True when this replica hands its streams' messages to their jobs'
    /// owners (cluster mode).
    pub fn is_cluster(&self) -> bool {
        !self.core().mode.decides()
    }

    /// Cluster mode: an advice from the advice topic, to this replica's
    /// streams of its job (a replayed advice, same id, is sent once).
    pub fn deliver_advice(&self, advice: proto::Advice) {
        let mut core = self.core();
        let Some(job) = core.jobs.get_mut(advice.job.as_str()) else {
            return;
        };
        if advice.action.is_none() || job.recent.iter().any(|r| r.id == advice.id) {
            return;
        }
        let (id, target) = (advice.id, advice.target_rank);
        let message = proto::ServerMessage {
            body: Some(server_message::Body::Advice(advice)),
        };
        let outboxes = job.advised(id, target, &message);
        drop(core);
        let delivery = Delivery { message, outboxes };
        deliver(&self.metrics, &[delivery], None);
    }

    /// A stream ended: it leaves its job (unless a newer stream replaced it).
    pub fn detach(&self, at: &Attachment) {
        let d = &at.declared;
        let mut core = self.core();
        if let Some(job) = core.jobs.get_mut(&d.job) {
            if job.streams.get(&d.rank).is_some_and(|s| s.id == at.stream) {
                job.streams.remove(&d.rank);
                job.set_streams();
            }
            job.last_active = Instant::now();
        }
        self.metrics.active_streams.dec();
    }

    /// Tracked jobs' rows as this replica sees them now, with their open
    /// streams, a page at a time: the first `limit` after `after` (from the
    /// first when `None`) that `visible` lets through, in id order. One pass
    /// over the tracked jobs that copies only the page's rows.
    pub fn live_jobs_after(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: impl Fn(&str) -> bool,
    ) -> Vec<(JobRow, u32)> {
        let core = self.core();
        let mut page: std::collections::BTreeMap<&str, (&Job, Shape)> = std::collections::BTreeMap::new();
        for (id, j) in &core.jobs {
            let id: &str = id;
            let fits = page.len() < limit || page.last_key_value().is_some_and(|(last, _)| id < *last);
            if limit == 0 || after.is_some_and(|a| id <= a) || !fits || !visible(id) {
                continue;
            }
            if let Some(shape) = core.mode.shape(id) {
                page.insert(id, (j, shape));
                if page.len() > limit {
                    page.pop_last();
                }
            }
        }
        page.into_iter()
            .map(|(id, (j, shape))| (j.row(id, shape), j.streams.len() as u32))
            .collect()
    }

    pub fn live_job(&self, job: &str) -> Option<(JobRow, u32)> {
        let core = self.core();
        let (id, j) = core.jobs.get_key_value(job)?;
        Some((j.row(id, core.mode.shape(id)?), j.streams.len() as u32))
    }

    /// A job's effective rules as TOML.
    pub fn rules_toml(&self, job: &str) -> Result<String, String> {
        let rules = self.core().mode.rules(job)?;
        toml::to_string(&rules).map_err(|e| e.to_string())
    }

    /// Periodic work against the service's clock: stalled ranks, job rows
    /// for the store, and jobs idle for longer than the TTL are forgotten
    /// with their metrics series.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        let mut out = std::mem::take(&mut core.out);
        out.clear();
        core.mode.tick(unix_now(), &mut out);
        self.publish(core, &out, None, now);
        core.out = out;

        if let Some(recorder) = self.recorder.as_ref().filter(|_| core.mode.decides()) {
            let mode = &core.mode;
            let rows: Vec<JobRow> = core
                .jobs
                .iter_mut()
                .filter(|(_, j)| j.dirty)
                .filter_map(|(id, j)| {
                    j.dirty = false;
                    Some(j.row(id, mode.shape(id)?))
                })
                .collect();
            if !rows.is_empty() {
                recorder.record(Record {
                    jobs: rows,
                    ..Record::default()
                });
            }
        }

        // A job with an open stream is live however quiet it is; the TTL
        // counts from its last activity once no stream is open.
        let ttl = self.limits.job_ttl;
        let expired: Vec<_> = core
            .jobs
            .iter()
            .filter(|(_, j)| j.streams.is_empty() && now.duration_since(j.last_active) >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            core.jobs.remove(&id);
            core.mode.forget(&id);
            self.metrics.forget_job(&id);
            tracing::info!(job = &*id, "forgot idle job");
        }
        self.metrics.active_jobs.set(core.jobs.len() as i64);
    }
}

/// One advice (or Progress) and the streams it goes to.
pub struct Delivery {
    pub message: proto::ServerMessage,
    pub outboxes: Vec<Outbox>,
}

/// Advice a late rank missed, to its stream.
fn missed_deliveries(missed: Vec<proto::ServerMessage>, outbox: &Outbox) -> Vec<Delivery> {
    missed
        .into_iter()
        .map(|message| Delivery {
            message,
            outboxes: vec![outbox.clone()],
        })
        .collect()
}

/// Hands advice to its streams' queues without waiting: a full queue (a
/// worker that does not read) loses it, a closed one is a stream ending.
fn deliver(metrics: &HubMetrics, deliveries: &[Delivery], received: Option<Instant>) {
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
