//! Hugging Face `trainer_state.json`: the Trainer's `log_history`.
//!
//! The whole document is read at once (it is one JSON object, usually
//! pretty-printed). Each `log_history` entry with a `loss` is a training log and
//! yields a record of worker 0: `step` (required, unsigned integer), `loss`,
//! `grad_norm` and `learning_rate` (numbers; Python's bare `NaN`/`Infinity`
//! tokens are accepted). `epoch` and every other key are ignored: the Trainer
//! adds keys across versions and the engine has no use for them.
//!
//! - Entries without `loss` (evaluation entries with `eval_loss`, the final
//!   summary with `train_runtime`/`train_loss`), or with `"loss": null`, are
//!   skipped silently.
//! - A record's `line` is the entry's 1-based position in `log_history` (the
//!   parsed document has no line positions); skip reasons start with
//!   `log_history[INDEX]` (0-based) to point at the entry.
//! - A document that is not JSON or has no `log_history` list is an error of the
//!   whole input, not a skipped line.
//! - The default job is the run directory: the file's parent directory, or the
//!   one above a `checkpoint-N` directory (see [`run_dir`]).

use std::path::Path;

use serde_json::Value;

use super::{Entry, Record, Skipped, number, quote_nonfinite, show};
use crate::model::Summary;

/// Parses a whole `trainer_state.json`; `job` names the records.
pub fn parse_document(text: &str, job: &str) -> Result<Vec<Entry>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc: Value = serde_json::from_str(&quote_nonfinite(text)).map_err(|e| format!("invalid JSON: {e}"))?;
    let history = match doc.get("log_history") {
        Some(Value::Array(h)) => h,
        Some(other) => return Err(format!("\"log_history\" is not a list: {}", show(other))),
        None if doc.is_object() => return Err("no \"log_history\" in the document".to_owned()),
        None => return Err(format!("expected a JSON object, got {}", show(&doc))),
    };
    Ok(history
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            parse_entry(e, i, job)
                .transpose()
                .map(|r| r.map_err(|reason| Skipped { line: i + 1, reason }))
        })
        .collect())
}

/// One `log_history` entry: `Ok(None)` when it is not a training log.
fn parse_entry(entry: &Value, i: usize, job: &str) -> Result<Option<Record>, String> {
    let Value::Object(obj) = entry else {
        return Err(format!("log_history[{i}]: expected an object, got {}", show(entry)));
    };
    let Some(loss) = obj.get("loss").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let float = |key: &str, v: &Value| {
        number(v).ok_or_else(|| format!("log_history[{i}]: field {key:?}: expected a number, got {}", show(v)))
    };
    let optional = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => float(key, v).map(Some),
    };
    let step = match obj.get("step") {
        None => return Err(format!("log_history[{i}]: field \"step\" is missing")),
        Some(v) => v.as_u64().ok_or_else(|| {
            format!(
                "log_history[{i}]: field \"step\": expected an unsigned integer, got {}",
                show(v)
            )
        })?,
    };
    let summary = Summary {
        step,
        loss: Some(float("loss", loss)?),
        lr: optional("learning_rate")?,
        grad_norm: optional("grad_norm")?,
        ..Summary::default()
    };
    Ok(Some(Record {
        job: job.to_owned(),
        layer_names: None,
        summary,
        line: i + 1,
    }))
}

