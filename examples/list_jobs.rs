//! `ListJobs` over 20,000 jobs against a real `gradguard serve`: the time and
//! the bytes of one page, of paging through every job, and of 40 concurrent
//! first-page calls, with the server's peak memory.
//!
//! ```sh
//! cargo build --release && cargo run --release --example list_jobs
//! ```
//!
//! The data directory is filled with the library's own store writer (as
//! `serve` writes it): `LIST_JOBS` jobs (20,000), each with `LIST_JOBS_ANOMALIES`
//! anomalies (10) and one advice. `GRADGUARD_BIN` names the server binary
//! (default `target/release/gradguard`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gradguard::model::{Action, Advice, Finding, RuleId, Severity};
use gradguard::proto::{self, query_client::QueryClient};
use gradguard::store::{Batch, JobRow, Reader, Store};
use prost::Message;
use tonic::transport::Channel;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Fills `dir` with `jobs` jobs and their anomalies and advice.
fn fill(dir: &std::path::Path, jobs: usize, anomalies: usize) {
    let mut store = Store::open(dir).expect("open the store");
    let severities = [Severity::Info, Severity::Warning, Severity::Critical];
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        let mut batch = Batch::default();
        for &i in chunk {
            let job: Arc<str> = Arc::from(format!("llm-pretrain-run-{i:05}"));
            batch.jobs.push(JobRow {
                job: job.to_string(),
                first_seen: 1_790_000_000.0,
                last_seen: 1_790_000_000.0 + i as f64,
                ranks: 64,
                world_size: Some(64),
                layers: 96,
                last_step: Some(100_000 + i as u64),
                health: Some(Severity::Warning),
            });
            for a in 0..anomalies {
                batch.anomalies.push(Finding {
                    job: job.clone(),
                    worker: Some((a % 64) as u32),
                    step: a as u64,
                    time: Some(1_790_000_000.0 + a as f64),
                    rule: RuleId::GradSpike,
                    severity: severities[a % 3],
                    layer: Some(Arc::from("transformer.h.11.attn.c_proj")),
                    value: 9.5,
                    threshold: 3.0,
                    message: "gradient spike: norm 9.5000 is 6.5σ above its moving mean 1.0000".into(),
                });
            }
            batch.advice.push((
                Advice {
                    id: i as u64 + 1,
                    job,
                    target: None,
                    step: 3,
                    apply_from: 4,
                    action: Action::ClipGradients { max_norm: 1.0 },
                    severity: Severity::Warning,
                    rules: vec![RuleId::GradSpike],
                    reason: "grad_spike".into(),
                    evidence: vec![],
                },
                1_790_000_000.0,
            ));
        }
        store.write(&batch).expect("write");
    }
}

/// Starts `gradguard serve` on `dir`; returns it and its gRPC URL.
fn serve(dir: &std::path::Path) -> (Child, String) {
    let bin = std::env::var("GRADGUARD_BIN").unwrap_or_else(|_| "target/release/gradguard".into());
    let mut child = Command::new(&bin)
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no grpc= in {line:?}"));
    (child, format!("http://{grpc}"))
}

/// The peak resident memory of a process, in MiB (Linux).
fn peak_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

async fn page(q: &mut QueryClient<Channel>, size: u32, token: String) -> proto::ListJobsResponse {
    q.list_jobs(proto::ListJobsRequest {
        page_size: size,
        page_token: token,
    })
    .await
    .expect("ListJobs")
    .into_inner()
}

/// Pages through every job; returns (jobs, pages, bytes, time).
async fn all_pages(q: &mut QueryClient<Channel>, size: u32) -> (usize, usize, usize, Duration) {
    let started = Instant::now();
    let (mut jobs, mut pages, mut bytes) = (0, 0, 0);
    let mut token = String::new();
    loop {
        let p = page(q, size, token).await;
        jobs += p.jobs.len();
        pages += 1;
        bytes += p.encoded_len();
        if p.next_page_token.is_empty() {
            return (jobs, pages, bytes, started.elapsed());
        }
        token = p.next_page_token;
    }
}

#[tokio::main]
async fn main() {
    let jobs = env_or("LIST_JOBS", 20_000);
    let anomalies = env_or("LIST_JOBS_ANOMALIES", 10);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let started = Instant::now();
    fill(dir.path(), jobs, anomalies);
    println!(
        "store: {jobs} jobs, {} anomalies, {jobs} advice written in {:.1} s",
        jobs * anomalies,
        started.elapsed().as_secs_f64()
    );
    // The store's part of a page, in process: one `Reader::jobs_page`.
    let reader = Reader::open(dir.path()).expect("a reader");
    for size in [100u32, 1000] {
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let rows = reader.jobs_page(None, size + 1, &[], None).expect("a page");
            times.push(t.elapsed());
            assert_eq!(rows.len(), (size as usize + 1).min(jobs));
        }
        times.sort();
        let t = Instant::now();
        let mut after: Option<String> = None;
        let mut n = 0;
        loop {
            let rows = reader.jobs_page(after.as_deref(), size, &[], None).expect("a page");
            n += rows.len();
            match rows.last() {
                Some(last) if rows.len() == size as usize => after = Some(last.job.clone()),
                _ => break,
            }
        }
        println!(
            "store read (in process), pages of {size}: one page median {:.2} ms; all {n} jobs {:.0} ms",
            times[10].as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    drop(reader);
    let (mut child, url) = serve(dir.path());
    let mut q = QueryClient::connect(url.clone()).await.expect("connect");

    // A first call warms the connection; a call that reads no store is the
    // floor; then one page of each size.
    page(&mut q, 0, String::new()).await;
    let mut floor = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        q.get_rules(proto::GetRulesRequest::default()).await.expect("GetRules");
        floor.push(t.elapsed());
    }
    floor.sort();
    println!(
        "GetRules (no store read): median {:.2} ms",
        floor[10].as_secs_f64() * 1e3
    );
    for size in [0, 1000] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let p = page(&mut q, size, String::new()).await;
            times.push(t.elapsed());
            bytes = p.encoded_len();
        }
        times.sort();
        println!(
            "one page (page_size {size} -> {} jobs): {bytes} bytes, median {:.2} ms, max {:.2} ms (20 calls)",
            if size == 0 { 100 } else { size },
            times[10].as_secs_f64() * 1e3,
            times[19].as_secs_f64() * 1e3
        );
    }
    for size in [100, 1000] {
        let (n, pages, bytes, took) = all_pages(&mut q, size).await;
        println!(
            "all jobs, page_size {size}: {n} jobs in {pages} pages, {bytes} bytes, {:.0} ms",
            took.as_secs_f64() * 1e3
        );
    }

    // 40 concurrent first-page calls (default size), each on its own connection.
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(QueryClient::connect(url.clone()).await.expect("connect"));
    }
    let started = Instant::now();
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut q| {
            tokio::spawn(async move {
                let t = Instant::now();
                let p = page(&mut q, 0, String::new()).await;
                (t.elapsed(), p.encoded_len())
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut bytes = 0;
    for c in calls {
        let (t, b) = c.await.expect("a call");
        times.push(t);
        bytes += b;
    }
    let wall = started.elapsed();
    times.sort();
    println!(
        "40 concurrent first pages: all answered in {:.1} ms; per call median {:.1} ms, max {:.1} ms; {bytes} bytes in all",
        wall.as_secs_f64() * 1e3,
        times[20].as_secs_f64() * 1e3,
        times[39].as_secs_f64() * 1e3
    );
    println!("server peak resident memory: {:.0} MiB", peak_mib(child.id()));
    let _ = child.kill();
    let _ = child.wait();
}
