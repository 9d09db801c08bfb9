//! `gradguard rules`: the printed rules are a valid rules file that means the
//! same thing, and overrides show up.

use std::process::Command;

use gradguard::config::RuleBook;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

fn rules(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("rules")
        .args(args)
        .output()
        .expect("run gradguard")
}

#[test]
fn printed_defaults_round_trip() {
    let out = rules(&[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let book = RuleBook::parse_str(&text, "printed").expect("printed rules parse");
    assert_eq!(book.defaults(), RuleBook::builtin().defaults());
}

#[test]
fn job_override_is_applied_and_bad_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, "[jobs.big.grad_spike]\nz = 3.5\n").unwrap();
    let out = rules(&["--rules", path.to_str().unwrap(), "--job", "big"]);
    assert!(out.status.success());
    let book = RuleBook::parse_str(&String::from_utf8(out.stdout).unwrap(), "printed").unwrap();
    assert_eq!(book.defaults().grad_spike.z, 3.5);

    std::fs::write(&path, "[grad_spike]\nz = -1.0\n").unwrap();
    let out = rules(&["--rules", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("grad_spike.z") && err.contains("-1"), "{err}");
}

#[test]
fn a_kafka_section_is_still_accepted_with_a_note_to_move_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, "[grad_spike]\nz = 3.5\n[kafka]\nbrokers = \"b:9092\"\n").unwrap();
    let out = rules(&["--rules", path.to_str().unwrap()]);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("[kafka] section") && err.contains("move it to the settings file"),
        "{err}"
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("kafka"), "{printed}");
}
