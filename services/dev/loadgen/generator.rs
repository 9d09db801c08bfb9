//! The summaries a stream sends: a healthy rank with a spike every K steps.

use gradguard::proto;

/// Where job `job` of `jobs` places its spikes among every `spike_every`
/// steps: spread evenly, so that independent jobs do not spike at once.
pub(super) fn spike_offset(job: u32, jobs: u32, spike_every: u64) -> u64 {
    u64::from(job) * spike_every / u64::from(jobs.max(1))
}

/// Summaries of one healthy rank, cheaply: per-layer values come from a fixed
/// template scaled by one noisy factor per step (plus a wobble on one layer), so
/// a summary costs its three vectors and a few random numbers.
pub(super) struct Generator {
    step: u64,
    rng: u64,
    spike_every: u64,
    /// Spikes fall on steps `spike_offset + m * spike_every`, m >= 1.
    spike_offset: u64,
    /// Per-layer L2 of a step with global norm 1.
    l2: Vec<f32>,
    max_abs: Vec<f32>,
}

impl Generator {
    /// Global gradient norm of a healthy step, before noise.
    const NORM: f64 = 1.0;
    /// Relative noise of the norm: uniform within ±3 %.
    const NOISE: f64 = 0.03;
    /// Norm multiplier on a spike step.
    const SPIKE: f64 = 50.0;

    pub(super) fn new(stream: u32, layers: usize, first_step: u64, spike_every: u64, spike_offset: u64) -> Self {
        let mut generator = Self {
            step: first_step,
            // xorshift needs a non-zero state; mix the stream index in.
            rng: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(stream) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            spike_every,
            spike_offset,
            l2: Vec::with_capacity(layers),
            max_abs: Vec::with_capacity(layers),
        };
        // Deeper layers a little larger, each with its own jitter; normalised so
        // the layers' L2 norms compose to the global norm.
        let raw: Vec<f64> = (0..layers)
            .map(|l| (0.5 + l as f64 / layers as f64) * (1.0 + 0.2 * generator.uniform()))
            .collect();
        let total = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        for x in raw {
            let l2 = x / total * Self::NORM;
            generator.l2.push(l2 as f32);
            generator.max_abs.push((l2 * 0.05) as f32);
        }
        generator
    }

    /// Uniform in [-1, 1), xorshift64*.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let bits = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 52) as f64 - 1.0
    }

    pub(super) fn next(&mut self, time: f64) -> proto::Summary {
        let step = self.step;
        self.step += 1;
        let spike = self.spike_every != 0
            && step > self.spike_offset
            && (step - self.spike_offset).is_multiple_of(self.spike_every);
        let noise = 1.0 + Self::NOISE * self.uniform();
        let scale = if spike { noise * Self::SPIKE } else { noise };
        let s = scale as f32;
        let mut layer_l2: Vec<f32> = self.l2.iter().map(|&x| x * s).collect();
        let layer_max_abs: Vec<f32> = self.max_abs.iter().map(|&x| x * s).collect();
        if !layer_l2.is_empty() {
            let wobble = self.uniform();
            let l = ((wobble + 1.0) / 2.0 * layer_l2.len() as f64) as usize % layer_l2.len();
            layer_l2[l] *= (1.0 + 0.02 * wobble) as f32;
        }
        // A loss starting near 3.0 and falling slowly towards 2.5.
        let loss = 2.5 + 0.5 * (-(step as f64) / 50_000.0).exp() + 0.005 * self.uniform();
        proto::Summary {
            step,
            time,
            loss: Some(loss),
            lr: Some(3e-4),
            loss_scale: None,
            grad_norm: Some(Self::NORM * scale),
            layer_nonfinite: vec![0; layer_l2.len()],
            layer_l2,
            layer_max_abs,
            layer_param_norm: Vec::new(),
            layer_update_norm: Vec::new(),
        }
    }
}
