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
//!   files, images, ports, flags, secrets and config keys that exist; the
//!   Kubernetes manifests (standalone `deploy/k8s`, cluster-mode overlay
//!   `deploy/k8s-kafka`) as `kubectl kustomize` renders them, and both
//!   renderings pass schema validation (`deploy/validate/k8s.py`).
//! - `k8s_pod.rs`: the standalone base run as its pod runs it passes its
//!   readiness and liveness probes with nothing else running.
//! - `secrets.rs`: `deploy/make-secrets.sh` makes a CA, a certificate for
//!   every name the deployment uses, tokens and an auth file `serve --auth`
//!   takes; a replica run as compose runs it serves TLS and checks tokens
//!   and scopes.
//!
//! Tests that need `promtool` or `prometheus` (Debian's `prometheus` package;
//! `.ci/run` installs it), `openssl`, or the venv of
//! `deploy/validate/requirements.txt` (kubectl, kubernetes-validate; `.ci/run`
//! makes it) fail with a message saying so when it is missing.

#[path = "../common/mod.rs"]
mod common;

mod containers;
mod grafana;
mod k8s;
mod k8s_pod;
mod metrics;
mod prometheus;
mod promql;
mod secrets;
mod support;
