//! The query commands' flags.

use clap::Args;
use gradguard::model::{RuleId, Severity};
use gradguard::{proto, wire};

/// Where the server is and how to print its answers; every query command has these.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The gradguard server's gRPC address (`http://host:port`, `https://host:port` for TLS; `host:port` is taken as http).
    #[arg(
        long,
        value_name = "URL",
        env = "GRADGUARD_SERVER",
        default_value = crate::cli::DEFAULT_SERVER
    )]
    pub server: String,

    #[command(flatten)]
    pub security: crate::cli::ClientSecurityArgs,

    /// Write one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Print at most this many jobs, by job id (default: every job, asked
    /// for a page at a time).
    #[arg(long, value_parser = parse_limit)]
    pub limit: Option<u64>,

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

    /// From this time on (inclusive): a time ago (`30m`, `2h`, `1day`) or
    /// an RFC 3339 time (`2026-12-04T03:00:00Z`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<f64>,

    /// Up to this time (inclusive), as `--since`.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<f64>,
}

/// A time for `--since`/`--until`, in seconds since the epoch: a duration
/// before now, or an RFC 3339 time (UTC, or with `Z`; `T` or a space).
fn parse_time(s: &str) -> Result<f64, String> {
    let now = std::time::SystemTime::now();
    let at = match humantime::parse_duration(s) {
        Ok(ago) => now
            .checked_sub(ago)
            .ok_or_else(|| format!("{s} ago is before the epoch"))?,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!("{s:?} is neither a time ago (30m, 2h, 1day) nor an RFC 3339 time (2026-12-04T03:00:00Z)")
        })?,
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .map_err(|_| format!("{s:?} is before the epoch"))
}

impl FilterArgs {
    pub(super) fn to_proto(&self) -> proto::Filter {
        proto::Filter {
            job: self.job.clone().unwrap_or_default(),
            rule: self.rule.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            min_severity: min_severity(self.severity),
            worker: self.worker,
            step_from: self.from_step,
            step_to: self.to_step,
            time_from: self.since,
            time_to: self.until,
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

pub(super) fn parse_rule(s: &str) -> Result<RuleId, String> {
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

pub(super) fn min_severity(s: Option<Severity>) -> i32 {
    s.map_or(0, |s| wire::severity_to_proto(s).into())
}
