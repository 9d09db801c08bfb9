//! `gradguard.v1.Ingest`: the gRPC adapter on the intake, one task per
//! worker stream.
//!
//! The task reads the worker's messages in order and hands each to the
//! intake's [`Decoder`] and then the hub right away, so advice is on its way
//! before the next message is read. A refused message ends that stream with
//! its status (the code of its `Reason`, `InvalidArgument` for bad input,
//! naming the field and value); other streams
//! never notice. However the stream ends, dropping the session detaches it
//! from its job.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::access::{Caller, Failure, Gate};
use super::hub::{Attachment, Hub, Outbox};
use crate::intake::{Decoder, IntakeMetrics, Parts, Reason, Refusal, no_hello};
use crate::model::Summary;
use crate::proto::frames::{Frame, ingest_server::Ingest};
use crate::proto::{self};

pub struct IngestService {
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    metrics: IntakeMetrics,
    /// Server messages queued per stream before advice is dropped.
    queue: usize,
    max_message_bytes: usize,
    /// Raised when the service stops: every stream then ends (UNAVAILABLE).
    stopping: watch::Receiver<bool>,
}

impl IngestService {
    pub fn new(
        hub: Arc<Hub>,
        metrics: IntakeMetrics,
        queue: usize,
        max_message_bytes: usize,
        gate: Arc<Gate>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            hub,
            gate,
            metrics,
            queue,
            max_message_bytes,
            stopping,
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<proto::ServerMessage, Status>>;

    async fn stream(&self, request: Request<Streaming<Frame>>) -> Result<Response<Self::StreamStream>, Status> {
        let caller = Caller::of(&request)?;
        let (outbox, rx) = mpsc::channel(self.queue);
        let session = Session {
            stream: Stream {
                id: self.hub.next_stream_id(),
                hub: self.hub.clone(),
                gate: self.gate.clone(),
                caller,
                outbox,
                attachment: None,
                scratch: Summary::default(),
                received: Instant::now(),
                started: false,
            },
            decoder: Decoder::default(),
            metrics: self.metrics.clone(),
            max_message_bytes: self.max_message_bytes,
            stopping: self.stopping.clone(),
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One worker stream.
struct Session {
    stream: Stream,
    decoder: Decoder,
    metrics: IntakeMetrics,
    max_message_bytes: usize,
    stopping: watch::Receiver<bool>,
}

/// The status a stream ends with when the service stops.
pub const SHUTTING_DOWN: &str = "gradguard is shutting down: reconnect (what was accepted is kept)";

/// What a stream's messages are handed to, part by part.
struct Stream {
    id: u64,
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    /// Who opened it: what it may ingest, and whose streams it may replace.
    caller: Caller,
    outbox: Outbox,
    attachment: Option<Attachment>,
    /// Every summary of the stream is converted into this one: it keeps its
    /// capacity from step to step.
    scratch: Summary,
    /// When the message being handled arrived.
    received: Instant,
    /// A summary was accepted: the stream is past its Hello timeout.
    started: bool,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<Frame>) {
        let limits = self.stream.hub.limits().clone();
        let opened = tokio::time::Instant::now();
        let mut hello_at = None;
        let mut stopping = self.stopping.clone();
        loop {
            let next = if self.stream.started {
                let next = tokio::select! {
                    next = inbound.message() => Some(next),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                match next {
                    Some(next) => next,
                    None => {
                        self.shut_down().await;
                        break;
                    }
                }
            } else {
                // Until its first summary, a stream has a deadline: an opened
                // stream (or a Hello alone) holds nothing for long.
                if self.stream.attachment.is_some() && hello_at.is_none() {
                    hello_at = Some(tokio::time::Instant::now());
                }
                let within = |d| humantime::format_duration(d).to_string();
                let (deadline, missing) = match hello_at {
                    None => (
                        opened + limits.hello_timeout,
                        format!(
                            "no Hello within {} of the stream's start (--hello-timeout)",
                            within(limits.hello_timeout)
                        ),
                    ),
                    Some(at) => (
                        at + limits.first_summary_timeout,
                        format!(
                            "no first summary within {} of its Hello (--first-summary-timeout)",
                            within(limits.first_summary_timeout)
                        ),
                    ),
                };
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, inbound.message()) => Some(next),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                match next {
                    Some(Ok(next)) => next,
                    Some(Err(_)) => {
                        self.refuse(Refusal::new(Reason::HelloTimeout, missing)).await;
                        break;
                    }
                    None => {
                        self.shut_down().await;
                        break;
                    }
                }
            };
            let frame = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // The worker closed its half. Its stream ends once all it
                    // sent is durable, so "stream ended" means "stored".
                    if let Some(at) = &self.stream.attachment {
                        self.stream.hub.flush(&at.declared.job).await;
                    }
                    break;
                }
                Err(status) => {
                    if status.code() == Code::OutOfRange {
                        // tonic's decoder refused a frame over the size limit.
                        let limit = self.max_message_bytes;
                        self.refuse(Refusal::new(
                            Reason::MessageTooLarge,
                            format!(
                                "message over the size limit of {limit} bytes (--max-message-bytes): {}",
                                status.message()
                            ),
                        ))
                        .await;
                    }
                    break; // otherwise the transport failed: the worker is gone
                }
            };
            self.stream.received = Instant::now();
            if let Err(refusal) = self.decoder.decode(&frame, &mut self.stream) {
                self.refuse(refusal).await;
                break;
            }
        }
    }

    /// The service stops: what the stream sent is made durable (its advice
    /// goes out), then the stream ends with UNAVAILABLE, so the worker
    /// reconnects (to this service once it is back, or another replica).
    async fn shut_down(&self) {
        if let Some(at) = &self.stream.attachment {
            self.stream.hub.flush(&at.declared.job).await;
        }
        let _ = self.stream.outbox.send(Err(Status::unavailable(SHUTTING_DOWN))).await;
    }

    /// Ends the stream with the refusal's status.
    async fn refuse(&self, refusal: Refusal) {
        self.metrics.refused(&refusal);
        tracing::debug!(stream = self.stream.id, reason = refusal.reason.label(), status = %refusal, "refused");
        let _ = self.stream.outbox.send(Err(refusal.status())).await;
    }
}

impl Stream {
    /// Counts a refused takeover with the access gate's refusals.
    fn held(&self, refusal: &Refusal) {
        if refusal.reason == Reason::RankHeld {
            self.gate
                .count(self.caller.label(), Failure::Takeover, &refusal.message);
        }
    }
}

impl Parts for Stream {
    fn hello(&mut self, hello: proto::Hello) -> Result<(), Refusal> {
        if let Some(at) = &self.attachment {
            return Err(Refusal::new(
                Reason::HelloTwice,
                format!(
                    "field hello: this stream already said hello as job {:?} rank {}",
                    &*at.declared.job, at.declared.rank
                ),
            ));
        }
        // Before anything about the job is looked up or told.
        if !self.caller.may_ingest(&hello.job) {
            let status = self.gate.out_of_scope(&self.caller, "ingest", &hello.job);
            return Err(Refusal::new(Reason::NotPermitted, status.message()));
        }
        self.attachment = Some(
            self.hub
                .hello(self.id, self.caller.identity(), &self.outbox, hello)
                .inspect_err(|r| self.held(r))?,
        );
        Ok(())
    }

    fn batch(&mut self, len: usize) -> Result<(), Refusal> {
        if self.attachment.is_none() {
            return Err(Refusal::new(
                Reason::NoHello,
                format!("field batch: {len} summaries arrived before the Hello; open the stream with a Hello"),
            ));
        }
        self.hub.limits().check_batch(len)
    }

    fn summary(&mut self, summary: &proto::Summary) -> Result<(), Refusal> {
        let Some(at) = &self.attachment else {
            return Err(Refusal::new(
                Reason::NoHello,
                format!(
                    "field summary: step {} arrived before the Hello; open the stream with a Hello (job, rank, world_size, layer_names)",
                    summary.step
                ),
            ));
        };
        self.hub
            .summary(at, &self.outbox, summary, &mut self.scratch, self.received)
            .inspect_err(|r| self.held(r))?;
        self.started = true;
        Ok(())
    }

    fn ack(&mut self, ack: proto::AdviceAck) -> Result<(), Refusal> {
        let Some(at) = &self.attachment else {
            return Err(no_hello("ack"));
        };
        self.hub.ack(at, &ack);
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(at) = &self.stream.attachment {
            self.stream.hub.detach(at);
        }
    }
}