/// The run directory's name for a file named `trainer_state.json`: its parent,
/// or the parent's parent when the parent is a `checkpoint-N` directory.
pub fn run_dir(path: &Path) -> Option<String> {
    if path.file_name()? != "trainer_state.json" {
        return None;
    }
    let mut dirs = path.parent()?.iter().rev().map(|c| c.to_string_lossy());
    let mut dir = dirs.next()?;
    if dir.starts_with("checkpoint-") {
        dir = dirs.next()?;
    }
    (dir != "." && dir != "..").then(|| dir.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = r#"{
  "best_metric": null,
  "epoch": 1.0,
  "global_step": 30,
  "log_history": [
    {"epoch": 0.33, "grad_norm": 1.25, "learning_rate": 5e-05, "loss": 2.5, "step": 10},
    {"epoch": 0.33, "eval_loss": 2.4, "eval_runtime": 1.2, "step": 10},
    {"epoch": 0.66, "grad_norm": NaN, "learning_rate": 4e-05, "loss": Infinity, "step": 20},
    {"epoch": 1.0, "grad_norm": 0.5, "learning_rate": 3e-05, "loss": 2.0, "step": 30, "num_tokens": 1000},
    {"epoch": 1.0, "step": 30, "total_flos": 1e15, "train_loss": 2.2, "train_runtime": 12.5}
  ],
  "max_steps": 30
}"#;

    #[test]
    fn reads_training_entries_and_skips_eval_and_summary() {
        let entries = parse_document(STATE, "run").unwrap();
        let records: Vec<Record> = entries.into_iter().map(Result::unwrap).collect();
        let steps: Vec<(usize, u64)> = records.iter().map(|r| (r.line, r.summary.step)).collect();
        assert_eq!(steps, [(1, 10), (3, 20), (4, 30)]);
        let s = &records[0].summary;
        assert_eq!(
            (s.loss, s.lr, s.grad_norm, s.worker),
            (Some(2.5), Some(5e-05), Some(1.25), 0)
        );
        assert_eq!(records[0].job, "run");
        assert!(records[1].summary.grad_norm.unwrap().is_nan());
        assert_eq!(records[1].summary.loss, Some(f64::INFINITY));
    }

    #[test]
    fn bad_entries_are_skipped_with_their_index() {
        let doc = r#"{"log_history": [
            {"loss": 1.0},
            {"loss": "x", "step": 2},
            {"loss": 1.0, "step": -1},
            7,
            {"loss": 1.0, "step": 5, "grad_norm": [1]}
        ]}"#;
        let reasons: Vec<(usize, String)> = parse_document(doc, "j")
            .unwrap()
            .into_iter()
            .map(|e| e.map(|_| ()).unwrap_err())
            .map(|s| (s.line, s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (1, r#"log_history[0]: field "step" is missing"#.to_owned()),
                (
                    2,
                    r#"log_history[1]: field "loss": expected a number, got "x""#.to_owned()
                ),
                (
                    3,
                    r#"log_history[2]: field "step": expected an unsigned integer, got -1"#.to_owned()
                ),
                (4, "log_history[3]: expected an object, got 7".to_owned()),
                (
                    5,
                    r#"log_history[4]: field "grad_norm": expected a number, got [1]"#.to_owned()
                ),
            ]
        );
    }

    #[test]
    fn whole_document_errors() {
        assert!(parse_document("{", "j").unwrap_err().starts_with("invalid JSON"));
        assert_eq!(
            parse_document("{}", "j").unwrap_err(),
            "no \"log_history\" in the document"
        );
        assert_eq!(
            parse_document(r#"{"log_history": 3}"#, "j").unwrap_err(),
            "\"log_history\" is not a list: 3"
        );
        assert_eq!(parse_document("[]", "j").unwrap_err(), "expected a JSON object, got []");
    }

    #[test]
    fn crlf_document() {
        let text = STATE.replace('\n', "\r\n");
        assert_eq!(parse_document(&text, "j").unwrap().len(), 3);
    }

    #[test]
    fn run_directory() {
        assert_eq!(
            run_dir(Path::new("out/bert/trainer_state.json")).as_deref(),
            Some("bert")
        );
        assert_eq!(
            run_dir(Path::new("bert/checkpoint-500/trainer_state.json")).as_deref(),
            Some("bert")
        );
        assert_eq!(run_dir(Path::new("trainer_state.json")), None);
        assert_eq!(run_dir(Path::new("./trainer_state.json")), None);
        assert_eq!(run_dir(Path::new("out/state.json")), None);
    }
}
