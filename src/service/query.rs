//! `gradguard.v1.Query`: jobs, anomalies and advice from the store, merged
//! with what the running engine knows now; a live feed of new anomalies.
//!
//! Store reads block, so they run on tokio's blocking pool; the store's
//! reader keeps a few connections, and SQLite's WAL lets them read while the
//! writer commits.

use std::collections::HashMap;
use std::sync::Arc;

use crate::proto::{self, query_server::Query};
use crate::store::{JobRow, Reader, StoreError};
use crate::wire;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::hub::Hub;
use crate::recorder::Watchers;

pub struct QueryService {
    hub: Arc<Hub>,
    reader: Option<Arc<Reader>>,
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
    ) -> Self {
        Self {
            hub,
            reader,
            watchers,
            stopping,
        }
    }

    fn reader(&self) -> Result<Arc<Reader>, Status> {
        self.reader
            .clone()
            .ok_or_else(|| Status::failed_precondition("the service runs without a store (--no-store)"))
    }

    /// Runs a store read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let reader = self.reader()?;
        tokio::task::spawn_blocking(move || f(&reader))
            .await
            .map_err(|e| Status::internal(format!("store read panicked: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// A job's wire form: the stored row, overlaid with the live view, plus counts.
    async fn job(&self, stored: Option<JobRow>, live: Option<(JobRow, u32)>) -> Result<proto::Job, Status> {
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
            (None, None) => return Err(Status::not_found("no such job")),
        };
        let name = row.job.clone();
        let (counts, advice) = match self.reader {
            Some(_) => self.read(move |r| r.job_counts(&name)).await?,
            None => ([0; 3], 0),
        };
        Ok(proto::Job {
            live: is_live,
            connected_streams: streams,
            anomalies_info: counts[0],
            anomalies_warning: counts[1],
            anomalies_critical: counts[2],
            advice,
            ..wire::job_to_proto(&row)
        })
    }
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
    async fn list_jobs(&self, _: Request<proto::ListJobsRequest>) -> Result<Response<proto::ListJobsResponse>, Status> {
        let stored = match self.reader {
            Some(_) => self.read(|r| r.jobs()).await?,
            None => Vec::new(),
        };
        let mut live: HashMap<String, (JobRow, u32)> = self
            .hub
            .live_jobs()
            .into_iter()
            .map(|(row, n)| (row.job.clone(), (row, n)))
            .collect();
        let mut jobs = Vec::with_capacity(stored.len() + live.len());
        for row in stored {
            let l = live.remove(&row.job);
            jobs.push(self.job(Some(row), l).await?);
        }
        for l in live.into_values() {
            jobs.push(self.job(None, Some(l)).await?);
        }
        // Most recently active first, as the store lists them.
        jobs.sort_by(|a, b| b.last_seen.total_cmp(&a.last_seen).then_with(|| a.job.cmp(&b.job)));
        Ok(Response::new(proto::ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let name = request.into_inner().job;
        if name.is_empty() {
            return Err(Status::invalid_argument("field job: must not be empty"));
        }
        let stored = match self.reader {
            Some(_) => {
                let n = name.clone();
                self.read(move |r| r.job(&n)).await?
            }
            None => None,
        };
        let live = self.hub.live_job(&name);
        self.job(stored, live)
            .await
            .map(Response::new)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => Status::not_found(format!("field job: no job {name:?} is known")),
                _ => s,
            })
    }

    async fn list_anomalies(
        &self,
        request: Request<proto::ListAnomaliesRequest>,
    ) -> Result<Response<proto::ListAnomaliesResponse>, Status> {
        let r = request.into_inner();
        let filter =
            wire::filter_from_proto(r.filter.as_ref(), r.page_size, &r.page_token).map_err(Status::invalid_argument)?;
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
        let r = request.into_inner();
        let filter =
            wire::filter_from_proto(r.filter.as_ref(), r.page_size, &r.page_token).map_err(Status::invalid_argument)?;
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
        let r = request.into_inner();
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
                if (!r.job.is_empty() && anomaly.job != r.job) || anomaly.severity < min {
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
        let job = request.into_inner().job;
        let toml = self.hub.rules_toml(&job).map_err(Status::internal)?;
        Ok(Response::new(proto::Rules { job, toml }))
    }
}
