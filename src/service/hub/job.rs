//! A job's entry in the hub: its ranks' streams and the advice it gave.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::Outbox;
use crate::clock::unix_now;
use crate::proto;
use crate::service::metrics::JobGauges;
use crate::service::mode::Shape;
use crate::store::JobRow;

pub(super) struct Job {
    /// The open stream of each rank.
    pub(super) streams: HashMap<u32, Stream>,
    pub(super) last_active: Instant,
    pub(super) gauges: JobGauges,
    /// When the service first saw it (since this start), seconds since the epoch.
    pub(super) first_seen: f64,
    pub(super) last_seen: f64,
    /// Changed since its row was last recorded.
    pub(super) dirty: bool,
    /// The job's latest advice, to act on acknowledgements.
    pub(super) recent: VecDeque<Recent>,
    /// The latest job-wide advice, for a rank that joins after it was given.
    pub(super) in_force: VecDeque<proto::ServerMessage>,
    /// Ranks that have had a stream attached since the job was tracked.
    pub(super) ranks_seen: HashSet<u32>,
}

/// An advice remembered for acknowledgements.
pub(super) struct Recent {
    pub(super) id: u64,
    /// Some rank acknowledged it (applied or not).
    pub(super) acked: bool,
}

/// Advice remembered per job for acknowledgements.
const RECENT_ADVICE: usize = 64;
/// Job-wide advice a rank joining late is sent.
const IN_FORCE: usize = 16;

impl Job {
    pub(super) fn new(gauges: JobGauges) -> Self {
        Self {
            streams: HashMap::new(),
            last_active: Instant::now(),
            gauges,
            first_seen: unix_now(),
            last_seen: unix_now(),
            dirty: true,
            recent: VecDeque::new(),
            in_force: VecDeque::new(),
            ranks_seen: HashSet::new(),
        }
    }

    pub(super) fn set_streams(&self) {
        self.gauges.streams.set(self.streams.len() as f64);
    }

    pub(super) fn set_unacked(&self) {
        let unacked = self.recent.iter().filter(|r| !r.acked).count();
        self.gauges.unacked.set(unacked as f64);
    }

    /// Remembers an advice for its acknowledgements (and a job-wide one for
    /// ranks that join later), and returns the queues of the streams it goes
    /// to (its target rank, or all).
    pub(super) fn advised(&mut self, id: u64, target: Option<u32>, message: &proto::ServerMessage) -> Vec<Outbox> {
        if self.recent.len() == RECENT_ADVICE {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent { id, acked: false });
        if target.is_none() {
            if self.in_force.len() == IN_FORCE {
                self.in_force.pop_front();
            }
            self.in_force.push_back(message.clone());
        }
        self.set_unacked();
        self.streams
            .iter()
            .filter(|(rank, _)| target.is_none_or(|t| t == **rank))
            .map(|(_, s)| s.outbox.clone())
            .collect()
    }

    pub(super) fn row(&self, id: &str, shape: Shape) -> JobRow {
        JobRow {
            job: id.to_owned(),
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            ranks: shape.ranks as u32,
            world_size: shape.world_size,
            layers: shape.layers as u32,
            last_step: shape.last_step,
            health: shape.health,
        }
    }
}

pub(super) struct Stream {
    pub(super) id: u64,
    pub(super) outbox: Outbox,
    pub(super) principal: Option<Arc<str>>,
}
