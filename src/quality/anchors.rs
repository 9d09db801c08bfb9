//! The anchor detectors: what training stacks already ship, each written from
//! its published source, so that gradguard is measured against the rules it
//! must beat rather than against a straw man.
//!
//! Each anchor is a small struct with [`Anchor::observe`]: one summary of one
//! rank in, an [`Alarm`] out when the published rule fires on it. State is per
//! rank (the published rules run in each training process on its own values):
//! the runner keeps one instance per rank. An anchor reads only the signal its
//! source reads (the loss, or the global gradient norm); a summary without that
//! signal is not a step for it and changes nothing.
//!
//! Floats follow Python's semantics where the sources are Python: a NaN
//! compares false, so a NaN that a source lets into its statistics poisons
//! them exactly as it would there. That is part of what is being measured.
//!
//! For evaluation an anchor keeps observing after it fires, and every firing
//! counts. An anchor whose published form stops the run when it fires
//! (Lightning's `SpikeDetection` raises, llm-foundry's `KillLossSpike` kills)
//! marks its alarms [`Alarm::severe`].

use std::collections::VecDeque;
use std::fmt;

use crate::model::Summary;

/// The signal an alarm is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    GradNorm,
    Loss,
}

/// One firing of an anchor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alarm {
    pub signal: Signal,
    /// The published form stops the run on this firing.
    pub severe: bool,
    /// What the rule compared (a norm, a z-score, a loss).
    pub value: f64,
    /// What it was compared with.
    pub threshold: f64,
}

/// One rank's instance of an anchor detector.
pub trait Anchor {
    /// Judges one summary of this instance's rank.
    fn observe(&mut self, summary: &Summary) -> Option<Alarm>;
}

/// The anchor detectors, in the order the report prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnchorKind {
    Seed,
    ZClip,
    OlmoSkipStep,
    LightningSpike,
    KillLossSpike,
}

impl AnchorKind {
    pub const ALL: [AnchorKind; 5] = [
        AnchorKind::Seed,
        AnchorKind::ZClip,
        AnchorKind::OlmoSkipStep,
        AnchorKind::LightningSpike,
        AnchorKind::KillLossSpike,
    ];

    /// A short column name.
    pub fn name(self) -> &'static str {
        match self {
            AnchorKind::Seed => "seed",
            AnchorKind::ZClip => "zclip",
            AnchorKind::OlmoSkipStep => "olmo-skip",
            AnchorKind::LightningSpike => "lightning",
            AnchorKind::KillLossSpike => "foundry-kill",
        }
    }

    /// One line: the rule, its defaults, and where it comes from.
    pub fn definition(self) -> &'static str {
        match self {
            AnchorKind::Seed => {
                "gradguard's seed rule: alarm when the global grad norm is > 10 or non-finite (static, no warm-up)"
            }
            AnchorKind::ZClip => {
                "ZClip (bluorion-com/ZClip zclip/zclip.py): grad norm z-score on EMA mean/var, alpha 0.97, z > 2.5, \
                 warm-up 25 steps (plain mean/var), eps 1e-6, EMA takes the clipped value; alarm = a clip"
            }
            AnchorKind::OlmoSkipStep => {
                "OLMo-core SkipStepOptimizer (allenai/OLMo-core src/olmo_core/optim/skip_step_optimizer.py): \
                 |x - mean| / std (unbiased) of the previous <= 128 losses and grad norms > 6, judged once 64 \
                 losses are in; alarm = a skipped step"
            }
            AnchorKind::LightningSpike => {
                "Lightning SpikeDetection (Lightning-AI/pytorch-lightning src/lightning/fabric/utilities/spike.py): \
                 mode min, window 10, warmup 1, atol None, rtol 2 (loss >= 3x the running mean and above the last \
                 loss), finite_only (non-finite loss is a spike); raises TrainingSpikeException: severe"
            }
            AnchorKind::KillLossSpike => {
                "llm-foundry KillLossSpike (mosaicml/llm-foundry llmfoundry/callbacks/kill_loss_spike_callback.py), \
                 log_only False: window max(100, 5% of the run), 5 losses in a row >= 2x the window mean \
                 (patience 4), or half the window > loss cap 10 after 2 windows; raises: severe"
            }
        }
    }

    /// A fresh instance for one rank; `batches` is how many summaries with a
    /// loss that rank will send (the run's length, which `KillLossSpike`
    /// sizes its window from).
    pub fn instance(self, batches: u64) -> Box<dyn Anchor> {
        match self {
            AnchorKind::Seed => Box::new(SeedCeiling::default()),
            AnchorKind::ZClip => Box::new(ZClip::default()),
            AnchorKind::OlmoSkipStep => Box::new(OlmoSkipStep::default()),
            AnchorKind::LightningSpike => Box::new(LightningSpike::default()),
            AnchorKind::KillLossSpike => Box::new(KillLossSpike::new(Some(batches))),
        }
    }
}

