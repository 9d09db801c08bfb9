//! One run against one server: open every stream, send until the deadline,
//! time each advice against the send of its step, wait for the server to end
//! the streams, read its memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use gradguard::client::{self, ClientError, StreamReceiver, StreamSender, WorkerStream};
use gradguard::clock::unix_now;
use gradguard::proto;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::generator::{Generator, spike_offset};
use super::memory::MemorySource;
use super::report::{Latency, MemorySample, Report};
use super::{LoadgenArgs, Spikes};
use crate::cli::Failure;

/// Slots in a stream's ring of send instants: far more than the summaries in
/// flight between the generator and the server's decision (the client's send
/// queue, HTTP/2 windows and socket buffers). An advice about an older step
/// (its slot reused) is counted but not timed.
pub(super) const RING: usize = 8192;

/// Runs the load against one server and reads its memory.
pub(super) async fn measure(args: &LoadgenArgs, target: &str, memory: MemorySource) -> Result<Report, Failure> {
    let n = args.streams as usize;
    let w = args.world_size;
    let security = super::security_for(args, target)?;

    // Open every stream before the clock starts, concurrently, each on its own
    // connection: connection setup is not what is measured.
    let opening: Vec<JoinHandle<Result<WorkerStream, ClientError>>> = (0..args.streams)
        .map(|i| {
            let target = target.to_owned();
            let security = security.clone();
            let hello = proto::Hello {
                job: format!("loadgen-{}", i / w),
                rank: i % w,
                world_size: w,
                layer_names: (0..args.layers).map(|l| format!("layer{l}")).collect(),
                client_version: "loadgen".to_owned(),
                rule_profile: String::new(),
                report_progress: false,
                layout: None,
            };
            tokio::spawn(async move {
                let mut client = client::connect_with(&target, &security).await?;
                WorkerStream::open(&mut client, hello).await
            })
        })
        .collect();
    let mut opened = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    for (i, handle) in opening.into_iter().enumerate() {
        match handle.await {
            Ok(Ok(stream)) => opened.push((i as u32, stream)),
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("stream {i}: {}", client::causes(&e)));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("stream {i}: {e}"));
            }
        }
    }
    if opened.is_empty() {
        return Err(Failure::input(anyhow!(
            "cannot open any stream to {target}: {}",
            first_error.unwrap_or_default()
        )));
    }

    let start = Instant::now();
    let deadline = start + args.duration;
    // The server has until then to finish what was sent; a stream still open
    // afterwards counts as failed.
    let drain_deadline = deadline + args.duration.max(Duration::from_secs(10));
    let epoch = unix_now();
    let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(n as f64 / args.rate).max(Duration::from_nanos(1)));

    let mut tasks = Vec::with_capacity(opened.len());
    for (i, stream) in opened {
        let first_step = stream.welcome.last_step.map_or(1, |s| s.saturating_add(1));
        let spike_offset = match args.spikes {
            Spikes::Aligned => 0,
            Spikes::Staggered => spike_offset(i / w, args.streams.div_ceil(w), args.spike_every),
        };
        let generator = Generator::new(i, args.layers as usize, first_step, args.spike_every, spike_offset);
        let ring = Arc::new(Ring::new());
        // Paced streams start spread over one period, not all on the same tick.
        let first_tick = period.map(|p| start + p.mul_f64(f64::from(i) / n as f64));
        let pace = period.zip(first_tick);
        let plan = SendPlan {
            start,
            epoch,
            deadline,
            pace,
            batch: args.batch as usize,
        };
        let send = tokio::spawn(send_loop(stream.sender, generator, ring.clone(), plan));
        let receive = tokio::spawn(receive_loop(stream.receiver, ring, start));
        tasks.push((i, send, receive));
    }

    // Memory is read while every stream is still open and the server holds the
    // most, concurrently with the drain (it is blocking I/O, off the runtime);
    // with --memory-every, also along the way.
    let every = args.memory_every;
    let memory_reading = tokio::spawn(async move {
        let read = |memory: MemorySource| async move {
            tokio::task::spawn_blocking(move || memory.read())
                .await
                .unwrap_or_else(|e| Err(format!("the reader failed: {e}")))
        };
        let mut samples = Vec::new();
        if let Some(every) = every {
            let mut at = start + every;
            while at < deadline {
                tokio::time::sleep_until(at.into()).await;
                if let Ok(bytes) = read(memory.clone()).await {
                    samples.push(MemorySample {
                        at_s: (at - start).as_secs_f64(),
                        bytes,
                    });
                }
                at += every;
            }
        }
        tokio::time::sleep_until(deadline.into()).await;
        let last = read(memory).await;
        if let Ok(bytes) = last {
            samples.push(MemorySample {
                at_s: (deadline - start).as_secs_f64(),
                bytes,
            });
        }
        (last, samples)
    });

    let mut summaries = 0u64;
    let mut advice = 0u64;
    let mut latencies: Vec<u64> = Vec::new();
    let mut end = start;
    for (i, mut send, mut receive) in tasks {
        let mut failed: Option<String> = None;
        match tokio::time::timeout_at(drain_deadline.into(), &mut send).await {
            Ok(Ok((sent, result))) => {
                summaries += sent;
                if let Err(e) = result {
                    failed = Some(format!("sending: {}", client::causes(&e)));
                }
            }
            Ok(Err(e)) => failed = Some(format!("sender: {e}")),
            Err(_) => {
                send.abort();
                failed = Some("the server stopped accepting summaries".to_owned());
            }
        }
        match tokio::time::timeout_at(drain_deadline.into(), &mut receive).await {
            Ok(Ok(received)) => {
                advice += received.advice;
                latencies.extend_from_slice(&received.latencies);
                end = end.max(received.ended);
                if let Err(status) = received.result {
                    // The status says more than the sender's "stream is closed".
                    failed = Some(format!(
                        "the server ended the stream with {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
            }
            Ok(Err(e)) => failed = Some(format!("receiver: {e}")),
            Err(_) => {
                receive.abort();
                failed.get_or_insert_with(|| {
                    format!(
                        "the server did not end the stream within {} after the last summary",
                        humantime::format_duration(drain_deadline - deadline)
                    )
                });
            }
        }
        if let Some(reason) = failed {
            errors += 1;
            first_error.get_or_insert_with(|| format!("stream {i}: {reason}"));
        }
    }
    let (memory, memory_samples) = memory_reading
        .await
        .unwrap_or_else(|e| (Err(format!("the reader failed: {e}")), Vec::new()));

    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let per_s = if elapsed > 0.0 { summaries as f64 / elapsed } else { 0.0 };
    Ok(Report {
        target: target.to_owned(),
        streams: args.streams,
        layers: args.layers,
        world_size: args.world_size,
        duration_s: args.duration.as_secs_f64(),
        rate: (args.rate > 0.0).then_some(args.rate),
        spikes: args.spikes.name(),
        batch: args.batch,
        summaries,
        elapsed_s: elapsed,
        summaries_per_s: per_s,
        layer_stats_per_s: per_s * f64::from(args.layers),
        advice,
        latency_samples: latencies.len(),
        latency_ms: Latency::of(&mut latencies),
        errors,
        server_resident_memory_bytes: memory.as_ref().ok().copied(),
        server_resident_memory_unknown: memory.err(),
        // One sample (no --memory-every) has no middle: no growth.
        memory_growth_last_half: growth_over_last_half(&memory_samples),
        memory_samples: if every.is_some() { memory_samples } else { Vec::new() },
        first_error,
    })
}

/// How much the memory grew from the middle of the run to its end, as a
/// fraction of the middle's (the sample nearest the middle).
pub(super) fn growth_over_last_half(samples: &[MemorySample]) -> Option<f64> {
    let last = samples.last()?;
    let middle = samples.iter().min_by(|a, b| {
        (a.at_s - last.at_s / 2.0)
            .abs()
            .total_cmp(&(b.at_s - last.at_s / 2.0).abs())
    })?;
    (middle.bytes > 0 && middle.at_s < last.at_s)
        .then(|| (last.bytes as f64 - middle.bytes as f64) / middle.bytes as f64)
}

/// When and how one stream sends.
struct SendPlan {
    start: Instant,
    /// Seconds since the Unix epoch at `start` (the summaries' wall time).
    epoch: f64,
    deadline: Instant,
    /// The period and the first tick, when paced.
    pace: Option<(Duration, Instant)>,
    /// Summaries per message.
    batch: usize,
}

/// Sends summaries until the deadline, then drops the sender, which ends the
/// stream. Returns how many were handed to the stream, and whether it stayed open.
async fn send_loop(
    sender: StreamSender,
    mut generator: Generator,
    ring: Arc<Ring>,
    plan: SendPlan,
) -> (u64, Result<(), ClientError>) {
    let SendPlan {
        start,
        epoch,
        deadline,
        pace,
        batch,
    } = plan;
    // Open loop: a tick per summary, and when the stream fell behind (the server
    // pushed back), the missed ticks are sent at once so the rate is kept.
    let mut ticks = pace.map(|(period, first)| {
        let mut ticks = tokio::time::interval_at(first.into(), period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        ticks
    });
    let mut sent = 0u64;
    let mut pending = Vec::with_capacity(batch);
    loop {
        if let Some(ticks) = ticks.as_mut() {
            ticks.tick().await;
        }
        let now = Instant::now();
        let over = now >= deadline;
        if !over {
            let since_start = now - start;
            let summary = generator.next(epoch + since_start.as_secs_f64());
            // Recorded before the send: the advice may come back before it returns.
            ring.record(summary.step, since_start);
            pending.push(summary);
        }
        if pending.len() == batch || (over && !pending.is_empty()) {
            let n = pending.len() as u64;
            let body = if batch == 1 {
                proto::worker_message::Body::Summary(pending.pop().expect("one summary"))
            } else {
                let summaries = std::mem::replace(&mut pending, Vec::with_capacity(batch));
                proto::worker_message::Body::Batch(proto::SummaryBatch { summaries })
            };
            // Closed loop when unpaced: this waits while the send queue is full.
            if let Err(e) = sender.send(body).await {
                return (sent, Err(e));
            }
            sent += n;
        }
        if over {
            return (sent, Ok(()));
        }
    }
}

/// What the receiving half of one stream saw.
struct Received {
    advice: u64,
    /// Advice latencies in nanoseconds.
    latencies: Vec<u64>,
    /// When the server ended the stream (or it failed).
    ended: Instant,
    result: Result<(), tonic::Status>,
}

/// Reads advice until the server ends the stream; each advice is timed against
/// the send of the summary it was decided at, on this stream.
async fn receive_loop(mut receiver: StreamReceiver, ring: Arc<Ring>, start: Instant) -> Received {
    let mut advice = 0u64;
    let mut latencies = Vec::new();
    let result = loop {
        match receiver.advice().await {
            Ok(Some(a)) => {
                let now = start.elapsed();
                advice += 1;
                if let Some(sent) = ring.sent_at(a.decided_at_step) {
                    latencies.push((now.as_nanos() as u64).saturating_sub(sent));
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    Received {
        advice,
        latencies,
        ended: Instant::now(),
        result,
    }
}

/// Send instants of one stream's recent summaries, slot `step % RING`, shared
/// by its sending and receiving tasks without a lock. A slot packs the step's
/// generation (`step / RING`, low 20 bits) above the nanoseconds since the start
/// (44 bits, almost 5 hours), so an advice about a step whose slot was reused,
/// or not yet written, is not timed against the wrong send.
pub(super) struct Ring {
    slots: Box<[AtomicU64]>,
}

impl Ring {
    const NANOS_BITS: u32 = 44;
    const NANOS_MASK: u64 = (1 << Self::NANOS_BITS) - 1;
    const GENERATION_MASK: u64 = (1 << (64 - Self::NANOS_BITS)) - 1;
    /// Never a valid slot: its nanoseconds are the all-ones value `record` refuses.
    const EMPTY: u64 = u64::MAX;

    pub(super) fn new() -> Self {
        Self {
            slots: (0..RING).map(|_| AtomicU64::new(Self::EMPTY)).collect(),
        }
    }

    fn tag(step: u64) -> u64 {
        ((step / RING as u64) & Self::GENERATION_MASK) << Self::NANOS_BITS
    }

    pub(super) fn record(&self, step: u64, since_start: Duration) {
        let nanos = since_start.as_nanos();
        let value = if nanos < u128::from(Self::NANOS_MASK) {
            Self::tag(step) | nanos as u64
        } else {
            Self::EMPTY
        };
        // Each slot is one self-contained value: Relaxed suffices; a stale read
        // only loses a sample.
        self.slots[(step % RING as u64) as usize].store(value, Ordering::Relaxed);
    }

    /// Nanoseconds since the start at which `step` was sent, if it is still known.
    pub(super) fn sent_at(&self, step: u64) -> Option<u64> {
        let value = self.slots[(step % RING as u64) as usize].load(Ordering::Relaxed);
        (value != Self::EMPTY && value & !Self::NANOS_MASK == Self::tag(step)).then_some(value & Self::NANOS_MASK)
    }
}
