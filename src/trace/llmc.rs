//! llm.c training logs, in either of the two forms llm.c writes them.
//!
//! **`main.log`** (in the `-o` log directory), one line per event:
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
//!
//! **Standard output** of the training program (`train_gpt2cu`): a banner table,
//! then one line per step, with validation, HellaSwag, checkpoint and generation
//! output between:
//!
//! ```text
//! | num_parameters        | 124475904                                          |
//! +-----------------------+----------------------------------------------------+
//! val loss 11.007921
//! step    1/19560 | loss 11.009662 (+nanz)| norm 15.0789 (+nanz)| lr 8.57e-07 | 4230.95 ms | 31.9% bf16 MFU | 123917 tok/s
//! ```
//!
//! - `step N/T` followed by `|`-separated fields is training step `N` of worker 0
//!   (the total `T` is not kept). The fields `loss L`, `norm G` and `lr LR` give
//!   the loss, the gradient norm before clipping and the learning rate, as C
//!   prints them (`nan`, `-nan`, `inf` included); each may be followed by its
//!   `(+1.23z)` score, which is ignored. `loss` is required. Fields that start
//!   with a number (`4230.95 ms`, `31.9% bf16 MFU`, `123917 tok/s`) and other
//!   `NAME NUMBER` fields (forks add their own) are ignored.
//! - A line that starts like a step line (`step N/`) but does not have that
//!   shape is a [`Skipped`] line with a reason: in real logs, a step line cut
//!   short by another process's message written into the same stream.
//! - Every other line is skipped silently.
//!
//! Which form a log is in is settled by its first step line of either kind
//! within the first 64 KiB ([`dialect`]); main.log when there is none. The form
//! decides whether lines that are not step lines are reported (main.log) or
//! passed over (standard output). A `step N/T | ...` line is read in either
//! form, so a standard output whose first step line comes later is still read
//! (with its preamble reported).
//!
//! Records get the reader's default job (the file stem, or `stdin`).

use super::{Entry, Record, Skipped};
use crate::model::Summary;

/// The two forms of llm.c log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `main.log`: `s:STEP key:value ...` lines.
    MainLog,
    /// The training program's standard output: `step N/T | ...` lines.
    Stdout,
}

/// Whether a line looks like a `main.log` line: `s:` and a step number.
pub fn looks_like(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"s:") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.get(digits).is_none_or(|b| b.is_ascii_whitespace())
}

/// Whether a line looks like a step line of llm.c's standard output:
/// `step N/T |`.
pub fn looks_like_stdout(line: &[u8]) -> bool {
    after_step_slash(line).is_some_and(|rest| {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        digits > 0 && rest[digits..].trim_ascii_start().starts_with(b"|")
    })
}

/// What `step`, blanks, a number and `/` at the start of `line` are followed
/// by: the lines of standard output that claim to be step lines.
fn after_step_slash(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"step")?;
    let blanks = rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let rest = &rest[blanks..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if blanks == 0 || digits == 0 {
        return None;
    }
    rest[digits..].strip_prefix(b"/")
}

/// The form a (trimmed) line says the log is in, if it is a step line.
pub fn settles(line: &[u8]) -> Option<Dialect> {
    if looks_like(line) {
        Some(Dialect::MainLog)
    } else if looks_like_stdout(line) {
        Some(Dialect::Stdout)
    } else {
        None
    }
}

/// The form of a log, from its first bytes: that of its first step line,
/// main.log when there is none.
pub fn dialect(head: &[u8]) -> Dialect {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    head.split(|&b| b == b'\n')
        .find_map(|l| settles(l.trim_ascii()))
        .unwrap_or(Dialect::MainLog)
}

/// Parses one line of a `main.log`; `None` for lines that carry no training
/// step.
pub fn parse_line(text: &str, line: usize, default_job: &str) -> Option<Entry> {
    parse_in(Dialect::MainLog, text, line, default_job)
}

/// Parses one line of llm.c's standard output; `None` for lines that carry no
/// training step.
pub fn parse_stdout_line(text: &str, line: usize, default_job: &str) -> Option<Entry> {
    parse_in(Dialect::Stdout, text, line, default_job)
}

