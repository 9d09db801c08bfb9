//! The query commands (`jobs`, `job`, `anomalies`, `advice`, `watch`) against
//! the real server: each test starts `gradguard serve` on free ports, plays a
//! job into it with the real `gradguard simulate`, and reads what a user would
//! read from the real binary.

mod common;

use common::{Run, turn};

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// How long a watcher may take to see what it waits for.
const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `gradguard ARGS` with no `GRADGUARD_SERVER` from the environment.
fn gradguard(args: &[&str]) -> Run {
    Command::new(BIN)
        .args(args)
        .env_remove("GRADGUARD_SERVER")
        .output()
        .expect("run gradguard")
        .into()
}

/// Runs a query command against `url`.
fn query(url: &str, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--server", url]);
    gradguard(&all)
}

/// Plays an exploding job (fault at step `fault_at`) into the server.
fn explode(url: &str, job: &str, workers: &str, steps: &str, fault_at: &str) {
    gradguard(&[
        "simulate",
        "--server",
        url,
        "--scenario",
        "explode",
        "--workers",
        workers,
        "--steps",
        steps,
        "--fault-at",
        fault_at,
        "--job",
        job,
    ])
    .assert_code(0);
}

fn ids(rows: &[Value]) -> Vec<u64> {
    rows.iter().map(|r| r["id"].as_u64().expect("an id")).collect()
}

fn assert_newest_first(rows: &[Value]) {
    let ids = ids(rows);
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "ids not strictly decreasing: {ids:?}"
    );
}

#[test]
fn queries_read_an_exploding_job() {
    let _turn = turn();
    let server = common::Server::start();
    let url = server.url();
    explode(&url, "q-explode", "2", "450", "300");

    let job = jobs_list_the_job(&url);
    anomalies_are_filtered_and_newest_first(&url, &job);
    advice_starts_with_a_clip(&url);
    job_shows_details_and_recent_findings(&url);
    bad_queries_are_refused(&url);
}

/// `jobs`, as a table and as JSON; returns the job's JSON line.
fn jobs_list_the_job(url: &str) -> Value {
    let table = query(url, &["jobs"]);
    table.assert_code(0);
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header[..3], ["JOB", "HEALTH", "LIVE"], "{}", table.stdout);
    let row = lines
        .find(|l| l.starts_with("q-explode "))
        .unwrap_or_else(|| panic!("no q-explode row:\n{}", table.stdout));
    let health = row.split_whitespace().nth(1).unwrap();
    assert!(matches!(health, "critical" | "warning"), "{row}");
    assert!(row.ends_with('Z'), "last seen is a UTC time: {row}");

    let jobs = query(url, &["jobs", "--json"]).json();
    let job = jobs
        .into_iter()
        .find(|j| j["job"] == "q-explode")
        .expect("q-explode in jobs --json");
    assert_eq!(job["kind"], "job");
    assert!(matches!(job["health"].as_str(), Some("critical" | "warning")), "{job}");
    assert!(job["advice"].as_u64().unwrap() > 0, "{job}");
    assert_eq!((job["ranks"].as_u64(), job["world_size"].as_u64()), (Some(2), Some(2)));
    assert!(job["last_seen"].as_f64().unwrap() >= job["first_seen"].as_f64().unwrap());
    job
}

fn anomalies_are_filtered_and_newest_first(url: &str, job: &Value) {
    let all = query(url, &["anomalies", "--job", "q-explode", "--json", "--limit", "100000"]).json();
    assert!(!all.is_empty());
    assert!(all.iter().all(|a| a["job"] == "q-explode" && a["kind"] == "anomaly"));
    assert_newest_first(&all);
    let spikes: Vec<u64> = all
        .iter()
        .filter(|a| a["rule"] == "grad_spike")
        .map(|a| a["step"].as_u64().unwrap())
        .collect();
    assert!(!spikes.is_empty(), "no grad_spike anomalies");
    assert!(spikes.iter().all(|&s| s >= 300), "spikes before the fault: {spikes:?}");

    // The default limit, and following pages stops at --limit.
    let newest = query(url, &["anomalies", "--job", "q-explode", "--json"]).json();
    assert_eq!(newest.len(), all.len().min(50));
    assert_eq!(ids(&newest), ids(&all)[..newest.len()]);
    let three = query(url, &["anomalies", "--job", "q-explode", "--limit", "3"]);
    three.assert_code(0);
    let lines: Vec<&str> = three.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "a header and 3 rows:\n{}\n{}",
        three.stdout,
        three.stderr
    );
    assert!(lines[0].trim_start().starts_with("ID "), "{}", lines[0]);
    assert!(
        three.stderr.contains("--limit"),
        "says more are there: {}",
        three.stderr
    );

    let critical = query(url, &["anomalies", "--severity", "critical", "--json"]).json();
    assert!(critical.iter().all(|a| a["severity"] == "critical"), "{critical:?}");
    assert_eq!(critical.is_empty(), job["anomalies_critical"] == 0, "{job}");
    let rank1 = query(url, &["anomalies", "--worker", "1", "--rule", "grad_spike", "--json"]).json();
    assert!(rank1.iter().all(|a| a["rank"] == 1 && a["rule"] == "grad_spike"));
}

