//! Conversions between the `gradguard.v1` wire types and the domain types, at
//! the edge, so prost types never reach the engine or the store.
//!
//! Incoming summaries are validated here: every packed per-layer array must be
//! empty or exactly as long as the job's layer names, and errors name the field
//! and the value.

use crate::model::{Action, Advice, Finding, LayerStats, RuleId, Severity, Summary};
use crate::proto;
use crate::store::{Filter, JobRow, StoredAdvice, StoredAnomaly};

/// A wire message that cannot become a domain value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("field {field}: {got} values, but the Hello declared {expected} layers")]
    LayerArray {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("field layer_l2 is empty but {field} has {got} values")]
    LayerArrayWithoutL2 { field: &'static str, got: usize },
}

/// Builds a rank's domain summary from a wire summary, checking the per-layer
/// arrays against the number of layers the rank declared.
pub fn summary_from_proto(p: &proto::Summary, rank: u32, layers: usize) -> Result<Summary, WireError> {
    let mut s = Summary::default();
    summary_into(p, rank, layers, &mut s)?;
    Ok(s)
}

/// [`summary_from_proto`] into an existing summary, reusing its layer buffer
/// (the service converts every message of a stream into one).
pub fn summary_into(p: &proto::Summary, rank: u32, layers: usize, out: &mut Summary) -> Result<(), WireError> {
    let check = |field: &'static str, got: usize| -> Result<(), WireError> {
        if got != 0 && got != layers {
            return Err(WireError::LayerArray {
                field,
                got,
                expected: layers,
            });
        }
        if got != 0 && p.layer_l2.is_empty() {
            return Err(WireError::LayerArrayWithoutL2 { field, got });
        }
        Ok(())
    };
    check("layer_l2", p.layer_l2.len())?;
    check("layer_max_abs", p.layer_max_abs.len())?;
    check("layer_nonfinite", p.layer_nonfinite.len())?;
    check("layer_param_norm", p.layer_param_norm.len())?;
    check("layer_update_norm", p.layer_update_norm.len())?;

    // Column by column (each array is empty or as long as layer_l2, checked
    // above): straight loops without a bounds check per value.
    out.layers.clear();
    out.layers.extend(p.layer_l2.iter().map(|&l2| LayerStats {
        l2,
        ..LayerStats::default()
    }));
    for (l, &v) in out.layers.iter_mut().zip(&p.layer_max_abs) {
        l.max_abs = v;
    }
    for (l, &v) in out.layers.iter_mut().zip(&p.layer_nonfinite) {
        l.nonfinite = v;
    }
    for (l, &v) in out.layers.iter_mut().zip(&p.layer_param_norm) {
        l.param_norm = Some(v);
    }
    for (l, &v) in out.layers.iter_mut().zip(&p.layer_update_norm) {
        l.update_norm = Some(v);
    }
    out.worker = rank;
    out.step = p.step;
    out.time = (p.time != 0.0).then_some(p.time);
    out.loss = p.loss;
    out.lr = p.lr;
    out.loss_scale = p.loss_scale;
    out.grad_norm = p.grad_norm;
    Ok(())
}

/// The encoded `Summary` inside an encoded `WorkerMessage` that is exactly one
/// `summary` field (what workers send every step), so a reader can decode it
/// into a reused message (`clear`, then `merge`: the vectors keep their
/// capacity); `None` for anything else, which takes the full decode.
pub fn lone_summary(message: &[u8]) -> Option<&[u8]> {
    // Field 2, length-delimited: (2 << 3) | 2.
    const SUMMARY_KEY: u8 = 0x12;
    let mut rest = message.strip_prefix(&[SUMMARY_KEY])?;
    let len = prost::decode_length_delimiter(&mut rest).ok()?;
    (len == rest.len()).then_some(rest)
}

