//! Who may talk to the service, and about which jobs: the principals of
//! `serve --auth FILE`, and the TLS material of `serve --tls-*` ([`tls`]).
//!
//! ```toml
//! [[principal]]
//! name = "team-a-trainers"
//! token_sha256 = "9f86d08...15b0f00a08"        # hex SHA-256 of the bearer token
//! scopes = ["ingest:team-a/*", "query:team-a/*"]
//!
//! [[principal]]
//! name = "ops"
//! client_cert_name = "ops.example.internal"   # mTLS identity (SAN or CN)
//! scopes = ["admin"]
//! ```
//!
//! A principal is known by a bearer token (only its SHA-256 is in the file;
//! a presented token is hashed and compared with every principal's in
//! constant time) or by the name in its verified client certificate, or
//! both. Its scopes: `ingest:<job pattern>` opens worker streams for the
//! matching jobs, `query:<job pattern>` reads them, `admin` does everything.
//! In a pattern `*` matches any run of characters (`/` included); every other
//! character matches itself.

pub mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use toml::Spanned;

/// The hex SHA-256 of a token, as `token_sha256` holds it.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A job-id pattern: `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPattern(String);

impl JobPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the job pattern is empty (use `*` for every job)".into());
        }
        if let Some(c) = text.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("the job pattern {text:?} holds the character {c:?}"));
        }
        if text.contains("**") {
            return Err(format!("the job pattern {text:?} holds `**`: one `*` matches any run"));
        }
        Ok(Self(text.to_owned()))
    }

    /// Whether `job` matches: the literal runs between `*`s appear in order,
    /// the first at the start and the last at the end.
    pub fn matches(&self, job: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = job.strip_prefix(first) else {
            return false;
        };
        let mut parts = parts.peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                return rest.ends_with(part);
            }
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.is_empty()
    }

    /// Matches every job.
    pub fn is_everything(&self) -> bool {
        self.0 == "*"
    }

    /// The same pattern for SQLite's `GLOB` (whose `?` and `[` are special).
    pub fn to_glob(&self) -> String {
        self.0.replace('[', "[[]").replace('?', "[?]")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a principal may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Ingest(JobPattern),
    Query(JobPattern),
}

impl Scope {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "admin" {
            return Ok(Self::Admin);
        }
        let (kind, pattern) = text
            .split_once(':')
            .ok_or_else(|| format!("scope {text:?} is not `admin`, `ingest:<job pattern>` or `query:<job pattern>`"))?;
        let pattern = JobPattern::parse(pattern).map_err(|e| format!("scope {text:?}: {e}"))?;
        match kind {
            "ingest" => Ok(Self::Ingest(pattern)),
            "query" => Ok(Self::Query(pattern)),
            _ => Err(format!(
                "scope {text:?}: unknown kind {kind:?} (use `admin`, `ingest:<job pattern>` or `query:<job pattern>`)"
            )),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Ingest(p) => write!(f, "ingest:{}", p.as_str()),
            Scope::Query(p) => write!(f, "query:{}", p.as_str()),
        }
    }
}

/// A named holder of scopes.
#[derive(Debug)]
pub struct Principal {
    pub name: Arc<str>,
    token_sha256: Option<[u8; 32]>,
    client_cert_name: Option<String>,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    pub fn may_ingest(&self, job: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Ingest(p) => p.matches(job),
            Scope::Query(_) => false,
        })
    }

    pub fn may_query(&self, job: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Admin => true,
            Scope::Query(p) => p.matches(job),
            Scope::Ingest(_) => false,
        })
    }

    /// The jobs it may query: `None` for every job, else its patterns (an
    /// empty list: none).
    pub fn query_patterns(&self) -> Option<Vec<&JobPattern>> {
        let mut patterns = Vec::new();
        for s in &self.scopes {
            match s {
                Scope::Admin => return None,
                Scope::Query(p) if p.is_everything() => return None,
                Scope::Query(p) => patterns.push(p),
                Scope::Ingest(_) => {}
            }
        }
        Some(patterns)
    }

    /// Its scopes, for messages.
    pub fn scopes_text(&self) -> String {
        let scopes: Vec<String> = self.scopes.iter().map(ToString::to_string).collect();
        scopes.join(", ")
    }
}

/// The principals of an auth file.
#[derive(Debug, Default)]
pub struct Principals {
    list: Vec<Arc<Principal>>,
}

