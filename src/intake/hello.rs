//! The Hello: what a worker says first, checked field by field.

use std::sync::Arc;

use super::{Limits, Reason, Refusal};
use crate::config::RuleBook;
use crate::engine::{EngineError, JobSpec, Layout, Placement};
use crate::model::JobId;
use crate::proto;

/// A rank of a job, as its accepted Hello declared it.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub job: JobId,
    pub rank: u32,
    pub layer_names: Arc<[String]>,
    pub world_size: Option<u32>,
    pub profile: Option<String>,
    /// The worker asked for a Progress after each summary.
    pub progress: bool,
    /// The rank's place in the job's layout, when the Hello gave one (its
    /// world size is then the layout's).
    pub placement: Option<Placement>,
}

impl Declared {
    /// The one check of a Hello that needs no job state: its rule profile
    /// exists in `book` (as the job's owner would find).
    pub fn check_profile(&self, book: &RuleBook) -> Result<(), Refusal> {
        book.for_job(&self.job, self.profile.as_deref())
            .map(drop)
            .map_err(|e| Refusal::from(&EngineError::from(e)))
    }

    pub fn spec(&self) -> JobSpec<'_> {
        JobSpec {
            layer_names: &self.layer_names,
            world_size: self.world_size,
            profile: self.profile.as_deref(),
            placement: self.placement,
        }
    }

    /// The Hello's layout, as it came (to forward the Hello).
    pub fn layout(&self) -> Option<proto::Layout> {
        self.placement.map(|p| proto::Layout {
            data_parallel: p.layout.data_parallel,
            tensor_parallel: p.layout.tensor_parallel,
            pipeline_parallel: p.layout.pipeline_parallel,
            replica_group: p.replica_group,
        })
    }
}

impl Limits {
    /// Checks a Hello field by field against the limits.
    pub fn check_hello(&self, h: proto::Hello) -> Result<Declared, Refusal> {
        let invalid = |m: String| Refusal::new(Reason::InvalidHello, m);
        if h.job.is_empty() {
            return Err(Refusal::new(Reason::EmptyJob, "field job: must not be empty"));
        }
        if h.job.len() > self.max_job_len {
            return Err(invalid(format!(
                "field job: {} bytes, longer than the limit of {}",
                h.job.len(),
                self.max_job_len
            )));
        }
        if h.world_size > self.max_world_size {
            return Err(invalid(format!(
                "field world_size: {} is above the limit of {}",
                h.world_size, self.max_world_size
            )));
        }
        if h.world_size > 0 && h.rank >= h.world_size {
            return Err(Refusal::new(
                Reason::RankOutOfRange,
                format!("field rank: {} is not below world_size {}", h.rank, h.world_size),
            ));
        }
        if h.rank >= self.max_world_size {
            return Err(Refusal::new(
                Reason::RankOutOfRange,
                format!("field rank: {} is above the limit of {}", h.rank, self.max_world_size),
            ));
        }
        let placement = h
            .layout
            .map(|l| self.check_layout(&l, h.rank, h.world_size))
            .transpose()?;
        let long = |field: &str, len: usize| {
            Refusal::new(
                Reason::TooLong,
                format!(
                    "field {field}: {len} bytes, longer than the limit of {}",
                    self.max_name_len
                ),
            )
        };
        if let Some((i, name)) = h
            .layer_names
            .iter()
            .enumerate()
            .find(|(_, n)| n.len() > self.max_name_len)
        {
            return Err(long(&format!("layer_names[{i}]"), name.len()));
        }
        if h.rule_profile.len() > self.max_name_len {
            return Err(long("rule_profile", h.rule_profile.len()));
        }
        if h.client_version.len() > self.max_name_len {
            return Err(long("client_version", h.client_version.len()));
        }
        if h.layer_names.len() > self.max_layers {
            return Err(Refusal::new(
                Reason::TooManyLayers,
                format!(
                    "field layer_names: {} names, more than the limit of {}",
                    h.layer_names.len(),
                    self.max_layers
                ),
            ));
        }
        let world_size = (h.world_size > 0).then_some(h.world_size);
        Ok(Declared {
            job: Arc::from(h.job),
            rank: h.rank,
            layer_names: h.layer_names.into(),
            // A layout's ranks are the world (checked equal when both are given).
            world_size: world_size.or(placement.map(|p| p.layout.ranks() as u32)),
            profile: (!h.rule_profile.is_empty()).then_some(h.rule_profile),
            progress: h.report_progress,
            placement,
        })
    }

