//! Rule-by-rule and policy tests of the engine, on small hand-built runs.

use super::*;
use crate::config::RuleBook;
use crate::model::{Action, Finding, LayerStats, RuleId, Severity, Summary};

/// Deterministic multiplicative noise in [1 - amp, 1 + amp].
fn noise(i: u64, amp: f64) -> f64 {
    let x = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 33;
    1.0 + amp * ((x % 2001) as f64 / 1000.0 - 1.0)
}

fn summary(worker: u32, step: u64, norm: f64, loss: f64) -> Summary {
    Summary {
        worker,
        step,
        time: Some(1_700_000_000.0 + step as f64),
        loss: Some(loss),
        lr: Some(1e-3),
        grad_norm: Some(norm),
        ..Summary::default()
    }
}

/// A quiet, healthy single-rank run: norm ~1 ± 5%, loss falling slowly.
fn healthy(step: u64) -> Summary {
    summary(0, step, noise(step, 0.05), 3.0 - step as f64 * 1e-4)
}

struct Run {
    engine: Engine,
    out: Output,
}

impl Run {
    fn new() -> Self {
        Self::with_rules("")
    }

    fn with_rules(toml: &str) -> Self {
        Self {
            engine: Engine::new(RuleBook::parse_str(toml, "test").unwrap()),
            out: Output::default(),
        }
    }

    fn feed(&mut self, s: Summary) -> &mut Self {
        self.engine.observe("job", &s, &mut self.out).unwrap();
        self
    }

    fn feed_all(&mut self, it: impl IntoIterator<Item = Summary>) -> &mut Self {
        for s in it {
            self.feed(s);
        }
        self
    }

    fn take(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }
}

fn rules(out: &Output) -> Vec<RuleId> {
    out.findings.iter().map(|f| f.rule).collect()
}

fn actions(out: &Output) -> Vec<&'static str> {
    out.advice.iter().map(|a| a.action.name()).collect()
}

/// The first finding of a rule; panics when the rule never fired.
fn first(out: &Output, rule: RuleId) -> &Finding {
    out.findings
        .iter()
        .find(|f| f.rule == rule)
        .unwrap_or_else(|| panic!("{rule} never fired: {:#?}", out.findings))
}

fn worst(out: &Output) -> Option<Severity> {
    out.findings.iter().map(|f| f.severity).max()
}

#[test]
fn healthy_run_is_quiet() {
    let mut run = Run::new();
    run.feed_all((0..2000).map(healthy));
    let out = run.take();
    assert!(out.findings.is_empty(), "{:#?}", out.findings);
    assert!(out.advice.is_empty());
}

#[test]
fn nan_loss_is_critical_and_skips_the_step() {
    let mut run = Run::new();
    run.feed_all((0..50).map(healthy)).take();
    let mut s = healthy(50);
    s.loss = Some(f64::NAN);
    let out = run.feed(s).take();
    assert_eq!(rules(&out), [RuleId::Nonfinite]);
    assert_eq!(worst(&out), Some(Severity::Critical));
    let a = &out.advice[0];
    assert_eq!((a.action, a.target, a.apply_from), (Action::SkipStep, None, 50));
}

#[test]
fn repeated_nan_proposes_rollback_before_the_episode() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy)).take();
    for step in [300, 302, 304] {
        let mut s = healthy(step);
        s.grad_norm = Some(f64::INFINITY);
        run.feed(s);
        run.feed(healthy(step + 1));
    }
    let out = run.take();
    assert_eq!(actions(&out), ["skip_step", "rollback"]);
    assert_eq!(out.advice[1].action, Action::Rollback { to_step: 200 });
    assert_eq!(out.advice[1].severity, Severity::Critical);
}

#[test]
fn amp_overflow_is_info_and_lowers_the_loss_scale() {
    let mut run = Run::new();
    let layers = vec![
        LayerStats {
            l2: 1.0,
            ..Default::default()
        };
        2
    ];
    let mut s = healthy(0);
    s.loss_scale = Some(65536.0);
    s.grad_norm = None;
    s.layers = layers.clone();
    s.layers[1].nonfinite = 3;
    let out = run.feed(s).take();
    assert_eq!(rules(&out), [RuleId::Nonfinite]);
    assert_eq!(worst(&out), Some(Severity::Info));
    assert_eq!(out.advice[0].action, Action::ScaleLossScale { factor: 0.5 });
    assert_eq!(
        out.findings[0].layer, None,
        "info findings under AMP are about the step"
    );
}

#[test]
fn non_finite_values_never_enter_the_statistics() {
    let mut run = Run::new();
    run.feed_all((0..100).map(healthy));
    for step in 100..110 {
        let mut s = healthy(step);
        s.grad_norm = Some(if step % 2 == 0 { f64::NAN } else { f64::INFINITY });
        s.loss = Some(f64::NEG_INFINITY);
        run.feed(s);
    }
    run.take();
    // After the burst, healthy steps stay quiet and a real spike is still seen
    // against the pre-burst baseline.
    run.feed_all((110..200).map(healthy));
    assert!(run.take().findings.is_empty());
    let out = run.feed(summary(0, 200, 3.0, 2.98)).take();
    assert_eq!(rules(&out), [RuleId::GradSpike]);
    assert!(out.findings[0].value > 20.0, "z = {}", out.findings[0].value);
}

#[test]
fn ceiling_is_off_until_configured() {
    let mut run = Run::new();
    run.feed_all((0..30).map(|s| summary(0, s, 1e6, 3.0)));
    assert!(!rules(&run.take()).contains(&RuleId::NormCeiling));

    let mut run = Run::with_rules("[norm_ceiling]\nenabled = true\nglobal_max = 5.0\nlayer_max = 1.0\n");
    let mut s = summary(0, 0, 6.0, 3.0);
    s.layers = vec![
        LayerStats {
            l2: 2.0,
            ..Default::default()
        },
        LayerStats {
            l2: 0.5,
            ..Default::default()
        },
    ];
    let out = run.feed(s).take();
    let f: Vec<_> = out.findings.iter().filter(|f| f.rule == RuleId::NormCeiling).collect();
    assert_eq!(f.len(), 2);
    assert_eq!(f[1].layer.as_deref(), Some("layer0"));
    // Clip to the layer limit: the global norm scaled by max/l2.
    assert_eq!(actions(&out), ["clip_gradients"]);
    assert!(
        matches!(out.advice[0].action, Action::ClipGradients { max_norm } if (max_norm - 3.0).abs() < 1e-9 || (max_norm - 5.0).abs() < 1e-9)
    );
}

