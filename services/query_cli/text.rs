//! The text form: aligned tables, `job`'s page, `watch`'s lines.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use gradguard::{proto, wire};

use crate::output::{or_dash, severity_word, write_table};

pub(super) fn health_word(code: i32) -> &'static str {
    match proto::Health::try_from(code) {
        Ok(proto::Health::Ok) => "ok",
        Ok(proto::Health::Info) => "info",
        Ok(proto::Health::Warning) => "warning",
        Ok(proto::Health::Critical) => "critical",
        Ok(proto::Health::Unspecified) | Err(_) => "unspecified",
    }
}

/// A time for people: `2026-11-26 17:20:05Z` (UTC); `-` when unknown (0).
pub(super) fn time_text(t: f64) -> String {
    // What humantime can print: after the epoch, before the year 10000.
    if t > 0.0 && t < 253_402_300_800.0 {
        let at = UNIX_EPOCH + Duration::from_secs_f64(t);
        humantime::format_rfc3339_seconds(at).to_string().replacen('T', " ", 1)
    } else if t == 0.0 {
        "-".to_owned()
    } else {
        number(t)
    }
}

/// A measured value for a table: up to 4 decimals, scientific when tiny or huge.
pub(super) fn number(x: f64) -> String {
    if !x.is_finite() {
        x.to_string() // NaN, inf, -inf
    } else if x == 0.0 || (1e-3..1e6).contains(&x.abs()) {
        let fixed = format!("{x:.4}");
        fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{x:.3e}")
    }
}

/// A table's columns: the header, and whether it is a right-aligned number.
pub(super) type Columns = &'static [(&'static str, bool)];

pub(super) const JOB_COLUMNS: Columns = &[
    ("JOB", false),
    ("HEALTH", false),
    ("LIVE", false),
    ("STREAMS", true),
    ("RANKS", true),
    ("LAST STEP", true),
    ("ANOMALIES I/W/C", true),
    ("ADVICE", true),
    ("LAST SEEN", false),
];

pub(super) const ANOMALY_COLUMNS: Columns = &[
    ("ID", true),
    ("TIME", false),
    ("JOB", false),
    ("STEP", true),
    ("RANK", true),
    ("SEVERITY", false),
    ("RULE", false),
    ("LAYER", false),
    ("VALUE", true),
    ("MESSAGE", false),
];

pub(super) const ADVICE_COLUMNS: Columns = &[
    ("ID", true),
    ("TIME", false),
    ("JOB", false),
    ("STEP", true),
    ("TARGET", false),
    ("SEVERITY", false),
    ("ACTION", false),
    ("RULES", false),
    ("APPLIED", true),
    ("DECLINED", true),
    ("REASON", false),
];

pub(super) fn job_row(j: &proto::Job) -> Vec<String> {
    vec![
        j.job.clone(),
        health_word(j.health).to_owned(),
        if j.live { "yes" } else { "no" }.to_owned(),
        j.connected_streams.to_string(),
        j.ranks.to_string(),
        or_dash(j.last_step),
        format!("{}/{}/{}", j.anomalies_info, j.anomalies_warning, j.anomalies_critical),
        j.advice.to_string(),
        time_text(j.last_seen),
    ]
}

pub(super) fn anomaly_row(a: &proto::Anomaly) -> Vec<String> {
    vec![
        a.id.to_string(),
        time_text(a.time),
        a.job.clone(),
        a.step.to_string(),
        or_dash(a.rank),
        severity_word(a.severity).to_owned(),
        a.rule.clone(),
        if a.layer.is_empty() { "-" } else { &a.layer }.to_owned(),
        number(a.value),
        a.message.clone(),
    ]
}

pub(super) fn advice_row(stored: &proto::StoredAdvice) -> Vec<String> {
    let empty = proto::Advice::default();
    let a = stored.advice.as_ref().unwrap_or(&empty);
    vec![
        a.id.to_string(),
        time_text(stored.time),
        a.job.clone(),
        a.decided_at_step.to_string(),
        a.target_rank.map_or_else(|| "all".to_owned(), |r| format!("rank {r}")),
        severity_word(a.severity).to_owned(),
        or_dash(a.action.as_ref().map(wire::action_from_proto)),
        a.rules.join(","),
        stored.applied.to_string(),
        stored.declined.to_string(),
        a.reason.clone(),
    ]
}

