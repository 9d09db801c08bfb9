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
//!
//! Non-finite values: SQLite stores NaN as NULL, so a NULL value reads back as
//! NaN; infinities round-trip.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter, types::Value};

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

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

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

/// The writer: owns the only read-write connection.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating when absent) the store in `dir`. An existing file that
    /// is not a healthy gradguard store is an error, never replaced.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, SyncMode::Full)
    }

    /// [`Store::open`] with a choice of how commits wait for the disk.
    pub fn open_with(dir: &Path, sync: SyncMode) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = db_path(dir);
        let conn = Connection::open(&path).map_err(|e| corrupt_or(&path, e))?;
        configure(&conn).map_err(|e| corrupt_or(&path, e))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| corrupt_or(&path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("journal mode {mode} instead of wal"),
            });
        }
        let sync = match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        // The service checkpoints from its own thread (Checkpointer); this
        // automatic one is the backstop if that falls behind.
        conn.pragma_update(None, "wal_autocheckpoint", 20_000)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt_or(&path, e))?;
        if check != "ok" {
            return Err(StoreError::Corrupt { path, detail: check });
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Newer { path, found: version });
        }
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            [],
            |r| r.get(0),
        )?;
        if version == 0 && tables > 0 {
            return Err(StoreError::Corrupt {
                path,
                detail: "the file holds other tables".into(),
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest advice id stored, so a restarted engine continues after it.
    pub fn max_advice_id(&self) -> Result<u64, StoreError> {
        let id: Option<i64> = self.conn.query_row("SELECT max(id) FROM advice", [], |r| r.get(0))?;
        Ok(id.map_or(0, |i| i as u64))
    }

    /// Writes a batch in one transaction; once this returns, it is durable.
    /// Returns the ids given to the anomalies, in order, then the ids of the
    /// keyed anomalies that were not stored before.
    pub fn write(&mut self, batch: &Batch) -> Result<Vec<u64>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut ids = Vec::with_capacity(batch.anomalies.len());
        {
            let mut job = tx.prepare_cached(
                "INSERT INTO jobs (job, first_seen, last_seen, ranks, world_size, layers, last_step, health)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (job) DO UPDATE SET last_seen = excluded.last_seen, ranks = excluded.ranks,
                   world_size = excluded.world_size, layers = excluded.layers,
                   last_step = excluded.last_step, health = excluded.health",
            )?;
            for j in &batch.jobs {
                job.execute(params![
                    j.job,
                    j.first_seen,
                    j.last_seen,
                    j.ranks,
                    j.world_size,
                    j.layers,
                    j.last_step.map(|s| s as i64),
                    severity_code(j.health),
                ])?;
            }
            // A NULL id takes the next one; a given id (cluster mode) that
            // is stored already is a redelivery, and skipped.
            let mut anomaly = tx.prepare_cached(
                "INSERT OR IGNORE INTO anomalies (id, job, rank, step, time, rule, severity, layer, value, threshold, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            let local = batch.anomalies.iter().map(|f| (None, f));
            let keyed = batch.keyed.iter().map(|a| (Some(a.id), &a.finding));
            for (id, f) in local.chain(keyed) {
                let inserted = anomaly.execute(params![
                    id.map(|i| i as i64),
                    &*f.job,
                    f.worker,
                    f.step as i64,
                    f.time.unwrap_or(0.0),
                    f.rule.as_str(),
                    severity_code(Some(f.severity)),
                    f.layer.as_deref(),
                    f.value,
                    f.threshold,
                    f.message,
                ])?;
                match id {
                    None => ids.push(tx.last_insert_rowid() as u64),
                    Some(id) if inserted == 1 => ids.push(id),
                    Some(_) => {}
                }
            }
            // An advice id is stored once: a redelivered advice (cluster
            // mode) must not reset its acknowledgement counts.
            let mut advice = tx.prepare_cached(
                "INSERT OR IGNORE INTO advice (id, job, target, step, apply_from, action, param, severity, rules, reason, evidence, time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for (a, time) in &batch.advice {
                let rules: Vec<&str> = a.rules.iter().map(|r| r.as_str()).collect();
                let evidence = serde_json::to_string(&a.evidence).unwrap_or_else(|_| "[]".into());
                advice.execute(params![
                    a.id as i64,
                    &*a.job,
                    a.target,
                    a.step as i64,
                    a.apply_from as i64,
                    a.action.name(),
                    action_param(&a.action),
                    severity_code(Some(a.severity)),
                    rules.join(","),
                    a.reason,
                    evidence,
                    time,
                ])?;
            }
            let mut ack = tx.prepare_cached(
                "INSERT INTO acks (advice_id, job, rank, applied_step, applied, note, time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut count =
                tx.prepare_cached("UPDATE advice SET applied = applied + ?2, declined = declined + ?3 WHERE id = ?1")?;
            for k in &batch.acks {
                ack.execute(params![
                    k.advice_id as i64,
                    k.job,
                    k.rank,
                    k.applied_step as i64,
                    k.applied,
                    k.note,
                    k.time
                ])?;
                count.execute(params![k.advice_id as i64, i64::from(k.applied), i64::from(!k.applied)])?;
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Deletes what the retention no longer keeps: rows older than the age
    /// limit, then the oldest anomalies and advice (in chunks) while the
    /// database is over the size limit. Freed pages are reused by later
    /// writes; the file does not shrink.
    pub fn prune(&mut self, retention: &Retention, now: f64) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        if let Some(age) = retention.max_age_secs {
            let cutoff = now - age;
            pruned.anomalies += self.conn.execute("DELETE FROM anomalies WHERE time < ?1", [cutoff])? as u64;
            pruned.advice += self.conn.execute("DELETE FROM advice WHERE time < ?1", [cutoff])? as u64;
            self.conn.execute("DELETE FROM acks WHERE time < ?1", [cutoff])?;
            self.conn.execute("DELETE FROM jobs WHERE last_seen < ?1", [cutoff])?;
        }
        if let Some(max) = retention.max_bytes {
            const CHUNK: i64 = 1_000;
            while self.used_bytes()? > max {
                let a = self.conn.execute(
                    "DELETE FROM anomalies WHERE id IN (SELECT id FROM anomalies ORDER BY id LIMIT ?1)",
                    [CHUNK],
                )? as u64;
                let d = self.conn.execute(
                    "DELETE FROM advice WHERE id IN (SELECT id FROM advice ORDER BY id LIMIT ?1)",
                    [CHUNK / 10],
                )? as u64;
                self.conn
                    .execute("DELETE FROM acks WHERE advice_id NOT IN (SELECT id FROM advice)", [])?;
                pruned.anomalies += a;
                pruned.advice += d;
                if a + d == 0 {
                    break;
                }
            }
        }
        Ok(pruned)
    }

    /// Bytes of the database in use (pages minus free pages).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        used_bytes(&self.conn)
    }

    /// A read-only view for queries, on its own connections.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(self.path.parent().unwrap_or(Path::new(".")))
    }

    /// A second connection that copies the WAL into the database, to be run
    /// periodically off the commit path (see [`Checkpointer`]).
    pub fn checkpointer(&self) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(&self.path).map_err(|e| corrupt_or(&self.path, e))?;
        configure(&conn)?;
        Ok(Checkpointer { conn })
    }
}

/// Moves committed WAL frames into the database file. SQLite would otherwise
/// do this inside whichever commit crosses 1,000 WAL pages, fsyncing the
/// database while the advice waiting on that commit waits too; a passive
/// checkpoint from its own connection runs beside the writer instead. The
/// writer keeps a late automatic checkpoint as a backstop.
pub struct Checkpointer {
    conn: Connection,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// One passive checkpoint: copies what no reader still needs, never waits.
    pub fn run(&self) -> Result<(), StoreError> {
        self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let (pages, free, size): (i64, i64, i64) = conn.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count), (SELECT freelist_count FROM pragma_freelist_count), (SELECT page_size FROM pragma_page_size)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Queries, on a small pool of read-only connections; safe to share between
/// threads. Each call blocks: run it off async workers.
pub struct Reader {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("path", &self.path).finish()
    }
}

impl Reader {
    /// Opens the store in `dir` for reading; it must exist.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let reader = Self {
            path: db_path(dir),
            pool: Mutex::new(Vec::new()),
        };
        let conn = reader.connect()?;
        reader.put(conn);
        Ok(reader)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| corrupt_or(&self.path, e))?;
        configure(&conn)?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = f(&conn);
        self.put(conn);
        result
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT job, first_seen, last_seen, ranks, world_size, layers, last_step, health
                 FROM jobs ORDER BY last_seen DESC, job",
            )?;
            let rows = stmt.query_map([], job_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    pub fn job(&self, job: &str) -> Result<Option<JobRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT job, first_seen, last_seen, ranks, world_size, layers, last_step, health
                 FROM jobs WHERE job = ?1",
            )?;
            Ok(stmt.query_row([job], job_row).optional()?)
        })
    }

    /// Anomaly and advice counts of a job, by severity (info, warning, critical).
    pub fn job_counts(&self, job: &str) -> Result<([u64; 3], u64), StoreError> {
        self.with(|c| {
            let mut counts = [0u64; 3];
            let mut stmt =
                c.prepare_cached("SELECT severity, count(*) FROM anomalies WHERE job = ?1 GROUP BY severity")?;
            let rows = stmt.query_map([job], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (s, n) = row?;
                if let Some(slot) = usize::try_from(s - 1).ok().and_then(|i| counts.get_mut(i)) {
                    *slot = n as u64;
                }
            }
            let advice: i64 = c.query_row("SELECT count(*) FROM advice WHERE job = ?1", [job], |r| r.get(0))?;
            Ok((counts, advice as u64))
        })
    }

    pub fn anomalies(&self, f: &Filter) -> Result<Page<StoredAnomaly>, StoreError> {
        let (clause, values) = where_clause(f, true);
        let sql = format!(
            "SELECT id, job, rank, step, time, rule, severity, layer, value, threshold, message
             FROM anomalies {clause} ORDER BY id DESC LIMIT {}",
            u64::from(f.limit) + 1
        );
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params_from_iter(values), |r| {
                    Ok(StoredAnomaly {
                        id: r.get::<_, i64>(0)? as u64,
                        finding: Finding {
                            job: r.get::<_, String>(1)?.into(),
                            worker: r.get(2)?,
                            step: r.get::<_, i64>(3)? as u64,
                            time: Some(r.get(4)?),
                            rule: rule_of(r.get_ref(5)?.as_str()?),
                            severity: severity_of(r.get(6)?),
                            layer: r.get::<_, Option<String>>(7)?.map(Into::into),
                            value: r.get::<_, Option<f64>>(8)?.unwrap_or(f64::NAN),
                            threshold: r.get::<_, Option<f64>>(9)?.unwrap_or(f64::NAN),
                            message: r.get(10)?,
                        },
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(page(rows, f.limit, |a| a.id))
        })
    }

    pub fn advice(&self, f: &Filter) -> Result<Page<StoredAdvice>, StoreError> {
        let (clause, values) = where_clause(f, false);
        let sql = format!(
            "SELECT id, job, target, step, apply_from, action, param, severity, rules, reason, evidence, time, applied, declined
             FROM advice {clause} ORDER BY id DESC LIMIT {}",
            u64::from(f.limit) + 1
        );
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params_from_iter(values), |r| {
                    let rules: String = r.get(8)?;
                    let evidence: String = r.get(10)?;
                    Ok(StoredAdvice {
                        advice: Advice {
                            id: r.get::<_, i64>(0)? as u64,
                            job: r.get::<_, String>(1)?.into(),
                            target: r.get(2)?,
                            step: r.get::<_, i64>(3)? as u64,
                            apply_from: r.get::<_, i64>(4)? as u64,
                            action: action_of(r.get_ref(5)?.as_str()?, r.get::<_, Option<f64>>(6)?),
                            severity: severity_of(r.get(7)?),
                            rules: rules.split(',').filter(|s| !s.is_empty()).map(rule_of).collect(),
                            reason: r.get(9)?,
                            evidence: serde_json::from_str(&evidence).unwrap_or_default(),
                        },
                        time: r.get(11)?,
                        applied: r.get(12)?,
                        declined: r.get(13)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(page(rows, f.limit, |a| a.advice.id))
        })
    }

    /// Bytes of the database in use.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        self.with(used_bytes)
    }
}

