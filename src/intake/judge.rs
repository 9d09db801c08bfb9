//! The engine behind the intake: declares jobs within the limits, judges
//! summaries, acts on acknowledgements, and counts what it decided.

use super::{Declared, IntakeMetrics, Limits, Reason, Refusal, convert};
use crate::engine::{Engine, Output};
use crate::model::{Action, Advice, Finding, Summary};
use crate::proto;

pub struct Judge {
    engine: Engine,
    limits: Limits,
    metrics: IntakeMetrics,
}

impl Judge {
    pub fn new(engine: Engine, limits: Limits, metrics: IntakeMetrics) -> Self {
        Self {
            engine,
            limits,
            metrics,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine itself, for what is not a worker's message (snapshots,
    /// restores, the periodic tick).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn metrics(&self) -> &IntakeMetrics {
        &self.metrics
    }

    /// Declares a rank's view of its job. A job beyond [`Limits::max_jobs`]
    /// is refused; true when the job is new.
    pub fn declare(&mut self, d: &Declared) -> Result<bool, Refusal> {
        let new = !self.engine.has_job(&d.job);
        if new {
            self.limits.admit_job(&d.job, self.engine.job_count(), &self.metrics)?;
        }
        self.engine.declare(&d.job, &d.spec())?;
        if new {
            self.metrics.new_job(&d.job);
        }
        Ok(new)
    }

    /// Converts and judges one summary of `rank` of a declared job (the job's
    /// layers are those of its first Hello that named any); what the engine
    /// found and advised joins `out`, and stays for the caller to number and
    /// hand to [`Judge::published`].
    pub fn summary(
        &mut self,
        job: &str,
        rank: u32,
        p: &proto::Summary,
        now: f64,
        scratch: &mut Summary,
        out: &mut Output,
    ) -> Result<(), Refusal> {
        let Some((layers, world_size)) = self.engine.shape(job) else {
            return Err(Refusal::new(
                Reason::NoHello,
                format!(
                    "field summary: step {} of job {job:?} arrived before any Hello of the job",
                    p.step
                ),
            ));
        };
        if let Some(w) = world_size
            && rank >= w
        {
            return Err(Refusal::new(
                Reason::RankOutOfRange,
                format!("field rank: {rank} is not below the job's world_size {w}"),
            ));
        }
        convert(p, rank, layers, now, scratch)?;
        self.engine.observe(job, scratch, out)?;
        self.metrics.summary(scratch.layers.len());
        Ok(())
    }

    /// A worker's acknowledgement of advice. A rank that applied a rollback
    /// reports its steps again from the checkpoint, so the engine rewinds
    /// that rank: the step it rewinds to, then.
    pub fn ack(&mut self, job: &str, rank: u32, ack: &proto::AdviceAck) -> Option<u64> {
        self.metrics.ack(ack.applied);
        if !ack.applied {
            return None;
        }
        let to_step = self.engine.advice_applied(job, rank, ack.advice_id)?;
        tracing::info!(job, rank, to_step, "rank rolled back");
        Some(to_step)
    }

    /// Books a finding once it leaves (its metrics).
    pub fn found(&self, f: &Finding) {
        self.metrics.anomaly(&f.job, f.rule, f.severity);
    }

    /// Books an advice once it has its final id: its metrics, and a rollback
    /// is remembered so that its acknowledgement rewinds the rank.
    pub fn advised(&mut self, a: &Advice) {
        self.metrics.advice(&a.job, &a.action);
        if let Action::Rollback { to_step } = a.action {
            self.engine.note_rollback(&a.job, a.id, to_step);
        }
    }

    /// Periodic judgement against the service's clock (stalled ranks).
    pub fn tick(&mut self, now: f64, out: &mut Output) {
        self.engine.tick(now, out);
    }

    /// Forgets a job: its detection state and its metrics series.
    pub fn forget(&mut self, job: &str) {
        self.engine.remove_job(job);
        self.metrics.forget_job(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Output;

    fn judge(max_jobs: usize) -> Judge {
        let limits = Limits {
            max_jobs,
            ..Limits::default()
        };
        Judge::new(
            Engine::default(),
            limits,
            IntakeMetrics::register(&prometheus::Registry::new()),
        )
    }

    fn declared(job: &str, layers: usize) -> Declared {
        Limits::default()
            .check_hello(proto::Hello {
                job: job.into(),
                world_size: 2,
                layer_names: (0..layers).map(|i| format!("l{i}")).collect(),
                ..Default::default()
            })
            .unwrap()
    }

    #[test]
    fn jobs_beyond_the_limit_are_refused_and_known_ones_redeclared() {
        let mut j = judge(1);
        assert_eq!(j.declare(&declared("a", 2)), Ok(true));
        assert_eq!(j.declare(&declared("a", 2)), Ok(false));
        let r = j.declare(&declared("b", 2)).unwrap_err();
        assert_eq!(r.reason, Reason::TooManyJobs);
        assert!(r.message.contains("1 jobs are tracked"), "{r}");
        let r = j.declare(&declared("a", 3)).unwrap_err();
        assert_eq!(r.reason, Reason::LayerNames);
        j.forget("a");
        assert_eq!(j.declare(&declared("b", 2)), Ok(true));
    }

    #[test]
    fn summaries_are_checked_against_the_jobs_layers() {
        let mut j = judge(10);
        let (mut scratch, mut out) = (Summary::default(), Output::default());
        let p = |step, layers| proto::Summary {
            step,
            grad_norm: Some(1.0),
            layer_l2: vec![0.5; layers],
            ..Default::default()
        };
        let r = j.summary("a", 0, &p(1, 2), 1.0, &mut scratch, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::NoHello);
        j.declare(&declared("a", 2)).unwrap();
        j.summary("a", 0, &p(1, 2), 1.0, &mut scratch, &mut out).unwrap();
        let r = j.summary("a", 1, &p(1, 3), 1.0, &mut scratch, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::LayerCount);
        let r = j.summary("a", 0, &p(1, 2), 1.0, &mut scratch, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::DuplicateStep);
        assert!(
            r.message
                .starts_with("field step: step 1 of rank 0 was already accepted"),
            "{r}"
        );
        let r = j.summary("a", 5, &p(1, 2), 1.0, &mut scratch, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::RankOutOfRange);
    }

    #[test]
    fn a_rank_whose_layout_disagrees_with_the_jobs_is_refused_naming_the_field() {
        let mut j = judge(10);
        let hello = |rank: u32, world_size: u32, layout: Option<(u32, u32, u32)>| {
            Limits::default()
                .check_hello(proto::Hello {
                    job: "a".into(),
                    rank,
                    world_size,
                    layout: layout.map(|(d, p, g)| proto::Layout {
                        data_parallel: d,
                        tensor_parallel: 1,
                        pipeline_parallel: p,
                        replica_group: g,
                    }),
                    ..Default::default()
                })
                .unwrap()
        };
        assert_eq!(j.declare(&hello(0, 0, Some((2, 2, 0)))), Ok(true));
        for (d, field, value) in [
            (
                hello(1, 0, Some((1, 4, 1))),
                "field layout: ",
                "pipeline_parallel 4 = 4 ranks, but the job",
            ),
            (
                hello(0, 4, Some((2, 2, 1))),
                "field layout.replica_group: ",
                "1, but rank 0 is in replica group 0",
            ),
            (hello(1, 8, None), "field world_size: ", "8, but the job is laid out as"),
        ] {
            let r = j.declare(&d).unwrap_err();
            assert_eq!(r.reason, Reason::Layout, "{r}");
            assert_eq!(r.status().code(), tonic::Code::InvalidArgument);
            assert!(r.message.starts_with(field) && r.message.contains(value), "{r}");
        }
        // The job's world size is the layout's: rank 4 is beyond it.
        assert_eq!(j.declare(&hello(1, 0, Some((2, 2, 0)))), Ok(false));
        let (mut scratch, mut out) = (Summary::default(), Output::default());
        let p = proto::Summary {
            step: 1,
            grad_norm: Some(1.0),
            ..Default::default()
        };
        let r = j.summary("a", 4, &p, 1.0, &mut scratch, &mut out).unwrap_err();
        assert_eq!(r.reason, Reason::RankOutOfRange, "{r}");
    }
}
