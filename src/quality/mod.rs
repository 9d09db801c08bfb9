//! Detection quality: gradguard's engine against the anchor detectors it must
//! beat, on the same labelled inputs.
//!
//! - An [`Input`] is a real training log (a trace file) or a synthetic
//!   [`Scenario`] run, with a [`Label`]: healthy, or faulty with one or more
//!   [`Onset`]s (a step, and how many steps later an alarm still counts as
//!   catching it). The real traces' labels are one table, [`trace_labels`],
//!   written from the traces' README; the scenario suite's come from its
//!   injected faults ([`scenario_inputs`]).
//! - Every detector sees the same summaries in the same order: gradguard's
//!   [`Engine`] (one engine for the whole input, every rank through it) and
//!   each [`anchors`] detector (one instance per rank).
//! - Alarms: for gradguard, a finding of severity warning or worse; a *severe*
//!   event is a critical finding, or `scale_lr`, `rollback` or `halt` advice.
//!   For an anchor, each firing is an alarm; it is severe when the anchor's
//!   published form stops the run. Steps count once, whichever rank fired.
//! - [`score`]: per onset, a hit when the first alarm at or after the onset
//!   comes within its maximum delay (the delay is in steps); false alarms are
//!   the alarm steps outside every `[onset, onset + max delay]` window (on a
//!   healthy input, all of them); severe false alarms likewise for severe
//!   events.
//! - [`evaluate`] plays every input through every detector into a [`Report`],
//!   whose `Display` is the table in `QUALITY.md` (`cargo bench --bench
//!   quality`). An input that cannot be read is a row marked unreadable.

pub mod anchors;
mod inputs;
mod labels;
mod report;

pub use inputs::*;
pub use labels::*;

use std::collections::{BTreeSet, HashMap};

use crate::engine::{Engine, JobSpec, Output};
use crate::model::{Action, Advice, Finding, Severity};
use anchors::AnchorKind;

/// Alarm steps and severe-event steps of one detector on one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Events {
    pub alarms: BTreeSet<u64>,
    pub severe: BTreeSet<u64>,
}

/// Everything gradguard's engine said about one input.
#[derive(Debug, Clone, Default)]
pub struct EngineRun {
    pub findings: Vec<Finding>,
    pub advice: Vec<Advice>,
    /// Summaries (or declarations) the engine refused.
    pub refused: usize,
}

/// Advice that throws work away or changes the run: a severe event.
pub fn is_severe_advice(action: &Action) -> bool {
    matches!(action, Action::ScaleLr { .. } | Action::Rollback { .. } | Action::Halt)
}

impl EngineRun {
    /// Alarms: steps with a finding of warning or worse. Severe events: steps
    /// with a critical finding, or with scale_lr, rollback or halt advice.
    pub fn events(&self) -> Events {
        let alarms = self
            .findings
            .iter()
            .filter(|f| f.severity >= Severity::Warning)
            .map(|f| f.step)
            .collect();
        let severe = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Critical)
            .map(|f| f.step)
            .chain(
                self.advice
                    .iter()
                    .filter(|a| is_severe_advice(&a.action))
                    .map(|a| a.step),
            )
            .collect();
        Events { alarms, severe }
    }
}

/// Plays a feed through a fresh engine with the built-in rules.
pub fn run_gradguard(feed: &Feed) -> EngineRun {
    let mut engine = Engine::default();
    let mut run = EngineRun::default();
    let mut out = Output::default();
    if let Some(world_size) = feed.world_size {
        for job in &feed.jobs {
            let spec = JobSpec {
                world_size: Some(world_size),
                ..JobSpec::default()
            };
            if engine.declare(job, &spec).is_err() {
                run.refused += 1;
            }
        }
    }
    for item in &feed.items {
        match item {
            Item::Declare { job, names } => {
                let spec = JobSpec {
                    layer_names: names,
                    ..JobSpec::default()
                };
                if engine.declare(&feed.jobs[*job], &spec).is_err() {
                    run.refused += 1;
                }
            }
            Item::Observe { job, summary } => {
                out.clear();
                if engine.observe(&feed.jobs[*job], summary, &mut out).is_err() {
                    run.refused += 1;
                }
                run.findings.append(&mut out.findings);
                run.advice.append(&mut out.advice);
            }
        }
    }
    run
}

