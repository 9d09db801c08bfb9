//! The detection engine: per-job state, the rules, and the advice policy.
//!
//! Pure and synchronous: [`Engine::observe`] takes one rank's summary and
//! appends findings and advice to an [`Output`]. No clock (time comes from the
//! records, or from the caller through [`Engine::tick`]), no I/O, no async
//! runtime; the same input always yields the same output.
//!
//! Ordering: each rank's steps must strictly increase. A duplicate or earlier
//! step is refused with an error and changes no state, so a redelivered or
//! replayed summary is harmless (at-least-once transports dedupe for free).
//!
//! Several ranks of one job: per-rank rules run on each rank's own statistics;
//! a finding about a signal every rank shares (an all-reduced gradient spike, a
//! NaN loss) is reported once per step, attributed to the first rank showing it.

mod hit;
mod policy;
mod rules;
pub mod stats;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::config::{ConfigError, RuleBook, Rules};
use crate::model::{Advice, Finding, JobId, RuleId, Severity, Summary};
use hit::{Emitter, Hit};
use rules::{Obs, ranks};
use worker::WorkerState;

/// Largest accepted rank (exclusive): state is indexed by rank.
pub const MAX_RANKS: u32 = 1 << 16;
/// Findings remembered per job for cross-rank dedupe, at most.
const MAX_REPORTED: usize = 4096;
/// First byte of a snapshot: bumped whenever the state's layout changes.
const SNAPSHOT_VERSION: u8 = 3;
/// Rollback advice remembered per job, to act on its acknowledgement.
const RECENT_ROLLBACKS: usize = 8;
/// Largest accepted number of layers per job.
pub const MAX_LAYERS: usize = 1 << 16;

/// Why a summary was refused. Refusing changes no state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("job id must not be empty")]
    EmptyJob,
    #[error("rank {worker} is out of range (must be below {max})", max = MAX_RANKS)]
    RankOutOfRange { worker: u32 },
    #[error("step {step} of rank {worker} was already accepted")]
    DuplicateStep { worker: u32, step: u64 },
    #[error("step {step} of rank {worker} goes backwards (last accepted step is {last})")]
    StepBackwards { worker: u32, step: u64, last: u64 },
    #[error("rank {worker} sent {got} layer values but the job has {expected} layers")]
    LayerCount { worker: u32, expected: usize, got: usize },
    #[error("job declares {got} layers, more than the limit of {max}", max = MAX_LAYERS)]
    TooManyLayers { got: usize },
    #[error("job {job} was declared with {expected} layer names; got a different list of {got}")]
    LayerNames { job: String, expected: usize, got: usize },
    #[error("{0}")]
    Config(String),
    #[error("snapshot of job {job} cannot be restored: {reason}")]
    Snapshot { job: String, reason: String },
}

impl From<ConfigError> for EngineError {
    fn from(e: ConfigError) -> Self {
        EngineError::Config(e.to_string())
    }
}

impl EngineError {
    /// A short stable label for metrics (`reason` of rejected summaries).
    pub fn reason(&self) -> &'static str {
        match self {
            EngineError::EmptyJob => "empty_job",
            EngineError::RankOutOfRange { .. } => "rank_out_of_range",
            EngineError::DuplicateStep { .. } => "duplicate_step",
            EngineError::StepBackwards { .. } => "step_backwards",
            EngineError::LayerCount { .. } => "layer_count",
            EngineError::TooManyLayers { .. } => "too_many_layers",
            EngineError::LayerNames { .. } => "layer_names",
            EngineError::Config(_) => "config",
            EngineError::Snapshot { .. } => "snapshot",
        }
    }
}

/// What one call produced. Reuse it across calls to avoid allocations.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub findings: Vec<Finding>,
    pub advice: Vec<Advice>,
}

impl Output {
    pub fn clear(&mut self) {
        self.findings.clear();
        self.advice.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.findings.is_empty() && self.advice.is_empty()
    }
}

/// How a job declares itself (a worker's Hello).
#[derive(Debug, Clone, Default)]
pub struct JobSpec<'a> {
    pub layer_names: &'a [String],
    pub world_size: Option<u32>,
    pub profile: Option<&'a str>,
}

/// A read-only view of one job's state.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub job: JobId,
    pub ranks: usize,
    pub world_size: Option<u32>,
    pub max_step: Option<u64>,
    pub layers: usize,
    /// Problems still open (not yet followed by a run of healthy steps).
    pub open_episodes: usize,
    /// Bytes of detection state the job holds.
    pub state_bytes: usize,
}

