//! Settings of the gradient-norm rules: spikes, sustained growth, vanishing.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{above, at_least, check, positive, unit, when};

/// z-score of the global norm against an EMA mean and variance (ZClip). The EMA
/// takes in the clipped value, so one spike does not inflate the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GradSpike {
    pub enabled: bool,
    pub alpha: f64,
    pub warmup: u32,
    pub z: f64,
    /// At or above this z-score the spike is severe (OLMo-core skips such steps).
    pub severe_z: f64,
    /// Advise clipping only when the norm is at least this multiple of the
    /// clip bound (μ + z·σ): below it, clipping changes little and the spike
    /// stays an anomaly without advice.
    pub min_clip_ratio: f64,
}

impl Default for GradSpike {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 0.97,
            warmup: 25,
            z: 2.5,
            severe_z: 6.0,
            min_clip_ratio: 1.25,
        }
    }
}

impl GradSpike {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.alpha, unit())?;
        check!(section, self.z, positive())?;
        check!(
            section,
            self.severe_z,
            when(|z: f64| z >= self.z, format!("must be at least {section}.z"))
        )?;
        check!(section, self.min_clip_ratio, at_least(1.0))
    }
}

/// The fitted slope of log(norm) over a window says the norm keeps growing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GradGrowth {
    pub enabled: bool,
    pub window: u32,
    /// Fires when the fitted growth over the window is at least this factor.
    pub factor: f64,
    /// Minimum fit quality (R²) so noise is not read as a trend.
    pub min_r2: f64,
    /// The loss counts as falling (growth is then benign, info only) when its
    /// smoothed value dropped by at least this fraction over the window.
    pub loss_fall: f64,
    /// Growth this fast over one window is a warning even while the loss
    /// still falls (healthy runs grow a few-fold over hundreds of steps, an
    /// explosion tenfold within a window), unless a learning-rate warm-up
    /// that rose as much explains it.
    pub fast_factor: f64,
}

impl Default for GradGrowth {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 50,
            factor: 4.0,
            min_r2: 0.6,
            loss_fall: 0.005,
            fast_factor: 10.0,
        }
    }
}

impl GradGrowth {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.window, at_least(3))?;
        check!(section, self.factor, above(1.0))?;
        check!(section, self.fast_factor, above(1.0))
    }
}

/// The norm falls by `drop`× over the window, or the first layer's norm is a
/// tiny fraction of the last layer's (gradients vanish with depth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Vanishing {
    pub enabled: bool,
    pub window: u32,
    pub drop: f64,
    pub min_r2: f64,
    pub depth_ratio: f64,
    /// A slow collapse: the smoothed log-norm this far below its peak while
    /// the loss is not falling (however long it took).
    pub long_drop: f64,
}

impl Default for Vanishing {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 50,
            drop: 10.0,
            min_r2: 0.6,
            depth_ratio: 1e-4,
            long_drop: 100.0,
        }
    }
}

impl Vanishing {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.window, at_least(3))?;
        check!(section, self.drop, above(1.0))?;
        check!(section, self.long_drop, above(1.0))
    }
}
