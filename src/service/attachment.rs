//! A worker stream as the hub knows it once its Hello was accepted, and the
//! refusals that end it when another stream holds its rank.

use std::sync::Arc;

use crate::intake::{Declared, Reason, Refusal};

/// What a stream is, once its Hello was accepted.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub stream: u64,
    pub declared: Declared,
    /// Who opened it (`None` without `--auth`): only a stream of the same
    /// principal replaces it.
    pub principal: Option<Arc<str>>,
}

impl Attachment {
    /// What ends a stream that a newer one of the same job and rank replaced.
    pub(super) fn replaced(&self) -> Refusal {
        Refusal::new(
            Reason::Replaced,
            format!(
                "replaced by a newer stream of job {:?} rank {}",
                &*self.declared.job, self.declared.rank
            ),
        )
    }

    /// What refuses a stream for a rank another principal's stream holds.
    pub(super) fn held(&self) -> Refusal {
        Refusal::new(
            Reason::RankHeld,
            format!(
                "job {:?} rank {} is streamed by another principal; only a stream of the same principal replaces it",
                &*self.declared.job, self.declared.rank
            ),
        )
    }
}