impl fmt::Display for AnchorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// The seed's static ceiling
// ---------------------------------------------------------------------------

/// gradguard's first rule, before any statistics: the global gradient norm
/// above a fixed ceiling (10), or non-finite. No warm-up, no state.
#[derive(Debug, Clone)]
pub struct SeedCeiling {
    pub max: f64,
}

impl Default for SeedCeiling {
    fn default() -> Self {
        Self { max: 10.0 }
    }
}

impl Anchor for SeedCeiling {
    fn observe(&mut self, summary: &Summary) -> Option<Alarm> {
        let norm = summary.grad_norm?;
        (!norm.is_finite() || norm > self.max).then_some(Alarm {
            signal: Signal::GradNorm,
            severe: false,
            value: norm,
            threshold: self.max,
        })
    }
}

// ---------------------------------------------------------------------------
// ZClip
// ---------------------------------------------------------------------------

/// ZClip, the reference implementation of the paper "ZClip: Adaptive Spike
/// Mitigation for LLM Pre-Training" (Kumar et al., 2025): repository
/// `bluorion-com/ZClip`, `zclip/zclip.py` (class `ZClip`, method `step`).
///
/// Defaults used, as published: `alpha` 0.97, `z_thresh` 2.5, `eps` 1e-6,
/// `warmup_steps` 25, `mode` "zscore", `clip_option` "adaptive_scaling",
/// `clip_factor` 1.0, `skip_update_on_spike` False.
///
/// - Warm-up: the first 25 norms are buffered unjudged; on the 25th, mean and
///   variance are initialised as the plain (population) mean and variance of
///   the buffer.
/// - Afterwards, each norm gets `z = (g − mean) / (sqrt(var) + eps)`; when
///   `z > 2.5` the norm is clipped to `mean + 2.5·std / (z / 2.5)`: that clip
///   is the alarm (not severe: training goes on).
/// - The EMA then takes in the clipped value (or the norm when not clipped):
///   `mean ← α·mean + (1−α)·x`, then `var ← α·var + (1−α)·(x − mean)²` with
///   the new mean.
///
/// `max_grad_norm` (1.0 in the source) is a static clip applied on top; it
/// detects nothing and is left out. A NaN norm is never clipped (NaN > 2.5 is
/// false) and enters the EMA, as in the source.
#[derive(Debug, Clone)]
pub struct ZClip {
    pub alpha: f64,
    pub z_thresh: f64,
    pub eps: f64,
    pub warmup_steps: usize,
    pub clip_factor: f64,
    buffer: Vec<f64>,
    /// EMA mean and variance, once initialised.
    ema: Option<(f64, f64)>,
}

impl Default for ZClip {
    fn default() -> Self {
        Self {
            alpha: 0.97,
            z_thresh: 2.5,
            eps: 1e-6,
            warmup_steps: 25,
            clip_factor: 1.0,
            buffer: Vec::new(),
            ema: None,
        }
    }
}

