//! The summaries-topic record, decoded by hand (`cluster::summaries_record`
//! on a record as rdkafka hands it over) against a plain model of the
//! record format: the key is the job id (UTF-8, not empty), the first
//! header named `rank` holds the rank as the writers write it (decimal, as
//! `u32::to_string` does), the payload is a `WorkerMessage` (none reads as
//! empty) decoded as in [`super::reference`].
//!
//! Rules (where the hand path may differ from the model, and why):
//! - **K1.** The hand path reads the rank with `u32::from_str`, which also
//!   takes a leading `+` and leading zeros (`+07` is rank 7). The writers
//!   (`cluster::worker_record`, the Python client) never write those; read
//!   as the same number, they are harmless, so the model accepts them too,
//!   as that number, and counts the cases.
//! - **K2.** librdkafka hands header names over as C strings: a name is
//!   read up to its first NUL byte (`rank\0x` is a `rank` header). The model
//!   cuts names there too, and counts the cases.
//!
//! A header name that is not UTF-8 cannot be made through rdkafka's API
//! (its names are `&str`), but a consumed record from any other producer
//! may carry one, and rdkafka's accessor panics on it. Records with such
//! names are read through [`RdkafkaHeaders`], which reads names exactly as
//! rdkafka's `BorrowedHeaders` does, panic included; the rest through a
//! real `OwnedMessage`.

use std::panic::resume_unwind;

use rdkafka::Timestamp;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

use super::encode;
use super::input::Choices;
use super::{Agreement, Context, Disagreement, HandSide, Outcome, Tally, hex, reference};
use crate::cluster::{RANK_HEADER, SummariesRecord, summaries_record};
use crate::intake::{Reason, Refusal};

/// A header as a producer may write it: its name and its value (none: a
/// null value).
pub type HeaderEntry = (Vec<u8>, Option<Vec<u8>>);

/// A record as a producer may write it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordInput {
    pub key: Option<Vec<u8>>,
    /// Names and values, in order; none: a record without headers.
    pub headers: Option<Vec<HeaderEntry>>,
    pub payload: Option<Vec<u8>>,
}