#[test]
fn dead_layer_is_reported_once_after_patience() {
    let mut run = Run::new();
    run.engine
        .declare(
            "job",
            &JobSpec {
                layer_names: &["embed".into(), "head".into()],
                ..Default::default()
            },
        )
        .unwrap();
    let mut first = None;
    for step in 0..40 {
        let mut s = healthy(step);
        let dead = if step >= 10 { 0.0 } else { 0.5 };
        s.layers = vec![
            LayerStats {
                l2: dead,
                ..Default::default()
            },
            LayerStats {
                l2: 0.8,
                ..Default::default()
            },
        ];
        run.feed(s);
        if first.is_none() && run.out.findings.iter().any(|f| f.rule == RuleId::NormFloor) {
            first = Some(step);
        }
    }
    let out = run.take();
    let floors: Vec<_> = out.findings.iter().filter(|f| f.rule == RuleId::NormFloor).collect();
    assert_eq!(first, Some(14), "patience 5: steps 10..=14");
    assert_eq!(
        floors.len(),
        2,
        "reported on entry and once as a reminder after 20 steps"
    );
    assert_eq!(floors[0].layer.as_deref(), Some("embed"));
    assert_eq!(floors[0].severity, Severity::Warning);
}

#[test]
fn spike_waits_for_warmup_and_feeds_the_clipped_value() {
    let mut run = Run::new();
    run.feed_all((0..24).map(healthy));
    run.feed(summary(0, 24, 50.0, 3.0));
    assert!(run.take().findings.is_empty(), "still warming up");

    let mut run = Run::new();
    run.feed_all((0..100).map(healthy));
    let out = run.feed(summary(0, 100, 50.0, 2.99)).take();
    assert_eq!(rules(&out), [RuleId::GradSpike]);
    let Action::ClipGradients { max_norm } = out.advice[0].action else {
        panic!("{:?}", out.advice)
    };
    assert!(max_norm > 1.0 && max_norm < 1.3, "clip at μ + 2.5σ, got {max_norm}");
    assert_eq!(out.findings[0].severity, Severity::Info);
    // The clipped value, not 50, went into the EMA: the next healthy step is quiet.
    run.feed_all((101..150).map(healthy));
    assert!(run.take().findings.is_empty());
}

#[test]
fn mild_spike_is_an_anomaly_without_advice() {
    let mut run = Run::new();
    run.feed_all((0..100).map(healthy));
    // Clearly above μ + 2.5σ (about 1.07), but clipping there would cut little.
    let out = run.feed(summary(0, 100, 1.25, 2.99)).take();
    assert_eq!(rules(&out), [RuleId::GradSpike]);
    assert!(out.advice.is_empty(), "{:?}", out.advice);
    // Twice the bound is worth clipping.
    run.feed_all((101..200).map(healthy));
    run.take();
    let out = run.feed(summary(0, 200, 2.5, 2.98)).take();
    assert_eq!(actions(&out), ["clip_gradients"]);
}

#[test]
fn lone_spike_stays_at_clip_and_is_not_paged() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    run.feed(summary(0, 300, 20.0, 2.97));
    run.feed_all((301..600).map(healthy));
    let out = run.take();
    assert_eq!(actions(&out), ["clip_gradients"]);
    assert_eq!(worst(&out), Some(Severity::Info));
}

#[test]
fn sustained_explosion_escalates_to_rollback_and_halts_only_once_a_remedy_failed() {
    let explode = |s: u64| summary(0, s, 300.0 * noise(s, 0.05), 2.98);
    let mut run = Run::new();
    run.feed_all((0..200).map(healthy));
    // The norm jumps 300× and stays; the loss does not improve.
    run.feed_all((200..300).map(explode));
    let out = run.take();
    let names = actions(&out);
    assert_eq!(
        names[..3],
        ["clip_gradients", "scale_lr", "rollback"],
        "{:#?}",
        out.advice
    );
    assert!(
        !names.contains(&"halt"),
        "halt before any remedy was applied: {names:?}"
    );
    assert_eq!(out.advice[0].step, 200);
    let rollback = &out.advice[2];
    assert_eq!(rollback.action, Action::Rollback { to_step: 100 });
    assert_eq!(rollback.severity, Severity::Critical);
    assert!(rollback.reason.contains("escalating"), "{}", rollback.reason);
    // Nothing repeats within the cooldown unless it climbs the ladder.
    for pair in out.advice.windows(2) {
        let climbed = names_rank(&pair[1].action) > names_rank(&pair[0].action);
        assert!(climbed || pair[1].step >= pair[0].step + 20, "{pair:#?}");
    }

    // The worker applies the rollback and the run explodes again: the remedy
    // failed, and only now is halting the run advised.
    run.engine.note_rollback("job", rollback.id, 100);
    assert_eq!(run.engine.advice_applied("job", 0, rollback.id), Some(100));
    run.feed_all((101..200).map(healthy));
    // This time the loss climbs with it.
    run.feed_all((200..400).map(|s| summary(0, s, 300.0 * noise(s, 0.05), 2.98 * (1.0 + 0.01 * (s - 200) as f64))));
    let out = run.take();
    let halt = out.advice.iter().find(|a| a.action == Action::Halt);
    let halt = halt.unwrap_or_else(|| panic!("no halt after a failed rollback: {:#?}", out.advice));
    assert_eq!(halt.severity, Severity::Critical);
}

