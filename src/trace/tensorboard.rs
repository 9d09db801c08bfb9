//! TensorBoard event files (`events.out.tfevents.*`), as torch's
//! `SummaryWriter`, TensorFlow's `tf.summary`, Lightning's and Hugging Face's
//! TensorBoard loggers write them.
//!
//! An event file is a sequence of TFRecords: `u64 length` (little-endian),
//! `u32 masked CRC-32C of those 8 bytes`, `length` bytes of data, `u32 masked
//! CRC-32C of the data`. Both checksums are verified:
//!
//! - a data checksum that does not match skips that record (a [`Skipped`]
//!   naming the record and its byte offset); the framing is intact, so the
//!   next record is read;
//! - a length checksum that does not match, a length over [`MAX_RECORD`], or a
//!   file that ends inside a record means the framing is lost: that is
//!   reported as a [`Skipped`] naming the record and the byte offset, and the
//!   file is read no further.
//!
//! Each record's data is a `tensorflow.Event` (`event.proto`); the events that
//! carry a `Summary` give scalars: a value's `simple_value` (torch's
//! `add_scalar`), or a tensor of one element (TF2, `new_style=True`) of type
//! float, double, half, bfloat16, int32 or int64, in its typed list or its
//! `tensor_content`. Other values (histograms, images, text) are passed over.
//!
//! A value's tag stands for a field through the jsonl table and `--field`
//! (see [`super::scalars`]): `loss`, `train/loss`, `train_loss`, `Loss/train`,
//! `grad_norm`, `train/grad_norm`, `lr`, `learning_rate`, `lr-Adam`, ...;
//! tags of no field are ignored and named once per file. Writers put each tag
//! in its own event, so the scalars of one step are gathered into one record:
//! a step is complete when an event of another step comes, or the input ends.
//! A followed file ([`super::tail::Tail::quiet_after`]) also ends a step when
//! it goes quiet, if the step has every field the step before it had (or is
//! the first): so the last step of a run is sent without waiting for one
//! after it, and a step cut by a writer's flush is not. A value of a step
//! sent that way that comes later is skipped, saying so.
//! A record's `line` is the 1-based number (in the file) of the step's first
//! event record, its time that event's `wall_time`. A step none of whose tags
//! is a field yields nothing.
//!
//! The input is read one record at a time, never whole, so a growing file can
//! be followed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, BufRead};

use prost::Message;

use super::jsonl::FieldMap;
use super::scalars::{self, Gather, Slot};
use super::{Entry, Skipped, Source, SourceError};

/// The longest record accepted; a longer length is refused before anything
/// is allocated for it (real scalar events are under 100 bytes, images and
/// graphs a few MiB).
pub const MAX_RECORD: u64 = 16 << 20;

/// The mask TFRecord puts on its CRC-32C values.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Whether `head` starts with a TFRecord header whose length checksum
/// verifies: what tells an event file by its content.
pub fn looks_like(head: &[u8]) -> bool {
    head.len() >= 12 && masked_crc32c(&head[..8]) == u32::from_le_bytes([head[8], head[9], head[10], head[11]])
}

/// `tensorflow.Event`, the fields read.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`, the fields read.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
}

/// `tensorflow.TensorProto`, the fields read.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", tag = "4")]
    pub tensor_content: Vec<u8>,
    #[prost(float, repeated, tag = "5")]
    pub float_val: Vec<f32>,
    #[prost(double, repeated, tag = "6")]
    pub double_val: Vec<f64>,
    #[prost(int32, repeated, tag = "7")]
    pub int_val: Vec<i32>,
    #[prost(int64, repeated, tag = "10")]
    pub int64_val: Vec<i64>,
    #[prost(int32, repeated, tag = "13")]
    pub half_val: Vec<i32>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

// `tensorflow.DataType` values read.
const DT_FLOAT: i32 = 1;
const DT_DOUBLE: i32 = 2;
const DT_INT32: i32 = 3;
const DT_INT64: i32 = 9;
const DT_BFLOAT16: i32 = 14;
const DT_HALF: i32 = 19;