impl Anchor for ZClip {
    fn observe(&mut self, summary: &Summary) -> Option<Alarm> {
        let norm = summary.grad_norm?;
        let Some((mean, var)) = self.ema else {
            self.buffer.push(norm);
            if self.buffer.len() >= self.warmup_steps {
                let n = self.buffer.len() as f64;
                let mean = self.buffer.iter().sum::<f64>() / n;
                let var = self.buffer.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                self.ema = Some((mean, var));
                self.buffer.clear();
            }
            return None;
        };
        let std = var.sqrt();
        let z = (norm - mean) / (std + self.eps);
        let clip = (z > self.z_thresh).then(|| {
            let eta = z / self.z_thresh;
            (mean + self.z_thresh * std / eta) * self.clip_factor
        });
        let x = clip.unwrap_or(norm);
        let mean = self.alpha * mean + (1.0 - self.alpha) * x;
        let var = self.alpha * var + (1.0 - self.alpha) * (x - mean).powi(2);
        self.ema = Some((mean, var));
        clip.map(|_| Alarm {
            signal: Signal::GradNorm,
            severe: false,
            value: z,
            threshold: self.z_thresh,
        })
    }
}

// ---------------------------------------------------------------------------
// OLMo-core skip-step
// ---------------------------------------------------------------------------

/// OLMo-core's `SkipStepOptimizer`: repository `allenai/OLMo-core`,
/// `src/olmo_core/optim/skip_step_optimizer.py` (`get_step_factor`).
///
/// Defaults used, as published: `rolling_interval_length` 128,
/// `sigma_factor` 6.
///
/// - The optimizer keeps the last `128 + 1` losses and grad norms (the latest
///   included); every step's values go in, skipped or not.
/// - It judges nothing while it holds fewer than `max(20, 128 / 2)` = 64
///   losses: the first judged step is the 64th, against the 63 before it.
/// - Then `z = |latest − mean| / std` over the window without the latest
///   (`torch.std_mean`: unbiased std), for the loss and, when grad norms are
///   recorded, for the grad norm; the step is skipped unless both are
///   `<= 6`. A skip is the alarm (not severe: training goes on). Note the
///   absolute value: a sudden drop is skipped too; a NaN z-score (a NaN in the
///   window, or a zero std with no change) skips as well, as in the source.
///
/// A summary without a loss is not a step (the trainer always sets one); the
/// grad norm is judged on summaries that carry one.
#[derive(Debug, Clone)]
pub struct OlmoSkipStep {
    pub rolling_interval_length: usize,
    pub sigma_factor: f64,
    losses: VecDeque<f64>,
    grad_norms: VecDeque<f64>,
}

impl Default for OlmoSkipStep {
    fn default() -> Self {
        Self {
            rolling_interval_length: 128,
            sigma_factor: 6.0,
            losses: VecDeque::new(),
            grad_norms: VecDeque::new(),
        }
    }
}

/// `|latest − mean| / std` of the values before the latest (unbiased std).
fn olmo_z(window: &VecDeque<f64>) -> f64 {
    let n = window.len() - 1;
    let latest = window[n];
    let mean = window.iter().take(n).sum::<f64>() / n as f64;
    let var = window.iter().take(n).map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    (latest - mean).abs() / var.sqrt()
}

impl Anchor for OlmoSkipStep {
    fn observe(&mut self, summary: &Summary) -> Option<Alarm> {
        let loss = summary.loss?;
        let keep = self.rolling_interval_length + 1;
        push_bounded(&mut self.losses, loss, keep);
        if let Some(g) = summary.grad_norm {
            push_bounded(&mut self.grad_norms, g, keep);
        }
        if self.losses.len() < 20.max(self.rolling_interval_length / 2) {
            return None;
        }
        let alarm = |signal, z| Alarm {
            signal,
            severe: false,
            value: z,
            threshold: self.sigma_factor,
        };
        let loss_z = olmo_z(&self.losses);
        if !proceeds(loss_z, self.sigma_factor) {
            return Some(alarm(Signal::Loss, loss_z));
        }
        if summary.grad_norm.is_some() && self.grad_norms.len() >= 2 {
            let grad_z = olmo_z(&self.grad_norms);
            if !proceeds(grad_z, self.sigma_factor) {
                return Some(alarm(Signal::GradNorm, grad_z));
            }
        }
        None
    }
}