#[test]
fn a_rollback_that_does_not_hold_is_retried_with_the_learning_rate_cut_then_halted() {
    let explode = |s: u64| summary(0, s, 300.0 * noise(s, 0.05), 2.98 * (1.0 + 0.01 * (s % 1000) as f64));
    let mut run = Run::new();
    run.feed_all((0..200).map(healthy));
    let mut step = 200;
    let mut rollbacks = Vec::new();
    let mut cuts_with_them = 0;
    let mut halted = false;
    // The worker applies every rollback, and every time the run explodes again.
    while !halted && step < 2000 {
        run.feed(explode(step));
        step += 1;
        let out = run.take();
        halted = out.advice.iter().any(|a| a.action == Action::Halt);
        if let Some(r) = out.advice.iter().find(|a| matches!(a.action, Action::Rollback { .. })) {
            let Action::Rollback { to_step } = r.action else {
                unreachable!()
            };
            if !rollbacks.is_empty() {
                let cut = out
                    .advice
                    .iter()
                    .any(|a| a.step == r.step && matches!(a.action, Action::ScaleLr { .. }));
                cuts_with_them += usize::from(cut);
                assert!(r.reason.contains("rolling back again"), "{}", r.reason);
            }
            rollbacks.push(r.step);
            run.engine.note_rollback("job", r.id, to_step);
            assert_eq!(run.engine.advice_applied("job", 0, r.id), Some(to_step));
            run.feed_all((to_step + 1..step).map(healthy));
        }
    }
    let max = Rules::default().policy.max_rollbacks as usize;
    assert!(halted, "no halt after {} failed rollbacks", rollbacks.len());
    assert_eq!(rollbacks.len(), max, "{rollbacks:?}");
    assert_eq!(
        cuts_with_them,
        max - 1,
        "each retry comes with a cut of the learning rate"
    );
}

#[test]
fn a_cut_learning_rate_counts_as_applied() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    let mut lr = 1e-3;
    let mut halted = false;
    let mut seen = Vec::new();
    for s in 300..700 {
        // The loss diverges, and keeps diverging with a smaller learning rate.
        let mut x = summary(0, s, noise(s, 0.05), 2.97 * (1.0 + 0.005 * (s - 300) as f64));
        x.lr = Some(lr);
        run.feed(x);
        let out = run.take();
        if out.advice.iter().any(|a| matches!(a.action, Action::ScaleLr { .. })) {
            lr *= 0.5; // the worker follows the advice
        }
        halted |= out.advice.iter().any(|a| a.action == Action::Halt);
        seen.extend(out.advice.iter().map(|a| (a.step, a.action.name())));
    }
    assert!(halted, "the learning rate was cut and the explosion went on: {seen:?}");
}

fn names_rank(a: &Action) -> u8 {
    match a {
        Action::ClipGradients { .. } | Action::InspectWorker { .. } => 0,
        Action::SkipStep | Action::ScaleLossScale { .. } => 1,
        Action::ScaleLr { .. } => 2,
        Action::Rollback { .. } => 3,
        Action::Halt => 4,
    }
}

#[test]
fn spikes_alone_stay_at_clip_however_often_they_come() {
    // Only the spike rule sees the jump (the other gradient rules are off):
    // weak evidence, which never climbs the ladder.
    let mut run = Run::with_rules(
        "[grad_growth]
enabled = false
[blowup]
enabled = false
",
    );
    run.feed_all((0..200).map(healthy));
    run.feed_all((200..280).map(|s| summary(0, s, 100.0 * noise(s, 0.05), 2.98)));
    let out = run.take();
    assert!(!out.advice.is_empty());
    assert!(
        out.advice
            .iter()
            .all(|a| matches!(a.action, Action::ClipGradients { .. })),
        "{:?}",
        actions(&out)
    );
}

#[test]
fn episode_ends_after_healthy_steps_and_restarts_at_clip() {
    let mut run = Run::new();
    run.feed_all((0..200).map(healthy));
    run.feed_all((200..230).map(|s| summary(0, s, 100.0, 2.98)));
    assert_eq!(actions(&run.take()), ["clip_gradients", "scale_lr"]);
    assert_eq!(run.engine.health("job"), Some(Severity::Warning));
    assert_eq!(run.engine.last_step("job", 0), Some(229));
    assert_eq!(run.engine.last_step("job", 1), None);
    // Long enough for the spike statistics to settle back and 50 quiet steps.
    run.feed_all((230..1500).map(healthy));
    run.take();
    assert_eq!(run.engine.status("job").unwrap().open_episodes, 0);
    assert_eq!(run.engine.health("job"), None);
    let out = run.feed(summary(0, 1500, 100.0, 2.85)).take();
    assert_eq!(actions(&out), ["clip_gradients"]);
}

#[test]
fn growth_with_falling_loss_is_info_but_with_rising_loss_cuts_lr() {
    // 3% a step: 4.4× over the window, slow enough to be a healthy run's.
    let rate = 1.03f64;
    let growth = |rising: bool| {
        let mut run = Run::new();
        run.feed_all((0..100).map(healthy));
        run.take();
        run.feed_all((100..200).map(|s| {
            let t = (s - 100) as f64;
            let loss = if rising { 2.99 + 0.002 * t } else { 2.99 - 0.002 * t };
            summary(0, s, rate.powf(t) * noise(s, 0.02), loss)
        }));
        run.take()
    };
    let benign = growth(false);
    let g: Vec<_> = benign
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::GradGrowth)
        .collect();
    assert!(!g.is_empty());
    assert!(g.iter().all(|f| f.severity == Severity::Info), "{g:#?}");
    assert!(!actions(&benign).contains(&"scale_lr") || actions(&benign).contains(&"clip_gradients"));

    let bad = growth(true);
    let g = first(&bad, RuleId::GradGrowth);
    assert_eq!(g.severity, Severity::Warning);
    assert!(g.step < 160, "seen within 60 steps of the start, at {}", g.step);
    assert!(actions(&bad).contains(&"scale_lr"));
}

#[test]
fn early_growth_while_the_loss_falls_from_the_first_step_gets_no_advice() {
    // Common at the start of training: the norm grows several-fold while the
    // loss falls. The growth window fills a step before the loss's does; the
    // loss must still count (it did not: "no loss reported", scale_lr).
    let mut run = Run::new();
    run.feed_all((0..150).map(|s| {
        let t = s.min(60) as f64;
        summary(0, s, 1.04f64.powf(t) * noise(s, 0.02), 3.0 - 0.01 * s as f64)
    }));
    let out = run.take();
    let g: Vec<_> = out.findings.iter().filter(|f| f.rule == RuleId::GradGrowth).collect();
    assert!(!g.is_empty(), "the growth is seen");
    assert!(
        g.iter()
            .all(|f| f.severity == Severity::Info && f.message.contains("loss keeps falling")),
        "{g:#?}"
    );
    assert!(out.advice.is_empty(), "{:?}", actions(&out));
}

