//! `gradguard follow` end to end: a writer appends a diverging run to a log
//! line by line, with a rotation and a truncation midway; `follow` (the real
//! binary) streams it to a real `serve`, through a restart of its own and one
//! of the service; the job's anomalies and advice are then in the service.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, Server};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");
const JOB: &str = "live";

fn gradguard(args: &[&str]) -> Run {
    Command::new(BIN).args(args).output().expect("run gradguard").into()
}

/// A diverging run as JSON lines: healthy, then gradients exploding at
/// step 100 of 150.
fn diverging_run() -> Vec<String> {
    let run = gradguard(&[
        "generate",
        "--fault",
        "abrupt-explosion",
        "--layers",
        "0",
        "--steps",
        "150",
        "--fault-at",
        "100",
    ]);
    run.assert_code(0);
    run.stdout.lines().map(|l| format!("{l}\n")).collect()
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Appends lines one write at a time, as a training loop logs.
fn append_lines(path: &Path, lines: &[String]) {
    for line in lines {
        append(path, line);
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn start_follow(log: &Path, url: &str) -> Child {
    start_follow_with(log, url, &["--job", JOB])
}

fn start_follow_with(log: &Path, url: &str, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(["follow", "--server", url, "--poll", "20ms", "--json"])
        .args(args)
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradguard follow")
}

/// Stops `follow` with SIGTERM, its way to end, and returns what it printed.
fn stop_follow(child: Child) -> Run {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    child.wait_with_output().unwrap().into()
}

/// The highest step of [`JOB`] the service has, polled until it is `step`.
fn wait_for_step(url: &str, step: u64) {
    wait_for_job_step(url, JOB, step);
}

/// The highest step of `job` the service has, polled until it is `step`.
fn wait_for_job_step(url: &str, job: &str, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        let run = gradguard(&["jobs", "--server", url, "--json"]);
        if run.code == Some(0) {
            last = run
                .json()
                .iter()
                .find(|j| j["job"] == job)
                .and_then(|j| j["last_step"].as_u64());
            if last == Some(step) {
                return;
            }
            assert!(
                last.is_none_or(|l| l < step),
                "the service has step {last:?}, past {step}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the service did not get step {step} of {job} (it has {last:?})");
}

fn metric(server: &Server, series: &str) -> f64 {
    server.sample(series).unwrap_or_else(|| panic!("no {series}"))
}

/// Summaries the service accepted, and the duplicate or backward steps it
/// refused.
fn accepted_and_refused(server: &Server) -> (f64, f64) {
    let refused = metric(server, "gradguard_summaries_rejected_total{reason=\"duplicate_step\"}")
        + metric(server, "gradguard_summaries_rejected_total{reason=\"step_backwards\"}");
    (metric(server, "gradguard_summaries_total"), refused)
}

fn advice_lines(run: &Run) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn follow_streams_a_growing_rotated_truncated_log_once_through_restarts() {
    let lines = diverging_run();
    assert_eq!(lines.len(), 150);
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("train.jsonl");
    let addr = free_addr();
    let url = format!("http://{addr}");

    // follow starts first: the log does not exist yet, nor does the service.
    let follow = start_follow(&log, &url);
    append_lines(&log, &lines[..39]);
    // A half-written line is not read as a (broken) record.
    let (head, tail) = lines[39].split_at(lines[39].len() / 2);
    append(&log, head);
    let server = Server::start_at(addr, data.path());
    wait_for_step(&url, 38);
    append(&log, tail);
    wait_for_step(&url, 39);

    // Rotation (logrotate's create mode): renamed away, a new file.
    fs::rename(&log, dir.path().join("train.jsonl.1")).unwrap();
    append_lines(&log, &lines[40..80]);
    wait_for_step(&url, 79);

    // follow is killed outright; the run goes on; a new follow reads the log
    // from its start and sends only what the service lacks.
    let mut killed = follow;
    killed.kill().unwrap();
    let first: Run = killed.wait_with_output().unwrap().into();
    append_lines(&log, &lines[80..100]);
    let follow = start_follow(&log, &url);
    wait_for_step(&url, 99);

    // The service goes away (a graceful stop) and comes back on the same
    // address and data; follow waits for it meanwhile.
    let (accepted_before, refused_before) = accepted_and_refused(&server);
    server.stop();
    append_lines(&log, &lines[100..120]);
    let server = Server::start_at(addr, data.path());
    wait_for_step(&url, 119);

    // Truncation (copytruncate): copied away, emptied, written on.
    fs::copy(&log, dir.path().join("train.jsonl.2")).unwrap();
    File::create(&log).unwrap();
    append_lines(&log, &lines[120..]);
    wait_for_step(&url, 149);

    let (accepted_after, refused_after) = accepted_and_refused(&server);
    let second = stop_follow(follow);
    second.assert_code(0);

    // Every step reached the service exactly once.
    assert_eq!(accepted_before + accepted_after, 150.0, "{}", second.stderr);
    assert_eq!(refused_before + refused_after, 0.0);
    assert!(
        second.stderr.contains("already at the service"),
        "the restarted follow skipped what the service had: {}",
        second.stderr
    );
    let already: u64 = second
        .stderr
        .lines()
        .find_map(|l| l.split(" step(s) sent, ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("a summary line: {}", second.stderr));
    assert_eq!(
        already, 40,
        "steps 40-79 of the rotated log's successor were sent before the restart"
    );
    assert!(second.stderr.contains("waiting for the service"), "{}", second.stderr);
    assert!(second.stderr.contains("rotated or truncated"), "{}", second.stderr);

    // The job has the service's detection: stored critical anomalies and
    // advice, which follow printed as it came.
    let anomalies = gradguard(&["anomalies", "--server", &url, "--job", JOB, "--json"]).json();
    assert!(
        anomalies
            .iter()
            .any(|a| a["severity"] == "critical" && a["step"].as_u64() >= Some(100)),
        "{anomalies:?}"
    );
    let stored = gradguard(&["advice", "--server", &url, "--job", JOB, "--json"]).json();
    assert!(!stored.is_empty());
    let printed: Vec<Value> = advice_lines(&first).into_iter().chain(advice_lines(&second)).collect();
    assert!(!printed.is_empty(), "follow printed the advice it got");
    assert!(printed.iter().all(|a| a["kind"] == "advice" && a["job"] == JOB));
    assert!(printed.iter().any(|a| a["step"].as_u64() >= Some(100)), "{printed:?}");
    assert!(
        metric(&server, "gradguard_advice_acks_total{applied=\"false\"}") > 0.0,
        "follow acknowledges advice as not applied"
    );
}

#[test]
fn follow_refuses_a_log_it_cannot_read_and_a_bad_command_line() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let follow = |args: &[&str], log: &Path| -> Run {
        Command::new(BIN)
            .args(["follow", "--server", &server.url(), "--poll", "20ms"])
            .args(args)
            .arg(log)
            .output()
            .unwrap()
            .into()
    };
    // A live log may print a banner before its first step line, so the
    // format is looked for in its first 64 KiB: none there is an error.
    let junk = dir.path().join("junk.txt");
    fs::write(&junk, "hello world, this is no training log\n".repeat(2000)).unwrap();
    let run = follow(&[], &junk);
    run.assert_code(1);
    assert!(run.stderr.contains("cannot tell the format"), "{}", run.stderr);

    // The service refuses the job: a rule profile it does not have.
    let log = dir.path().join("run.jsonl");
    fs::write(&log, "{\"step\": 1, \"loss\": 2.0}\n").unwrap();
    let run = follow(&["--profile", "nosuch"], &log);
    run.assert_code(1);
    assert!(run.stderr.contains("nosuch"), "{}", run.stderr);

    let run = gradguard(&["follow", "--server", &server.url(), "--field", "nope=x", "x.log"]);
    run.assert_code(2);
    assert!(run.stderr.contains("nope"), "{}", run.stderr);
    let run = gradguard(&["follow", "--server", &server.url(), "--poll", "0s", "x.log"]);
    run.assert_code(2);
}

/// A Hugging Face `trainer_state.json` whose history holds steps 1..=`steps`.
fn trainer_state(steps: u64) -> String {
    let history: Vec<Value> = (1..=steps)
        .map(|s| serde_json::json!({"step": s, "epoch": s as f64 / 100.0, "loss": 2.0 - s as f64 / 100.0, "grad_norm": 1.0, "learning_rate": 1e-4}))
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({"global_step": steps, "log_history": history})).unwrap()
}

#[test]
fn follow_reads_a_trainer_output_directory_checkpoint_by_checkpoint() {
    let server = Server::start();
    let url = server.url();
    let out = tempfile::tempdir().unwrap();
    let run_dir = out.path().join("my-run");
    let checkpoint = |steps: u64| {
        let dir = run_dir.join(format!("checkpoint-{steps}"));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trainer_state.json");
        fs::write(&path, trainer_state(steps)).unwrap();
        // Newer than any before, whatever the file system's time resolution.
        let time = std::time::SystemTime::now() + Duration::from_secs(steps);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(time)
            .unwrap();
    };
    checkpoint(10);
    // The job is the directory's name.
    let follow = start_follow_with(&run_dir, &url, &[]);
    wait_for_job_step(&url, "my-run", 10);
    // Each checkpoint's state holds the whole history: only its new steps go.
    checkpoint(20);
    wait_for_job_step(&url, "my-run", 20);
    let (accepted, refused) = accepted_and_refused(&server);
    let run = stop_follow(follow);
    run.assert_code(0);
    assert_eq!((accepted, refused), (20.0, 0.0), "{}", run.stderr);
    assert!(
        run.stderr.contains("20 step(s) sent, 0 already at the service"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("checkpoint-20/trainer_state.json (hf)"),
        "{}",
        run.stderr
    );
}
