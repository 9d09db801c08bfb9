//! Per-layer rules: layer ceiling and floor (dead layers), vanishing across
//! depth (first/last layer ratio), and the update ratio ‖Δw‖/‖w‖.
//!
//! A dead layer is judged against its peers and its own past, never against
//! an absolute number alone: a converged small model has every layer's
//! gradient far below 1e-7, all together, and none of them is dead.

use super::Obs;
use crate::config::{NormFloor, Rules, UpdateRatio};
use crate::engine::hit::{Emitter, Latch, Proposal, num};
use crate::model::{LayerStats, RuleId, Severity};

/// One layer's state: a few counters and latches, well under 1 KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct LayerState {
    /// The layer's largest norm over its first records, and how many were seen.
    early: f32,
    seen: u8,
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
    /// Per layer, below this its norm is far below its early level (−∞ until
    /// that is known); derived from `early`, so rebuilt after a restore.
    /// Apart from the layers' states: a quiet record reads only these two.
    #[serde(skip)]
    low: Vec<f32>,
    /// Per layer, whether a latch is active or a floor run counting
    /// ([`LayerState::armed`]); derived, so rebuilt after a restore.
    #[serde(skip)]
    armed: Vec<bool>,
}

impl State {
    pub fn heap_bytes(&self) -> usize {
        self.layers.capacity() * std::mem::size_of::<LayerState>() + self.low.capacity() * 4 + self.armed.capacity()
    }
}

