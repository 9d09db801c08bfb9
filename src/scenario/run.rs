//! [`Scenario`]: the run played one step at a time, and how advice moves its
//! hidden state (the closed-loop dynamics of the module documentation).

use std::collections::VecDeque;

use super::ScenarioConfig;
use super::fault::{Fault, FaultPlan, draw_plan};
use super::rng::{Rng, mix};
use super::shape::{
    LOSS_NOISE, LR_MAX, LayerProfile, NORM_NOISE, P_HARD_BATCH, P_NATURAL_SPIKE, RANK_NOISE, WANDER_NOISE, WANDER_PHI,
    base_norm, healthy_loss, layer_profiles, loss_cap, lr_at,
};
use crate::model::{Action, LayerStats, Summary};

/// LR scale at and below which an "edge of stability" fault stops growing.
const STABLE_LR_SCALE: f64 = 0.6;
/// The vanishing level where norms bottom out (×1e-9).
const VANISH_MAX: f64 = 20.7;
const HISTORY: usize = 4096;
/// AMP: an fp16 overflow happens when scale × norm passes this.
const AMP_OVERFLOW: f64 = 262_144.0;
const AMP_GROWTH_STEPS: u64 = 500;
/// The hidden training state a checkpoint holds.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    /// The step this state enters.
    step: u64,
    progress: f64,
    x: f64,
    y: f64,
    v: f64,
}

/// A deterministic multi-rank training run with one injected fault.
#[derive(Debug, Clone)]
pub struct Scenario {
    cfg: ScenarioConfig,
    plan: FaultPlan,
    layers: Vec<LayerProfile>,
    names: Vec<String>,
    /// Persistent per-rank log offset of the local norm.
    rank_offset: Vec<f64>,
    step: u64,
    halted: bool,
    state: Snapshot,
    wander: f64,
    lr_scale: f64,
    clip: Option<f64>,
    outlier_fixed: bool,
    stall_resumed: bool,
    loss_scale: f64,
    clean_steps: u64,
    history: VecDeque<Snapshot>,
}

impl Scenario {
    /// A run of `cfg`; the fault's details (rank, layer, size) are drawn from
    /// the seed and readable through [`Scenario::plan`].
    pub fn new(cfg: ScenarioConfig) -> Self {
        let mut cfg = cfg;
        cfg.workers = cfg.workers.max(1);
        let mut rng = Rng::new(mix(cfg.seed, u64::MAX));
        let layers = layer_profiles(cfg.layers, &mut rng);
        let rank_offset = (0..cfg.workers).map(|_| 0.01 * rng.normal()).collect();
        let plan = draw_plan(&cfg, &mut rng);
        let names = layers.iter().map(|l| l.name.clone()).collect();
        Self {
            plan,
            layers,
            names,
            rank_offset,
            step: 0,
            halted: false,
            state: Snapshot::default(),
            wander: 0.0,
            lr_scale: 1.0,
            clip: None,
            outlier_fixed: false,
            stall_resumed: false,
            loss_scale: 65_536.0,
            clean_steps: 0,
            history: VecDeque::new(),
            cfg,
        }
    }

    /// Layer names in the order of every summary's `layers`: `embed`,
    /// `blocks.0.attn`, `blocks.0.mlp`, `blocks.1.attn`, ..., `head`.
    pub fn layer_names(&self) -> Vec<String> {
        self.names.clone()
    }

    pub fn config(&self) -> &ScenarioConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The step the next call to [`Scenario::next_step`] produces.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The learning-rate scale advice has applied so far (1 = untouched).
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// The clip norm advice has set, if any.
    pub fn clip(&self) -> Option<f64> {
        self.clip
    }

    /// True once the run stopped (all steps played, or halted).
    pub fn finished(&self) -> bool {
        self.halted || self.step >= self.cfg.steps
    }

