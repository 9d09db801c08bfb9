//! The labelled scenario suite: every fault the generator injects, played through
//! a fresh engine, must raise the expected rule within a stated delay and get
//! advice that makes sense, while healthy runs page no one. Property tests check
//! determinism, that non-finite values never reach the running statistics, and
//! that arbitrary input never panics.

use std::fmt::Write as _;

use gradguard::engine::{Engine, JobSpec, Layout, Output, Placement};
use gradguard::model::{Action, Advice, Finding, LayerStats, RuleId, Severity, Summary};
use gradguard::scenario::{Fault, FaultPlan, Scenario, ScenarioConfig};
use proptest::prelude::*;

const JOB: &str = "suite";
const SEEDS: [u64; 5] = [1, 2, 3, 4, 5];
/// Late enough that every rule has warmed up and the loss is past its steep fall.
const FAULT_AT: u64 = 600;
/// Seconds per step (a large model's step time): the 300 s stall timeout is 30 steps.
const STEP_SECS: f64 = 10.0;
const LAYERS: usize = 12;

/// Whom a finding must name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Subject {
    Any,
    /// The rank the fault hit (`Finding::worker`).
    FaultRank,
    /// The layer the fault hit (`Finding::layer`), when the run has layers.
    FaultLayer,
}

/// One labelled expectation: one of `rules` fires with at least `min` severity
/// at most `within` steps after the fault's first step.
struct Expect {
    fault: Fault,
    rules: &'static [RuleId],
    min: Severity,
    within: u64,
    subject: Subject,
}

const fn expect(fault: Fault, rules: &'static [RuleId], min: Severity, within: u64, subject: Subject) -> Expect {
    Expect {
        fault,
        rules,
        min,
        within,
        subject,
    }
}

use RuleId as R;
use Severity::{Critical, Info, Warning};
use Subject::{Any, FaultLayer, FaultRank};

/// The delay table. Delays are in steps after `fault_at`; 0 means the same step.
#[rustfmt::skip]
const EXPECTED: [Expect; 16] = [
    // ×50–1000 at once: the spike rule sees it on the step itself.
    expect(Fault::AbruptExplosion, &[R::GradSpike], Info, 0, Any),
    // ... and the loss that follows it (3–6%/step) pages soon after: a loss spike
    // once 20% above its mean, or the divergence rule (~20–28 steps).
    expect(Fault::AbruptExplosion, &[R::LossSpike, R::LossDivergence], Critical, 40, Any),
    // 5–8%/step: the 50-step log-slope passes 4× after ~25–30 steps (info while
    // the loss still falls), a warning once the loss turns.
    expect(Fault::GradualExplosion, &[R::GradGrowth], Warning, 60, Any),
    expect(Fault::NanGradients, &[R::Nonfinite], Critical, 0, FaultLayer),
    expect(Fault::NanLoss, &[R::Nonfinite], Critical, 0, Any),
    // 5–8%/step: 10× over the 50-step window once it is full of decay.
    expect(Fault::Vanishing, &[R::Vanishing], Info, 60, Any),
    // A warning only once a norm sits under the 1e-7 floor (or the smoothed loss
    // stops falling): ~90–300 steps at 5–8%/step.
    expect(Fault::Vanishing, &[R::Vanishing, R::NormFloor], Warning, 330, Any),
    // 0.4–0.6%/step: the smoothed loss (EMA α 0.98) is 25% up after ~90 steps.
    expect(Fault::LossDivergence, &[R::LossDivergence], Critical, 120, Any),
    // The floor's patience is 5: the fifth zero step is fault_at + 4.
    expect(Fault::DeadLayer, &[R::NormFloor], Warning, 4, FaultLayer),
    expect(Fault::RankOutlier, &[R::RankOutlier], Warning, 0, FaultRank),
    // Lag of 10 steps: the leading rank reaches fault_at + 9.
    expect(Fault::StalledRank, &[R::Straggler], Warning, 9, FaultRank),
    // 300 s at 10 s per step; the last record of the rank is at fault_at − 1.
    expect(Fault::StalledRank, &[R::Stalled], Warning, 29, FaultRank),
    expect(Fault::BenignSpike, &[R::GradSpike], Info, 0, Any),
    // A learning rate far too high from step 0: no statistic has warmed up,
    // the blow-up rule compares with the first records (10–30× a step).
    expect(Fault::LrTooHigh, &[R::Blowup], Warning, 3, Any),
    expect(Fault::LrTooHigh, &[R::Blowup, R::LossSpike, R::LossDivergence], Critical, 8, Any),
    // 1–2% a step: 100× below the peak after ~230–460 steps, once the loss
    // has stopped falling.
    expect(Fault::SlowVanishing, &[R::Vanishing, R::NormFloor], Warning, 500, Any),
];

