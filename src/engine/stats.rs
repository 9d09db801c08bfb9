//! Running statistics the rules share. None of them ever takes in a non-finite
//! value: callers filter, and each `push` also refuses one, so a NaN cannot
//! poison the state for the steps that follow.

/// Exponential moving mean and variance with a warm-up: the first `warmup`
/// samples are averaged plainly, then the EMA takes over (ZClip).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Ema {
    mean: f64,
    var: f64,
    n: u32,
}

impl Ema {
    /// True once `warmup` samples have been seen.
    pub fn ready(&self, warmup: u32) -> bool {
        self.n >= warmup.max(2)
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    pub fn std(&self) -> f64 {
        self.var.sqrt()
    }

    /// z-score of `x` against the current mean and spread. The spread never
    /// counts as smaller than 1e-3 of the mean, so a perfectly flat series does
    /// not turn float rounding into an infinite z.
    pub fn z(&self, x: f64) -> f64 {
        let floor = (self.mean.abs() * 1e-3).max(f64::MIN_POSITIVE);
        (x - self.mean) / self.std().max(floor)
    }

    pub fn push(&mut self, x: f64, alpha: f64, warmup: u32) {
        if !x.is_finite() {
            return;
        }
        self.n = self.n.saturating_add(1);
        if self.n <= warmup.max(2) {
            // Welford's running mean and (population) variance.
            let n = f64::from(self.n);
            let delta = x - self.mean;
            self.mean += delta / n;
            self.var += (delta * (x - self.mean) - self.var) / n;
        } else {
            let delta = x - self.mean;
            self.mean += (1.0 - alpha) * delta;
            self.var = alpha * (self.var + (1.0 - alpha) * delta * delta);
        }
    }
}

/// A fixed-capacity ring of (step, value) pairs with a least-squares fit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Window {
    xs: Box<[f64]>,
    ys: Box<[f64]>,
    head: usize,
    len: usize,
    /// Running sums for an O(1) fit, rebuilt from the values every
    /// `capacity` pushes (so rounding never accumulates). Part of the
    /// snapshot: a restored job fits exactly as it would have.
    sums: Sums,
}

/// Sums of the values' offsets from a reference point near them (offsets
/// keep the sums small, so the centred sums taken from them stay exact).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Sums {
    valid: bool,
    pushes: usize,
    x0: f64,
    y0: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    syy: f64,
}

impl Sums {
    fn add(&mut self, x: f64, y: f64, sign: f64) {
        let (dx, dy) = (x - self.x0, y - self.y0);
        self.sx += sign * dx;
        self.sy += sign * dy;
        self.sxx += sign * dx * dx;
        self.sxy += sign * dx * dy;
        self.syy += sign * dy * dy;
    }
}

/// A fitted line `y = slope·x + intercept` with its coefficient of determination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub slope: f64,
    pub r2: f64,
}

impl Window {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            xs: vec![0.0; capacity].into_boxed_slice(),
            ys: vec![0.0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            sums: Sums::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.xs.len()
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    pub fn push(&mut self, x: f64, y: f64) {
        if !(x.is_finite() && y.is_finite()) {
            return;
        }
        if self.sums.valid {
            if self.len == self.capacity() {
                self.sums.add(self.xs[self.head], self.ys[self.head], -1.0);
            }
            self.sums.add(x, y, 1.0);
            self.sums.pushes += 1;
            self.sums.valid = self.sums.pushes < self.capacity();
        }
        self.xs[self.head] = x;
        self.ys[self.head] = y;
        self.head = (self.head + 1) % self.capacity();
        self.len = (self.len + 1).min(self.capacity());
    }

    /// The oldest value still in the window.
    pub fn oldest(&self) -> Option<f64> {
        (self.len > 0).then(|| self.ys[(self.head + self.capacity() - self.len) % self.capacity()])
    }

    /// Least-squares fit over the whole window. Centred sums keep it exact for
    /// large step numbers.
    pub fn fit(&mut self) -> Option<Fit> {
        if self.len < 3 {
            return None;
        }
        if !self.sums.valid {
            self.rebuild();
        }
        let Sums {
            sx, sy, sxx, sxy, syy, ..
        } = self.sums;
        let n = self.len as f64;
        let (mx, my) = (sx / n, sy / n);
        let sxx = sxx - n * mx * mx;
        let sxy = sxy - n * mx * my;
        let syy = syy - n * my * my;
        Self::line(sxx, sxy, syy)
    }

    /// The sums from the values, about the window's first step and mean value.
    fn rebuild(&mut self) {
        let n = self.len as f64;
        let cap = self.capacity();
        let x0 = self.xs[(self.head + cap - self.len) % cap];
        let y0 = self.ys[..self.len].iter().sum::<f64>() / n;
        let mut sums = Sums {
            valid: true,
            x0,
            y0,
            ..Sums::default()
        };
        for i in 0..self.len {
            sums.add(self.xs[i], self.ys[i], 1.0);
        }
        self.sums = sums;
    }

    fn line(sxx: f64, sxy: f64, syy: f64) -> Option<Fit> {
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        // Rounding leaves a constant series a variance of ~0: no line to speak of.
        let r2 = if syy > 0.0 {
            ((sxy * sxy) / (sxx * syy)).min(1.0)
        } else {
            1.0
        };
        Some(Fit { slope, r2 })
    }

    /// [`Window::fit`] of `f` of the values (a window kept raw, fitted in
    /// log space only when asked).
    pub fn fit_of(&self, f: impl Fn(f64) -> f64) -> Option<Fit> {
        if self.len < 3 {
            return None;
        }
        let n = self.len as f64;
        let (mut sx, mut sy) = (0.0, 0.0);
        for i in 0..self.len {
            sx += self.xs[i];
            sy += f(self.ys[i]);
        }
        let (mx, my) = (sx / n, sy / n);
        let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
        for i in 0..self.len {
            let dx = self.xs[i] - mx;
            let dy = f(self.ys[i]) - my;
            sxx += dx * dx;
            sxy += dx * dy;
            syy += dy * dy;
        }
        Self::line(sxx, sxy, syy)
    }

    /// Span of steps the window covers (last − first).
    pub fn span(&self) -> f64 {
        if self.len < 2 {
            return 0.0;
        }
        let cap = self.capacity();
        let first = self.xs[(self.head + cap - self.len) % cap];
        let last = self.xs[(self.head + cap - 1) % cap];
        last - first
    }

    pub fn heap_bytes(&self) -> usize {
        2 * self.capacity() * std::mem::size_of::<f64>()
    }
}

/// Sliding minimum over the last `span` steps (monotonic deque, amortised O(1)).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SlidingMin {
    items: std::collections::VecDeque<(u64, f64)>,
}

