use std::sync::Arc;

use super::*;

fn finding(job: &str, step: u64, rule: RuleId, severity: Severity, worker: Option<u32>) -> Finding {
    Finding {
        job: Arc::from(job),
        worker,
        step,
        time: Some(1_000.0 + step as f64),
        rule,
        severity,
        layer: None,
        value: 7.5,
        threshold: 2.5,
        message: format!("{rule} at {step}"),
    }
}

fn advice(id: u64, job: &str, step: u64, action: Action) -> Advice {
    Advice {
        id,
        job: Arc::from(job),
        target: None,
        step,
        apply_from: step + 1,
        action,
        severity: Severity::Warning,
        rules: vec![RuleId::GradSpike, RuleId::LossSpike],
        reason: "because".into(),
        evidence: vec![("grad_spike.value".into(), 9.0)],
    }
}

fn job(name: &str, last_step: u64, health: Option<Severity>) -> JobRow {
    JobRow {
        job: name.into(),
        first_seen: 1_000.0,
        last_seen: 2_000.0,
        ranks: 4,
        world_size: Some(4),
        layers: 12,
        last_step: Some(last_step),
        health,
    }
}

fn all(f: &Filter, reader: &Reader) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut f = f.clone();
    loop {
        let page = reader.anomalies(&f).unwrap();
        assert!(page.items.len() <= f.limit as usize);
        ids.extend(page.items.iter().map(|a| a.id));
        match page.next {
            Some(next) => f.before = Some(next),
            None => return ids,
        }
    }
}

#[test]
fn everything_written_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut nan = finding("a", 5, RuleId::Nonfinite, Severity::Critical, Some(2));
    nan.value = f64::NAN;
    nan.layer = Some(Arc::from("h.0.attn"));
    let batch = Batch {
        jobs: vec![job("a", 9, Some(Severity::Critical))],
        anomalies: vec![nan, finding("a", 6, RuleId::GradSpike, Severity::Info, None)],
        advice: vec![(advice(3, "a", 5, Action::ClipGradients { max_norm: 1.5 }), 1_005.0)],
        ..Batch::default()
    };
    let ids = store.write(&batch).unwrap();
    assert_eq!(ids, [1, 2]);
    let ack = |applied| Ack {
        advice_id: 3,
        job: "a".into(),
        rank: 0,
        applied_step: 6,
        applied,
        note: String::new(),
        time: 1_006.0,
    };
    store
        .write(&Batch {
            acks: vec![ack(true), ack(true), ack(false)],
            ..Batch::default()
        })
        .unwrap();

    let reader = store.reader().unwrap();
    assert_eq!(
        reader.jobs_page(None, 10, &[], None).unwrap(),
        [StoredJob {
            job: "a".into(),
            row: Some(job("a", 9, Some(Severity::Critical))),
            counts: JobCounts {
                info: 1,
                warning: 0,
                critical: 1,
                advice: 1
            },
        }]
    );
    assert_eq!(reader.job("nope").unwrap(), None);
    let page = reader
        .anomalies(&Filter {
            limit: 10,
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(page.next, None);
    let [newest, oldest] = &page.items[..] else {
        panic!("{page:?}")
    };
    assert_eq!((newest.id, newest.finding.rule), (2, RuleId::GradSpike));
    assert!(oldest.finding.value.is_nan());
    assert_eq!(oldest.finding.layer.as_deref(), Some("h.0.attn"));
    assert_eq!(oldest.finding.worker, Some(2));

    let page = reader
        .advice(&Filter {
            limit: 10,
            ..Filter::default()
        })
        .unwrap();
    let stored = &page.items[0];
    assert_eq!(
        stored.advice,
        advice(3, "a", 5, Action::ClipGradients { max_norm: 1.5 })
    );
    assert_eq!((stored.applied, stored.declined), (2, 1));
    assert_eq!(
        reader.job_counts("a").unwrap(),
        JobCounts {
            info: 1,
            warning: 0,
            critical: 1,
            advice: 1
        }
    );
    assert_eq!(store.max_advice_id().unwrap(), 3);
}

#[test]
fn pages_cover_every_row_once_and_filters_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut batch = Batch::default();
    for step in 0..250u64 {
        let (rule, severity) = match step % 5 {
            0 => (RuleId::LossSpike, Severity::Critical),
            1 => (RuleId::GradGrowth, Severity::Warning),
            _ => (RuleId::GradSpike, Severity::Info),
        };
        let job = if step % 2 == 0 { "even" } else { "odd" };
        batch
            .anomalies
            .push(finding(job, step, rule, severity, Some((step % 4) as u32)));
    }
    store.write(&batch).unwrap();
    let reader = store.reader().unwrap();

    let every = all(
        &Filter {
            limit: 100,
            ..Filter::default()
        },
        &reader,
    );
    assert_eq!(every, (1..=250).rev().collect::<Vec<u64>>());
    let every = all(
        &Filter {
            limit: 7,
            ..Filter::default()
        },
        &reader,
    );
    assert_eq!(every.len(), 250);

    let expect =
        |pred: &dyn Fn(u64) -> bool| -> Vec<u64> { (0..250u64).rev().filter(|s| pred(*s)).map(|s| s + 1).collect() };
    let f = |f: Filter| all(&Filter { limit: 13, ..f }, &reader);
    assert_eq!(
        f(Filter {
            job: Some("even".into()),
            ..Filter::default()
        }),
        expect(&|s| s % 2 == 0)
    );
    assert_eq!(
        f(Filter {
            rule: Some(RuleId::GradGrowth),
            ..Filter::default()
        }),
        expect(&|s| s % 5 == 1)
    );
    assert_eq!(
        f(Filter {
            min_severity: Some(Severity::Warning),
            ..Filter::default()
        }),
        expect(&|s| s % 5 <= 1)
    );
    assert_eq!(
        f(Filter {
            worker: Some(3),
            ..Filter::default()
        }),
        expect(&|s| s % 4 == 3)
    );
    assert_eq!(
        f(Filter {
            step_from: Some(100),
            step_to: Some(120),
            job: Some("odd".into()),
            ..Filter::default()
        }),
        expect(&|s| (100..=120).contains(&s) && s % 2 == 1)
    );
    assert_eq!(
        f(Filter {
            time_from: Some(1_010.0),
            time_to: Some(1_019.5),
            ..Filter::default()
        }),
        expect(&|s| (10..=19).contains(&s))
    );
    assert!(
        f(Filter {
            job: Some("none".into()),
            ..Filter::default()
        })
        .is_empty()
    );
}

