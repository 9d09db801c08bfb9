//! Judging the run: what each step looked like, where the loss and the norm
//! stood before the fault and at the end, what is still wrong, the verdict.

use std::collections::{BTreeMap, VecDeque};

use gradguard::model::Summary;
use gradguard::scenario::Fault;

use super::print::fmt_num;
use super::{LOSS_TOLERANCE, NORM_TOO_HIGH, NORM_TOO_LOW, OUTLIER_RATIO, WINDOW};

/// What one step looked like across the ranks that reported it.
#[derive(Debug, Clone)]
struct StepView {
    step: u64,
    /// Mean over the ranks (non-finite when any rank's is).
    loss: f64,
    /// Median over the ranks, so one outlier rank does not move it.
    norm: f64,
    norms: Vec<(u32, f64)>,
}

impl StepView {
    fn of(step: u64, batch: &[Summary]) -> Self {
        let losses: Vec<f64> = batch.iter().filter_map(|s| s.loss).collect();
        let norms: Vec<(u32, f64)> = batch
            .iter()
            .filter_map(|s| s.grad_norm.map(|n| (s.worker, n)))
            .collect();
        let loss = if losses.is_empty() {
            f64::NAN
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        };
        let values: Vec<f64> = norms.iter().map(|n| n.1).collect();
        let norm = if values.iter().all(|v| v.is_finite()) {
            median(values).unwrap_or(f64::NAN)
        } else {
            f64::NAN
        };
        Self {
            step,
            loss,
            norm,
            norms,
        }
    }

    fn finite(&self) -> bool {
        self.loss.is_finite() && self.norm.is_finite()
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Where the run stood over a window of steps: means of the finite steps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Level {
    /// The last step of the window.
    pub(super) step: u64,
    pub(super) loss: Option<f64>,
    pub(super) norm: Option<f64>,
    /// Steps of the window with a non-finite loss or norm.
    pub(super) nonfinite: usize,
}

impl Level {
    fn of<'a>(views: impl Iterator<Item = &'a StepView> + Clone) -> Option<Self> {
        let step = views.clone().map(|v| v.step).max()?;
        let mean = |f: fn(&StepView) -> f64| {
            let finite: Vec<f64> = views.clone().map(f).filter(|x| x.is_finite()).collect();
            (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64)
        };
        Some(Self {
            step,
            loss: mean(|v| v.loss),
            norm: mean(|v| v.norm),
            nonfinite: views.filter(|v| !v.finite()).count(),
        })
    }
}

/// What was sent, kept small: counts, the window before the fault, the latest
/// window and when each rank last reported.
#[derive(Debug)]
pub(super) struct Record {
    fault_at: u64,
    pub(super) steps: u64,
    pub(super) summaries: u64,
    pub(super) last_step: Option<u64>,
    before: Vec<StepView>,
    recent: VecDeque<StepView>,
    last_seen: Vec<Option<u64>>,
}

impl Record {
    pub(super) fn new(workers: u32, fault_at: u64) -> Self {
        Self {
            fault_at,
            steps: 0,
            summaries: 0,
            last_step: None,
            before: Vec::new(),
            recent: VecDeque::with_capacity(WINDOW + 1),
            last_seen: vec![None; workers as usize],
        }
    }

    pub(super) fn step(&mut self, step: u64, batch: &[Summary]) {
        self.steps += 1;
        self.summaries += batch.len() as u64;
        self.last_step = Some(step);
        for s in batch {
            if let Some(seen) = self.last_seen.get_mut(s.worker as usize) {
                *seen = Some(step);
            }
        }
        if batch.is_empty() {
            return;
        }
        let view = StepView::of(step, batch);
        if step < self.fault_at && self.fault_at - step <= WINDOW as u64 {
            self.before.push(view.clone());
        }
        self.recent.push_back(view);
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
    }

    /// The last steps before the fault.
    pub(super) fn before(&self) -> Option<Level> {
        Level::of(self.before.iter())
    }

    /// The last steps sent.
    pub(super) fn after(&self) -> Option<Level> {
        Level::of(self.recent.iter())
    }

    /// What is still wrong at the end of the run, judged against the steps
    /// before the fault; empty when the run is back.
    pub(super) fn problems(&self, before: Option<&Level>, after: Option<&Level>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = after.filter(|a| a.nonfinite > 0) {
            out.push(format!(
                "{} of the last {} steps had a non-finite loss or gradient norm",
                a.nonfinite,
                self.recent.len()
            ));
        }
        if let (Some(b), Some(a)) = (before, after) {
            out.extend(level_problems(b, a));
        }
        out.extend(self.rank_problems());
        out
    }

