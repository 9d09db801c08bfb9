//! What `simulate` prints: the header, a line per advice, the summary block;
//! or, with `--json`, a JSON object per advice and one for the summary.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::anyhow;
use gradguard::proto;
use gradguard::scenario::{Fault, Scenario};
use serde::Serialize;

use super::judge::{Level, Verdict};
use super::sim::Taken;
use super::{LATE_ADVICE, WINDOW};
use crate::cli::Failure;
use crate::output::{
    ActionFields, AdviceLine, Evidence, Num, Receipt, count_list, evidence_pairs, json_text, severity_word,
};

/// Everything the summary reports.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) job: String,
    pub(super) workers: u32,
    pub(super) layers: usize,
    pub(super) fault: Fault,
    pub(super) fault_at: Option<u64>,
    pub(super) fault_rank: Option<u32>,
    pub(super) fault_layer: Option<String>,
    pub(super) steps_sent: u64,
    pub(super) summaries_sent: u64,
    pub(super) last_step: Option<u64>,
    pub(super) halted_at: Option<u64>,
    pub(super) by_action: BTreeMap<&'static str, u64>,
    pub(super) advice: u64,
    pub(super) applied: u64,
    pub(super) apply: bool,
    /// Fewest and most steps between an advice's decision and the job seeing it.
    pub(super) lag: Option<(u64, u64)>,
    pub(super) before: Option<Level>,
    pub(super) after: Option<Level>,
    pub(super) verdict: Verdict,
    pub(super) problems: Vec<String>,
    pub(super) error: Option<String>,
    /// The job's anomalies the server stored, by severity, or why they are
    /// not known (no store; a cluster reached through Kafka).
    pub(super) anomalies: Result<Anomalies, String>,
}

/// Stored anomalies of the job, by severity.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct Anomalies {
    pub(super) info: u64,
    pub(super) warning: u64,
    pub(super) critical: u64,
}

/// A number for people: fixed point in the usual range, scientific outside it.
pub(super) fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        format!("{x:.2e}")
    } else {
        format!("{x:.3}")
    }
}

/// Where lines go. Output errors do not stop the run (a closed pipe only means
/// nobody is reading); the first one is kept and reported at the end.
pub(super) struct Printer {
    json: bool,
    error: Option<io::Error>,
}

impl Printer {
    pub(super) fn new(json: bool) -> Self {
        Self { json, error: None }
    }

    fn line(&mut self, text: &str) {
        if self.error.is_none()
            && let Err(e) = writeln!(io::stdout().lock(), "{text}")
        {
            self.error = Some(e);
        }
    }

    pub(super) fn header(&mut self, scenario: &Scenario, url: &str, apply: bool) {
        if self.json {
            return;
        }
        let cfg = scenario.config();
        let follow = if apply {
            "advice is applied"
        } else {
            "advice is only shown (--apply-advice to follow it)"
        };
        self.line(&format!(
            "simulating job {} on {url}: {} ranks, {} layers, {} steps, {}; {follow}",
            cfg.job,
            cfg.workers,
            cfg.layers,
            cfg.steps,
            fault_text(
                scenario.plan().fault,
                Some(scenario.plan().at),
                scenario.plan().rank,
                None
            ),
        ));
    }

    pub(super) fn advice(&mut self, advice: &proto::Advice, taken: &Taken) {
        let text = if self.json {
            advice_json(advice, taken)
        } else {
            advice_line(advice, taken)
        };
        self.line(&text);
    }

    pub(super) fn summary(&mut self, o: &Outcome) {
        if self.json {
            self.line(&summary_json(o));
        } else {
            for line in summary_lines(o) {
                self.line(&line);
            }
        }
    }

    /// The first output error, unless it was a closed pipe.
    pub(super) fn done(&mut self) -> Result<(), Failure> {
        match self.error.take() {
            Some(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                Err(Failure::input(anyhow!("cannot write the output: {e}")))
            }
            _ => Ok(()),
        }
    }
}