#[test]
fn advice_filters_match_target_and_any_rule() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut targeted = advice(2, "j", 20, Action::InspectWorker { rank: 3 });
    targeted.target = Some(3);
    targeted.rules = vec![RuleId::RankOutlier];
    store
        .write(&Batch {
            advice: vec![(advice(1, "j", 10, Action::Halt), 1.0), (targeted, 2.0)],
            ..Batch::default()
        })
        .unwrap();
    let reader = store.reader().unwrap();
    let ids = |f: Filter| -> Vec<u64> {
        reader
            .advice(&Filter { limit: 10, ..f })
            .unwrap()
            .items
            .iter()
            .map(|a| a.advice.id)
            .collect()
    };
    assert_eq!(ids(Filter::default()), [2, 1]);
    assert_eq!(
        ids(Filter {
            rule: Some(RuleId::LossSpike),
            ..Filter::default()
        }),
        [1]
    );
    assert_eq!(
        ids(Filter {
            rule: Some(RuleId::RankOutlier),
            ..Filter::default()
        }),
        [2]
    );
    assert_eq!(
        ids(Filter {
            worker: Some(3),
            ..Filter::default()
        }),
        [2]
    );
}

#[test]
fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = Store::open(dir.path()).unwrap();
        store
            .write(&Batch {
                jobs: vec![job("kept", 3, None)],
                anomalies: vec![finding("kept", 3, RuleId::Stalled, Severity::Warning, Some(1))],
                advice: vec![(advice(41, "kept", 3, Action::InspectWorker { rank: 1 }), 3.0)],
                ..Batch::default()
            })
            .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.max_advice_id().unwrap(), 41);
    let reader = store.reader().unwrap();
    assert_eq!(reader.job("kept").unwrap(), Some(job("kept", 3, None)));
    assert_eq!(
        all(
            &Filter {
                limit: 5,
                ..Filter::default()
            },
            &reader
        ),
        [1]
    );
}

#[test]
fn one_store_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
    // Released with the store: the next one opens.
    drop(first);
    drop(Store::open(dir.path()).unwrap());
}

