//! Detection quality: gradguard's engine against the anchor detectors (the
//! seed's static ceiling, ZClip, OLMo-core's skip-step, Lightning's
//! `SpikeDetection`, llm-foundry's `KillLossSpike`) on the labelled real
//! traces and the scenario suite's faults. Prints one line per detector
//! (its rule and defaults), then the table: per input hit or miss, delay,
//! false alarms and severe false alarms, and totals per detector. See
//! `QUALITY.md` and `gradguard::quality`.
//!
//! `cargo bench --bench quality` reads the traces under `tests/data/traces`;
//! `QUALITY_TRACES=DIR` reads them from `DIR` instead (same layout:
//! `gpt2-124m-llmc.log`, `hf/`, `llmc/`, `torch/`). A trace that is missing or
//! cannot be read is a row marked unreadable.

use std::path::{Path, PathBuf};
use std::time::Instant;

use gradguard::quality::{evaluate, scenario_inputs, trace_inputs};

fn main() {
    // `cargo bench` passes `--bench`; this harness has no options.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("QUALITY_TRACES").map_or_else(|| root.join("tests/data/traces"), PathBuf::from);
    let mut inputs = trace_inputs(&dir);
    inputs.extend(scenario_inputs());
    let started = Instant::now();
    let report = evaluate(&inputs);
    // Relative to the repository when inside it: the same text on every checkout.
    let shown = dir.strip_prefix(root).unwrap_or(&dir);
    println!(
        "detection quality: real traces from {}, scenario runs generated",
        shown.display()
    );
    println!();
    print!("{report}");
    eprintln!("({} inputs in {:.1} s)", inputs.len(), started.elapsed().as_secs_f64());
}