/// The source's `z <= sigma_factor`: false for a NaN z-score, so NaN skips.
fn proceeds(z: f64, sigma_factor: f64) -> bool {
    z <= sigma_factor
}

fn push_bounded(window: &mut VecDeque<f64>, x: f64, cap: usize) {
    window.push_back(x);
    while window.len() > cap {
        window.pop_front();
    }
}

// ---------------------------------------------------------------------------
// Lightning SpikeDetection
// ---------------------------------------------------------------------------

/// Lightning Fabric's `SpikeDetection`: repository
/// `Lightning-AI/pytorch-lightning`,
/// `src/lightning/fabric/utilities/spike.py` (`on_train_batch_end`,
/// `_is_spike`).
///
/// Defaults used, as published: `mode` "min", `window` 10, `warmup` 1,
/// `atol` None, `rtol` 2.0, `finite_only` True.
///
/// - Batches with index `< warmup` (the first) are not judged.
/// - A batch is a spike when its loss is non-finite (`finite_only`), or when
///   it is not an improvement on the last recorded loss (`loss − last > 0` in
///   min mode) and `|loss − running| >= rtol·running`, where `running` is the
///   mean of the last 10 recorded losses (torchmetrics `Running(MeanMetric,
///   window=10)`; a NaN update counts as an empty slot, as `MeanMetric`
///   drops NaN values). With rtol 2 that is a loss at least 3× the mean.
/// - A spike raises `TrainingSpikeException`, which stops the run: severe.
///   A spike's loss is not recorded; any other batch's is.
///
/// The source reduces the decision over ranks (any rank's spike stops every
/// rank); the runner counts a step once whichever rank fired, which is the
/// same thing for scoring.
#[derive(Debug, Clone)]
pub struct LightningSpike {
    pub window: usize,
    pub warmup: u64,
    pub atol: Option<f64>,
    pub rtol: Option<f64>,
    pub finite_only: bool,
    batch_idx: u64,
    last_val: f64,
    /// The running window's slots: `None` for an update whose NaN was dropped.
    recent: VecDeque<Option<f64>>,
}

impl Default for LightningSpike {
    fn default() -> Self {
        Self {
            window: 10,
            warmup: 1,
            atol: None,
            rtol: Some(2.0),
            finite_only: true,
            batch_idx: 0,
            last_val: 0.0,
            recent: VecDeque::new(),
        }
    }
}

impl LightningSpike {
    fn running_mean(&self) -> f64 {
        let (sum, n) = self
            .recent
            .iter()
            .flatten()
            .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        sum / n as f64
    }

    fn is_spike(&self, loss: f64, running: f64) -> bool {
        if self.finite_only && !loss.is_finite() {
            return true;
        }
        // mode "min": a loss at or below the last one is an improvement.
        if loss - self.last_val <= 0.0 {
            return false;
        }
        let atol_ok = self.atol.is_none_or(|a| (loss - running).abs() >= a.abs());
        let rtol_ok = self.rtol.is_none_or(|r| (loss - running).abs() >= (r * running).abs());
        atol_ok && rtol_ok
    }
}

impl Anchor for LightningSpike {
    fn observe(&mut self, summary: &Summary) -> Option<Alarm> {
        let loss = summary.loss?;
        let idx = self.batch_idx;
        self.batch_idx += 1;
        let running = self.running_mean();
        if idx >= self.warmup && self.is_spike(loss, running) {
            return Some(Alarm {
                signal: Signal::Loss,
                severe: true,
                value: loss,
                threshold: running * (1.0 + self.rtol.unwrap_or(0.0)),
            });
        }
        // finite_only: every batch that is not a spike is recorded.
        push_bounded_slot(&mut self.recent, (!loss.is_nan()).then_some(loss), self.window);
        self.last_val = loss;
        None
    }
}

fn push_bounded_slot(window: &mut VecDeque<Option<f64>>, x: Option<f64>, cap: usize) {
    window.push_back(x);
    while window.len() > cap {
        window.pop_front();
    }
}

// ---------------------------------------------------------------------------
// llm-foundry KillLossSpike
// ---------------------------------------------------------------------------