fn fault_text(fault: Fault, at: Option<u64>, rank: Option<u32>, layer: Option<&str>) -> String {
    if fault == Fault::Healthy {
        return "no fault".to_owned();
    }
    let mut s = fault.to_string();
    if let Some(at) = at {
        s.push_str(&format!(" from step {at}"));
    }
    if let Some(rank) = rank {
        s.push_str(&format!(" on rank {rank}"));
    }
    if let Some(layer) = layer {
        s.push_str(&format!(" in layer {layer}"));
    }
    s
}

/// `step   412  all ranks  critical  scale_lr factor=0.5  [grad_growth,loss_divergence]  REASON`
fn advice_line(advice: &proto::Advice, taken: &Taken) -> String {
    let target = advice
        .target_rank
        .map_or_else(|| "all ranks".to_owned(), |r| format!("rank {r}"));
    let action = taken
        .action
        .map_or_else(|| "unknown action".to_owned(), |a| a.to_string());
    format!(
        "step {:>5}  {target:<9}  {:<8}  {action}  [{}]  {}",
        advice.decided_at_step,
        severity_word(advice.severity),
        advice.rules.join(","),
        advice.reason
    )
}

/// The `replay --json` advice object, plus when the job received and applied it.
fn advice_json(advice: &proto::Advice, taken: &Taken) -> String {
    let evidence = evidence_pairs(&advice.evidence);
    json_text(&AdviceLine {
        kind: "advice",
        id: advice.id,
        job: &advice.job,
        worker: advice.target_rank,
        step: advice.decided_at_step,
        apply_from: advice.apply_from_step,
        receipt: Some(Receipt {
            received_at: taken.received_at,
            applied: taken.applied_at.is_some(),
            applied_at: taken.applied_at,
        }),
        rule: advice.rules.first(),
        rules: &advice.rules,
        severity: severity_word(advice.severity),
        action: taken.action.map_or_else(ActionFields::unknown, ActionFields::from),
        reason: &advice.reason,
        evidence: Evidence(&evidence),
    })
}

fn summary_lines(o: &Outcome) -> Vec<String> {
    let mut lines = vec![String::new()];
    lines.push(format!(
        "job        {} ({} ranks, {} layers)",
        o.job, o.workers, o.layers
    ));
    lines.push(format!(
        "fault      {}",
        fault_text(o.fault, o.fault_at, o.fault_rank, o.fault_layer.as_deref())
    ));
    let span = o.last_step.map_or_else(String::new, |l| format!(", through step {l}"));
    lines.push(format!(
        "sent       {} steps ({} summaries){span}",
        o.steps_sent, o.summaries_sent
    ));
    lines.push(format!("anomalies  {}", anomalies_text(&o.anomalies, &o.job)));
    lines.push(format!("advice     {}", advice_text(o)));
    if let Some(lag) = o.lag {
        lines.push(format!("lag        {}", lag_text(lag)));
    }
    let level = |l: &Level, f: fn(&Level) -> Option<f64>| {
        format!("{} at step {}", f(l).map_or_else(|| "n/a".to_owned(), fmt_num), l.step)
    };
    match (&o.before, &o.after) {
        (Some(b), Some(a)) => {
            lines.push(format!(
                "loss       {} → {}  ({WINDOW}-step means)",
                level(b, |l| l.loss),
                level(a, |l| l.loss)
            ));
            lines.push(format!(
                "grad norm  {} → {}",
                level(b, |l| l.norm),
                level(a, |l| l.norm)
            ));
        }
        (None, Some(a)) => {
            lines.push(format!("loss       {}  ({WINDOW}-step mean)", level(a, |l| l.loss)));
            lines.push(format!("grad norm  {}", level(a, |l| l.norm)));
        }
        _ => {}
    }
    lines.push(format!("result     {}", o.verdict.explain(&o.problems)));
    if let Some(e) = &o.error {
        lines.push(format!("error      {e}"));
    }
    lines
}

