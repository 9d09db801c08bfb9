//! Why the intake refused a worker message: one enum of reasons, each with a
//! stable label (the `reason` of `gradguard_summaries_rejected_total`) and a
//! gRPC code, whatever transport the message came by.

use std::fmt;

use tonic::Code;

use crate::engine::EngineError;

/// The reason of a refusal. Labels are stable: dashboards and alerts use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The bytes are not a `gradguard.v1.WorkerMessage`.
    Undecodable,
    /// The message is over the transport's size limit.
    MessageTooLarge,
    /// The message carries no body.
    EmptyMessage,
    /// A summary, batch or ack for a job (or stream) that said no Hello.
    NoHello,
    /// A second Hello on one gRPC stream.
    HelloTwice,
    /// A stream that sent no Hello, or no first summary, within its timeout.
    HelloTimeout,
    /// The job id is empty.
    EmptyJob,
    /// A Hello field out of its limits (job length, world size), or a Kafka
    /// record whose Hello disagrees with its key or rank header.
    InvalidHello,
    /// A Kafka record without a numeric `rank` header.
    NoRank,
    /// A name (layer, rule profile, client version) or a batch over its limit.
    TooLong,
    /// A step above the highest the store keeps (2⁶³ − 1).
    StepOutOfRange,
    RankOutOfRange,
    TooManyLayers,
    /// Layer names that differ from those the job was declared with.
    LayerNames,
    /// A Hello's layout that is none (a size of 0, a replica group beyond
    /// them, a product that is not the world size), or that disagrees with
    /// the job's (its sizes, its world size, the rank's replica group).
    Layout,
    /// A summary whose per-layer arrays do not match the declared layers.
    LayerCount,
    DuplicateStep,
    StepBackwards,
    /// The Hello's `rule_profile` is not in the rules file.
    UnknownProfile,
    /// A Hello for one more job than the service tracks.
    TooManyJobs,
    /// A stream replaced by a newer one of the same job and rank.
    Replaced,
    /// A Hello for a job outside the caller's `ingest:` scopes.
    NotPermitted,
    /// A stream for a rank that another principal's stream holds.
    RankHeld,
}

impl Reason {
    /// Every reason, for tests and documentation.
    pub const ALL: [Reason; 23] = [
        Reason::Undecodable,
        Reason::MessageTooLarge,
        Reason::EmptyMessage,
        Reason::NoHello,
        Reason::HelloTwice,
        Reason::HelloTimeout,
        Reason::EmptyJob,
        Reason::InvalidHello,
        Reason::NoRank,
        Reason::TooLong,
        Reason::StepOutOfRange,
        Reason::RankOutOfRange,
        Reason::TooManyLayers,
        Reason::LayerNames,
        Reason::Layout,
        Reason::LayerCount,
        Reason::DuplicateStep,
        Reason::StepBackwards,
        Reason::UnknownProfile,
        Reason::TooManyJobs,
        Reason::Replaced,
        Reason::NotPermitted,
        Reason::RankHeld,
    ];

    /// The stable label, for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::Undecodable => "undecodable",
            Reason::MessageTooLarge => "message_too_large",
            Reason::EmptyMessage => "empty_message",
            Reason::NoHello => "no_hello",
            Reason::HelloTwice => "hello_twice",
            Reason::HelloTimeout => "hello_timeout",
            Reason::EmptyJob => "empty_job",
            Reason::InvalidHello => "invalid_hello",
            Reason::NoRank => "no_rank",
            Reason::TooLong => "too_long",
            Reason::StepOutOfRange => "step_out_of_range",
            Reason::RankOutOfRange => "rank_out_of_range",
            Reason::TooManyLayers => "too_many_layers",
            Reason::LayerNames => "layer_names",
            Reason::Layout => "layout",
            Reason::LayerCount => "layer_count",
            Reason::DuplicateStep => "duplicate_step",
            Reason::StepBackwards => "step_backwards",
            Reason::UnknownProfile => "config",
            Reason::TooManyJobs => "too_many_jobs",
            Reason::Replaced => "replaced",
            Reason::NotPermitted => "not_permitted",
            Reason::RankHeld => "rank_held",
        }
    }

    /// The gRPC status code a stream ends with.
    pub const fn code(self) -> Code {
        match self {
            Reason::TooManyJobs => Code::ResourceExhausted,
            Reason::Replaced => Code::Aborted,
            Reason::NotPermitted | Reason::RankHeld => Code::PermissionDenied,
            Reason::HelloTimeout => Code::DeadlineExceeded,
            _ => Code::InvalidArgument,
        }
    }
}

/// A refused worker message: why, and a message for the worker naming the
/// field and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The same refusal of the `index`-th summary of a batch, its message
    /// prefixed with that place (and the summary's step, once decoded).
    pub fn in_batch(self, index: usize, step: Option<u64>) -> Self {
        let step = step.map_or_else(String::new, |s| format!(" (step {s})"));
        Self::new(self.reason, format!("batch.summaries[{index}]{step}: {}", self.message))
    }

    /// The status that ends the worker's gRPC stream.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.reason.code(), self.message.clone())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl From<&EngineError> for Refusal {
    fn from(e: &EngineError) -> Self {
        let (reason, field) = match e {
            EngineError::EmptyJob => (Reason::EmptyJob, "job"),
            EngineError::RankOutOfRange { .. } => (Reason::RankOutOfRange, "rank"),
            EngineError::DuplicateStep { .. } => (Reason::DuplicateStep, "step"),
            EngineError::StepBackwards { .. } => (Reason::StepBackwards, "step"),
            EngineError::LayerCount { .. } => (Reason::LayerCount, "layer_l2"),
            EngineError::TooManyLayers { .. } => (Reason::TooManyLayers, "layer_names"),
            EngineError::LayerNames { .. } => (Reason::LayerNames, "layer_names"),
            // The rank beyond the layout's ranks is out of range, as beyond a world size.
            EngineError::Layout { field: "rank", .. } => (Reason::RankOutOfRange, "rank"),
            EngineError::Layout { field, .. } => (Reason::Layout, *field),
            EngineError::Config(_) => (Reason::UnknownProfile, "rule_profile"),
            // Not a worker's doing; restoring is the service's.
            EngineError::Snapshot { .. } => (Reason::Undecodable, "snapshot"),
        };
        Self::new(reason, format!("field {field}: {e}"))
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        Self::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_match_the_engines() {
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
        // The engine's own labels are the intake's for the same failure.
        for e in [
            EngineError::EmptyJob,
            EngineError::RankOutOfRange { worker: 9 },
            EngineError::DuplicateStep { worker: 0, step: 1 },
            EngineError::StepBackwards {
                worker: 0,
                step: 1,
                last: 2,
            },
            EngineError::LayerCount {
                worker: 0,
                expected: 1,
                got: 2,
            },
            EngineError::TooManyLayers { got: 1 },
            EngineError::Layout {
                field: "layout",
                message: "x".into(),
            },
            EngineError::Config("x".into()),
        ] {
            assert_eq!(Refusal::from(&e).reason.label(), e.reason(), "{e}");
        }
    }

    #[test]
    fn batch_refusals_name_their_place() {
        let r = Refusal::new(Reason::LayerCount, "field layer_l2: 3 values").in_batch(2, Some(7));
        assert_eq!(r.message, "batch.summaries[2] (step 7): field layer_l2: 3 values");
        assert_eq!(r.reason, Reason::LayerCount);
        assert_eq!(r.status().code(), Code::InvalidArgument);
        assert_eq!(
            Refusal::new(Reason::TooManyJobs, "").status().code(),
            Code::ResourceExhausted
        );
    }
}
