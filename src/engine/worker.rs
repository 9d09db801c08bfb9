//! One rank's detection state and the per-rank rules, run in a fixed order.

use crate::config::Rules;
use crate::engine::hit::Emitter;
use crate::engine::rules::{Obs, blowup, grad, layers, loss, loss_scale, nonfinite};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct WorkerState {
    /// Records this rank has reported (its own clock for the rules that count
    /// records rather than steps).
    records: u64,
    nonfinite: nonfinite::State,
    blowup: blowup::State,
    grad: grad::State,
    loss: loss::State,
    layers: layers::State,
    loss_scale: loss_scale::State,
}

impl WorkerState {
    pub fn new(rules: &Rules) -> Self {
        Self {
            records: 0,
            nonfinite: nonfinite::State::default(),
            blowup: blowup::State::default(),
            grad: grad::State::new(rules),
            loss: loss::State::new(rules),
            layers: layers::State::default(),
            loss_scale: loss_scale::State::default(),
        }
    }

    pub fn observe(&mut self, obs: &Obs, rules: &Rules, em: &mut Emitter) {
        let s = obs.s;
        let record = self.records;
        self.records += 1;
        nonfinite::check(&mut self.nonfinite, obs, &rules.nonfinite, em);
        let levels = blowup::Levels {
            norm: self.grad.level(rules),
            loss: self.loss.level(),
        };
        blowup::check(&mut self.blowup, obs, rules, &levels, em);
        let cx = grad::Context {
            loss: self.loss.trend(rules.grad_growth.loss_fall),
            early_norm: self.blowup.norm_ref(),
            record,
        };
        grad::check(&mut self.grad, obs, rules, &cx, em);
        loss::check(&mut self.loss, s.step, s.loss, self.grad.last_spike, record, rules, em);
        layers::check(&mut self.layers, obs, rules, em);
        loss_scale::check(&mut self.loss_scale, s.step, s.loss_scale, rules, em);
    }

    /// Bytes this rank's state holds, inline and on the heap.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.grad.heap_bytes() + self.loss.heap_bytes() + self.layers.heap_bytes()
    }
}