#[test]
fn vanishing_trend_and_depth_ratio() {
    let mut run = Run::new();
    run.feed_all((0..100).map(healthy));
    run.feed_all((100..200).map(|s| summary(0, s, 0.9f64.powf((s - 100) as f64), 3.0)));
    let out = run.take();
    let v = first(&out, RuleId::Vanishing);
    assert_eq!(v.severity, Severity::Warning, "{v:?}");
    assert!(v.step < 170, "{}", v.step);

    let mut run = Run::new();
    let mut s = healthy(0);
    s.layers = vec![
        LayerStats {
            l2: 1e-6,
            ..Default::default()
        },
        LayerStats {
            l2: 1.0,
            ..Default::default()
        },
    ];
    let out = run.feed(s).take();
    assert_eq!(rules(&out), [RuleId::Vanishing]);
    assert!(out.findings[0].message.contains("depth"));
}

#[test]
fn a_loss_jump_that_comes_back_is_noise() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    let out = run.feed(summary(0, 300, 1.0, 9.0)).feed(healthy(301)).take();
    assert_eq!(rules(&out), [RuleId::LossSpike]);
    assert_eq!(worst(&out), Some(Severity::Info));
    assert!(out.advice.is_empty(), "{:?}", actions(&out));
}

#[test]
fn a_loss_jump_that_persists_is_a_warning_and_with_a_grad_spike_rolls_back() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    let out = run
        .feed(summary(0, 300, 1.0, 9.0))
        .feed(summary(0, 301, 1.0, 8.0))
        .take();
    let persisted = out.findings.last().unwrap();
    assert_eq!((persisted.rule, persisted.step), (RuleId::LossSpike, 301));
    assert_eq!(persisted.severity, Severity::Warning);
    assert!(persisted.message.contains("since step 300"), "{}", persisted.message);

    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    run.feed(summary(0, 300, 30.0, 9.0));
    let out = run.feed(summary(0, 301, 1.0, 8.5)).take();
    let spike = out
        .findings
        .iter()
        .find(|f| f.rule == RuleId::LossSpike && f.step == 301);
    assert_eq!(
        spike.map(|f| f.severity),
        Some(Severity::Critical),
        "{:#?}",
        out.findings
    );
    // One instability episode opened with the gradient spike at 300: roll back
    // 100 steps before it, in the same advice stream as the spike's clip.
    assert_eq!(actions(&out), ["clip_gradients", "rollback"]);
    assert_eq!(out.advice.last().unwrap().action, Action::Rollback { to_step: 200 });
}

#[test]
fn small_loss_bumps_are_not_spikes() {
    // Heavy-tailed batch noise: +8% on a quiet stretch clears z 6 but not min_rise.
    let mut run = Run::new();
    run.feed_all((0..300).map(|s| summary(0, s, noise(s, 0.05), 3.0 * noise(s + 7, 0.005))));
    let out = run.feed(summary(0, 300, 1.0, 3.25)).take();
    assert!(out.findings.is_empty(), "{:?}", out.findings);
}

#[test]
fn divergence_is_critical_and_cuts_lr_once_while_it_plateaus() {
    let mut run = Run::new();
    run.feed_all((0..300).map(healthy));
    run.feed_all((300..500).map(|s| summary(0, s, noise(s, 0.05), 2.97 * (1.0 + 0.005 * (s - 300) as f64))));
    let out = run.take();
    let d = first(&out, RuleId::LossDivergence);
    assert_eq!(d.severity, Severity::Critical);
    assert!(actions(&out).contains(&"scale_lr"));
    // The loss stops rising at its new level: no further escalation.
    run.feed_all((500..800).map(|s| summary(0, s, noise(s, 0.05), 4.0 * noise(s + 3, 0.002))));
    let out = run.take();
    assert!(
        !actions(&out).iter().any(|a| *a == "rollback" || *a == "halt"),
        "{:?}",
        actions(&out)
    );
}

#[test]
fn update_ratio_band() {
    let mut run = Run::new();
    let mut s = healthy(0);
    s.layers = vec![
        LayerStats {
            l2: 1.0,
            param_norm: Some(1.0),
            update_norm: Some(20.0),
            ..Default::default()
        },
        LayerStats {
            l2: 1.0,
            param_norm: Some(1.0),
            update_norm: Some(1e-10),
            ..Default::default()
        },
    ];
    let out = run.feed(s).take();
    let sev: Vec<_> = out
        .findings
        .iter()
        .map(|f| (f.rule, f.severity, f.layer.as_deref()))
        .collect();
    assert_eq!(
        sev,
        [
            (RuleId::UpdateRatio, Severity::Warning, Some("layer0")),
            (RuleId::UpdateRatio, Severity::Info, Some("layer1"))
        ]
    );
    assert_eq!(actions(&out), ["scale_lr"]);
}

#[test]
fn loss_scale_backing_off_to_the_floor() {
    let mut run = Run::new();
    let mut fired = None;
    for step in 0..20u64 {
        let mut s = healthy(step);
        s.loss_scale = Some(65536.0 / 2f64.powi(step as i32));
        run.feed(s);
        if fired.is_none() && run.out.findings.iter().any(|f| f.rule == RuleId::LossScaleFloor) {
            fired = Some(step);
        }
    }
    assert_eq!(fired, Some(8), "eight back-offs within the window");
    assert!(actions(&run.take()).contains(&"scale_lr"));
}

fn ranks(n: u32, steps: std::ops::Range<u64>, f: impl Fn(u32, u64) -> Option<Summary>) -> Vec<Summary> {
    steps
        .flat_map(|s| (0..n).filter_map(|r| f(r, s)).collect::<Vec<_>>())
        .collect()
}

