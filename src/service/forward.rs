//! Cluster mode's [`Mode`]: the replica that holds a worker's stream hands
//! what the intake accepted to the summaries topic, where the job's owner
//! judges it; the advice comes back over the advice topic.
//!
//! What can be checked here is, so the worker hears of it on its stream:
//! the Hello, the layer arrays against the stream's Hello, the step order of
//! each rank, and the number of jobs. The owner's intake checks again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::mode::{Greeting, Mode, Shape};
use crate::cluster::relay::Forwarder;
use crate::config::{RuleBook, Rules};
use crate::engine::{EngineError, Layout, Output, layout_agrees};
use crate::intake::{Declared, IntakeMetrics, Limits, Refusal, convert};
use crate::model::{JobId, Severity, Summary};
use crate::proto::{self, worker_message::Body};

pub struct Forwarding {
    forwarder: Arc<Forwarder>,
    book: RuleBook,
    limits: Limits,
    metrics: IntakeMetrics,
    jobs: HashMap<JobId, Forwarded>,
}

/// What this replica forwarded of a job.
#[derive(Default)]
struct Forwarded {
    world_size: Option<u32>,
    /// The layout of the first Hello that had one.
    layout: Option<Layout>,
    layers: usize,
    profile: Option<String>,
    /// The last step forwarded per rank (steps must increase).
    last_step: HashMap<u32, u64>,
}

impl Forwarding {
    pub fn new(forwarder: Arc<Forwarder>, book: RuleBook, limits: Limits, metrics: IntakeMetrics) -> Self {
        Self {
            forwarder,
            book,
            limits,
            metrics,
            jobs: HashMap::new(),
        }
    }
}

impl Forwarding {
    /// Declares the rank here and to the job's owner (its Hello goes to the
    /// summaries topic, ahead of the rank's summaries). A layout that
    /// disagrees with the one this replica saw is refused here, as the owner
    /// would (a rank's replica group is the owner's to check).
    fn declare(&mut self, d: &Declared, hello: &proto::Hello) -> Result<&Forwarded, Refusal> {
        let job = self.jobs.entry(d.job.clone()).or_default();
        layout_agrees(job.layout, d.placement.as_ref(), d.world_size)?;
        job.layout = job.layout.or(d.placement.map(|p| p.layout));
        job.world_size = d.world_size.or(job.world_size);
        job.layers = job.layers.max(d.layer_names.len());
        job.profile = d.profile.clone().or(job.profile.take());
        self.forwarder.send(&d.job, d.rank, Body::Hello(hello.clone()));
        Ok(job)
    }
}

impl Mode for Forwarding {
    fn hello(&mut self, d: &Declared, hello: &proto::Hello) -> Result<Greeting, Refusal> {
        // An unknown profile is refused here, as the owner would.
        d.check_profile(&self.book)?;
        if !self.jobs.contains_key(&d.job) {
            return Ok(Greeting::Pending);
        }
        let job = self.declare(d, hello)?;
        Ok(Greeting::Held {
            last_step: job.last_step.get(&d.rank).copied(),
        })
    }

    fn admit(&mut self, d: &Declared, hello: &proto::Hello) -> Result<(), Refusal> {
        if !self.jobs.contains_key(&d.job) {
            self.limits.admit_job(&d.job, self.jobs.len(), &self.metrics)?;
        }
        self.declare(d, hello)?;
        Ok(())
    }

    fn summary(
        &mut self,
        d: &Declared,
        p: &proto::Summary,
        now: f64,
        scratch: &mut Summary,
        _: &mut Output,
    ) -> Result<(), Refusal> {
        convert(p, d.rank, d.layer_names.len(), now, scratch)?;
        let job = self.jobs.entry(d.job.clone()).or_default();
        let (worker, step) = (d.rank, p.step);
        match job.last_step.get(&worker) {
            Some(&last) if step == last => return Err(EngineError::DuplicateStep { worker, step }.into()),
            Some(&last) if step < last => return Err(EngineError::StepBackwards { worker, step, last }.into()),
            _ => {}
        }
        job.last_step.insert(worker, step);
        // Queued under the hub's lock: a rank's messages keep their order.
        self.forwarder.send(&d.job, d.rank, Body::Summary(p.clone()));
        Ok(())
    }

    fn ack(&mut self, d: &Declared, ack: &proto::AdviceAck) {
        // The job's owner acts on it (a rollback rewinds its engine).
        self.forwarder.send(&d.job, d.rank, Body::Ack(ack.clone()));
    }

    fn published(&mut self, _: &Output) {}

    fn tick(&mut self, _: f64, _: &mut Output) {}

    fn forget(&mut self, job: &str) {
        self.jobs.remove(job);
    }

    fn shape(&self, job: &str) -> Option<Shape> {
        let j = self.jobs.get(job)?;
        Some(Shape {
            ranks: j.last_step.len(),
            world_size: j.world_size,
            layers: j.layers,
            last_step: j.last_step.values().copied().max(),
            health: None,
        })
    }

    fn health(&self, _: &str) -> Option<Severity> {
        None
    }

    fn rules_for(&self, d: &Declared) -> Result<Rules, String> {
        let tracked = self.jobs.get(&*d.job).and_then(|j| j.profile.as_deref());
        self.book
            .for_job(&d.job, tracked.or(d.profile.as_deref()))
            .map_err(|e| e.to_string())
    }

    fn rules(&self, job: &str) -> Result<Rules, String> {
        if job.is_empty() {
            return Ok(self.book.defaults().clone());
        }
        let profile = self.jobs.get(job).and_then(|j| j.profile.as_deref());
        self.book.for_job(job, profile).map_err(|e| e.to_string())
    }

    fn decides(&self) -> bool {
        false
    }

    fn handover(&self) -> Option<Box<dyn FnOnce() + Send>> {
        let forwarder = self.forwarder.clone();
        Some(Box::new(move || forwarder.flush(Duration::from_secs(30))))
    }
}
