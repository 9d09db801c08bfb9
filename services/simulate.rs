//! `gradguard simulate`: play one synthetic training job against a running
//! gradguard server, as its workers would, and say whether the advice the
//! server streamed back brought the run back.
//!
//! Every rank opens its own stream on its own connection, as separate worker
//! processes would, so the server sees what a real multi-rank job sends: a
//! Hello per rank, one summary per rank per step, and acks. The ranks share one
//! [`Scenario`] played in lockstep, so advice that the job follows changes the
//! simulated dynamics (a closed loop, the same one the scenario suite checks
//! in-process).
//!
//! Advice is taken between steps, as a training loop that polls for advice
//! between optimizer steps would: whatever the per-rank receive tasks have
//! forwarded by then is printed, applied (`--apply-advice`) and acked before the
//! next step is played. Job-wide advice arrives on every rank's stream; it is
//! printed and applied once (by advice id) and acked by every rank that got it.
//!
//! When the run ends (all steps played, or halted by advice) the sending halves
//! are dropped and every stream is read to its end: the server ends a stream
//! once it has processed everything sent on it, so late advice is still shown.
//!
//! Output: one line per advice, then a summary block that compares the loss and
//! the gradient norm at the end with where they were before the fault. With
//! `--json`, one object per advice (`{"kind":"advice",...}`, the fields of
//! `replay --json` plus `received_at`, `applied` and `applied_at`), then one
//! `{"kind":"summary",...}`.
//!
//! Exit status: 0 when the run was played (whether or not it recovered: that is
//! the simulation's result, not an error); 1 when the server cannot be reached
//! or a stream ends with an error; 2 for bad flags.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use gradguard::client::{self, ClientError, StreamReceiver, StreamSender, WorkerStream};
use gradguard::engine::MAX_LAYERS;
use gradguard::model::{Action, Summary};
use gradguard::proto::{self, ingest_client::IngestClient, worker_message};
use gradguard::scenario::{Fault, Scenario, ScenarioConfig};
use gradguard::wire;
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::Channel;

use crate::cli::Failure;
use crate::report::Num;
use gradguard::cluster::KafkaConfig;
use gradguard::cluster::worker::{FromCluster, KafkaWorker};
use gradguard::service::SettingsFile;

/// Steps averaged to say where the loss and the norm stood (before the fault,
/// at the end): one step alone is too noisy to judge a recovery by.
const WINDOW: usize = 20;
/// The loss counts as recovered within this factor of its pre-fault level (the
/// scenario suite's closed-loop criterion).
const LOSS_TOLERANCE: f64 = 1.05;
/// The gradient norm counts as back in range within these factors of its
/// pre-fault level (a healthy norm drifts down by less than 3× over a run of
/// this length; an explosion or vanishing is 10× or more).
const NORM_TOO_HIGH: f64 = 3.0;
const NORM_TOO_LOW: f64 = 0.1;
/// A rank whose norm is this many times its peers' median is still an outlier.
const OUTLIER_RATIO: f64 = 3.0;
/// Advice later than this many steps cannot be judged by its effect before the
/// policy's cooldown (20 steps) runs out: the loop is no longer closed.
const LATE_ADVICE: u64 = 5;
/// How long the server gets to end the streams after the last summary; it
/// only has to process what is queued, so this is generous.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The gradguard server's gRPC address (`http://host:port`; `host:port` is taken as http).
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "kafka_brokers",
        conflicts_with = "kafka_brokers"
    )]
    pub server: Option<String>,

    /// Play the job through a gradguard cluster's Kafka topics instead of
    /// gRPC: summaries to the summaries topic, advice from the advice topic.
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka_brokers: Option<String>,

    /// Settings file whose `[kafka]` section names the topics and client
    /// properties (as given to `serve --settings`); with `--kafka-brokers`.
    #[arg(long, value_name = "FILE", requires = "kafka_brokers")]
    pub settings: Option<std::path::PathBuf>,

    /// Rules file that still holds the `[kafka]` section (deprecated: it
    /// belongs in the settings file); with `--kafka-brokers`.
    #[arg(long, value_name = "FILE", requires = "kafka_brokers")]
    pub rules: Option<std::path::PathBuf>,

    /// The old name of `--rules`, still accepted with a deprecation note.
    #[arg(long, value_name = "FILE", requires = "kafka_brokers", hide = true)]
    pub config: Option<std::path::PathBuf>,

    /// The fault to inject.
    #[arg(long, value_enum)]
    pub scenario: ScenarioName,

    /// Ranks of the job, each on its own stream.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,

    /// Layers with per-layer statistics (0: global values only).
    #[arg(long, default_value_t = 12)]
    pub layers: usize,

    /// Optimizer steps to play.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,

    /// First step of the fault.
    #[arg(long, default_value_t = 300)]
    pub fault_at: u64,

    /// Seed of the noise and of the fault's details (which rank or layer, how large).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Job id the ranks report under (what to look for in Grafana); default
    /// `sim-SCENARIO-N`, N from the start time, new on every run.
    #[arg(long)]
    pub job: Option<String>,

    /// Simulated training time per step, e.g. `5ms`, `1s`. `0` plays as fast as
    /// possible, which a server may not keep up with: advice then lands many
    /// steps late and the ranks can look like stragglers.
    #[arg(long, default_value = "5ms", value_parser = parse_interval)]
    pub step_interval: Duration,

    /// Follow the advice: apply it to the simulated run and ack it as applied.
    #[arg(long)]
    pub apply_advice: bool,

    /// Write one JSON object per line (each advice, then a summary).
    #[arg(long)]
    pub json: bool,
}

