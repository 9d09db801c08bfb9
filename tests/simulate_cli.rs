//! `gradguard simulate` against the real server: each test starts `gradguard
//! serve` on free ports, plays one scenario through it with the real binary and
//! reads what a user would read.
//!
//! The runs are paced (`--step-interval 5ms`, the default) and take turns: the
//! closed loop only holds while the server keeps up with the workers. Unpaced
//! (`0`), a server that reads each rank's stream on its own falls tens to
//! hundreds of steps behind, so advice acts too late (escalating to halt before
//! its effect is seen) and the ranks drift apart far enough to look like
//! stragglers.

mod common;

use common::Run;

use std::process::Command;
use std::sync::MutexGuard;

use gradguard::scenario::{Fault, Scenario, ScenarioConfig};

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// A `gradguard serve` on ports the OS picked (see `common`), held for one
/// test at a time.
struct Server {
    server: common::Server,
    url: String,
    _turn: MutexGuard<'static, ()>,
}

impl Server {
    fn start() -> Self {
        let turn = common::turn();
        let server = common::Server::start();
        Server {
            url: server.url(),
            server,
            _turn: turn,
        }
    }

    fn simulate(&self, args: &[&str]) -> Run {
        let _ = &self.server;
        let out = Command::new(BIN)
            .args(["simulate", "--server", &self.url])
            .args(args)
            .output()
            .expect("run gradguard simulate");
        Run::from(out)
    }
}

impl Run {
    /// The advice lines of the human output (`step   412  all ranks  ...`).
    fn advice_lines(&self) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.starts_with("step ")).collect()
    }

    /// The summary's `result` line.
    fn result(&self) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("result"))
            .map_or("", str::trim)
    }
}

#[test]
fn following_the_advice_brings_an_exploding_run_back() {
    let server = Server::start();
    let run = server.simulate(&[
        "--scenario",
        "explode",
        "--apply-advice",
        "--workers",
        "2",
        "--steps",
        "500",
        "--fault-at",
        "250",
        "--step-interval",
        "5ms",
    ]);
    run.assert_code(0);
    let advice = run.advice_lines();
    assert!(
        advice.iter().any(|l| l.contains("clip_gradients max_norm=")),
        "{}",
        run.stdout
    );
    assert!(!advice.iter().any(|l| l.contains(" halt")), "{}", run.stdout);
    assert!(run.result().starts_with("recovered"), "{}", run.stdout);
    assert!(run.stdout.contains("all applied"), "{}", run.stdout);
}

#[test]
fn json_output_is_advice_objects_then_a_summary() {
    let server = Server::start();
    let run = server.simulate(&[
        "--scenario",
        "explode",
        "--apply-advice",
        "--workers",
        "2",
        "--steps",
        "500",
        "--fault-at",
        "250",
        "--step-interval",
        "5ms",
        "--json",
        "--job",
        "json-explode",
    ]);
    run.assert_code(0);
    let lines = run.json();
    let (summary, advice) = lines.split_last().expect("a summary line");
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["job"], "json-explode");
    assert_eq!(summary["steps_sent"], 500);
    assert_eq!(summary["summaries_sent"], 1000);
    assert_eq!(summary["result"], "recovered", "{summary}");
    assert_eq!(summary["advice_total"].as_u64(), Some(advice.len() as u64));
    assert_eq!(summary["advice_applied"], summary["advice_total"]);
    assert!(advice.iter().all(|a| a["kind"] == "advice" && a["applied"] == true));
    let first = &advice[0];
    assert_eq!(first["action"], "clip_gradients");
    assert!(first["max_norm"].as_f64().is_some_and(|n| n > 0.0), "{first}");
    assert!(first["step"].as_u64().is_some_and(|s| s >= 250), "{first}");
}

#[test]
fn a_healthy_run_gets_no_advice_beyond_clipping() {
    let server = Server::start();
    let run = server.simulate(&["--scenario", "healthy"]);
    run.assert_code(0);
    // Ordinary noise crosses the spike rule's z of 2.5 now and then, and an
    // info-level clip is the intended answer (README, "Healthy runs"); nothing
    // else, nothing louder.
    for line in run.advice_lines() {
        assert!(
            line.contains(" info ") && line.contains("clip_gradients"),
            "{line}\n{}",
            run.stdout
        );
    }
    assert!(run.result().starts_with("healthy"), "{}", run.stdout);
}

#[test]
fn a_rank_outlier_is_named() {
    let faulty = Scenario::new(ScenarioConfig {
        fault: Fault::RankOutlier,
        workers: 4,
        layers: 12,
        steps: 400,
        fault_at: 300,
        seed: 0,
        ..ScenarioConfig::default()
    })
    .plan()
    .rank
    .expect("a rank outlier has a rank");
    let server = Server::start();
    let run = server.simulate(&["--scenario", "rank-outlier", "--workers", "4", "--steps", "400"]);
    run.assert_code(0);
    let outlier: Vec<&str> = run
        .advice_lines()
        .into_iter()
        .filter(|l| l.contains("rank_outlier"))
        .collect();
    assert!(!outlier.is_empty(), "{}", run.stdout);
    for line in outlier {
        assert!(line.contains(&format!("inspect_worker rank={faulty}")), "{line}");
    }
    assert!(run.stdout.contains(&format!("on rank {faulty}")), "{}", run.stdout);
    // Without --apply-advice nobody repairs the rank.
    assert!(
        run.result().starts_with("NOT recovered") && run.result().contains(&format!("rank {faulty}")),
        "{}",
        run.stdout
    );
}

#[test]
fn too_few_workers_is_a_usage_error() {
    // Checked before any connection: no server needed.
    let run = Run::from(
        Command::new(BIN)
            .args([
                "simulate",
                "--server",
                "http://127.0.0.1:1",
                "--scenario",
                "rank-outlier",
                "--workers",
                "1",
            ])
            .output()
            .expect("run gradguard simulate"),
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--workers 1"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

#[test]
fn an_unreachable_server_is_named() {
    let run = Run::from(
        Command::new(BIN)
            .args(["simulate", "--server", "http://127.0.0.1:1", "--scenario", "explode"])
            .output()
            .expect("run gradguard simulate"),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("http://127.0.0.1:1"), "{}", run.stderr);
}

/// A fault that gets anomalies but no advice (vanishing gradients: nothing a
/// worker could do at once) still shows them: the stored counts, and where to
/// list them.
#[test]
fn anomalies_without_advice_are_shown() {
    let server = Server::start();
    let run = server.simulate(&[
        "--scenario",
        "vanish",
        "--job",
        "sim-vanish-shown",
        "--workers",
        "2",
        "--steps",
        "700",
        "--step-interval",
        "1ms",
    ]);
    run.assert_code(0);
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("anomalies"))
        .unwrap_or_else(|| panic!("no anomalies line: {}", run.stdout));
    assert!(
        line.contains("warning") && line.contains("`gradguard anomalies --job sim-vanish-shown` lists them"),
        "{line}"
    );
    let stored: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
    let listed = Command::new(BIN)
        .args([
            "anomalies",
            "--server",
            &server.url,
            "--job",
            "sim-vanish-shown",
            "--json",
            "--limit",
            "100000",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count() as u64, stored);

    let run = server.simulate(&[
        "--scenario",
        "vanish",
        "--workers",
        "2",
        "--steps",
        "700",
        "--step-interval",
        "1ms",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert!(summary["anomalies"]["warning"].as_u64() > Some(0), "{summary}");
}
