//! The worker side of `Ingest.Stream`, shared by the simulator, the load
//! generator and the tests: open a stream with a Hello, wait for the Welcome,
//! then send summaries and acks on one half and read advice on the other.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::proto::{self, ingest_client::IngestClient, server_message, worker_message};

/// Messages a worker may queue before sending waits for the server.
const SEND_QUEUE: usize = 64;

/// Why a worker stream could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("server refused the stream: {0}")]
    Status(#[from] Status),
    #[error("server ended the stream before its Welcome")]
    NoWelcome,
    #[error("stream is closed")]
    Closed,
}

/// Connects to a gradguard server (`http://host:port`; `host:port` is taken as http).
pub async fn connect(url: &str) -> Result<IngestClient<Channel>, ClientError> {
    Ok(IngestClient::new(channel(url).await?).max_decoding_message_size(64 << 20))
}

/// A connection to a gradguard server, for any of its services (`Ingest`,
/// `Query`); `host:port` is taken as http.
pub async fn channel(url: &str) -> Result<Channel, ClientError> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let endpoint = Endpoint::from_shared(full).map_err(|source| ClientError::Url {
        url: url.to_owned(),
        source,
    })?;
    endpoint
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// An open worker stream, after the server's Welcome.
#[derive(Debug)]
pub struct WorkerStream {
    pub welcome: proto::Welcome,
    pub sender: StreamSender,
    pub receiver: StreamReceiver,
}

impl WorkerStream {
    /// Opens a stream and introduces the worker; returns once the server has
    /// answered with its Welcome (or refused the Hello).
    pub async fn open(client: &mut IngestClient<Channel>, hello: proto::Hello) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let sender = StreamSender { tx };
        sender.send(worker_message::Body::Hello(hello)).await?;
        let mut receiver = StreamReceiver {
            inner: client.stream(ReceiverStream::new(rx)).await?.into_inner(),
        };
        match receiver.inner.message().await? {
            Some(proto::ServerMessage {
                body: Some(server_message::Body::Welcome(welcome)),
            }) => Ok(Self {
                welcome,
                sender,
                receiver,
            }),
            _ => Err(ClientError::NoWelcome),
        }
    }
}

/// The sending half: summaries and acks. Dropping every clone ends the stream,
/// and the server then ends its half once it has answered everything sent.
#[derive(Debug, Clone)]
pub struct StreamSender {
    tx: mpsc::Sender<proto::WorkerMessage>,
}

impl StreamSender {
    pub async fn send(&self, body: worker_message::Body) -> Result<(), ClientError> {
        self.tx
            .send(proto::WorkerMessage { body: Some(body) })
            .await
            .map_err(|_| ClientError::Closed)
    }

    pub async fn summary(&self, summary: proto::Summary) -> Result<(), ClientError> {
        self.send(worker_message::Body::Summary(summary)).await
    }

    pub async fn ack(&self, advice: &proto::Advice, applied_step: u64, applied: bool) -> Result<(), ClientError> {
        self.send(worker_message::Body::Ack(proto::AdviceAck {
            advice_id: advice.id,
            applied_step,
            applied,
            note: String::new(),
        }))
        .await
    }
}

/// The receiving half: advice, until the server ends the stream.
#[derive(Debug)]
pub struct StreamReceiver {
    inner: Streaming<proto::ServerMessage>,
}

impl StreamReceiver {
    /// The next server message of any kind (advice, progress); `Ok(None)`
    /// when the server ended the stream cleanly.
    pub async fn message(&mut self) -> Result<Option<proto::ServerMessage>, Status> {
        self.inner.message().await
    }

    /// The next advice; `Ok(None)` when the server ended the stream cleanly,
    /// `Err` with the status that ended it otherwise.
    pub async fn advice(&mut self) -> Result<Option<proto::Advice>, Status> {
        loop {
            match self.inner.message().await? {
                None => return Ok(None),
                Some(proto::ServerMessage {
                    body: Some(server_message::Body::Advice(a)),
                }) => return Ok(Some(a)),
                Some(_) => continue,
            }
        }
    }

    /// Every remaining advice until the server ends the stream.
    pub async fn drain(&mut self) -> Result<Vec<proto::Advice>, Status> {
        let mut all = Vec::new();
        while let Some(a) = self.advice().await? {
            all.push(a);
        }
        Ok(all)
    }
}