/// Detection state for every job.
#[derive(Debug)]
pub struct Engine {
    book: RuleBook,
    jobs: HashMap<JobId, JobState>,
    next_advice_id: u64,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(RuleBook::builtin())
    }
}

impl Engine {
    pub fn new(book: RuleBook) -> Self {
        Self {
            book,
            jobs: HashMap::new(),
            next_advice_id: 0,
        }
    }

    /// Declares a job (or a new rank's view of it): layer names, world size and
    /// rule profile. Layer names are fixed by the first declaration that has them.
    pub fn declare(&mut self, job: &str, spec: &JobSpec) -> Result<(), EngineError> {
        if spec.layer_names.len() > MAX_LAYERS {
            return Err(EngineError::TooManyLayers {
                got: spec.layer_names.len(),
            });
        }
        let state = job_entry(&mut self.jobs, &self.book, job, spec.profile)?;
        if !spec.layer_names.is_empty() {
            if state.layer_names.is_empty() {
                state.layer_names = spec.layer_names.iter().map(|n| Arc::from(n.as_str())).collect();
            } else if state.layer_names.len() != spec.layer_names.len()
                || state.layer_names.iter().zip(spec.layer_names).any(|(a, b)| **a != **b)
            {
                return Err(EngineError::LayerNames {
                    job: job.to_owned(),
                    expected: state.layer_names.len(),
                    got: spec.layer_names.len(),
                });
            }
        }
        if let Some(w) = spec.world_size.filter(|&w| w > 0) {
            state.world_size = Some(w.min(MAX_RANKS));
        }
        Ok(())
    }

    /// Runs every rule on one rank's summary and appends what they found and the
    /// advice decided to `out`. An undeclared job is created with default rules.
    pub fn observe(&mut self, job: &str, summary: &Summary, out: &mut Output) -> Result<(), EngineError> {
        let state = job_entry(&mut self.jobs, &self.book, job, None)?;
        state.observe(summary, &mut self.next_advice_id, out)
    }

