//! Growth by orders of magnitude against the run's own level.
//!
//! The commonest failure (a learning rate or an initialisation far off)
//! explodes within a few steps, before any running statistic has warmed up.
//! This rule needs none: until the other rules have their statistics, it
//! compares each record with the smallest of the run's first `reference`
//! values, from the second record on; after that, with the run's moving level
//! (the spike rule's mean norm, the loss rule's median loss). The gradient
//! norm alone `norm_factor`× up asks for clipping at the scale of the early
//! norms; the loss following it (or, while the run is young, `loss_factor`×
//! up on its own) asks for a cut of the learning rate. Healthy runs grow
//! their norm a few-fold to ~25× over training; they never jump two orders of
//! magnitude above their first steps or their recent level.

use super::Obs;
use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal, num};
use crate::model::{RuleId, Severity};

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// How many of the first finite, non-zero gradient norms and positive
    /// losses (not blown-up ones) were taken in, and the largest such norm.
    norms: u32,
    losses: u32,
    norm_max: f64,
    /// The smallest of each, kept as the values come in: a run exploding
    /// from its first step must not drag its own reference up with it.
    norm_ref: Option<f64>,
    loss_ref: Option<f64>,
    norm_latch: Latch,
    loss_latch: Latch,
    /// A lone norm blow-up at this step (info so far): the next record tells
    /// whether the loss responded.
    watching: Option<(u64, f64)>,
}

/// A loss this far above its recent level right after a gradient blow-up
/// says the blow-up reached the weights.
const LOSS_RESPONSE: f64 = 0.1;

impl State {
    /// The run's early gradient norm: the smallest of its first values.
    pub fn norm_ref(&self) -> Option<f64> {
        self.norm_ref
    }
}

/// The run's moving level, once the rules that keep it have warmed up.
pub(crate) struct Levels {
    pub norm: Option<f64>,
    pub loss: Option<f64>,
}

pub(crate) fn check(state: &mut State, obs: &Obs, rules: &Rules, levels: &Levels, em: &mut Emitter) {
    let cfg = &rules.blowup;
    let norm = obs.global_norm.filter(|n| n.is_finite() && *n > 0.0);
    let loss = obs.s.loss.filter(|l| l.is_finite());
    let young = levels.norm.is_none() && levels.loss.is_none();
    let (norm_ref, loss_ref, against) = if young {
        (state.norm_ref, state.loss_ref, "its first records'")
    } else {
        (levels.norm, levels.loss, "its recent level")
    };
    let loss_ref = loss_ref.filter(|r| *r > 0.0);
    let norm_ratio = norm.zip(norm_ref.filter(|r| *r > 0.0)).map(|(n, r)| n / r);
    let loss_ratio = loss.zip(loss_ref).map(|(l, r)| l / r);
    let norm_up = norm_ratio.is_some_and(|r| r >= cfg.norm_factor);
    // Later in a run, a loss jump on its own is the loss rule's to judge
    // (noisy runs jump far and come back).
    let loss_up = loss_ratio.is_some_and(|r| (young && r >= cfg.loss_factor) || (norm_up && r >= cfg.loss_follows));

    let keep = cfg.reference;
    if let Some(n) = norm.filter(|_| !norm_up && state.norms < keep) {
        state.norms += 1;
        state.norm_max = state.norm_max.max(n);
        state.norm_ref = Some(state.norm_ref.map_or(n, |r| r.min(n)));
    }
    if let Some(l) = loss.filter(|l| *l > 0.0 && !loss_up && state.losses < keep) {
        state.losses += 1;
        state.loss_ref = Some(state.loss_ref.map_or(l, |r| r.min(l)));
    }
    if !cfg.enabled {
        return;
    }
    let step = obs.s.step;
    if let Some((at, ratio)) = state.watching.take()
        && let (Some(l), Some(r)) = (loss, levels.loss.filter(|r| *r > 0.0))
        && l >= r * (1.0 + LOSS_RESPONSE)
        && !norm_up
    {
        em.hit(
            RuleId::Blowup,
            Severity::Warning,
            ratio,
            cfg.norm_factor,
            format!(
                "gradient norm was {}× its recent level at step {at}, and the loss rose to {} ({:.0}% above its median) after it",
                num(ratio),
                num(l),
                (l / r - 1.0) * 100.0
            ),
        );
    }
    let remind = rules.policy.cooldown_steps;
    let loss_fires = state.loss_latch.update(loss_up, step, remind);
    let norm_was_up = state.norm_latch.active();
    let norm_fires = state.norm_latch.update(norm_up, step, remind);
    if loss_fires {
        let (l, r, lr) = (
            loss.unwrap_or(f64::NAN),
            loss_ref.unwrap_or(f64::NAN),
            loss_ratio.unwrap_or(f64::NAN),
        );
        let with_norm = match norm_ratio.filter(|_| norm_up) {
            Some(g) => format!(", and the gradient norm is {}× its own", num(g)),
            None => String::new(),
        };
        em.hit(
            RuleId::Blowup,
            Severity::Critical,
            lr,
            cfg.loss_factor,
            format!(
                "loss {} is {}× {against} {}{with_norm}: the learning rate is far too high",
                num(l),
                num(lr),
                num(r)
            ),
        )
        .propose(Proposal::ScaleLr);
    } else if norm_fires {
        let (n, r, g) = (
            norm.unwrap_or(f64::NAN),
            norm_ref.unwrap_or(f64::NAN),
            norm_ratio.unwrap_or(f64::NAN),
        );
        // Clip at the scale of the early norms (the largest of them), or at
        // the run's level.
        let max_norm = if young { state.norm_max.max(r) } else { r };
        // Early in a run, or still up a cooldown later, it is no lone spike.
        let severity = if young || norm_was_up {
            Severity::Warning
        } else {
            state.watching = Some((step, g));
            Severity::Info
        };
        em.hit(
            RuleId::Blowup,
            severity,
            g,
            cfg.norm_factor,
            format!("gradient norm {} is {}× {against} {}", num(n), num(g), num(r)),
        )
        .propose(Proposal::Clip { max_norm });
    }
}
