//! The service as a library: started in-process on port 0 with
//! `gradguard::service::Service`, driven by a real gRPC client over a real
//! socket, stopped cleanly; no binary involved.

mod common;

use gradguard::config::RuleBook;
use gradguard::intake::Limits;
use gradguard::scenario::{Fault, ScenarioConfig};
use gradguard::service::{Listeners, Service, Settings};
use tokio::net::TcpListener;

async fn start(settings: Settings) -> Service {
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    Service::start(settings, RuleBook::builtin(), listeners)
        .await
        .expect("the service starts")
}

async fn scrape(service: &Service) -> String {
    let url = format!("http://{}/metrics", service.http_addr());
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .expect("metrics answer")
            .body_mut()
            .read_to_string()
            .expect("metrics text")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_process_service_advises_an_exploding_run_and_stops() {
    let service = start(Settings::default()).await;
    let url = format!("http://{}", service.grpc_addr());
    let config = ScenarioConfig {
        job: "in-process".into(),
        fault: Fault::AbruptExplosion,
        workers: 2,
        layers: 4,
        steps: 300,
        fault_at: 200,
        seed: 3,
        ..ScenarioConfig::default()
    };
    let (received, _) = common::play(&url, config).await;
    for (rank, advice) in received.iter().enumerate() {
        let first = advice.first().unwrap_or_else(|| panic!("rank {rank} got no advice"));
        assert!(first.decided_at_step >= 200, "{first:?}");
    }
    let text = scrape(&service).await;
    assert_eq!(common::sample(&text, "gradguard_summaries_total"), Some(600.0));
    assert_eq!(common::sample(&text, "gradguard_active_jobs"), Some(1.0));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limits_given_in_process_are_the_ones_enforced() {
    let settings = Settings {
        limits: Limits {
            max_jobs: 1,
            ..Limits::default()
        },
        ..Settings::default()
    };
    let service = start(settings).await;
    let url = format!("http://{}", service.grpc_addr());
    let mut c = gradguard::client::connect(&url).await.unwrap();
    let hello = |job: &str| gradguard::proto::Hello {
        report_progress: true,
        ..common::hello(job, 0, 1, 2)
    };
    let summary = gradguard::proto::Summary {
        step: 1,
        grad_norm: Some(1.0),
        layer_l2: vec![0.5; 2],
        ..Default::default()
    };
    let mut first = gradguard::client::WorkerStream::open(&mut c, hello("a"))
        .await
        .expect("the first job is tracked");
    first.sender.summary(summary.clone()).await.unwrap();
    let judged = first.receiver.message().await.unwrap();
    assert!(
        matches!(
            judged.and_then(|m| m.body),
            Some(gradguard::proto::server_message::Body::Progress(_))
        ),
        "the first job's summary is judged"
    );
    // A job takes its slot with its first summary: that is what is refused.
    let mut c = gradguard::client::connect(&url).await.unwrap();
    let second = gradguard::client::WorkerStream::open(&mut c, hello("b"))
        .await
        .expect("a Hello alone takes no slot");
    second.sender.summary(summary).await.unwrap();
    let mut rx = second.receiver;
    let status = rx
        .drain()
        .await
        .expect_err("a second job over --max-jobs 1 was accepted");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("1 jobs are tracked"), "{status:?}");
    let text = scrape(&service).await;
    assert_eq!(common::sample(&text, "gradguard_jobs_refused_total"), Some(1.0));
    service.stop().await;
}
