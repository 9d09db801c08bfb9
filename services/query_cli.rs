//! The query commands: `jobs`, `job`, `anomalies`, `advice` and `watch` ask a
//! running server's `gradguard.v1.Query` service and print its answers as
//! aligned tables or, with `--json`, one JSON object per line.
//!
//! JSON lines: `{"kind":"job"|"anomaly"|"advice",...}` with the proto's field
//! names; severity and health are lowercase words (`ok`, `info`, `warning`,
//! `critical`), times are float seconds since the Unix epoch, absent optional
//! values are null, and non-finite numbers are strings as `replay` writes
//! them. An advice's action is flattened as in `replay`: `action` (its name)
//! and exactly its parameter (`max_norm`, `factor`, `to_step` or `rank`);
//! `evidence` maps names to numbers.
//!
//! Exit codes: 0 done (for `watch`: interrupted, or the server ended the feed
//! cleanly); 1 the server could not be reached, does not know the job, or
//! answered another error; 2 a bad flag, or a query the server calls invalid
//! (`INVALID_ARGUMENT`, with its message).

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::anyhow;
use clap::Args;
use gradguard::client::{self, ClientError};
use gradguard::model::{RuleId, Severity};
use gradguard::proto::{self, query_client::QueryClient};
use gradguard::wire;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::cli::{Failure, status_text, warn};
use crate::output::{ActionFields, Evidence, Num, evidence_pairs, json_line, or_dash, severity_word, write_table};

/// How many of a job's latest anomalies, and of its latest advice, `job` shows.
const RECENT: u32 = 10;

/// Where the server is and how to print its answers; every query command has these.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The gradguard server's gRPC address (`http://host:port`; `host:port` is taken as http).
    #[arg(
        long,
        value_name = "URL",
        env = "GRADGUARD_SERVER",
        default_value = "http://localhost:50051"
    )]
    pub server: String,

    /// Write one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id.
    pub job: String,

    #[command(flatten)]
    pub server: ServerArgs,
}

/// Which stored anomalies or advice to list; every filter is optional.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only this job.
    #[arg(long)]
    pub job: Option<String>,

    /// At least this severity: info, warning, critical.
    #[arg(long, value_name = "SEVERITY")]
    pub severity: Option<Severity>,

    /// Only this rule (e.g. grad_spike); advice that names it among its rules.
    #[arg(long, value_parser = parse_rule)]
    pub rule: Option<RuleId>,

    /// Only what is about this rank; advice targeted at this rank.
    #[arg(long, value_name = "RANK")]
    pub worker: Option<u32>,

    /// From this step on (inclusive).
    #[arg(long, value_name = "STEP")]
    pub from_step: Option<u64>,

    /// Up to this step (inclusive).
    #[arg(long, value_name = "STEP")]
    pub to_step: Option<u64>,
}

impl FilterArgs {
    fn to_proto(&self) -> proto::Filter {
        proto::Filter {
            job: self.job.clone().unwrap_or_default(),
            rule: self.rule.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            min_severity: min_severity(self.severity),
            worker: self.worker,
            step_from: self.from_step,
            step_to: self.to_step,
            time_from: None,
            time_to: None,
        }
    }
}

/// `anomalies` and `advice`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// Print at most this many rows, newest first.
    #[arg(long, default_value_t = 50, value_parser = parse_limit)]
    pub limit: u64,

    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this job.
    #[arg(long)]
    pub job: Option<String>,

    /// At least this severity: info, warning, critical.
    #[arg(long, value_name = "SEVERITY")]
    pub severity: Option<Severity>,

    #[command(flatten)]
    pub server: ServerArgs,
}

fn parse_rule(s: &str) -> Result<RuleId, String> {
    s.parse().map_err(|_| {
        let known: Vec<&str> = RuleId::ALL.iter().map(|r| r.as_str()).collect();
        format!("unknown rule {s:?} (known: {})", known.join(", "))
    })
}