    /// Checks a Hello's layout ([`Placement::check`]) and that its ranks are
    /// within `max_world_size`.
    fn check_layout(&self, l: &proto::Layout, rank: u32, world_size: u32) -> Result<Placement, Refusal> {
        let placement = Placement {
            layout: Layout {
                data_parallel: l.data_parallel,
                tensor_parallel: l.tensor_parallel,
                pipeline_parallel: l.pipeline_parallel,
            },
            rank,
            replica_group: l.replica_group,
        };
        if placement.layout.ranks() > u128::from(self.max_world_size) {
            return Err(Refusal::new(
                Reason::InvalidHello,
                format!(
                    "field layout: {}, above the limit of {}",
                    placement.layout, self.max_world_size
                ),
            ));
        }
        placement.check((world_size > 0).then_some(world_size))?;
        Ok(placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(job: &str, rank: u32, world_size: u32, layers: usize) -> proto::Hello {
        proto::Hello {
            job: job.into(),
            rank,
            world_size,
            layer_names: (0..layers).map(|i| format!("l{i}")).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_field_is_checked_and_named() {
        let limits = Limits::default();
        let refused = |h| limits.check_hello(h).unwrap_err();
        let r = refused(hello("", 0, 1, 1));
        assert_eq!(
            (r.reason, r.message.as_str()),
            (Reason::EmptyJob, "field job: must not be empty")
        );
        let r = refused(hello(&"j".repeat(limits.max_job_len + 1), 0, 1, 1));
        assert_eq!(r.reason, Reason::InvalidHello);
        assert!(r.message.starts_with("field job: 257 bytes"), "{r}");
        let r = refused(hello("j", 4, 4, 1));
        assert_eq!(r.reason, Reason::RankOutOfRange);
        assert!(r.message.contains("field rank: 4 is not below world_size 4"), "{r}");
        let r = refused(hello("j", 0, limits.max_world_size + 1, 1));
        assert!(r.message.starts_with("field world_size"), "{r}");
        let r = refused(hello("j", 0, 1, limits.max_layers + 1));
        assert_eq!(r.reason, Reason::TooManyLayers);
        let mut long = hello("j", 0, 1, 3);
        long.layer_names[2] = "n".repeat(1 << 20);
        let r = refused(long);
        assert_eq!(r.reason, Reason::TooLong);
        assert_eq!(
            r.message,
            "field layer_names[2]: 1048576 bytes, longer than the limit of 256"
        );
        let r = refused(proto::Hello {
            rule_profile: "p".repeat(257),
            ..hello("j", 0, 1, 1)
        });
        assert!(r.message.starts_with("field rule_profile: 257 bytes"), "{r}");

        let d = limits
            .check_hello(proto::Hello {
                rule_profile: "noisy".into(),
                report_progress: true,
                ..hello("j", 2, 0, 3)
            })
            .unwrap();
        assert_eq!((&*d.job, d.rank, d.world_size), ("j", 2, None));
        assert_eq!(
            (d.profile.as_deref(), d.progress, d.layer_names.len()),
            (Some("noisy"), true, 3)
        );
    }

    fn laid_out(rank: u32, world_size: u32, dp: u32, tp: u32, pp: u32, group: u32) -> proto::Hello {
        proto::Hello {
            layout: Some(proto::Layout {
                data_parallel: dp,
                tensor_parallel: tp,
                pipeline_parallel: pp,
                replica_group: group,
            }),
            ..hello("j", rank, world_size, 1)
        }
    }

    #[test]
    fn a_layout_is_checked_field_by_field_and_gives_the_world_size() {
        let limits = Limits {
            max_world_size: 64,
            ..Limits::default()
        };
        let refused = |h| limits.check_hello(h).unwrap_err();
        for (h, reason, message) in [
            (
                laid_out(0, 8, 0, 2, 2, 0),
                Reason::Layout,
                "field layout.data_parallel: 0, must be at least 1",
            ),
            (
                laid_out(0, 8, 2, 2, 0, 0),
                Reason::Layout,
                "field layout.pipeline_parallel: 0, must be at least 1",
            ),
            (
                laid_out(0, 8, 2, 2, 4, 0),
                Reason::Layout,
                "field layout: data_parallel 2 × tensor_parallel 2 × pipeline_parallel 4 = 16 ranks, \
                 but world_size is 8",
            ),
            (
                laid_out(0, 8, 2, 2, 2, 4),
                Reason::Layout,
                "field layout.replica_group: 4 is not below tensor_parallel 2 × pipeline_parallel 2 = 4",
            ),
            (
                laid_out(8, 0, 2, 2, 2, 0),
                Reason::RankOutOfRange,
                "field rank: 8 is not below the layout's data_parallel 2 × tensor_parallel 2 × \
                 pipeline_parallel 2 = 8 ranks",
            ),
            // The limit bounds the product, whatever the world size says;
            // u32 sizes multiply without overflow.
            (
                laid_out(0, 0, u32::MAX, u32::MAX, u32::MAX, 0),
                Reason::InvalidHello,
                "field layout: data_parallel 4294967295 × tensor_parallel 4294967295 × pipeline_parallel \
                 4294967295 = 79228162458924105385300197375 ranks, above the limit of 64",
            ),
        ] {
            let r = refused(h);
            assert_eq!((r.reason, r.message.as_str()), (reason, message));
        }

        let d = limits.check_hello(laid_out(5, 0, 2, 2, 2, 3)).unwrap();
        assert_eq!(d.world_size, Some(8), "the layout's ranks are the world");
        let p = d.placement.unwrap();
        assert_eq!((p.rank, p.replica_group, p.layout.ranks()), (5, 3, 8));
        assert_eq!(d.layout(), laid_out(5, 0, 2, 2, 2, 3).layout, "forwarded as it came");
        assert_eq!(d.spec().placement, Some(p));
        let d = limits.check_hello(hello("j", 1, 4, 1)).unwrap();
        assert_eq!((d.placement, d.layout()), (None, None));
    }
}
