//! The non-finite rule's settings.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// NaN/Inf in the loss, the global norm or any layer. Always on by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nonfinite {
    pub enabled: bool,
    /// Non-finite steps within `window` steps that turn skip-step advice into a
    /// rollback.
    pub repeat: u32,
    pub window: u64,
}

impl Default for Nonfinite {
    fn default() -> Self {
        Self {
            enabled: true,
            repeat: 3,
            window: 50,
        }
    }
}

impl Nonfinite {
    /// Any count and window are valid (a `repeat` of 0 rolls back at once).
    pub fn validate(&self, _section: &str) -> Result<(), ConfigError> {
        Ok(())
    }
}
