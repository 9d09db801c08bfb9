//! How `replay` shows what the engine found: JSON lines or an aligned table,
//! then a summary.
//!
//! JSON lines (`--json`), one object per line, in the order the engine produced
//! them (a step's anomalies, then the advice they led to):
//!
//! - `{"kind":"anomaly","job","worker","step","time","rule","severity","layer",
//!   "value","threshold","message"}`: `worker` is the rank or null when the
//!   finding is about the job as a whole; `time` and `layer` may be null.
//! - `{"kind":"advice","id","job","worker","step","apply_from","rule","rules",
//!   "severity","action",PARAM,"reason","evidence"}`: `worker` is the target rank
//!   or null for every rank; `rule` is the first of `rules`; PARAM is exactly the
//!   action's parameter (`max_norm` for clip_gradients, `factor` for scale_lr and
//!   scale_loss_scale, `to_step` for rollback, `rank` for inspect_worker, none
//!   for skip_step and halt); `evidence` maps names to numbers.
//! - with `--records`, before each record's anomalies and advice:
//!   `{"kind":"record","job","worker","step","time","loss","grad_norm","lr",
//!   "loss_scale","line"}`, the record as read (absent values are null);
//! - a last `{"kind":"summary","files","failed_files","records","skipped",
//!   "unreadable","anomalies":{SEVERITY:n},"advice":{ACTION:n},"jobs":{JOB:
//!   {"records","skipped","anomalies","advice"}}}`; every severity and action
//!   is present. `skipped` is `unreadable` (lines that could not be read,
//!   which belong to no job) plus every job's `skipped` (its records the
//!   engine refused); the table's rows add up the same way.
//!
//! A non-finite number is written as the string `"NaN"`, `"Infinity"` or
//! `"-Infinity"` (the spellings the jsonl reader accepts), never as null, so it
//! stays distinguishable from an absent value.
//!
//! The number, action, advice-line and table formats are shared with
//! `simulate` and the query commands (`query_cli`) through [`crate::output`],
//! so all print alike.

use std::collections::BTreeMap;
use std::io::{self, Write};

use gradguard::model::{Action, Advice, Finding, RuleId, Severity};
use gradguard::trace::Record;
use serde::Serialize;

use crate::output::{AdviceLine, Evidence, Num, count_list, json_line, or_dash, write_table};

/// Counts for the summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub files: usize,
    pub failed_files: usize,
    /// Records the engine accepted.
    pub records: u64,
    /// Malformed lines plus records the engine refused: `unreadable` plus
    /// every job's `skipped`.
    pub skipped: u64,
    /// Malformed lines (they belong to no job).
    pub unreadable: u64,
    pub anomalies: BTreeMap<Severity, u64>,
    pub advice: BTreeMap<&'static str, u64>,
    pub jobs: BTreeMap<String, JobStats>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct JobStats {
    pub records: u64,
    /// Records of this job the engine refused (malformed lines belong to no job).
    pub skipped: u64,
    pub anomalies: u64,
    pub advice: u64,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            anomalies: [Severity::Info, Severity::Warning, Severity::Critical]
                .into_iter()
                .map(|s| (s, 0))
                .collect(),
            advice: Action::NAMES.into_iter().map(|a| (a, 0)).collect(),
            ..Self::default()
        }
    }

    pub fn job(&mut self, job: &str) -> &mut JobStats {
        if !self.jobs.contains_key(job) {
            self.jobs.insert(job.to_owned(), JobStats::default());
        }
        self.jobs.get_mut(job).expect("inserted above")
    }

    pub fn count_finding(&mut self, f: &Finding) {
        *self.anomalies.entry(f.severity).or_default() += 1;
        self.job(&f.job).anomalies += 1;
    }

    pub fn count_advice(&mut self, a: &Advice) {
        *self.advice.entry(a.action.name()).or_default() += 1;
        self.job(&a.job).advice += 1;
    }
}

