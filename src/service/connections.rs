//! The gRPC listener's connections: what one client can hold at the
//! transport level, before any message reaches the intake.
//!
//! - **A cap on open connections** (`--max-connections`), never above what the
//!   open-file limit allows: the service raises its soft limit to the hard
//!   one at start and keeps [`RESERVED_FILES`] descriptors for everything
//!   else (the store, the metrics listener and its scrapes, Kafka). A
//!   connection over the cap is closed as soon as it is accepted, so the
//!   accept loop never spins on a full table, and `/healthz` and a probe on
//!   an open connection keep answering.
//! - **A first-request deadline** (`--first-request-timeout`): a connection
//!   that has not started a request by then (a raw socket that never speaks,
//!   a client stuck before its first call) is closed.
//! - **Accept errors back off**: `EMFILE` and friends are logged (once per
//!   back-off period) and retried after 10 ms, doubling to 1 s, instead of
//!   being retried at once forever.
//!
//! - **TLS** when the service has a certificate ([`ServerTls`]): each
//!   connection's handshake runs in its own task, within the first-request
//!   deadline, so a slow or silent client never holds up the accept loop;
//!   a client certificate's names go with the connection ([`PeerInfo`]) to
//!   the access gate.
//!
//! HTTP/2 keep-alive (dead peers) and the streams per connection are the
//! tonic server's settings, set beside this in `Service::start`.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::auth::tls::{ServerTls, peer_names};

/// File descriptors kept for what is not a gRPC connection.
pub const RESERVED_FILES: u64 = 256;

/// The connection limits of the gRPC listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// Open connections at once (lowered to what the open-file limit allows).
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_streams_per_connection: u32,
    /// A connection must start its first request within this.
    pub first_request_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 16384,
            max_streams_per_connection: 256,
            first_request_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// Raises the soft open-file limit as far as the hard limit allows and
    /// returns the connection cap that fits under it.
    pub fn effective_max_connections(&self) -> usize {
        let files = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read or raise the open-file limit; --max-connections stands");
                return self.max_connections;
            }
        };
        let fits = files.saturating_sub(RESERVED_FILES).max(1);
        if (self.max_connections as u64) > fits {
            tracing::warn!(
                max_connections = self.max_connections,
                open_file_limit = files,
                cap = fits,
                "--max-connections is above what the open-file limit allows (less {RESERVED_FILES} kept for the rest): capped"
            );
        }
        self.max_connections.min(fits as usize)
    }
}

/// The listener's books.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    limit: IntGauge,
    closed: IntCounterVec,
    accept_errors: IntCounter,
}

impl ConnectionMetrics {
    pub fn register(registry: &Registry) -> Self {
        let open = IntGauge::new("gradguard_grpc_connections", "Open gRPC connections").expect("valid metric");
        let limit = IntGauge::new(
            "gradguard_grpc_connections_limit",
            "Most gRPC connections open at once (--max-connections, within the open-file limit)",
        )
        .expect("valid metric");
        let closed = IntCounterVec::new(
            Opts::new(
                "gradguard_grpc_connections_closed_total",
                "gRPC connections the service closed: over the cap when accepted (at_capacity), silent past --first-request-timeout (silent), or a failed TLS handshake (tls_handshake)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let accept_errors = IntCounter::new(
            "gradguard_grpc_accept_errors_total",
            "Failed accepts of the gRPC listener (e.g. the open-file limit reached)",
        )
        .expect("valid metric");
        for reason in ["at_capacity", "silent", "tls_handshake"] {
            closed.with_label_values(&[reason]);
        }
        registry.register(Box::new(open.clone())).expect("register");
        registry.register(Box::new(limit.clone())).expect("register");
        registry.register(Box::new(closed.clone())).expect("register");
        registry.register(Box::new(accept_errors.clone())).expect("register");
        Self {
            open,
            limit,
            closed,
            accept_errors,
        }
    }
}

/// Remote addresses of the open connections that have not started a request.
#[derive(Default)]
pub struct Waiting(Mutex<HashSet<SocketAddr>>);

impl Waiting {
    /// A request started on the connection from `addr` (called for every
    /// request, by the server's interceptor).
    pub fn started(&self, addr: Option<SocketAddr>) {
        if let Some(addr) = addr {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
        }
    }

    fn is_waiting(&self, addr: SocketAddr) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(&addr)
    }

    fn insert(&self, addr: SocketAddr) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(addr);
    }
}

