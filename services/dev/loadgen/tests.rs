use std::time::Duration;

use super::generator::{Generator, spike_offset};
use super::measure::{RING, Ring};
use super::memory::resident_from_prometheus;
use super::report::Latency;
use super::*;

#[test]
fn ring_times_only_the_step_it_holds() {
    let ring = Ring::new();
    assert_eq!(ring.sent_at(5), None);
    ring.record(5, Duration::from_micros(7));
    assert_eq!(ring.sent_at(5), Some(7_000));
    assert_eq!(ring.sent_at(5 + RING as u64), None);
    ring.record(5 + RING as u64, Duration::from_micros(9));
    assert_eq!(ring.sent_at(5), None);
    assert_eq!(ring.sent_at(5 + RING as u64), Some(9_000));
}

#[test]
fn percentiles_are_nearest_rank() {
    let mut samples: Vec<u64> = (1..=1000).rev().map(|ms| ms * 1_000_000).collect();
    let l = Latency::of(&mut samples).unwrap();
    assert_eq!((l.p50, l.p99, l.p999), (500.0, 990.0, 999.0));
    assert!(Latency::of(&mut []).is_none());
}

#[test]
fn prometheus_resident_memory() {
    let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                # TYPE process_resident_memory_bytes gauge\n\
                process_resident_memory_bytes_total 1\n\
                process_resident_memory_bytes 89432064\n";
    assert_eq!(resident_from_prometheus(text), Some(89_432_064));
    assert_eq!(
        resident_from_prometheus("process_resident_memory_bytes{a=\"b\"} 1e6\n"),
        Some(1_000_000)
    );
    assert_eq!(resident_from_prometheus("up 1\n"), None);
}

#[test]
fn generator_is_healthy_with_spikes() {
    let mut g = Generator::new(0, 100, 1, 200, 0);
    for _ in 1..200 {
        let s = g.next(0.0);
        let norm = s.grad_norm.unwrap();
        assert!((0.96..=1.04).contains(&norm), "{norm}");
        let layers = s.layer_l2.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!((layers / norm - 1.0).abs() < 0.01, "{layers} vs {norm}");
        assert_eq!(s.layer_nonfinite.len(), 100);
    }
    let spike = g.next(0.0);
    assert_eq!(spike.step, 200);
    assert!(spike.grad_norm.unwrap() > 40.0);
}

#[test]
fn staggered_jobs_spike_at_their_own_steps() {
    let offsets: Vec<u64> = (0..25).map(|j| spike_offset(j, 25, 200)).collect();
    assert_eq!(offsets[..4], [0, 8, 16, 24]);
    assert_eq!(offsets[24], 192);
    assert_eq!(spike_offset(0, 0, 200), 0);
    let mut g = Generator::new(5, 10, 1, 200, 8);
    let spikes: Vec<u64> = (1..=700)
        .map(|_| g.next(0.0))
        .filter(|s| s.grad_norm.unwrap() > 40.0)
        .map(|s| s.step)
        .collect();
    // Not at step 8, inside the rules' warm-up: from one period on.
    assert_eq!(spikes, [208, 408, 608]);
}

/// The load is what it claims: the real engine finds a healthy run with a
/// spike every K steps, and advises clipping at each spike and nothing else.
#[test]
fn engine_clips_the_spikes_and_nothing_else() {
    use gradguard::engine::{Engine, JobSpec, Output};
    use gradguard::model::{Action, Severity};

    let names: Vec<String> = (0..100).map(|l| format!("layer{l}")).collect();
    let mut engine = Engine::default();
    let spec = JobSpec {
        layer_names: &names,
        world_size: Some(4),
        ..JobSpec::default()
    };
    engine.declare("loadgen-0", &spec).unwrap();
    let mut ranks: Vec<Generator> = (0..4).map(|r| Generator::new(r, 100, 1, 200, 0)).collect();
    let mut out = Output::default();
    for step in 1..=1000u64 {
        for (rank, generator) in ranks.iter_mut().enumerate() {
            let summary = generator.next(1.7e9 + step as f64);
            let summary = gradguard::wire::summary_from_proto(&summary, rank as u32, 100).unwrap();
            engine.observe("loadgen-0", &summary, &mut out).unwrap();
        }
    }
    assert!(
        out.findings.iter().all(|f| f.severity == Severity::Info),
        "{:?}",
        out.findings
    );
    let advised: Vec<u64> = out.advice.iter().map(|a| a.step).collect();
    assert_eq!(advised, [200, 400, 600, 800, 1000]);
    assert!(
        out.advice
            .iter()
            .all(|a| matches!(a.action, Action::ClipGradients { .. }))
    );
}

#[test]
fn server_urls() {
    assert_eq!(parse_server("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
    assert_eq!(
        parse_server("https://example.org:443").unwrap(),
        "https://example.org:443"
    );
    assert!(parse_server("ftp://example.org").is_err());
    assert_eq!(
        default_metrics_url("http://10.0.0.2:50051"),
        "http://10.0.0.2:9464/metrics"
    );
    assert_eq!(default_metrics_url("http://[::1]:50051"), "http://[::1]:9464/metrics");
}

#[test]
fn memory_growth_is_read_from_the_middle_of_the_run_to_its_end() {
    use super::measure::growth_over_last_half;
    use super::report::MemorySample;
    let at = |at_s: f64, mib: u64| MemorySample { at_s, bytes: mib << 20 };
    // Growing in the first half (warming up), flat in the second.
    let samples = [at(30.0, 100), at(60.0, 200), at(90.0, 201), at(120.0, 202)];
    let growth = growth_over_last_half(&samples).unwrap();
    assert!((growth - 0.01).abs() < 1e-9, "{growth}");
    assert_eq!(growth_over_last_half(&samples[..1]), None, "one sample has no middle");
    assert_eq!(growth_over_last_half(&[]), None);
}
