//! Queries, on a small pool of read-only connections.

use crate::model::{Advice, Finding, Severity};
use rusqlite::ffi::ErrorCode;
use rusqlite::{Connection, OpenFlags, params, params_from_iter, types::Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::write::used_bytes;
use super::*;

/// Queries, on a small pool of read-only connections; safe to share between
/// threads, and cheap to clone (clones share the pool). Each call blocks: run
/// it off async workers.
#[derive(Clone)]
pub struct Reader {
    shared: Arc<Shared>,
    /// Reads still running then are stopped ([`StoreError::Interrupted`]).
    deadline: Option<Instant>,
}

struct Shared {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    /// Connections kept for the next read.
    keep: AtomicUsize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.shared.path)
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// SQLite virtual machine steps between two looks at a read's deadline (a
/// few microseconds of work).
const DEADLINE_EVERY: i32 = 1_000;

/// Columns of a job page: the row (NULL when the store has none), then the counts.
const JOB_SELECT: &str =
    "SELECT p.job, j.first_seen, j.last_seen, j.ranks, j.world_size, j.layers, j.last_step, j.health,
         coalesce(c.info, 0), coalesce(c.warning, 0), coalesce(c.critical, 0), coalesce(c.advice, 0)";

impl Reader {
    /// Opens the store in `dir` for reading; it must exist. Keeps up to 8
    /// connections for the next reads ([`Reader::keep`]).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let reader = Self {
            shared: Arc::new(Shared {
                path: db_path(dir),
                pool: Mutex::new(Vec::new()),
                keep: AtomicUsize::new(8),
            }),
            deadline: None,
        };
        let conn = reader.connect()?;
        reader.put(conn);
        Ok(reader)
    }

    /// Keeps up to `n` connections (as many as reads run at once saves
    /// opening one per read), for this reader and its clones.
    pub fn keep(&self, n: usize) {
        self.shared.keep.store(n.max(1), Ordering::Relaxed);
    }

    /// This reader with a deadline: a read still running then stops with
    /// [`StoreError::Interrupted`], and one asked for later does not start.
    pub fn until(&self, deadline: Instant) -> Reader {
        Reader {
            shared: self.shared.clone(),
            deadline: Some(deadline),
        }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let path = &self.shared.path;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| corrupt_or(path, e))?;
        configure(&conn)?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut pool = self.shared.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.shared.keep.load(Ordering::Relaxed) {
            pool.push(conn);
        }
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(StoreError::Interrupted);
        }
        let pooled = self.shared.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        if let Some(deadline) = self.deadline {
            conn.progress_handler(DEADLINE_EVERY, Some(move || Instant::now() >= deadline))?;
        }
        let result = f(&conn);
        if self.deadline.is_some() {
            conn.progress_handler(0, None::<fn() -> bool>)?;
        }
        self.put(conn);
        result.map_err(|e| match e {
            StoreError::Sql(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
                StoreError::Interrupted
            }
            e => e,
        })
    }

    /// A page of jobs by id: the first `limit` stored jobs after `after`
    /// (from the first when `None`) that match one of the `GLOB` patterns
    /// `only` (any job when `None`), and the jobs named in `also` (with or
    /// without a stored row), each with its counts; in id order. One indexed
    /// range read and lookups by key: no scan of every job or anomaly.
    pub fn jobs_page(
        &self,
        after: Option<&str>,
        limit: u32,
        also: &[String],
        only: Option<&[String]>,
    ) -> Result<Vec<StoredJob>, StoreError> {
        let also = serde_json::to_string(also).unwrap_or_else(|_| "[]".into());
        let only = only.map(|o| serde_json::to_string(o).unwrap_or_else(|_| "[]".into()));
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{JOB_SELECT}
                 FROM (SELECT job FROM (SELECT job FROM jobs
                                        WHERE job > ?1 AND (?4 IS NULL OR {IN_SCOPE})
                                        ORDER BY job LIMIT ?2)
                       UNION SELECT value FROM json_each(?3)) AS p
                 LEFT JOIN jobs AS j ON j.job = p.job
                 LEFT JOIN job_counts AS c ON c.job = p.job
                 ORDER BY p.job",
                IN_SCOPE = in_scope("?4"),
            ))?;
            let rows = stmt
                .query_map(params![after.unwrap_or(""), limit, also, only], stored_job)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// One job's stored row (if any) and counts.
    pub fn stored_job(&self, job: &str) -> Result<StoredJob, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{JOB_SELECT}
                 FROM (SELECT ?1 AS job) AS p
                 LEFT JOIN jobs AS j ON j.job = p.job
                 LEFT JOIN job_counts AS c ON c.job = p.job"
            ))?;
            Ok(stmt.query_row([job], stored_job)?)
        })
    }

    pub fn job(&self, job: &str) -> Result<Option<JobRow>, StoreError> {
        Ok(self.stored_job(job)?.row)
    }

    /// Anomaly and advice counts of a job.
    pub fn job_counts(&self, job: &str) -> Result<JobCounts, StoreError> {
        Ok(self.stored_job(job)?.counts)
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

/// A row of [`JOB_SELECT`].
fn stored_job(r: &rusqlite::Row) -> rusqlite::Result<StoredJob> {
    let has_row = r.get_ref(1)?.data_type() != rusqlite::types::Type::Null;
    let count = |i| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    Ok(StoredJob {
        job: r.get(0)?,
        row: if has_row { Some(job_row(r)?) } else { None },
        counts: JobCounts {
            info: count(8)?,
            warning: count(9)?,
            critical: count(10)?,
            advice: count(11)?,
        },
    })
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

/// An SQL condition: the row's `job` matches one of the `GLOB` patterns in
/// the JSON array parameter `param`.
fn in_scope(param: &str) -> String {
    format!("EXISTS (SELECT 1 FROM json_each({param}) AS s WHERE job GLOB s.value)")
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
    if let Some(patterns) = &f.jobs {
        push(
            &in_scope("?"),
            Value::Text(serde_json::to_string(patterns).unwrap_or_else(|_| "[]".into())),
        );
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
