//! The real GPT-2 124M llm.c pre-training log (19,552 steps, a healthy run with
//! a few isolated gradient-norm outliers): the detector must see the outliers
//! and must not page anyone or advise anything drastic.

use std::collections::BTreeSet;
use std::path::Path;

use gradguard::engine::{Engine, Output};
use gradguard::model::{Action, RuleId, Severity};
use gradguard::trace::Reader;

const LLMC_LOG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/traces/gpt2-124m-llmc.log");

fn replay() -> (usize, Output) {
    let mut engine = Engine::default();
    let mut out = Output::default();
    let mut records = 0;
    for entry in Reader::open(Path::new(LLMC_LOG), None).expect("open the llm.c log") {
        let record = entry.expect("readable").expect("every train line parses");
        engine
            .observe(&record.job, &record.summary, &mut out)
            .expect("steps increase");
        records += 1;
    }
    (records, out)
}

#[test]
fn healthy_real_run_pages_no_one_and_sees_its_outliers() {
    let (records, out) = replay();
    assert_eq!(records, 19_552);

    let loud: Vec<_> = out
        .findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .collect();
    assert!(
        loud.is_empty(),
        "warning or critical findings on a healthy run: {loud:#?}"
    );
    let drastic: Vec<_> = out
        .advice
        .iter()
        .filter(|a| {
            matches!(
                a.action,
                Action::ScaleLr { .. } | Action::Rollback { .. } | Action::Halt
            )
        })
        .collect();
    assert!(drastic.is_empty(), "drastic advice on a healthy run: {drastic:#?}");

    // The isolated outliers of the log (norm 4.29 at 8715, 1.50 at 12008, 0.93 at
    // 8708 against a typical 0.28) are seen as severe spikes with clip advice.
    let spikes: BTreeSet<u64> = out
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::GradSpike && f.value >= 6.0)
        .map(|f| f.step)
        .collect();
    for step in [8708, 8715, 12008] {
        assert!(spikes.contains(&step), "outlier at step {step} not seen");
        // Clip advice stands until replaced: one given within the cooldown
        // before the outlier covers it.
        assert!(
            out.advice
                .iter()
                .any(|a| (step - 20..=step).contains(&a.step) && matches!(a.action, Action::ClipGradients { .. })),
            "no clip advice covering step {step}"
        );
    }
    // Outliers are rare events, not a steady drizzle: well under 1% of steps
    // are severe spikes.
    assert!(spikes.len() < records / 100, "{} severe spikes", spikes.len());
}
