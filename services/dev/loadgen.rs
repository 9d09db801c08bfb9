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

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use gradguard::client::{self, ClientError, StreamReceiver, StreamSender, WorkerStream};
use gradguard::intake::unix_now;
use gradguard::proto;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tonic::codegen::http::Uri;

use crate::cli::Failure;

/// Port of the Prometheus endpoint that `gradguard serve` listens on by default.
const DEFAULT_METRICS_PORT: u16 = 9464;

/// Slots in a stream's ring of send instants: far more than the summaries in
/// flight between the generator and the server's decision (the client's send
/// queue, HTTP/2 windows and socket buffers). An advice about an older step
/// (its slot reused) is counted but not timed.
const RING: usize = 8192;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Server to load: `http://host:port` (`host:port` is taken as http).
    #[arg(long, value_name = "URL", value_parser = parse_server)]
    pub server: String,

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
fn parse_server(s: &str) -> Result<String, String> {
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// servers are supported".into());
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
        .block_on(client::connect(&args.server))
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

/// Where the server's resident memory is read.
#[derive(Debug, Clone)]
enum MemorySource {
    /// `process_resident_memory_bytes` on a Prometheus endpoint.
    Metrics(String),
    /// VmRSS of a local process (the sink we spawned).
    Process(u32),
}

impl MemorySource {
    /// Bytes, or why they are unknown. Blocking: call it off the runtime's threads.
    fn read(&self) -> Result<u64, String> {
        match self {
            MemorySource::Metrics(url) => scrape_resident(url).map_err(|e| format!("{url}: {e}")),
            MemorySource::Process(pid) => process_resident(*pid),
        }
    }
}

fn scrape_resident(url: &str) -> Result<u64, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let text = agent
        .get(url)
        .call()
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|e| e.to_string())?;
    resident_from_prometheus(&text).ok_or_else(|| "no process_resident_memory_bytes sample".to_owned())
}

/// The value of `process_resident_memory_bytes` in Prometheus text format.
fn resident_from_prometheus(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("process_resident_memory_bytes")?;
        // Skip a longer metric name that merely starts the same way.
        if !rest.starts_with([' ', '{']) {
            return None;
        }
        let value = match rest.rfind('}') {
            Some(end) => &rest[end + 1..],
            None => rest,
        };
        let bytes: f64 = value.split_whitespace().next()?.parse().ok()?;
        (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
    })
}

fn process_resident(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|line| {
            let kib: u64 = line
                .strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .ok_or_else(|| format!("{path}: no VmRSS"))
}

/// The sink, spawned from this very executable; killed and reaped when dropped,
/// on error paths too.
struct SinkChild {
    child: Child,
    url: String,
}

impl SinkChild {
    /// Starts the sink and waits for its `listening grpc=` line: it is printed once
    /// the socket accepts connections, so there is nothing to sleep for.
    fn spawn() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable to start the sink")?;
        let child = Command::new(&exe)
            .args(["sink", "--grpc-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the sink ({})", exe.display()))?;
        let mut sink = SinkChild {
            child,
            url: String::new(),
        };
        let stdout = sink.child.stdout.take().context("the sink has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the sink's listening line")?;
        let addr = line
            .trim()
            .strip_prefix("listening grpc=")
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("the sink did not announce its address (it printed {line:?})"))?;
        sink.url = format!("http://{addr}");
        Ok(sink)
    }
}

