//! Synthetic training traces with injected faults, for the scenario test suite,
//! the benchmarks and the worker simulator.
//!
//! A [`Scenario`] plays a multi-rank training run one optimizer step at a time:
//! [`Scenario::next_step`] returns one [`Summary`] per live rank, and
//! [`Scenario::apply`] feeds advice back so the simulated dynamics react (a
//! closed loop, as a worker that follows the advice would see it).
//!
//! # What a healthy run looks like
//!
//! The shape is taken from a real GPT-2 124M llm.c run (`s:STEP trl:LOSS lr:LR
//! norm:NORM`, 19.5k steps):
//!
//! - the loss falls like a power law, `2.9 + 8.1·(1 + p/30)^-0.5` (11 at step 0,
//!   ~6.8 at 100, ~4.3 at 1000, ~3.3 at 10k), with ~1% multiplicative noise per
//!   rank (and, when [`ScenarioConfig::hard_batches`] is on, rare hard batches
//!   that lift one rank's loss by 3–9% for a step, the trace's heavy right tail);
//! - the global gradient norm starts at ~15, falls to ~2 within 20 steps and
//!   ~0.9 by step 100, then drifts down to ~0.3 (knots read off the trace), with
//!   log-normal noise (8% per step plus a slow AR(1) wander) and rare benign
//!   spikes of 1.5–3× on all ranks at once;
//! - the learning rate warms up linearly over 700 steps to 6e-4, then follows a
//!   cosine over a nominal 20k-step run;
//! - per-layer L2 norms split the global norm across depth with fixed shares and
//!   per-step jitter, so that Σ l2² = global² exactly; `max_abs` is ~20× the RMS
//!   element (`l2/sqrt(n)`); the update/parameter ratio is ~1e-3 at peak LR;
//! - every rank's norm differs from its peers' by a few percent (each reports
//!   its local gradient), and its loss by its own batch noise.
//!
//! The noise of step `s` is a pure function of (seed, step), so the same
//! configuration always yields the same run, and applying advice changes the
//! dynamics but never the noise.
//!
//! # Closed-loop dynamics
//!
//! The simulator keeps a few hidden quantities: training progress `p` (drives
//! the healthy curves), an explosion level `x` (log-multiplier of the gradient
//! norm), loss damage `y` (log-multiplier of the loss), a vanishing level `v`,
//! and the worker's learning-rate scale and clip setting. Advice acts on them:
//!
//! - `ClipGradients`: reported norms are measured before clipping and pass
//!   through unchanged, but the effective update shrinks: loss damage is judged
//!   on the clipped norm, and an explosion with nothing still driving it (an
//!   abrupt jump) calms by 10% of its level per clipped step.
//! - `ScaleLr`: scales the reported LR and the instability drive. The gradual
//!   explosion and the loss divergence are modelled as running above the edge
//!   of stability: their drive is `(lr_scale − 0.6)/0.4`, clamped to [0, 1], so
//!   one halving stops them and they then relax (x by 5%, y by 1% per step).
//! - `SkipStep`: the update of the step the advice was given for is undone
//!   (progress, explosion, damage and vanishing go back to before that step).
//! - `Rollback`: the hidden state goes back to the checkpoint after `to_step`
//!   (or the oldest kept, 4096 steps). Step numbers keep increasing, as a
//!   global iteration counter would; the fault's cause stays (a rolled-back
//!   divergence diverges again unless the LR was lowered).
//! - `ScaleLossScale`: scales the AMP loss scale.
//! - `InspectWorker`: naming the faulty rank repairs it (the outlier rank
//!   returns to normal, the stalled rank resumes).
//! - `Halt`: the run ends.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use crate::model::{Action, LayerStats, Summary};

