//! Megatron-LM training logs (and NeMo's, which print Megatron's lines): one
//! line per logging interval,
//!
//! ```text
//!  [2024-05-01 10:00:00] iteration      100/  500000 | consumed samples:        51200 |
//!  elapsed time per iteration (ms): 1234.5 | learning rate: 3.000000E-04 | global batch size:
//!  512 | lm loss: 2.345678E+00 | loss scale: 65536.0 | grad norm: 1.234 | number of skipped
//!  iterations:   0 | number of nan iterations:   0 |
//! ```
//!
//! (one line in the log). The step is the iteration; `lm loss` (else the first
//! other `... loss` field but `loss scale`), `learning rate`, `loss scale` and
//! `grad norm` are read, `nan` and `inf` in any case included. An interval
//! with skipped iterations (an AMP overflow) and no `grad norm` reads as an
//! infinite norm, and one with NaN iterations and no loss as a NaN loss, so
//! the engine sees what happened. Every other line (the arguments, timers,
//! evaluation, checkpoints) yields nothing.

use super::{Entry, Record, Skipped};
use crate::model::Summary;

/// Whether a line is a Megatron iteration line: `iteration N/ T |`.
pub fn looks_like(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|t| iteration(t).is_some())
}

/// The iteration of a line `... iteration N/ T | ...`, and the text after it.
fn iteration(text: &str) -> Option<(&str, &str)> {
    let at = text.find("iteration ")?;
    let rest = text[at + "iteration ".len()..].trim_start();
    let (n, rest) = rest.split_once('/')?;
    let (total, rest) = rest.split_once('|')?;
    let digits = |s: &str| !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(total)).then_some((n.trim(), rest))
}

/// Parses one line; `None` for lines that carry no iteration.
pub fn parse_line(text: &str, line: usize, default_job: &str) -> Option<Entry> {
    let (n, rest) = iteration(text)?;
    Some(parse(n, rest, line, default_job).map_err(|reason| Skipped { line, reason }))
}

fn parse(n: &str, rest: &str, line: usize, default_job: &str) -> Result<Record, String> {
    let step: u64 = n
        .parse()
        .map_err(|_| format!("iteration {n:?}: expected an unsigned integer"))?;
    let mut summary = Summary {
        step,
        ..Summary::default()
    };
    let (mut lm_loss, mut other_loss, mut skipped, mut nan) = (None, None, 0u64, 0u64);
    for field in rest.split('|') {
        let Some((key, value)) = field.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let number = || {
            value
                .parse::<f64>()
                .map_err(|_| format!("field {key:?}: expected a number, got {value:?}"))
        };
        match key {
            "lm loss" => lm_loss = Some(number()?),
            "learning rate" => summary.lr = Some(number()?),
            "loss scale" => summary.loss_scale = Some(number()?),
            "grad norm" => summary.grad_norm = Some(number()?),
            "number of skipped iterations" => skipped = number()? as u64,
            "number of nan iterations" => nan = number()? as u64,
            _ if key.ends_with(" loss") && other_loss.is_none() => other_loss = Some(number()?),
            _ => {}
        }
    }
    summary.loss = lm_loss.or(other_loss);
    if summary.grad_norm.is_none() && skipped > 0 {
        summary.grad_norm = Some(f64::INFINITY);
    }
    if summary.loss.is_none() && nan > 0 {
        summary.loss = Some(f64::NAN);
    }
    if summary.loss.is_none() && summary.grad_norm.is_none() {
        return Err("an iteration line without a loss or a grad norm".to_owned());
    }
    Ok(Record {
        job: default_job.to_owned(),
        layer_names: None,
        summary,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = " [2024-05-01 10:00:00] iteration      100/  500000 | consumed samples:        51200 | \
        elapsed time per iteration (ms): 1234.5 | learning rate: 3.000000E-04 | global batch size:   512 | \
        lm loss: 2.345678E+00 | loss scale: 65536.0 | grad norm: 1.234 | number of skipped iterations:   0 | \
        number of nan iterations:   0 |";

    fn record(text: &str) -> Record {
        parse_line(text, 4, "run").expect("an iteration line").expect("valid")
    }

    #[test]
    fn reads_an_iteration_line() {
        let r = record(LINE);
        let s = &r.summary;
        assert_eq!((r.job.as_str(), r.line, s.step), ("run", 4, 100));
        assert_eq!(
            (s.loss, s.lr, s.loss_scale, s.grad_norm),
            (Some(2.345678), Some(3e-4), Some(65536.0), Some(1.234))
        );
        assert!(looks_like(LINE.as_bytes()));
    }

    #[test]
    fn skipped_and_nan_iterations_are_what_happened() {
        let skipped = record(
            " iteration       10/     100 | learning rate: 1.0E-04 | loss scale: 32768.0 | \
             number of skipped iterations:   1 | number of nan iterations:   0 |",
        );
        assert_eq!(skipped.summary.grad_norm, Some(f64::INFINITY));
        let nan = record(" iteration 20/ 100 | lm loss: nan | grad norm: NaN | number of nan iterations: 1 |");
        assert!(nan.summary.loss.unwrap().is_nan() && nan.summary.grad_norm.unwrap().is_nan());
        let lost = record(" iteration 30/ 100 | grad norm: 2.0 | number of nan iterations: 1 |");
        assert!(lost.summary.loss.unwrap().is_nan());
        let other = record(" iteration 40/ 100 | loss scale: 1.0 | mtp loss: 3.5 | grad norm: 1 |");
        assert_eq!(other.summary.loss, Some(3.5));
    }

    #[test]
    fn other_lines_yield_nothing_and_bad_values_are_named() {
        for line in [
            "using world size: 8, data-parallel size: 8",
            "  iteration ........................................ 0",
            " validation loss at iteration 100 | lm loss value: 2.3 |",
            "(min, max) time across ranks (ms):",
        ] {
            assert!(parse_line(line, 1, "j").is_none(), "{line}");
        }
        let bad = parse_line(" iteration 5/ 10 | lm loss: abc |", 9, "j")
            .unwrap()
            .unwrap_err();
        assert_eq!(bad.line, 9);
        assert_eq!(bad.reason, r#"field "lm loss": expected a number, got "abc""#);
        let empty = parse_line(" iteration 5/ 10 | learning rate: 1.0 |", 9, "j")
            .unwrap()
            .unwrap_err();
        assert!(empty.reason.contains("without a loss or a grad norm"));
    }
}
