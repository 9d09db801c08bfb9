//! The reading side of `follow`: a thread that follows the log
//! ([`Tail`]) and parses it with `replay`'s readers, handing each record to
//! the async side as it is read.
//!
//! Line and record formats are read as a stream: a reader sits on a
//! [`Tail`], which waits at the end of the file, so each record is handed
//! over once whole. A TensorBoard step, spread over several events, is
//! handed over when the next step begins, or when the file has been quiet
//! for [`QUIET_POLLS`] polls and the step has every field of the one before
//! (for a file named as an event file is, or given `--format tensorboard`).
//! A Hugging Face `trainer_state.json` is a document
//! rewritten whole at each checkpoint instead: it is read again whenever its
//! size or time changes, and only steps after those handed over go on (a
//! half-written document is read again at the next look).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use gradguard::trace::tail::{STOPPED, Tail, Target};
use gradguard::trace::{Format, Reader, Record, TraceError, default_job, jsonl};
use tokio::sync::mpsc;

/// Skipped lines of a file printed one by one; later ones are only counted.
const SKIPS_SHOWN: u64 = 10;

/// Polls after which a quiet TensorBoard file ends its last step, when that
/// step is whole (2 s at the default poll).
const QUIET_POLLS: u32 = 8;

/// What the reading thread hands over.
pub(super) enum Item {
    Record(Record),
    /// A line for stderr: a file opened or ended, a skipped line.
    Note(String),
    /// A line could not be read.
    Skipped,
    /// The log cannot be read at all (its format is unknown, or wrong): the
    /// command fails with this message.
    Fatal(String),
}

/// What to read and how.
pub(super) struct Source {
    pub target: Target,
    pub format: Option<Format>,
    pub fields: jsonl::FieldMap,
    /// `--job`: the job of every record.
    pub job: Option<String>,
    pub poll: Duration,
    pub stop: Arc<AtomicBool>,
}

impl Source {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The job of a record read from `path`, whose reader names records with
    /// no job of their own `default`: `--job`, else the record's own, else
    /// for a directory its name (its files come and go, the job stays).
    fn job_of(&self, record: &mut Record, default: &str) {
        if let Some(job) = &self.job {
            record.job.clone_from(job);
        } else if let Target::Dir(dir) = &self.target
            && record.job == default
            && let Some(name) = dir.file_name()
        {
            record.job = name.to_string_lossy().into_owned();
        }
    }

    /// Whether `path` is read as a whole document (hf) rather than a stream.
    fn is_document(&self, path: &Path) -> bool {
        match self.format {
            Some(format) => format == Format::Hf,
            None => {
                path.file_name().is_some_and(|n| n == "trainer_state.json")
                    || path.extension().is_some_and(|e| e == "json")
            }
        }
    }
}

