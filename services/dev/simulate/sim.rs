//! The simulation in progress: plays the scenario step by step, takes the
//! advice between steps (printed, applied with `--apply-advice`, acked), and
//! reads every stream to its end.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use gradguard::model::Action;
use gradguard::proto::{self, worker_message};
use gradguard::scenario::{Fault, Scenario};
use gradguard::wire;
use tokio::sync::mpsc;
use tonic::Status;

use super::judge::{Record, verdict};
use super::print::{Outcome, Printer};
use super::transport::{Broken, Event, Transport};
use super::{DRAIN_TIMEOUT, SimulateArgs};

/// One advice as the job received it.
#[derive(Debug, Clone)]
pub(super) struct Taken {
    /// `None`: an action this client does not know (a newer server).
    pub(super) action: Option<Action>,
    decided_at: u64,
    /// The step about to be played when the job first saw it.
    pub(super) received_at: u64,
    pub(super) applied_at: Option<u64>,
}

/// The simulation in progress: the scenario, the streams, the advice taken and
/// the record of what was sent.
pub(super) struct Sim {
    pub(super) scenario: Scenario,
    ranks: Transport,
    events: mpsc::UnboundedReceiver<Event>,
    /// Kafka: the cluster did not confirm it processed the job.
    pub(super) settle_error: Option<anyhow::Error>,
    /// How each rank's stream ended, once it has.
    pub(super) ends: Vec<Option<Result<(), Status>>>,
    advice: HashMap<u64, Taken>,
    apply: bool,
    interval: Duration,
    record: Record,
    pub(super) out: Printer,
}

impl Sim {
    pub(super) fn new(
        args: &SimulateArgs,
        scenario: Scenario,
        ranks: Transport,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        let cfg = scenario.config();
        Self {
            record: Record::new(cfg.workers, cfg.fault_at),
            ends: (0..cfg.workers).map(|_| None).collect(),
            settle_error: None,
            scenario,
            ranks,
            events,
            advice: HashMap::new(),
            apply: args.apply_advice,
            interval: args.step_interval,
            out: Printer::new(args.json),
        }
    }

    /// Plays the scenario to its end (or until advice halts it): advice first,
    /// then each rank's summary, then the step interval. Stops early when a
    /// stream goes away.
    pub(super) async fn play(&mut self) -> Result<(), Broken> {
        loop {
            let step = self.scenario.step();
            self.take_pending(step).await?;
            let Some(batch) = self.scenario.next_step() else {
                return Ok(());
            };
            for s in &batch {
                let body = worker_message::Body::Summary(wire::summary_to_proto(s));
                if self.ranks.send(s.worker, body).await.is_err() {
                    return Err(Broken { rank: s.worker, step });
                }
            }
            self.record.step(step, &batch);
            if !self.interval.is_zero() {
                tokio::time::sleep(self.interval).await;
            }
        }
    }

