//! The blow-up rule's settings.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{above, at_least, check};

/// Growth by orders of magnitude against the first records' values, judged
/// from the second record on, with no statistics to warm up: a learning rate
/// or an initialisation far off (the commonest failure) explodes within a few
/// steps. The reference is the smallest of the first `reference` finite,
/// non-zero values of the gradient norm and of the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Blowup {
    pub enabled: bool,
    pub reference: u32,
    /// The gradient norm at this multiple of its reference: clip advice at
    /// the scale of the early norms (warning).
    pub norm_factor: f64,
    /// The loss at this multiple of its reference: cut the learning rate
    /// (critical).
    pub loss_factor: f64,
    /// ... or at this smaller multiple while the norm has blown up too.
    pub loss_follows: f64,
}

impl Default for Blowup {
    fn default() -> Self {
        Self {
            enabled: true,
            reference: 5,
            norm_factor: 100.0,
            loss_factor: 10.0,
            loss_follows: 2.0,
        }
    }
}

impl Blowup {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.reference, at_least(1))?;
        check!(section, self.norm_factor, above(1.0))?;
        check!(section, self.loss_factor, above(1.0))?;
        check!(section, self.loss_follows, above(1.0))
    }
}
