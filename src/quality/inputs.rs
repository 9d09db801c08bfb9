//! The inputs: real traces with their labels, and the scenario suite's runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::model::Summary;
use crate::scenario::{Fault, Scenario, ScenarioConfig};
use crate::trace::Reader;

use super::*;

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
    pub(super) jobs: Vec<String>,
    pub(super) world_size: Option<u32>,
    pub(super) items: Vec<Item>,
    /// Lines the trace reader skipped.
    pub skipped: usize,
}

#[derive(Debug, Clone)]
pub(super) enum Item {
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

    pub(super) fn job(&mut self, name: &str) -> usize {
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
