//! The rule set: every rule's tunables with documented defaults, read from TOML.
//!
//! A rules file has the same tables as [`Rules`] at its top level (all optional;
//! what is left out keeps its default), plus `[profiles.NAME]` and `[jobs."ID"]`
//! tables holding partial overrides. A job's effective rules are the defaults,
//! then its profile (named by the worker's Hello), then its own `[jobs]` entry.
//! Unknown keys are errors, so a typo never silently keeps a default.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors from reading or validating a rules file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read rules file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid rules file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid rule setting {field} = {value}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: &'static str,
    },
}

/// Every rule's settings. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    pub nonfinite: Nonfinite,
    pub norm_ceiling: NormCeiling,
    pub norm_floor: NormFloor,
    pub grad_spike: GradSpike,
    pub grad_growth: GradGrowth,
    pub vanishing: Vanishing,
    pub loss_spike: LossSpike,
    pub loss_divergence: LossDivergence,
    pub update_ratio: UpdateRatio,
    pub loss_scale_floor: LossScaleFloor,
    pub rank_outlier: RankOutlier,
    pub straggler: Straggler,
    pub stalled: Stalled,
    pub policy: Policy,
}

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

/// Static per-job limits on the global and per-layer L2 norm. Off until a
/// maximum is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NormCeiling {
    pub enabled: bool,
    pub global_max: Option<f64>,
    pub layer_max: Option<f64>,
}

/// Norms below a floor for `patience` consecutive steps: a dead layer, or a
/// model that stopped learning (SageMaker Debugger VanishingGradient: 1e-7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormFloor {
    pub enabled: bool,
    pub global_min: f64,
    pub layer_min: f64,
    pub patience: u32,
}

impl Default for NormFloor {
    fn default() -> Self {
        Self {
            enabled: true,
            global_min: 1e-7,
            layer_min: 1e-7,
            patience: 5,
        }
    }
}

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
}

impl Default for GradGrowth {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 50,
            factor: 4.0,
            min_r2: 0.6,
            loss_fall: 0.005,
        }
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
}

impl Default for Vanishing {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 50,
            drop: 10.0,
            min_r2: 0.6,
            depth_ratio: 1e-4,
        }
    }
}

/// Loss z-score against its EMA, or the loss at `ratio_to_min`× its recent minimum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSpike {
    pub enabled: bool,
    pub alpha: f64,
    pub warmup: u32,
    pub z: f64,
    /// A spike must also be this far above the moving mean, relative to it:
    /// batch-to-batch loss noise is heavy-tailed, and a bump of a few percent
    /// can clear a z-score on a quiet stretch without being a spike.
    pub min_rise: f64,
    pub ratio_to_min: f64,
    /// Steps a loss spike stays "recent" when judging a gradient spike with it.
    pub link_steps: u64,
}

impl Default for LossSpike {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 0.97,
            warmup: 25,
            z: 6.0,
            min_rise: 0.2,
            ratio_to_min: 10.0,
            link_steps: 3,
        }
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
}

impl Default for LossDivergence {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 200,
            alpha: 0.98,
            rise: 0.25,
        }
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

/// At one step, a rank whose norm is far from its peers' median (k·MAD), or the
/// only rank with non-finite values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankOutlier {
    pub enabled: bool,
    pub k: f64,
    pub min_ranks: u32,
    /// The spread never counts as smaller than this fraction of the median, so
    /// ranks with all-reduced (identical) gradients do not flag rounding noise.
    pub min_rel_spread: f64,
}

impl Default for RankOutlier {
    fn default() -> Self {
        Self {
            enabled: true,
            k: 6.0,
            min_ranks: 4,
            min_rel_spread: 0.05,
        }
    }
}

/// A rank that lags the job's leading rank by `lag_steps` or more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Straggler {
    pub enabled: bool,
    pub lag_steps: u64,
    /// ... and its latest summary is at least this much older than the
    /// leader's (when both carry a time): a few steps of transport jitter
    /// between streams is not a straggler.
    pub min_lag_secs: f64,
}

impl Default for Straggler {
    fn default() -> Self {
        Self {
            enabled: true,
            lag_steps: 10,
            min_lag_secs: 1.0,
        }
    }
}

