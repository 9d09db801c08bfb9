//! `gradguard follow FILE|DIR --server URL`: tails a training log as it is
//! written and streams its records to a running service, as the job's
//! workers would, so that a job that never imports a client still gets the
//! service's detection, stored anomalies, metrics and alerts.
//!
//! - [`read`]: a thread follows the file as `tail -F` does
//!   ([`gradguard::trace::tail`]) and parses it with `replay`'s readers;
//! - [`link`]: one worker stream per (job, rank) in the log, which waits for
//!   the service when it is away and resumes after the last step it
//!   accepted (the Welcome's `last_step`), so a restarted `follow` sends
//!   nothing twice and skips nothing;
//! - here: the command, the routing of records to links, and the output:
//!   advice on stdout (a line each, or JSON lines), notes on stderr, and on
//!   exit (Ctrl-C or SIGTERM) a summary of what was sent and advised.
//!
//! Exit status: 0 when stopped by a signal; 2 for a wrong command line; 1
//! when the log cannot be read (unknown or wrong format) or the service
//! refuses the job (a credential, a limit, a rule profile it does not have).

mod link;
mod read;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::Args;
use gradguard::client::ClientSecurity;
use gradguard::model::Action;
use gradguard::proto;
use gradguard::trace::tail::Target;
use gradguard::trace::{Record, jsonl};
use gradguard::wire;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::cli::{ClientSecurityArgs, Failure, FormatArg, warn};
use crate::output::{ActionFields, AdviceLine, Evidence, evidence_pairs, json_line, severity_word};

#[derive(Debug, Args)]
pub struct FollowArgs {
    /// The log to follow: a file (which may not exist yet), or a directory
    /// whose newest log file is followed (`*.jsonl`, `*.log`, `*.csv`,
    /// `trainer_state.json`, TensorBoard event files; also one directory
    /// down, such as `checkpoint-500/`).
    #[arg(value_name = "FILE|DIR")]
    pub path: PathBuf,

    /// The gradguard server's gRPC address (`http://host:port`, `https://host:port` for TLS; `host:port` is taken as http).
    #[arg(long, value_name = "URL", env = "GRADGUARD_SERVER", default_value = crate::cli::DEFAULT_SERVER)]
    pub server: String,

    /// Send every record as this job (default: the job a record names, else
    /// the file's stem, or the directory's name).
    #[arg(long)]
    pub job: Option<String>,

    /// Log format; `auto` detects it from the file name and first lines.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,

    /// Read FIELD (step, loss, grad_norm, lr, loss_scale, time) from KEY, as
    /// `replay --field`. Repeatable.
    #[arg(long, value_name = "FIELD=KEY")]
    pub field: Vec<String>,

    /// A rule profile of the server's rules file to judge the job by.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,

    /// How often to look for new lines, a rotated file or a file still missing.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_poll)]
    pub poll: Duration,

    /// Print advice as JSON lines (as `replay --json` does).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub security: ClientSecurityArgs,
}

fn parse_poll(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 250ms or 1s)"))?;
    if d.is_zero() || d > Duration::from_secs(60) {
        return Err(format!("{s}: must be above 0 and at most 60s"));
    }
    Ok(d)
}

