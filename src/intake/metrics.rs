//! What the intake counts: messages accepted and refused, and what the
//! engine decided. Registered by the intake, in the service's registry.

use prometheus::{IntCounter, IntCounterVec, Registry};

use super::{Reason, Refusal};
use crate::model::{Action, RuleId, Severity};

#[derive(Clone)]
pub struct IntakeMetrics {
    summaries: IntCounter,
    layer_stats: IntCounter,
    rejected: IntCounterVec,
    anomalies: IntCounterVec,
    advice: IntCounterVec,
    acks: IntCounterVec,
    jobs_refused: IntCounter,
}

/// Severities that alerts are built on; their counters exist from a job's start.
const ALERTED_SEVERITIES: [Severity; 2] = [Severity::Warning, Severity::Critical];

impl IntakeMetrics {
    /// Registers the intake's series. Registration only fails on a duplicate
    /// or malformed name, fixed here.
    pub fn register(r: &Registry) -> Self {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid metric");
            r.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(prometheus::Opts::new(name, help), labels).expect("a valid metric");
            r.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let m = Self {
            summaries: counter("gradguard_summaries_total", "Summaries accepted from workers."),
            layer_stats: counter(
                "gradguard_layer_stats_total",
                "Per-layer statistics accepted (one per layer of each summary).",
            ),
            rejected: vec(
                "gradguard_summaries_rejected_total",
                "Worker messages refused, by reason.",
                &["reason"],
            ),
            anomalies: vec(
                "gradguard_anomalies_total",
                "Anomalies found, by job, rule and severity.",
                &["training_job", "rule", "severity"],
            ),
            advice: vec(
                "gradguard_advice_total",
                "Advice decided, by job and action.",
                &["training_job", "action"],
            ),
            acks: vec(
                "gradguard_advice_acks_total",
                "Advice acknowledgements from workers, by whether they applied it.",
                &["applied"],
            ),
            jobs_refused: counter(
                "gradguard_jobs_refused_total",
                "New jobs refused because --max-jobs jobs were already tracked.",
            ),
        };
        for reason in Reason::ALL {
            m.rejected.with_label_values(&[reason.label()]);
        }
        for applied in ["true", "false"] {
            m.acks.with_label_values(&[applied]);
        }
        m
    }

    /// One summary of `layers` layers accepted.
    pub fn summary(&self, layers: usize) {
        self.summaries.inc();
        self.layer_stats.inc_by(layers as u64);
    }

    pub fn refused(&self, refusal: &Refusal) {
        self.rejected.with_label_values(&[refusal.reason.label()]).inc();
    }

    pub fn anomaly(&self, job: &str, rule: RuleId, severity: Severity) {
        self.anomalies
            .with_label_values(&[job, rule.as_str(), severity.as_str()])
            .inc();
    }

    pub fn advice(&self, job: &str, action: &Action) {
        self.advice.with_label_values(&[job, action.name()]).inc();
    }

    pub fn ack(&self, applied: bool) {
        self.acks
            .with_label_values(&[if applied { "true" } else { "false" }])
            .inc();
    }

    pub fn job_refused(&self) {
        self.jobs_refused.inc();
    }

    /// A new job's alerted anomaly counters, at 0: `increase()` only sees a
    /// series change between two scrapes, so a counter born at 1 would never
    /// fire the alert built on it.
    pub fn new_job(&self, job: &str) {
        for rule in RuleId::ALL {
            for severity in ALERTED_SEVERITIES {
                self.anomalies
                    .with_label_values(&[job, rule.as_str(), severity.as_str()]);
            }
        }
    }

    /// Removes every series labelled with this job.
    pub fn forget_job(&self, job: &str) {
        for rule in RuleId::ALL {
            for severity in [Severity::Info, Severity::Warning, Severity::Critical] {
                let _ = self
                    .anomalies
                    .remove_label_values(&[job, rule.as_str(), severity.as_str()]);
            }
        }
        for action in Action::NAMES {
            let _ = self.advice.remove_label_values(&[job, action]);
        }
    }
}
