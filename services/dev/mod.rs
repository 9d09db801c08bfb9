//! The developer tools: commands that exercise a gradguard server or feed it
//! synthetic data, rather than run or query it.
//!
//! - [`simulate`]: play one synthetic training job (a [`gradguard::scenario`]
//!   with an injected fault) against a running server and judge whether its
//!   advice brought the run back;
//! - [`loadgen`]: load a server with many concurrent worker streams and report
//!   its throughput, advice latency and memory;
//! - [`sink`]: the decode-only server `loadgen --baseline` compares to;
//! - [`generate`]: write a synthetic run as JSON lines for `replay`.
//!
//! They use the library and the shared CLI helpers ([`crate::cli`] for flags
//! and failures, [`crate::output`] for the line formats) only; nothing outside
//! this tree uses them but the command table in [`crate::cli`] and the
//! dispatch in `main`.

pub mod generate;
pub mod loadgen;
pub mod simulate;
pub mod sink;
