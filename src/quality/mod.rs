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

use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::engine::{Engine, JobSpec, Output};
use crate::model::{Action, Advice, Finding, Severity, Summary};
use crate::scenario::{Fault, Scenario, ScenarioConfig};
use crate::trace::Reader;
use anchors::AnchorKind;

/// Where a fault starts, and how late an alarm may come and still catch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onset {
    pub step: u64,
    /// Steps after `step` within which the first alarm must come (0: at `step`).
    pub max_delay: u64,
    /// A short name for reports.
    pub name: &'static str,
    /// The last step the fault lasts (`u64::MAX`: it never recovers). Alarms
    /// from the onset to here are about the fault, not false.
    pub end: u64,
}

impl Onset {
    pub const fn new(step: u64, max_delay: u64, name: &'static str) -> Self {
        Self {
            step,
            max_delay,
            name,
            end: step.saturating_add(max_delay),
        }
    }

    /// The fault lasts until `end` (inclusive).
    pub const fn lasting(mut self, end: u64) -> Self {
        self.end = end;
        self
    }

    /// Whether an alarm at `step` catches the fault in time.
    pub fn in_time(&self, step: u64) -> bool {
        step >= self.step && step - self.step <= self.max_delay
    }

    /// Whether `step` lies within the fault, `[onset, end]`.
    pub fn covers(&self, step: u64) -> bool {
        step >= self.step && step <= self.end.max(self.step.saturating_add(self.max_delay))
    }
}

/// What a good detector does on an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// A healthy run. `no_warning`: the README expects nothing of warning or
    /// worse at all; otherwise only no severe event (and, the tests add, at
    /// most one warning-or-worse finding).
    Healthy { no_warning: bool },
    /// A run with faults, each of which must be caught in time.
    Faulty { onsets: Vec<Onset> },
}

impl Label {
    pub fn onsets(&self) -> &[Onset] {
        match self {
            Label::Healthy { .. } => &[],
            Label::Faulty { onsets } => onsets,
        }
    }

    fn covers(&self, step: u64) -> bool {
        self.onsets().iter().any(|o| o.covers(step))
    }