#[test]
fn rank_outlier_names_the_rank() {
    let mut run = Run::new();
    let run_of = |bad: Option<u32>| {
        ranks(8, 0..60, move |r, s| {
            let x = if bad == Some(r) && s >= 40 { 10.0 } else { 1.0 };
            Some(summary(r, s, x * noise(s * 8 + u64::from(r), 0.03), 3.0))
        })
    };
    run.feed_all(run_of(None));
    assert!(run.take().findings.is_empty());
    let mut run = Run::new();
    run.feed_all(run_of(Some(5)));
    let out = run.take();
    let f = first(&out, RuleId::RankOutlier);
    assert_eq!((f.worker, f.step), (Some(5), 40));
    assert!(out.advice.iter().any(|a| a.action == Action::InspectWorker { rank: 5 }));
}

#[test]
fn a_rank_arriving_far_ahead_of_its_peers_is_still_judged_against_them() {
    // Streams are independent: the service may read rank 3's first 60 steps
    // before anyone else's, all within the same second.
    let at = |r: u32, s: u64, time: f64| Summary {
        time: Some(time),
        ..summary(
            r,
            s,
            if r == 3 && s >= 30 {
                10.0
            } else {
                noise(s * 4 + u64::from(r), 0.03)
            },
            3.0,
        )
    };
    let mut run = Run::new();
    let spec = JobSpec {
        world_size: Some(4),
        ..JobSpec::default()
    };
    run.engine.declare("job", &spec).unwrap();
    run.feed_all((0..60).map(|s| at(3, s, 1_700_000_000.0)));
    run.feed_all(ranks(3, 0..60, |r, s| Some(at(r, s, 1_700_000_000.5))));
    let out = run.take();
    let f = first(&out, RuleId::RankOutlier);
    assert_eq!((f.worker, f.step), (Some(3), 30));
    assert!(!rules(&out).contains(&RuleId::Straggler), "{:?}", rules(&out));
}

#[test]
fn a_rank_far_behind_does_not_reopen_episodes_or_repeat_advice() {
    // The same all-reduced explosion on two ranks, one read long before the other.
    let step = |r: u32, s: u64| {
        let norm = if s >= 200 {
            100.0 * noise(s, 0.05)
        } else {
            noise(s, 0.05)
        };
        summary(r, s, norm, if s >= 200 { 3.5 } else { 3.0 - s as f64 * 1e-4 })
    };
    let mut in_order = Run::new();
    in_order.feed_all(ranks(2, 0..300, |r, s| Some(step(r, s))));
    let in_order = in_order.take();
    let expected = actions(&in_order);

    let mut apart = Run::new();
    let spec = JobSpec {
        world_size: Some(2),
        ..JobSpec::default()
    };
    apart.engine.declare("job", &spec).unwrap();
    apart.feed_all((0..300).map(|s| step(1, s)));
    apart.feed_all((0..300).map(|s| step(0, s)));
    let out = apart.take();
    assert_eq!(actions(&out), expected);
    assert_eq!(apart.engine.health("job"), Some(Severity::Critical));
    // Each shared spike is reported once, not once per rank.
    let spikes = |o: &Output| o.findings.iter().filter(|f| f.rule == RuleId::GradSpike).count();
    assert_eq!(spikes(&out), spikes(&in_order));
}

#[test]
fn a_rewound_rank_reports_its_steps_again_with_fresh_statistics() {
    let mut run = Run::new();
    run.feed_all((0..200).map(healthy));
    run.feed_all((200..260).map(|s| summary(0, s, 100.0 * noise(s, 0.05), 3.5)));
    run.take();
    let mut out = Output::default();
    let err = run.engine.observe("job", &healthy(150), &mut out).unwrap_err();
    assert!(matches!(
        err,
        EngineError::StepBackwards {
            step: 150,
            last: 259,
            ..
        }
    ));
    assert!(run.engine.rewind("job", 0, 149));
    assert!(!run.engine.rewind("job", 0, 149), "already there");
    assert!(!run.engine.rewind("job", 3, 10), "unknown rank");
    assert_eq!(run.engine.last_step("job", 0), Some(149));
    run.feed_all((150..400).map(healthy));
    let out = run.take();
    assert!(
        !rules(&out).contains(&RuleId::Vanishing) && !rules(&out).contains(&RuleId::GradSpike),
        "{:?}",
        rules(&out)
    );
}

#[test]
fn a_rollback_acknowledged_after_a_hand_over_rewinds_the_rank() {
    let mut run = Run::new();
    run.feed_all((0..200).map(healthy));
    run.take();
    // Published as advice 7001 (cluster mode numbers advice itself).
    run.engine.note_rollback("job", 7001, 149);
    let bytes = run.engine.snapshot("job").unwrap();

    let mut owner = Engine::default();
    owner.restore("job", &bytes).unwrap();
    assert_eq!(owner.advice_applied("job", 0, 7000), None, "not a rollback it knows");
    assert_eq!(owner.advice_applied("job", 0, 7001), Some(149));
    assert_eq!(owner.last_step("job", 0), Some(149));
    let mut out = Output::default();
    owner.observe("job", &healthy(150), &mut out).unwrap();
    assert_eq!(owner.advice_applied("job", 0, 7001), None, "a second ack does nothing");
}

#[test]
fn only_one_rank_non_finite_is_an_outlier() {
    let mut run = Run::new();
    run.feed_all(ranks(4, 0..30, |r, s| {
        let norm = if r == 2 && s == 20 { f64::NAN } else { 1.0 };
        Some(summary(r, s, norm, 3.0))
    }));
    let out = run.take();
    let f = first(&out, RuleId::RankOutlier);
    assert_eq!((f.worker, f.step), (Some(2), 20));
}

#[test]
fn too_few_ranks_for_an_outlier() {
    let mut run = Run::new();
    run.feed_all(ranks(3, 0..30, |r, s| {
        Some(summary(r, s, if r == 0 { 50.0 } else { 1.0 }, 3.0))
    }));
    assert!(!rules(&run.take()).contains(&RuleId::RankOutlier));
}

/// Four pipeline stages of four data-parallel replicas (rank = stage × 4 +
/// replica); the last stage's layers have norms 50× the others'.
const PIPELINE: Layout = Layout {
    data_parallel: 4,
    tensor_parallel: 1,
    pipeline_parallel: 4,
};

