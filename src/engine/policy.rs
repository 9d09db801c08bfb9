//! Policy: turns the hits of one step into advice.
//!
//! - One episode per problem: per (job, family), and per rank for the rank
//!   family. Related rules firing together yield one advice.
//! - A cooldown: within `cooldown_steps` of the last advice of an episode,
//!   nothing is repeated; only a stronger remedy gets through.
//! - Escalation: when the problem is still there after the cooldown (the advice
//!   had time to act), the next rung of clip → scale LR → rollback → halt.
//!   Only strong (warning or critical) evidence escalates: gradient spikes
//!   alone stay at clip advice however often they come, since a healthy run
//!   whose norm grows as it learns fires the spike rule on step after step.
//! - Halt only when escalation demonstrably failed: an advice of the episode
//!   was applied (acknowledged as applied, a rollback that rewound the rank,
//!   or a learning rate seen to fall after `scale_lr`) and the problem came
//!   back. Without that, the ladder stops at rollback, which stands.
//! - A rollback that was applied and did not hold (the run diverged again
//!   from the state it went back to) is retried with the learning rate cut
//!   (`scale_lr` and `rollback` together), up to `max_rollbacks` rollbacks
//!   per episode: the course from a sound state was wrong, as when a run
//!   restarted from a checkpoint with the same settings diverges again.
//!   Then halt.
//! - A rank under suspicion gets one `inspect_worker` per episode.
//! - An episode ends after `healthy_steps` steps without a hit of its family.
//! - A rank under suspicion (an open rank-outlier, straggler or stalled
//!   episode) is its own problem: its gradient and loss hits get clip advice at
//!   most and never escalate the job-wide ladder.

use crate::config::Rules;
use crate::engine::hit::{Hit, Proposal};
use crate::model::{Action, Advice, Family, RuleId, Severity};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Episode {
    family: Family,
    subject: Option<u32>,
    opened_at: u64,
    last_hit: u64,
    /// Highest rung advised so far, and the step of the latest advice.
    rung: Option<u8>,
    last_advice: u64,
    hits_since_advice: u64,
    /// Worst severity seen in the episode (its hits and its advice).
    severity: Severity,
    /// Ids of the episode's latest advice, to recognise their acks.
    advice_ids: Vec<u64>,
    /// The step `scale_lr` was advised at, until the cut is seen applied.
    lr_cut_at: Option<u64>,
    /// An advice of the episode was applied: a recurrence means it failed.
    applied: bool,
    /// The rungs advised so far, one bit each.
    tried: u8,
    /// Rollbacks advised, and whether the latest was applied.
    #[serde(default)]
    rollbacks: u32,
    #[serde(default)]
    rollback_applied: bool,
}

/// Advice ids remembered per episode.
const EPISODE_ADVICE_IDS: usize = 8;

/// A job's open episodes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Policy {
    episodes: Vec<Episode>,
    /// Halt was advised: the job stays critical whatever follows.
    halted: bool,
    /// The latest learning rate reported.
    lr: Option<f64>,
}

const SCALE_LR: u8 = 2;
const ROLLBACK: u8 = 3;
const HALT: u8 = 4;

fn next_rung(rung: u8) -> u8 {
    match rung {
        0 | 1 => SCALE_LR,
        2 => ROLLBACK,
        _ => HALT,
    }
}

/// An episode's identity: the family, and the rank for the rank family.
type EpisodeKey = (Family, Option<u32>);

/// Hits of one step that share an episode: the key, the strongest hit, all hits.
type Group = (EpisodeKey, usize, Vec<usize>);

fn key(hit: &Hit) -> EpisodeKey {
    let family = hit.finding.rule.family();
    let subject = if family == Family::Rank {
        hit.finding.worker
    } else {
        None
    };
    (family, subject)
}

fn strength(hit: &Hit) -> (i16, Severity) {
    (hit.proposal.map_or(-1, |p| i16::from(p.rung())), hit.finding.severity)
}

impl Policy {
    /// Number of open episodes (a job with none is healthy).
    pub fn open_episodes(&self) -> usize {
        self.episodes.len()
    }

    /// Worst severity among the open episodes; `None` when the job is healthy.
    pub fn worst(&self) -> Option<Severity> {
        if self.halted {
            return Some(Severity::Critical);
        }
        self.episodes.iter().map(|e| e.severity).max()
    }

    /// Advice `id` was applied by a worker: its episode's next recurrence
    /// shows the remedy failed. True when the advice belongs to an open episode.
    pub fn applied(&mut self, id: u64) -> bool {
        let ep = self.episodes.iter_mut().find(|e| e.advice_ids.contains(&id));
        ep.map(|e| e.applied = true).is_some()
    }