/// A rank that sent nothing for `timeout_secs` while its peers did (judged on
/// the records' own times, or the service's clock through `Engine::tick`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stalled {
    pub enabled: bool,
    pub timeout_secs: f64,
}

impl Default for Stalled {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout_secs: 300.0,
        }
    }
}

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
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cooldown_steps: 20,
            healthy_steps: 50,
            lr_factor: 0.5,
            loss_scale_factor: 0.5,
            rollback_steps: 100,
        }
    }
}

impl Rules {
    /// Checks ranges a TOML type cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, field: &str, value: impl ToString, reason: &'static str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field: field.to_owned(),
                    value: value.to_string(),
                    reason,
                })
            }
        }
        let unit = |x: f64| x > 0.0 && x < 1.0;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        check(
            unit(self.grad_spike.alpha),
            "grad_spike.alpha",
            self.grad_spike.alpha,
            "must be between 0 and 1",
        )?;
        check(
            positive(self.grad_spike.z),
            "grad_spike.z",
            self.grad_spike.z,
            "must be positive",
        )?;
        check(
            self.grad_spike.severe_z >= self.grad_spike.z,
            "grad_spike.severe_z",
            self.grad_spike.severe_z,
            "must be at least grad_spike.z",
        )?;
        check(
            self.straggler.min_lag_secs >= 0.0,
            "straggler.min_lag_secs",
            self.straggler.min_lag_secs,
            "must not be negative",
        )?;
        check(
            self.grad_spike.min_clip_ratio >= 1.0,
            "grad_spike.min_clip_ratio",
            self.grad_spike.min_clip_ratio,
            "must be at least 1",
        )?;
        check(
            self.norm_floor.patience >= 1,
            "norm_floor.patience",
            self.norm_floor.patience,
            "must be at least 1",
        )?;
        check(
            self.grad_growth.window >= 3,
            "grad_growth.window",
            self.grad_growth.window,
            "must be at least 3",
        )?;
        check(
            self.grad_growth.factor > 1.0,
            "grad_growth.factor",
            self.grad_growth.factor,
            "must be above 1",
        )?;
        check(
            self.vanishing.window >= 3,
            "vanishing.window",
            self.vanishing.window,
            "must be at least 3",
        )?;
        check(
            self.vanishing.drop > 1.0,
            "vanishing.drop",
            self.vanishing.drop,
            "must be above 1",
        )?;
        check(
            unit(self.loss_spike.alpha),
            "loss_spike.alpha",
            self.loss_spike.alpha,
            "must be between 0 and 1",
        )?;
        check(
            positive(self.loss_spike.z),
            "loss_spike.z",
            self.loss_spike.z,
            "must be positive",
        )?;
        check(
            self.loss_spike.ratio_to_min > 1.0,
            "loss_spike.ratio_to_min",
            self.loss_spike.ratio_to_min,
            "must be above 1",
        )?;
        check(
            self.loss_divergence.window >= 3,
            "loss_divergence.window",
            self.loss_divergence.window,
            "must be at least 3",
        )?;
        check(
            unit(self.loss_divergence.alpha),
            "loss_divergence.alpha",
            self.loss_divergence.alpha,
            "must be between 0 and 1",
        )?;
        check(
            positive(self.loss_divergence.rise),
            "loss_divergence.rise",
            self.loss_divergence.rise,
            "must be positive",
        )?;
        check(
            self.update_ratio.min < self.update_ratio.max,
            "update_ratio.min",
            self.update_ratio.min,
            "must be below update_ratio.max",
        )?;
        check(
            positive(self.rank_outlier.k),
            "rank_outlier.k",
            self.rank_outlier.k,
            "must be positive",
        )?;
        check(
            self.rank_outlier.min_ranks >= 3,
            "rank_outlier.min_ranks",
            self.rank_outlier.min_ranks,
            "must be at least 3",
        )?;
        check(
            self.straggler.lag_steps >= 1,
            "straggler.lag_steps",
            self.straggler.lag_steps,
            "must be at least 1",
        )?;
        check(
            positive(self.stalled.timeout_secs),
            "stalled.timeout_secs",
            self.stalled.timeout_secs,
            "must be positive",
        )?;
        check(
            self.policy.lr_factor > 0.0 && self.policy.lr_factor < 1.0,
            "policy.lr_factor",
            self.policy.lr_factor,
            "must be between 0 and 1",
        )?;
        check(
            self.policy.loss_scale_factor > 0.0 && self.policy.loss_scale_factor < 1.0,
            "policy.loss_scale_factor",
            self.policy.loss_scale_factor,
            "must be between 0 and 1",
        )?;
        check(
            self.policy.healthy_steps >= 1,
            "policy.healthy_steps",
            self.policy.healthy_steps,
            "must be at least 1",
        )?;
        if self.norm_ceiling.enabled {
            check(
                self.norm_ceiling.global_max.is_some() || self.norm_ceiling.layer_max.is_some(),
                "norm_ceiling.enabled",
                true,
                "needs norm_ceiling.global_max or norm_ceiling.layer_max",
            )?;
        }
        Ok(())
    }
}