/// Everything one run produced.
struct Run {
    plan: FaultPlan,
    cfg: ScenarioConfig,
    findings: Vec<Finding>,
    advice: Vec<Advice>,
    /// The first rank's loss per step.
    loss: Vec<(u64, f64)>,
    nonfinite_repeat: u32,
}

impl Run {
    fn label(&self) -> String {
        format!(
            "{} seed {} workers {} layers {}",
            self.cfg.fault, self.cfg.seed, self.cfg.workers, self.cfg.layers
        )
    }

    /// A readable digest for failure messages: the plan, then every finding of
    /// warning or worse and every finding after the fault (at most 40), then the
    /// first 20 advice.
    fn digest(&self) -> String {
        let mut s = format!("{}\n{:?}\n", self.label(), self.plan);
        let shown = self
            .findings
            .iter()
            .filter(|f| f.severity >= Warning || f.step >= self.plan.at);
        for f in shown.take(40) {
            let _ = writeln!(
                s,
                "  F step {} rank {:?} {} {} layer {:?} value {:.4}: {}",
                f.step, f.worker, f.rule, f.severity, f.layer, f.value, f.message
            );
        }
        for a in self.advice.iter().take(20) {
            let _ = writeln!(s, "  A step {} {} {} {:?}", a.step, a.action, a.severity, a.rules);
        }
        s
    }

    fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.severity >= Warning)
    }
}

fn config(fault: Fault, seed: u64, workers: u32, layers: usize, steps: u64) -> ScenarioConfig {
    ScenarioConfig {
        job: JOB.into(),
        fault,
        workers,
        layers,
        steps,
        seed,
        fault_at: FAULT_AT,
        step_secs: STEP_SECS,
        ..ScenarioConfig::default()
    }
}

/// Plays a whole run through a fresh engine; with `follow`, every advice is
/// applied to the simulation as a worker would.
fn play(cfg: ScenarioConfig, follow: bool) -> Run {
    let mut sc = Scenario::new(cfg.clone());
    let mut engine = Engine::default();
    let names = sc.layer_names();
    let spec = JobSpec {
        layer_names: &names,
        world_size: Some(cfg.workers),
        ..JobSpec::default()
    };
    engine.declare(&cfg.job, &spec).expect("declare");
    let mut out = Output::default();
    let mut run = Run {
        plan: sc.plan().clone(),
        findings: Vec::new(),
        advice: Vec::new(),
        loss: Vec::new(),
        nonfinite_repeat: engine.rules(&cfg.job).nonfinite.repeat,
        cfg,
    };
    while let Some(batch) = sc.next_step() {
        if let Some(first) = batch.first() {
            run.loss.push((first.step, first.loss.unwrap_or(f64::NAN)));
        }
        for s in &batch {
            out.clear();
            engine
                .observe(&run.cfg.job, s, &mut out)
                .expect("generated summaries are valid");
            if follow {
                for a in &out.advice {
                    sc.apply(&a.action);
                }
            }
            run.findings.append(&mut out.findings);
            run.advice.append(&mut out.advice);
        }
    }
    run
}

fn steps_for(fault: Fault) -> u64 {
    let longest = EXPECTED
        .iter()
        .filter(|e| e.fault == fault)
        .map(|e| e.within)
        .max()
        .unwrap_or(0);
    FAULT_AT + longest.max(60) + 40
}

/// The worker counts a fault is played with: single-rank where it can show,
/// and multi-rank.
fn worker_counts(fault: Fault) -> &'static [u32] {
    match fault {
        Fault::RankOutlier => &[4, 8],
        Fault::StalledRank => &[2, 8],
        _ => &[1, 4],
    }
}

fn subject_matches(e: &Expect, f: &Finding, plan: &FaultPlan, names: &[String]) -> bool {
    match e.subject {
        Any => true,
        FaultRank => f.worker.is_some() && f.worker == plan.rank,
        FaultLayer => match plan.layer {
            Some(i) => f.layer.as_deref() == Some(names[i].as_str()),
            None => true,
        },
    }
}

