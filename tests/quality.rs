//! What the traces' README expects of gradguard on every real trace, and of
//! the scenario suite's faults, checked through the quality harness's runner
//! (`gradguard::quality`), so the labels live in one table there.
//!
//! The traces are read from `tests/data/traces` (the vendored copy of the
//! shared real training logs); a trace that is missing or unreadable fails
//! the check that needs it.

use std::fmt::Write as _;
use std::path::PathBuf;

use gradguard::model::{Action, Finding, RuleId, Severity};
use gradguard::quality::{self, EngineRun, Input, Label};

fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces")
}

fn inputs() -> Vec<Input> {
    quality::trace_inputs(&traces_dir())
}

/// Plays one labelled trace through gradguard's engine.
fn play(input: &Input) -> Result<EngineRun, String> {
    quality::load(input)
        .map(|feed| quality::run_gradguard(&feed))
        .map_err(|e| format!("{}: unreadable: {e}", input.name))
}

fn play_file(file: &str) -> EngineRun {
    let input = inputs()
        .into_iter()
        .find(|i| i.name == file)
        .unwrap_or_else(|| panic!("{file} has no label in quality::trace_labels"));
    play(&input).unwrap_or_else(|e| panic!("{e}"))
}

fn show(f: &Finding) -> String {
    format!(
        "{} {} at step {} rank {:?}: {}",
        f.rule, f.severity, f.step, f.worker, f.message
    )
}

fn warnings(run: &EngineRun) -> Vec<&Finding> {
    run.findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .collect()
}

/// Up to five examples and how many there are.
fn examples(items: Vec<String>) -> String {
    let mut s = items.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > 5 {
        let _ = write!(s, "; ... {} in all", items.len());
    }
    s
}

/// Severe events: critical findings, and scale_lr, rollback or halt advice.
fn severe_events(run: &EngineRun) -> Vec<String> {
    run.findings
        .iter()
        .filter(|f| f.severity == Severity::Critical)
        .map(show)
        .chain(
            run.advice
                .iter()
                .filter(|a| quality::is_severe_advice(&a.action))
                .map(|a| format!("advice {} at step {}", a.action, a.step)),
        )
        .collect()
}

