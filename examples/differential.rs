//! Differential fuzzing of the hand-written decoding against prost's
//! generated decoder, at scale (the oracle and its rules: `src/fuzz`; the
//! same checks run in CI at a smaller count: `tests/differential.rs`).
//!
//! ```sh
//! cargo run --release --example differential -- [worker|kafka|all] [--cases N] [--seed S]
//! ```
//!
//! `GG_CASES` sets the case count too (default 1,000,000 per target). Each
//! case draws its choice bytes from a seeded SplitMix64; a case is random
//! bytes one time in four (worker messages), else a structured message or
//! record. Prints the counts and the time, the first disagreements in full,
//! and exits with status 1 when there is any.

use std::time::Instant;

use gradguard::fuzz::record::RecordOracle;
use gradguard::fuzz::{Disagreement, Tally, WorkerOracle};

/// Choice bytes per case: enough for the largest structured case.
const CHOICES: usize = 4096;
/// Disagreements printed in full.
const SHOWN: usize = 5;

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn run(name: &str, cases: u64, seed: u64, mut check: impl FnMut(&[u8]) -> Result<(), Disagreement>) -> (u64, f64) {
    let mut rng = SplitMix(seed);
    let mut data = vec![0u8; CHOICES];
    let mut disagreements = 0;
    let started = Instant::now();
    for _ in 0..cases {
        rng.fill(&mut data);
        if let Err(d) = check(&data) {
            disagreements += 1;
            if disagreements <= SHOWN as u64 {
                eprintln!("{name}: disagreement\n{d}");
            }
        }
    }
    (disagreements, started.elapsed().as_secs_f64())
}

fn print(name: &str, t: &Tally, secs: f64, extra: &str) {
    println!(
        "{name}: {} cases, {} disagreements; both accepted {}, both refused {} ({} after some parts); lone-summary fast path {}, batch fast path {}, random bytes {}{extra}; {secs:.1} s ({:.0} cases/s)",
        t.cases,
        t.disagreements,
        t.accepted,
        t.refused,
        t.refused_after_parts,
        t.lone,
        t.batch,
        t.random,
        t.cases as f64 / secs
    );
}

fn main() {
    let mut target = "all".to_owned();
    let mut cases: u64 = std::env::var("GG_CASES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let mut seed = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match arg.as_str() {
            "--cases" => cases = value("--cases"),
            "--seed" => seed = value("--seed"),
            "worker" | "kafka" | "all" => target = arg,
            other => panic!("unknown argument {other:?}: [worker|kafka|all] [--cases N] [--seed S]"),
        }
    }
    println!("seed {seed}, {cases} cases per target");
    let mut failed = false;
    if target != "kafka" {
        let mut oracle = WorkerOracle::default();
        let (n, secs) = run("worker", cases, seed, |data| oracle.check_case(data).map(drop));
        print("worker messages", &oracle.tally, secs, "");
        failed |= n > 0;
    }
    if target != "worker" {
        let mut oracle = RecordOracle::default();
        let (n, secs) = run("kafka", cases, seed ^ 0x006b_6166_6b61, |data| {
            oracle.check_case(data).map(drop)
        });
        let r = &oracle.records;
        let extra = format!(
            "; refused at the key or rank {}, rule K1 {}, rule K2 {}, header names not UTF-8 {}",
            r.refused_record, r.k1, r.k2, r.names_not_utf8
        );
        print("kafka records", &oracle.tally, secs, &extra);
        failed |= n > 0;
    }
    if failed {
        std::process::exit(1);
    }
}