fn advice_starts_with_a_clip(url: &str) {
    let advice = query(url, &["advice", "--job", "q-explode", "--json"]).json();
    assert!(!advice.is_empty());
    assert!(advice.iter().all(|a| a["job"] == "q-explode" && a["kind"] == "advice"));
    assert_newest_first(&advice);
    let first = advice.last().unwrap();
    assert_eq!(first["action"], "clip_gradients", "{first}");
    assert!(first["max_norm"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["decided_at_step"].as_u64().unwrap() >= 300, "{first}");
    assert_eq!(first["rules"][0], "grad_spike", "{first}");

    let table = query(url, &["advice", "--job", "q-explode"]);
    table.assert_code(0);
    assert!(table.stdout.contains("clip_gradients max_norm="), "{}", table.stdout);
}

fn job_shows_details_and_recent_findings(url: &str) {
    let details = query(url, &["job", "q-explode"]);
    details.assert_code(0);
    let out = &details.stdout;
    assert!(out.starts_with("job:"), "{out}");
    for field in [
        "health:",
        "live:",
        "ranks:",
        "last step:",
        "last seen:",
        "anomalies:",
        "advice:",
    ] {
        assert!(out.lines().any(|l| l.starts_with(field)), "no {field}:\n{out}");
    }
    assert!(out.contains("Latest anomalies"), "{out}");
    assert!(out.contains("Latest advice"), "{out}");
    assert!(out.contains("clip_gradients"), "{out}");

    let lines = query(url, &["job", "q-explode", "--json"]).json();
    assert_eq!(lines[0]["kind"], "job");
    let count = |kind: &str| lines.iter().filter(|l| l["kind"] == kind).count();
    assert!((1..=10).contains(&count("anomaly")), "{lines:?}");
    assert!((1..=10).contains(&count("advice")), "{lines:?}");

    let unknown = query(url, &["job", "nope"]);
    unknown.assert_code(1);
    assert!(
        unknown.stderr.contains(&format!("no job \"nope\" is known to {url}")),
        "{}",
        unknown.stderr
    );
}

fn bad_queries_are_refused(url: &str) {
    let rule = query(url, &["anomalies", "--rule", "bogus"]);
    rule.assert_code(2);
    assert!(
        rule.stderr.contains("--rule") && rule.stderr.contains("bogus"),
        "{}",
        rule.stderr
    );

    // Refused by the server (INVALID_ARGUMENT): exit 2 with its message.
    let range = query(url, &["anomalies", "--from-step", "10", "--to-step", "5"]);
    range.assert_code(2);
    assert!(range.stderr.contains("step_from"), "{}", range.stderr);
    assert!(range.stderr.contains(url), "{}", range.stderr);
}

#[test]
fn flags_and_unreachable_servers() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}"); // nothing listens there now

    let down = query(&url, &["jobs"]);
    down.assert_code(1);
    assert!(down.stderr.contains(&url), "{}", down.stderr);

    // GRADGUARD_SERVER stands in for --server.
    let from_env: Run = Command::new(BIN)
        .args(["anomalies", "--json"])
        .env("GRADGUARD_SERVER", &url)
        .output()
        .expect("run gradguard")
        .into();
    from_env.assert_code(1);
    assert!(from_env.stderr.contains(&url), "{}", from_env.stderr);

    let bad_url = query("http://a b", &["jobs"]);
    bad_url.assert_code(2);
    assert!(bad_url.stderr.contains("--server"), "{}", bad_url.stderr);

    for (flag, value) in [("--severity", "loud"), ("--limit", "0"), ("--worker", "first")] {
        let run = query(&url, &["anomalies", flag, value]);
        run.assert_code(2);
        assert!(
            run.stderr.contains(flag) && run.stderr.contains(value),
            "{flag} {value}: {}",
            run.stderr
        );
    }
}

