//! The table: per input and detector, hit, delay, false alarms, severe false alarms.

use std::fmt::{self, Write as _};

use super::inputs::*;
use super::labels::*;
use super::*;

/// One printed line of the table: the input, its onsets, then per detector
/// hit, delay, FA and severe FA; or a note instead of the detector columns.
struct Line {
    name: String,
    onsets: String,
    cells: Result<Vec<[String; 4]>, String>,
}

fn trace_cells(label: &Label, score: &Score) -> [String; 4] {
    let n = label.onsets().len();
    let hit = match n {
        0 => "-".to_owned(),
        1 if score.caught() == 1 => "hit".to_owned(),
        1 => "miss".to_owned(),
        _ => format!("{}/{n}", score.caught()),
    };
    let delay = if score.caught() == 0 {
        "-".to_owned()
    } else {
        score.delay().to_string()
    };
    [
        hit,
        delay,
        score.false_alarms.to_string(),
        score.severe_false_alarms.to_string(),
    ]
}

fn total_cells(t: &Totals) -> [String; 4] {
    let hit = if t.onsets == 0 {
        "-".to_owned()
    } else {
        format!("{}/{}", t.caught, t.onsets)
    };
    let delay = if t.caught == 0 {
        "-".to_owned()
    } else {
        t.delay.to_string()
    };
    [
        hit,
        delay,
        t.false_alarms.to_string(),
        t.severe_false_alarms.to_string(),
    ]
}

const SUBHEADS: [&str; 4] = ["hit", "delay", "FA", "sFA"];

impl Report {
    fn lines(&self) -> (Vec<Line>, Vec<Line>) {
        let mut body = Vec::new();
        let mut groups_done: Vec<&str> = Vec::new();
        for row in &self.rows {
            match &row.group {
                None => body.push(Line {
                    name: row.name.clone(),
                    onsets: row.label.short(),
                    cells: row
                        .outcome
                        .as_ref()
                        .map(|scores| scores.iter().map(|s| trace_cells(&row.label, s)).collect())
                        .map_err(|e| format!("unreadable: {e}")),
                }),
                Some(group) if groups_done.contains(&group.as_str()) => {}
                Some(group) => {
                    groups_done.push(group);
                    let members: Vec<&Row> = self.rows.iter().filter(|r| r.group.as_ref() == Some(group)).collect();
                    let totals = self.totals(|r| r.group.as_ref() == Some(group));
                    let mut onsets: Vec<String> = members.iter().map(|r| r.label.short()).collect();
                    onsets.dedup();
                    let unreadable = totals[0].unreadable;
                    body.push(Line {
                        name: format!("{group} ({} runs)", members.len()),
                        onsets: if onsets.len() == 1 {
                            onsets.remove(0)
                        } else {
                            "various".to_owned()
                        },
                        cells: if unreadable > 0 {
                            Err(format!("{unreadable} runs unreadable"))
                        } else {
                            Ok(totals.iter().map(total_cells).collect())
                        },
                    });
                }
            }
        }
        let mut totals = Vec::new();
        let mut total_line = |name: String, which: &dyn Fn(&Row) -> bool| {
            let t = self.totals(which);
            totals.push(Line {
                name,
                onsets: String::new(),
                cells: Ok(t.iter().map(total_cells).collect()),
            });
        };
        let traces = self.totals(|r| r.group.is_none())[0];
        if traces.inputs > 0 {
            total_line(
                format!(
                    "total: real traces ({} read, {} unreadable)",
                    traces.inputs - traces.unreadable,
                    traces.unreadable
                ),
                &|r: &Row| r.group.is_none(),
            );
        }
        let runs = self.totals(|r| r.group.is_some())[0];
        if runs.inputs > 0 {
            total_line(
                format!("total: scenario runs ({})", runs.inputs - runs.unreadable),
                &|r: &Row| r.group.is_some(),
            );
        }
        if traces.inputs > 0 && runs.inputs > 0 {
            total_line("total: all".to_owned(), &|_: &Row| true);
        }
        (body, totals)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "detectors:")?;
        let name_width = Detector::ALL.iter().map(|d| d.name().len()).max().unwrap_or(0);
        for d in Detector::ALL {
            writeln!(f, "  {:<name_width$}  {}", d.name(), d.definition())?;
        }
        writeln!(f)?;

        let (body, totals) = self.lines();
        let all: Vec<&Line> = body.iter().chain(&totals).collect();
        let name_w = all.iter().map(|l| l.name.len()).chain([5]).max().unwrap_or(0);
        let onset_w = all.iter().map(|l| l.onsets.len()).chain([6]).max().unwrap_or(0);
        // Column widths per detector: the widest cell, header or body.
        let mut widths = vec![SUBHEADS.map(str::len); Detector::ALL.len()];
        for line in &all {
            if let Ok(cells) = &line.cells {
                for (w, c) in widths.iter_mut().zip(cells) {
                    for k in 0..4 {
                        w[k] = w[k].max(c[k].len());
                    }
                }
            }
        }
        for (i, d) in Detector::ALL.iter().enumerate() {
            let group: usize = widths[i].iter().sum::<usize>() + 3;
            if d.name().len() > group {
                widths[i][0] += d.name().len() - group;
            }
        }
        let group_w = |w: &[usize; 4]| w.iter().sum::<usize>() + 3;

        let mut head = format!("{:<name_w$}  {:<onset_w$}", "input", "onsets");
        let mut sub = format!("{:<name_w$}  {:<onset_w$}", "", "");
        for (d, w) in Detector::ALL.iter().zip(&widths) {
            let _ = write!(head, " | {:<gw$}", d.name(), gw = group_w(w));
            let _ = write!(
                sub,
                " | {:>w0$} {:>w1$} {:>w2$} {:>w3$}",
                SUBHEADS[0],
                SUBHEADS[1],
                SUBHEADS[2],
                SUBHEADS[3],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            );
        }
        let rule = "-".repeat(sub.len());
        writeln!(f, "{}", head.trim_end())?;
        writeln!(f, "{sub}")?;
        writeln!(f, "{rule}")?;
        let print = |f: &mut fmt::Formatter<'_>, line: &Line| -> fmt::Result {
            let mut s = format!("{:<name_w$}  {:<onset_w$}", line.name, line.onsets);
            match &line.cells {
                Ok(cells) => {
                    for (c, w) in cells.iter().zip(&widths) {
                        let _ = write!(
                            s,
                            " | {:>w0$} {:>w1$} {:>w2$} {:>w3$}",
                            c[0],
                            c[1],
                            c[2],
                            c[3],
                            w0 = w[0],
                            w1 = w[1],
                            w2 = w[2],
                            w3 = w[3]
                        );
                    }
                }
                Err(note) => {
                    let _ = write!(s, " | {note}");
                }
            }
            writeln!(f, "{s}")
        };
        for line in &body {
            print(f, line)?;
        }
        writeln!(f, "{rule}")?;
        for line in &totals {
            print(f, line)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "onsets: STEP+MAX_DELAY per labelled fault (- healthy). hit: the first alarm at or after the onset \
             comes within MAX_DELAY steps (k/n: onsets caught); delay: steps from onset to that alarm, summed; \
             FA: alarm steps outside every onset window; sFA: severe-event steps outside them."
        )?;
        writeln!(
            f,
            "scenario rows sum seeds {:?} and their worker counts; faults at step {}, {} steps after, {} layers.",
            SCENARIO_SEEDS, SCENARIO_FAULT_AT, SCENARIO_TAIL, SCENARIO_LAYERS
        )
    }
}
