//! `gradguard serve` end to end: the real server process on port 0, a real gRPC
//! client over a socket, and a real scrape of `/metrics`.

mod common;

use std::time::Duration;

use common::{Server, hello, open_job, play, sample, send_all};
use gradguard::client::{self, WorkerStream};
use gradguard::model::Action;
use gradguard::proto::{self, WorkerMessage, advice, ingest_client::IngestClient, worker_message};
use gradguard::scenario::{Fault, ScenarioConfig};
use gradguard::wire;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const LAYERS: usize = 8;

fn config(job: &str, fault: Fault, workers: u32) -> ScenarioConfig {
    ScenarioConfig {
        job: job.into(),
        fault,
        workers,
        layers: LAYERS,
        steps: 400,
        fault_at: 250,
        seed: 7,
        ..ScenarioConfig::default()
    }
}

fn action(a: &proto::Advice) -> Action {
    wire::action_from_proto(a.action.as_ref().expect("advice has an action"))
}

fn names(advice: &[proto::Advice]) -> Vec<&'static str> {
    advice.iter().map(|a| action(a).name()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn healthy_run_gets_no_advice() {
    let server = Server::start();
    let (received, _) = play(&server.url(), config("healthy", Fault::Healthy, 4)).await;
    for (rank, advice) in received.iter().enumerate() {
        assert!(advice.is_empty(), "rank {rank} got {:?}", names(advice));
    }
    let text = server.scrape();
    assert_eq!(sample(&text, "gradguard_summaries_total"), Some(1600.0));
    assert_eq!(
        sample(&text, "gradguard_layer_stats_total"),
        Some(1600.0 * LAYERS as f64)
    );
    assert_eq!(
        sample(&text, "gradguard_job_health{training_job=\"healthy\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exploding_run_gets_clip_advice_then_an_escalation() {
    let server = Server::start();
    let (received, plan) = play(&server.url(), config("explode", Fault::AbruptExplosion, 1)).await;
    let advice = &received[0];
    let first = advice.first().expect("some advice");
    assert!(matches!(action(first), Action::ClipGradients { max_norm } if max_norm > 0.0));
    assert!(first.decided_at_step >= plan.at, "{first:?}");
    assert_eq!(first.job, "explode");
    assert!(first.rules.iter().any(|r| r == "grad_spike"), "{first:?}");
    assert!(!first.reason.is_empty() && !first.evidence.is_empty());
    let later = names(&advice[1..]);
    assert!(
        later.iter().any(|a| ["scale_lr", "rollback", "halt"].contains(a)),
        "no escalation after clip: {later:?}"
    );

    let text = server.scrape();
    assert!(
        sample(
            &text,
            "gradguard_advice_total{action=\"clip_gradients\",training_job=\"explode\"}"
        )
        .unwrap()
            >= 1.0
    );
    let spikes: f64 = ["info", "warning", "critical"]
        .iter()
        .filter_map(|severity| {
            sample(
                &text,
                &format!(
                    "gradguard_anomalies_total{{rule=\"grad_spike\",severity=\"{severity}\",training_job=\"explode\"}}"
                ),
            )
        })
        .sum();
    assert!(spikes >= 1.0, "{text}");
    assert!(sample(&text, "gradguard_advice_latency_seconds_count").unwrap() >= advice.len() as f64);
    assert!(
        sample(&text, "gradguard_job_health{training_job=\"explode\"}").unwrap() >= 2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_judged_as_its_summaries_would_be_alone() {
    let server = Server::start();
    let (alone, plan) = play(&server.url(), config("alone", Fault::AbruptExplosion, 1)).await;

    // The same run, its summaries sent seven at a time (a lingering worker).
    let (mut scenario, senders, mut receivers) =
        open_job(&server.url(), &config("batched", Fault::AbruptExplosion, 1)).await;
    let mut receiver = receivers.remove(0);
    let reader = tokio::spawn(async move { receiver.drain().await });
    let mut pending = Vec::new();
    let mut batches = 0;
    while let Some(step) = scenario.next_step() {
        pending.push(wire::summary_to_proto(&step[0]));
        if pending.len() == 7 {
            let summaries = std::mem::take(&mut pending);
            senders[0]
                .send(worker_message::Body::Batch(proto::SummaryBatch { summaries }))
                .await
                .unwrap();
            batches += 1;
        }
    }
    let summaries = std::mem::take(&mut pending);
    senders[0]
        .send(worker_message::Body::Batch(proto::SummaryBatch { summaries }))
        .await
        .unwrap();
    drop(senders);
    let batched = reader.await.unwrap().expect("stream ended cleanly");
    assert!(batches >= 50);

    let decided = |advice: &[proto::Advice]| -> Vec<_> {
        advice
            .iter()
            .map(|a| (action(a).name(), a.decided_at_step, a.apply_from_step, a.rules.clone()))
            .collect()
    };
    assert!(!alone[0].is_empty() && alone[0][0].decided_at_step >= plan.at);
    assert_eq!(decided(&batched), decided(&alone[0]));
    let text = server.scrape();
    assert_eq!(sample(&text, "gradguard_summaries_total"), Some(800.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn nan_gradients_get_skip_step_advice() {
    let server = Server::start();
    let (received, plan) = play(&server.url(), config("nan", Fault::NanGradients, 2)).await;
    for advice in &received {
        let skip = advice
            .iter()
            .find(|a| action(a) == Action::SkipStep)
            .unwrap_or_else(|| panic!("no skip_step in {:?}", names(advice)));
        assert_eq!(skip.decided_at_step, plan.at);
        assert_eq!(skip.apply_from_step, plan.at);
        assert_eq!(skip.severity(), proto::Severity::Critical);
        assert_eq!(skip.rules, ["nonfinite"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rank_outlier_gets_inspect_worker_advice_on_every_stream() {
    let server = Server::start();
    let cfg = config("outlier", Fault::RankOutlier, 4);
    let (mut scenario, senders, receivers) = open_job(&server.url(), &cfg).await;
    let bad = scenario.plan().rank.expect("the plan names a rank");
    // Every stream must see it, so all stay open until each has.
    let readers: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move {
                while let Some(a) = r.advice().await.expect("stream healthy") {
                    if action(&a) == (Action::InspectWorker { rank: bad }) {
                        return a;
                    }
                }
                panic!("stream ended without inspect_worker advice");
            })
        })
        .collect();
    send_all(&mut scenario, &senders).await;
    for reader in readers {
        let advice = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("inspect_worker advice arrives")
            .unwrap();
        assert!(advice.rules.contains(&"rank_outlier".to_owned()), "{advice:?}");
        assert!(advice.reason.contains(&format!("rank {bad}")), "{advice:?}");
    }
    drop(senders);
}

/// A Hello of a pipeline job: 3 stages of 4 data-parallel replicas (rank =
/// stage × 4 + replica, the stage its replica group).
fn pipeline_hello(rank: u32, replica_group: u32) -> proto::Hello {
    proto::Hello {
        layout: Some(proto::Layout {
            data_parallel: 4,
            tensor_parallel: 1,
            pipeline_parallel: 3,
            replica_group,
        }),
        ..hello("pipeline", rank, 12, 0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_job_compares_each_rank_only_with_its_stage() {
    use worker_message::Body::Hello;
    let server = Server::start();
    let mut c = client::connect(&server.url()).await.unwrap();
    let (mut senders, mut readers, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for rank in 0..12 {
        let stream = WorkerStream::open(&mut c, pipeline_hello(rank, rank / 4))
            .await
            .unwrap();
        senders.push(stream.sender);
        let mut receiver = stream.receiver;
        // Every stream must see the advice, so all stay open until each has
        // one (a stream read ahead of the others could end before the step
        // that decides it); then the rest is drained to the end.
        let (tell, told) = tokio::sync::oneshot::channel();
        seen.push(told);
        readers.push(tokio::spawn(async move {
            let mut advice = Vec::new();
            let mut tell = Some(tell);
            while let Some(a) = receiver.advice().await? {
                if matches!(action(&a), Action::InspectWorker { .. }) {
                    tell.take().map(|t| t.send(()));
                }
                advice.push(a);
            }
            Ok::<_, tonic::Status>(advice)
        }));
    }
    // The last stage's layers have norms 50× the others' (without the
    // layout its four ranks would be the job's outliers); rank 9, a replica
    // of that stage, goes 10× its peers from step 40. Steps are 10 ms apart
    // by the workers' clock, whatever the order the streams are read in.
    let start = unix_now();
    for step in 1..=60u64 {
        for (rank, sender) in senders.iter().enumerate() {
            let stage = if rank / 4 == 2 { 50.0 } else { 1.0 };
            let bad = if rank == 9 && step >= 40 { 10.0 } else { 1.0 };
            let wobble = 1.0 + 0.02 * (((step * 7 + rank as u64 * 3) % 5) as f64 - 2.0) / 2.0;
            let p = proto::Summary {
                time: start + step as f64 * 0.01,
                grad_norm: Some(stage * bad * wobble),
                ..summary(step, 0)
            };
            sender.summary(p).await.unwrap();
        }
    }

    // A Hello that disagrees with the job's layout is refused, naming the field.
    let disagree = |layout: proto::Layout| {
        msg(Hello(proto::Hello {
            layout: Some(layout),
            ..pipeline_hello(3, 0)
        }))
    };
    let sizes = proto::Layout {
        data_parallel: 2,
        tensor_parallel: 1,
        pipeline_parallel: 6,
        replica_group: 0,
    };
    let cases: Vec<(WorkerMessage, &[&str])> = vec![
        (
            disagree(sizes),
            &[
                "field layout: ",
                "pipeline_parallel 6 = 12 ranks",
                "laid out as data_parallel 4",
            ],
        ),
        (
            msg(Hello(pipeline_hello(3, 1))),
            &["field layout.replica_group: 1", "rank 3 is in replica group 0"],
        ),
        (
            msg(Hello(pipeline_hello(3, 3))),
            &[
                "field layout.replica_group: 3",
                "not below tensor_parallel 1 × pipeline_parallel 3 = 3",
            ],
        ),
        (
            msg(Hello(hello("pipeline", 3, 8, 0))),
            &["field world_size: 8", "laid out as"],
        ),
    ];
    for (message, expected) in cases {
        let status = refused(&mut c, vec![message]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        for part in expected {
            assert!(status.message().contains(part), "{:?} lacks {part:?}", status.message());
        }
    }

    for told in seen {
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("every stream gets inspect_worker advice")
            .expect("the reader ran until it did");
    }
    drop(senders);
    for reader in readers {
        let advice = reader.await.unwrap().expect("stream ended cleanly");
        let inspect: Vec<_> = advice
            .iter()
            .filter(|a| matches!(action(a), Action::InspectWorker { .. }))
            .collect();
        assert_eq!(inspect.len(), 1, "{advice:?}");
        assert_eq!(action(inspect[0]), Action::InspectWorker { rank: 9 });
        assert!(
            inspect[0].reason.contains("of 4 ranks of replica group 2"),
            "{advice:?}"
        );
    }
    let text = server.scrape();
    let refused_layouts = sample(&text, "gradguard_summaries_rejected_total{reason=\"layout\"}");
    assert_eq!(refused_layouts, Some(4.0));
}

/// Opens a raw stream, sends `messages` and keeps its half open, and returns
/// the status the server ended the stream with.
async fn refused(client: &mut IngestClient<client::GrpcChannel>, messages: Vec<WorkerMessage>) -> tonic::Status {
    let (tx, rx) = mpsc::channel(messages.len() + 1);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let call = async {
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status,
        };
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => return status,
            }
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("server answered");
    drop(tx);
    status
}

fn msg(body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

fn summary(step: u64, layers: usize) -> proto::Summary {
    proto::Summary {
        step,
        loss: Some(3.0),
        lr: Some(1e-3),
        grad_norm: Some(1.0),
        layer_l2: vec![0.3; layers],
        layer_max_abs: vec![0.01; layers],
        layer_nonfinite: vec![0; layers],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_ends_only_its_own_stream_with_invalid_argument() {
    use worker_message::Body::{Ack, Batch, Hello, Summary};
    let server = Server::start_with(&["--max-message-bytes", "65536"]);
    let mut c = client::connect(&server.url()).await.unwrap();

    // A healthy rank of the same job keeps going throughout.
    let good = WorkerStream::open(&mut c, hello("shared", 0, 8, 4)).await.unwrap();
    let mut good_rx = good.receiver;
    let good_reader = tokio::spawn(async move { good_rx.drain().await });
    for step in 1..=20 {
        good.sender.summary(summary(step, 4)).await.unwrap();
    }

    let h = |rank| msg(Hello(hello("shared", rank, 8, 4)));
    let cases: Vec<(Vec<WorkerMessage>, &[&str])> = vec![
        (
            vec![msg(Summary(summary(1, 4)))],
            &["summary", "step 1", "before the Hello"],
        ),
        (
            vec![msg(Ack(proto::AdviceAck::default()))],
            &["ack", "before the Hello"],
        ),
        (
            vec![h(1), msg(Summary(summary(1, 3)))],
            &["layer_l2", "3 values", "4 layers"],
        ),
        (
            vec![h(2), msg(Summary(summary(5, 4))), msg(Summary(summary(4, 4)))],
            &["field step", "step 4", "last accepted step is 5"],
        ),
        (
            vec![h(3), msg(Summary(summary(5, 4))), msg(Summary(summary(5, 4)))],
            &["field step", "step 5", "already accepted"],
        ),
        (
            vec![
                h(7),
                msg(Batch(proto::SummaryBatch {
                    summaries: vec![summary(1, 4), summary(2, 4), summary(3, 3), summary(4, 4)],
                })),
            ],
            &["batch.summaries[2] (step 3)", "layer_l2", "3 values", "4 layers"],
        ),
        (
            vec![msg(Batch(proto::SummaryBatch {
                summaries: vec![summary(1, 4)],
            }))],
            &["field batch", "1 summaries", "before the Hello"],
        ),
        (
            vec![msg(Hello(hello("", 0, 1, 4)))],
            &["field job", "must not be empty"],
        ),
        (
            vec![msg(Hello(hello("shared", 9, 8, 4)))],
            &["field rank", "9", "world_size 8"],
        ),
        (
            vec![msg(Hello(hello("shared", 4, 8, 5)))],
            &["field layer_names", "4 layer names", "5"],
        ),
        (vec![h(5), h(5)], &["field hello", "already said hello", "rank 5"]),
        (
            vec![msg(Hello(proto::Hello {
                rule_profile: "nope".into(),
                ..hello("other", 0, 1, 4)
            }))],
            &["field rule_profile", "nope"],
        ),
        (
            vec![h(6), msg(Summary(summary(1, 20_000)))],
            &["--max-message-bytes", "65536"],
        ),
        (vec![WorkerMessage { body: None }], &["field body"]),
        // Names, batches and steps have limits; the refusal names the limit,
        // never echoes the input.
        (
            vec![msg(Hello(proto::Hello {
                layer_names: vec!["x".repeat(1000); 4],
                ..hello("shared", 4, 8, 4)
            }))],
            &["field layer_names[0]", "1000 bytes", "limit of 256"],
        ),
        (
            vec![
                h(4),
                msg(Batch(proto::SummaryBatch {
                    summaries: (1..=1025)
                        .map(|s| proto::Summary {
                            step: s,
                            ..Default::default()
                        })
                        .collect(),
                })),
            ],
            &["field batch", "1025 summaries", "limit of 1024"],
        ),
        (
            vec![h(6), msg(Summary(summary(1 << 63, 4)))],
            &["field step", "9223372036854775808", "above the limit"],
        ),
    ];
    for (messages, expected) in cases {
        let status = refused(&mut c, messages).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        for part in expected {
            assert!(status.message().contains(part), "{:?} lacks {part:?}", status.message());
        }
    }

    // The healthy stream never noticed.
    for step in 21..=40 {
        good.sender.summary(summary(step, 4)).await.unwrap();
    }
    drop(good.sender);
    assert_eq!(good_reader.await.unwrap().expect("healthy stream ended cleanly"), []);

    let text = server.scrape();
    for reason in [
        "no_hello",
        "layer_count",
        "step_backwards",
        "duplicate_step",
        "empty_job",
        "message_too_large",
        "too_long",
        "step_out_of_range",
    ] {
        let n = sample(
            &text,
            &format!("gradguard_summaries_rejected_total{{reason=\"{reason}\"}}"),
        );
        assert!(n >= Some(1.0), "{reason}: {n:?}");
    }
    // Accepted: 40 from the healthy rank, one first step of each of the ranks
    // whose second summary was refused, and the two summaries of a batch
    // before its refused third.
    assert_eq!(sample(&text, "gradguard_summaries_total"), Some(44.0));
}

/// Sends each message as the bytes given: what no prost client can send.
#[derive(Debug, Default)]
struct RawCodec;

struct RawEncoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = proto::ServerMessage;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<proto::ServerMessage>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Default::default())
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

/// The status that ends an `Ingest.Stream` that sent `frames`, or `None` if it
/// ended cleanly.
async fn raw_stream(url: &str, frames: Vec<Vec<u8>>) -> Option<tonic::Status> {
    use tonic::codegen::http::uri::PathAndQuery;
    let channel = Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/gradguard.v1.Ingest/Stream");
    let call = async {
        let mut inbound = match grpc
            .streaming(tonic::Request::new(tokio_stream::iter(frames)), path, RawCodec)
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return Some(status),
        };
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("server answered")
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_a_worker_message_are_refused_and_counted() {
    use prost::Message as _;
    let server = Server::start();
    let hello = |job| msg(worker_message::Body::Hello(hello(job, 0, 1, 4))).encode_to_vec();
    let step = |n| msg(worker_message::Body::Summary(summary(n, 4))).encode_to_vec();
    // The bytes of the summary field cut short: decoded on the fast path, into
    // the stream's reused summary, after a good one.
    let mut cut = step(3);
    cut.truncate(cut.len() - 2);
    cut[1] -= 2;
    let cases = [
        (vec![vec![0xff, 0xff, 0xff]], "3 bytes"),
        (vec![hello("cut"), step(1), step(2), cut], "WorkerMessage"),
    ];
    for (frames, expected) in cases {
        let status = raw_stream(&server.url(), frames).await.expect("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("not a gradguard.v1.WorkerMessage"),
            "{status:?}"
        );
        assert!(status.message().contains(expected), "{status:?}");
    }
    // The same bytes, whole, are a healthy stream.
    let whole = raw_stream(&server.url(), vec![hello("whole"), step(1), step(2), step(3)]).await;
    assert!(whole.is_none(), "{whole:?}");

    let text = server.scrape();
    assert_eq!(
        sample(&text, "gradguard_summaries_rejected_total{reason=\"undecodable\"}"),
        Some(2.0)
    );
    // Steps 1 and 2 of the refused stream, and the three of the healthy one.
    assert_eq!(sample(&text, "gradguard_summaries_total"), Some(5.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_that_vanish_mid_run_leak_nothing() {
    let server = Server::start();
    for i in 0..20u32 {
        // Each worker has its own connection, dropped without closing the stream.
        let mut c = client::connect(&server.url()).await.unwrap();
        let stream = WorkerStream::open(&mut c, hello("vanish", i, 20, 4)).await.unwrap();
        stream.sender.summary(summary(1, 4)).await.unwrap();
        drop(stream);
        drop(c);
    }
    server.wait_for("every stream to be released", |text| {
        sample(text, "gradguard_active_streams") == Some(0.0)
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_stream_of_the_same_rank_replaces_the_older() {
    let server = Server::start();
    let mut c = client::connect(&server.url()).await.unwrap();
    let old = WorkerStream::open(&mut c, hello("again", 0, 1, 2)).await.unwrap();
    old.sender.summary(summary(1, 2)).await.unwrap();
    // Sent is not yet accepted: the new stream's Hello could overtake it.
    server.wait_for("step 1 accepted", |text| {
        sample(text, "gradguard_summaries_total") == Some(1.0)
    });
    let mut old_rx = old.receiver;
    let new = WorkerStream::open(&mut c, hello("again", 0, 1, 2)).await.unwrap();
    let status = old_rx.drain().await.expect_err("the old stream is ended");
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("replaced"), "{status:?}");
    // The reconnecting worker learns where it stands and carries on.
    assert_eq!(new.welcome.last_step, Some(1));
    new.sender.summary(summary(2, 2)).await.unwrap();
    drop(new.sender);
    let mut rx = new.receiver;
    assert_eq!(rx.drain().await.unwrap(), []);
}

#[tokio::test(flavor = "multi_thread")]
async fn job_cap_refuses_new_jobs_and_idle_jobs_are_forgotten() {
    let server = Server::start_with(&["--max-jobs", "1", "--job-ttl", "1s"]);
    let mut c = client::connect(&server.url()).await.unwrap();
    let first = WorkerStream::open(&mut c, hello("first", 0, 1, 2)).await.unwrap();
    first.sender.summary(summary(1, 2)).await.unwrap();
    server.wait_for("the first job to hold its slot", |text| {
        sample(text, "gradguard_active_jobs") == Some(1.0)
    });

    // The slot is taken by the first summary, so that is what is refused.
    let status = refused(
        &mut c,
        vec![
            msg(worker_message::Body::Hello(hello("second", 0, 1, 2))),
            msg(worker_message::Body::Summary(summary(1, 2))),
        ],
    )
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("--max-jobs"), "{status:?}");

    drop(first.sender);
    let mut rx = first.receiver;
    rx.drain().await.unwrap();
    let text = server.wait_for("the finished job's series to go", |text| {
        sample(text, "gradguard_active_jobs") == Some(0.0) && !text.contains("training_job=\"first\"")
    });
    assert_eq!(sample(&text, "gradguard_jobs_refused_total"), Some(1.0));

    // With the first job gone, there is room again.
    let second = WorkerStream::open(&mut c, hello("second", 0, 1, 2)).await.unwrap();
    assert_eq!(second.welcome.last_step, None);
    second.sender.summary(summary(1, 2)).await.unwrap();
    drop(second.sender);
    let mut rx = second.receiver;
    assert_eq!(rx.drain().await.unwrap(), []);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_hello_only_streams_do_not_block_a_new_job() {
    // A Hello alone takes no job slot: squatters cannot lock real jobs out.
    let server = Server::start_with(&["--max-jobs", "10"]);
    let url = server.url();
    let mut squatters = Vec::new();
    let mut opens = tokio::task::JoinSet::new();
    for connection in 0..10 {
        let c = client::connect(&url).await.unwrap();
        for i in 0..100 {
            let mut c = c.clone();
            opens.spawn(
                async move { WorkerStream::open(&mut c, hello(&format!("squat-{connection}-{i}"), 0, 1, 2)).await },
            );
        }
    }
    while let Some(s) = opens.join_next().await {
        squatters.push(s.unwrap().expect("a Hello is welcomed"));
    }
    assert_eq!(squatters.len(), 1000);
    let text = tokio::task::block_in_place(|| server.scrape());
    assert_eq!(sample(&text, "gradguard_active_jobs"), Some(0.0), "Hellos hold no job");
    assert_eq!(sample(&text, "gradguard_active_streams"), Some(1000.0));

    let mut c = client::connect(&url).await.unwrap();
    let real = WorkerStream::open(&mut c, hello("real", 0, 1, 2)).await.unwrap();
    real.sender.summary(summary(1, 2)).await.unwrap();
    drop(real.sender);
    let mut rx = real.receiver;
    assert_eq!(rx.drain().await.unwrap(), [], "the new job's summary is judged");
    let text = tokio::task::block_in_place(|| server.scrape());
    assert_eq!(sample(&text, "gradguard_active_jobs"), Some(1.0));
    assert_eq!(sample(&text, "gradguard_jobs_refused_total"), Some(0.0));
    assert!(!text.contains("training_job=\"squat-"), "squatters have no series");
}

#[test]
fn a_second_serve_on_the_same_data_dir_exits_naming_the_holder() {
    let first = Server::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&first.data_dir)
        .output()
        .expect("run a second gradguard serve");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another gradguard (pid "), "{err}");
    assert!(out.stdout.is_empty(), "it never listened: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_that_say_nothing_or_only_hello_are_closed_after_the_hello_timeout() {
    use worker_message::Body::Hello;
    let server = Server::start_with(&["--hello-timeout", "1s", "--first-summary-timeout", "1s"]);
    let mut c = client::connect(&server.url()).await.unwrap();
    let status = refused(&mut c, vec![]).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no Hello within 1s"), "{status:?}");
    let status = refused(&mut c, vec![msg(Hello(hello("squat", 0, 1, 2)))]).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no first summary within 1s of its Hello"),
        "{status:?}"
    );

    // A stream that started in time outlives the timeout.
    let live = WorkerStream::open(&mut c, hello("live", 0, 1, 2)).await.unwrap();
    live.sender.summary(summary(1, 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    live.sender.summary(summary(2, 2)).await.unwrap();
    drop(live.sender);
    let mut rx = live.receiver;
    rx.drain().await.expect("the started stream ends cleanly");
    assert_eq!(
        server.sample("gradguard_summaries_rejected_total{reason=\"hello_timeout\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_open_stream_keeps_its_job_past_the_ttl() {
    let server = Server::start_with(&["--job-ttl", "1s"]);
    let mut c = client::connect(&server.url()).await.unwrap();
    let quiet = WorkerStream::open(&mut c, hello("quiet", 0, 1, 2)).await.unwrap();
    for step in 1..=10 {
        quiet.sender.summary(summary(step, 2)).await.unwrap();
    }
    // A job without an open stream would be forgotten after a second; the
    // idle time is what is tested here.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(server.sample("gradguard_active_jobs"), Some(1.0));
    // Still the same job: its step order holds.
    quiet.sender.summary(summary(5, 2)).await.unwrap();
    drop(quiet.sender);
    let mut rx = quiet.receiver;
    let status = rx.drain().await.expect_err("step 5 after step 10 is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("last accepted step is 10"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_answer() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = Server::start();
    let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();

    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "gradguard.v1.Ingest".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"gradguard.v1.Ingest"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_are_counted() {
    let server = Server::start();
    let mut c = client::connect(&server.url()).await.unwrap();
    let s = WorkerStream::open(&mut c, hello("acks", 0, 1, 2)).await.unwrap();
    let fake = proto::Advice {
        id: 1,
        action: Some(advice::Action::SkipStep(proto::SkipStep {})),
        ..Default::default()
    };
    s.sender.ack(&fake, 3, true).await.unwrap();
    s.sender.ack(&fake, 3, false).await.unwrap();
    drop(s.sender);
    let mut rx = s.receiver;
    rx.drain().await.unwrap();
    let text = server.scrape();
    assert_eq!(
        sample(&text, "gradguard_advice_acks_total{applied=\"true\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "gradguard_advice_acks_total{applied=\"false\"}"),
        Some(1.0)
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The series the alert rules in `deploy/prometheus/` are built on: a job's
/// warning and critical anomaly counters exist at 0 once the job holds its
/// slot (its first summary, so `increase()` sees the first anomaly after
/// it), its open streams, when its latest summary was taken, and its advice
/// that no rank acknowledged. A Hello alone creates no series.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_exports_the_series_its_alerts_need() {
    let server = Server::start();
    let job = |name: &str| format!("{name}{{training_job=\"unacked\"}}");
    let cfg = config("unacked", Fault::AbruptExplosion, 1);
    let (mut scenario, senders, mut receivers) = open_job(&server.url(), &cfg).await;
    assert!(
        !server.scrape().contains("training_job=\"unacked\""),
        "a Hello alone creates no series"
    );
    let first = scenario.next_step().expect("a first step");
    senders[0].summary(wire::summary_to_proto(&first[0])).await.unwrap();
    let text = server.wait_for("the job's first summary", |t| {
        sample(t, &job("gradguard_job_streams")) == Some(1.0)
    });
    for rule in gradguard::model::RuleId::ALL {
        for severity in ["warning", "critical"] {
            let series = format!(
                "gradguard_anomalies_total{{rule=\"{}\",severity=\"{severity}\",training_job=\"unacked\"}}",
                rule.as_str()
            );
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
    }
    assert_eq!(sample(&text, &job("gradguard_job_streams")), Some(1.0));
    assert_eq!(sample(&text, &job("gradguard_job_advice_unacked")), Some(0.0));

    let before = unix_now();
    send_all(&mut scenario, &senders).await;
    drop(senders);
    let advice = receivers[0].drain().await.unwrap();
    let last = advice.last().expect("an exploding run gets advice");
    let text = server.wait_for("the stream to close", |t| {
        sample(t, &job("gradguard_job_streams")) == Some(0.0)
    });
    let seen = sample(&text, &job("gradguard_job_last_step_timestamp_seconds")).unwrap();
    assert!(seen >= before - 1.0 && seen <= unix_now() + 1.0, "{seen}");
    let unacked = sample(&text, &job("gradguard_job_advice_unacked")).unwrap();
    assert_eq!(unacked, advice.len().min(64) as f64, "nobody acknowledged anything");

    // The rank comes back and acknowledges the latest advice (not applied).
    let mut c = client::connect(&server.url()).await.unwrap();
    let names = gradguard::scenario::Scenario::new(cfg).layer_names();
    let s = WorkerStream::open(
        &mut c,
        proto::Hello {
            layer_names: names,
            ..hello("unacked", 0, 1, 0)
        },
    )
    .await
    .unwrap();
    s.sender.ack(last, 399, false).await.unwrap();
    server.wait_for("the ack to count", |t| {
        sample(t, &job("gradguard_job_advice_unacked")) == Some(unacked - 1.0)
            && sample(t, &job("gradguard_job_streams")) == Some(1.0)
    });
    drop(s.sender);
    let mut rx = s.receiver;
    rx.drain().await.unwrap();
    server.wait_for("the stream to close", |t| {
        sample(t, &job("gradguard_job_streams")) == Some(0.0)
    });
}

/// Runs `gradguard serve` to completion (it must fail) and returns its exit
/// code and stderr.
fn serve_fails(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .arg("serve")
        .args(args)
        .output()
        .expect("run gradguard serve");
    assert!(!out.status.success());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_config_exit_before_binding_a_port() {
    // Hold a port: a server that tried to bind before checking its config
    // would report the port, not the config.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("rules.toml");
    std::fs::write(&bad, "[grad_spike]\nz = -1.0\n").unwrap();
    let bad = bad.to_str().unwrap();

    let (code, err) = serve_fails(&["--grpc-addr", &addr, "--rules", bad]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--rules") && err.contains("grad_spike.z") && err.contains("-1"),
        "{err}"
    );
    assert!(!err.contains("deprecated"), "{err}");

    let (code, err) = serve_fails(&["--grpc-addr", &addr, "--rules", "/no/such/rules.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/no/such/rules.toml"), "{err}");

    let (code, err) = serve_fails(&["--grpc-addr", "localhost"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--grpc-addr") && err.contains("localhost"), "{err}");

    let (code, err) = serve_fails(&["--max-jobs", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-jobs"), "{err}");

    // A good config on a taken port: the port is named.
    let (code, err) = serve_fails(&["--grpc-addr", &addr, "--metrics-addr", "127.0.0.1:0", "--no-store"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot bind --grpc-addr {addr}")), "{err}");

    // Nothing is created before both ports are bound: not the default data
    // directory in the working directory.
    for ports in [
        ["--grpc-addr", &addr, "--metrics-addr", "127.0.0.1:0"],
        ["--grpc-addr", "127.0.0.1:0", "--metrics-addr", &addr],
    ] {
        let cwd = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .arg("serve")
            .args(ports)
            .current_dir(cwd.path())
            .env_remove("GRADGUARD_DATA_DIR")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
        assert!(left.is_empty(), "serve left {left:?} behind");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_that_applied_a_rollback_reports_its_steps_again() {
    let server = Server::start();
    let cfg = ScenarioConfig {
        workers: 1,
        ..config("rolled", Fault::AbruptExplosion, 1)
    };
    let (mut scenario, senders, mut receivers) = open_job(&server.url(), &cfg).await;
    send_all(&mut scenario, &senders).await;
    let rollback = loop {
        let a = receivers[0].advice().await.unwrap().expect("a rollback before the end");
        if let Action::Rollback { to_step } = action(&a) {
            break (a, to_step);
        }
    };
    let (advice, to_step) = rollback;
    assert!(to_step < 399);
    senders[0].ack(&advice, 399, true).await.unwrap();
    // The restored run goes on from the checkpoint, healthy again.
    for step in to_step + 1..to_step + 120 {
        let s = proto::Summary {
            loss: Some(3.0 - step as f64 * 1e-4),
            grad_norm: Some(1.0 + 0.02 * ((step % 7) as f64 - 3.0)),
            ..summary(step, 0)
        };
        senders[0].summary(s).await.unwrap();
    }
    drop(senders);
    receivers[0].drain().await.expect("the replayed steps are accepted");
    let text = server.scrape();
    assert_eq!(
        sample(&text, "gradguard_summaries_rejected_total{reason=\"step_backwards\"}"),
        Some(0.0)
    );
    // The restored norms, 100× below the abandoned run's, are not a collapse.
    for severity in ["info", "warning", "critical"] {
        let series =
            format!("gradguard_anomalies_total{{rule=\"vanishing\",severity=\"{severity}\",training_job=\"rolled\"}}");
        assert_eq!(sample(&text, &series).unwrap_or(0.0), 0.0, "{text}");
    }
}

/// A worker that asks for progress hears, after each summary, that the step
/// is decided on, and only after the advice that step caused: with a store
/// (advice waits for its commit) and without.
#[tokio::test(flavor = "multi_thread")]
async fn progress_follows_each_summary_after_its_advice() {
    use proto::server_message::Body;
    for flags in [&[][..], &["--no-store"][..]] {
        let server = Server::start_with(flags);
        let cfg = config("progress", Fault::NanGradients, 1);
        let mut scenario = gradguard::scenario::Scenario::new(cfg.clone());
        let mut c = client::connect(&server.url()).await.unwrap();
        let stream = WorkerStream::open(
            &mut c,
            proto::Hello {
                layer_names: scenario.layer_names(),
                report_progress: true,
                ..hello("progress", 0, 1, 0)
            },
        )
        .await
        .unwrap();
        assert!(stream.welcome.reports_progress, "{flags:?}");
        let (sender, mut receiver) = (stream.sender, stream.receiver);
        let mut advised = Vec::new();
        while let Some(step) = scenario.next_step() {
            let s = wire::summary_to_proto(&step[0]);
            let at = s.step;
            sender.summary(s).await.unwrap();
            // Lock-step: nothing is sent until this step's progress is back.
            loop {
                match receiver.message().await.unwrap().expect("the stream stays open").body {
                    Some(Body::Advice(a)) => advised.push((at, a)),
                    Some(Body::Progress(p)) => {
                        assert_eq!(p.step, at, "{flags:?}");
                        break;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        let plan = scenario.plan();
        let (at, skip) = advised
            .iter()
            .find(|(_, a)| action(a) == Action::SkipStep)
            .unwrap_or_else(|| panic!("no skip_step in {advised:?}"));
        assert_eq!(
            (*at, skip.apply_from_step),
            (plan.at, plan.at),
            "in force at the step itself"
        );
        assert!(advised.iter().all(|(at, a)| a.decided_at_step == *at), "{advised:?}");
    }
}

/// A data directory holding `n` stored jobs (`job-00000` ...), written with
/// the library's own store writer, as `serve` writes it; job `job-00042`
/// has anomalies and advice. Returns the names in id order.
fn stored_jobs(dir: &std::path::Path, n: usize) -> Vec<String> {
    use gradguard::model::{Advice, Finding, RuleId, Severity};
    use gradguard::store::{Batch, JobRow, Store};
    let names: Vec<String> = (0..n).map(|i| format!("job-{i:05}")).collect();
    let mut store = Store::open(dir).expect("open the store");
    let mut batch = Batch::default();
    // Written in another order than their ids'.
    for (i, name) in names.iter().enumerate().rev() {
        batch.jobs.push(JobRow {
            job: name.clone(),
            first_seen: 1_790_000_000.0,
            last_seen: 1_790_000_000.0 + (i % 97) as f64,
            ranks: 8,
            world_size: Some(8),
            layers: 48,
            last_step: Some(i as u64),
            health: None,
        });
    }
    for (step, severity) in [(1, Severity::Info), (2, Severity::Critical), (3, Severity::Critical)] {
        batch.anomalies.push(Finding {
            job: "job-00042".into(),
            worker: Some(0),
            step,
            time: Some(1_790_000_000.0),
            rule: RuleId::GradSpike,
            severity,
            layer: None,
            value: 9.0,
            threshold: 3.0,
            message: "spike".into(),
        });
    }
    batch.advice.push((
        Advice {
            id: 1,
            job: "job-00042".into(),
            target: None,
            step: 3,
            apply_from: 4,
            action: Action::SkipStep,
            severity: Severity::Critical,
            rules: vec![RuleId::GradSpike],
            reason: "spike".into(),
            evidence: vec![],
        },
        1_790_000_000.0,
    ));
    store.write(&batch).expect("write the jobs");
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn list_jobs_over_20000_jobs_pages_every_job_once_in_order() {
    use prost::Message;
    use proto::query_client::QueryClient;
    let dir = tempfile::tempdir().unwrap();
    let mut names = stored_jobs(dir.path(), 20_000);
    let server = Server::start_in(dir.path(), &[]);
    // Live jobs: one also stored, one only live (between stored ids).
    let mut c = client::connect(&server.url()).await.unwrap();
    // A job is live once it holds its slot: its first summary.
    let stored_and_live = WorkerStream::open(&mut c, hello("job-00007", 0, 1, 2)).await.unwrap();
    let only_live = WorkerStream::open(&mut c, hello("job-12345-live", 0, 1, 2))
        .await
        .unwrap();
    stored_and_live.sender.summary(summary(1, 2)).await.unwrap();
    only_live.sender.summary(summary(1, 2)).await.unwrap();
    server.wait_for("both live jobs to hold their slots", |text| {
        sample(text, "gradguard_active_jobs") == Some(2.0)
    });
    names.push("job-12345-live".into());
    names.sort();
    let mut q = QueryClient::connect(server.url()).await.unwrap();

    // An old client's empty request: the first page, of the default size.
    let started = std::time::Instant::now();
    let first = q
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first_took = started.elapsed();
    assert_eq!(first.jobs.len(), wire::DEFAULT_PAGE_SIZE as usize);
    assert_eq!(first.jobs[0].job, "job-00000");
    assert!(!first.next_page_token.is_empty());
    assert!(first_took < Duration::from_secs(2), "first page took {first_took:?}");
    let job7 = &first.jobs[7];
    assert_eq!(
        (job7.job.as_str(), job7.live, job7.connected_streams),
        ("job-00007", true, 1)
    );
    let job42 = &first.jobs[42];
    assert_eq!(
        (job42.anomalies_info, job42.anomalies_critical, job42.advice, job42.live),
        (1, 2, 1, false)
    );

    // Every page, as large as the service gives (asked for more).
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = q
            .list_jobs(proto::ListJobsRequest {
                page_size: 5_000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= wire::MAX_PAGE_SIZE as usize, "{}", page.jobs.len());
        let bytes = page.encoded_len();
        assert!(bytes < 512 << 10, "a page of {} jobs is {bytes} bytes", page.jobs.len());
        seen.extend(page.jobs.into_iter().map(|j| (j.job, j.live)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 21, "20,001 jobs in pages of 1000");
    let ids: Vec<&str> = seen.iter().map(|(j, _)| j.as_str()).collect();
    assert_eq!(ids, names, "every job exactly once, in id order");
    let live: Vec<&str> = seen.iter().filter(|(_, l)| *l).map(|(j, _)| j.as_str()).collect();
    assert_eq!(live, ["job-00007", "job-12345-live"]);

    // A page token the service never issued: refused, quoted short.
    for bad in ["not-a-token".to_owned(), "j".repeat(100_000), "1234".into()] {
        let status = q
            .list_jobs(proto::ListJobsRequest {
                page_size: 10,
                page_token: bad,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("page_token") && status.message().len() < 300,
            "{status:?}"
        );
    }
    // GetJob still answers, with the counts.
    let job = q
        .get_job(proto::GetJobRequest {
            job: "job-00042".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((job.anomalies_critical, job.advice, job.last_step), (2, 1, Some(42)));
    let status = q
        .get_job(proto::GetJobRequest {
            job: "x".repeat(100_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().len() < 300, "{} bytes", status.message().len());
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_wait_for_a_slot_and_end_at_the_query_timeout() {
    use proto::query_client::QueryClient;
    let dir = tempfile::tempdir().unwrap();
    stored_jobs(dir.path(), 2_000);
    // One slot: forty calls at once wait their turn, and all are answered.
    let server = Server::start_in(dir.path(), &["--max-concurrent-queries", "1"]);
    let q = QueryClient::connect(server.url()).await.unwrap();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut q = q.clone();
            tokio::spawn(async move { q.list_jobs(proto::ListJobsRequest::default()).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().into_inner().jobs.len(), 100);
    }
    drop(server);

    // No time at all: every store read ends at its deadline, naming it;
    // what reads no store still answers.
    let server = Server::start_in(dir.path(), &["--query-timeout", "1ns"]);
    let mut q = QueryClient::connect(server.url()).await.unwrap();
    let status = q.list_jobs(proto::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("query_timeout (1ns)"), "{status:?}");
    let status = q
        .get_job(proto::GetJobRequest {
            job: "job-00001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    q.get_rules(proto::GetRulesRequest::default()).await.unwrap();

    for (flag, value) in [("--max-concurrent-queries", "0"), ("--query-timeout", "0s")] {
        let (code, err) = serve_fails(&["--no-store", flag, value]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(flag), "{err}");
    }
}

#[tokio::test]
async fn the_welcome_carries_the_urgency_thresholds_of_the_jobs_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[grad_spike]\nz = 3.0\n\n[profiles.strict.grad_spike]\nsevere_z = 4.0\n\n[jobs.\"calm\".loss_spike]\nmin_rise = 0.5\n",
    )
    .unwrap();
    let server = Server::start_with(&["--rules", rules.to_str().unwrap()]);
    let welcome = |job: &'static str, profile: &'static str| {
        let url = server.url();
        async move {
            let mut c = client::connect(&url).await.unwrap();
            let h = proto::Hello {
                rule_profile: profile.into(),
                ..hello(job, 0, 1, 0)
            };
            WorkerStream::open(&mut c, h)
                .await
                .unwrap()
                .welcome
                .urgency
                .expect("urgency rules")
        }
    };
    let plain = welcome("plain", "").await;
    assert_eq!(
        (plain.grad_z, plain.grad_severe_z, plain.loss_min_rise),
        (3.0, 6.0, 0.2)
    );
    assert!(plain.grad_spike_enabled && plain.loss_spike_enabled);
    assert_eq!(
        (plain.grad_alpha, plain.grad_warmup, plain.grad_min_clip_ratio),
        (0.97, 25, 1.25)
    );
    let strict = welcome("strict-job", "strict").await;
    assert_eq!((strict.grad_z, strict.grad_severe_z), (3.0, 4.0));
    let calm = welcome("calm", "").await;
    assert_eq!(calm.loss_min_rise, 0.5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_that_joins_after_job_wide_advice_gets_it_and_a_returning_rank_does_not() {
    let server = Server::start();
    let mut c = client::connect(&server.url()).await.unwrap();
    let first = WorkerStream::open(&mut c, hello("late", 0, 2, 0)).await.unwrap();
    let mut early = first.receiver;
    // Rank 0 alone: a NaN gradient at step 3 gets job-wide skip_step advice
    // before rank 1 has a stream (it connected late, or its first summary
    // was still on its way).
    for step in 1..=3u64 {
        let grad_norm = if step == 3 { f64::NAN } else { 1.0 };
        first
            .sender
            .summary(proto::Summary {
                grad_norm: Some(grad_norm),
                ..summary(step, 0)
            })
            .await
            .unwrap();
    }
    let given = tokio::time::timeout(Duration::from_secs(10), early.advice())
        .await
        .expect("rank 0 gets the advice")
        .unwrap()
        .expect("an advice");
    assert_eq!(action(&given), Action::SkipStep);
    assert!(given.target_rank.is_none(), "job-wide: {given:?}");

    // Rank 1 joins: the advice in force comes right after its Welcome, so
    // both ranks hold the same advice and agree on applying it.
    let mut late = WorkerStream::open(&mut c, hello("late", 1, 2, 0)).await.unwrap();
    let missed = tokio::time::timeout(Duration::from_secs(10), late.receiver.advice())
        .await
        .expect("the late rank gets the advice given before it joined")
        .unwrap()
        .expect("an advice");
    assert_eq!(missed.id, given.id);

    // Rank 0 reconnects (a new stream replaces its old one): it had the
    // advice already and is not sent it again; the next advice it gets is new.
    let again = WorkerStream::open(&mut c, hello("late", 0, 2, 0)).await.unwrap();
    // Another NaN after the cooldown (20 steps) gets advice again.
    for step in 4..=30u64 {
        let grad_norm = if step == 30 { f64::NAN } else { 1.0 };
        for sender in [&again.sender, &late.sender] {
            sender
                .summary(proto::Summary {
                    grad_norm: Some(grad_norm),
                    ..summary(step, 0)
                })
                .await
                .unwrap();
        }
    }
    let mut back = again.receiver;
    let next = tokio::time::timeout(Duration::from_secs(10), back.advice())
        .await
        .expect("advice on the new stream")
        .unwrap()
        .expect("an advice");
    assert!(next.id > given.id, "the returning rank was sent {next:?} again");
    drop((again.sender, late.sender, first.sender));
}

/// SIGTERM with workers connected: their streams get what they sent answered,
/// then end with UNAVAILABLE (so the workers reconnect), and the service is
/// gone well within its drain timeout instead of waiting it out.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_open_streams_at_once_with_unavailable() {
    let server = Server::start();
    let mut client = client::connect(&server.url()).await.unwrap();
    let mut started = WorkerStream::open(&mut client, hello("draining", 0, 2, 0))
        .await
        .unwrap();
    started.sender.summary(summary(1, 0)).await.unwrap();
    // A stream past its Hello but without a summary yet ends too.
    let mut waiting = WorkerStream::open(&mut client, hello("draining", 1, 2, 0))
        .await
        .unwrap();
    server.wait_for("both streams", |t| sample(t, "gradguard_active_streams") == Some(2.0));
    let stopping = std::time::Instant::now();
    tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    let took = stopping.elapsed();
    assert!(
        took < gradguard::service::DRAIN_TIMEOUT / 2,
        "SIGTERM took {took:?} with two workers connected"
    );
    for stream in [&mut started, &mut waiting] {
        let end = stream.receiver.drain().await.unwrap_err();
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
        assert!(end.message().contains("shutting down"), "{end:?}");
    }
}
