//! The rule catalogue. Each file holds one rule family's state and check; the
//! per-rank rules run in [`crate::engine::worker`], the cross-rank rules in
//! [`ranks`].

pub(crate) mod blowup;
pub(crate) mod grad;
pub(crate) mod layers;
pub(crate) mod loss;
pub(crate) mod loss_scale;
pub(crate) mod nonfinite;
pub(crate) mod ranks;

use crate::model::Summary;

/// What every per-rank rule reads from one summary, computed once.
pub(crate) struct Obs<'a> {
    pub s: &'a Summary,
    /// The global norm: the reported one, or the root of the sum of squared
    /// layer norms when only layers were sent.
    pub global_norm: Option<f64>,
}

impl<'a> Obs<'a> {
    pub fn new(s: &'a Summary) -> Self {
        let global_norm = s.grad_norm.or_else(|| {
            (!s.layers.is_empty()).then(|| s.layers.iter().map(|l| f64::from(l.l2).powi(2)).sum::<f64>().sqrt())
        });
        Self { s, global_norm }
    }
}
