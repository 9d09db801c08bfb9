//! The disk's floor under a durable commit: how long one small write plus
//! `fsync` takes when commits come back to back and when they come alone,
//! beside one store commit (an anomaly and its advice, `SyncMode::Full` and
//! `SyncMode::Normal`) at the same spacing.
//!
//! `cargo bench --bench fsync` (set `FSYNC_BENCH_DIR` to measure the disk of a
//! data directory instead of the temporary directory's).
//!
//! With the default store every advice waits for its commit's `fsync`, so the
//! p99 of an isolated advice cannot beat the p99 of an isolated `fsync`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gradguard::model::{Action, Advice, Finding, RuleId, Severity};
use gradguard::store::{Batch, Store, SyncMode};

/// Commits per case.
const COMMITS: usize = 200;
/// Pause before each commit: none (back to back), then commits that come alone.
const GAPS_MS: [u64; 4] = [0, 1, 10, 50];
/// Pages written before each bare fsync: about what a store commit appends.
const PAGES: u64 = 8;

fn quantiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (at(0.5).as_secs_f64() * 1e3, at(0.99).as_secs_f64() * 1e3)
}

/// Overwrites `PAGES` pages of a preallocated file, then fsyncs it, as a WAL
/// after its first lap does.
fn bare_fsync(dir: &Path, gap: Duration) -> (f64, f64) {
    let path = dir.join("fsync-bench.bin");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create the scratch file");
    let page = vec![0x5au8; 4096];
    for _ in 0..PAGES {
        file.write_all(&page).expect("preallocate");
    }
    file.sync_all().expect("fsync");
    let samples = (0..COMMITS)
        .map(|_| {
            std::thread::sleep(gap);
            let started = Instant::now();
            for p in 0..PAGES {
                file.write_all_at(&page, p * 4096).expect("write");
            }
            file.sync_all().expect("fsync");
            started.elapsed()
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(path);
    quantiles(samples)
}

fn batch(i: u64) -> Batch {
    let job: Arc<str> = Arc::from("fsync-bench");
    Batch {
        anomalies: vec![Finding {
            job: job.clone(),
            worker: Some(0),
            step: i,
            time: Some(1_790_000_000.0 + i as f64),
            rule: RuleId::GradSpike,
            severity: Severity::Info,
            layer: None,
            value: 50.0,
            threshold: 2.5,
            message: format!("gradient spike: norm 50.0 at step {i}"),
        }],
        advice: vec![(
            Advice {
                id: i + 1,
                job,
                target: None,
                step: i,
                apply_from: i + 1,
                action: Action::ClipGradients { max_norm: 1.2 },
                severity: Severity::Info,
                rules: vec![RuleId::GradSpike],
                reason: "gradient spike".into(),
                evidence: Vec::new(),
            },
            1_790_000_000.0 + i as f64,
        )],
        ..Batch::default()
    }
}

fn store_commit(dir: &Path, sync: SyncMode, gap: Duration) -> (f64, f64) {
    let data = tempfile::tempdir_in(dir).expect("store dir");
    let mut store = Store::open_with(data.path(), sync).expect("open store");
    let samples = (0..COMMITS as u64)
        .map(|i| {
            let b = batch(i);
            std::thread::sleep(gap);
            let started = Instant::now();
            store.write(&b).expect("commit");
            started.elapsed()
        })
        .collect();
    quantiles(samples)
}

fn main() {
    // `cargo bench` passes `--bench`; this harness has no options.
    let scratch = tempfile::tempdir().expect("temp dir");
    let dir = std::env::var_os("FSYNC_BENCH_DIR").map_or_else(|| scratch.path().to_owned(), Into::into);
    println!(
        "fsync floor in {} ({COMMITS} commits per case; p50 / p99 in ms)",
        dir.display()
    );
    println!(
        "{:>8}  {:>17}  {:>17}  {:>17}",
        "gap",
        format!("bare {PAGES}-page fsync"),
        "store commit full",
        "store commit normal"
    );
    for gap_ms in GAPS_MS {
        let gap = Duration::from_millis(gap_ms);
        let (bare50, bare99) = bare_fsync(&dir, gap);
        let (full50, full99) = store_commit(&dir, SyncMode::Full, gap);
        let (normal50, normal99) = store_commit(&dir, SyncMode::Normal, gap);
        println!(
            "{:>6}ms  {bare50:>7.3} / {bare99:>7.3}  {full50:>7.3} / {full99:>7.3}  {normal50:>7.3} / {normal99:>7.3}",
            gap_ms
        );
    }
}