fn place(engine: &mut Engine, rank: u32, layout: Layout, replica_group: u32) -> Result<(), EngineError> {
    let spec = JobSpec {
        placement: Some(Placement {
            layout,
            rank,
            replica_group,
        }),
        ..JobSpec::default()
    };
    engine.declare("job", &spec)
}

/// The pipeline job's run; `bad` reports 10× its stage's norm from step 40.
fn pipeline_run(bad: Option<u32>) -> Vec<Summary> {
    ranks(16, 0..60, move |r, s| {
        let stage = if r / 4 == 3 { 50.0 } else { 1.0 };
        let x = if bad == Some(r) && s >= 40 { 10.0 } else { 1.0 };
        Some(summary(r, s, stage * x * noise(s * 16 + u64::from(r), 0.03), 3.0))
    })
}

#[test]
fn pipeline_stages_are_compared_only_within_their_replica_group() {
    // Without a layout the last stage's ranks are outliers of the job...
    let mut run = Run::new();
    run.feed_all(pipeline_run(None));
    let out = run.take();
    let f = first(&out, RuleId::RankOutlier);
    assert!(f.worker.is_some_and(|r| r / 4 == 3), "{f:?}");

    // ... with it, nothing: each stage agrees with itself.
    let mut run = Run::new();
    for rank in 0..16 {
        place(&mut run.engine, rank, PIPELINE, rank / 4).unwrap();
    }
    run.feed_all(pipeline_run(None));
    let out = run.take();
    assert!(out.findings.is_empty(), "{:#?}", out.findings);
    let status = run.engine.status("job").unwrap();
    assert_eq!((status.layout, status.world_size), (Some(PIPELINE), Some(16)));

    // A bad replica within a stage is flagged, and only it.
    let mut run = Run::new();
    for rank in 0..16 {
        place(&mut run.engine, rank, PIPELINE, rank / 4).unwrap();
    }
    run.feed_all(pipeline_run(Some(13)));
    let out = run.take();
    let f = first(&out, RuleId::RankOutlier);
    assert_eq!((f.worker, f.step), (Some(13), 40));
    assert!(f.message.contains("of 4 ranks of replica group 3"), "{}", f.message);
    assert!(out.findings.iter().all(|f| f.worker == Some(13)), "{:#?}", out.findings);
    assert!(
        out.advice
            .iter()
            .any(|a| a.action == Action::InspectWorker { rank: 13 })
    );
}

#[test]
fn a_rank_of_a_laid_out_job_that_declared_no_group_is_compared_with_no_one() {
    let mut run = Run::new();
    for rank in 1..16 {
        place(&mut run.engine, rank, PIPELINE, rank / 4).unwrap();
    }
    // Rank 0 never placed itself: its stage judges the three that did, which
    // are fewer than min_ranks (4), so no one of stage 0 is judged.
    run.feed_all(ranks(16, 0..60, |r, s| {
        let x = if r == 0 { 1000.0 } else { 1.0 };
        Some(summary(r, s, x * noise(s * 16 + u64::from(r), 0.03), 3.0))
    }));
    assert!(!rules(&run.take()).contains(&RuleId::RankOutlier));
}

#[test]
fn stragglers_are_judged_across_replica_groups() {
    let mut run = Run::new();
    for rank in 0..16 {
        place(&mut run.engine, rank, PIPELINE, rank / 4).unwrap();
    }
    // Rank 5 (stage 1) stops after step 10; the others go on.
    run.feed_all(ranks(16, 0..40, |r, s| {
        (r != 5 || s <= 10).then(|| {
            let mut x = summary(r, s, if r / 4 == 3 { 50.0 } else { 1.0 }, 3.0);
            x.time = Some(1_700_000_000.0 + 20.0 * s as f64);
            x
        })
    }));
    let out = run.take();
    let lag = first(&out, RuleId::Straggler);
    assert_eq!((lag.worker, lag.step), (Some(5), 20));
    assert!(!rules(&out).contains(&RuleId::RankOutlier), "{:?}", rules(&out));
}

#[test]
fn a_declaration_that_disagrees_with_the_layout_is_refused_and_changes_nothing() {
    let mut e = Engine::default();
    let field = |r: Result<(), EngineError>| match r.unwrap_err() {
        EngineError::Layout { field, message } => format!("{field}: {message}"),
        other => panic!("{other}"),
    };
    // Not a placement at all.
    let zero = Layout {
        tensor_parallel: 0,
        ..PIPELINE
    };
    assert_eq!(
        field(place(&mut e, 0, zero, 0)),
        "layout.tensor_parallel: 0, must be at least 1"
    );
    assert_eq!(
        field(place(&mut e, 0, PIPELINE, 4)),
        "layout.replica_group: 4 is not below tensor_parallel 1 × pipeline_parallel 4 = 4"
    );
    assert_eq!(
        field(place(&mut e, 16, PIPELINE, 0)),
        "rank: 16 is not below the layout's data_parallel 4 × tensor_parallel 1 × pipeline_parallel 4 = 16 ranks"
    );
    let huge = Layout {
        data_parallel: 1 << 16,
        ..PIPELINE
    };
    assert!(field(place(&mut e, 0, huge, 0)).contains("above the limit of 65536"));
    let spec = JobSpec {
        world_size: Some(8),
        placement: Some(Placement {
            layout: PIPELINE,
            rank: 0,
            replica_group: 0,
        }),
        ..JobSpec::default()
    };
    assert!(field(e.declare("job", &spec)).ends_with("= 16 ranks, but world_size is 8"));
    assert_eq!(e.job_count(), 0, "a refused placement creates no job");

    for rank in 0..4 {
        place(&mut e, rank, PIPELINE, 0).unwrap();
    }
    let before = e.snapshot("job").unwrap();
    let other = Layout {
        data_parallel: 2,
        pipeline_parallel: 8,
        ..PIPELINE
    };
    assert_eq!(
        field(place(&mut e, 4, other, 1)),
        "layout: data_parallel 2 × tensor_parallel 1 × pipeline_parallel 8 = 16 ranks, \
         but the job is laid out as data_parallel 4 × tensor_parallel 1 × pipeline_parallel 4 = 16 ranks"
    );
    assert_eq!(
        field(place(&mut e, 3, PIPELINE, 1)),
        "layout.replica_group: 1, but rank 3 is in replica group 0"
    );
    assert_eq!(
        field(place(&mut e, 4, PIPELINE, 0)),
        "layout.replica_group: 0 already holds its data_parallel 4 ranks; rank 4 would be one more"
    );
    let world = JobSpec {
        world_size: Some(8),
        ..JobSpec::default()
    };
    assert_eq!(
        field(e.declare("job", &world)),
        "world_size: 8, but the job is laid out as data_parallel 4 × tensor_parallel 1 × pipeline_parallel 4 = 16 ranks"
    );
    assert_eq!(e.snapshot("job").unwrap(), before, "refusals changed the job");
    // The same placement again, a Hello with none, or the layout's world size: fine.
    place(&mut e, 3, PIPELINE, 0).unwrap();
    e.declare("job", &JobSpec::default()).unwrap();
    let world = JobSpec {
        world_size: Some(16),
        ..JobSpec::default()
    };
    e.declare("job", &world).unwrap();
    assert_eq!(e.snapshot("job").unwrap(), before);

    // The layout and the groups go with the job's snapshot.
    let mut owner = Engine::default();
    owner.restore("job", &before).unwrap();
    assert_eq!(owner.status("job").unwrap().layout, Some(PIPELINE));
    assert!(place(&mut owner, 3, PIPELINE, 1).is_err());
    assert!(place(&mut owner, 4, PIPELINE, 0).is_err());
    place(&mut owner, 4, PIPELINE, 1).unwrap();
}