/// Where findings, advice and the summary go.
pub trait Sink {
    /// A record read, before the engine sees it (written only on request).
    fn record(&mut self, _record: &Record) -> io::Result<()> {
        Ok(())
    }
    fn anomaly(&mut self, f: &Finding) -> io::Result<()>;
    fn advice(&mut self, a: &Advice) -> io::Result<()>;
    fn finish(&mut self, stats: &Stats) -> io::Result<()>;
}

#[derive(Serialize)]
struct AnomalyLine<'a> {
    kind: &'static str,
    job: &'a str,
    worker: Option<u32>,
    step: u64,
    time: Option<Num>,
    rule: RuleId,
    severity: Severity,
    layer: Option<&'a str>,
    value: Num,
    threshold: Num,
    message: &'a str,
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    kind: &'static str,
    files: usize,
    failed_files: usize,
    records: u64,
    skipped: u64,
    unreadable: u64,
    anomalies: &'a BTreeMap<Severity, u64>,
    advice: &'a BTreeMap<&'static str, u64>,
    jobs: &'a BTreeMap<String, JobStats>,
}

#[derive(Serialize)]
struct RecordLine<'a> {
    kind: &'static str,
    job: &'a str,
    worker: u32,
    step: u64,
    time: Option<Num>,
    loss: Option<Num>,
    grad_norm: Option<Num>,
    lr: Option<Num>,
    loss_scale: Option<Num>,
    line: usize,
}

/// Writes each event as it comes, one JSON object per line.
pub struct JsonSink<W: Write> {
    out: W,
    /// Whether records read are written too (`--records`).
    records: bool,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out, records: false }
    }

    pub fn with_records(mut self, records: bool) -> Self {
        self.records = records;
        self
    }

    fn line(&mut self, value: &impl Serialize) -> io::Result<()> {
        json_line(&mut self.out, value)
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        if !self.records {
            return Ok(());
        }
        let s = &r.summary;
        self.line(&RecordLine {
            kind: "record",
            job: &r.job,
            worker: s.worker,
            step: s.step,
            time: s.time.map(Num),
            loss: s.loss.map(Num),
            grad_norm: s.grad_norm.map(Num),
            lr: s.lr.map(Num),
            loss_scale: s.loss_scale.map(Num),
            line: r.line,
        })
    }

    fn anomaly(&mut self, f: &Finding) -> io::Result<()> {
        self.line(&AnomalyLine {
            kind: "anomaly",
            job: &f.job,
            worker: f.worker,
            step: f.step,
            time: f.time.map(Num),
            rule: f.rule,
            severity: f.severity,
            layer: f.layer.as_deref(),
            value: Num(f.value),
            threshold: Num(f.threshold),
            message: &f.message,
        })
    }

    fn advice(&mut self, a: &Advice) -> io::Result<()> {
        self.line(&AdviceLine {
            kind: "advice",
            id: a.id,
            job: &a.job,
            worker: a.target,
            step: a.step,
            apply_from: a.apply_from,
            receipt: None,
            rule: a.rules.first(),
            rules: &a.rules,
            severity: a.severity.as_str(),
            action: a.action.into(),
            reason: &a.reason,
            evidence: Evidence(&a.evidence),
        })
    }

    fn finish(&mut self, stats: &Stats) -> io::Result<()> {
        self.line(&SummaryLine {
            kind: "summary",
            files: stats.files,
            failed_files: stats.failed_files,
            records: stats.records,
            skipped: stats.skipped,
            unreadable: stats.unreadable,
            anomalies: &stats.anomalies,
            advice: &stats.advice,
            jobs: &stats.jobs,
        })?;
        self.out.flush()
    }
}

/// Collects rows and prints them as one aligned table at the end, so column
/// widths fit the content.
pub struct TableSink<W: Write> {
    out: W,
    rows: Vec<[String; 6]>,
}

impl<W: Write> TableSink<W> {
    pub fn new(out: W) -> Self {
        Self { out, rows: Vec::new() }
    }
}