    /// One summary per live rank for the next step (rank order; empty when
    /// every rank is stalled), or `None` when the run is over.
    pub fn next_step(&mut self) -> Option<Vec<Summary>> {
        if self.finished() {
            return None;
        }
        let t = self.step;
        if t == self.plan.at && self.plan.fault == Fault::AbruptExplosion {
            self.state.x = self.plan.magnitude.ln();
        }
        self.state.step = t;
        self.history.push_back(self.state);
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let cfg = &self.cfg;
        let plan = &self.plan;
        let st = self.state;

        // Shared draws first, always in the same order, so the noise of a step
        // never depends on the path the dynamics took.
        let mut rng = Rng::new(mix(cfg.seed, t));
        self.wander = WANDER_PHI * self.wander + WANDER_NOISE * rng.normal();
        let step_noise = NORM_NOISE * rng.normal();
        let natural_spike = (rng.uniform() < P_NATURAL_SPIKE).then(|| 1.5 + 1.5 * rng.uniform());

        let active = t >= plan.at;
        let transient = active && t < plan.at.saturating_add(plan.duration);
        let mut shared = base_norm(st.progress) * (self.wander + step_noise + st.x).exp();
        if let Some(f) = natural_spike {
            shared *= f;
        }
        if transient && plan.fault == Fault::BenignSpike {
            shared *= plan.magnitude;
        }
        let v = st.v.min(VANISH_MAX);
        let lr = lr_at(t) * self.lr_scale;
        let base_loss = (healthy_loss(st.progress) * st.y.exp()).min(loss_cap(plan.fault));
        let overflow = cfg.amp && self.loss_scale * shared > AMP_OVERFLOW;
        let nan_grads = transient && plan.fault == Fault::NanGradients;
        let nan_loss = transient && plan.fault == Fault::NanLoss;
        let dead = plan.layer.filter(|_| active && plan.fault == Fault::DeadLayer);
        let time = cfg.start_time + t as f64 * cfg.step_secs;

        let mut out = Vec::with_capacity(cfg.workers as usize);
        for rank in 0..cfg.workers {
            // Every rank draws the same amount whether it reports or not.
            let mut local = shared * (self.rank_offset[rank as usize] + RANK_NOISE * rng.normal()).exp();
            let mut loss = base_loss * (LOSS_NOISE * rng.normal()).exp();
            let hard = rng.uniform() < P_HARD_BATCH;
            let hard_size = 0.03 + 0.06 * rng.uniform();
            if hard && cfg.hard_batches {
                loss *= 1.0 + hard_size;
            }
            let outlier = active && plan.fault == Fault::RankOutlier && plan.rank == Some(rank) && !self.outlier_fixed;
            if outlier {
                local *= plan.magnitude;
            }
            let mut layers = Vec::with_capacity(self.layers.len());
            let mut grad_norm = if self.layers.is_empty() {
                local * (-v).exp()
            } else {
                let weights: Vec<f64> = self
                    .layers
                    .iter()
                    .map(|l| l.share * (0.15 * rng.normal()).exp())
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut sq = 0.0;
                for (i, (l, w)) in self.layers.iter().zip(&weights).enumerate() {
                    let spread = (0.2 * rng.normal()).exp();
                    let upd_noise = (0.1 * rng.normal()).exp();
                    let decay = (-(v * l.depth).min(VANISH_MAX)).exp();
                    let l2 = if dead == Some(i) {
                        0.0
                    } else {
                        local * (w / total).sqrt() * decay
                    };
                    sq += l2 * l2;
                    let param_norm = 0.02 * l.params.sqrt() * (1.0 + 0.5 * st.progress / (st.progress + 2000.0));
                    let moving = if dead == Some(i) { 0.0 } else { decay };
                    layers.push(LayerStats {
                        l2: l2 as f32,
                        max_abs: (20.0 * spread * l2 / l.params.sqrt()) as f32,
                        nonfinite: 0,
                        param_norm: Some(param_norm as f32),
                        update_norm: Some((param_norm * 1e-3 * lr / LR_MAX * upd_noise * moving) as f32),
                    });
                }
                sq.sqrt()
            };
            if nan_grads {
                grad_norm = f64::NAN;
                if let Some(l) = plan.layer.and_then(|i| layers.get_mut(i)) {
                    *l = LayerStats {
                        l2: f32::NAN,
                        max_abs: f32::NAN,
                        nonfinite: plan.magnitude as u32,
                        param_norm: l.param_norm,
                        update_norm: None,
                    };
                }
            }
            if overflow {
                grad_norm = f64::INFINITY;
                if let Some(l) = layers.last_mut() {
                    l.l2 = f32::INFINITY;
                    l.max_abs = f32::INFINITY;
                    l.nonfinite = 1;
                    l.update_norm = None;
                }
            }
            if nan_loss {
                loss = if t.is_multiple_of(2) { f64::NAN } else { f64::INFINITY };
            }
            let stalled = active && plan.fault == Fault::StalledRank && plan.rank == Some(rank) && !self.stall_resumed;
            if stalled {
                continue;
            }
            out.push(Summary {
                worker: rank,
                step: t,
                time: Some(time),
                loss: Some(loss),
                lr: Some(lr),
                loss_scale: cfg.amp.then_some(self.loss_scale),
                grad_norm: Some(grad_norm),
                layers,
            });
        }

        self.advance(shared, overflow);
        Some(out)
    }