/// An auth file that cannot be used; the message names the file, the line
/// and the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthFileError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    principal: Vec<Spanned<Entry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Spanned<String>,
    #[serde(default)]
    token_sha256: Option<Spanned<String>>,
    #[serde(default)]
    client_cert_name: Option<Spanned<String>>,
    scopes: Spanned<Vec<Spanned<String>>>,
}

impl Principals {
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthFileError(format!("cannot read the auth file {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks an auth file: every field, then names, tokens and
    /// certificate names unique across principals.
    pub fn parse(text: &str, origin: &str) -> Result<Self, AuthFileError> {
        let line = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
        let fail = |at: usize, message: String| AuthFileError(format!("{origin}:{}: {message}", line(at)));
        let file: File = toml::from_str(text).map_err(|e| AuthFileError(format!("{origin}: {e}")))?;
        if file.principal.is_empty() {
            return Err(AuthFileError(format!(
                "{origin}: no [[principal]]: with an empty auth file nobody could connect"
            )));
        }
        let mut list = Vec::with_capacity(file.principal.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut tokens: HashMap<[u8; 32], String> = HashMap::new();
        let mut certs: HashMap<String, String> = HashMap::new();
        for entry in file.principal {
            let at = entry.span().start;
            let e = entry.into_inner();
            let name = e.name.get_ref().clone();
            if name.is_empty() || name.chars().any(|c| c.is_control()) {
                return Err(fail(
                    e.name.span().start,
                    format!("principal name {name:?} must be non-empty text"),
                ));
            }
            if let Some(first) = names.insert(name.clone(), line(at)) {
                return Err(fail(
                    e.name.span().start,
                    format!("principal name {name:?} is used twice (first at line {first})"),
                ));
            }
            let token_sha256 = match &e.token_sha256 {
                Some(hash) => {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(hash.get_ref(), &mut digest).map_err(|_| {
                        fail(
                            hash.span().start,
                            format!(
                                "principal {name:?}: token_sha256 {:?} is not 64 hex digits (the SHA-256 of the token, e.g. `gradguard auth hash-token`)",
                                hash.get_ref()
                            ),
                        )
                    })?;
                    if let Some(other) = tokens.insert(digest, name.clone()) {
                        return Err(fail(
                            hash.span().start,
                            format!("principal {name:?}: token_sha256 is also principal {other:?}'s"),
                        ));
                    }
                    Some(digest)
                }
                None => None,
            };
            let client_cert_name = match &e.client_cert_name {
                Some(cert) => {
                    let c = cert.get_ref();
                    if c.is_empty() || c.chars().any(|c| c.is_control() || c.is_whitespace()) {
                        return Err(fail(
                            cert.span().start,
                            format!(
                                "principal {name:?}: client_cert_name {c:?} must be a certificate's DNS name or CN"
                            ),
                        ));
                    }
                    if let Some(other) = certs.insert(c.clone(), name.clone()) {
                        return Err(fail(
                            cert.span().start,
                            format!("principal {name:?}: client_cert_name {c:?} is also principal {other:?}'s"),
                        ));
                    }
                    Some(c.clone())
                }
                None => None,
            };
            if token_sha256.is_none() && client_cert_name.is_none() {
                return Err(fail(
                    at,
                    format!("principal {name:?} has neither token_sha256 nor client_cert_name: nobody could be it"),
                ));
            }
            if e.scopes.get_ref().is_empty() {
                return Err(fail(e.scopes.span().start, format!("principal {name:?} has no scopes")));
            }
            let scopes = e
                .scopes
                .get_ref()
                .iter()
                .map(|s| {
                    Scope::parse(s.get_ref()).map_err(|m| fail(s.span().start, format!("principal {name:?}: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            list.push(Arc::new(Principal {
                name: name.into(),
                token_sha256,
                client_cert_name,
                scopes,
            }));
        }
        Ok(Self { list })
    }

    /// The principal whose token this is. Every principal's hash is compared,
    /// each in constant time, so the time taken tells nothing of which.
    pub fn by_token(&self, token: &str) -> Option<&Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for p in &self.list {
            if let Some(hash) = &p.token_sha256
                && bool::from(hash.ct_eq(&digest))
            {
                found = Some(p);
            }
        }
        found
    }

    /// The principal a verified client certificate with these names is.
    pub fn by_cert_names(&self, names: &[String]) -> Option<&Arc<Principal>> {
        self.list
            .iter()
            .find(|p| p.client_cert_name.as_ref().is_some_and(|c| names.contains(c)))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|p| &*p.name)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[cfg(test)]
mod tests;
