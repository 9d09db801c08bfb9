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
    pub blowup: Blowup,
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

/// A rank whose norm stays outside the job's normal spread between ranks.
/// Data-parallel ranks see different micro-batches, so their local norms
/// differ: the spread (of log-norms around the step's median) is learned from
/// the job's own history. A rank is an outlier when it is `k` spreads away on
/// `persist` of the last `of` judged steps, or `far` × `k` spreads away once;
/// or when it is the only non-finite rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankOutlier {
    pub enabled: bool,
    pub k: f64,
    pub min_ranks: u32,
    /// The spread never counts as smaller than this (a relative deviation),
    /// so ranks with all-reduced, identical gradients do not flag rounding.
    pub min_rel_spread: f64,
    /// Steps judged before the learned spread is trusted; until then only a
    /// far outlier is reported.
    pub warmup: u32,
    pub persist: u32,
    pub of: u32,
    pub far: f64,
}

impl Default for RankOutlier {
    fn default() -> Self {
        Self {
            enabled: true,
            k: 6.0,
            min_ranks: 4,
            min_rel_spread: 0.05,
            warmup: 20,
            persist: 3,
            of: 5,
            far: 3.0,
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
            self.loss_spike.window >= 8,
            "loss_spike.window",
            self.loss_spike.window,
            "must be at least 8",
        )?;
        check(
            positive(self.loss_spike.z),
            "loss_spike.z",
            self.loss_spike.z,
            "must be positive",
        )?;
        check(
            self.blowup.reference >= 1,
            "blowup.reference",
            self.blowup.reference,
            "must be at least 1",
        )?;
        for (field, value) in [
            ("blowup.norm_factor", self.blowup.norm_factor),
            ("blowup.loss_factor", self.blowup.loss_factor),
            ("blowup.loss_follows", self.blowup.loss_follows),
            ("grad_growth.fast_factor", self.grad_growth.fast_factor),
            ("vanishing.long_drop", self.vanishing.long_drop),
        ] {
            check(value > 1.0, field, value, "must be above 1")?;
        }
        check(
            self.norm_floor.relative > 0.0 && self.norm_floor.relative < 1.0,
            "norm_floor.relative",
            self.norm_floor.relative,
            "must be between 0 and 1",
        )?;
        check(
            self.rank_outlier.persist >= 1
                && self.rank_outlier.persist <= self.rank_outlier.of
                && self.rank_outlier.of <= 32,
            "rank_outlier.persist",
            self.rank_outlier.persist,
            "must be between 1 and rank_outlier.of (at most 32)",
        )?;
        check(
            self.rank_outlier.far >= 1.0,
            "rank_outlier.far",
            self.rank_outlier.far,
            "must be at least 1",
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