fn parse_limit(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn min_severity(s: Option<Severity>) -> i32 {
    s.map_or(0, |s| wire::severity_to_proto(s).into())
}

/// `gradguard jobs`: every job the server knows, stored or live.
pub fn jobs(args: &JobsArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let jobs = block_on(async {
        let mut query = connect(url).await?;
        let response = query
            .list_jobs(proto::ListJobsRequest {})
            .await
            .map_err(|s| refused(url, s))?;
        Ok(response.into_inner().jobs)
    })?;
    emit(|out| {
        if args.server.json {
            jobs.iter().try_for_each(|j| json_line(out, &JobLine::new(j)))
        } else if jobs.is_empty() {
            writeln!(out, "No jobs.")
        } else {
            write_rows(out, JOB_COLUMNS, jobs.iter().map(job_row), None)
        }
    })
}

/// `gradguard job JOB`: one job's details, its latest anomalies and advice.
pub fn job(args: &JobArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let (job, anomalies, advice) = block_on(async {
        let mut query = connect(url).await?;
        let request = proto::GetJobRequest { job: args.job.clone() };
        let job = match query.get_job(request).await {
            Ok(job) => job.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(Failure::input(anyhow!("no job {:?} is known to {url}", args.job)));
            }
            Err(s) => return Err(refused(url, s)),
        };
        let filter = Some(proto::Filter {
            job: args.job.clone(),
            ..proto::Filter::default()
        });
        let anomalies = query
            .list_anomalies(proto::ListAnomaliesRequest {
                filter: filter.clone(),
                page_size: RECENT,
                page_token: String::new(),
            })
            .await
            .map_err(|s| refused(url, s))?
            .into_inner()
            .anomalies;
        let advice = query
            .list_advice(proto::ListAdviceRequest {
                filter,
                page_size: RECENT,
                page_token: String::new(),
            })
            .await
            .map_err(|s| refused(url, s))?
            .into_inner()
            .advice;
        Ok((job, anomalies, advice))
    })?;
    emit(|out| {
        if args.server.json {
            json_line(out, &JobLine::new(&job))?;
            anomalies
                .iter()
                .try_for_each(|a| json_line(out, &AnomalyLine::new(a)))?;
            advice.iter().try_for_each(|a| advice_line(out, a))
        } else {
            write_job(out, &job, &anomalies, &advice)
        }
    })
}

/// `gradguard anomalies`: stored anomalies, newest first.
pub fn anomalies(args: &ListArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let filter = Some(args.filter.to_proto());
    let listing = block_on(async {
        let query = connect(url).await?;
        collect_pages(args.limit, async |page_size, page_token| {
            let page = query
                .clone()
                .list_anomalies(proto::ListAnomaliesRequest {
                    filter: filter.clone(),
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.anomalies, page.next_page_token))
        })
        .await
        .map_err(|s| refused(url, s))
    })?;
    let code = emit(|out| {
        if args.server.json {
            listing
                .rows
                .iter()
                .try_for_each(|a| json_line(out, &AnomalyLine::new(a)))
        } else if listing.rows.is_empty() {
            writeln!(out, "No anomalies.")
        } else {
            write_rows(out, ANOMALY_COLUMNS, listing.rows.iter().map(anomaly_row), None)
        }
    })?;
    listing.note_more(args);
    Ok(code)
}

/// `gradguard advice`: stored advice, newest first.
pub fn advice(args: &ListArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let filter = Some(args.filter.to_proto());
    let listing = block_on(async {
        let query = connect(url).await?;
        collect_pages(args.limit, async |page_size, page_token| {
            let page = query
                .clone()
                .list_advice(proto::ListAdviceRequest {
                    filter: filter.clone(),
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.advice, page.next_page_token))
        })
        .await
        .map_err(|s| refused(url, s))
    })?;
    let code = emit(|out| {
        if args.server.json {
            listing.rows.iter().try_for_each(|a| advice_line(out, a))
        } else if listing.rows.is_empty() {
            writeln!(out, "No advice.")
        } else {
            write_rows(out, ADVICE_COLUMNS, listing.rows.iter().map(advice_row), None)
        }
    })?;
    listing.note_more(args);
    Ok(code)
}

