//! CSV with a header line: metrics tables as loggers and trackers export them.
//!
//! **Wide tables**, one column per metric: Lightning `CSVLogger`'s
//! `metrics.csv` (`epoch,step,train_loss,lr-SGD,val_loss`, sparse rows), W&B
//! history exports (`_step,train/loss,_runtime,_timestamp`), W&B panel exports
//! (`Step,RUN - train/loss,RUN - train/loss__MIN,RUN - train/loss__MAX`),
//! TensorBoard's own CSV download (`Wall time,Step,Value`, with `--field
//! loss=Value`).
//!
//! - The step column is the one whose name stands for `step` (`step`,
//!   `global_step`, `_step`, `Step`, `iteration`, ... or `--field step=NAME`);
//!   the other columns stand for fields through the jsonl table and
//!   `--field` (see [`super::scalars`]). A column `RUN - KEY` reads as `KEY` for
//!   the job `RUN` (a W&B panel export: one job per run); its `__MIN` and
//!   `__MAX` columns are passed over. Columns of no field are ignored and named
//!   once per file.
//! - Empty cells (and missing ones, at the end of a short row) are absent
//!   values; `nan`, `NaN`, `inf`, `-inf`, `Infinity` read as non-finite values.
//!   A step is an unsigned integer or a whole float (`134.0`).
//! - Consecutive rows of the same step are merged into one record (Lightning
//!   writes the training and the validation values of a step as separate
//!   rows); a step with no value of a field (a validation row) yields nothing.
//!   A record's `line` is its first row's line.
//!
//! **Long tables**, one row per value: a header with `key`, `value` and a step
//! column, and perhaps `timestamp` (MLflow's metric history). The rows are
//! pivoted to one record per step, in step order (the time of a step: its
//! last row's); unlike a wide table, such a file is read whole before its
//! first record.
//!
//! A time over 10^11 is taken for milliseconds (MLflow's timestamps) and read
//! as seconds. A row whose step or value cannot be read is a [`Skipped`] line
//! naming the column and the cell. A header without a step column, or without
//! a column of any field, is an error of the whole file naming the columns it
//! has and what it needs; so is an empty file.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{self, BufRead, Read};

use super::jsonl::{ALIASES, FieldMap};
use super::scalars::{self, Gather, STEP, Slot, TIME};
use super::{Entry, MAX_LINE, Skipped, Source, SourceError};

/// Whether a first line looks like a CSV header this reader can use: comma
/// separated, with a column that stands for the step and one for another
/// field (or the `key,value` of a long table).
pub fn looks_like_header(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    if !line.contains(',') {
        return false;
    }
    let names: Vec<&str> = line.split(',').map(|c| c.trim().trim_matches('"')).collect();
    let fields = FieldMap::default();
    let field = |n: &str| scalars::slot(n, &fields).map(|(f, _)| f);
    let has_step = names.iter().any(|n| field(n) == Some(STEP));
    let long = names.contains(&"key") && names.contains(&"value");
    has_step
        && (long
            || names
                .iter()
                .any(|n| matches!(column(n, &fields), Some((_, f, _)) if f != STEP && f != TIME)))
}

/// What a column name stands for: the run it belongs to (`RUN - KEY`), the
/// field and the preference; `None` for a column of no field.
fn column<'a>(name: &'a str, fields: &FieldMap) -> Option<(Option<&'a str>, usize, usize)> {
    if let Some((f, p)) = scalars::slot(name, fields) {
        return Some((None, f, p));
    }
    let (run, key) = name.split_once(" - ")?;
    scalars::slot(key, fields).map(|(f, p)| (Some(run), f, p))
}

/// How a table's columns are read.
enum Layout {
    Wide {
        step: usize,
        /// Column index, job index, slot.
        columns: Vec<(usize, usize, (usize, usize))>,
        jobs: Vec<String>,
    },
    Long {
        step: usize,
        key: usize,
        value: usize,
        time: Option<usize>,
    },
}

