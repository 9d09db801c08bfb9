//! Cross-rank rules: a rank whose norm disagrees with its peers (rank outlier),
//! a rank that lags the leader (straggler), and a rank that went silent while
//! its peers did not (stalled).
//!
//! Data-parallel ranks see different micro-batches, so their local norms
//! differ every step. The outlier rule learns the normal spread (the median
//! absolute deviation of log-norms around each step's median, averaged over
//! steps) and calls a rank an outlier when it stays outside it (`persist` of
//! the last `of` steps) or is far beyond it once. It compares only ranks that
//! hold the same part of the model: with a layout, a step is judged per
//! replica group (pipeline stages report different layers' norms), each with
//! its own spread; without one, all ranks are one group. Straggler and stalled
//! are job-wide: a rank lags whatever its group.
//!
//! They judge by the records' own steps and times, never a wall clock; the
//! service calls [`scan_stalled`] with its clock through `Engine::tick`.

use std::collections::BTreeMap;

use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal, num, score as score_text};
use crate::engine::per_rank::PerRank;
use crate::engine::stats::median;
use crate::model::{RuleId, Severity};

/// What the cross-rank rules track about one rank.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Peer {
    pub last_step: Option<u64>,
    pub last_time: Option<f64>,
    /// Its replica group, as its Hello placed it (none without a layout).
    pub group: Option<u32>,
    /// Whether the rank was outside the spread, one bit per judged step
    /// (newest lowest).
    outside: u32,
    outlier: Latch,
    straggler: Latch,
    stalled: Latch,
}

/// The cross-rank state of each rank that reported or was placed in a layout.
pub(crate) type Peers = PerRank<Peer>;

/// The ranks a norm is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// Every rank of the job (it declared no layout).
    Whole,
    /// The ranks of one replica group of the job's layout.
    Replicas(u32),
}

impl Group {
    fn key(self) -> u32 {
        match self {
            Group::Whole => 0,
            Group::Replicas(g) => g,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// Global norms per (step, group key) until every rank of the group has
    /// reported it (NaN: non-finite).
    pending: BTreeMap<(u64, u32), Pending>,
    pub max_step: Option<u64>,
    last_stall_scan: Option<f64>,
    /// The learned spread of each group that was judged, by group key.
    spreads: PerRank<Spread>,
    /// Per-step scratch (rank, norm, log-norm), kept for its capacity.
    #[serde(skip)]
    logs: Vec<(u32, f64, f64)>,
    #[serde(skip)]
    scratch: Vec<f64>,
    /// Judged steps' norm vectors, kept for their capacity (a step's group
    /// starts from one rather than allocating).
    #[serde(skip)]
    spare: Vec<Vec<(u32, f64)>>,
}

/// The learned spread of one group (MAD of log-norms across its ranks) and
/// the steps it has seen.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Spread {
    spread: f64,
    judged: u32,
}

/// MAD to standard deviation for normal data.
const MAD_SIGMA: f64 = 1.4826;
/// Smoothing of the learned spread once warmed up.
const SPREAD_ALPHA: f64 = 0.95;

/// One step's norms so far, and the time of the first.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Pending {
    since: Option<f64>,
    norms: Vec<(u32, f64)>,
}

/// Steps (of one group each) buffered at most; beyond, the oldest is
/// judged with what it has.
const MAX_PENDING: usize = 4096;
/// Judged steps' vectors kept for reuse, at most, and the largest kept.
const MAX_SPARE: usize = 64;
const MAX_SPARE_NORMS: usize = 1024;

impl State {
    pub fn heap_bytes(&self) -> usize {
        self.pending
            .values()
            .map(|v| v.norms.capacity() * 16 + 64)
            .sum::<usize>()
            + self.spreads.heap_bytes()
    }
}