/// The scenarios a user can play, named for what they look like; the longer
/// fault names of `generate` are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// No fault: the baseline, which should get no advice.
    Healthy,
    /// The gradient norm jumps 50–1000× and the loss follows.
    #[value(alias = "abrupt-explosion")]
    Explode,
    /// One layer's gradients are NaN for 1–3 steps.
    #[value(alias = "nan-gradients")]
    Nan,
    /// Gradients decay toward zero and the model stops learning.
    #[value(alias = "vanishing")]
    Vanish,
    /// The loss climbs slowly (training past the edge of stability).
    #[value(alias = "loss-divergence")]
    Diverge,
    /// One rank's gradient norm is 5–20× its peers' (needs 4 workers).
    RankOutlier,
    /// One rank stops sending (needs 2 workers).
    #[value(alias = "stalled-rank")]
    Stall,
}

impl ScenarioName {
    pub fn fault(self) -> Fault {
        match self {
            ScenarioName::Healthy => Fault::Healthy,
            ScenarioName::Explode => Fault::AbruptExplosion,
            ScenarioName::Nan => Fault::NanGradients,
            ScenarioName::Vanish => Fault::Vanishing,
            ScenarioName::Diverge => Fault::LossDivergence,
            ScenarioName::RankOutlier => Fault::RankOutlier,
            ScenarioName::Stall => Fault::StalledRank,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::Healthy => "healthy",
            ScenarioName::Explode => "explode",
            ScenarioName::Nan => "nan",
            ScenarioName::Vanish => "vanish",
            ScenarioName::Diverge => "diverge",
            ScenarioName::RankOutlier => "rank-outlier",
            ScenarioName::Stall => "stall",
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 5ms, 1s, or 0)"))
}

pub fn run(args: &SimulateArgs) -> Result<ExitCode, Failure> {
    let cfg = scenario_config(args, unix_now())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(simulate(args, Scenario::new(cfg)))
}

/// The scenario the flags describe, or a usage error naming the flag.
fn scenario_config(args: &SimulateArgs, start_time: f64) -> Result<ScenarioConfig, Failure> {
    let fault = args.scenario.fault();
    if args.workers < fault.min_workers() {
        return Err(Failure::usage(anyhow!(
            "--workers {}: scenario {} needs at least {} workers",
            args.workers,
            args.scenario.as_str(),
            fault.min_workers()
        )));
    }
    if fault != Fault::Healthy && args.fault_at >= args.steps {
        return Err(Failure::usage(anyhow!(
            "--fault-at {}: must be below --steps {}",
            args.fault_at,
            args.steps
        )));
    }
    if args.layers > MAX_LAYERS {
        return Err(Failure::usage(anyhow!(
            "--layers {}: at most {MAX_LAYERS}",
            args.layers
        )));
    }
    let job = args
        .job
        .clone()
        // Unique per run (to the second), so running the same command again
        // starts a new job instead of colliding with the last one's steps.
        .unwrap_or_else(|| format!("sim-{}-{}", args.scenario.as_str(), start_time as u64 % 1_000_000));
    if job.trim().is_empty() {
        return Err(Failure::usage(anyhow!("--job: must not be empty")));
    }
    Ok(ScenarioConfig {
        job,
        fault,
        workers: args.workers,
        layers: args.layers,
        steps: args.steps,
        seed: args.seed,
        fault_at: args.fault_at,
        // Real wall-clock times, so the run lines up with the server's clock
        // and its dashboards.
        start_time,
        step_secs: args.step_interval.as_secs_f64(),
        ..ScenarioConfig::default()
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a rank's receive task forwards.
enum Event {
    Advice(u32, proto::Advice),
    /// The server ended the rank's stream: cleanly, or with this status.
    Ended(u32, Result<(), Status>),
}

async fn simulate(args: &SimulateArgs, scenario: Scenario) -> Result<ExitCode, Failure> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (ranks, target) = match (&args.server, &args.kafka_brokers) {
        (Some(url), _) => (
            Transport::Grpc(open_ranks(url, &scenario, &events_tx).await?),
            url.clone(),
        ),
        (None, Some(brokers)) => {
            let worker = open_kafka(args, brokers, &scenario, &events_tx).await?;
            (
                Transport::Kafka(Box::new(worker)),
                format!("the Kafka brokers {brokers}"),
            )
        }
        (None, None) => unreachable!("clap requires --server or --kafka-brokers"),
    };
    // Only the receive tasks hold senders now: the channel closes when all end.
    drop(events_tx);

    let mut sim = Sim::new(args, scenario, ranks, events);
    sim.out.header(&sim.scenario, &target, args.apply_advice);
    let stopped = sim.play().await;
    let unfinished = sim.finish().await;
    let error = match sim.settle_error.take() {
        Some(e) => Some(format!("{e:#}")),
        None => stream_error(&target, &sim.ends, stopped, unfinished),
    };
    let summary = sim.summary(error.as_deref());
    sim.out.summary(&summary);
    sim.out.done()?;
    match error {
        Some(message) => Err(Failure::input(anyhow!(message))),
        None => Ok(ExitCode::SUCCESS),
    }
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
    }
}

/// How the ranks reach the service.
enum Transport {
    Grpc(Ranks),
    Kafka(Box<KafkaWorker>),
}

impl Transport {
    async fn send(&self, rank: u32, body: worker_message::Body) -> Result<(), ()> {
        match self {
            Transport::Grpc(r) => r.senders[rank as usize].send(body).await.map_err(|_| ()),
            Transport::Kafka(w) => w.send(rank, body).map_err(|e| tracing::warn!(error = %e, "kafka")),
        }
    }
}

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

/// Connects the job to a cluster through Kafka: every rank's Hello goes out
/// first; advice comes back as events of the rank it targets (rank 0 for
/// job-wide advice), and every rank "ends" once the cluster has processed all
/// the job sent.
async fn open_kafka(
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
struct Ranks {
    clients: Vec<IngestClient<Channel>>,
    senders: Vec<StreamSender>,
}

/// Opens one stream per rank, in rank order, each on its own connection, and
/// starts a task per rank that forwards its advice, then how its stream ended,
/// into `events`.
async fn open_ranks(url: &str, scenario: &Scenario, events: &mpsc::UnboundedSender<Event>) -> Result<Ranks, Failure> {
    let cfg = scenario.config();
    let names = scenario.layer_names();
    let mut ranks = Ranks {
        clients: Vec::with_capacity(cfg.workers as usize),
        senders: Vec::with_capacity(cfg.workers as usize),
    };
    for rank in 0..cfg.workers {
        let mut client = client::connect(url).await.map_err(|e| open_failure(url, rank, e))?;
        let hello = hello(scenario, &names, rank);
        let stream = WorkerStream::open(&mut client, hello)
            .await
            .map_err(|e| open_failure(url, rank, e))?;
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

fn open_failure(url: &str, rank: u32, error: ClientError) -> Failure {
    match error {
        ClientError::Url { .. } => Failure::usage(anyhow!("--server: {error}")),
        ClientError::Connect { .. } => Failure::input(error),
        ClientError::Status(status) => Failure::input(anyhow!(
            "{url} refused the stream of rank {rank}: {}",
            status_text(&status)
        )),
        ClientError::NoWelcome | ClientError::Closed => {
            Failure::input(anyhow!("{url}: stream of rank {rank}: {error}"))
        }
    }
}

fn status_text(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
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
struct Broken {
    rank: u32,
    step: u64,
}

/// The message for an ended-badly run, or `None` when every stream ended cleanly
/// after the run. A stream's error status wins over the symptoms it caused.
fn stream_error(
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

/// One advice as the job received it.
#[derive(Debug, Clone)]
struct Taken {
    /// `None`: an action this client does not know (a newer server).
    action: Option<Action>,
    decided_at: u64,
    /// The step about to be played when the job first saw it.
    received_at: u64,
    applied_at: Option<u64>,
}

/// The simulation in progress: the scenario, the streams, the advice taken and
/// the record of what was sent.
struct Sim {
    scenario: Scenario,
    ranks: Transport,
    events: mpsc::UnboundedReceiver<Event>,
    /// Kafka: the cluster did not confirm it processed the job.
    settle_error: Option<anyhow::Error>,
    /// How each rank's stream ended, once it has.
    ends: Vec<Option<Result<(), Status>>>,
    advice: HashMap<u64, Taken>,
    apply: bool,
    interval: Duration,
    record: Record,
    out: Printer,
}

impl Sim {
    fn new(args: &SimulateArgs, scenario: Scenario, ranks: Transport, events: mpsc::UnboundedReceiver<Event>) -> Self {
        let cfg = scenario.config();
        Self {
            record: Record::new(cfg.workers, cfg.fault_at),
            ends: (0..cfg.workers).map(|_| None).collect(),
            settle_error: None,
            scenario,
            ranks,
            events,
            advice: HashMap::new(),
            apply: args.apply_advice,
            interval: args.step_interval,
            out: Printer::new(args.json),
        }
    }

    /// Plays the scenario to its end (or until advice halts it): advice first,
    /// then each rank's summary, then the step interval. Stops early when a
    /// stream goes away.
    async fn play(&mut self) -> Result<(), Broken> {
        loop {
            let step = self.scenario.step();
            self.take_pending(step).await?;
            let Some(batch) = self.scenario.next_step() else {
                return Ok(());
            };
            for s in &batch {
                let body = worker_message::Body::Summary(wire::summary_to_proto(s));
                if self.ranks.send(s.worker, body).await.is_err() {
                    return Err(Broken { rank: s.worker, step });
                }
            }
            self.record.step(step, &batch);
            if !self.interval.is_zero() {
                tokio::time::sleep(self.interval).await;
            }
        }
    }

    /// Takes every advice forwarded so far, before `step` is played.
    async fn take_pending(&mut self, step: u64) -> Result<(), Broken> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Advice(rank, advice) => {
                    let taken = self.take(&advice, step);
                    self.ack(rank, &advice, &taken, step)
                        .await
                        .map_err(|_| Broken { rank, step })?;
                }
                Event::Ended(rank, end) => {
                    self.ends[rank as usize] = Some(end);
                    return Err(Broken { rank, step });
                }
            }
        }
        Ok(())
    }

    /// Prints and (with `--apply-advice`) applies an advice the first time any
    /// rank brings it; returns how the job took it.
    fn take(&mut self, advice: &proto::Advice, step: u64) -> Taken {
        if let Some(taken) = self.advice.get(&advice.id) {
            return taken.clone();
        }
        let action = advice.action.as_ref().map(wire::action_from_proto);
        let applied_at = match action {
            Some(a) if self.apply => {
                self.scenario.apply(&a);
                Some(step)
            }
            _ => None,
        };
        let taken = Taken {
            action,
            decided_at: advice.decided_at_step,
            received_at: step,
            applied_at,
        };
        self.out.advice(advice, &taken);
        self.advice.insert(advice.id, taken.clone());
        taken
    }

    /// Acks an advice on the stream of the rank that received it.
    async fn ack(&self, rank: u32, advice: &proto::Advice, taken: &Taken, step: u64) -> Result<(), ()> {
        let note = match (taken.applied_at, taken.action) {
            (Some(_), _) => "applied by gradguard simulate",
            (None, None) => "unknown action",
            (None, Some(_)) => "not applied: simulate runs without --apply-advice",
        };
        let ack = proto::AdviceAck {
            advice_id: advice.id,
            applied_step: taken.applied_at.unwrap_or(step),
            applied: taken.applied_at.is_some(),
            note: note.to_owned(),
        };
        self.ranks.send(rank, worker_message::Body::Ack(ack)).await
    }

    /// Ends the sending halves and reads every stream to its end, printing
    /// advice that came after the last step. True when a stream did not end
    /// within [`DRAIN_TIMEOUT`].
    async fn finish(&mut self) -> bool {
        match &mut self.ranks {
            Transport::Grpc(r) => r.senders.clear(),
            Transport::Kafka(w) => {
                if let Err(e) = w.settle(DRAIN_TIMEOUT).await {
                    self.settle_error = Some(e);
                    return false;
                }
            }
        }
        let after = self.scenario.step();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(event) = self.events.recv().await {
                match event {
                    Event::Advice(_, advice) => {
                        self.take_late(&advice, after);
                    }
                    Event::Ended(rank, end) => self.ends[rank as usize] = Some(end),
                }
            }
        })
        .await;
        if let Transport::Grpc(r) = &mut self.ranks {
            r.clients.clear();
        }
        drained.is_err()
    }

    /// Advice that arrived after the run: shown, never applied.
    fn take_late(&mut self, advice: &proto::Advice, after: u64) {
        if self.advice.contains_key(&advice.id) {
            return;
        }
        let taken = Taken {
            action: advice.action.as_ref().map(wire::action_from_proto),
            decided_at: advice.decided_at_step,
            received_at: after,
            applied_at: None,
        };
        self.out.advice(advice, &taken);
        self.advice.insert(advice.id, taken);
    }

    fn summary(&self, error: Option<&str>) -> Outcome {
        let cfg = self.scenario.config();
        let plan = self.scenario.plan();
        let names = self.scenario.layer_names();
        let mut by_action: BTreeMap<&'static str, u64> = Action::NAMES.iter().map(|&n| (n, 0)).collect();
        for t in self.advice.values() {
            *by_action
                .entry(t.action.as_ref().map_or("unknown", Action::name))
                .or_default() += 1;
        }
        let lags = self.advice.values().map(|t| t.received_at.saturating_sub(t.decided_at));
        let halted_at = (self.scenario.finished() && self.scenario.step() < cfg.steps).then(|| self.scenario.step());
        let (before, after) = (self.record.before(), self.record.after());
        let problems = self.record.problems(before.as_ref(), after.as_ref());
        Outcome {
            job: cfg.job.clone(),
            workers: cfg.workers,
            layers: cfg.layers,
            fault: plan.fault,
            fault_at: (plan.fault != Fault::Healthy).then_some(plan.at),
            fault_rank: plan.rank,
            fault_layer: plan.layer.and_then(|i| names.get(i).cloned()),
            steps_sent: self.record.steps,
            summaries_sent: self.record.summaries,
            last_step: self.record.last_step,
            halted_at,
            by_action,
            advice: self.advice.len() as u64,
            applied: self.advice.values().filter(|t| t.applied_at.is_some()).count() as u64,
            apply: self.apply,
            lag: lags.clone().min().zip(lags.max()),
            before,
            after,
            // Only a hint to follow advice when there was advice to follow.
            verdict: verdict(
                plan.fault,
                halted_at,
                error.is_some(),
                &problems,
                self.apply || self.advice.is_empty(),
            ),
            problems,
            error: error.map(str::to_owned),
        }
    }
}

/// What one step looked like across the ranks that reported it.
#[derive(Debug, Clone)]
struct StepView {
    step: u64,
    /// Mean over the ranks (non-finite when any rank's is).
    loss: f64,
    /// Median over the ranks, so one outlier rank does not move it.
    norm: f64,
    norms: Vec<(u32, f64)>,
}

impl StepView {
    fn of(step: u64, batch: &[Summary]) -> Self {
        let losses: Vec<f64> = batch.iter().filter_map(|s| s.loss).collect();
        let norms: Vec<(u32, f64)> = batch
            .iter()
            .filter_map(|s| s.grad_norm.map(|n| (s.worker, n)))
            .collect();
        let loss = if losses.is_empty() {
            f64::NAN
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        };
        let values: Vec<f64> = norms.iter().map(|n| n.1).collect();
        let norm = if values.iter().all(|v| v.is_finite()) {
            median(values).unwrap_or(f64::NAN)
        } else {
            f64::NAN
        };
        Self {
            step,
            loss,
            norm,
            norms,
        }
    }

    fn finite(&self) -> bool {
        self.loss.is_finite() && self.norm.is_finite()
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Where the run stood over a window of steps: means of the finite steps.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// The last step of the window.
    step: u64,
    loss: Option<f64>,
    norm: Option<f64>,
    /// Steps of the window with a non-finite loss or norm.
    nonfinite: usize,
}

impl Level {
    fn of<'a>(views: impl Iterator<Item = &'a StepView> + Clone) -> Option<Self> {
        let step = views.clone().map(|v| v.step).max()?;
        let mean = |f: fn(&StepView) -> f64| {
            let finite: Vec<f64> = views.clone().map(f).filter(|x| x.is_finite()).collect();
            (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64)
        };
        Some(Self {
            step,
            loss: mean(|v| v.loss),
            norm: mean(|v| v.norm),
            nonfinite: views.filter(|v| !v.finite()).count(),
        })
    }
}

/// What was sent, kept small: counts, the window before the fault, the latest
/// window and when each rank last reported.
#[derive(Debug)]
struct Record {
    fault_at: u64,
    steps: u64,
    summaries: u64,
    last_step: Option<u64>,
    before: Vec<StepView>,
    recent: VecDeque<StepView>,
    last_seen: Vec<Option<u64>>,
}

impl Record {
    fn new(workers: u32, fault_at: u64) -> Self {
        Self {
            fault_at,
            steps: 0,
            summaries: 0,
            last_step: None,
            before: Vec::new(),
            recent: VecDeque::with_capacity(WINDOW + 1),
            last_seen: vec![None; workers as usize],
        }
    }

    fn step(&mut self, step: u64, batch: &[Summary]) {
        self.steps += 1;
        self.summaries += batch.len() as u64;
        self.last_step = Some(step);
        for s in batch {
            if let Some(seen) = self.last_seen.get_mut(s.worker as usize) {
                *seen = Some(step);
            }
        }
        if batch.is_empty() {
            return;
        }
        let view = StepView::of(step, batch);
        if step < self.fault_at && self.fault_at - step <= WINDOW as u64 {
            self.before.push(view.clone());
        }
        self.recent.push_back(view);
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
    }

    /// The last steps before the fault.
    fn before(&self) -> Option<Level> {
        Level::of(self.before.iter())
    }

    /// The last steps sent.
    fn after(&self) -> Option<Level> {
        Level::of(self.recent.iter())
    }

    /// What is still wrong at the end of the run, judged against the steps
    /// before the fault; empty when the run is back.
    fn problems(&self, before: Option<&Level>, after: Option<&Level>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = after.filter(|a| a.nonfinite > 0) {
            out.push(format!(
                "{} of the last {} steps had a non-finite loss or gradient norm",
                a.nonfinite,
                self.recent.len()
            ));
        }
        if let (Some(b), Some(a)) = (before, after) {
            out.extend(level_problems(b, a));
        }
        out.extend(self.rank_problems());
        out
    }

    /// Ranks that stopped reporting, or whose norm is still far from their peers'.
    fn rank_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(last) = self.last_step else {
            return out;
        };
        for (rank, seen) in self.last_seen.iter().enumerate() {
            match seen {
                Some(s) if *s < last => out.push(format!("rank {rank} has sent nothing since step {s}")),
                None => out.push(format!("rank {rank} never sent a summary")),
                Some(_) => {}
            }
        }
        for (rank, ratio) in self.outlier_ratios() {
            if ratio > OUTLIER_RATIO {
                out.push(format!("rank {rank}'s gradient norm is still {ratio:.1}× its peers'"));
            }
        }
        out
    }

    /// Each rank's median ratio of its norm to the step's median norm over the
    /// latest window.
    fn outlier_ratios(&self) -> BTreeMap<u32, f64> {
        let mut ratios: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for v in self.recent.iter().filter(|v| v.norm.is_finite() && v.norm > 0.0) {
            for &(rank, norm) in &v.norms {
                ratios.entry(rank).or_default().push(norm / v.norm);
            }
        }
        ratios
            .into_iter()
            .filter_map(|(rank, r)| median(r).map(|m| (rank, m)))
            .collect()
    }
}

/// The loss and the norm at the end compared with before the fault.
fn level_problems(before: &Level, after: &Level) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(b), Some(a)) = (before.loss, after.loss)
        && a > b * LOSS_TOLERANCE
    {
        out.push(format!(
            "the loss is {} against {} before the fault ({:+.0}%)",
            fmt_num(a),
            fmt_num(b),
            (a / b - 1.0) * 100.0
        ));
    }
    if let (Some(b), Some(a)) = (before.norm, after.norm) {
        if a > b * NORM_TOO_HIGH {
            out.push(format!(
                "the gradient norm is still {:.0}× its level before the fault",
                a / b
            ));
        } else if a < b * NORM_TOO_LOW {
            out.push(format!(
                "the gradient norm has vanished to {} of its level before the fault",
                fmt_num(a / b)
            ));
        }
    }
    out
}

