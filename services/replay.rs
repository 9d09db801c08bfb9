//! `gradguard replay`: feeds recorded logs through one engine, in file order.
//!
//! Malformed lines and records the engine refuses (a duplicate or backwards
//! step, a wrong layer count) are counted as skipped and passed over; the
//! first ten of a file are reported on stderr as `FILE:LINE: REASON` (LINE is
//! the event record's number for TensorBoard), the rest as a count. A
//! directory given stands for the TensorBoard event files under it (see
//! [`log_dir`]). Exit status: 2 when the command line is wrong (an option, the
//! rules file, `--field`); 1 when an input could not be replayed (missing,
//! unreadable, a directory without event files, of no known format, or
//! without a single record: the other files still replay), or, with
//! `--strict`, when a line was skipped; else 0.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader};
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
    let inputs = check_inputs(&args.files).map_err(Failure::input)?;
    let mut fields = jsonl::FieldMap::default();
    for spec in &args.field {
        fields.add(spec).map_err(|e| Failure::usage(anyhow!(e)))?;
    }

    let stdout = io::BufWriter::new(io::stdout().lock());
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(JsonSink::new(stdout).with_records(args.records))
    } else {
        Box::new(TableSink::new(stdout))
    };
    let mut replay = Replay::new(Engine::new(book));
    replay.min_severity = args.min_severity;
    replay.fields = fields;
    let written =
        replay_all(&mut replay, &inputs, args.format.format(), sink.as_mut()).and_then(|()| sink.finish(&replay.stats));
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

/// One file to replay: a path given, or an event file of a log directory
/// with the job it belongs to.
struct Input {
    path: PathBuf,
    job: Option<String>,
}

/// Fails fast on inputs that cannot be opened, before anything is replayed;
/// expands log directories to their event files.
fn check_inputs(files: &[PathBuf]) -> anyhow::Result<Vec<Input>> {
    let stdin = Path::new("-");
    let mut inputs = Vec::new();
    for file in files {
        if file == stdin {
            inputs.push(Input {
                path: file.clone(),
                job: None,
            });
            continue;
        }
        let meta = std::fs::metadata(file).map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
        if !meta.is_dir() {
            inputs.push(Input {
                path: file.clone(),
                job: None,
            });
            continue;
        }
        let found = log_dir(file).map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
        if found.is_empty() {
            return Err(anyhow!(
                "cannot read {}: is a directory without TensorBoard event files (events.out.tfevents.*)",
                file.display()
            ));
        }
        inputs.extend(found);
    }
    Ok(inputs)
}

/// Deepest directory level searched for event files.
const MAX_DEPTH: usize = 32;

/// The TensorBoard event files (`events.out.tfevents.*`) under `dir`, at any
/// depth (symbolic links to directories are not followed): each directory
/// holding some is one job, named by its path relative to `dir` (`dir`'s own
/// name for the files directly in it). Jobs come in path order, the files of
/// one in name order (their names start with the time they were made).
fn log_dir(dir: &Path) -> io::Result<Vec<Input>> {
    let mut jobs: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((at, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            } else if entry.file_name().to_string_lossy().starts_with("events.out.tfevents.") && path.is_file() {
                jobs.entry(at.clone()).or_default().push(path);
            }
        }
    }
    let own_name = || {
        let full = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        full.file_name()
            .map_or_else(|| "tensorboard".to_owned(), |n| n.to_string_lossy().into_owned())
    };
    let mut inputs = Vec::new();
    for (at, mut files) in jobs {
        files.sort();
        let rel = at.strip_prefix(dir).unwrap_or(&at);
        let job = if rel.as_os_str().is_empty() {
            own_name()
        } else {
            rel.to_string_lossy().replace('\\', "/")
        };
        inputs.extend(files.into_iter().map(|path| Input {
            path,
            job: Some(job.clone()),
        }));
    }
    Ok(inputs)
}

fn replay_all(replay: &mut Replay, inputs: &[Input], format: Option<Format>, sink: &mut dyn Sink) -> io::Result<()> {
    for input in inputs {
        replay.stats.files += 1;
        if let Err(e) = replay.file(input, format, sink) {
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

    fn file(&mut self, input: &Input, format: Option<Format>, sink: &mut dyn Sink) -> Result<(), FileError> {
        let path = input.path.as_path();
        let reader = match &input.job {
            None => Reader::open(path, format),
            // An event file of a log directory.
            Some(job) => File::open(path)
                .map_err(|source| TraceError::Open {
                    path: path.display().to_string(),
                    source,
                })
                .and_then(|file| {
                    let file = BufReader::with_capacity(64 << 10, file);
                    Reader::from_input(file, Format::Tensorboard, &path.display().to_string(), job)
                }),
        };
        let mut reader = reader.map_err(FileError::Trace)?.with_fields(self.fields.clone());
        let name = reader.path().to_owned();
        let unit = reader.format().unit();
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
                    first_skip.get_or_insert_with(|| format!("{unit} {}: {}", skipped.line, skipped.reason));
                    self.skip(&name, skipped.line, &skipped.reason);
                }
            }
        }
        if self.file_skips > SHOWN_SKIPS {
            warn(&format!(
                "{name}: {} more {unit}s skipped ({} in all)",
                self.file_skips - SHOWN_SKIPS,
                self.file_skips
            ));
        }
        let ignored = reader.ignored_keys();
        if !ignored.is_empty() {
            let names: Vec<&str> = ignored.iter().map(String::as_str).collect();
            let more = if names.len() == jsonl::MAX_IGNORED { ", ..." } else { "" };
            let what = match reader.format() {
                Format::Tensorboard => "tags",
                Format::Csv => "columns",
                _ => "keys",
            };
            warn(&format!(
                "{name}: ignored {what} that are no gradguard field: {}{more} (fields read: see `gradguard replay --help`)",
                names.join(", ")
            ));
        }
        // A file that yields nothing is an error, never a silent "No anomalies".
        if read == 0 {
            let why = first_skip.unwrap_or_else(|| match reader.format() {
                Format::Tensorboard => "no event holds a scalar of a field".to_owned(),
                Format::Csv => "no row holds a value of a field".to_owned(),
                _ => "no line holds a record".to_owned(),
            });
            return Err(FileError::Trace(TraceError::Invalid {
                path: name,
                format: reader.format(),
                message: format!("no record could be read ({why})"),
            }));
        }
        Ok(())
    }

    fn record(&mut self, name: &str, record: &Record, sink: &mut dyn Sink) -> io::Result<()> {
        sink.record(record)?;
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