    /// `-` when healthy, else `STEP+MAX_DELAY` per onset.
    fn short(&self) -> String {
        match self {
            Label::Healthy { .. } => "-".to_owned(),
            Label::Faulty { onsets } => onsets
                .iter()
                .map(|o| format!("{}+{}", o.step, o.max_delay))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

fn faulty(onsets: &[Onset]) -> Label {
    Label::Faulty {
        onsets: onsets.to_vec(),
    }
}

/// The real traces (paths relative to the traces directory) and what the
/// traces' README says a good detector does on each.
pub fn trace_labels() -> Vec<(&'static str, Label)> {
    let quiet = Label::Healthy { no_warning: true };
    vec![
        // llm.c GPT-2 124M main.log: isolated norm outliers; no severe, no warning.
        ("gpt2-124m-llmc.log", quiet.clone()),
        // The same model in llm.c's stdout format: grad-only spikes seen as info.
        ("llmc/gpt2-124m-stdout.log", quiet.clone()),
        // Loss and norm are nan from step 1: critical non-finite at step 1.
        (
            "llmc/gpt2-124m-stdout-nan.log",
            faulty(&[Onset::new(1, 0, "nan").lasting(u64::MAX)]),
        ),
        ("hf/pythia1b_tokalign_s2.json", quiet.clone()),
        ("hf/whisper_medium_bashkir.json", quiet.clone()),
        ("hf/mistral7b_translator_lora.json", quiet.clone()),
        // Grad norm logged as 0.0 on most rows: no severe, at most one finding
        // that the norm reads as zero.
        ("hf/chatglm3_6b_lora_gyneco.json", Label::Healthy { no_warning: false }),
        ("hf/deepseek_vl2_tiny_lora_coco.json", quiet.clone()),
        // Late small grad bursts: info spikes at most.
        ("hf/glm4_9b_lora_chatbot.json", quiet.clone()),
        // Grad-only spikes at 164000 and 190000: info there, nothing more.
        ("hf/t5_small_summarization.json", quiet.clone()),
        (
            "hf/llama3_8b_mob_qlora_restart_diverge.json",
            faulty(&[
                // Warm-up instability from the first steps: the norm jumps
                // from 0.07-0.19 to 20-60 by step 9-24 and the loss from 0.38
                // to 5.2 by step 50; spikes go on through the 500s (439: norm
                // 257, ~160x its level, the loss ~16% up for four steps).
                Onset::new(1, 60, "warm-up-instability").lasting(600),
                Onset::new(439, 20, "warm-up-spike").lasting(600),
                // The LR restarts at 1501 (from 0 to 1.4e-3). The norm flares
                // (1589-1623, up to ~100), settles briefly, and from 1684
                // never settles again: above 10 on nearly every step while
                // the loss climbs from 1.68 (1683) to 5.5 (1696); it blows up
                // for good (2.2e7 at 1999). It never recovers.
                Onset::new(1501, 200, "restart-blow-up").lasting(u64::MAX),
            ]),
        ),
        // Norm grows ~15x while the loss falls: no warning.
        ("torch/torch-healthy-111.jsonl", quiet.clone()),
        // 4 data-parallel ranks: no warning, no inspect_worker.
        ("torch/torch-healthy_dp-171.jsonl", quiet),
        // Rank 2's shard is corrupted from 350: rank_outlier soon after.
        (
            "torch/torch-bad_shard-161.jsonl",
            faulty(&[Onset::new(350, 10, "bad-shard").lasting(u64::MAX)]),
        ),
        // The LR jumps x40 at 350: caught at 350-351.
        (
            "torch/torch-lr_blowup-121.jsonl",
            faulty(&[Onset::new(350, 2, "lr-x40").lasting(u64::MAX)]),
        ),
    ]
}

/// The label [`trace_labels`] gives `file`.
pub fn trace_label(file: &str) -> Option<Label> {
    trace_labels().into_iter().find(|(f, _)| *f == file).map(|(_, l)| l)
}

/// Where an input's summaries come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A trace file, in any format [`Reader`] detects.
    Trace(PathBuf),
    /// A synthetic run, played open loop (advice is not applied).
    Scenario(ScenarioConfig),
}

/// One labelled input.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    /// Scenario runs of the same fault share a group; reports sum each group
    /// into one row. `None` for traces.
    pub group: Option<String>,
    pub source: Source,
    pub label: Label,
}

/// Every labelled trace under `dir`, in the table's order.
pub fn trace_inputs(dir: &Path) -> Vec<Input> {
    trace_labels()
        .into_iter()
        .map(|(file, label)| Input {
            name: file.to_owned(),
            group: None,
            source: Source::Trace(dir.join(file)),
            label,
        })
        .collect()
}

/// Seeds of every scenario fault.
pub const SCENARIO_SEEDS: [u64; 3] = [1, 2, 3];
/// The fault's first step, as in the scenario suite (every rule warmed up).
pub const SCENARIO_FAULT_AT: u64 = 600;
/// Steps played after `SCENARIO_FAULT_AT`; also each fault's maximum delay.
pub const SCENARIO_TAIL: u64 = 400;
pub const SCENARIO_LAYERS: usize = 12;
/// Seconds per step, as in the scenario suite (the 300 s stall timeout is 30 steps).
pub const SCENARIO_STEP_SECS: f64 = 10.0;

/// The worker counts a fault is played with: 1 and 4, each raised to the
/// fault's minimum.
pub fn scenario_worker_counts(fault: Fault) -> Vec<u32> {
    let mut counts = vec![fault.min_workers().max(1), fault.min_workers().max(4)];
    counts.dedup();
    counts
}

/// The label of a scenario run whose fault starts at `at`.
///
/// A benign spike is labelled healthy: it is the scenario suite's model of an
/// isolated gradient spike the loss does not follow, which the suite (and the
/// traces' README) expects to get info findings and clip advice only, never a
/// warning. Labelled faulty, a detector could only "catch" it by paging.
pub fn scenario_label(fault: Fault, at: u64) -> Label {
    match fault {
        Fault::Healthy | Fault::BenignSpike => Label::Healthy { no_warning: true },
        // A fault lasts until the run ends (the harness does not steer it).
        _ => faulty(&[Onset::new(at, SCENARIO_TAIL, fault.as_str()).lasting(u64::MAX)]),
    }
}

/// Every fault of [`Fault::ALL`], seeds [`SCENARIO_SEEDS`], each worker count
/// of [`scenario_worker_counts`].
pub fn scenario_inputs() -> Vec<Input> {
    let mut inputs = Vec::new();
    for fault in Fault::ALL {
        for workers in scenario_worker_counts(fault) {
            for seed in SCENARIO_SEEDS {
                let cfg = ScenarioConfig {
                    job: "quality".into(),
                    fault,
                    workers,
                    layers: SCENARIO_LAYERS,
                    steps: SCENARIO_FAULT_AT + SCENARIO_TAIL,
                    seed,
                    fault_at: SCENARIO_FAULT_AT,
                    step_secs: SCENARIO_STEP_SECS,
                    ..ScenarioConfig::default()
                };
                let at = Scenario::new(cfg.clone()).plan().at;
                inputs.push(Input {
                    name: format!("{fault} seed {seed} workers {workers}"),
                    group: Some(format!("scenario {fault}")),
                    source: Source::Scenario(cfg),
                    label: scenario_label(fault, at),
                });
            }
        }
    }
    inputs
}

/// An input, read: what every detector is fed, in order.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    jobs: Vec<String>,
    world_size: Option<u32>,
    items: Vec<Item>,
    /// Lines the trace reader skipped.
    pub skipped: usize,
}

