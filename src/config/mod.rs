//! The rule set: every rule's tunables with documented defaults, read from TOML.
//!
//! A rules file has the same tables as [`Rules`] at its top level (all optional;
//! what is left out keeps its default), plus `[profiles.NAME]` and `[jobs."ID"]`
//! tables holding partial overrides. A job's effective rules are the defaults,
//! then its profile (named by the worker's Hello), then its own `[jobs]` entry.
//! Unknown keys are errors, so a typo never silently keeps a default.
//!
//! Each rule's settings live in the module of its family (mirroring
//! `engine::rules`), with their defaults and a `validate` that checks them;
//! [`Rules::validate`] only calls those.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

mod blowup;
mod check;
mod grad;
mod layers;
mod loss;
mod loss_scale;
mod nonfinite;
mod policy;
mod ranks;

pub use blowup::Blowup;
pub use grad::{GradGrowth, GradSpike, Vanishing};
pub use layers::{NormCeiling, NormFloor, UpdateRatio};
pub use loss::{LossDivergence, LossSpike};
pub use loss_scale::LossScaleFloor;
pub use nonfinite::Nonfinite;
pub use policy::Policy;
pub use ranks::{RankOutlier, Stalled, Straggler};

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
        reason: String,
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

impl Rules {
    /// Checks ranges a TOML type cannot express: every rule checks its own
    /// settings, named by its table.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nonfinite.validate("nonfinite")?;
        self.norm_ceiling.validate("norm_ceiling")?;
        self.norm_floor.validate("norm_floor")?;
        self.blowup.validate("blowup")?;
        self.grad_spike.validate("grad_spike")?;
        self.grad_growth.validate("grad_growth")?;
        self.vanishing.validate("vanishing")?;
        self.loss_spike.validate("loss_spike")?;
        self.loss_divergence.validate("loss_divergence")?;
        self.update_ratio.validate("update_ratio")?;
        self.loss_scale_floor.validate("loss_scale_floor")?;
        self.rank_outlier.validate("rank_outlier")?;
        self.straggler.validate("straggler")?;
        self.stalled.validate("stalled")?;
        self.policy.validate("policy")
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

/// Top-level tables of a rules file that configure the service, not rules:
/// deprecated there (they belong in the settings file,
/// [`crate::service::settings`]), still read.
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
    /// Deprecated in a rules file: callers tell the user to move it to the
    /// settings file.
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
                reason: "no such profile in the rules file".into(),
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

    /// Every range check, with the message it gave before each rule checked
    /// its own settings.
    #[test]
    fn every_check_names_its_field_value_and_reason() {
        let cases = [
            (
                "[grad_spike]\nalpha = 1.0",
                "grad_spike.alpha = 1: must be between 0 and 1",
            ),
            ("[grad_spike]\nz = 0.0", "grad_spike.z = 0: must be positive"),
            (
                "[grad_spike]\nsevere_z = 2.0",
                "grad_spike.severe_z = 2: must be at least grad_spike.z",
            ),
            (
                "[grad_spike]\nmin_clip_ratio = 0.5",
                "grad_spike.min_clip_ratio = 0.5: must be at least 1",
            ),
            (
                "[straggler]\nmin_lag_secs = -1.0",
                "straggler.min_lag_secs = -1: must not be negative",
            ),
            (
                "[straggler]\nlag_steps = 0",
                "straggler.lag_steps = 0: must be at least 1",
            ),
            (
                "[norm_floor]\npatience = 0",
                "norm_floor.patience = 0: must be at least 1",
            ),
            (
                "[norm_floor]\nrelative = 1.0",
                "norm_floor.relative = 1: must be between 0 and 1",
            ),
            (
                "[grad_growth]\nwindow = 2",
                "grad_growth.window = 2: must be at least 3",
            ),
            ("[grad_growth]\nfactor = 1.0", "grad_growth.factor = 1: must be above 1"),
            (
                "[grad_growth]\nfast_factor = 0.5",
                "grad_growth.fast_factor = 0.5: must be above 1",
            ),
            ("[vanishing]\nwindow = 1", "vanishing.window = 1: must be at least 3"),
            ("[vanishing]\ndrop = 1.0", "vanishing.drop = 1: must be above 1"),
            (
                "[vanishing]\nlong_drop = 1.0",
                "vanishing.long_drop = 1: must be above 1",
            ),
            ("[loss_spike]\nwindow = 7", "loss_spike.window = 7: must be at least 8"),
            ("[loss_spike]\nz = -2.0", "loss_spike.z = -2: must be positive"),
            ("[blowup]\nreference = 0", "blowup.reference = 0: must be at least 1"),
            ("[blowup]\nnorm_factor = 1.0", "blowup.norm_factor = 1: must be above 1"),
            ("[blowup]\nloss_factor = 0.0", "blowup.loss_factor = 0: must be above 1"),
            (
                "[blowup]\nloss_follows = 1.0",
                "blowup.loss_follows = 1: must be above 1",
            ),
            (
                "[rank_outlier]\npersist = 6",
                "rank_outlier.persist = 6: must be between 1 and rank_outlier.of (at most 32)",
            ),
            (
                "[rank_outlier]\npersist = 3\nof = 33",
                "rank_outlier.persist = 3: must be between 1 and rank_outlier.of (at most 32)",
            ),
            (
                "[rank_outlier]\nfar = 0.5",
                "rank_outlier.far = 0.5: must be at least 1",
            ),
            ("[rank_outlier]\nk = 0.0", "rank_outlier.k = 0: must be positive"),
            (
                "[rank_outlier]\nmin_ranks = 2",
                "rank_outlier.min_ranks = 2: must be at least 3",
            ),
            (
                "[loss_divergence]\nwindow = 2",
                "loss_divergence.window = 2: must be at least 3",
            ),
            (
                "[loss_divergence]\nalpha = 0.0",
                "loss_divergence.alpha = 0: must be between 0 and 1",
            ),
            (
                "[loss_divergence]\nrise = inf",
                "loss_divergence.rise = inf: must be positive",
            ),
            (
                "[update_ratio]\nmin = 10.0",
                "update_ratio.min = 10: must be below update_ratio.max",
            ),
            (
                "[stalled]\ntimeout_secs = nan",
                "stalled.timeout_secs = NaN: must be positive",
            ),
            (
                "[policy]\nlr_factor = 1.0",
                "policy.lr_factor = 1: must be between 0 and 1",
            ),
            (
                "[policy]\nloss_scale_factor = 0.0",
                "policy.loss_scale_factor = 0: must be between 0 and 1",
            ),
            (
                "[policy]\nhealthy_steps = 0",
                "policy.healthy_steps = 0: must be at least 1",
            ),
            (
                "[norm_ceiling]\nenabled = true",
                "norm_ceiling.enabled = true: needs norm_ceiling.global_max or norm_ceiling.layer_max",
            ),
        ];
        for (text, expected) in cases {
            let err = RuleBook::parse_str(text, "t").unwrap_err();
            assert_eq!(err.to_string(), format!("invalid rule setting {expected}"), "{text}");
            let job = format!("[jobs.j.{}", &text[1..]);
            let err = RuleBook::parse_str(&job, "t").unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid rule setting jobs.j.{expected}"),
                "{job}"
            );
        }
    }
}
