//! Loss rules: a jump judged against the run's own noise, and divergence (the
//! smoothed loss rises over a window).
//!
//! Everything is counted in records, not steps: a log written every 10 steps
//! averages its loss over them, and its noise is what its records show. A
//! jump is `z` robust deviations (median and MAD of the last `window` records)
//! above the median. On a noisy small-batch run a jump that comes back at the
//! next record is noise: info. One that persists is a warning; with a gradient
//! spike at the jump it is the classic instability: critical, roll back.

use crate::config::Rules;
use crate::engine::hit::{Emitter, Latch, Proposal, num, score};
use crate::engine::stats::{SlidingMin, Window};
use crate::model::{RuleId, Severity};

/// MAD to standard deviation for normal data.
const MAD_SIGMA: f64 = 1.4826;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// The last `window` finite losses, oldest first once full (a ring).
    recent: Vec<f64>,
    head: usize,
    records: u64,
    /// The median of the recent losses at the last record that judged them.
    median: Option<f64>,
    /// A jump seen at an earlier record, waiting to be confirmed or dismissed.
    pending: Option<Jump>,
    elevated: Latch,
    smooth: Option<f64>,
    smooth_min: SlidingMin,
    /// Smoothed loss over the growth window, to tell whether the loss is falling.
    history: Window,
    diverging: Latch,
    /// The robust statistics as last computed (median, sigma, record):
    /// recomputed every `REFRESH` records, and at once when a record looks
    /// like a jump against them, so the common record costs no sort.
    cached: Option<(f64, f64, u64)>,
    /// The recent losses in order, kept as they come and go (rebuilt from
    /// `recent` after a restore): the median is at hand, the deviations
    /// from it a merge away, and no record sorts.
    #[serde(skip)]
    sorted: Vec<f64>,
}

/// Records between two computations of the robust statistics.
const REFRESH: u64 = 8;

/// A loss jump and the baseline it was judged against.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Jump {
    record: u64,
    step: u64,
    median: f64,
    sigma: f64,
}

/// What the loss did over the trend window, for the gradient trend rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LossTrend {
    Falling,
    NotFalling,
    /// Reported, but not for a whole window yet.
    Unknown,
    /// The job reports no (finite) loss.
    Unreported,
}

impl State {
    pub fn new(rules: &Rules) -> Self {
        Self {
            recent: Vec::new(),
            head: 0,
            records: 0,
            median: None,
            pending: None,
            elevated: Latch::default(),
            smooth: None,
            smooth_min: SlidingMin::default(),
            history: Window::new(rules.grad_growth.window as usize),
            diverging: Latch::default(),
            cached: None,
            sorted: Vec::new(),
        }
    }

    /// Whether the smoothed loss fell by at least `by` (relative) over the
    /// trend window.
    pub fn trend(&self, by: f64) -> LossTrend {
        let Some(now) = self.smooth else {
            return LossTrend::Unreported;
        };
        match self.history.oldest().filter(|_| self.history.is_full()) {
            None => LossTrend::Unknown,
            Some(then) if now < then - by * then.abs() => LossTrend::Falling,
            Some(_) => LossTrend::NotFalling,
        }
    }

    /// The run's moving loss level, once the jump rule has its window.
    pub fn level(&self) -> Option<f64> {
        self.median
    }

    pub fn heap_bytes(&self) -> usize {
        self.history.heap_bytes() + 2 * self.recent.capacity() * std::mem::size_of::<f64>()
    }

    fn push(&mut self, loss: f64, window: usize) {
        self.sort_recent();
        // Only finite losses come here: `<` orders them. A count over the
        // 64 values, not a binary search: no branch on the data to mispredict.
        let at = |sorted: &[f64], x: f64| sorted.iter().map(|&y| usize::from(y < x)).sum::<usize>();
        if self.recent.len() < window {
            self.recent.push(loss);
            let i = at(&self.sorted, loss);
            self.sorted.insert(i, loss);
            return;
        }
        let old = std::mem::replace(&mut self.recent[self.head], loss);
        self.head = (self.head + 1) % window;
        // The values between the old one's place and the new one's move by one.
        let (i, j) = (at(&self.sorted, old), at(&self.sorted, loss));
        if j > i {
            self.sorted.copy_within(i + 1..j, i);
            self.sorted[j - 1] = loss;
        } else {
            self.sorted.copy_within(j..i, j + 1);
            self.sorted[j] = loss;
        }
    }