#[derive(Debug, Clone)]
enum Item {
    /// The layer names of a job (a record that carries them, when they change).
    Declare {
        job: usize,
        names: Vec<String>,
    },
    Observe {
        job: usize,
        summary: Summary,
    },
}

impl Feed {
    /// The summaries in order.
    pub fn summaries(&self) -> impl Iterator<Item = &Summary> {
        self.items.iter().filter_map(|i| match i {
            Item::Observe { summary, .. } => Some(summary),
            Item::Declare { .. } => None,
        })
    }

    fn job(&mut self, name: &str) -> usize {
        match self.jobs.iter().position(|j| j == name) {
            Some(i) => i,
            None => {
                self.jobs.push(name.to_owned());
                self.jobs.len() - 1
            }
        }
    }
}

/// Reads an input. Errors say why a trace is unreadable: it cannot be opened,
/// its format is not recognised, or it yields no training record.
pub fn load(input: &Input) -> Result<Feed, String> {
    match &input.source {
        Source::Trace(path) => load_trace(path, &input.name),
        Source::Scenario(cfg) => Ok(load_scenario(cfg)),
    }
}

fn load_trace(path: &Path, name: &str) -> Result<Feed, String> {
    let shown = path.display().to_string();
    let short = |e: String| e.replace(&shown, name);
    let reader = Reader::open(path, None).map_err(|e| short(e.to_string()))?;
    let mut feed = Feed::default();
    let mut declared: HashMap<usize, Vec<String>> = HashMap::new();
    for entry in reader {
        match entry.map_err(|e| short(e.to_string()))? {
            Err(_) => feed.skipped += 1,
            Ok(record) => {
                let job = feed.job(&record.job);
                if let Some(names) = record.layer_names
                    && declared.get(&job) != Some(&names)
                {
                    declared.insert(job, names.clone());
                    feed.items.push(Item::Declare { job, names });
                }
                feed.items.push(Item::Observe {
                    job,
                    summary: record.summary,
                });
            }
        }
    }
    if feed.summaries().next().is_none() {
        return Err(format!("no training record ({} lines skipped)", feed.skipped));
    }
    Ok(feed)
}

