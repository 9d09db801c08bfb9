//! A structure-aware worker message: built field by field from the values
//! of [`super::input`], with the liberties an encoder may take (explicit
//! defaults, over-long varints, unpacked or split repeated fields, fields
//! repeated or out of order, unknown fields) and, at higher levels, the
//! damage a broken one does (wrong wire types, field 0, bad or huge length
//! prefixes, then bytes cut, flipped, inserted or repeated). Random bytes
//! rarely get past a message's first byte, so most cases are these.

use super::input::{self, Choices};
use crate::proto;

/// How far a structured case strays from a plain encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// What prost itself writes.
    Plain,
    /// Still valid: what another encoder may write.
    Liberties,
    /// Invalid in places: wrong wire types, bad lengths.
    Damaged,
    /// Damaged, and bytes mutated after encoding.
    Mutated,
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const SGROUP: u8 = 3;
const EGROUP: u8 = 4;
const I32: u8 = 5;

/// One field as written: its key (number and wire type, possibly padded)
/// and the bytes after the key.
#[derive(Debug, Clone)]
struct Field {
    number: u64,
    wire_type: u8,
    key_pad: usize,
    body: Vec<u8>,
}

/// A varint, with `pad` redundant continuation bytes (a varint of more than
/// ten bytes is invalid).
fn put_varint(out: &mut Vec<u8>, mut v: u64, pad: usize) {
    let mut bytes = Vec::with_capacity(10 + pad);
    loop {
        bytes.push((v & 0x7f) as u8);
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    bytes.extend(std::iter::repeat_n(0, pad));
    let last = bytes.len() - 1;
    for b in &mut bytes[..last] {
        *b |= 0x80;
    }
    out.extend_from_slice(&bytes);
}

/// Writes fields, taking the liberties its level allows.
struct Writer<'c, 'd> {
    c: &'c mut Choices<'d>,
    level: Level,
}

impl Writer<'_, '_> {
    /// Redundant bytes for a varint: none when plain, a few when taking
    /// liberties, sometimes up to and past the ten bytes when damaging.
    fn pad(&mut self) -> usize {
        match self.level {
            Level::Plain => 0,
            Level::Liberties => usize::from(self.c.one_in(8)) * self.c.below(4),
            // Ten bytes in all is the most a varint may have; eleven is not one.
            _ if self.c.one_in(24) => self.c.pick(&[9, 10]),
            _ => usize::from(self.c.one_in(8)) * self.c.below(4),
        }
    }

    fn field(&mut self, number: u64, wire_type: u8, body: Vec<u8>) -> Field {
        Field {
            number,
            wire_type,
            key_pad: self.pad(),
            body,
        }
    }

    fn varint(&mut self, number: u64, v: u64) -> Field {
        let mut body = Vec::new();
        let pad = self.pad();
        put_varint(&mut body, v, pad);
        self.field(number, VARINT, body)
    }

    fn fixed64(&mut self, number: u64, bits: u64) -> Field {
        self.field(number, I64, bits.to_le_bytes().to_vec())
    }

    /// A length-delimited field; damaged, its length may lie.
    fn len(&mut self, number: u64, payload: &[u8]) -> Field {
        let n = payload.len() as u64;
        let told = if self.level >= Level::Damaged && self.c.one_in(12) {
            match self.c.below(6) {
                0 => n + 1,
                1 => n.saturating_sub(1),
                2 => (1 << 32) + n,
                3 => u64::MAX,
                4 => i64::MAX as u64,
                _ => self.c.below(1 << 20) as u64,
            }
        } else {
            n
        };
        let mut body = Vec::with_capacity(payload.len() + 10);
        let pad = self.pad();
        put_varint(&mut body, told, pad);
        body.extend_from_slice(payload);
        self.field(number, LEN, body)
    }

    /// A scalar field prost would leave out when it holds its default: left
    /// out, or (taking liberties) written anyway.
    fn scalar(&mut self, out: &mut Vec<Field>, is_default: bool, f: impl FnOnce(&mut Self) -> Field) {
        if !is_default || (self.level >= Level::Liberties && self.c.one_in(4)) {
            let field = f(self);
            out.push(field);
        }
    }

    /// A repeated field of fixed-width or varint values: packed (prost's
    /// way), one field per value, or runs of both.
    fn repeated(&mut self, out: &mut Vec<Field>, number: u64, values: &[u64], fixed32: bool) {
        let encode = |buf: &mut Vec<u8>, v: u64| {
            if fixed32 {
                buf.extend_from_slice(&(v as u32).to_le_bytes());
            } else {
                put_varint(buf, v, 0);
            }
        };
        let mode = if self.level == Level::Plain { 0 } else { self.c.below(4) };
        if values.is_empty() {
            if mode == 3 {
                out.push(self.len(number, &[])); // an empty packed run
            }
            return;
        }
        let mut at = 0;
        while at < values.len() {
            let run = match mode {
                0 => values.len() - at,
                1 => 1,
                _ => 1 + self.c.below(values.len() - at),
            };
            let packed = match mode {
                0 => true,
                1 => false,
                _ => self.c.one_in(2),
            };
            if packed {
                let mut buf = Vec::new();
                for &v in &values[at..at + run] {
                    encode(&mut buf, v);
                }
                out.push(self.len(number, &buf));
            } else {
                for &v in &values[at..at + run] {
                    let mut buf = Vec::new();
                    encode(&mut buf, v);
                    out.push(self.field(number, if fixed32 { I32 } else { VARINT }, buf));
                }
            }
            at += run;
        }
    }

    fn string(&mut self, out: &mut Vec<Field>, number: u64, s: &str) {
        let bytes = if self.level >= Level::Damaged && self.c.one_in(16) {
            let mut b = s.as_bytes().to_vec();
            b.push(0xff); // not UTF-8
            b
        } else {
            s.as_bytes().to_vec()
        };
        self.scalar(out, bytes.is_empty(), |w| w.len(number, &bytes));
    }

    fn summary(&mut self, s: &proto::Summary) -> Vec<u8> {
        let mut f = Vec::new();
        self.scalar(&mut f, s.step == 0, |w| w.varint(1, s.step));
        self.scalar(&mut f, s.time.to_bits() == 0, |w| w.fixed64(2, s.time.to_bits()));
        for (number, v) in [(3, s.loss), (4, s.lr), (5, s.loss_scale), (6, s.grad_norm)] {
            if let Some(v) = v {
                f.push(self.fixed64(number, v.to_bits()));
            }
        }
        let bits = |v: &[f32]| -> Vec<u64> { v.iter().map(|x| u64::from(x.to_bits())).collect() };
        self.repeated(&mut f, 7, &bits(&s.layer_l2), true);
        self.repeated(&mut f, 8, &bits(&s.layer_max_abs), true);
        let counts: Vec<u64> = s.layer_nonfinite.iter().map(|&n| u64::from(n)).collect();
        self.repeated(&mut f, 9, &counts, false);
        self.repeated(&mut f, 10, &bits(&s.layer_param_norm), true);
        self.repeated(&mut f, 11, &bits(&s.layer_update_norm), true);
        self.finish(f, 11)
    }

    fn hello(&mut self, h: &proto::Hello) -> Vec<u8> {
        let mut f = Vec::new();
        self.string(&mut f, 1, &h.job);
        self.scalar(&mut f, h.rank == 0, |w| w.varint(2, u64::from(h.rank)));
        self.scalar(&mut f, h.world_size == 0, |w| w.varint(3, u64::from(h.world_size)));
        for name in &h.layer_names {
            let bytes = name.as_bytes();
            f.push(self.len(4, bytes));
        }
        self.string(&mut f, 5, &h.client_version);
        self.string(&mut f, 6, &h.rule_profile);
        // A bool is any varint; not 0 is true.
        let truth = if h.report_progress && self.level >= Level::Liberties && self.c.one_in(4) {
            self.c.pick(&[2, 255, u64::MAX])
        } else {
            u64::from(h.report_progress)
        };
        self.scalar(&mut f, !h.report_progress, |w| w.varint(7, truth));
        if let Some(l) = &h.layout {
            let bytes = self.layout(l);
            f.push(self.len(8, &bytes));
        }
        self.finish(f, 8)
    }

    fn layout(&mut self, l: &proto::Layout) -> Vec<u8> {
        let mut f = Vec::new();
        for (number, v) in [
            (1, l.data_parallel),
            (2, l.tensor_parallel),
            (3, l.pipeline_parallel),
            (4, l.replica_group),
        ] {
            self.scalar(&mut f, v == 0, |w| w.varint(number, u64::from(v)));
        }
        self.finish(f, 4)
    }

    fn ack(&mut self, a: &proto::AdviceAck) -> Vec<u8> {
        let mut f = Vec::new();
        self.scalar(&mut f, a.advice_id == 0, |w| w.varint(1, a.advice_id));
        self.scalar(&mut f, a.applied_step == 0, |w| w.varint(2, a.applied_step));
        self.scalar(&mut f, !a.applied, |w| w.varint(3, u64::from(a.applied)));
        self.string(&mut f, 4, &a.note);
        self.finish(f, 4)
    }

    /// An unknown field: a number the message does not have, any valid wire
    /// type (a group with its end when damaging).
    fn unknown(&mut self, highest: u64) -> Vec<Field> {
        let number = match self.c.below(3) {
            0 => highest + 1 + self.c.below(20) as u64,
            1 => (1 << 29) - 1, // the highest field number
            _ => 1000,
        };
        let kinds = if self.level >= Level::Damaged { 5 } else { 4 };
        match self.c.below(kinds) {
            0 => {
                let shift = self.c.below(64);
                let v = self.c.u64() >> shift;
                vec![self.varint(number, v)]
            }
            1 => {
                let bits = self.c.u64();
                vec![self.fixed64(number, bits)]
            }
            2 => {
                let n = self.c.below(12);
                let payload = self.c.bytes(n).to_vec();
                vec![self.len(number, &payload)]
            }
            3 => {
                let bytes = self.c.bytes(4).to_vec();
                vec![self.field(number, I32, bytes)]
            }
            _ => {
                let inner = self.unknown(highest);
                let mut group = vec![self.field(number, SGROUP, Vec::new())];
                group.extend(inner);
                if !self.c.one_in(4) {
                    group.push(self.field(number, EGROUP, Vec::new()));
                }
                group
            }
        }
    }

    /// Reorders, repeats, adds and (damaging) breaks fields, then writes
    /// them out.
    fn finish(&mut self, mut fields: Vec<Field>, highest: u64) -> Vec<u8> {
        if self.level >= Level::Liberties {
            for _ in 0..self.c.below(3) {
                match self.c.below(4) {
                    0 if fields.len() > 1 => {
                        let (a, b) = (self.c.below(fields.len()), self.c.below(fields.len()));
                        fields.swap(a, b);
                    }
                    1 if !fields.is_empty() => {
                        let i = self.c.below(fields.len());
                        let copy = fields[i].clone();
                        fields.insert(self.c.below(fields.len() + 1), copy);
                    }
                    _ => {
                        let at = self.c.below(fields.len() + 1);
                        let extra = self.unknown(highest);
                        fields.splice(at..at, extra);
                    }
                }
            }
        }
        if self.level >= Level::Damaged && !fields.is_empty() && self.c.one_in(3) {
            let i = self.c.below(fields.len());
            match self.c.below(3) {
                0 => {
                    let wire_type = self.c.pick(&[VARINT, I64, LEN, SGROUP, EGROUP, I32, 6, 7]);
                    fields[i].wire_type = wire_type;
                }
                1 => fields[i].number = 0,
                _ => {
                    let cut = self.c.below(fields[i].body.len() + 1);
                    fields[i].body.truncate(cut);
                }
            }
        }
        write(&fields)
    }
}

/// Fields, one after the other.
fn write(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        put_varint(&mut out, (f.number << 3) | u64::from(f.wire_type), f.key_pad);
        out.extend_from_slice(&f.body);
    }
    out
}