/// Checks every row of the delay table for the run's fault; returns the
/// failures as text.
fn check_expectations(run: &Run, names: &[String]) -> Vec<String> {
    let mut failures = Vec::new();
    let at = run.plan.at;
    if let Some(f) = run.warnings().find(|f| f.step < at) {
        failures.push(format!(
            "{}: {} {} at step {} before the fault at {at}: {}",
            run.label(),
            f.rule,
            f.severity,
            f.step,
            f.message
        ));
    }
    for e in EXPECTED.iter().filter(|e| e.fault == run.cfg.fault) {
        let hit = run.findings.iter().find(|f| {
            f.step >= at && e.rules.contains(&f.rule) && f.severity >= e.min && subject_matches(e, f, &run.plan, names)
        });
        match hit {
            Some(f) if f.step - at <= e.within => {}
            Some(f) => failures.push(format!(
                "{}: {:?} ≥ {} came {} steps after the fault (allowed {})",
                run.label(),
                e.rules,
                e.min,
                f.step - at,
                e.within
            )),
            None => failures.push(format!(
                "{}: no {:?} ≥ {} naming {:?} within {} steps",
                run.label(),
                e.rules,
                e.min,
                e.subject,
                e.within
            )),
        }
    }
    failures
}

fn is_escalation(a: &Advice) -> bool {
    matches!(
        a.action,
        Action::ScaleLr { .. } | Action::Rollback { .. } | Action::Halt
    )
}

/// Checks that the advice suits the fault; returns the failures as text.
fn check_advice(run: &Run) -> Vec<String> {
    let mut failures = Vec::new();
    let at = run.plan.at;
    let mut fail = |msg: String| failures.push(format!("{}: {msg}", run.label()));
    let after: Vec<&Advice> = run.advice.iter().filter(|a| a.step >= at).collect();
    let only_clip = |advice: &[&Advice]| {
        advice
            .iter()
            .find(|a| !matches!(a.action, Action::ClipGradients { .. }))
            .map(|a| format!("{} at step {}", a.action, a.step))
    };
    match run.cfg.fault {
        Fault::AbruptExplosion | Fault::GradualExplosion => {
            match after.first() {
                Some(a) if matches!(a.action, Action::ClipGradients { max_norm } if max_norm.is_finite() && max_norm > 0.0) =>
                    {}
                other => fail(format!("first advice after the fault is not a clip: {other:?}")),
            }
            // The run is not steered here (open loop), so the problem persists and
            // the advice must go beyond clipping.
            let within = if run.cfg.fault == Fault::AbruptExplosion {
                40
            } else {
                60
            };
            if !after.iter().any(|a| is_escalation(a) && a.step <= at + within) {
                fail(format!("no escalation beyond clip within {within} steps"));
            }
        }
        Fault::NanGradients | Fault::NanLoss => {
            match after.first() {
                Some(a) if a.action == Action::SkipStep && a.step == at && a.apply_from == at => {}
                other => fail(format!("first advice is not skip_step for step {at}: {other:?}")),
            }
            let repeat = u64::from(run.nonfinite_repeat);
            let rollback = after.iter().any(|a| matches!(a.action, Action::Rollback { .. }));
            if run.plan.duration >= repeat && !rollback {
                fail(format!(
                    "{} non-finite steps in a row but no rollback",
                    run.plan.duration
                ));
            }
            if run.plan.duration < repeat && rollback {
                fail(format!("rollback after only {} non-finite steps", run.plan.duration));
            }
        }
        Fault::LossDivergence => {
            let first = run.findings.iter().find(|f| f.rule == R::LossDivergence);
            let advised = first.and_then(|f| after.iter().find(|a| a.step >= f.step));
            if !advised.is_some_and(|a| matches!(a.action, Action::ScaleLr { .. })) {
                fail(format!("divergence not answered with scale_lr: {advised:?}"));
            }
        }
        Fault::RankOutlier | Fault::StalledRank => {
            let rank = run.plan.rank.expect("the plan names a rank");
            if !after
                .iter()
                .any(|a| a.action == Action::InspectWorker { rank } && a.step <= at + 30)
            {
                fail(format!("no inspect_worker for rank {rank} within 30 steps"));
            }
            if let Some(a) = run
                .advice
                .iter()
                .find(|a| matches!(a.action, Action::InspectWorker { rank: r } if r != rank))
            {
                fail(format!("inspect_worker names the wrong rank: {}", a.action));
            }
        }
        Fault::BenignSpike => {
            if !after
                .iter()
                .any(|a| a.step == at && matches!(a.action, Action::ClipGradients { .. }))
            {
                fail("no clip advice on the spike".into());
            }
            let all: Vec<&Advice> = run.advice.iter().collect();
            if let Some(other) = only_clip(&all) {
                fail(format!("advice beyond clip for a benign spike: {other}"));
            }
            if let Some(f) = run.warnings().next() {
                fail(format!("{} {} at step {}: {}", f.rule, f.severity, f.step, f.message));
            }
        }
        // No optimizer setting fixes a dead layer or vanishing gradients: the
        // advice must not pretend otherwise.
        Fault::DeadLayer | Fault::Vanishing => {
            if let Some(other) = only_clip(&after) {
                fail(format!("optimizer advice for a {} fault: {other}", run.cfg.fault));
            }
        }
        Fault::LrTooHigh => {
            // Advised by step 2, and the learning rate cut once the loss follows.
            match run.advice.first() {
                Some(a) if a.step <= 2 => {}
                other => fail(format!("no advice by step 2: {other:?}")),
            }
            if !run
                .advice
                .iter()
                .any(|a| matches!(a.action, Action::ScaleLr { .. }) && a.step <= 10)
            {
                fail("no scale_lr within 10 steps".into());
            }
        }
        Fault::SlowVanishing => {
            if let Some(other) = only_clip(&after) {
                fail(format!("optimizer advice for a {} fault: {other}", run.cfg.fault));
            }
        }
        Fault::Healthy => {}
    }
    failures
}

