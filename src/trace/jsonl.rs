//! The project's own trace schema: one JSON object per line, one worker's step.
//!
//! ```json
//! {"job": "gpt", "worker": 0, "step": 120, "time": 1700000000.5, "loss": 2.31,
//!  "lr": 3e-4, "loss_scale": 65536, "grad_norm": 1.7,
//!  "layers": [{"name": "wte", "l2": 0.4, "max_abs": 0.02, "nonfinite": 0,
//!              "param_norm": 31.0, "update_norm": 0.003}]}
//! ```
//!
//! - `step` (unsigned integer) is required; everything else is optional.
//!   `job` (non-empty string) defaults to the reader's default job (the file
//!   stem, or `stdin`); `worker` (u32 rank) to 0. `null` means absent.
//! - `time` (seconds since the epoch), `loss`, `lr`, `loss_scale`, `grad_norm`:
//!   numbers. Non-finite values are accepted either as Python's bare tokens
//!   `NaN`, `Infinity`, `-Infinity` or as those strings (also `nan`, `inf`,
//!   `-inf`), so the engine sees and reports them.
//! - `layers`: a list of objects, in the job's layer order. `name` (string) and
//!   `l2` are required: a missing `l2` must not read as a zero norm, which would
//!   look like a dead layer. `max_abs` defaults to 0 and `nonfinite` (a count)
//!   to 0; `param_norm` and `update_norm` are optional. Layer values are stored
//!   as `f32`; a finite value beyond its range becomes infinite, as it would in
//!   the worker's own `f32` arithmetic.
//! - Norms (`grad_norm`, `l2`, `max_abs`, `param_norm`, `update_norm`) and
//!   `loss_scale` must not be negative, unless non-finite.
//! - Exporters' spellings are read too (see [`ALIASES`]): `global_step`,
//!   `iteration`, `train/loss`, `gradient_norm`, `learning_rate`, ... A
//!   line's own gradguard name wins over an alias, an earlier alias over a
//!   later one. A whole-number float is a step (`134.0`).
//! - Other keys (epoch, tokens, throughput, a date) are ignored: real
//!   exporters always add some. [`parse_line_noting`] collects their names, so
//!   that the reader reports them once per file, not per line (a misspelt
//!   field, `grad_nrom`, shows there). (A duplicate field keeps its last value.)
//! - Blank lines and lines starting with `#` are skipped silently. A malformed
//!   line is a [`Skipped`] whose reason names the field and the value, e.g.
//!   `field "step": expected an unsigned integer, got -3`.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::{Entry, Record, Skipped, number, quote_nonfinite, show};
use crate::model::{LayerStats, Summary};

/// Other spellings of the gradguard fields, in order of preference.
pub const ALIASES: &[(&str, &[&str])] = &[
    (
        "step",
        &[
            "global_step",
            "train/global_step",
            "trainer/global_step",
            "iteration",
            "iter",
            "_step",
            "Step",
        ],
    ),
    (
        "loss",
        &[
            "train/loss",
            "train_loss",
            "training_loss",
            "loss/train",
            "Loss/train",
            "train/loss_step",
            "lm_loss",
            "lm loss",
            "train_loss_step",
            "Train/Loss",
        ],
    ),
    (
        "grad_norm",
        &[
            "gradient_norm",
            "train/grad_norm",
            "grad-norm",
            "grad norm",
            "global_grad_norm",
            "total_grad_norm",
            "grad_2.0_norm_total",
            "train/gradient_norm",
            "grad_norm/train",
        ],
    ),
    (
        "lr",
        &[
            "learning_rate",
            "train/learning_rate",
            "train/lr",
            "learning-rate",
            "lr-SGD",
            "lr-Adam",
            "lr-AdamW",
            "lr/train",
        ],
    ),
    ("loss_scale", &["train/loss_scale", "loss-scale"]),
    ("time", &["timestamp", "_timestamp", "wall_time", "Wall time"]),
];

/// Keys the user named for fields (`replay --field loss=train/loss_step`):
/// such a key is read for its field before any other spelling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMap(Vec<(&'static str, String)>);