/// Every file of a directory and its bytes.
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_damaged_or_foreign_file_is_refused_and_left_byte_identical() {
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(
        garbage.path().join(DB_FILE),
        b"this is not a database, it is someone's notes".repeat(100),
    )
    .unwrap();
    // Another program's SQLite databases: rollback journal, and WAL mode
    // (closed, so without its -wal and -shm files).
    let foreign = |journal: &str| {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "journal_mode", journal).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me');")
            .unwrap();
        drop(conn);
        dir
    };
    let (rollback, wal) = (foreign("DELETE"), foreign("WAL"));
    // One with a schema version, but not ours.
    let versioned = foreign("DELETE");
    let conn = Connection::open(versioned.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    for (dir, expected) in [
        (&garbage, "not an SQLite database"),
        (&rollback, "other tables (\"notes\")"),
        (&wal, "other tables (\"notes\")"),
        (&versioned, "schema version 1 without gradguard's tables"),
    ] {
        let before = snapshot(dir.path());
        assert_eq!(before.len(), 1, "{before:?}");
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("gradguard.db") && message.contains(expected),
            "{message}"
        );
        // Not a byte changed, and nothing beside it: no -wal, -shm or lock file.
        assert_eq!(snapshot(dir.path()), before, "{message}");
    }
}

#[test]
fn a_version_1_store_is_upgraded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store
        .write(&Batch {
            jobs: vec![job("a", 1, None), job("b", 1, None)],
            anomalies: vec![
                finding("a", 1, RuleId::GradSpike, Severity::Warning, None),
                finding("a", 2, RuleId::GradSpike, Severity::Warning, None),
                finding("c", 2, RuleId::GradSpike, Severity::Critical, None),
            ],
            advice: vec![(advice(1, "b", 1, Action::SkipStep), 1.0)],
            ..Batch::default()
        })
        .unwrap();
    drop(store);
    // What version 1 was: no job_counts.
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch("DROP TABLE job_counts; PRAGMA user_version = 1;")
        .unwrap();
    drop(conn);
    let store = Store::open(dir.path()).unwrap();
    let reader = store.reader().unwrap();
    let counts = |name: &str| reader.job_counts(name).unwrap();
    assert_eq!((counts("a").warning, counts("a").advice), (2, 0));
    assert_eq!((counts("b").warning, counts("b").advice), (0, 1));
    assert_eq!(counts("c").critical, 1, "counts of a job without a row");
    let version: i64 = Connection::open(dir.path().join(DB_FILE))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn job_pages_go_by_id_with_counts_kept_through_writes_and_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let names: Vec<String> = (0..250).map(|i| format!("job-{i:03}")).collect();
    let mut batch = Batch::default();
    for (i, name) in names.iter().enumerate().rev() {
        batch.jobs.push(job(name, i as u64, None));
        for step in 0..(i % 4) as u64 {
            let severity = [Severity::Info, Severity::Warning, Severity::Critical][step as usize % 3];
            batch
                .anomalies
                .push(finding(name, step, RuleId::GradSpike, severity, None));
        }
    }
    batch.advice.push((advice(7, "job-003", 1, Action::SkipStep), 1.0));
    store.write(&batch).unwrap();
    let reader = store.reader().unwrap();
    // What the counts must be: counted from the rows themselves.
    let recount = |name: &str| -> JobCounts {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let n = |sql: &str| -> u64 { conn.query_row(sql, [name], |r| r.get::<_, i64>(0)).unwrap() as u64 };
        JobCounts {
            info: n("SELECT count(*) FROM anomalies WHERE job = ?1 AND severity = 1"),
            warning: n("SELECT count(*) FROM anomalies WHERE job = ?1 AND severity = 2"),
            critical: n("SELECT count(*) FROM anomalies WHERE job = ?1 AND severity = 3"),
            advice: n("SELECT count(*) FROM advice WHERE job = ?1"),
        }
    };
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = reader.jobs_page(after.as_deref(), 101, &[], None).unwrap();
        assert!(page.len() <= 101);
        let more = page.len() == 101;
        for j in page.iter().take(100) {
            assert_eq!(j.counts, recount(&j.job), "{}", j.job);
            assert_eq!(j.row.as_ref().map(|r| r.job.as_str()), Some(j.job.as_str()));
            seen.push(j.job.clone());
        }
        if !more {
            break;
        }
        after = seen.last().cloned();
    }
    assert_eq!(seen, names);
    assert_eq!(reader.job_counts("job-003").unwrap().advice, 1);

    // Named jobs come too, row or not, in id order.
    let page = reader
        .jobs_page(Some("job-247"), 5, &["job-000".into(), "ghost".into()], None)
        .unwrap();
    let ids: Vec<&str> = page.iter().map(|j| j.job.as_str()).collect();
    assert_eq!(ids, ["ghost", "job-000", "job-248", "job-249"]);
    assert_eq!((page[0].row.as_ref(), page[0].counts), (None, JobCounts::default()));

    // Pruning takes the deleted rows off the counts: by age, then by size.
    store
        .prune(
            &Retention {
                max_age_secs: Some(1_000.0),
                max_bytes: None,
            },
            2_001.5,
        )
        .unwrap();
    store
        .prune(
            &Retention {
                max_age_secs: None,
                max_bytes: Some(store.used_bytes().unwrap() - 1),
            },
            0.0,
        )
        .unwrap();
    for name in ["job-003", "job-006", "job-249"] {
        assert_eq!(reader.job_counts(name).unwrap(), recount(name), "{name}");
    }
}