/// The fault a scenario injects at `fault_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// No fault: the baseline every rule must stay quiet on.
    Healthy,
    /// The norm jumps 50–1000× and stays there; the loss rises after it.
    AbruptExplosion,
    /// The norm grows 5–8% per step; the loss starts rising once it is ~3×.
    GradualExplosion,
    /// One layer (on every rank) has non-finite gradients, and the global norm
    /// is NaN, for 1–3 steps.
    NanGradients,
    /// The loss is non-finite for 1–3 steps; the gradients stay finite.
    NanLoss,
    /// Norms decay 5–8% per step (faster in early layers) toward 1e-9; the
    /// model stops learning and the loss plateaus.
    Vanishing,
    /// The loss rises 0.4–0.6% per step while norms grow mildly (0.3%).
    LossDivergence,
    /// One layer's gradient becomes exactly zero on every rank.
    DeadLayer,
    /// One rank's norm is 5–20× its peers' (needs 4 or more ranks).
    RankOutlier,
    /// One rank stops sending; the others go on.
    StalledRank,
    /// One step's norm is 5–20× on every rank; the loss does not follow.
    BenignSpike,
    /// A learning rate far too high from the first step (a wrong config):
    /// the norm grows 10–30× a step and the loss follows. Always starts at
    /// step 0, whatever `fault_at` says.
    LrTooHigh,
    /// Norms decay 1–2% per step: a collapse no 50-step window sees.
    SlowVanishing,
}

impl Fault {
    pub const ALL: [Fault; 13] = [
        Fault::Healthy,
        Fault::AbruptExplosion,
        Fault::GradualExplosion,
        Fault::NanGradients,
        Fault::NanLoss,
        Fault::Vanishing,
        Fault::LossDivergence,
        Fault::DeadLayer,
        Fault::RankOutlier,
        Fault::StalledRank,
        Fault::BenignSpike,
        Fault::LrTooHigh,
        Fault::SlowVanishing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Healthy => "healthy",
            Fault::AbruptExplosion => "abrupt-explosion",
            Fault::GradualExplosion => "gradual-explosion",
            Fault::NanGradients => "nan-gradients",
            Fault::NanLoss => "nan-loss",
            Fault::Vanishing => "vanishing",
            Fault::LossDivergence => "loss-divergence",
            Fault::DeadLayer => "dead-layer",
            Fault::RankOutlier => "rank-outlier",
            Fault::StalledRank => "stalled-rank",
            Fault::BenignSpike => "benign-spike",
            Fault::LrTooHigh => "lr-too-high",
            Fault::SlowVanishing => "slow-vanishing",
        }
    }

    /// The fewest ranks with which the fault can be told apart from a healthy run.
    pub fn min_workers(self) -> u32 {
        match self {
            Fault::RankOutlier => 4,
            Fault::StalledRank => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL.into_iter().find(|f| f.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.as_str()).collect();
            format!("unknown fault {s:?} (expected one of {})", names.join(", "))
        })
    }
}

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioConfig {
    pub job: String,
    pub fault: Fault,
    /// Number of ranks (at least 1).
    pub workers: u32,
    /// Number of layers with per-layer statistics; 0 sends global values only.
    pub layers: usize,
    /// Steps to run (0 .. steps).
    pub steps: u64,
    pub seed: u64,
    /// First step the fault shows.
    pub fault_at: u64,
    /// Time of step 0, seconds since the epoch.
    pub start_time: f64,
    /// Seconds per optimizer step.
    pub step_secs: f64,
    /// Report an AMP loss scale (dynamic scaler: doubles after 500 clean steps,
    /// halves on an fp16 overflow).
    pub amp: bool,
    /// Add the real trace's heavy right tail to the loss: on 0.05% of rank-steps
    /// a hard batch lifts that rank's loss by 3–9% for one step. Off by default,
    /// so the healthy baseline has Gaussian loss noise only.
    pub hard_batches: bool,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            job: "sim".into(),
            fault: Fault::Healthy,
            workers: 1,
            layers: 12,
            steps: 2000,
            seed: 0,
            fault_at: 1000,
            start_time: 1_700_000_000.0,
            step_secs: 1.0,
            amp: false,
            hard_batches: false,
        }
    }
}