/// Plays a feed through one anchor detector, one instance per (job, rank).
pub fn run_anchor(kind: AnchorKind, feed: &Feed) -> Events {
    let mut batches: HashMap<(usize, u32), u64> = HashMap::new();
    for item in &feed.items {
        if let Item::Observe { job, summary } = item
            && summary.loss.is_some()
        {
            *batches.entry((*job, summary.worker)).or_default() += 1;
        }
    }
    let mut instances: HashMap<(usize, u32), Box<dyn anchors::Anchor>> = HashMap::new();
    let mut events = Events::default();
    for item in &feed.items {
        let Item::Observe { job, summary } = item else { continue };
        let key = (*job, summary.worker);
        let anchor = instances
            .entry(key)
            .or_insert_with(|| kind.instance(batches.get(&key).copied().unwrap_or(0)));
        if let Some(alarm) = anchor.observe(summary) {
            events.alarms.insert(summary.step);
            if alarm.severe {
                events.severe.insert(summary.step);
            }
        }
    }
    events
}

/// The detectors compared, in column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    Gradguard,
    Anchor(AnchorKind),
}

impl Detector {
    pub const ALL: [Detector; 6] = [
        Detector::Gradguard,
        Detector::Anchor(AnchorKind::Seed),
        Detector::Anchor(AnchorKind::ZClip),
        Detector::Anchor(AnchorKind::OlmoSkipStep),
        Detector::Anchor(AnchorKind::LightningSpike),
        Detector::Anchor(AnchorKind::KillLossSpike),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Gradguard => "gradguard",
            Detector::Anchor(kind) => kind.name(),
        }
    }

    /// One line: the rule and its defaults.
    pub fn definition(self) -> &'static str {
        match self {
            Detector::Gradguard => {
                "this engine, built-in rules (Engine::default()); alarm = a finding >= warning; severe = a critical \
                 finding, or scale_lr / rollback / halt advice"
            }
            Detector::Anchor(kind) => kind.definition(),
        }
    }

    /// The detector's alarm and severe-event steps on a feed.
    pub fn events(self, feed: &Feed) -> Events {
        match self {
            Detector::Gradguard => run_gradguard(feed).events(),
            Detector::Anchor(kind) => run_anchor(kind, feed),
        }
    }
}

/// How one detector did on one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Score {
    /// Per onset of the label: the delay of the alarm that caught it, in steps.
    pub delays: Vec<Option<u64>>,
    /// Distinct alarm steps outside every onset's window.
    pub false_alarms: usize,
    /// Distinct severe-event steps outside every onset's window.
    pub severe_false_alarms: usize,
}

impl Score {
    pub fn caught(&self) -> usize {
        self.delays.iter().flatten().count()
    }

    pub fn delay(&self) -> u64 {
        self.delays.iter().flatten().sum()
    }
}

/// Scores a detector's events against a label.
pub fn score(label: &Label, events: &Events) -> Score {
    let delays = label
        .onsets()
        .iter()
        .map(|o| {
            let first = events.alarms.range(o.step..).next()?;
            o.in_time(*first).then(|| first - o.step)
        })
        .collect();
    let outside = |steps: &BTreeSet<u64>| steps.iter().filter(|&&s| !label.covers(s)).count();
    Score {
        delays,
        false_alarms: outside(&events.alarms),
        severe_false_alarms: outside(&events.severe),
    }
}

/// One input's result: a score per detector (in [`Detector::ALL`] order), or
/// why it could not be read.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub group: Option<String>,
    pub label: Label,
    pub outcome: Result<Vec<Score>, String>,
}

/// Sums over inputs, per detector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub inputs: usize,
    pub unreadable: usize,
    pub caught: usize,
    pub onsets: usize,
    /// Summed delay of the caught onsets, in steps.
    pub delay: u64,
    pub false_alarms: usize,
    pub severe_false_alarms: usize,
}

impl Totals {
    fn add(&mut self, label: &Label, score: Option<&Score>) {
        self.inputs += 1;
        let Some(score) = score else {
            self.unreadable += 1;
            return;
        };
        self.onsets += label.onsets().len();
        self.caught += score.caught();
        self.delay += score.delay();
        self.false_alarms += score.false_alarms;
        self.severe_false_alarms += score.severe_false_alarms;
    }
}

/// Every input's row.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

/// Plays every input through every detector.
pub fn evaluate(inputs: &[Input]) -> Report {
    let rows = inputs
        .iter()
        .map(|input| Row {
            name: input.name.clone(),
            group: input.group.clone(),
            label: input.label.clone(),
            outcome: load(input).map(|feed| {
                Detector::ALL
                    .iter()
                    .map(|d| score(&input.label, &d.events(&feed)))
                    .collect()
            }),
        })
        .collect();
    Report { rows }
}

