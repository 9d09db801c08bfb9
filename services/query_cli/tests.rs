use gradguard::model::RuleId;
use tonic::Status;

use super::args::parse_rule;
use super::call::{Listing, collect_pages};
use super::text::{Columns, number, time_text, write_rows};

/// A server holding ids `1..=n`, newest first, pages of at most `max`.
fn pages(n: u64, max: u32) -> impl AsyncFnMut(u32, String) -> Result<(Vec<u64>, String), Status> {
    async move |size: u32, token: String| {
        let below = if token.is_empty() {
            n + 1
        } else {
            token.parse().unwrap()
        };
        let size = u64::from(size.min(max));
        let rows: Vec<u64> = (1..below).rev().take(size as usize).collect();
        let next = match rows.last() {
            Some(&last) if last > 1 => last.to_string(),
            _ => String::new(),
        };
        Ok((rows, next))
    }
}

fn collect(limit: u64, n: u64, max: u32) -> Listing<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(collect_pages(limit, pages(n, max))).unwrap()
}

#[test]
fn pages_are_followed_until_the_limit() {
    let listing = collect(25, 100, 10);
    assert_eq!(listing.rows, (76..=100).rev().collect::<Vec<_>>());
    assert!(listing.more);
    let listing = collect(2500, 2100, 1000);
    assert_eq!(listing.rows.len(), 2100);
    assert!(!listing.more);
    let listing = collect(5, 5, 1000);
    assert_eq!((listing.rows.len(), listing.more), (5, false));
}

#[test]
fn an_empty_page_with_a_token_ends_the_listing() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let listing = runtime
        .block_on(collect_pages(10, async |_, _| Ok((Vec::<u64>::new(), "7".to_owned()))))
        .unwrap();
    assert!(listing.rows.is_empty());
}

#[test]
fn times_and_numbers_read_well() {
    assert_eq!(time_text(1_795_713_605.25), "2026-11-26 17:20:05Z");
    assert_eq!(time_text(0.0), "-");
    assert_eq!(time_text(f64::NAN), "NaN");
    assert_eq!(time_text(1e300), "1.000e300");
    assert_eq!(number(812.4), "812.4");
    assert_eq!(number(2.0), "2");
    assert_eq!(number(0.0), "0");
    assert_eq!(number(1e-9), "1.000e-9");
    assert_eq!(number(f64::NAN), "NaN");
    assert_eq!(number(f64::NEG_INFINITY), "-inf");
}

#[test]
fn rows_leave_out_a_column() {
    let mut out = Vec::new();
    let rows = [vec!["1".to_owned(), "j".to_owned(), "x".to_owned()]].into_iter();
    const COLUMNS: Columns = &[("ID", true), ("JOB", false), ("NOTE", false)];
    write_rows(&mut out, COLUMNS, rows, Some("JOB")).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "ID  NOTE\n 1  x\n");
}

#[test]
fn unknown_rules_list_the_known_ones() {
    let e = parse_rule("bogus").unwrap_err();
    assert!(e.starts_with("unknown rule \"bogus\" (known: nonfinite, "), "{e}");
    assert_eq!(parse_rule("grad_spike"), Ok(RuleId::GradSpike));
}
