//! Rules on the global gradient norm: spike (ZClip z-score), growth and
//! vanishing trends (least-squares slope of log-norm over a window of
//! records, and a slow collapse below the run's peak level), static ceiling,
//! and a floor relative to the run's early norms.
//!
//! A norm that reads exactly zero while the loss keeps changing is a logging
//! fault (some trainers log 0.0 when they did not measure), not a gradient:
//! it is reported once and kept out of every statistic.

use super::Obs;
use super::loss::LossTrend;
use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal, num, score};
use crate::engine::stats::{Ema, Window};
use crate::model::{RuleId, Severity};

/// Smoothing of the log-norm level the slow-collapse check follows.
const LEVEL_ALPHA: f64 = 0.9;
/// Zero readings (with a moving loss) before they are reported.
const ZERO_READINGS: u32 = 3;
/// A learning rate that rose this much over the growth window is a warm-up
/// ramp: it explains the norm's growth.
const LR_RAMP: f64 = 2.0;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    ema: Ema,
    /// Record index of the last gradient spike worth clipping (the loss
    /// rules link to it).
    pub last_spike: Option<u64>,
    log_norm: Window,
    /// Separate window only when the vanishing rule's window differs.
    vanish_log_norm: Option<Window>,
    /// The learning rate over the growth window (fitted in log space when
    /// growth fires), for a warm-up ramp.
    lr: Window,
    /// Smoothed log-norm and its highest value so far.
    level: Option<f64>,
    peak: f64,
    floor_run: u32,
    floor: Latch,
    ceiling: Latch,
    growth: Latch,
    vanishing: Latch,
    collapse: Latch,
    zero_readings: u32,
    zero_reported: bool,
    last_loss: Option<f64>,
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
            lr: Window::new(g),
            level: None,
            peak: f64::NEG_INFINITY,
            floor_run: 0,
            floor: Latch::default(),
            ceiling: Latch::default(),
            growth: Latch::default(),
            vanishing: Latch::default(),
            collapse: Latch::default(),
            zero_readings: 0,
            zero_reported: false,
            last_loss: None,
        }
    }

    /// The run's moving norm level, once the spike rule has warmed up.
    pub fn level(&self, rules: &Rules) -> Option<f64> {
        self.ema.ready(rules.grad_spike.warmup).then(|| self.ema.mean())
    }

    pub fn heap_bytes(&self) -> usize {
        self.log_norm.heap_bytes() + self.lr.heap_bytes() + self.vanish_log_norm.as_ref().map_or(0, Window::heap_bytes)
    }
}

/// What the other per-rank rules tell the gradient rules.
pub(crate) struct Context {
    /// What the loss did over the trend window.
    pub loss: LossTrend,
    /// The run's early gradient norm (the blow-up rule's reference).
    pub early_norm: Option<f64>,
    /// This rank's record index.
    pub record: u64,
}

pub(crate) fn check(state: &mut State, obs: &Obs, rules: &Rules, cx: &Context, em: &mut Emitter) {
    let loss = obs.s.loss.filter(|l| l.is_finite());
    let loss_moved = loss.is_some() && state.last_loss.is_some() && loss != state.last_loss;
    if loss.is_some() {
        state.last_loss = loss;
    }
    let Some(norm) = obs.global_norm.filter(|n| n.is_finite()) else {
        return;
    };
    if norm == 0.0 && loss_moved {
        zero_reading(state, obs, rules, em);
        return;
    }
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
            format!(
                "global gradient norm {} is above the configured maximum {max}",
                num(norm)
            ),
        )
        .propose(Proposal::Clip { max_norm: max });
    }

    floor(state, norm, step, rules, cx, em);
    spike(state, norm, rules, cx.record, em);

    let ln = norm.max(f64::MIN_POSITIVE).ln();
    state.log_norm.push(step as f64, ln);
    if let Some(w) = state.vanish_log_norm.as_mut() {
        w.push(step as f64, ln);
    }
    if let Some(lr) = obs.s.lr.filter(|lr| lr.is_finite() && *lr > 0.0) {
        state.lr.push(step as f64, lr);
    }
    let level = state.level.map_or(ln, |l| LEVEL_ALPHA * l + (1.0 - LEVEL_ALPHA) * ln);
    state.level = Some(level);
    state.peak = state.peak.max(level);
    trends(state, step, rules, cx.loss, em);
}

/// The norm reads exactly zero while the loss moves: reported once per run.
fn zero_reading(state: &mut State, obs: &Obs, rules: &Rules, em: &mut Emitter) {
    state.zero_readings = state.zero_readings.saturating_add(1);
    if !rules.norm_floor.enabled || state.zero_reported || state.zero_readings < ZERO_READINGS {
        return;
    }
    state.zero_reported = true;
    // Info: the run may well be healthy; the log is what is broken, and the
    // gradient rules are blind to those records.
    em.hit(
        RuleId::NormFloor,
        Severity::Info,
        0.0,
        0.0,
        format!(
            "the gradient norm reads exactly 0 on {} records while the loss keeps changing (step {}): \
             the trainer is not measuring it (a logging fault) or the gradients are lost; \
             such readings are left out of the gradient rules",
            state.zero_readings, obs.s.step
        ),
    );
}