    /// Judges silence against the caller's clock (seconds since the epoch): a
    /// rank that sent nothing for the stall timeout while its peers kept going.
    pub fn tick(&mut self, now: f64, out: &mut Output) {
        let mut ids: Vec<JobId> = self.jobs.keys().cloned().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.tick(now, &mut self.next_advice_id, out);
            }
        }
    }

    /// Makes later advice ids start after `last`: a service restarted over its
    /// store continues the ids it already handed out.
    pub fn resume_advice_ids(&mut self, last: u64) {
        self.next_advice_id = self.next_advice_id.max(last);
    }

    /// The effective rules of a job (the defaults when it is unknown).
    pub fn rules(&self, job: &str) -> &Rules {
        self.jobs.get(job).map_or(self.book.defaults(), |j| &j.rules)
    }

    pub fn rule_book(&self) -> &RuleBook {
        &self.book
    }

    pub fn status(&self, job: &str) -> Option<JobStatus> {
        self.jobs.get(job).map(JobState::status)
    }

    /// The highest step accepted from one rank of a job.
    pub fn last_step(&self, job: &str, rank: u32) -> Option<u64> {
        let job = self.jobs.get(job)?;
        job.peers.get(rank as usize)?.as_ref()?.last_step
    }

    /// The worst severity among a job's open problems: `None` when it is
    /// healthy (or unknown). A problem stays open until a run of healthy steps.
    pub fn health(&self, job: &str) -> Option<Severity> {
        self.jobs.get(job)?.policy.worst()
    }

    /// Whether the engine tracks this job.
    pub fn has_job(&self, job: &str) -> bool {
        self.jobs.contains_key(job)
    }

    /// A tracked job's declared layers and world size (0 layers: global
    /// values only, or no Hello named any).
    pub fn shape(&self, job: &str) -> Option<(usize, Option<u32>)> {
        let state = self.jobs.get(job)?;
        Some((state.layer_names.len(), state.world_size))
    }

    /// Number of jobs with state.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn job_ids(&self) -> impl Iterator<Item = &JobId> {
        self.jobs.keys()
    }

    /// A rank rolled back to a checkpoint of `to_step`: its next step may be
    /// `to_step + 1` again, and its own statistics start afresh (their windows
    /// hold the run that was abandoned, whose norms would read as a collapse
    /// next to the restored ones). Open episodes stay open, and advice is not
    /// repeated before the run passes the step it was last given at. Returns
    /// false when the job or rank is unknown or already at or before `to_step`.
    pub fn rewind(&mut self, job: &str, rank: u32, to_step: u64) -> bool {
        let Some(state) = self.jobs.get_mut(job) else {
            return false;
        };
        state.rewind(rank, to_step)
    }

    /// Remembers rollback advice `advice_id` (as published: cluster mode
    /// numbers advice itself) to `to_step`, so that a rank acknowledging it
    /// is rewound by [`Engine::advice_applied`], on whichever engine holds
    /// the job by then: the memory is part of the job's snapshot.
    pub fn note_rollback(&mut self, job: &str, advice_id: u64, to_step: u64) {
        let Some(state) = self.jobs.get_mut(job) else { return };
        if state.rollbacks.len() == RECENT_ROLLBACKS {
            state.rollbacks.pop_front();
        }
        state.rollbacks.push_back(NotedRollback {
            id: advice_id,
            to_step,
            applied_by: Vec::new(),
        });
    }

    /// A rank acknowledged advice `advice_id` as applied. Its episode then
    /// knows a remedy was tried: if the problem comes back, the ladder may go
    /// on to halt. When it is a rollback noted by [`Engine::note_rollback`],
    /// the rank reports again from the checkpoint: it is rewound
    /// ([`Engine::rewind`]) and the step is returned. Once per rank: a
    /// repeated ack does not rewind again.
    pub fn advice_applied(&mut self, job: &str, rank: u32, advice_id: u64) -> Option<u64> {
        let state = self.jobs.get_mut(job)?;
        state.policy.applied(advice_id);
        let noted = state.rollbacks.iter_mut().find(|r| r.id == advice_id)?;
        if noted.applied_by.contains(&rank) {
            return None;
        }
        noted.applied_by.push(rank);
        let to_step = noted.to_step;
        state.policy.rolled_back();
        state.rewind(rank, to_step).then_some(to_step)
    }

    /// The job's whole detection state as bytes, for [`Engine::restore`] on
    /// another engine (cluster mode hands jobs between replicas this way).
    /// `None` when the job is unknown.
    pub fn snapshot(&self, job: &str) -> Option<Vec<u8>> {
        let state = self.jobs.get(job)?;
        let mut bytes = vec![SNAPSHOT_VERSION];
        // Writing plain data structures to a Vec cannot fail.
        bytes.extend(postcard::to_stdvec(state).expect("job state serializes"));
        Some(bytes)
    }

    /// Replaces a job's state with a snapshot taken by [`Engine::snapshot`].
    /// Rules come from this engine's rule book for the snapshot's profile.
    pub fn restore(&mut self, job: &str, bytes: &[u8]) -> Result<(), EngineError> {
        let fail = |reason: String| EngineError::Snapshot {
            job: job.to_owned(),
            reason,
        };
        if job.is_empty() {
            return Err(EngineError::EmptyJob);
        }
        let Some((&version, body)) = bytes.split_first() else {
            return Err(fail("it is empty".into()));
        };
        if version != SNAPSHOT_VERSION {
            return Err(fail(format!(
                "format version {version}, this build reads {SNAPSHOT_VERSION}"
            )));
        }
        let mut state: JobState = postcard::from_bytes(body).map_err(|e| fail(e.to_string()))?;
        state.rules = self.book.for_job(job, state.profile.as_deref())?;
        state.id = Arc::from(job);
        self.jobs.insert(state.id.clone(), state);
        Ok(())
    }

    /// Forgets a job and all its state; true when it existed.
    pub fn remove_job(&mut self, job: &str) -> bool {
        self.jobs.remove(job).is_some()
    }
}

/// Drops the hits another rank already reported: an event (a spike, a NaN) at
/// the same step, a lasting condition (a trend, a floor) within `window` steps.
fn dedupe_shared(
    reported: &mut Vec<(u64, RuleId, Option<Arc<str>>, u32)>,
    hits: &mut Vec<Hit>,
    worker: u32,
    window: u64,
) {
    hits.retain(|h| {
        let f = &h.finding;
        let seen = reported.iter().any(|(step, rule, layer, by)| {
            let near = if f.rule.is_event() {
                *step == f.step
            } else {
                step.saturating_add(window) > f.step
            };
            *rule == f.rule && *layer == f.layer && *by != worker && near
        });
        if !seen {
            reported.push((f.step, f.rule, f.layer.clone(), worker));
        }
        !seen
    });
}