/// A `gradguard watch` child whose stdout and stderr lines arrive on channels;
/// killed when dropped.
struct Watch {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Watch {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("watch")
            .args(args)
            .env_remove("GRADGUARD_SERVER")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gradguard watch");
        Self {
            stdout: lines(child.stdout.take().expect("piped stdout")),
            stderr: lines(child.stderr.take().expect("piped stderr")),
            child,
        }
    }

    /// The next stdout line, failing after [`WATCH_TIMEOUT`].
    fn next_line(&self) -> String {
        self.stdout
            .recv_timeout(WATCH_TIMEOUT)
            .unwrap_or_else(|e| panic!("no anomaly from watch: {e}"))
    }

    /// Waits until stderr has a line starting with `prefix`.
    fn wait_stderr(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WATCH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(e) => panic!("watch never said {prefix:?}: {e}"),
            }
        }
    }

    /// Waits for the child to exit on its own.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WATCH_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll watch") {
                return status;
            }
            assert!(Instant::now() < deadline, "watch did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards each line of a pipe to a channel until the pipe closes.
fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn watch_prints_anomalies_as_they_are_stored() {
    let _turn = turn();
    let server = common::Server::start();
    let url = server.url();
    let mut watch = Watch::start(&["--job", "wq", "--json", "--server", &url]);
    assert_eq!(
        watch.wait_stderr("watching anomalies on "),
        format!("watching anomalies on {url}")
    );

    // Another job's anomalies are not shown; the watched job's are.
    explode(&url, "wq-other", "1", "150", "100");
    explode(&url, "wq", "2", "200", "100");
    let first: Value = serde_json::from_str(&watch.next_line()).expect("a JSON line");
    assert_eq!(
        (first["kind"].as_str(), first["job"].as_str()),
        (Some("anomaly"), Some("wq"))
    );
    assert!(first["id"].as_u64().unwrap() > 0, "{first}");

    // The server going away ends the watch with status 1 naming the server.
    server.kill();
    let status = watch.wait();
    assert_eq!(status.code(), Some(1));
    for line in watch.stdout.iter() {
        let a: Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(a["job"], "wq", "{a}");
    }
    let message = watch.stderr.recv_timeout(WATCH_TIMEOUT).expect("a message on stderr");
    assert!(message.contains(&url), "{message}");
}

#[test]
fn jobs_follows_every_page_or_stops_at_the_limit() {
    use gradguard::store::{Batch, JobRow, Store};
    let dir = tempfile::tempdir().unwrap();
    // More jobs than two of the largest pages; one with a long name holding a
    // newline and a terminal escape.
    let long = format!("z-\n\u{1b}[2J{}", "x".repeat(250));
    let mut names: Vec<String> = (0..2_500).map(|i| format!("job-{i:04}")).collect();
    names.push(long.clone());
    let mut store = Store::open(dir.path()).unwrap();
    let row = |job: &String| JobRow {
        job: job.clone(),
        first_seen: 1_790_000_000.0,
        last_seen: 1_790_000_000.0,
        ranks: 1,
        world_size: Some(1),
        layers: 2,
        last_step: Some(1),
        health: None,
    };
    store
        .write(&Batch {
            jobs: names.iter().map(row).collect(),
            ..Batch::default()
        })
        .unwrap();
    drop(store);
    let server = common::Server::start_in(dir.path(), &[]);
    let url = server.url();

    let all = query(&url, &["jobs", "--json"]).json();
    let listed: Vec<&str> = all.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(listed, names, "every job once, by id");

    let first = query(&url, &["jobs", "--json", "--limit", "1500"]).json();
    assert_eq!(first.len(), 1500);
    assert_eq!(first[1499]["job"], "job-1499");

    let table = query(&url, &["jobs", "--limit", "3"]);
    table.assert_code(0);
    assert_eq!(table.stdout.lines().count(), 4, "{}", table.stdout);
    assert!(
        table.stderr.contains("the first 3 shown; --limit for more"),
        "{}",
        table.stderr
    );

    // The whole table: one line per job, the long name escaped.
    let table = query(&url, &["jobs"]);
    table.assert_code(0);
    assert_eq!(table.stdout.lines().count(), 1 + names.len());
    assert!(!table.stdout.contains('\u{1b}'));
    let last = table.stdout.lines().last().unwrap();
    assert!(last.starts_with("z-\\n\\u{1b}[2Jxxx"), "{last}");
}

/// A wrong server address says what is wrong with it, in every client command.
#[test]
fn a_wrong_server_address_says_what_is_wrong() {
    let server = common::Server::start();
    let metrics = format!("http://{}", server.metrics);
    for command in [
        vec!["jobs"],
        vec!["anomalies"],
        vec!["simulate", "--scenario", "healthy", "--steps", "5"],
        vec!["follow", "no-such.log"],
    ] {
        // The metrics port is HTTP, not gRPC.
        if command[0] != "follow" {
            let run = query(&metrics, &command);
            run.assert_code(1);
            assert!(
                run.stderr
                    .contains("not a gRPC server: it answered HTTP 404 (its metrics port?"),
                "{command:?}: {}",
                run.stderr
            );
        }
        for (url, says) in [
            (
                "localhost",
                "no port (gradguard's gRPC port is 50051 by default: http://localhost:50051)",
            ),
            (
                "ftp://localhost:50051",
                "ftp:// is not supported (use http:// or https://)",
            ),
            ("http://localhost:http", "port \"http\" is not a port number"),
        ] {
            let run = query(url, &command);
            run.assert_code(2);
            assert!(run.stderr.contains(says), "{command:?} --server {url}: {}", run.stderr);
        }
    }
    // simulate reads the same variable and default as the query commands.
    let run: Run = Command::new(BIN)
        .args(["simulate", "--scenario", "healthy", "--steps", "5", "--workers", "1"])
        .env("GRADGUARD_SERVER", &metrics)
        .output()
        .unwrap()
        .into();
    run.assert_code(1);
    assert!(run.stderr.contains(&server.metrics.to_string()), "{}", run.stderr);
    let run = gradguard(&["simulate", "--help"]);
    assert!(run.stdout.contains("http://localhost:50051"), "{}", run.stdout);
}

#[test]
fn since_and_until_filter_by_time() {
    let _turn = turn();
    let server = common::Server::start();
    let url = server.url();
    explode(&url, "timed", "1", "400", "200");
    let count = |extra: &[&str]| -> usize {
        let mut args = vec!["anomalies", "--job", "timed", "--json", "--limit", "100000"];
        args.extend(extra);
        query(&url, &args).json().len()
    };
    let all = count(&[]);
    assert!(all > 0);
    assert_eq!(count(&["--since", "1h"]), all);
    assert_eq!(count(&["--until", "2000-01-01T00:00:00Z"]), 0);
    // Split at a time between two of them (to the second, as RFC 3339 is given).
    let rows = query(&url, &["anomalies", "--job", "timed", "--json", "--limit", "100000"]).json();
    let mut times: Vec<f64> = rows.iter().map(|r| r["time"].as_f64().unwrap()).collect();
    times.sort_by(f64::total_cmp);
    let cut = std::time::UNIX_EPOCH + Duration::from_secs(times[0] as u64 + 1);
    let cut_text = humantime::format_rfc3339_seconds(cut).to_string();
    let before = times.iter().filter(|&&t| t <= times[0].floor() + 1.0).count();
    assert_eq!(count(&["--until", &cut_text]), before, "--until {cut_text}");
    assert_eq!(
        count(&["--since", &cut_text]),
        all - times.iter().filter(|&&t| t < times[0].floor() + 1.0).count()
    );
    assert_eq!(count(&["--since", "2100-01-01 00:00:00"]), 0);
    let advice = query(&url, &["advice", "--job", "timed", "--json", "--since", "1h"]).json();
    assert!(!advice.is_empty());
    assert!(
        query(
            &url,
            &["advice", "--job", "timed", "--json", "--until", "1999-12-31T23:59:59Z"]
        )
        .json()
        .is_empty()
    );

    let run = query(&url, &["anomalies", "--since", "yesterday"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("--since") && run.stderr.contains("yesterday"),
        "{}",
        run.stderr
    );
}