    /// A rank applied a rollback: the episodes that advised one tried it.
    pub fn rolled_back(&mut self) {
        for ep in self
            .episodes
            .iter_mut()
            .filter(|e| e.rung.is_some_and(|r| r >= ROLLBACK))
        {
            ep.applied = true;
            ep.rollback_applied = true;
        }
    }

    /// Takes in a reported learning rate: one that drops at once to about
    /// the advised factor, within two cooldowns of `scale_lr`, shows the
    /// advice was applied (a schedule's own decay is gradual).
    pub fn saw_lr(&mut self, step: u64, lr: Option<f64>, rules: &Rules) {
        let Some(lr) = lr.filter(|l| l.is_finite() && *l >= 0.0) else {
            return;
        };
        let factor = rules.policy.lr_factor;
        let window = 2 * rules.policy.cooldown_steps;
        let cut = self.lr.is_some_and(|before| lr <= before * (1.0 + factor) / 2.0);
        self.lr = Some(lr);
        for ep in &mut self.episodes {
            match ep.lr_cut_at {
                Some(at) if step > at.saturating_add(window) => ep.lr_cut_at = None,
                Some(at) if cut && step > at => {
                    ep.lr_cut_at = None;
                    ep.applied = true;
                }
                _ => {}
            }
        }
    }

    pub fn decide(&mut self, hits: &[Hit], step: u64, rules: &Rules, next_id: &mut u64, out: &mut Vec<Advice>) {
        // Group by episode key, in first-seen order, keeping the strongest hit.
        let mut groups: Vec<Group> = Vec::new();
        for (i, hit) in hits.iter().enumerate() {
            let k = key(hit);
            match groups.iter_mut().find(|g| g.0 == k) {
                Some(g) => {
                    if strength(hit) > strength(&hits[g.1]) {
                        g.1 = i;
                    }
                    g.2.push(i);
                }
                None => groups.push((k, i, vec![i])),
            }
        }
        // Ranks already suspected of being the problem (an open rank episode, or
        // an outlier finding in this batch): their own gradient and loss signals
        // are that rank's local trouble and must not climb the job-wide ladder.
        let mut suspects: Vec<u32> = self
            .episodes
            .iter()
            .filter(|e| e.family == Family::Rank)
            .filter_map(|e| e.subject)
            .collect();
        suspects.extend(
            hits.iter()
                .filter(|h| h.finding.rule == RuleId::RankOutlier)
                .filter_map(|h| h.finding.worker),
        );
        for ((family, subject), best, members) in groups {
            let ep = match self
                .episodes
                .iter()
                .position(|e| e.family == family && e.subject == subject)
            {
                Some(i) => &mut self.episodes[i],
                None => {
                    self.episodes.push(Episode {
                        family,
                        subject,
                        opened_at: step,
                        last_hit: step,
                        rung: None,
                        last_advice: step,
                        hits_since_advice: 0,
                        severity: Severity::Info,
                        advice_ids: Vec::new(),
                        lr_cut_at: None,
                        applied: false,
                        tried: 0,
                        rollbacks: 0,
                        rollback_applied: false,
                    });
                    self.episodes.last_mut().expect("just pushed")
                }
            };
            ep.hits_since_advice += 1;
            // Ranks on separate streams arrive out of step order: a late
            // rank's hit must not move the episode back in time.
            ep.last_hit = ep.last_hit.max(step);
            ep.severity = members
                .iter()
                .map(|&i| hits[i].finding.severity)
                .fold(ep.severity, Severity::max);
            let hit = &hits[best];
            let Some(proposal) = hit.proposal else { continue };
            let local = family == Family::Instability
                && members
                    .iter()
                    .all(|&i| hits[i].finding.worker.is_some_and(|w| suspects.contains(&w)));
            if local && proposal.rung() > 0 {
                continue;
            }
            let Some((rung, escalated)) = choose(ep, hit, proposal, family, local, step, rules) else {
                continue;
            };
            // A rollback applied that did not hold: again, with the learning rate cut.
            let retry = escalated && rung == ROLLBACK && ep.rung == Some(ROLLBACK);
            let action = match (escalated, rung) {
                (false, _) => concrete(proposal, ep, rules),
                (true, SCALE_LR) => Action::ScaleLr {
                    factor: rules.policy.lr_factor,
                },
                (true, ROLLBACK) => Action::Rollback {
                    to_step: ep.opened_at.saturating_sub(rules.policy.rollback_steps),
                },
                (true, _) => Action::Halt,
            };
            let rung_severity = match rung {
                0 | 1 => Severity::Info,
                SCALE_LR => Severity::Warning,
                _ => Severity::Critical,
            };
            let reason = if retry {
                format!(
                    "{}; the problem came back after rollback {} of at most {}: rolling back again with the learning rate cut",
                    hit.finding.message, ep.rollbacks, rules.policy.max_rollbacks
                )
            } else if escalated {
                format!(
                    "{}; the problem persists {} steps after advice at step {}, escalating",
                    hit.finding.message,
                    step - ep.last_advice,
                    ep.last_advice
                )
            } else {
                hit.finding.message.clone()
            };
            let mut rule_ids: Vec<RuleId> = members.iter().map(|&i| hits[i].finding.rule).collect();
            rule_ids.sort_unstable();
            rule_ids.dedup();
            let mut evidence: Vec<(String, f64)> = members
                .iter()
                .map(|&i| (format!("{}.value", hits[i].finding.rule), hits[i].finding.value))
                .collect();
            evidence.push((format!("{}.threshold", hit.finding.rule), hit.finding.threshold));

            let severity = hit.finding.severity.max(rung_severity);
            ep.rung = Some(ep.rung.map_or(rung, |r| r.max(rung)));
            ep.tried |= 1 << rung;
            ep.last_advice = ep.last_advice.max(step);
            ep.hits_since_advice = 0;
            ep.severity = ep.severity.max(severity);
            self.halted |= action == Action::Halt;
            if matches!(action, Action::Rollback { .. }) {
                ep.rollbacks += 1;
                ep.rollback_applied = false;
            }
            let mut emit = |action: Action, ep: &mut Episode| {
                *next_id += 1;
                if ep.advice_ids.len() == EPISODE_ADVICE_IDS {
                    ep.advice_ids.remove(0);
                }
                ep.advice_ids.push(*next_id);
                if matches!(action, Action::ScaleLr { .. }) {
                    ep.lr_cut_at = Some(step);
                }
                Advice {
                    id: *next_id,
                    job: hit.finding.job.clone(),
                    target: None,
                    step,
                    apply_from: if action == Action::SkipStep {
                        step
                    } else {
                        step.saturating_add(1)
                    },
                    action,
                    severity,
                    rules: rule_ids.clone(),
                    reason: reason.clone(),
                    evidence: evidence.clone(),
                }
            };
            if retry {
                let factor = rules.policy.lr_factor;
                out.push(emit(Action::ScaleLr { factor }, ep));
            }
            out.push(emit(action, ep));
        }
    }
    /// Ends episodes with no hit for `healthy_steps` steps before `step`.
    pub fn close_healthy(&mut self, step: u64, healthy_steps: u64) {
        self.episodes
            .retain(|e| step < e.last_hit.saturating_add(healthy_steps));
    }
}