/// The one-line result: was the run brought back?
fn verdict(fault: Fault, halted_at: Option<u64>, broken: bool, problems: &[String], followed: bool) -> Verdict {
    match (halted_at, problems.is_empty(), fault) {
        (Some(step), _, _) => Verdict::Halted(step),
        _ if broken => Verdict::Broken,
        (None, true, Fault::Healthy) => Verdict::Healthy,
        (None, true, _) => Verdict::Recovered,
        (None, false, _) if !followed => Verdict::NotRecoveredUnapplied,
        (None, false, _) => Verdict::NotRecovered,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Healthy,
    Recovered,
    NotRecovered,
    /// Not recovered, and the advice was not followed.
    NotRecoveredUnapplied,
    /// Halt advice stopped the run before this step.
    Halted(u64),
    /// A stream failed: the run was not played to its end, so it is not judged.
    Broken,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Recovered => "recovered",
            Verdict::NotRecovered | Verdict::NotRecoveredUnapplied => "not_recovered",
            Verdict::Halted(_) => "halted",
            Verdict::Broken => "error",
        }
    }

    fn explain(self, problems: &[String]) -> String {
        let why = problems.join("; ");
        match self {
            Verdict::Healthy => "healthy: no fault was injected and the run trained normally".to_owned(),
            Verdict::Recovered => format!(
                "recovered: the loss is back within {:.0}% of where it was before the fault, \
                 the gradient norm is back in range and every rank reports normally",
                (LOSS_TOLERANCE - 1.0) * 100.0
            ),
            Verdict::NotRecovered => format!("NOT recovered: {why}"),
            Verdict::NotRecoveredUnapplied => {
                format!("NOT recovered: {why} (the advice was not applied; rerun with --apply-advice to follow it)")
            }
            Verdict::Broken => "not judged: the run broke off (see the error)".to_owned(),
            Verdict::Halted(step) if why.is_empty() => {
                format!("halted: halt advice stopped the run before step {step}")
            }
            Verdict::Halted(step) => format!("halted: halt advice stopped the run before step {step}; {why}"),
        }
    }
}

