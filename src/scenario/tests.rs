use super::*;
use crate::model::{Action, Summary};

fn cfg(fault: Fault, workers: u32) -> ScenarioConfig {
    ScenarioConfig {
        fault,
        workers,
        fault_at: 300,
        steps: 600,
        seed: 7,
        ..ScenarioConfig::default()
    }
}

/// The first rank's summaries, one per step.
fn rank0(sc: Scenario) -> Vec<Summary> {
    sc.filter_map(|batch| batch.into_iter().next()).collect()
}

#[test]
fn fault_names_round_trip() {
    for f in Fault::ALL {
        assert_eq!(f.to_string().parse::<Fault>(), Ok(f));
    }
    assert_eq!("rank-outlier".parse(), Ok(Fault::RankOutlier));
    assert!("rank_outlier".parse::<Fault>().unwrap_err().contains("rank-outlier"));
}

#[test]
fn layer_names_follow_a_transformer_stack() {
    let sc = Scenario::new(ScenarioConfig {
        layers: 6,
        ..ScenarioConfig::default()
    });
    assert_eq!(
        sc.layer_names(),
        [
            "embed",
            "blocks.0.attn",
            "blocks.0.mlp",
            "blocks.1.attn",
            "blocks.1.mlp",
            "head"
        ]
    );
    let none = Scenario::new(ScenarioConfig {
        layers: 0,
        ..ScenarioConfig::default()
    });
    assert!(none.layer_names().is_empty());
}

#[test]
fn layers_add_up_to_the_global_norm() {
    for s in Scenario::new(cfg(Fault::Healthy, 2)).flatten() {
        let sq: f64 = s.layers.iter().map(|l| f64::from(l.l2).powi(2)).sum();
        let g = s.grad_norm.unwrap();
        assert!(
            (sq.sqrt() / g - 1.0).abs() < 1e-5,
            "step {}: {} vs {g}",
            s.step,
            sq.sqrt()
        );
        for l in &s.layers {
            assert!(l.max_abs > 0.0 && l.max_abs < l.l2, "{l:?}");
        }
    }
}

#[test]
fn healthy_run_has_the_shape_of_the_real_trace() {
    let run = rank0(Scenario::new(ScenarioConfig {
        steps: 1200,
        ..ScenarioConfig::default()
    }));
    let loss = |s: usize| run[s].loss.unwrap();
    let norm = |s: usize| run[s].grad_norm.unwrap();
    assert!((10.0..12.0).contains(&loss(0)), "{}", loss(0));
    assert!((6.0..7.5).contains(&loss(100)), "{}", loss(100));
    assert!((4.0..4.6).contains(&loss(1000)), "{}", loss(1000));
    assert!((10.0..20.0).contains(&norm(0)), "{}", norm(0));
    let mut mid: Vec<f64> = (100..200).map(norm).collect();
    mid.sort_by(f64::total_cmp);
    assert!((0.6..1.3).contains(&mid[50]), "median norm {}", mid[50]);
    // Step-to-step log noise of the norm: ~8% plus the wander.
    let d: Vec<f64> = (800..1199).map(|s| (norm(s + 1) / norm(s)).ln()).collect();
    let sd = (d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64).sqrt();
    assert!((0.07..0.2).contains(&sd), "norm log-diff sd {sd}");
    let l = &run[1000].layers[3];
    let ratio = l.update_norm.unwrap() / l.param_norm.unwrap();
    assert!((1e-4..1e-2).contains(&ratio), "update ratio {ratio}");
}

#[test]
fn ranks_differ_by_a_few_percent() {
    let batch = Scenario::new(cfg(Fault::Healthy, 8)).nth(400).unwrap();
    let norms: Vec<f64> = batch.iter().map(|s| s.grad_norm.unwrap()).collect();
    let mean = norms.iter().sum::<f64>() / 8.0;
    let rel = (norms.iter().map(|n| (n / mean - 1.0).powi(2)).sum::<f64>() / 8.0).sqrt();
    assert!((0.005..0.1).contains(&rel), "relative spread {rel}");
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let a: Vec<Vec<Summary>> = Scenario::new(cfg(Fault::GradualExplosion, 3)).collect();
    let b: Vec<Vec<Summary>> = Scenario::new(cfg(Fault::GradualExplosion, 3)).collect();
    assert_eq!(a, b);
    let c: Vec<Vec<Summary>> = Scenario::new(ScenarioConfig {
        seed: 8,
        ..cfg(Fault::GradualExplosion, 3)
    })
    .collect();
    assert_ne!(a, c);
}

#[test]
fn each_fault_shows_from_fault_at() {
    let norm_at = |fault, step: usize| rank0(Scenario::new(cfg(fault, 1)))[step].grad_norm.unwrap();
    let healthy = rank0(Scenario::new(cfg(Fault::Healthy, 1)));
    let h = |step: usize| healthy[step].grad_norm.unwrap();
    assert_eq!(norm_at(Fault::AbruptExplosion, 299), h(299));
    assert!(norm_at(Fault::AbruptExplosion, 300) > 40.0 * h(300));
    assert!(norm_at(Fault::GradualExplosion, 360) > 10.0 * h(360));
    assert!(norm_at(Fault::Vanishing, 400) < 0.01 * h(400));
    assert!(norm_at(Fault::BenignSpike, 300) > 4.0 * h(300));
    assert!(norm_at(Fault::BenignSpike, 301) == h(301));

    let nan = Scenario::new(cfg(Fault::NanGradients, 1));
    let (layer, duration) = (nan.plan().layer.unwrap(), nan.plan().duration);
    let run = rank0(nan);
    assert!(run[300].grad_norm.unwrap().is_nan() && run[300].layers[layer].nonfinite > 0);
    assert!(run[300 + duration as usize].grad_norm.unwrap().is_finite());

    let run = rank0(Scenario::new(cfg(Fault::NanLoss, 1)));
    assert!(!run[300].loss.unwrap().is_finite() && run[300].grad_norm.unwrap().is_finite());

    let dead = Scenario::new(cfg(Fault::DeadLayer, 1));
    let layer = dead.plan().layer.unwrap();
    let run = rank0(dead);
    assert!(run[299].layers[layer].l2 > 0.0);
    assert!(run[300..].iter().all(|s| s.layers[layer].l2 == 0.0));

    let div = rank0(Scenario::new(cfg(Fault::LossDivergence, 1)));
    assert!(div[500].loss.unwrap() > 1.5 * div[299].loss.unwrap());
}