/// A value's scalar, if it is one.
pub fn scalar(value: &Value) -> Option<f64> {
    if let Some(x) = value.simple_value {
        return Some(f64::from(x));
    }
    let t = value.tensor.as_ref()?;
    if t.tensor_shape
        .as_ref()
        .is_some_and(|s| s.dim.iter().any(|d| d.size != 1))
    {
        return None; // not one element
    }
    let c = &t.tensor_content;
    match t.dtype {
        DT_FLOAT => one(&t.float_val).or(bytes(c).map(f32::from_le_bytes)).map(f64::from),
        DT_DOUBLE => one(&t.double_val).or(bytes(c).map(f64::from_le_bytes)),
        DT_INT32 => one(&t.int_val).or(bytes(c).map(i32::from_le_bytes)).map(f64::from),
        DT_INT64 => one(&t.int64_val).or(bytes(c).map(i64::from_le_bytes)).map(|x| x as f64),
        DT_HALF => one(&t.half_val)
            .map(|x| x as u16)
            .or(bytes(c).map(u16::from_le_bytes))
            .map(half),
        DT_BFLOAT16 => one(&t.half_val)
            .map(|x| x as u16)
            .or(bytes(c).map(u16::from_le_bytes))
            .map(bfloat16),
        _ => None,
    }
}

/// `tensor_content` of one element of `N` bytes.
fn bytes<const N: usize>(content: &[u8]) -> Option<[u8; N]> {
    content.try_into().ok()
}

/// The only element of a list of one.
fn one<T: Copy>(values: &[T]) -> Option<T> {
    match values {
        [x] => Some(*x),
        _ => None,
    }
}

/// An IEEE half-precision float's value.
fn half(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// A bfloat16's value: the high half of an f32.
fn bfloat16(bits: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(bits) << 16))
}

/// Reads one file's events; see the module docs.
pub struct Reader {
    input: Box<dyn BufRead>,
    job: String,
    /// Byte offset of the next record.
    offset: u64,
    /// Byte offset of the last record read.
    at: u64,
    /// Records read so far.
    records: usize,
    buf: Vec<u8>,
    /// The step being gathered.
    pending: Option<Gather>,
    /// The fields the last record had ([`Gather::shape`]).
    last_shape: u8,
    /// The step sent when the input went quiet, while its events may follow.
    sent_quiet: Option<u64>,
    /// Each tag's slot, once looked up.
    slots: HashMap<String, Slot>,
    out: VecDeque<Entry>,
    done: bool,
}

/// What reading one record gave.
enum Framed {
    /// A record whose data (in `buf`) verified.
    Data,
    /// A record whose data checksum did not match.
    BadData,
    End,
    /// The framing is lost: the record's number and why.
    Lost(usize, String),
}

impl Reader {
    pub fn new(input: Box<dyn BufRead>, job: &str) -> Self {
        Self {
            input,
            job: job.to_owned(),
            offset: 0,
            at: 0,
            records: 0,
            buf: Vec::new(),
            pending: None,
            last_shape: 0,
            sent_quiet: None,
            slots: HashMap::new(),
            out: VecDeque::new(),
            done: false,
        }
    }