/// Accepts connections on `listener` within the limits, until `stop`
/// resolves, over TLS when `tls` is set; the stream is what the tonic
/// server serves.
pub fn accept(
    listener: TcpListener,
    limits: &ConnectionLimits,
    metrics: ConnectionMetrics,
    waiting: Arc<Waiting>,
    tls: Option<Arc<ServerTls>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> ReceiverStream<io::Result<Connection>> {
    let cap = limits.effective_max_connections();
    metrics.limit.set(cap as i64);
    let slots = Arc::new(Semaphore::new(cap));
    let timeout = limits.first_request_timeout;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut backoff = Backoff::default();
        let mut over_cap_logged: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    metrics.accept_errors.inc();
                    backoff.wait(&e).await;
                    continue;
                }
            };
            backoff.reset();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.closed.with_label_values(&["at_capacity"]).inc();
                if over_cap_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    over_cap_logged = Some(Instant::now());
                    tracing::warn!(
                        max_connections = cap,
                        "gRPC connections at the cap (--max-connections): closing new ones"
                    );
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            waiting.insert(remote);
            metrics.open.inc();
            let conn = Connection {
                info: PeerInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: remote,
                    client_names: Arc::default(),
                },
                io: Io::Plain(tcp),
                deadline: Some(Box::pin(tokio::time::sleep(timeout))),
                waiting: waiting.clone(),
                metrics: metrics.clone(),
                _slot: slot,
                timed_out: false,
            };
            match &tls {
                None => {
                    if tx.send(Ok(conn)).await.is_err() {
                        break;
                    }
                }
                Some(tls) => {
                    tokio::spawn(handshake(conn, TlsAcceptor::from(tls.grpc()), tx.clone()));
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Runs a connection's TLS handshake, within its first-request deadline,
/// and hands it to the server when it succeeds.
async fn handshake(mut conn: Connection, acceptor: TlsAcceptor, tx: mpsc::Sender<io::Result<Connection>>) {
    let Io::Plain(tcp) = std::mem::replace(&mut conn.io, Io::Closed) else {
        return;
    };
    let deadline = conn.deadline.as_mut().map(|d| d.deadline());
    let accepted = match deadline {
        Some(at) => tokio::time::timeout_at(at, acceptor.accept(tcp)).await,
        None => Ok(acceptor.accept(tcp).await),
    };
    match accepted {
        Ok(Ok(tls)) => {
            let names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(peer_names)
                .unwrap_or_default();
            conn.info.client_names = names.into();
            conn.io = Io::Tls(Box::new(tls));
            let _ = tx.send(Ok(conn)).await;
        }
        Ok(Err(e)) => {
            conn.metrics.closed.with_label_values(&["tls_handshake"]).inc();
            tracing::debug!(remote = %conn.info.remote_addr, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            conn.timed_out = true;
            conn.metrics.closed.with_label_values(&["silent"]).inc();
            tracing::debug!(remote = %conn.info.remote_addr, "closing a connection whose TLS handshake did not end within --first-request-timeout");
        }
    }
}

/// Accept errors about one connection (it went away before it was
/// accepted), as opposed to the listener's (out of file descriptors).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// The accept loop's wait after a failed accept: 10 ms, doubling to 1 s.
struct Backoff {
    delay: Duration,
    logged: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(10),
            logged: false,
        }
    }
}

impl Backoff {
    async fn wait(&mut self, e: &io::Error) {
        if !self.logged || self.delay == MAX_BACKOFF {
            self.logged = true;
            tracing::error!(
                error = %e,
                retry_in_ms = self.delay.as_millis() as u64,
                "cannot accept gRPC connections (open-file limit?): backing off"
            );
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }

    fn reset(&mut self) {
        *self = Self::default();
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the service knows of a connection's other end; in every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: SocketAddr,
    /// The names of its verified client certificate (DNS names, then the
    /// common name); empty without one.
    pub client_names: Arc<[String]>,
}

/// A connection's byte stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Taken for the handshake.
    Closed,
}

/// One accepted connection: the socket, its slot under the cap, and its
/// first-request deadline.
pub struct Connection {
    io: Io,
    info: PeerInfo,
    /// Armed until a request starts on the connection.
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: Arc<Waiting>,
    metrics: ConnectionMetrics,
    _slot: OwnedSemaphorePermit,
    timed_out: bool,
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.open.dec();
        self.waiting.started(Some(self.info.remote_addr));
    }
}

/// Forwards a call to the connection's byte stream.
macro_rules! on_io {
    ($self:expr, $io:ident => $call:expr, $closed:expr) => {
        match &mut $self.io {
            Io::Plain($io) => $call,
            Io::Tls($io) => $call,
            Io::Closed => $closed,
        }
    };
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let remote = this.info.remote_addr;
        if let Some(deadline) = this.deadline.as_mut() {
            if !this.waiting.is_waiting(remote) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                if !std::mem::replace(&mut this.timed_out, true) {
                    this.metrics.closed.with_label_values(&["silent"]).inc();
                    tracing::debug!(%remote, "closing a connection that started no request (--first-request-timeout)");
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within --first-request-timeout",
                )));
            }
        }
        on_io!(this, io => Pin::new(io).poll_read(cx, buf), Poll::Ready(Err(closed())))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_io!(self, io => Pin::new(io).poll_write(cx, buf), Poll::Ready(Err(closed())))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => Pin::new(io).poll_flush(cx), Poll::Ready(Ok(())))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => Pin::new(io).poll_shutdown(cx), Poll::Ready(Ok(())))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, io => Pin::new(io).poll_write_vectored(cx, bufs), Poll::Ready(Err(closed())))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
            Io::Closed => false,
        }
    }
}
