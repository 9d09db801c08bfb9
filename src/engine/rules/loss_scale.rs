//! The AMP loss scale keeps backing off toward its minimum: fp16 overflows that
//! the scaler can no longer absorb. Lower the learning rate before the job dies.

use std::collections::VecDeque;

use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal};
use crate::model::{RuleId, Severity};

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    last: Option<f64>,
    backoffs: VecDeque<u64>,
    latch: Latch,
}

pub(crate) fn check(state: &mut State, step: u64, scale: Option<f64>, rules: &Rules, em: &mut Emitter) {
    let cfg = &rules.loss_scale_floor;
    let Some(scale) = scale.filter(|s| s.is_finite()) else {
        return;
    };
    if !cfg.enabled {
        return;
    }
    if state.last.is_some_and(|last| scale < last) {
        state.backoffs.push_back(step);
    }
    state.last = Some(scale);
    while state
        .backoffs
        .front()
        .is_some_and(|&s| s.saturating_add(cfg.window) <= step)
    {
        state.backoffs.pop_front();
    }
    let at_floor = scale <= cfg.min_scale;
    let backoffs = state.backoffs.len() as u32;
    let active = at_floor || backoffs >= cfg.max_backoffs;
    // Worse means a lower scale or more back-offs; a scale parked at the floor
    // after the advice does not escalate by itself.
    let badness = f64::from(backoffs) - scale.log2();
    if state
        .latch
        .update_worse(active, step, rules.policy.cooldown_steps, badness)
    {
        let message = if at_floor {
            format!("AMP loss scale fell to {scale} (floor {})", cfg.min_scale)
        } else {
            format!(
                "AMP loss scale backed off {backoffs} times in {} steps (now {scale})",
                cfg.window
            )
        };
        let (value, threshold) = if at_floor {
            (scale, cfg.min_scale)
        } else {
            (f64::from(backoffs), f64::from(cfg.max_backoffs))
        };
        em.hit(RuleId::LossScaleFloor, Severity::Warning, value, threshold, message)
            .propose(Proposal::ScaleLr);
    }
}
