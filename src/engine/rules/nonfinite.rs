//! NaN/Inf in the loss, the global norm or any layer.
//!
//! With AMP (a loss scale is reported) and a finite loss, non-finite gradients are
//! the scaler's normal overflow: info, and advice to lower the loss scale (the
//! loss-scale floor rule watches for it happening too often). Otherwise the step
//! is poisoned: critical, skip it; `repeat` such steps within `window` steps
//! propose a rollback.

use std::collections::VecDeque;

use super::Obs;
use crate::config::Nonfinite;
use crate::engine::hit::{Emitter, Proposal};
use crate::model::{RuleId, Severity};

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    recent: VecDeque<u64>,
}

pub(crate) fn check(state: &mut State, obs: &Obs, cfg: &Nonfinite, em: &mut Emitter) {
    if !cfg.enabled {
        return;
    }
    let s = obs.s;
    let loss_bad = s.loss.is_some_and(|l| !l.is_finite());
    let norm_bad = s.grad_norm.is_some_and(|n| !n.is_finite());
    let bad_layers = s
        .layers
        .iter()
        .filter(|l| l.nonfinite > 0 || !l.l2.is_finite() || !l.max_abs.is_finite())
        .count();
    if !(loss_bad || norm_bad || bad_layers > 0) {
        return;
    }
    while state
        .recent
        .front()
        .is_some_and(|&st| st.saturating_add(cfg.window) <= s.step)
    {
        state.recent.pop_front();
    }
    state.recent.push_back(s.step);

    let first_bad = s
        .layers
        .iter()
        .position(|l| l.nonfinite > 0 || !l.l2.is_finite() || !l.max_abs.is_finite());
    let mut what = Vec::new();
    if loss_bad {
        what.push(format!("loss {}", s.loss.unwrap_or(f64::NAN)));
    }
    if norm_bad {
        what.push(format!("gradient norm {}", s.grad_norm.unwrap_or(f64::NAN)));
    }
    if let Some(i) = first_bad {
        what.push(format!("{bad_layers} layer(s) starting at {}", em.layer_names[i]));
    }
    let what = what.join(", ");
    let count = state.recent.len() as f64;

    if s.loss_scale.is_some() && !loss_bad {
        let scale = s.loss_scale.unwrap_or(f64::NAN);
        em.hit(
            RuleId::Nonfinite,
            Severity::Info,
            count,
            f64::from(cfg.repeat),
            format!("non-finite gradients under AMP (loss scale {scale}): {what}"),
        )
        .propose(Proposal::ScaleLossScale);
        return;
    }
    let repeated = state.recent.len() >= cfg.repeat as usize;
    let layer = first_bad.map(|i| em.layer_name(i));
    let hit = em.hit(
        RuleId::Nonfinite,
        Severity::Critical,
        count,
        f64::from(cfg.repeat),
        if repeated {
            format!("non-finite values on {count} of the last {} steps: {what}", cfg.window)
        } else {
            format!("non-finite values: {what}")
        },
    );
    if let Some(layer) = layer {
        hit.on_layer(layer);
    }
    hit.propose(if repeated {
        Proposal::Rollback
    } else {
        Proposal::SkipStep
    });
}