fn load_scenario(cfg: &ScenarioConfig) -> Feed {
    let scenario = Scenario::new(cfg.clone());
    let mut feed = Feed {
        world_size: Some(cfg.workers),
        ..Feed::default()
    };
    let job = feed.job(&cfg.job);
    let names = scenario.layer_names();
    if !names.is_empty() {
        feed.items.push(Item::Declare { job, names });
    }
    for batch in scenario {
        feed.items
            .extend(batch.into_iter().map(|summary| Item::Observe { job, summary }));
    }
    feed
}

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

/// One printed line of the table: the input, its onsets, then per detector
/// hit, delay, FA and severe FA; or a note instead of the detector columns.
struct Line {
    name: String,
    onsets: String,
    cells: Result<Vec<[String; 4]>, String>,
}

fn trace_cells(label: &Label, score: &Score) -> [String; 4] {
    let n = label.onsets().len();
    let hit = match n {
        0 => "-".to_owned(),
        1 if score.caught() == 1 => "hit".to_owned(),
        1 => "miss".to_owned(),
        _ => format!("{}/{n}", score.caught()),
    };
    let delay = if score.caught() == 0 {
        "-".to_owned()
    } else {
        score.delay().to_string()
    };
    [
        hit,
        delay,
        score.false_alarms.to_string(),
        score.severe_false_alarms.to_string(),
    ]
}

fn total_cells(t: &Totals) -> [String; 4] {
    let hit = if t.onsets == 0 {
        "-".to_owned()
    } else {
        format!("{}/{}", t.caught, t.onsets)
    };
    let delay = if t.caught == 0 {
        "-".to_owned()
    } else {
        t.delay.to_string()
    };
    [
        hit,
        delay,
        t.false_alarms.to_string(),
        t.severe_false_alarms.to_string(),
    ]
}

const SUBHEADS: [&str; 4] = ["hit", "delay", "FA", "sFA"];

impl Report {
    fn lines(&self) -> (Vec<Line>, Vec<Line>) {
        let mut body = Vec::new();
        let mut groups_done: Vec<&str> = Vec::new();
        for row in &self.rows {
            match &row.group {
                None => body.push(Line {
                    name: row.name.clone(),
                    onsets: row.label.short(),
                    cells: row
                        .outcome
                        .as_ref()
                        .map(|scores| scores.iter().map(|s| trace_cells(&row.label, s)).collect())
                        .map_err(|e| format!("unreadable: {e}")),
                }),
                Some(group) if groups_done.contains(&group.as_str()) => {}
                Some(group) => {
                    groups_done.push(group);
                    let members: Vec<&Row> = self.rows.iter().filter(|r| r.group.as_ref() == Some(group)).collect();
                    let totals = self.totals(|r| r.group.as_ref() == Some(group));
                    let mut onsets: Vec<String> = members.iter().map(|r| r.label.short()).collect();
                    onsets.dedup();
                    let unreadable = totals[0].unreadable;
                    body.push(Line {
                        name: format!("{group} ({} runs)", members.len()),
                        onsets: if onsets.len() == 1 {
                            onsets.remove(0)
                        } else {
                            "various".to_owned()
                        },
                        cells: if unreadable > 0 {
                            Err(format!("{unreadable} runs unreadable"))
                        } else {
                            Ok(totals.iter().map(total_cells).collect())
                        },
                    });
                }
            }
        }
        let mut totals = Vec::new();
        let mut total_line = |name: String, which: &dyn Fn(&Row) -> bool| {
            let t = self.totals(which);
            totals.push(Line {
                name,
                onsets: String::new(),
                cells: Ok(t.iter().map(total_cells).collect()),
            });
        };
        let traces = self.totals(|r| r.group.is_none())[0];
        if traces.inputs > 0 {
            total_line(
                format!(
                    "total: real traces ({} read, {} unreadable)",
                    traces.inputs - traces.unreadable,
                    traces.unreadable
                ),
                &|r: &Row| r.group.is_none(),
            );
        }
        let runs = self.totals(|r| r.group.is_some())[0];
        if runs.inputs > 0 {
            total_line(
                format!("total: scenario runs ({})", runs.inputs - runs.unreadable),
                &|r: &Row| r.group.is_some(),
            );
        }
        if traces.inputs > 0 && runs.inputs > 0 {
            total_line("total: all".to_owned(), &|_: &Row| true);
        }
        (body, totals)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "detectors:")?;
        let name_width = Detector::ALL.iter().map(|d| d.name().len()).max().unwrap_or(0);
        for d in Detector::ALL {
            writeln!(f, "  {:<name_width$}  {}", d.name(), d.definition())?;
        }
        writeln!(f)?;

