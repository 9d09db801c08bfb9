//! Cluster mode's Kafka path against a bare consumer, on a real broker
//! (tansu on loopback, as in the tests): `cargo bench --bench kafka`.
//!
//! 1. Fills the summaries topic with `RECORDS` summaries of 100 layers
//!    (`JOBS` jobs of 4 ranks, each opened with its Hellos).
//! 2. Baseline: a bare rdkafka consumer in its own group reads and decodes
//!    them all (what any consumer of the topic pays).
//! 3. gradguard: one `gradguard serve --kafka-brokers` replica processes the
//!    same records (engine, anomalies, advice, snapshots, commits). The clock
//!    runs from its first commit to the commit that covers every record; the
//!    records counted are the summaries it processed after that first commit
//!    (its `/metrics` counter, read when the commit is seen), since a
//!    pipelined detector is some batches ahead of its commits. The rate from
//!    the committed offsets alone (what this benchmark printed before) is
//!    shown beside it.
//! 4. Latency: with the replica caught up, fresh jobs each send one summary
//!    with a NaN loss (skip-step advice at once); the time from producing it
//!    to reading its advice off the advice topic, p50 and p99.
//!
//! Prints `ratio: X.XX` (gradguard over the bare consumer).

// The integration tests' harness: a real `gradguard serve` and a tansu broker.
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use gradguard::cluster::{RANK_HEADER, Topics};
use gradguard::proto::{self, worker_message};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// Records in the fill; `GG_RECORDS` overrides it (a longer run is steadier).
const RECORDS: usize = 40_000;
const JOBS: usize = 8;
const RANKS: u32 = 4;
const LAYERS: usize = 100;
const PARTITIONS: i32 = 4;
const LATENCY_SAMPLES: usize = 200;
/// The service's default topic names (the bench's settings keep them).
static TOPICS: std::sync::LazyLock<Topics> = std::sync::LazyLock::new(Topics::default);

fn main() {
    let broker = common::kafka::Broker::start();
    let brokers = broker.brokers();
    let mut config = tempfile::NamedTempFile::new().unwrap();
    write!(
        config,
        "version = 1\n[kafka]\npartitions = {PARTITIONS}\ngroup = \"bench-detectors\"\n"
    )
    .unwrap();
    if let Ok(extra) = std::env::var("GG_PROPS") {
        write!(config, "[kafka.properties]\n{extra}\n").unwrap();
    }
    let config_path = config.path().to_str().unwrap().to_owned();

    // The replica creates the topics; it is stopped before the fill, so the
    // fill is measured from a standing start.
    replica(&brokers, &config_path).stop();

    let produced = fill(&brokers);
    let bare = bare_consumer(&brokers, produced);
    println!(
        "bare consumer: {:.0} summaries/s ({produced} records of {LAYERS} layers in {:.2}s)",
        produced as f64 / bare.as_secs_f64(),
        bare.as_secs_f64()
    );

    let replica = replica(&brokers, &config_path);
    let summaries = || replica.sample("gradguard_summaries_total").unwrap_or(0.0) as usize;
    let run = follow_commits(&brokers, "bench-detectors", produced, summaries);
    let elapsed = run.elapsed.as_secs_f64();
    let gradguard = run.processed as f64 / elapsed;
    println!(
        "gradguard: {gradguard:.0} summaries/s ({} summaries processed after its first commit, all committed {elapsed:.2}s after it; by committed offsets alone {:.0}/s)",
        run.processed,
        run.committed as f64 / elapsed
    );
    println!("ratio: {:.2}", gradguard / (produced as f64 / bare.as_secs_f64()));

    let mut latencies = advice_latency(&brokers);
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] * 1e3;
    println!(
        "produce to advice: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} advice)",
        q(0.5),
        q(0.99),
        latencies.last().copied().unwrap_or(0.0) * 1e3,
        latencies.len()
    );
    replica.stop();
}

/// One cluster-mode replica with no store: the detector is what is measured.
fn replica(brokers: &str, config: &str) -> common::Server {
    common::Server::start_with(&["--no-store", "--kafka-brokers", brokers, "--settings", config])
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn record_of(body: worker_message::Body) -> Vec<u8> {
    proto::WorkerMessage { body: Some(body) }.encode_to_vec()
}

fn send<P: Sendable>(producer: &P, job: &str, rank: u32, payload: &[u8]) {
    let rank = rank.to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: RANK_HEADER,
        value: Some(rank.as_str()),
    });
    let mut record = BaseRecord::to(&TOPICS.summaries)
        .key(job)
        .payload(payload)
        .headers(headers);
    loop {
        match producer.try_send(record) {
            Ok(()) => return,
            Err(r) => {
                record = r;
                producer.wait();
            }
        }
    }
}

/// The two producer kinds the benchmark uses.
trait Sendable {
    fn try_send<'a>(&self, r: BaseRecord<'a, str, [u8]>) -> Result<(), BaseRecord<'a, str, [u8]>>;
    fn wait(&self);
}

impl Sendable for BaseProducer {
    fn try_send<'a>(&self, r: BaseRecord<'a, str, [u8]>) -> Result<(), BaseRecord<'a, str, [u8]>> {
        self.send(r).map_err(|(_, r)| r)
    }
    fn wait(&self) {
        self.poll(Duration::from_millis(10));
    }
}