/// The job's state, created with its effective rules on first sight.
fn job_entry<'a>(
    jobs: &'a mut HashMap<JobId, JobState>,
    book: &RuleBook,
    job: &str,
    profile: Option<&str>,
) -> Result<&'a mut JobState, EngineError> {
    if job.is_empty() {
        return Err(EngineError::EmptyJob);
    }
    if !jobs.contains_key(job) {
        let profile = profile.filter(|p| !p.is_empty());
        let rules = book.for_job(job, profile)?;
        let id: JobId = Arc::from(job);
        jobs.insert(id.clone(), JobState::new(id, rules, profile.map(str::to_owned)));
    }
    Ok(jobs.get_mut(job).expect("inserted above"))
}

/// Everything the engine knows about one job. Serialized whole (less what
/// the rule book gives back) as the job's snapshot.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JobState {
    #[serde(skip)]
    id: JobId,
    #[serde(skip)]
    rules: Rules,
    /// The rule profile the job was declared with: restoring re-derives the
    /// rules from the replica's rule book.
    profile: Option<String>,
    layer_names: Vec<Arc<str>>,
    world_size: Option<u32>,
    workers: Vec<Option<WorkerState>>,
    peers: Vec<Option<ranks::Peer>>,
    ranks_seen: usize,
    ranks: ranks::State,
    policy: policy::Policy,
    /// Scratch space for one observation's hits.
    #[serde(skip)]
    hits: Vec<Hit>,
    /// Findings reported recently (step, rule, layer, rank), so ranks sharing
    /// a signal report it once.
    reported: Vec<(u64, RuleId, Option<Arc<str>>, u32)>,
    /// Recent rollback advice, for its acknowledgements.
    rollbacks: VecDeque<NotedRollback>,
}

/// A rollback advice as published, and the ranks that applied it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NotedRollback {
    id: u64,
    to_step: u64,
    applied_by: Vec<u32>,
}

impl JobState {
    fn new(id: JobId, rules: Rules, profile: Option<String>) -> Self {
        Self {
            id,
            rules,
            profile,
            layer_names: Vec::new(),
            world_size: None,
            workers: Vec::new(),
            peers: Vec::new(),
            ranks_seen: 0,
            ranks: ranks::State::default(),
            policy: policy::Policy::default(),
            hits: Vec::new(),
            reported: Vec::new(),
            rollbacks: VecDeque::new(),
        }
    }

    fn status(&self) -> JobStatus {
        let workers: usize = self.workers.iter().flatten().map(WorkerState::bytes).sum();
        JobStatus {
            job: self.id.clone(),
            ranks: self.ranks_seen,
            world_size: self.world_size,
            max_step: self.ranks.max_step,
            layers: self.layer_names.len(),
            open_episodes: self.policy.open_episodes(),
            state_bytes: std::mem::size_of::<Self>()
                + workers
                + self.peers.capacity() * std::mem::size_of::<Option<ranks::Peer>>()
                + self.ranks.heap_bytes(),
        }
    }

    fn validate(&self, s: &Summary) -> Result<(), EngineError> {
        let worker = s.worker;
        if worker >= MAX_RANKS {
            return Err(EngineError::RankOutOfRange { worker });
        }
        if !s.layers.is_empty() && !self.layer_names.is_empty() && s.layers.len() != self.layer_names.len() {
            return Err(EngineError::LayerCount {
                worker,
                expected: self.layer_names.len(),
                got: s.layers.len(),
            });
        }
        if s.layers.len() > MAX_LAYERS {
            return Err(EngineError::TooManyLayers { got: s.layers.len() });
        }
        let last = self
            .peers
            .get(worker as usize)
            .and_then(|p| p.as_ref())
            .and_then(|p| p.last_step);
        match last {
            Some(last) if s.step == last => Err(EngineError::DuplicateStep { worker, step: s.step }),
            Some(last) if s.step < last => Err(EngineError::StepBackwards {
                worker,
                step: s.step,
                last,
            }),
            _ => Ok(()),
        }
    }

