//! How the ranks reach the server: one gRPC stream per rank, or a cluster's
//! Kafka topics; advice and stream ends come back as [`Event`]s.

use anyhow::anyhow;
use gradguard::client::{self, ClientError, ClientSecurity, GrpcChannel, StreamReceiver, StreamSender, WorkerStream};
use gradguard::cluster::KafkaConfig;
use gradguard::cluster::worker::{FromCluster, KafkaWorker};
use gradguard::proto::{self, ingest_client::IngestClient, worker_message};
use gradguard::scenario::Scenario;
use gradguard::service::SettingsFile;
use tokio::sync::mpsc;
use tonic::Status;

use super::{DRAIN_TIMEOUT, SimulateArgs};
use crate::cli::{Failure, status_text};

/// What a rank's receive task forwards.
pub(super) enum Event {
    Advice(u32, proto::Advice),
    /// The server ended the rank's stream: cleanly, or with this status.
    Ended(u32, Result<(), Status>),
}

/// The Hello of one rank of the scenario's job.
fn hello(scenario: &Scenario, layer_names: &[String], rank: u32) -> proto::Hello {
    let cfg = scenario.config();
    proto::Hello {
        job: cfg.job.clone(),
        rank,
        world_size: cfg.workers,
        layer_names: layer_names.to_vec(),
        client_version: format!("simulate/{}", env!("CARGO_PKG_VERSION")),
        rule_profile: String::new(),
        report_progress: false,
        layout: None,
    }
}

/// How the ranks reach the service.
pub(super) enum Transport {
    Grpc(Ranks),
    Kafka(Box<KafkaWorker>),
}

impl Transport {
    pub(super) async fn send(&self, rank: u32, body: worker_message::Body) -> Result<(), ()> {
        match self {
            Transport::Grpc(r) => r.senders[rank as usize].send(body).await.map_err(|_| ()),
            Transport::Kafka(w) => w.send(rank, body).map_err(|e| tracing::warn!(error = %e, "kafka")),
        }
    }
}

/// Connects the job to a cluster through Kafka: every rank's Hello goes out
/// first; advice comes back as events of the rank it targets (rank 0 for
/// job-wide advice), and every rank "ends" once the cluster has processed all
/// the job sent.
/// The cluster's `[kafka]` section: from `--settings`, or (deprecated) from
/// the rules file, with `--kafka-brokers`.
fn kafka_config(args: &SimulateArgs, brokers: &str) -> Result<KafkaConfig, Failure> {
    let mut file = match &args.settings {
        Some(path) => {
            SettingsFile::load(path).map_err(|e| Failure::usage(anyhow!("--settings {}: {e}", path.display())))?
        }
        None => SettingsFile::default(),
    };
    let rules = crate::cli::rules_file(args.rules.as_deref(), args.config.as_deref(), args.rules.is_some())?;
    let mut from = "--kafka-brokers".to_owned();
    if let Some(path) = &rules {
        let book = gradguard::config::RuleBook::load(path)
            .map_err(|e| Failure::usage(anyhow!("--rules {}: {e}", path.display())))?;
        let taken = file
            .kafka_from_rules(&book)
            .map_err(|e| Failure::usage(anyhow!("--rules {}: {e:#}", path.display())))?;
        if taken {
            crate::cli::warn(&crate::cli::kafka_in_rules_note(path));
            from = format!("--rules {}", path.display());
        }
    }
    let config = file.kafka.unwrap_or_default().with_brokers(Some(brokers));
    Ok(config
        .map_err(|e| Failure::usage(anyhow!("{from}: {e:#}")))?
        .expect("brokers are given"))
}

