//! One job's detection state: its ranks, rules, policy and cross-rank view.

use std::collections::VecDeque;

use hashbrown::hash_map::EntryRef;
use std::sync::Arc;

use super::hit::{Emitter, Hit};
use super::layout::{Layout, Placement};
use super::per_rank::PerRank;
use super::rules::{Obs, ranks};
use super::worker::WorkerState;
use super::*;
use crate::config::{RuleBook, Rules};
use crate::model::{JobId, RuleId, Summary};

/// Drops the hits another rank already reported: an event (a spike, a NaN) at
/// the same step, a lasting condition (a trend, a floor) within `window` steps.
pub(super) fn dedupe_shared(
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

/// The engine's jobs by id, hashed with std's SipHash (job names come from
/// clients). hashbrown's map rather than std's for `entry_ref`: a summary's
/// job is found with one lookup, not two.
pub(super) type Jobs = hashbrown::HashMap<JobId, JobState, std::hash::RandomState>;

/// The job's state, created with its effective rules on first sight.
pub(super) fn job_entry<'a>(
    jobs: &'a mut Jobs,
    book: &RuleBook,
    job: &str,
    profile: Option<&str>,
) -> Result<&'a mut JobState, EngineError> {
    if job.is_empty() {
        return Err(EngineError::EmptyJob);
    }
    match jobs.entry_ref(job) {
        EntryRef::Occupied(known) => Ok(known.into_mut()),
        EntryRef::Vacant(new) => {
            let profile = profile.filter(|p| !p.is_empty());
            let rules = book.for_job(job, profile)?;
            let id: JobId = Arc::from(job);
            Ok(new.insert_with_key(id.clone(), JobState::new(id, rules, profile.map(str::to_owned))))
        }
    }
}

/// Everything the engine knows about one job. Serialized whole (less what
/// the rule book gives back) as the job's snapshot.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct JobState {
    #[serde(skip)]
    pub(super) id: JobId,
    #[serde(skip)]
    pub(super) rules: Rules,
    /// The rule profile the job was declared with: restoring re-derives the
    /// rules from the replica's rule book.
    pub(super) profile: Option<String>,
    pub(super) layer_names: Vec<Arc<str>>,
    pub(super) world_size: Option<u32>,
    /// How the ranks split the model (its first declaration); none: every
    /// rank is compared with every other.
    pub(super) layout: Option<Layout>,
    /// Ranks placed in each replica group, at most `data_parallel`.
    pub(super) group_ranks: PerRank<u32>,
    /// Per-rank state, only for ranks that reported (a rank number costs
    /// nothing until its rank sends a summary).
    pub(super) workers: PerRank<WorkerState>,
    pub(super) peers: ranks::Peers,
    pub(super) ranks: ranks::State,
    pub(super) policy: policy::Policy,
    /// Scratch space for one observation's hits.
    #[serde(skip)]
    pub(super) hits: Vec<Hit>,
    /// Findings reported recently (step, rule, layer, rank), so ranks sharing
    /// a signal report it once.
    pub(super) reported: Vec<(u64, RuleId, Option<Arc<str>>, u32)>,
    /// Recent rollback advice, for its acknowledgements.
    pub(super) rollbacks: VecDeque<NotedRollback>,
}

/// A rollback advice as published, and the ranks that applied it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct NotedRollback {
    pub(super) id: u64,
    pub(super) to_step: u64,
    pub(super) applied_by: Vec<u32>,
}

impl JobState {
    pub(super) fn new(id: JobId, rules: Rules, profile: Option<String>) -> Self {
        Self {
            id,
            rules,
            profile,
            layer_names: Vec::new(),
            world_size: None,
            layout: None,
            group_ranks: PerRank::default(),
            workers: PerRank::default(),
            peers: ranks::Peers::default(),
            ranks: ranks::State::default(),
            policy: policy::Policy::default(),
            hits: Vec::new(),
            reported: Vec::new(),
            rollbacks: VecDeque::new(),
        }
    }

    pub(super) fn status(&self) -> JobStatus {
        let workers: usize = self.workers.values().map(WorkerState::bytes).sum();
        JobStatus {
            job: self.id.clone(),
            ranks: self.workers.len(),
            world_size: self.world_size,
            layout: self.layout,
            max_step: self.ranks.max_step,
            layers: self.layer_names.len(),
            open_episodes: self.policy.open_episodes(),
            state_bytes: std::mem::size_of::<Self>()
                + workers
                + self.workers.heap_bytes()
                + self.peers.heap_bytes()
                + self.group_ranks.heap_bytes()
                + self.ranks.heap_bytes(),
        }
    }

