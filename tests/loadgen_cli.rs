//! `gradguard loadgen` against `gradguard sink`, both as the real binary: the
//! load really flows over gRPC, every stream ends cleanly, and bad flags or an
//! unreachable server fail with a message and a non-zero status. Batches go to
//! a real `gradguard serve`, which counts every summary in them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// A `gradguard sink` child, killed when dropped (a failed assertion included).
struct Sink {
    child: Child,
    addr: String,
}

impl Sink {
    fn start() -> Self {
        let mut child = Command::new(BIN)
            .args(["sink", "--grpc-addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening grpc=")
            .unwrap_or_else(|| panic!("sink printed {line:?}"))
            .to_owned();
        Self { child, addr }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadgen(args: &[&str]) -> Output {
    Command::new(BIN).arg("loadgen").args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The number after `label` on the first line that has it.
fn number_after(text: &str, label: &str) -> f64 {
    let at = text.find(label).unwrap_or_else(|| panic!("no {label:?} in {text}")) + label.len();
    text[at..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
}

#[test]
fn load_flows_to_the_sink_without_errors() {
    let sink = Sink::start();
    let server = format!("http://{}", sink.addr);
    let out = loadgen(&[
        "--streams",
        "4",
        "--layers",
        "10",
        "--duration",
        "1s",
        "--server",
        &server,
        "--metrics-url",
        "http://127.0.0.1:1/metrics",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(number_after(&text, "summaries/s:") > 0.0, "{text}");
    assert_eq!(number_after(&text, "errors:"), 0.0, "{text}");
    assert!(
        text.contains(&format!("target: {server}  streams: 4  layers: 10  world size: 4")),
        "{text}"
    );
    // Nothing listens there: reported, and no failure.
    assert!(text.contains("server resident memory: unknown ("), "{text}");
}

#[test]
fn paced_json_report() {
    let sink = Sink::start();
    let out = loadgen(&[
        "--streams",
        "2",
        "--layers",
        "4",
        "--duration",
        "1s",
        "--rate",
        "200",
        "--json",
        "--server",
        &sink.addr,
        "--metrics-url",
        "http://127.0.0.1:1/metrics",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["errors"], 0);
    assert_eq!(report["rate"], 200.0);
    assert_eq!(report["spikes"], "staggered");
    // Open loop at 200/s for 1 s: about 200, whatever the machine's speed.
    let sent = report["summaries"].as_u64().unwrap();
    assert!((150..=210).contains(&sent), "{report}");
    assert!(report["server_resident_memory_bytes"].is_null());
    assert!(report["server_resident_memory_unknown"].is_string());
}

#[test]
fn batches_reach_a_real_server_whole() {
    let server = common::Server::start_with(&["--no-store"]);
    let metrics = format!("http://{}/metrics", server.metrics);
    let out = loadgen(&[
        "--streams",
        "2",
        "--layers",
        "4",
        "--duration",
        "2s",
        "--rate",
        "400",
        "--batch",
        "8",
        "--spike-every",
        "50",
        "--json",
        "--server",
        &server.url(),
        "--metrics-url",
        &metrics,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["batch"], 8);
    let sent = report["summaries"].as_u64().unwrap();
    assert!(sent >= 600, "{report}");
    // Every summary of every batch, the last short one included, was judged.
    assert_eq!(server.sample("gradguard_summaries_total"), Some(sent as f64));
    // The spikes drew advice, timed from their steps.
    assert!(report["advice"].as_u64().unwrap() > 0, "{report}");
    assert!(report["latency_samples"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn baseline_compares_against_a_spawned_sink() {
    let sink = Sink::start();
    let out = loadgen(&[
        "--baseline",
        "--streams",
        "2",
        "--duration",
        "1s",
        "--server",
        &format!("http://{}", sink.addr),
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(number_after(&text, "sink: summaries/s:") > 0.0, "{text}");
    assert!(number_after(&text, "gradguard: summaries/s:") > 0.0, "{text}");
    // The sink we spawned is read from /proc.
    assert!(
        text.contains("sink: server resident memory: ") && text.contains(" MiB"),
        "{text}"
    );
    assert!(number_after(&text, "ratio:") > 0.0, "{text}");
}

#[test]
fn rounds_take_turns_and_end_with_the_median_ratio() {
    let (base, server) = (Sink::start(), Sink::start());
    let out = loadgen(&[
        "--compare",
        &format!("http://{}", base.addr),
        "--rounds",
        "3",
        "--streams",
        "2",
        "--duration",
        "300ms",
        "--server",
        &format!("http://{}", server.addr),
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    let mut ratios: Vec<f64> = lines[..3].iter().map(|v| v["ratio"].as_f64().unwrap()).collect();
    ratios.sort_by(f64::total_cmp);
    assert_eq!(lines[3]["rounds"], 3, "{text}");
    assert_eq!(lines[3]["median_ratio"].as_f64(), Some(ratios[1]), "{text}");

    for bad in [&["--rounds", "0", "--baseline"][..], &["--rounds", "2"]] {
        let out = loadgen(&[bad, &["--server", "http://127.0.0.1:1"]].concat());
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("--rounds"), "{}", stderr(&out));
    }
}

#[test]
fn compare_runs_the_same_load_against_another_server_first() {
    let (base, server) = (Sink::start(), Sink::start());
    let out = loadgen(&[
        "--compare",
        &format!("http://{}", base.addr),
        "--streams",
        "2",
        "--duration",
        "1s",
        "--server",
        &format!("http://{}", server.addr),
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(v["baseline"]["summaries_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["gradguard"]["summaries_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");

    let out = loadgen(&[
        "--compare",
        "http://127.0.0.1:1",
        "--baseline",
        "--server",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn bad_flags_and_unreachable_server_fail_with_a_message() {
    let out = loadgen(&["--server", "http://127.0.0.1:1", "--duration", "banana"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--duration"), "{}", stderr(&out));

    let out = loadgen(&["--server", "http://127.0.0.1:1", "--streams", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--streams"), "{}", stderr(&out));

    for baseline in [false, true] {
        let mut args = vec!["--server", "http://127.0.0.1:1", "--duration", "1s"];
        if baseline {
            // Refused before the sink's run, not after it.
            args.push("--baseline");
        }
        let out = loadgen(&args);
        assert!(!out.status.success());
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("cannot") && err.contains("127.0.0.1:1"), "{err}");
    }
}
