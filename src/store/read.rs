//! Queries, on a small pool of read-only connections.

use crate::model::{Advice, Finding, Severity};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter, types::Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::write::used_bytes;
use super::*;

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