/// The concrete fault a seed drew: who, where and how much. Tests read it to
/// know which rank or layer a finding must name.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    pub fault: Fault,
    pub at: u64,
    /// The faulty rank (rank outlier, stalled rank).
    pub rank: Option<u32>,
    /// The faulty layer index (NaN gradients, dead layer), when there are layers.
    pub layer: Option<usize>,
    /// Abrupt explosion, rank outlier and benign spike: the norm factor;
    /// gradual explosion and vanishing: the per-step log-rate of the norm; loss
    /// divergence: the per-step log-rate of the loss; NaN gradients: the layer's
    /// non-finite element count; 0 otherwise.
    pub magnitude: f64,
    /// Steps the fault lasts when it is transient (NaN faults, the spike).
    pub duration: u64,
}

const LR_MAX: f64 = 6e-4;
const LR_WARMUP: f64 = 700.0;
const LR_HORIZON: f64 = 20_000.0;
/// (step, global norm) knots of the healthy norm curve, from the llm.c trace.
const NORM_KNOTS: [(f64, f64); 11] = [
    (0.0, 15.0),
    (10.0, 2.6),
    (20.0, 2.1),
    (50.0, 1.5),
    (100.0, 0.93),
    (400.0, 0.9),
    (700.0, 0.66),
    (1000.0, 0.44),
    (1500.0, 0.3),
    (3000.0, 0.28),
    (20_000.0, 0.25),
];
/// Log-normal step noise of the norm, and the AR(1) wander on top of it.
const NORM_NOISE: f64 = 0.08;
const WANDER_PHI: f64 = 0.98;
const WANDER_NOISE: f64 = 0.015;
/// Per-rank deviation of the local norm from the shared one.
const RANK_NOISE: f64 = 0.03;
const LOSS_NOISE: f64 = 0.01;
/// A diverged model's loss does not go past chance level (ln 50257 ≈ 10.8).
const LOSS_CAP: f64 = 11.5;
/// Per-step chance of a benign all-rank norm spike (any run), and per rank-step
/// chance of a hard batch (the trace shows a few such outliers per thousand).
const P_NATURAL_SPIKE: f64 = 0.002;
const P_HARD_BATCH: f64 = 0.0005;
/// LR scale at and below which an "edge of stability" fault stops growing.
const STABLE_LR_SCALE: f64 = 0.6;
/// The vanishing level where norms bottom out (×1e-9).
const VANISH_MAX: f64 = 20.7;
const HISTORY: usize = 4096;
/// AMP: an fp16 overflow happens when scale × norm passes this.
const AMP_OVERFLOW: f64 = 262_144.0;
const AMP_GROWTH_STEPS: u64 = 500;

/// One layer's fixed shape.
#[derive(Debug, Clone)]
struct LayerProfile {
    name: String,
    /// Share of the squared global norm, before per-step jitter.
    share: f64,
    params: f64,
    /// Vanishing faults decay this layer `depth` times as fast as the last.
    depth: f64,
}

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

