//! The Prometheus side of deploy/: `promtool` on the config, the rules and
//! their unit tests; a real Prometheus scraping a live `gradguard serve`; the
//! Kubernetes PrometheusRule generated from the same rule files.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use yaml_rust2::Yaml;

use crate::common::{self, Run, Server};
use crate::containers::REPLICAS;
use crate::secrets::Secrets;
use crate::support::{list, read, repo, run_ok, str_at, tool, yaml};

/// The alert rule files, `deploy/prometheus/rules/*.yml`, in name order.
pub fn rule_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/prometheus/rules"))
        .expect("deploy/prometheus/rules")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files in deploy/prometheus/rules");
    files
}

/// Every group of every rule file, in order.
pub fn rule_groups() -> Vec<Yaml> {
    rule_files()
        .iter()
        .flat_map(|f| list(&yaml(f), "groups").to_vec())
        .collect()
}

/// Every rule's PromQL expression.
pub fn rule_exprs() -> Vec<String> {
    rule_groups()
        .iter()
        .flat_map(|g| {
            list(g, "rules")
                .iter()
                .map(|r| str_at(r, "expr", "a rule").to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn promtool_checks_the_config_the_rules_and_their_unit_tests() {
    let promtool = tool("promtool");
    let dir = repo("deploy/prometheus");
    run_ok(
        Command::new(&promtool)
            .current_dir(&dir)
            .args(["check", "config", "prometheus.yml"]),
    );
    run_ok(Command::new(&promtool).args(["check", "rules"]).args(rule_files()));
    let out = run_ok(
        Command::new(&promtool)
            .current_dir(&dir)
            .args(["test", "rules", "tests/gradguard_test.yml"]),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_severity_names_its_job_a_runbook_and_is_unit_tested() {
    let runbook = read(&repo("deploy/RUNBOOK.md"));
    let anchors = markdown_anchors(&runbook);
    let tests = yaml(&repo("deploy/prometheus/tests/gradguard_test.yml"));
    // Alerts that some unit test expects to fire.
    let fired: Vec<&str> = list(&tests, "tests")
        .iter()
        .flat_map(|t| list(t, "alert_rule_test"))
        .filter(|a| !list(a, "exp_alerts").is_empty())
        .map(|a| str_at(a, "alertname", "an alert_rule_test"))
        .collect();
    let tested_files: Vec<PathBuf> = list(&tests, "rule_files")
        .iter()
        .map(|f| repo("deploy/prometheus/tests").join(f.as_str().unwrap()))
        .map(|p| p.canonicalize().unwrap())
        .collect();
    for file in rule_files() {
        assert!(
            tested_files.contains(&file.canonicalize().unwrap()),
            "{} has no unit tests",
            file.display()
        );
    }

    let mut alerts = 0;
    for group in rule_groups() {
        let per_job = str_at(&group, "name", "a group") == "gradguard.jobs";
        for rule in list(&group, "rules") {
            let Some(name) = rule["alert"].as_str() else { continue };
            alerts += 1;
            let severity = str_at(&rule["labels"], "severity", name);
            assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: severity {severity}"
            );
            let summary = str_at(&rule["annotations"], "summary", name);
            let description = str_at(&rule["annotations"], "description", name);
            if per_job {
                // The training job, never Prometheus's scrape job.
                for text in [summary, description] {
                    assert!(text.contains("{{ $labels.training_job }}"), "{name}: {text}");
                    assert!(!text.contains("$labels.job "), "{name}: {text}");
                }
                let expr = str_at(rule, "expr", name);
                assert!(!expr.contains("(job") && !expr.contains(" job)"), "{name}: {expr}");
            } else {
                assert!(description.contains("{{ $labels.job }}"), "{name}: {description}");
                assert!(
                    summary.contains("{{ $labels.job }}") || summary.contains("{{ $labels.instance }}"),
                    "{name}: {summary}"
                );
            }
            assert!(fired.contains(&name), "no promtool unit test fires {name}");
            let url = str_at(&rule["annotations"], "runbook_url", name);
            let (page, anchor) = url
                .split_once('#')
                .unwrap_or_else(|| panic!("{name}: runbook_url {url} has no #anchor"));
            assert!(page.ends_with("/deploy/RUNBOOK.md"), "{name}: {url}");
            assert!(
                anchors.iter().any(|a| a == anchor),
                "{name}: no heading for #{anchor} in deploy/RUNBOOK.md"
            );
            assert_eq!(anchor, name.to_lowercase(), "{name}: its section is named after it");
        }
    }
    assert!(alerts >= 10, "only {alerts} alerts");
}

/// The anchors of a Markdown file's headings, as the project's host makes
/// them: lower case, spaces to `-`, other punctuation dropped.
fn markdown_anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// A Prometheus on loopback with its own config and storage, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` every `interval` with the project's scrape settings
    /// (its CA file replaced by `ca`) and evaluates the project's rule files
    /// as often.
    fn start(target: SocketAddr, ca: &Path, interval: &str) -> Self {
        let prometheus = tool("prometheus");
        let mut dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("prometheus.yml"), e2e_config(target, ca, interval)).unwrap();
        // Prometheus does not listen on port 0: take a port the OS says is
        // free, and try another if it was taken in between.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new(&prometheus)
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut p = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                dir,
            };
            match p.wait_ready() {
                Ok(()) => return p,
                Err(log) if log.contains("address already in use") => {
                    dir = p.take_dir();
                }
                Err(log) => panic!("prometheus did not start:\n{log}"),
            }
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// Polls `/-/ready` until it answers 200, or the process ends (its log).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.log());
            }
            if ureq::get(&format!("{}/-/ready", self.url)).call().is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Ends a Prometheus that failed to start, keeping its directory for the next try.
    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let empty = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, empty)
    }

    /// The `data` of an HTTP API answer.
    fn api(&self, path: &str, query: Option<&str>) -> Value {
        let mut req = ureq::get(&format!("{}{path}", self.url));
        if let Some(q) = query {
            req = req.query("query", q);
        }
        let text = req
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
            .body_mut()
            .read_to_string()
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v["status"], "success", "{text}");
        v["data"].clone()
    }

    /// An instant query's series.
    fn query(&self, q: &str) -> Vec<Value> {
        self.api("/api/v1/query", Some(q))["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every alert, pending or firing.
    fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts", None)["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `check` every 100 ms until it returns something, failing after `secs`.
    fn wait<T>(&self, what: &str, secs: u64, mut check: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}; alerts: {:#?}",
                self.alerts()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus config for the end-to-end test: the project's `gradguard`
/// scrape job aimed at `target` (its scheme, and its TLS settings with the
/// CA file at `ca`), the project's rule files, scrapes and evaluations
/// every `interval`.
fn e2e_config(target: SocketAddr, ca: &Path, interval: &str) -> String {
    let project = yaml(&repo("deploy/prometheus/prometheus.yml"));
    let job = list(&project, "scrape_configs")
        .iter()
        .find(|c| c["job_name"].as_str() == Some("gradguard"))
        .expect("a `gradguard` scrape job in deploy/prometheus/prometheus.yml");
    assert!(
        job["honor_labels"].is_badvalue(),
        "the training job is `training_job`: the scrape job needs no honor_labels"
    );
    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
    let scheme = job["scheme"].as_str().unwrap_or("http");
    let rules = repo("deploy/prometheus/rules/*.yml");
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut tls = String::new();
    let tls_config = &job["tls_config"];
    if !tls_config.is_badvalue() {
        let keys: Vec<&str> = tls_config
            .as_hash()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert!(
            keys.iter().all(|k| ["ca_file", "server_name"].contains(k)),
            "tls_config settings the end-to-end test does not carry over: {keys:?}"
        );
        tls.push_str(&format!(
            "    tls_config:\n      ca_file: {}\n",
            q(&ca.display().to_string())
        ));
        if let Some(name) = tls_config["server_name"].as_str() {
            tls.push_str(&format!("      server_name: {}\n", q(name)));
        }
    }
    format!(
        "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: gradguard\n    metrics_path: {}\n    \
         scheme: {}\n{tls}    static_configs:\n      - targets: [{}]\n",
        q(&rules.display().to_string()),
        q(path),
        q(scheme),
        q(&target.to_string()),
    )
}

/// Plays a scenario with `gradguard simulate` against the server, over TLS
/// with the worker token.
fn simulate(server: &Server, secrets: &Secrets, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args(["simulate", "--server", &format!("https://{}", server.grpc)])
        .arg("--tls-ca")
        .arg(secrets.path("ca.crt"))
        .arg("--token-file")
        .arg(secrets.path("worker.token"))
        .args(args)
        .output()
        .expect("run gradguard simulate");
    let run = Run::from(out);
    run.assert_code(0);
    run
}

#[test]
fn prometheus_fires_the_critical_alert_for_an_exploding_job_and_nothing_for_a_healthy_one() {
    let _turn = common::turn();
    let started = Instant::now();
    // The replica as compose runs it: TLS on both ports, tokens, the files
    // deploy/make-secrets.sh makes; Prometheus with the project's scrape
    // settings, over HTTPS when they say so.
    let secrets = Secrets::make();
    let args = secrets.compose_serve_args(REPLICAS[0]);
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let prom = Prometheus::start(server.metrics, &secrets.path("ca.crt"), "1s");
    prom.wait("the first scrape of gradguard", 30, |p| {
        let up = p.query(r#"up{job="gradguard"}"#);
        (up.first()?["value"][1] == "1").then_some(())
    });
    let ready = started.elapsed();

    // The healthy job first: by the time the exploding job's alert fires,
    // Prometheus has scraped the healthy job's whole run and evaluated the
    // same rule group on it.
    simulate(
        &server,
        &secrets,
        &[
            "--scenario",
            "healthy",
            "--job",
            "e2e-healthy",
            "--workers",
            "2",
            "--steps",
            "400",
        ],
    );
    let explode_started = Instant::now();
    simulate(
        &server,
        &secrets,
        &[
            "--scenario",
            "explode",
            "--job",
            "e2e-explode",
            "--workers",
            "2",
            "--steps",
            "400",
            "--fault-at",
            "200",
        ],
    );
    let alert = prom.wait("GradguardJobCriticalAnomaly firing for e2e-explode", 60, |p| {
        p.alerts().into_iter().find(|a| {
            a["labels"]["alertname"] == "GradguardJobCriticalAnomaly"
                && a["labels"]["training_job"] == "e2e-explode"
                && a["state"] == "firing"
        })
    });
    let fired = explode_started.elapsed();
    assert_eq!(alert["labels"]["severity"], "critical", "{alert:#}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("e2e-explode")),
        "{alert:#}"
    );

    // The healthy job was scraped, and raised nothing, not even pending.
    assert_eq!(
        prom.query(r#"gradguard_job_health{training_job="e2e-healthy"}"#).len(),
        1,
        "Prometheus never scraped the healthy job"
    );
    let healthy: Vec<Value> = prom
        .alerts()
        .into_iter()
        .filter(|a| a["labels"]["training_job"] == "e2e-healthy")
        .collect();
    assert!(healthy.is_empty(), "alerts for the healthy job: {healthy:#?}");

    // Every rule evaluates on a live Prometheus without error.
    let groups = prom.api("/api/v1/rules", None)["groups"].as_array().cloned().unwrap();
    let rules: Vec<&Value> = groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert!(rules.len() >= 10, "{groups:#?}");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
    }
    eprintln!(
        "e2e: prometheus scraping after {:.1} s; the critical alert fired {:.1} s after the exploding run started; {:.1} s in all",
        ready.as_secs_f64(),
        fired.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The scrape and evaluation interval deploy/prometheus/prometheus.yml documents.
fn documented_interval() -> String {
    let project = yaml(&repo("deploy/prometheus/prometheus.yml"));
    let global = &project["global"];
    let scrape = str_at(global, "scrape_interval", "global").to_owned();
    assert_eq!(str_at(global, "evaluation_interval", "global"), scrape);
    scrape
}

/// The alerts firing now: (alert name, training job, rule) of each.
fn firing(p: &Prometheus) -> Vec<(String, String, String)> {
    p.alerts()
        .into_iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_owned();
            (label("alertname"), label("training_job"), label("rule"))
        })
        .collect()
}

#[test]
fn at_the_documented_interval_a_job_nan_from_its_first_step_and_one_shorter_than_a_scrape_alert_once() {
    let _turn = common::turn();
    let interval = documented_interval();
    let secrets = Secrets::make();
    let args = secrets.compose_serve_args(REPLICAS[0]);
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let prom = Prometheus::start(server.metrics, &secrets.path("ca.crt"), &interval);
    prom.wait("the first scrape of gradguard", 60, |p| {
        let up = p.query(r#"up{job="gradguard"}"#);
        (up.first()?["value"][1] == "1").then_some(())
    });
    // Both jobs start right after a scrape and are over long before the
    // next: a job NaN from its very first step (its counter is born at 1),
    // and one NaN at step 10 of 30 (its counter is 0 for milliseconds only).
    let scraped_at = |p: &Prometheus| {
        let t = p.query(r#"timestamp(up{job="gradguard"})"#);
        t.first()?["value"][1].as_str()?.parse::<f64>().ok()
    };
    let before = scraped_at(&prom);
    prom.wait("the next scrape", 60, |p| scraped_at(p).filter(|t| Some(*t) != before));
    let played = Instant::now();
    for (job, fault_at) in [("e2e-nan-first", "0"), ("e2e-short", "10")] {
        simulate(
            &server,
            &secrets,
            &[
                "--scenario",
                "nan",
                "--job",
                job,
                "--workers",
                "1",
                "--steps",
                "30",
                "--fault-at",
                fault_at,
            ],
        );
    }
    let took = played.elapsed();
    let seconds: f64 = interval.trim_end_matches('s').parse().expect("an interval in seconds");
    assert!(
        took.as_secs_f64() < seconds,
        "the two jobs took {took:?}, more than a scrape interval ({interval})"
    );

    let wanted = ["e2e-nan-first", "e2e-short"];
    let alerts = prom.wait("GradguardJobCriticalAnomaly firing for both jobs", 120, |p| {
        let now = firing(p);
        wanted
            .iter()
            .all(|job| {
                now.iter()
                    .any(|(name, j, _)| name == "GradguardJobCriticalAnomaly" && j == job)
            })
            .then_some(now)
    });
    // One alert per job and rule: the critical nonfinite one.
    for job in wanted {
        let of_job: Vec<_> = alerts.iter().filter(|(_, j, _)| j == job).collect();
        assert_eq!(
            of_job,
            [&(
                "GradguardJobCriticalAnomaly".to_owned(),
                job.to_owned(),
                "nonfinite".to_owned()
            )],
            "{alerts:?}"
        );
    }
    eprintln!(
        "e2e at {interval}: both critical alerts fired {:.1} s after the jobs ended",
        played.elapsed().as_secs_f64() - took.as_secs_f64()
    );
}

/// The Kubernetes PrometheusRule, generated from the rule files.
const PROMETHEUS_RULE: &str = "deploy/k8s/prometheusrule.yaml";

/// The PrometheusRule text: each rule file's groups, moved under `spec:`
/// as they are (comments included).
fn render_prometheus_rule() -> String {
    let mut out = String::from(
        "# Generated from deploy/prometheus/rules/ by tests/deploy/prometheus.rs: do not edit.\n\
         # Regenerate: GRADGUARD_BLESS=1 cargo test --test deploy prometheus_rule\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: gradguard\n  labels:\n    app.kubernetes.io/name: gradguard\n\
         spec:\n  groups:\n",
    );
    for file in rule_files() {
        let rel = file.strip_prefix(repo("")).unwrap().display().to_string();
        let text = read(&file);
        let mut lines = text.lines();
        for line in lines.by_ref() {
            if line == "groups:" {
                break;
            }
            assert!(
                line.is_empty() || line.starts_with('#'),
                "{rel}: only comments may come before `groups:`, found {line:?}"
            );
        }
        writeln!(out, "    # From {rel}").unwrap();
        for line in lines {
            assert!(
                line.is_empty() || line.starts_with([' ', '#']),
                "{rel}: `groups:` must be the only top-level key, found {line:?}"
            );
            if line.is_empty() {
                out.push('\n');
            } else {
                writeln!(out, "  {line}").unwrap();
            }
        }
    }
    out
}

#[test]
fn the_prometheus_rule_is_generated_from_the_alert_rules() {
    let path = repo(PROMETHEUS_RULE);
    let rendered = render_prometheus_rule();
    if std::env::var_os("GRADGUARD_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = read(&path);
    assert!(
        committed == rendered,
        "{PROMETHEUS_RULE} is not what deploy/prometheus/rules/ generates; regenerate it with \
         GRADGUARD_BLESS=1 cargo test --test deploy prometheus_rule"
    );
    // The same rules, not only the same text.
    let doc = yaml(&path);
    assert_eq!(doc["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(list(&doc["spec"], "groups"), rule_groups().as_slice());
}