impl FieldMap {
    /// Parses `FIELD=KEY`; the error names the value and the fields.
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let names = || ALIASES.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ");
        let (field, key) = spec
            .split_once('=')
            .ok_or_else(|| format!("--field {spec:?}: expected FIELD=KEY, e.g. loss=train/loss_step"))?;
        let field = ALIASES
            .iter()
            .map(|(f, _)| *f)
            .find(|f| *f == field.trim())
            .ok_or_else(|| format!("--field {spec:?}: {field:?} is not a field (fields: {})", names()))?;
        if key.is_empty() {
            return Err(format!("--field {spec:?}: the key is empty"));
        }
        self.0.retain(|(f, _)| *f != field);
        self.0.push((field, key.to_owned()));
        Ok(())
    }

    fn field(&self, key: &str) -> Option<&'static str> {
        self.0.iter().find(|(_, k)| k == key).map(|(f, _)| *f)
    }
}

/// Ignored key names collected per file at most (the first ones).
pub const MAX_IGNORED: usize = 32;

const LAYER_FIELDS: &str = "name, l2, max_abs, nonfinite, param_norm, update_norm";

/// Parses one line; `None` for a blank or comment line.
pub fn parse_line(text: &str, line: usize, default_job: &str) -> Option<Entry> {
    parse_line_noting(text, line, default_job, &FieldMap::default(), &mut BTreeSet::new())
}

/// [`parse_line`] with the user's `fields`, adding the names of the keys it
/// ignored to `ignored` (up to [`MAX_IGNORED`] names).
pub fn parse_line_noting(
    text: &str,
    line: usize,
    default_job: &str,
    fields: &FieldMap,
    ignored: &mut BTreeSet<String>,
) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    Some(parse_object(text, line, default_job, fields, ignored).map_err(|reason| Skipped { line, reason }))
}

/// The gradguard field a key stands for (its index in [`ALIASES`]), and its
/// preference (lower wins): the user's key for it, then the field's own name,
/// then the aliases in order.
pub(crate) fn field_of(key: &str, fields: &FieldMap) -> Option<(usize, usize)> {
    if let Some(field) = fields.field(key) {
        return ALIASES.iter().position(|(f, _)| *f == field).map(|i| (i, 0));
    }
    ALIASES.iter().enumerate().find_map(|(i, (field, aliases))| {
        if *field == key {
            return Some((i, 1));
        }
        aliases.iter().position(|a| *a == key).map(|p| (i, p + 2))
    })
}

fn parse_object(
    text: &str,
    line: usize,
    default_job: &str,
    fields: &FieldMap,
    ignored: &mut BTreeSet<String>,
) -> Result<Record, String> {
    let value: Value = serde_json::from_str(&quote_nonfinite(text)).map_err(json_error)?;
    let Value::Object(obj) = value else {
        return Err(format!("expected a JSON object, got {}", show(&value)));
    };
    let mut job = None;
    let mut summary = Summary::default();
    let mut step = None;
    let mut layers = None;
    // The preference each field was read with (see `field_of`).
    let mut taken = [usize::MAX; ALIASES.len()];
    for (key, v) in &obj {
        if v.is_null() {
            continue;
        }
        let f = Field(key);
        match key.as_str() {
            "job" => job = Some(f.string(v)?),
            "worker" => summary.worker = f.u32(v)?,
            "layers" => layers = Some(parse_layers(v)?),
            _ => {
                let Some((slot, preference)) = field_of(key, fields) else {
                    if ignored.len() < MAX_IGNORED && !ignored.contains(key.as_str()) {
                        ignored.insert(key.clone());
                    }
                    continue;
                };
                if preference > taken[slot] {
                    continue;
                }
                taken[slot] = preference;
                match ALIASES[slot].0 {
                    "step" => step = Some(f.step(v)?),
                    "time" => summary.time = Some(f.float(v)?),
                    "loss" => summary.loss = Some(f.float(v)?),
                    "lr" => summary.lr = Some(f.float(v)?),
                    "loss_scale" => summary.loss_scale = Some(f.norm(v)?),
                    _ => summary.grad_norm = Some(f.norm(v)?),
                }
            }
        }
    }
    summary.step = step.ok_or_else(|| format!("field \"step\" is missing (nor any of {})", ALIASES[0].1.join(", ")))?;
    let layer_names = match layers {
        Some((names, stats)) if !names.is_empty() => {
            summary.layers = stats;
            Some(names)
        }
        _ => None,
    };
    Ok(Record {
        job: job.unwrap_or_else(|| default_job.to_owned()),
        layer_names,
        summary,
        line,
    })
}

/// serde_json's message without its "at line 1": the line is known.
fn json_error(e: serde_json::Error) -> String {
    let text = e.to_string();
    let message = text.rsplit_once(" at line ").map_or(text.as_str(), |(m, _)| m);
    format!("invalid JSON at column {}: {message}", e.column())
}

