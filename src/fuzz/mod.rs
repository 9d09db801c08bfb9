//! Differential checks of the hand-written decoding against prost's
//! generated decoder, shared by `tests/differential.rs` (proptest, in CI)
//! and `examples/differential.rs` (a million cases and more).
//!
//! What is decoded by hand:
//! - a worker message (`intake::Decoder`): the fast paths of
//!   `wire::lone_summary` and `wire::batch_summaries`, which frame the
//!   message themselves and decode each summary into reused vectors, then
//!   the conversion `intake::convert` (`wire::summary_into`) into a reused
//!   domain summary;
//! - a summaries-topic record (`cluster::summaries_record`): its key, its
//!   `rank` header, its payload ([`record`]).
//!
//! The reference is `proto::WorkerMessage::decode` of the whole message,
//! its body handed over the plain way, each summary converted into a fresh
//! domain summary. Both sides hand their parts to the same [`Recorder`],
//! which runs the intake's checks and may refuse (a summary of a chosen
//! step, a batch over a chosen length), so the order of parts and where a
//! refusal stops them are compared too. Outcomes are compared field by
//! field, floats by their bits (NaN payloads and signed zeros included).
//!
//! Rules (where the two are allowed to differ, and why):
//! - **W1.** A refusal the decoder raises itself (`Undecodable`,
//!   `EmptyMessage`) is compared by its reason, not its text: the text
//!   quotes prost's error, which names the message it was decoding (a lone
//!   `Summary` on the fast path, the `WorkerMessage` around it on the full
//!   decode) and, on the fast path, the batch element. A refusal of the
//!   intake's checks is compared by reason and text.
//! - Kafka records: see [`record`] (K1, K2).
//!
//! Nothing else may differ: a message is accepted by both with the same
//! parts, or refused by both after the same parts.

pub mod encode;
pub mod input;
pub mod record;

use std::fmt;

use prost::Message as _;

use crate::intake::{self, Declared, Decoder, Limits, Parts, Reason, Refusal};
use crate::model::{LayerStats, Summary};
use crate::proto::{self, worker_message::Body};
use crate::wire;
use input::Choices;

/// What the parts of a message are checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// The sender's rank (a summary is converted as this rank's).
    pub rank: u32,
    /// The job's layer count (each per-layer array is empty or this long).
    pub layers: usize,
    /// The service's clock.
    pub now: f64,
    /// A summary of this step is refused (as a duplicate would be).
    pub refuse_step: Option<u64>,
    /// A batch of more summaries is refused.
    pub max_batch: usize,
}

impl Context {
    /// A context drawn from choices: mostly nothing refused beyond the
    /// intake's own checks.
    pub fn draw(c: &mut Choices) -> Self {
        Self {
            rank: c.pick(&[0, 1, 3]),
            layers: c.below(4),
            now: 1.7e9,
            refuse_step: c.one_in(4).then(|| c.below(4) as u64),
            max_batch: if c.one_in(6) { c.below(4) } else { 1024 },
        }
    }
}

/// One part handed over, with what the intake's checks made of it.
#[derive(Debug, Clone)]
pub enum Event {
    Hello(proto::Hello, Result<Declared, Refusal>),
    Batch(usize),
    /// The wire summary and its conversion (none when refused before it).
    Summary(proto::Summary, Option<Result<Summary, Refusal>>),
    Ack(proto::AdviceAck),
}

/// Everything a message did: its parts in order, and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub result: Result<(), Refusal>,
}

/// The parts' receiver both sides share: the intake's checks and
/// conversion, and refusals on demand.
pub struct Recorder<'a> {
    pub ctx: &'a Context,
    /// The domain summary a summary is converted into (reused by the hand
    /// path, fresh each time for the reference).
    pub scratch: &'a mut Summary,
    pub events: Vec<Event>,
}

