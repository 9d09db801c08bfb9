//! Per-layer rules: layer ceiling and floor (dead layers), vanishing across
//! depth (first/last layer ratio), and the update ratio ‖Δw‖/‖w‖.
//!
//! A dead layer is judged against its peers and its own past, never against
//! an absolute number alone: a converged small model has every layer's
//! gradient far below 1e-7, all together, and none of them is dead.

use super::Obs;
use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal, num};
use crate::model::{LayerStats, RuleId, Severity};

/// One layer's state: a few counters and latches, well under 1 KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct LayerState {
    /// The layer's largest norm over its first records, and how many were seen.
    early: f32,
    seen: u8,
    /// Below this the layer is far below its early level (−∞ until that
    /// is known); derived from `early`, so rebuilt after a restore.
    #[serde(skip)]
    low: f32,
    floor_run: u32,
    floor: Latch,
    ceiling: Latch,
    update_high: Latch,
    update_low: Latch,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    layers: Vec<LayerState>,
    depth: Latch,
    /// Every layer has its early level (recomputed after a restore).
    #[serde(skip)]
    early_done: bool,
}

impl State {
    pub fn heap_bytes(&self) -> usize {
        self.layers.capacity() * std::mem::size_of::<LayerState>()
    }
}

/// The layers' root mean square (finite ones): out of the per-layer loop,
/// since only a layer far below its early level needs it.
#[cold]
#[inline(never)]
fn rms(layers: &[LayerStats]) -> f64 {
    let (sum, finite) = layers
        .iter()
        .map(|l| f64::from(l.l2))
        .filter(|x| x.is_finite())
        .fold((0.0, 0usize), |(s, n), x| (s + x * x, n + 1));
    if finite > 0 { (sum / finite as f64).sqrt() } else { 0.0 }
}

pub(crate) fn check(state: &mut State, obs: &Obs, rules: &Rules, em: &mut Emitter) {
    let layers: &[LayerStats] = &obs.s.layers;
    if layers.is_empty() {
        return;
    }
    if state.layers.len() != layers.len() {
        state.layers.resize(layers.len(), LayerState::default());
    }
    let step = obs.s.step;
    let remind = rules.policy.cooldown_steps;
    let (ceiling, floor, update) = (&rules.norm_ceiling, &rules.norm_floor, &rules.update_ratio);
    let layer_max = ceiling.layer_max.filter(|_| ceiling.enabled);
    // The layers' typical norm at this step, their root mean square: only
    // needed once a layer is far below its own early level.
    let mut typical = None;
    let rms = || rms(layers);
    let early_records = rules.blowup.reference.min(u32::from(u8::MAX)) as u8;
    if !state.early_done {
        // The first records (finite ones) set each layer's early level.
        let mut done = true;
        let cap = floor.layer_min.unwrap_or(f64::INFINITY);
        for (l, st) in layers.iter().zip(state.layers.iter_mut()) {
            if st.seen < early_records && l.l2.is_finite() && l.nonfinite == 0 {
                st.seen += 1;
                st.early = st.early.max(l.l2);
            }
            st.low = if st.seen >= early_records {
                (floor.relative * f64::from(st.early)).min(cap) as f32
            } else {
                f32::NEG_INFINITY
            };
            done &= st.seen >= early_records;
        }
        state.early_done = done;
    }

    let states = &mut state.layers[..layers.len()];
    for i in 0..layers.len() {
        let (l, st) = (&layers[i], &mut states[i]);
        let l2 = f64::from(l.l2);
        if !l2.is_finite() || l.nonfinite > 0 {
            continue; // the non-finite rule reports it
        }
        if let Some(max) = layer_max
            && st.ceiling.update(l2 > max, step, remind)
        {
            // Clipping the whole gradient by max/l2 brings this layer under its limit.
            let max_norm = obs.global_norm.filter(|g| g.is_finite()).map_or(max, |g| g * max / l2);
            let name = em.layer_name(i);
            em.hit(
                RuleId::NormCeiling,
                Severity::Info,
                l2,
                max,
                format!(
                    "layer {name} gradient norm {} is above the configured maximum {}",
                    num(l2),
                    num(max)
                ),
            )
            .on_layer(name)
            .propose(Proposal::Clip { max_norm });
        }
        if floor.enabled {
            let dead = l.l2 < st.low && l2 < floor.relative * *typical.get_or_insert_with(rms);
            st.floor_run = if dead { st.floor_run.saturating_add(1) } else { 0 };
            if st.floor.update(st.floor_run >= floor.patience, step, remind) {
                let typical = *typical.get_or_insert_with(rms);
                let limit = floor.relative * typical.min(f64::from(st.early));
                let name = em.layer_name(i);
                em.hit(
                    RuleId::NormFloor,
                    Severity::Warning,
                    l2,
                    limit,
                    format!(
                        "dead layer {name}: gradient norm {} for {} records, below {}× both the layers' typical {} and its own early {}",
                        num(l2),
                        st.floor_run,
                        floor.relative,
                        num(typical),
                        num(f64::from(st.early))
                    ),
                )
                .on_layer(name);
            }
        }
        if update.enabled
            && let (Some(p), Some(u)) = (l.param_norm, l.update_norm)
            && p.is_finite()
            && u.is_finite()
            && p > 0.0
        {
            let ratio = f64::from(u) / f64::from(p);
            if st.update_high.update(ratio > update.max, step, remind) {
                let name = em.layer_name(i);
                em.hit(
                    RuleId::UpdateRatio,
                    Severity::Warning,
                    ratio,
                    update.max,
                    format!("layer {name} update is {ratio:.3e}× its weights (above {})", update.max),
                )
                .on_layer(name)
                .propose(Proposal::ScaleLr);
            }
            if st.update_low.update(ratio < update.min, step, remind) {
                let name = em.layer_name(i);
                em.hit(
                    RuleId::UpdateRatio,
                    Severity::Info,
                    ratio,
                    update.min,
                    format!(
                        "layer {name} barely moves: update is {ratio:.3e}× its weights (below {:e})",
                        update.min
                    ),
                )
                .on_layer(name);
            }
        }
    }

    let v = &rules.vanishing;
    if v.enabled && layers.len() >= 2 {
        let (first, last) = (f64::from(layers[0].l2), f64::from(layers[layers.len() - 1].l2));
        let ratio = first / last;
        // A first layer at exactly zero is a dead layer (the floor rule), not a trend.
        let active = first > 0.0 && last.is_finite() && last > 0.0 && ratio < v.depth_ratio;
        if state.depth.update(active, step, remind) {
            let (a, b) = (em.layer_name(0), em.layer_name(layers.len() - 1));
            em.hit(
                RuleId::Vanishing,
                Severity::Warning,
                ratio,
                v.depth_ratio,
                format!("gradients vanish with depth: first layer {a} norm is {ratio:.2e}× the last layer {b}"),
            )
            .on_layer(a);
        }
    }
}
