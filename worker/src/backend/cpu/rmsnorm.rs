//! RMSNorm over the channel dimension (Llama's and Qwen2's normalisation):
//! `out = x · rstd · weight` with `rstd = 1/√(mean(x²) + eps)`; no mean subtraction, no bias.

use rayon::prelude::*;

use super::COL_CHUNK;
use super::math;

/// Forward. `out`, `inp`: `(N, C)`; `rstd`: `(N)` saved for the backward; `weight`: `(C)`.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], n: usize, c: usize, eps: f32) {
    out[..n * c].par_chunks_mut(c).zip(inp[..n * c].par_chunks(c)).zip(rstd[..n].par_iter_mut()).with_min_len(8).for_each(|((o, x), s)| {
        let ms = math::sum_sq_dev(x, 0.0) / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            // Hugging Face rounds the normalised value before the weight multiplies it.
            o[i] = weight[i] * (x[i] * r);
        }
        *s = r;
    });
}

/// Backward of [`rmsnorm_forward`]:
/// - `dinp += rstd·(w·g − x̂·mean(w·g·x̂))` with `x̂ = x·rstd` (accumulated into the residual
///   stream's gradient)
/// - `dweight += Σ_rows g·x̂`
pub fn rmsnorm_backward(dinp: &mut [f32], dweight: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], rstd: &[f32], n: usize, c: usize) {
    dinp[..n * c].par_chunks_mut(c).zip(dout[..n * c].par_chunks(c).zip(inp[..n * c].par_chunks(c))).zip(rstd[..n].par_iter()).with_min_len(8).for_each(|((di, (g, x)), &r)| {
        let mut dot = 0.0f32;
        for i in 0..c {
            dot += weight[i] * g[i] * x[i] * r;
        }
        let mean = dot / c as f32;
        for i in 0..c {
            di[i] += r * (weight[i] * g[i] - x[i] * r * mean);
        }
    });
    // dweight column-parallel in a fixed row order (deterministic whatever the thread count).
    dweight[..c].par_chunks_mut(COL_CHUNK).enumerate().for_each(|(ci, dw)| {
        let c0 = ci * COL_CHUNK;
        for row in 0..n {
            let (g, x, r) = (&dout[row * c + c0..], &inp[row * c + c0..], rstd[row]);
            for j in 0..dw.len() {
                dw[j] += g[j] * x[j] * r;
            }
        }
    });
}

/// Plain reference of [`rmsnorm_forward`] in f64, for tests.
pub fn rmsnorm_reference(inp: &[f32], weight: &[f32], n: usize, c: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; n * c];
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            out[row * c + i] = x[i] as f64 * r * weight[i] as f64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::randn;

    #[test]
    fn forward_matches_reference_and_backward_matches_finite_differences() {
        let (n, c, eps) = (5, 37, 1e-6);
        let x = randn(n * c, 1);
        let w: Vec<f32> = randn(c, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
        let g = randn(n * c, 3);
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, eps as f32);
        let want = rmsnorm_reference(&x, &w, n, c, eps);
        for (a, b) in out.iter().zip(&want) {
            // f32 sums of 37 squares against f64: a few ulps.
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let (mut dx, mut dw) = (vec![0.5; n * c], vec![0.25; c]);
        rmsnorm_backward(&mut dx, &mut dw, &g, &x, &w, &rstd, n, c);
        let loss = |x: &[f32], w: &[f32]| rmsnorm_reference(x, w, n, c, eps).iter().zip(&g).map(|(o, g)| o * *g as f64).sum::<f64>();
        let h = 1e-3f32;
        for i in (0..n * c).step_by(3) {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p, &w) - loss(&m, &w)) / (2.0 * h as f64);
            // O(h²) truncation on O(1) curvature plus f32 rounding of the perturbed input.
            assert!((dx[i] as f64 - 0.5 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "dx[{i}]: {} vs {fd}", dx[i] - 0.5);
        }
        for i in 0..c {
            let (mut p, mut m) = (w.clone(), w.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&x, &p) - loss(&x, &m)) / (2.0 * h as f64);
            assert!((dw[i] as f64 - 0.25 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "dw[{i}]: {} vs {fd}", dw[i] - 0.25);
        }
    }
}