/// Reads one CSV file; see the module docs.
pub struct Reader {
    rows: ::csv::Reader<LineCap<Box<dyn BufRead>>>,
    job: String,
    layout: Option<Layout>,
    /// The header's column names.
    names: Vec<String>,
    row: ::csv::ByteRecord,
    /// The step being gathered, per job of a wide table.
    pending: Vec<Option<Gather>>,
    pending_step: Option<u64>,
    out: VecDeque<Entry>,
    done: bool,
}

impl Reader {
    pub fn new(input: Box<dyn BufRead>, job: &str) -> Self {
        let rows = ::csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(false)
            .from_reader(LineCap {
                input,
                run: 0,
                window: VecDeque::new(),
                start: 0,
            });
        Self {
            rows,
            job: job.to_owned(),
            layout: None,
            names: Vec::new(),
            row: ::csv::ByteRecord::new(),
            pending: Vec::new(),
            pending_step: None,
            out: VecDeque::new(),
            done: false,
        }
    }

    /// Reads the next row into `row`: false at the end.
    fn read_row(&mut self) -> Result<bool, SourceError> {
        self.rows.read_byte_record(&mut self.row).map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            match e.into_kind() {
                ::csv::ErrorKind::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                    SourceError::Invalid(format!("line {}: {e}", line.max(1)))
                }
                ::csv::ErrorKind::Io(e) => SourceError::Read(e),
                other => SourceError::Invalid(format!("line {line}: {other:?}")),
            }
        })
    }

    /// The line the row read last starts on.
    fn line(&mut self) -> usize {
        match self.row.position() {
            Some(p) => self.rows.get_mut().line_at(p),
            None => 0,
        }
    }

    /// Reads the header and settles the layout.
    fn header(&mut self, fields: &FieldMap, ignored: &mut BTreeSet<String>) -> Result<Layout, SourceError> {
        if !self.read_row()? {
            return Err(SourceError::Invalid("the file is empty: no header line".to_owned()));
        }
        self.line();
        let Ok(mut names) = self
            .row
            .iter()
            .map(|c| String::from_utf8(c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
        else {
            return Err(SourceError::Invalid("the header line is not UTF-8 text".to_owned()));
        };
        if let Some(first) = names.first_mut().filter(|n| n.starts_with('\u{feff}')) {
            first.remove(0);
        }
        let have = || {
            let shown: Vec<String> = names.iter().take(20).map(|n| short(n)).collect();
            let more = if names.len() > 20 { ", ..." } else { "" };
            format!("{}{more}", shown.join(", "))
        };
        let step = names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| scalars::slot(n, fields).filter(|(f, _)| *f == STEP).map(|(_, p)| (p, i)))
            .min()
            .map(|(_, i)| i)
            .ok_or_else(|| {
                SourceError::Invalid(format!(
                    "no step column in the header (columns: {}); a step column is named {} or {}, or --field step=COLUMN names it",
                    have(),
                    ALIASES[STEP].0,
                    ALIASES[STEP].1.join(", ")
                ))
            })?;
        let index = |name: &str| names.iter().position(|n| n == name);
        if let (Some(key), Some(value)) = (index("key"), index("value")) {
            let time = (names.iter()).position(|n| scalars::slot(n, fields).is_some_and(|(f, _)| f == TIME));
            self.names = names;
            return Ok(Layout::Long { step, key, value, time });
        }
        let mut jobs = vec![self.job.clone()];
        let mut columns = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if i == step || name.ends_with("__MIN") || name.ends_with("__MAX") {
                continue;
            }
            match column(name, fields) {
                Some((_, STEP, _)) => {}
                Some((run, f, p)) => {
                    let job = run.map_or(0, |run| {
                        jobs.iter().position(|j| j == run).unwrap_or_else(|| {
                            jobs.push(run.to_owned());
                            jobs.len() - 1
                        })
                    });
                    columns.push((i, job, (f, p)));
                }
                None => scalars::note_ignored(ignored, name),
            }
        }
        if !columns.iter().any(|(_, _, (f, _))| *f != TIME) {
            let names: Vec<&str> = ALIASES[1..TIME].iter().map(|(f, _)| *f).collect();
            return Err(SourceError::Invalid(format!(
                "no column of a field in the header (columns: {}); it needs one for {} (under a name `gradguard replay --help` lists, or named with --field FIELD=COLUMN)",
                have(),
                names.join(", ")
            )));
        }
        self.names = names;
        Ok(Layout::Wide { step, columns, jobs })
    }

    /// The row's cell at `i` as text, `None` when empty or missing.
    fn cell(&self, i: usize) -> Option<String> {
        let c = self.row.get(i)?;
        let text = String::from_utf8_lossy(c);
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    fn step(&self, i: usize) -> Result<u64, String> {
        let name = short(&self.names[i]);
        match self.cell(i) {
            None => Err(format!("column {name:?} (the step) is empty")),
            Some(t) => scalars::step(&t)
                .ok_or_else(|| format!("column {name:?}: expected an unsigned integer, got {:?}", short(&t))),
        }
    }

    /// Reads one row of a wide table into the step being gathered.
    fn wide_row(&mut self, step_at: usize, columns: &[(usize, usize, (usize, usize))], jobs: &[String]) {
        let line = self.line();
        let step = match self.step(step_at) {
            Ok(s) => s,
            Err(reason) => return self.out.push_back(Err(Skipped { line, reason })),
        };
        let mut values = Vec::with_capacity(columns.len());
        for &(i, job, slot) in columns {
            let Some(text) = self.cell(i) else { continue };
            match scalars::float(&text) {
                Some(x) => values.push((job, slot, x)),
                None => {
                    let reason = format!(
                        "column {:?}: expected a number, got {:?}",
                        short(&self.names[i]),
                        short(&text)
                    );
                    return self.out.push_back(Err(Skipped { line, reason }));
                }
            }
        }
        if self.pending_step != Some(step) {
            self.flush(jobs);
            self.pending_step = Some(step);
        }
        self.pending.resize(jobs.len(), None);
        for (job, slot, x) in values {
            let g = self.pending[job].get_or_insert_with(|| Gather::new(step, line));
            g.put(slot, seconds(slot, x));
        }
    }

    /// Queues the records of the step being gathered.
    fn flush(&mut self, jobs: &[String]) {
        for (g, job) in self.pending.iter_mut().zip(jobs) {
            if let Some(entry) = g.take().and_then(|g| g.finish(job)) {
                self.out.push_back(entry);
            }
        }
    }

    /// Reads a whole long table and queues its records in step order.
    fn long(
        &mut self,
        (step_at, key, value, time): (usize, usize, usize, Option<usize>),
        fields: &FieldMap,
        ignored: &mut BTreeSet<String>,
    ) -> Result<(), SourceError> {
        let mut steps: BTreeMap<u64, Gather> = BTreeMap::new();
        let mut slots: HashMap<String, Slot> = HashMap::new();
        while self.read_row()? {
            let line = self.line();
            let (Some(name), Some(text)) = (self.cell(key), self.cell(value)) else {
                continue;
            };
            let step = match self.step(step_at) {
                Ok(s) => s,
                Err(reason) => {
                    self.out.push_back(Err(Skipped { line, reason }));
                    continue;
                }
            };
            let slot = *slots
                .entry(name.clone())
                .or_insert_with(|| scalars::slot(&name, fields));
            let Some(slot) = slot else {
                scalars::note_ignored(ignored, &name);
                continue;
            };
            let when = time.and_then(|t| self.cell(t)).and_then(|t| scalars::float(&t));
            match scalars::float(&text) {
                Some(x) => {
                    let g = steps.entry(step).or_insert_with(|| Gather::new(step, line));
                    g.put(slot, seconds(slot, x));
                    if let Some(t) = when {
                        g.put((TIME, usize::MAX - 1), seconds((TIME, 0), t));
                    }
                }
                None => {
                    let reason = format!("key {:?}: expected a number, got {:?}", short(&name), short(&text));
                    self.out.push_back(Err(Skipped { line, reason }));
                }
            }
        }
        let job = self.job.clone();
        self.out.extend(steps.values().filter_map(|g| g.finish(&job)));
        Ok(())
    }
}

