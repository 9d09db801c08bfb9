//! The writer: the only read-write connection, and the checkpointer.

use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::inspect::{Found, inspect};
use super::*;

/// The writer: owns the only read-write connection.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The data directory's lock, held while the store is open.
    _lock: std::fs::File,
}

/// The lock file in the data directory: one service at a time owns it.
pub const LOCK_FILE: &str = "gradguard.lock";

/// Takes the data directory's lock, or says who holds it. The lock is the
/// operating system's (released when the process ends, however it ends);
/// the file's text only names the holder.
fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let io = |source| StoreError::Dir {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "a process that has not said who it is".to_owned()
            } else {
                holder.chars().take(200).collect()
            };
            return Err(StoreError::Locked {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    write!(file, "pid {} on {}", std::process::id(), host.trim()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(file)
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
        // Before the lock: a file that is not ours is refused with nothing
        // made beside it, not even the lock file.
        inspect(&path, false)?;
        let lock = lock(dir)?;
        // Again under the lock, thoroughly: no other gradguard writes it now.
        let version = match inspect(&path, true)? {
            Found::Nothing => 0,
            Found::Store { version } => version,
        };
        let mut conn = Connection::open(&path).map_err(|e| corrupt_or(&path, e))?;
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
        // The schema, and what an older version lacks, in one transaction.
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        if version == 1 {
            tx.execute_batch(COUNT_ONCE)?;
        }
        if version != SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok(Self {
            conn,
            path,
            _lock: lock,
        })
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
        // What the batch adds to each job's counts: info, warning, critical, advice.
        let mut counts: HashMap<&str, [i64; 4]> = HashMap::new();
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
                if inserted == 1 {
                    let code = severity_code(Some(f.severity));
                    counts.entry(&f.job).or_default()[(code - 1) as usize] += 1;
                }
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
                let inserted = advice.execute(params![
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
                if inserted == 1 {
                    counts.entry(&a.job).or_default()[3] += 1;
                }
            }
            let mut count = tx.prepare_cached(
                "INSERT INTO job_counts (job, info, warning, critical, advice) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (job) DO UPDATE SET info = info + excluded.info, warning = warning + excluded.warning,
                   critical = critical + excluded.critical, advice = advice + excluded.advice",
            )?;
            for (job, [i, w, c, a]) in &counts {
                count.execute(params![job, i, w, c, a])?;
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
            let tx = self.conn.transaction()?;
            pruned.anomalies += delete_counted(&tx, Counted::Anomalies, "WHERE time < ?1", cutoff)?;
            pruned.advice += delete_counted(&tx, Counted::Advice, "WHERE time < ?1", cutoff)?;
            tx.execute("DELETE FROM acks WHERE time < ?1", [cutoff])?;
            tx.execute("DELETE FROM jobs WHERE last_seen < ?1", [cutoff])?;
            tx.commit()?;
        }
        if let Some(max) = retention.max_bytes {
            const CHUNK: i64 = 1_000;
            while self.used_bytes()? > max {
                let tx = self.conn.transaction()?;
                let oldest = "WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?1)";
                let a = delete_counted(&tx, Counted::Anomalies, oldest, CHUNK)?;
                let d = delete_counted(&tx, Counted::Advice, oldest, CHUNK / 10)?;
                tx.execute("DELETE FROM acks WHERE advice_id NOT IN (SELECT id FROM advice)", [])?;
                tx.commit()?;
                pruned.anomalies += a;
                pruned.advice += d;
                if a + d == 0 {
                    break;
                }
            }
        }
        if pruned.anomalies + pruned.advice > 0 {
            self.conn.execute(
                "DELETE FROM job_counts WHERE info = 0 AND warning = 0 AND critical = 0 AND advice = 0",
                [],
            )?;
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

/// A table whose rows `job_counts` counts.
#[derive(Clone, Copy)]
enum Counted {
    Anomalies,
    Advice,
}

/// Deletes the rows of `table` that `filter` (`{table}` stands for the
/// table's name) selects, and takes them off their jobs' counts; returns how
/// many. Run inside a transaction, so the counts never disagree with the rows.
fn delete_counted(
    tx: &Connection,
    table: Counted,
    filter: &str,
    value: impl rusqlite::ToSql,
) -> Result<u64, StoreError> {
    let (name, sums, set) = match table {
        Counted::Anomalies => (
            "anomalies",
            "sum(severity = 1) AS i, sum(severity = 2) AS w, sum(severity = 3) AS c, 0 AS a",
            "info = info - d.i, warning = warning - d.w, critical = critical - d.c",
        ),
        Counted::Advice => (
            "advice",
            "0 AS i, 0 AS w, 0 AS c, count(*) AS a",
            "advice = advice - d.a",
        ),
    };
    let filter = filter.replace("{table}", name);
    tx.prepare_cached(&format!(
        "UPDATE job_counts SET {set}
         FROM (SELECT job, {sums} FROM {name} {filter} GROUP BY job) AS d WHERE job_counts.job = d.job"
    ))?
    .execute([&value])?;
    Ok(tx
        .prepare_cached(&format!("DELETE FROM {name} {filter}"))?
        .execute([&value])? as u64)
}

pub(super) fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let (pages, free, size): (i64, i64, i64) = conn.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count), (SELECT freelist_count FROM pragma_freelist_count), (SELECT page_size FROM pragma_page_size)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(((pages - free).max(0) * size) as u64)
}
