//! The line formats the commands share, so that `replay`, `simulate` and the
//! query commands print alike.
//!
//! - [`Num`]: a float for JSON; a non-finite number is written as the string
//!   `"NaN"`, `"Infinity"` or `"-Infinity"` (the spellings the jsonl reader
//!   accepts), never as null, so it stays distinguishable from an absent value.
//! - [`Evidence`]: an advice's evidence as a JSON object of names to numbers.
//! - [`ActionFields`]: an action as JSON fields, `action` (its name) and
//!   exactly its parameter.
//! - [`AdviceLine`]: one advice as a JSON line (`replay --json`; `simulate
//!   --json` adds when the job received and applied it).
//! - [`write_table`], [`or_dash`], [`count_list`]: aligned text tables and the
//!   cells and counts in them.

use std::fmt::Display;
use std::io::{self, Write};

use gradguard::model::{Action, Severity};
use gradguard::{proto, wire};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

/// A float for JSON: non-finite values as strings.
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            x if x.is_finite() => s.serialize_f64(x),
            x if x.is_nan() => s.serialize_str("NaN"),
            x if x > 0.0 => s.serialize_str("Infinity"),
            _ => s.serialize_str("-Infinity"),
        }
    }
}

/// Evidence pairs as a JSON object, in the engine's order.
pub struct Evidence<'a>(pub &'a [(String, f64)]);

impl Serialize for Evidence<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, &Num(*value))?;
        }
        map.end()
    }
}

/// The evidence of an advice that came over the wire, as [`Evidence`] takes it.
pub fn evidence_pairs(evidence: &[proto::Evidence]) -> Vec<(String, f64)> {
    evidence.iter().map(|e| (e.name.clone(), e.value)).collect()
}

/// An action as JSON fields: `action` (its name) and exactly its parameter
/// (`max_norm`, `factor`, `to_step` or `rank`; none for skip_step and halt).
#[derive(Serialize)]
pub struct ActionFields {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_norm: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    factor: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<u32>,
}

impl ActionFields {
    /// An action this client does not know (a newer server): `unknown`, no parameter.
    pub fn unknown() -> Self {
        ActionFields {
            action: "unknown",
            max_norm: None,
            factor: None,
            to_step: None,
            rank: None,
        }
    }
}

impl From<Action> for ActionFields {
    fn from(a: Action) -> Self {
        let mut fields = ActionFields {
            action: a.name(),
            max_norm: None,
            factor: None,
            to_step: None,
            rank: None,
        };
        match a {
            Action::ClipGradients { max_norm } => fields.max_norm = Some(Num(max_norm)),
            Action::ScaleLr { factor } | Action::ScaleLossScale { factor } => fields.factor = Some(Num(factor)),
            Action::Rollback { to_step } => fields.to_step = Some(to_step),
            Action::InspectWorker { rank } => fields.rank = Some(rank),
            Action::SkipStep | Action::Halt => {}
        }
        fields
    }
}

/// One advice as a JSON line: `{"kind":"advice","id","job","worker","step",
/// "apply_from",RECEIPT,"rule","rules","severity","action",PARAM,"reason",
/// "evidence"}`. `worker` is the target rank or null for every rank; `rule` is
/// the first of `rules` (rule ids, typed or as the wire has them); PARAM is
/// [`ActionFields`]'; RECEIPT is only in `simulate`'s lines.
#[derive(Serialize)]
pub struct AdviceLine<'a, R> {
    pub kind: &'static str,
    pub id: u64,
    pub job: &'a str,
    pub worker: Option<u32>,
    pub step: u64,
    pub apply_from: u64,
    #[serde(flatten)]
    pub receipt: Option<Receipt>,
    pub rule: Option<&'a R>,
    pub rules: &'a [R],
    pub severity: &'static str,
    #[serde(flatten)]
    pub action: ActionFields,
    pub reason: &'a str,
    pub evidence: Evidence<'a>,
}

/// When a job received an advice and applied it (`simulate`).
#[derive(Serialize)]
pub struct Receipt {
    /// The step about to be played when the job first saw it.
    pub received_at: u64,
    pub applied: bool,
    pub applied_at: Option<u64>,
}

/// A severity code from the wire as a word: `info`, `warning`, `critical`, or
/// `unspecified` (also for a code this client does not know).
pub fn severity_word(code: i32) -> &'static str {
    wire::severity_from_proto(code, "severity")
        .ok()
        .flatten()
        .map_or("unspecified", Severity::as_str)
}

/// Writes one JSON object and a newline.
pub fn json_line(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// One JSON line as text; our types always serialize, but a failure is shown, not hidden.
pub fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|e| serde_json::json!({"kind": "error", "error": e.to_string()}).to_string())
}

/// A table cell for an optional value: `-` when absent.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Counts as `name n, name n`, leaving out the zeros; empty when all are zero.
pub fn count_list<K: Display>(counts: impl IntoIterator<Item = (K, u64)>) -> String {
    let parts: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    parts.join(", ")
}