#[test]
fn rank_faults_hit_the_planned_rank() {
    let sc = Scenario::new(cfg(Fault::RankOutlier, 8));
    let (rank, factor) = (sc.plan().rank.unwrap(), sc.plan().magnitude);
    let batch = sc.into_iter().nth(310).unwrap();
    let others: Vec<f64> = batch
        .iter()
        .filter(|s| s.worker != rank)
        .map(|s| s.grad_norm.unwrap())
        .collect();
    let bad = batch[rank as usize].grad_norm.unwrap();
    assert!(others.iter().all(|&n| bad > 0.6 * factor * n), "{bad} vs {others:?}");

    let mut sc = Scenario::new(ScenarioConfig {
        step_secs: 2.0,
        ..cfg(Fault::StalledRank, 4)
    });
    let rank = sc.plan().rank.unwrap();
    let mut last_time = 0.0;
    while let Some(batch) = sc.next_step() {
        let step = batch[0].step;
        assert_eq!(batch.iter().any(|s| s.worker == rank), step < 300, "step {step}");
        last_time = batch[0].time.unwrap();
    }
    assert!(
        last_time - (1_700_000_000.0 + 299.0 * 2.0) > 300.0,
        "the stall timeout is crossed"
    );
}

/// Plays to the end, applying `action` once right after `at`; returns rank 0.
fn steered(fault: Fault, at: u64, action: Action) -> Vec<Summary> {
    let mut sc = Scenario::new(cfg(fault, 1));
    let mut out = Vec::new();
    while let Some(mut batch) = sc.next_step() {
        if batch[0].step == at {
            sc.apply(&action);
        }
        out.push(batch.remove(0));
    }
    out
}

#[test]
fn advice_changes_the_dynamics() {
    let open = steered(Fault::AbruptExplosion, 0, Action::SkipStep);
    let healthy = rank0(Scenario::new(cfg(Fault::Healthy, 1)));
    let ratio = |run: &[Summary], s: usize| run[s].grad_norm.unwrap() / healthy[s].grad_norm.unwrap();
    assert!(ratio(&open, 400) > 40.0, "an explosion left alone stays");
    let clipped = steered(Fault::AbruptExplosion, 300, Action::ClipGradients { max_norm: 0.5 });
    assert!(
        ratio(&clipped, 350) < 2.0,
        "clipping calms it: {}",
        ratio(&clipped, 350)
    );
    let rolled = steered(Fault::AbruptExplosion, 305, Action::Rollback { to_step: 250 });
    assert!(ratio(&rolled, 306) < 1.5, "a rollback to before the fault undoes it");
    assert!(
        rolled[306].loss.unwrap() > healthy[306].loss.unwrap(),
        "and loses progress"
    );

    let growing = steered(Fault::GradualExplosion, 0, Action::SkipStep);
    let calmed = steered(Fault::GradualExplosion, 320, Action::ScaleLr { factor: 0.5 });
    assert!(ratio(&growing, 450) > 100.0);
    assert!(ratio(&calmed, 450) < 2.0, "{}", ratio(&calmed, 450));
    assert!((calmed[450].lr.unwrap() / healthy[450].lr.unwrap() - 0.5).abs() < 1e-9);

    let diverging = steered(Fault::LossDivergence, 0, Action::SkipStep);
    let calmed = steered(Fault::LossDivergence, 350, Action::ScaleLr { factor: 0.5 });
    assert!(calmed[599].loss.unwrap() < 0.8 * diverging[599].loss.unwrap());

    let mut sc = Scenario::new(cfg(Fault::RankOutlier, 4));
    let rank = sc.plan().rank.unwrap();
    sc.by_ref().take(310).for_each(drop);
    sc.apply(&Action::InspectWorker { rank });
    let batch = sc.next_step().unwrap();
    let max = batch.iter().map(|s| s.grad_norm.unwrap()).fold(0.0, f64::max);
    let min = batch.iter().map(|s| s.grad_norm.unwrap()).fold(f64::INFINITY, f64::min);
    assert!(max < 1.3 * min, "inspecting the rank repairs it");

    let mut sc = Scenario::new(cfg(Fault::Healthy, 1));
    sc.next_step();
    sc.apply(&Action::Halt);
    assert!(sc.finished() && sc.next_step().is_none());
}

#[test]
fn amp_scaler_overflows_and_backs_off() {
    let run = rank0(Scenario::new(ScenarioConfig {
        amp: true,
        steps: 2500,
        ..ScenarioConfig::default()
    }));
    let overflows: Vec<u64> = run
        .iter()
        .filter(|s| !s.grad_norm.unwrap().is_finite())
        .map(|s| s.step)
        .collect();
    assert!(!overflows.is_empty() && overflows.len() < 20, "{overflows:?}");
    for &o in &overflows {
        let (now, next) = (
            run[o as usize].loss_scale.unwrap(),
            run[o as usize + 1].loss_scale.unwrap(),
        );
        assert_eq!(next, now / 2.0);
        assert!(run[o as usize].loss.unwrap().is_finite());
    }
}
