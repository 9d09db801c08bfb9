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
//! - [`intake`]: the one place a worker message is checked, from any transport:
//!   decoding, the Hello's limits, the layer count, the job cap, the engine
//!   calls, and refusals with a stable label and a gRPC code.
//! - [`service`]: `gradguard serve` as a library ([`service::Service`]): the
//!   gRPC ingest and query services, the hub of worker streams, metrics, the
//!   settings file.
//! - [`cluster`]: cluster mode on Kafka: the detector, the forwarder and advice
//!   relay, the store feed, and the worker side of the topics.
//! - [`recorder`]: the store writer thread (group commit; advice leaves after
//!   the commit that holds it).
//! - [`store`]: the durable store (SQLite): jobs, anomalies, advice, acks.
//! - [`clock`]: the service's clock.
//! - [`auth`]: principals and scopes (`serve --auth`), and TLS (`serve --tls-*`).
//! - [`client`]: the worker side of the gRPC ingest stream (simulator, load
//!   generator, tests).
//! - [`quality`]: the detection-quality harness: the engine against the anchor
//!   detectors (ZClip, OLMo-core skip-step, Lightning, llm-foundry, the seed
//!   ceiling) on labelled real traces and scenario runs (`QUALITY.md`).
//! - [`fuzz`] (hidden): differential checks of the hand-written decoding (a
//!   worker message's fast paths, a summaries-topic record) against prost's
//!   generated decoder, for `tests/differential.rs` and
//!   `examples/differential.rs`.

pub mod auth;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
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