fn draw_plan(cfg: &ScenarioConfig, rng: &mut Rng) -> FaultPlan {
    let log_uniform = |rng: &mut Rng, lo: f64, hi: f64| (lo.ln() + (hi.ln() - lo.ln()) * rng.uniform()).exp();
    let rank = rng.below(u64::from(cfg.workers)) as u32;
    let layer = (cfg.layers > 0).then(|| rng.below(cfg.layers as u64) as usize);
    let duration = 1 + rng.below(3);
    let mut plan = FaultPlan {
        fault: cfg.fault,
        at: match cfg.fault {
            Fault::Healthy => u64::MAX,
            Fault::LrTooHigh => 0,
            _ => cfg.fault_at,
        },
        rank: None,
        layer: None,
        magnitude: 0.0,
        duration: 0,
    };
    match cfg.fault {
        Fault::Healthy => {}
        Fault::AbruptExplosion => plan.magnitude = log_uniform(rng, 50.0, 1000.0),
        Fault::GradualExplosion => plan.magnitude = rng.range(1.05f64.ln(), 1.08f64.ln()),
        Fault::NanGradients => {
            plan.layer = layer;
            plan.duration = duration;
            plan.magnitude = (1 + rng.below(1000)) as f64;
        }
        Fault::NanLoss => plan.duration = duration,
        Fault::Vanishing => plan.magnitude = rng.range(1.05f64.ln(), 1.08f64.ln()),
        Fault::LossDivergence => plan.magnitude = rng.range(0.004, 0.006),
        Fault::DeadLayer => plan.layer = layer,
        Fault::RankOutlier => {
            plan.rank = Some(rank);
            plan.magnitude = rng.range(5.0, 20.0);
        }
        Fault::StalledRank => plan.rank = Some(rank),
        Fault::BenignSpike => {
            plan.magnitude = rng.range(5.0, 20.0);
            plan.duration = 1;
        }
        Fault::LrTooHigh => plan.magnitude = rng.range(10f64.ln(), 30f64.ln()),
        Fault::SlowVanishing => plan.magnitude = rng.range(1.01f64.ln(), 1.02f64.ln()),
    }
    plan
}

/// A GPT-2-like stack: embedding, attention and MLP blocks, head. Shares of the
/// squared norm are log-normal around equal, with the embedding and head larger.
fn layer_profiles(n: usize, rng: &mut Rng) -> Vec<LayerProfile> {
    const D: f64 = 768.0;
    const VOCAB: f64 = 50_257.0;
    let mut out: Vec<LayerProfile> = (0..n)
        .map(|i| {
            let (name, params, weight) = if i == 0 {
                ("embed".to_owned(), VOCAB * D, 2.0)
            } else if i + 1 == n {
                ("head".to_owned(), VOCAB * D, 2.0)
            } else {
                let b = (i - 1) / 2;
                if (i - 1) % 2 == 0 {
                    (format!("blocks.{b}.attn"), 4.0 * D * D, 1.0)
                } else {
                    (format!("blocks.{b}.mlp"), 8.0 * D * D, 1.0)
                }
            };
            let depth = if n > 1 {
                1.0 + 0.5 * (n - 1 - i) as f64 / (n - 1) as f64
            } else {
                1.0
            };
            LayerProfile {
                name,
                share: weight * (0.5 * rng.normal()).exp(),
                params,
                depth,
            }
        })
        .collect();
    let total: f64 = out.iter().map(|l| l.share).sum();
    for l in &mut out {
        l.share /= total;
    }
    out
}

/// The healthy global norm at a given training progress (log-linear between knots).
fn base_norm(progress: f64) -> f64 {
    let p = progress.max(0.0);
    for w in NORM_KNOTS.windows(2) {
        let ((s0, n0), (s1, n1)) = (w[0], w[1]);
        if p <= s1 {
            let f = (p - s0) / (s1 - s0);
            return (n0.ln() + f * (n1.ln() - n0.ln())).exp();
        }
    }
    NORM_KNOTS[NORM_KNOTS.len() - 1].1
}

/// The highest loss a run reaches: a model diverging at a steady learning
/// rate saturates near chance, one whose learning rate is far too high from
/// the start overflows its logits and its loss has no ceiling.
fn loss_cap(fault: Fault) -> f64 {
    if fault == Fault::LrTooHigh { 1e12 } else { LOSS_CAP }
}

fn healthy_loss(progress: f64) -> f64 {
    2.9 + 8.1 * (1.0 + progress.max(0.0) / 30.0).powf(-0.5)
}

fn lr_at(step: u64) -> f64 {
    let t = step as f64;
    if t < LR_WARMUP {
        return LR_MAX * (t + 1.0) / LR_WARMUP;
    }
    let f = ((t - LR_WARMUP) / (LR_HORIZON - LR_WARMUP)).min(1.0);
    (LR_MAX * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())).max(LR_MAX * 0.01)
}

