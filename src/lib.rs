//! gradguard: gradient anomaly detection and remediation advice for training runs.
//!
//! # Layout
//!
//! - [`model`]: the domain types every other part speaks: a per-step [`model::Summary`]
//!   in, [`model::Finding`]s and [`model::Advice`] out.
//! - [`engine`]: the pure, synchronous detector. Summary in, findings and advice out;
//!   no clock, no I/O, no async runtime, deterministic for the same input.
//! - [`config`]: the rule set (TOML), its documented defaults, and per-job overrides.
//! - [`trace`]: readers for recorded training logs (the project's JSONL schema,
//!   Hugging Face `trainer_state.json`, llm.c text logs), used by `gradguard replay`.
//! - [`scenario`]: a generator of synthetic training traces with injected faults,
//!   used by the scenario test suite, the benchmarks and the worker simulator.
//! - [`proto`]: the generated `gradguard.v1` protobuf and gRPC code. Only the edges
//!   convert between it and [`model`], through [`wire`].
//! - [`wire`]: the conversions between wire and domain types, with validation.
//! - [`store`]: the durable store (SQLite): jobs, anomalies, advice, acks.
//! - [`client`]: the worker side of the gRPC ingest stream (simulator, load
//!   generator, tests).
//! - [`quality`]: the detection-quality harness: the engine against the anchor
//!   detectors (ZClip, OLMo-core skip-step, Lightning, llm-foundry, the seed
//!   ceiling) on labelled real traces and scenario runs (`QUALITY.md`).

pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod intake;
pub mod model;
pub mod proto;
pub mod quality;
pub mod recorder;
pub mod scenario;
pub mod service;
pub mod store;
pub mod trace;
pub mod wire;
