//! Following a log that is still being written, as `tail -F` does: the
//! reading side of `gradguard follow`.
//!
//! A [`Target`] is what the user names: a file (which may not exist yet) or a
//! directory, whose newest log file is the one followed. A [`Tail`] reads the
//! file open now from its start; at its end it waits for more instead of
//! returning end-of-file, so a reader above it never sees a half-written last
//! line (a line is read only once its newline is there). It returns
//! end-of-file only when that file is done with:
//!
//! - **rotated**: the target's current file is another one (renamed away and
//!   created anew, or a newer file in the directory); what the old file still
//!   held was read first;
//! - **truncated**: the file is shorter than what was read (`copytruncate`);
//!   its new contents are read from the start by the next [`Tail`];
//! - **stopped**: never: once the stop flag is raised, a read at the end
//!   fails instead (with the message [`STOPPED`]), so that a partial last
//!   line is never taken for a whole one.
//!
//! A reader that gathers a step from several records (TensorBoard) cannot
//! tell the last step of a quiet log is whole without another step after
//! it. A tail made [`Tail::quiet_after`] a duration tells it: a read that has
//! waited that long at the end fails once with [`io::ErrorKind::WouldBlock`]
//! (message [`QUIET`]); nothing was read, and the next read waits on.
//!
//! A file that goes away without a successor is read on: its writer may still
//! hold it open. Everything is polled (every [`Tail::poll`]), like `tail -F`
//! without inotify: portable, and a log grows at a few lines a second.

use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// The message of the error a [`Tail`] fails with once stopped.
pub const STOPPED: &str = "stopped";

/// The message of the error a [`Tail::quiet_after`] tail fails with when the
/// file has been quiet that long.
pub const QUIET: &str = "quiet";

/// What `follow` follows: one file, or a directory's newest log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    Dir(PathBuf),
}

impl Target {
    /// A directory when `path` is one now; otherwise a file, which need not
    /// exist yet.
    pub fn new(path: &Path) -> Target {
        if path.is_dir() {
            Target::Dir(path.to_owned())
        } else {
            Target::File(path.to_owned())
        }
    }

    /// The path the user gave.
    pub fn path(&self) -> &Path {
        match self {
            Target::File(p) | Target::Dir(p) => p,
        }
    }

    /// The file to read now: the file, when it exists; in a directory, the
    /// most recently modified log file (see [`is_log_file`]) in it or in its
    /// subdirectories one level down (`checkpoint-500/trainer_state.json`,
    /// `version_0/metrics.csv`, a TensorBoard run's directory). Ties go to the
    /// later name.
    pub fn current(&self) -> Option<PathBuf> {
        match self {
            Target::File(p) => p.is_file().then(|| p.clone()),
            Target::Dir(dir) => newest_log_file(dir),
        }
    }
}

/// Whether a file name is one of a log a directory is followed for:
/// `*.jsonl`, `*.ndjson`, `*.log`, `*.csv`, `trainer_state.json` or a
/// TensorBoard event file (`events.out.tfevents.*`).
pub fn is_log_file(name: &str) -> bool {
    name == "trainer_state.json"
        || name.starts_with("events.out.tfevents.")
        || [".jsonl", ".ndjson", ".log", ".csv"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

fn newest_log_file(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    let mut consider = |path: PathBuf, meta: &Metadata| {
        let time = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, p)| (time, &path) > (*t, p)) {
            best = Some((time, path));
        }
    };
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let path = entry.path();
        if meta.is_dir() {
            for inner in fs::read_dir(&path).into_iter().flatten().flatten() {
                if let Ok(m) = inner.metadata()
                    && m.is_file()
                    && is_log_file(&inner.file_name().to_string_lossy())
                {
                    consider(inner.path(), &m);
                }
            }
        } else if meta.is_file() && is_log_file(&entry.file_name().to_string_lossy()) {
            consider(path, &meta);
        }
    }
    best.map(|(_, p)| p)
}

/// A file's identity: device and inode.
fn identity(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// One file of a [`Target`], read from its start while it grows; see the
/// module documentation.
#[derive(Debug)]
pub struct Tail {
    target: Target,
    path: PathBuf,
    file: File,
    id: (u64, u64),
    /// Bytes read so far.
    pos: u64,
    poll: Duration,
    stop: Arc<AtomicBool>,
    /// Why the last read returned end-of-file.
    ended: Option<End>,
    /// How long a read waits at the end before it fails with [`QUIET`].
    quiet_after: Option<Duration>,
    /// Whether this quiet spell was told of already.
    quiet_told: bool,
}

/// Why a [`Tail`] reached its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Another file is the target's current one now.
    Rotated,
    /// The file is shorter than what was read.
    Truncated,
}