    /// Reads the next record into `buf`.
    fn read_record(&mut self) -> io::Result<Framed> {
        let at = self.offset;
        self.at = at;
        let n = self.records + 1;
        let mut header = [0u8; 12];
        let got = read_full(self.input.as_mut(), &mut header, true)?;
        if got == 0 {
            return Ok(Framed::End);
        }
        if got < 12 {
            return Ok(Framed::Lost(
                n,
                format!("record {n} at byte {at} is cut short: the file ends inside its header ({got} of 12 bytes)"),
            ));
        }
        self.records = n;
        if !looks_like(&header) {
            return Ok(Framed::Lost(
                n,
                format!(
                    "record {n} at byte {at}: the length's checksum does not match (not a TFRecord, or the framing is lost); the rest of the file is not read"
                ),
            ));
        }
        let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        if len > MAX_RECORD {
            return Ok(Framed::Lost(
                n,
                format!(
                    "record {n} at byte {at}: length {len} is over {} MiB; the rest of the file is not read",
                    MAX_RECORD >> 20
                ),
            ));
        }
        let want = len as usize + 4;
        self.buf.resize(want, 0);
        let got = read_full(self.input.as_mut(), &mut self.buf, false)?;
        if got < want {
            return Ok(Framed::Lost(
                n,
                format!(
                    "record {n} at byte {at} is cut short: the file ends inside it ({got} of {want} bytes after its header)"
                ),
            ));
        }
        self.offset += 12 + want as u64;
        let crc = u32::from_le_bytes(self.buf[len as usize..].try_into().expect("4 bytes"));
        self.buf.truncate(len as usize);
        Ok(if masked_crc32c(&self.buf) == crc {
            Framed::Data
        } else {
            Framed::BadData
        })
    }

    /// Reads the event in `buf` into the step being gathered, queueing the
    /// previous step's record when this event starts another step.
    fn event(&mut self, fields: &FieldMap, ignored: &mut BTreeSet<String>) {
        let (n, at) = (self.records, self.at);
        let event = match Event::decode(self.buf.as_slice()) {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("record {n} at byte {at}: not a TensorBoard event: {e}");
                self.out.push_back(Err(Skipped { line: n, reason }));
                return;
            }
        };
        let Some(summary) = event.summary.filter(|s| !s.value.is_empty()) else {
            return; // the file version, a graph, a session log
        };
        let Ok(step) = u64::try_from(event.step) else {
            let reason = format!("record {n} at byte {at}: negative step {}", event.step);
            self.out.push_back(Err(Skipped { line: n, reason }));
            return;
        };
        if self.sent_quiet == Some(step) {
            for value in summary.value.iter().filter(|v| scalar(v).is_some()) {
                if scalars::slot(&value.tag, fields).is_some() {
                    let reason = format!(
                        "record {n} at byte {at}: tag {:?} of step {step} came after the step was sent (the file was quiet); value skipped",
                        value.tag
                    );
                    self.out.push_back(Err(Skipped { line: n, reason }));
                }
            }
            return;
        }
        self.sent_quiet = None;
        if self.pending.as_ref().is_some_and(|g| g.step != step) {
            self.flush();
        }
        let gather = self.pending.get_or_insert_with(|| {
            let mut g = Gather::new(step, n);
            g.default_time = Some(event.wall_time);
            g
        });
        for value in &summary.value {
            let Some(x) = scalar(value) else { continue };
            let slot = match self.slots.get(&value.tag) {
                Some(s) => *s,
                None => {
                    let s = scalars::slot(&value.tag, fields);
                    self.slots.insert(value.tag.clone(), s);
                    s
                }
            };
            match slot {
                Some(slot) => gather.put(slot, x),
                None => scalars::note_ignored(ignored, &value.tag),
            }
        }
    }

    /// Queues the record of the step being gathered, if it has one.
    fn flush(&mut self) {
        let Some(gather) = self.pending.take() else { return };
        if let Some(entry) = gather.finish(&self.job) {
            if entry.is_ok() {
                self.last_shape = gather.shape();
            }
            self.out.push_back(entry);
        }
    }

    /// The input went quiet: queues the step being gathered if it has every
    /// field the last record had.
    fn quiet(&mut self) {
        let Some(gather) = &self.pending else { return };
        let shape = gather.shape();
        if shape != 0 && shape & self.last_shape == self.last_shape {
            self.sent_quiet = Some(gather.step);
            self.flush();
        }
    }
}