impl RecordInput {
    fn describe(&self) -> String {
        let opt = |b: &Option<Vec<u8>>| b.as_deref().map_or_else(|| "none".to_owned(), hex);
        let headers = self.headers.as_ref().map_or_else(
            || "none".to_owned(),
            |hs| {
                hs.iter()
                    .map(|(n, v)| format!("{}={}", hex(n), opt(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        format!(
            "key {} headers [{headers}] payload {}",
            opt(&self.key),
            opt(&self.payload)
        )
    }
}

/// Headers read the way rdkafka's `BorrowedHeaders::try_get` reads a
/// consumed record's: the name up to its first NUL, then `to_str().unwrap()`
/// (a panic when it is not UTF-8; raised here without the panic hook's
/// message, so a long run stays quiet).
#[derive(Debug, Clone)]
pub struct RdkafkaHeaders(pub Vec<HeaderEntry>);

impl Headers for RdkafkaHeaders {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (name, value) = self.0.get(idx)?;
        let Ok(key) = std::str::from_utf8(c_string(name)) else {
            resume_unwind(Box::new("a header name that is not UTF-8 (as rdkafka unwraps it)"));
        };
        Some(Header {
            key,
            value: value.as_deref(),
        })
    }
}

/// A name as a C string reads it: up to its first NUL.
fn c_string(name: &[u8]) -> &[u8] {
    name.iter().position(|&b| b == 0).map_or(name, |end| &name[..end])
}

/// Where the record's decoding ended before its payload, as numbers.
fn record_canon(r: &Result<(String, u32), (Option<String>, Refusal)>) -> Vec<u64> {
    let mut k = super::Canon(Vec::new());
    match r {
        Ok((job, rank)) => {
            k.u(0);
            k.str(job);
            k.u(u64::from(*rank));
        }
        Err((job, refusal)) => {
            k.u(1);
            k.str(job.as_deref().unwrap_or("\0none"));
            k.refusal(refusal);
        }
    }
    k.0
}

/// The model's rank: the first header named `rank` (names cut at NUL: K2)
/// with a value in the writers' form, or one K1 lets through.
fn model_rank(headers: &[HeaderEntry], tally: &mut RecordTally) -> Option<u32> {
    let first = headers
        .iter()
        .find(|(name, _)| c_string(name) == RANK_HEADER.as_bytes());
    if headers.iter().any(|(name, _)| name.contains(&0)) {
        tally.k2 += 1;
    }
    if headers
        .iter()
        .any(|(name, _)| std::str::from_utf8(c_string(name)).is_err())
    {
        tally.names_not_utf8 += 1;
    }
    let value = first?.1.as_deref()?;
    let canonical = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<u64>().ok().filter(|n| n.to_string() == v))
        .and_then(|n| u32::try_from(n).ok());
    if canonical.is_some() {
        return canonical;
    }
    // K1: a `+` and leading zeros before decimal digits.
    let digits = value.strip_prefix(b"+").unwrap_or(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .try_fold(0u32, |n, &d| n.checked_mul(10)?.checked_add(u32::from(d - b'0')))?;
    tally.k1 += 1;
    Some(n)
}

/// The model's reading of a record, before its payload.
fn model(input: &RecordInput, tally: &mut RecordTally) -> Result<(String, u32), (Option<String>, Refusal)> {
    let job = input
        .key
        .as_ref()
        .and_then(|k| String::from_utf8(k.clone()).ok())
        .filter(|j| !j.is_empty())
        .ok_or_else(|| {
            let r = Refusal::new(
                Reason::EmptyJob,
                "record key: must be the job id (the summaries topic is keyed by job)",
            );
            (None, r)
        })?;
    let rank = input.headers.as_deref().and_then(|hs| model_rank(hs, tally));
    match rank {
        Some(rank) => Ok((job, rank)),
        None => Err((
            Some(job),
            Refusal::new(Reason::NoRank, "header rank: missing or not a number"),
        )),
    }
}

/// Counts of a record run, beyond the payloads' [`Tally`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecordTally {
    /// Records refused before their payload (key or rank).
    pub refused_record: u64,
    /// Cases where rule K1 (a non-canonical rank) applied.
    pub k1: u64,
    /// Cases with a header name holding a NUL (rule K2).
    pub k2: u64,
    /// Cases with a header name that is not UTF-8 (read as rdkafka does).
    pub names_not_utf8: u64,
}

/// The record oracle: the hand path's decoder is kept from record to
/// record, as the detector keeps it.
#[derive(Debug, Default)]
pub struct RecordOracle {
    hand: HandSide,
    pub tally: Tally,
    pub records: RecordTally,
}

impl RecordOracle {
    pub fn check(&mut self, input: &RecordInput, ctx: &Context) -> Result<Agreement, Disagreement> {
        let all_utf8 = input
            .headers
            .iter()
            .flatten()
            .all(|(name, _)| std::str::from_utf8(name).is_ok());
        let hand_parts = |r: Result<SummariesRecord<'_>, (Option<&str>, Refusal)>| match r {
            Ok(r) => Ok((r.job.to_owned(), r.rank, r.payload.to_vec())),
            Err((job, refusal)) => Err((job.map(str::to_owned), refusal)),
        };
        let hand_record = if all_utf8 {
            let headers = input.headers.as_ref().map(|hs| {
                hs.iter().fold(OwnedHeaders::new(), |h, (name, value)| {
                    h.insert(Header {
                        key: std::str::from_utf8(name).unwrap_or_default(),
                        value: value.as_deref(),
                    })
                })
            });
            let m = OwnedMessage::new(
                input.payload.clone(),
                input.key.clone(),
                "gradguard.summaries".into(),
                Timestamp::NotAvailable,
                0,
                0,
                headers,
            );
            hand_parts(summaries_record(m.key(), m.headers(), m.payload()))
        } else {
            let headers = input.headers.clone().map(RdkafkaHeaders);
            hand_parts(summaries_record(
                input.key.as_deref(),
                headers.as_ref(),
                input.payload.as_deref(),
            ))
        };
        let model_record = model(input, &mut self.records);
        let hand_head = hand_record
            .as_ref()
            .map(|(j, r, _)| (j.clone(), *r))
            .map_err(Clone::clone);
        let verdict = if record_canon(&hand_head) != record_canon(&model_record) {
            Err(Disagreement {
                input: input.describe(),
                hand: format!("{hand_head:?}"),
                reference: format!("{model_record:?}"),
            })
        } else {
            match (hand_record, model_record) {
                (Ok((_, rank, hand_payload)), Ok(_)) => {
                    let ctx = Context { rank, ..ctx.clone() };
                    let reference_payload = input.payload.as_deref().unwrap_or_default();
                    let hand: Outcome = self.hand.decode(&hand_payload, &ctx);
                    let reference = reference(reference_payload, &ctx);
                    self.tally.path(reference_payload);
                    if hand_payload != reference_payload {
                        Err(Disagreement {
                            input: input.describe(),
                            hand: format!("payload {}", hex(&hand_payload)),
                            reference: format!("payload {}", hex(reference_payload)),
                        })
                    } else {
                        super::compare(&hand, &reference, || input.describe())
                    }
                }
                _ => {
                    self.records.refused_record += 1;
                    Ok(Agreement::Refused { after_parts: false })
                }
            }
        };
        self.tally.add(&verdict);
        verdict
    }

    /// Draws a record from choice bytes and checks it.
    pub fn check_case(&mut self, data: &[u8]) -> Result<Agreement, Disagreement> {
        let (input, ctx) = record_case(data);
        self.check(&input, &ctx)
    }
}

/// Header names: the rank's, and names that are nearly it.
const NAMES: [&[u8]; 12] = [
    b"rank",
    b"Rank",
    b"rank\0",
    b"rank\0x",
    b"ran",
    b"rank ",
    b"x",
    b"",
    b"\0rank",
    b"r\xffnk",
    b"rank\0\xff",
    b"\xff",
];

/// Rank values: the writers' form, and what is nearly it.
const VALUES: [&[u8]; 18] = [
    b"0",
    b"3",
    b"1",
    b"4294967295",
    b"4294967296",
    b"+3",
    b"03",
    b"+",
    b"-1",
    b"-0",
    b" 3",
    b"3 ",
    b"",
    b"\xd9\xa3", // an Arabic-Indic three
    b"0x3",
    b"00000000000000000000007",
    b"+0",
    b"3\0",
];

/// A record from choice bytes: mostly a key, one well-formed rank header
/// and a structured payload, as a worker writes it; else anything near.
pub fn record_case(data: &[u8]) -> (RecordInput, Context) {
    let mut c = Choices::new(data);
    let ctx = Context::draw(&mut c);
    let key = match c.below(12) {
        0..=8 => Some(b"j".to_vec()),
        9 => None,
        10 => Some(c.pick(&[b"".as_slice(), b"\xff", b"job-\xce\xb1", b"j\0"]).to_vec()),
        _ => Some(c.bytes(6).to_vec()),
    };
    let header = |c: &mut Choices| -> HeaderEntry {
        let name = if c.one_in(2) { NAMES[0] } else { c.pick(&NAMES) };
        let value = match c.below(8) {
            0..=3 => Some(c.pick(&[b"0".as_slice(), b"1", b"3"]).to_vec()),
            4 => None,
            5 => Some(c.bytes(4).to_vec()),
            _ => Some(c.pick(&VALUES).to_vec()),
        };
        (name.to_vec(), value)
    };
    let headers = match c.below(8) {
        0..=5 => Some(vec![(b"rank".to_vec(), Some(ctx.rank.to_string().into_bytes()))]),
        6 => None,
        _ => {
            let n = c.below(5);
            Some((0..n).map(|_| header(&mut c)).collect())
        }
    };
    let payload = match c.below(10) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some(encode::worker_message(&mut c, ctx.layers, ctx.now)),
    };
    (RecordInput { key, headers, payload }, ctx)
}