/// The rung to advise now and whether it is an escalation, or `None` to stay
/// quiet (cooldown).
fn choose(
    ep: &Episode,
    hit: &Hit,
    proposal: Proposal,
    family: Family,
    local: bool,
    step: u64,
    rules: &Rules,
) -> Option<(u8, bool)> {
    let rung = proposal.rung();
    let Some(top) = ep.rung else {
        return Some((rung, false));
    };
    if top >= HALT {
        return None; // halted: repeating it helps no one
    }
    if family == Family::Rank {
        return None; // one inspect_worker per rank and episode
    }
    let since = step.saturating_sub(ep.last_advice);
    if rung > top {
        return Some((rung, false));
    }
    if since < rules.policy.cooldown_steps {
        return None;
    }
    if !local && hit.confirmed {
        let next = next_rung(top);
        // Halting throws the run away: only once a remedy was applied and
        // failed. Until then the rollback advice stands, and a remedy the
        // ladder jumped over (a rollback straight away, then a divergence
        // that asks for a cut of the learning rate) is still worth advising.
        if next == HALT && !ep.applied {
            return (ep.tried & (1 << rung) == 0).then_some((rung, false));
        }
        if next == HALT && ep.rollback_applied && ep.rollbacks < rules.policy.max_rollbacks {
            return Some((ROLLBACK, true));
        }
        Some((next, true))
    } else {
        Some((rung, false))
    }
}

fn concrete(p: Proposal, ep: &Episode, rules: &Rules) -> Action {
    match p {
        Proposal::Clip { max_norm } => Action::ClipGradients { max_norm },
        Proposal::SkipStep => Action::SkipStep,
        Proposal::ScaleLossScale => Action::ScaleLossScale {
            factor: rules.policy.loss_scale_factor,
        },
        Proposal::ScaleLr => Action::ScaleLr {
            factor: rules.policy.lr_factor,
        },
        Proposal::Rollback => Action::Rollback {
            to_step: ep.opened_at.saturating_sub(rules.policy.rollback_steps),
        },
        Proposal::Inspect { rank } => Action::InspectWorker { rank },
    }
}
