//! Settings of the cross-rank rules: outliers, stragglers, stalled ranks.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::check::{at_least, check, not_negative, positive, when};

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

/// Most steps `RankOutlier::of` may look back over.
const MAX_OF: u32 = 32;

impl RankOutlier {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(
            section,
            self.persist,
            when(
                |persist: u32| persist >= 1 && persist <= self.of && self.of <= MAX_OF,
                format!("must be between 1 and {section}.of (at most {MAX_OF})"),
            )
        )?;
        check!(section, self.far, at_least(1.0))?;
        check!(section, self.k, positive())?;
        check!(section, self.min_ranks, at_least(3))
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

impl Straggler {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.min_lag_secs, not_negative())?;
        check!(section, self.lag_steps, at_least(1))
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

impl Stalled {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check!(section, self.timeout_secs, positive())
    }
}