fn parse_layers(v: &Value) -> Result<(Vec<String>, Vec<LayerStats>), String> {
    let Value::Array(items) = v else {
        return Err(format!("field \"layers\": expected a list, got {}", show(v)));
    };
    let mut names = Vec::with_capacity(items.len());
    let mut stats = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(format!("field \"layers[{i}]\": expected an object, got {}", show(item)));
        };
        let (name, s) = parse_layer(i, obj)?;
        names.push(name);
        stats.push(s);
    }
    Ok((names, stats))
}

fn parse_layer(i: usize, obj: &Map<String, Value>) -> Result<(String, LayerStats), String> {
    let mut name = None;
    let mut l2 = None;
    let mut s = LayerStats::default();
    for (key, v) in obj {
        if v.is_null() {
            continue;
        }
        let path = format!("layers[{i}].{key}");
        let f = Field(&path);
        // `as f32` saturates: a finite f64 beyond f32's range becomes infinite.
        match key.as_str() {
            "name" => name = Some(f.string(v)?),
            "l2" => l2 = Some(f.norm(v)? as f32),
            "max_abs" => s.max_abs = f.norm(v)? as f32,
            "nonfinite" => s.nonfinite = f.u32(v)?,
            "param_norm" => s.param_norm = Some(f.norm(v)? as f32),
            "update_norm" => s.update_norm = Some(f.norm(v)? as f32),
            _ => return Err(format!("unknown field {path:?} (known: {LAYER_FIELDS})")),
        }
    }
    let name = name.ok_or_else(|| format!("field \"layers[{i}].name\" is missing"))?;
    s.l2 = l2.ok_or_else(|| format!("field \"layers[{i}].l2\" is missing (layer {name:?})"))?;
    Ok((name, s))
}

/// A field being read, for error messages that name it and its value.
struct Field<'a>(&'a str);

