//! `gradguard loadgen`: drive a gradguard server with many concurrent worker
//! streams and report what it sustained: summaries per second it processed,
//! advice latency, errors and its resident memory.
//!
//! Each stream is its own connection and its own worker (rank `i % W` of job
//! `loadgen-{i / W}`), as separate training processes would be, and speaks
//! through [`gradguard::client`], the same helper real workers use. Summaries
//! look like a healthy run (global norm about 1 with a few per cent of noise, a
//! slowly falling loss) with a gradient spike every `--spike-every` steps, so the
//! server's rules really run and answer with clip advice: those answers are the
//! latency samples.
//!
//! Throughput counts only what the server finished: after `--duration` the
//! generator stops, ends its half of every stream, and waits until the server
//! has ended its half (it does so once it has processed everything sent), so the
//! time runs from the first summary to the last stream's end.
//!
//! `--baseline` first runs the identical load against `gradguard sink`, a
//! decode-only server on the same machine, so the result can be read as a ratio:
//! the share of the transport's ceiling the real server achieves. `--compare
//! URL` does the same against another running server instead, e.g. the
//! service with `--no-store`, to read the cost of storing as a ratio.
//! `--rounds N` repeats the pair N times, taking turns, and prints the median
//! of the rounds' ratios: on a shared machine one pair can land on a fast and
//! a slow moment.

//!
//! The pieces: [`measure`] (one run against one server: open the streams,
//! send, time the advice, drain), [`generator`] (the summaries), [`memory`]
//! (the server's resident memory), [`baseline`] (the sink it spawns) and
//! [`report`] (what a run measured, as text or JSON).

mod baseline;
mod generator;
mod measure;
mod memory;
mod report;
#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use gradguard::client;
use serde::Serialize;
use tonic::codegen::http::Uri;

use crate::cli::Failure;
use baseline::SinkChild;
use measure::{error_chain, measure};
use memory::MemorySource;
use report::human;

/// Port of the Prometheus endpoint that `gradguard serve` listens on by default.
const DEFAULT_METRICS_PORT: u16 = 9464;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Server to load: `http://host:port`, or `https://host:port` for TLS
    /// (`host:port` is taken as http).
    #[arg(long, value_name = "URL", value_parser = parse_server)]
    pub server: String,

    /// TLS and token, for `--server` (and `--compare` when it is https; an
    /// http `--compare` gets the token only).
    #[command(flatten)]
    pub security: crate::cli::ClientSecurityArgs,

    /// Concurrent worker streams, each on its own connection.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub streams: u32,

    /// Layers per summary (per-layer L2, max |g| and non-finite count each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub layers: u32,

    /// How long to send, e.g. `30s`, `2m`, `1m 30s`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Ranks per job: stream i is rank i % W of job `loadgen-{i / W}`, so the
    /// cross-rank rules run too.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub world_size: u32,

    /// Total summaries per second across all streams, paced open-loop per
    /// stream; 0 sends as fast as the server's flow control allows.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Every K-th step is a gradient spike of about 50x on every rank, which the
    /// server answers with clip advice; 0 never spikes.
    #[arg(long, value_name = "K", default_value_t = 200)]
    pub spike_every: u64,

    /// When the jobs spike: `staggered` spreads them over the K steps (job j
    /// of J at steps j*K/J + K, + 2K, ...), as independent jobs do; `aligned`
    /// spikes every job at the same steps, the worst case for the server (all
    /// advice at once).
    #[arg(long, value_enum, default_value_t = Spikes::Staggered)]
    pub spikes: Spikes,

    /// Summaries per message: each stream sends its summaries N at a time in
    /// one `SummaryBatch` (as a lingering worker does); 1 sends each alone.
    /// Advice latency then counts from a summary's step, batching wait included.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,

    /// Prometheus endpoint of the server, read for its resident memory
    /// [default: http://HOST:9464/metrics, HOST from --server].
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// Also read the server's resident memory every this long during the run
    /// (e.g. `30s`, for a soak), and report its growth over the run's second
    /// half; without it the memory is read once, at the end.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub memory_every: Option<Duration>,

    /// First run the identical load against a decode-only sink spawned here,
    /// then against --server, and print the ratio of their throughputs.
    #[arg(long)]
    pub baseline: bool,

    /// First run the identical load against this other server (for example
    /// the same service started with --no-store), then against --server, and
    /// print the ratio of their throughputs.
    #[arg(long, value_name = "URL", value_parser = parse_server, conflicts_with = "baseline")]
    pub compare: Option<String>,

    /// With --baseline or --compare: run the pair this many times, taking turns,
    /// and finish with the median of the rounds' ratios.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,

    /// Print one JSON object instead of text (one per round, then the median).
    #[arg(long)]
    pub json: bool,
}

/// `--spikes`: how the jobs' spikes line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Spikes {
    Staggered,
    Aligned,
}