/// The places of the encoded summaries inside an encoded `WorkerMessage` that
/// is exactly one `batch` field holding only summaries, written to `out`, so
/// each can be decoded into a reused message as [`lone_summary`] allows; false
/// for anything else (or a batch with any other content), which takes the full
/// decode.
pub fn batch_summaries(message: &[u8], out: &mut Vec<std::ops::Range<usize>>) -> bool {
    // Field 4 of WorkerMessage and field 1 of SummaryBatch, length-delimited.
    const BATCH_KEY: u8 = 0x22;
    const SUMMARY_KEY: u8 = 0x0a;
    out.clear();
    let Some(mut rest) = message.strip_prefix(&[BATCH_KEY]) else {
        return false;
    };
    match prost::decode_length_delimiter(&mut rest) {
        Ok(len) if len == rest.len() => {}
        _ => return false,
    }
    while let Some(mut after_key) = rest.strip_prefix(&[SUMMARY_KEY]) {
        let Ok(len) = prost::decode_length_delimiter(&mut after_key) else {
            return false;
        };
        if len > after_key.len() {
            return false;
        }
        let at = message.len() - after_key.len();
        out.push(at..at + len);
        rest = &after_key[len..];
    }
    rest.is_empty()
}

/// The wire form of a domain summary (the worker side: simulator, clients).
pub fn summary_to_proto(s: &Summary) -> proto::Summary {
    let has = |f: fn(&LayerStats) -> Option<f32>| s.layers.iter().any(|l| f(l).is_some());
    let column = |f: fn(&LayerStats) -> Option<f32>| -> Vec<f32> {
        if has(f) {
            s.layers.iter().map(|l| f(l).unwrap_or(0.0)).collect()
        } else {
            Vec::new()
        }
    };
    proto::Summary {
        step: s.step,
        time: s.time.unwrap_or(0.0),
        loss: s.loss,
        lr: s.lr,
        loss_scale: s.loss_scale,
        grad_norm: s.grad_norm,
        layer_l2: s.layers.iter().map(|l| l.l2).collect(),
        layer_max_abs: s.layers.iter().map(|l| l.max_abs).collect(),
        layer_nonfinite: s.layers.iter().map(|l| l.nonfinite).collect(),
        layer_param_norm: column(|l| l.param_norm),
        layer_update_norm: column(|l| l.update_norm),
    }
}

pub fn severity_to_proto(s: Severity) -> proto::Severity {
    match s {
        Severity::Info => proto::Severity::Info,
        Severity::Warning => proto::Severity::Warning,
        Severity::Critical => proto::Severity::Critical,
    }
}

pub fn action_to_proto(a: &Action) -> proto::advice::Action {
    use proto::advice::Action as P;
    match *a {
        Action::ClipGradients { max_norm } => P::ClipGradients(proto::ClipGradients { max_norm }),
        Action::ScaleLr { factor } => P::ScaleLr(proto::ScaleLr { factor }),
        Action::SkipStep => P::SkipStep(proto::SkipStep {}),
        Action::ScaleLossScale { factor } => P::ScaleLossScale(proto::ScaleLossScale { factor }),
        Action::Rollback { to_step } => P::Rollback(proto::Rollback { to_step }),
        Action::InspectWorker { rank } => P::InspectWorker(proto::InspectWorker { rank }),
        Action::Halt => P::Halt(proto::Halt {}),
    }
}

/// The domain action of a wire advice action.
pub fn action_from_proto(a: &proto::advice::Action) -> Action {
    use proto::advice::Action as P;
    match a {
        P::ClipGradients(c) => Action::ClipGradients { max_norm: c.max_norm },
        P::ScaleLr(c) => Action::ScaleLr { factor: c.factor },
        P::SkipStep(_) => Action::SkipStep,
        P::ScaleLossScale(c) => Action::ScaleLossScale { factor: c.factor },
        P::Rollback(c) => Action::Rollback { to_step: c.to_step },
        P::InspectWorker(c) => Action::InspectWorker { rank: c.rank },
        P::Halt(_) => Action::Halt,
    }
}

pub fn advice_to_proto(a: &Advice) -> proto::Advice {
    proto::Advice {
        id: a.id,
        job: a.job.to_string(),
        target_rank: a.target,
        decided_at_step: a.step,
        apply_from_step: a.apply_from,
        action: Some(action_to_proto(&a.action)),
        severity: severity_to_proto(a.severity).into(),
        rules: a.rules.iter().map(|r| r.as_str().to_owned()).collect(),
        reason: a.reason.clone(),
        evidence: a
            .evidence
            .iter()
            .map(|(name, value)| proto::Evidence {
                name: name.clone(),
                value: *value,
            })
            .collect(),
    }
}