/// SplitMix64: tiny, fast, and good enough for simulation noise.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in 0..n (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A well-mixed seed for stream `stream` of `seed`.
fn mix(seed: u64, stream: u64) -> u64 {
    Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fault: Fault, workers: u32) -> ScenarioConfig {
        ScenarioConfig {
            fault,
            workers,
            fault_at: 300,
            steps: 600,
            seed: 7,
            ..ScenarioConfig::default()
        }
    }

    /// The first rank's summaries, one per step.
    fn rank0(sc: Scenario) -> Vec<Summary> {
        sc.filter_map(|batch| batch.into_iter().next()).collect()
    }

    #[test]
    fn fault_names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.to_string().parse::<Fault>(), Ok(f));
        }
        assert_eq!("rank-outlier".parse(), Ok(Fault::RankOutlier));
        assert!("rank_outlier".parse::<Fault>().unwrap_err().contains("rank-outlier"));
    }

    #[test]
    fn layer_names_follow_a_transformer_stack() {
        let sc = Scenario::new(ScenarioConfig {
            layers: 6,
            ..ScenarioConfig::default()
        });
        assert_eq!(
            sc.layer_names(),
            [
                "embed",
                "blocks.0.attn",
                "blocks.0.mlp",
                "blocks.1.attn",
                "blocks.1.mlp",
                "head"
            ]
        );
        let none = Scenario::new(ScenarioConfig {
            layers: 0,
            ..ScenarioConfig::default()
        });
        assert!(none.layer_names().is_empty());
    }

    #[test]
    fn layers_add_up_to_the_global_norm() {
        for s in Scenario::new(cfg(Fault::Healthy, 2)).flatten() {
            let sq: f64 = s.layers.iter().map(|l| f64::from(l.l2).powi(2)).sum();
            let g = s.grad_norm.unwrap();
            assert!(
                (sq.sqrt() / g - 1.0).abs() < 1e-5,
                "step {}: {} vs {g}",
                s.step,
                sq.sqrt()
            );
            for l in &s.layers {
                assert!(l.max_abs > 0.0 && l.max_abs < l.l2, "{l:?}");
            }
        }
    }

    #[test]
    fn healthy_run_has_the_shape_of_the_real_trace() {
        let run = rank0(Scenario::new(ScenarioConfig {
            steps: 1200,
            ..ScenarioConfig::default()
        }));
        let loss = |s: usize| run[s].loss.unwrap();
        let norm = |s: usize| run[s].grad_norm.unwrap();
        assert!((10.0..12.0).contains(&loss(0)), "{}", loss(0));
        assert!((6.0..7.5).contains(&loss(100)), "{}", loss(100));
        assert!((4.0..4.6).contains(&loss(1000)), "{}", loss(1000));
        assert!((10.0..20.0).contains(&norm(0)), "{}", norm(0));
        let mut mid: Vec<f64> = (100..200).map(norm).collect();
        mid.sort_by(f64::total_cmp);
        assert!((0.6..1.3).contains(&mid[50]), "median norm {}", mid[50]);
        // Step-to-step log noise of the norm: ~8% plus the wander.
        let d: Vec<f64> = (800..1199).map(|s| (norm(s + 1) / norm(s)).ln()).collect();
        let sd = (d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64).sqrt();
        assert!((0.07..0.2).contains(&sd), "norm log-diff sd {sd}");
        let l = &run[1000].layers[3];
        let ratio = l.update_norm.unwrap() / l.param_norm.unwrap();
        assert!((1e-4..1e-2).contains(&ratio), "update ratio {ratio}");
    }

    #[test]
    fn ranks_differ_by_a_few_percent() {
        let batch = Scenario::new(cfg(Fault::Healthy, 8)).nth(400).unwrap();
        let norms: Vec<f64> = batch.iter().map(|s| s.grad_norm.unwrap()).collect();
        let mean = norms.iter().sum::<f64>() / 8.0;
        let rel = (norms.iter().map(|n| (n / mean - 1.0).powi(2)).sum::<f64>() / 8.0).sqrt();
        assert!((0.005..0.1).contains(&rel), "relative spread {rel}");
    }

    #[test]
    fn same_seed_same_run_other_seed_other_run() {
        let a: Vec<Vec<Summary>> = Scenario::new(cfg(Fault::GradualExplosion, 3)).collect();
        let b: Vec<Vec<Summary>> = Scenario::new(cfg(Fault::GradualExplosion, 3)).collect();
        assert_eq!(a, b);
        let c: Vec<Vec<Summary>> = Scenario::new(ScenarioConfig {
            seed: 8,
            ..cfg(Fault::GradualExplosion, 3)
        })
        .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn each_fault_shows_from_fault_at() {
        let norm_at = |fault, step: usize| rank0(Scenario::new(cfg(fault, 1)))[step].grad_norm.unwrap();
        let healthy = rank0(Scenario::new(cfg(Fault::Healthy, 1)));
        let h = |step: usize| healthy[step].grad_norm.unwrap();
        assert_eq!(norm_at(Fault::AbruptExplosion, 299), h(299));
        assert!(norm_at(Fault::AbruptExplosion, 300) > 40.0 * h(300));
        assert!(norm_at(Fault::GradualExplosion, 360) > 10.0 * h(360));
        assert!(norm_at(Fault::Vanishing, 400) < 0.01 * h(400));
        assert!(norm_at(Fault::BenignSpike, 300) > 4.0 * h(300));
        assert!(norm_at(Fault::BenignSpike, 301) == h(301));

        let nan = Scenario::new(cfg(Fault::NanGradients, 1));
        let (layer, duration) = (nan.plan().layer.unwrap(), nan.plan().duration);
        let run = rank0(nan);
        assert!(run[300].grad_norm.unwrap().is_nan() && run[300].layers[layer].nonfinite > 0);
        assert!(run[300 + duration as usize].grad_norm.unwrap().is_finite());

        let run = rank0(Scenario::new(cfg(Fault::NanLoss, 1)));
        assert!(!run[300].loss.unwrap().is_finite() && run[300].grad_norm.unwrap().is_finite());

        let dead = Scenario::new(cfg(Fault::DeadLayer, 1));
        let layer = dead.plan().layer.unwrap();
        let run = rank0(dead);
        assert!(run[299].layers[layer].l2 > 0.0);
        assert!(run[300..].iter().all(|s| s.layers[layer].l2 == 0.0));

        let div = rank0(Scenario::new(cfg(Fault::LossDivergence, 1)));
        assert!(div[500].loss.unwrap() > 1.5 * div[299].loss.unwrap());
    }

    #[test]
    fn rank_faults_hit_the_planned_rank() {
        let sc = Scenario::new(cfg(Fault::RankOutlier, 8));
        let (rank, factor) = (sc.plan().rank.unwrap(), sc.plan().magnitude);
        let batch = sc.into_iter().nth(310).unwrap();
        let others: Vec<f64> = batch
            .iter()
            .filter(|s| s.worker != rank)
            .map(|s| s.grad_norm.unwrap())
            .collect();
        let bad = batch[rank as usize].grad_norm.unwrap();
        assert!(others.iter().all(|&n| bad > 0.6 * factor * n), "{bad} vs {others:?}");

        let mut sc = Scenario::new(ScenarioConfig {
            step_secs: 2.0,
            ..cfg(Fault::StalledRank, 4)
        });
        let rank = sc.plan().rank.unwrap();
        let mut last_time = 0.0;
        while let Some(batch) = sc.next_step() {
            let step = batch[0].step;
            assert_eq!(batch.iter().any(|s| s.worker == rank), step < 300, "step {step}");
            last_time = batch[0].time.unwrap();
        }
        assert!(
            last_time - (1_700_000_000.0 + 299.0 * 2.0) > 300.0,
            "the stall timeout is crossed"
        );
    }

    /// Plays to the end, applying `action` once right after `at`; returns rank 0.
    fn steered(fault: Fault, at: u64, action: Action) -> Vec<Summary> {
        let mut sc = Scenario::new(cfg(fault, 1));
        let mut out = Vec::new();
        while let Some(mut batch) = sc.next_step() {
            if batch[0].step == at {
                sc.apply(&action);
            }
            out.push(batch.remove(0));
        }
        out
    }

    #[test]
    fn advice_changes_the_dynamics() {
        let open = steered(Fault::AbruptExplosion, 0, Action::SkipStep);
        let healthy = rank0(Scenario::new(cfg(Fault::Healthy, 1)));
        let ratio = |run: &[Summary], s: usize| run[s].grad_norm.unwrap() / healthy[s].grad_norm.unwrap();
        assert!(ratio(&open, 400) > 40.0, "an explosion left alone stays");
        let clipped = steered(Fault::AbruptExplosion, 300, Action::ClipGradients { max_norm: 0.5 });
        assert!(
            ratio(&clipped, 350) < 2.0,
            "clipping calms it: {}",
            ratio(&clipped, 350)
        );
        let rolled = steered(Fault::AbruptExplosion, 305, Action::Rollback { to_step: 250 });
        assert!(ratio(&rolled, 306) < 1.5, "a rollback to before the fault undoes it");
        assert!(
            rolled[306].loss.unwrap() > healthy[306].loss.unwrap(),
            "and loses progress"
        );

        let growing = steered(Fault::GradualExplosion, 0, Action::SkipStep);
        let calmed = steered(Fault::GradualExplosion, 320, Action::ScaleLr { factor: 0.5 });
        assert!(ratio(&growing, 450) > 100.0);
        assert!(ratio(&calmed, 450) < 2.0, "{}", ratio(&calmed, 450));
        assert!((calmed[450].lr.unwrap() / healthy[450].lr.unwrap() - 0.5).abs() < 1e-9);

        let diverging = steered(Fault::LossDivergence, 0, Action::SkipStep);
        let calmed = steered(Fault::LossDivergence, 350, Action::ScaleLr { factor: 0.5 });
        assert!(calmed[599].loss.unwrap() < 0.8 * diverging[599].loss.unwrap());

        let mut sc = Scenario::new(cfg(Fault::RankOutlier, 4));
        let rank = sc.plan().rank.unwrap();
        sc.by_ref().take(310).for_each(drop);
        sc.apply(&Action::InspectWorker { rank });
        let batch = sc.next_step().unwrap();
        let max = batch.iter().map(|s| s.grad_norm.unwrap()).fold(0.0, f64::max);
        let min = batch.iter().map(|s| s.grad_norm.unwrap()).fold(f64::INFINITY, f64::min);
        assert!(max < 1.3 * min, "inspecting the rank repairs it");

        let mut sc = Scenario::new(cfg(Fault::Healthy, 1));
        sc.next_step();
        sc.apply(&Action::Halt);
        assert!(sc.finished() && sc.next_step().is_none());
    }

    #[test]
    fn amp_scaler_overflows_and_backs_off() {
        let run = rank0(Scenario::new(ScenarioConfig {
            amp: true,
            steps: 2500,
            ..ScenarioConfig::default()
        }));
        let overflows: Vec<u64> = run
            .iter()
            .filter(|s| !s.grad_norm.unwrap().is_finite())
            .map(|s| s.step)
            .collect();
        assert!(!overflows.is_empty() && overflows.len() < 20, "{overflows:?}");
        for &o in &overflows {
            let (now, next) = (
                run[o as usize].loss_scale.unwrap(),
                run[o as usize + 1].loss_scale.unwrap(),
            );
            assert_eq!(next, now / 2.0);
            assert!(run[o as usize].loss.unwrap().is_finite());
        }
    }
}
