//! Inputs for the differential checks, drawn from a string of choice bytes
//! (proptest's in the tests, a seeded generator's in the runner), so both
//! make their cases the same way: the choices, and the wire values a case
//! is made of (summaries, Hellos, acks, with the edge values that matter).
//! [`super::encode`] writes them out.

use crate::intake::MAX_STEP;
use crate::proto;

/// Choices read off a byte string; zeros once it is used up. Choice 0 is
/// always the plainest, so a failing case shrinks (fewer bytes, smaller
/// bytes) towards a simpler message.
#[derive(Debug, Clone)]
pub struct Choices<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Choices<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// In `0..n` (0 when `n` is 0 or 1).
    pub fn below(&mut self, n: usize) -> usize {
        match n {
            0 | 1 => 0,
            2..=256 => usize::from(self.byte()) % n,
            _ => (u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()]) as usize) % n,
        }
    }

    /// True one time in `n` (never on a zero byte).
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == n - 1
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.byte()))
    }

    /// Up to `n` bytes of the string itself (fewer near its end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.at += n;
        &self.data[start..end]
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A step: small ones mostly (so a step the checks refuse comes up), and
/// the edges of the range the intake takes.
fn step(c: &mut Choices) -> u64 {
    match c.below(16) {
        0..=13 => c.below(5) as u64,
        14 => c.pick(&[MAX_STEP, MAX_STEP + 1, u64::MAX]),
        _ => c.u64(),
    }
}

fn f64_value(c: &mut Choices, now: f64) -> f64 {
    match c.below(16) {
        0 => 0.0,
        1 => 1.5,
        2 => -0.0,
        3 => f64::NAN,
        4 => f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
        5 => f64::from_bits(0xfff8_0000_dead_beef), // negative NaN with a payload
        6 => f64::INFINITY,
        7 => f64::NEG_INFINITY,
        8 => f64::from_bits(1), // the smallest subnormal
        9 => f64::MAX,
        10 | 11 => now + c.below(200) as f64 - 100.0,
        _ => f64::from_bits(c.u64()),
    }
}

fn f32_value(c: &mut Choices) -> f32 {
    match c.below(12) {
        0 => 0.0,
        1 => 0.5,
        2 => -0.0,
        3 => f32::NAN,
        4 => f32::from_bits(0x7f80_0001),
        5 => f32::from_bits(0xffc0_beef),
        6 => f32::INFINITY,
        7 => f32::from_bits(1),
        _ => f32::from_bits(c.u64() as u32),
    }
}

fn option(c: &mut Choices, now: f64) -> Option<f64> {
    (!c.one_in(3)).then(|| f64_value(c, now))
}

/// A per-layer array's length: the job's layer count mostly, else empty,
/// one off, or anything small.
fn array_len(c: &mut Choices, layers: usize) -> usize {
    match c.below(8) {
        0..=3 => layers,
        4 => 0,
        5 => layers + 1,
        6 => layers.saturating_sub(1),
        _ => c.below(6),
    }
}

/// A wire summary for a job of `layers` layers: its per-layer arrays as
/// the checks want them (each empty or `layers` long) seven times in eight.
pub fn summary(c: &mut Choices, layers: usize, now: f64) -> proto::Summary {
    let well_formed = !c.one_in(8);
    let with_l2 = !c.one_in(4);
    let array_len = |c: &mut Choices| match well_formed {
        true if !with_l2 || c.one_in(3) => 0,
        true => layers,
        false => array_len(c, layers),
    };
    let floats = |c: &mut Choices| -> Vec<f32> {
        let n = array_len(c);
        (0..n).map(|_| f32_value(c)).collect()
    };
    let l2_len = match well_formed {
        true if with_l2 => layers,
        true => 0,
        false => array_len(c),
    };
    proto::Summary {
        step: step(c),
        time: if c.one_in(2) { f64_value(c, now) } else { 0.0 },
        loss: option(c, now),
        lr: option(c, now),
        loss_scale: option(c, now),
        grad_norm: option(c, now),
        layer_l2: (0..l2_len).map(|_| f32_value(c)).collect(),
        layer_max_abs: floats(c),
        layer_nonfinite: {
            let n = array_len(c);
            (0..n)
                .map(|_| if c.one_in(4) { c.u64() as u32 } else { c.below(3) as u32 })
                .collect()
        },
        layer_param_norm: floats(c),
        layer_update_norm: floats(c),
    }
}

fn text(c: &mut Choices) -> String {
    match c.below(8) {
        0 | 1 => "j".into(),
        2 => String::new(),
        3 => "job-α".into(),
        4 => "rank".into(),
        5 => "n".repeat(257), // over the names' limit
        _ => String::from_utf8_lossy(c.bytes(8)).into_owned(),
    }
}

pub fn hello(c: &mut Choices, layers: usize) -> proto::Hello {
    let n = array_len(c, layers);
    proto::Hello {
        job: text(c),
        rank: c.pick(&[0, 1, 3, 4, u32::MAX]),
        world_size: c.pick(&[0, 4, 1, 2, 1 << 20]),
        layer_names: (0..n).map(|_| text(c)).collect(),
        client_version: if c.one_in(2) { text(c) } else { String::new() },
        rule_profile: if c.one_in(4) { text(c) } else { String::new() },
        report_progress: c.one_in(2),
        layout: c.one_in(3).then(|| proto::Layout {
            data_parallel: c.pick(&[1, 2, 4, 0]),
            tensor_parallel: c.pick(&[1, 2, 0]),
            pipeline_parallel: c.pick(&[1, 2, 1 << 20]),
            replica_group: c.pick(&[0, 1, 3, u32::MAX]),
        }),
    }
}

pub fn ack(c: &mut Choices) -> proto::AdviceAck {
    proto::AdviceAck {
        advice_id: c.pick(&[0, 1, 7, u64::MAX]),
        applied_step: step(c),
        applied: c.one_in(2),
        note: if c.one_in(2) { text(c) } else { String::new() },
    }
}