impl<W: Write> Sink for TableSink<W> {
    fn anomaly(&mut self, f: &Finding) -> io::Result<()> {
        self.rows.push([
            f.job.to_string(),
            f.step.to_string(),
            or_dash(f.worker),
            f.severity.to_string(),
            f.rule.to_string(),
            f.message.clone(),
        ]);
        Ok(())
    }

    fn advice(&mut self, a: &Advice) -> io::Result<()> {
        self.rows.push([
            a.job.to_string(),
            a.step.to_string(),
            a.target.map_or_else(|| "all".to_owned(), |t| t.to_string()),
            a.severity.to_string(),
            format!("=> {}", a.action),
            a.reason.clone(),
        ]);
        Ok(())
    }

    fn finish(&mut self, stats: &Stats) -> io::Result<()> {
        let out = &mut self.out;
        if self.rows.is_empty() && stats.records == 0 {
            // Not "No anomalies": nothing was looked at.
            writeln!(out, "Nothing was replayed.")?;
        } else if self.rows.is_empty() {
            writeln!(out, "No anomalies.")?;
        } else {
            // The job column only earns its width when there is more than one job.
            let skip_job = stats.jobs.len() <= 1;
            let header = ["JOB", "STEP", "WORKER", "SEVERITY", "RULE / ADVICE", "DETAIL"].map(String::from);
            let rows: Vec<&[String]> = std::iter::once(&header)
                .chain(&self.rows)
                .map(|r| if skip_job { &r[1..] } else { &r[..] })
                .collect();
            let right = [false, true, true, false, false, false]; // step and worker are numbers
            write_table(out, &rows, if skip_job { &right[1..] } else { &right })?;
        }
        writeln!(out)?;
        write_summary(out, stats)?;
        out.flush()
    }
}

fn write_summary(out: &mut impl Write, stats: &Stats) -> io::Result<()> {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    writeln!(
        out,
        "Replayed {} from {}; {} skipped.",
        plural(stats.records, "record", "records"),
        plural(stats.files as u64, "file", "files"),
        plural(stats.skipped, "line", "lines"),
    )?;
    if stats.failed_files > 0 {
        writeln!(
            out,
            "{} could not be read.",
            plural(stats.failed_files as u64, "file", "files")
        )?;
    }
    let counts = |items: Vec<(String, u64)>| {
        let total: u64 = items.iter().map(|i| i.1).sum();
        let parts = count_list(items);
        if parts.is_empty() {
            "0".to_owned()
        } else {
            format!("{total} ({parts})")
        }
    };
    let by_severity = stats.anomalies.iter().rev().map(|(s, n)| (s.to_string(), *n)).collect();
    let by_action = stats.advice.iter().map(|(a, n)| (a.to_string(), *n)).collect();
    writeln!(out, "Anomalies: {}", counts(by_severity))?;
    writeln!(out, "Advice:    {}", counts(by_action))?;
    if stats.jobs.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    let header = ["JOB", "RECORDS", "SKIPPED", "ANOMALIES", "ADVICE"].map(String::from);
    let rows: Vec<[String; 5]> = stats
        .jobs
        .iter()
        .map(|(job, j)| {
            [
                job.clone(),
                j.records.to_string(),
                j.skipped.to_string(),
                j.anomalies.to_string(),
                j.advice.to_string(),
            ]
        })
        .chain((stats.unreadable > 0).then(|| {
            let dash = || "-".to_owned();
            [
                "(unreadable lines)".to_owned(),
                dash(),
                stats.unreadable.to_string(),
                dash(),
                dash(),
            ]
        }))
        .collect();
    let rows: Vec<&[String]> = std::iter::once(&header).chain(&rows).map(|r| &r[..]).collect();
    write_table(out, &rows, &[false, true, true, true, true])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_only_what_happened() {
        let mut stats = Stats::new();
        stats.files = 1;
        stats.records = 1;
        let mut out = Vec::new();
        write_summary(&mut out, &stats).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Replayed 1 record from 1 file; 0 lines skipped.\nAnomalies: 0\nAdvice:    0\n"
        );
    }
}
