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
        let got = read_full(self.input.as_mut(), &mut header)?;
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
        let got = read_full(self.input.as_mut(), &mut self.buf)?;
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
        if let Some(entry) = self.pending.take().and_then(|g| g.finish(&self.job)) {
            self.out.push_back(entry);
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

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(input: &mut dyn BufRead, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
