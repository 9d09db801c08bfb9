//! Helpers of the JSON formats (jsonl, hf): Python's non-finite tokens, and
//! values in error messages.

use std::borrow::Cow;

/// Python's `json.dumps` writes non-finite floats as the bare tokens `NaN`,
/// `Infinity` and `-Infinity`, which are not JSON. Quotes them (outside
/// strings) so a JSON parser accepts the text; [`number`] reads them back.
pub(crate) fn quote_nonfinite(text: &str) -> Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// A JSON value as a float: a number, or one of the strings `"NaN"`,
/// `"Infinity"`, `"-Infinity"` (also `"nan"`, `"inf"`, `"-inf"`).
pub(crate) fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" | "nan" => Some(f64::NAN),
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// A JSON value as it appears in an error message, shortened.
pub(crate) fn show(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let cut = (0..=37).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}