    fn observe(&mut self, s: &Summary, next_id: &mut u64, out: &mut Output) -> Result<(), EngineError> {
        self.validate(s)?;
        if self.layer_names.is_empty() && !s.layers.is_empty() {
            self.layer_names = (0..s.layers.len()).map(|i| Arc::from(format!("layer{i}"))).collect();
        }
        let rank = s.worker as usize;
        if self.workers.len() <= rank {
            self.workers.resize_with(rank + 1, || None);
            self.peers.resize_with(rank + 1, || None);
        }
        if self.workers[rank].is_none() {
            self.workers[rank] = Some(WorkerState::new(&self.rules));
            self.peers[rank] = Some(ranks::Peer::default());
            self.ranks_seen += 1;
        }
        self.policy.saw_lr(s.step, s.lr, &self.rules);
        let peer = self.peers[rank].as_mut().expect("created above");
        peer.last_step = Some(s.step);
        peer.last_time = s.time.filter(|t| t.is_finite()).or(peer.last_time);

        let rules = &self.rules;
        self.hits.clear();
        let mut em = Emitter {
            job: &self.id,
            worker: Some(s.worker),
            step: s.step,
            time: s.time,
            layer_names: &self.layer_names,
            hits: &mut self.hits,
        };
        let obs = Obs::new(s);
        self.workers[rank]
            .as_mut()
            .expect("created above")
            .observe(&obs, rules, &mut em);

        let expected = (self.world_size.unwrap_or(0) as usize).max(self.ranks_seen);
        if expected > 1 {
            dedupe_shared(&mut self.reported, em.hits, s.worker, rules.policy.cooldown_steps);
        }

        let advanced = self.ranks.max_step.is_none_or(|m| s.step > m);
        if advanced {
            self.ranks.max_step = Some(s.step);
            // Kept until the slowest rank is past them: ranks on separate
            // streams may arrive far apart and must still dedupe. Bounded, in
            // case a rank never comes back.
            let slowest = if self.ranks_seen < expected {
                0 // a declared rank has not reported yet
            } else {
                self.peers
                    .iter()
                    .flatten()
                    .filter_map(|p| p.last_step)
                    .min()
                    .unwrap_or(s.step)
            };
            let keep_from = slowest.saturating_sub(rules.policy.cooldown_steps.max(2 * rules.straggler.lag_steps + 2));
            self.reported.retain(|r| r.0 >= keep_from);
            if self.reported.len() > MAX_REPORTED {
                self.reported.sort_unstable_by_key(|r| r.0);
                let excess = self.reported.len() - MAX_REPORTED;
                self.reported.drain(..excess);
            }
        }
        em.worker = None;
        ranks::record_norm(
            &mut self.ranks,
            &mut self.peers,
            s.worker,
            s.step,
            obs.global_norm,
            expected,
            rules,
            &mut em,
        );
        if advanced && self.ranks_seen > 1 {
            ranks::scan_stragglers(&self.ranks, &mut self.peers, rules, &mut em);
        }
        if let Some(now) = s.time
            && self.ranks_seen > 1
        {
            ranks::scan_stalled(&mut self.ranks, &mut self.peers, now, rules, &mut em);
        }
        self.finish(s.step, next_id, out);
        Ok(())
    }

    fn rewind(&mut self, rank: u32, to_step: u64) -> bool {
        let r = rank as usize;
        let Some(Some(peer)) = self.peers.get_mut(r) else {
            return false;
        };
        if peer.last_step.is_none_or(|last| last <= to_step) {
            return false;
        }
        peer.last_step = Some(to_step);
        if let Some(w) = self.workers.get_mut(r) {
            *w = Some(WorkerState::new(&self.rules));
        }
        ranks::forget_after(&mut self.ranks, rank, to_step);
        self.ranks.max_step = self.peers.iter().flatten().filter_map(|p| p.last_step).max();
        true
    }

    fn tick(&mut self, now: f64, next_id: &mut u64, out: &mut Output) {
        let Some(step) = self.ranks.max_step else { return };
        self.hits.clear();
        let mut em = Emitter {
            job: &self.id,
            worker: None,
            step,
            time: Some(now),
            layer_names: &self.layer_names,
            hits: &mut self.hits,
        };
        ranks::scan_stalled(&mut self.ranks, &mut self.peers, now, &self.rules, &mut em);
        self.finish(step, next_id, out);
    }

    /// Policy, episode bookkeeping, and moving the findings out.
    fn finish(&mut self, step: u64, next_id: &mut u64, out: &mut Output) {
        if !self.hits.is_empty() {
            self.policy
                .decide(&self.hits, step, &self.rules, next_id, &mut out.advice);
        }
        if let Some(max) = self.ranks.max_step {
            self.policy.close_healthy(max, self.rules.policy.healthy_steps);
        }
        out.findings.extend(self.hits.drain(..).map(|h| h.finding));
    }
}

#[cfg(test)]
mod tests;
