//! The one intake: every worker message, from any transport, goes through the
//! same checks, limits and engine calls here.
//!
//! - [`Decoder`] takes an encoded `WorkerMessage` apart (Hello, summary,
//!   batch, ack), reusing one summary's vectors from message to message.
//! - [`Limits::check_hello`] checks a Hello field by field into a [`Declared`]
//!   rank; [`convert`] checks a summary against its job's layers.
//! - [`Judge`] owns the engine: it declares jobs (bounded by
//!   [`Limits::max_jobs`]), judges summaries, acts on acknowledgements, and
//!   keeps the books on what it decided ([`IntakeMetrics`]).
//! - A refusal is a [`Refusal`]: a [`Reason`] with a stable label and a gRPC
//!   code, and a message naming the field and the value.
//!
//! The transports are thin adapters: a gRPC stream (`service::ingest`) and a
//! summaries-topic record (`cluster::detector`) each feed a
//! [`Decoder`] and hand the parts to the same functions.

mod decode;
mod hello;
mod judge;
mod metrics;
mod refusal;

use std::time::Duration;

pub use decode::{Decoder, Parts};
pub use hello::Declared;
pub use judge::Judge;
pub use metrics::IntakeMetrics;
pub use refusal::{Reason, Refusal};

use crate::engine::{MAX_LAYERS, MAX_RANKS};
use crate::model::Summary;
use crate::{proto, wire};

/// Bounds on what a client can make the service hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Jobs tracked at once; a Hello for one more is refused.
    pub max_jobs: usize,
    /// A job with no summary, Hello or disconnect for this long is forgotten.
    pub job_ttl: Duration,
    /// A stream must say Hello within this long of its start.
    pub hello_timeout: Duration,
    /// ... and send its first summary within this long of its Hello (a
    /// first training step may take minutes: compilation, data loading).
    pub first_summary_timeout: Duration,
    /// Longest job id, in bytes (it becomes a metrics label).
    pub max_job_len: usize,
    /// Highest world size (ranks are below it).
    pub max_world_size: u32,
    /// Most layers a job declares.
    pub max_layers: usize,
    /// Longest layer name, rule profile or client version, in bytes (each
    /// becomes part of stored findings, advice reasons and replies).
    pub max_name_len: usize,
    /// Most summaries in one batch message.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_jobs: 1000,
            job_ttl: Duration::from_secs(15 * 60),
            hello_timeout: Duration::from_secs(30),
            first_summary_timeout: Duration::from_secs(15 * 60),
            max_job_len: 256,
            max_world_size: MAX_RANKS,
            max_layers: MAX_LAYERS,
            max_name_len: 256,
            max_batch: 1024,
        }
    }
}

/// Highest accepted step: steps are stored as signed 64-bit integers.
pub const MAX_STEP: u64 = i64::MAX as u64;

impl Limits {
    /// Admits one more job while fewer than [`Limits::max_jobs`] are
    /// tracked; a refusal is counted in `gradguard_jobs_refused_total`.
    pub fn admit_job(&self, job: &str, tracked: usize, metrics: &IntakeMetrics) -> Result<(), Refusal> {
        if tracked < self.max_jobs {
            return Ok(());
        }
        metrics.job_refused();
        Err(Refusal::new(
            Reason::TooManyJobs,
            format!("field job: cannot track job {job:?}: {tracked} jobs are tracked, the limit (--max-jobs)"),
        ))
    }

    /// Refuses a batch of more summaries than [`Limits::max_batch`].
    pub fn check_batch(&self, len: usize) -> Result<(), Refusal> {
        if len > self.max_batch {
            return Err(Refusal::new(
                Reason::TooLong,
                format!(
                    "field batch: {len} summaries, more than the limit of {}",
                    self.max_batch
                ),
            ));
        }
        Ok(())
    }
}

/// A worker's time is used when it is this close to the service's clock;
/// otherwise (a skewed clock, or no time at all) the receive time is.
const MAX_CLOCK_SKEW_SECS: f64 = 60.0;

/// Converts a wire summary of `rank` into `out`, checking its per-layer
/// arrays against the job's `layers`, and stamps it with the worker's time
/// when that agrees with `now` (the service's clock), else with `now`: stalls
/// are judged against the service's clock, so a worker with a skewed or
/// missing clock must not look silent.
pub fn convert(p: &proto::Summary, rank: u32, layers: usize, now: f64, out: &mut Summary) -> Result<(), Refusal> {
    if p.step > MAX_STEP {
        return Err(Refusal::new(
            Reason::StepOutOfRange,
            format!("field step: {} is above the limit of {MAX_STEP}", p.step),
        ));
    }
    wire::summary_into(p, rank, layers, out).map_err(|e| Refusal::new(Reason::LayerCount, e.to_string()))?;
    out.time = Some(match out.time {
        Some(t) if t.is_finite() && (t - now).abs() <= MAX_CLOCK_SKEW_SECS => t,
        _ => now,
    });
    Ok(())
}

/// The refusal of a summary, batch or ack before any Hello.
pub fn no_hello(what: &str) -> Refusal {
    Refusal::new(
        Reason::NoHello,
        format!(
            "field {what}: arrived before the Hello; open the stream with a Hello (job, rank, world_size, layer_names)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_keeps_its_time_only_when_the_clocks_agree() {
        let mut out = Summary::default();
        let p = |time: f64| proto::Summary {
            step: 1,
            time,
            layer_l2: vec![1.0, 2.0],
            ..Default::default()
        };
        convert(&p(1000.5), 3, 2, 1000.0, &mut out).unwrap();
        assert_eq!((out.time, out.worker, out.layers.len()), (Some(1000.5), 3, 2));
        convert(&p(5000.0), 3, 2, 1000.0, &mut out).unwrap();
        assert_eq!(out.time, Some(1000.0));
        convert(&p(0.0), 3, 2, 1000.0, &mut out).unwrap();
        assert_eq!(out.time, Some(1000.0));
        let far = proto::Summary {
            step: MAX_STEP + 1,
            ..p(0.0)
        };
        let r = convert(&far, 3, 2, 1000.0, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::StepOutOfRange);
        assert!(
            convert(
                &proto::Summary {
                    step: MAX_STEP,
                    ..p(0.0)
                },
                3,
                2,
                1000.0,
                &mut out
            )
            .is_ok()
        );
        let limits = Limits::default();
        assert!(limits.check_batch(1024).is_ok());
        assert_eq!(
            limits.check_batch(1025).unwrap_err().message,
            "field batch: 1025 summaries, more than the limit of 1024"
        );
        let r = convert(&p(0.0), 3, 4, 1000.0, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::LayerCount);
        assert!(
            r.message
                .contains("field layer_l2: 2 values, but the Hello declared 4 layers"),
            "{r}"
        );
    }
}
