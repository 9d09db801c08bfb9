//! Settings of the loss rules: jumps and divergence.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{at_least, check, positive, unit};

/// A loss jump judged against the run's own noise at its own logging
/// interval: the median and MAD of the last `window` records. A jump is `z`
/// robust deviations and `min_rise` above the median. A jump that comes back
/// at the next record is noise (info); one that persists is a warning, and
/// with a gradient spike within `link_records` records it is critical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSpike {
    pub enabled: bool,
    pub window: u32,
    /// Records needed before jumps are judged.
    pub warmup: u32,
    pub z: f64,
    /// A jump must also be this far above the median, relative to it.
    pub min_rise: f64,
    /// Records between a gradient spike and a loss jump that link them.
    pub link_records: u32,
}

impl Default for LossSpike {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 64,
            warmup: 16,
            z: 6.0,
            min_rise: 0.2,
            link_records: 1,
        }
    }
}

impl LossSpike {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.window, at_least(8))?;
        check!(section, self.z, positive())
    }
}

/// The smoothed loss rises over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossDivergence {
    pub enabled: bool,
    pub window: u32,
    /// EMA smoothing of the loss before looking for a rise.
    pub alpha: f64,
    /// Relative rise of the smoothed loss above its minimum within the window.
    pub rise: f64,
    /// ... that is also this many times the smoothed loss's own noise (the
    /// loss's robust spread, shrunk by the smoothing): a noisy plateau
    /// wanders by 25% without diverging.
    pub z: f64,
}

impl Default for LossDivergence {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 200,
            alpha: 0.98,
            rise: 0.25,
            z: 6.0,
        }
    }
}

impl LossDivergence {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.window, at_least(3))?;
        check!(section, self.alpha, unit())?;
        check!(section, self.rise, positive())
    }
}
