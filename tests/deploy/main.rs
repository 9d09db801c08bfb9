//! `deploy/` proven against the real tools and the real service:
//!
//! - `prometheus.rs`: `promtool` checks the scrape config, the alert rules and
//!   their unit tests; every alert is tested; a real Prometheus on loopback
//!   scrapes a live `gradguard serve` and fires the critical alert for an
//!   exploding job and nothing for a healthy one; the Kubernetes
//!   PrometheusRule is generated from the same rules.
//! - `metrics.rs`: every metric the rules and the dashboard use is one the
//!   running service exports (or a listed cluster-mode one).
//! - `grafana.rs`, `containers.rs`, `k8s.rs`: the dashboard, its provisioning,
//!   the Dockerfile, the compose file and the manifests parse and refer to
//!   files, images, ports, flags, secrets and config keys that exist.
//! - `secrets.rs`: `deploy/make-secrets.sh` makes a CA, a certificate for
//!   every name the deployment uses, tokens and an auth file `serve --auth`
//!   takes; a replica run as compose runs it serves TLS and checks tokens
//!   and scopes.
//!
//! Tests that need `promtool` or `prometheus` (Debian's `prometheus` package;
//! `.ci/run` installs it), or `openssl`, fail with a message saying so when
//! it is missing.

#[path = "../common/mod.rs"]
mod common;

mod containers;
mod grafana;
mod k8s;
mod metrics;
mod prometheus;
mod promql;
mod secrets;
mod support;