/// Everything the summary reports.
#[derive(Debug)]
struct Outcome {
    job: String,
    workers: u32,
    layers: usize,
    fault: Fault,
    fault_at: Option<u64>,
    fault_rank: Option<u32>,
    fault_layer: Option<String>,
    steps_sent: u64,
    summaries_sent: u64,
    last_step: Option<u64>,
    halted_at: Option<u64>,
    by_action: BTreeMap<&'static str, u64>,
    advice: u64,
    applied: u64,
    apply: bool,
    /// Fewest and most steps between an advice's decision and the job seeing it.
    lag: Option<(u64, u64)>,
    before: Option<Level>,
    after: Option<Level>,
    verdict: Verdict,
    problems: Vec<String>,
    error: Option<String>,
}

/// A number for people: fixed point in the usual range, scientific outside it.
fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        format!("{x:.2e}")
    } else {
        format!("{x:.3}")
    }
}

fn severity_name(advice: &proto::Advice) -> &'static str {
    match advice.severity() {
        proto::Severity::Info => "info",
        proto::Severity::Warning => "warning",
        proto::Severity::Critical => "critical",
        proto::Severity::Unspecified => "unspecified",
    }
}

/// Where lines go. Output errors do not stop the run (a closed pipe only means
/// nobody is reading); the first one is kept and reported at the end.
struct Printer {
    json: bool,
    error: Option<io::Error>,
}

