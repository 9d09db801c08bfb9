//! The advice policy's settings.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{at_least, check, unit};

/// How findings become advice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Steps during which the same advice for the same episode is not repeated.
    pub cooldown_steps: u64,
    /// Steps without a finding of a family that end its episode.
    pub healthy_steps: u64,
    /// Factor for learning-rate advice.
    pub lr_factor: f64,
    /// Factor for AMP loss-scale advice.
    pub loss_scale_factor: f64,
    /// Rollback advice goes this many steps before the episode began.
    pub rollback_steps: u64,
    /// Rollbacks an episode may advise: one that was applied and did not
    /// hold is retried with the learning rate cut, until this many; then halt.
    pub max_rollbacks: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cooldown_steps: 20,
            healthy_steps: 50,
            lr_factor: 0.5,
            loss_scale_factor: 0.5,
            rollback_steps: 100,
            max_rollbacks: 4,
        }
    }
}

impl Policy {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.lr_factor, unit())?;
        check!(section, self.loss_scale_factor, unit())?;
        check!(section, self.healthy_steps, at_least(1))?;
        check!(section, self.max_rollbacks, at_least(1))
    }
}
