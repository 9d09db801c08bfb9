//! Every metric the alert rules and the dashboard read is one a running
//! `gradguard serve` exports: a misspelt name would make an alert that never
//! fires and a panel that stays empty, and neither says so.

use gradguard::scenario::{Fault, ScenarioConfig};

use std::io::Write;
use std::process::{Command, Stdio};

use crate::common::{self, Server};
use crate::grafana::dashboard_exprs;
use crate::prometheus::rule_exprs;
use crate::promql::metric_names;
use crate::support::tool;

/// Metrics that exist only in cluster mode (`gradguard serve
/// --kafka-brokers`): a standalone service never exports them, so they are
/// not checked against its scrape here; the Kafka tests check them against a
/// service in cluster mode.
const CLUSTER_ONLY: [&str; 2] = [
    "gradguard_kafka_consumer_lag_messages",
    "gradguard_kafka_producer_errors_total",
];

/// Series Prometheus makes itself: the scrape health and the alerts.
const PROMETHEUS_OWN: [&str; 2] = ["up", "ALERTS"];

/// The names in a scrape: every sample's and every family's (`# TYPE`).
fn exported(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_metric_in_the_alert_rules_and_the_dashboard_is_exported() {
    let _turn = common::turn();
    let server = Server::start();
    // A job that gets anomalies and advice, so every per-job series exists.
    let cfg = ScenarioConfig {
        job: "metrics".into(),
        fault: Fault::AbruptExplosion,
        workers: 1,
        layers: 4,
        steps: 400,
        fault_at: 250,
        ..ScenarioConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (advice, _) = runtime.block_on(common::play(&server.url(), cfg));
    assert!(!advice[0].is_empty(), "the exploding job got no advice");
    let text = server.scrape();
    let exported = exported(&text);

    // Prometheus's own lint finds nothing on a live exposition.
    let lint = lint(&text);
    assert!(lint.is_empty(), "promtool check metrics: {lint}");
    let build_info = text
        .lines()
        .find(|l| l.starts_with("gradguard_build_info{"))
        .unwrap_or_else(|| panic!("no gradguard_build_info in {text}"));
    assert!(
        build_info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build_info.contains("revision=\""),
        "{build_info}"
    );
    assert!(build_info.ends_with(" 1"), "{build_info}");

    for name in CLUSTER_ONLY {
        assert!(
            !exported.iter().any(|e| e == name),
            "{name} is exported without cluster mode: take it off CLUSTER_ONLY"
        );
    }

    let mut used: Vec<(String, String)> = rule_exprs()
        .into_iter()
        .map(|e| ("deploy/prometheus/rules".to_owned(), e))
        .collect();
    let rule_names = used.len();
    used.extend(dashboard_exprs());
    let mut checked = Vec::new();
    for (place, expr) in &used {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for name in names {
            let known = exported.contains(&name)
                || CLUSTER_ONLY.contains(&name.as_str())
                || PROMETHEUS_OWN.contains(&name.as_str());
            assert!(
                known,
                "{place} reads {name}, which gradguard serve does not export; it exports {exported:?}"
            );
            checked.push(name);
        }
    }
    checked.sort();
    checked.dedup();
    assert!(
        rule_names >= 10 && checked.len() >= 20,
        "too few names found: {checked:?}"
    );
}

/// What `promtool check metrics` says of an exposition (empty when clean).
fn lint(text: &str) -> String {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("exit {:?}: {said}", out.status.code())
    }
}
