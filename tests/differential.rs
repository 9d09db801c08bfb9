//! Differential fuzzing of the hand-written decoding against prost's
//! generated decoder (the oracle and its rules: `src/fuzz`), at a case count
//! CI affords; `examples/differential.rs` runs the same checks a million
//! times and more.

use gradguard::fuzz::record::{RecordInput, RecordOracle};
use gradguard::fuzz::{Agreement, Context, WorkerOracle};
use proptest::collection::vec;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2500))]

    /// A few worker messages through one decoder (as a stream sends them),
    /// each against prost's decoding of it alone.
    #[test]
    fn worker_messages_decode_as_prost_decodes_them(cases in vec(vec(any::<u8>(), 0..768), 1..4)) {
        let mut oracle = WorkerOracle::default();
        for data in &cases {
            if let Err(d) = oracle.check_case(data) {
                return Err(TestCaseError::fail(d.to_string()));
            }
        }
    }

    /// Random bytes, as they are.
    #[test]
    fn random_bytes_decode_as_prost_decodes_them(message in vec(any::<u8>(), 0..96), layers in 0usize..3) {
        let ctx = Context { rank: 1, layers, now: 1.7e9, refuse_step: None, max_batch: 1024 };
        if let Err(d) = WorkerOracle::default().check(&message, &ctx) {
            return Err(TestCaseError::fail(d.to_string()));
        }
    }

    /// Summaries-topic records (key, headers, payload) through one decoder.
    #[test]
    fn kafka_records_decode_as_the_record_format_says(cases in vec(vec(any::<u8>(), 0..768), 1..4)) {
        let mut oracle = RecordOracle::default();
        for data in &cases {
            if let Err(d) = oracle.check_case(data) {
                return Err(TestCaseError::fail(d.to_string()));
            }
        }
    }
}

/// Seeded choice bytes (SplitMix64), for the deterministic checks below.
fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// The structured cases reach what random bytes do not: both fast paths,
/// acceptance, and refusals after some parts.
#[test]
fn the_generator_reaches_the_deep_paths() {
    let mut oracle = WorkerOracle::default();
    for seed in 0..3000 {
        oracle.check_case(&seeded(seed, 768)).unwrap();
    }
    let t = &oracle.tally;
    assert_eq!(t.disagreements, 0);
    for (what, n) in [
        ("lone", t.lone),
        ("batch", t.batch),
        ("accepted", t.accepted),
        ("refused", t.refused),
        ("refused after parts", t.refused_after_parts),
        ("random", t.random),
    ] {
        assert!(n * 50 > t.cases, "{what}: {n} of {} cases\n{t:?}", t.cases);
    }
    let mut records = RecordOracle::default();
    for seed in 0..3000 {
        records.check_case(&seeded(seed, 768)).unwrap();
    }
    let r = &records.records;
    assert!(records.tally.accepted * 10 > records.tally.cases, "{:?}", records.tally);
    assert!(
        r.refused_record > 0 && r.k1 > 0 && r.k2 > 0 && r.names_not_utf8 > 0,
        "{r:?}"
    );
}

/// The bug the fuzzing found (`intake::decode`): a batch whose second
/// summary does not decode was handed over in part on the fast path.
#[test]
fn regression_a_batch_that_does_not_decode_is_refused_whole() {
    let ctx = Context {
        rank: 0,
        layers: 0,
        now: 1.7e9,
        refuse_step: None,
        max_batch: 1024,
    };
    let verdict = WorkerOracle::default().check(&[0x22, 0x05, 0x0a, 0x00, 0x0a, 0x01, 0x00], &ctx);
    assert_eq!(verdict.unwrap(), Agreement::Refused { after_parts: false });
}

/// The rules of the record oracle, each on its smallest case.
#[test]
fn record_rules_on_their_smallest_cases() {
    let ctx = Context {
        rank: 0,
        layers: 0,
        now: 1.7e9,
        refuse_step: None,
        max_batch: 1024,
    };
    let record = |name: &[u8], value: &[u8]| RecordInput {
        key: Some(b"j".to_vec()),
        headers: Some(vec![(b"x\xff".to_vec(), None), (name.to_vec(), Some(value.to_vec()))]),
        payload: Some(vec![0x12, 0x00]),
    };
    let mut oracle = RecordOracle::default();
    // K1: "+07" is rank 7; K2: "rank\0x" is the rank header; a name that is
    // not UTF-8 comes first and is skipped.
    for (name, value) in [(&b"rank"[..], &b"+07"[..]), (b"rank\0x", b"3")] {
        assert_eq!(oracle.check(&record(name, value), &ctx).unwrap(), Agreement::Accepted);
    }
    assert_eq!(
        oracle.check(&record(b"rank", b"-1"), &ctx).unwrap(),
        Agreement::Refused { after_parts: false }
    );
    assert_eq!(
        (oracle.records.k1, oracle.records.k2, oracle.records.names_not_utf8),
        (1, 1, 3)
    );
}
