//! How `gradguard serve` and `simulate` are configured: the rules file is
//! `--rules` on every command (`--config`, its old name, still works with a
//! note on stderr).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// Runs `gradguard serve` with these flags (and environment variables) until it
/// prints its `listening` line, then kills it. Returns the line and stderr.
fn serve_up(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("GRADGUARD_CONFIG")
        .env_remove("GRADGUARD_SETTINGS")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradguard serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(line.starts_with("listening "), "serve did not come up:\n{stderr}");
    (line, stderr)
}

/// Runs `gradguard ARGS` to completion (it must fail) and returns its exit
/// code and stderr.
fn fails(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("GRADGUARD_CONFIG")
        .env_remove("GRADGUARD_SETTINGS")
        .envs(env.iter().copied())
        .output()
        .expect("run gradguard");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

const LOCAL: [&str; 5] = [
    "--no-store",
    "--grpc-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
];

#[test]
fn serve_reads_the_rules_file_from_rules_and_still_from_config_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.toml", "[grad_spike]\nz = 3.0\n");
    let bad = write(dir.path(), "bad.toml", "[grad_spike]\nz = -1.0\n");

    let (_, err) = serve_up(&[&LOCAL[..], &["--rules", &good]].concat(), &[]);
    assert!(!err.contains("deprecated"), "{err}");
    let (_, err) = serve_up(&LOCAL, &[("GRADGUARD_CONFIG", &good)]);
    assert!(!err.contains("deprecated"), "{err}");

    // The old name works, and says so.
    let (_, err) = serve_up(&[&LOCAL[..], &["--config", &good]].concat(), &[]);
    assert!(
        err.contains("--config is deprecated") && err.contains(&format!("use --rules {good}")),
        "{err}"
    );
    let (code, err) = fails(&["serve", "--config", &bad], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");

    // A --config flag beats the environment variable of --rules, as any flag does;
    // two flags for one file are a usage error.
    let (code, err) = fails(&["serve", "--config", &bad], &[("GRADGUARD_CONFIG", &good)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");
    let (code, err) = fails(&["serve", "--rules", &good, "--config", &good], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give only --rules"), "{err}");
}

#[test]
fn simulate_takes_rules_and_still_config_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", "[grad_spike]\nz = -1.0\n");
    // The rules file is read before any broker is contacted.
    let kafka = ["simulate", "--scenario", "healthy", "--kafka-brokers", "127.0.0.1:9"];

    let (code, err) = fails(&[&kafka[..], &["--rules", &bad]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("--rules {bad}")) && err.contains("grad_spike.z = -1"),
        "{err}"
    );
    assert!(!err.contains("deprecated"), "{err}");

    let (code, err) = fails(&[&kafka[..], &["--config", &bad]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");
    assert!(err.contains("--config is deprecated"), "{err}");
}