impl Printer {
    fn new(json: bool) -> Self {
        Self { json, error: None }
    }

    fn line(&mut self, text: &str) {
        if self.error.is_none()
            && let Err(e) = writeln!(io::stdout().lock(), "{text}")
        {
            self.error = Some(e);
        }
    }

    fn header(&mut self, scenario: &Scenario, url: &str, apply: bool) {
        if self.json {
            return;
        }
        let cfg = scenario.config();
        let follow = if apply {
            "advice is applied"
        } else {
            "advice is only shown (--apply-advice to follow it)"
        };
        self.line(&format!(
            "simulating job {} on {url}: {} ranks, {} layers, {} steps, {}; {follow}",
            cfg.job,
            cfg.workers,
            cfg.layers,
            cfg.steps,
            fault_text(
                scenario.plan().fault,
                Some(scenario.plan().at),
                scenario.plan().rank,
                None
            ),
        ));
    }

    fn advice(&mut self, advice: &proto::Advice, taken: &Taken) {
        let text = if self.json {
            advice_json(advice, taken)
        } else {
            advice_line(advice, taken)
        };
        self.line(&text);
    }

    fn summary(&mut self, o: &Outcome) {
        if self.json {
            self.line(&summary_json(o));
        } else {
            for line in summary_lines(o) {
                self.line(&line);
            }
        }
    }

