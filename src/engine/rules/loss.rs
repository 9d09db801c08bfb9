//! Loss rules: spike (z-score on an EMA, or a multiple of the recent minimum)
//! and divergence (the smoothed loss rises over a window).
//!
//! A loss spike within `link_steps` of a gradient spike is the classic
//! instability: critical, roll back. A loss spike alone (a bad batch) is a
//! warning: skip the step.

use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal};
use crate::engine::stats::{Ema, SlidingMin, Window};
use crate::model::{RuleId, Severity};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    ema: Ema,
    recent_min: SlidingMin,
    smooth: Option<f64>,
    smooth_n: u32,
    smooth_min: SlidingMin,
    /// Smoothed loss over the growth window, to tell whether the loss is falling.
    history: Window,
    diverging: Latch,
}

/// What the loss did over the trend window, for the gradient trend rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LossTrend {
    Falling,
    NotFalling,
    /// Reported, but not for a whole window yet.
    Unknown,
    /// The job reports no (finite) loss.
    Unreported,
}

impl State {
    pub fn new(rules: &Rules) -> Self {
        Self {
            ema: Ema::default(),
            recent_min: SlidingMin::default(),
            smooth: None,
            smooth_n: 0,
            smooth_min: SlidingMin::default(),
            history: Window::new(rules.grad_growth.window as usize),
            diverging: Latch::default(),
        }
    }

    /// Whether the smoothed loss fell by at least `by` (relative) over the
    /// trend window.
    pub fn trend(&self, by: f64) -> LossTrend {
        let Some(now) = self.smooth else {
            return LossTrend::Unreported;
        };
        match self.history.oldest().filter(|_| self.history.is_full()) {
            None => LossTrend::Unknown,
            Some(then) if now < then - by * then.abs() => LossTrend::Falling,
            Some(_) => LossTrend::NotFalling,
        }
    }

    pub fn heap_bytes(&self) -> usize {
        self.history.heap_bytes()
    }
}

pub(crate) fn check(
    state: &mut State,
    step: u64,
    loss: Option<f64>,
    last_grad_spike: Option<u64>,
    rules: &Rules,
    em: &mut Emitter,
) {
    let Some(loss) = loss.filter(|l| l.is_finite()) else {
        return;
    };
    let cfg = &rules.loss_spike;
    let div = &rules.loss_divergence;

    let mut clipped = loss;
    if cfg.enabled && state.ema.ready(cfg.warmup) {
        let z = state.ema.z(loss);
        let bound = state.ema.mean() + cfg.z * state.ema.std();
        let min = state.recent_min.min().map(|(_, m)| m).filter(|m| *m > 0.0);
        let ratio = min.map(|m| loss / m);
        let by_ratio = ratio.is_some_and(|r| r >= cfg.ratio_to_min);
        let mean = state.ema.mean();
        let by_z = z >= cfg.z && loss - mean >= cfg.min_rise * mean.abs();
        if by_z || by_ratio {
            let linked = last_grad_spike.is_some_and(|g| g.saturating_add(cfg.link_steps) >= step);
            let (value, threshold, why) = if by_z {
                (
                    z,
                    cfg.z,
                    format!("{z:.1}σ above its moving mean {:.4}", state.ema.mean()),
                )
            } else {
                let r = ratio.unwrap_or(f64::NAN);
                (r, cfg.ratio_to_min, format!("{r:.1}× its recent minimum"))
            };
            if linked {
                em.hit(
                    RuleId::LossSpike,
                    Severity::Critical,
                    value,
                    threshold,
                    format!("loss {loss:.4} is {why}, right after a gradient spike"),
                )
                .propose(Proposal::Rollback);
            } else {
                em.hit(
                    RuleId::LossSpike,
                    Severity::Warning,
                    value,
                    threshold,
                    format!("loss {loss:.4} is {why}"),
                )
                .propose(Proposal::SkipStep);
            }
        }
        clipped = loss.min(bound);
    }
    if cfg.enabled {
        state.ema.push(clipped, cfg.alpha, cfg.warmup);
    }
    state.recent_min.push(step, loss, u64::from(div.window));

    // Divergence looks at a smoothed loss that takes in the spike-clipped value,
    // so a one-step spike does not read as a trend.
    let smooth = match state.smooth {
        Some(s) => div.alpha * s + (1.0 - div.alpha) * clipped,
        None => clipped,
    };
    state.smooth = Some(smooth);
    state.smooth_n = state.smooth_n.saturating_add(1);
    state.history.push(step as f64, smooth);
    state.smooth_min.push(step, smooth, u64::from(div.window));
    if !div.enabled || state.smooth_n < cfg.warmup.max(div.window / 4) {
        return;
    }
    let Some((min_step, min)) = state.smooth_min.min() else {
        return;
    };
    let rise = (smooth - min) / min.abs().max(f64::MIN_POSITIVE);
    let active = rise >= div.rise && min_step < step;
    if state
        .diverging
        .update_worse(active, step, rules.policy.cooldown_steps, rise)
    {
        em.hit(
            RuleId::LossDivergence,
            Severity::Critical,
            rise,
            div.rise,
            format!(
                "loss is diverging: smoothed loss {smooth:.4} is {:.0}% above its minimum {min:.4} at step {min_step}",
                rise * 100.0
            ),
        )
        .propose(Proposal::ScaleLr);
    }
}