impl Parts for Recorder<'_> {
    fn hello(&mut self, hello: proto::Hello) -> Result<(), Refusal> {
        let declared = Limits::default().check_hello(hello.clone());
        let result = declared.as_ref().map(|_| ()).map_err(Clone::clone);
        self.events.push(Event::Hello(hello, declared));
        result
    }

    fn batch(&mut self, len: usize) -> Result<(), Refusal> {
        self.events.push(Event::Batch(len));
        Limits {
            max_batch: self.ctx.max_batch,
            ..Limits::default()
        }
        .check_batch(len)
    }

    fn summary(&mut self, summary: &proto::Summary) -> Result<(), Refusal> {
        if self.ctx.refuse_step == Some(summary.step) {
            self.events.push(Event::Summary(summary.clone(), None));
            return Err(Refusal::new(
                Reason::DuplicateStep,
                format!("field step: step {} refused by the oracle", summary.step),
            ));
        }
        let c = self.ctx;
        let converted = intake::convert(summary, c.rank, c.layers, c.now, self.scratch).map(|()| self.scratch.clone());
        let result = converted.as_ref().map(|_| ()).map_err(Clone::clone);
        self.events.push(Event::Summary(summary.clone(), Some(converted)));
        result
    }

    fn ack(&mut self, ack: proto::AdviceAck) -> Result<(), Refusal> {
        self.events.push(Event::Ack(ack));
        Ok(())
    }
}

/// The reference: prost's decoding of the whole message, its body handed
/// over part by part, each summary converted into a fresh domain summary.
pub fn reference(message: &[u8], ctx: &Context) -> Outcome {
    let mut fresh = Summary::default();
    let mut parts = Recorder {
        ctx,
        scratch: &mut fresh,
        events: Vec::new(),
    };
    let result = match proto::WorkerMessage::decode(message) {
        Err(e) => Err(Refusal::new(Reason::Undecodable, e.to_string())),
        Ok(m) => match m.body {
            None => Err(Refusal::new(Reason::EmptyMessage, "no body")),
            Some(Body::Hello(h)) => parts.hello(h),
            Some(Body::Ack(a)) => parts.ack(a),
            Some(Body::Summary(s)) => {
                *parts.scratch = Summary::default();
                parts.summary(&s)
            }
            Some(Body::Batch(b)) => parts.batch(b.summaries.len()).and_then(|()| {
                b.summaries.iter().enumerate().try_for_each(|(i, s)| {
                    *parts.scratch = Summary::default();
                    parts.summary(s).map_err(|r| r.in_batch(i, Some(s.step)))
                })
            }),
        },
    };
    Outcome {
        events: parts.events,
        result,
    }
}

/// The hand path's side: a decoder and a domain summary kept from case to
/// case, as a stream keeps them from message to message.
#[derive(Debug, Default)]
pub struct HandSide {
    decoder: Decoder,
    scratch: Summary,
}

impl HandSide {
    pub fn decode(&mut self, message: &[u8], ctx: &Context) -> Outcome {
        let mut parts = Recorder {
            ctx,
            scratch: &mut self.scratch,
            events: Vec::new(),
        };
        let result = self.decoder.decode(message, &mut parts);
        Outcome {
            events: parts.events,
            result,
        }
    }
}

/// How a case ended, when both sides agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    Accepted,
    /// Refused by both; `after_parts`: some parts were handed over first.
    Refused {
        after_parts: bool,
    },
}

/// A case on which the two sides differ.
#[derive(Debug, Clone)]
pub struct Disagreement {
    pub input: String,
    pub hand: String,
    pub reference: String,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "input: {}\n  hand:      {}\n  reference: {}",
            self.input, self.hand, self.reference
        )
    }
}

/// Bytes as hex, for a disagreement's report.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two outcomes under rule W1.
pub fn compare(hand: &Outcome, reference: &Outcome, input: impl FnOnce() -> String) -> Result<Agreement, Disagreement> {
    if canon(hand) != canon(reference) {
        return Err(Disagreement {
            input: input(),
            hand: format!("{hand:?}"),
            reference: format!("{reference:?}"),
        });
    }
    Ok(match hand.result {
        Ok(()) => Agreement::Accepted,
        Err(_) => Agreement::Refused {
            after_parts: !hand.events.is_empty(),
        },
    })
}