/// A parsed rules file: the defaults plus named profiles and per-job overrides.
#[derive(Debug, Clone, Default)]
pub struct RuleBook {
    base: toml::Table,
    defaults: Rules,
    profiles: BTreeMap<String, toml::Table>,
    jobs: BTreeMap<String, toml::Table>,
    /// Service sections that are not rules (`[kafka]`), kept for the service.
    service: BTreeMap<String, toml::Table>,
}

/// Top-level tables of the config file that configure the service, not rules.
const SERVICE_SECTIONS: [&str; 1] = ["kafka"];

impl RuleBook {
    /// The built-in defaults, with no profiles or overrides.
    pub fn builtin() -> Self {
        Self::parse_str("", "<builtin>").expect("defaults are valid")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_str(&text, &path.display().to_string())
    }

    /// Parses a rules file and validates every profile and job override against
    /// the defaults, so a bad override fails at load time, not at the first step.
    pub fn parse_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: origin.to_owned(),
            message,
        };
        let mut base: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut take_section = |name: &str| -> Result<BTreeMap<String, toml::Table>, ConfigError> {
            match base.remove(name) {
                None => Ok(BTreeMap::new()),
                Some(toml::Value::Table(t)) => t
                    .into_iter()
                    .map(|(k, v)| match v {
                        toml::Value::Table(t) => Ok((k, t)),
                        other => Err(parse_err(format!(
                            "{name}.{k} must be a table, found {}",
                            other.type_str()
                        ))),
                    })
                    .collect(),
                Some(other) => Err(parse_err(format!("{name} must be a table, found {}", other.type_str()))),
            }
        };
        let profiles = take_section("profiles")?;
        let jobs = take_section("jobs")?;
        let mut service = BTreeMap::new();
        for name in SERVICE_SECTIONS {
            match base.remove(name) {
                None => {}
                Some(toml::Value::Table(t)) => {
                    service.insert(name.to_owned(), t);
                }
                Some(other) => return Err(parse_err(format!("{name} must be a table, found {}", other.type_str()))),
            }
        }
        let defaults = rules_from(&base).map_err(|e| with_origin(e, origin, None))?;
        let book = Self {
            base,
            defaults,
            profiles,
            jobs,
            service,
        };
        for name in book.profiles.keys() {
            book.resolve(Some(name), None)
                .map_err(|e| with_origin(e, origin, Some(format!("profiles.{name}"))))?;
        }
        for job in book.jobs.keys() {
            book.resolve(None, Some(job))
                .map_err(|e| with_origin(e, origin, Some(format!("jobs.{job}"))))?;
        }
        Ok(book)
    }

    /// A service section of the file (`kafka`), unparsed: its owner reads it.
    pub fn section(&self, name: &str) -> Option<&toml::Table> {
        self.service.get(name)
    }

    /// The default rules (no profile, no job override).
    pub fn defaults(&self) -> &Rules {
        &self.defaults
    }

    pub fn has_profile(&self, name: &str) -> bool {
        self.profiles.contains_key(name)
    }

    /// The effective rules of a job: defaults, then its profile, then its override.
    pub fn for_job(&self, job: &str, profile: Option<&str>) -> Result<Rules, ConfigError> {
        if let Some(p) = profile
            && !self.profiles.contains_key(p)
        {
            return Err(ConfigError::Invalid {
                field: "rule_profile".into(),
                value: p.to_owned(),
                reason: "no such profile in the rules file",
            });
        }
        self.resolve(profile, Some(job))
    }

    fn resolve(&self, profile: Option<&str>, job: Option<&str>) -> Result<Rules, ConfigError> {
        let overlays: Vec<&toml::Table> = profile
            .and_then(|p| self.profiles.get(p))
            .into_iter()
            .chain(job.and_then(|j| self.jobs.get(j)))
            .collect();
        if overlays.is_empty() {
            return Ok(self.defaults.clone());
        }
        let mut merged = self.base.clone();
        for overlay in overlays {
            merge(&mut merged, overlay);
        }
        rules_from(&merged)
    }
}

