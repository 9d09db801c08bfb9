//! The durable store: jobs, anomalies, advice and acknowledgements in SQLite.
//!
//! One file, `gradguard.db`, in the data directory, in WAL mode: readers
//! never block the writer, and a committed write survives a crash or a
//! `kill -9` of the service. With [`SyncMode::Full`] (the default) every
//! commit is also fsynced, so it survives a power loss; [`SyncMode::Normal`]
//! leaves that to checkpoints (a power loss may drop the last commits, never
//! corrupt the store) and saves an fsync per commit. The service has one writer (a thread that
//! commits each batch in one transaction before the advice in it is sent) and a
//! few read connections for queries.
//!
//! Listing is newest first by a monotonic id; a page token is the id to
//! continue below, so pages never repeat or skip a row while new rows arrive.
//! Jobs are listed by id (keyset pages too), with their counts of anomalies
//! and advice from `job_counts`, which the writer keeps in step with every
//! insert and delete: a page of jobs costs one indexed range read, however
//! many jobs or anomalies there are.
//!
//! An existing file is inspected read-only first ([`inspect`]): a file that
//! is not a gradguard store is refused as it was found, nothing written to
//! it or beside it.
//!
//! Non-finite values: SQLite stores NaN as NULL, so a NULL value reads back as
//! NaN; infinities round-trip.

mod inspect;
mod read;
mod write;

pub use read::Reader;
pub use write::{Checkpointer, Store};

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::model::{Action, Advice, Finding, RuleId, Severity};

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fsync every commit: survives a power loss.
    #[default]
    Full,
    /// Commits reach the operating system, not necessarily the disk: survives
    /// a crash or `kill -9` of the service, not a power loss.
    Normal,
}

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "gradguard.db";

/// The schema version this build writes (`PRAGMA user_version`). 2 added
/// `job_counts`; a version 1 store is upgraded when opened (its counts are
/// counted once then).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    job         TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    ranks       INTEGER NOT NULL,
    world_size  INTEGER,
    layers      INTEGER NOT NULL,
    last_step   INTEGER,
    health      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS anomalies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL,
    rank        INTEGER,
    step        INTEGER NOT NULL,
    time        REAL NOT NULL,
    rule        TEXT NOT NULL,
    severity    INTEGER NOT NULL,
    layer       TEXT,
    value       REAL,
    threshold   REAL,
    message     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS anomalies_job ON anomalies (job, id);
CREATE INDEX IF NOT EXISTS anomalies_job_rule ON anomalies (job, rule, id);
CREATE INDEX IF NOT EXISTS anomalies_job_step ON anomalies (job, step);
CREATE INDEX IF NOT EXISTS anomalies_severity ON anomalies (severity, id);
CREATE INDEX IF NOT EXISTS anomalies_time ON anomalies (time);
CREATE TABLE IF NOT EXISTS advice (
    id          INTEGER PRIMARY KEY,
    job         TEXT NOT NULL,
    target      INTEGER,
    step        INTEGER NOT NULL,
    apply_from  INTEGER NOT NULL,
    action      TEXT NOT NULL,
    param       REAL,
    severity    INTEGER NOT NULL,
    rules       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    evidence    TEXT NOT NULL,
    time        REAL NOT NULL,
    applied     INTEGER NOT NULL DEFAULT 0,
    declined    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS advice_job ON advice (job, id);
CREATE INDEX IF NOT EXISTS advice_time ON advice (time);
CREATE TABLE IF NOT EXISTS acks (
    advice_id    INTEGER NOT NULL,
    job          TEXT NOT NULL,
    rank         INTEGER NOT NULL,
    applied_step INTEGER NOT NULL,
    applied      INTEGER NOT NULL,
    note         TEXT NOT NULL,
    time         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS acks_advice ON acks (advice_id);
CREATE TABLE IF NOT EXISTS job_counts (
    job         TEXT PRIMARY KEY,
    info        INTEGER NOT NULL DEFAULT 0,
    warning     INTEGER NOT NULL DEFAULT 0,
    critical    INTEGER NOT NULL DEFAULT 0,
    advice      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
";

/// Counts a version 1 store's anomalies and advice into `job_counts`, once.
const COUNT_ONCE: &str = "
INSERT INTO job_counts (job, info, warning, critical, advice)
    SELECT job, sum(severity = 1), sum(severity = 2), sum(severity = 3), 0 FROM anomalies GROUP BY job;
INSERT INTO job_counts (job, advice)
    SELECT job, count(*) FROM advice WHERE true GROUP BY job
    ON CONFLICT (job) DO UPDATE SET advice = excluded.advice;
";

/// Why the store cannot be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the store {path} is damaged or not a gradguard store ({detail}); it was left untouched: move it away to start afresh"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("the store {path} has schema version {found}, newer than this build's {SCHEMA_VERSION}")]
    Newer { path: PathBuf, found: i64 },
    #[error("the data directory {dir} is in use by another gradguard ({holder}): one service per data directory")]
    Locked { dir: PathBuf, holder: String },
    /// A read ran past the deadline it was given ([`Reader::until`]) and was stopped.
    #[error("the read ran past its deadline and was stopped")]
    Interrupted,
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// A job as last recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub job: String,
    pub first_seen: f64,
    pub last_seen: f64,
    pub ranks: u32,
    pub world_size: Option<u32>,
    pub layers: u32,
    pub last_step: Option<u64>,
    /// Worst open problem: `None` when healthy.
    pub health: Option<Severity>,
}

/// A job's stored anomalies, by severity, and its stored advice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub info: u64,
    pub warning: u64,
    pub critical: u64,
    pub advice: u64,
}

/// A job as the store knows it: its row (`None` for a name the store has
/// counts of, or nothing at all, but no row) and its counts.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub job: String,
    pub row: Option<JobRow>,
    pub counts: JobCounts,
}

