//! What one run measured, and its text form (the JSON form is the struct's).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use serde::Serialize;

use crate::cli::Failure;

/// What one run measured; the JSON form has these fields.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) target: String,
    pub(super) streams: u32,
    pub(super) layers: u32,
    pub(super) world_size: u32,
    pub(super) duration_s: f64,
    /// Target summaries/s; `None` for as fast as possible.
    pub(super) rate: Option<f64>,
    /// How the jobs' spikes line up (`--spikes`).
    pub(super) spikes: &'static str,
    /// Summaries per message (`--batch`).
    pub(super) batch: u32,
    pub(super) summaries: u64,
    /// From the first summary sent to the last stream ended by the server.
    pub(super) elapsed_s: f64,
    pub(super) summaries_per_s: f64,
    pub(super) layer_stats_per_s: f64,
    pub(super) advice: u64,
    pub(super) latency_samples: usize,
    pub(super) latency_ms: Option<Latency>,
    pub(super) errors: u64,
    pub(super) server_resident_memory_bytes: Option<u64>,
    /// Why the memory is unknown, when it is.
    pub(super) server_resident_memory_unknown: Option<String>,
    /// With `--memory-every`: the samples along the run, the last at its end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) memory_samples: Vec<MemorySample>,
    /// With `--memory-every`: growth from the middle of the run to its end.
    pub(super) memory_growth_last_half: Option<f64>,
    #[serde(skip)]
    pub(super) first_error: Option<String>,
}

/// The server's resident memory at a time of the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct MemorySample {
    /// Seconds since the first summary.
    pub(super) at_s: f64,
    pub(super) bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Latency {
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
}

impl Latency {
    /// Exact nearest-rank percentiles of samples in nanoseconds, in milliseconds.
    pub(super) fn of(samples: &mut [u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |p: f64| {
            let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1e6
        };
        Some(Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        })
    }
}

impl Report {
    /// Success, or exit 1 naming the first failure when any stream failed.
    pub(super) fn verdict(&self) -> Result<ExitCode, Failure> {
        if self.errors == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        Err(Failure::input(anyhow!(
            "{} of {} streams to {} failed; the first: {}",
            self.errors,
            self.streams,
            self.target,
            self.first_error.as_deref().unwrap_or("unknown")
        )))
    }
}

/// The text report, every line prefixed (`sink: ` and `gradguard: ` in a baseline run).
pub(super) fn human(r: &Report, prefix: &str) -> String {
    let rate = r.rate.map_or_else(|| "max".to_owned(), |r| format!("{r}/s"));
    let latency = match r.latency_ms {
        Some(l) => format!(
            "latency p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
            l.p50, l.p99, l.p999
        ),
        None => "latency n/a".to_owned(),
    };
    let memory = match (r.server_resident_memory_bytes, &r.server_resident_memory_unknown) {
        (Some(bytes), _) => format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
        (None, reason) => format!("unknown ({})", reason.as_deref().unwrap_or("not read")),
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let over_run = match (
        r.memory_samples.iter().map(|s| s.bytes).min(),
        r.memory_samples.iter().map(|s| s.bytes).max(),
    ) {
        (Some(min), Some(max)) => format!(
            "{prefix}server resident memory over the run: {} samples, {:.1}–{:.1} MiB, last half {}\n",
            r.memory_samples.len(),
            mib(min),
            mib(max),
            r.memory_growth_last_half
                .map_or_else(|| "n/a".to_owned(), |g| format!("{:+.1}%", g * 100.0))
        ),
        _ => String::new(),
    };
    format!(
        "{prefix}target: {}  streams: {}  layers: {}  world size: {}  duration: {}  rate: {rate}  spikes: {}  batch: {}\n\
         {prefix}summaries/s: {:.0}  layer-stats/s: {:.0}  advice: {}  {latency}  errors: {}\n\
         {prefix}server resident memory: {memory}\n{over_run}",
        r.target,
        r.streams,
        r.layers,
        r.world_size,
        humantime::format_duration(Duration::from_secs_f64(r.duration_s)),
        r.spikes,
        r.batch,
        r.summaries_per_s,
        r.layer_stats_per_s,
        r.advice,
        r.errors,
    )
}