    /// The optimizer update of the step just played: moves the hidden state.
    fn advance(&mut self, shared_norm: f64, overflow: bool) {
        let plan = &self.plan;
        let active = self.step >= plan.at;
        let s = &mut self.state;
        let instability = ((self.lr_scale - STABLE_LR_SCALE) / (1.0 - STABLE_LR_SCALE)).clamp(0.0, 1.0);
        let (drive_x, drive_y, driven) = match plan.fault {
            Fault::GradualExplosion if active => (plan.magnitude * instability, 0.0, true),
            Fault::LrTooHigh if active => (plan.magnitude * instability, 0.5 * plan.magnitude * instability, true),
            Fault::LossDivergence if active => (0.003 * instability, plan.magnitude * instability, true),
            _ => (0.0, 0.0, false),
        };
        // How far the clip cut this step's update, in log units.
        let clipped_by = self.clip.map_or(0.0, |c| (shared_norm / c).ln().max(0.0));
        let x_eff = s.x - clipped_by;
        if drive_x > 0.0 {
            s.x += drive_x;
        } else if s.x > 0.0 && driven {
            s.x *= 0.95;
        } else if s.x > 0.0 && clipped_by > 0.0 {
            s.x *= 0.9;
        }
        s.x = s.x.min(1e6f64.ln());
        let damage = 0.01 * self.lr_scale * (x_eff - 3f64.ln()).max(0.0) + drive_y;
        if damage > 0.0 {
            s.y += damage;
        } else if s.y > 0.0 {
            s.y *= 0.99;
        }
        s.y = s.y.min((loss_cap(plan.fault) / healthy_loss(s.progress)).ln().max(0.0));
        if matches!(plan.fault, Fault::Vanishing | Fault::SlowVanishing) && active {
            s.v = (s.v + plan.magnitude).min(VANISH_MAX);
        }
        s.progress += (-s.v).exp();
        if self.cfg.amp {
            if overflow {
                self.loss_scale = (self.loss_scale / 2.0).max(1.0);
                self.clean_steps = 0;
            } else {
                self.clean_steps += 1;
                if self.clean_steps >= AMP_GROWTH_STEPS {
                    self.loss_scale *= 2.0;
                    self.clean_steps = 0;
                }
            }
        }
        self.step += 1;
    }

    /// Applies advice to the simulated dynamics (see the module documentation).
    /// Nonsensical values (a non-positive factor or norm) are ignored.
    pub fn apply(&mut self, action: &Action) {
        match *action {
            Action::ClipGradients { max_norm } => {
                if max_norm.is_finite() && max_norm > 0.0 {
                    self.clip = Some(max_norm);
                }
            }
            Action::ScaleLr { factor } => {
                if factor.is_finite() && factor > 0.0 {
                    self.lr_scale *= factor;
                }
            }
            Action::SkipStep => {
                // Undo the update of the step just played.
                if let Some(prev) = self.history.back().copied() {
                    self.state = Snapshot {
                        step: self.step,
                        ..prev
                    };
                }
            }
            Action::Rollback { to_step } => {
                let target = to_step.saturating_add(1);
                let snap = self
                    .history
                    .iter()
                    .rev()
                    .find(|h| h.step <= target)
                    .or(self.history.front())
                    .copied();
                if let Some(snap) = snap {
                    self.state = Snapshot {
                        step: self.step,
                        ..snap
                    };
                }
            }
            Action::ScaleLossScale { factor } => {
                if factor.is_finite() && factor > 0.0 {
                    self.loss_scale = (self.loss_scale * factor).max(1.0);
                }
            }
            Action::InspectWorker { rank } => {
                if self.plan.rank == Some(rank) {
                    self.outlier_fixed = true;
                    self.stall_resumed = true;
                }
            }
            Action::Halt => self.halted = true,
        }
    }
}

impl Iterator for Scenario {
    type Item = Vec<Summary>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_step()
    }
}
