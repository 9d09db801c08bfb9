//! Cluster mode against a real Kafka-compatible broker (tansu, see
//! `common::kafka`): replicas of `gradguard serve --kafka-brokers` and jobs
//! played with `gradguard simulate --kafka-brokers`, no gRPC between them.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Run;
use common::kafka::Broker;

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// A broker and a settings file for the replicas and workers: 4 partitions,
/// and group timeouts short enough that a dead replica's partitions move in
/// seconds.
struct Cluster {
    broker: Broker,
    settings: tempfile::NamedTempFile,
}

impl Cluster {
    fn start() -> Self {
        Self::with_partitions(4)
    }

    fn with_partitions(partitions: u32) -> Self {
        Self::on(Broker::start(), partitions)
    }

    fn on(broker: Broker, partitions: u32) -> Self {
        Self::with_properties(broker, partitions, "")
    }

    /// With more `[kafka.properties]` lines.
    fn with_properties(broker: Broker, partitions: u32, properties: &str) -> Self {
        let mut settings = tempfile::NamedTempFile::new().expect("a settings file");
        write!(settings, "{}{properties}", settings_text(partitions)).unwrap();
        Self { broker, settings }
    }

    fn settings_path(&self) -> &str {
        self.settings.path().to_str().expect("a UTF-8 temp path")
    }

    fn replica(&self) -> common::Server {
        common::Server::start_with(&[
            "--kafka-brokers",
            &self.broker.brokers(),
            "--settings",
            self.settings_path(),
            "--no-store",
        ])
    }

    /// A replica with a store (in a temporary data directory).
    fn replica_with_store(&self) -> common::Server {
        common::Server::start_with(&[
            "--kafka-brokers",
            &self.broker.brokers(),
            "--settings",
            self.settings_path(),
        ])
    }

    fn simulate_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "simulate",
            "--kafka-brokers",
            &self.broker.brokers(),
            "--settings",
            self.settings_path(),
            "--json",
        ])
        .args(args);
        cmd
    }

    fn simulate(&self, args: &[&str]) -> Run {
        Run::from(self.simulate_cmd(args).output().expect("run gradguard simulate"))
    }

    fn simulate_in_background(&self, args: &[&str]) -> Child {
        self.simulate_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gradguard simulate")
    }
}

/// A settings file's text, up to its `[kafka.properties]` table (last).
fn settings_text(partitions: u32) -> String {
    format!(
        "version = 1\n[kafka]\npartitions = {partitions}\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n"
    )
}

