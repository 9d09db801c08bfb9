//! The AMP loss-scale rule's settings.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The AMP loss scale keeps backing off toward its minimum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleFloor {
    pub enabled: bool,
    /// Fires when the scale drops to or below this value.
    pub min_scale: f64,
    /// ... or when it backed off this many times within `window` steps.
    pub max_backoffs: u32,
    pub window: u64,
}

impl Default for LossScaleFloor {
    fn default() -> Self {
        Self {
            enabled: true,
            min_scale: 1.0,
            max_backoffs: 8,
            window: 200,
        }
    }
}

impl LossScaleFloor {
    /// Any floor, count and window are valid.
    pub fn validate(&self, _section: &str) -> Result<(), ConfigError> {
        Ok(())
    }
}