impl Drop for SinkChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run measured; the JSON form has these fields.
#[derive(Debug, Serialize)]
struct Report {
    target: String,
    streams: u32,
    layers: u32,
    world_size: u32,
    duration_s: f64,
    /// Target summaries/s; `None` for as fast as possible.
    rate: Option<f64>,
    /// How the jobs' spikes line up (`--spikes`).
    spikes: &'static str,
    /// Summaries per message (`--batch`).
    batch: u32,
    summaries: u64,
    /// From the first summary sent to the last stream ended by the server.
    elapsed_s: f64,
    summaries_per_s: f64,
    layer_stats_per_s: f64,
    advice: u64,
    latency_samples: usize,
    latency_ms: Option<Latency>,
    errors: u64,
    server_resident_memory_bytes: Option<u64>,
    /// Why the memory is unknown, when it is.
    server_resident_memory_unknown: Option<String>,
    #[serde(skip)]
    first_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

impl Latency {
    /// Exact nearest-rank percentiles of samples in nanoseconds, in milliseconds.
    fn of(samples: &mut [u64]) -> Option<Self> {
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
    fn verdict(&self) -> Result<ExitCode, Failure> {
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
fn human(r: &Report, prefix: &str) -> String {
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
    format!(
        "{prefix}target: {}  streams: {}  layers: {}  world size: {}  duration: {}  rate: {rate}  spikes: {}  batch: {}\n\
         {prefix}summaries/s: {:.0}  layer-stats/s: {:.0}  advice: {}  {latency}  errors: {}\n\
         {prefix}server resident memory: {memory}\n",
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

/// Runs the load against one server and reads its memory.
async fn measure(args: &LoadgenArgs, target: &str, memory: MemorySource) -> Result<Report, Failure> {
    let n = args.streams as usize;
    let w = args.world_size;

    // Open every stream before the clock starts, concurrently, each on its own
    // connection: connection setup is not what is measured.
    let opening: Vec<JoinHandle<Result<WorkerStream, ClientError>>> = (0..args.streams)
        .map(|i| {
            let target = target.to_owned();
            let hello = proto::Hello {
                job: format!("loadgen-{}", i / w),
                rank: i % w,
                world_size: w,
                layer_names: (0..args.layers).map(|l| format!("layer{l}")).collect(),
                client_version: "loadgen".to_owned(),
                rule_profile: String::new(),
                report_progress: false,
            };
            tokio::spawn(async move {
                let mut client = client::connect(&target).await?;
                WorkerStream::open(&mut client, hello).await
            })
        })
        .collect();
    let mut opened = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    for (i, handle) in opening.into_iter().enumerate() {
        match handle.await {
            Ok(Ok(stream)) => opened.push((i as u32, stream)),
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("stream {i}: {}", error_chain(&e)));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("stream {i}: {e}"));
            }
        }
    }
    if opened.is_empty() {
        return Err(Failure::input(anyhow!(
            "cannot open any stream to {target}: {}",
            first_error.unwrap_or_default()
        )));
    }

    let start = Instant::now();
    let deadline = start + args.duration;
    // The server has until then to finish what was sent; a stream still open
    // afterwards counts as failed.
    let drain_deadline = deadline + args.duration.max(Duration::from_secs(10));
    let epoch = unix_now();
    let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(n as f64 / args.rate).max(Duration::from_nanos(1)));

    let mut tasks = Vec::with_capacity(opened.len());
    for (i, stream) in opened {
        let first_step = stream.welcome.last_step.map_or(1, |s| s.saturating_add(1));
        let spike_offset = match args.spikes {
            Spikes::Aligned => 0,
            Spikes::Staggered => spike_offset(i / w, args.streams.div_ceil(w), args.spike_every),
        };
        let generator = Generator::new(i, args.layers as usize, first_step, args.spike_every, spike_offset);
        let ring = Arc::new(Ring::new());
        // Paced streams start spread over one period, not all on the same tick.
        let first_tick = period.map(|p| start + p.mul_f64(f64::from(i) / n as f64));
        let pace = period.zip(first_tick);
        let plan = SendPlan {
            start,
            epoch,
            deadline,
            pace,
            batch: args.batch as usize,
        };
        let send = tokio::spawn(send_loop(stream.sender, generator, ring.clone(), plan));
        let receive = tokio::spawn(receive_loop(stream.receiver, ring, start));
        tasks.push((i, send, receive));
    }

    // Memory is read while every stream is still open and the server holds the
    // most, concurrently with the drain (it is blocking I/O, off the runtime).
    let memory_reading = tokio::spawn(async move {
        tokio::time::sleep_until(deadline.into()).await;
        tokio::task::spawn_blocking(move || memory.read())
            .await
            .unwrap_or_else(|e| Err(format!("the reader failed: {e}")))
    });

    let mut summaries = 0u64;
    let mut advice = 0u64;
    let mut latencies: Vec<u64> = Vec::new();
    let mut end = start;
    for (i, mut send, mut receive) in tasks {
        let mut failed: Option<String> = None;
        match tokio::time::timeout_at(drain_deadline.into(), &mut send).await {
            Ok(Ok((sent, result))) => {
                summaries += sent;
                if let Err(e) = result {
                    failed = Some(format!("sending: {}", error_chain(&e)));
                }
            }
            Ok(Err(e)) => failed = Some(format!("sender: {e}")),
            Err(_) => {
                send.abort();
                failed = Some("the server stopped accepting summaries".to_owned());
            }
        }
        match tokio::time::timeout_at(drain_deadline.into(), &mut receive).await {
            Ok(Ok(received)) => {
                advice += received.advice;
                latencies.extend_from_slice(&received.latencies);
                end = end.max(received.ended);
                if let Err(status) = received.result {
                    // The status says more than the sender's "stream is closed".
                    failed = Some(format!(
                        "the server ended the stream with {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
            }
            Ok(Err(e)) => failed = Some(format!("receiver: {e}")),
            Err(_) => {
                receive.abort();
                failed.get_or_insert_with(|| {
                    format!(
                        "the server did not end the stream within {} after the last summary",
                        humantime::format_duration(drain_deadline - deadline)
                    )
                });
            }
        }
        if let Some(reason) = failed {
            errors += 1;
            first_error.get_or_insert_with(|| format!("stream {i}: {reason}"));
        }
    }
    let memory = memory_reading
        .await
        .unwrap_or_else(|e| Err(format!("the reader failed: {e}")));

    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let per_s = if elapsed > 0.0 { summaries as f64 / elapsed } else { 0.0 };
    Ok(Report {
        target: target.to_owned(),
        streams: args.streams,
        layers: args.layers,
        world_size: args.world_size,
        duration_s: args.duration.as_secs_f64(),
        rate: (args.rate > 0.0).then_some(args.rate),
        spikes: args.spikes.name(),
        batch: args.batch,
        summaries,
        elapsed_s: elapsed,
        summaries_per_s: per_s,
        layer_stats_per_s: per_s * f64::from(args.layers),
        advice,
        latency_samples: latencies.len(),
        latency_ms: Latency::of(&mut latencies),
        errors,
        server_resident_memory_bytes: memory.as_ref().ok().copied(),
        server_resident_memory_unknown: memory.err(),
        first_error,
    })
}

/// An error with its causes, for one line on stderr (as [`crate::cli::describe`]).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// When and how one stream sends.
struct SendPlan {
    start: Instant,
    /// Seconds since the Unix epoch at `start` (the summaries' wall time).
    epoch: f64,
    deadline: Instant,
    /// The period and the first tick, when paced.
    pace: Option<(Duration, Instant)>,
    /// Summaries per message.
    batch: usize,
}

/// Sends summaries until the deadline, then drops the sender, which ends the
/// stream. Returns how many were handed to the stream, and whether it stayed open.
async fn send_loop(
    sender: StreamSender,
    mut generator: Generator,
    ring: Arc<Ring>,
    plan: SendPlan,
) -> (u64, Result<(), ClientError>) {
    let SendPlan {
        start,
        epoch,
        deadline,
        pace,
        batch,
    } = plan;
    // Open loop: a tick per summary, and when the stream fell behind (the server
    // pushed back), the missed ticks are sent at once so the rate is kept.
    let mut ticks = pace.map(|(period, first)| {
        let mut ticks = tokio::time::interval_at(first.into(), period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        ticks
    });
    let mut sent = 0u64;
    let mut pending = Vec::with_capacity(batch);
    loop {
        if let Some(ticks) = ticks.as_mut() {
            ticks.tick().await;
        }
        let now = Instant::now();
        let over = now >= deadline;
        if !over {
            let since_start = now - start;
            let summary = generator.next(epoch + since_start.as_secs_f64());
            // Recorded before the send: the advice may come back before it returns.
            ring.record(summary.step, since_start);
            pending.push(summary);
        }
        if pending.len() == batch || (over && !pending.is_empty()) {
            let n = pending.len() as u64;
            let body = if batch == 1 {
                proto::worker_message::Body::Summary(pending.pop().expect("one summary"))
            } else {
                let summaries = std::mem::replace(&mut pending, Vec::with_capacity(batch));
                proto::worker_message::Body::Batch(proto::SummaryBatch { summaries })
            };
            // Closed loop when unpaced: this waits while the send queue is full.
            if let Err(e) = sender.send(body).await {
                return (sent, Err(e));
            }
            sent += n;
        }
        if over {
            return (sent, Ok(()));
        }
    }
}

/// What the receiving half of one stream saw.
struct Received {
    advice: u64,
    /// Advice latencies in nanoseconds.
    latencies: Vec<u64>,
    /// When the server ended the stream (or it failed).
    ended: Instant,
    result: Result<(), tonic::Status>,
}

/// Reads advice until the server ends the stream; each advice is timed against
/// the send of the summary it was decided at, on this stream.
async fn receive_loop(mut receiver: StreamReceiver, ring: Arc<Ring>, start: Instant) -> Received {
    let mut advice = 0u64;
    let mut latencies = Vec::new();
    let result = loop {
        match receiver.advice().await {
            Ok(Some(a)) => {
                let now = start.elapsed();
                advice += 1;
                if let Some(sent) = ring.sent_at(a.decided_at_step) {
                    latencies.push((now.as_nanos() as u64).saturating_sub(sent));
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    Received {
        advice,
        latencies,
        ended: Instant::now(),
        result,
    }
}

/// Send instants of one stream's recent summaries, slot `step % RING`, shared
/// by its sending and receiving tasks without a lock. A slot packs the step's
/// generation (`step / RING`, low 20 bits) above the nanoseconds since the start
/// (44 bits, almost 5 hours), so an advice about a step whose slot was reused,
/// or not yet written, is not timed against the wrong send.
struct Ring {
    slots: Box<[AtomicU64]>,
}

impl Ring {
    const NANOS_BITS: u32 = 44;
    const NANOS_MASK: u64 = (1 << Self::NANOS_BITS) - 1;
    const GENERATION_MASK: u64 = (1 << (64 - Self::NANOS_BITS)) - 1;
    /// Never a valid slot: its nanoseconds are the all-ones value `record` refuses.
    const EMPTY: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            slots: (0..RING).map(|_| AtomicU64::new(Self::EMPTY)).collect(),
        }
    }

    fn tag(step: u64) -> u64 {
        ((step / RING as u64) & Self::GENERATION_MASK) << Self::NANOS_BITS
    }

    fn record(&self, step: u64, since_start: Duration) {
        let nanos = since_start.as_nanos();
        let value = if nanos < u128::from(Self::NANOS_MASK) {
            Self::tag(step) | nanos as u64
        } else {
            Self::EMPTY
        };
        // Each slot is one self-contained value: Relaxed suffices; a stale read
        // only loses a sample.
        self.slots[(step % RING as u64) as usize].store(value, Ordering::Relaxed);
    }

    /// Nanoseconds since the start at which `step` was sent, if it is still known.
    fn sent_at(&self, step: u64) -> Option<u64> {
        let value = self.slots[(step % RING as u64) as usize].load(Ordering::Relaxed);
        (value != Self::EMPTY && value & !Self::NANOS_MASK == Self::tag(step)).then_some(value & Self::NANOS_MASK)
    }
}

/// Where job `job` of `jobs` places its spikes among every `spike_every`
/// steps: spread evenly, so that independent jobs do not spike at once.
fn spike_offset(job: u32, jobs: u32, spike_every: u64) -> u64 {
    u64::from(job) * spike_every / u64::from(jobs.max(1))
}

/// Summaries of one healthy rank, cheaply: per-layer values come from a fixed
/// template scaled by one noisy factor per step (plus a wobble on one layer), so
/// a summary costs its three vectors and a few random numbers.
struct Generator {
    step: u64,
    rng: u64,
    spike_every: u64,
    /// Spikes fall on steps `spike_offset + m * spike_every`, m >= 1.
    spike_offset: u64,
    /// Per-layer L2 of a step with global norm 1.
    l2: Vec<f32>,
    max_abs: Vec<f32>,
}

impl Generator {
    /// Global gradient norm of a healthy step, before noise.
    const NORM: f64 = 1.0;
    /// Relative noise of the norm: uniform within ±3 %.
    const NOISE: f64 = 0.03;
    /// Norm multiplier on a spike step.
    const SPIKE: f64 = 50.0;

    fn new(stream: u32, layers: usize, first_step: u64, spike_every: u64, spike_offset: u64) -> Self {
        let mut generator = Self {
            step: first_step,
            // xorshift needs a non-zero state; mix the stream index in.
            rng: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(stream) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            spike_every,
            spike_offset,
            l2: Vec::with_capacity(layers),
            max_abs: Vec::with_capacity(layers),
        };
        // Deeper layers a little larger, each with its own jitter; normalised so
        // the layers' L2 norms compose to the global norm.
        let raw: Vec<f64> = (0..layers)
            .map(|l| (0.5 + l as f64 / layers as f64) * (1.0 + 0.2 * generator.uniform()))
            .collect();
        let total = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        for x in raw {
            let l2 = x / total * Self::NORM;
            generator.l2.push(l2 as f32);
            generator.max_abs.push((l2 * 0.05) as f32);
        }
        generator
    }

    /// Uniform in [-1, 1), xorshift64*.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let bits = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn next(&mut self, time: f64) -> proto::Summary {
        let step = self.step;
        self.step += 1;
        let spike = self.spike_every != 0
            && step > self.spike_offset
            && (step - self.spike_offset).is_multiple_of(self.spike_every);
        let noise = 1.0 + Self::NOISE * self.uniform();
        let scale = if spike { noise * Self::SPIKE } else { noise };
        let s = scale as f32;
        let mut layer_l2: Vec<f32> = self.l2.iter().map(|&x| x * s).collect();
        let layer_max_abs: Vec<f32> = self.max_abs.iter().map(|&x| x * s).collect();
        if !layer_l2.is_empty() {
            let wobble = self.uniform();
            let l = ((wobble + 1.0) / 2.0 * layer_l2.len() as f64) as usize % layer_l2.len();
            layer_l2[l] *= (1.0 + 0.02 * wobble) as f32;
        }
        // A loss starting near 3.0 and falling slowly towards 2.5.
        let loss = 2.5 + 0.5 * (-(step as f64) / 50_000.0).exp() + 0.005 * self.uniform();
        proto::Summary {
            step,
            time,
            loss: Some(loss),
            lr: Some(3e-4),
            loss_scale: None,
            grad_norm: Some(Self::NORM * scale),
            layer_nonfinite: vec![0; layer_l2.len()],
            layer_l2,
            layer_max_abs,
            layer_param_norm: Vec::new(),
            layer_update_norm: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_times_only_the_step_it_holds() {
        let ring = Ring::new();
        assert_eq!(ring.sent_at(5), None);
        ring.record(5, Duration::from_micros(7));
        assert_eq!(ring.sent_at(5), Some(7_000));
        assert_eq!(ring.sent_at(5 + RING as u64), None);
        ring.record(5 + RING as u64, Duration::from_micros(9));
        assert_eq!(ring.sent_at(5), None);
        assert_eq!(ring.sent_at(5 + RING as u64), Some(9_000));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<u64> = (1..=1000).rev().map(|ms| ms * 1_000_000).collect();
        let l = Latency::of(&mut samples).unwrap();
        assert_eq!((l.p50, l.p99, l.p999), (500.0, 990.0, 999.0));
        assert!(Latency::of(&mut []).is_none());
    }

    #[test]
    fn prometheus_resident_memory() {
        let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes_total 1\n\
                    process_resident_memory_bytes 89432064\n";
        assert_eq!(resident_from_prometheus(text), Some(89_432_064));
        assert_eq!(
            resident_from_prometheus("process_resident_memory_bytes{a=\"b\"} 1e6\n"),
            Some(1_000_000)
        );
        assert_eq!(resident_from_prometheus("up 1\n"), None);
    }

    #[test]
    fn generator_is_healthy_with_spikes() {
        let mut g = Generator::new(0, 100, 1, 200, 0);
        for _ in 1..200 {
            let s = g.next(0.0);
            let norm = s.grad_norm.unwrap();
            assert!((0.96..=1.04).contains(&norm), "{norm}");
            let layers = s.layer_l2.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            assert!((layers / norm - 1.0).abs() < 0.01, "{layers} vs {norm}");
            assert_eq!(s.layer_nonfinite.len(), 100);
        }
        let spike = g.next(0.0);
        assert_eq!(spike.step, 200);
        assert!(spike.grad_norm.unwrap() > 40.0);
    }

    #[test]
    fn staggered_jobs_spike_at_their_own_steps() {
        let offsets: Vec<u64> = (0..25).map(|j| spike_offset(j, 25, 200)).collect();
        assert_eq!(offsets[..4], [0, 8, 16, 24]);
        assert_eq!(offsets[24], 192);
        assert_eq!(spike_offset(0, 0, 200), 0);
        let mut g = Generator::new(5, 10, 1, 200, 8);
        let spikes: Vec<u64> = (1..=700)
            .map(|_| g.next(0.0))
            .filter(|s| s.grad_norm.unwrap() > 40.0)
            .map(|s| s.step)
            .collect();
        // Not at step 8, inside the rules' warm-up: from one period on.
        assert_eq!(spikes, [208, 408, 608]);
    }

    /// The load is what it claims: the real engine finds a healthy run with a
    /// spike every K steps, and advises clipping at each spike and nothing else.
    #[test]
    fn engine_clips_the_spikes_and_nothing_else() {
        use gradguard::engine::{Engine, JobSpec, Output};
        use gradguard::model::{Action, Severity};

        let names: Vec<String> = (0..100).map(|l| format!("layer{l}")).collect();
        let mut engine = Engine::default();
        let spec = JobSpec {
            layer_names: &names,
            world_size: Some(4),
            profile: None,
        };
        engine.declare("loadgen-0", &spec).unwrap();
        let mut ranks: Vec<Generator> = (0..4).map(|r| Generator::new(r, 100, 1, 200, 0)).collect();
        let mut out = Output::default();
        for step in 1..=1000u64 {
            for (rank, generator) in ranks.iter_mut().enumerate() {
                let summary = generator.next(1.7e9 + step as f64);
                let summary = gradguard::wire::summary_from_proto(&summary, rank as u32, 100).unwrap();
                engine.observe("loadgen-0", &summary, &mut out).unwrap();
            }
        }
        assert!(
            out.findings.iter().all(|f| f.severity == Severity::Info),
            "{:?}",
            out.findings
        );
        let advised: Vec<u64> = out.advice.iter().map(|a| a.step).collect();
        assert_eq!(advised, [200, 400, 600, 800, 1000]);
        assert!(
            out.advice
                .iter()
                .all(|a| matches!(a.action, Action::ClipGradients { .. }))
        );
    }

    #[test]
    fn server_urls() {
        assert_eq!(parse_server("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert!(parse_server("https://example.org").is_err());
        assert_eq!(
            default_metrics_url("http://10.0.0.2:50051"),
            "http://10.0.0.2:9464/metrics"
        );
        assert_eq!(default_metrics_url("http://[::1]:50051"), "http://[::1]:9464/metrics");
    }
}