impl Spikes {
    fn name(self) -> &'static str {
        match self {
            Spikes::Staggered => "staggered",
            Spikes::Aligned => "aligned",
        }
    }
}

/// `--server`: an http URL with a host; `host:port` gets `http://`.
/// The TLS and token for a target: all of `--tls-*` for an https one, the
/// token only for an http one (a plaintext baseline beside a TLS server).
fn security_for(args: &LoadgenArgs, target: &str) -> Result<client::ClientSecurity, Failure> {
    let security = args.security.security()?;
    Ok(if target.starts_with("https://") {
        security
    } else {
        client::ClientSecurity {
            token: security.token,
            ..Default::default()
        }
    })
}

fn parse_server(s: &str) -> Result<String, String> {
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("only http:// and https:// servers are supported".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(url)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 2m, 1m 30s)"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !r.is_finite() || r < 0.0 {
        return Err("must be a number of summaries per second, 0 or more".into());
    }
    Ok(r)
}

pub fn run(args: &LoadgenArgs) -> Result<ExitCode, Failure> {
    // One connection per stream: thousands of streams need the descriptors.
    if let Err(e) = rlimit::increase_nofile_limit(u64::from(args.streams) + 256) {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the runtime: {e}")))?;
    let metrics_url = match &args.metrics_url {
        Some(url) => url.clone(),
        None => default_metrics_url(&args.server),
    };
    if !args.baseline && args.compare.is_none() {
        if args.rounds > 1 {
            return Err(Failure::usage(anyhow!(
                "--rounds {}: needs --baseline or --compare",
                args.rounds
            )));
        }
        let report = runtime.block_on(measure(args, &args.server, MemorySource::Metrics(metrics_url)))?;
        print(&if args.json {
            json_line(&report)
        } else {
            human(&report, "")
        })?;
        return report.verdict();
    }

    // Fail before the sink's run, not a whole --duration later.
    runtime
        .block_on(client::connect_with(&args.server, &security_for(args, &args.server)?))
        .map_err(|e| Failure::input(anyhow!("cannot reach --server: {}", error_chain(&e))))?;
    // The sink, if it is the baseline, lives for every round.
    let mut sink = None;
    let (label, key, base_url, base_memory) = match &args.compare {
        Some(url) => (
            "baseline: ",
            "baseline",
            url.clone(),
            MemorySource::Metrics(default_metrics_url(url)),
        ),
        None => {
            let child = sink.insert(SinkChild::spawn().map_err(Failure::input)?);
            (
                "sink: ",
                "sink",
                child.url.clone(),
                MemorySource::Process(child.child.id()),
            )
        }
    };
    // Rounds alternate baseline and server, so drift in the machine's speed
    // lands on both; each round's ratio compares neighbouring runs.
    let mut ratios = Vec::new();
    for _ in 0..args.rounds {
        let base = runtime.block_on(measure(args, &base_url, base_memory.clone()))?;
        if !args.json {
            print(&human(&base, label))?;
        }
        if let Err(failure) = base.verdict() {
            if args.json {
                print(&json_line(&base))?;
            }
            return Err(failure);
        }
        let report = runtime.block_on(measure(args, &args.server, MemorySource::Metrics(metrics_url.clone())))?;
        let ratio = (base.summaries_per_s > 0.0).then(|| report.summaries_per_s / base.summaries_per_s);
        if args.json {
            print(&json_line(&serde_json::json!({
                key: base,
                "gradguard": report,
                "ratio": ratio,
            })))?;
        } else {
            print(&format!(
                "{}ratio: {}\n",
                human(&report, "gradguard: "),
                ratio_text(ratio)
            ))?;
        }
        report.verdict()?;
        ratios.extend(ratio);
    }
    if args.rounds > 1 {
        let each: Vec<String> = ratios.iter().map(|&r| ratio_text(Some(r))).collect();
        ratios.sort_by(f64::total_cmp);
        let median = (!ratios.is_empty()).then(|| ratios[ratios.len() / 2]);
        if args.json {
            print(&json_line(
                &serde_json::json!({ "rounds": args.rounds, "median_ratio": median }),
            ))?;
        } else {
            print(&format!(
                "median ratio over {} rounds: {} ({})\n",
                args.rounds,
                ratio_text(median),
                each.join(", ")
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A throughput ratio as printed: two decimals, or `n/a` when undefined.
fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}"))
}

/// `http://HOST:9464/metrics`, HOST taken from the (already validated) server URL.
fn default_metrics_url(server: &str) -> String {
    let host = server
        .parse::<Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    format!("http://{host}:{DEFAULT_METRICS_PORT}/metrics")
}

/// Writes to stdout; a closed pipe (`| head`) is no failure.
fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::input(anyhow!("cannot write the report: {e}"))),
    }
}

fn json_line(value: &impl Serialize) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    line.push('\n');
    line
}