/// The smallest window, and the loss cap's ceiling (`_MIN_WINDOW_SIZE`,
/// `_MAX_LOSS_CAP`).
const FOUNDRY_MIN_WINDOW: usize = 100;
const FOUNDRY_MAX_LOSS_CAP: f64 = 10.0;
/// The window as a fraction of the run (`_WINDOW_FRACTION`).
const FOUNDRY_WINDOW_FRACTION: f64 = 0.05;

/// llm-foundry's `KillLossSpike` callback: repository `mosaicml/llm-foundry`,
/// `llmfoundry/callbacks/kill_loss_spike_callback.py` (`batch_end`).
///
/// Defaults used, as published: `patience` 4, `outlier_multiplier` 2,
/// `window_size` 100 (then grown to 5% of the run's batches when that is
/// larger), `loss_cap` 10. `log_only` defaults to True (log a warning only);
/// the callback is evaluated as configured to kill (`log_only` False), which
/// is what its name promises: each firing raises `LossSpikeError` or
/// `HighLossError` and ends the run, so every alarm is severe.
///
/// - Nothing is judged until the window is full. When it first fills (100
///   losses), the window grows to `max(100, round(0.05 · total batches))`;
///   if it grew, judging waits until the larger window is full.
/// - The loss cap becomes the largest loss of the first window (at most 10)
///   only when the batch count equals the window size at a judged batch;
///   Composer counts the batch before `BATCH_END` (1-based), so at the first
///   judged batch the count is the window size plus one and the cap stays 10.
/// - Spike: the loss is `>= 2 ×` the window's mean; after more than
///   `patience` such batches in a row (the 5th), every further one fires; a
///   batch below resets the count.
/// - High losses: otherwise, from batch `2 × window` on, when at least half
///   the window is above the loss cap.
/// - Every loss, judged or not, then enters the window (a NaN included: the
///   mean turns NaN and the spike test stays false while it is in there).
#[derive(Debug, Clone)]
pub struct KillLossSpike {
    pub patience: u32,
    pub outlier_multiplier: f64,
    pub window_size: usize,
    pub loss_cap: f64,
    /// The run's total batches (`state.max_duration`), when known.
    total_batches: Option<u64>,
    window_size_set: bool,
    loss_cap_set: bool,
    outlier_counter: u32,
    /// `state.timestamp.batch` at `BATCH_END`: batches done, this one included.
    batch: u64,
    window: VecDeque<f64>,
}

impl KillLossSpike {
    /// An instance for a run of `total_batches` batches (`None`: unknown, the
    /// window stays 100).
    pub fn new(total_batches: Option<u64>) -> Self {
        Self {
            patience: 4,
            outlier_multiplier: 2.0,
            window_size: FOUNDRY_MIN_WINDOW,
            loss_cap: FOUNDRY_MAX_LOSS_CAP,
            total_batches,
            window_size_set: false,
            loss_cap_set: false,
            outlier_counter: 0,
            batch: 0,
            window: VecDeque::new(),
        }
    }

    fn detect_loss_spike(&mut self, loss: f64, running: f64) -> bool {
        if loss >= running * self.outlier_multiplier {
            self.outlier_counter += 1;
            return self.outlier_counter > self.patience;
        }
        self.outlier_counter = 0;
        false
    }

    fn detect_high_losses(&self) -> bool {
        if self.batch < 2 * self.window_size as u64 {
            return false;
        }
        let high = self.window.iter().filter(|&&l| l > self.loss_cap).count();
        high as f64 >= self.window_size as f64 / 2.0
    }

    fn push(&mut self, loss: f64) {
        push_bounded(&mut self.window, loss, self.window_size);
    }
}

