//! The faults a scenario can inject, and how a seed draws one's details.

use std::fmt;
use std::str::FromStr;

use super::ScenarioConfig;
use super::rng::Rng;

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

pub(super) fn draw_plan(cfg: &ScenarioConfig, rng: &mut Rng) -> FaultPlan {
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
