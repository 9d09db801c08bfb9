//! Settings of the per-layer rules: static norm limits, collapsed norms, and
//! the weight-update ratio.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{at_least, check, unit, when};

/// Static per-job limits on the global and per-layer L2 norm. Off until a
/// maximum is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NormCeiling {
    pub enabled: bool,
    pub global_max: Option<f64>,
    pub layer_max: Option<f64>,
}

impl NormCeiling {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let has_limit = self.global_max.is_some() || self.layer_max.is_some();
        check!(
            section,
            self.enabled,
            when(
                |on: bool| !on || has_limit,
                format!("needs {section}.global_max or {section}.layer_max")
            )
        )
    }
}

/// Norms that collapse for `patience` consecutive records: a dead layer, or a
/// model that stopped learning. Relative, so a converged model whose gradients
/// all shrank together is not called dead: a layer is dead when its norm is
/// below `relative` × both the layers' typical norm at that step (their RMS)
/// and its own early level; the global norm when it is below `relative` × its
/// early level while the loss is not falling. The absolute floors are optional
/// extra conditions (SageMaker Debugger's VanishingGradient uses 1e-7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormFloor {
    pub enabled: bool,
    pub relative: f64,
    pub global_min: Option<f64>,
    pub layer_min: Option<f64>,
    pub patience: u32,
}

impl Default for NormFloor {
    fn default() -> Self {
        Self {
            enabled: true,
            relative: 1e-4,
            global_min: None,
            layer_min: None,
            patience: 5,
        }
    }
}

impl NormFloor {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.patience, at_least(1))?;
        check!(section, self.relative, unit())
    }
}

/// Per-layer ‖Δw‖/‖w‖ outside a band (SageMaker Debugger WeightUpdateRatio).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateRatio {
    pub enabled: bool,
    pub min: f64,
    pub max: f64,
}

impl Default for UpdateRatio {
    fn default() -> Self {
        Self {
            enabled: true,
            min: 1e-8,
            max: 10.0,
        }
    }
}

impl UpdateRatio {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(
            section,
            self.min,
            when(|min: f64| min < self.max, format!("must be below {section}.max"))
        )
    }
}