#[test]
fn a_read_past_its_deadline_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reader = store.reader().unwrap();
    // A read that would take minutes: only the deadline ends it.
    let endless = |c: &Connection| -> Result<i64, StoreError> {
        Ok(c.query_row(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n WHERE i < 0",
            [],
            |r| r.get(0),
        )?)
    };
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_millis(50);
    let err = reader.until(deadline).with(endless).unwrap_err();
    assert!(matches!(err, StoreError::Interrupted), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Past the deadline nothing starts; the same connections serve on.
    assert!(matches!(reader.until(deadline).job("a"), Err(StoreError::Interrupted)));
    assert_eq!(reader.job("a").unwrap(), None);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Newer { found: 99, .. }), "{err:?}");
}

#[test]
fn retention_by_age_and_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut batch = Batch::default();
    for step in 0..30_000u64 {
        batch
            .anomalies
            .push(finding("r", step, RuleId::GradSpike, Severity::Info, Some(0)));
    }
    store.write(&batch).unwrap();
    // Times are 1000 + step: keep the last 20,000 seconds.
    let pruned = store
        .prune(
            &Retention {
                max_age_secs: Some(20_000.0),
                max_bytes: None,
            },
            31_000.0,
        )
        .unwrap();
    assert_eq!(pruned.anomalies, 10_000);
    let reader = store.reader().unwrap();
    let oldest = all(
        &Filter {
            limit: 1000,
            ..Filter::default()
        },
        &reader,
    );
    assert_eq!((oldest.len(), oldest.last().copied()), (20_000, Some(10_001)));

    let before = store.used_bytes().unwrap();
    let limit = before / 2;
    let pruned = store
        .prune(
            &Retention {
                max_age_secs: None,
                max_bytes: Some(limit),
            },
            31_000.0,
        )
        .unwrap();
    assert!(pruned.anomalies >= 10_000 && pruned.anomalies < 20_000, "{pruned:?}");
    assert!(store.used_bytes().unwrap() <= limit);
    // The newest rows are the ones kept.
    let kept = all(
        &Filter {
            limit: 1000,
            ..Filter::default()
        },
        &reader,
    );
    assert_eq!(kept.first().copied(), Some(30_000));
}

#[test]
fn keyed_anomalies_and_advice_are_stored_once_however_often_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let keyed = |id: u64, step: u64| StoredAnomaly {
        id,
        finding: finding("c", step, RuleId::GradSpike, Severity::Info, Some(0)),
    };
    let first = Batch {
        keyed: vec![keyed(1 << 52, 10), keyed((1 << 52) + 1, 11)],
        advice: vec![(advice(1 << 52, "c", 10, Action::SkipStep), 5.0)],
        ..Batch::default()
    };
    assert_eq!(store.write(&first).unwrap(), vec![1 << 52, (1 << 52) + 1]);
    store
        .write(&Batch {
            acks: vec![Ack {
                advice_id: 1 << 52,
                job: "c".into(),
                rank: 0,
                applied_step: 11,
                applied: true,
                note: String::new(),
                time: 6.0,
            }],
            ..Batch::default()
        })
        .unwrap();
    // Redelivered, with one anomaly that is new.
    let again = Batch {
        keyed: vec![keyed(1 << 52, 10), keyed((1 << 52) + 2, 12)],
        ..first.clone()
    };
    assert_eq!(store.write(&again).unwrap(), vec![(1 << 52) + 2], "only the new one");
    let reader = store.reader().unwrap();
    let f = Filter {
        job: Some("c".into()),
        limit: 10,
        ..Filter::default()
    };
    assert_eq!(all(&f, &reader), vec![(1 << 52) + 2, (1 << 52) + 1, 1 << 52]);
    let advice = reader.advice(&f).unwrap().items;
    assert_eq!(advice.len(), 1);
    assert_eq!(advice[0].applied, 1, "a redelivered advice keeps its acknowledgements");
}
