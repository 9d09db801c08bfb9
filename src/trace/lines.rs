//! Reading text input line by line, and the first lines that tell its format.

use std::io::{self, BufRead, Cursor, Read};

use super::{DETECT_LIMIT, Format, MAX_LINE, llmc, megatron, tensorboard};

pub(super) enum Line {
    Ok,
    TooLong,
    Eof,
}

/// Reads one line into `buf` without its `\n` or `\r\n`. A line over
/// [`MAX_LINE`] is consumed to its end but not kept.
pub(super) fn read_line(input: &mut dyn BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = input.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Line::Ok);
    }
    if buf.len() <= MAX_LINE {
        return Ok(Line::Ok); // the last line, without a newline
    }
    // Discard the rest of the over-long line, chunk by chunk.
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                break;
            }
            None => {
                let len = chunk.len();
                input.consume(len);
            }
        }
    }
    buf.clear();
    Ok(Line::TooLong)
}

/// Reads lines up to and including the first one with content (neither blank
/// nor a `#` comment) that `enough` accepts, given trimmed and without a
/// byte-order mark, or up to [`DETECT_LIMIT`] bytes or the end; returns them
/// and the rest of the input. Reading no further keeps a piped stream flowing.
pub(super) fn read_head(
    mut input: Box<dyn BufRead>,
    mut enough: impl FnMut(&[u8]) -> bool,
) -> io::Result<(Vec<u8>, Box<dyn BufRead>)> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let room = (DETECT_LIMIT - start) as u64;
        let n = (&mut input).take(room).read_until(b'\n', &mut head)?;
        let line = head[start..].trim_ascii();
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        let content = !line.is_empty() && !line.starts_with(b"#");
        if n == 0 || head.len() >= DETECT_LIMIT || (content && enough(line)) {
            return Ok((head, input));
        }
    }
}

/// Reads what [`Format::detect`] needs: a first TFRecord header (12 bytes),
/// else up to the first line with content, or when that line settles nothing,
/// on to the first llm.c standard-output step line (within [`DETECT_LIMIT`]).
pub(super) fn read_detection_head(mut input: Box<dyn BufRead>) -> io::Result<(Vec<u8>, Box<dyn BufRead>)> {
    let mut start = Vec::with_capacity(12);
    (&mut input).take(12).read_to_end(&mut start)?;
    if tensorboard::looks_like(&start) {
        return Ok((start, input));
    }
    let input = Box::new(Cursor::new(start).chain(input));
    let mut first = true;
    read_head(input, |line| {
        let settled = (first && Format::by_first_line(line).is_some())
            || llmc::looks_like_stdout(line)
            || megatron::looks_like(line);
        first = false;
        settled
    })
}
