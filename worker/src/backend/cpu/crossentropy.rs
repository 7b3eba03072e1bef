//! Fused softmax + cross-entropy over the real vocabulary, with an ignore index and per-position
//! loss weights.
//!
//! The loss of a batch is `Σ_i w_i·ce_i / denom` over positions whose target is not
//! [`IGNORE_INDEX`]; `denom` is chosen by the caller (the summed weights of the whole global
//! batch, so micro-batches and ranks add up to the full-batch gradient).

use rayon::prelude::*;

use super::math;

/// Target value of a position that takes no loss (prompt tokens in SFT, padding).
pub const IGNORE_INDEX: i32 = -1;

/// Per row `i` of `logits` `(N, Vp)`: `losses[i] = logsumexp(logits[i, :V]) − logits[i, target]`
/// (zero for ignored rows). With `grad`, the row is overwritten by its gradient
/// `(softmax − onehot)·w_i·scale` (padded columns and ignored rows become zero), so the logits
/// buffer doubles as `dlogits` and no second `(N, Vp)` buffer is needed.
///
/// Targets must be in `[0, V)` or equal [`IGNORE_INDEX`] (the model checks this).
pub fn softmax_crossentropy(logits: &mut [f32], losses: &mut [f32], targets: &[i32], weights: Option<&[f32]>, scale: f32, n: usize, v: usize, vp: usize, grad: bool) {
    logits[..n * vp].par_chunks_mut(vp).zip(losses[..n].par_iter_mut()).enumerate().for_each(|(i, (row, loss))| {
        let target = targets[i];
        if target == IGNORE_INDEX {
            *loss = 0.0;
            if grad {
                row.fill(0.0);
            }
            return;
        }
        let target = target as usize;
        let max = math::max(&row[..v]);
        let sum = math::exp_sum(&row[..v], max);
        *loss = sum.ln() + max - row[target];
        if grad {
            let w = weights.map_or(1.0, |w| w[i]) * scale;
            let inv = 1.0 / sum;
            for x in row[..v].iter_mut() {
                *x = math::exp(*x - max) * inv * w;
            }
            row[target] -= w;
            row[v..].fill(0.0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_formula_and_its_gradient() {
        let (n, v, vp) = (3, 5, 8);
        let logits: Vec<f32> = (0..n * vp).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let targets = [2, IGNORE_INDEX, 4];
        let weights = [0.5, 1.0, 2.0];
        let mut l = logits.clone();
        let mut losses = vec![0.0; n];
        softmax_crossentropy(&mut l, &mut losses, &targets, Some(&weights), 0.25, n, v, vp, true);
        for i in 0..n {
            let row = &logits[i * vp..i * vp + v];
            if targets[i] == IGNORE_INDEX {
                assert_eq!(losses[i], 0.0);
                assert!(l[i * vp..(i + 1) * vp].iter().all(|&g| g == 0.0));
                continue;
            }
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let want = lse - row[targets[i] as usize] as f64;
            assert!((losses[i] as f64 - want).abs() < 1e-6, "loss {i}");
            for j in 0..vp {
                let g = if j < v { ((row[j] as f64).exp() / lse.exp() - if j == targets[i] as usize { 1.0 } else { 0.0 }) * weights[i] as f64 * 0.25 } else { 0.0 };
                assert!((l[i * vp + j] as f64 - g).abs() < 1e-6, "grad {i},{j}");
            }
        }
    }
}