/// Reads until stopped, or until the log turns out unreadable, or until the
/// receiving side is gone.
pub(super) fn run(source: Source, tx: mpsc::Sender<Item>) {
    let send = |item: Item| tx.blocking_send(item).is_ok();
    // hf: the last step handed over per job, across rewrites and checkpoints.
    let mut documents = Documents::default();
    loop {
        let tail = match Tail::open(&source.target, source.poll, source.stop.clone()) {
            Ok(Some(tail)) => tail,
            Ok(None) => return,
            Err(e) => {
                send(Item::Fatal(format!(
                    "cannot open {}: {e}",
                    source.target.path().display()
                )));
                return;
            }
        };
        let path = tail.path().to_owned();
        // A TensorBoard step is complete when the next one begins, or when
        // the file has gone quiet with the step whole.
        let tail = if source.format.or_else(|| Format::by_name(&path)) == Some(Format::Tensorboard) {
            tail.quiet_after(source.poll * QUIET_POLLS)
        } else {
            tail
        };
        if source.is_document(&path) {
            drop(tail);
            if !documents.follow(&source, &path, &send) {
                return;
            }
            continue;
        }
        let reader = match Reader::from_named_input(&path, Box::new(BufReader::new(tail)), source.format) {
            Ok(reader) => reader.with_fields(source.fields.clone()),
            Err(_) if source.stopped() => return,
            Err(e) => {
                send(Item::Fatal(e.to_string()));
                return;
            }
        };
        if !send(Item::Note(format!(
            "following {} ({})",
            path.display(),
            reader.format()
        ))) {
            return;
        }
        let default = default_job(&path, reader.format());
        let mut skipped = 0;
        for entry in reader {
            let item = match entry {
                Ok(Ok(mut record)) => {
                    source.job_of(&mut record, &default);
                    Item::Record(record)
                }
                Ok(Err(skip)) => {
                    skipped += 1;
                    if skipped <= SKIPS_SHOWN {
                        let _ = tx.blocking_send(Item::Note(format!(
                            "{}:{}: {}{}",
                            path.display(),
                            skip.line,
                            skip.reason,
                            if skipped == SKIPS_SHOWN {
                                " (further skipped lines are only counted)"
                            } else {
                                ""
                            }
                        )));
                    }
                    Item::Skipped
                }
                Err(TraceError::Read { source: e, .. }) if e.to_string() == STOPPED => return,
                Err(e) => {
                    // A read error: look at the file again from its start
                    // after a pause (a step sent already is not sent twice).
                    let _ = tx.blocking_send(Item::Note(e.to_string()));
                    std::thread::sleep(source.poll);
                    break;
                }
            };
            if source.stopped() || !send(item) {
                return;
            }
        }
        if source.stopped() {
            return;
        }
        let note = format!(
            "{} was rotated or truncated: reading the current file from its start",
            path.display()
        );
        if !send(Item::Note(note)) {
            return;
        }
    }
}

/// Following `trainer_state.json` documents.
#[derive(Default)]
struct Documents {
    /// The last step handed over, per job.
    sent: HashMap<String, u64>,
    /// Skipped entries already told of: (file, position).
    told: HashSet<(PathBuf, usize)>,
}

impl Documents {
    /// Reads `path` whenever it changes, until the target's current file is
    /// another one (true) or the reading is over (false).
    fn follow(&mut self, source: &Source, path: &Path, send: &impl Fn(Item) -> bool) -> bool {
        if !send(Item::Note(format!("following {} (hf)", path.display()))) {
            return false;
        }
        let mut seen: Option<(u64, SystemTime)> = None;
        let mut complained = false;
        loop {
            if source.stopped() {
                return false;
            }
            if source.target.current().as_deref() != Some(path) {
                return true;
            }
            let stamp = fs::metadata(path)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            if stamp.is_some() && stamp != seen {
                match Reader::open(path, Some(Format::Hf)) {
                    Ok(reader) => {
                        seen = stamp;
                        complained = false;
                        if !self.hand_over(source, path, reader, send) {
                            return false;
                        }
                    }
                    // Half-written, or not there for a moment: look again.
                    Err(e) => {
                        if !complained && !send(Item::Note(format!("{e} (trying again as it changes)"))) {
                            return false;
                        }
                        complained = true;
                    }
                }
            }
            std::thread::sleep(source.poll);
        }
    }

    fn hand_over(&mut self, source: &Source, path: &Path, reader: Reader, send: &impl Fn(Item) -> bool) -> bool {
        let default = default_job(path, Format::Hf);
        for entry in reader {
            let item = match entry {
                Ok(Ok(mut record)) => {
                    source.job_of(&mut record, &default);
                    let last = self.sent.get(&record.job);
                    if last.is_some_and(|&l| record.summary.step <= l) {
                        continue;
                    }
                    self.sent.insert(record.job.clone(), record.summary.step);
                    Item::Record(record)
                }
                Ok(Err(skip)) => {
                    if !self.told.insert((path.to_owned(), skip.line)) {
                        continue;
                    }
                    if !send(Item::Skipped) {
                        return false;
                    }
                    Item::Note(format!("{}:{}: {}", path.display(), skip.line, skip.reason))
                }
                Err(e) => Item::Note(e.to_string()),
            };
            if !send(item) {
                return false;
            }
        }
        true
    }
}