/// `gradguard watch`: anomalies as the server stores them, until Ctrl-C or
/// the server ends the feed. Once the server has accepted the call, says so
/// on stderr (`watching anomalies on URL`): from then on nothing is missed.
pub fn watch(args: &WatchArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    block_on(async {
        let mut query = connect(url).await?;
        let request = proto::WatchAnomaliesRequest {
            job: args.job.clone().unwrap_or_default(),
            min_severity: min_severity(args.severity),
        };
        let mut feed = query
            .watch_anomalies(request)
            .await
            .map_err(|s| refused(url, s))?
            .into_inner();
        warn(&format!("watching anomalies on {url}"));
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        let mut out = io::stdout().lock();
        loop {
            let anomaly = tokio::select! {
                signal = &mut interrupted => {
                    return match signal {
                        Ok(()) => Ok(ExitCode::SUCCESS),
                        Err(e) => Err(Failure::input(anyhow!("cannot listen for Ctrl-C: {e}"))),
                    };
                }
                message = feed.message() => match message {
                    Ok(Some(anomaly)) => anomaly,
                    Ok(None) => {
                        warn(&format!("{url} ended the watch"));
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(s) => return Err(Failure::input(anyhow!("{url} ended the watch: {}", status_text(&s)))),
                },
            };
            let written = if args.server.json {
                json_line(&mut out, &AnomalyLine::new(&anomaly))
            } else {
                writeln!(out, "{}", watch_line(&anomaly))
            };
            match written.and_then(|()| out.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                Err(e) => return Err(Failure::input(anyhow!("cannot write the output: {e}"))),
            }
        }
    })
}

/// Runs one command's calls on a small single-threaded runtime.
fn block_on<T>(work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the async runtime: {e}")))?
        .block_on(work)
}

async fn connect(url: &str) -> Result<QueryClient<Channel>, Failure> {
    match client::channel(url).await {
        Ok(channel) => Ok(QueryClient::new(channel).max_decoding_message_size(64 << 20)),
        Err(e @ ClientError::Url { .. }) => Err(Failure::usage(anyhow!("--server: {e}"))),
        Err(e) => Err(Failure::input(e)),
    }
}

/// A query the server answered with an error: the command's fault (exit 2)
/// when the server calls it invalid, otherwise exit 1.
fn refused(url: &str, status: Status) -> Failure {
    let error = anyhow!("{url}: {}", status_text(&status));
    match status.code() {
        Code::InvalidArgument => Failure::usage(error),
        _ => Failure::input(error),
    }
}

/// The rows of a newest-first listing, and whether the server has more.
#[derive(Debug)]
struct Listing<T> {
    rows: Vec<T>,
    more: bool,
}

impl<T> Listing<T> {
    /// Tells on stderr, after a table, that `--limit` cut it short.
    fn note_more(&self, args: &ListArgs) {
        if self.more && !args.server.json {
            warn(&format!("(the newest {} shown; --limit for more)", args.limit));
        }
    }
}

/// Follows page tokens until `limit` rows are in or the server has no more;
/// `fetch(page_size, page_token)` asks for one page.
async fn collect_pages<T>(
    limit: u64,
    mut fetch: impl AsyncFnMut(u32, String) -> Result<(Vec<T>, String), Status>,
) -> Result<Listing<T>, Status> {
    let mut rows = Vec::new();
    let mut token = String::new();
    let mut more = true;
    while more && (rows.len() as u64) < limit {
        let page_size = (limit - rows.len() as u64).min(u64::from(wire::MAX_PAGE_SIZE)) as u32;
        let (page, next) = fetch(page_size, token).await?;
        // An empty page with a token would ask for the same page forever.
        more = !next.is_empty() && !page.is_empty();
        rows.extend(page);
        token = next;
    }
    if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        more = true;
    }
    Ok(Listing { rows, more })
}

type Stdout = io::BufWriter<io::StdoutLock<'static>>;

/// Writes a command's output; a reader that went away (`| head`) is no error.
fn emit(write: impl FnOnce(&mut Stdout) -> io::Result<()>) -> Result<ExitCode, Failure> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::input(anyhow!("cannot write the output: {e}"))),
    }
}

fn health_word(code: i32) -> &'static str {
    match proto::Health::try_from(code) {
        Ok(proto::Health::Ok) => "ok",
        Ok(proto::Health::Info) => "info",
        Ok(proto::Health::Warning) => "warning",
        Ok(proto::Health::Critical) => "critical",
        Ok(proto::Health::Unspecified) | Err(_) => "unspecified",
    }
}

/// A time for people: `2026-11-26 17:20:05Z` (UTC); `-` when unknown (0).
fn time_text(t: f64) -> String {
    // What humantime can print: after the epoch, before the year 10000.
    if t > 0.0 && t < 253_402_300_800.0 {
        let at = UNIX_EPOCH + Duration::from_secs_f64(t);
        humantime::format_rfc3339_seconds(at).to_string().replacen('T', " ", 1)
    } else if t == 0.0 {
        "-".to_owned()
    } else {
        number(t)
    }
}