/// Counts of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub cases: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Refused after some parts were handed over (a summary of a batch, say).
    pub refused_after_parts: u64,
    pub disagreements: u64,
    /// Cases that took the lone-summary fast path.
    pub lone: u64,
    /// Cases that took the batch fast path.
    pub batch: u64,
    /// Cases of random bytes (the rest are structured).
    pub random: u64,
}

impl Tally {
    pub fn add(&mut self, verdict: &Result<Agreement, Disagreement>) {
        self.cases += 1;
        match verdict {
            Ok(Agreement::Accepted) => self.accepted += 1,
            Ok(Agreement::Refused { after_parts }) => {
                self.refused += 1;
                self.refused_after_parts += u64::from(*after_parts);
            }
            Err(_) => self.disagreements += 1,
        }
    }

    /// Notes which fast path, if any, a message takes.
    pub fn path(&mut self, message: &[u8]) {
        let mut places = Vec::new();
        if wire::lone_summary(message).is_some() {
            self.lone += 1;
        } else if wire::batch_summaries(message, &mut places) {
            self.batch += 1;
        }
    }
}

/// A worker-message case from choice bytes: random bytes one time in four,
/// else a structured message, with its context.
pub fn worker_case(data: &[u8]) -> (Vec<u8>, Context, bool) {
    let mut c = Choices::new(data);
    let random = c.one_in(4);
    let ctx = Context::draw(&mut c);
    let message = if random {
        let n = c.below(64);
        c.bytes(n).to_vec()
    } else {
        encode::worker_message(&mut c, ctx.layers, ctx.now)
    };
    (message, ctx, random)
}

/// The worker-message oracle: the hand path (kept from case to case)
/// against the reference, case by case.
#[derive(Debug, Default)]
pub struct WorkerOracle {
    pub hand: HandSide,
    pub tally: Tally,
}

impl WorkerOracle {
    pub fn check(&mut self, message: &[u8], ctx: &Context) -> Result<Agreement, Disagreement> {
        let hand = self.hand.decode(message, ctx);
        let reference = reference(message, ctx);
        let verdict = compare(&hand, &reference, || format!("{} {ctx:?}", hex(message)));
        self.tally.path(message);
        self.tally.add(&verdict);
        verdict
    }

    /// Draws a case from choice bytes and checks it.
    pub fn check_case(&mut self, data: &[u8]) -> Result<Agreement, Disagreement> {
        let (message, ctx, random) = worker_case(data);
        self.tally.random += u64::from(random);
        self.check(&message, &ctx)
    }
}

/// An outcome as numbers: every field of every part (floats by their bits),
/// then the result under rule W1. Destructured field by field, so a field
/// added to a message fails to compile here until it is compared.
pub fn canon(o: &Outcome) -> Vec<u64> {
    let mut k = Canon(Vec::new());
    for e in &o.events {
        match e {
            Event::Hello(h, declared) => {
                k.u(1);
                k.hello(h);
                k.declared(declared);
            }
            Event::Batch(n) => {
                k.u(2);
                k.u(*n as u64);
            }
            Event::Summary(s, converted) => {
                k.u(3);
                k.wire_summary(s);
                match converted {
                    None => k.u(0),
                    Some(Ok(s)) => {
                        k.u(1);
                        k.summary(s);
                    }
                    Some(Err(r)) => {
                        k.u(2);
                        k.refusal(r);
                    }
                }
            }
            Event::Ack(a) => {
                k.u(4);
                let proto::AdviceAck {
                    advice_id,
                    applied_step,
                    applied,
                    note,
                } = a;
                k.u(*advice_id);
                k.u(*applied_step);
                k.u(u64::from(*applied));
                k.str(note);
            }
        }
    }
    match &o.result {
        Ok(()) => k.u(0),
        Err(r) => {
            k.u(1);
            k.refusal(r);
        }
    }
    k.0
}

struct Canon(Vec<u64>);

impl Canon {
    fn u(&mut self, v: u64) {
        self.0.push(v);
    }

    fn f64(&mut self, v: Option<f64>) {
        match v {
            None => self.u(0),
            Some(v) => {
                self.u(1);
                self.u(v.to_bits());
            }
        }
    }

