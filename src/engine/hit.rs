//! What a rule hands to the policy: a finding plus the remedy it proposes.

use std::sync::Arc;

use crate::model::{Finding, JobId, RuleId, Severity};

/// A remedy a rule proposes; the policy turns it into concrete advice (factors
/// and rollback targets come from the job's policy settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Proposal {
    Clip { max_norm: f64 },
    SkipStep,
    ScaleLossScale,
    ScaleLr,
    Rollback,
    Inspect { rank: u32 },
}

impl Proposal {
    /// Position on the escalation ladder (clip → skip → scale LR → rollback → halt).
    pub(crate) fn rung(self) -> u8 {
        match self {
            Proposal::Clip { .. } | Proposal::Inspect { .. } => 0,
            Proposal::SkipStep | Proposal::ScaleLossScale => 1,
            Proposal::ScaleLr => 2,
            Proposal::Rollback => 3,
        }
    }
}

/// A rule firing, with what it proposes.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub finding: Finding,
    pub proposal: Option<Proposal>,
    /// Strong evidence: a recurrence after advice escalates. Weak hits (a lone
    /// gradient spike, an AMP overflow) escalate only when they persist.
    pub confirmed: bool,
}

/// Collects the hits of one observation, filling in the job, worker, step and
/// time every finding shares.
pub(crate) struct Emitter<'a> {
    pub job: &'a JobId,
    pub worker: Option<u32>,
    pub step: u64,
    pub time: Option<f64>,
    pub layer_names: &'a [Arc<str>],
    pub hits: &'a mut Vec<Hit>,
}

impl Emitter<'_> {
    /// Records a finding and returns it so the caller can attach a proposal.
    pub fn hit(&mut self, rule: RuleId, severity: Severity, value: f64, threshold: f64, message: String) -> &mut Hit {
        self.hits.push(Hit {
            finding: Finding {
                job: self.job.clone(),
                worker: self.worker,
                step: self.step,
                time: self.time,
                rule,
                severity,
                layer: None,
                value,
                threshold,
                message,
            },
            proposal: None,
            confirmed: severity >= Severity::Warning,
        });
        self.hits.last_mut().expect("just pushed")
    }

    pub fn layer_name(&self, index: usize) -> Arc<str> {
        self.layer_names[index].clone()
    }
}

impl Hit {
    pub fn propose(&mut self, proposal: Proposal) -> &mut Self {
        self.proposal = Some(proposal);
        self
    }

    pub fn on_layer(&mut self, name: Arc<str>) -> &mut Self {
        self.finding.layer = Some(name);
        self
    }

    pub fn about(&mut self, worker: u32) -> &mut Self {
        self.finding.worker = Some(worker);
        self
    }
}

/// An edge-triggered condition with reminders: reports when it starts, then
/// every `remind` steps while it lasts, so findings do not flood but the policy
/// still sees a problem that persists after advice.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Latch {
    since: Option<u64>,
    last_report: u64,
    /// Badness at the last report, for [`Latch::update_worse`].
    reported: f64,
}

impl Latch {
    /// Whether the condition held at the last update.
    pub fn active(&self) -> bool {
        self.since.is_some()
    }

    /// Updates the condition at `step`; true when it should be reported now.
    pub fn update(&mut self, active: bool, step: u64, remind: u64) -> bool {
        if !active {
            self.since = None;
            return false;
        }
        match self.since {
            None => {
                self.since = Some(step);
                self.last_report = step;
                true
            }
            Some(_) if step >= self.last_report.saturating_add(remind.max(1)) => {
                self.last_report = step;
                true
            }
            Some(_) => false,
        }
    }

    /// Like [`Latch::update`], but reminds only while the condition keeps getting
    /// worse than at its last report: a trend that stopped after advice (the
    /// loss plateaued, the scaler stopped backing off) must not escalate.
    pub fn update_worse(&mut self, active: bool, step: u64, remind: u64, badness: f64) -> bool {
        let entering = active && self.since.is_none();
        if !active || entering || badness > self.reported {
            let fire = self.update(active, step, remind);
            if fire {
                self.reported = badness;
            }
            fire
        } else {
            false
        }
    }
}

/// A value for a message: four significant digits, in scientific notation
/// when very large or small (a norm of 3e11 or 4e-9 stays readable).
pub(crate) fn num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() || a == 0.0 {
        return format!("{x}");
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A score (z, spreads) for a message: one decimal, or [`num`]'s form when
/// huge (a norm 1e11 times its mean is "2.107e15σ", not sixteen digits).
pub(crate) fn score(z: f64) -> String {
    if z.is_finite() && z.abs() < 1e4 {
        format!("{z:.1}")
    } else {
        num(z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_keep_one_decimal_until_they_are_huge() {
        assert_eq!(score(6.04), "6.0");
        assert_eq!(score(9999.94), "9999.9");
        assert_eq!(score(2107436077047684.8), "2.107e15");
        assert_eq!(score(f64::INFINITY), "inf");
    }

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(num(0.28731), "0.2873");
        assert_eq!(num(15.2), "15.2");
        assert_eq!(num(1234.56), "1235");
        assert_eq!(num(3.2e11), "3.200e11");
        assert_eq!(num(4e-9), "4.000e-9");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(f64::INFINITY), "inf");
    }

    #[test]
    fn latch_reports_on_entry_then_reminds() {
        let mut l = Latch::default();
        let fired: Vec<u64> = (0..50).filter(|&s| l.update(true, s, 20)).collect();
        assert_eq!(fired, vec![0, 20, 40]);
        assert!(!l.update(false, 50, 20));
        assert!(l.update(true, 51, 20));
    }

    #[test]
    fn worse_latch_reminds_only_when_worse() {
        let mut l = Latch::default();
        assert!(l.update_worse(true, 0, 10, 1.0));
        assert!(!l.update_worse(true, 10, 10, 1.0));
        assert!(!l.update_worse(true, 15, 10, 0.5));
        assert!(l.update_worse(true, 20, 10, 2.0));
        assert!(!l.update_worse(true, 25, 10, 3.0));
    }
}