    /// `sorted` holds the recent losses (after a restore it starts empty).
    fn sort_recent(&mut self) {
        if self.sorted.len() != self.recent.len() {
            self.sorted.clone_from(&self.recent);
            self.sorted.sort_unstable_by(f64::total_cmp);
        }
    }

    /// Median and robust standard deviation of the recent losses.
    fn robust(&mut self) -> (f64, f64) {
        self.sort_recent();
        let s = &self.sorted;
        let mid = s.len() / 2;
        let median = s[mid];
        // The deviations from the median grow outward from it on both
        // sides: the `mid`-th smallest is `mid` steps of a merge away.
        let (mut below, mut above) = (mid, mid);
        let mut mad = 0.0;
        for _ in 0..=mid {
            let down = below.checked_sub(1).map(|i| median - s[i]);
            let up = s.get(above).map(|x| x - median);
            mad = match (down, up) {
                (Some(d), Some(u)) if d < u => {
                    below -= 1;
                    d
                }
                (_, Some(u)) => {
                    above += 1;
                    u
                }
                (Some(d), None) => {
                    below -= 1;
                    d
                }
                (None, None) => break,
            };
        }
        let floor = (median.abs() * 1e-3).max(f64::MIN_POSITIVE);
        (median, (MAD_SIGMA * mad).max(floor))
    }
}

pub(crate) fn check(
    state: &mut State,
    step: u64,
    loss: Option<f64>,
    last_grad_spike: Option<u64>,
    record: u64,
    rules: &Rules,
    em: &mut Emitter,
) {
    let Some(loss) = loss.filter(|l| l.is_finite()) else {
        return;
    };
    let cfg = &rules.loss_spike;
    let div = &rules.loss_divergence;
    let ready = state.recent.len() >= cfg.warmup.max(3) as usize;
    let (median, sigma) = if !ready {
        (loss, 0.0)
    } else {
        match state.cached {
            Some((m, sd, at))
                if state.records < at + REFRESH && state.pending.is_none() && loss < m + 0.5 * cfg.z * sd =>
            {
                (m, sd)
            }
            _ => {
                let (m, sd) = state.robust();
                state.cached = Some((m, sd, state.records));
                (m, sd)
            }
        }
    };
    if ready {
        state.median = Some(median);
    }

    if cfg.enabled && ready {
        judge_jump(state, step, loss, median, sigma, last_grad_spike, record, rules, em);
    }
    state.push(loss, cfg.window as usize);
    state.records += 1;

    // Divergence looks at a smoothed loss that takes in values no higher
    // than a jump's threshold, so one noisy record does not read as a trend.
    let clipped = if ready { loss.min(median + cfg.z * sigma) } else { loss };
    let smooth = match state.smooth {
        Some(s) => div.alpha * s + (1.0 - div.alpha) * clipped,
        None => clipped,
    };
    state.smooth = Some(smooth);
    state.history.push(step as f64, smooth);
    state.smooth_min.push(state.records, smooth, u64::from(div.window));
    if !div.enabled || !ready || state.records < u64::from(cfg.warmup.max(div.window / 4)) {
        return;
    }
    let Some((min_record, min)) = state.smooth_min.min() else {
        return;
    };
    // The smoothed loss's own noise: the loss's spread shrunk by the EMA.
    let noise = sigma * ((1.0 - div.alpha) / (1.0 + div.alpha)).sqrt();
    let rise = (smooth - min) / min.abs().max(f64::MIN_POSITIVE);
    let active = rise >= div.rise && smooth - min >= div.z * noise && min_record < state.records;
    if state
        .diverging
        .update_worse(active, step, rules.policy.cooldown_steps, rise)
    {
        em.hit(
            RuleId::LossDivergence,
            Severity::Critical,
            rise,
            div.rise,
            format!(
                "loss is diverging: smoothed loss {} is {:.0}% above its minimum {} of the last {} records",
                num(smooth),
                rise * 100.0,
                num(min),
                div.window
            ),
        )
        .propose(Proposal::ScaleLr);
    }
}

