//! Readers for recorded training logs, used by `gradguard replay`.
//!
//! Six formats, each in its own module:
//!
//! - [`jsonl`]: the project's own trace schema, one JSON object per line;
//! - [`hf`]: a Hugging Face `trainer_state.json` (its `log_history`);
//! - [`llmc`]: an llm.c text log, either its `main.log` (`s:STEP trl:LOSS
//!   lr:LR norm:NORM`) or the training program's standard output (`step N/T |
//!   loss L (z)| norm G (z)| lr LR | ...` lines amid a banner and evaluation
//!   output);
//! - [`megatron`]: Megatron-LM's and NeMo's `iteration N/ T | ...` lines;
//! - [`tensorboard`]: TensorBoard event files (TFRecords of `Event`s), whose
//!   scalars' tags stand for fields through jsonl's table;
//! - [`csv`]: CSV tables with a header (Lightning's `metrics.csv`, W&B and
//!   MLflow exports), whose columns stand for fields the same way.
//!
//! The binary formats and CSV pull their own records from the input
//! ([`Source`]); a record's `line` is then the event record's number
//! (tensorboard) or the row's first line (csv).
//!
//! [`Reader::open`] picks the format (given, or detected from the file name and
//! its first lines, see [`Format::detect`]) and yields one [`Entry`] per input
//! record: a [`Record`] for the engine, or a [`Skipped`] line with a reason.
//! Lines that carry no training step (blank lines, comments, evaluation lines,
//! and in llm.c's standard output every line but the step lines) are passed
//! over silently and yield nothing. Only failures of the input as a whole
//! (cannot open, read error, a `trainer_state.json` that is not JSON) are
//! [`TraceError`]s.
//!
//! Guarantees common to every format:
//! - line numbers are 1-based; `\n` and `\r\n` line endings are both accepted, and
//!   a UTF-8 byte-order mark at the start is ignored;
//! - a line that is not UTF-8, or longer than [`MAX_LINE`], is skipped, never fatal;
//! - values are passed through as read, non-finite ones included (reporting them
//!   is the engine's job); no input makes a reader panic.

pub mod csv;
pub mod hf;
mod json;
pub mod jsonl;
mod lines;
pub mod llmc;
pub mod megatron;
mod scalars;
pub mod tail;
pub mod tensorboard;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::Path;
use std::str::FromStr;

use crate::model::Summary;
pub(crate) use json::{number, quote_nonfinite, show};
use lines::{Line, read_detection_head, read_head, read_line};

/// The longest line a line-based reader accepts; a longer one is skipped, so a
/// file without newlines cannot make the reader buffer it whole.
pub const MAX_LINE: usize = 16 << 20;

/// How much of the input auto-detection (and the choice between llm.c's two
/// forms, see [`llmc::dialect`]) may look at.
const DETECT_LIMIT: usize = 64 << 10;

/// A supported log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jsonl,
    Hf,
    Llmc,
    Megatron,
    Tensorboard,
    Csv,
}