/// Writes rows with padded columns, right-aligned where `right` says so; a
/// left-aligned last column is not padded.
pub fn write_table(out: &mut impl Write, rows: &[&[String]], right: &[bool]) -> io::Result<()> {
    // A stored value may hold a newline or a terminal escape: shown escaped,
    // it can neither break the table's lines nor drive the terminal.
    let shown: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|cell| printable(cell)).collect())
        .collect();
    let rows: Vec<&[String]> = shown.iter().map(Vec::as_slice).collect();
    let cols = rows.first().map_or(0, |r| r.len());
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            // Padded by hand: `format!`'s width is limited to u16, and a
            // stored value (a layer name, a reason) may be longer.
            let pad = " ".repeat(widths[c] - cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if right[c] {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&pad);
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A table cell with its control characters escaped (`\n`, `\u{1b}`).
fn printable(cell: &str) -> String {
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_escapes_control_characters_and_pads_long_cells() {
        let long = "x".repeat(70_000);
        let rows: [&[String]; 2] = [
            &["JOB".into(), "N".into()],
            &[format!("a\nb\u{1b}[31m{long}"), "7".into()],
        ];
        let mut out = Vec::new();
        write_table(&mut out, &rows, &[false, true]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{:?}", &text[..100]);
        assert!(lines[1].starts_with("a\\nb\\u{1b}[31mxxx") && lines[1].ends_with("  7"));
        assert_eq!(lines[0].chars().count(), lines[1].chars().count());
    }

    #[test]
    fn nonfinite_numbers_are_strings() {
        let json = |x: f64| serde_json::to_string(&Num(x)).unwrap();
        assert_eq!(json(1.5), "1.5");
        assert_eq!(json(f64::NAN), "\"NaN\"");
        assert_eq!(json(f64::INFINITY), "\"Infinity\"");
        assert_eq!(json(f64::NEG_INFINITY), "\"-Infinity\"");
        let evidence = [("a".to_owned(), 2.0), ("b".to_owned(), f64::NAN)];
        assert_eq!(
            serde_json::to_string(&Evidence(&evidence)).unwrap(),
            r#"{"a":2.0,"b":"NaN"}"#
        );
    }

    #[test]
    fn tables_are_aligned() {
        let rows = [
            ["JOB", "N", "NOTE"].map(String::from),
            ["a-long-job", "7", "x"].map(String::from),
            ["b", "12345", "yz"].map(String::from),
        ];
        let rows: Vec<&[String]> = rows.iter().map(|r| &r[..]).collect();
        let mut out = Vec::new();
        write_table(&mut out, &rows, &[false, true, false]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "JOB             N  NOTE\na-long-job      7  x\nb           12345  yz\n"
        );
    }

    #[test]
    fn cells_longer_than_a_format_width_are_printed_whole() {
        // A stored layer name or reason can be far longer than u16::MAX.
        let long = "é".repeat(100_000);
        let rows = [["LAYER", "N"].map(String::from), [long.clone(), "1".into()]];
        let rows: Vec<&[String]> = rows.iter().map(|r| &r[..]).collect();
        let mut out = Vec::new();
        write_table(&mut out, &rows, &[false, true]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{long}  1"));
        assert_eq!(
            lines[0].chars().count(),
            100_003,
            "the header is padded to the long cell"
        );
    }

    /// The same advice prints the same fields in replay's and simulate's lines,
    /// simulate's with its receipt after `apply_from`.
    #[test]
    fn advice_lines_share_their_fields() {
        let rules = ["grad_spike".to_owned(), "loss_divergence".to_owned()];
        let evidence = [("z".to_owned(), 4.5)];
        let line = |receipt, action| {
            json_text(&AdviceLine {
                kind: "advice",
                id: 7,
                job: "j",
                worker: None,
                step: 12,
                apply_from: 13,
                receipt,
                rule: rules.first(),
                rules: &rules,
                severity: "warning",
                action,
                reason: "why",
                evidence: Evidence(&evidence),
            })
        };
        let tail = r#""rule":"grad_spike","rules":["grad_spike","loss_divergence"],"severity":"warning","#;
        let head = r#"{"kind":"advice","id":7,"job":"j","worker":null,"step":12,"apply_from":13,"#;
        assert_eq!(
            line(None, Action::ScaleLr { factor: 0.5 }.into()),
            format!(r#"{head}{tail}"action":"scale_lr","factor":0.5,"reason":"why","evidence":{{"z":4.5}}}}"#)
        );
        let receipt = Receipt {
            received_at: 14,
            applied: true,
            applied_at: Some(14),
        };
        assert_eq!(
            line(Some(receipt), ActionFields::unknown()),
            format!(
                r#"{head}"received_at":14,"applied":true,"applied_at":14,{tail}"action":"unknown","reason":"why","evidence":{{"z":4.5}}}}"#
            )
        );
    }

    #[test]
    fn counts_leave_out_the_zeros() {
        assert_eq!(
            count_list([("clip_gradients", 2), ("halt", 0), ("scale_lr", 1)]),
            "clip_gradients 2, scale_lr 1"
        );
        assert_eq!(count_list([("halt", 0)]), "");
    }
}
