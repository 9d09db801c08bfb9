//! The store and the Query API end to end: the real server, a real gRPC client,
//! restarts (also after `kill -9`) on the same data directory.

mod common;

use std::time::Duration;

use common::{Server, hello, play};
use gradguard::client::{self, WorkerStream};
use gradguard::proto::{self, query_client::QueryClient};
use gradguard::scenario::{Fault, Scenario, ScenarioConfig};
use tonic::Code;
use tonic::transport::Channel;

async fn query(server: &Server) -> QueryClient<Channel> {
    QueryClient::connect(server.url())
        .await
        .expect("connect the query client")
}

fn explode(job: &str) -> ScenarioConfig {
    ScenarioConfig {
        job: job.into(),
        fault: Fault::AbruptExplosion,
        workers: 2,
        layers: 6,
        steps: 400,
        fault_at: 250,
        seed: 3,
        ..ScenarioConfig::default()
    }
}

fn filter(job: &str) -> proto::Filter {
    proto::Filter {
        job: job.into(),
        ..Default::default()
    }
}

/// Every anomaly matching `filter`, page by page, checking each page's size.
async fn all_anomalies(q: &mut QueryClient<Channel>, filter: proto::Filter, page_size: u32) -> Vec<proto::Anomaly> {
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let page = q
            .list_anomalies(proto::ListAnomaliesRequest {
                filter: Some(filter.clone()),
                page_size,
                page_token: token,
            })
            .await
            .expect("list anomalies")
            .into_inner();
        assert!(page.anomalies.len() <= page_size as usize);
        rows.extend(page.anomalies);
        if page.next_page_token.is_empty() {
            return rows;
        }
        token = page.next_page_token;
    }
}

