//! Domain types: what a worker reports each step, and what the engine concludes.
//!
//! These types are independent of the wire format (`proto`) and of any storage;
//! transports convert at their edge.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A training job's identifier, cheap to clone.
pub type JobId = Arc<str>;

/// One worker's gradient summary for one optimizer step.
///
/// Every measured value is optional except the step: a log that records only the
/// loss still gets the loss rules. Values may be non-finite; the engine reports
/// them and keeps them out of its statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub worker: u32,
    pub step: u64,
    /// Seconds since the Unix epoch as the worker measured it (the record's own
    /// time; the engine never reads a clock).
    pub time: Option<f64>,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    /// AMP loss scale, when the job uses a dynamic loss scaler.
    pub loss_scale: Option<f64>,
    /// Global gradient L2 norm, measured before clipping.
    pub grad_norm: Option<f64>,
    /// Per-layer statistics in the order of the job's layer names; empty when the
    /// worker sends global values only.
    pub layers: Vec<LayerStats>,
}

/// Gradient statistics of one layer at one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub l2: f32,
    pub max_abs: f32,
    pub nonfinite: u32,
    pub param_norm: Option<f32>,
    pub update_norm: Option<f32>,
}

/// How urgent a finding or advice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Handled automatically (a clip, an AMP overflow); nobody needs to look.
    #[default]
    Info,
    /// A person should look soon.
    Warning,
    /// The run is at risk: page someone.
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity {other:?} (expected info, warning or critical)"
            )),
        }
    }
}

/// The closed set of detection rules. Identifiers are stable: they appear in
/// metrics labels, stored anomalies, the rules file and the JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleId {
    Nonfinite,
    NormCeiling,
    NormFloor,
    Blowup,
    GradSpike,
    GradGrowth,
    Vanishing,
    LossSpike,
    LossDivergence,
    UpdateRatio,
    LossScaleFloor,
    RankOutlier,
    Straggler,
    Stalled,
}

impl RuleId {
    pub const ALL: [RuleId; 14] = [
        RuleId::Nonfinite,
        RuleId::NormCeiling,
        RuleId::NormFloor,
        RuleId::Blowup,
        RuleId::GradSpike,
        RuleId::GradGrowth,
        RuleId::Vanishing,
        RuleId::LossSpike,
        RuleId::LossDivergence,
        RuleId::UpdateRatio,
        RuleId::LossScaleFloor,
        RuleId::RankOutlier,
        RuleId::Straggler,
        RuleId::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::Nonfinite => "nonfinite",
            RuleId::NormCeiling => "norm_ceiling",
            RuleId::NormFloor => "norm_floor",
            RuleId::Blowup => "blowup",
            RuleId::GradSpike => "grad_spike",
            RuleId::GradGrowth => "grad_growth",
            RuleId::Vanishing => "vanishing",
            RuleId::LossSpike => "loss_spike",
            RuleId::LossDivergence => "loss_divergence",
            RuleId::UpdateRatio => "update_ratio",
            RuleId::LossScaleFloor => "loss_scale_floor",
            RuleId::RankOutlier => "rank_outlier",
            RuleId::Straggler => "straggler",
            RuleId::Stalled => "stalled",
        }
    }

    /// Rules that report one-step events (as opposed to conditions that last):
    /// ranks sharing such a signal share it at the same step.
    pub fn is_event(self) -> bool {
        matches!(self, RuleId::Nonfinite | RuleId::GradSpike | RuleId::LossSpike)
    }

    /// The problem family a rule belongs to: the policy keeps one episode per
    /// (job, family), so related rules escalate together instead of each paging.
    pub fn family(self) -> Family {
        match self {
            RuleId::Nonfinite => Family::Nonfinite,
            RuleId::NormCeiling
            | RuleId::Blowup
            | RuleId::GradSpike
            | RuleId::GradGrowth
            | RuleId::LossSpike
            | RuleId::LossDivergence => Family::Instability,
            RuleId::NormFloor | RuleId::Vanishing => Family::Vanishing,
            RuleId::UpdateRatio => Family::Update,
            RuleId::LossScaleFloor => Family::LossScale,
            RuleId::RankOutlier | RuleId::Straggler | RuleId::Stalled => Family::Rank,
        }
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RuleId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RuleId::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown rule {s:?}"))
    }
}

/// Groups of rules that describe the same underlying problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Nonfinite,
    /// Exploding gradients and the loss that follows them: one ladder, so a
    /// gradient spike and the loss spike it causes do not escalate twice.
    Instability,
    Vanishing,
    Update,
    LossScale,
    Rank,
}

/// One rule firing on one step: the raw evidence before policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub job: JobId,
    /// The rank the finding is about; `None` when it is about the job as a whole.
    pub worker: Option<u32>,
    pub step: u64,
    pub time: Option<f64>,
    pub rule: RuleId,
    pub severity: Severity,
    /// Layer name, when the finding is about one layer.
    pub layer: Option<Arc<str>>,
    /// The observed value that broke the rule (a norm, a z-score, a ratio).
    pub value: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    pub message: String,
}

/// What a worker should do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    ClipGradients { max_norm: f64 },
    ScaleLr { factor: f64 },
    SkipStep,
    ScaleLossScale { factor: f64 },
    Rollback { to_step: u64 },
    InspectWorker { rank: u32 },
    Halt,
}

impl Action {
    /// Every action's name, in ladder order.
    pub const NAMES: [&'static str; 7] = [
        "clip_gradients",
        "skip_step",
        "scale_loss_scale",
        "scale_lr",
        "rollback",
        "inspect_worker",
        "halt",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Action::ClipGradients { .. } => "clip_gradients",
            Action::ScaleLr { .. } => "scale_lr",
            Action::SkipStep => "skip_step",
            Action::ScaleLossScale { .. } => "scale_loss_scale",
            Action::Rollback { .. } => "rollback",
            Action::InspectWorker { .. } => "inspect_worker",
            Action::Halt => "halt",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ClipGradients { max_norm } => write!(f, "clip_gradients max_norm={max_norm:.4}"),
            Action::ScaleLr { factor } => write!(f, "scale_lr factor={factor}"),
            Action::SkipStep => f.write_str("skip_step"),
            Action::ScaleLossScale { factor } => write!(f, "scale_loss_scale factor={factor}"),
            Action::Rollback { to_step } => write!(f, "rollback to_step={to_step}"),
            Action::InspectWorker { rank } => write!(f, "inspect_worker rank={rank}"),
            Action::Halt => f.write_str("halt"),
        }
    }
}

/// Remediation advice sent back to the worker(s) of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    /// Unique within the engine that produced it, increasing.
    pub id: u64,
    pub job: JobId,
    /// Target rank; `None` means every rank of the job.
    pub target: Option<u32>,
    /// Step at which it was decided.
    pub step: u64,
    /// First step it applies to.
    pub apply_from: u64,
    #[serde(flatten)]
    pub action: Action,
    pub severity: Severity,
    pub rules: Vec<RuleId>,
    pub reason: String,
    pub evidence: Vec<(String, f64)>,
}
