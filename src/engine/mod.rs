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
mod job;
mod layout;
mod per_rank;
mod policy;
mod rules;
pub mod stats;
mod worker;

use std::sync::Arc;

use crate::config::{ConfigError, RuleBook, Rules};
use crate::model::{Advice, Finding, JobId, Severity, Summary};
use job::{JobState, Jobs, NotedRollback, job_entry};
pub use layout::{Layout, Placement, agrees as layout_agrees};

/// Largest accepted rank (exclusive): state is indexed by rank.
pub const MAX_RANKS: u32 = 1 << 16;
/// Findings remembered per job for cross-rank dedupe, at most.
const MAX_REPORTED: usize = 4096;
/// First byte of a snapshot: bumped whenever the state's layout changes.
const SNAPSHOT_VERSION: u8 = 6;
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
    /// A layout that is none, or disagrees with the job's; names the Hello's field.
    #[error("{message}")]
    Layout { field: &'static str, message: String },
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
            EngineError::Layout { field: "rank", .. } => "rank_out_of_range",
            EngineError::Layout { .. } => "layout",
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
    /// The declaring rank's place in the job's layout; none: every rank is
    /// compared with every other (unless the job has a layout).
    pub placement: Option<Placement>,
}

/// A read-only view of one job's state.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub job: JobId,
    pub ranks: usize,
    pub world_size: Option<u32>,
    pub layout: Option<Layout>,
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
    jobs: Jobs,
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
            jobs: Jobs::default(),
            next_advice_id: 0,
        }
    }

    /// Declares a job (or a new rank's view of it): layer names, world size,
    /// rule profile and layout. Layer names are fixed by the first declaration
    /// that has them, the layout by the first that has one (its world size
    /// then is the layout's), a rank's replica group by its first placement.
    /// A declaration that disagrees is refused and changes nothing.
    pub fn declare(&mut self, job: &str, spec: &JobSpec) -> Result<(), EngineError> {
        if spec.layer_names.len() > MAX_LAYERS {
            return Err(EngineError::TooManyLayers {
                got: spec.layer_names.len(),
            });
        }
        let world_size = spec.world_size.filter(|&w| w > 0);
        if let Some(p) = &spec.placement {
            p.check(world_size)?;
        }
        let state = job_entry(&mut self.jobs, &self.book, job, spec.profile)?;
        if !spec.layer_names.is_empty()
            && !state.layer_names.is_empty()
            && (state.layer_names.len() != spec.layer_names.len()
                || state.layer_names.iter().zip(spec.layer_names).any(|(a, b)| **a != **b))
        {
            return Err(EngineError::LayerNames {
                job: job.to_owned(),
                expected: state.layer_names.len(),
                got: spec.layer_names.len(),
            });
        }
        layout::agrees(state.layout, spec.placement.as_ref(), world_size)?;
        if let Some(p) = &spec.placement {
            state.place(p)?;
        }
        if !spec.layer_names.is_empty() && state.layer_names.is_empty() {
            state.layer_names = spec.layer_names.iter().map(|n| Arc::from(n.as_str())).collect();
        }
        if let Some(w) = world_size {
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
        job.peers.get(rank)?.last_step
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

#[cfg(test)]
mod tests;