/// Cuts a `limit + 1` row result into a page and the next page's token.
fn page<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> u64) -> Page<T> {
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(id)
    } else {
        None
    };
    Page { items: rows, next }
}

/// The WHERE clause of a listing and its parameters. Advice has no rank or
/// per-row rule column to match exactly: `worker` matches the advice that
/// reaches that rank (its target, or every rank), `rule` one of its rules.
fn where_clause(f: &Filter, anomalies: bool) -> (String, Vec<Value>) {
    let mut terms: Vec<String> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let mut push = |term: &str, v: Value| {
        values.push(v);
        terms.push(term.replace('?', &format!("?{}", values.len())));
    };
    if let Some(job) = &f.job {
        push("job = ?", Value::Text(job.clone()));
    }
    if let Some(rule) = f.rule {
        if anomalies {
            push("rule = ?", Value::Text(rule.as_str().into()));
        } else {
            push(
                "(',' || rules || ',') LIKE ?",
                Value::Text(format!("%,{},%", rule.as_str())),
            );
        }
    }
    match f.min_severity {
        // The top severity is an equality: the (severity, id) index then
        // yields rows newest first and the scan stops at the page's end.
        Some(Severity::Critical) => push("severity = ?", Value::Integer(severity_code(Some(Severity::Critical)))),
        // A range over that index would have to sort every match by id; the
        // unary `+` keeps SQLite on the job or id order and filters instead.
        Some(s) => push("+severity >= ?", Value::Integer(severity_code(Some(s)))),
        None => {}
    }
    if let Some(w) = f.worker {
        push(
            if anomalies { "rank = ?" } else { "target = ?" },
            Value::Integer(i64::from(w)),
        );
    }
    if let Some(s) = f.step_from {
        push("step >= ?", Value::Integer(s as i64));
    }
    if let Some(s) = f.step_to {
        push("step <= ?", Value::Integer(s as i64));
    }
    if let Some(t) = f.time_from {
        push("time >= ?", Value::Real(t));
    }
    if let Some(t) = f.time_to {
        push("time <= ?", Value::Real(t));
    }
    if let Some(b) = f.before {
        push("id < ?", Value::Integer(b as i64));
    }
    let clause = if terms.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", terms.join(" AND "))
    };
    (clause, values)
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