/// A measured value for a table: up to 4 decimals, scientific when tiny or huge.
fn number(x: f64) -> String {
    if !x.is_finite() {
        x.to_string() // NaN, inf, -inf
    } else if x == 0.0 || (1e-3..1e6).contains(&x.abs()) {
        let fixed = format!("{x:.4}");
        fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{x:.3e}")
    }
}

#[derive(Serialize)]
struct JobLine<'a> {
    kind: &'static str,
    job: &'a str,
    health: &'static str,
    live: bool,
    connected_streams: u32,
    ranks: u32,
    world_size: Option<u32>,
    layers: u32,
    last_step: Option<u64>,
    first_seen: Num,
    last_seen: Num,
    anomalies_info: u64,
    anomalies_warning: u64,
    anomalies_critical: u64,
    advice: u64,
}

impl<'a> JobLine<'a> {
    fn new(j: &'a proto::Job) -> Self {
        Self {
            kind: "job",
            job: &j.job,
            health: health_word(j.health),
            live: j.live,
            connected_streams: j.connected_streams,
            ranks: j.ranks,
            world_size: j.world_size,
            layers: j.layers,
            last_step: j.last_step,
            first_seen: Num(j.first_seen),
            last_seen: Num(j.last_seen),
            anomalies_info: j.anomalies_info,
            anomalies_warning: j.anomalies_warning,
            anomalies_critical: j.anomalies_critical,
            advice: j.advice,
        }
    }
}

#[derive(Serialize)]
struct AnomalyLine<'a> {
    kind: &'static str,
    id: u64,
    job: &'a str,
    rank: Option<u32>,
    step: u64,
    time: Num,
    rule: &'a str,
    severity: &'static str,
    layer: Option<&'a str>,
    value: Num,
    threshold: Num,
    message: &'a str,
}

impl<'a> AnomalyLine<'a> {
    fn new(a: &'a proto::Anomaly) -> Self {
        Self {
            kind: "anomaly",
            id: a.id,
            job: &a.job,
            rank: a.rank,
            step: a.step,
            time: Num(a.time),
            rule: &a.rule,
            severity: severity_word(a.severity),
            layer: (!a.layer.is_empty()).then_some(a.layer.as_str()),
            value: Num(a.value),
            threshold: Num(a.threshold),
            message: &a.message,
        }
    }
}

#[derive(Serialize)]
struct AdviceLine<'a> {
    kind: &'static str,
    id: u64,
    job: &'a str,
    target_rank: Option<u32>,
    decided_at_step: u64,
    apply_from_step: u64,
    time: Num,
    severity: &'static str,
    #[serde(flatten)]
    action: Option<ActionFields>,
    rules: &'a [String],
    reason: &'a str,
    evidence: Evidence<'a>,
    applied: u32,
    declined: u32,
}

fn advice_line(out: &mut impl Write, stored: &proto::StoredAdvice) -> io::Result<()> {
    let empty = proto::Advice::default();
    let a = stored.advice.as_ref().unwrap_or(&empty);
    let evidence = evidence_pairs(&a.evidence);
    json_line(
        out,
        &AdviceLine {
            kind: "advice",
            id: a.id,
            job: &a.job,
            target_rank: a.target_rank,
            decided_at_step: a.decided_at_step,
            apply_from_step: a.apply_from_step,
            time: Num(stored.time),
            severity: severity_word(a.severity),
            action: a.action.as_ref().map(|x| wire::action_from_proto(x).into()),
            rules: &a.rules,
            reason: &a.reason,
            evidence: Evidence(&evidence),
            applied: stored.applied,
            declined: stored.declined,
        },
    )
}

/// A table's columns: the header, and whether it is a right-aligned number.
type Columns = &'static [(&'static str, bool)];

const JOB_COLUMNS: Columns = &[
    ("JOB", false),
    ("HEALTH", false),
    ("LIVE", false),
    ("STREAMS", true),
    ("RANKS", true),
    ("LAST STEP", true),
    ("ANOMALIES I/W/C", true),
    ("ADVICE", true),
    ("LAST SEEN", false),
];