impl Tail {
    /// Opens the target's current file at its start, waiting (polling every
    /// `poll`) while it has none; `Ok(None)` once `stop` is raised.
    pub fn open(target: &Target, poll: Duration, stop: Arc<AtomicBool>) -> io::Result<Option<Tail>> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if let Some(path) = target.current() {
                match File::open(&path) {
                    Ok(file) => {
                        let id = identity(&file.metadata()?);
                        return Ok(Some(Tail {
                            target: target.clone(),
                            path,
                            file,
                            id,
                            pos: 0,
                            poll,
                            stop,
                            ended: None,
                            quiet_after: None,
                            quiet_told: false,
                        }));
                    }
                    // Gone between the look and the open: look again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::thread::sleep(poll);
        }
    }

    /// Makes a read that has waited `quiet` at the end of the file (nothing
    /// written, not rotated or truncated) fail once with
    /// [`io::ErrorKind::WouldBlock`] ([`QUIET`]), for each quiet spell; the
    /// next read waits on.
    pub fn quiet_after(mut self, quiet: Duration) -> Self {
        self.quiet_after = Some(quiet);
        self
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Why the file ended, once a read returned end-of-file.
    pub fn ended(&self) -> Option<End> {
        self.ended
    }

    /// At the end of what was written: whether the file is done with.
    fn end(&self) -> io::Result<Option<End>> {
        let len = self.file.metadata()?.len();
        if len < self.pos {
            return Ok(Some(End::Truncated));
        }
        if len > self.pos {
            return Ok(None); // written since the read that found the end
        }
        let Some(current) = self.target.current() else {
            return Ok(None); // renamed or removed, nothing new yet: read on
        };
        match fs::metadata(&current) {
            Ok(m) if identity(&m) != self.id => Ok(Some(End::Rotated)),
            _ => Ok(None),
        }
    }
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended.is_some() || buf.is_empty() {
            return Ok(0);
        }
        let mut waited = Duration::ZERO;
        loop {
            let n = self.file.read(buf)?;
            if n > 0 {
                self.pos += n as u64;
                self.quiet_told = false;
                return Ok(n);
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::Error::other(STOPPED));
            }
            if let Some(end) = self.end()? {
                // A rotated file may have been written to after the read that
                // found its end and before the rotation: read that first.
                if end == End::Rotated {
                    let n = self.file.read(buf)?;
                    if n > 0 {
                        self.pos += n as u64;
                        return Ok(n);
                    }
                }
                self.ended = Some(end);
                return Ok(0);
            }
            if !self.quiet_told && self.quiet_after.is_some_and(|q| waited >= q) {
                self.quiet_told = true;
                return Err(io::Error::new(io::ErrorKind::WouldBlock, QUIET));
            }
            std::thread::sleep(self.poll);
            waited += self.poll;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::mpsc;

    const POLL: Duration = Duration::from_millis(5);

    fn append(path: &Path, text: &str) {
        let mut f = fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Reads lines from a tail on a thread, handing each over as it comes.
    fn lines_of(tail: Tail) -> (mpsc::Receiver<String>, std::thread::JoinHandle<(Tail, io::Result<()>)>) {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut reader = BufReader::new(tail);
            let mut line = String::new();
            let result = loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break Ok(()),
                    Ok(_) => tx.send(line.clone()).unwrap(),
                    Err(e) => break Err(e),
                }
            };
            (reader.into_inner(), result)
        });
        (rx, handle)
    }

    #[test]
    fn waits_for_the_file_then_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.log");
        let stop = Arc::new(AtomicBool::new(false));
        let target = Target::new(&path);
        assert_eq!(target, Target::File(path.clone()), "a file that does not exist yet");
        let opener = {
            let stop = stop.clone();
            std::thread::spawn(move || Tail::open(&target, POLL, stop).unwrap().unwrap())
        };
        append(&path, "step 1\nstep 2 hal");
        let (lines, reader) = lines_of(opener.join().unwrap());
        assert_eq!(lines.recv().unwrap(), "step 1\n");
        // The half-written line is not read until its newline comes.
        assert!(lines.recv_timeout(Duration::from_millis(100)).is_err());
        append(&path, "f\n");
        assert_eq!(lines.recv().unwrap(), "step 2 half\n");

        stop.store(true, Ordering::Relaxed);
        let (tail, result) = reader.join().unwrap();
        assert_eq!(result.unwrap_err().to_string(), STOPPED);
        assert_eq!(tail.ended(), None);
    }

    #[test]
    fn a_quiet_file_is_told_of_once_per_quiet_spell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.out.tfevents.1");
        append(&path, "ab");
        let stop = Arc::new(AtomicBool::new(false));
        let mut tail = Tail::open(&Target::new(&path), POLL, stop.clone())
            .unwrap()
            .unwrap()
            .quiet_after(POLL * 4);
        let mut buf = [0u8; 8];
        assert_eq!(tail.read(&mut buf).unwrap(), 2);
        let quiet = tail.read(&mut buf).unwrap_err();
        assert_eq!(
            (quiet.kind(), quiet.to_string()),
            (io::ErrorKind::WouldBlock, QUIET.to_owned())
        );
        // Told once: the next read waits on, until something is written.
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(POLL * 10);
                append(&path, "c");
            })
        };
        assert_eq!(tail.read(&mut buf).unwrap(), 1);
        writer.join().unwrap();
        assert_eq!(
            tail.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a new spell"
        );
        stop.store(true, Ordering::Relaxed);
        assert_eq!(tail.read(&mut buf).unwrap_err().to_string(), STOPPED);
        assert_eq!(tail.position(), 3);
    }

    #[test]
    fn a_rotated_file_is_read_to_its_end_then_the_new_one_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.log");
        append(&path, "a\n");
        let stop = Arc::new(AtomicBool::new(false));
        let target = Target::new(&path);
        let tail = Tail::open(&target, POLL, stop.clone()).unwrap().unwrap();
        let (lines, reader) = lines_of(tail);
        assert_eq!(lines.recv().unwrap(), "a\n");
        // logrotate's create mode: rename, the writer finishes its line in the
        // old file, then a new file.
        fs::rename(&path, dir.path().join("train.log.1")).unwrap();
        append(&dir.path().join("train.log.1"), "b\n");
        assert_eq!(lines.recv().unwrap(), "b\n", "the old file is read on after its rename");
        append(&path, "c\n");
        let (tail, result) = reader.join().unwrap();
        result.unwrap();
        assert_eq!(tail.ended(), Some(End::Rotated));

        let next = Tail::open(&target, POLL, stop).unwrap().unwrap();
        let mut text = String::new();
        let mut reader = BufReader::new(next);
        reader.read_line(&mut text).unwrap();
        assert_eq!(text, "c\n");
    }

    #[test]
    fn a_truncated_file_ends_and_is_read_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.log");
        append(&path, "first line\nsecond line\n");
        let stop = Arc::new(AtomicBool::new(false));
        let target = Target::new(&path);
        let (lines, reader) = lines_of(Tail::open(&target, POLL, stop.clone()).unwrap().unwrap());
        assert_eq!(lines.recv().unwrap(), "first line\n");
        assert_eq!(lines.recv().unwrap(), "second line\n");
        // copytruncate: the same file, emptied, then written again.
        fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        let (tail, result) = reader.join().unwrap();
        result.unwrap();
        assert_eq!(tail.ended(), Some(End::Truncated));
        append(&path, "new\n");
        let mut reader = BufReader::new(Tail::open(&target, POLL, stop).unwrap().unwrap());
        let mut text = String::new();
        reader.read_line(&mut text).unwrap();
        assert_eq!(text, "new\n");
    }

    #[test]
    fn a_directory_follows_its_newest_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::new(dir.path());
        assert_eq!(target.current(), None);
        append(&dir.path().join("notes.txt"), "not a log\n");
        assert_eq!(target.current(), None);
        let old = dir.path().join("run1").join("events.out.tfevents.1.host");
        fs::create_dir(old.parent().unwrap()).unwrap();
        append(&old, "x");
        assert_eq!(target.current(), Some(old.clone()));
        let new = dir.path().join("train.log");
        append(&new, "y\n");
        let later = SystemTime::now() + Duration::from_secs(5);
        File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(target.current(), Some(new));

        assert!(is_log_file("metrics.csv"));
        assert!(is_log_file("trainer_state.json"));
        assert!(!is_log_file("config.json"));
        assert!(!is_log_file("train.log.1"));
    }

    #[test]
    fn a_stopped_wait_for_a_missing_file_returns_none() {
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(true));
        let target = Target::new(&dir.path().join("never.log"));
        assert!(Tail::open(&target, POLL, stop).unwrap().is_none());
    }
}