pub fn finding_to_proto(f: &Finding) -> proto::Anomaly {
    proto::Anomaly {
        id: 0,
        job: f.job.to_string(),
        rank: f.worker,
        step: f.step,
        time: f.time.unwrap_or(0.0),
        rule: f.rule.as_str().to_owned(),
        severity: severity_to_proto(f.severity).into(),
        layer: f.layer.as_deref().unwrap_or_default().to_owned(),
        value: f.value,
        threshold: f.threshold,
        message: f.message.clone(),
    }
}

pub fn stored_anomaly_to_proto(a: &StoredAnomaly) -> proto::Anomaly {
    proto::Anomaly {
        id: a.id,
        ..finding_to_proto(&a.finding)
    }
}

pub fn stored_advice_to_proto(a: &StoredAdvice) -> proto::StoredAdvice {
    proto::StoredAdvice {
        advice: Some(advice_to_proto(&a.advice)),
        time: a.time,
        applied: a.applied,
        declined: a.declined,
    }
}

pub fn health_to_proto(h: Option<Severity>) -> proto::Health {
    match h {
        None => proto::Health::Ok,
        Some(Severity::Info) => proto::Health::Info,
        Some(Severity::Warning) => proto::Health::Warning,
        Some(Severity::Critical) => proto::Health::Critical,
    }
}

pub fn job_to_proto(j: &JobRow) -> proto::Job {
    proto::Job {
        job: j.job.clone(),
        first_seen: j.first_seen,
        last_seen: j.last_seen,
        ranks: j.ranks,
        world_size: j.world_size,
        layers: j.layers,
        last_step: j.last_step,
        health: health_to_proto(j.health).into(),
        ..Default::default()
    }
}

/// The domain severity of a wire severity; `None` for unspecified (any).
pub fn severity_from_proto(code: i32, field: &'static str) -> Result<Option<Severity>, String> {
    match proto::Severity::try_from(code) {
        Ok(proto::Severity::Unspecified) => Ok(None),
        Ok(proto::Severity::Info) => Ok(Some(Severity::Info)),
        Ok(proto::Severity::Warning) => Ok(Some(Severity::Warning)),
        Ok(proto::Severity::Critical) => Ok(Some(Severity::Critical)),
        Err(_) => Err(format!("field {field}: {code} is not a severity")),
    }
}

/// A stored anomaly from its wire form (cluster mode reads them off Kafka);
/// the error names the field that is not valid.
pub fn anomaly_from_proto(a: &proto::Anomaly) -> Result<StoredAnomaly, String> {
    let rule: RuleId = a
        .rule
        .parse()
        .map_err(|_| format!("field rule: {:?} is not a rule", a.rule))?;
    let severity = severity_from_proto(a.severity, "severity")?.ok_or("field severity: unspecified")?;
    Ok(StoredAnomaly {
        id: a.id,
        finding: Finding {
            job: a.job.as_str().into(),
            worker: a.rank,
            step: a.step,
            time: (a.time != 0.0).then_some(a.time),
            rule,
            severity,
            layer: (!a.layer.is_empty()).then(|| a.layer.as_str().into()),
            value: a.value,
            threshold: a.threshold,
            message: a.message.clone(),
        },
    })
}

/// An advice from its wire form; the error names the field that is not valid.
pub fn advice_from_proto(a: &proto::Advice) -> Result<Advice, String> {
    let action = a.action.as_ref().ok_or("field action: missing")?;
    let rules = a
        .rules
        .iter()
        .map(|r| r.parse().map_err(|_| format!("field rules: {r:?} is not a rule")))
        .collect::<Result<Vec<RuleId>, String>>()?;
    Ok(Advice {
        id: a.id,
        job: a.job.as_str().into(),
        target: a.target_rank,
        step: a.decided_at_step,
        apply_from: a.apply_from_step,
        action: action_from_proto(action),
        severity: severity_from_proto(a.severity, "severity")?.ok_or("field severity: unspecified")?,
        rules,
        reason: a.reason.clone(),
        evidence: a.evidence.iter().map(|e| (e.name.clone(), e.value)).collect(),
    })
}

