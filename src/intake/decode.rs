//! Encoded worker messages, taken apart.
//!
//! Transports hand the intake a message as the bytes they received (tonic
//! hands them over encoded, `proto::frames`; a Kafka record is its payload).
//! A summary, what a worker sends every step, is decoded into the vectors of
//! the previous one, so the common message allocates nothing; so is each
//! summary of a batch.

use std::ops::Range;

use prost::Message as _;

use super::{Reason, Refusal};
use crate::proto::{self, worker_message::Body};
use crate::wire;

/// What a worker message holds, handed over part by part, in order. The
/// first refusal stops the message: parts before it stay accepted.
pub trait Parts {
    fn hello(&mut self, hello: proto::Hello) -> Result<(), Refusal>;
    /// Before the summaries of a batch: how many there are.
    fn batch(&mut self, len: usize) -> Result<(), Refusal>;
    fn summary(&mut self, summary: &proto::Summary) -> Result<(), Refusal>;
    fn ack(&mut self, ack: proto::AdviceAck) -> Result<(), Refusal>;
}

/// Decodes worker messages, keeping one summary's vectors between them.
#[derive(Debug, Default)]
pub struct Decoder {
    wire: proto::Summary,
    /// Where each summary of a batch lies in its message.
    places: Vec<Range<usize>>,
}

impl Decoder {
    /// Decodes one encoded `WorkerMessage` and hands its parts to `parts`.
    pub fn decode(&mut self, message: &[u8], parts: &mut impl Parts) -> Result<(), Refusal> {
        let undecodable = |e: prost::DecodeError| {
            Refusal::new(
                Reason::Undecodable,
                format!(
                    "the message ({} bytes) is not a gradguard.v1.WorkerMessage: {e}",
                    message.len()
                ),
            )
        };
        if let Some(summary) = wire::lone_summary(message) {
            self.wire.clear();
            self.wire.merge(summary).map_err(undecodable)?;
            return parts.summary(&self.wire);
        }
        if wire::batch_summaries(message, &mut self.places) {
            parts.batch(self.places.len())?;
            for (i, place) in self.places.iter().enumerate() {
                self.wire.clear();
                self.wire
                    .merge(&message[place.clone()])
                    .map_err(|e| undecodable(e).in_batch(i, None))?;
                parts
                    .summary(&self.wire)
                    .map_err(|r| r.in_batch(i, Some(self.wire.step)))?;
            }
            return Ok(());
        }
        match proto::WorkerMessage::decode(message).map_err(undecodable)?.body {
            Some(Body::Hello(hello)) => parts.hello(hello),
            Some(Body::Summary(s)) => parts.summary(&s),
            Some(Body::Batch(batch)) => {
                // Taken apart above unless it holds more than summaries (an
                // unknown field, say): the same, from the full decode.
                parts.batch(batch.summaries.len())?;
                for (i, s) in batch.summaries.iter().enumerate() {
                    parts.summary(s).map_err(|r| r.in_batch(i, Some(s.step)))?;
                }
                Ok(())
            }
            Some(Body::Ack(ack)) => parts.ack(ack),
            None => Err(Refusal::new(
                Reason::EmptyMessage,
                "field body: the message carries no hello, summary, batch or ack",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it was handed; refuses the summary of step 3.
    #[derive(Default)]
    struct Log(Vec<String>);

    impl Parts for Log {
        fn hello(&mut self, h: proto::Hello) -> Result<(), Refusal> {
            self.0.push(format!("hello {}", h.job));
            Ok(())
        }
        fn batch(&mut self, len: usize) -> Result<(), Refusal> {
            self.0.push(format!("batch {len}"));
            Ok(())
        }
        fn summary(&mut self, s: &proto::Summary) -> Result<(), Refusal> {
            if s.step == 3 {
                return Err(Refusal::new(Reason::LayerCount, "field layer_l2: no"));
            }
            self.0.push(format!("summary {} {:?}", s.step, s.layer_l2));
            Ok(())
        }
        fn ack(&mut self, a: proto::AdviceAck) -> Result<(), Refusal> {
            self.0.push(format!("ack {}", a.advice_id));
            Ok(())
        }
    }

    fn encode(body: Body) -> Vec<u8> {
        proto::WorkerMessage { body: Some(body) }.encode_to_vec()
    }

    fn summary(step: u64, layers: usize) -> proto::Summary {
        proto::Summary {
            step,
            layer_l2: vec![1.0; layers],
            ..Default::default()
        }
    }

    #[test]
    fn every_kind_of_message_is_taken_apart_in_order() {
        let mut d = Decoder::default();
        let mut log = Log::default();
        let hello = proto::Hello {
            job: "j".into(),
            ..Default::default()
        };
        d.decode(&encode(Body::Hello(hello)), &mut log).unwrap();
        // A long summary, then a short one: the reused vectors are cleared.
        d.decode(&encode(Body::Summary(summary(1, 3))), &mut log).unwrap();
        d.decode(&encode(Body::Summary(summary(2, 1))), &mut log).unwrap();
        let batch = proto::SummaryBatch {
            summaries: vec![summary(4, 2), summary(5, 0)],
        };
        d.decode(&encode(Body::Batch(batch)), &mut log).unwrap();
        d.decode(
            &encode(Body::Ack(proto::AdviceAck {
                advice_id: 9,
                ..Default::default()
            })),
            &mut log,
        )
        .unwrap();
        assert_eq!(
            log.0,
            [
                "hello j",
                "summary 1 [1.0, 1.0, 1.0]",
                "summary 2 [1.0]",
                "batch 2",
                "summary 4 [1.0, 1.0]",
                "summary 5 []",
                "ack 9"
            ]
        );
    }

    #[test]
    fn a_refused_batch_element_names_its_place_and_keeps_those_before() {
        let mut d = Decoder::default();
        let mut log = Log::default();
        let batch = proto::SummaryBatch {
            summaries: vec![summary(1, 1), summary(2, 1), summary(3, 1), summary(4, 1)],
        };
        let r = d.decode(&encode(Body::Batch(batch)), &mut log).unwrap_err();
        assert_eq!(r.message, "batch.summaries[2] (step 3): field layer_l2: no");
        assert_eq!(log.0, ["batch 4", "summary 1 [1.0]", "summary 2 [1.0]"]);
    }

    #[test]
    fn bad_bytes_and_empty_messages_are_refused() {
        let mut d = Decoder::default();
        let r = d.decode(&[0xff, 0xff, 0xff], &mut Log::default()).unwrap_err();
        assert_eq!(r.reason, Reason::Undecodable);
        assert!(
            r.message
                .starts_with("the message (3 bytes) is not a gradguard.v1.WorkerMessage"),
            "{r}"
        );
        let r = d.decode(&[], &mut Log::default()).unwrap_err();
        assert_eq!(
            (r.reason, r.message.as_str()),
            (
                Reason::EmptyMessage,
                "field body: the message carries no hello, summary, batch or ack"
            )
        );
    }
}
