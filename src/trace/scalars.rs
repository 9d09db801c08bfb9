//! A step's named scalar values, gathered into one [`Record`]: what the
//! TensorBoard and CSV readers share. A name (a TensorBoard tag, a CSV column
//! or a long table's key) stands for a gradguard field through jsonl's table
//! ([`jsonl::ALIASES`] and the user's `--field`), with the same preference: the
//! user's key, then the field's own name, then the aliases in order; of two
//! values under one name, the later wins.

use std::collections::BTreeSet;

use super::jsonl::{self, ALIASES, FieldMap};
use super::{Entry, Record, Skipped};
use crate::model::Summary;

/// Where a name's values go: the field's index in [`ALIASES`] and the name's
/// preference for it (lower wins), or `None` for a name that is no field.
pub(crate) type Slot = Option<(usize, usize)>;

/// The index of `step` in [`ALIASES`].
pub(crate) const STEP: usize = 0;
/// The index of `time` in [`ALIASES`].
pub(crate) const TIME: usize = 5;

/// The slot of a name.
pub(crate) fn slot(name: &str, fields: &FieldMap) -> Slot {
    jsonl::field_of(name, fields)
}

/// Notes an ignored name, up to [`jsonl::MAX_IGNORED`] of them.
pub(crate) fn note_ignored(ignored: &mut BTreeSet<String>, name: &str) {
    if ignored.len() < jsonl::MAX_IGNORED && !ignored.contains(name) {
        ignored.insert(name.to_owned());
    }
}

/// The values read for one step so far.
#[derive(Debug, Clone)]
pub(crate) struct Gather {
    pub step: u64,
    /// Where the step's first event or row is (see [`Record::line`]).
    pub line: usize,
    /// The time when no value gives one (TensorBoard's wall time).
    pub default_time: Option<f64>,
    taken: [usize; ALIASES.len()],
    values: [f64; ALIASES.len()],
}

impl Gather {
    pub fn new(step: u64, line: usize) -> Self {
        Self {
            step,
            line,
            default_time: None,
            taken: [usize::MAX; ALIASES.len()],
            values: [0.0; ALIASES.len()],
        }
    }

    /// Keeps `value` for the field of `slot` unless a preferred name gave one.
    /// The step field is not a value: it is ignored here.
    pub fn put(&mut self, (field, preference): (usize, usize), value: f64) {
        if field != STEP && preference <= self.taken[field] {
            self.taken[field] = preference;
            self.values[field] = value;
        }
    }

    /// Which of the record's fields (loss, gradient norm, learning rate, loss
    /// scale) have a value: one bit each.
    pub fn shape(&self) -> u8 {
        (1..TIME).filter(|&f| self.get(f).is_some()).fold(0, |m, f| m | 1 << f)
    }

    fn get(&self, field: usize) -> Option<f64> {
        (self.taken[field] != usize::MAX).then_some(self.values[field])
    }

    /// The record of the step, of `job`'s worker 0: `None` when no value but
    /// the time was read (an evaluation row, a tag of no field); a skip when a
    /// norm or the loss scale is negative.
    pub fn finish(&self, job: &str) -> Option<Entry> {
        let (loss, grad_norm, lr, loss_scale) = (self.get(1), self.get(2), self.get(3), self.get(4));
        if [loss, grad_norm, lr, loss_scale].iter().all(Option::is_none) {
            return None;
        }
        for (field, v) in [(2, grad_norm), (4, loss_scale)] {
            if let Some(x) = v.filter(|x| *x < 0.0 && x.is_finite()) {
                let reason = format!(
                    "step {}: field {:?}: expected a non-negative number, got {x}",
                    self.step, ALIASES[field].0
                );
                return Some(Err(Skipped {
                    line: self.line,
                    reason,
                }));
            }
        }
        Some(Ok(Record {
            job: job.to_owned(),
            layer_names: None,
            summary: Summary {
                step: self.step,
                time: self.get(TIME).or(self.default_time),
                loss,
                lr,
                loss_scale,
                grad_norm,
                ..Summary::default()
            },
            line: self.line,
        }))
    }
}

/// A number as a CSV cell or a text value writes it: Rust's reading, which
/// takes `nan`, `NaN`, `inf`, `-inf`, `Infinity` in any case.
pub(crate) fn float(text: &str) -> Option<f64> {
    text.trim().parse().ok()
}

/// A step as a CSV cell writes it: an unsigned integer, or a float with a
/// whole value (`134.0`).
pub(crate) fn step(text: &str) -> Option<u64> {
    let text = text.trim();
    text.parse().ok().or_else(|| {
        let x: f64 = text.parse().ok()?;
        (x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_by_preference_and_skips_negative_norms() {
        let fields = FieldMap::default();
        let mut g = Gather::new(7, 3);
        g.default_time = Some(100.0);
        g.put(slot("train/loss", &fields).unwrap(), 9.0);
        g.put(slot("loss", &fields).unwrap(), 2.0);
        g.put(slot("train_loss", &fields).unwrap(), 8.0);
        g.put(slot("lr", &fields).unwrap(), 0.1);
        g.put(slot("global_step", &fields).unwrap(), 99.0);
        let r = g.finish("j").unwrap().unwrap();
        assert_eq!((r.job.as_str(), r.line, r.summary.step), ("j", 3, 7));
        assert_eq!(
            (r.summary.loss, r.summary.lr, r.summary.time),
            (Some(2.0), Some(0.1), Some(100.0))
        );
        assert_eq!(r.summary.grad_norm, None);

        let mut g = Gather::new(1, 1);
        g.put(slot("timestamp", &fields).unwrap(), 5.0);
        assert_eq!(g.finish("j"), None, "a time alone is no record");
        g.put(slot("grad_norm", &fields).unwrap(), -1.0);
        let skip = g.finish("j").unwrap().unwrap_err();
        assert_eq!(
            skip.reason,
            "step 1: field \"grad_norm\": expected a non-negative number, got -1"
        );
        g.put(slot("grad_norm", &fields).unwrap(), f64::NEG_INFINITY);
        assert!(g.finish("j").unwrap().is_ok(), "non-finite values pass through");
    }

    #[test]
    fn reads_numbers_and_steps() {
        for (text, want) in [
            ("1.5", 1.5),
            (" -2e3 ", -2000.0),
            ("inf", f64::INFINITY),
            ("-Infinity", f64::NEG_INFINITY),
        ] {
            assert_eq!(float(text), Some(want), "{text}");
        }
        assert!(float("nan").unwrap().is_nan() && float("NaN").unwrap().is_nan());
        assert_eq!(float(""), None);
        assert_eq!(float("abc"), None);
        assert_eq!(
            (step("12"), step("134.0"), step("1.5"), step("-1"), step("")),
            (Some(12), Some(134), None, None, None)
        );
    }
}