/// Waits until the replicas between them own all 4 partitions, each at least one.
fn wait_for_assignment(replicas: &[&common::Server]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owned: Vec<f64> = replicas
            .iter()
            .map(|r| r.sample("gradguard_kafka_partitions_owned").unwrap_or(0.0))
            .collect();
        if owned.iter().sum::<f64>() == 4.0 && owned.iter().all(|&n| n >= 1.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never spread over the replicas: {owned:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn summaries(server: &common::Server) -> f64 {
    server.sample("gradguard_summaries_total").unwrap_or(0.0)
}

/// (decided at step, action) of every advice in a `simulate --json` run.
fn advice_of(run: &Run) -> Vec<(u64, String)> {
    let lines = run.json();
    let (summary, advice) = lines.split_last().expect("a summary line");
    assert_eq!(summary["kind"], "summary", "{}", run.stdout);
    let mut list: Vec<(u64, String)> = advice
        .iter()
        .map(|a| {
            (
                a["step"].as_u64().expect("a step"),
                a["action"].as_str().expect("an action").to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

#[test]
fn an_exploding_job_is_brought_back_through_kafka_alone() {
    let _turn = common::turn();
    let cluster = Cluster::start();
    let replica = cluster.replica();
    let run = cluster.simulate(&[
        "--scenario",
        "explode",
        "--apply-advice",
        "--workers",
        "2",
        "--steps",
        "400",
        "--fault-at",
        "200",
        "--step-interval",
        "20ms",
        "--job",
        "kafka-explode",
    ]);
    let lines = run.json();
    let (summary, advice) = lines.split_last().expect("a summary line");
    assert_eq!(summary["summaries_sent"], 800, "{summary}");
    assert_eq!(summary["result"], "recovered", "{}", run.stdout);
    let first = advice.first().unwrap_or_else(|| panic!("no advice: {}", run.stdout));
    assert_eq!(first["action"], "clip_gradients", "{first}");
    assert!(first["step"].as_u64().is_some_and(|s| s >= 200), "{first}");
    assert_eq!(summary["advice_applied"], summary["advice_total"]);
    // The replica saw every summary exactly once, and said so on /metrics,
    // with the cluster-mode series the alert rules use.
    assert_eq!(summaries(&replica), 800.0);
    let text = replica.wait_for("consumer lag from librdkafka's statistics", |t| {
        t.contains("gradguard_kafka_consumer_lag_messages{")
    });
    assert_eq!(common::sample(&text, "gradguard_kafka_up"), Some(1.0));
    assert_eq!(
        common::sample(&text, "gradguard_kafka_producer_errors_total"),
        Some(0.0)
    );
    assert_eq!(common::sample(&text, "gradguard_kafka_partitions_owned"), Some(4.0));
    assert!(
        replica.sample("gradguard_advice_total{action=\"clip_gradients\",training_job=\"kafka-explode\"}") >= Some(1.0),
        "{}",
        replica.scrape()
    );
}

#[test]
fn a_grpc_worker_on_one_replica_is_advised_by_the_jobs_owner_on_another() {
    let _turn = common::turn();
    // One partition: exactly one replica detects, the other only relays.
    let cluster = Cluster::with_partitions(1);
    let a = cluster.replica();
    let b = cluster.replica();
    // Settled: b (started last) received its assignment, maybe an empty one,
    // and exactly one of them owns the partition. a had one before b joined
    // unless both joined in the same round.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (owner, relay) = loop {
        let owned = |r: &common::Server| r.sample("gradguard_kafka_partitions_owned").unwrap_or(0.0);
        let rounds = |r: &common::Server| r.sample("gradguard_kafka_rebalances_total").unwrap_or(0.0);
        if rounds(&b) >= 1.0 && rounds(&a) >= 1.0 {
            match (owned(&a), owned(&b)) {
                (1.0, 0.0) => break (a, b),
                (0.0, 1.0) => break (b, a),
                _ => {}
            }
        }
        assert!(Instant::now() < deadline, "no single owner");
        std::thread::sleep(Duration::from_millis(100));
    };
    let run = Run::from(
        Command::new(BIN)
            .args([
                "simulate",
                "--server",
                &relay.url(),
                "--json",
                "--job",
                "grpc-via-relay",
            ])
            .args(["--scenario", "explode", "--apply-advice", "--workers", "2"])
            .args(["--steps", "400", "--fault-at", "200", "--step-interval", "20ms"])
            .output()
            .expect("run gradguard simulate"),
    );
    let lines = run.json();
    let (summary, advice) = lines.split_last().expect("a summary line");
    assert_eq!(summary["result"], "recovered", "{}", run.stdout);
    assert_eq!(
        advice.first().map(|a| a["action"].clone()),
        Some("clip_gradients".into()),
        "{}",
        run.stdout
    );
    // The relay forwarded, the owner detected: every summary went through
    // Kafka (the stream ended once they were in the topic, maybe before the
    // owner had read the last ones).
    owner.wait_for("the owner to process all 800 summaries", |text| {
        common::sample(text, "gradguard_summaries_total") == Some(800.0)
    });
    assert_eq!(summaries(&relay), 0.0);
    // The relay delivered the advice on the streams and took their acks.
    assert_eq!(
        relay.sample("gradguard_job_advice_unacked{training_job=\"grpc-via-relay\"}"),
        Some(0.0)
    );
    // A relay cannot say when the owner has decided on a step: asked for
    // progress, its Welcome declines.
    let welcome = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = gradguard::client::connect(&relay.url()).await.expect("connect");
        let hello = gradguard::proto::Hello {
            report_progress: true,
            ..common::hello("progress-via-relay", 0, 1, 2)
        };
        gradguard::client::WorkerStream::open(&mut c, hello)
            .await
            .expect("open")
            .welcome
    });
    assert!(!welcome.reports_progress);
}

/// A query command against a replica, as JSON lines.
fn query(server: &common::Server, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(args)
        .args(["--server", &server.url(), "--json"])
        .output()
        .expect("run a gradguard query");
    Run::from(out).json()
}

#[test]
fn every_replica_answers_queries_about_every_job() {
    let _turn = common::turn();
    let cluster = Cluster::start();
    let (a, b) = (cluster.replica_with_store(), cluster.replica_with_store());
    wait_for_assignment(&[&a, &b]);
    let run = cluster.simulate(&[
        "--scenario",
        "explode",
        "--workers",
        "2",
        "--steps",
        "400",
        "--fault-at",
        "200",
        "--step-interval",
        "0",
        "--job",
        "queried",
    ]);
    let advised: Vec<u64> = {
        let lines = run.json();
        let mut ids: Vec<u64> = lines[..lines.len() - 1]
            .iter()
            .map(|a| a["id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert!(!advised.is_empty(), "{}", run.stdout);
    // The owner counted what it found; both stores must hold exactly that.
    let found: f64 = [&a, &b]
        .iter()
        .map(|r| {
            let text = r.scrape();
            ["info", "warning", "critical"]
                .iter()
                .flat_map(|sev| {
                    text.lines().filter(move |l| {
                        l.starts_with("gradguard_anomalies_total{")
                            && l.contains("training_job=\"queried\"")
                            && l.contains(sev)
                    })
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    assert!(found > 0.0);
    let mut ids_per_replica = Vec::new();
    for replica in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let anomalies = loop {
            let rows = query(replica, &["anomalies", "--job", "queried", "--limit", "100000"]);
            if rows.len() as f64 >= found {
                break rows;
            }
            assert!(Instant::now() < deadline, "{} of {found} anomalies stored", rows.len());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(anomalies.len() as f64, found, "no anomaly twice");
        let mut ids: Vec<u64> = anomalies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        ids_per_replica.push(ids);

        let mut advice: Vec<u64> = query(replica, &["advice", "--job", "queried"])
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect();
        advice.sort_unstable();
        assert_eq!(advice, advised, "the stored advice is the advice the workers got");

        let deadline = Instant::now() + Duration::from_secs(30);
        let job = loop {
            let jobs = query(replica, &["jobs"]);
            if let Some(j) = jobs
                .into_iter()
                .find(|j| j["job"] == "queried" && j["last_step"] == 399)
            {
                break j;
            }
            assert!(Instant::now() < deadline, "the job's row never reached step 399");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(matches!(job["health"].as_str(), Some("critical" | "warning")), "{job}");
        assert_eq!(
            (job["ranks"].as_u64(), job["world_size"].as_u64()),
            (Some(2), Some(2)),
            "{job}"
        );
    }
    assert_eq!(
        ids_per_replica[0], ids_per_replica[1],
        "both stores hold the same anomalies"
    );
}

/// Plays a healthy two-rank job of 1,200 summaries over gRPC into a replica
/// that owns every partition, runs `disrupt` once 200 are processed (it gets
/// the cluster and the replica, and returns with the brokers reachable
/// again), then checks that every summary the replica accepted was processed
/// once, none lost, none twice.
fn a_disrupted_run_loses_no_summary(
    cluster: &mut Cluster,
    job: &str,
    disrupt: impl FnOnce(&mut Cluster, &common::Server),
) {
    let replica = cluster.replica();
    replica.wait_for("the detector to own the partitions", |t| {
        common::sample(t, "gradguard_kafka_partitions_owned") == Some(4.0)
    });
    let child = Command::new(BIN)
        .args(["simulate", "--server", &replica.url(), "--json", "--job", job])
        .args([
            "--scenario",
            "healthy",
            "--workers",
            "2",
            "--steps",
            "600",
            "--step-interval",
            "10ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradguard simulate");
    wait_for_progress(&[&replica], 200.0);
    disrupt(cluster, &replica);
    let during = summaries(&replica);

    let run = Run::from(child.wait_with_output().expect("simulate ends"));
    let summary = run.json().pop().expect("a summary line");
    assert_eq!(summary["summaries_sent"], 1200, "{summary}");
    assert!(
        during < 1200.0,
        "the disruption came too late to test anything ({during} processed)"
    );
    replica.wait_for("all 1200 summaries processed once the brokers are back", |t| {
        common::sample(t, "gradguard_summaries_total") == Some(1200.0)
            && common::sample(t, "gradguard_kafka_up") == Some(1.0)
    });
    assert_eq!(replica.sample("gradguard_kafka_dropped_total"), Some(0.0));
    assert_eq!(health(&replica), "Serving");
}

#[test]
fn a_broker_outage_loses_no_accepted_summary() {
    let _turn = common::turn();
    let mut cluster = Cluster::on(Broker::start_behind_proxy(), 4);
    a_disrupted_run_loses_no_summary(&mut cluster, "outage", |cluster, replica| {
        // The brokers go away mid-run: the replica says so, and keeps the
        // workers' streams open, their summaries queued.
        cluster.broker.cut();
        replica.wait_for("the replica to see the brokers down", |t| {
            common::sample(t, "gradguard_kafka_up") == Some(0.0)
        });
        let last_summary = "gradguard_job_last_step_timestamp_seconds{training_job=\"outage\"}";
        let at_cut = replica.sample(last_summary).expect("the job's last-summary time");
        replica.wait_for("the replica to accept summaries with the brokers away", |t| {
            common::sample(t, last_summary).is_some_and(|ts| ts > at_cut + 0.5)
                && common::sample(t, "gradguard_active_streams") == Some(2.0)
                && common::sample(t, "gradguard_kafka_up") == Some(0.0)
        });
        assert_eq!(health(replica), "NotServing", "gRPC health with the brokers away");
        cluster.broker.restore();
    });
}

#[test]
fn a_broker_restart_loses_no_accepted_summary() {
    let _turn = common::turn();
    let data = tempfile::tempdir().expect("a directory for the broker's data");
    let mut cluster = Cluster::on(Broker::start_on_disk(data.path()), 4);
    a_disrupted_run_loses_no_summary(&mut cluster, "restart", |cluster, replica| {
        // kill -9 of the broker; it starts again on the same port and data.
        // The replica holds the workers' summaries meanwhile.
        cluster.broker.stop();
        replica.wait_for("the replica to see the broker down", |t| {
            common::sample(t, "gradguard_kafka_up") == Some(0.0)
        });
        cluster.broker.restart();
    });
}

/// The gRPC health status of the whole server (service ""), checked to
/// agree with `/readyz` (200 while serving, 503 otherwise).
fn health(server: &common::Server) -> String {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .expect("connect for health");
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check")
            .into_inner()
            .status();
        format!("{status:?}")
    });
    let readyz = match ureq::get(&format!("http://{}/readyz", server.metrics)).call() {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("/readyz: {e}"),
    };
    assert_eq!(
        readyz == 200,
        status == "Serving",
        "/readyz {readyz} with gRPC health {status}"
    );
    status
}

#[test]
fn two_replicas_split_the_jobs_and_each_summary_is_processed_once() {
    let _turn = common::turn();
    let cluster = Cluster::start();
    let (a, b) = (cluster.replica(), cluster.replica());
    wait_for_assignment(&[&a, &b]);
    let jobs: Vec<Child> = (0..6)
        .map(|i| {
            let job = format!("split-{i}");
            cluster.simulate_in_background(&[
                "--scenario",
                "healthy",
                "--workers",
                "2",
                "--steps",
                "100",
                "--step-interval",
                "0",
                "--job",
                &job,
            ])
        })
        .collect();
    for child in jobs {
        let run = Run::from(child.wait_with_output().expect("simulate ends"));
        run.assert_code(0);
    }
    let (on_a, on_b) = (summaries(&a), summaries(&b));
    assert_eq!(on_a + on_b, 6.0 * 200.0, "a={on_a} b={on_b}");
    assert!(
        on_a > 0.0 && on_b > 0.0,
        "one replica did all the work: a={on_a} b={on_b}"
    );
}

/// Waits until one of the replicas has processed `n` summaries; returns its index.
fn wait_for_progress(replicas: &[&common::Server], n: f64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: Vec<f64> = replicas.iter().map(|r| summaries(r)).collect();
        if let Some(i) = done.iter().position(|&d| d >= n) {
            return i;
        }
        assert!(Instant::now() < deadline, "the job made no progress: {done:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_jobs_state_survives_its_replica_stopping_and_crashing() {
    let _turn = common::turn();
    let cluster = Cluster::start();
    let args = |job: &'static str| {
        [
            "--scenario",
            "explode",
            "--workers",
            "2",
            "--layers",
            "8",
            "--steps",
            "600",
            "--fault-at",
            "300",
            "--step-interval",
            "10ms",
            "--job",
            job,
        ]
    };
    // The reference: the same run on one replica that stays up. Without
    // --apply-advice the summaries do not depend on the advice, and the
    // engine is deterministic, so any other run must be advised the same:
    // same steps, same actions, nothing missing, nothing twice.
    let expected = {
        let replica = cluster.replica();
        let run = cluster.simulate(&args("reference"));
        replica.stop();
        advice_of(&run)
    };
    assert!(expected.iter().any(|(_, a)| a == "clip_gradients"), "{expected:?}");
    assert!(
        expected.iter().any(|(_, a)| a != "clip_gradients"),
        "no escalation: {expected:?}"
    );

    // Stop the owner mid-episode (past the fault, at step ~350): the other
    // replica takes the partition, restores the job, and carries on.
    let (a, b) = (cluster.replica(), cluster.replica());
    wait_for_assignment(&[&a, &b]);
    let child = cluster.simulate_in_background(&args("handover"));
    let owner = wait_for_progress(&[&a, &b], 700.0);
    let (owner, survivor) = if owner == 0 { (a, b) } else { (b, a) };
    owner.stop();
    let run = Run::from(child.wait_with_output().expect("simulate ends"));
    assert_eq!(
        advice_of(&run),
        expected,
        "advice after a hand-over differs from an undisturbed run"
    );
    let taken = summaries(&survivor);
    assert!(taken > 0.0 && taken < 1200.0, "the survivor processed {taken} of 1200");
    survivor.stop();

    // Crash the only replica (kill -9, nothing flushed or committed) and start
    // another: it restores the last snapshot and replays what was not
    // committed; redelivered steps are recognised, replayed advice keeps its id.
    let crashing = cluster.replica();
    let child = cluster.simulate_in_background(&args("crash"));
    wait_for_progress(&[&crashing], 700.0);
    crashing.kill();
    let replacement = cluster.replica();
    let run = Run::from(child.wait_with_output().expect("simulate ends"));
    assert_eq!(
        advice_of(&run),
        expected,
        "advice after a crash differs from an undisturbed run"
    );
    let taken = summaries(&replacement);
    assert!(
        taken > 0.0 && taken < 1200.0,
        "the replacement processed {taken} of 1200"
    );
}

/// A summaries-topic record as anyone with access to the topic can write it:
/// a key, a rank header, and whatever payload.
fn produce_raw(brokers: &str, records: &[(&str, Option<u32>, Vec<u8>)]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a producer");
    let topic = gradguard::cluster::Topics::default().summaries;
    for (key, rank, payload) in records {
        let rank = rank.map(|r| r.to_string());
        let mut record = BaseRecord::<str, [u8]>::to(&topic).key(*key).payload(payload);
        if let Some(rank) = &rank {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: gradguard::cluster::RANK_HEADER,
                value: Some(rank.as_str()),
            }));
        }
        producer.send(record).map_err(|(e, _)| e).expect("queued");
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("all records in the topic");
}

#[test]
fn records_written_straight_to_the_topic_are_refused_as_grpc_refuses_them() {
    use gradguard::proto::{self, worker_message::Body};
    use prost::Message as _;
    let _turn = common::turn();
    let cluster = Cluster::start();
    let replica = cluster.replica();
    wait_for_assignment(&[&replica]);

    let encode = |body: Body| proto::WorkerMessage { body: Some(body) }.encode_to_vec();
    let summary = |step: u64, layers: usize| proto::Summary {
        step,
        loss: Some(2.0),
        grad_norm: Some(1.0),
        layer_l2: vec![0.3; layers],
        ..Default::default()
    };
    let hello = |job: &str, rank: u32, world: u32, layers: usize| Body::Hello(common::hello(job, rank, world, layers));
    // The bad inputs of the serve tests, as records of job "k" (8 ranks, 4
    // layers) and a few others.
    let records: Vec<(&str, Option<u32>, Vec<u8>)> = vec![
        // A summary and an ack of a job that never said Hello.
        ("nobody", Some(0), encode(Body::Summary(summary(1, 4)))),
        ("nobody", Some(0), encode(Body::Ack(proto::AdviceAck::default()))),
        ("k", Some(0), encode(hello("k", 0, 8, 4))),
        // Rank 0 is healthy throughout: 10 steps.
        (
            "k",
            Some(0),
            encode(Body::Batch(proto::SummaryBatch {
                summaries: (1..=10).map(|s| summary(s, 4)).collect(),
            })),
        ),
        // Wrong layer count.
        ("k", Some(1), encode(Body::Summary(summary(1, 3)))),
        // Backwards, then a repeat: the first of each is accepted.
        ("k", Some(2), encode(Body::Summary(summary(5, 4)))),
        ("k", Some(2), encode(Body::Summary(summary(4, 4)))),
        ("k", Some(3), encode(Body::Summary(summary(5, 4)))),
        ("k", Some(3), encode(Body::Summary(summary(5, 4)))),
        // A batch whose third summary is bad: the two before it stay.
        (
            "k",
            Some(7),
            encode(Body::Batch(proto::SummaryBatch {
                summaries: vec![summary(1, 4), summary(2, 4), summary(3, 3), summary(4, 4)],
            })),
        ),
        // Hellos: rank beyond the world size, other layer names, unknown
        // profile, one that disagrees with its record's key.
        ("k", Some(9), encode(hello("k", 9, 8, 4))),
        ("k", Some(4), encode(hello("k", 4, 8, 5))),
        (
            "p",
            Some(0),
            encode(Body::Hello(proto::Hello {
                rule_profile: "nope".into(),
                ..common::hello("p", 0, 1, 4)
            })),
        ),
        ("k", Some(5), encode(hello("other", 5, 8, 4))),
        // No job, no rank, bytes that are no message, a message with no body.
        ("", Some(0), encode(Body::Summary(summary(1, 4)))),
        ("k", None, encode(Body::Summary(summary(11, 4)))),
        // Over the limits: a long layer name, a batch too large, a step beyond 2⁶³ − 1.
        (
            "k",
            Some(4),
            encode(Body::Hello(proto::Hello {
                layer_names: vec!["x".repeat(1000); 4],
                ..common::hello("k", 4, 8, 4)
            })),
        ),
        (
            "k",
            Some(4),
            encode(Body::Batch(proto::SummaryBatch {
                summaries: (1..=1025).map(|s| summary(s, 0)).collect(),
            })),
        ),
        ("k", Some(4), encode(Body::Summary(summary(1 << 63, 4)))),
        ("k", Some(6), vec![0xff, 0xff, 0xff]),
        ("k", Some(6), Vec::new()),
    ];
    produce_raw(&cluster.broker.brokers(), &records);

    let labels = [
        "no_hello",
        "layer_count",
        "step_backwards",
        "duplicate_step",
        "rank_out_of_range",
        "layer_names",
        "config",
        "invalid_hello",
        "empty_job",
        "no_rank",
        "undecodable",
        "empty_message",
        "too_long",
        "step_out_of_range",
    ];
    let refused = |text: &str, reason: &str| {
        common::sample(
            text,
            &format!("gradguard_summaries_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    let text = replica.wait_for("every bad record to be refused", |text| {
        labels.iter().all(|reason| refused(text, reason) >= Some(1.0)) && refused(text, "no_hello") >= Some(2.0)
    });
    assert_eq!(refused(&text, "no_hello"), Some(2.0));
    // Accepted: rank 0's 10, the first of ranks 2 and 3, the two summaries
    // of the batch before its bad third; nothing of the refused.
    assert_eq!(common::sample(&text, "gradguard_summaries_total"), Some(14.0));
}

/// `[kafka.properties]` lines for SCRAM-SHA-512 over a plain connection
/// (tansu 0.6 has no TLS listener).
fn sasl_properties(password: &str) -> String {
    format!(
        "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"gradguard\"\n\"sasl.password\" = \"{password}\"\n"
    )
}

/// Starts a replica that is expected not to come up; its stderr once it exits.
fn replica_refused(brokers: &str, properties: &str) -> String {
    let mut settings = tempfile::NamedTempFile::new().expect("a settings file");
    write!(settings, "{}{properties}", settings_text(4)).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--no-store",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--kafka-brokers", brokers, "--settings"])
        .arg(settings.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradguard serve");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "a replica with properties {properties:?} did not give up in 120 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A broker that asks every client for SASL: with `[kafka.properties]`
/// alone, every Kafka client of a replica (admin, detector consumer and
/// producer, store feed, forwarder, relay, readers) and of a worker writing
/// straight to Kafka (producer, advice reader, commit watcher) authenticates.
/// Without the properties, or with a wrong password, a replica does not start.
#[test]
fn every_kafka_client_authenticates_with_the_sasl_properties() {
    let _turn = common::turn();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_sasl(dir.path(), "gradguard", "s3cret");
    let cluster = Cluster::with_properties(broker, 4, &sasl_properties("s3cret"));
    let brokers = cluster.broker.brokers();
    let started = Instant::now();
    // A short request timeout: the refused replica gives up in seconds.
    let quick = "\"socket.timeout.ms\" = \"3000\"\n";
    for properties in [quick.to_owned(), format!("{quick}{}", sasl_properties("wrong"))] {
        let err = replica_refused(&brokers, &properties);
        assert!(err.contains("cannot reach the Kafka brokers"), "{err}");
    }
    eprintln!("two replicas refused in {:.1} s", started.elapsed().as_secs_f64());

    let replica = cluster.replica_with_store();
    let explode = [
        "--scenario",
        "explode",
        "--apply-advice",
        "--workers",
        "2",
        "--steps",
        "400",
        "--fault-at",
        "200",
        "--step-interval",
        "10ms",
        "--job",
    ];
    let direct = cluster.simulate(&[&explode[..], &["sasl-kafka"]].concat());
    let grpc = Run::from(
        Command::new(BIN)
            .args(["simulate", "--server", &replica.url(), "--json"])
            .args(explode)
            .arg("sasl-grpc")
            .output()
            .expect("run gradguard simulate"),
    );
    for run in [&direct, &grpc] {
        let lines = run.json();
        let (summary, advice) = lines.split_last().expect("a summary line");
        assert_eq!(summary["result"], "recovered", "{}{}", run.stdout, run.stderr);
        assert_eq!(
            advice.first().map(|a| a["action"].clone()),
            Some("clip_gradients".into()),
            "{}",
            run.stdout
        );
    }
    // The store feed read both jobs' anomalies back.
    for job in ["sasl-kafka", "sasl-grpc"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while query(&replica, &["anomalies", "--job", job]).is_empty() {
            assert!(Instant::now() < deadline, "no anomaly of {job} in the store");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(replica.sample("gradguard_kafka_up"), Some(1.0));
}