impl Source for Reader {
    fn next_entry(&mut self, fields: &FieldMap, ignored: &mut BTreeSet<String>) -> Option<Result<Entry, SourceError>> {
        loop {
            if let Some(entry) = self.out.pop_front() {
                return Some(Ok(entry));
            }
            if self.done {
                return None;
            }
            match self.read_record() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.quiet(),
                Err(e) => {
                    self.done = true;
                    return Some(Err(SourceError::Read(e)));
                }
                Ok(Framed::Data) => self.event(fields, ignored),
                Ok(Framed::BadData) => {
                    let (n, at) = (self.records, self.at);
                    let reason = format!("record {n} at byte {at}: the data's checksum does not match; record skipped");
                    self.out.push_back(Err(Skipped { line: n, reason }));
                }
                Ok(Framed::End) => {
                    self.done = true;
                    self.flush();
                }
                Ok(Framed::Lost(line, reason)) => {
                    self.done = true;
                    self.flush();
                    self.out.push_back(Err(Skipped { line, reason }));
                }
            }
        }
    }
}

/// Reads until `buf` is full or the input ends; the bytes read. An input
/// gone quiet ([`io::ErrorKind::WouldBlock`]) is told of when nothing was
/// read and `at_boundary` (a record's start); otherwise read on.
fn read_full(input: &mut dyn BufRead, buf: &mut [u8], at_boundary: bool) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && (got > 0 || !at_boundary) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    /// One TFRecord around `data`.
    pub(crate) fn frame(data: &[u8]) -> Vec<u8> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = len.to_vec();
        out.extend(masked_crc32c(&len).to_le_bytes());
        out.extend(data);
        out.extend(masked_crc32c(data).to_le_bytes());
        out
    }

    fn simple(tag: &str, x: f32) -> Value {
        Value {
            tag: tag.into(),
            simple_value: Some(x),
            tensor: None,
        }
    }

    fn event(step: i64, time: f64, values: Vec<Value>) -> Vec<u8> {
        let summary = (!values.is_empty()).then_some(Summary { value: values });
        frame(
            &Event {
                wall_time: time,
                step,
                summary,
            }
            .encode_to_vec(),
        )
    }

    fn read_all(bytes: Vec<u8>, fields: &FieldMap) -> (Vec<Entry>, BTreeSet<String>) {
        let mut reader = Reader::new(Box::new(Cursor::new(bytes)), "run");
        let mut ignored = BTreeSet::new();
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry(fields, &mut ignored) {
            out.push(e.expect("no read error"));
        }
        (out, ignored)
    }

    /// A file version event, then steps 1..=n of loss, grad norm and lr, one
    /// event each.
    fn run(n: i64) -> Vec<u8> {
        let mut bytes = frame(&[
            0x1a, 0x0d, b'b', b'r', b'a', b'i', b'n', b'.', b'E', b'v', b'e', b'n', b't', b':', b'2',
        ]);
        for step in 1..=n {
            let t = 1000.0 + step as f64;
            bytes.extend(event(step, t, vec![simple("train/loss", 2.0 + step as f32)]));
            bytes.extend(event(step, t + 0.5, vec![simple("train/grad_norm", 0.5)]));
            bytes.extend(event(
                step,
                t + 0.5,
                vec![simple("lr", 0.25), simple("train/epoch", 1.0)],
            ));
        }
        bytes
    }

    #[test]
    fn masked_crc_known_values() {
        // TensorFlow's own: every event file of a 24-byte first record
        // starts with these 12 bytes; torch's 72-byte one with the second.
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224b_7fa3);
        assert_eq!(masked_crc32c(&72u64.to_le_bytes()), 0x9d48_92fe);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283, "the CRC-32C check value");
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert!(looks_like(&frame(b"x")) && !looks_like(b"{\"step\": 1}\n") && !looks_like(b"short"));
    }

    #[test]
    fn gathers_one_record_per_step() {
        let (entries, ignored) = read_all(run(3), &FieldMap::default());
        let records: Vec<_> = entries.into_iter().map(Result::unwrap).collect();
        assert_eq!(records.len(), 3);
        let r = &records[1];
        assert_eq!(
            (r.job.as_str(), r.summary.step, r.line),
            ("run", 2, 5),
            "record 5: step 2's first event"
        );
        let s = &r.summary;
        assert_eq!(
            (s.loss, s.grad_norm, s.lr, s.time),
            (Some(4.0), Some(0.5), Some(0.25), Some(1002.0))
        );
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["train/epoch"]);
    }

    #[test]
    fn field_map_and_steps_without_fields() {
        let mut bytes = event(1, 0.0, vec![simple("my/loss", 3.0)]);
        bytes.extend(event(2, 0.0, vec![simple("eval/acc", 0.5)]));
        bytes.extend(event(3, 0.0, vec![simple("my/loss", 1.0)]));
        let mut fields = FieldMap::default();
        fields.add("loss=my/loss").unwrap();
        let (entries, ignored) = read_all(bytes.clone(), &fields);
        let steps: Vec<u64> = entries.iter().map(|e| e.as_ref().unwrap().summary.step).collect();
        assert_eq!(steps, [1, 3], "step 2 has no field: nothing");
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["eval/acc"]);
        let (entries, _) = read_all(bytes, &FieldMap::default());
        assert!(entries.is_empty());
    }

    #[test]
    fn a_bad_data_checksum_skips_that_record_only() {
        let mut bytes = run(3);
        let first = 12 + 15 + 4; // the file version record
        let second_data = first + 12;
        bytes[second_data + 3] ^= 0x40;
        let (entries, _) = read_all(bytes, &FieldMap::default());
        let skip = entries[0].as_ref().unwrap_err();
        assert_eq!(skip.line, 2);
        assert_eq!(
            skip.reason,
            format!("record 2 at byte {first}: the data's checksum does not match; record skipped")
        );
        let records: Vec<_> = entries[1..].iter().map(|e| e.as_ref().unwrap()).collect();
        assert_eq!(
            records.len(),
            3,
            "the other records of step 1 and the next steps are read"
        );
        assert_eq!(records[0].summary.loss, None, "step 1's loss was in the bad record");
        assert_eq!(records[0].summary.grad_norm, Some(0.5));
    }

    #[test]
    fn lost_framing_stops_the_file() {
        // A bad length checksum.
        let mut bytes = run(2);
        let third = 31 + event(1, 1001.0, vec![simple("train/loss", 3.0)]).len();
        bytes[third + 9] ^= 1;
        let (entries, _) = read_all(bytes, &FieldMap::default());
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(
            entries[0].as_ref().unwrap().summary.loss,
            Some(3.0),
            "what was read before is kept"
        );
        let skip = entries[1].as_ref().unwrap_err();
        assert_eq!(skip.line, 3);
        assert!(
            skip.reason.starts_with(&format!(
                "record 3 at byte {third}: the length's checksum does not match"
            )),
            "{}",
            skip.reason
        );

        // Cut inside a header, inside data.
        let bytes = run(2);
        for (cut, want) in [
            (bytes.len() - 5, "the file ends inside it"),
            (third + 5, "the file ends inside its header (5 of 12 bytes)"),
        ] {
            let (entries, _) = read_all(bytes[..cut].to_vec(), &FieldMap::default());
            let skip = entries.last().unwrap().as_ref().unwrap_err();
            assert!(
                skip.reason.contains("is cut short") && skip.reason.contains(want),
                "{}",
                skip.reason
            );
        }

        // A huge length, with a checksum that verifies: refused before any allocation.
        let len = (1u64 << 40).to_le_bytes();
        let mut bytes = len.to_vec();
        bytes.extend(masked_crc32c(&len).to_le_bytes());
        let (entries, _) = read_all(bytes, &FieldMap::default());
        assert!(
            entries[0]
                .as_ref()
                .unwrap_err()
                .reason
                .contains("length 1099511627776 is over 16 MiB")
        );

        // Junk, and data that is no event.
        let (entries, _) = read_all(b"hello, world; not a TFRecord at all".to_vec(), &FieldMap::default());
        assert_eq!(entries.len(), 1);
        assert!(
            entries[0]
                .as_ref()
                .unwrap_err()
                .reason
                .contains("record 1 at byte 0: the length's checksum")
        );
        let (entries, _) = read_all(frame(&[0xff, 0xff, 0xff]), &FieldMap::default());
        assert!(
            entries[0]
                .as_ref()
                .unwrap_err()
                .reason
                .starts_with("record 1 at byte 0: not a TensorBoard event")
        );
        assert!(read_all(Vec::new(), &FieldMap::default()).0.is_empty());
    }

    fn tensor(dtype: i32, f: impl FnOnce(&mut TensorProto)) -> Value {
        let mut t = TensorProto {
            dtype,
            tensor_shape: Some(TensorShape { dim: vec![] }),
            ..TensorProto::default()
        };
        f(&mut t);
        Value {
            tag: "x".into(),
            simple_value: None,
            tensor: Some(t),
        }
    }

    #[test]
    fn scalar_tensors_of_each_type() {
        assert_eq!(scalar(&tensor(DT_FLOAT, |t| t.float_val = vec![1.5])), Some(1.5));
        assert_eq!(
            scalar(&tensor(DT_FLOAT, |t| t.tensor_content = 2.5f32.to_le_bytes().to_vec())),
            Some(2.5)
        );
        assert_eq!(scalar(&tensor(DT_DOUBLE, |t| t.double_val = vec![0.1])), Some(0.1));
        assert_eq!(
            scalar(&tensor(DT_DOUBLE, |t| t.tensor_content = 0.3f64.to_le_bytes().to_vec())),
            Some(0.3)
        );
        assert_eq!(scalar(&tensor(DT_INT64, |t| t.int64_val = vec![7])), Some(7.0));
        assert_eq!(
            scalar(&tensor(DT_INT32, |t| t.tensor_content = (-3i32).to_le_bytes().to_vec())),
            Some(-3.0)
        );
        assert_eq!(scalar(&tensor(DT_HALF, |t| t.half_val = vec![0x3e00])), Some(1.5));
        assert_eq!(
            scalar(&tensor(DT_HALF, |t| t.half_val = vec![0x7c00])),
            Some(f64::INFINITY)
        );
        assert!(
            scalar(&tensor(DT_HALF, |t| t.half_val = vec![0x7e00]))
                .unwrap()
                .is_nan()
        );
        assert_eq!(
            scalar(&tensor(DT_BFLOAT16, |t| t.tensor_content = vec![0xc0, 0x3f])),
            Some(1.5)
        );
        assert!(
            scalar(&tensor(DT_FLOAT, |t| t.float_val = vec![f32::NAN]))
                .unwrap()
                .is_nan()
        );
        // One element in a shape of ones is a scalar too; more elements, a
        // string, or nothing at all is not.
        let one = tensor(DT_FLOAT, |t| {
            t.float_val = vec![4.0];
            t.tensor_shape = Some(TensorShape {
                dim: vec![Dim { size: 1 }],
            });
        });
        assert_eq!(scalar(&one), Some(4.0));
        let hist = tensor(DT_DOUBLE, |t| {
            t.double_val = vec![0.0; 6];
            t.tensor_shape = Some(TensorShape {
                dim: vec![Dim { size: 2 }, Dim { size: 3 }],
            });
        });
        assert_eq!(scalar(&hist), None);
        assert_eq!(
            scalar(&tensor(7, |t| t.tensor_content = b"text".to_vec())),
            None,
            "DT_STRING"
        );
        assert_eq!(scalar(&tensor(DT_FLOAT, |_| {})), None);
        assert_eq!(scalar(&tensor(DT_FLOAT, |t| t.float_val = vec![1.0, 2.0])), None);
    }

    /// A reader that hands out one byte per read, as a growing file may.
    struct Trickle(Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn reads_a_record_at_a_time_from_short_reads() {
        let input = io::BufReader::with_capacity(1, Trickle(Cursor::new(run(4))));
        let mut reader = Reader::new(Box::new(input), "j");
        let mut ignored = BTreeSet::new();
        let mut n = 0;
        while let Some(e) = reader.next_entry(&FieldMap::default(), &mut ignored) {
            assert_eq!(e.unwrap().unwrap().summary.step, n + 1);
            n += 1;
        }
        assert_eq!(n, 4);
    }

    /// A growing file's reads: pieces of bytes, with quiet spells (a
    /// [`io::ErrorKind::WouldBlock`] each, as a quiet [`super::super::tail::Tail`]
    /// gives) between some of them.
    struct Spells(VecDeque<Option<Vec<u8>>>);

    impl Read for Spells {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                match self.0.front_mut() {
                    None => return Ok(0),
                    Some(None) => {
                        self.0.pop_front();
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "quiet"));
                    }
                    Some(Some(bytes)) if bytes.is_empty() => {
                        self.0.pop_front();
                    }
                    Some(Some(bytes)) => {
                        let n = buf.len().min(bytes.len());
                        buf[..n].copy_from_slice(&bytes[..n]);
                        bytes.drain(..n);
                        return Ok(n);
                    }
                }
            }
        }
    }

    #[test]
    fn a_quiet_input_ends_a_step_that_has_every_field_of_the_last() {
        let step3 = [
            event(3, 1.0, vec![simple("train/loss", 9.0)]),
            event(3, 1.0, vec![simple("train/grad_norm", 7.0)]),
            event(3, 1.0, vec![simple("lr", 0.5)]),
        ];
        let (cut_a, cut_b) = step3[1].split_at(10);
        let late_at = run(2).len() + step3.iter().map(Vec::len).sum::<usize>();
        let spells = Spells(VecDeque::from([
            Some(run(2)),
            None, // step 2 is whole: sent
            None, // told twice: nothing more
            Some(step3[0].clone()),
            None, // step 3 has its loss only: not sent
            Some(cut_a.to_vec()),
            None, // inside a record: read on
            Some(cut_b.to_vec()),
            Some(step3[2].clone()),
            None, // step 3 is whole now: sent
            Some(event(3, 1.0, vec![simple("train/loss", 1.0), simple("other", 1.0)])),
            Some(event(4, 2.0, vec![simple("train/loss", 4.0)])),
        ]));
        let mut reader = Reader::new(Box::new(io::BufReader::with_capacity(7, spells)), "j");
        let mut ignored = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(e) = reader.next_entry(&FieldMap::default(), &mut ignored) {
            got.push(match e.expect("no read error") {
                Ok(r) => {
                    let s = r.summary;
                    format!("step {} loss {:?} norm {:?} lr {:?}", s.step, s.loss, s.grad_norm, s.lr)
                }
                Err(skip) => skip.reason,
            });
        }
        let late = format!(
            "record 11 at byte {late_at}: tag \"train/loss\" of step 3 came after the step was sent (the file was quiet); value skipped"
        );
        assert_eq!(
            got,
            [
                "step 1 loss Some(3.0) norm Some(0.5) lr Some(0.25)",
                "step 2 loss Some(4.0) norm Some(0.5) lr Some(0.25)",
                "step 3 loss Some(9.0) norm Some(7.0) lr Some(0.5)",
                &late,
                "step 4 loss Some(4.0) norm None lr None",
            ]
        );

        // The first step has no step before it: sent when the input is quiet.
        let spells = Spells(VecDeque::from([
            Some(event(0, 1.0, vec![simple("loss", f32::NAN)])),
            None,
        ]));
        let mut reader = Reader::new(Box::new(io::BufReader::new(spells)), "j");
        let first = reader
            .next_entry(&FieldMap::default(), &mut ignored)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(first.summary.step == 0 && first.summary.loss.unwrap().is_nan());
        assert!(reader.next_entry(&FieldMap::default(), &mut ignored).is_none());
    }

    #[test]
    fn negative_steps_are_skipped() {
        let (entries, _) = read_all(event(-1, 0.0, vec![simple("loss", 1.0)]), &FieldMap::default());
        assert_eq!(
            entries[0].as_ref().unwrap_err().reason,
            "record 1 at byte 0: negative step -1"
        );
    }
}
