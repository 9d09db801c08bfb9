//! `gradguard.v1.Query`: jobs, anomalies and advice from the store, merged
//! with what the running engine knows now; a live feed of new anomalies.
//!
//! Store reads block, so they run on tokio's blocking pool, a bounded number
//! at once ([`Slots`]: `max_concurrent_queries`), each within `query_timeout`
//! of its arrival: a query that waited that long for a slot is refused
//! (RESOURCE_EXHAUSTED), one still reading then is stopped inside SQLite
//! (DEADLINE_EXCEEDED). The store's reader keeps a connection per slot, and
//! SQLite's WAL lets them read while the writer commits.
//!
//! `ListJobs` pages by job id: a page is the first jobs after the token's id
//! among the stored ones (one indexed read, counts included) and the live
//! ones the hub tracks (one pass over them), merged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::{self, query_server::Query};
use crate::store::{Filter, JobCounts, JobRow, Reader, StoreError};
use crate::wire;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::access::{Caller, Gate};
use super::hub::Hub;
use super::settings::QueryLimits;
use crate::recorder::Watchers;

pub struct QueryService {
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    reader: Option<Reader>,
    slots: Slots,
    watchers: Watchers,
    /// Turns true when the service stops: watch streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl QueryService {
    pub fn new(
        hub: Arc<Hub>,
        reader: Option<Arc<Reader>>,
        watchers: Watchers,
        stopping: tokio::sync::watch::Receiver<bool>,
        limits: QueryLimits,
        gate: Arc<Gate>,
    ) -> Self {
        let reader = reader.map(|r| {
            r.keep(limits.max_concurrent);
            (*r).clone()
        });
        Self {
            hub,
            gate,
            reader,
            slots: Slots::new(limits),
            watchers,
            stopping,
        }
    }

    fn reader(&self) -> Result<&Reader, Status> {
        self.reader
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the service runs without a store (--no-store)"))
    }

    /// Refuses a job outside the caller's `query:` scopes, whether or not
    /// the job exists: the answer tells nothing of other jobs.
    fn may_query(&self, caller: &Caller, job: &str) -> Result<(), Status> {
        if caller.may_query(job) {
            Ok(())
        } else {
            Err(self.gate.out_of_scope(caller, "query", job))
        }
    }

    /// A listing's store filter limited to the caller's jobs: a named job
    /// must be in scope, no job means the jobs in scope. `None`: the
    /// caller may query no job at all (an empty answer).
    fn scoped(&self, caller: &Caller, mut filter: Filter) -> Result<Option<Filter>, Status> {
        if let Some(job) = &filter.job {
            self.may_query(caller, job)?;
            return Ok(Some(filter));
        }
        filter.jobs = caller.query_globs();
        Ok(filter.jobs.as_ref().is_none_or(|g| !g.is_empty()).then_some(filter))
    }

    /// Runs a store read in a slot, within the query timeout.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        self.slots.read(self.reader()?, f).await
    }

    /// A job's wire form: the stored row and counts, overlaid with the live
    /// view; `None` when neither knows it.
    fn merge(&self, stored: Option<JobRow>, counts: JobCounts, live: Option<(JobRow, u32)>) -> Option<proto::Job> {
        let (row, streams, is_live) = match (stored, live) {
            // Cluster mode: the stored row is the owner's view; this replica
            // only knows which streams it holds.
            (Some(s), Some((_, n))) if self.hub.is_cluster() => (s, n, true),
            (Some(s), Some((l, n))) => (
                JobRow {
                    first_seen: s.first_seen.min(l.first_seen),
                    ..l
                },
                n,
                true,
            ),
            (None, Some((l, n))) => (l, n, true),
            (Some(s), None) => (s, 0, false),
            (None, None) => return None,
        };
        Some(proto::Job {
            live: is_live,
            connected_streams: streams,
            anomalies_info: counts.info,
            anomalies_warning: counts.warning,
            anomalies_critical: counts.critical,
            advice: counts.advice,
            ..wire::job_to_proto(&row)
        })
    }
}

/// The query slots: at most `max_concurrent` store reads at once, each
/// answered within `timeout` of its arrival or refused.
pub(super) struct Slots {
    free: Arc<Semaphore>,
    limits: QueryLimits,
}

impl Slots {
    pub(super) fn new(limits: QueryLimits) -> Self {
        Self {
            free: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            limits,
        }
    }

    /// Waits for a slot, then runs `f` on the blocking pool with the reader's
    /// deadline set, so SQLite stops it there. The slot is the read's until
    /// it ends, even when its caller was answered at the deadline.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        reader: &Reader,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let deadline = Instant::now() + self.limits.timeout;
        let slot = match tokio::time::timeout_at(deadline, self.free.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(Status::unavailable("the service is shutting down")),
            Err(_) => return Err(self.busy()),
        };
        let reader = reader.until(deadline.into_std());
        let read = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            f(&reader)
        });
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(StoreError::Interrupted))) | Err(_) => Err(self.slow()),
            Ok(Ok(Err(e))) => Err(Status::internal(e.to_string())),
            Ok(Err(e)) => Err(Status::internal(format!("store read panicked: {e}"))),
        }
    }

    fn busy(&self) -> Status {
        Status::resource_exhausted(format!(
            "the service is busy: all {} query slots (max_concurrent_queries) stayed taken for {} (query_timeout); try again later",
            self.limits.max_concurrent,
            duration_text(self.limits.timeout)
        ))
    }

    fn slow(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the query ran past query_timeout ({}) and was stopped; narrow it (a filter, a smaller page_size)",
            duration_text(self.limits.timeout)
        ))
    }
}

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