/// Healthy traces: no severe event; nothing of warning or worse where the
/// README says "no warning", at most one warning-or-worse finding elsewhere
/// (chatglm: the norm that reads as zero).
#[test]
fn healthy_traces_page_no_one() {
    let mut failures = Vec::new();
    for input in inputs() {
        let Label::Healthy { no_warning } = input.label else {
            continue;
        };
        let run = match play(&input) {
            Ok(run) => run,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let severe = severe_events(&run);
        if !severe.is_empty() {
            failures.push(format!("{}: severe: {}", input.name, examples(severe)));
        }
        let warned = warnings(&run);
        let allowed = if no_warning { 0 } else { 1 };
        if warned.len() > allowed {
            failures.push(format!(
                "{}: {} findings of warning or worse (allowed {allowed}): {}",
                input.name,
                warned.len(),
                examples(warned.iter().map(|f| show(f)).collect())
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Faulty traces: every labelled onset caught (a warning or worse) within its
/// maximum delay.
#[test]
fn faulty_traces_are_caught_in_time() {
    let mut failures = Vec::new();
    for input in inputs() {
        let Label::Faulty { onsets } = &input.label else {
            continue;
        };
        let run = match play(&input) {
            Ok(run) => run,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let score = quality::score(&input.label, &run.events());
        for (onset, delay) in onsets.iter().zip(&score.delays) {
            if delay.is_none() {
                let first = warnings(&run).into_iter().find(|f| f.step >= onset.step);
                failures.push(format!(
                    "{}: {} at step {} not caught within {} steps; first warning or worse after it: {}",
                    input.name,
                    onset.name,
                    onset.step,
                    onset.max_delay,
                    first.map_or("none".to_owned(), show)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The broken llm.c run (nan from step 1): a critical non-finite finding at
/// step 1 comes first, and the first advice is to skip step 1.
#[test]
fn nan_log_is_critical_at_step_1_with_skip_step() {
    let run = play_file("llmc/gpt2-124m-stdout-nan.log");
    let first = run.findings.first().map(show);
    assert!(
        run.findings
            .first()
            .is_some_and(|f| f.rule == RuleId::Nonfinite && f.severity == Severity::Critical && f.step == 1),
        "first finding: {first:?}"
    );
    let advice = run.advice.first();
    assert!(
        advice.is_some_and(|a| a.action == Action::SkipStep && a.step == 1),
        "first advice: {:?}",
        advice.map(|a| format!("{} at step {}", a.action, a.step))
    );
}

/// Rank 2's corrupted shard: a rank_outlier warning naming rank 2 soon after
/// 350, nothing of warning or worse before, and no halt.
#[test]
fn bad_shard_names_rank_2() {
    let run = play_file("torch/torch-bad_shard-161.jsonl");
    let mut failures = Vec::new();
    let early: Vec<String> = warnings(&run).into_iter().filter(|f| f.step < 350).map(show).collect();
    if !early.is_empty() {
        failures.push(format!("before 350: {}", examples(early)));
    }
    let outlier = run
        .findings
        .iter()
        .find(|f| f.rule == RuleId::RankOutlier && f.severity >= Severity::Warning);
    match outlier {
        Some(f) if f.worker == Some(2) && (350..=360).contains(&f.step) => {}
        Some(f) => failures.push(format!("first rank_outlier warning: {}", show(f))),
        None => failures.push("no rank_outlier warning".to_owned()),
    }
    let wrong: Vec<String> = run
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::RankOutlier && f.severity >= Severity::Warning && f.worker != Some(2))
        .map(show)
        .collect();
    if !wrong.is_empty() {
        failures.push(format!("rank_outlier naming another rank: {}", examples(wrong)));
    }
    if let Some(a) = run.advice.iter().find(|a| a.action == Action::Halt) {
        failures.push(format!("halt advice at step {}", a.step));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Healthy data parallelism: each rank's local norm differs, and that is no
/// reason to inspect a worker.
#[test]
fn healthy_dp_inspects_no_worker() {
    let run = play_file("torch/torch-healthy_dp-171.jsonl");
    let inspect: Vec<String> = run
        .advice
        .iter()
        .filter(|a| matches!(a.action, Action::InspectWorker { .. }))
        .map(|a| format!("{} at step {}", a.action, a.step))
        .collect();
    assert!(inspect.is_empty(), "{}", examples(inspect));
}

/// The LR jumps x40 at 350: clip or LR advice at 350 or 351.
#[test]
fn lr_blowup_gets_clip_or_lr_advice_at_350() {
    let run = play_file("torch/torch-lr_blowup-121.jsonl");
    let advised = run.advice.iter().any(|a| {
        (350..=351).contains(&a.step) && matches!(a.action, Action::ClipGradients { .. } | Action::ScaleLr { .. })
    });
    let around: Vec<String> = run
        .advice
        .iter()
        .filter(|a| (340..=360).contains(&a.step))
        .map(|a| format!("{} at step {}", a.action, a.step))
        .collect();
    assert!(advised, "advice around 350: {}", examples(around));
}

/// t5: grad-only spikes at 164000 (5.6x) and 190000 (15x) are info spikes.
#[test]
fn t5_grad_only_spikes_are_info() {
    let run = play_file("hf/t5_small_summarization.json");
    let mut failures = Vec::new();
    for step in [164_000, 190_000] {
        let spikes: Vec<&Finding> = run
            .findings
            .iter()
            .filter(|f| f.step == step && f.rule == RuleId::GradSpike)
            .collect();
        if spikes.is_empty() {
            let there: Vec<String> = run.findings.iter().filter(|f| f.step == step).map(show).collect();
            failures.push(format!("no grad_spike at {step} (findings there: {})", examples(there)));
        } else if let Some(f) = spikes.iter().find(|f| f.severity != Severity::Info) {
            failures.push(format!("not info: {}", show(f)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The scenario suite's faults, as the quality table plays them: every fault
/// caught (a warning or worse within its window), and no severe event on a
/// healthy run (healthy and benign-spike runs).
#[test]
fn scenario_faults_are_caught_and_healthy_runs_have_no_severe_event() {
    let mut failures = Vec::new();
    for input in quality::scenario_inputs() {
        let run = match play(&input) {
            Ok(run) => run,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let score = quality::score(&input.label, &run.events());
        match &input.label {
            Label::Faulty { onsets } => {
                for (onset, delay) in onsets.iter().zip(&score.delays) {
                    if delay.is_none() {
                        failures.push(format!(
                            "{}: not caught within {} steps of {}",
                            input.name, onset.max_delay, onset.step
                        ));
                    }
                }
            }
            Label::Healthy { .. } => {
                let severe = severe_events(&run);
                if !severe.is_empty() {
                    failures.push(format!("{}: severe: {}", input.name, examples(severe)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