    /// Ranks that stopped reporting, or whose norm is still far from their peers'.
    fn rank_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(last) = self.last_step else {
            return out;
        };
        for (rank, seen) in self.last_seen.iter().enumerate() {
            match seen {
                Some(s) if *s < last => out.push(format!("rank {rank} has sent nothing since step {s}")),
                None => out.push(format!("rank {rank} never sent a summary")),
                Some(_) => {}
            }
        }
        for (rank, ratio) in self.outlier_ratios() {
            if ratio > OUTLIER_RATIO {
                out.push(format!("rank {rank}'s gradient norm is still {ratio:.1}× its peers'"));
            }
        }
        out
    }

    /// Each rank's median ratio of its norm to the step's median norm over the
    /// latest window.
    fn outlier_ratios(&self) -> BTreeMap<u32, f64> {
        let mut ratios: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for v in self.recent.iter().filter(|v| v.norm.is_finite() && v.norm > 0.0) {
            for &(rank, norm) in &v.norms {
                ratios.entry(rank).or_default().push(norm / v.norm);
            }
        }
        ratios
            .into_iter()
            .filter_map(|(rank, r)| median(r).map(|m| (rank, m)))
            .collect()
    }
}

/// The loss and the norm at the end compared with before the fault.
fn level_problems(before: &Level, after: &Level) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(b), Some(a)) = (before.loss, after.loss)
        && a > b * LOSS_TOLERANCE
    {
        out.push(format!(
            "the loss is {} against {} before the fault ({:+.0}%)",
            fmt_num(a),
            fmt_num(b),
            (a / b - 1.0) * 100.0
        ));
    }
    if let (Some(b), Some(a)) = (before.norm, after.norm) {
        if a > b * NORM_TOO_HIGH {
            out.push(format!(
                "the gradient norm is still {:.0}× its level before the fault",
                a / b
            ));
        } else if a < b * NORM_TOO_LOW {
            out.push(format!(
                "the gradient norm has vanished to {} of its level before the fault",
                fmt_num(a / b)
            ));
        }
    }
    out
}

/// The one-line result: was the run brought back?
pub(super) fn verdict(
    fault: Fault,
    halted_at: Option<u64>,
    broken: bool,
    problems: &[String],
    followed: bool,
) -> Verdict {
    match (halted_at, problems.is_empty(), fault) {
        (Some(step), _, _) => Verdict::Halted(step),
        _ if broken => Verdict::Broken,
        (None, true, Fault::Healthy) => Verdict::Healthy,
        (None, true, _) => Verdict::Recovered,
        (None, false, _) if !followed => Verdict::NotRecoveredUnapplied,
        (None, false, _) => Verdict::NotRecovered,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Healthy,
    Recovered,
    NotRecovered,
    /// Not recovered, and the advice was not followed.
    NotRecoveredUnapplied,
    /// Halt advice stopped the run before this step.
    Halted(u64),
    /// A stream failed: the run was not played to its end, so it is not judged.
    Broken,
}

impl Verdict {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Recovered => "recovered",
            Verdict::NotRecovered | Verdict::NotRecoveredUnapplied => "not_recovered",
            Verdict::Halted(_) => "halted",
            Verdict::Broken => "error",
        }
    }

    pub(super) fn explain(self, problems: &[String]) -> String {
        let why = problems.join("; ");
        match self {
            Verdict::Healthy => "healthy: no fault was injected and the run trained normally".to_owned(),
            Verdict::Recovered => format!(
                "recovered: the loss is back within {:.0}% of where it was before the fault, \
                 the gradient norm is back in range and every rank reports normally",
                (LOSS_TOLERANCE - 1.0) * 100.0
            ),
            Verdict::NotRecovered => format!("NOT recovered: {why}"),
            Verdict::NotRecoveredUnapplied => {
                format!("NOT recovered: {why} (the advice was not applied; rerun with --apply-advice to follow it)")
            }
            Verdict::Broken => "not judged: the run broke off (see the error)".to_owned(),
            Verdict::Halted(step) if why.is_empty() => {
                format!("halted: halt advice stopped the run before step {step}")
            }
            Verdict::Halted(step) => format!("halted: halt advice stopped the run before step {step}; {why}"),
        }
    }
}
