//! `gradguard generate`: write a synthetic training run with an injected fault
//! as JSON lines in the trace schema, ready for `gradguard replay`. Non-finite
//! values are written as the strings "NaN", "Infinity" and "-Infinity".

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;
use gradguard::model::Summary;
use gradguard::scenario::{Fault, Scenario, ScenarioConfig};
use serde_json::{Value, json};

use crate::cli::Failure;
use crate::output::Num;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The fault to inject: healthy, abrupt-explosion, gradual-explosion,
    /// nan-gradients, nan-loss, vanishing, loss-divergence, dead-layer,
    /// rank-outlier, stalled-rank, benign-spike.
    #[arg(long, default_value = "abrupt-explosion")]
    pub fault: Fault,

    /// Job id written on every record; defaults to the fault's name.
    #[arg(long)]
    pub job: Option<String>,

    /// Ranks of the job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,

    /// Layers with per-layer statistics (0: global values only).
    #[arg(long, default_value_t = 12)]
    pub layers: usize,

    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,

    /// First step of the fault.
    #[arg(long, default_value_t = 400)]
    pub fault_at: u64,

    /// Seed of the deterministic noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Report an AMP loss scale.
    #[arg(long)]
    pub amp: bool,
}

pub fn run(args: &GenerateArgs) -> Result<ExitCode, Failure> {
    if args.workers < args.fault.min_workers() {
        return Err(Failure::usage(anyhow!(
            "--workers {}: fault {} needs at least {} workers",
            args.workers,
            args.fault,
            args.fault.min_workers()
        )));
    }
    if args.fault_at >= args.steps {
        return Err(Failure::usage(anyhow!(
            "--fault-at {}: must be below --steps {}",
            args.fault_at,
            args.steps
        )));
    }
    let mut scenario = Scenario::new(ScenarioConfig {
        job: args.job.clone().unwrap_or_else(|| args.fault.to_string()),
        fault: args.fault,
        workers: args.workers,
        layers: args.layers,
        steps: args.steps,
        seed: args.seed,
        fault_at: args.fault_at,
        amp: args.amp,
        ..ScenarioConfig::default()
    });
    let job = scenario.config().job.clone();
    let names = scenario.layer_names();
    let mut out = io::BufWriter::new(io::stdout().lock());
    let written = (|| -> io::Result<()> {
        while let Some(step) = scenario.next_step() {
            for s in &step {
                serde_json::to_writer(&mut out, &record(&job, &names, s))?;
                out.write_all(b"\n")?;
            }
        }
        out.flush()
    })();
    match written {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::input(anyhow!("cannot write the trace: {e}"))),
    }
}

/// A value or null; non-finite values as the strings `replay` reads back.
fn opt(x: Option<f64>) -> Option<Num> {
    x.map(Num)
}

fn record(job: &str, names: &[String], s: &Summary) -> Value {
    let layers: Vec<Value> = s
        .layers
        .iter()
        .zip(names)
        .map(|(l, name)| {
            json!({
                "name": name,
                "l2": Num(l.l2.into()),
                "max_abs": Num(l.max_abs.into()),
                "nonfinite": l.nonfinite,
                "param_norm": opt(l.param_norm.map(f64::from)),
                "update_norm": opt(l.update_norm.map(f64::from)),
            })
        })
        .collect();
    let mut v = json!({
        "job": job,
        "worker": s.worker,
        "step": s.step,
        "time": opt(s.time),
        "loss": opt(s.loss),
        "lr": opt(s.lr),
        "loss_scale": opt(s.loss_scale),
        "grad_norm": opt(s.grad_norm),
    });
    if !layers.is_empty() {
        v["layers"] = Value::Array(layers);
    }
    v
}
