//! A real `gradguard serve` against the attacks of the hardening issue: each
//! test asserts the bound or the status a hostile or careless client meets.
//! (Hello-only squatters, the idle stream, the second `serve` and the name
//! limits of a Hello are in `serve.rs`, beside the rest of the intake.)

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Server, hello, sample};
use gradguard::client::{self, WorkerStream};
use gradguard::proto;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// The bound documented in the README for 50 jobs that each name rank 65535
/// of a world of 65536 (half of them in replica group 16383 of a layout):
/// per-rank state exists only for ranks that report or are placed.
const FIFTY_HIGH_RANK_JOBS_MIB: f64 = 16.0;

fn scrape(server: &Server) -> String {
    tokio::task::block_in_place(|| server.scrape())
}

fn resident_mib(server: &Server) -> f64 {
    sample(&scrape(server), "process_resident_memory_bytes").expect("resident memory is exported") / (1 << 20) as f64
}

/// One job whose only rank is `rank` of `world_size` (placed in the
/// `layout`, if any), with one summary, judged (its Progress came back)
/// before this returns.
async fn one_summary_job(url: &str, job: &str, rank: u32, world_size: u32, layout: Option<proto::Layout>) {
    let mut c = client::connect(url).await.unwrap();
    let h = proto::Hello {
        report_progress: true,
        layout,
        ..hello(job, rank, world_size, 0)
    };
    let mut s = WorkerStream::open(&mut c, h).await.unwrap();
    s.sender
        .summary(proto::Summary {
            step: 1,
            loss: Some(2.0),
            grad_norm: Some(1.0),
            ..Default::default()
        })
        .await
        .unwrap();
    let judged = s.receiver.message().await.unwrap().and_then(|m| m.body);
    assert!(
        matches!(judged, Some(proto::server_message::Body::Progress(_))),
        "{judged:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_jobs_of_rank_65535_cost_what_fifty_small_jobs_cost() {
    let server = Server::start();
    let url = server.url();
    // Warm up the allocator, the store and the runtime with small jobs.
    for i in 0..10 {
        one_summary_job(&url, &format!("warm-{i}"), 0, 1, None).await;
    }
    let before = resident_mib(&server);
    // The last of 16,384 pipeline stages of 4 replicas: its norm waits for
    // the stage's other replicas.
    let last_stage = proto::Layout {
        data_parallel: 4,
        tensor_parallel: 1,
        pipeline_parallel: 16384,
        replica_group: 16383,
    };
    for i in 0..50 {
        let layout = (i % 2 == 1).then_some(last_stage);
        one_summary_job(&url, &format!("wide-{i}"), 65535, 65536, layout).await;
    }
    let after = resident_mib(&server);
    eprintln!("resident memory: {before:.1} MiB before, {after:.1} MiB after 50 jobs of rank 65535");
    let text = scrape(&server);
    assert_eq!(sample(&text, "gradguard_active_jobs"), Some(60.0));
    assert!(
        after - before < FIFTY_HIGH_RANK_JOBS_MIB,
        "50 jobs of rank 65535 took the server from {before:.1} MiB to {after:.1} MiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mebibyte_layer_name_is_refused_naming_the_limit() {
    let server = Server::start();
    let mut c = client::connect(&server.url()).await.unwrap();
    let mut h = hello("huge-name", 0, 1, 2);
    h.layer_names[1] = "x".repeat(1 << 20);
    let status = match WorkerStream::open(&mut c, h).await {
        Err(client::ClientError::Status(status)) => status,
        other => panic!("a 1 MiB layer name was not refused: {:?}", other.map(|s| s.welcome)),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for part in ["layer_names[1]", "1048576 bytes", "256"] {
        assert!(status.message().contains(part), "{part:?} not in {status:?}");
    }
    assert!(
        status.message().len() < 512,
        "the error echoes the input: {} bytes",
        status.message().len()
    );
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "gradguard.v1.Ingest".into(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// Reads until the server closes the socket; how long that took.
fn wait_closed(mut socket: TcpStream) -> Duration {
    let start = Instant::now();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue, // the server's HTTP/2 settings, a GOAWAY
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => return start.elapsed(),
            Err(e) => panic!("the silent connection was not closed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_is_closed_after_the_first_request_timeout() {
    let server = Server::start_with(&["--first-request-timeout", "1s"]);
    // A client that made a call keeps its connection past the timeout.
    let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    assert_eq!(health(channel.clone()).await.unwrap(), ServingStatus::Serving);

    let silent = TcpStream::connect(server.grpc).unwrap();
    let took = tokio::task::block_in_place(|| wait_closed(silent));
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before its timeout"
    );
    assert_eq!(
        server.sample("gradguard_grpc_connections_closed_total{reason=\"silent\"}"),
        Some(1.0)
    );
    assert_eq!(
        health(channel).await.unwrap(),
        ServingStatus::Serving,
        "the connection that spoke is still open"
    );
    assert_eq!(
        server.sample("gradguard_grpc_connections_closed_total{reason=\"silent\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_open_file_limit_health_keeps_answering() {
    // 320 descriptors, 256 kept for the rest: the cap is 64 connections.
    let server = Server::start_with_file_limit(320, &["--first-request-timeout", "2s"]);
    assert_eq!(server.sample("gradguard_grpc_connections_limit"), Some(64.0));
    let probe = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    assert_eq!(health(probe.clone()).await.unwrap(), ServingStatus::Serving);

    // 200 raw connections that never speak: 63 fill the cap, the rest are
    // closed as they are accepted.
    let flood: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(server.grpc).unwrap()).collect();
    let text = server.wait_for("the flood to be over the cap", |t| {
        sample(t, "gradguard_grpc_connections_closed_total{reason=\"at_capacity\"}") == Some(137.0)
    });
    assert_eq!(sample(&text, "gradguard_grpc_connections"), Some(64.0));
    assert_eq!(sample(&text, "gradguard_grpc_accept_errors_total"), Some(0.0));
    // The probe's connection and the HTTP endpoints still answer.
    assert_eq!(health(probe.clone()).await.unwrap(), ServingStatus::Serving);
    let healthz = tokio::task::block_in_place(|| {
        ureq::get(&format!("http://{}/healthz", server.metrics))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    });
    assert_eq!(healthz, "ok\n");
    // The service is not spinning on its accept loop.
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let (ticks, start) = (cpu(server.pid()), Instant::now());
    let text = server.wait_for("the silent connections to time out", |t| {
        sample(t, "gradguard_grpc_connections_closed_total{reason=\"silent\"}") == Some(63.0)
    });
    let spent = (cpu(server.pid()) - ticks) as f64 / 100.0;
    assert!(
        spent < 0.5 * start.elapsed().as_secs_f64() + 0.2,
        "{spent} s of CPU in {:?}",
        start.elapsed()
    );
    assert_eq!(sample(&text, "gradguard_grpc_connections"), Some(1.0));
    // With the silent ones gone, a new client gets in again.
    let fresh = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    assert_eq!(health(fresh).await.unwrap(), ServingStatus::Serving);
    drop(flood);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mebibyte_page_token_is_not_echoed_back() {
    use gradguard::proto::query_client::QueryClient;
    let server = Server::start();
    let mut q = QueryClient::connect(server.url()).await.unwrap();
    let status = q
        .list_anomalies(proto::ListAnomaliesRequest {
            filter: None,
            page_size: 10,
            page_token: "z".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("page_token"), "{status:?}");
    assert!(
        status.message().len() < 512,
        "{} bytes of error",
        status.message().len()
    );
}