impl SlidingMin {
    pub fn push(&mut self, step: u64, value: f64, span: u64) {
        if !value.is_finite() {
            return;
        }
        while self.items.back().is_some_and(|&(_, v)| v >= value) {
            self.items.pop_back();
        }
        self.items.push_back((step, value));
        while self.items.front().is_some_and(|&(s, _)| s.saturating_add(span) < step) {
            self.items.pop_front();
        }
    }

    /// The minimum and the step it was seen at.
    pub fn min(&self) -> Option<(u64, f64)> {
        self.items.front().copied()
    }
}

/// Median of a slice (sorted in place); `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let odd = values.len() % 2 == 1;
    let mid = values.len() / 2;
    let (below, &mut upper, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    Some(if odd {
        upper
    } else {
        let lower = below
            .iter()
            .copied()
            .max_by(f64::total_cmp)
            .expect("an even count has a lower half");
        (lower + upper) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_warmup_is_plain_mean_and_variance() {
        let mut e = Ema::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            e.push(x, 0.97, 4);
        }
        assert!((e.mean() - 2.5).abs() < 1e-12);
        assert!((e.std() - 1.25f64.sqrt()).abs() < 1e-12);
        assert!(e.ready(4));
    }

    #[test]
    fn ema_ignores_non_finite() {
        let mut e = Ema::default();
        for x in [1.0, f64::NAN, 1.0, f64::INFINITY, 1.0, f64::NEG_INFINITY] {
            e.push(x, 0.9, 2);
        }
        assert_eq!(e.mean(), 1.0);
        assert_eq!(e.std(), 0.0);
        assert!(e.z(1.0).is_finite());
    }

    #[test]
    fn window_fits_exponential_growth_in_log_space() {
        let mut w = Window::new(50);
        for s in 1_000_000..1_000_050u64 {
            w.push(s as f64, (1.05f64).powi((s - 1_000_000) as i32).ln());
        }
        let fit = w.fit().unwrap();
        assert!((fit.slope - 1.05f64.ln()).abs() < 1e-9, "{fit:?}");
        assert!(fit.r2 > 0.999);
        assert_eq!(w.span(), 49.0);
    }

    #[test]
    fn sliding_min_forgets_old_values() {
        let mut m = SlidingMin::default();
        m.push(0, 1.0, 10);
        m.push(5, 3.0, 10);
        assert_eq!(m.min(), Some((0, 1.0)));
        m.push(11, 4.0, 10);
        assert_eq!(m.min(), Some((5, 3.0)));
    }

    #[test]
    fn the_running_fit_is_the_direct_one() {
        // Large step numbers, a trend, noise, a window that wraps many times.
        let mut w = Window::new(50);
        let mut seed = 7u64;
        for i in 0..2000u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            w.push(1e6 + i as f64 * 3.0, 0.01 * i as f64 + noise);
            if i % 7 == 0 {
                let (running, direct) = (w.fit(), w.fit_of(|y| y));
                match (running, direct) {
                    (Some(a), Some(b)) => {
                        assert!(
                            (a.slope - b.slope).abs() <= 1e-9 * b.slope.abs().max(1e-6),
                            "{a:?} {b:?}"
                        );
                        assert!((a.r2 - b.r2).abs() <= 1e-9, "{a:?} {b:?}");
                    }
                    (a, b) => assert_eq!(a, b),
                }
            }
        }
        // A constant series has no slope, and an exact fit.
        let mut c = Window::new(10);
        for i in 0..25 {
            c.push(i as f64, 2.5);
        }
        let fit = c.fit().unwrap();
        assert!(fit.slope.abs() < 1e-12 && fit.r2 <= 1.0, "{fit:?}");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
