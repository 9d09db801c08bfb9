//! `gradguard replay` on TensorBoard event files and CSV tables written by the
//! real producing libraries: torch's `SummaryWriter` (classic and
//! `new_style`), the tensorboard package's own `Writer`, Lightning's
//! `CSVLogger`. One Python run (`tests/data/formats/make_fixtures.py`) writes
//! them all; the real binary replays them with `--json --records`, and the
//! records it read are compared with what was written. Then broken copies:
//! cut short, a flipped byte, junk, missing columns, empty files.
//!
//! It needs the Python of `clients/python/.venv` with torch, lightning and
//! tensorboard (`.ci/run` installs them), or `GRADGUARD_PYTHON`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GRADGUARD_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/.venv/bin/python");
    assert!(
        venv.exists(),
        "these tests need {} with torch, lightning and tensorboard: python3 -m venv clients/python/.venv && \
         clients/python/.venv/bin/pip install torch tensorboard -e 'clients/python[lightning]' \
         (.ci/run does), or set GRADGUARD_PYTHON",
        venv.display()
    );
    venv
}

/// The fixtures' directory, written once for all the tests of this file.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/formats/make_fixtures.py");
        let out = Command::new(python())
            .arg(&script)
            .arg(dir.path())
            .output()
            .expect("run the fixtures' Python");
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn expected(name: &str) -> Vec<(u64, f64, f64, f64)> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all[name]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), num(&r[1]), num(&r[2]), num(&r[3])))
        .collect()
}

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "NaN" => f64::NAN,
        Value::String(s) if s == "Infinity" => f64::INFINITY,
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// The only event file of a fixture directory.
fn event_file(run: &str) -> PathBuf {
    let dir = fixtures().join("tb").join(run);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

fn metrics_csv() -> PathBuf {
    fixtures().join("lightning/lit/version_0/metrics.csv")
}

fn replay(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("replay")
        .args(args)
        .output()
        .expect("run gradguard")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn of_kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["kind"] == kind).collect()
}

fn summary(lines: &[Value]) -> &Value {
    let last = lines.last().expect("some output");
    assert_eq!(last["kind"], "summary");
    last
}

/// Replays `path` with `--records`; the run must succeed.
fn replay_records(path: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--json", "--records"];
    args.extend(extra);
    args.push(path.to_str().unwrap());
    let out = replay(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&out)
}

fn same(got: f64, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || got == want
}

/// The records read are the steps and values written; `f32`: TensorBoard
/// stores scalars as 32-bit floats.
fn assert_records_match(lines: &[Value], want: &[(u64, f64, f64, f64)], f32_values: bool) {
    let records = of_kind(lines, "record");
    assert_eq!(records.len(), want.len());
    for (r, &(step, loss, norm, lr)) in records.iter().zip(want) {
        let round = |x: f64| if f32_values { f64::from(x as f32) } else { x };
        assert_eq!(r["step"].as_u64(), Some(step), "{r}");
        for (key, want) in [("loss", loss), ("grad_norm", norm), ("lr", lr)] {
            let got = round(num(&r[key]));
            assert!(same(got, want), "step {step} {key}: read {got}, written {want}");
        }
        assert!(
            r["time"].is_null() != f32_values,
            "TensorBoard gives a time, the CSV none: {r}"
        );
    }
}

/// A NaN loss at step 30 is critical; the norm spike at step 40 is seen.
fn assert_findings(lines: &[Value]) {
    let anomalies = of_kind(lines, "anomaly");
    assert!(
        anomalies
            .iter()
            .any(|a| a["rule"] == "nonfinite" && a["step"] == 30 && a["severity"] == "critical"),
        "{anomalies:?}"
    );
    assert!(
        anomalies.iter().any(|a| a["rule"] == "grad_spike" && a["step"] == 40),
        "{anomalies:?}"
    );
}