/// The format names, as error messages list them.
const NAMES: &str = "jsonl, hf, llmc, megatron, tensorboard or csv";

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Jsonl,
        Format::Hf,
        Format::Llmc,
        Format::Megatron,
        Format::Tensorboard,
        Format::Csv,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Hf => "hf",
            Format::Llmc => "llmc",
            Format::Megatron => "megatron",
            Format::Tensorboard => "tensorboard",
            Format::Csv => "csv",
        }
    }

    /// What a [`Skipped`]'s `line` counts in this format.
    pub fn unit(self) -> &'static str {
        match self {
            Format::Tensorboard => "record",
            Format::Hf => "entry",
            _ => "line",
        }
    }

    /// The format a file name alone settles: `trainer_state.json` (hf),
    /// `events.out.tfevents.*` (tensorboard), `*.csv` (csv).
    pub fn by_name(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?;
        if name == "trainer_state.json" {
            Some(Format::Hf)
        } else if name.starts_with("events.out.tfevents.") {
            Some(Format::Tensorboard)
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            Some(Format::Csv)
        } else {
            None
        }
    }

    /// Guesses the format from the file name and the first bytes of the input
    /// (ideally at least its first non-blank line, and up to the first
    /// `step N/T |` line when the first line settles nothing). `None` when
    /// nothing fits.
    ///
    /// A name [`Format::by_name`] knows settles it; so does a first TFRecord
    /// header whose length checksum verifies (tensorboard). A first line that
    /// is a lone `{` (a pretty-printed JSON document) or that mentions
    /// `"log_history"` is hf; any other first line starting with `{` is jsonl;
    /// `s:123 ...` is llmc (`main.log`); a comma-separated header with a step
    /// column and a column of another field is csv. Otherwise, a `step N/T |`
    /// line anywhere in `head` is llmc (standard output, whose first lines are
    /// a banner). Blank lines and `#` comments are passed over; with no content
    /// at all, the extension decides (`.jsonl`/`.ndjson`: jsonl, `.json`: hf,
    /// `.log`: llmc).
    pub fn detect(path: &Path, head: &[u8]) -> Option<Format> {
        if let Some(format) = Format::by_name(path) {
            return Some(format);
        }
        if tensorboard::looks_like(head) {
            return Some(Format::Tensorboard);
        }
        let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.trim_ascii())
            .filter(|l| !l.is_empty() && !l.starts_with(b"#"));
        let Some(first) = lines.next() else {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            return match ext {
                "jsonl" | "ndjson" => Some(Format::Jsonl),
                "json" => Some(Format::Hf),
                "log" => Some(Format::Llmc),
                _ => None,
            };
        };
        if let Some(format) = Format::by_first_line(first) {
            return Some(format);
        }
        // Both start with other output (a banner, the arguments): the first
        // step line of either decides.
        std::iter::once(first).chain(lines).find_map(|l| {
            if llmc::looks_like_stdout(l) {
                Some(Format::Llmc)
            } else if megatron::looks_like(l) {
                Some(Format::Megatron)
            } else {
                None
            }
        })
    }

    /// The format a first line with content settles, if any.
    fn by_first_line(first: &[u8]) -> Option<Format> {
        if first == b"{" || contains(first, b"\"log_history\"") {
            Some(Format::Hf)
        } else if first.starts_with(b"{") {
            Some(Format::Jsonl)
        } else if llmc::looks_like(first) {
            Some(Format::Llmc)
        } else if csv::looks_like_header(first) {
            Some(Format::Csv)
        } else {
            None
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown trace format {s:?} (expected {NAMES})"))
    }
}

/// One training step of one worker, ready for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub job: String,
    /// The layer names, in the order of `summary.layers`, when the record has
    /// per-layer values (jsonl only).
    pub layer_names: Option<Vec<String>>,
    pub summary: Summary,
    /// Where the record came from: the 1-based line (for hf: the position in
    /// `log_history`, see [`hf`]; for tensorboard: the number of the step's
    /// first event record in the file; for csv: the step's first row's line).
    pub line: usize,
}

/// An input line that was not usable, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// What a reader yields per record-bearing line.
pub type Entry = Result<Record, Skipped>;

/// Failures of an input as a whole; a single bad line is a [`Skipped`] instead.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot tell the format of {path} (use --format {NAMES})")]
    Undetected { path: String },
    #[error("{path} is not a valid {format} trace: {message}")]
    Invalid {
        path: String,
        format: Format,
        message: String,
    },
}

/// Yields the entries of one input, in input order.
pub struct Reader {
    path: String,
    format: Format,
    inner: Inner,
    /// Keys the jsonl lines carried that are no gradguard field (the first
    /// [`jsonl::MAX_IGNORED`]), to report once.
    ignored: BTreeSet<String>,
    /// The user's keys for fields (jsonl).
    fields: jsonl::FieldMap,
}

/// A line-based format's parser: the text, its 1-based number and the default
/// job to an entry, `None` for lines that yield nothing.
type ParseLine = fn(&str, usize, &str) -> Option<Entry>;

enum Inner {
    Lines {
        input: Box<dyn BufRead>,
        line: usize,
        buf: Vec<u8>,
        job: String,
        parse: ParseLine,
    },
    Entries(std::vec::IntoIter<Entry>),
    /// A reader that frames its own records (tensorboard, csv).
    Stream(Box<dyn Source>),
    /// After a read error: nothing more.
    Done,
}

/// A format that pulls its records from the input itself, one at a time.
pub(crate) trait Source {
    /// The next entry, reading names through `fields` and noting the names
    /// of no field in `ignored`; `None` at the end.
    fn next_entry(
        &mut self,
        fields: &jsonl::FieldMap,
        ignored: &mut BTreeSet<String>,
    ) -> Option<Result<Entry, SourceError>>;
}

