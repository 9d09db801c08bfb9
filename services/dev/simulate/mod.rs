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
//!
//! The pieces: [`transport`] (the ranks' streams, or Kafka), [`sim`] (the step
//! loop and the advice taken between steps), [`judge`] (was the run brought
//! back?) and [`print`] (text and JSON lines).

mod judge;
mod print;
mod sim;
#[cfg(test)]
mod tests;
mod transport;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use gradguard::client::ClientSecurity;
use gradguard::clock::unix_now;
use gradguard::engine::MAX_LAYERS;
use gradguard::proto::{self, query_client::QueryClient};
use gradguard::scenario::{Fault, Scenario, ScenarioConfig};
use tokio::sync::mpsc;

use crate::cli::Failure;
use print::Anomalies;
use sim::Sim;
use transport::{Transport, open_kafka, open_ranks, stream_error};

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
    /// The gradguard server's gRPC address (`http://host:port`, `https://host:port` for TLS; `host:port` is taken as http)
    /// [default: $GRADGUARD_SERVER, else http://localhost:50051, as the query commands; not with --kafka-brokers].
    #[arg(long, value_name = "URL", conflicts_with = "kafka_brokers")]
    pub server: Option<String>,

    #[command(flatten)]
    pub security: crate::cli::ClientSecurityArgs,

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

/// The job's anomalies the server stored, by severity (its Query API).
async fn stored_anomalies(url: &str, security: &ClientSecurity, job: &str) -> Result<Anomalies, String> {
    let channel = gradguard::client::channel(url, security)
        .await
        .map_err(|e| e.to_string())?;
    let mut query = QueryClient::new(channel);
    let request = proto::GetJobRequest { job: job.to_owned() };
    match query.get_job(request).await {
        Ok(job) => {
            let j = job.into_inner();
            Ok(Anomalies {
                info: j.anomalies_info,
                warning: j.anomalies_warning,
                critical: j.anomalies_critical,
            })
        }
        Err(s) if s.code() == tonic::Code::FailedPrecondition => Err("the server keeps no store (--no-store)".into()),
        Err(s) => Err(crate::cli::status_text(&s)),
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

async fn simulate(args: &SimulateArgs, scenario: Scenario) -> Result<ExitCode, Failure> {
    let (events_tx, events) = mpsc::unbounded_channel();
    // Without --server nor --kafka-brokers, the query commands' server.
    let server = args.server.clone().or_else(|| {
        args.kafka_brokers.is_none().then(|| {
            std::env::var("GRADGUARD_SERVER")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| crate::cli::DEFAULT_SERVER.to_owned())
        })
    });
    let (ranks, target) = match (server, &args.kafka_brokers) {
        (Some(url), _) => (
            Transport::Grpc(open_ranks(&url, &args.security.security()?, &scenario, &events_tx).await?),
            url,
        ),
        (None, Some(brokers)) => {
            let worker = open_kafka(args, brokers, &scenario, &events_tx).await?;
            (
                Transport::Kafka(Box::new(worker)),
                format!("the Kafka brokers {brokers}"),
            )
        }
        (None, None) => unreachable!("a server is chosen when no brokers are given"),
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
    let mut summary = sim.summary(error.as_deref());
    summary.anomalies = match &args.kafka_brokers {
        Some(_) => Err("played through Kafka: ask a replica with `gradguard job`".to_owned()),
        None => stored_anomalies(&target, &args.security.security()?, &summary.job).await,
    };
    sim.out.summary(&summary);
    sim.out.done()?;
    match error {
        Some(message) => Err(Failure::input(anyhow!(message))),
        None => Ok(ExitCode::SUCCESS),
    }
}
