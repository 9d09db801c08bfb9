//! `gradguard replay`: feeds recorded logs through one engine, in file order.
//!
//! Malformed lines and records the engine refuses (a duplicate or backwards
//! step, a wrong layer count) are counted as skipped and passed over; the
//! first ten of a file are reported on stderr as `FILE:LINE: REASON`, the rest
//! as a count. Exit status: 2 when the command line is wrong (an option, the
//! rules file, `--field`); 1 when an input could not be replayed (missing,
//! unreadable, of no known format, or without a single record: the other
//! files still replay), or, with `--strict`, when a line was skipped; else 0.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::anyhow;
use gradguard::config::RuleBook;
use gradguard::engine::{Engine, EngineError, JobSpec, Output};
use gradguard::trace::{Format, Reader, Record, TraceError, jsonl};

use crate::cli::{Failure, ReplayArgs, warn};
use crate::report::{JsonSink, Sink, Stats, TableSink};
use gradguard::model::Severity;

pub fn run(args: &ReplayArgs) -> Result<ExitCode, Failure> {
    let book = match &args.rules {
        Some(path) => RuleBook::load(path).map_err(Failure::usage)?,
        None => RuleBook::builtin(),
    };
    if args.files.iter().filter(|f| *f == Path::new("-")).count() > 1 {
        return Err(Failure::usage(anyhow!("standard input (-) can be replayed only once")));
    }
    check_inputs(&args.files).map_err(Failure::input)?;
    let mut fields = jsonl::FieldMap::default();
    for spec in &args.field {
        fields.add(spec).map_err(|e| Failure::usage(anyhow!(e)))?;
    }

    let stdout = io::BufWriter::new(io::stdout().lock());
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(JsonSink::new(stdout))
    } else {
        Box::new(TableSink::new(stdout))
    };
    let mut replay = Replay::new(Engine::new(book));
    replay.min_severity = args.min_severity;
    replay.fields = fields;
    let written = replay_all(&mut replay, &args.files, args.format.format(), sink.as_mut())
        .and_then(|()| sink.finish(&replay.stats));
    match written {
        Ok(()) => {}
        // The reader of our output went away (`| head`): nothing left to do.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(Failure::input(anyhow!("cannot write the report: {e}"))),
    }

    let stats = &replay.stats;
    if stats.failed_files > 0 {
        return Ok(ExitCode::from(1));
    }
    if args.strict && stats.skipped > 0 {
        warn(&format!("gradguard: --strict: {} line(s) skipped", stats.skipped));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Fails fast on inputs that cannot be opened, before anything is replayed.
fn check_inputs(files: &[PathBuf]) -> anyhow::Result<()> {
    let stdin = Path::new("-");
    for file in files.iter().filter(|f| *f != stdin) {
        let meta = std::fs::metadata(file).map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
        if meta.is_dir() {
            return Err(anyhow!("cannot read {}: is a directory", file.display()));
        }
    }
    Ok(())
}

fn replay_all(replay: &mut Replay, files: &[PathBuf], format: Option<Format>, sink: &mut dyn Sink) -> io::Result<()> {
    for path in files {
        replay.stats.files += 1;
        if let Err(e) = replay.file(path, format, sink) {
            match e {
                FileError::Trace(e) => {
                    warn(&format!("gradguard: {e}"));
                    replay.stats.failed_files += 1;
                }
                FileError::Output(e) => return Err(e),
            }
        }
    }
    Ok(())
}

enum FileError {
    Trace(TraceError),
    Output(io::Error),
}

struct Replay {
    engine: Engine,
    /// The layer names each job was declared with, so a record repeating them
    /// does not declare again.
    declared: HashMap<String, Vec<String>>,
    out: Output,
    stats: Stats,
    /// Least severity printed; everything is counted.
    min_severity: Severity,
    /// The user's keys for fields (jsonl).
    fields: jsonl::FieldMap,
    /// Lines skipped in the file being read.
    file_skips: usize,
}

/// Skipped lines printed per file; the rest are counted.
const SHOWN_SKIPS: usize = 10;

impl Replay {
    fn new(engine: Engine) -> Self {
        Self {
            engine,
            min_severity: Severity::Info,
            fields: jsonl::FieldMap::default(),
            file_skips: 0,
            declared: HashMap::new(),
            out: Output::default(),
            stats: Stats::new(),
        }
    }

    fn file(&mut self, path: &Path, format: Option<Format>, sink: &mut dyn Sink) -> Result<(), FileError> {
        let mut reader = Reader::open(path, format)
            .map_err(FileError::Trace)?
            .with_fields(self.fields.clone());
        let name = reader.path().to_owned();
        let (mut read, mut first_skip) = (0usize, None);
        self.file_skips = 0;
        for entry in reader.by_ref() {
            match entry.map_err(FileError::Trace)? {
                Ok(record) => {
                    read += 1;
                    self.record(&name, &record, sink).map_err(FileError::Output)?;
                }
                Err(skipped) => {
                    self.stats.unreadable += 1;
                    first_skip.get_or_insert_with(|| format!("line {}: {}", skipped.line, skipped.reason));
                    self.skip(&name, skipped.line, &skipped.reason);
                }
            }
        }
        if self.file_skips > SHOWN_SKIPS {
            warn(&format!(
                "{name}: {} more lines skipped ({} in all)",
                self.file_skips - SHOWN_SKIPS,
                self.file_skips
            ));
        }
        let ignored = reader.ignored_keys();
        if !ignored.is_empty() {
            let names: Vec<&str> = ignored.iter().map(String::as_str).collect();
            let more = if names.len() == jsonl::MAX_IGNORED { ", ..." } else { "" };
            warn(&format!(
                "{name}: ignored keys that are no gradguard field: {}{more} (fields read: see `gradguard replay --help`)",
                names.join(", ")
            ));
        }
        // A file that yields nothing is an error, never a silent "No anomalies".
        if read == 0 {
            let why = first_skip.unwrap_or_else(|| "no line holds a record".to_owned());
            return Err(FileError::Trace(TraceError::Invalid {
                path: name,
                format: reader.format(),
                message: format!("no record could be read ({why})"),
            }));
        }
        Ok(())
    }

    fn record(&mut self, name: &str, record: &Record, sink: &mut dyn Sink) -> io::Result<()> {
        self.out.clear();
        match self.feed(record) {
            Ok(()) => {
                self.stats.records += 1;
                self.stats.job(&record.job).records += 1;
            }
            Err(e) => {
                self.stats.job(&record.job).skipped += 1;
                self.skip(name, record.line, &format!("refused by the engine: {e}"));
                return Ok(());
            }
        }
        for f in &self.out.findings {
            self.stats.count_finding(f);
            if f.severity >= self.min_severity {
                sink.anomaly(f)?;
            }
        }
        for a in &self.out.advice {
            self.stats.count_advice(a);
            if a.severity >= self.min_severity {
                sink.advice(a)?;
            }
        }
        Ok(())
    }

    fn feed(&mut self, record: &Record) -> Result<(), EngineError> {
        if let Some(names) = &record.layer_names
            && self.declared.get(&record.job) != Some(names)
        {
            let spec = JobSpec {
                layer_names: names,
                ..JobSpec::default()
            };
            self.engine.declare(&record.job, &spec)?;
            self.declared.insert(record.job.clone(), names.clone());
        }
        self.engine.observe(&record.job, &record.summary, &mut self.out)
    }

    /// Counts a skipped line; the first [`SHOWN_SKIPS`] of a file are printed,
    /// the rest summed up at its end (see `file`).
    fn skip(&mut self, name: &str, line: usize, reason: &str) {
        self.stats.skipped += 1;
        self.file_skips += 1;
        if self.file_skips <= SHOWN_SKIPS {
            warn(&format!("{name}:{line}: {reason}"));
        }
    }
}