        let (body, totals) = self.lines();
        let all: Vec<&Line> = body.iter().chain(&totals).collect();
        let name_w = all.iter().map(|l| l.name.len()).chain([5]).max().unwrap_or(0);
        let onset_w = all.iter().map(|l| l.onsets.len()).chain([6]).max().unwrap_or(0);
        // Column widths per detector: the widest cell, header or body.
        let mut widths = vec![SUBHEADS.map(str::len); Detector::ALL.len()];
        for line in &all {
            if let Ok(cells) = &line.cells {
                for (w, c) in widths.iter_mut().zip(cells) {
                    for k in 0..4 {
                        w[k] = w[k].max(c[k].len());
                    }
                }
            }
        }
        for (i, d) in Detector::ALL.iter().enumerate() {
            let group: usize = widths[i].iter().sum::<usize>() + 3;
            if d.name().len() > group {
                widths[i][0] += d.name().len() - group;
            }
        }
        let group_w = |w: &[usize; 4]| w.iter().sum::<usize>() + 3;

        let mut head = format!("{:<name_w$}  {:<onset_w$}", "input", "onsets");
        let mut sub = format!("{:<name_w$}  {:<onset_w$}", "", "");
        for (d, w) in Detector::ALL.iter().zip(&widths) {
            let _ = write!(head, " | {:<gw$}", d.name(), gw = group_w(w));
            let _ = write!(
                sub,
                " | {:>w0$} {:>w1$} {:>w2$} {:>w3$}",
                SUBHEADS[0],
                SUBHEADS[1],
                SUBHEADS[2],
                SUBHEADS[3],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            );
        }
        let rule = "-".repeat(sub.len());
        writeln!(f, "{}", head.trim_end())?;
        writeln!(f, "{sub}")?;
        writeln!(f, "{rule}")?;
        let print = |f: &mut fmt::Formatter<'_>, line: &Line| -> fmt::Result {
            let mut s = format!("{:<name_w$}  {:<onset_w$}", line.name, line.onsets);
            match &line.cells {
                Ok(cells) => {
                    for (c, w) in cells.iter().zip(&widths) {
                        let _ = write!(
                            s,
                            " | {:>w0$} {:>w1$} {:>w2$} {:>w3$}",
                            c[0],
                            c[1],
                            c[2],
                            c[3],
                            w0 = w[0],
                            w1 = w[1],
                            w2 = w[2],
                            w3 = w[3]
                        );
                    }
                }
                Err(note) => {
                    let _ = write!(s, " | {note}");
                }
            }
            writeln!(f, "{s}")
        };
        for line in &body {
            print(f, line)?;
        }
        writeln!(f, "{rule}")?;
        for line in &totals {
            print(f, line)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "onsets: STEP+MAX_DELAY per labelled fault (- healthy). hit: the first alarm at or after the onset \
             comes within MAX_DELAY steps (k/n: onsets caught); delay: steps from onset to that alarm, summed; \
             FA: alarm steps outside every onset window; sFA: severe-event steps outside them."
        )?;
        writeln!(
            f,
            "scenario rows sum seeds {:?} and their worker counts; faults at step {}, {} steps after, {} layers.",
            SCENARIO_SEEDS, SCENARIO_FAULT_AT, SCENARIO_TAIL, SCENARIO_LAYERS
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