async fn all_advice(q: &mut QueryClient<Channel>, job: &str) -> Vec<proto::StoredAdvice> {
    q.list_advice(proto::ListAdviceRequest {
        filter: Some(filter(job)),
        page_size: 1000,
        page_token: String::new(),
    })
    .await
    .expect("list advice")
    .into_inner()
    .advice
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exploding_job_is_queryable_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let (received, plan) = play(&server.url(), explode("boom")).await;
    let mut q = query(&server).await;

    let job = q
        .get_job(proto::GetJobRequest { job: "boom".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.ranks, job.world_size, job.layers, job.last_step),
        (2, Some(2), 6, Some(399))
    );
    assert!(job.health >= proto::Health::Warning as i32, "{job:?}");
    assert!(
        job.advice >= 2 && job.anomalies_critical + job.anomalies_warning > 0,
        "{job:?}"
    );
    let listed = q
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.iter().map(|j| j.job.as_str()).collect::<Vec<_>>(), ["boom"]);

    // Advice: what the workers received is what is stored, oldest first by id.
    let advice = all_advice(&mut q, "boom").await;
    let mut stored: Vec<proto::Advice> = advice.iter().rev().map(|a| a.advice.clone().unwrap()).collect();
    stored.sort_by_key(|a| a.id);
    assert_eq!(stored, received[0]);
    assert!(stored[0].decided_at_step >= plan.at);

    // Anomalies: pages of 7 give exactly the rows of one big page, newest first.
    let anomalies = all_anomalies(&mut q, filter("boom"), 7).await;
    let one_page = all_anomalies(&mut q, filter("boom"), 1000).await;
    assert_eq!(anomalies, one_page);
    assert!(
        anomalies.windows(2).all(|w| w[0].id > w[1].id),
        "newest first, no repeats"
    );
    assert!(anomalies.iter().all(|a| a.job == "boom" && a.step >= plan.at));
    assert_eq!(
        anomalies.len() as u64,
        job.anomalies_info + job.anomalies_warning + job.anomalies_critical
    );

    // Filters return exactly the matching rows.
    let spikes = all_anomalies(
        &mut q,
        proto::Filter {
            rule: "grad_spike".into(),
            step_from: Some(260),
            step_to: Some(330),
            ..filter("boom")
        },
        5,
    )
    .await;
    let expected: Vec<&proto::Anomaly> = anomalies
        .iter()
        .filter(|a| a.rule == "grad_spike" && (260..=330).contains(&a.step))
        .collect();
    assert_eq!(spikes.iter().collect::<Vec<_>>(), expected);
    let critical = all_anomalies(
        &mut q,
        proto::Filter {
            min_severity: proto::Severity::Critical as i32,
            ..filter("boom")
        },
        3,
    )
    .await;
    let expected: Vec<&proto::Anomaly> = anomalies
        .iter()
        .filter(|a| a.severity == proto::Severity::Critical as i32)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(critical.iter().collect::<Vec<_>>(), expected);
    let rank1 = all_anomalies(
        &mut q,
        proto::Filter {
            worker: Some(1),
            ..filter("boom")
        },
        1000,
    )
    .await;
    assert_eq!(
        rank1.iter().collect::<Vec<_>>(),
        anomalies.iter().filter(|a| a.rank == Some(1)).collect::<Vec<_>>()
    );

    // kill -9, then a new server on the same directory answers the same.
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    let mut q = query(&server).await;
    assert_eq!(all_anomalies(&mut q, filter("boom"), 1000).await, anomalies);
    assert_eq!(all_advice(&mut q, "boom").await, advice);
    let again = q
        .get_job(proto::GetJobRequest { job: "boom".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.live);
    assert_eq!((again.last_step, again.health), (job.last_step, job.health));

    // Advice ids go on from where they were.
    let (received, _) = play(&server.url(), explode("boom-2")).await;
    let last = stored.iter().map(|a| a.id).max().unwrap();
    assert!(
        received[0].iter().all(|a| a.id > last),
        "ids restarted: {last} then {:?}",
        received[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_are_stored_with_their_advice() {
    let server = Server::start();
    let cfg = ScenarioConfig {
        job: "acked".into(),
        workers: 1,
        ..explode("acked")
    };
    let names = Scenario::new(cfg.clone()).layer_names();
    let (received, _) = play(&server.url(), cfg).await;
    let first = &received[0][0];
    let mut c = client::connect(&server.url()).await.unwrap();
    // A reconnecting rank acknowledges what it applied.
    let h = proto::Hello {
        layer_names: names,
        ..hello("acked", 0, 1, 0)
    };
    let stream = WorkerStream::open(&mut c, h).await.unwrap();
    stream.sender.ack(first, 251, true).await.unwrap();
    drop(stream.sender);
    let mut rx = stream.receiver;
    rx.drain().await.unwrap();

    let mut q = query(&server).await;
    let advice = all_advice(&mut q, "acked").await;
    let stored = advice
        .iter()
        .find(|a| a.advice.as_ref().unwrap().id == first.id)
        .unwrap();
    assert_eq!((stored.applied, stored.declined), (1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sees_anomalies_raised_after_it_subscribed() {
    let server = Server::start();
    let mut q = query(&server).await;
    let mut watch = q
        .watch_anomalies(proto::WatchAnomaliesRequest {
            job: "watched".into(),
            min_severity: proto::Severity::Critical as i32,
        })
        .await
        .unwrap()
        .into_inner();
    // Another job's anomalies are not shown.
    play(
        &server.url(),
        ScenarioConfig {
            fault: Fault::NanGradients,
            ..explode("other")
        },
    )
    .await;
    let (_, plan) = play(
        &server.url(),
        ScenarioConfig {
            fault: Fault::NanGradients,
            ..explode("watched")
        },
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("an anomaly arrives")
        .unwrap()
        .unwrap();
    assert_eq!((first.job.as_str(), first.rule.as_str()), ("watched", "nonfinite"));
    assert_eq!(first.step, plan.at);
    assert!(first.id > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_get_their_status() {
    let server = Server::start();
    let mut q = query(&server).await;
    let status = q
        .get_job(proto::GetJobRequest { job: "ghost".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("ghost"), "{status:?}");

    let bad = |filter: proto::Filter, token: &str| proto::ListAnomaliesRequest {
        filter: Some(filter),
        page_size: 10,
        page_token: token.into(),
    };
    let cases = [
        (bad(proto::Filter::default(), "xyz"), "page_token"),
        (
            bad(
                proto::Filter {
                    rule: "bogus".into(),
                    ..Default::default()
                },
                "",
            ),
            "filter.rule",
        ),
        (
            bad(
                proto::Filter {
                    step_from: Some(9),
                    step_to: Some(3),
                    ..Default::default()
                },
                "",
            ),
            "filter.step_from",
        ),
        (
            bad(
                proto::Filter {
                    min_severity: 42,
                    ..Default::default()
                },
                "",
            ),
            "filter.min_severity",
        ),
    ];
    for (request, field) in cases {
        let status = q.list_anomalies(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }

    let rules = q
        .get_rules(proto::GetRulesRequest { job: "any".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(rules.toml.contains("[grad_spike]"), "{}", rules.toml);

    let bare = Server::start_with(&["--no-store"]);
    let status = query(&bare)
        .await
        .list_anomalies(bad(proto::Filter::default(), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// Every file of a directory and its bytes.
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_damaged_or_foreign_data_dir_is_refused_and_left_byte_identical() {
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(
        garbage.path().join("gradguard.db"),
        b"precious notes, not a database".repeat(200),
    )
    .unwrap();
    // Another program's SQLite database, with a table of its own.
    let foreign = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(foreign.path().join("gradguard.db")).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me');")
        .unwrap();
    drop(conn);
    for (dir, found) in [
        (&garbage, "not an SQLite database"),
        (&foreign, "another program's SQLite database"),
    ] {
        let before = snapshot(dir.path());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--data-dir") && err.contains("gradguard.db") && err.contains(found),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "it never listened: {out:?}");
        // The same bytes, and nothing new beside them: no -wal, -shm or lock file.
        assert_eq!(snapshot(dir.path()), before, "{err}");
    }
}
