//! AdamW, the learning-rate schedule and global-norm clipping.

use rayon::prelude::*;

use crate::collective::overlap;
use crate::model::params::{ParamKind, ParamLayout};
pub use liandan_plan::training::{AdamWConfig, LrSchedule};

/// AdamW state: first and second moments of the parameters in the flat layout, or of one
/// shard of them (ZeRO-1: each rank of a data-parallel group keeps and updates its own).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// `m`: running mean of gradients, element `i` of it for parameter `shard.start + i`.
    pub m: Vec<f32>,
    /// `v`: running mean of squared gradients, indexed as `m`.
    pub v: Vec<f32>,
    /// Updates applied so far (the `t` of bias correction).
    pub t: u64,
    /// The parameters this optimizer updates (all of them unless sharded).
    pub shard: std::ops::Range<usize>,
    /// Per-element weight-decay flag spans within `shard`: `(range, decays)` in layout order.
    spans: Vec<(std::ops::Range<usize>, bool)>,
}

/// Elements per parallel task of the update.
const CHUNK: usize = 1 << 15;

impl AdamW {
    pub fn new(config: AdamWConfig, layout: &ParamLayout) -> Self {
        Self::sharded(config, layout, 0..layout.len())
    }

    /// An optimizer of the parameters `shard` only (a range of the flat layout).
    pub fn sharded(config: AdamWConfig, layout: &ParamLayout, shard: std::ops::Range<usize>) -> Self {
        let spans = ParamKind::ALL.iter().map(|&k| (overlap(&layout.range(k), &shard), k.decays())).filter(|(r, _)| !r.is_empty()).collect();
        AdamW { config, m: vec![0.0; shard.len()], v: vec![0.0; shard.len()], t: 0, shard, spans }
    }

    /// One update with learning rate `lr` of the parameters in `shard` (`params` and `grads`
    /// are the whole flat layout), in PyTorch's `torch.optim.AdamW` order:
    /// `p ← p·(1 − lr·wd)`, then `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        self.t += 1;
        let c = &self.config;
        let bc1 = 1.0 - (c.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(self.t as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1, c.beta2, c.eps);
        for (range, decays) in &self.spans {
            let decay = if *decays { 1.0 - lr * c.weight_decay } else { 1.0 };
            let r = range.clone();
            let own = r.start - self.shard.start..r.end - self.shard.start;
            params[r.clone()].par_chunks_mut(CHUNK).zip(grads[r].par_chunks(CHUNK)).zip(self.m[own.clone()].par_chunks_mut(CHUNK).zip(self.v[own].par_chunks_mut(CHUNK))).for_each(
                |((p, g), (m, v))| {
                    for i in 0..p.len() {
                        let gi = g[i];
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let denom = v[i].sqrt() / bc2_sqrt + eps;
                        p[i] = p[i] * decay - step_size * m[i] / denom;
                    }
                },
            );
        }
    }
}

/// The global L2 norm of `grads`, summed in f64 over fixed chunks in order (deterministic).
pub fn global_norm(grads: &[f32]) -> f32 {
    sum_of_squares(grads).sqrt() as f32
}

/// `Σ g²` in f64 over fixed chunks in order (deterministic): one shard's part of the squared norm.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads.par_chunks(CHUNK).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    partial.iter().sum::<f64>()
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    scale_to_norm(grads, norm, max_norm);
    norm
}

/// [`clip_grad_norm`]'s scaling of `grads` when their norm (over every shard) is `norm`.
pub fn scale_to_norm(grads: &mut [f32], norm: f32, max_norm: f32) {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = LrSchedule { max_lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 10 };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(7) - 0.55).abs() < 1e-6, "midpoint of the cosine is the mean");
        assert_eq!(s.lr(10), 0.1);
    }

    #[test]
    fn clipping_rescales_to_the_max_norm() {
        let mut g = vec![3.0, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let mut small = vec![0.3, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        // With bias correction, the first step is lr·sign(g) (up to eps) plus decay on decayed tensors.
        let cfg = crate::GptConfig::new(4, 2, 1, 1, 2);
        let layout = ParamLayout::new(&cfg);
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, ..Default::default() }, &layout);
        let mut p = vec![1.0; layout.len()];
        let g: Vec<f32> = (0..layout.len()).map(|i| if i % 2 == 0 { 2.0 } else { -3.0 }).collect();
        opt.step(&mut p, &g, 0.1);
        for kind in ParamKind::ALL {
            for i in layout.range(kind) {
                let decayed = if kind.decays() { 1.0 - 0.1 * 0.5 } else { 1.0 };
                let want = decayed - 0.1 * g[i].signum();
                assert!((p[i] - want).abs() < 1e-6, "{kind:?}[{i}]: {} vs {want}", p[i]);
            }
        }
    }
}
