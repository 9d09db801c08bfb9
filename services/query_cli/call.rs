//! Talking to the server: the runtime, the connection, refusals, paging.

use anyhow::anyhow;
use gradguard::client::{self, ClientError, ClientSecurity, GrpcChannel};
use gradguard::proto::query_client::QueryClient;
use gradguard::wire;
use tonic::{Code, Status};

use crate::cli::{Failure, status_text, warn};

/// Runs one command's calls on a small single-threaded runtime.
pub(super) fn block_on<T>(work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(anyhow!("cannot start the async runtime: {e}")))?
        .block_on(work)
}

pub(super) async fn connect(url: &str, security: &ClientSecurity) -> Result<QueryClient<GrpcChannel>, Failure> {
    match client::channel(url, security).await {
        Ok(channel) => Ok(QueryClient::new(channel).max_decoding_message_size(64 << 20)),
        Err(e @ (ClientError::Url { .. } | ClientError::Address { .. })) => {
            Err(Failure::usage(anyhow!("--server: {e}")))
        }
        Err(e @ ClientError::Tls(_)) => Err(Failure::usage(e)),
        Err(e) => Err(Failure::input(e)),
    }
}

/// A query the server answered with an error: the command's fault (exit 2)
/// when the server calls it invalid, otherwise exit 1.
pub(super) fn refused(url: &str, security: &ClientSecurity, status: Status) -> Failure {
    // A transport failure's status carries its cause (a TLS alert, say).
    let cause = std::error::Error::source(&status)
        .map(|e| format!(" ({})", client::causes(e)))
        .unwrap_or_default();
    let error = anyhow!(
        "{url}: {}{cause}{}",
        status_text(&status),
        client::transport_hint(url, security, &status)
    );
    match status.code() {
        Code::InvalidArgument => Failure::usage(error),
        _ => Failure::input(error),
    }
}

/// The rows of a listing, and whether the server has more.
#[derive(Debug)]
pub(super) struct Listing<T> {
    pub(super) rows: Vec<T>,
    pub(super) more: bool,
}

impl<T> Listing<T> {
    /// Tells on stderr, after a table, that `--limit` cut it short; `which`
    /// says which rows were shown (`newest`, `first`).
    pub(super) fn note_more(&self, json: bool, which: &str) {
        if self.more && !json {
            warn(&format!("(the {which} {} shown; --limit for more)", self.rows.len()));
        }
    }
}

/// Follows page tokens until `limit` rows are in or the server has no more;
/// `fetch(page_size, page_token)` asks for one page.
pub(super) async fn collect_pages<T>(
    limit: u64,
    mut fetch: impl AsyncFnMut(u32, String) -> Result<(Vec<T>, String), Status>,
) -> Result<Listing<T>, Status> {
    let mut rows = Vec::new();
    let mut token = String::new();
    let mut more = true;
    while more && (rows.len() as u64) < limit {
        let page_size = (limit - rows.len() as u64).min(u64::from(wire::MAX_PAGE_SIZE)) as u32;
        let (page, next) = fetch(page_size, token).await?;
        // An empty page with a token would ask for the same page forever.
        more = !next.is_empty() && !page.is_empty();
        rows.extend(page);
        token = next;
    }
    if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        more = true;
    }
    Ok(Listing { rows, more })
}
