//! Store benchmark: fills a store with 1 million anomalies (100 jobs, every
//! rule and severity), then times filtered `ListAnomalies` pages of 100 the way
//! the Query service runs them (`Reader::anomalies`), from two threads.
//!
//! `cargo bench --bench store` (set `STORE_BENCH_ROWS` for another size).
//! Prints insert throughput, bytes per anomaly, and queries/s with p50/p99 per
//! query shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gradguard::model::{Finding, RuleId, Severity};
use gradguard::store::{Batch, Filter, Reader, Store};

const JOBS: u64 = 100;
/// Concurrent clients: one per core of the 2-core machine the figures are from.
const THREADS: usize = 2;
const QUERIES_PER_SHAPE: usize = 4000;

fn finding(i: u64) -> Finding {
    let severity = match (i / JOBS) % 100 {
        0 => Severity::Critical,
        1..=9 => Severity::Warning,
        _ => Severity::Info,
    };
    let rule = RuleId::ALL[((i / JOBS) % RuleId::ALL.len() as u64) as usize];
    Finding {
        job: Arc::from(format!("job-{:03}", i % JOBS)),
        worker: Some((i % 8) as u32),
        step: i / JOBS,
        time: Some(1_790_000_000.0 + i as f64 * 0.01),
        rule,
        severity,
        layer: i.is_multiple_of(3).then(|| Arc::from("transformer.h.11.attn.c_proj")),
        value: 3.0 + (i % 17) as f64,
        threshold: 2.5,
        message: format!(
            "gradient spike: norm {:.4} is {:.1}σ above its moving mean 1.0000",
            3.0 + (i % 17) as f64,
            2.5 + (i % 7) as f64
        ),
    }
}

/// A query shape: the filter of the i-th query.
type Shape = dyn Fn(u64) -> Filter + Send + Sync;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let rows: u64 = std::env::var("STORE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = Store::open(dir.path()).expect("open store");

    let started = Instant::now();
    let mut batch = Batch::default();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        batch.clear();
        batch.anomalies.extend(chunk.iter().map(|&i| finding(i)));
        store.write(&batch).expect("write");
    }
    let fill = started.elapsed();
    let bytes = store.used_bytes().expect("size");
    println!(
        "store: {rows} anomalies written in {:.1} s ({:.0} anomalies/s in batches of 10,000), {bytes} bytes in use, {:.0} bytes per anomaly",
        fill.as_secs_f64(),
        rows as f64 / fill.as_secs_f64(),
        bytes as f64 / rows as f64
    );

    let reader = Arc::new(Reader::open(dir.path()).expect("reader"));
    let shapes: Vec<(&str, Box<Shape>)> = vec![
        (
            "newest page (no filter)",
            Box::new(|_| Filter {
                limit: 100,
                ..Filter::default()
            }),
        ),
        (
            "job",
            Box::new(|i| Filter {
                job: Some(format!("job-{:03}", i % JOBS)),
                limit: 100,
                ..Filter::default()
            }),
        ),
        (
            "job + rule + min severity warning",
            Box::new(|i| Filter {
                job: Some(format!("job-{:03}", i % JOBS)),
                rule: Some(RuleId::ALL[(i % 13) as usize]),
                min_severity: Some(Severity::Warning),
                limit: 100,
                ..Filter::default()
            }),
        ),
        (
            "min severity critical",
            Box::new(|_| Filter {
                min_severity: Some(Severity::Critical),
                limit: 100,
                ..Filter::default()
            }),
        ),
        (
            "job + step range",
            Box::new(move |i| Filter {
                job: Some(format!("job-{:03}", i % JOBS)),
                step_from: Some(rows / JOBS / 2),
                step_to: Some(rows / JOBS / 2 + 500),
                limit: 100,
                ..Filter::default()
            }),
        ),
        (
            "job, from the middle (page token)",
            Box::new(move |i| Filter {
                job: Some(format!("job-{:03}", i % JOBS)),
                before: Some(rows / 2),
                limit: 100,
                ..Filter::default()
            }),
        ),
    ];
    println!("ListAnomalies, page of 100, {THREADS} threads, {QUERIES_PER_SHAPE} queries per shape:");
    for (name, shape) in &shapes {
        let shape: &Shape = shape.as_ref();
        let started = Instant::now();
        let mut all: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let reader = reader.clone();
                    s.spawn(move || {
                        let mut times = Vec::with_capacity(QUERIES_PER_SHAPE / THREADS);
                        let mut rows_seen = 0usize;
                        for q in 0..QUERIES_PER_SHAPE / THREADS {
                            let f = shape((t * 7919 + q) as u64);
                            let t0 = Instant::now();
                            let page = reader.anomalies(&f).expect("query");
                            times.push(t0.elapsed());
                            rows_seen += page.items.len();
                        }
                        assert!(rows_seen > 0, "the shape matched nothing");
                        times
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("query thread"))
                .collect()
        });
        let wall = started.elapsed();
        all.sort_unstable();
        println!(
            "  {name:<36} {:>7.0} queries/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            all.len() as f64 / wall.as_secs_f64(),
            percentile(&all, 0.50).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3,
        );
    }
}