#[test]
fn straggler_and_stalled_rank() {
    let mut run = Run::new();
    // Rank 3 stops after step 10; the others go on, one step per 20 s.
    run.feed_all(ranks(4, 0..40, |r, s| {
        (r != 3 || s <= 10).then(|| {
            let mut x = summary(r, s, 1.0, 3.0);
            x.time = Some(1_700_000_000.0 + 20.0 * s as f64);
            x
        })
    }));
    let out = run.take();
    let lag = first(&out, RuleId::Straggler);
    assert_eq!((lag.worker, lag.step), (Some(3), 20));
    let stall = first(&out, RuleId::Stalled);
    assert_eq!(stall.worker, Some(3));
    assert!(stall.value >= 300.0);
    assert!(out.advice.iter().all(|a| a.action == Action::InspectWorker { rank: 3 }));
}

#[test]
fn tick_judges_silence_with_the_callers_clock() {
    let mut run = Run::new();
    run.feed(summary(0, 0, 1.0, 3.0)).feed(summary(1, 0, 1.0, 3.0));
    let mut late = summary(1, 1, 1.0, 3.0);
    late.time = Some(1_700_000_200.0);
    run.feed(late);
    run.take();
    let mut out = Output::default();
    run.engine.tick(1_700_000_299.0, &mut out);
    assert!(out.findings.is_empty());
    run.engine.tick(1_700_000_301.0, &mut out);
    assert_eq!(rules(&out), [RuleId::Stalled]);
    assert_eq!(out.findings[0].worker, Some(0));
}

#[test]
fn shared_signals_are_reported_once_per_step() {
    let mut run = Run::new();
    run.feed_all(ranks(4, 0..5, |r, s| {
        Some(summary(r, s, 1.0, if s == 3 { f64::NAN } else { 3.0 }))
    }));
    let out = run.take();
    assert_eq!(rules(&out), [RuleId::Nonfinite]);
    assert_eq!(out.findings[0].worker, Some(0));
    assert_eq!(actions(&out), ["skip_step"]);
}

#[test]
fn bad_steps_are_refused_without_changing_state() {
    let mut engine = Engine::default();
    let mut out = Output::default();
    engine.observe("j", &healthy(5), &mut out).unwrap();
    assert_eq!(
        engine.observe("j", &healthy(5), &mut out),
        Err(EngineError::DuplicateStep { worker: 0, step: 5 })
    );
    assert_eq!(
        engine.observe("j", &healthy(4), &mut out),
        Err(EngineError::StepBackwards {
            worker: 0,
            step: 4,
            last: 5
        })
    );
    assert_eq!(engine.observe("", &healthy(6), &mut out), Err(EngineError::EmptyJob));
    let mut far = healthy(6);
    far.worker = MAX_RANKS;
    assert_eq!(
        engine.observe("j", &far, &mut out),
        Err(EngineError::RankOutOfRange { worker: MAX_RANKS })
    );
    engine.observe("j", &healthy(6), &mut out).unwrap();
    assert_eq!(engine.status("j").unwrap().max_step, Some(6));
    assert_eq!(engine.status("j").unwrap().ranks, 1, "the refused rank left no state");
}

#[test]
fn layer_count_must_match_the_declaration() {
    let mut engine = Engine::default();
    let names = ["a".to_string(), "b".to_string()];
    let spec = JobSpec {
        layer_names: &names,
        ..Default::default()
    };
    engine.declare("j", &spec).unwrap();
    let mut s = healthy(0);
    s.layers = vec![LayerStats::default(); 3];
    let mut out = Output::default();
    let err = engine.observe("j", &s, &mut out).unwrap_err();
    assert_eq!(err.to_string(), "rank 0 sent 3 layer values but the job has 2 layers");
    let other = ["a".to_string(), "c".to_string()];
    assert!(matches!(
        engine.declare(
            "j",
            &JobSpec {
                layer_names: &other,
                ..Default::default()
            }
        ),
        Err(EngineError::LayerNames { .. })
    ));
}

#[test]
fn per_job_override_turns_a_rule_off() {
    let mut run = Run::with_rules("[jobs.job.grad_spike]\nenabled = false\n");
    run.feed_all((0..100).map(healthy));
    run.feed(summary(0, 100, 50.0, 2.99));
    assert!(run.take().findings.is_empty());
    assert!(!run.engine.rules("job").grad_spike.enabled);
    assert!(run.engine.rules("other").grad_spike.enabled);
}