    /// Takes a rank's placement: the job's layout, when it has none yet (its
    /// world size then is the layout's), and the rank's replica group, when
    /// it has none yet and the group has room. Refused, it changes nothing.
    pub(super) fn place(&mut self, p: &Placement) -> Result<(), EngineError> {
        let group = p.replica_group;
        let layout_error = |message: String| EngineError::Layout {
            field: "layout.replica_group",
            message,
        };
        let placed = self.peers.get(p.rank).and_then(|peer| peer.group);
        match placed {
            Some(g) if g != group => {
                return Err(layout_error(format!(
                    "{group}, but rank {} is in replica group {g}",
                    p.rank
                )));
            }
            Some(_) => {}
            None => {
                let members = self.group_ranks.get(group).copied().unwrap_or(0);
                if members >= p.layout.data_parallel {
                    return Err(layout_error(format!(
                        "{group} already holds its data_parallel {members} ranks; rank {} would be one more",
                        p.rank
                    )));
                }
                *self.group_ranks.get_or_insert_with(group, || 0).0 += 1;
                self.peers.get_or_insert_with(p.rank, ranks::Peer::default).0.group = Some(group);
            }
        }
        if self.layout.is_none() {
            self.layout = Some(p.layout);
            self.world_size = Some(p.layout.ranks() as u32);
        }
        Ok(())
    }

    pub(super) fn validate(&self, s: &Summary) -> Result<(), EngineError> {
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
        let last = self.peers.get(worker).and_then(|p| p.last_step);
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

    pub(super) fn observe(&mut self, s: &Summary, next_id: &mut u64, out: &mut Output) -> Result<(), EngineError> {
        self.validate(s)?;
        if self.layer_names.is_empty() && !s.layers.is_empty() {
            self.layer_names = (0..s.layers.len()).map(|i| Arc::from(format!("layer{i}"))).collect();
        }
        let before = self.workers.len();
        let (worker, new) = self
            .workers
            .get_or_insert_with(s.worker, || WorkerState::new(&self.rules));
        let ranks_seen = before + usize::from(new);
        self.policy.saw_lr(s.step, s.lr, &self.rules);
        let (peer, _) = self.peers.get_or_insert_with(s.worker, ranks::Peer::default);
        peer.last_step = Some(s.step);
        peer.last_time = s.time.filter(|t| t.is_finite()).or(peer.last_time);
        let group = peer.group;

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
        worker.observe(&obs, rules, &mut em);

        let expected = (self.world_size.unwrap_or(0) as usize).max(ranks_seen);
        if expected > 1 {
            dedupe_shared(&mut self.reported, em.hits, s.worker, rules.policy.cooldown_steps);
        }

        let advanced = self.ranks.max_step.is_none_or(|m| s.step > m);
        if advanced {
            self.ranks.max_step = Some(s.step);
            // Kept until the slowest rank is past them: ranks on separate
            // streams may arrive far apart and must still dedupe. Bounded, in
            // case a rank never comes back.
            let slowest = if ranks_seen < expected {
                0 // a declared rank has not reported yet
            } else {
                self.peers.values().filter_map(|p| p.last_step).min().unwrap_or(s.step)
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
        // With a layout, a rank is compared within its replica group (one
        // that declared none, with no one); without, every rank is one group.
        let compared = match self.layout {
            None => Some((ranks::Group::Whole, expected)),
            Some(l) => group.map(|g| (ranks::Group::Replicas(g), l.data_parallel as usize)),
        };
        if let Some((group, expected)) = compared {
            ranks::record_norm(
                &mut self.ranks,
                &mut self.peers,
                s.worker,
                s.step,
                obs.global_norm,
                group,
                expected,
                rules,
                &mut em,
            );
        }
        if advanced && ranks_seen > 1 {
            ranks::scan_stragglers(&self.ranks, &mut self.peers, rules, &mut em);
        }
        if let Some(now) = s.time
            && ranks_seen > 1
        {
            ranks::scan_stalled(&mut self.ranks, &mut self.peers, now, rules, &mut em);
        }
        self.finish(s.step, next_id, out);
        Ok(())
    }

    pub(super) fn rewind(&mut self, rank: u32, to_step: u64) -> bool {
        let Some(peer) = self.peers.get_mut(rank) else {
            return false;
        };
        if peer.last_step.is_none_or(|last| last <= to_step) {
            return false;
        }
        peer.last_step = Some(to_step);
        if let Some(w) = self.workers.get_mut(rank) {
            *w = WorkerState::new(&self.rules);
        }
        ranks::forget_after(&mut self.ranks, rank, to_step);
        self.ranks.max_step = self.peers.values().filter_map(|p| p.last_step).max();
        true
    }

    pub(super) fn tick(&mut self, now: f64, next_id: &mut u64, out: &mut Output) {
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
    pub(super) fn finish(&mut self, step: u64, next_id: &mut u64, out: &mut Output) {
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
