//! `gradguard replay` end to end: the real binary on files in a temp directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");
const LLMC_LOG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/traces/gpt2-124m-llmc.log");
/// llm.c's standard output of a healthy GPT-2 124M run, 19,560 steps.
const LLMC_STDOUT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/traces/llmc/gpt2-124m-stdout.log"
);
/// llm.c's standard output of a broken run: loss and norm are `nan` from step 1.
const LLMC_STDOUT_NAN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/traces/llmc/gpt2-124m-stdout-nan.log"
);

fn replay(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("replay")
        .args(args)
        .output()
        .expect("run gradguard")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Every stdout line as JSON; panics on a line that is not.
fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["kind"] == kind).collect()
}

fn summary(lines: &[Value]) -> &Value {
    let last = lines.last().expect("some output");
    assert_eq!(last["kind"], "summary");
    last
}

#[test]
fn bare_nan_gives_a_nonfinite_anomaly_and_skip_step_advice() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for step in 1..=10 {
        text.push_str(&format!(
            "{{\"job\": \"gpt\", \"step\": {step}, \"loss\": 2.5, \"grad_norm\": 1.0}}\n"
        ));
    }
    text.push_str("{\"job\": \"gpt\", \"step\": 11, \"loss\": NaN, \"grad_norm\": Infinity}\n");
    let path = write(dir.path(), "run.jsonl", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);

    let anomalies = kind(&lines, "anomaly");
    let nonfinite = anomalies
        .iter()
        .find(|a| a["rule"] == "nonfinite")
        .expect("nonfinite anomaly");
    assert_eq!(nonfinite["job"], "gpt");
    assert_eq!(nonfinite["step"], 11);
    assert_eq!(nonfinite["worker"], 0);
    assert_eq!(nonfinite["severity"], "critical");
    assert!(nonfinite["time"].is_null() && nonfinite["layer"].is_null());
    for key in ["value", "threshold", "message"] {
        assert!(!nonfinite[key].is_null(), "{key}");
    }

    let advice = kind(&lines, "advice");
    let skip = advice
        .iter()
        .find(|a| a["action"] == "skip_step")
        .expect("skip_step advice");
    assert_eq!(skip["rule"], "nonfinite");
    assert_eq!(skip["rules"], serde_json::json!(["nonfinite"]));
    assert_eq!(skip["step"], 11);
    assert!(skip["worker"].is_null(), "job-wide advice has a null worker");
    assert!(skip["id"].is_u64() && skip["apply_from"].is_u64() && skip["evidence"].is_object());
    for param in ["max_norm", "factor", "to_step", "rank"] {
        assert!(skip.get(param).is_none(), "skip_step has no {param}");
    }

    let s = summary(&lines);
    assert_eq!(
        (s["files"].as_u64(), s["records"].as_u64(), s["skipped"].as_u64()),
        (Some(1), Some(11), Some(0))
    );
    assert_eq!(s["anomalies"]["critical"], 1);
    assert_eq!(s["advice"]["skip_step"], 1);
    assert_eq!(s["jobs"]["gpt"]["records"], 11);
}

#[test]
fn malformed_lines_are_reported_counted_and_fail_strict() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "# a comment\n{\"step\": 1, \"loss\": 2.0}\n{\"step\": -3}\n\n{\"step\": 2, \"los\": 1}\n{\"step\": 2}\n";
    let path = write(dir.path(), "bad.jsonl", text);
    let name = path.to_str().unwrap();

    let out = replay(&["--json", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{name}:3: field \"step\": expected an unsigned integer, got -3"
        )),
        "{err}"
    );
    // A key that is no gradguard field (here a misspelt one) is named once
    // for the file; its line is still a record.
    assert!(
        err.contains(&format!("{name}: ignored keys that are no gradguard field: los")),
        "{err}"
    );
    let s = summary(&json_lines(&out)).clone();
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(2), Some(2)));

    let strict = replay(&["--json", "--strict", name]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(stderr(&strict).contains("--strict"), "{}", stderr(&strict));
    assert_eq!(
        summary(&json_lines(&strict))["skipped"],
        2,
        "the summary is still printed"
    );
}