/// Buffers one rank's norm for `step` and judges every step of a group that
/// is complete (all `expected` ranks of the group reported) or too old to
/// wait for (a straggler's): `straggler.lag_steps` behind the leader and, when
/// summaries carry times, first seen `straggler.min_lag_secs` ago. Ranks on
/// separate streams arrive in no particular order, so one running ahead must
/// not get steps judged before its peers could report them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_norm(
    state: &mut State,
    peers: &mut Peers,
    rank: u32,
    step: u64,
    norm: Option<f64>,
    group: Group,
    expected: usize,
    rules: &Rules,
    em: &mut Emitter,
) {
    let cfg = &rules.rank_outlier;
    let Some(norm) = norm else {
        return;
    };
    if !cfg.enabled || expected < cfg.min_ranks as usize {
        return;
    }
    let now = em.time.filter(|t| t.is_finite());
    let key = (step, group.key());
    let spare = &mut state.spare;
    let entry = state.pending.entry(key).or_insert_with(|| Pending {
        since: None,
        norms: spare.pop().unwrap_or_default(),
    });
    entry.since = entry.since.or(now);
    entry.norms.push((rank, if norm.is_finite() { norm } else { f64::NAN }));
    if entry.norms.len() >= expected {
        let entry = state.pending.remove(&key).unwrap_or_default();
        judge(state, step, group, &entry.norms, peers, rules, em);
        state.recycle(entry.norms);
    }
    let horizon = state.max_step.unwrap_or(step).saturating_sub(rules.straggler.lag_steps);
    let patience = rules.straggler.min_lag_secs;
    loop {
        let overfull = state.pending.len() > MAX_PENDING;
        let Some(entry) = state.pending.first_entry() else {
            break;
        };
        let waited = now.zip(entry.get().since).map(|(now, since)| now - since);
        if !overfull && (entry.key().0 >= horizon || waited.is_some_and(|w| w < patience)) {
            break;
        }
        let ((old_step, key), entry) = entry.remove_entry();
        let old_group = match group {
            Group::Whole => Group::Whole,
            Group::Replicas(_) => Group::Replicas(key),
        };
        judge(state, old_step, old_group, &entry.norms, peers, rules, em);
        state.recycle(entry.norms);
    }
}

impl State {
    /// Keeps a judged step's vector for the next step's group, within bounds.
    fn recycle(&mut self, mut norms: Vec<(u32, f64)>) {
        if self.spare.len() < MAX_SPARE && norms.capacity() <= MAX_SPARE_NORMS {
            norms.clear();
            self.spare.push(norms);
        }
    }
}

/// Drops a rank's buffered norms of steps after `step` (it rolled back and
/// will report them again).
pub(crate) fn forget_after(state: &mut State, rank: u32, step: u64) {
    use std::ops::Bound;
    let after = (Bound::Excluded((step, u32::MAX)), Bound::Unbounded);
    for (_, pending) in state.pending.range_mut(after) {
        pending.norms.retain(|(r, _)| *r != rank);
    }
    state.pending.retain(|_, p| !p.norms.is_empty());
}

fn judge(
    state: &mut State,
    step: u64,
    group: Group,
    entries: &[(u32, f64)],
    peers: &mut Peers,
    rules: &Rules,
    em: &mut Emitter,
) {
    let cfg = &rules.rank_outlier;
    let remind = rules.policy.cooldown_steps;
    let mut bad = entries.iter().filter(|e| !e.1.is_finite()).map(|e| e.0);
    let first_bad = bad.next();
    let bad_count = first_bad.map_or(0, |_| 1 + bad.count());
    let finite = entries.len() - bad_count;
    let min = cfg.min_ranks as usize;

    if let Some(rank) = first_bad.filter(|_| bad_count == 1 && finite + 1 >= min)
        && let Some(p) = peers.get_mut(rank)
        && p.outlier.update(true, step, remind)
    {
        let h = em.hit(
            RuleId::RankOutlier,
            Severity::Warning,
            f64::NAN,
            cfg.k,
            format!(
                "rank {rank} is the only one of {} with non-finite gradients at step {step}: bad shard or silent data corruption",
                among(group, entries.len())
            ),
        );
        h.about(rank).propose(Proposal::Inspect { rank });
        h.finding.step = step;
    }
    if finite < min {
        return;
    }
    let learned = state.spreads.get_or_insert_with(group.key(), Spread::default).0;
    let mut logs = std::mem::take(&mut state.logs);
    logs.clear();
    logs.extend(
        entries
            .iter()
            .filter(|e| e.1.is_finite())
            .map(|&(rank, x)| (rank, x, x.max(f64::MIN_POSITIVE).ln())),
    );
    let values = &mut state.scratch;
    values.clear();
    values.extend(logs.iter().map(|e| e.2));
    let Some(med) = median(values) else {
        state.logs = logs;
        return;
    };
    values.clear();
    values.extend(logs.iter().map(|e| (e.2 - med).abs()));
    let step_mad = median(values).unwrap_or(0.0);
    let warm = learned.judged >= cfg.warmup;
    let floor = cfg.min_rel_spread.ln_1p();
    let scale = (MAD_SIGMA * learned.spread.max(step_mad)).max(floor);
    // Learn the spread; once warmed up, an unusual step counts at most 3×,
    // so a burst of disagreement does not teach the rule to ignore it.
    learned.judged = learned.judged.saturating_add(1);
    if warm {
        let x = step_mad.min(3.0 * learned.spread.max(floor / MAD_SIGMA));
        learned.spread = SPREAD_ALPHA * learned.spread + (1.0 - SPREAD_ALPHA) * x;
    } else {
        learned.spread += (step_mad - learned.spread) / f64::from(learned.judged);
    }
    let mask = if cfg.of >= 32 { u32::MAX } else { (1u32 << cfg.of) - 1 };
    let med_norm = med.exp();
    for &(rank, x, lx) in &logs {
        let score = (lx - med).abs() / scale;
        let Some(p) = peers.get_mut(rank) else {
            continue;
        };
        p.outside = ((p.outside << 1) | u32::from(score > cfg.k)) & mask;
        let far = score > cfg.far * cfg.k;
        let persistent = warm && p.outside.count_ones() >= cfg.persist;
        if p.outlier.update(far || persistent, step, remind) {
            let how = if far {
                "far outside".to_owned()
            } else {
                format!("outside on {} of the last {} steps of", p.outside.count_ones(), cfg.of)
            };
            let h = em.hit(
                RuleId::RankOutlier,
                Severity::Warning,
                score,
                cfg.k,
                format!(
                    "rank {rank} gradient norm {} is {} spreads from the median {} of {} at step {step}, {how} the normal spread between them (±{:.0}%)",
                    num(x),
                    score_text(score),
                    num(med_norm),
                    among(group, entries.len()),
                    (scale.exp() - 1.0) * 100.0
                ),
            );
            h.about(rank).propose(Proposal::Inspect { rank });
            h.finding.step = step;
        }
    }
    state.logs = logs;
}