    fn f32(&mut self, v: Option<f32>) {
        self.f64(v.map(|v| f64::from_bits(u64::from(v.to_bits()))));
    }

    fn f32s(&mut self, v: &[f32]) {
        self.u(v.len() as u64);
        self.0.extend(v.iter().map(|x| u64::from(x.to_bits())));
    }

    fn str(&mut self, s: &str) {
        self.u(s.len() as u64);
        self.0.extend(s.as_bytes().chunks(8).map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        }));
    }

    /// Rule W1: the decoder's own refusals by reason only.
    fn refusal(&mut self, r: &Refusal) {
        self.u(Reason::ALL.iter().position(|&x| x == r.reason).unwrap_or(usize::MAX) as u64);
        if !matches!(r.reason, Reason::Undecodable | Reason::EmptyMessage) {
            self.str(&r.message);
        }
    }

    fn hello(&mut self, h: &proto::Hello) {
        let proto::Hello {
            job,
            rank,
            world_size,
            layer_names,
            client_version,
            rule_profile,
            report_progress,
            layout,
        } = h;
        self.str(job);
        self.u(u64::from(*rank));
        self.u(u64::from(*world_size));
        self.u(layer_names.len() as u64);
        layer_names.iter().for_each(|n| self.str(n));
        self.str(client_version);
        self.str(rule_profile);
        self.u(u64::from(*report_progress));
        match layout {
            None => self.u(0),
            Some(l) => {
                self.u(1);
                for v in [l.data_parallel, l.tensor_parallel, l.pipeline_parallel, l.replica_group] {
                    self.u(u64::from(v));
                }
            }
        }
    }

    fn declared(&mut self, d: &Result<Declared, Refusal>) {
        match d {
            Err(r) => {
                self.u(0);
                self.refusal(r);
            }
            Ok(Declared {
                job,
                rank,
                layer_names,
                world_size,
                profile,
                progress,
                placement,
            }) => {
                self.u(1);
                self.str(job);
                self.u(u64::from(*rank));
                self.u(layer_names.len() as u64);
                layer_names.iter().for_each(|n| self.str(n));
                self.u(world_size.map_or(u64::MAX, u64::from));
                self.str(profile.as_deref().unwrap_or("\0none"));
                self.u(u64::from(*progress));
                match placement {
                    None => self.u(0),
                    Some(p) => {
                        self.u(1);
                        let l = &p.layout;
                        for v in [
                            l.data_parallel,
                            l.tensor_parallel,
                            l.pipeline_parallel,
                            p.rank,
                            p.replica_group,
                        ] {
                            self.u(u64::from(v));
                        }
                    }
                }
            }
        }
    }

    fn wire_summary(&mut self, s: &proto::Summary) {
        let proto::Summary {
            step,
            time,
            loss,
            lr,
            loss_scale,
            grad_norm,
            layer_l2,
            layer_max_abs,
            layer_nonfinite,
            layer_param_norm,
            layer_update_norm,
        } = s;
        self.u(*step);
        self.f64(Some(*time));
        for v in [loss, lr, loss_scale, grad_norm] {
            self.f64(*v);
        }
        self.f32s(layer_l2);
        self.f32s(layer_max_abs);
        self.u(layer_nonfinite.len() as u64);
        self.0.extend(layer_nonfinite.iter().map(|&n| u64::from(n)));
        self.f32s(layer_param_norm);
        self.f32s(layer_update_norm);
    }

    fn summary(&mut self, s: &Summary) {
        let Summary {
            worker,
            step,
            time,
            loss,
            lr,
            loss_scale,
            grad_norm,
            layers,
        } = s;
        self.u(u64::from(*worker));
        self.u(*step);
        for v in [time, loss, lr, loss_scale, grad_norm] {
            self.f64(*v);
        }
        self.u(layers.len() as u64);
        for l in layers {
            let LayerStats {
                l2,
                max_abs,
                nonfinite,
                param_norm,
                update_norm,
            } = l;
            self.f32(Some(*l2));
            self.f32(Some(*max_abs));
            self.u(u64::from(*nonfinite));
            self.f32(*param_norm);
            self.f32(*update_norm);
        }
    }
}