/// Plays every seed and worker count of a fault and checks the table and advice.
fn suite(fault: Fault, layers: usize) {
    let mut failures = Vec::new();
    let mut digests = Vec::new();
    for &workers in worker_counts(fault) {
        for seed in SEEDS {
            let cfg = config(fault, seed, workers, layers, steps_for(fault));
            let names = Scenario::new(cfg.clone()).layer_names();
            let run = play(cfg, false);
            let mut f = check_expectations(&run, &names);
            f.extend(check_advice(&run));
            if !f.is_empty() && digests.len() < 2 {
                digests.push(run.digest());
            }
            failures.extend(f);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n\n{}",
        failures.len(),
        failures.join("\n"),
        digests.join("\n")
    );
}

#[test]
fn abrupt_explosion() {
    suite(Fault::AbruptExplosion, LAYERS);
}

#[test]
fn gradual_explosion() {
    suite(Fault::GradualExplosion, LAYERS);
}

#[test]
fn lr_too_high_from_the_first_step() {
    suite(Fault::LrTooHigh, LAYERS);
}

#[test]
fn slow_vanishing() {
    suite(Fault::SlowVanishing, LAYERS);
}

#[test]
fn nan_gradients() {
    suite(Fault::NanGradients, LAYERS);
}

#[test]
fn nan_loss() {
    suite(Fault::NanLoss, LAYERS);
}

#[test]
fn vanishing() {
    suite(Fault::Vanishing, LAYERS);
}

#[test]
fn loss_divergence() {
    suite(Fault::LossDivergence, LAYERS);
}

#[test]
fn dead_layer() {
    suite(Fault::DeadLayer, LAYERS);
}

#[test]
fn rank_outlier() {
    suite(Fault::RankOutlier, LAYERS);
}

#[test]
fn stalled_rank() {
    suite(Fault::StalledRank, LAYERS);
}

#[test]
fn benign_spike() {
    suite(Fault::BenignSpike, LAYERS);
}

/// Workers that send global values only get the same detections (the dead
/// layer has no layer to show in, so it is left out).
#[test]
fn global_only_faults() {
    for fault in Fault::ALL {
        if fault == Fault::Healthy || fault == Fault::DeadLayer {
            continue;
        }
        suite(fault, 0);
    }
}

/// Healthy runs: nothing of warning or worse, no advice but clipping.
fn assert_healthy(run: &Run, allowed: &[&str]) {
    let bad: Vec<String> = run
        .warnings()
        .map(|f| format!("{} {} at step {}: {}", f.rule, f.severity, f.step, f.message))
        .chain(
            run.advice
                .iter()
                .filter(|a| !allowed.contains(&a.action.name()))
                .map(|a| format!("advice {} at step {}", a.action, a.step)),
        )
        .collect();
    assert!(bad.is_empty(), "{}: {}", run.label(), bad.join("\n"));
}

#[test]
fn healthy_runs_page_no_one() {
    for workers in [1, 8] {
        for seed in SEEDS {
            let run = play(config(Fault::Healthy, seed, workers, LAYERS, 2000), false);
            assert_healthy(&run, &["clip_gradients"]);
            // The suite must not pass because the engine saw nothing at all.
            assert!(
                run.findings.iter().any(|f| f.rule == R::GradSpike),
                "{}: not one benign spike flagged in 2000 steps",
                run.label()
            );
        }
    }
}

#[test]
fn healthy_global_only_runs_page_no_one() {
    for seed in SEEDS {
        let run = play(config(Fault::Healthy, seed, 4, 0, 2000), false);
        assert_healthy(&run, &["clip_gradients"]);
    }
}

/// Under AMP the scaler's occasional overflow is info, answered by lowering the
/// loss scale.
#[test]
fn healthy_amp_runs_page_no_one() {
    for seed in SEEDS {
        let mut cfg = config(Fault::Healthy, seed, 2, LAYERS, 3000);
        cfg.amp = true;
        let run = play(cfg, true);
        assert_healthy(&run, &["clip_gradients", "scale_loss_scale"]);
        assert!(
            run.findings
                .iter()
                .any(|f| f.rule == R::Nonfinite && f.severity == Info),
            "{}: the scaler never overflowed",
            run.label()
        );
    }
}

/// The real llm.c trace has a heavy right tail in the loss: a few steps per
/// thousand 6–9σ above the moving mean, on runs that are healthy. A z-score
/// alone pages on them; the loss-spike rule's `min_rise` must keep them quiet.
#[test]
fn healthy_runs_with_hard_batches_page_no_one() {
    for workers in [1, 8] {
        for seed in SEEDS {
            let mut cfg = config(Fault::Healthy, seed, workers, LAYERS, 3000);
            cfg.hard_batches = true;
            assert_healthy(&play(cfg, false), &["clip_gradients"]);
        }
    }
}

/// One bad rank is that rank's problem: the job-wide explosion ladder (scale LR,
/// rollback, halt) must not climb because of its local gradient.
#[test]
fn rank_outlier_does_not_escalate_the_whole_job() {
    for workers in [4, 8] {
        for seed in SEEDS {
            let run = play(config(Fault::RankOutlier, seed, workers, LAYERS, 900), false);
            if let Some(a) = run.advice.iter().find(|a| is_escalation(a)) {
                panic!("{}: {} at step {} ({:?})", run.label(), a.action, a.step, a.rules);
            }
        }
    }
}

/// Closed loop: a worker that follows the advice gets its run back. Judged on
/// the last 100 steps: nothing of warning or worse, the loss back within 5% of
/// where it was before the fault, and the run not halted.
#[test]
fn following_the_advice_recovers_the_run() {
    let faults = [
        Fault::AbruptExplosion,
        Fault::GradualExplosion,
        Fault::LossDivergence,
        Fault::NanGradients,
        Fault::NanLoss,
        Fault::RankOutlier,
        Fault::StalledRank,
        Fault::BenignSpike,
    ];
    let mut failures = Vec::new();
    for fault in faults {
        for seed in SEEDS {
            let steps = FAULT_AT + 500;
            let run = play(config(fault, seed, fault.min_workers().max(4), LAYERS, steps), true);
            let tail_from = steps - 100;
            let before = run.loss[(FAULT_AT - 20) as usize..FAULT_AT as usize]
                .iter()
                .map(|l| l.1)
                .sum::<f64>()
                / 20.0;
            let tail: Vec<f64> = run.loss.iter().filter(|l| l.0 >= tail_from).map(|l| l.1).collect();
            let after = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
            let mut why = Vec::new();
            if run.loss.last().is_none_or(|l| l.0 + 1 < steps) {
                why.push(format!("stopped at step {:?}", run.loss.last().map(|l| l.0)));
            }
            if let Some(f) = run.warnings().find(|f| f.step >= tail_from) {
                why.push(format!("{} {} at step {}", f.rule, f.severity, f.step));
            }
            if after.is_nan() || after > before * 1.05 {
                why.push(format!("loss {after:.3} vs {before:.3} before the fault"));
            }
            if !why.is_empty() {
                failures.push(format!("{}: {}\n{}", run.label(), why.join("; "), run.digest()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn debug_lines<T: std::fmt::Debug>(items: &[T]) -> Vec<String> {
    items.iter().map(|i| format!("{i:?}")).collect()
}

fn arb_fault() -> impl Strategy<Value = Fault> {
    prop::sample::select(Fault::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The generator and the engine are deterministic: the same configuration
    /// gives the same summaries, findings and advice (compared through their
    /// debug text, where NaN equals NaN).
    #[test]
    fn same_input_same_output(
        fault in arb_fault(),
        seed in any::<u64>(),
        workers in 1u32..6,
        layers in 0usize..6,
        fault_at in 50u64..250,
        follow in any::<bool>(),
    ) {
        let cfg = ScenarioConfig { fault, seed, workers, layers, fault_at, steps: 320, step_secs: 5.0, ..ScenarioConfig::default() };
        let a: Vec<Vec<Summary>> = Scenario::new(cfg.clone()).collect();
        let b: Vec<Vec<Summary>> = Scenario::new(cfg.clone()).collect();
        prop_assert_eq!(debug_lines(&a), debug_lines(&b));
        let (x, y) = (play(cfg.clone(), follow), play(cfg, follow));
        prop_assert_eq!(debug_lines(&x.findings), debug_lines(&y.findings));
        prop_assert_eq!(debug_lines(&x.advice), debug_lines(&y.advice));
    }

    /// No non-finite value reaches the running statistics. A healthy run with
    /// NaN/Inf injected on random steps is compared with the same run where those
    /// steps carry no values at all (same step numbers, so windows, latches and
    /// episodes see the same steps): apart from the non-finite rule's own
    /// findings and advice, both must produce exactly the same findings and
    /// advice. A real spike after the burst must still be caught.
    #[test]
    fn nonfinite_values_never_reach_the_statistics(
        seed in any::<u64>(),
        workers in 1u32..5,
        layers in 0usize..5,
        poison in prop::collection::btree_map(60u64..380, (0u8..3, 0usize..4), 1..12),
    ) {
        let cfg = ScenarioConfig {
            fault: Fault::BenignSpike, seed, workers, layers, fault_at: 400, steps: 460, ..ScenarioConfig::default()
        };
        let (mut poisoned, mut blank) = (Vec::new(), Vec::new());
        for s in Scenario::new(cfg).flatten() {
            let Some(&(what, value)) = poison.get(&s.step) else {
                poisoned.push(s.clone());
                blank.push(s);
                continue;
            };
            let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::NAN][value];
            let (mut p, mut b) = (s.clone(), s);
            // what: 0 poisons the loss, 1 the gradients, 2 both.
            if what != 1 {
                p.loss = Some(bad);
                b.loss = None;
            }
            if what != 0 {
                p.grad_norm = if value == 3 { None } else { Some(bad) };
                for l in &mut p.layers {
                    *l = LayerStats { l2: bad as f32, max_abs: bad as f32, nonfinite: 7, param_norm: Some(bad as f32), update_norm: Some(bad as f32) };
                }
                if p.grad_norm.is_none() && p.layers.is_empty() {
                    p.grad_norm = Some(bad);
                }
                b.grad_norm = None;
                b.layers.clear();
            }
            poisoned.push(p);
            blank.push(b);
        }
        let (fa, aa) = observe_all(&poisoned);
        let (fb, ab) = observe_all(&blank);
        let keep = |f: &&Finding| f.rule != R::Nonfinite;
        let fa: Vec<&Finding> = fa.iter().filter(keep).collect();
        let fb: Vec<&Finding> = fb.iter().filter(keep).collect();
        prop_assert_eq!(debug_lines(&fa), debug_lines(&fb));
        let strip = |a: &[Advice]| -> Vec<String> {
            a.iter().filter(|a| a.rules != [R::Nonfinite]).map(|a| format!("{} {} {:?} {}", a.step, a.action, a.rules, a.reason)).collect()
        };
        prop_assert_eq!(strip(&aa), strip(&ab));
        prop_assert!(fa.iter().any(|f| f.rule == R::GradSpike && f.step == 400), "the spike after the burst was missed");
    }
}

fn observe_all(summaries: &[Summary]) -> (Vec<Finding>, Vec<Advice>) {
    let mut engine = Engine::default();
    let mut out = Output::default();
    for s in summaries {
        engine.observe(JOB, s, &mut out).expect("valid summary");
    }
    (out.findings, out.advice)
}

/// A float from anywhere: ordinary values, zero, negatives, huge, tiny, NaN, ±Inf.
fn wild_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 0.0f64..10.0,
        1 => any::<f64>(),
        1 => prop::sample::select(vec![0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 1e300, -1e-300]),
    ]
}

fn wild_layer() -> impl Strategy<Value = LayerStats> {
    (
        wild_f64(),
        wild_f64(),
        any::<u32>(),
        prop::option::of(wild_f64()),
        prop::option::of(wild_f64()),
    )
        .prop_map(|(l2, max_abs, nonfinite, p, u)| LayerStats {
            l2: l2 as f32,
            max_abs: max_abs as f32,
            nonfinite: if nonfinite % 4 == 0 { nonfinite } else { 0 },
            param_norm: p.map(|x| x as f32),
            update_norm: u.map(|x| x as f32),
        })
}

/// Steps that mostly move forward, with jumps, repeats, and values near u64::MAX.
fn wild_step() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..400,
        1 => any::<u64>(),
        1 => (0u64..8).prop_map(|d| u64::MAX - d),
    ]
}

fn wild_summary() -> impl Strategy<Value = Summary> {
    (
        prop_oneof![6 => 0u32..6, 1 => any::<u32>(), 1 => 65_530u32..65_540],
        wild_step(),
        prop::option::of(wild_f64()),
        prop::option::of(wild_f64()),
        prop::option::of(wild_f64()),
        prop::option::of(wild_f64()),
        prop::option::of(wild_f64()),
        prop::collection::vec(wild_layer(), 0..4),
    )
        .prop_map(
            |(worker, step, time, loss, lr, loss_scale, grad_norm, layers)| Summary {
                worker,
                step,
                time: time.map(|t| t * 1e3),
                loss,
                lr,
                loss_scale,
                grad_norm,
                layers,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary input never panics: wild floats, steps, ranks and layer counts,
    /// declarations with odd world sizes and layouts (sizes, ranks and replica
    /// groups in and out of range, conflicting), and clock ticks. Errors are fine.
    #[test]
    fn arbitrary_summaries_never_panic(
        declare in prop::option::of((0usize..4, prop::option::of(any::<u32>()))),
        placements in prop::collection::vec((0u32..4, 0u32..3, 0u32..3, 0u32..7, 0u32..5), 0..8),
        summaries in prop::collection::vec((0usize..2, wild_summary()), 1..300),
        ticks in prop::collection::vec(wild_f64(), 0..4),
    ) {
        let mut engine = Engine::default();
        let mut out = Output::default();
        let jobs = ["a", "b"];
        if let Some((n, world_size)) = declare {
            let names: Vec<String> = (0..n).map(|i| format!("l{i}")).collect();
            let _ = engine.declare("a", &JobSpec { layer_names: &names, world_size, ..JobSpec::default() });
        }
        for (data_parallel, tensor_parallel, pipeline_parallel, rank, replica_group) in placements {
            let layout = Layout { data_parallel, tensor_parallel, pipeline_parallel };
            let placement = Some(Placement { layout, rank, replica_group });
            let _ = engine.declare("a", &JobSpec { placement, ..JobSpec::default() });
        }
        // Runs of increasing steps per job make the rules actually fire.
        let mut next = [0u64; 2];
        for (i, (job, mut s)) in summaries.into_iter().enumerate() {
            if i % 3 != 0 {
                next[job] = next[job].saturating_add(1);
                s.step = next[job];
                s.worker %= 6;
            }
            out.clear();
            let _ = engine.observe(jobs[job], &s, &mut out);
            for f in &out.findings {
                prop_assert!(!f.message.is_empty());
            }
        }
        for t in ticks {
            out.clear();
            engine.tick(t * 1e6, &mut out);
        }
        for job in jobs {
            let _ = engine.status(job);
        }
    }
}