#[test]
fn same_input_same_output() {
    let input: Vec<Summary> = ranks(4, 0..400, |r, s| {
        let x = if s > 300 { 1.04f64.powf((s - 300) as f64) } else { 1.0 };
        Some(summary(
            r,
            s,
            x * noise(s * 4 + u64::from(r), 0.1),
            3.0 + (s as f64 / 100.0).sin(),
        ))
    });
    let mut a = Run::new();
    let mut b = Run::new();
    let (oa, ob) = (a.feed_all(input.clone()).take(), b.feed_all(input).take());
    assert!(!oa.advice.is_empty());
    assert_eq!(oa.findings, ob.findings);
    assert_eq!(oa.advice, ob.advice);
}

#[test]
fn state_per_layer_series_is_small() {
    let mut engine = Engine::default();
    let mut out = Output::default();
    for step in 0..100 {
        let mut s = healthy(step);
        s.layers = vec![
            LayerStats {
                l2: 0.1,
                ..Default::default()
            };
            100
        ];
        engine.observe("j", &s, &mut out).unwrap();
    }
    let bytes = engine.status("j").unwrap().state_bytes;
    assert!(bytes / 100 <= 1024, "{bytes} bytes for 100 layers");
}

#[test]
fn non_finite_max_abs_is_non_finite() {
    let mut run = Run::new();
    let mut s = healthy(0);
    s.layers = vec![LayerStats {
        l2: 1.0,
        max_abs: f32::NAN,
        ..Default::default()
    }];
    let out = run.feed(s).take();
    assert_eq!(rules(&out), [RuleId::Nonfinite]);
    assert_eq!(out.findings[0].layer.as_deref(), Some("layer0"));
}

/// Plays a scenario into one engine, handing the job to a second engine
/// through a snapshot at `split`: everything after the hand-over must be
/// exactly what one engine that saw the whole run produced.
fn handover_matches_one_engine(fault: crate::scenario::Fault, workers: u32, split: u64) {
    use crate::scenario::{Scenario, ScenarioConfig};
    let cfg = ScenarioConfig {
        fault,
        workers,
        layers: 8,
        steps: 1500,
        fault_at: 900,
        ..ScenarioConfig::default()
    };
    let names = Scenario::new(cfg.clone()).layer_names();
    let spec = JobSpec {
        layer_names: &names,
        world_size: Some(workers),
        ..JobSpec::default()
    };
    let (mut whole, mut first, mut second) = (Engine::default(), Engine::default(), Engine::default());
    whole.declare("sim", &spec).unwrap();
    first.declare("sim", &spec).unwrap();
    let mut scenario = Scenario::new(cfg);
    let (mut expected, mut got, mut scratch) = (Output::default(), Output::default(), Output::default());
    while let Some(summaries) = scenario.next_step() {
        for s in &summaries {
            let after = s.step >= split;
            if after && second.job_count() == 0 {
                let bytes = first.snapshot("sim").unwrap();
                second.restore("sim", &bytes).unwrap();
                second.resume_advice_ids(first.next_advice_id);
            }
            let (engine, out) = if after {
                (&mut second, &mut got)
            } else {
                (&mut first, &mut scratch)
            };
            engine.observe("sim", s, out).unwrap();
            let mut reference = Output::default();
            whole.observe("sim", s, &mut reference).unwrap();
            if after {
                expected.findings.append(&mut reference.findings);
                expected.advice.append(&mut reference.advice);
            }
        }
    }
    assert_eq!(got.findings, expected.findings, "{fault:?} split at {split}");
    assert_eq!(got.advice, expected.advice, "{fault:?} split at {split}");
    assert_eq!(
        second.snapshot("sim"),
        whole.snapshot("sim"),
        "{fault:?}: final state differs"
    );
    // Heap capacities may differ after the copy; everything else may not.
    let status = |e: &Engine| JobStatus {
        state_bytes: 0,
        ..e.status("sim").unwrap()
    };
    assert_eq!(status(&second), status(&whole));
}

#[test]
fn snapshot_hands_a_job_over_without_changing_what_follows() {
    use crate::scenario::Fault;
    for (fault, workers) in [
        (Fault::GradualExplosion, 1),
        (Fault::NanGradients, 2),
        (Fault::LossDivergence, 1),
        (Fault::RankOutlier, 4),
        (Fault::DeadLayer, 1),
    ] {
        // Mid-warm-up, just before the fault, and inside the open episode.
        for split in [10, 899, 950] {
            handover_matches_one_engine(fault, workers, split);
        }
    }
}

#[test]
fn restore_refuses_a_damaged_snapshot_by_name() {
    let mut engine = Engine::default();
    let mut out = Output::default();
    for step in 0..50 {
        engine.observe("job", &healthy(step), &mut out).unwrap();
    }
    let bytes = engine.snapshot("job").unwrap();
    let mut other = Engine::default();
    let err = other.restore("job", &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(
        matches!(err, EngineError::Snapshot { ref job, .. } if job == "job"),
        "{err}"
    );
    let mut wrong_version = bytes.clone();
    wrong_version[0] = 99;
    let err = other.restore("job", &wrong_version).unwrap_err();
    assert!(err.to_string().contains("format version 99"), "{err}");
    assert!(other.restore("job", &[]).is_err());
    assert_eq!(other.job_count(), 0, "a refused snapshot leaves no state");
    other.restore("job", &bytes).unwrap();
    assert_eq!(other.last_step("job", 0), Some(49));
    let err = other.observe("job", &healthy(49), &mut out).unwrap_err();
    assert_eq!(err, EngineError::DuplicateStep { worker: 0, step: 49 });
}

#[test]
fn a_high_rank_costs_what_one_rank_costs() {
    // Per-rank state exists only for ranks that report: rank 65535 of a
    // world of 65536 costs what rank 0 costs, not 65,536 slots.
    let cost = |rank: u32| {
        let mut e = Engine::default();
        e.declare(
            "j",
            &JobSpec {
                world_size: Some(65536),
                ..JobSpec::default()
            },
        )
        .unwrap();
        let mut out = Output::default();
        e.observe("j", &summary(rank, 1, 1.0, 2.0), &mut out).unwrap();
        e.status("j").unwrap().state_bytes
    };
    let (low, high) = (cost(0), cost(65535));
    assert_eq!(low, high, "rank 0 costs {low} bytes, rank 65535 {high}");
    assert!(high < 64 << 10, "one rank's state is {high} bytes");
}