    /// Takes every advice forwarded so far, before `step` is played.
    async fn take_pending(&mut self, step: u64) -> Result<(), Broken> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Advice(rank, advice) => {
                    let taken = self.take(&advice, step);
                    self.ack(rank, &advice, &taken, step)
                        .await
                        .map_err(|_| Broken { rank, step })?;
                }
                Event::Ended(rank, end) => {
                    self.ends[rank as usize] = Some(end);
                    return Err(Broken { rank, step });
                }
            }
        }
        Ok(())
    }

    /// Prints and (with `--apply-advice`) applies an advice the first time any
    /// rank brings it; returns how the job took it.
    fn take(&mut self, advice: &proto::Advice, step: u64) -> Taken {
        if let Some(taken) = self.advice.get(&advice.id) {
            return taken.clone();
        }
        let action = advice.action.as_ref().map(wire::action_from_proto);
        let applied_at = match action {
            Some(a) if self.apply => {
                self.scenario.apply(&a);
                Some(step)
            }
            _ => None,
        };
        let taken = Taken {
            action,
            decided_at: advice.decided_at_step,
            received_at: step,
            applied_at,
        };
        self.out.advice(advice, &taken);
        self.advice.insert(advice.id, taken.clone());
        taken
    }

    /// Acks an advice on the stream of the rank that received it.
    async fn ack(&self, rank: u32, advice: &proto::Advice, taken: &Taken, step: u64) -> Result<(), ()> {
        let note = match (taken.applied_at, taken.action) {
            (Some(_), _) => "applied by gradguard simulate",
            (None, None) => "unknown action",
            (None, Some(_)) => "not applied: simulate runs without --apply-advice",
        };
        let ack = proto::AdviceAck {
            advice_id: advice.id,
            applied_step: taken.applied_at.unwrap_or(step),
            applied: taken.applied_at.is_some(),
            note: note.to_owned(),
        };
        self.ranks.send(rank, worker_message::Body::Ack(ack)).await
    }

    /// Ends the sending halves and reads every stream to its end, printing
    /// advice that came after the last step. True when a stream did not end
    /// within [`DRAIN_TIMEOUT`].
    pub(super) async fn finish(&mut self) -> bool {
        match &mut self.ranks {
            Transport::Grpc(r) => r.senders.clear(),
            Transport::Kafka(w) => {
                if let Err(e) = w.settle(DRAIN_TIMEOUT).await {
                    self.settle_error = Some(e);
                    return false;
                }
            }
        }
        let after = self.scenario.step();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(event) = self.events.recv().await {
                match event {
                    Event::Advice(_, advice) => {
                        self.take_late(&advice, after);
                    }
                    Event::Ended(rank, end) => self.ends[rank as usize] = Some(end),
                }
            }
        })
        .await;
        if let Transport::Grpc(r) = &mut self.ranks {
            r.clients.clear();
        }
        drained.is_err()
    }

    /// Advice that arrived after the run: shown, never applied.
    fn take_late(&mut self, advice: &proto::Advice, after: u64) {
        if self.advice.contains_key(&advice.id) {
            return;
        }
        let taken = Taken {
            action: advice.action.as_ref().map(wire::action_from_proto),
            decided_at: advice.decided_at_step,
            received_at: after,
            applied_at: None,
        };
        self.out.advice(advice, &taken);
        self.advice.insert(advice.id, taken);
    }

    pub(super) fn summary(&self, error: Option<&str>) -> Outcome {
        let cfg = self.scenario.config();
        let plan = self.scenario.plan();
        let names = self.scenario.layer_names();
        let mut by_action: BTreeMap<&'static str, u64> = Action::NAMES.iter().map(|&n| (n, 0)).collect();
        for t in self.advice.values() {
            *by_action
                .entry(t.action.as_ref().map_or("unknown", Action::name))
                .or_default() += 1;
        }
        let lags = self.advice.values().map(|t| t.received_at.saturating_sub(t.decided_at));
        let halted_at = (self.scenario.finished() && self.scenario.step() < cfg.steps).then(|| self.scenario.step());
        let (before, after) = (self.record.before(), self.record.after());
        let problems = self.record.problems(before.as_ref(), after.as_ref());
        Outcome {
            job: cfg.job.clone(),
            workers: cfg.workers,
            layers: cfg.layers,
            fault: plan.fault,
            fault_at: (plan.fault != Fault::Healthy).then_some(plan.at),
            fault_rank: plan.rank,
            fault_layer: plan.layer.and_then(|i| names.get(i).cloned()),
            steps_sent: self.record.steps,
            summaries_sent: self.record.summaries,
            last_step: self.record.last_step,
            halted_at,
            by_action,
            advice: self.advice.len() as u64,
            applied: self.advice.values().filter(|t| t.applied_at.is_some()).count() as u64,
            apply: self.apply,
            lag: lags.clone().min().zip(lags.max()),
            before,
            after,
            // Only a hint to follow advice when there was advice to follow.
            verdict: verdict(
                plan.fault,
                halted_at,
                error.is_some(),
                &problems,
                self.apply || self.advice.is_empty(),
            ),
            problems,
            error: error.map(str::to_owned),
            anomalies: Err("not asked".to_owned()),
        }
    }
}
