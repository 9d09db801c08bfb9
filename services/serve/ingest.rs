//! `gradguard.v1.Ingest`: one task per worker stream.
//!
//! The task reads the worker's messages in order and hands each to the hub
//! right away, so advice is on its way before the next message is read. It
//! decodes them itself (tonic hands them over encoded, `proto::frames`): a
//! summary, what a worker sends every step, is decoded into the vectors of the
//! stream's previous one, so the common message allocates nothing, and so is
//! each summary of a batch. A
//! refused message ends that stream with its status (`InvalidArgument` naming
//! the field and value); other streams never notice. However the stream ends,
//! dropping the session detaches it from its job.

use std::sync::Arc;
use std::time::Instant;

use gradguard::model::Summary;
use gradguard::proto::frames::{Frame, ingest_server::Ingest};
use gradguard::proto::{self, worker_message};
use gradguard::wire;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::hub::{Attachment, Hub, Outbox, Rejection};

pub struct IngestService {
    hub: Arc<Hub>,
    /// Server messages queued per stream before advice is dropped.
    queue: usize,
    max_message_bytes: usize,
}

impl IngestService {
    pub fn new(hub: Arc<Hub>, queue: usize, max_message_bytes: usize) -> Self {
        Self {
            hub,
            queue,
            max_message_bytes,
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<proto::ServerMessage, Status>>;

    async fn stream(&self, request: Request<Streaming<Frame>>) -> Result<Response<Self::StreamStream>, Status> {
        let (outbox, rx) = mpsc::channel(self.queue);
        let session = Session {
            id: self.hub.next_stream_id(),
            hub: self.hub.clone(),
            outbox,
            attachment: None,
            max_message_bytes: self.max_message_bytes,
            wire: proto::Summary::default(),
            scratch: Summary::default(),
            places: Vec::new(),
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One worker stream.
struct Session {
    id: u64,
    hub: Arc<Hub>,
    outbox: Outbox,
    attachment: Option<Attachment>,
    max_message_bytes: usize,
    /// Every summary of the stream is decoded into this one, then converted
    /// into `scratch`: both keep their capacity from step to step.
    wire: proto::Summary,
    scratch: Summary,
    /// Where each summary of a batch lies in its message.
    places: Vec<std::ops::Range<usize>>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<Frame>) {
        loop {
            let frame = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // The worker closed its half. Its stream ends once all it
                    // sent is durable, so "stream ended" means "stored".
                    if let Some(at) = &self.attachment {
                        self.hub.flush(&at.job).await;
                    }
                    break;
                }
                Err(status) => {
                    if status.code() == Code::OutOfRange {
                        // tonic's decoder refused a frame over the size limit.
                        let limit = self.max_message_bytes;
                        self.refuse(Rejection::invalid(
                            "message_too_large",
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
            if let Err(rejection) = self.handle(&frame, Instant::now()) {
                self.refuse(rejection).await;
                break;
            }
        }
    }

    fn handle(&mut self, frame: &[u8], received: Instant) -> Result<(), Rejection> {
        use worker_message::Body;
        let undecodable = |e: prost::DecodeError| {
            Rejection::invalid(
                "undecodable",
                format!(
                    "the message ({} bytes) is not a gradguard.v1.WorkerMessage: {e}",
                    frame.len()
                ),
            )
        };
        if let (Some(summary), Some(at)) = (wire::lone_summary(frame), &self.attachment) {
            self.wire.clear();
            self.wire.merge(summary).map_err(undecodable)?;
            return self
                .hub
                .summary(at, &self.outbox, &self.wire, &mut self.scratch, received);
        }
        if let Some(at) = &self.attachment
            && wire::batch_summaries(frame, &mut self.places)
        {
            // In order, each as if it had come alone: a refused one ends the
            // stream, and those before it stay accepted.
            for (i, place) in self.places.iter().enumerate() {
                self.wire.clear();
                self.wire
                    .merge(&frame[place.clone()])
                    .map_err(|e| undecodable(e).in_batch(i, None))?;
                self.hub
                    .summary(at, &self.outbox, &self.wire, &mut self.scratch, received)
                    .map_err(|r| r.in_batch(i, Some(self.wire.step)))?;
            }
            return Ok(());
        }
        let message = proto::WorkerMessage::decode(frame).map_err(undecodable)?;
        match (message.body, &self.attachment) {
            (Some(Body::Hello(hello)), None) => {
                self.attachment = Some(self.hub.hello(self.id, &self.outbox, hello)?);
                Ok(())
            }
            (Some(Body::Hello(_)), Some(at)) => Err(Rejection::invalid(
                "hello_twice",
                format!(
                    "field hello: this stream already said hello as job {:?} rank {}",
                    &*at.job, at.rank
                ),
            )),
            (Some(Body::Summary(s)), Some(at)) => self.hub.summary(at, &self.outbox, &s, &mut self.scratch, received),
            (Some(Body::Batch(batch)), Some(at)) => {
                // Taken apart above unless it holds more than summaries (an
                // unknown field, say): the same, from the full decode.
                for (i, s) in batch.summaries.iter().enumerate() {
                    self.hub
                        .summary(at, &self.outbox, s, &mut self.scratch, received)
                        .map_err(|r| r.in_batch(i, Some(s.step)))?;
                }
                Ok(())
            }
            (Some(Body::Ack(ack)), Some(at)) => {
                self.hub.ack(at, &ack);
                Ok(())
            }
            (Some(Body::Summary(s)), None) => Err(Rejection::invalid(
                "no_hello",
                format!(
                    "field summary: step {} arrived before the Hello; open the stream with a Hello (job, rank, world_size, layer_names)",
                    s.step
                ),
            )),
            (Some(Body::Batch(b)), None) => Err(Rejection::invalid(
                "no_hello",
                format!(
                    "field batch: {} summaries arrived before the Hello; open the stream with a Hello",
                    b.summaries.len()
                ),
            )),
            (Some(Body::Ack(_)), None) => Err(Rejection::invalid(
                "no_hello",
                "field ack: arrived before the Hello; open the stream with a Hello",
            )),
            (None, _) => Err(Rejection::invalid(
                "empty_message",
                "field body: the message carries no hello, summary, batch or ack",
            )),
        }
    }

    /// Ends the stream with the rejection's status.
    async fn refuse(&self, rejection: Rejection) {
        self.hub.metrics.rejected(rejection.reason);
        tracing::debug!(stream = self.id, reason = rejection.reason, status = %rejection.status.message(), "refused");
        let _ = self.outbox.send(Err(rejection.status)).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(at) = &self.attachment {
            self.hub.detach(at);
        }
    }
}
