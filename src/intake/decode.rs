//! Encoded worker messages, taken apart.
//!
//! Transports hand the intake a message as the bytes they received (tonic
//! hands them over encoded, `proto::frames`; a Kafka record is its payload).
//! A summary, what a worker sends every step, is decoded into the vectors of
//! the previous one, so the common message allocates nothing; so is each
//! summary of a batch (into the previous batch's: up to [`KEEP`] of them).
//!
//! The fast paths are indistinguishable from prost's decoding of the whole
//! message (`src/fuzz` checks it on arbitrary bytes): the same parts, in the
//! same order, and a message that does not decode is refused whole, before
//! any part of it is handed over.

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

/// Summaries of a batch a [`Decoder`] holds at once, and keeps (their
/// vectors) for the next message: the Python client sends at most 64 in one.
pub const KEEP: usize = 64;

/// Decodes worker messages, keeping summaries' vectors between them.
#[derive(Debug, Default)]
pub struct Decoder {
    /// A lone summary, or those of a batch, decoded into the vectors of the
    /// previous message's (at most [`KEEP`] are kept).
    wire: Vec<proto::Summary>,
    /// Where each summary of a batch lies in its message.
    places: Vec<Range<usize>>,
}

impl Decoder {
    /// Decodes one encoded `WorkerMessage` and hands its parts to `parts`.
    pub fn decode(&mut self, message: &[u8], parts: &mut impl Parts) -> Result<(), Refusal> {
        let undecodable = |e| undecodable(message, e);
        if let Some(summary) = wire::lone_summary(message) {
            if self.wire.is_empty() {
                self.wire.push(proto::Summary::default());
            }
            let reused = &mut self.wire[0];
            reused.clear();
            reused.merge(summary).map_err(undecodable)?;
            return parts.summary(reused);
        }
        if wire::batch_summaries(message, &mut self.places) {
            let handed = self.batch(message, parts);
            self.wire.truncate(KEEP);
            return handed;
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

    /// A batch of summaries only, framed by `wire::batch_summaries`: every
    /// summary decoded before any is handed over, as prost's decoding of the
    /// whole message would (one that does not decode refuses the message
    /// whole; the batch's length is judged after, as after the full decode).
    /// Up to [`KEEP`] summaries are decoded where they stay until handed
    /// over; a longer batch is decoded twice, one summary at a time (first
    /// to know that all of them decode, then to hand each over), so that it
    /// never holds more than one summary's vectors.
    fn batch(&mut self, message: &[u8], parts: &mut impl Parts) -> Result<(), Refusal> {
        let n = self.places.len();
        let held = n <= KEEP;
        let slots = if held { n } else { 1 };
        if self.wire.len() < slots {
            self.wire.resize_with(slots, proto::Summary::default);
        }
        let decode = |s: &mut proto::Summary, i: usize, place: &Range<usize>| {
            s.clear();
            s.merge(&message[place.clone()])
                .map_err(|e| undecodable(message, e).in_batch(i, None))
        };
        for (i, place) in self.places.iter().enumerate() {
            decode(&mut self.wire[if held { i } else { 0 }], i, place)?;
        }
        parts.batch(n)?;
        for (i, place) in self.places.iter().enumerate() {
            let slot = if held { i } else { 0 };
            if !held {
                decode(&mut self.wire[0], i, place)?;
            }
            let s = &self.wire[slot];
            parts.summary(s).map_err(|r| r.in_batch(i, Some(s.step)))?;
        }
        Ok(())
    }
}

/// The refusal of a message prost cannot decode.
fn undecodable(message: &[u8], e: prost::DecodeError) -> Refusal {
    Refusal::new(
        Reason::Undecodable,
        format!(
            "the message ({} bytes) is not a gradguard.v1.WorkerMessage: {e}",
            message.len()
        ),
    )
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
    fn a_batch_with_a_summary_that_does_not_decode_is_refused_whole() {
        // Found by the differential fuzzing (`src/fuzz`): a batch of an empty
        // summary and one whose only byte is no field key (field 0). Prost
        // refuses the whole message; the fast path had handed the batch and
        // its first summary over before it met the second.
        let message = [0x22, 0x05, 0x0a, 0x00, 0x0a, 0x01, 0x00];
        assert!(proto::WorkerMessage::decode(&message[..]).is_err());
        let mut d = Decoder::default();
        let mut log = Log::default();
        let r = d.decode(&message, &mut log).unwrap_err();
        assert_eq!(r.reason, Reason::Undecodable);
        assert!(r.message.starts_with("batch.summaries[1]: "), "{r}");
        assert!(log.0.is_empty(), "{:?}", log.0);
        // The decoder is still good for the next message.
        d.decode(&encode(Body::Summary(summary(1, 2))), &mut log).unwrap();
        assert_eq!(log.0, ["summary 1 [1.0, 1.0]"]);
    }

    #[test]
    fn a_batch_longer_than_keep_is_handed_over_in_order_holding_one_summary() {
        let batch = |n: u64| {
            encode(Body::Batch(proto::SummaryBatch {
                summaries: (0..n).map(|s| summary(s + 10, 1)).collect(),
            }))
        };
        let mut d = Decoder::default();
        let mut log = Log::default();
        d.decode(&batch(KEEP as u64), &mut log).unwrap();
        assert_eq!((d.wire.len(), log.0.len()), (KEEP, KEEP + 1));
        let mut log = Log::default();
        d.decode(&batch(KEEP as u64 + 10), &mut log).unwrap();
        assert_eq!(log.0.len(), KEEP + 11);
        assert_eq!(log.0[KEEP + 10], format!("summary {} [1.0]", KEEP + 19));
        assert_eq!(d.wire.len(), KEEP);

        // Empty summaries, then one that does not decode: refused whole.
        let mut summaries = [0x0a, 0x00].repeat(KEEP + 10);
        summaries.extend_from_slice(&[0x0a, 0x01, 0x00]);
        let mut message = vec![0x22];
        prost::encode_length_delimiter(summaries.len(), &mut message).unwrap();
        message.extend_from_slice(&summaries);
        let mut log = Log::default();
        let r = d.decode(&message, &mut log).unwrap_err();
        assert_eq!(r.reason, Reason::Undecodable);
        assert!(
            r.message.starts_with(&format!("batch.summaries[{}]: ", KEEP + 10)),
            "{r}"
        );
        assert!(log.0.is_empty(), "{:?}", log.0);
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
