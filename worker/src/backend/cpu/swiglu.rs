//! SwiGLU, the Llama MLP's activation: `out = silu(gate) · up` with `silu(g) = g·σ(g)`. The
//! input is the fused `(N, 2I)` projection, gate in the first `I` columns and up in the last.

use rayon::prelude::*;

use super::math;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + math::exp(-x))
}

/// `out (N, I) = silu(inp[:, :I]) · inp[:, I:]`.
pub fn swiglu_forward(out: &mut [f32], inp: &[f32], n: usize, i: usize) {
    out[..n * i].par_chunks_mut(i).zip(inp[..n * 2 * i].par_chunks(2 * i)).with_min_len(4).for_each(|(o, x)| {
        let (gate, up) = x.split_at(i);
        for k in 0..i {
            o[k] = gate[k] * sigmoid(gate[k]) * up[k];
        }
    });
}

/// `dinp (N, 2I)` (overwritten) from `dout (N, I)`: `dgate = dout·up·σ(g)·(1 + g·(1 − σ(g)))`,
/// `dup = dout·silu(g)`.
pub fn swiglu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], n: usize, i: usize) {
    dinp[..n * 2 * i].par_chunks_mut(2 * i).zip(inp[..n * 2 * i].par_chunks(2 * i).zip(dout[..n * i].par_chunks(i))).with_min_len(4).for_each(|(d, (x, g))| {
        let (gate, up) = x.split_at(i);
        let (dgate, dup) = d.split_at_mut(i);
        for k in 0..i {
            let s = sigmoid(gate[k]);
            dgate[k] = g[k] * up[k] * s * (1.0 + gate[k] * (1.0 - s));
            dup[k] = g[k] * gate[k] * s;
        }
    });
}

/// Plain f64 reference of [`swiglu_forward`], for tests.
pub fn swiglu_reference(inp: &[f32], n: usize, i: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * i];
    for r in 0..n {
        for k in 0..i {
            let (g, u) = (inp[r * 2 * i + k] as f64, inp[r * 2 * i + i + k] as f64);
            out[r * i + k] = g / (1.0 + (-g).exp()) * u;
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
        let (n, i) = (3, 11);
        let x: Vec<f32> = randn(n * 2 * i, 4).iter().map(|v| 2.0 * v).collect();
        let g = randn(n * i, 5);
        let mut out = vec![0.0; n * i];
        swiglu_forward(&mut out, &x, n, i);
        for (a, b) in out.iter().zip(swiglu_reference(&x, n, i)) {
            // The polynomial exp is within 2e-7 relative.
            assert!((*a as f64 - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let mut dx = vec![0.0; n * 2 * i];
        swiglu_backward(&mut dx, &x, &g, n, i);
        let loss = |x: &[f32]| swiglu_reference(x, n, i).iter().zip(&g).map(|(o, g)| o * *g as f64).sum::<f64>();
        let h = 1e-3f32;
        for k in 0..x.len() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[k] += h;
            m[k] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
            // O(h²) truncation plus the f32 rounding of the perturbed inputs.
            assert!((dx[k] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "dx[{k}]: {} vs {fd}", dx[k]);
        }
    }
}
