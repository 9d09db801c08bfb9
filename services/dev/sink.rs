//! `gradguard sink` (hidden): a decode-only `gradguard.v1.Ingest` server. It
//! answers each Hello with a Welcome, then decodes and drops every message, so
//! `gradguard loadgen --baseline` can measure what the transport and protobuf
//! decoding alone cost on this machine, the ceiling the real server is compared to.
//!
//! It uses the same transport settings as `gradguard serve` (TCP_NODELAY, its
//! HTTP/2 flow-control windows and keepalive, the 4 MiB decoding limit; see
//! `src/service/mod.rs`, and keep the two in step), binds first, and announces
//! `listening grpc=IP:PORT` as its only stdout line once it accepts
//! connections, so a parent can wait for it without sleeping.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use gradguard::proto::ingest_server::{Ingest, IngestServer};
use gradguard::proto::{ServerMessage, Welcome, WorkerMessage, server_message, worker_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::cli::Failure;

/// Largest encoded message accepted, as in `gradguard serve`.
const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub grpc_addr: SocketAddr,
}

pub fn run(args: &SinkArgs) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve(args.grpc_addr))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(addr: SocketAddr) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::usage(anyhow!("--grpc-addr {addr}: cannot listen: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::input(anyhow!("cannot read the listening address: {e}")))?;
    // The readiness line: the socket already accepts connections, so a parent
    // that has read it may connect at once.
    let mut out = io::stdout().lock();
    writeln!(out, "listening grpc={local}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::input(anyhow!("cannot write to stdout: {e}")))?;
    drop(out);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(128 << 10)
        .initial_connection_window_size(1 << 20)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(IngestServer::new(Sink).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
        .map_err(|e| Failure::input(anyhow!("the server failed: {e}")))
}

/// The service: no state at all, so nothing but decoding is measured.
#[derive(Debug)]
struct Sink;

#[tonic::async_trait]
impl Ingest for Sink {
    type StreamStream = ReceiverStream<Result<ServerMessage, Status>>;

    /// One task per stream, as a real server would have: it reads the Hello,
    /// answers with a Welcome, then drops every decoded message; when the worker
    /// ends its half, the task ends and so does the response stream, with OK.
    async fn stream(&self, request: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        // The Welcome, or the status that refuses the stream; nothing follows.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let first = match inbound.message().await {
                Ok(Some(WorkerMessage {
                    body: Some(worker_message::Body::Hello(_)),
                })) => Ok(ServerMessage {
                    body: Some(server_message::Body::Welcome(Welcome {
                        server_version: env!("CARGO_PKG_VERSION").to_owned(),
                        last_step: None,
                        reports_progress: false,
                        urgency: None,
                    })),
                }),
                Ok(None) => return,
                Ok(Some(_)) => Err(Status::invalid_argument("the first message must be a Hello")),
                Err(status) => Err(status),
            };
            let refused = first.is_err();
            if tx.send(first).await.is_err() || refused {
                return;
            }
            // Decoded by tonic, dropped here. A transport error ends the stream too:
            // the worker is gone and there is no one to answer.
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
