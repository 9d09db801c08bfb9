//! What a healthy run looks like: the learning-rate schedule, the loss and
//! gradient-norm curves, their noise, and the layer stack (see the module
//! documentation of [`super`]).

use super::fault::Fault;
use super::rng::Rng;

pub(super) const LR_MAX: f64 = 6e-4;
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
pub(super) const NORM_NOISE: f64 = 0.08;
pub(super) const WANDER_PHI: f64 = 0.98;
pub(super) const WANDER_NOISE: f64 = 0.015;
/// Per-rank deviation of the local norm from the shared one.
pub(super) const RANK_NOISE: f64 = 0.03;
pub(super) const LOSS_NOISE: f64 = 0.01;
/// A diverged model's loss does not go past chance level (ln 50257 ≈ 10.8).
const LOSS_CAP: f64 = 11.5;
/// Per-step chance of a benign all-rank norm spike (any run), and per rank-step
/// chance of a hard batch (the trace shows a few such outliers per thousand).
pub(super) const P_NATURAL_SPIKE: f64 = 0.002;
pub(super) const P_HARD_BATCH: f64 = 0.0005;

/// One layer's fixed shape.
#[derive(Debug, Clone)]
pub(super) struct LayerProfile {
    pub(super) name: String,
    /// Share of the squared global norm, before per-step jitter.
    pub(super) share: f64,
    pub(super) params: f64,
    /// Vanishing faults decay this layer `depth` times as fast as the last.
    pub(super) depth: f64,
}

/// A GPT-2-like stack: embedding, attention and MLP blocks, head. Shares of the
/// squared norm are log-normal around equal, with the embedding and head larger.
pub(super) fn layer_profiles(n: usize, rng: &mut Rng) -> Vec<LayerProfile> {
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
pub(super) fn base_norm(progress: f64) -> f64 {
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
pub(super) fn loss_cap(fault: Fault) -> f64 {
    if fault == Fault::LrTooHigh { 1e12 } else { LOSS_CAP }
}

pub(super) fn healthy_loss(progress: f64) -> f64 {
    2.9 + 8.1 * (1.0 + progress.max(0.0) / 30.0).powf(-0.5)
}

pub(super) fn lr_at(step: u64) -> f64 {
    let t = step as f64;
    if t < LR_WARMUP {
        return LR_MAX * (t + 1.0) / LR_WARMUP;
    }
    let f = ((t - LR_WARMUP) / (LR_HORIZON - LR_WARMUP)).min(1.0);
    (LR_MAX * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())).max(LR_MAX * 0.01)
}
