//! What a hub does with the messages its streams accepted: judge them here
//! (the intake's [`Judge`], embedded mode) or hand them to the job's owner
//! (`forward::Forwarding`, cluster mode).

use crate::config::Rules;
use crate::engine::Output;
use crate::intake::{Declared, Judge, Refusal};
use crate::model::{Severity, Summary};
use crate::proto;

/// What a job looks like to the mode, for its row.
pub struct Shape {
    pub ranks: usize,
    pub world_size: Option<u32>,
    pub layers: usize,
    pub last_step: Option<u64>,
    pub health: Option<Severity>,
}

/// What a stream's Hello found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// The job is held (it has had a summary): the rank is declared, and
    /// resumes after its last accepted step.
    Held { last_step: Option<u64> },
    /// The job is not held yet: it takes a slot (`--max-jobs`) only when
    /// its first summary comes ([`Mode::admit`]), so Hellos alone cost no
    /// job state.
    Pending,
}

/// What a hub does with the messages its streams accepted; called under the
/// hub's lock, so nothing here waits.
pub trait Mode: Send + 'static {
    /// A stream's checked Hello: declares its rank if the job is held, else
    /// only checks what can be checked without taking a slot.
    fn hello(&mut self, d: &Declared, hello: &proto::Hello) -> Result<Greeting, Refusal>;
    /// The first summary of a job this mode does not hold: takes the job's
    /// slot (or refuses, `--max-jobs`) and declares the rank.
    fn admit(&mut self, d: &Declared, hello: &proto::Hello) -> Result<(), Refusal>;
    /// One summary of a declared rank; what it leads to joins `out`.
    fn summary(
        &mut self,
        d: &Declared,
        p: &proto::Summary,
        now: f64,
        scratch: &mut Summary,
        out: &mut Output,
    ) -> Result<(), Refusal>;
    fn ack(&mut self, d: &Declared, ack: &proto::AdviceAck);
    /// Books the output about to go out (findings' and advice's metrics).
    fn published(&mut self, out: &Output);
    /// Periodic work against the service's clock.
    fn tick(&mut self, now: f64, out: &mut Output);
    fn forget(&mut self, job: &str);
    /// The job's row data; walks its state, so not for every summary.
    fn shape(&self, job: &str) -> Option<Shape>;
    /// The job's worst open problem (cheap: the gauge after every summary).
    fn health(&self, job: &str) -> Option<Severity>;
    /// A job's effective rules: the tracked job's own, else what the rules
    /// file gives it (the defaults for an empty name).
    fn rules(&self, job: &str) -> Result<Rules, String>;
    /// The rules a stream's Hello will be judged by: its tracked job's, else
    /// what the rules file gives the job with the Hello's profile.
    fn rules_for(&self, d: &Declared) -> Result<Rules, String>;
    /// Whether this replica decides (a Progress means "judged"; job rows are
    /// this replica's to record).
    fn decides(&self) -> bool;
    /// What "everything handed over" waits for, when it is not the store:
    /// a blocking flush, run off the async runtime.
    fn handover(&self) -> Option<Box<dyn FnOnce() + Send>>;
}

impl Mode for Judge {
    fn hello(&mut self, d: &Declared, _: &proto::Hello) -> Result<Greeting, Refusal> {
        if !self.engine().has_job(&d.job) {
            d.check_profile(self.engine().rule_book())?;
            return Ok(Greeting::Pending);
        }
        self.declare(d)?;
        Ok(Greeting::Held {
            last_step: self.engine().last_step(&d.job, d.rank),
        })
    }

    fn admit(&mut self, d: &Declared, _: &proto::Hello) -> Result<(), Refusal> {
        self.declare(d).map(drop)
    }

    fn summary(
        &mut self,
        d: &Declared,
        p: &proto::Summary,
        now: f64,
        scratch: &mut Summary,
        out: &mut Output,
    ) -> Result<(), Refusal> {
        Judge::summary(self, &d.job, d.rank, p, now, scratch, out)
    }

    fn ack(&mut self, d: &Declared, ack: &proto::AdviceAck) {
        Judge::ack(self, &d.job, d.rank, ack);
    }

    fn published(&mut self, out: &Output) {
        for f in &out.findings {
            self.found(f);
        }
        for a in &out.advice {
            self.advised(a);
        }
    }

    fn tick(&mut self, now: f64, out: &mut Output) {
        Judge::tick(self, now, out);
    }

    fn forget(&mut self, job: &str) {
        Judge::forget(self, job);
    }

    fn shape(&self, job: &str) -> Option<Shape> {
        let status = self.engine().status(job)?;
        Some(Shape {
            ranks: status.ranks,
            world_size: status.world_size,
            layers: status.layers,
            last_step: status.max_step,
            health: self.engine().health(job),
        })
    }

    fn health(&self, job: &str) -> Option<Severity> {
        self.engine().health(job)
    }

    fn rules_for(&self, d: &Declared) -> Result<Rules, String> {
        let engine = self.engine();
        if engine.has_job(&d.job) {
            Ok(engine.rules(&d.job).clone())
        } else {
            engine
                .rule_book()
                .for_job(&d.job, d.profile.as_deref())
                .map_err(|e| e.to_string())
        }
    }

    fn rules(&self, job: &str) -> Result<Rules, String> {
        let engine = self.engine();
        if engine.has_job(job) {
            Ok(engine.rules(job).clone())
        } else if job.is_empty() {
            Ok(engine.rule_book().defaults().clone())
        } else {
            engine.rule_book().for_job(job, None).map_err(|e| e.to_string())
        }
    }

    fn decides(&self) -> bool {
        true
    }

    fn handover(&self) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }
}