fn rules_from(table: &toml::Table) -> Result<Rules, ConfigError> {
    let rules: Rules = toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: String::new(),
            message: e.message().to_owned(),
        })?;
    rules.validate()?;
    Ok(rules)
}

fn with_origin(err: ConfigError, origin: &str, section: Option<String>) -> ConfigError {
    match err {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: origin.to_owned(),
            message: match section {
                Some(s) => format!("in [{s}]: {message}"),
                None => message,
            },
        },
        ConfigError::Invalid { field, value, reason } => ConfigError::Invalid {
            field: match section {
                Some(s) => format!("{s}.{field}"),
                None => field,
            },
            value,
            reason,
        },
        other => other,
    }
}

/// Deep-merges `overlay` into `base`: tables merge key by key, values replace.
fn merge(base: &mut toml::Table, overlay: &toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let book = RuleBook::parse_str("", "t").unwrap();
        assert_eq!(book.defaults(), &Rules::default());
        assert_eq!(book.defaults().grad_spike.z, 2.5);
        assert_eq!(book.defaults().grad_spike.alpha, 0.97);
        assert_eq!(book.defaults().grad_spike.warmup, 25);
        assert!(!book.defaults().norm_ceiling.enabled);
    }

    #[test]
    fn job_override_merges_over_profile_and_defaults() {
        let book = RuleBook::parse_str(
            r#"
            [grad_spike]
            z = 3.0
            [profiles.strict.grad_spike]
            warmup = 10
            [jobs."llama-7b".grad_spike]
            severe_z = 8.0
            [jobs."llama-7b".norm_ceiling]
            enabled = true
            global_max = 50.0
            "#,
            "t",
        )
        .unwrap();
        let r = book.for_job("llama-7b", Some("strict")).unwrap();
        assert_eq!(r.grad_spike.z, 3.0);
        assert_eq!(r.grad_spike.warmup, 10);
        assert_eq!(r.grad_spike.severe_z, 8.0);
        assert_eq!(r.norm_ceiling.global_max, Some(50.0));
        let other = book.for_job("other", None).unwrap();
        assert_eq!(other.grad_spike.severe_z, 6.0);
        assert!(!other.norm_ceiling.enabled);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = RuleBook::parse_str("[grad_spike]\nzz = 3.0\n", "rules.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("rules.toml") && msg.contains("zz"), "{msg}");
    }

    #[test]
    fn bad_override_fails_at_load_naming_the_job() {
        let err = RuleBook::parse_str("[jobs.a.grad_spike]\nalpha = 1.5\n", "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rule setting jobs.a.grad_spike.alpha = 1.5: must be between 0 and 1"
        );
    }

    #[test]
    fn a_floor_without_patience_is_rejected() {
        let err = RuleBook::parse_str("[norm_floor]\npatience = 0\n", "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rule setting norm_floor.patience = 0: must be at least 1"
        );
    }

    #[test]
    fn unknown_profile_is_rejected() {
        let err = RuleBook::builtin().for_job("j", Some("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn ceiling_enabled_without_a_limit_is_rejected() {
        let err = RuleBook::parse_str("[norm_ceiling]\nenabled = true\n", "t").unwrap_err();
        assert!(err.to_string().contains("norm_ceiling"), "{err}");
    }
}