impl Field<'_> {
    fn err(&self, expected: &str, v: &Value) -> String {
        format!("field {:?}: expected {expected}, got {}", self.0, show(v))
    }

    fn string(&self, v: &Value) -> Result<String, String> {
        match v.as_str() {
            Some("") => Err(format!("field {:?}: must not be empty", self.0)),
            Some(s) => Ok(s.to_owned()),
            None => Err(self.err("a string", v)),
        }
    }

    /// An unsigned integer, or a float with a whole value (`134.0`).
    fn step(&self, v: &Value) -> Result<u64, String> {
        let whole = || {
            let x = v.as_f64()?;
            (x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as u64)
        };
        v.as_u64()
            .or_else(whole)
            .ok_or_else(|| self.err("an unsigned integer", v))
    }

    fn u32(&self, v: &Value) -> Result<u32, String> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err("an unsigned 32-bit integer", v))
    }

    fn float(&self, v: &Value) -> Result<f64, String> {
        number(v).ok_or_else(|| self.err("a number", v))
    }

    fn norm(&self, v: &Value) -> Result<f64, String> {
        match number(v) {
            Some(x) if x < 0.0 && x.is_finite() => Err(self.err("a non-negative number", v)),
            Some(x) => Ok(x),
            None => Err(self.err("a number", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> Record {
        parse_line(text, 7, "file").expect("not blank").expect("valid")
    }

    fn reason(text: &str) -> String {
        let skipped = parse_line(text, 7, "file").expect("not blank").unwrap_err();
        assert_eq!(skipped.line, 7);
        skipped.reason
    }

    #[test]
    fn reads_a_full_record() {
        let r = record(
            r#"{"job":"gpt","worker":3,"step":120,"time":1700000000.5,"loss":2.5,"lr":0.001,"loss_scale":65536,
            "grad_norm":1.5,"layers":[{"name":"wte","l2":0.5,"max_abs":0.25,"nonfinite":2,"param_norm":30,"update_norm":0.125},
            {"name":"head","l2":1}]}"#,
        );
        assert_eq!((r.job.as_str(), r.line), ("gpt", 7));
        let s = &r.summary;
        assert_eq!((s.worker, s.step, s.time), (3, 120, Some(1700000000.5)));
        assert_eq!(
            (s.loss, s.lr, s.loss_scale, s.grad_norm),
            (Some(2.5), Some(0.001), Some(65536.0), Some(1.5))
        );
        assert_eq!(r.layer_names, Some(vec!["wte".to_owned(), "head".to_owned()]));
        assert_eq!(
            s.layers[0],
            LayerStats {
                l2: 0.5,
                max_abs: 0.25,
                nonfinite: 2,
                param_norm: Some(30.0),
                update_norm: Some(0.125)
            }
        );
        assert_eq!(
            s.layers[1],
            LayerStats {
                l2: 1.0,
                ..LayerStats::default()
            }
        );
    }

    #[test]
    fn defaults_and_nulls() {
        let r = record(r#"{"step": 5, "loss": null, "layers": []}"#);
        assert_eq!((r.job.as_str(), r.summary.worker, r.summary.step), ("file", 0, 5));
        assert_eq!((r.summary.loss, r.layer_names), (None, None));
        assert!(r.summary.layers.is_empty());
    }

    #[test]
    fn bare_nonfinite_tokens() {
        let r = record(
            r#"{"step": 1, "loss": NaN, "grad_norm": Infinity, "lr": -Infinity, "layers": [{"name": "NaN", "l2": NaN}]}"#,
        );
        assert!(r.summary.loss.unwrap().is_nan());
        assert_eq!(r.summary.grad_norm, Some(f64::INFINITY));
        assert_eq!(r.summary.lr, Some(f64::NEG_INFINITY));
        assert!(r.summary.layers[0].l2.is_nan());
        assert_eq!(r.layer_names.unwrap(), ["NaN"]);
    }

    #[test]
    fn nonfinite_strings() {
        let r = record(r#"{"step": 1, "loss": "NaN", "grad_norm": "inf", "time": "-Infinity"}"#);
        assert!(r.summary.loss.unwrap().is_nan());
        assert_eq!(r.summary.grad_norm, Some(f64::INFINITY));
        assert_eq!(r.summary.time, Some(f64::NEG_INFINITY));
        assert_eq!(
            reason(r#"{"step": 1, "loss": "1.5"}"#),
            r#"field "loss": expected a number, got "1.5""#
        );
    }

    #[test]
    fn huge_layer_values_saturate() {
        let r = record(r#"{"step": 1, "layers": [{"name": "a", "l2": 1e39}]}"#);
        assert_eq!(r.summary.layers[0].l2, f32::INFINITY);
    }

    #[test]
    fn missing_and_wrong_fields() {
        assert!(reason(r#"{"loss": 1.0}"#).starts_with(r#"field "step" is missing (nor any of global_step"#));
        assert_eq!(
            reason(r#"{"step": -3}"#),
            r#"field "step": expected an unsigned integer, got -3"#
        );
        assert_eq!(
            reason(r#"{"step": 1.5}"#),
            r#"field "step": expected an unsigned integer, got 1.5"#
        );
        assert_eq!(
            reason(r#"{"step": "12"}"#),
            r#"field "step": expected an unsigned integer, got "12""#
        );
        assert_eq!(
            reason(r#"{"step": 1, "worker": 4294967296}"#),
            r#"field "worker": expected an unsigned 32-bit integer, got 4294967296"#
        );
        assert_eq!(reason(r#"{"step": 1, "job": ""}"#), r#"field "job": must not be empty"#);
        assert_eq!(
            reason(r#"{"step": 1, "job": 5}"#),
            r#"field "job": expected a string, got 5"#
        );
        assert_eq!(
            reason(r#"{"step": 1, "grad_norm": -2}"#),
            r#"field "grad_norm": expected a non-negative number, got -2"#
        );
    }

    #[test]
    fn layer_errors_name_the_layer_field() {
        assert_eq!(
            reason(r#"{"step": 1, "layers": {"a": 1}}"#),
            r#"field "layers": expected a list, got {"a":1}"#
        );
        assert_eq!(
            reason(r#"{"step": 1, "layers": [{"l2": 1}]}"#),
            r#"field "layers[0].name" is missing"#
        );
        assert_eq!(
            reason(r#"{"step": 1, "layers": [{"name": "a", "l2": 1}, {"name": "b"}]}"#),
            r#"field "layers[1].l2" is missing (layer "b")"#
        );
        assert_eq!(
            reason(r#"{"step": 1, "layers": [{"name": "a", "l2": 1, "nonfinite": true}]}"#),
            r#"field "layers[0].nonfinite": expected an unsigned 32-bit integer, got true"#
        );
        assert!(
            reason(r#"{"step": 1, "layers": [{"name": "a", "l2": 1, "l3": 1}]}"#)
                .starts_with(r#"unknown field "layers[0].l3""#)
        );
    }

    #[test]
    fn other_keys_are_ignored_and_named_once() {
        let mut ignored = BTreeSet::new();
        let line = r#"{"step": 134, "loss": 2.44, "grad_norm": 26.26, "day": "2022-10-15", "grad_nrom": 1}"#;
        for n in 1..=3 {
            let r = parse_line_noting(line, n, "f", &FieldMap::default(), &mut ignored)
                .unwrap()
                .unwrap();
            assert_eq!(
                (r.summary.step, r.summary.loss, r.summary.grad_norm),
                (134, Some(2.44), Some(26.26))
            );
        }
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["day", "grad_nrom"]);

        let mut many = BTreeSet::new();
        for i in 0..100 {
            parse_line_noting(
                &format!(r#"{{"step": 1, "k{i}": 0}}"#),
                1,
                "f",
                &FieldMap::default(),
                &mut many,
            );
        }
        assert_eq!(many.len(), MAX_IGNORED, "bounded");
    }

    #[test]
    fn a_users_key_for_a_field_wins() {
        let mut fields = FieldMap::default();
        fields.add("loss=train/loss_step").unwrap();
        let line = r#"{"step": 3, "loss": 9, "train/loss_step": 2.5, "train/loss_epoch": 7}"#;
        let mut ignored = BTreeSet::new();
        let r = parse_line_noting(line, 1, "f", &fields, &mut ignored).unwrap().unwrap();
        assert_eq!(r.summary.loss, Some(2.5));
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["train/loss_epoch"]);
        assert!(
            fields
                .add("los=x")
                .unwrap_err()
                .contains(r#""los" is not a field (fields: step, loss"#)
        );
        assert!(fields.add("loss").unwrap_err().contains("expected FIELD=KEY"));
        assert!(fields.add("loss=").unwrap_err().contains("the key is empty"));
    }

    #[test]
    fn exporters_spellings_are_read_and_the_own_name_wins() {
        let r = record(
            r#"{"global_step": 134.0, "train/loss": 2.5, "gradient_norm": "NaN", "learning_rate": 3e-4, "epoch": 1.5}"#,
        );
        let s = &r.summary;
        assert_eq!((s.step, s.loss, s.lr), (134, Some(2.5), Some(3e-4)));
        assert!(s.grad_norm.unwrap().is_nan());
        // Both spellings on one line, in either order: the gradguard name.
        for line in [
            r#"{"step": 1, "train/loss": 9, "loss": 2}"#,
            r#"{"step": 1, "loss": 2, "train/loss": 9}"#,
        ] {
            assert_eq!(record(line).summary.loss, Some(2.0), "{line}");
        }
        // Of two aliases, the earlier in the table.
        assert_eq!(record(r#"{"iteration": 7, "global_step": 5}"#).summary.step, 5);
        assert_eq!(
            reason(r#"{"global_step": 1.5}"#),
            r#"field "global_step": expected an unsigned integer, got 1.5"#
        );
        assert_eq!(
            reason(r#"{"epoch": 1}"#),
            r#"field "step" is missing (nor any of global_step, train/global_step, trainer/global_step, iteration, iter, _step, Step)"#
        );
    }

    #[test]
    fn not_json_or_not_an_object() {
        assert_eq!(
            reason(r#"{"step": 1"#),
            "invalid JSON at column 10: EOF while parsing an object"
        );
        assert_eq!(reason("not json"), "invalid JSON at column 2: expected ident");
        assert_eq!(reason("[1, 2]"), "expected a JSON object, got [1,2]");
        assert!(reason(r#"{"step": NaNa}"#).starts_with("invalid JSON at column "));
    }

    #[test]
    fn blank_and_comment_lines_are_silent() {
        assert_eq!(parse_line("", 1, "j"), None);
        assert_eq!(parse_line("   \t", 1, "j"), None);
        assert_eq!(parse_line("# a comment", 1, "j"), None);
    }

    #[test]
    fn crlf_lines() {
        let input = b"{\"step\": 1}\r\n\r\n{\"step\": 2, \"loss\": NaN}\r\n".to_vec();
        let reader = super::super::Reader::from_input(
            Box::new(std::io::Cursor::new(input)),
            super::super::Format::Jsonl,
            "t",
            "j",
        )
        .unwrap();
        let steps: Vec<(usize, u64)> = reader
            .map(|e| e.unwrap().unwrap())
            .map(|r| (r.line, r.summary.step))
            .collect();
        assert_eq!(steps, [(1, 1), (3, 2)]);
    }
}