/// Page sizes: the default, and the most one page holds (larger asks get this).
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A `ListJobs` request's page: the job id to continue after (`None`: from
/// the first job) and the page size.
pub fn jobs_page_from_proto(page_size: u32, page_token: &str) -> Result<(Option<String>, u32), String> {
    let after = if page_token.is_empty() {
        None
    } else {
        Some(job_of_token(page_token).ok_or_else(|| {
            format!(
                "field page_token: {} is not a token this service issued",
                excerpt(page_token)
            )
        })?)
    };
    let size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    Ok((after, size))
}

/// The `ListJobs` page token that continues after `job`: `j` and the id's
/// bytes in hex, so that a token that is not one is told apart.
pub fn job_page_token(job: &str) -> String {
    let mut token = String::with_capacity(1 + 2 * job.len());
    token.push('j');
    for b in job.bytes() {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

fn job_of_token(token: &str) -> Option<String> {
    let hex = token.strip_prefix('j')?.as_bytes();
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let bytes = hex
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// A client's string as an error message quotes it: whole when short, else
/// its first 64 characters and its length (an error never echoes a megabyte).
pub fn excerpt(s: &str) -> String {
    const SHOWN: usize = 64;
    match s.char_indices().nth(SHOWN) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &s[..end], s.len()),
    }
}

/// The thresholds a worker decides urgency with, from a job's rules.
pub fn urgency_to_proto(rules: &crate::config::Rules) -> proto::UrgencyRules {
    let (g, l) = (&rules.grad_spike, &rules.loss_spike);
    proto::UrgencyRules {
        grad_spike_enabled: g.enabled,
        grad_alpha: g.alpha,
        grad_warmup: g.warmup,
        grad_z: g.z,
        grad_severe_z: g.severe_z,
        grad_min_clip_ratio: g.min_clip_ratio,
        loss_spike_enabled: l.enabled,
        loss_min_rise: l.min_rise,
        loss_warmup: l.warmup,
    }
}

/// A store filter from a wire filter and page request; the error names the field.
pub fn filter_from_proto(f: Option<&proto::Filter>, page_size: u32, page_token: &str) -> Result<Filter, String> {
    let default = proto::Filter::default();
    let f = f.unwrap_or(&default);
    let rule = if f.rule.is_empty() {
        None
    } else {
        Some(
            f.rule
                .parse::<RuleId>()
                .map_err(|_| format!("filter.rule: {} is not a rule id", excerpt(&f.rule)))?,
        )
    };
    let before = if page_token.is_empty() {
        None
    } else {
        Some(page_token.parse::<u64>().ok().filter(|&t| t > 0).ok_or_else(|| {
            format!(
                "field page_token: {} is not a token this service issued",
                excerpt(page_token)
            )
        })?)
    };
    let check_range = |name: &str, from: Option<f64>, to: Option<f64>| match (from, to) {
        (Some(a), Some(b)) if a > b => Err(format!("filter.{name}_from: {a} is after {name}_to {b}")),
        _ => Ok(()),
    };
    check_range("step", f.step_from.map(|s| s as f64), f.step_to.map(|s| s as f64))?;
    check_range("time", f.time_from, f.time_to)?;
    for (name, t) in [("time_from", f.time_from), ("time_to", f.time_to)] {
        if t.is_some_and(|t| !t.is_finite()) {
            return Err(format!("filter.{name}: {} is not a time", t.unwrap_or_default()));
        }
    }
    Ok(Filter {
        jobs: None,
        job: (!f.job.is_empty()).then(|| f.job.clone()),
        rule,
        min_severity: severity_from_proto(f.min_severity, "filter.min_severity")?,
        worker: f.worker,
        step_from: f.step_from,
        step_to: f.step_to,
        time_from: f.time_from,
        time_to: f.time_to,
        before,
        limit: match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_quote_at_most_an_excerpt_of_the_input() {
        use super::*;
        assert_eq!(excerpt("abc"), "\"abc\"");
        let token = "9".repeat(1 << 20);
        let err = filter_from_proto(None, 10, &format!("x{token}")).unwrap_err();
        assert!(err.len() < 200, "{} bytes", err.len());
        assert!(err.contains("(1048577 bytes)"), "{err}");
        let long = "é".repeat(100);
        assert_eq!(excerpt(&long), format!("{:?}… (200 bytes)", "é".repeat(64)));
    }

    #[test]
    fn a_job_page_token_round_trips_and_a_bad_one_is_quoted_short() {
        use super::*;
        for job in ["a", "job-00042", "ünï code/with spaces", &"x".repeat(256)] {
            let token = job_page_token(job);
            assert_eq!(
                jobs_page_from_proto(0, &token),
                Ok((Some(job.to_owned()), DEFAULT_PAGE_SIZE))
            );
        }
        assert_eq!(jobs_page_from_proto(0, ""), Ok((None, DEFAULT_PAGE_SIZE)));
        assert_eq!(jobs_page_from_proto(5000, "").unwrap().1, MAX_PAGE_SIZE);
        // Not hex, odd length, not UTF-8, empty, a number (another listing's token).
        for bad in ["jzz", "j616", "jff", "j", "42", "job-1"] {
            let err = jobs_page_from_proto(10, bad).unwrap_err();
            assert!(err.starts_with("field page_token:"), "{err}");
        }
        let err = jobs_page_from_proto(10, &"j".repeat(1 << 20)).unwrap_err();
        assert!(err.len() < 200 && err.contains("(1048576 bytes)"), "{err}");
    }

    #[test]
    fn anomalies_and_advice_round_trip_through_the_wire() {
        use super::*;
        let finding = Finding {
            job: "j".into(),
            worker: Some(3),
            step: 42,
            time: Some(1_700_000_000.5),
            rule: RuleId::LossDivergence,
            severity: Severity::Warning,
            layer: Some("h.0.mlp".into()),
            value: 2.5,
            threshold: 1.5,
            message: "climbing".into(),
        };
        let mut wire_anomaly = finding_to_proto(&finding);
        wire_anomaly.id = 7;
        let back = anomaly_from_proto(&wire_anomaly).unwrap();
        assert_eq!((back.id, &back.finding), (7, &finding));
        wire_anomaly.rule = "nope".into();
        assert!(anomaly_from_proto(&wire_anomaly).unwrap_err().contains("field rule"));

        let advice = Advice {
            id: 9,
            job: "j".into(),
            target: None,
            step: 42,
            apply_from: 43,
            action: Action::Rollback { to_step: 30 },
            severity: Severity::Critical,
            rules: vec![RuleId::GradGrowth, RuleId::GradSpike],
            reason: "escalating".into(),
            evidence: vec![("grad_growth.value".into(), 9.5)],
        };
        assert_eq!(advice_from_proto(&advice_to_proto(&advice)).unwrap(), advice);
    }

    use super::*;
    use crate::model::RuleId;
    use std::sync::Arc;

    fn layered(n: usize) -> Summary {
        Summary {
            worker: 3,
            step: 7,
            time: Some(1.5),
            loss: Some(2.0),
            grad_norm: Some(f64::NAN),
            layers: (0..n)
                .map(|i| LayerStats {
                    l2: i as f32,
                    max_abs: 1.0,
                    nonfinite: u32::from(i == 1),
                    param_norm: Some(2.0),
                    update_norm: None,
                })
                .collect(),
            ..Summary::default()
        }
    }

    #[test]
    fn a_lone_summary_is_found_and_anything_else_is_left_to_the_full_decode() {
        use prost::Message as _;
        let summary = proto::Summary {
            step: 7,
            loss: Some(1.5),
            layer_l2: vec![0.5; 300],
            layer_nonfinite: vec![0; 300],
            ..Default::default()
        };
        let record = proto::WorkerMessage {
            body: Some(proto::worker_message::Body::Summary(summary.clone())),
        }
        .encode_to_vec();
        let mut reused = proto::Summary {
            step: 1,
            layer_l2: vec![9.0; 5],
            ..Default::default()
        };
        reused.clear();
        reused.merge(lone_summary(&record).expect("a lone summary")).unwrap();
        assert_eq!(reused, summary);

        let hello = proto::WorkerMessage {
            body: Some(proto::worker_message::Body::Hello(proto::Hello::default())),
        }
        .encode_to_vec();
        assert_eq!(lone_summary(&hello), None);
        assert_eq!(lone_summary(&[]), None);
        // A second field after the summary (the last oneof field wins): not lone.
        let mut two = record.clone();
        two.extend_from_slice(&hello);
        assert_eq!(lone_summary(&two), None);
        assert_eq!(lone_summary(&record[..record.len() - 1]), None);
    }

    #[test]
    fn a_batch_of_summaries_is_found_and_anything_else_is_left_to_the_full_decode() {
        use prost::Message as _;
        let summaries: Vec<proto::Summary> = (1..=3)
            .map(|step| proto::Summary {
                step,
                layer_l2: vec![0.5; 300], // a length that needs two varint bytes
                ..Default::default()
            })
            .collect();
        let batch = |summaries: Vec<proto::Summary>| {
            proto::WorkerMessage {
                body: Some(proto::worker_message::Body::Batch(proto::SummaryBatch { summaries })),
            }
            .encode_to_vec()
        };
        let mut places = Vec::new();
        let encoded = batch(summaries.clone());
        assert!(batch_summaries(&encoded, &mut places));
        let decoded: Vec<proto::Summary> = places
            .iter()
            .map(|r| proto::Summary::decode(&encoded[r.clone()]).unwrap())
            .collect();
        assert_eq!(decoded, summaries);

        assert!(batch_summaries(&batch(Vec::new()), &mut places) && places.is_empty());
        let lone = proto::WorkerMessage {
            body: Some(proto::worker_message::Body::Summary(summaries[0].clone())),
        }
        .encode_to_vec();
        assert!(!batch_summaries(&lone, &mut places));
        assert!(
            !batch_summaries(&encoded[..encoded.len() - 1], &mut places),
            "cut short"
        );
        let mut trailing = encoded.clone();
        trailing.extend_from_slice(&[0x08, 0x01]); // another field after the batch
        assert!(!batch_summaries(&trailing, &mut places));
    }

    #[test]
    fn summary_round_trips() {
        let s = layered(3);
        let back = summary_from_proto(&summary_to_proto(&s), 3, 3).unwrap();
        assert_eq!(back.layers, s.layers);
        assert_eq!((back.step, back.time, back.loss), (7, Some(1.5), Some(2.0)));
        assert!(back.grad_norm.unwrap().is_nan());
    }

    #[test]
    fn layer_arrays_must_match_the_hello() {
        let mut p = summary_to_proto(&layered(3));
        assert_eq!(
            summary_from_proto(&p, 0, 4).unwrap_err().to_string(),
            "field layer_l2: 3 values, but the Hello declared 4 layers"
        );
        p.layer_max_abs.pop();
        assert_eq!(
            summary_from_proto(&p, 0, 3).unwrap_err(),
            WireError::LayerArray {
                field: "layer_max_abs",
                got: 2,
                expected: 3
            }
        );
        let global_only = proto::Summary {
            step: 1,
            grad_norm: Some(1.0),
            ..Default::default()
        };
        assert!(summary_from_proto(&global_only, 0, 3).unwrap().layers.is_empty());
    }

    #[test]
    fn advice_and_anomaly_carry_everything() {
        let job: Arc<str> = Arc::from("j");
        let a = Advice {
            id: 9,
            job: job.clone(),
            target: None,
            step: 10,
            apply_from: 11,
            action: Action::Rollback { to_step: 3 },
            severity: Severity::Critical,
            rules: vec![RuleId::LossSpike],
            reason: "r".into(),
            evidence: vec![("loss_spike.value".into(), 7.0)],
        };
        let p = advice_to_proto(&a);
        assert_eq!(action_from_proto(p.action.as_ref().unwrap()), a.action);
        assert_eq!(p.severity(), proto::Severity::Critical);
        assert_eq!(p.rules, ["loss_spike"]);
        let f = Finding {
            job,
            worker: Some(2),
            step: 4,
            time: None,
            rule: RuleId::NormFloor,
            severity: Severity::Warning,
            layer: Some(Arc::from("embed")),
            value: 0.0,
            threshold: 1e-7,
            message: "m".into(),
        };
        let p = finding_to_proto(&f);
        assert_eq!(
            (p.rank, p.rule.as_str(), p.layer.as_str()),
            (Some(2), "norm_floor", "embed")
        );
    }
}