    /// The first output error, unless it was a closed pipe.
    fn done(&mut self) -> Result<(), Failure> {
        match self.error.take() {
            Some(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                Err(Failure::input(anyhow!("cannot write the output: {e}")))
            }
            _ => Ok(()),
        }
    }
}

fn fault_text(fault: Fault, at: Option<u64>, rank: Option<u32>, layer: Option<&str>) -> String {
    if fault == Fault::Healthy {
        return "no fault".to_owned();
    }
    let mut s = fault.to_string();
    if let Some(at) = at {
        s.push_str(&format!(" from step {at}"));
    }
    if let Some(rank) = rank {
        s.push_str(&format!(" on rank {rank}"));
    }
    if let Some(layer) = layer {
        s.push_str(&format!(" in layer {layer}"));
    }
    s
}

/// `step   412  all ranks  critical  scale_lr factor=0.5  [grad_growth,loss_divergence]  REASON`
fn advice_line(advice: &proto::Advice, taken: &Taken) -> String {
    let target = advice
        .target_rank
        .map_or_else(|| "all ranks".to_owned(), |r| format!("rank {r}"));
    let action = taken
        .action
        .map_or_else(|| "unknown action".to_owned(), |a| a.to_string());
    format!(
        "step {:>5}  {target:<9}  {:<8}  {action}  [{}]  {}",
        advice.decided_at_step,
        severity_name(advice),
        advice.rules.join(","),
        advice.reason
    )
}

/// The `replay --json` advice object, plus when the job received and applied it.
#[derive(Serialize)]
struct AdviceLine<'a> {
    kind: &'static str,
    id: u64,
    job: &'a str,
    worker: Option<u32>,
    step: u64,
    apply_from: u64,
    received_at: u64,
    applied: bool,
    applied_at: Option<u64>,
    rule: Option<&'a String>,
    rules: &'a [String],
    severity: &'static str,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_norm: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    factor: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<u32>,
    reason: &'a str,
    evidence: Evidence<'a>,
}

/// Evidence pairs as a JSON object, in the server's order.
struct Evidence<'a>(&'a [proto::Evidence]);

impl Serialize for Evidence<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for e in self.0 {
            map.serialize_entry(&e.name, &Num(e.value))?;
        }
        map.end()
    }
}