impl LayerState {
    /// Whether a quiet record would change anything: a latch to clear, a
    /// floor run to end.
    fn armed(&self) -> bool {
        self.floor_run > 0
            || self.floor.active()
            || self.ceiling.active()
            || self.update_high.active()
            || self.update_low.active()
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

/// What the per-layer rules read of one summary and the rules, for [`judge`].
struct Layers<'a> {
    obs: &'a Obs<'a>,
    layers: &'a [LayerStats],
    step: u64,
    remind: u64,
    layer_max: Option<f64>,
    floor: &'a NormFloor,
    update: &'a UpdateRatio,
}

/// A layer's ‖Δw‖/‖w‖, when both norms are reported, finite, and the
/// weights' norm is positive.
#[inline(always)]
fn update_ratio(l: &LayerStats) -> Option<f64> {
    if let (Some(p), Some(u)) = (l.param_norm, l.update_norm)
        && p.is_finite()
        && u.is_finite()
        && p > 0.0
    {
        Some(f64::from(u) / f64::from(p))
    } else {
        None
    }
}

/// The per-layer rules for one layer (a finite one) with a condition that
/// holds: ceiling, floor and update ratio, in that order. `low` is its
/// floor's limit ([`State::low`]), `typical` the layers' RMS once computed
/// for this summary.
#[cold]
#[inline(never)]
fn judge(
    cx: &Layers,
    i: usize,
    l: &LayerStats,
    low: f32,
    st: &mut LayerState,
    typical: &mut Option<f64>,
    em: &mut Emitter,
) {
    let (obs, step, remind, floor, update) = (cx.obs, cx.step, cx.remind, cx.floor, cx.update);
    let l2 = f64::from(l.l2);
    let rms = || rms(cx.layers);
    if let Some(max) = cx.layer_max
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
        let dead = l.l2 < low && l2 < floor.relative * *typical.get_or_insert_with(rms);
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
        && let Some(ratio) = update_ratio(l)
    {
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

pub(crate) fn check(state: &mut State, obs: &Obs, rules: &Rules, em: &mut Emitter) {
    check_with::<false>(state, obs, rules, em);
}

/// [`check`]; with `FULL`, every finite layer takes the full path (the tests
/// compare the two).
fn check_with<const FULL: bool>(state: &mut State, obs: &Obs, rules: &Rules, em: &mut Emitter) {
    let layers: &[LayerStats] = &obs.s.layers;
    if layers.is_empty() {
        return;
    }
    if state.layers.len() != layers.len() {
        state.layers.resize(layers.len(), LayerState::default());
    }
    if state.low.len() != state.layers.len() {
        // New layers, or a restored state (the early loop below rebuilds
        // both then): a new layer's `low` starts at 0, and it is not armed.
        state.low.resize(state.layers.len(), 0.0);
        state.armed.clear();
        state.armed.extend(state.layers.iter().map(LayerState::armed));
    }
    let step = obs.s.step;
    let remind = rules.policy.cooldown_steps;
    let (ceiling, floor, update) = (&rules.norm_ceiling, &rules.norm_floor, &rules.update_ratio);
    let layer_max = ceiling.layer_max.filter(|_| ceiling.enabled);
    // The layers' typical norm at this step, their root mean square: only
    // needed once a layer is far below its own early level.
    let mut typical = None;
    let early_records = rules.blowup.reference.min(u32::from(u8::MAX)) as u8;
    if !state.early_done {
        // The first records (finite ones) set each layer's early level.
        let mut done = true;
        let cap = floor.layer_min.unwrap_or(f64::INFINITY);
        for ((l, st), low) in layers.iter().zip(state.layers.iter_mut()).zip(state.low.iter_mut()) {
            if st.seen < early_records && l.l2.is_finite() && l.nonfinite == 0 {
                st.seen += 1;
                st.early = st.early.max(l.l2);
            }
            *low = if st.seen >= early_records {
                (floor.relative * f64::from(st.early)).min(cap) as f32
            } else {
                f32::NEG_INFINITY
            };
            done &= st.seen >= early_records;
        }
        state.early_done = done;
    }

    let cx = Layers {
        obs,
        layers,
        step,
        remind,
        layer_max,
        floor,
        update,
    };
    // A layer is quiet when none of its conditions holds: then the rules
    // below only clear its latches and its floor run, which the loop does
    // itself, and only when it is armed (a latch active or a run counting:
    // otherwise there is nothing to clear); a layer with a condition takes
    // the full path ([`judge`]). With a patience of 0 the floor condition
    // holds at every record, so no layer is quiet.
    let ceiling_max = layer_max.unwrap_or(f64::INFINITY);
    let quiet_floor = !floor.enabled || floor.patience > 0;
    let n = layers.len();
    let (states, lows, armed) = (&mut state.layers[..n], &state.low[..n], &mut state.armed[..n]);
    for (i, ((l, &low), armed)) in layers.iter().zip(lows).zip(armed.iter_mut()).enumerate() {
        if !l.l2.is_finite() || l.nonfinite > 0 {
            continue; // the non-finite rule reports it
        }
        let ratio = if update.enabled { update_ratio(l) } else { None };
        let loud = f64::from(l.l2) > ceiling_max
            || (floor.enabled && l.l2 < low)
            || ratio.is_some_and(|r| r > update.max || r < update.min);
        if FULL || loud || !quiet_floor {
            let st = &mut states[i];
            judge(&cx, i, l, low, st, &mut typical, em);
            *armed = st.armed();
            continue;
        }
        if !*armed {
            continue;
        }
        let st = &mut states[i];
        if layer_max.is_some() {
            st.ceiling.update(false, step, remind);
        }
        if floor.enabled {
            st.floor_run = 0;
            st.floor.update(false, step, remind);
        }
        if ratio.is_some() {
            st.update_high.update(false, step, remind);
            st.update_low.update(false, step, remind);
        }
        *armed = st.armed();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{JobId, Summary};

    /// Values that sit on every edge of the conditions: none, NaN, ±∞, 0,
    /// negative, tiny, huge, and the rules' own thresholds.
    const EDGES: [Option<f32>; 14] = [
        None,
        Some(f32::NAN),
        Some(f32::INFINITY),
        Some(f32::NEG_INFINITY),
        Some(0.0),
        Some(-1.0),
        Some(1e-12),
        Some(1e-8),
        Some(1e-4),
        Some(0.5),
        Some(1.0),
        Some(10.0),
        Some(1e3),
        Some(f32::MAX),
    ];

    /// The quiet path leaves every layer's state and every finding exactly
    /// as the full path does, whatever the values and the settings, and
    /// across restores.
    #[test]
    fn the_quiet_path_is_the_full_path() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut pick = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let job: JobId = Arc::from("j");
        let names: Vec<Arc<str>> = (0..6).map(|i| Arc::from(format!("layer{i}"))).collect();
        // The state lives on while the settings change under it (a job
        // restored under another rule book).
        let (mut fast, mut full) = (State::default(), State::default());
        let (mut step, mut fired) = (0u64, [0usize; 4]);
        for _ in 0..400 {
            let setting = pick(288);
            let mut rules = Rules::default();
            rules.policy.cooldown_steps = [0, 3, 20][setting % 3];
            rules.norm_ceiling.enabled = setting / 3 % 2 == 0;
            rules.norm_ceiling.layer_max = [None, Some(10.0)][setting / 6 % 2];
            rules.norm_floor.enabled = setting / 12 % 2 == 0;
            rules.norm_floor.patience = [0, 1, 2][setting / 24 % 3];
            rules.norm_floor.layer_min = [None, Some(1e-6)][setting / 72 % 2];
            rules.update_ratio.enabled = setting / 144 % 2 == 0;
            if setting % 5 == 0 {
                (rules.update_ratio.min, rules.update_ratio.max) = (-1.0, f64::INFINITY);
            }
            for _ in 0..40 {
                step += 1;
                let layers: Vec<LayerStats> = (0..names.len())
                    .map(|_| {
                        let quiet = pick(3) > 0; // mostly ordinary records
                        let l2 = if quiet {
                            Some([0.5, 1.0, 1e-4][pick(3)])
                        } else {
                            EDGES[pick(EDGES.len())]
                        };
                        LayerStats {
                            l2: l2.unwrap_or(0.0),
                            max_abs: 1.0,
                            nonfinite: u32::from(pick(20) == 0),
                            param_norm: if quiet { Some(1.0) } else { EDGES[pick(EDGES.len())] },
                            update_norm: if quiet { Some(1e-3) } else { EDGES[pick(EDGES.len())] },
                        }
                    })
                    .collect();
                let s = Summary {
                    step,
                    layers,
                    ..Summary::default()
                };
                let obs = Obs::new(&s);
                let run = |state: &mut State, all: bool| {
                    let mut hits = Vec::new();
                    let mut em = Emitter {
                        job: &job,
                        worker: Some(0),
                        step,
                        time: None,
                        layer_names: &names,
                        hits: &mut hits,
                    };
                    if all {
                        check_with::<true>(state, &obs, &rules, &mut em);
                    } else {
                        check_with::<false>(state, &obs, &rules, &mut em);
                    }
                    hits.iter()
                        .map(|h| format!("{:?} {:?}", h.finding, h.proposal))
                        .collect::<Vec<_>>()
                };
                if step % 97 == 0 {
                    // A snapshot and a restore of both: what is derived is
                    // rebuilt (under the rules of the moment).
                    let restore = |state: &State| -> State {
                        let bytes = postcard::to_allocvec(state).expect("serializes");
                        postcard::from_bytes(&bytes).expect("deserializes")
                    };
                    (fast, full) = (restore(&fast), restore(&full));
                }
                let (a, b) = (run(&mut fast, false), run(&mut full, true));
                assert_eq!(a, b, "setting {setting}, step {step}");
                for (rule, n) in ["NormCeiling", "NormFloor", "UpdateRatio", "Vanishing"]
                    .iter()
                    .zip(&mut fired)
                {
                    *n += a.iter().filter(|h| h.contains(rule)).count();
                }
                assert_eq!(
                    format!("{fast:?}"),
                    format!("{full:?}"),
                    "setting {setting}, step {step}"
                );
            }
        }
        // Every rule fired, again and again.
        assert!(fired.iter().all(|&n| n > 20), "{fired:?}");
    }
}