/// Writes a header and rows aligned; `omit` leaves out the column of that header.
pub(super) fn write_rows(
    out: &mut impl Write,
    columns: Columns,
    rows: impl Iterator<Item = Vec<String>>,
    omit: Option<&str>,
) -> io::Result<()> {
    let keep: Vec<bool> = columns.iter().map(|(header, _)| Some(*header) != omit).collect();
    let pick = |row: Vec<String>| -> Vec<String> {
        row.into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(cell, _)| cell)
            .collect()
    };
    let header = pick(columns.iter().map(|(h, _)| (*h).to_owned()).collect());
    let right: Vec<bool> = columns
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((_, r), _)| *r)
        .collect();
    let rows: Vec<Vec<String>> = std::iter::once(header).chain(rows.map(pick)).collect();
    let rows: Vec<&[String]> = rows.iter().map(Vec::as_slice).collect();
    write_table(out, &rows, &right)
}

/// `job`'s text: the job's fields one per line, then its latest anomalies and advice.
pub(super) fn write_job(
    out: &mut impl Write,
    j: &proto::Job,
    anomalies: &[proto::Anomaly],
    advice: &[proto::StoredAdvice],
) -> io::Result<()> {
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let live = if j.live {
        format!("yes, {} open", plural(j.connected_streams.into(), "stream"))
    } else {
        "no".to_owned()
    };
    let ranks = match j.world_size {
        Some(w) => format!("{} of {w}", j.ranks),
        None => j.ranks.to_string(),
    };
    let fields = [
        ("job", j.job.clone()),
        ("health", health_word(j.health).to_owned()),
        ("live", live),
        ("ranks", ranks),
        ("layers", j.layers.to_string()),
        ("last step", or_dash(j.last_step)),
        ("first seen", time_text(j.first_seen)),
        ("last seen", time_text(j.last_seen)),
        (
            "anomalies",
            format!(
                "{} critical, {} warning, {} info",
                j.anomalies_critical, j.anomalies_warning, j.anomalies_info
            ),
        ),
        ("advice", j.advice.to_string()),
    ];
    let fields: Vec<[String; 2]> = fields.into_iter().map(|(k, v)| [format!("{k}:"), v]).collect();
    let fields: Vec<&[String]> = fields.iter().map(|f| &f[..]).collect();
    write_table(out, &fields, &[false, false])?;

    let total_anomalies = j.anomalies_info + j.anomalies_warning + j.anomalies_critical;
    let section = |out: &mut dyn Write, what: &str, shown: usize, total: u64| {
        writeln!(out)?;
        if (shown as u64) < total {
            writeln!(
                out,
                "Latest {what} ({shown} of {total}; `gradguard {what} --job {}` lists more):",
                j.job
            )
        } else {
            writeln!(out, "Latest {what}:")
        }
    };
    section(out, "anomalies", anomalies.len(), total_anomalies)?;
    if anomalies.is_empty() {
        writeln!(out, "None.")?;
    } else {
        write_rows(out, ANOMALY_COLUMNS, anomalies.iter().map(anomaly_row), Some("JOB"))?;
    }
    section(out, "advice", advice.len(), j.advice)?;
    if advice.is_empty() {
        writeln!(out, "None.")
    } else {
        write_rows(out, ADVICE_COLUMNS, advice.iter().map(advice_row), Some("JOB"))
    }
}

/// One anomaly of `watch`, as it arrives (no table: widths are not known ahead).
pub(super) fn watch_line(a: &proto::Anomaly) -> String {
    let mut line = format!(
        "{}  {}  {}  step {}  rank {}  {:<8}  {}",
        a.id,
        time_text(a.time),
        a.job,
        a.step,
        or_dash(a.rank),
        severity_word(a.severity),
        a.rule
    );
    if !a.layer.is_empty() {
        line.push_str(&format!("  layer {}", a.layer));
    }
    line.push_str(&format!("  value {}  {}", number(a.value), a.message));
    line
}