fn advice_json(advice: &proto::Advice, taken: &Taken) -> String {
    let (mut max_norm, mut factor, mut to_step, mut rank) = (None, None, None, None);
    match taken.action {
        Some(Action::ClipGradients { max_norm: m }) => max_norm = Some(Num(m)),
        Some(Action::ScaleLr { factor: f } | Action::ScaleLossScale { factor: f }) => factor = Some(Num(f)),
        Some(Action::Rollback { to_step: t }) => to_step = Some(t),
        Some(Action::InspectWorker { rank: r }) => rank = Some(r),
        Some(Action::SkipStep | Action::Halt) | None => {}
    }
    json_text(&AdviceLine {
        kind: "advice",
        id: advice.id,
        job: &advice.job,
        worker: advice.target_rank,
        step: advice.decided_at_step,
        apply_from: advice.apply_from_step,
        received_at: taken.received_at,
        applied: taken.applied_at.is_some(),
        applied_at: taken.applied_at,
        rule: advice.rules.first(),
        rules: &advice.rules,
        severity: severity_name(advice),
        action: taken.action.as_ref().map_or("unknown", Action::name),
        max_norm,
        factor,
        to_step,
        rank,
        reason: &advice.reason,
        evidence: Evidence(&advice.evidence),
    })
}

/// One JSON line; our types always serialize, but a failure is shown, not hidden.
fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|e| serde_json::json!({"kind": "error", "error": e.to_string()}).to_string())
}

fn summary_lines(o: &Outcome) -> Vec<String> {
    let mut lines = vec![String::new()];
    lines.push(format!(
        "job        {} ({} ranks, {} layers)",
        o.job, o.workers, o.layers
    ));
    lines.push(format!(
        "fault      {}",
        fault_text(o.fault, o.fault_at, o.fault_rank, o.fault_layer.as_deref())
    ));
    let span = o.last_step.map_or_else(String::new, |l| format!(", through step {l}"));
    lines.push(format!(
        "sent       {} steps ({} summaries){span}",
        o.steps_sent, o.summaries_sent
    ));
    lines.push(format!("advice     {}", advice_text(o)));
    if let Some(lag) = o.lag {
        lines.push(format!("lag        {}", lag_text(lag)));
    }
    let level = |l: &Level, f: fn(&Level) -> Option<f64>| {
        format!("{} at step {}", f(l).map_or_else(|| "n/a".to_owned(), fmt_num), l.step)
    };
    match (&o.before, &o.after) {
        (Some(b), Some(a)) => {
            lines.push(format!(
                "loss       {} → {}  ({WINDOW}-step means)",
                level(b, |l| l.loss),
                level(a, |l| l.loss)
            ));
            lines.push(format!(
                "grad norm  {} → {}",
                level(b, |l| l.norm),
                level(a, |l| l.norm)
            ));
        }
        (None, Some(a)) => {
            lines.push(format!("loss       {}  ({WINDOW}-step mean)", level(a, |l| l.loss)));
            lines.push(format!("grad norm  {}", level(a, |l| l.norm)));
        }
        _ => {}
    }
    lines.push(format!("result     {}", o.verdict.explain(&o.problems)));
    if let Some(e) = &o.error {
        lines.push(format!("error      {e}"));
    }
    lines
}

fn lag_text((lo, hi): (u64, u64)) -> String {
    let steps = match (lo, hi) {
        (1, 1) => "1 step".to_owned(),
        (lo, hi) if lo == hi => format!("{lo} steps"),
        (lo, hi) => format!("{lo}–{hi} steps"),
    };
    let mut text = format!("advice reached the job {steps} after the step it was decided at");
    if hi > LATE_ADVICE {
        text.push_str(
            "; the server fell behind, so the advice acted late and may have escalated \
             before its effect was seen (a longer --step-interval keeps the loop closed)",
        );
    }
    text
}

fn advice_text(o: &Outcome) -> String {
    if o.advice == 0 {
        return "none".to_owned();
    }
    let counts: Vec<String> = o
        .by_action
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    let applied = if !o.apply {
        "none applied (--apply-advice not given)".to_owned()
    } else if o.applied == o.advice {
        "all applied".to_owned()
    } else {
        format!(
            "{} applied, {} arrived after the last step",
            o.applied,
            o.advice - o.applied
        )
    };
    format!("{} received ({}); {applied}", o.advice, counts.join(", "))
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    kind: &'static str,
    job: &'a str,
    workers: u32,
    layers: usize,
    fault: FaultJson<'a>,
    steps_sent: u64,
    summaries_sent: u64,
    last_step: Option<u64>,
    halted_at: Option<u64>,
    /// Advice by action (every action present).
    advice: &'a BTreeMap<&'static str, u64>,
    advice_total: u64,
    advice_applied: u64,
    advice_lag: Option<LagJson>,
    before: Option<LevelJson>,
    after: Option<LevelJson>,
    result: &'static str,
    problems: &'a [String],
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct FaultJson<'a> {
    kind: &'static str,
    at: Option<u64>,
    rank: Option<u32>,
    layer: Option<&'a str>,
}

#[derive(Serialize)]
struct LagJson {
    min: u64,
    max: u64,
}

#[derive(Serialize)]
struct LevelJson {
    step: u64,
    loss: Option<Num>,
    grad_norm: Option<Num>,
    nonfinite_steps: usize,
}

impl From<&Level> for LevelJson {
    fn from(l: &Level) -> Self {
        Self {
            step: l.step,
            loss: l.loss.map(Num),
            grad_norm: l.norm.map(Num),
            nonfinite_steps: l.nonfinite,
        }
    }
}

