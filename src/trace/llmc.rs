//! llm.c training logs (`main.log`), one line per event:
//!
//! ```text
//! s:0 tel:11.0095
//! s:0 trl:11.0116 lr:0.000001 norm:14.96
//! s:250 eval:0.2437
//! ```
//!
//! - `s:STEP trl:LOSS [lr:LR] [norm:NORM]` is a training step of worker 0:
//!   loss, learning rate and the gradient norm before clipping. Other `key:value`
//!   tokens on such a line are ignored (forks add their own), but every token
//!   must have the `key:value` shape and the three known ones must be numbers.
//!   C's `nan`, `-nan`, `inf` and `-inf` are read as non-finite values.
//! - Any other `s:STEP ...` line (`tel:` validation loss, `eval:` HellaSwag
//!   accuracy, and whatever else a fork evaluates) is skipped silently.
//! - Blank lines and `#` comments are skipped silently; anything else is a
//!   [`Skipped`] line with a reason.
//! - Records get the reader's default job (the file stem, or `stdin`).

use super::{Entry, Record, Skipped};
use crate::model::Summary;

/// Whether a line looks like an llm.c log line: `s:` and a step number.
pub fn looks_like(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"s:") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.get(digits).is_none_or(|b| b.is_ascii_whitespace())
}

/// Parses one line; `None` for lines that carry no training step.
pub fn parse_line(text: &str, line: usize, default_job: &str) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    parse(text, line, default_job)
        .transpose()
        .map(|r| r.map_err(|reason| Skipped { line, reason }))
}

fn parse(text: &str, line: usize, default_job: &str) -> Result<Option<Record>, String> {
    let mut tokens = text.split_ascii_whitespace();
    let step = tokens
        .next()
        .and_then(|t| t.strip_prefix("s:"))
        .ok_or_else(|| format!("not an llm.c log line (expected \"s:STEP ...\"): {}", shorten(text)))?;
    let step: u64 = step
        .parse()
        .map_err(|_| format!("step \"s:{step}\": expected an unsigned integer"))?;
    let pairs: Vec<&str> = tokens.collect();
    if !pairs.iter().any(|t| t.starts_with("trl:")) {
        return Ok(None); // an evaluation line
    }
    let mut summary = Summary {
        step,
        ..Summary::default()
    };
    for token in pairs {
        let (key, value) = token
            .split_once(':')
            .ok_or_else(|| format!("expected KEY:VALUE, got {:?}", shorten(token)))?;
        let slot = match key {
            "trl" => &mut summary.loss,
            "lr" => &mut summary.lr,
            "norm" => &mut summary.grad_norm,
            _ => continue,
        };
        let x: f64 = value
            .parse()
            .map_err(|_| format!("{key}: expected a number, got {:?}", shorten(value)))?;
        *slot = Some(x);
    }
    Ok(Some(Record {
        job: default_job.to_owned(),
        layer_names: None,
        summary,
        line,
    }))
}

fn shorten(s: &str) -> &str {
    let end = (0..=40.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Cursor};

    use super::*;
    use crate::trace::{Format, Reader};

    fn record(text: &str) -> Record {
        parse_line(text, 3, "main").expect("a training line").expect("valid")
    }

    fn reason(text: &str) -> String {
        parse_line(text, 3, "main").expect("not silent").unwrap_err().reason
    }

    #[test]
    fn reads_training_lines() {
        let r = record("s:12 trl:9.7936 lr:0.000011 norm:3.05");
        assert_eq!((r.job.as_str(), r.line, r.layer_names), ("main", 3, None));
        let s = r.summary;
        assert_eq!((s.step, s.worker), (12, 0));
        assert_eq!((s.loss, s.lr, s.grad_norm), (Some(9.7936), Some(0.000011), Some(3.05)));
        let old = record("s:1 trl:10.5");
        assert_eq!((old.summary.loss, old.summary.grad_norm), (Some(10.5), None));
    }

    #[test]
    fn c_nonfinite_values() {
        let s = record("s:5 trl:nan lr:0.1 norm:inf").summary;
        assert!(s.loss.unwrap().is_nan());
        assert_eq!(s.grad_norm, Some(f64::INFINITY));
        assert!(record("s:5 trl:-nan norm:-inf").summary.loss.unwrap().is_nan());
    }

    #[test]
    fn evaluation_lines_are_silent() {
        for line in [
            "s:0 tel:11.0095",
            "s:250 eval:0.2437",
            "s:250 hellaswag:0.3",
            "",
            "# note",
            "s:7",
        ] {
            assert_eq!(parse_line(line, 1, "j"), None, "{line}");
        }
    }

    #[test]
    fn malformed_lines_are_skipped_with_a_reason() {
        assert_eq!(
            reason("step 5 loss 2.0"),
            "not an llm.c log line (expected \"s:STEP ...\"): step 5 loss 2.0"
        );
        assert_eq!(reason("s:-3 trl:1.0"), "step \"s:-3\": expected an unsigned integer");
        assert_eq!(reason("s:3 trl:abc"), "trl: expected a number, got \"abc\"");
        assert_eq!(reason("s:3 trl:1.0 norm:"), "norm: expected a number, got \"\"");
        assert_eq!(reason("s:3 trl:1.0 junk"), "expected KEY:VALUE, got \"junk\"");
    }

    #[test]
    fn detection_shape() {
        assert!(looks_like(b"s:0 tel:1"));
        assert!(looks_like(b"s:123"));
        assert!(!looks_like(b"s: 1"));
        assert!(!looks_like(b"s:1x"));
        assert!(!looks_like(b"step:1"));
    }

    #[test]
    fn crlf_lines() {
        let input = Cursor::new(b"s:0 tel:11\r\ns:0 trl:11 lr:0.1 norm:2\r\nbad\r\n".to_vec());
        let entries: Vec<_> = Reader::from_input(input, Format::Llmc, "t", "j")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].as_ref().unwrap().summary.grad_norm, Some(2.0));
        assert_eq!(entries[1].as_ref().unwrap_err().line, 3);
    }

    #[test]
    fn real_gpt2_log() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/traces/gpt2-124m-llmc.log");
        let file = std::fs::File::open(path).expect("vendored trace");
        let mut head = Vec::new();
        BufReader::new(file).read_until(b'\n', &mut head).unwrap();
        assert_eq!(Format::detect(std::path::Path::new(path), &head), Some(Format::Llmc));
        let reader = Reader::open(std::path::Path::new(path), None).unwrap();
        let (mut records, mut skipped, mut last) = (0, 0, 0);
        for entry in reader {
            match entry.unwrap() {
                Ok(r) => {
                    assert_eq!(r.job, "gpt2-124m-llmc");
                    assert!(r.summary.loss.is_some() && r.summary.grad_norm.is_some());
                    last = r.summary.step;
                    records += 1;
                }
                Err(_) => skipped += 1,
            }
        }
        assert_eq!((records, skipped, last), (19_552, 0, 19_551));
    }
}