#[allow(clippy::too_many_arguments)]
fn judge_jump(
    state: &mut State,
    step: u64,
    loss: f64,
    median: f64,
    sigma: f64,
    last_grad_spike: Option<u64>,
    record: u64,
    rules: &Rules,
    em: &mut Emitter,
) {
    let cfg = &rules.loss_spike;
    let remind = rules.policy.cooldown_steps;
    if let Some(jump) = state.pending {
        // Still at least half as far up as a jump must be, against the
        // baseline from before it.
        let persisted = loss >= jump.median + 0.5 * cfg.z * jump.sigma
            && loss - jump.median >= 0.5 * cfg.min_rise * jump.median.abs();
        if !persisted {
            state.pending = None;
            state.elevated.update(false, step, remind);
            return;
        }
        if state.elevated.update(true, step, remind) {
            let link = u64::from(cfg.link_records);
            let linked = last_grad_spike.is_some_and(|g| g + link >= jump.record && g <= record);
            let rise = (loss - jump.median) / jump.median.abs().max(f64::MIN_POSITIVE);
            let what = format!(
                "loss {} stays {:.0}% above its median {} since step {}",
                num(loss),
                rise * 100.0,
                num(jump.median),
                jump.step
            );
            if linked {
                em.hit(
                    RuleId::LossSpike,
                    Severity::Critical,
                    rise,
                    cfg.min_rise,
                    format!("{what}, which came with a gradient spike"),
                )
                .propose(Proposal::Rollback);
            } else {
                em.hit(RuleId::LossSpike, Severity::Warning, rise, cfg.min_rise, what);
            }
        }
        return;
    }
    let z = (loss - median) / sigma;
    if z >= cfg.z && loss - median >= cfg.min_rise * median.abs() {
        state.pending = Some(Jump {
            record,
            step,
            median,
            sigma,
        });
        em.hit(
            RuleId::LossSpike,
            Severity::Info,
            z,
            cfg.z,
            format!(
                "loss {} jumped {}σ above its median {} of the last {} records",
                num(loss),
                score(z),
                num(median),
                state.recent.len()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The robust statistics by sorting, as they are defined.
    fn by_sorting(values: &[f64]) -> (f64, f64) {
        let mut v = values.to_vec();
        let mid = v.len() / 2;
        let median = *v.select_nth_unstable_by(mid, f64::total_cmp).1;
        let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
        let mad = *dev.select_nth_unstable_by(mid, f64::total_cmp).1;
        (
            median,
            (MAD_SIGMA * mad).max((median.abs() * 1e-3).max(f64::MIN_POSITIVE)),
        )
    }

    proptest! {
        #[test]
        fn the_kept_order_gives_the_sorted_statistics(
            losses in proptest::collection::vec(prop_oneof![0.0..10.0f64, Just(1.0), Just(2.5)], 1..200),
            window in 1usize..70,
        ) {
            let mut state = State::new(&Rules::default());
            for (i, &loss) in losses.iter().enumerate() {
                state.push(loss, window);
                let start = (i + 1).saturating_sub(window);
                prop_assert_eq!(state.robust(), by_sorting(&losses[start..=i]));
            }
            // After a restore the order is rebuilt from the window.
            state.sorted.clear();
            let start = losses.len().saturating_sub(window);
            prop_assert_eq!(state.robust(), by_sorting(&losses[start..]));
        }
    }
}