const ANOMALY_COLUMNS: Columns = &[
    ("ID", true),
    ("TIME", false),
    ("JOB", false),
    ("STEP", true),
    ("RANK", true),
    ("SEVERITY", false),
    ("RULE", false),
    ("LAYER", false),
    ("VALUE", true),
    ("MESSAGE", false),
];

const ADVICE_COLUMNS: Columns = &[
    ("ID", true),
    ("TIME", false),
    ("JOB", false),
    ("STEP", true),
    ("TARGET", false),
    ("SEVERITY", false),
    ("ACTION", false),
    ("RULES", false),
    ("APPLIED", true),
    ("DECLINED", true),
    ("REASON", false),
];

fn job_row(j: &proto::Job) -> Vec<String> {
    vec![
        j.job.clone(),
        health_word(j.health).to_owned(),
        if j.live { "yes" } else { "no" }.to_owned(),
        j.connected_streams.to_string(),
        j.ranks.to_string(),
        or_dash(j.last_step),
        format!("{}/{}/{}", j.anomalies_info, j.anomalies_warning, j.anomalies_critical),
        j.advice.to_string(),
        time_text(j.last_seen),
    ]
}

fn anomaly_row(a: &proto::Anomaly) -> Vec<String> {
    vec![
        a.id.to_string(),
        time_text(a.time),
        a.job.clone(),
        a.step.to_string(),
        or_dash(a.rank),
        severity_word(a.severity).to_owned(),
        a.rule.clone(),
        if a.layer.is_empty() { "-" } else { &a.layer }.to_owned(),
        number(a.value),
        a.message.clone(),
    ]
}

fn advice_row(stored: &proto::StoredAdvice) -> Vec<String> {
    let empty = proto::Advice::default();
    let a = stored.advice.as_ref().unwrap_or(&empty);
    vec![
        a.id.to_string(),
        time_text(stored.time),
        a.job.clone(),
        a.decided_at_step.to_string(),
        a.target_rank.map_or_else(|| "all".to_owned(), |r| format!("rank {r}")),
        severity_word(a.severity).to_owned(),
        or_dash(a.action.as_ref().map(wire::action_from_proto)),
        a.rules.join(","),
        stored.applied.to_string(),
        stored.declined.to_string(),
        a.reason.clone(),
    ]
}

/// Writes a header and rows aligned; `omit` leaves out the column of that header.
fn write_rows(
    out: &mut impl Write,
    columns: Columns,
    rows: impl Iterator<Item = Vec<String>>,
    omit: Option<&str>,
) -> io::Result<()> {
    let keep: Vec<bool> = columns.iter().map(|(header, _)| Some(*header) != omit).collect();
    let pick = |row: Vec<String>| -> Vec<String> {
        row.into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(cell, _)| cell)
            .collect()
    };
    let header = pick(columns.iter().map(|(h, _)| (*h).to_owned()).collect());
    let right: Vec<bool> = columns
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((_, r), _)| *r)
        .collect();
    let rows: Vec<Vec<String>> = std::iter::once(header).chain(rows.map(pick)).collect();
    let rows: Vec<&[String]> = rows.iter().map(Vec::as_slice).collect();
    write_table(out, &rows, &right)
}

/// `job`'s text: the job's fields one per line, then its latest anomalies and advice.
fn write_job(
    out: &mut impl Write,
    j: &proto::Job,
    anomalies: &[proto::Anomaly],
    advice: &[proto::StoredAdvice],
) -> io::Result<()> {
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let live = if j.live {
        format!("yes, {} open", plural(j.connected_streams.into(), "stream"))
    } else {
        "no".to_owned()
    };
    let ranks = match j.world_size {
        Some(w) => format!("{} of {w}", j.ranks),
        None => j.ranks.to_string(),
    };
    let fields = [
        ("job", j.job.clone()),
        ("health", health_word(j.health).to_owned()),
        ("live", live),
        ("ranks", ranks),
        ("layers", j.layers.to_string()),
        ("last step", or_dash(j.last_step)),
        ("first seen", time_text(j.first_seen)),
        ("last seen", time_text(j.last_seen)),
        (
            "anomalies",
            format!(
                "{} critical, {} warning, {} info",
                j.anomalies_critical, j.anomalies_warning, j.anomalies_info
            ),
        ),
        ("advice", j.advice.to_string()),
    ];
    let fields: Vec<[String; 2]> = fields.into_iter().map(|(k, v)| [format!("{k}:"), v]).collect();
    let fields: Vec<&[String]> = fields.iter().map(|f| &f[..]).collect();
    write_table(out, &fields, &[false, false])?;

    let total_anomalies = j.anomalies_info + j.anomalies_warning + j.anomalies_critical;
    let section = |out: &mut dyn Write, what: &str, shown: usize, total: u64| {
        writeln!(out)?;
        if (shown as u64) < total {
            writeln!(
                out,
                "Latest {what} ({shown} of {total}; `gradguard {what} --job {}` lists more):",
                j.job
            )
        } else {
            writeln!(out, "Latest {what}:")
        }
    };
    section(out, "anomalies", anomalies.len(), total_anomalies)?;
    if anomalies.is_empty() {
        writeln!(out, "None.")?;
    } else {
        write_rows(out, ANOMALY_COLUMNS, anomalies.iter().map(anomaly_row), Some("JOB"))?;
    }
    section(out, "advice", advice.len(), j.advice)?;
    if advice.is_empty() {
        writeln!(out, "None.")
    } else {
        write_rows(out, ADVICE_COLUMNS, advice.iter().map(advice_row), Some("JOB"))
    }
}