/// A stored anomaly: a finding with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnomaly {
    pub id: u64,
    pub finding: Finding,
}

/// A stored advice, with what workers said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAdvice {
    pub advice: Advice,
    pub time: f64,
    /// Ranks that acknowledged it as applied, and as not applied.
    pub applied: u32,
    pub declined: u32,
}

/// A worker's acknowledgement of advice.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub advice_id: u64,
    pub job: String,
    pub rank: u32,
    pub applied_step: u64,
    pub applied: bool,
    pub note: String,
    pub time: f64,
}

/// What one commit writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub jobs: Vec<JobRow>,
    pub anomalies: Vec<Finding>,
    /// Anomalies that come with their id (cluster mode: decided by another
    /// replica); one whose id is stored already is skipped (a redelivery).
    pub keyed: Vec<StoredAnomaly>,
    /// Advice and the service time it was decided at.
    pub advice: Vec<(Advice, f64)>,
    pub acks: Vec<Ack>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.anomalies.is_empty()
            && self.keyed.is_empty()
            && self.advice.is_empty()
            && self.acks.is_empty()
    }

    pub fn clear(&mut self) {
        self.jobs.clear();
        self.anomalies.clear();
        self.keyed.clear();
        self.advice.clear();
        self.acks.clear();
    }
}

/// Filters of a listing; `None` means any. Newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub job: Option<String>,
    /// Only jobs matching one of these SQLite `GLOB` patterns (a caller's
    /// scopes); `None`: any job.
    pub jobs: Option<Vec<String>>,
    pub rule: Option<RuleId>,
    /// At least this severity.
    pub min_severity: Option<Severity>,
    /// The rank an anomaly is about; for advice, a rank it reaches.
    pub worker: Option<u32>,
    /// Inclusive step range.
    pub step_from: Option<u64>,
    pub step_to: Option<u64>,
    /// Inclusive time range, seconds since the epoch.
    pub time_from: Option<f64>,
    pub time_to: Option<f64>,
    /// Continue below this id (a page token).
    pub before: Option<u64>,
    pub limit: u32,
}

/// One page of a listing, and the token of the next page (`None`: last page).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Rows older than this many seconds are deleted.
    pub max_age_secs: Option<f64>,
    /// The oldest anomalies (and advice) are deleted while the database is
    /// larger than this.
    pub max_bytes: Option<u64>,
}

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pruned {
    pub anomalies: u64,
    pub advice: u64,
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

/// Applies the connection settings every connection needs.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Maps an error from the first statements on a file to "damaged".
fn corrupt_or(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        },
        _ => StoreError::Open {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        job: r.get(0)?,
        first_seen: r.get(1)?,
        last_seen: r.get(2)?,
        ranks: r.get(3)?,
        world_size: r.get(4)?,
        layers: r.get(5)?,
        last_step: r.get::<_, Option<i64>>(6)?.map(|s| s as u64),
        health: match r.get::<_, i64>(7)? {
            0 => None,
            s => Some(severity_of(s)),
        },
    })
}

/// 0 healthy, 1 info, 2 warning, 3 critical (as the `gradguard_job_health` gauge).
pub fn severity_code(s: Option<Severity>) -> i64 {
    match s {
        None => 0,
        Some(Severity::Info) => 1,
        Some(Severity::Warning) => 2,
        Some(Severity::Critical) => 3,
    }
}

fn severity_of(code: i64) -> Severity {
    match code {
        ..=1 => Severity::Info,
        2 => Severity::Warning,
        _ => Severity::Critical,
    }
}

fn rule_of(s: &str) -> RuleId {
    s.parse().unwrap_or(RuleId::GradSpike)
}

fn action_param(a: &Action) -> Option<f64> {
    match *a {
        Action::ClipGradients { max_norm } => Some(max_norm),
        Action::ScaleLr { factor } | Action::ScaleLossScale { factor } => Some(factor),
        Action::Rollback { to_step } => Some(to_step as f64),
        Action::InspectWorker { rank } => Some(f64::from(rank)),
        Action::SkipStep | Action::Halt => None,
    }
}

fn action_of(name: &str, param: Option<f64>) -> Action {
    let p = param.unwrap_or(f64::NAN);
    match name {
        "clip_gradients" => Action::ClipGradients { max_norm: p },
        "scale_lr" => Action::ScaleLr { factor: p },
        "scale_loss_scale" => Action::ScaleLossScale { factor: p },
        "rollback" => Action::Rollback { to_step: p as u64 },
        "inspect_worker" => Action::InspectWorker { rank: p as u32 },
        "halt" => Action::Halt,
        _ => Action::SkipStep,
    }
}

#[cfg(test)]
mod tests;