/// One structured worker message for a job of `layers` layers.
pub fn worker_message(c: &mut Choices, layers: usize, now: f64) -> Vec<u8> {
    let level = match c.below(8) {
        0..=2 => Level::Plain,
        3 | 4 => Level::Liberties,
        5 | 6 => Level::Damaged,
        _ => Level::Mutated,
    };
    let mut w = Writer { c, level };
    let bodies = if w.c.one_in(10) { 2 } else { 1 };
    let mut fields = Vec::new();
    for _ in 0..bodies {
        match w.c.below(10) {
            0..=3 => {
                let s = input::summary(w.c, layers, now);
                let bytes = w.summary(&s);
                fields.push(w.len(2, &bytes));
            }
            4..=6 => {
                // Now and then a batch around the 64 a decoder holds at once.
                let n = match w.c.below(32) {
                    0..=27 => w.c.below(5),
                    28..=30 => w.c.below(40),
                    _ => 60 + w.c.below(10),
                };
                let mut batch = Vec::new();
                for _ in 0..n {
                    let s = input::summary(w.c, layers, now);
                    let bytes = w.summary(&s);
                    batch.push(w.len(1, &bytes));
                }
                let bytes = if w.level >= Level::Liberties && w.c.one_in(4) {
                    w.finish(batch, 1)
                } else {
                    write(&batch)
                };
                fields.push(w.len(4, &bytes));
            }
            7 => {
                let h = input::hello(w.c, layers);
                let bytes = w.hello(&h);
                fields.push(w.len(1, &bytes));
            }
            8 => {
                let a = input::ack(w.c);
                let bytes = w.ack(&a);
                fields.push(w.len(3, &bytes));
            }
            _ => {} // no body
        }
    }
    let mut message = if w.level >= Level::Liberties && w.c.one_in(3) {
        w.finish(fields, 4)
    } else {
        w.level = Level::Plain; // keep the fast paths' exact shapes
        w.finish(fields, 4)
    };
    if level == Level::Mutated {
        mutate(c, &mut message);
    }
    message
}

/// Byte-level damage: one to three cuts, flips, insertions, deletions or
/// repeats.
pub fn mutate(c: &mut Choices, m: &mut Vec<u8>) {
    for _ in 0..1 + c.below(3) {
        let at = c.below(m.len() + 1);
        match c.below(6) {
            0 => m.truncate(at),
            1 if at < m.len() => m[at] ^= 1 << c.below(8),
            2 if at < m.len() => m[at] = c.pick(&[0x00, 0x80, 0xff, 0x0a, 0x12, 0x22, 0x7f]),
            3 => {
                let n = 1 + c.below(8);
                let extra = c.bytes(n).to_vec();
                m.splice(at..at, extra);
            }
            4 => {
                let end = (at + 1 + c.below(8)).min(m.len());
                m.drain(at..end);
            }
            _ => {
                let end = (at + 1 + c.below(16)).min(m.len());
                let copy = m[at..end].to_vec();
                let to = c.below(m.len() + 1);
                m.splice(to..to, copy);
            }
        }
    }
}