/// One anomaly of `watch`, as it arrives (no table: widths are not known ahead).
fn watch_line(a: &proto::Anomaly) -> String {
    let mut line = format!(
        "{}  {}  {}  step {}  rank {}  {:<8}  {}",
        a.id,
        time_text(a.time),
        a.job,
        a.step,
        or_dash(a.rank),
        severity_word(a.severity),
        a.rule
    );
    if !a.layer.is_empty() {
        line.push_str(&format!("  layer {}", a.layer));
    }
    line.push_str(&format!("  value {}  {}", number(a.value), a.message));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server holding ids `1..=n`, newest first, pages of at most `max`.
    fn pages(n: u64, max: u32) -> impl AsyncFnMut(u32, String) -> Result<(Vec<u64>, String), Status> {
        async move |size: u32, token: String| {
            let below = if token.is_empty() {
                n + 1
            } else {
                token.parse().unwrap()
            };
            let size = u64::from(size.min(max));
            let rows: Vec<u64> = (1..below).rev().take(size as usize).collect();
            let next = match rows.last() {
                Some(&last) if last > 1 => last.to_string(),
                _ => String::new(),
            };
            Ok((rows, next))
        }
    }

    fn collect(limit: u64, n: u64, max: u32) -> Listing<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(collect_pages(limit, pages(n, max))).unwrap()
    }

    #[test]
    fn pages_are_followed_until_the_limit() {
        let listing = collect(25, 100, 10);
        assert_eq!(listing.rows, (76..=100).rev().collect::<Vec<_>>());
        assert!(listing.more);
        let listing = collect(2500, 2100, 1000);
        assert_eq!(listing.rows.len(), 2100);
        assert!(!listing.more);
        let listing = collect(5, 5, 1000);
        assert_eq!((listing.rows.len(), listing.more), (5, false));
    }

    #[test]
    fn an_empty_page_with_a_token_ends_the_listing() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let listing = runtime
            .block_on(collect_pages(10, async |_, _| Ok((Vec::<u64>::new(), "7".to_owned()))))
            .unwrap();
        assert!(listing.rows.is_empty());
    }

    #[test]
    fn times_and_numbers_read_well() {
        assert_eq!(time_text(1_795_713_605.25), "2026-11-26 17:20:05Z");
        assert_eq!(time_text(0.0), "-");
        assert_eq!(time_text(f64::NAN), "NaN");
        assert_eq!(time_text(1e300), "1.000e300");
        assert_eq!(number(812.4), "812.4");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(1e-9), "1.000e-9");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn rows_leave_out_a_column() {
        let mut out = Vec::new();
        let rows = [vec!["1".to_owned(), "j".to_owned(), "x".to_owned()]].into_iter();
        const COLUMNS: Columns = &[("ID", true), ("JOB", false), ("NOTE", false)];
        write_rows(&mut out, COLUMNS, rows, Some("JOB")).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "ID  NOTE\n 1  x\n");
    }

    #[test]
    fn unknown_rules_list_the_known_ones() {
        let e = parse_rule("bogus").unwrap_err();
        assert!(e.starts_with("unknown rule \"bogus\" (known: nonfinite, "), "{e}");
        assert_eq!(parse_rule("grad_spike"), Ok(RuleId::GradSpike));
    }
}