#[test]
fn engine_refusals_are_skipped_lines() {
    let dir = tempfile::tempdir().unwrap();
    let layers = |n: usize| {
        let l: Vec<String> = (0..n).map(|i| format!("{{\"name\": \"l{i}\", \"l2\": 0.5}}")).collect();
        l.join(",")
    };
    let text = format!(
        "{{\"step\": 1, \"worker\": 0, \"layers\": [{a}]}}\n{{\"step\": 1, \"worker\": 1, \"layers\": [{a}]}}\n\
         {{\"step\": 1, \"worker\": 0}}\n{{\"step\": 2, \"worker\": 1, \"layers\": [{b}]}}\n",
        a = layers(2),
        b = layers(3)
    );
    let path = write(dir.path(), "ranks.jsonl", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(":3: refused by the engine: step 1 of rank 0 was already accepted"),
        "{err}"
    );
    assert!(err.contains(":4: refused by the engine: "), "{err}");
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(2), Some(2)));
    assert_eq!(s["jobs"]["ranks"]["skipped"], 2);
}

#[test]
fn hf_trainer_state_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries: Vec<String> = (1..=40)
        .map(|i| {
            format!(
                "{{\"epoch\": {e}, \"grad_norm\": 1.5, \"learning_rate\": 5e-05, \"loss\": {l}, \"step\": {s}}}",
                e = f64::from(i) / 40.0,
                l = 3.0 - f64::from(i) * 0.01,
                s = i * 10
            )
        })
        .collect();
    entries.insert(10, "{\"epoch\": 0.25, \"eval_loss\": 2.9, \"step\": 100}".to_owned());
    entries.push("{\"epoch\": 1.0, \"step\": 400, \"train_loss\": 2.8, \"train_runtime\": 10.0}".to_owned());
    let text = format!(
        "{{\n  \"best_metric\": null,\n  \"global_step\": 400,\n  \"log_history\": [\n    {}\n  ]\n}}\n",
        entries.join(",\n    ")
    );
    let path = write(dir.path(), "bert-run/checkpoint-400/trainer_state.json", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(40), Some(0)));
    assert_eq!(s["jobs"]["bert-run"]["records"], 40);
}

#[test]
fn real_llmc_trace_replays_with_parseable_json() {
    let out = replay(&["--json", LLMC_LOG]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let lines = json_lines(&out);
    for line in &lines {
        assert!(["anomaly", "advice", "summary"].contains(&line["kind"].as_str().unwrap()));
    }
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(19_552), Some(0)));
    assert_eq!(s["jobs"]["gpt2-124m-llmc"]["records"], 19_552);
    for advice in kind(&lines, "advice") {
        match advice["action"].as_str().unwrap() {
            "clip_gradients" => assert!(advice["max_norm"].is_number(), "{advice}"),
            "scale_lr" | "scale_loss_scale" => assert!(advice["factor"].is_number(), "{advice}"),
            "rollback" => assert!(advice["to_step"].is_u64(), "{advice}"),
            _ => {}
        }
    }
}

#[test]
fn real_llmc_stdout_is_detected_and_replayed() {
    let out = replay(&["--json", LLMC_STDOUT]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The log has all 19,560 step lines, but one is garbled: llm.c's "Error:
    // Token out of vocabulary" message, written into the same file, cuts step
    // 19528's line short after its norm (line 19761). That line is reported and
    // skipped, the rest are read; the banner, validation, HellaSwag, checkpoint
    // and generation lines yield nothing.
    assert_eq!(
        stderr(&out),
        format!("{LLMC_STDOUT}:19761: unexpected field \"lError: Token out of vocabulary at train\"\n")
    );
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(19_559), Some(1)));
    assert_eq!(s["jobs"]["gpt2-124m-stdout"]["records"], 19_559);
    assert_eq!(s["failed_files"], 0);
}

