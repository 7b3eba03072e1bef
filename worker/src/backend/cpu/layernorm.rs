//! LayerNorm over the channel dimension, eps = 1e-5 (GPT-2's).

use rayon::prelude::*;

use super::COL_CHUNK;
use super::math;

pub const EPS: f32 = 1e-5;

/// `out = (inp - mean) · rstd · weight + bias` per row.
///
/// - `out`, `inp`: `(N, C)`; `mean`, `rstd`: `(N)` saved for the backward
/// - `weight`, `bias`: `(C)`
pub fn layernorm_forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], n: usize, c: usize) {
    out[..n * c].par_chunks_mut(c).zip(inp[..n * c].par_chunks(c)).zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut())).with_min_len(8).for_each(|((o, x), (m, s))| {
        // Two passes (mean, then squared deviations): stable without Welford for rows this short.
        let mu = math::sum(x) / c as f32;
        let var = math::sum_sq_dev(x, mu) / c as f32;
        let r = 1.0 / (var + EPS).sqrt();
        for i in 0..c {
            o[i] = (x[i] - mu) * r * weight[i] + bias[i];
        }
        *m = mu;
        *s = r;
    });
}

/// Backward of [`layernorm_forward`]:
/// - `dinp += …` (accumulated: the residual stream's gradient arrives from two branches)
/// - `dweight += Σ_rows dout·x̂`, `dbias += Σ_rows dout`
pub fn layernorm_backward(dinp: &mut [f32], dweight: &mut [f32], dbias: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], mean: &[f32], rstd: &[f32], n: usize, c: usize) {
    dinp[..n * c].par_chunks_mut(c).zip(dout[..n * c].par_chunks(c).zip(inp[..n * c].par_chunks(c))).zip(mean[..n].par_iter().zip(rstd[..n].par_iter())).with_min_len(8).for_each(
        |((di, (g, x)), (&mu, &r))| {
            let mut dnorm_mean = 0.0f32;
            let mut dnorm_norm_mean = 0.0f32;
            for i in 0..c {
                let norm = (x[i] - mu) * r;
                let dnorm = weight[i] * g[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= c as f32;
            dnorm_norm_mean /= c as f32;
            for i in 0..c {
                let norm = (x[i] - mu) * r;
                let dnorm = weight[i] * g[i];
                di[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
            }
        },
    );
    // Parameter gradients: column-parallel, rows in order (deterministic for any thread count).
    dweight[..c].par_chunks_mut(COL_CHUNK).zip(dbias[..c].par_chunks_mut(COL_CHUNK)).enumerate().for_each(|(ci, (dw, db))| {
        let c0 = ci * COL_CHUNK;
        for row in 0..n {
            let (mu, r) = (mean[row], rstd[row]);
            let base = row * c + c0;
            for j in 0..dw.len() {
                let g = dout[base + j];
                dw[j] += g * (inp[base + j] - mu) * r;
                db[j] += g;
            }
        }
    });
}