impl Anchor for KillLossSpike {
    fn observe(&mut self, summary: &Summary) -> Option<Alarm> {
        let loss = summary.loss?;
        self.batch += 1;
        if self.window.len() != self.window_size {
            self.push(loss);
            return None;
        }
        if !self.window_size_set {
            if let Some(total) = self.total_batches {
                let grown = (total as f64 * FOUNDRY_WINDOW_FRACTION).round_ties_even() as usize;
                self.window_size = self.window_size.max(grown);
            }
            self.window_size_set = true;
            if self.window_size > FOUNDRY_MIN_WINDOW {
                self.push(loss);
                return None;
            }
        }
        if !self.loss_cap_set && self.batch == self.window_size as u64 {
            // Python's max() and min(): a NaN first element wins.
            let first = self.window[0];
            let max = self
                .window
                .iter()
                .skip(1)
                .fold(first, |m, &x| if x > m { x } else { m });
            self.loss_cap = if self.loss_cap < max { self.loss_cap } else { max };
            self.loss_cap_set = true;
        }
        let running = self.window.iter().sum::<f64>() / self.window.len() as f64;
        let alarm = if self.detect_loss_spike(loss, running) {
            Some(Alarm {
                signal: Signal::Loss,
                severe: true,
                value: loss,
                threshold: running * self.outlier_multiplier,
            })
        } else if self.detect_high_losses() {
            Some(Alarm {
                signal: Signal::Loss,
                severe: true,
                value: loss,
                threshold: self.loss_cap,
            })
        } else {
            None
        };
        self.push(loss);
        alarm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(step: u64, loss: f64) -> Summary {
        Summary {
            step,
            loss: Some(loss),
            ..Summary::default()
        }
    }

    fn norm(step: u64, norm: f64) -> Summary {
        Summary {
            step,
            grad_norm: Some(norm),
            ..Summary::default()
        }
    }

    fn firing_steps(anchor: &mut dyn Anchor, summaries: &[Summary]) -> Vec<u64> {
        summaries
            .iter()
            .filter_map(|s| anchor.observe(s).map(|_| s.step))
            .collect()
    }

    #[test]
    fn seed_fires_above_ten_and_on_non_finite_norms() {
        let run: Vec<Summary> = [1.0, 10.0, 10.5, f64::NAN, f64::INFINITY, 3.0]
            .iter()
            .enumerate()
            .map(|(i, &x)| norm(i as u64, x))
            .collect();
        assert_eq!(firing_steps(&mut SeedCeiling::default(), &run), [2, 3, 4]);
    }

    #[test]
    fn zclip_judges_after_its_warm_up_and_feeds_the_clip_to_its_ema() {
        // Alternating 1.0 / 1.2: mean ~1.1, std ~0.1 after the warm-up.
        let mut run: Vec<Summary> = (0..40).map(|i| norm(i, if i % 2 == 0 { 1.0 } else { 1.2 })).collect();
        run[30] = norm(30, 100.0);
        let mut z = ZClip::default();
        assert_eq!(firing_steps(&mut z, &run), [30]);
        // The clipped value entered the EMA, not 100.
        let (mean, _) = z.ema.unwrap();
        assert!(mean < 1.2, "mean {mean}");
        // A spike inside the warm-up is not judged (it inflates the first
        // variance, as in the source).
        let mut run: Vec<Summary> = (0..25).map(|i| norm(i, 1.0)).collect();
        run[10] = norm(10, 100.0);
        assert!(firing_steps(&mut ZClip::default(), &run).is_empty());
    }

    #[test]
    fn zclip_clip_value_is_adaptive() {
        let mut z = ZClip::default();
        for i in 0..25 {
            z.observe(&norm(i, if i % 2 == 0 { 1.0 } else { 3.0 }));
        }
        let (mean, var) = z.ema.unwrap();
        assert!((mean - 1.96).abs() < 1e-9 && (var.sqrt() - 0.9992).abs() < 1e-3);
        let alarm = z.observe(&norm(25, 50.0)).unwrap();
        assert!(alarm.value > 40.0 && !alarm.severe);
        assert!(z.observe(&norm(26, 3.0)).is_none());
    }

    #[test]
    fn olmo_starts_judging_at_the_64th_loss_in_both_directions() {
        let steady = |i: u64| 2.0 + 0.01 * ((i % 7) as f64);
        let mut run: Vec<Summary> = (0..200).map(|i| loss(i, steady(i))).collect();
        run[62] = loss(62, 50.0); // the 63rd loss: not judged yet
        run[150] = loss(150, 0.001); // a drop is skipped too
        let mut o = OlmoSkipStep::default();
        let fired = firing_steps(&mut o, &run);
        // 62 is not judged, and it stays in the window until step 191,
        // inflating the std: the drop at 150 reads as < 6 sigma.
        assert!(fired.is_empty(), "{fired:?}");
        let mut clean: Vec<Summary> = (0..200).map(|i| loss(i, steady(i))).collect();
        clean[150] = loss(150, 0.001);
        assert_eq!(firing_steps(&mut OlmoSkipStep::default(), &clean), [150]);
    }

    #[test]
    fn olmo_judges_grad_norms_and_a_nan_skips() {
        let mut run: Vec<Summary> = (0..100)
            .map(|i| Summary {
                step: i,
                loss: Some(2.0 + 0.01 * ((i % 5) as f64)),
                grad_norm: Some(1.0 + 0.01 * ((i % 3) as f64)),
                ..Summary::default()
            })
            .collect();
        run[80].grad_norm = Some(30.0);
        run[90].loss = Some(f64::NAN);
        let fired = firing_steps(&mut OlmoSkipStep::default(), &run);
        assert_eq!(fired[0], 80);
        // From the NaN on, every z-score is NaN: every step is skipped.
        assert_eq!(&fired[1..], (90..100).collect::<Vec<u64>>());
    }

    #[test]
    fn lightning_fires_at_three_times_the_running_mean_and_on_nan() {
        let mut run: Vec<Summary> = (0..30).map(|i| loss(i, 2.0)).collect();
        run[12] = loss(12, 5.9); // under 3x: recorded
        run[25] = loss(25, 6.1); // over 3x: a spike, not recorded
        run[26] = loss(26, 6.2); // still measured against 2.0
        run[28] = loss(28, f64::NAN);
        let mut l = LightningSpike::default();
        let fired: Vec<(u64, bool)> = run
            .iter()
            .filter_map(|s| l.observe(s).map(|a| (s.step, a.severe)))
            .collect();
        assert_eq!(fired, [(25, true), (26, true), (28, true)]);
        // The first batch is never judged, even when it is NaN.
        let mut l = LightningSpike::default();
        assert!(l.observe(&loss(0, f64::NAN)).is_none());
        assert!(l.observe(&loss(1, f64::NAN)).is_some());
    }

    #[test]
    fn kill_loss_spike_needs_five_outliers_in_a_row() {
        let mut run: Vec<Summary> = (0..140).map(|i| loss(i, 2.0)).collect();
        for (i, s) in run.iter_mut().enumerate().skip(110).take(4) {
            *s = loss(i as u64, 5.0); // four in a row: tolerated
        }
        for (i, s) in run.iter_mut().enumerate().skip(120).take(7) {
            *s = loss(i as u64, 5.0); // seven: the 5th, 6th and 7th fire
        }
        let mut k = KillLossSpike::new(Some(140));
        assert_eq!(firing_steps(&mut k, &run), [124, 125, 126]);
    }

    #[test]
    fn kill_loss_spike_grows_its_window_with_the_run() {
        // 4000 batches: a window of 200, judging from the 201st loss.
        let mut run: Vec<Summary> = (0..400).map(|i| loss(i, 2.0)).collect();
        for (i, s) in run.iter_mut().enumerate().skip(150).take(10) {
            *s = loss(i as u64, 9.0);
        }
        assert!(firing_steps(&mut KillLossSpike::new(Some(4000)), &run).is_empty());
        assert_eq!(firing_steps(&mut KillLossSpike::new(Some(400)), &run).len(), 6);
    }

    #[test]
    fn kill_loss_spike_fires_on_persistently_high_losses() {
        // Loss 11 throughout: never 2x its mean, but above the cap of 10.
        let run: Vec<Summary> = (0..210).map(|i| loss(i, 11.0)).collect();
        let fired = firing_steps(&mut KillLossSpike::new(None), &run);
        // Batch count >= 200 from the 200th loss (step 199) on.
        assert_eq!(fired, (199..210).collect::<Vec<u64>>());
    }
}