type AnomalyStream = ReceiverStream<Result<proto::Anomaly, Status>>;

/// Resolves once the flag is true (or its sender is gone).
async fn until_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let (after, size) = wire::jobs_page_from_proto(r.page_size, &r.page_token).map_err(Status::invalid_argument)?;
        // One more than the page tells whether there is a next page.
        let want = size as usize + 1;
        let live = self
            .hub
            .live_jobs_after(after.as_deref(), want, |job| caller.may_query(job));
        let only = caller.query_globs();
        let stored = match self.reader {
            Some(_) if caller.queries_something() => {
                // The live jobs' counts come with the stored page.
                let names: Vec<String> = live.iter().map(|(row, _)| row.job.clone()).collect();
                self.read(move |reader| reader.jobs_page(after.as_deref(), want as u32, &names, only.as_deref()))
                    .await?
            }
            _ => Vec::new(),
        };
        let mut live: BTreeMap<String, (JobRow, u32)> = live.into_iter().map(|l| (l.0.job.clone(), l)).collect();
        let mut jobs = BTreeMap::new();
        for s in stored {
            let l = live.remove(&s.job);
            if let Some(job) = self.merge(s.row, s.counts, l) {
                jobs.insert(s.job, job);
            }
        }
        for (name, l) in live {
            if let Some(job) = self.merge(None, JobCounts::default(), Some(l)) {
                jobs.insert(name, job);
            }
        }
        let mut jobs: Vec<proto::Job> = jobs.into_values().collect();
        let next_page_token = if jobs.len() > size as usize {
            jobs.truncate(size as usize);
            jobs.last().map(|j| wire::job_page_token(&j.job)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListJobsResponse { jobs, next_page_token }))
    }

    async fn get_job(&self, request: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let caller = Caller::of(&request)?;
        let name = request.into_inner().job;
        if name.is_empty() {
            return Err(Status::invalid_argument("field job: must not be empty"));
        }
        self.may_query(&caller, &name)?;
        let (row, counts) = match self.reader {
            Some(_) => {
                let n = name.clone();
                let stored = self.read(move |r| r.stored_job(&n)).await?;
                (stored.row, stored.counts)
            }
            None => (None, JobCounts::default()),
        };
        let live = self.hub.live_job(&name);
        self.merge(row, counts, live)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("field job: no job {} is known", wire::excerpt(&name))))
    }

    async fn list_anomalies(
        &self,
        request: Request<proto::ListAnomaliesRequest>,
    ) -> Result<Response<proto::ListAnomaliesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let filter =
            wire::filter_from_proto(r.filter.as_ref(), r.page_size, &r.page_token).map_err(Status::invalid_argument)?;
        let Some(filter) = self.scoped(&caller, filter)? else {
            return Ok(Response::new(proto::ListAnomaliesResponse::default()));
        };
        let page = self.read(move |reader| reader.anomalies(&filter)).await?;
        Ok(Response::new(proto::ListAnomaliesResponse {
            anomalies: page.items.iter().map(wire::stored_anomaly_to_proto).collect(),
            next_page_token: page.next.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_advice(
        &self,
        request: Request<proto::ListAdviceRequest>,
    ) -> Result<Response<proto::ListAdviceResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let filter =
            wire::filter_from_proto(r.filter.as_ref(), r.page_size, &r.page_token).map_err(Status::invalid_argument)?;
        let Some(filter) = self.scoped(&caller, filter)? else {
            return Ok(Response::new(proto::ListAdviceResponse::default()));
        };
        let page = self.read(move |reader| reader.advice(&filter)).await?;
        Ok(Response::new(proto::ListAdviceResponse {
            advice: page.items.iter().map(wire::stored_advice_to_proto).collect(),
            next_page_token: page.next.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }

    type WatchAnomaliesStream = AnomalyStream;

    async fn watch_anomalies(
        &self,
        request: Request<proto::WatchAnomaliesRequest>,
    ) -> Result<Response<AnomalyStream>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        if !r.job.is_empty() {
            self.may_query(&caller, &r.job)?;
        }
        // No store read: the feed takes no query slot.
        self.reader()?;
        let min = wire::severity_from_proto(r.min_severity, "min_severity")
            .map_err(Status::invalid_argument)?
            .map_or(0, |s| i32::from(wire::severity_to_proto(s)));
        let mut feed = self.watchers.subscribe();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // Ends with the service, or as soon as the watcher goes away
                // (even when nothing matching arrives to find out by sending).
                let next = tokio::select! {
                    next = feed.recv() => next,
                    () = tx.closed() => return,
                    () = until_true(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("the service is shutting down"))).await;
                        return;
                    }
                };
                let anomaly = match next {
                    Ok(a) => a,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "this watcher fell {n} anomalies behind; list them with ListAnomalies and watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if (!r.job.is_empty() && anomaly.job != r.job)
                    || anomaly.severity < min
                    || !caller.may_query(&anomaly.job)
                {
                    continue;
                }
                if tx.send(Ok((*anomaly).clone())).await.is_err() {
                    return; // the watcher went away
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_rules(&self, request: Request<proto::GetRulesRequest>) -> Result<Response<proto::Rules>, Status> {
        let caller = Caller::of(&request)?;
        let job = request.into_inner().job;
        if !job.is_empty() {
            self.may_query(&caller, &job)?;
        } else if !caller.queries_something() {
            return Err(self.gate.out_of_scope(&caller, "query the rules of", "(default)"));
        }
        let toml = self.hub.rules_toml(&job).map_err(Status::internal)?;
        Ok(Response::new(proto::Rules { job, toml }))
    }
}

#[cfg(test)]
mod tests;