pub(super) async fn open_kafka(
    args: &SimulateArgs,
    brokers: &str,
    scenario: &Scenario,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<KafkaWorker, Failure> {
    let config = kafka_config(args, brokers)?;
    let cfg = scenario.config();
    let (worker, mut from_cluster) = KafkaWorker::open(&config, &cfg.job)
        .await
        .map_err(|e| Failure::input(anyhow!("--kafka-brokers {brokers}: {e:#}")))?;
    let names = scenario.layer_names();
    for rank in 0..cfg.workers {
        let hello = hello(scenario, &names, rank);
        worker
            .send(rank, worker_message::Body::Hello(hello))
            .map_err(|e| Failure::input(anyhow!("--kafka-brokers {brokers}: {e:#}")))?;
    }
    let events = events.clone();
    let workers = cfg.workers;
    tokio::spawn(async move {
        while let Some(m) = from_cluster.recv().await {
            match m {
                FromCluster::Advice(a) => {
                    let rank = a.target_rank.unwrap_or(0).min(workers - 1);
                    if events.send(Event::Advice(rank, a)).is_err() {
                        return;
                    }
                }
                FromCluster::Drained => {
                    for rank in 0..workers {
                        let _ = events.send(Event::Ended(rank, Ok(())));
                    }
                    return;
                }
            }
        }
    });
    Ok(worker)
}

/// The ranks' streams: the sending halves, and each rank's connection, kept
/// until its stream has ended.
pub(super) struct Ranks {
    pub(super) clients: Vec<IngestClient<GrpcChannel>>,
    pub(super) senders: Vec<StreamSender>,
}

/// Opens one stream per rank, in rank order, each on its own connection, and
/// starts a task per rank that forwards its advice, then how its stream ended,
/// into `events`.
pub(super) async fn open_ranks(
    url: &str,
    security: &ClientSecurity,
    scenario: &Scenario,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Ranks, Failure> {
    let cfg = scenario.config();
    let names = scenario.layer_names();
    let mut ranks = Ranks {
        clients: Vec::with_capacity(cfg.workers as usize),
        senders: Vec::with_capacity(cfg.workers as usize),
    };
    for rank in 0..cfg.workers {
        let mut client = client::connect_with(url, security)
            .await
            .map_err(|e| open_failure(url, security, rank, e))?;
        let hello = hello(scenario, &names, rank);
        let stream = WorkerStream::open(&mut client, hello)
            .await
            .map_err(|e| open_failure(url, security, rank, e))?;
        // A job the server already has steps for would refuse ours as
        // duplicates (steps must increase), or mix two runs in one history.
        // Some(0) is not checked: a server may report "none" as 0.
        if let Some(last) = stream.welcome.last_step.filter(|&s| s > 0) {
            return Err(Failure::usage(anyhow!(
                "--job {}: {url} already has steps up to {last} of this job from rank {rank}; pass --job with a new name",
                cfg.job
            )));
        }
        tokio::spawn(forward(rank, stream.receiver, events.clone()));
        ranks.clients.push(client);
        ranks.senders.push(stream.sender);
    }
    Ok(ranks)
}

fn open_failure(url: &str, security: &ClientSecurity, rank: u32, error: ClientError) -> Failure {
    match error {
        ClientError::Url { .. } | ClientError::Address { .. } => Failure::usage(anyhow!("--server: {error}")),
        ClientError::Connect { .. } => Failure::input(error),
        ClientError::Tls(_) => Failure::usage(error),
        ClientError::Status(status) => Failure::input(anyhow!(
            "{url} refused the stream of rank {rank}: {}{}",
            status_text(&status),
            client::transport_hint(url, security, &status)
        )),
        ClientError::NoWelcome | ClientError::Closed => {
            Failure::input(anyhow!("{url}: stream of rank {rank}: {error}"))
        }
    }
}

/// Forwards a rank's advice into the shared channel, then how its stream ended.
async fn forward(rank: u32, mut receiver: StreamReceiver, events: mpsc::UnboundedSender<Event>) {
    let end = loop {
        match receiver.advice().await {
            Ok(Some(advice)) => {
                if events.send(Event::Advice(rank, advice)).is_err() {
                    return; // the simulation is gone; nobody is listening
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    let _ = events.send(Event::Ended(rank, end));
}

/// Why the step loop stopped before the scenario was over.
#[derive(Debug, Clone, Copy)]
pub(super) struct Broken {
    pub(super) rank: u32,
    pub(super) step: u64,
}

/// The message for an ended-badly run, or `None` when every stream ended cleanly
/// after the run. A stream's error status wins over the symptoms it caused.
pub(super) fn stream_error(
    url: &str,
    ends: &[Option<Result<(), Status>>],
    stopped: Result<(), Broken>,
    unfinished: bool,
) -> Option<String> {
    for (rank, end) in ends.iter().enumerate() {
        if let Some(Err(status)) = end {
            return Some(format!(
                "the stream of rank {rank} to {url} ended with an error: {}",
                status_text(status)
            ));
        }
    }
    if let Err(b) = stopped {
        return Some(format!(
            "{url} ended the stream of rank {} at step {}, before the run was over",
            b.rank, b.step
        ));
    }
    if unfinished {
        let open: Vec<String> = ends
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(r, _)| r.to_string())
            .collect();
        return Some(format!(
            "{url} did not end the stream of rank(s) {} within {}s of the last summary",
            open.join(", "),
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    None
}