/// Why a [`Source`] cannot go on.
#[derive(Debug)]
pub(crate) enum SourceError {
    Read(io::Error),
    /// The input as a whole is not of the format: why.
    Invalid(String),
}

impl Reader {
    /// Opens a trace file, or standard input for `-`, with the given format or
    /// the detected one. Records without a job of their own get the file stem
    /// (hf: the run directory, see [`hf`]), or `stdin`.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Reader, TraceError> {
        let name = path.display().to_string();
        let input: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            let file = File::open(path).map_err(|source| TraceError::Open {
                path: name.clone(),
                source,
            })?;
            Box::new(BufReader::with_capacity(64 << 10, file))
        };
        Self::from_named_input(path, input, format)
    }

    /// Reads `input` as the contents of `path`: in the given format, or the one
    /// detected from `path`'s name and the input's first lines. `path` names
    /// the input in errors and gives the default job (see [`Reader::open`]);
    /// `gradguard follow` hands a growing file's contents this way.
    pub fn from_named_input(
        path: &Path,
        input: Box<dyn BufRead>,
        format: Option<Format>,
    ) -> Result<Reader, TraceError> {
        let name = path.display().to_string();
        let (format, input) = match format.or_else(|| Format::by_name(path)) {
            Some(f) => (f, input),
            None => {
                let (head, rest) = read_detection_head(input).map_err(|source| TraceError::Read {
                    path: name.clone(),
                    source,
                })?;
                let format = Format::detect(path, &head).ok_or(TraceError::Undetected { path: name.clone() })?;
                let input: Box<dyn BufRead> = Box::new(Cursor::new(head).chain(rest));
                (format, input)
            }
        };
        Self::from_input(input, format, &name, &default_job(path, format))
    }

    /// Reads `input` in `format`; `name` names it in errors, `job` is the job of
    /// records that do not name their own. For llmc, the first lines (up to the
    /// first step line) tell which of llm.c's two forms it is in.
    pub fn from_input(
        input: impl BufRead + 'static,
        format: Format,
        name: &str,
        job: &str,
    ) -> Result<Reader, TraceError> {
        let mut input: Box<dyn BufRead> = Box::new(input);
        if matches!(format, Format::Tensorboard | Format::Csv) {
            let source: Box<dyn Source> = if format == Format::Tensorboard {
                Box::new(tensorboard::Reader::new(input, job))
            } else {
                Box::new(csv::Reader::new(input, job))
            };
            return Ok(Reader {
                path: name.to_owned(),
                format,
                inner: Inner::Stream(source),
                ignored: BTreeSet::new(),
                fields: jsonl::FieldMap::default(),
            });
        }
        let parse: ParseLine = match format {
            Format::Tensorboard | Format::Csv => unreachable!("read above"),
            Format::Jsonl => jsonl::parse_line,
            Format::Megatron => megatron::parse_line,
            Format::Llmc => {
                let settled = |line: &[u8]| llmc::settles(line).is_some();
                let (head, rest) = read_head(input, settled).map_err(|source| TraceError::Read {
                    path: name.to_owned(),
                    source,
                })?;
                let dialect = llmc::dialect(&head);
                input = Box::new(Cursor::new(head).chain(rest));
                match dialect {
                    llmc::Dialect::MainLog => llmc::parse_line,
                    llmc::Dialect::Stdout => llmc::parse_stdout_line,
                }
            }
            Format::Hf => {
                let mut text = String::new();
                input.read_to_string(&mut text).map_err(|source| TraceError::Read {
                    path: name.to_owned(),
                    source,
                })?;
                let entries = hf::parse_document(&text, job).map_err(|message| TraceError::Invalid {
                    path: name.to_owned(),
                    format,
                    message,
                })?;
                return Ok(Reader {
                    path: name.to_owned(),
                    format,
                    inner: Inner::Entries(entries.into_iter()),
                    ignored: BTreeSet::new(),
                    fields: jsonl::FieldMap::default(),
                });
            }
        };
        let inner = Inner::Lines {
            input,
            line: 0,
            buf: Vec::new(),
            job: job.to_owned(),
            parse,
        };
        Ok(Reader {
            path: name.to_owned(),
            format,
            inner,
            ignored: BTreeSet::new(),
            fields: jsonl::FieldMap::default(),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Reads the user's keys for fields (jsonl, tensorboard, csv; the other
    /// formats have fixed names).
    pub fn with_fields(mut self, fields: jsonl::FieldMap) -> Self {
        self.fields = fields;
        self
    }

    /// The keys of the jsonl lines (the tags, the columns) read so far that
    /// are no gradguard field and were ignored (the first
    /// [`jsonl::MAX_IGNORED`] names).
    pub fn ignored_keys(&self) -> &BTreeSet<String> {
        &self.ignored
    }

    /// The input's name as given to `open` (`-` for standard input).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Iterator for Reader {
    type Item = Result<Entry, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Inner::Lines {
            input,
            line,
            buf,
            job,
            parse,
        } = &mut self.inner
        else {
            return match &mut self.inner {
                Inner::Entries(entries) => entries.next().map(Ok),
                Inner::Stream(source) => {
                    let next = source.next_entry(&self.fields, &mut self.ignored)?;
                    let path = self.path.clone();
                    let error = match next {
                        Ok(entry) => return Some(Ok(entry)),
                        Err(SourceError::Read(source)) => TraceError::Read { path, source },
                        Err(SourceError::Invalid(message)) => TraceError::Invalid {
                            path,
                            format: self.format,
                            message,
                        },
                    };
                    self.inner = Inner::Done;
                    Some(Err(error))
                }
                _ => None,
            };
        };
        loop {
            let read = match read_line(input.as_mut(), buf) {
                Ok(r) => r,
                Err(source) => {
                    self.inner = Inner::Done;
                    let path = self.path.clone();
                    return Some(Err(TraceError::Read { path, source }));
                }
            };
            *line += 1;
            let text = match read {
                Line::Eof => return None,
                Line::TooLong => Err(format!("line is longer than {} MiB", MAX_LINE >> 20)),
                Line::Ok => std::str::from_utf8(buf).map_err(|_| "line is not valid UTF-8".to_owned()),
            };
            let entry = match text {
                Ok(t) => {
                    let t = t.strip_prefix('\u{feff}').filter(|_| *line == 1).unwrap_or(t);
                    if self.format == Format::Jsonl {
                        jsonl::parse_line_noting(t, *line, job, &self.fields, &mut self.ignored)
                    } else {
                        parse(t, *line, job)
                    }
                }
                Err(reason) => Some(Err(Skipped { line: *line, reason })),
            };
            if let Some(e) = entry {
                return Some(Ok(e));
            }
        }
    }
}

/// The job of records that do not name one: `stdin`, or the file stem (hf: the
/// run directory; tensorboard: the directory of the event file).
pub fn default_job(path: &Path, format: Format) -> String {
    if path == Path::new("-") {
        return "stdin".to_owned();
    }
    if format == Format::Hf
        && let Some(dir) = hf::run_dir(path)
    {
        return dir;
    }
    if format == Format::Tensorboard
        && let Some(dir) = path.parent().and_then(|p| p.file_name())
    {
        return dir.to_string_lossy().into_owned();
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "trace".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn detect(name: &str, head: &str) -> Option<Format> {
        Format::detect(Path::new(name), head.as_bytes())
    }

    #[test]
    fn parses_format_names() {
        assert_eq!("jsonl".parse::<Format>(), Ok(Format::Jsonl));
        assert_eq!("hf".parse::<Format>(), Ok(Format::Hf));
        assert_eq!("llmc".parse::<Format>(), Ok(Format::Llmc));
        assert_eq!("csv".parse::<Format>(), Ok(Format::Csv));
        assert_eq!("tensorboard".parse::<Format>(), Ok(Format::Tensorboard));
        let err = "xml".parse::<Format>().unwrap_err();
        assert!(err.contains("\"xml\"") && err.contains("tensorboard or csv"), "{err}");
    }

    #[test]
    fn detects_formats_from_content_and_name() {
        assert_eq!(detect("x/trainer_state.json", ""), Some(Format::Hf));
        assert_eq!(detect("a.json", "{\n  \"best_metric\": null,\n"), Some(Format::Hf));
        assert_eq!(detect("a.txt", "{\"log_history\": []}"), Some(Format::Hf));
        assert_eq!(detect("a.txt", "\n# comment\n{\"step\": 1}\n"), Some(Format::Jsonl));
        assert_eq!(detect("a.txt", "\u{feff}{\"step\": 1}\r\n"), Some(Format::Jsonl));
        assert_eq!(
            detect("main.log", "s:0 tel:11.0\ns:0 trl:11.0 lr:0.1 norm:1\n"),
            Some(Format::Llmc)
        );
        assert_eq!(detect("a.txt", "s:12 trl:3.5\r\n"), Some(Format::Llmc));
    }

    #[test]
    fn detects_tensorboard_and_csv() {
        assert_eq!(
            detect("logs/events.out.tfevents.1700000000.host.1.0", ""),
            Some(Format::Tensorboard)
        );
        assert_eq!(detect("metrics.CSV", ""), Some(Format::Csv));
        assert_eq!(detect("a.txt", "epoch,step,train_loss\n0,1,2.5\n"), Some(Format::Csv));
        assert_eq!(detect("a.txt", "key,value,step\n"), Some(Format::Csv));
        let header = [&24u64.to_le_bytes()[..], &[0xa3, 0x7f, 0x4b, 0x22]].concat();
        assert_eq!(Format::detect(Path::new("x"), &header), Some(Format::Tensorboard));
        // The 12 bytes are all detection reads of an event file.
        let mut bytes = header.clone();
        bytes.extend(b"\nmore");
        let (head, mut rest) = read_detection_head(Box::new(Cursor::new(bytes))).unwrap();
        assert_eq!(head, header);
        let mut tail = Vec::new();
        rest.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, b"\nmore");
        assert_eq!(
            default_job(Path::new("runs/bert/events.out.tfevents.1"), Format::Tensorboard),
            "bert"
        );
    }

    #[test]
    fn unknown_content_is_not_detected() {
        assert_eq!(detect("a.txt", "epoch,acc\n1,2.0\n"), None);
        assert_eq!(detect("a.txt", "step,epoch\n1,2.0\n"), None, "no column of a field");
        assert_eq!(detect("a.log", "hello world\n"), None);
        assert_eq!(detect("a.txt", "s:x trl:1\n"), None);
        assert_eq!(detect("a.txt", ""), None);
        assert_eq!(detect("a.jsonl", "\n\n"), Some(Format::Jsonl));
    }

    #[test]
    fn quotes_bare_nonfinite_tokens_outside_strings() {
        assert_eq!(
            quote_nonfinite(r#"{"a": NaN, "b": [Infinity,-Infinity], "c": "NaN Infinity \" NaN"}"#),
            r#"{"a": "NaN", "b": ["Infinity","-Infinity"], "c": "NaN Infinity \" NaN"}"#
        );
        assert!(matches!(quote_nonfinite(r#"{"a": 1}"#), Cow::Borrowed(_)));
        assert_eq!(quote_nonfinite("{\"é\": NaN}"), "{\"é\": \"NaN\"}");
    }

    #[test]
    fn reads_lines_with_crlf_and_overlong_lines() {
        let mut text = b"a\r\nb\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        text.extend(b"\nc");
        let mut input = Cursor::new(text);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            match read_line(&mut input, &mut buf).unwrap() {
                Line::Eof => break,
                Line::TooLong => got.push("<long>".to_owned()),
                Line::Ok => got.push(String::from_utf8(buf.clone()).unwrap()),
            }
        }
        assert_eq!(got, ["a", "b", "<long>", "c"]);
    }

    #[test]
    fn detection_keeps_the_whole_input() {
        let text = "\n# c\n{\"step\": 1}\n{\"step\": 2}\n";
        let (head, mut rest) = read_head(Box::new(Cursor::new(text.as_bytes().to_vec())), |_| true).unwrap();
        assert_eq!(head, b"\n# c\n{\"step\": 1}\n");
        let mut tail = String::new();
        rest.read_to_string(&mut tail).unwrap();
        assert_eq!(tail, "{\"step\": 2}\n");
    }

    /// The start of llm.c's standard output: a banner, then step lines.
    const STDOUT_HEAD: &str = "Multi-GPU support is disabled. Using a single GPU.\n\
        +-----------------------+---------------+\n\
        | Parameter             | Value         |\n\
        | train data pattern    | dev/data/*.bin |\n\
        +-----------------------+---------------+\n\
        allocated 237 MiB for model parameters\n\
        \n\
        val loss 11.007921\n\
        step    1/19560 | loss 11.009662 (+nanz)| norm 15.0789 (+nanz)| lr 8.57e-07 | 4230.95 ms | 31.9% bf16 MFU | 123917 tok/s\n";

    #[test]
    fn detects_llmc_stdout_by_a_step_line_after_the_banner() {
        assert_eq!(detect("a.txt", STDOUT_HEAD), Some(Format::Llmc));
        assert_eq!(detect("a.txt", &STDOUT_HEAD.replace("step ", "stop ")), None);
        assert_eq!(detect("a", "step 5/10 | loss 2.0\n"), Some(Format::Llmc));
        assert_eq!(detect("a", "hello\nstep 5/10 loss 2.0\n"), None, "no '|'");
        // The first line still decides when it can: a step line later does not
        // make a JSON file llm.c.
        assert_eq!(
            detect("a", "{\"step\": 1}\nstep 5/10 | loss 2.0\n"),
            Some(Format::Jsonl)
        );
    }

    #[test]
    fn detection_reads_past_a_banner_to_the_first_stdout_step_line() {
        let text = format!("{STDOUT_HEAD}step    2/19560 | loss 10.9 (+0.00z)| norm 15.2 (+0.00z)| lr 1.71e-06\n");
        let (head, rest) = read_detection_head(Box::new(Cursor::new(text.into_bytes()))).unwrap();
        assert_eq!(head, STDOUT_HEAD.as_bytes(), "no further than the first step line");
        assert_eq!(Format::detect(Path::new("-"), &head), Some(Format::Llmc));
        let input = Cursor::new(head).chain(rest);
        let entries: Vec<Entry> = Reader::from_input(input, Format::Llmc, "t", "job")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let steps: Vec<u64> = entries.iter().map(|e| e.as_ref().unwrap().summary.step).collect();
        assert_eq!(steps, [1, 2], "the banner yields nothing and no line is lost");
        assert_eq!(entries[0].as_ref().unwrap().line, 9);

        // A first line that settles the format stops the reading there.
        let (head, _) = read_detection_head(Box::new(Cursor::new(b"s:0 tel:11\ns:0 trl:11\n".to_vec()))).unwrap();
        assert_eq!(head, b"s:0 tel:11\n");
    }

    #[test]
    fn reader_yields_entries_and_skips() {
        let text = b"{\"step\": 1, \"loss\": NaN}\n\xff\n{\"step\": -3}\n";
        let entries: Vec<Entry> = Reader::from_input(Cursor::new(text.to_vec()), Format::Jsonl, "t", "job")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(entries.len(), 3);
        let rec = entries[0].as_ref().unwrap();
        assert_eq!((rec.job.as_str(), rec.line, rec.summary.step), ("job", 1, 1));
        assert!(rec.summary.loss.unwrap().is_nan());
        assert_eq!(entries[1].as_ref().unwrap_err().reason, "line is not valid UTF-8");
        assert_eq!(entries[2].as_ref().unwrap_err().line, 3);
    }

    #[test]
    fn default_jobs() {
        assert_eq!(default_job(Path::new("-"), Format::Jsonl), "stdin");
        assert_eq!(default_job(Path::new("runs/a.b.jsonl"), Format::Jsonl), "a.b");
        assert_eq!(
            default_job(Path::new("runs/bert/trainer_state.json"), Format::Hf),
            "bert"
        );
        assert_eq!(
            default_job(Path::new("runs/bert/checkpoint-500/trainer_state.json"), Format::Hf),
            "bert"
        );
        assert_eq!(
            default_job(Path::new("trainer_state.json"), Format::Hf),
            "trainer_state"
        );
    }

    proptest::proptest! {
        /// No line, however odd, makes a parser panic.
        #[test]
        fn parsers_never_panic(
            text in "[ -~\\t\r\u{e9}\u{feff}]{0,80}",
            prefix in "(s:[0-9]{1,3} |\\{\"step\": |step +[0-9]{1,3}/[0-9]{0,3} *\\| *(loss|norm|lr)? *)?",
        ) {
            let line = format!("{prefix}{text}");
            let _ = jsonl::parse_line(&line, 1, "j");
            let _ = llmc::parse_line(&line, 1, "j");
            let _ = llmc::parse_stdout_line(&line, 1, "j");
            let _ = megatron::parse_line(&line, 1, "j");
            let _ = llmc::dialect(line.as_bytes());
            let _ = hf::parse_document(&line, "j");
            let _ = Format::detect(Path::new("x"), line.as_bytes());
        }
    }
}
