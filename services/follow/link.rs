//! One worker stream of `follow`: a (job, rank) of the log, sent to the
//! service as that rank would send it, through the service going away and
//! coming back.
//!
//! A link keeps the summaries it sent that the service has not yet
//! confirmed (a `Progress` follows each accepted summary when the service
//! reports progress). When the stream breaks it connects again (waiting for
//! the service as long as it takes), drops what the Welcome's `last_step`
//! says was accepted, and sends the rest again; so a step is neither lost
//! nor sent twice. Steps at or below that `last_step` are never sent: a
//! restarted `follow` reads its log from the start and skips what the
//! service already has.
//!
//! Advice is printed and acknowledged as not applied (nobody in the loop
//! can apply it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use gradguard::client::{self, ClientError, StreamReceiver, StreamSender, WorkerStream};
use gradguard::proto::{self, server_message, worker_message};
use gradguard::trace::Record;
use gradguard::wire;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use super::Shared;

/// Summaries sent and not yet confirmed, at most; reading waits beyond.
const MAX_UNCONFIRMED: usize = 1024;
/// Without progress reports nothing is confirmed: the newest this many sent
/// are kept, to send again those a reconnection finds the service lacks.
const KEEP_UNCONFIRMED: usize = 256;
/// Waiting between tries to reach the service: from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// After the log is done with: how long the service has to confirm and
/// answer what was sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

const ACK_NOTE: &str = "not applied: gradguard follow reads a log and cannot act on the run";

/// Why a link stopped for good.
#[derive(Debug)]
pub(super) struct Fatal(pub String);

pub(super) struct Link {
    shared: Arc<Shared>,
    job: String,
    rank: u32,
    layer_names: Vec<String>,
    /// Sent (or about to be), not confirmed yet; oldest first.
    unconfirmed: VecDeque<proto::Summary>,
    /// The highest step sent or known to be accepted.
    floor: Option<u64>,
    /// The highest step sent, to acknowledge advice at.
    last_sent: u64,
    input_open: bool,
}

/// How a stream ended.
enum End {
    /// Everything was sent and answered.
    Done,
    /// The stream broke: connect again.
    Lost(String),
    Fatal(String),
}

impl Link {
    pub(super) fn new(shared: Arc<Shared>, first: &Record) -> Link {
        Link {
            shared,
            job: first.job.clone(),
            rank: first.summary.worker,
            layer_names: first.layer_names.clone().unwrap_or_default(),
            unconfirmed: VecDeque::new(),
            floor: None,
            last_sent: 0,
            input_open: true,
        }
    }

    fn who(&self) -> String {
        format!("job {} rank {}", self.job, self.rank)
    }

