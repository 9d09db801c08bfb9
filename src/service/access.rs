//! Who is calling, and whether they may: the gate in front of the Ingest,
//! Query and reflection services (gRPC health stays open for probes).
//!
//! Without `--auth` every caller is [`Caller::Anyone`], allowed everything
//! (the service says so once when it starts). With it, a call carries a
//! bearer token (`authorization: Bearer ...`) or comes over a connection
//! whose client certificate names a principal; otherwise it is refused
//! UNAUTHENTICATED before it reaches a service. What the principal may do
//! with a job is checked where the job is known: at a stream's Hello
//! (ingest), and in each query, which only ever sees jobs in scope.
//!
//! Refusals are counted in `gradguard_auth_failures_total{reason}` and
//! logged once per principal and reason per minute.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};
use tonic::{Request, Status};

use super::connections::PeerInfo;
use crate::auth::{JobPattern, Principal, Principals};

/// Why a call was refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No token and no client certificate.
    NoCredentials,
    /// A token that is no principal's.
    BadToken,
    /// A verified client certificate whose names are no principal's.
    UnknownCertificate,
    /// A job outside the principal's scopes.
    OutOfScope,
    /// A stream for a rank another principal's stream holds.
    Takeover,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::NoCredentials,
        Failure::BadToken,
        Failure::UnknownCertificate,
        Failure::OutOfScope,
        Failure::Takeover,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::NoCredentials => "no_credentials",
            Failure::BadToken => "bad_token",
            Failure::UnknownCertificate => "unknown_certificate",
            Failure::OutOfScope => "out_of_scope",
            Failure::Takeover => "takeover",
        }
    }
}

/// The caller of a request, put in its extensions by the gate.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No `--auth`: anyone may do anything.
    Anyone,
    Principal(Arc<Principal>),
}

impl Caller {
    /// The caller of a request that went through the gate. A request that
    /// did not is refused rather than let through.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("the request did not pass the access gate"))
    }

    /// The principal's name (`None` for anyone): a stream replaces another
    /// only when they have the same.
    pub fn identity(&self) -> Option<Arc<str>> {
        match self {
            Caller::Anyone => None,
            Caller::Principal(p) => Some(p.name.clone()),
        }
    }

    pub fn label(&self) -> &str {
        match self {
            Caller::Anyone => "anyone",
            Caller::Principal(p) => &p.name,
        }
    }

    pub fn may_ingest(&self, job: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Principal(p) => p.may_ingest(job),
        }
    }

    pub fn may_query(&self, job: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Principal(p) => p.may_query(job),
        }
    }

    /// The jobs it may query, as SQLite `GLOB` patterns: `None` for all.
    pub fn query_globs(&self) -> Option<Vec<String>> {
        match self {
            Caller::Anyone => None,
            Caller::Principal(p) => p
                .query_patterns()
                .map(|ps| ps.into_iter().map(JobPattern::to_glob).collect()),
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Principal(p) => p.is_admin(),
        }
    }

    /// Whether it may query anything at all.
    pub fn queries_something(&self) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Principal(p) => p.query_patterns().is_none_or(|ps| !ps.is_empty()),
        }
    }

    fn scopes(&self) -> String {
        match self {
            Caller::Anyone => "everything".into(),
            Caller::Principal(p) => p.scopes_text(),
        }
    }
}

/// The access gate: the principals (re-read on SIGHUP) and the refusals' books.
pub struct Gate {
    file: Option<PathBuf>,
    principals: RwLock<Option<Arc<Principals>>>,
    failures: IntCounterVec,
    /// When each (principal, reason) was last logged.
    logged: Mutex<HashMap<(String, Failure), Instant>>,
}

/// Refusals of one principal and reason are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl Gate {
    /// A gate on the principals of `file`, or open to anyone without one.
    pub fn new(file: Option<PathBuf>, registry: &Registry) -> anyhow::Result<Self> {
        let principals = match &file {
            Some(path) => Some(Arc::new(Principals::load(path)?)),
            None => None,
        };
        let failures = IntCounterVec::new(
            Opts::new(
                "gradguard_auth_failures_total",
                "Calls and streams refused by authentication or authorisation, by reason",
            ),
            &["reason"],
        )?;
        for f in Failure::ALL {
            failures.with_label_values(&[f.label()]);
        }
        registry.register(Box::new(failures.clone()))?;
        Ok(Self {
            file,
            principals: RwLock::new(principals),
            failures,
            logged: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_open(&self) -> bool {
        self.file.is_none()
    }

    /// Re-reads the auth file (SIGHUP). A file that does not load leaves the
    /// principals as they were; the error says why.
    pub fn reload(&self) -> anyhow::Result<Option<usize>> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let principals = Principals::load(path)?;
        let n = principals.len();
        *self.principals.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(principals));
        Ok(Some(n))
    }

    /// Who is calling: from the bearer token if there is one (a wrong token
    /// is refused even over a known certificate), else from the client
    /// certificate.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let Some(principals) = self.principals.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(Caller::Anyone);
        };
        if let Some(value) = request.metadata().get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim);
            return match token.and_then(|t| principals.by_token(t)) {
                Some(p) => Ok(Caller::Principal(p.clone())),
                None => Err(self.refuse(
                    "unknown",
                    Failure::BadToken,
                    Status::unauthenticated("the bearer token is not valid (authorization: Bearer <token>)"),
                )),
            };
        }
        let names = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.client_names.clone())
            .unwrap_or_default();
        if names.is_empty() {
            return Err(self.refuse(
                "unknown",
                Failure::NoCredentials,
                Status::unauthenticated(
                    "no credentials: send a bearer token (authorization: Bearer <token>) or a client certificate",
                ),
            ));
        }
        match principals.by_cert_names(&names) {
            Some(p) => Ok(Caller::Principal(p.clone())),
            None => Err(self.refuse(
                &names[0],
                Failure::UnknownCertificate,
                Status::unauthenticated(format!(
                    "the client certificate ({}) is no principal's",
                    names.join(", ")
                )),
            )),
        }
    }

    /// PERMISSION_DENIED for a job outside the caller's scopes, counted.
    pub fn out_of_scope(&self, caller: &Caller, what: &str, job: &str) -> Status {
        self.refuse(
            caller.label(),
            Failure::OutOfScope,
            Status::permission_denied(format!(
                "principal {:?} may not {what} job {} (its scopes: {})",
                caller.label(),
                crate::wire::excerpt(job),
                caller.scopes()
            )),
        )
    }

    /// Counts a refusal and logs it, once per principal and reason a minute.
    pub fn refuse(&self, who: &str, failure: Failure, status: Status) -> Status {
        self.count(who, failure, status.message());
        status
    }

    /// Counts a refusal made elsewhere (a takeover, at the hub).
    pub fn count(&self, who: &str, failure: Failure, message: &str) {
        self.failures.with_label_values(&[failure.label()]).inc();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let key = (crate::wire::excerpt(who), failure);
        if logged.get(&key).is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
            return;
        }
        // Bounded: the principals of the file, the certificates' first
        // names, "unknown"; forget what was not refused lately.
        if logged.len() >= 4096 {
            logged.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
        }
        tracing::warn!(
            principal = %key.0,
            reason = failure.label(),
            message,
            "refused (logged once a minute per principal and reason)"
        );
        logged.insert(key, now);
    }
}

/// The gate as a tonic interceptor: authenticates, and hands the caller to
/// the service in the request's extensions.
#[derive(Clone)]
pub struct Check(pub Arc<Gate>);

impl tonic::service::Interceptor for Check {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.0.authenticate(&request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}