impl Report {
    /// Per detector, the sums over the rows `which` selects (unreadable rows
    /// are counted apart and add nothing else).
    pub fn totals(&self, which: impl Fn(&Row) -> bool) -> Vec<Totals> {
        let mut totals = vec![Totals::default(); Detector::ALL.len()];
        for row in self.rows.iter().filter(|r| which(r)) {
            for (i, t) in totals.iter_mut().enumerate() {
                t.add(&row.label, row.outcome.as_ref().ok().map(|s| &s[i]));
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Summary;
    use crate::scenario::Fault;

    fn events(alarms: &[u64], severe: &[u64]) -> Events {
        Events {
            alarms: alarms.iter().copied().collect(),
            severe: severe.iter().copied().collect(),
        }
    }

    #[test]
    fn scores_hits_delays_and_false_alarms() {
        let label = faulty(&[Onset::new(100, 10, "a"), Onset::new(200, 5, "b")]);
        // 50: before any onset; 105 catches a (delay 5) and 108 is inside its
        // window; 206 is one step late for b; 300 is after everything.
        let s = score(&label, &events(&[50, 105, 108, 206, 300], &[108, 206]));
        assert_eq!(s.delays, [Some(5), None]);
        assert_eq!((s.false_alarms, s.severe_false_alarms), (3, 1));
        assert_eq!((s.caught(), s.delay()), (1, 5));
    }

    #[test]
    fn on_healthy_inputs_every_alarm_is_false() {
        let s = score(&Label::Healthy { no_warning: true }, &events(&[1, 2, 3], &[2]));
        assert!(s.delays.is_empty());
        assert_eq!((s.false_alarms, s.severe_false_alarms), (3, 1));
    }

    #[test]
    fn a_zero_delay_onset_needs_an_alarm_on_its_step() {
        let label = faulty(&[Onset::new(1, 0, "nan")]);
        assert_eq!(score(&label, &events(&[1], &[])).delays, [Some(0)]);
        let late = score(&label, &events(&[2], &[]));
        assert_eq!((late.delays.as_slice(), late.false_alarms), (&[None][..], 1));
    }

    #[test]
    fn every_fault_is_played_with_its_minimum_workers() {
        assert_eq!(scenario_worker_counts(Fault::Healthy), [1, 4]);
        assert_eq!(scenario_worker_counts(Fault::StalledRank), [2, 4]);
        assert_eq!(scenario_worker_counts(Fault::RankOutlier), [4]);
        let inputs = scenario_inputs();
        for fault in Fault::ALL {
            let n = inputs
                .iter()
                .filter(|i| matches!(&i.source, Source::Scenario(c) if c.fault == fault))
                .count();
            assert_eq!(n, SCENARIO_SEEDS.len() * scenario_worker_counts(fault).len(), "{fault}");
        }
    }

    #[test]
    fn an_unreadable_trace_is_a_row_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("odd.log"), "not a training log\n").unwrap();
        let inputs = vec![
            Input {
                name: "missing.jsonl".into(),
                group: None,
                source: Source::Trace(dir.path().join("missing.jsonl")),
                label: Label::Healthy { no_warning: true },
            },
            Input {
                name: "odd.log".into(),
                group: None,
                source: Source::Trace(dir.path().join("odd.log")),
                label: faulty(&[Onset::new(1, 0, "x")]),
            },
        ];
        let report = evaluate(&inputs);
        assert!(report.rows.iter().all(|r| r.outcome.is_err()));
        let text = report.to_string();
        assert!(text.contains("missing.jsonl") && text.contains("unreadable"), "{text}");
        assert!(!text.contains(&dir.path().display().to_string()), "{text}");
        assert_eq!(report.totals(|_| true)[0].unreadable, 2);
    }

    #[test]
    fn anchors_run_one_instance_per_rank_and_count_a_step_once() {
        let mut feed = Feed::default();
        let job = feed.job("j");
        for step in 0..3 {
            for worker in 0..2 {
                let norm = if step == 1 { 50.0 } else { 1.0 };
                feed.items.push(Item::Observe {
                    job,
                    summary: Summary {
                        worker,
                        step,
                        grad_norm: Some(norm),
                        ..Summary::default()
                    },
                });
            }
        }
        assert_eq!(run_anchor(AnchorKind::Seed, &feed), events(&[1], &[]));
    }
}
