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
//!
//! The pieces: [`args`] (the flags), [`call`] (the runtime, the connection,
//! paging), [`json`] and [`text`] (the two ways to print an answer).

mod args;
mod call;
mod json;
#[cfg(test)]
mod tests;
mod text;

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::anyhow;
use gradguard::proto;
use tonic::Code;

use crate::cli::{Failure, status_text, warn};
use crate::output::json_line;
use args::min_severity;
pub use args::{JobArgs, JobsArgs, ListArgs, WatchArgs};
use call::{block_on, collect_pages, connect, refused};
use json::{AnomalyLine, JobLine, advice_line};
use text::{
    ADVICE_COLUMNS, ANOMALY_COLUMNS, JOB_COLUMNS, advice_row, anomaly_row, job_row, watch_line, write_job, write_rows,
};

/// How many of a job's latest anomalies, and of its latest advice, `job` shows.
const RECENT: u32 = 10;

/// `gradguard jobs`: every job the server knows, stored or live, by job id
/// (or the first `--limit`), asked for a page at a time.
pub fn jobs(args: &JobsArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let security = args.server.security.security()?;
    let listing = block_on(async {
        let query = connect(url, &security).await?;
        collect_pages(args.limit.unwrap_or(u64::MAX), async |page_size, page_token| {
            let page = query
                .clone()
                .list_jobs(proto::ListJobsRequest { page_size, page_token })
                .await?
                .into_inner();
            Ok((page.jobs, page.next_page_token))
        })
        .await
        .map_err(|s| refused(url, &security, s))
    })?;
    let code = emit(|out| {
        if args.server.json {
            listing.rows.iter().try_for_each(|j| json_line(out, &JobLine::new(j)))
        } else if listing.rows.is_empty() {
            writeln!(out, "No jobs.")
        } else {
            write_rows(out, JOB_COLUMNS, listing.rows.iter().map(job_row), None)
        }
    })?;
    listing.note_more(args.server.json, "first");
    Ok(code)
}

/// `gradguard job JOB`: one job's details, its latest anomalies and advice.
pub fn job(args: &JobArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let security = args.server.security.security()?;
    let (job, anomalies, advice) = block_on(async {
        let mut query = connect(url, &security).await?;
        let request = proto::GetJobRequest { job: args.job.clone() };
        let job = match query.get_job(request).await {
            Ok(job) => job.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(Failure::input(anyhow!("no job {:?} is known to {url}", args.job)));
            }
            Err(s) => return Err(refused(url, &security, s)),
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
            .map_err(|s| refused(url, &security, s))?
            .into_inner()
            .anomalies;
        let advice = query
            .list_advice(proto::ListAdviceRequest {
                filter,
                page_size: RECENT,
                page_token: String::new(),
            })
            .await
            .map_err(|s| refused(url, &security, s))?
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
    let security = args.server.security.security()?;
    let filter = Some(args.filter.to_proto());
    let listing = block_on(async {
        let query = connect(url, &security).await?;
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
        .map_err(|s| refused(url, &security, s))
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
    listing.note_more(args.server.json, "newest");
    Ok(code)
}

/// `gradguard advice`: stored advice, newest first.
pub fn advice(args: &ListArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let security = args.server.security.security()?;
    let filter = Some(args.filter.to_proto());
    let listing = block_on(async {
        let query = connect(url, &security).await?;
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
        .map_err(|s| refused(url, &security, s))
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
    listing.note_more(args.server.json, "newest");
    Ok(code)
}

/// `gradguard watch`: anomalies as the server stores them, until Ctrl-C or
/// the server ends the feed. Once the server has accepted the call, says so
/// on stderr (`watching anomalies on URL`): from then on nothing is missed.
pub fn watch(args: &WatchArgs) -> Result<ExitCode, Failure> {
    let url = &args.server.server;
    let security = args.server.security.security()?;
    block_on(async {
        let mut query = connect(url, &security).await?;
        let request = proto::WatchAnomaliesRequest {
            job: args.job.clone().unwrap_or_default(),
            min_severity: min_severity(args.severity),
        };
        let mut feed = query
            .watch_anomalies(request)
            .await
            .map_err(|s| refused(url, &security, s))?
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