pub(super) fn lag_text((lo, hi): (u64, u64)) -> String {
    let steps = match (lo, hi) {
        (1, 1) => "1 step".to_owned(),
        (lo, hi) if lo == hi => format!("{lo} steps"),
        (lo, hi) => format!("{lo}–{hi} steps"),
    };
    let mut text = format!("advice reached the job {steps} after the step it was decided at");
    if hi > LATE_ADVICE {
        text.push_str(
            "; the server fell behind, so the advice acted late and may have escalated \
             before its effect was seen (a longer --step-interval keeps the loop closed)",
        );
    }
    text
}

fn anomalies_text(a: &Result<Anomalies, String>, job: &str) -> String {
    match a {
        Ok(a) if a.info + a.warning + a.critical == 0 => "none stored".to_owned(),
        Ok(a) => {
            let counts = count_list([("critical", a.critical), ("warning", a.warning), ("info", a.info)]);
            format!(
                "{} stored ({counts}; `gradguard anomalies --job {job}` lists them)",
                a.info + a.warning + a.critical
            )
        }
        Err(why) => format!("not known: {why}"),
    }
}

fn advice_text(o: &Outcome) -> String {
    if o.advice == 0 {
        return "none".to_owned();
    }
    let counts = count_list(o.by_action.iter().map(|(a, n)| (a, *n)));
    let applied = if !o.apply {
        "none applied (--apply-advice not given)".to_owned()
    } else if o.applied == o.advice {
        "all applied".to_owned()
    } else {
        format!(
            "{} applied, {} arrived after the last step",
            o.applied,
            o.advice - o.applied
        )
    };
    format!("{} received ({counts}); {applied}", o.advice)
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    kind: &'static str,
    job: &'a str,
    workers: u32,
    layers: usize,
    fault: FaultJson<'a>,
    steps_sent: u64,
    summaries_sent: u64,
    last_step: Option<u64>,
    halted_at: Option<u64>,
    /// Advice by action (every action present).
    advice: &'a BTreeMap<&'static str, u64>,
    advice_total: u64,
    advice_applied: u64,
    /// Stored anomalies by severity; null when the server cannot tell.
    anomalies: Option<Anomalies>,
    advice_lag: Option<LagJson>,
    before: Option<LevelJson>,
    after: Option<LevelJson>,
    result: &'static str,
    problems: &'a [String],
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct FaultJson<'a> {
    kind: &'static str,
    at: Option<u64>,
    rank: Option<u32>,
    layer: Option<&'a str>,
}

#[derive(Serialize)]
struct LagJson {
    min: u64,
    max: u64,
}

#[derive(Serialize)]
struct LevelJson {
    step: u64,
    loss: Option<Num>,
    grad_norm: Option<Num>,
    nonfinite_steps: usize,
}

impl From<&Level> for LevelJson {
    fn from(l: &Level) -> Self {
        Self {
            step: l.step,
            loss: l.loss.map(Num),
            grad_norm: l.norm.map(Num),
            nonfinite_steps: l.nonfinite,
        }
    }
}

fn summary_json(o: &Outcome) -> String {
    json_text(&SummaryLine {
        kind: "summary",
        job: &o.job,
        workers: o.workers,
        layers: o.layers,
        fault: FaultJson {
            kind: o.fault.as_str(),
            at: o.fault_at,
            rank: o.fault_rank,
            layer: o.fault_layer.as_deref(),
        },
        steps_sent: o.steps_sent,
        summaries_sent: o.summaries_sent,
        last_step: o.last_step,
        halted_at: o.halted_at,
        advice: &o.by_action,
        advice_total: o.advice,
        advice_applied: o.applied,
        anomalies: o.anomalies.as_ref().ok().copied(),
        advice_lag: o.lag.map(|(min, max)| LagJson { min, max }),
        before: o.before.as_ref().map(LevelJson::from),
        after: o.after.as_ref().map(LevelJson::from),
        result: o.verdict.as_str(),
        problems: &o.problems,
        error: o.error.as_deref(),
    })
}