/// The ranks a step was judged among, for a finding's message.
fn among(group: Group, ranks: usize) -> String {
    match group {
        Group::Whole => format!("{ranks} ranks"),
        Group::Replicas(g) => format!("{ranks} ranks of replica group {g}"),
    }
}

/// Called when the job's leading step advances: flags ranks `lag_steps` behind.
pub(crate) fn scan_stragglers(state: &State, peers: &mut Peers, rules: &Rules, em: &mut Emitter) {
    let cfg = &rules.straggler;
    let Some(max) = state.max_step.filter(|_| cfg.enabled) else {
        return;
    };
    let newest = peers
        .values()
        .filter_map(|p| p.last_time)
        .fold(f64::NEG_INFINITY, f64::max);
    peers.for_each_mut(|rank, p| {
        let Some(last) = p.last_step else { return };
        let lag = max.saturating_sub(last);
        let long_enough = p.last_time.is_none_or(|t| newest - t >= cfg.min_lag_secs);
        if p.straggler.update_worse(
            lag >= cfg.lag_steps && long_enough,
            max,
            rules.policy.cooldown_steps,
            lag as f64,
        ) {
            em.hit(
                RuleId::Straggler,
                Severity::Warning,
                lag as f64,
                cfg.lag_steps as f64,
                format!("rank {rank} is {lag} steps behind the leading rank (step {max})"),
            )
            .about(rank)
            .propose(Proposal::Inspect { rank });
        }
    });
}

/// Flags ranks silent for `timeout_secs` at time `now` while a peer is not.
/// Throttled to one scan per second of record time.
pub(crate) fn scan_stalled(state: &mut State, peers: &mut Peers, now: f64, rules: &Rules, em: &mut Emitter) {
    let cfg = &rules.stalled;
    if !cfg.enabled || !now.is_finite() || state.last_stall_scan.is_some_and(|t| now < t + 1.0) {
        return;
    }
    state.last_stall_scan = Some(now);
    let newest = peers
        .values()
        .filter_map(|p| p.last_time)
        .fold(f64::NEG_INFINITY, f64::max);
    let anyone_alive = now - newest < cfg.timeout_secs;
    let step = state.max_step.unwrap_or(0);
    peers.for_each_mut(|rank, p| {
        let Some(last) = p.last_time else { return };
        let silent = now - last;
        let active = anyone_alive && silent >= cfg.timeout_secs;
        if p.stalled
            .update_worse(active, step, rules.policy.cooldown_steps, silent)
        {
            em.hit(
                RuleId::Stalled,
                Severity::Warning,
                silent,
                cfg.timeout_secs,
                format!(
                    "rank {rank} sent nothing for {silent:.0} s (last step {}) while its peers kept going",
                    p.last_step.unwrap_or(0)
                ),
            )
            .about(rank)
            .propose(Proposal::Inspect { rank });
        }
    });
}
