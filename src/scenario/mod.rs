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

mod fault;
mod rng;
mod run;
mod shape;
#[cfg(test)]
mod tests;

pub use fault::{Fault, FaultPlan};
pub use run::Scenario;

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