/// A time value in seconds: one over 10^11 is taken for milliseconds.
fn seconds((field, _): (usize, usize), x: f64) -> f64 {
    if field == TIME && x > 1e11 { x / 1000.0 } else { x }
}

/// A name or a cell as an error message shows it, shortened.
fn short(text: &str) -> String {
    let cut = (0..=40.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let s: String = text[..cut]
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if cut < text.len() { format!("{s}...") } else { s }
}

impl Source for Reader {
    fn next_entry(&mut self, fields: &FieldMap, ignored: &mut BTreeSet<String>) -> Option<Result<Entry, SourceError>> {
        loop {
            if let Some(entry) = self.out.pop_front() {
                return Some(Ok(entry));
            }
            if self.done {
                return None;
            }
            let result = self.advance(fields, ignored);
            if let Err(e) = result {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

impl Reader {
    /// Reads what yields the next entries: the header, a row, or a whole long
    /// table.
    fn advance(&mut self, fields: &FieldMap, ignored: &mut BTreeSet<String>) -> Result<(), SourceError> {
        let layout = match self.layout.take() {
            Some(l) => l,
            None => self.header(fields, ignored)?,
        };
        match &layout {
            Layout::Long { step, key, value, time } => {
                self.done = true;
                self.long((*step, *key, *value, *time), fields, ignored)?;
            }
            Layout::Wide { step, columns, jobs } => {
                if self.read_row()? {
                    self.wide_row(*step, columns, jobs);
                } else {
                    self.done = true;
                    self.flush(jobs);
                }
            }
        }
        self.layout = Some(layout);
        Ok(())
    }
}

/// Fails a read once a line runs over [`MAX_LINE`] bytes, so that a file
/// without newlines cannot make the CSV parser buffer it whole; keeps the
/// bytes read ahead of the last row, to tell on which line a row starts.
struct LineCap<R> {
    input: R,
    /// Bytes since the last newline.
    run: usize,
    /// The bytes from offset `start` on.
    window: VecDeque<u8>,
    start: u64,
}

impl<R> LineCap<R> {
    /// The line a row at `pos` starts on. The parser's position of a row is
    /// where it began to read it: with `\r\n` endings and after blank lines,
    /// before line ends that belong to no row.
    fn line_at(&mut self, pos: &::csv::Position) -> usize {
        let drop = (pos.byte().saturating_sub(self.start) as usize).min(self.window.len());
        self.window.drain(..drop);
        self.start += drop as u64;
        let mut line = pos.line() as usize;
        for &b in &self.window {
            match b {
                b'\n' => line += 1,
                b'\r' => {}
                _ => break,
            }
        }
        line
    }
}

impl<R: Read> Read for LineCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        let chunk = &buf[..n];
        self.window.extend(chunk);
        self.run = match chunk.iter().rposition(|&b| b == b'\n') {
            Some(i) => n - i - 1,
            None => self.run + n,
        };
        if self.run > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line is longer than {} MiB", MAX_LINE >> 20),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Record;
    use std::io::Cursor;

    fn read_with(text: &[u8], fields: &FieldMap) -> (Result<Vec<Entry>, String>, BTreeSet<String>) {
        let mut reader = Reader::new(Box::new(Cursor::new(text.to_vec())), "file");
        let mut ignored = BTreeSet::new();
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry(fields, &mut ignored) {
            match e {
                Ok(e) => out.push(e),
                Err(SourceError::Invalid(m)) => return (Err(m), ignored),
                Err(SourceError::Read(e)) => return (Err(e.to_string()), ignored),
            }
        }
        (Ok(out), ignored)
    }

    fn records(text: &str) -> Vec<Record> {
        let (entries, _) = read_with(text.as_bytes(), &FieldMap::default());
        entries.unwrap().into_iter().map(Result::unwrap).collect()
    }

    fn error(text: &[u8]) -> String {
        read_with(text, &FieldMap::default()).0.unwrap_err()
    }

    /// (line, step, loss, grad_norm, lr)
    type Row = (usize, u64, Option<f64>, Option<f64>, Option<f64>);

    fn rows(records: &[Record]) -> Vec<Row> {
        records
            .iter()
            .map(|r| {
                (
                    r.line,
                    r.summary.step,
                    r.summary.loss,
                    r.summary.grad_norm,
                    r.summary.lr,
                )
            })
            .collect()
    }

    #[test]
    fn lightning_metrics_merge_a_steps_rows() {
        // CSVLogger: sorted columns, \r\n, a validation row after the train row
        // of the same step, an epoch-end row.
        let text = "epoch,grad_2.0_norm_total,lr-SGD,step,train_loss,val_loss\r\n\
                    0,1.5,0.1,1,2.5,\r\n\
                    0,1.25,0.1,2,nan,\r\n\
                    0,,,2,,2.75\r\n\
                    1,inf,0.05,3,2.0,\r\n\
                    1,,,4,,2.5\r\n";
        let (entries, ignored) = read_with(text.as_bytes(), &FieldMap::default());
        let recs: Vec<Record> = entries.unwrap().into_iter().map(Result::unwrap).collect();
        let got = rows(&recs);
        assert_eq!(got[0], (2, 1, Some(2.5), Some(1.5), Some(0.1)));
        assert_eq!((got[1].0, got[1].1, got[1].3), (3, 2, Some(1.25)));
        assert!(got[1].2.unwrap().is_nan());
        assert_eq!(got[2], (5, 3, Some(2.0), Some(f64::INFINITY), Some(0.05)));
        assert_eq!(got.len(), 3, "step 4 holds only a validation value");
        assert_eq!(recs[0].job, "file");
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["epoch", "val_loss"]);
    }

    #[test]
    fn wandb_history_and_panel_exports() {
        let recs = records(
            "\u{feff}_step,train/loss,_runtime,_timestamp,train/grad_norm\n\
             0,3.5,1.2,1700000000.5,1.0\n\
             1,3.25,2.4,1700000001.5,\n",
        );
        assert_eq!(
            rows(&recs),
            [(2, 0, Some(3.5), Some(1.0), None), (3, 1, Some(3.25), None, None)]
        );
        assert_eq!(recs[0].summary.time, Some(1_700_000_000.5));

        // A panel export of two runs: one job per run; __MIN/__MAX passed over.
        let text = "\"Step\",\"run-a - train/loss\",\"run-a - train/loss__MIN\",\"run-a - train/loss__MAX\",\"run-b - train/loss\"\n\
                    10,2.5,2.4,2.6,3.5\n\
                    20,,,,3.25\n";
        let (entries, ignored) = read_with(text.as_bytes(), &FieldMap::default());
        let recs: Vec<Record> = entries.unwrap().into_iter().map(Result::unwrap).collect();
        let got: Vec<(&str, u64, Option<f64>)> = recs
            .iter()
            .map(|r| (r.job.as_str(), r.summary.step, r.summary.loss))
            .collect();
        assert_eq!(
            got,
            [
                ("run-a", 10, Some(2.5)),
                ("run-b", 10, Some(3.5)),
                ("run-b", 20, Some(3.25))
            ]
        );
        assert!(ignored.is_empty(), "{ignored:?}");
    }

    #[test]
    fn long_tables_are_pivoted_by_step() {
        // MLflow's metric history: grouped by key, timestamps in milliseconds.
        let recs = records(
            "key,value,timestamp,step\n\
             loss,2.5,1700000000000,1\n\
             loss,2.25,1700000001000,2\n\
             lr,0.1,1700000000000,1\n\
             lr,0.1,1700000001000,2\n\
             grad_norm,NaN,1700000001000,2\n\
             accuracy,0.5,1700000001000,2\n",
        );
        let got = rows(&recs);
        assert_eq!(got[0], (2, 1, Some(2.5), None, Some(0.1)));
        assert_eq!((got[1].0, got[1].1, got[1].2), (3, 2, Some(2.25)));
        assert!(got[1].3.unwrap().is_nan());
        assert_eq!(
            recs[0].summary.time,
            Some(1_700_000_000.0),
            "milliseconds read as seconds"
        );
    }

    #[test]
    fn bad_cells_are_skipped_with_their_line_and_column() {
        let text = "step,loss\n1,2.0\n\n2,abc\n-3,1.0\n,1.0\n4.0,1.5\n";
        let (entries, _) = read_with(text.as_bytes(), &FieldMap::default());
        let entries = entries.unwrap();
        let skips: Vec<(usize, String)> = entries
            .iter()
            .filter_map(|e| e.as_ref().err())
            .map(|s| (s.line, s.reason.clone()))
            .collect();
        assert_eq!(
            skips,
            [
                (4, "column \"loss\": expected a number, got \"abc\"".to_owned()),
                (
                    5,
                    "column \"step\": expected an unsigned integer, got \"-3\"".to_owned()
                ),
                (6, "column \"step\" (the step) is empty".to_owned()),
            ]
        );
        let steps: Vec<u64> = entries
            .iter()
            .filter_map(|e| e.as_ref().ok())
            .map(|r| r.summary.step)
            .collect();
        assert_eq!(steps, [1, 4]);
    }

    #[test]
    fn a_header_without_the_needed_columns_is_an_error_naming_them() {
        let e = error(b"epoch,acc\n1,0.5\n");
        assert!(
            e.starts_with(
                "no step column in the header (columns: epoch, acc); a step column is named step or global_step"
            ),
            "{e}"
        );
        let e = error(b"step,epoch,val_loss\n1,0,2.0\n");
        assert!(
            e.starts_with("no column of a field in the header (columns: step, epoch, val_loss); it needs one for loss, grad_norm, lr, loss_scale"),
            "{e}"
        );
        assert_eq!(error(b""), "the file is empty: no header line");
        assert_eq!(error(b"\xff\xfe\x00junk,\x80\n"), "the header line is not UTF-8 text");
        let mut long = b"step,loss\n".to_vec();
        long.extend(std::iter::repeat_n(b'1', MAX_LINE + 10));
        assert!(error(&long).contains("a line is longer than 16 MiB"));
        // Only a header: no records, no error (replay says none was read).
        assert!(read_with(b"step,loss\n", &FieldMap::default()).0.unwrap().is_empty());
    }

    #[test]
    fn field_map_names_columns() {
        let mut fields = FieldMap::default();
        fields.add("step=Iter").unwrap();
        fields.add("loss=Value").unwrap();
        let (entries, _) = read_with(b"Wall time,Iter,Value\n1700000000.5,3,0.75\n", &fields);
        let r = entries.unwrap().remove(0).unwrap();
        assert_eq!(
            (r.summary.step, r.summary.loss, r.summary.time),
            (3, Some(0.75), Some(1_700_000_000.5))
        );
    }

    #[test]
    fn detects_headers() {
        assert!(looks_like_header(b"epoch,step,train_loss,lr-SGD"));
        assert!(looks_like_header(b"\"Step\",\"run - train/loss\""));
        assert!(looks_like_header(b"key,value,timestamp,step"));
        assert!(!looks_like_header(b"step,epoch"));
        assert!(!looks_like_header(b"loss,lr"));
        assert!(!looks_like_header(b"step loss"));
    }
}
