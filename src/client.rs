//! The worker side of `Ingest.Stream`, shared by the simulator, the load
//! generator and the tests: open a stream with a Hello, wait for the Welcome,
//! then send summaries and acks on one half and read advice on the other.

use std::time::Duration;

use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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
    #[error("cannot connect to {url}: {detail}{hint}")]
    Connect {
        url: String,
        detail: String,
        hint: &'static str,
    },
    #[error("invalid server address {url:?}: {why}")]
    Address { url: String, why: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server refused the stream: {}", status_message(.0))]
    Status(#[from] Status),
    #[error("server ended the stream before its Welcome")]
    NoWelcome,
    #[error("stream is closed")]
    Closed,
}

/// How a client proves itself and checks the server: TLS (`https://` URLs,
/// or any of the TLS files given) and a bearer token. `Debug` never shows
/// the token.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    /// PEM CA certificates the server's certificate must chain to (the
    /// system's roots when unset).
    pub tls_ca: Option<PathBuf>,
    /// A PEM client certificate and its key, for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ClientSecurity {
    fn wants_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// The TLS configuration these files give.
    fn tls_config(&self) -> Result<ClientTlsConfig, ClientError> {
        let read = |path: &PathBuf, flag: &'static str| {
            std::fs::read(path).map_err(|e| ClientError::Tls(format!("{flag} {}: {e}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?)),
            None => config.with_native_roots(),
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?));
            }
            (None, None) => {}
            (Some(_), None) => return Err(ClientError::Tls("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => return Err(ClientError::Tls("--tls-key needs --tls-cert".into())),
        }
        Ok(config)
    }

    fn credentials(&self) -> Result<Credentials, ClientError> {
        let token = match &self.token {
            None => None,
            Some(t) => {
                let value = MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| ClientError::Tls("the token holds characters a gRPC header cannot carry".into()))?;
                Some(value)
            }
        };
        Ok(Credentials { token })
    }
}

/// Adds the bearer token to every call of a channel.
#[derive(Clone, Default)]
pub struct Credentials {
    token: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A connection to a gradguard server with its credentials, for any of its
/// services (`Ingest`, `Query`).
pub type GrpcChannel = InterceptedService<Channel, Credentials>;

/// Connects to a gradguard server (`http://host:port`; `host:port` is taken as http).
pub async fn connect(url: &str) -> Result<IngestClient<GrpcChannel>, ClientError> {
    connect_with(url, &ClientSecurity::default()).await
}

/// Connects to a gradguard server with TLS and a token.
pub async fn connect_with(url: &str, security: &ClientSecurity) -> Result<IngestClient<GrpcChannel>, ClientError> {
    Ok(IngestClient::new(channel(url, security).await?).max_decoding_message_size(64 << 20))
}

/// A connection to a gradguard server: TLS for `https://` (or when TLS
/// files are given), the token on every call; `host:port` is taken as http,
/// or https with TLS files.
pub async fn channel(url: &str, security: &ClientSecurity) -> Result<GrpcChannel, ClientError> {
    let full = server_url(url, security)?;
    let tls = full.starts_with("https://");
    let mut endpoint = Endpoint::from_shared(full).map_err(|source| ClientError::Url {
        url: url.to_owned(),
        source,
    })?;
    if tls {
        endpoint = endpoint
            .tls_config(security.tls_config()?)
            .map_err(|source| ClientError::Url {
                url: url.to_owned(),
                source,
            })?;
    }
    let credentials = security.credentials()?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            url: url.to_owned(),
            detail: causes(&source),
            hint: hint(tls),
        })?;
    Ok(InterceptedService::new(channel, credentials))
}

/// The full URL of a server address (`host:port` is http, or https with TLS
/// files), checked: an `http://` or `https://` URL with a port, and https
/// when TLS files are given. Commands call it first, to refuse a wrong
/// `--server` before doing anything.
pub fn server_url(url: &str, security: &ClientSecurity) -> Result<String, ClientError> {
    let full = if url.contains("://") {
        url.to_owned()
    } else if security.wants_tls() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    check_address(url, &full)?;
    if !full.starts_with("https://") && security.wants_tls() {
        return Err(ClientError::Tls(format!(
            "{url} is plaintext (http://) but TLS files were given: use https://"
        )));
    }
    Ok(full)
}

/// A server address must be `http://` or `https://` with a host and a port
/// (a missing port would silently mean 80 or 443, never gradguard's).
fn check_address(url: &str, full: &str) -> Result<(), ClientError> {
    let bad = |why: String| ClientError::Address {
        url: url.to_owned(),
        why,
    };
    let (scheme, rest) = full.split_once("://").unwrap_or(("", full));
    if scheme != "http" && scheme != "https" {
        return Err(bad(format!("{scheme}:// is not supported (use http:// or https://)")));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let port = match authority.rsplit_once(':') {
        // An IPv6 address without a port: [::1]
        Some((host, _)) if authority.ends_with(']') || host.is_empty() => None,
        Some((_, port)) => Some(port),
        None => None,
    };
    match port {
        None => Err(bad(format!(
            "no port (gradguard's gRPC port is 50051 by default: {scheme}://{authority}:50051)"
        ))),
        Some(p) if p.parse::<u16>().is_err() => Err(bad(format!("port {p:?} is not a port number"))),
        Some(_) => Ok(()),
    }
}

/// What a status from a server means, in words: `Code: message`, or for a
/// server that is not gradguard's gRPC port (an HTTP server, such as its
/// metrics port) what it is.
pub fn status_message(status: &Status) -> String {
    let message = status.message();
    if status.code() == tonic::Code::Unimplemented
        && let Some(http) = message.split("HTTP status code ").nth(1)
    {
        return format!(
            "not a gRPC server: it answered HTTP {http} (its metrics port? gRPC is serve's --grpc-addr, :50051 by default)"
        );
    }
    format!("{:?}: {message}", status.code())
}

/// An error and its causes, `: `-separated (tonic's own message is only
/// "transport error").
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// What to check when a call on `url` failed at the transport: a
/// plaintext client talking to a TLS server (or the other way round), or a
/// TLS 1.3 server refusing the client's certificate after the handshake,
/// shows only as an HTTP/2 or connection error.
pub fn transport_hint(url: &str, security: &ClientSecurity, status: &Status) -> &'static str {
    let message = status.message().to_lowercase();
    let transport = matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    ) && [
        "h2 protocol error",
        "transport error",
        "connection",
        "tls",
        "certificate",
        "canceled",
        "cancelled",
    ]
    .iter()
    .any(|m| message.contains(m));
    match (transport, url.starts_with("https://"), security.tls_cert.is_some()) {
        (false, _, _) => "",
        (true, false, _) => hint(false),
        (true, true, false) => {
            " (with https://: does the server ask for a client certificate (mutual TLS)? Then pass --tls-cert and --tls-key)"
        }
        (true, true, true) => {
            " (with https://: does the server trust the CA that signed the client certificate (--tls-cert)?)"
        }
    }
}

/// What to check when a connection fails.
pub fn hint(tls: bool) -> &'static str {
    if tls {
        " (with https://: is the server serving TLS, and does --tls-ca hold the CA that signed its certificate?)"
    } else {
        " (with http://: is the server serving TLS? Then use https:// and --tls-ca)"
    }
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
    pub async fn open(client: &mut IngestClient<GrpcChannel>, hello: proto::Hello) -> Result<Self, ClientError> {
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