/// The norm collapsed against the run's early norms and the loss stopped
/// falling: the model has stopped learning.
fn floor(state: &mut State, norm: f64, step: u64, rules: &Rules, cx: &Context, em: &mut Emitter) {
    let floor = &rules.norm_floor;
    let Some(early) = cx.early_norm.filter(|_| floor.enabled) else {
        return;
    };
    let limit = floor.relative * early;
    let below = norm < limit && floor.global_min.is_none_or(|m| norm < m) && cx.loss != LossTrend::Falling;
    state.floor_run = if below { state.floor_run.saturating_add(1) } else { 0 };
    if state
        .floor
        .update(state.floor_run >= floor.patience, step, rules.policy.cooldown_steps)
    {
        em.hit(
            RuleId::NormFloor,
            Severity::Warning,
            norm,
            limit,
            format!(
                "global gradient norm {} is below {}× its early level {} for {} records \
                 and the loss is not falling: the model has stopped learning",
                num(norm),
                floor.relative,
                num(early),
                state.floor_run
            ),
        );
    }
}

fn spike(state: &mut State, norm: f64, rules: &Rules, record: u64, em: &mut Emitter) {
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
        let severe = if z >= cfg.severe_z { "severe " } else { "" };
        let hit = em.hit(
            RuleId::GradSpike,
            Severity::Info,
            z,
            cfg.z,
            format!(
                "{severe}gradient spike: norm {} is {}σ above its moving mean {}",
                num(norm),
                score(z),
                num(state.ema.mean())
            ),
        );
        if norm >= cfg.min_clip_ratio * bound {
            hit.propose(Proposal::Clip { max_norm: bound });
            // Only a spike worth clipping corroborates a loss jump.
            state.last_spike = Some(record);
        }
    }
    // ZClip: the statistics take in the clipped value, so a spike does not
    // inflate the baseline it is judged against.
    state.ema.push(norm.min(bound), cfg.alpha, cfg.warmup);
}

fn trends(state: &mut State, step: u64, rules: &Rules, loss: LossTrend, em: &mut Emitter) {
    // A job that reports its loss is judged with it: the trends wait until
    // the loss has a window of its own (it fills a record after the norm's).
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
        // several-fold early on while the loss keeps falling, and a warm-up
        // ramp of the learning rate grows it too. Growth tenfold within one
        // window is an explosion whatever the loss does so far.
        let lr_rise = state
            .lr
            .fit_of(f64::ln)
            .map_or(1.0, |f| (f.slope * state.lr.span()).exp());
        let ramp = lr_rise >= LR_RAMP;
        let fast = factor >= g.fast_factor;
        let (severity, proposal, context) = match loss {
            _ if ramp => (
                Severity::Info,
                None,
                format!("while the learning rate ramps up {}×", num(lr_rise)),
            ),
            // Clip at the spike rule's bound: the level the norm had before.
            LossTrend::Falling if fast => (
                Severity::Warning,
                Some(state.ema.mean() + rules.grad_spike.z * state.ema.std())
                    .filter(|m| m.is_finite() && *m > 0.0)
                    .map(|max_norm| Proposal::Clip { max_norm }),
                "although the loss still falls".to_owned(),
            ),
            LossTrend::Falling => (Severity::Info, None, "while the loss keeps falling".to_owned()),
            LossTrend::NotFalling => (
                Severity::Warning,
                Some(Proposal::ScaleLr),
                "and the loss is not falling".to_owned(),
            ),
            LossTrend::Unreported | LossTrend::Unknown => (
                Severity::Warning,
                Some(Proposal::ScaleLr),
                "(no loss reported)".to_owned(),
            ),
        };
        let hit = em.hit(
            RuleId::GradGrowth,
            severity,
            factor,
            g.factor,
            format!(
                "gradient norm grew {}× over the last {span} steps {context}",
                num(factor)
            ),
        );
        if let Some(p) = proposal {
            hit.propose(p);
        }
    }

    let v = &rules.vanishing;
    let (vfit, vspan) = match &mut state.vanish_log_norm {
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
                "gradient norm fell {}× over the last {vspan} steps; check initialisation and normalisation",
                num(drop)
            ),
        );
    }

    // A slow collapse no window sees: the smoothed norm far below its peak
    // while the loss has stopped falling (a converged model's loss fell too).
    let fall = if v.enabled && loss == LossTrend::NotFalling {
        state.level.map_or(1.0, |l| (state.peak - l).exp())
    } else {
        1.0
    };
    let collapsed = v.enabled && fall >= v.long_drop && loss == LossTrend::NotFalling;
    if state.collapse.update_worse(collapsed, step, remind, fall) {
        em.hit(
            RuleId::Vanishing,
            Severity::Warning,
            fall,
            v.long_drop,
            format!(
                "gradient norm is {}× below its peak level and the loss is not falling: \
                 gradients are vanishing; check initialisation and normalisation",
                num(fall)
            ),
        );
    }
}
