//! `gradguard generate | gradguard replay`: the README's first command, as a user
//! runs it, through real files and the real binary.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

fn generate_and_replay(args: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let out = Command::new(BIN).arg("generate").args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&path, &out.stdout).unwrap();
    let out = Command::new(BIN)
        .args(["replay", "--strict", "--json", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn actions(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["kind"] == "advice")
        .map(|l| l["action"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn exploding_run_is_clipped_then_escalated_once() {
    let lines = generate_and_replay(&["--fault", "abrupt-explosion", "--workers", "4"]);
    let acts = actions(&lines);
    assert_eq!(acts.first().map(String::as_str), Some("clip_gradients"), "{acts:?}");
    let count = |rung: &str| acts.iter().filter(|a| *a == rung).count();
    assert_eq!(count("rollback"), 1, "rollback once in {acts:?}");
    assert!(count("scale_lr") <= 1, "scale_lr at most once in {acts:?}");
    // A replayed log applies nothing: halting waits for a remedy that was
    // applied and failed.
    assert!(!acts.iter().any(|a| a == "halt"), "{acts:?}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["records"], 600 * 4);
    assert_eq!(summary["skipped"], 0);
}

#[test]
fn healthy_run_is_quiet_and_nan_is_skipped() {
    let lines = generate_and_replay(&["--fault", "healthy", "--workers", "2"]);
    let loud = lines
        .iter()
        .filter(|l| l["kind"] == "anomaly" && l["severity"] != "info")
        .count();
    assert_eq!(loud, 0);

    let lines = generate_and_replay(&["--fault", "nan-loss"]);
    let nan = lines.iter().find(|l| l["rule"] == "nonfinite").expect("nonfinite seen");
    assert_eq!(nan["severity"], "critical");
    assert!(actions(&lines).contains(&"skip_step".to_owned()));
}

#[test]
fn bad_arguments_name_the_flag() {
    let out = Command::new(BIN)
        .args(["generate", "--fault", "rank-outlier", "--workers", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers 2"));
    let out = Command::new(BIN)
        .args(["generate", "--fault", "meteor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("meteor"));
}