impl Sendable for ThreadedProducer<DefaultProducerContext> {
    fn try_send<'a>(&self, r: BaseRecord<'a, str, [u8]>) -> Result<(), BaseRecord<'a, str, [u8]>> {
        self.send(r).map_err(|(_, r)| r)
    }
    fn wait(&self) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn records() -> usize {
    std::env::var("GG_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RECORDS)
}

/// Hellos, then healthy summaries round-robin over jobs and ranks.
fn fill(brokers: &str) -> usize {
    let producer: BaseProducer = client(brokers)
        .set("linger.ms", "5")
        .set("batch.size", "65536")
        .create()
        .unwrap();
    let names: Vec<String> = (0..LAYERS).map(|i| format!("layer{i}")).collect();
    let mut n = 0;
    for j in 0..JOBS {
        for rank in 0..RANKS {
            let hello = proto::Hello {
                job: format!("bench-{j}"),
                rank,
                world_size: RANKS,
                layer_names: names.clone(),
                client_version: "bench".into(),
                rule_profile: String::new(),
                report_progress: false,
                layout: None,
            };
            send(
                &producer,
                &format!("bench-{j}"),
                rank,
                &record_of(worker_message::Body::Hello(hello)),
            );
            n += 1;
        }
    }
    let per_round = JOBS * RANKS as usize;
    let mut step = 0u64;
    while n < records() {
        for j in 0..JOBS {
            for rank in 0..RANKS {
                let noise = 1.0 + 0.05 * (((step * 31 + u64::from(rank) * 7 + j as u64) % 17) as f32 / 17.0 - 0.5);
                let summary = proto::Summary {
                    step,
                    time: 1_700_000_000.0 + step as f64,
                    loss: Some(3.0 - step as f64 * 1e-4),
                    lr: Some(1e-3),
                    grad_norm: Some(f64::from(noise)),
                    layer_l2: vec![0.1 * noise; LAYERS],
                    layer_max_abs: vec![0.01 * noise; LAYERS],
                    layer_nonfinite: vec![0; LAYERS],
                    ..Default::default()
                };
                send(
                    &producer,
                    &format!("bench-{j}"),
                    rank,
                    &record_of(worker_message::Body::Summary(summary)),
                );
            }
        }
        n += per_round;
        step += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("the broker took the records");
    n
}

/// Reads and decodes all records, assigned every partition from the start
/// (no group); the clock starts at the first record.
fn bare_consumer(brokers: &str, expected: usize) -> Duration {
    let consumer: BaseConsumer = client(brokers)
        .set("group.id", "bench-bare")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&TOPICS.summaries, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = 0;
    let mut started = None;
    let mut layers = 0usize;
    while seen < expected {
        let Some(m) = consumer.poll(Duration::from_secs(30)) else {
            panic!("the bare consumer stalled at {seen} of {expected}");
        };
        let m = m.unwrap();
        started.get_or_insert_with(Instant::now);
        let msg = proto::WorkerMessage::decode(m.payload().unwrap_or_default()).expect("a worker message");
        if let Some(worker_message::Body::Summary(s)) = msg.body {
            layers += s.layer_l2.len();
        }
        seen += 1;
    }
    assert!(layers > 0);
    started.unwrap().elapsed()
}

/// What [`follow_commits`] saw.
struct Followed {
    /// Summaries processed after the first commit was seen.
    processed: usize,
    /// Records committed after the first commit.
    committed: usize,
    /// From the first commit to the one covering every record.
    elapsed: Duration,
}

/// Polls the group's committed offsets until they cover `expected` records;
/// `processed` tells how many summaries the replica has processed so far.
fn follow_commits(brokers: &str, group: &str, expected: usize, processed: impl Fn() -> usize) -> Followed {
    let watcher: BaseConsumer = client(brokers).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&TOPICS.summaries, p);
    }
    let committed = || -> usize {
        let c = watcher.committed_offsets(tpl.clone(), Duration::from_secs(5)).unwrap();
        c.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o as usize,
                _ => 0,
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let (start_count, started) = loop {
        let c = committed();
        if c > 0 {
            break (c, Instant::now());
        }
        assert!(Instant::now() < deadline, "gradguard never committed");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Read after the commit was seen: if anything, it counts too much as
    // done before the clock started, never too little.
    let processed_at_start = processed();
    let summaries = expected - JOBS * RANKS as usize;
    loop {
        let c = committed();
        if c >= expected {
            return Followed {
                processed: summaries.saturating_sub(processed_at_start),
                committed: c - start_count,
                elapsed: started.elapsed(),
            };
        }
        assert!(Instant::now() < deadline, "gradguard stalled at {c} of {expected}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Produce-to-advice time of a NaN loss for fresh jobs, one at a time.
fn advice_latency(brokers: &str) -> Vec<f64> {
    let producer: ThreadedProducer<DefaultProducerContext> = client(brokers).set("linger.ms", "0").create().unwrap();
    let reader: BaseConsumer = client(brokers)
        .set("group.id", "bench-advice")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = reader
            .fetch_watermarks(&TOPICS.advice, p, Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(&TOPICS.advice, p, Offset::Offset(high))
            .unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    for i in 0..LATENCY_SAMPLES {
        let job = format!("latency-{i}");
        let summary = proto::Summary {
            step: 1,
            time: 1_700_000_000.0,
            loss: Some(f64::NAN),
            grad_norm: Some(1.0),
            ..Default::default()
        };
        // The job says Hello first, as a worker does (the intake refuses a
        // summary of a job that never did); the clock starts at the summary.
        let hello = proto::Hello {
            job: job.clone(),
            world_size: 1,
            client_version: "bench".into(),
            ..Default::default()
        };
        send(&producer, &job, 0, &record_of(worker_message::Body::Hello(hello)));
        sent.insert(job.clone(), Instant::now());
        send(&producer, &job, 0, &record_of(worker_message::Body::Summary(summary)));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no advice for {job}");
            let Some(m) = reader.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.unwrap();
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            if let Some(at) = sent.remove(&key) {
                latencies.push(at.elapsed().as_secs_f64());
                if key == job {
                    break;
                }
            }
        }
    }
    latencies
}
