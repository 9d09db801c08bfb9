//! Rules on the global gradient norm: spike (ZClip z-score), growth and
//! vanishing trends (least-squares slope of log-norm), static ceiling and floor.

use super::Obs;
use super::loss::LossTrend;
use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal};
use crate::engine::stats::{Ema, Window};
use crate::model::{RuleId, Severity};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    ema: Ema,
    /// Last step with a gradient spike (the loss rules link to it).
    pub last_spike: Option<u64>,
    log_norm: Window,
    /// Separate window only when the vanishing rule's window differs.
    vanish_log_norm: Option<Window>,
    floor_run: u32,
    floor: Latch,
    ceiling: Latch,
    growth: Latch,
    vanishing: Latch,
}

impl State {
    pub fn new(rules: &Rules) -> Self {
        let g = rules.grad_growth.window as usize;
        let v = rules.vanishing.window as usize;
        Self {
            ema: Ema::default(),
            last_spike: None,
            log_norm: Window::new(g),
            vanish_log_norm: (v != g).then(|| Window::new(v)),
            floor_run: 0,
            floor: Latch::default(),
            ceiling: Latch::default(),
            growth: Latch::default(),
            vanishing: Latch::default(),
        }
    }

    pub fn heap_bytes(&self) -> usize {
        self.log_norm.heap_bytes() + self.vanish_log_norm.as_ref().map_or(0, Window::heap_bytes)
    }
}

/// `loss`: whether the smoothed loss is lower than a trend window ago.
pub(crate) fn check(state: &mut State, obs: &Obs, rules: &Rules, loss: LossTrend, em: &mut Emitter) {
    let Some(norm) = obs.global_norm.filter(|n| n.is_finite()) else {
        return;
    };
    let step = obs.s.step;
    let remind = rules.policy.cooldown_steps;

    let ceiling = &rules.norm_ceiling;
    if let Some(max) = ceiling.global_max.filter(|_| ceiling.enabled)
        && state.ceiling.update(norm > max, step, remind)
    {
        em.hit(
            RuleId::NormCeiling,
            Severity::Info,
            norm,
            max,
            format!("global gradient norm {norm:.4} is above the configured maximum {max}"),
        )
        .propose(Proposal::Clip { max_norm: max });
    }

    let floor = &rules.norm_floor;
    if floor.enabled {
        state.floor_run = if norm < floor.global_min {
            state.floor_run.saturating_add(1)
        } else {
            0
        };
        if state.floor.update(state.floor_run >= floor.patience, step, remind) {
            em.hit(
                RuleId::NormFloor,
                Severity::Warning,
                norm,
                floor.global_min,
                format!(
                    "global gradient norm {norm:.3e} below {:e} for {} steps: the model has stopped learning",
                    floor.global_min, state.floor_run
                ),
            );
        }
    }

    spike(state, norm, step, rules, em);

    let ln = norm.max(f64::MIN_POSITIVE).ln();
    state.log_norm.push(step as f64, ln);
    if let Some(w) = state.vanish_log_norm.as_mut() {
        w.push(step as f64, ln);
    }
    trends(state, step, rules, loss, em);
}

fn spike(state: &mut State, norm: f64, step: u64, rules: &Rules, em: &mut Emitter) {
    let cfg = &rules.grad_spike;
    if !cfg.enabled {
        return;
    }
    if !state.ema.ready(cfg.warmup) {
        state.ema.push(norm, cfg.alpha, cfg.warmup);
        return;
    }
    let z = state.ema.z(norm);
    let bound = state.ema.mean() + cfg.z * state.ema.std();
    if z >= cfg.z {
        state.last_spike = Some(step);
        let severe = if z >= cfg.severe_z { "severe " } else { "" };
        let hit = em.hit(
            RuleId::GradSpike,
            Severity::Info,
            z,
            cfg.z,
            format!(
                "{severe}gradient spike: norm {norm:.4} is {z:.1}σ above its moving mean {:.4}",
                state.ema.mean()
            ),
        );
        if norm >= cfg.min_clip_ratio * bound {
            hit.propose(Proposal::Clip { max_norm: bound });
        }
    }
    // ZClip: the statistics take in the clipped value, so a spike does not
    // inflate the baseline it is judged against.
    state.ema.push(norm.min(bound), cfg.alpha, cfg.warmup);
}

fn trends(state: &mut State, step: u64, rules: &Rules, loss: LossTrend, em: &mut Emitter) {
    // A job that reports its loss is judged with it: the trends wait until
    // the loss has a window of its own (it fills a step after the norm's).
    if loss == LossTrend::Unknown {
        return;
    }
    let remind = rules.policy.cooldown_steps;
    let growth_fit = state.log_norm.is_full().then(|| state.log_norm.fit()).flatten();
    let span = state.log_norm.span();

    let g = &rules.grad_growth;
    let growing = growth_fit.filter(|f| g.enabled && f.r2 >= g.min_r2 && f.slope * span >= g.factor.ln());
    let factor = growing.map_or(0.0, |f| (f.slope * span).exp());
    if state.growth.update_worse(growing.is_some(), step, remind, factor) {
        // Trends alone are weak evidence: healthy runs often see the norm grow
        // several-fold early on while the loss keeps falling.
        let (severity, context) = match loss {
            LossTrend::Falling => (Severity::Info, "while the loss keeps falling"),
            LossTrend::NotFalling => (Severity::Warning, "and the loss is not falling"),
            LossTrend::Unreported | LossTrend::Unknown => (Severity::Warning, "(no loss reported)"),
        };
        let hit = em.hit(
            RuleId::GradGrowth,
            severity,
            factor,
            g.factor,
            format!("gradient norm grew {factor:.1}× over the last {span} steps {context}"),
        );
        if severity >= Severity::Warning {
            hit.propose(Proposal::ScaleLr);
        }
    }

    let v = &rules.vanishing;
    let (vfit, vspan) = match &state.vanish_log_norm {
        Some(w) => (w.is_full().then(|| w.fit()).flatten(), w.span()),
        None => (growth_fit, span),
    };
    let vanishing = vfit.filter(|f| v.enabled && f.r2 >= v.min_r2 && -f.slope * vspan >= v.drop.ln());
    let drop = vanishing.map_or(0.0, |f| (-f.slope * vspan).exp());
    if state.vanishing.update_worse(vanishing.is_some(), step, remind, drop) {
        let severity = if loss == LossTrend::Falling {
            Severity::Info
        } else {
            Severity::Warning
        };
        em.hit(
            RuleId::Vanishing,
            severity,
            drop,
            v.drop,
            format!(
                "gradient norm fell {drop:.1}× over the last {vspan} steps; check initialisation and normalisation"
            ),
        );
    }
}