    /// Sends the records as they come until there are no more and the
    /// service has answered them, or `stop` is raised while the service is
    /// away.
    pub(super) async fn run(
        mut self,
        mut records: mpsc::Receiver<Record>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Fatal> {
        let mut waiting_since: Option<String> = None;
        let mut delay = RETRY_FIRST;
        loop {
            let stream = tokio::select! {
                s = self.connect() => s,
                _ = stop.wait_for(|s| *s) => Err(End::Done),
            };
            let stream = match stream {
                Ok(stream) => stream,
                Err(End::Done) => return self.give_up(&mut records),
                Err(End::Fatal(message)) => return Err(Fatal(message)),
                Err(End::Lost(reason)) => {
                    if waiting_since.is_none() {
                        self.shared
                            .note(&format!("{}: waiting for the service: {reason}", self.who()));
                        waiting_since = Some(reason);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return self.give_up(&mut records),
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                    continue;
                }
            };
            if waiting_since.take().is_some() {
                self.shared.note(&format!("{}: connected", self.who()));
            }
            delay = RETRY_FIRST;
            match self.session(stream, &mut records).await {
                End::Done => return Ok(()),
                End::Fatal(message) => return Err(Fatal(message)),
                End::Lost(reason) => {
                    self.shared.note(&format!("{}: lost the service: {reason}", self.who()));
                    waiting_since = Some(reason);
                }
            }
        }
    }

    /// Stopped while the service is away: what was not sent is said.
    fn give_up(&self, records: &mut mpsc::Receiver<Record>) -> Result<(), Fatal> {
        records.close();
        let mut unsent = self.unconfirmed.len();
        while records.try_recv().is_ok() {
            unsent += 1;
        }
        if unsent > 0 {
            self.shared.note(&format!(
                "{}: stopped while the service was away: {unsent} step(s) read were not sent \
                 (or not confirmed); a later follow sends them",
                self.who(),
            ));
        }
        Ok(())
    }

    async fn connect(&self) -> Result<WorkerStream, End> {
        let mut client = client::connect_with(&self.shared.url, &self.shared.security)
            .await
            .map_err(|e| match e {
                ClientError::Connect { detail, .. } => End::Lost(detail),
                other => End::Fatal(format!("--server: {other}")),
            })?;
        let hello = proto::Hello {
            job: self.job.clone(),
            rank: self.rank,
            world_size: 0,
            layer_names: self.layer_names.clone(),
            client_version: format!("gradguard-follow/{}", env!("CARGO_PKG_VERSION")),
            rule_profile: self.shared.profile.clone().unwrap_or_default(),
            report_progress: true,
            layout: None,
        };
        WorkerStream::open(&mut client, hello).await.map_err(|e| match e {
            ClientError::Status(status) => ended_by(&status),
            ClientError::NoWelcome | ClientError::Closed => End::Lost(e.to_string()),
            other => End::Fatal(other.to_string()),
        })
    }

    /// One stream: sends again what the service lacks, then records as they
    /// come, until the log is done and answered or the stream ends.
    async fn session(&mut self, stream: WorkerStream, records: &mut mpsc::Receiver<Record>) -> End {
        let WorkerStream {
            welcome,
            sender,
            mut receiver,
        } = stream;
        if let Some(last) = welcome.last_step {
            self.unconfirmed.retain(|s| s.step > last);
            self.floor = self.floor.max(Some(last));
        }
        let confirms = welcome.reports_progress;
        for summary in &self.unconfirmed {
            if sender.summary(summary.clone()).await.is_err() {
                return End::Lost("the stream closed".into());
            }
        }
        loop {
            if !confirms {
                let excess = self.unconfirmed.len().saturating_sub(KEEP_UNCONFIRMED);
                self.unconfirmed.drain(..excess);
            }
            if !self.input_open && (!confirms || self.unconfirmed.is_empty()) {
                return self.finish(sender, receiver).await;
            }
            let room = !confirms || self.unconfirmed.len() < MAX_UNCONFIRMED;
            tokio::select! {
                record = records.recv(), if self.input_open && room => match record {
                    None => self.input_open = false,
                    Some(record) => {
                        if let Some(summary) = self.admit(record) {
                            self.unconfirmed.push_back(summary.clone());
                            if sender.summary(summary).await.is_err() {
                                return End::Lost("the stream closed".into());
                            }
                        }
                    }
                },
                message = receiver.message() => match message {
                    Ok(Some(message)) => self.on_message(message, &sender).await,
                    Ok(None) => return End::Lost("the service ended the stream".into()),
                    Err(status) => return ended_by(&status),
                },
            }
        }
    }

    /// The summary to send for a record, or `None` for a step the service
    /// has (or one not after the last sent).
    fn admit(&mut self, record: Record) -> Option<proto::Summary> {
        let step = record.summary.step;
        if self.floor.is_some_and(|f| step <= f) {
            self.shared.count(|c| c.already += 1);
            return None;
        }
        self.floor = Some(step);
        self.last_sent = step;
        let mut summary = wire::summary_to_proto(&record.summary);
        if record.layer_names.unwrap_or_default() != self.layer_names {
            // The stream's layers were named by its first record.
            summary.layer_l2.clear();
            summary.layer_max_abs.clear();
            summary.layer_nonfinite.clear();
            summary.layer_param_norm.clear();
            summary.layer_update_norm.clear();
        }
        if summary.time == 0.0 {
            summary.time = super::unix_now();
        }
        self.shared.count(|c| c.sent += 1);
        Some(summary)
    }

    async fn on_message(&mut self, message: proto::ServerMessage, sender: &StreamSender) {
        match message.body {
            Some(server_message::Body::Progress(p)) => {
                while self.unconfirmed.front().is_some_and(|s| s.step <= p.step) {
                    self.unconfirmed.pop_front();
                }
            }
            Some(server_message::Body::Advice(advice)) => {
                self.shared.advice(&advice);
                let ack = proto::AdviceAck {
                    advice_id: advice.id,
                    applied_step: self.last_sent,
                    applied: false,
                    note: ACK_NOTE.to_owned(),
                };
                // A stream that broke is found by the next receive.
                let _ = sender.send(worker_message::Body::Ack(ack)).await;
            }
            _ => {}
        }
    }

    /// Ends our half; the service answers what it has, then ends its own.
    async fn finish(&mut self, sender: StreamSender, mut receiver: StreamReceiver) -> End {
        drop(sender);
        let drained = tokio::time::timeout(FLUSH_TIMEOUT, async {
            loop {
                match receiver.message().await {
                    Ok(Some(m)) => {
                        if let Some(server_message::Body::Advice(a)) = m.body {
                            self.shared.advice(&a);
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status),
                }
            }
        })
        .await;
        match drained {
            Ok(Ok(())) => End::Done,
            Ok(Err(status)) => ended_by(&status),
            Err(_) => {
                self.shared.note(&format!(
                    "{}: the service did not answer within {FLUSH_TIMEOUT:?} of the last step",
                    self.who()
                ));
                End::Done
            }
        }
    }
}

/// What a status that ended (or refused) a stream means for the link: the
/// service away or busy is waited for; a refusal is final.
fn ended_by(status: &Status) -> End {
    let text = client::status_message(status);
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Internal => End::Lost(text),
        _ => End::Fatal(text),
    }
}
