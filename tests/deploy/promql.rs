//! The metric names a PromQL expression reads. A small lexer, enough for the
//! expressions in deploy/: identifiers that are not functions, operators,
//! keywords, label names (inside `{...}` or the list after `by`, `on`, ...)
//! or Grafana variables (`$job`, `${datasource}`). Strings, durations and
//! numbers are skipped.

/// Aggregation operators, set operators and modifiers: never metric names.
const KEYWORDS: [&str; 19] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

pub fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut braces = 0usize;
    let mut brackets = 0usize;
    // Set after a keyword that takes a label list: the next `(...)` is skipped.
    let mut label_list = false;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '[' => {
                brackets += 1;
                i += 1;
            }
            ']' => {
                brackets = brackets.saturating_sub(1);
                i += 1;
            }
            '(' if label_list => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                label_list = false;
                i += 1;
            }
            '$' => {
                // A Grafana variable: `$name` or `${name}` / `${name:format}`.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && ident_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // A number or a duration (`5m`, `1.5`, `1e3`).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let is_call = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    label_list = true;
                } else if braces == 0 && brackets == 0 && !is_call && !KEYWORDS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_lexer_finds_metric_names_and_nothing_else() {
    assert_eq!(
        metric_names(
            r#"sum by (job, rule) (increase(gradguard_anomalies_total{severity="critical", rule!~"a|b"}[5m])) > 0"#
        ),
        ["gradguard_anomalies_total"]
    );
    assert_eq!(
        metric_names("time() - max by (job) (a_timestamp_seconds) > 300\nand on (job)\nsum by (job) (b_streams) > 0"),
        ["a_timestamp_seconds", "b_streams"]
    );
    assert_eq!(metric_names(r#"absent(up{job="gradguard"})"#), ["up"]);
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(x_bucket{job=~"$job"}[$__rate_interval]))) * on (instance) group_left (version) y offset 1h"#
        ),
        ["x_bucket", "y"]
    );
    assert_eq!(
        metric_names(r#"sum without (reason) (rate(r_total[5m])) / ignoring (reason) s_total unless z"#),
        ["r_total", "s_total", "z"]
    );
    assert_eq!(
        metric_names(r#"ALERTS{alertstate="firing", job=~"${job:regex}"} or vector(0) and 1e-3 < bool q"#),
        ["ALERTS", "q"]
    );
    assert!(metric_names(r#"topk(5, sum(rate(m{a='it\'s'}[1m])))"#) == ["m"]);
}
