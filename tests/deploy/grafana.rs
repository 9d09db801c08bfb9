//! deploy/grafana/: the dashboard has the panels, the job variable and the
//! alert annotations it promises, and its provisioning points at the
//! Prometheus and the folder the compose file provides.

use serde_json::Value;

use crate::containers::{PROMETHEUS_PORT, compose, mount_target, service};
use crate::promql::metric_names;
use crate::support::{list, read, repo, str_at, yaml};

pub const DASHBOARD: &str = "deploy/grafana/dashboards/gradguard.json";

pub fn dashboard() -> Value {
    serde_json::from_str(&read(&repo(DASHBOARD))).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The PromQL the dashboard runs, each with where it is: panel queries,
/// annotation queries and the metric of each `label_values` variable.
pub fn dashboard_exprs() -> Vec<(String, String)> {
    let d = dashboard();
    let mut exprs = Vec::new();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target without expr: {t}"));
            exprs.push((format!("panel {:?}", p["title"]), expr.to_owned()));
        }
    }
    for a in d["annotations"]["list"].as_array().expect("annotations") {
        if let Some(expr) = a["expr"].as_str() {
            exprs.push((format!("annotation {:?}", a["name"]), expr.to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).expect("a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
            let (selector, _label) = inner.rsplit_once(',').expect("label_values(metric, label)");
            exprs.push((format!("variable {}", v["name"]), selector.to_owned()));
        }
    }
    exprs
}

fn variable<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{DASHBOARD} has no variable {name}"))
}

#[test]
fn the_dashboard_has_its_panels_the_job_variable_and_alert_annotations() {
    let d = dashboard();
    assert_eq!(d["uid"], "gradguard");

    // Panels and queries take the Prometheus from the `datasource` variable.
    let ds = variable(&d, "datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let wanted = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = Vec::new();
    for p in panels(&d) {
        ids.push(p["id"].as_u64().expect("a panel id"));
        let pos = &p["gridPos"];
        assert!(pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24, "{p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], wanted, "panel {}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "panel {} has no query",
            p["title"]
        );
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"], wanted, "panel {}", p["title"]);
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "panel ids repeat");

    // The job variable lists the training jobs, several at once.
    let job = variable(&d, "training_job");
    assert_eq!(
        job["query"]["query"],
        "label_values(gradguard_job_health, training_job)"
    );
    assert_eq!(job["multi"], true);
    assert_eq!(job["includeAll"], true);
    assert_eq!(job["datasource"], wanted);

    // What the issue asks for, each read from the metric that holds it.
    let exprs = dashboard_exprs();
    let has = |metric: &str, with: &str| {
        exprs
            .iter()
            .any(|(_, e)| metric_names(e).iter().any(|m| m == metric) && e.contains(with))
    };
    for (what, metric, with) in [
        ("job health overview", "gradguard_job_health", ""),
        (
            "global gradient norm per job",
            "gradguard_job_grad_norm",
            "by (training_job)",
        ),
        ("loss per job", "gradguard_job_loss", "by (training_job)"),
        (
            "anomalies by rule and severity",
            "gradguard_anomalies_total",
            "by (rule, severity)",
        ),
        ("advice by action", "gradguard_advice_total", "by (action)"),
        ("ingest rate", "gradguard_summaries_total", "rate("),
        (
            "advice latency",
            "gradguard_advice_latency_seconds_bucket",
            "histogram_quantile",
        ),
        ("alert annotations", "ALERTS", "firing"),
    ] {
        assert!(has(metric, with), "{DASHBOARD}: no {what} ({metric} with {with:?})");
    }
    // Per-job series follow the job variable.
    for (place, e) in &exprs {
        let per_job = metric_names(e).iter().any(|m| {
            m.starts_with("gradguard_job_") || m == "gradguard_anomalies_total" || m == "gradguard_advice_total"
        });
        if per_job && !place.starts_with("variable") {
            assert!(
                e.contains(r#"training_job=~"$training_job""#),
                "{place} ignores the training_job variable: {e}"
            );
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_compose_prometheus_and_dashboards() {
    let compose = compose();
    let grafana = service(&compose, "grafana");

    let provisioning = mount_target(grafana, &repo("deploy/grafana/provisioning"));
    assert_eq!(provisioning, "/etc/grafana/provisioning");

    let sources = yaml(&repo("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let sources = list(&sources, "datasources");
    assert_eq!(sources.len(), 1);
    assert_eq!(str_at(&sources[0], "type", "the datasource"), "prometheus");
    service(&compose, "prometheus");
    assert_eq!(
        str_at(&sources[0], "url", "the datasource"),
        format!("http://prometheus:{PROMETHEUS_PORT}")
    );

    let providers = yaml(&repo("deploy/grafana/provisioning/dashboards/gradguard.yml"));
    let providers = list(&providers, "providers");
    assert_eq!(providers.len(), 1);
    let path = str_at(&providers[0]["options"], "path", "the dashboard provider");
    assert_eq!(path, mount_target(grafana, &repo("deploy/grafana/dashboards")));
    let home = str_at(
        &grafana["environment"],
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
        "grafana",
    );
    assert_eq!(home, format!("{path}/gradguard.json"));
    assert!(repo(DASHBOARD).is_file());
}
