use clap::Parser;
use gradguard::model::Action;

use super::judge::{Record, Verdict, verdict};
use super::print::lag_text;
use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn args(extra: &[&str]) -> SimulateArgs {
    let base = ["simulate", "--server", "http://127.0.0.1:1"];
    Cli::parse_from(base.iter().chain(extra)).args
}

#[test]
fn defaults_and_names() {
    let a = args(&["--scenario", "explode"]);
    let cfg = scenario_config(&a, 1e9).expect("valid flags");
    assert_eq!((cfg.workers, cfg.layers, cfg.steps, cfg.fault_at), (4, 12, 600, 300));
    assert_eq!((cfg.job.as_str(), cfg.fault), ("sim-explode-0", Fault::AbruptExplosion));
    assert_eq!((cfg.start_time, cfg.step_secs), (1e9, 0.005));
    let a = args(&["--scenario", "stalled-rank", "--step-interval", "0"]);
    assert_eq!(a.scenario, ScenarioName::Stall);
    assert_eq!(a.step_interval, Duration::ZERO);
    assert!(parse_interval("5 parsecs").is_err());
}

#[test]
fn bad_flags_are_usage_errors_naming_the_flag() {
    let e = scenario_config(&args(&["--scenario", "rank-outlier", "--workers", "2"]), 0.0).unwrap_err();
    assert_eq!(e.code, 2);
    assert!(e.error.to_string().starts_with("--workers 2:"), "{}", e.error);
    let e = scenario_config(&args(&["--scenario", "nan", "--steps", "100"]), 0.0).unwrap_err();
    assert!(e.error.to_string().starts_with("--fault-at 300:"), "{}", e.error);
    assert!(scenario_config(&args(&["--scenario", "healthy", "--steps", "100"]), 0.0).is_ok());
    let e = scenario_config(&args(&["--scenario", "nan", "--job", " "]), 0.0).unwrap_err();
    assert!(e.error.to_string().starts_with("--job"), "{}", e.error);
}

/// Plays a scenario straight into a record, optionally applying `fix` at
/// `fix_at`; returns the problems the summary would report.
fn judge(fault: Fault, workers: u32, fix: Option<(u64, Action)>) -> Vec<String> {
    let mut sc = Scenario::new(ScenarioConfig {
        fault,
        workers,
        steps: 600,
        fault_at: 300,
        ..ScenarioConfig::default()
    });
    let mut record = Record::new(workers, 300);
    loop {
        let step = sc.step();
        if let Some((at, action)) = fix
            && at == step
        {
            sc.apply(&action);
        }
        let Some(batch) = sc.next_step() else { break };
        record.step(step, &batch);
    }
    record.problems(record.before().as_ref(), record.after().as_ref())
}

/// The rank a 4-rank run of `fault` picks, as `judge` plays it.
fn faulty_rank(fault: Fault) -> u32 {
    let cfg = ScenarioConfig {
        fault,
        workers: 4,
        fault_at: 300,
        ..ScenarioConfig::default()
    };
    Scenario::new(cfg).plan().rank.expect("a rank fault has a rank")
}

#[test]
fn a_healthy_run_has_no_problems() {
    assert_eq!(judge(Fault::Healthy, 4, None), Vec::<String>::new());
}

#[test]
fn what_is_still_wrong_is_named() {
    let p = judge(Fault::AbruptExplosion, 2, None);
    assert!(p.iter().any(|p| p.starts_with("the loss is")), "{p:?}");
    assert!(
        p.iter().any(|p| p.contains("still") && p.contains("gradient norm")),
        "{p:?}"
    );
    let p = judge(Fault::Vanishing, 1, None);
    assert!(p.iter().any(|p| p.contains("vanished")), "{p:?}");

    let r = faulty_rank(Fault::RankOutlier);
    let p = judge(Fault::RankOutlier, 4, None);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with(&format!("rank {r}'s gradient norm is still")), "{p:?}");
    let r = faulty_rank(Fault::StalledRank);
    let p = judge(Fault::StalledRank, 4, None);
    assert_eq!(p, [format!("rank {r} has sent nothing since step 299")]);
}

#[test]
fn a_followed_fix_clears_the_problems() {
    let clip = Action::ClipGradients { max_norm: 1.0 };
    assert_eq!(
        judge(Fault::AbruptExplosion, 2, Some((301, clip))),
        Vec::<String>::new()
    );
    let r = faulty_rank(Fault::RankOutlier);
    let inspect = Action::InspectWorker { rank: r };
    assert_eq!(judge(Fault::RankOutlier, 4, Some((301, inspect))), Vec::<String>::new());
}

#[test]
fn verdicts() {
    let none: &[String] = &[];
    let some = ["x".to_owned()];
    assert_eq!(verdict(Fault::Healthy, None, false, none, true), Verdict::Healthy);
    assert_eq!(
        verdict(Fault::NanGradients, None, false, none, true),
        Verdict::Recovered
    );
    assert_eq!(
        verdict(Fault::NanGradients, None, false, &some, true),
        Verdict::NotRecovered
    );
    assert_eq!(
        verdict(Fault::NanGradients, None, false, &some, false),
        Verdict::NotRecoveredUnapplied
    );
    assert_eq!(
        verdict(Fault::NanGradients, Some(320), true, none, true),
        Verdict::Halted(320)
    );
    assert_eq!(verdict(Fault::NanGradients, None, true, none, true), Verdict::Broken);
    assert!(Verdict::Recovered.explain(none).starts_with("recovered"));
    assert!(lag_text((1, 1)).ends_with("1 step after the step it was decided at"));
    assert!(lag_text((2, 40)).contains("the server fell behind"));
}
