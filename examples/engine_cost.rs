//! Instruction-count companion of `benches/engine.rs`: plays the same
//! workload N times (`cargo run --release --example engine_cost -- global 20`).
use std::hint::black_box;

use gradguard::engine::{Engine, JobSpec, Output};
use gradguard::model::Summary;
use gradguard::scenario::{Fault, Scenario, ScenarioConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (layers, steps) = if args[1] == "global" { (0, 2500) } else { (100, 250) };
    let n: usize = args[2].parse().unwrap();
    let clone = args.get(3).is_some_and(|a| a == "clone");
    let sc = Scenario::new(ScenarioConfig {
        job: "bench".into(),
        fault: Fault::Healthy,
        workers: 8,
        layers,
        steps,
        seed: 42,
        ..ScenarioConfig::default()
    });
    let names = sc.layer_names();
    let summaries: Vec<Summary> = sc.flatten().collect();
    for _ in 0..n {
        if clone {
            for s in &summaries {
                black_box(black_box(s).clone());
            }
            continue;
        }
        let mut engine = Engine::default();
        let spec = JobSpec {
            layer_names: &names,
            world_size: Some(8),
            profile: None,
        };
        engine.declare("bench", &spec).unwrap();
        let mut out = Output::default();
        for s in &summaries {
            out.clear();
            engine.observe("bench", black_box(s), &mut out).unwrap();
            black_box(&out);
        }
    }
}