#[test]
fn event_files_of_torch_and_tensorboard_writers_replay_as_written() {
    for run in ["torch", "newstyle", "tbwriter"] {
        let path = event_file(run);
        let lines = replay_records(&path, &[]);
        assert_records_match(&lines, &expected(run), true);
        assert_findings(&lines);
        let s = summary(&lines);
        assert_eq!(
            (s["records"].as_u64(), s["skipped"].as_u64()),
            (Some(50), Some(0)),
            "{run}"
        );
        assert_eq!(s["jobs"][run]["records"], 50, "the job is the run directory");
    }
    // The tags of no field are named once, the histogram and text passed over.
    let out = replay(&["--json", event_file("torch").to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(
        err.matches("ignored tags that are no gradguard field: train/epoch")
            .count(),
        1,
        "{err}"
    );
    assert!(!err.contains("weights") && !err.contains("note"), "{err}");
}

#[test]
fn a_log_directory_replays_one_job_per_run() {
    let out = replay(&["--json", fixtures().join("tb").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["files"].as_u64(), s["records"].as_u64()), (Some(3), Some(150)));
    for run in ["torch", "newstyle", "tbwriter"] {
        assert_eq!(s["jobs"][run]["records"], 50, "{s}");
    }
    // The runs' own directory given: its name is the job.
    let out = replay(&["--json", fixtures().join("tb/torch").to_str().unwrap()]);
    assert_eq!(summary(&json_lines(&out))["jobs"]["torch"]["records"], 50);

    let empty = fixtures().join("no-events");
    std::fs::create_dir_all(&empty).unwrap();
    let out = replay(&[empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is a directory without TensorBoard event files"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn lightning_csv_logger_metrics_replay_as_written() {
    let lines = replay_records(&metrics_csv(), &[]);
    assert_records_match(&lines, &expected("lightning"), false);
    assert_findings(&lines);
    let records = of_kind(&lines, "record");
    assert_eq!(records[0]["line"], 2, "the first row after the header");
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(50), Some(0)));
    assert_eq!(s["jobs"]["metrics"]["records"], 50);
    let out = replay(&["--json", metrics_csv().to_str().unwrap()]);
    let err = stderr(&out);
    assert!(
        err.contains("ignored columns that are no gradguard field: epoch, val_loss"),
        "{err}"
    );
}

/// Each record of an event file: its byte offset and length.
fn records_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at + 12 <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        out.push((at, len));
        at += 12 + len + 4;
    }
    out
}

#[test]
fn a_cut_event_file_reports_where_and_keeps_what_came_before() {
    let bytes = std::fs::read(event_file("torch")).unwrap();
    let records = records_of(&bytes);
    let dir = tempfile::tempdir().unwrap();

    // Cut inside the data of a record of step 20's loss: steps 1..19 read.
    let (n, &(at, len)) = records
        .iter()
        .enumerate()
        .find(|(i, _)| {
            *i > 0 && {
                let out = replay_one(&bytes[..records[*i].0], dir.path());
                of_kind(&json_lines(&out), "record").len() == 19
            }
        })
        .expect("a record that starts step 20");
    let cut = dir.path().join("events.out.tfevents.cut");
    std::fs::write(&cut, &bytes[..at + 12 + len / 2]).unwrap();
    let out = replay(&["--json", "--records", cut.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "what was read is replayed: {}",
        stderr(&out)
    );
    let lines = json_lines(&out);
    assert_eq!(of_kind(&lines, "record").len(), 19);
    assert_eq!(summary(&lines)["skipped"], 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "events.out.tfevents.cut:{}: record {} at byte {at} is cut short: the file ends inside it",
            n + 1,
            n + 1
        )),
        "{err}"
    );
    let strict = replay(&["--strict", cut.to_str().unwrap()]);
    assert_eq!(strict.status.code(), Some(1));

    // Cut inside the first record: nothing read, an error naming the format.
    std::fs::write(&cut, &bytes[..20]).unwrap();
    let out = replay(&["--json", cut.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(
            "is not a valid tensorboard trace: no record could be read (record 1: record 1 at byte 0 is cut short"
        ),
        "{err}"
    );
}

/// Replays `bytes` as an event file.
fn replay_one(bytes: &[u8], dir: &Path) -> Output {
    let path = dir.join("events.out.tfevents.probe");
    std::fs::write(&path, bytes).unwrap();
    replay(&["--json", "--records", path.to_str().unwrap()])
}

