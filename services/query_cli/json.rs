//! `--json`: one object per job, anomaly or advice.

use std::io::{self, Write};

use gradguard::{proto, wire};
use serde::Serialize;

use super::text::health_word;
use crate::output::{ActionFields, Evidence, Num, evidence_pairs, json_line, severity_word};

#[derive(Serialize)]
pub(super) struct JobLine<'a> {
    kind: &'static str,
    job: &'a str,
    health: &'static str,
    live: bool,
    connected_streams: u32,
    ranks: u32,
    world_size: Option<u32>,
    layers: u32,
    last_step: Option<u64>,
    first_seen: Num,
    last_seen: Num,
    anomalies_info: u64,
    anomalies_warning: u64,
    anomalies_critical: u64,
    advice: u64,
}

impl<'a> JobLine<'a> {
    pub(super) fn new(j: &'a proto::Job) -> Self {
        Self {
            kind: "job",
            job: &j.job,
            health: health_word(j.health),
            live: j.live,
            connected_streams: j.connected_streams,
            ranks: j.ranks,
            world_size: j.world_size,
            layers: j.layers,
            last_step: j.last_step,
            first_seen: Num(j.first_seen),
            last_seen: Num(j.last_seen),
            anomalies_info: j.anomalies_info,
            anomalies_warning: j.anomalies_warning,
            anomalies_critical: j.anomalies_critical,
            advice: j.advice,
        }
    }
}

#[derive(Serialize)]
pub(super) struct AnomalyLine<'a> {
    kind: &'static str,
    id: u64,
    job: &'a str,
    rank: Option<u32>,
    step: u64,
    time: Num,
    rule: &'a str,
    severity: &'static str,
    layer: Option<&'a str>,
    value: Num,
    threshold: Num,
    message: &'a str,
}

impl<'a> AnomalyLine<'a> {
    pub(super) fn new(a: &'a proto::Anomaly) -> Self {
        Self {
            kind: "anomaly",
            id: a.id,
            job: &a.job,
            rank: a.rank,
            step: a.step,
            time: Num(a.time),
            rule: &a.rule,
            severity: severity_word(a.severity),
            layer: (!a.layer.is_empty()).then_some(a.layer.as_str()),
            value: Num(a.value),
            threshold: Num(a.threshold),
            message: &a.message,
        }
    }
}

#[derive(Serialize)]
struct AdviceLine<'a> {
    kind: &'static str,
    id: u64,
    job: &'a str,
    target_rank: Option<u32>,
    decided_at_step: u64,
    apply_from_step: u64,
    time: Num,
    severity: &'static str,
    #[serde(flatten)]
    action: Option<ActionFields>,
    rules: &'a [String],
    reason: &'a str,
    evidence: Evidence<'a>,
    applied: u32,
    declined: u32,
}

pub(super) fn advice_line(out: &mut impl Write, stored: &proto::StoredAdvice) -> io::Result<()> {
    let empty = proto::Advice::default();
    let a = stored.advice.as_ref().unwrap_or(&empty);
    let evidence = evidence_pairs(&a.evidence);
    json_line(
        out,
        &AdviceLine {
            kind: "advice",
            id: a.id,
            job: &a.job,
            target_rank: a.target_rank,
            decided_at_step: a.decided_at_step,
            apply_from_step: a.apply_from_step,
            time: Num(stored.time),
            severity: severity_word(a.severity),
            action: a.action.as_ref().map(|x| wire::action_from_proto(x).into()),
            rules: &a.rules,
            reason: &a.reason,
            evidence: Evidence(&evidence),
            applied: stored.applied,
            declined: stored.declined,
        },
    )
}