pub fn run(args: &FollowArgs) -> Result<ExitCode, Failure> {
    let mut fields = jsonl::FieldMap::default();
    for spec in &args.field {
        fields.add(spec).map_err(|e| Failure::usage(anyhow!(e)))?;
    }
    if args.job.as_deref().is_some_and(|j| j.trim().is_empty()) {
        return Err(Failure::usage(anyhow!("--job: must not be empty")));
    }
    let security = args.security.security()?;
    gradguard::client::server_url(&args.server, &security).map_err(|e| Failure::usage(anyhow!("--server: {e}")))?;
    let shared = Arc::new(Shared {
        url: args.server.clone(),
        security,
        profile: args.profile.clone(),
        json: args.json,
        counts: Mutex::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let source = read::Source {
        target: Target::new(&args.path),
        format: args.format.format(),
        fields,
        job: args.job.clone(),
        poll: args.poll,
        stop: stop.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(follow(source, shared.clone(), stop));
    shared.print_summary();
    result.map(|()| ExitCode::SUCCESS)
}

async fn follow(source: read::Source, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> Result<(), Failure> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Stops the reading (at once) and the links' waiting for the service.
    let raise = || {
        stop.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
    };
    let (items_tx, mut items) = mpsc::channel(1024);
    let reader = std::thread::Builder::new()
        .name("follow-read".into())
        .spawn(move || read::run(source, items_tx))
        .map_err(|e| Failure::input(anyhow!("cannot start the reading thread: {e}")))?;

    let mut links: HashMap<(String, u32), mpsc::Sender<Record>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let signal = crate::serve::shutdown_signal();
    tokio::pin!(signal);
    let mut failure = None;
    loop {
        tokio::select! {
            item = items.recv() => match item {
                None => break,
                Some(read::Item::Record(record)) => {
                    let key = (record.job.clone(), record.summary.worker);
                    let link = links.entry(key).or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(256);
                        let link = link::Link::new(shared.clone(), &record);
                        tasks.spawn(link.run(rx, stop_rx.clone()));
                        tx
                    });
                    // A link gone has failed: its task's result says why.
                    let _ = link.send(record).await;
                }
                Some(read::Item::Note(line)) => shared.note(&line),
                Some(read::Item::Skipped) => shared.count(|c| c.skipped += 1),
                Some(read::Item::Fatal(message)) => {
                    failure = Some(message);
                    break;
                }
            },
            Some(done) = tasks.join_next() => {
                if let Some(message) = task_failure(done) {
                    failure = Some(message);
                    break;
                }
            }
            () = &mut signal => {
                shared.note("stopping: sending what was read, then waiting for the service's answers");
                raise();
                break;
            }
        }
    }
    if failure.is_some() {
        raise();
    } else {
        // What the reader had read is sent before the links end.
        while let Some(item) = items.recv().await {
            if let read::Item::Record(record) = item
                && let Some(link) = links.get(&(record.job.clone(), record.summary.worker))
            {
                let _ = link.send(record).await;
            }
        }
    }
    drop(items);
    drop(links);
    while let Some(done) = tasks.join_next().await {
        if let Some(message) = task_failure(done) {
            failure.get_or_insert(message);
        }
    }
    let _ = reader.join();
    match failure {
        Some(message) => Err(Failure::input(anyhow!(message))),
        None => Ok(()),
    }
}

fn task_failure(done: Result<Result<(), link::Fatal>, tokio::task::JoinError>) -> Option<String> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(link::Fatal(message))) => Some(message),
        Err(e) => Some(format!("a stream's task failed: {e}")),
    }
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the links share: where the service is, and the output.
pub(super) struct Shared {
    url: String,
    security: ClientSecurity,
    profile: Option<String>,
    json: bool,
    counts: Mutex<Counts>,
}

#[derive(Default)]
pub(super) struct Counts {
    /// Steps sent to the service.
    pub sent: u64,
    /// Steps not sent: the service had them (a restart, a reconnection), or
    /// they were not after the last sent.
    pub already: u64,
    /// Lines that could not be read.
    pub skipped: u64,
    /// Advice received, by action.
    pub advice: BTreeMap<&'static str, u64>,
}

impl Shared {
    fn note(&self, line: &str) {
        warn(&format!("follow: {line}"));
    }

    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Prints an advice (stdout) and counts it.
    fn advice(&self, advice: &proto::Advice) {
        let action = advice.action.as_ref().map(wire::action_from_proto);
        self.count(|c| *c.advice.entry(action.map_or("unknown", |a| a.name())).or_default() += 1);
        let mut out = io::stdout().lock();
        let written = if self.json {
            let evidence = evidence_pairs(&advice.evidence);
            json_line(
                &mut out,
                &AdviceLine {
                    kind: "advice",
                    id: advice.id,
                    job: &advice.job,
                    worker: advice.target_rank,
                    step: advice.decided_at_step,
                    apply_from: advice.apply_from_step,
                    receipt: None,
                    rule: advice.rules.first(),
                    rules: &advice.rules,
                    severity: severity_word(advice.severity),
                    action: action.map_or_else(ActionFields::unknown, ActionFields::from),
                    reason: &advice.reason,
                    evidence: Evidence(&evidence),
                },
            )
        } else {
            writeln!(out, "{}", advice_text(advice, action))
        };
        let _ = written.and_then(|()| out.flush());
    }

    fn print_summary(&self) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let advice: u64 = c.advice.values().sum();
        let by_action = c
            .advice
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.note(&format!(
            "{} step(s) sent, {} already at the service, {} line(s) skipped; {advice} advice{}",
            c.sent,
            c.already,
            c.skipped,
            if by_action.is_empty() {
                String::new()
            } else {
                format!(" ({by_action})")
            }
        ));
    }
}

/// `job gpt  step   412  all ranks  critical  scale_lr factor=0.5  [rules]  REASON`
fn advice_text(advice: &proto::Advice, action: Option<Action>) -> String {
    let target = advice
        .target_rank
        .map_or_else(|| "all ranks".to_owned(), |r| format!("rank {r}"));
    let action = action.map_or_else(|| "unknown action".to_owned(), |a| a.to_string());
    format!(
        "job {}  step {:>5}  {target:<9}  {:<8}  {action}  [{}]  {}",
        advice.job,
        advice.decided_at_step,
        severity_word(advice.severity),
        advice.rules.join(","),
        advice.reason
    )
}