fn parse_in(dialect: Dialect, text: &str, line: usize, default_job: &str) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let parsed = if after_step_slash(text.as_bytes()).is_some() {
        parse_stdout(text, line, default_job).map(Some)
    } else if dialect == Dialect::Stdout {
        return None; // banner, evaluation, generation, other programs' output
    } else {
        parse(text, line, default_job)
    };
    parsed.transpose().map(|r| r.map_err(|reason| Skipped { line, reason }))
}

fn parse(text: &str, line: usize, default_job: &str) -> Result<Option<Record>, String> {
    let mut tokens = text.split_ascii_whitespace();
    let step = tokens.next().and_then(|t| t.strip_prefix("s:")).ok_or_else(|| {
        format!(
            "not an llm.c log line (expected \"s:STEP ...\" or \"step N/T | ...\"): {}",
            shorten(text)
        )
    })?;
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

/// A step line of standard output: `step N/T | loss L (z)| norm G (z)| lr LR | ...`.
fn parse_stdout(text: &str, line: usize, default_job: &str) -> Result<Record, String> {
    let mut fields = text.split('|');
    let head = fields.next().unwrap_or_default().trim();
    let mut words = head.split_ascii_whitespace().skip(1);
    let step = words
        .next()
        .and_then(|c| c.split_once('/'))
        .and_then(|(n, t)| t.parse::<u64>().ok().and(n.parse::<u64>().ok()))
        .filter(|_| words.next().is_none())
        .ok_or_else(|| format!("expected \"step N/T\" before the first '|', got {:?}", shorten(head)))?;
    let mut summary = Summary {
        step,
        ..Summary::default()
    };
    for field in fields {
        let field = field.trim();
        let name = field.split_ascii_whitespace().next().unwrap_or_default();
        if name.is_empty() {
            return Err("empty field between '|'s".to_owned());
        }
        if name.strip_suffix('%').unwrap_or(name).parse::<f64>().is_ok() {
            continue; // a measurement: `4230.95 ms`, `31.9% bf16 MFU`, `123917 tok/s`
        }
        let is_name = name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_name {
            return Err(format!("unexpected field {:?}", shorten(field)));
        }
        let rest = field[name.len()..].trim_start();
        let (value, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let x: f64 = value
            .parse()
            .map_err(|_| format!("{name}: expected a number, got {:?}", shorten(value)))?;
        let after = after.trim();
        let score = after.starts_with('(') && after.ends_with(')') && !after.contains(char::is_whitespace);
        if !after.is_empty() && !score {
            return Err(format!("{name}: unexpected {:?} after the value", shorten(after)));
        }
        let slot = match name {
            "loss" => &mut summary.loss,
            "norm" => &mut summary.grad_norm,
            "lr" => &mut summary.lr,
            _ => continue,
        };
        *slot = Some(x);
    }
    if summary.loss.is_none() {
        return Err("no loss field".to_owned());
    }
    Ok(Record {
        job: default_job.to_owned(),
        layer_names: None,
        summary,
        line,
    })
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
            "not an llm.c log line (expected \"s:STEP ...\" or \"step N/T | ...\"): step 5 loss 2.0"
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

    const STEP_1: &str = "step    1/19560 | loss 11.012345 (+0.00z)| norm 15.2345 (+0.00z)| lr 8.57e-07 | 412.34 ms | 45.1% bf16 MFU | 1271234 tok/s";

    fn stdout(text: &str) -> Option<Entry> {
        parse_stdout_line(text, 7, "run")
    }

    fn stdout_record(text: &str) -> Record {
        stdout(text).expect("a step line").expect("valid")
    }

    fn stdout_reason(text: &str) -> String {
        stdout(text).expect("not silent").unwrap_err().reason
    }

    #[test]
    fn reads_stdout_step_lines() {
        let r = stdout_record(STEP_1);
        assert_eq!((r.job.as_str(), r.line, r.layer_names), ("run", 7, None));
        let s = r.summary;
        assert_eq!((s.step, s.worker), (1, 0));
        assert_eq!(
            (s.loss, s.grad_norm, s.lr),
            (Some(11.012345), Some(15.2345), Some(8.57e-07))
        );
        assert_eq!(s.layers, []);
        // Without scores, with a field of a fork's own, without norm and lr.
        let s = stdout_record("step 20/20 | loss 3.5 | norm 0.25 | lr 0.00e+00 | grad_scale 1024 | 98.1 ms").summary;
        assert_eq!(
            (s.step, s.loss, s.grad_norm, s.lr),
            (20, Some(3.5), Some(0.25), Some(0.0))
        );
        let s = stdout_record("step\t3/9|loss 2.0").summary;
        assert_eq!((s.step, s.loss, s.grad_norm, s.lr), (3, Some(2.0), None, None));
        // A main.log reader reads them too (a standard output whose first step
        // line is past the detection window).
        assert_eq!(parse_line(STEP_1, 7, "run"), stdout(STEP_1));
    }

    #[test]
    fn stdout_nonfinite_values() {
        let s = stdout_record(
            "step  901/19560 | loss     nan (+nanz)| norm    nan (+nanz)| lr 6.00e-04 | 3587.07 ms | 37.6% bf16 MFU | 144513 tok/s",
        )
        .summary;
        assert_eq!(s.step, 901);
        assert!(s.loss.unwrap().is_nan() && s.grad_norm.unwrap().is_nan());
        assert_eq!(s.lr, Some(6e-4));
        let s = stdout_record("step 3/10 | loss -nan (+nanz)| norm inf (+infz)| lr 1e-4").summary;
        assert!(s.loss.unwrap().is_nan());
        assert_eq!(s.grad_norm, Some(f64::INFINITY));
        let s = stdout_record("step 4/10 | loss inf | norm -nan | lr -inf").summary;
        assert_eq!(s.loss, Some(f64::INFINITY));
        assert!(s.grad_norm.unwrap().is_nan());
        assert_eq!(s.lr, Some(f64::NEG_INFINITY));
    }

    #[test]
    fn other_stdout_lines_are_silent() {
        for line in [
            "Multi-GPU support is disabled. Using a single GPU.",
            "+-----------------------+----------------------------------------------------+",
            "| train_num_batches     | 19560                                              |",
            "=> setting grad_accum_steps=16",
            "val loss 11.007921",
            "evaluating HellaSwag: 0/1256\revaluating HellaSwag: 10/1256\rHellaSwag: 2493/10042 = 0.248257",
            "Writing checkpoint at step 5000",
            "generating:",
            "---",
            "step by step, 1/2 of the",
            "steps 5/10 | loss 2.0",
            "s:5 trl:2.0",
            "s:x junk",
            "",
            "# note",
        ] {
            assert_eq!(stdout(line), None, "{line}");
        }
    }

    #[test]
    fn garbled_stdout_step_lines_are_skipped_with_a_reason() {
        // Both real cases: a step line cut short by another program's message.
        assert_eq!(
            stdout_reason(
                "step 19528/19560 | loss 3.329409 (+0.47z)| norm 0.2206 (-0.39z)| lError: Token out of vocabulary at train_gpt2.cu:675"
            ),
            "unexpected field \"lError: Token out of vocabulary at train\""
        );
        assert_eq!(
            stdout_reason(
                "step  902/19560 | loss     nan (+nanz)|slurmstepd: error: *** JOB 11672255 ON g084 CANCELLED AT 2024-10-10T02:20:29 DUE TO TIME LIMIT ***"
            ),
            "unexpected field \"slurmstepd: error: *** JOB 11672255 ON g\""
        );
        assert_eq!(stdout_reason("step 5/10"), "no loss field");
        assert_eq!(stdout_reason("step 5/10 | norm 1.0 | lr 0.1"), "no loss field");
        assert_eq!(
            stdout_reason("step 5/x | loss 1.0"),
            "expected \"step N/T\" before the first '|', got \"step 5/x\""
        );
        assert_eq!(
            stdout_reason("step 5/10 junk | loss 1.0"),
            "expected \"step N/T\" before the first '|', got \"step 5/10 junk\""
        );
        assert_eq!(
            stdout_reason("step 5/10 | loss abc"),
            "loss: expected a number, got \"abc\""
        );
        assert_eq!(
            stdout_reason("step 5/10 | loss 1.0 | norm"),
            "norm: expected a number, got \"\""
        );
        assert_eq!(
            stdout_reason("step 5/10 | loss 1.0 (+0.1z) junk"),
            "loss: unexpected \"(+0.1z) junk\" after the value"
        );
        assert_eq!(
            stdout_reason("step 5/10 | loss 1.0 || norm 2"),
            "empty field between '|'s"
        );
        assert_eq!(
            stdout_reason("step 5/10 | loss 1.0 | grad scale 2"),
            "grad: expected a number, got \"scale\""
        );
        // The same reasons in a main.log.
        assert_eq!(reason("step 5/10 | loss abc"), "loss: expected a number, got \"abc\"");
    }

    #[test]
    fn stdout_detection_shape() {
        assert!(looks_like_stdout(STEP_1.as_bytes()));
        assert!(looks_like_stdout(b"step 1/2|"));
        assert!(!looks_like_stdout(b"step 1/2 loss 3"));
        assert!(!looks_like_stdout(b"step1/2 |"));
        assert!(!looks_like_stdout(b"step 1 / 2 |"));
        assert!(!looks_like_stdout(b"step 1/ |"));
        assert!(!looks_like_stdout(b"steps 1/2 |"));
        assert!(!looks_like_stdout(b"s:1 trl:2"));
        assert_eq!(settles(b"s:1 trl:2"), Some(Dialect::MainLog));
        assert_eq!(settles(STEP_1.as_bytes()), Some(Dialect::Stdout));
        assert_eq!(settles(b"val loss 11.0"), None);
    }

    #[test]
    fn dialect_is_that_of_the_first_step_line() {
        let banner = "Multi-GPU support is disabled.\n| num_layers L | 12 |\nval loss 11.0\n";
        assert_eq!(dialect(format!("{banner}{STEP_1}\n").as_bytes()), Dialect::Stdout);
        assert_eq!(
            dialect(format!("{banner}s:0 trl:11\n{STEP_1}\n").as_bytes()),
            Dialect::MainLog
        );
        assert_eq!(dialect(b"\xEF\xBB\xBFs:0 tel:11\n"), Dialect::MainLog);
        assert_eq!(dialect(banner.as_bytes()), Dialect::MainLog, "none: main.log");
        assert_eq!(dialect(b""), Dialect::MainLog);
    }

    #[test]
    fn stdout_through_the_reader() {
        // A forced --format llmc reads the form it finds: the banner and the
        // evaluation lines are passed over, a garbled step line is reported.
        let text = format!(
            "+----+\r\n| device | A100 |\r\nval loss 11.0\r\n{STEP_1}\r\nevaluating HellaSwag: 0/1256\rHellaSwag: 1/2 = 0.5\r\n\
             step    2/19560 | loss nan (+nanz)| norm nan (+nanz)| lr 1.71e-06 | 412 ms\nstep    3/19560 | loss 10.9 (+0.1z)| nor"
        );
        let entries: Vec<_> = Reader::from_input(Cursor::new(text.into_bytes()), Format::Llmc, "t", "j")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(entries.len(), 3);
        let first = entries[0].as_ref().unwrap();
        assert_eq!(
            (first.line, first.summary.step, first.summary.lr),
            (4, 1, Some(8.57e-07))
        );
        let second = entries[1].as_ref().unwrap();
        assert_eq!((second.line, second.summary.step), (6, 2));
        assert!(second.summary.loss.unwrap().is_nan());
        assert_eq!(
            entries[2].as_ref().unwrap_err(),
            &Skipped {
                line: 7,
                reason: "nor: expected a number, got \"\"".to_owned()
            }
        );
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