#[test]
fn real_llmc_stdout_with_nan_is_critical_from_step_1() {
    let out = replay(&["--json", LLMC_STDOUT_NAN]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Steps 1 to 901 are read; step 902's line is cut short by the batch
    // scheduler cancelling the job (line 976), so it is reported and skipped.
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("{LLMC_STDOUT_NAN}:976: unexpected field \"slurmstepd: ")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(901), Some(1)));
    assert_eq!(s["jobs"]["gpt2-124m-stdout-nan"]["records"], 901);

    let nonfinite: Vec<&Value> = kind(&lines, "anomaly")
        .into_iter()
        .filter(|a| a["rule"] == "nonfinite")
        .collect();
    let first = nonfinite
        .iter()
        .min_by_key(|a| a["step"].as_u64().unwrap())
        .expect("nonfinite anomalies");
    assert_eq!(first["step"], 1, "{first}");
    assert_eq!(first["severity"], "critical", "{first}");
    assert_eq!(first["job"], "gpt2-124m-stdout-nan");
}

#[test]
fn table_output_has_rows_and_a_summary() {
    let out = replay(&[LLMC_LOG]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.trim_start().starts_with("STEP  WORKER  SEVERITY"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("grad_spike"));
    assert!(text.contains("=> clip_gradients max_norm="));
    assert!(text.contains("Replayed 19552 records from 1 file; 0 lines skipped."));
    assert!(text.contains("gpt2-124m-llmc    19552"), "{text}");
}

/// `replay --json -` with `text` on its standard input.
fn replay_stdin(text: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["replay", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn stdin_is_read_with_dash() {
    let text = "s:0 tel:11.0\ns:0 trl:11.0 lr:0.1 norm:2.0\ns:1 trl:nan lr:0.1 norm:2.0\n";
    let out = replay_stdin(text);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert!(
        kind(&lines, "anomaly")
            .iter()
            .any(|a| a["rule"] == "nonfinite" && a["job"] == "stdin")
    );
    assert_eq!(summary(&lines)["records"], 2);
}

#[test]
fn llmc_stdout_on_stdin_is_detected_past_its_banner() {
    let text = "Multi-GPU support is disabled. Using a single GPU.\n+------+\n| resume | 0 |\nval loss 11.0\n\
                step    1/10 | loss 11.0 (+nanz)| norm 15.1 (+nanz)| lr 8.57e-07 | 4230.95 ms | 31.9% bf16 MFU | 123917 tok/s\n\
                step    2/10 | loss -nan (+nanz)| norm nan (+nanz)| lr 1.71e-06 | 4385.98 ms | 30.8% bf16 MFU | 119537 tok/s\n";
    let out = replay_stdin(text);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let lines = json_lines(&out);
    assert!(
        kind(&lines, "anomaly")
            .iter()
            .any(|a| a["rule"] == "nonfinite" && a["job"] == "stdin" && a["step"] == 2)
    );
    assert_eq!(summary(&lines)["records"], 2);
}

#[test]
fn unknown_rules_key_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", "[grad_spike]\nzscore = 3.0\n");
    let trace = write(dir.path(), "t.jsonl", "{\"step\": 1}\n");
    let out = replay(&["--rules", rules.to_str().unwrap(), trace.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("zscore") && err.contains("rules.toml"), "{err}");
    assert_eq!(stdout(&out), "");
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let out = replay(&[missing.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an input that cannot be replayed, as any other"
    );
    assert!(stderr(&out).contains(missing.to_str().unwrap()), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "nothing is replayed");
}

#[test]
fn undetectable_file_fails_but_others_replay() {
    let dir = tempfile::tempdir().unwrap();
    let odd = write(dir.path(), "odd.txt", "epoch,acc\n1,2.0\n");
    let good = write(dir.path(), "good.jsonl", "{\"step\": 1}\n");
    let out = replay(&["--json", odd.to_str().unwrap(), good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot tell the format of"), "{}", stderr(&out));
    let s = summary(&json_lines(&out)).clone();
    assert_eq!(
        (s["files"].as_u64(), s["failed_files"].as_u64(), s["records"].as_u64()),
        (Some(2), Some(1), Some(1))
    );

    // Forced to a format it is not in, nothing can be read: an error naming
    // the format and the first line it could not read, never "No anomalies".
    let forced = replay(&["--json", "--format", "llmc", odd.to_str().unwrap()]);
    assert_eq!(forced.status.code(), Some(1));
    let err = stderr(&forced);
    assert!(
        err.contains("is not a valid llmc trace: no record could be read (line 1: "),
        "{err}"
    );
    let s = summary(&json_lines(&forced)).clone();
    assert_eq!((s["skipped"].as_u64(), s["failed_files"].as_u64()), (Some(2), Some(1)));

    let empty = write(dir.path(), "empty.jsonl", "");
    let out = replay(&[empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no record could be read (no line holds a record)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_arguments_exit_2() {
    assert_eq!(replay(&[]).status.code(), Some(2));
    assert_eq!(replay(&["--format", "xml", "x"]).status.code(), Some(2));
    assert_eq!(
        replay(&["--records", "x"]).status.code(),
        Some(2),
        "--records needs --json"
    );
    assert_eq!(replay(&["-", "-"]).status.code(), Some(2));
}

#[test]
fn min_severity_filters_the_lines_but_not_the_summary() {
    let out = replay(&["--json", "--severity", "warning", LLMC_LOG]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "only the summary: the healthy run has no warning");
    assert_eq!(lines[0]["kind"], "summary");
    assert!(lines[0]["anomalies"]["info"].as_u64().unwrap() > 0);

    let bad = replay(&["--severity", "loud", LLMC_LOG]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("loud"), "{}", stderr(&bad));
}

#[test]
fn an_exporters_jsonl_with_other_keys_and_spellings_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for step in 1..=300u64 {
        let wobble = 1.0 + 0.05 * ((step * 7919 % 13) as f64 / 13.0 - 0.5);
        let norm = if step == 134 { 45.0 * wobble } else { wobble };
        let loss = 3.0 - step as f64 * 0.002;
        text.push_str(&format!(
            "{{\"global_step\": {step}, \"train/loss\": {loss}, \"gradient_norm\": {norm}, \
             \"learning_rate\": 0.0003, \"epoch\": {}, \"day\": \"2022-10-15\"}}\n",
            step as f64 / 100.0
        ));
    }
    let path = write(dir.path(), "exported.jsonl", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(
        err.matches("ignored keys").count(),
        1,
        "named once, not per line: {err}"
    );
    assert!(
        err.contains("ignored keys that are no gradguard field: day, epoch"),
        "{err}"
    );
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(300), Some(0)));
    assert!(
        lines.iter().any(|l| l["kind"] == "anomaly" && l["step"] == 134),
        "the 45x spike at step 134"
    );
}

#[test]
fn field_maps_a_key_and_a_bad_mapping_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "lightning.jsonl",
        "{\"step\": 1, \"train/loss_step\": 2.5, \"train/loss_epoch\": 9}\n{\"step\": 2, \"train/loss_step\": NaN}\n",
    );
    let name = path.to_str().unwrap();
    let out = replay(&["--json", "--field", "loss=train/loss_step", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "anomaly" && l["rule"] == "nonfinite" && l["step"] == 2),
        "the NaN loss read from the mapped key: {lines:?}"
    );
    assert!(stderr(&out).contains("ignored keys that are no gradguard field: train/loss_epoch"));

    let bad = replay(&["--field", "los=train/loss_step", name]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("\"los\" is not a field (fields: step, loss"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_file_of_bad_lines_shows_the_first_ten_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("{\"step\": 1}\n");
    for _ in 0..25 {
        text.push_str("{\"step\": -1}\n");
    }
    let path = write(dir.path(), "noisy.jsonl", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(err.matches("expected an unsigned integer").count(), 10, "{err}");
    assert!(err.contains("noisy.jsonl: 15 more lines skipped (25 in all)"), "{err}");
    assert_eq!(summary(&json_lines(&out))["skipped"], 25);
}

#[test]
fn a_megatron_log_is_detected_and_read_with_its_skipped_and_nan_iterations() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from(
        "using world size: 8, data-parallel size: 8, tensor-model-parallel size: 1\n\
         ------------------------ arguments ------------------------\n\
         \x20 lr .............................................. 0.0003\n\
         \x20 iteration ........................................ 0\n",
    );
    for it in (10..=2000u64).step_by(10) {
        let wobble = 1.0 + 0.05 * ((it * 7919 % 13) as f64 / 13.0 - 0.5);
        let loss = 8.0 - it as f64 * 0.002;
        let line = match it {
            // An AMP overflow: the interval's steps were skipped, no norm printed.
            500 => format!(
                " [2024-05-01 10:00:00] iteration {it:>8}/  100000 | learning rate: 3.000000E-04 | \
                 lm loss: {loss:.6E} | loss scale: 32768.0 | number of skipped iterations:  10 | \
                 number of nan iterations:   0 |"
            ),
            1500.. => format!(
                " [2024-05-01 10:00:00] iteration {it:>8}/  100000 | learning rate: 3.000000E-04 | \
                 lm loss: nan | loss scale: 1.0 | grad norm: nan | number of skipped iterations:   0 | \
                 number of nan iterations:  10 |"
            ),
            _ => format!(
                " [2024-05-01 10:00:00] iteration {it:>8}/  100000 | consumed samples: {} | \
                 learning rate: 3.000000E-04 | lm loss: {loss:.6E} | loss scale: 65536.0 | \
                 grad norm: {:.4} | number of skipped iterations:   0 | number of nan iterations:   0 |",
                it * 512,
                wobble
            ),
        };
        text.push_str(&line);
        text.push('\n');
        if it % 500 == 0 {
            text.push_str(" validation loss at iteration 500 | lm loss value: 2.3 | lm loss PPL: 9.9 |\n");
        }
    }
    let path = write(dir.path(), "megatron_stdout.txt", &text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!((s["records"].as_u64(), s["skipped"].as_u64()), (Some(200), Some(0)));
    let critical_at = lines
        .iter()
        .filter(|l| l["kind"] == "anomaly" && l["severity"] == "critical")
        .filter_map(|l| l["step"].as_u64())
        .min();
    assert_eq!(
        critical_at,
        Some(1500),
        "the NaN iterations are critical where they start"
    );
}

#[test]
fn the_summary_and_the_per_job_table_agree_on_skipped_lines() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"job\": \"a\", \"step\": 1, \"loss\": 2.0}\n\
        {\"job\": \"a\", \"step\": \"x\"}\n\
        {\"job\": \"a\", \"step\": 1, \"loss\": 2.0}\n\
        {\"job\": \"b\", \"step\": 5, \"loss\": 2.0}\n\
        {\"job\": \"b\", \"step\": 4, \"loss\": 2.0}\n\
        not json\n";
    let path = write(dir.path(), "mixed.jsonl", text);
    let out = replay(&["--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let s = summary(&lines);
    assert_eq!(s["skipped"], 4);
    assert_eq!(s["unreadable"], 2, "the two lines that name no readable record");
    let per_job: u64 = s["jobs"]
        .as_object()
        .unwrap()
        .values()
        .map(|j| j["skipped"].as_u64().unwrap())
        .sum();
    assert_eq!(per_job, 2, "a's duplicate step 1 and b's backward step 4");

    let out = replay(&[path.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(text.contains("4 lines skipped"), "{text}");
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {text}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert_eq!(row("a")[2], "1");
    assert_eq!(row("b")[2], "1");
    assert_eq!(
        row("(unreadable")[3],
        "2",
        "the table's skipped column adds up to the summary's"
    );
}