fn summary_json(o: &Outcome) -> String {
    json_text(&SummaryLine {
        kind: "summary",
        job: &o.job,
        workers: o.workers,
        layers: o.layers,
        fault: FaultJson {
            kind: o.fault.as_str(),
            at: o.fault_at,
            rank: o.fault_rank,
            layer: o.fault_layer.as_deref(),
        },
        steps_sent: o.steps_sent,
        summaries_sent: o.summaries_sent,
        last_step: o.last_step,
        halted_at: o.halted_at,
        advice: &o.by_action,
        advice_total: o.advice,
        advice_applied: o.applied,
        advice_lag: o.lag.map(|(min, max)| LagJson { min, max }),
        before: o.before.as_ref().map(LevelJson::from),
        after: o.after.as_ref().map(LevelJson::from),
        result: o.verdict.as_str(),
        problems: &o.problems,
        error: o.error.as_deref(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn args(extra: &[&str]) -> SimulateArgs {
        let base = ["simulate", "--server", "http://127.0.0.1:1"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    #[test]
    fn defaults_and_names() {
        let a = args(&["--scenario", "explode"]);
        let cfg = scenario_config(&a, 1e9).expect("valid flags");
        assert_eq!((cfg.workers, cfg.layers, cfg.steps, cfg.fault_at), (4, 12, 600, 300));
        assert_eq!((cfg.job.as_str(), cfg.fault), ("sim-explode-0", Fault::AbruptExplosion));
        assert_eq!((cfg.start_time, cfg.step_secs), (1e9, 0.005));
        let a = args(&["--scenario", "stalled-rank", "--step-interval", "0"]);
        assert_eq!(a.scenario, ScenarioName::Stall);
        assert_eq!(a.step_interval, Duration::ZERO);
        assert!(parse_interval("5 parsecs").is_err());
    }

    #[test]
    fn bad_flags_are_usage_errors_naming_the_flag() {
        let e = scenario_config(&args(&["--scenario", "rank-outlier", "--workers", "2"]), 0.0).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.error.to_string().starts_with("--workers 2:"), "{}", e.error);
        let e = scenario_config(&args(&["--scenario", "nan", "--steps", "100"]), 0.0).unwrap_err();
        assert!(e.error.to_string().starts_with("--fault-at 300:"), "{}", e.error);
        assert!(scenario_config(&args(&["--scenario", "healthy", "--steps", "100"]), 0.0).is_ok());
        let e = scenario_config(&args(&["--scenario", "nan", "--job", " "]), 0.0).unwrap_err();
        assert!(e.error.to_string().starts_with("--job"), "{}", e.error);
    }

    /// Plays a scenario straight into a record, optionally applying `fix` at
    /// `fix_at`; returns the problems the summary would report.
    fn judge(fault: Fault, workers: u32, fix: Option<(u64, Action)>) -> Vec<String> {
        let mut sc = Scenario::new(ScenarioConfig {
            fault,
            workers,
            steps: 600,
            fault_at: 300,
            ..ScenarioConfig::default()
        });
        let mut record = Record::new(workers, 300);
        loop {
            let step = sc.step();
            if let Some((at, action)) = fix
                && at == step
            {
                sc.apply(&action);
            }
            let Some(batch) = sc.next_step() else { break };
            record.step(step, &batch);
        }
        record.problems(record.before().as_ref(), record.after().as_ref())
    }

    /// The rank a 4-rank run of `fault` picks, as `judge` plays it.
    fn faulty_rank(fault: Fault) -> u32 {
        let cfg = ScenarioConfig {
            fault,
            workers: 4,
            fault_at: 300,
            ..ScenarioConfig::default()
        };
        Scenario::new(cfg).plan().rank.expect("a rank fault has a rank")
    }

    #[test]
    fn a_healthy_run_has_no_problems() {
        assert_eq!(judge(Fault::Healthy, 4, None), Vec::<String>::new());
    }

    #[test]
    fn what_is_still_wrong_is_named() {
        let p = judge(Fault::AbruptExplosion, 2, None);
        assert!(p.iter().any(|p| p.starts_with("the loss is")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains("still") && p.contains("gradient norm")),
            "{p:?}"
        );
        let p = judge(Fault::Vanishing, 1, None);
        assert!(p.iter().any(|p| p.contains("vanished")), "{p:?}");

        let r = faulty_rank(Fault::RankOutlier);
        let p = judge(Fault::RankOutlier, 4, None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with(&format!("rank {r}'s gradient norm is still")), "{p:?}");
        let r = faulty_rank(Fault::StalledRank);
        let p = judge(Fault::StalledRank, 4, None);
        assert_eq!(p, [format!("rank {r} has sent nothing since step 299")]);
    }

    #[test]
    fn a_followed_fix_clears_the_problems() {
        let clip = Action::ClipGradients { max_norm: 1.0 };
        assert_eq!(
            judge(Fault::AbruptExplosion, 2, Some((301, clip))),
            Vec::<String>::new()
        );
        let r = faulty_rank(Fault::RankOutlier);
        let inspect = Action::InspectWorker { rank: r };
        assert_eq!(judge(Fault::RankOutlier, 4, Some((301, inspect))), Vec::<String>::new());
    }

    #[test]
    fn verdicts() {
        let none: &[String] = &[];
        let some = ["x".to_owned()];
        assert_eq!(verdict(Fault::Healthy, None, false, none, true), Verdict::Healthy);
        assert_eq!(
            verdict(Fault::NanGradients, None, false, none, true),
            Verdict::Recovered
        );
        assert_eq!(
            verdict(Fault::NanGradients, None, false, &some, true),
            Verdict::NotRecovered
        );
        assert_eq!(
            verdict(Fault::NanGradients, None, false, &some, false),
            Verdict::NotRecoveredUnapplied
        );
        assert_eq!(
            verdict(Fault::NanGradients, Some(320), true, none, true),
            Verdict::Halted(320)
        );
        assert_eq!(verdict(Fault::NanGradients, None, true, none, true), Verdict::Broken);
        assert!(Verdict::Recovered.explain(none).starts_with("recovered"));
        assert!(lag_text((1, 1)).ends_with("1 step after the step it was decided at"));
        assert!(lag_text((2, 40)).contains("the server fell behind"));
    }
}