#[test]
fn a_flipped_byte_skips_that_record_with_its_checksum() {
    let mut bytes = std::fs::read(event_file("torch")).unwrap();
    let records = records_of(&bytes);
    let (n, (at, len)) = (10, records[10]);
    bytes[at + 12 + len / 2] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let out = replay_one(&bytes, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "events.out.tfevents.probe:{}: record {} at byte {at}: the data's checksum does not match; record skipped",
            n + 1,
            n + 1
        )),
        "{err}"
    );
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!(s["skipped"], 1);
    // Every step is still read: the other tags of the step hit carry it.
    assert_eq!(of_kind(&lines, "record").len(), 50);
}

#[test]
fn junk_empty_files_and_missing_columns_fail_naming_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    let mut noise = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..4096 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    std::fs::write(&junk, &noise).unwrap();
    let junk = junk.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--format", "tensorboard", junk],
            "is not a valid tensorboard trace: no record could be read (record 1: record 1 at byte 0: the length's checksum does not match",
        ),
        (vec!["--format", "csv", junk], "is not a valid csv trace: "),
        (vec![junk], "cannot tell the format of"),
    ] {
        let out = replay(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("No anomalies"),
            "never silent"
        );
    }

    let no_step = dir.path().join("no_step.csv");
    std::fs::write(&no_step, "epoch,train_loss\n0,2.5\n").unwrap();
    let no_value = dir.path().join("no_value.csv");
    std::fs::write(&no_value, "step,epoch,val_acc\n1,0,0.5\n").unwrap();
    let empty_csv = dir.path().join("empty.csv");
    std::fs::write(&empty_csv, "").unwrap();
    let empty_events = dir.path().join("events.out.tfevents.0");
    std::fs::write(&empty_events, "").unwrap();
    for (path, want) in [
        (
            &no_step,
            "is not a valid csv trace: no step column in the header (columns: epoch, train_loss)",
        ),
        (
            &no_value,
            "is not a valid csv trace: no column of a field in the header (columns: step, epoch, val_acc); it needs one for loss, grad_norm, lr, loss_scale",
        ),
        (
            &empty_csv,
            "is not a valid csv trace: the file is empty: no header line",
        ),
        (
            &empty_events,
            "is not a valid tensorboard trace: no record could be read (no event holds a scalar of a field)",
        ),
    ] {
        let out = replay(&[path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        assert!(stderr(&out).contains(want), "{}: {}", path.display(), stderr(&out));
    }
}

/// `follow` on a TensorBoard log directory whose event file is written a few
/// bytes at a time, as a writer's buffered flushes land: every step reaches
/// the service once, each when the next step's first event is written, and
/// the last when the file has gone quiet.
#[test]
fn follow_streams_an_event_file_written_in_pieces() {
    let server = common::Server::start();
    let url = server.url();
    let bytes = std::fs::read(event_file("torch")).unwrap();
    let logdir = tempfile::tempdir().unwrap();
    let run = logdir.path().join("tb-live");
    std::fs::create_dir(&run).unwrap();
    let path = run.join("events.out.tfevents.1700000000.host.1.0");
    let mut file = std::fs::File::create(&path).unwrap();
    let mut follow = Command::new(BIN)
        .args(["follow", "--server", &url, "--poll", "10ms"])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for piece in bytes.chunks(37) {
        file.write_all(piece).unwrap();
        file.flush().unwrap();
    }
    // Step 50, the last, is sent once the file is quiet (8 polls).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(BIN)
            .args(["jobs", "--json", "--server", &url])
            .output()
            .unwrap();
        let jobs = String::from_utf8(out.stdout).unwrap();
        if jobs.contains(r#""job":"tb-live""#) && jobs.contains(r#""last_step":50"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follow did not stream the event file: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.sample("gradguard_summaries_total"), Some(50.0));
    assert_eq!(
        server.sample("gradguard_summaries_rejected_total{reason=\"undecodable\"}"),
        Some(0.0)
    );
    let _ = follow.kill();
    let out = follow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(tensorboard)") && !err.contains("checksum"), "{err}");
}
