//! How a job is laid out over its ranks, as their Hellos declare it, so that
//! the rank outlier rule compares a rank only with those holding the same
//! part of the model (its replica group).

use std::fmt;

use super::{EngineError, MAX_RANKS};

/// `data_parallel × tensor_parallel × pipeline_parallel` ranks. The model is
/// cut into `tensor_parallel × pipeline_parallel` parts, each held by one
/// replica group of `data_parallel` ranks whose norms are comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub data_parallel: u32,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
}

impl Layout {
    /// The ranks it lays out (three `u32` sizes multiply into a `u128`).
    pub fn ranks(&self) -> u128 {
        u128::from(self.data_parallel) * u128::from(self.groups())
    }

    /// Its replica groups: `tensor_parallel × pipeline_parallel`.
    pub fn groups(&self) -> u64 {
        u64::from(self.tensor_parallel) * u64::from(self.pipeline_parallel)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data_parallel {} × tensor_parallel {} × pipeline_parallel {} = {} ranks",
            self.data_parallel,
            self.tensor_parallel,
            self.pipeline_parallel,
            self.ranks()
        )
    }
}

/// A rank's place in its job's layout, as its Hello declared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub layout: Layout,
    pub rank: u32,
    /// Ranks of one replica group hold the same part of the model; below
    /// [`Layout::groups`].
    pub replica_group: u32,
}

/// A refusal about the layout, naming the Hello's field.
fn refused(field: &'static str, message: String) -> EngineError {
    EngineError::Layout { field, message }
}

impl Placement {
    /// Whether it is a placement at all: sizes of at least 1, at most
    /// [`MAX_RANKS`] ranks (`world_size`, when given), the rank and its group
    /// within them.
    pub fn check(&self, world_size: Option<u32>) -> Result<(), EngineError> {
        let l = &self.layout;
        for (name, size) in [
            ("layout.data_parallel", l.data_parallel),
            ("layout.tensor_parallel", l.tensor_parallel),
            ("layout.pipeline_parallel", l.pipeline_parallel),
        ] {
            if size == 0 {
                return Err(refused(name, "0, must be at least 1".into()));
            }
        }
        if l.ranks() > u128::from(MAX_RANKS) {
            return Err(refused("layout", format!("{l}, above the limit of {MAX_RANKS}")));
        }
        if let Some(w) = world_size
            && u128::from(w) != l.ranks()
        {
            return Err(refused("layout", format!("{l}, but world_size is {w}")));
        }
        if u64::from(self.replica_group) >= l.groups() {
            return Err(refused(
                "layout.replica_group",
                format!(
                    "{} is not below tensor_parallel {} × pipeline_parallel {} = {}",
                    self.replica_group,
                    l.tensor_parallel,
                    l.pipeline_parallel,
                    l.groups()
                ),
            ));
        }
        if u128::from(self.rank) >= l.ranks() {
            return Err(refused("rank", format!("{} is not below the layout's {l}", self.rank)));
        }
        Ok(())
    }
}

/// Checks a rank's declaration against the layout its job already has
/// (`have`): the same sizes, and a world size that is its number of ranks.
pub fn agrees(have: Option<Layout>, placement: Option<&Placement>, world_size: Option<u32>) -> Result<(), EngineError> {
    let Some(have) = have else { return Ok(()) };
    if let Some(p) = placement
        && p.layout != have
    {
        return Err(refused(
            "layout",
            format!("{}, but the job is laid out as {have}", p.layout),
        ));
    }
    if let Some(w) = world_size
        && u128::from(w) != have.ranks()
    {
        return Err(refused("world_size", format!("{w}, but the job is laid out as {have}")));
    }
    Ok(())
}
