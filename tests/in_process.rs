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
    let _first = gradguard::client::WorkerStream::open(&mut c, common::hello("a", 0, 1, 2))
        .await
        .expect("the first job is tracked");
    let mut c = gradguard::client::connect(&url).await.unwrap();
    let refused = gradguard::client::WorkerStream::open(&mut c, common::hello("b", 0, 1, 2)).await;
    let status = match refused {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a second job over --max-jobs 1 was accepted"),
    };
    assert!(status.contains("1 jobs are tracked"), "{status}");
    let text = scrape(&service).await;
    assert_eq!(common::sample(&text, "gradguard_jobs_refused_total"), Some(1.0));
    service.stop().await;
}
