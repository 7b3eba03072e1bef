//! Rotary position embeddings in Hugging Face's `rotate_half` convention (Llama, Qwen2): in each
//! head of size `hs`, channel `i < hs/2` pairs with `i + hs/2`, and position `p` rotates the pair
//! by the angle `p·θ^(-2i/hs)`:
//!
//! `x'[i] = x[i]·cos − x[i+hs/2]·sin`, `x'[i+hs/2] = x[i+hs/2]·cos + x[i]·sin`.
//!
//! The rotation is orthogonal, so the backward is the rotation by the opposite angle; nothing is
//! saved for it. Queries and keys are rotated in place inside the fused `(N, Dqkv)` rows.

use rayon::prelude::*;

/// `cos` and `sin` of every angle, `(maxT, hs/2)` each.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    /// The table for positions `0..max_t`. The inverse frequencies are computed in f32 as
    /// Hugging Face does (`1 / θ^(2i/hs)`), the angles as their f32 product with the position,
    /// and cos/sin of that angle rounded once from f64.
    pub fn new(max_t: usize, hs: usize, theta: f64) -> Self {
        let half = hs / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / hs as f32)).collect();
        let (mut cos, mut sin) = (vec![0.0; max_t * half], vec![0.0; max_t * half]);
        for p in 0..max_t {
            for i in 0..half {
                let a = (p as f32 * inv[i]) as f64;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        RopeTable { cos, sin, half }
    }
}

/// Rotates heads `0..heads` of width `hs` that start at column `col0` of each row of `x`
/// (`rows` rows of `stride` floats; row `r` is at position `pos0 + r % t`). `inverse` rotates
/// by the opposite angle (the backward).
pub fn rope_apply(x: &mut [f32], table: &RopeTable, rows: usize, t: usize, stride: usize, col0: usize, heads: usize, pos0: usize, inverse: bool) {
    let half = table.half;
    let sign = if inverse { -1.0 } else { 1.0 };
    x[..rows * stride].par_chunks_mut(stride).enumerate().with_min_len(8).for_each(|(r, row)| {
        let p = pos0 + r % t;
        let (cos, sin) = (&table.cos[p * half..(p + 1) * half], &table.sin[p * half..(p + 1) * half]);
        for h in 0..heads {
            let head = &mut row[col0 + h * 2 * half..col0 + (h + 1) * 2 * half];
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, s) = (a[i], b[i], sign * sin[i]);
                a[i] = x1 * cos[i] - x2 * s;
                b[i] = x2 * cos[i] + x1 * s;
            }
        }
    });
}

/// Forward on a fused `(B·T, (NH + 2·NKV)·hs)` buffer: the queries (first `NH` heads) and keys
/// (next `NKV`); values stay as they are.
pub fn rope_forward(qkv: &mut [f32], table: &RopeTable, b: usize, t: usize, nh: usize, nkv: usize, hs: usize, pos0: usize) {
    rope_apply(qkv, table, b * t, t, (nh + 2 * nkv) * hs, 0, nh + nkv, pos0, false);
}

/// Backward of [`rope_forward`] on the gradient `dqkv`, in place.
pub fn rope_backward(dqkv: &mut [f32], table: &RopeTable, b: usize, t: usize, nh: usize, nkv: usize, hs: usize) {
    rope_apply(dqkv, table, b * t, t, (nh + 2 * nkv) * hs, 0, nh + nkv, 0, true);
}

/// Plain f64 reference of one head at position `p` (`x` of width `hs`), straight from the
/// formula: `x·cos(pφ) + rotate_half(x)·sin(pφ)` with `rotate_half(x) = (−x₂, x₁)`.
pub fn rope_reference(x: &[f32], p: usize, theta: f64) -> Vec<f64> {
    let hs = x.len();
    let half = hs / 2;
    (0..hs)
        .map(|j| {
            let i = j % half;
            let a = p as f64 * theta.powf(-((2 * i) as f64) / hs as f64);
            let rot = if j < half { -(x[j + half] as f64) } else { x[j - half] as f64 };
            x[j] as f64 * a.cos() + rot * a.sin()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::randn;

    #[test]
    fn forward_matches_reference_and_backward_is_the_transpose() {
        let (b, t, nh, nkv, hs, theta) = (2, 9, 4, 2, 8, 10_000.0);
        let d = (nh + 2 * nkv) * hs;
        let table = RopeTable::new(t, hs, theta);
        let x = randn(b * t * d, 7);
        let mut y = x.clone();
        rope_forward(&mut y, &table, b, t, nh, nkv, hs, 0);
        for r in 0..b * t {
            for h in 0..nh + 2 * nkv {
                let at = r * d + h * hs;
                let want: Vec<f64> = if h < nh + nkv { rope_reference(&x[at..at + hs], r % t, theta) } else { x[at..at + hs].iter().map(|v| *v as f64).collect() };
                for j in 0..hs {
                    // f32 angles up to 8 rad: ~1e-6 absolute in cos/sin.
                    assert!((y[at + j] as f64 - want[j]).abs() < 1e-5, "row {r} head {h} ch {j}: {} vs {}", y[at + j], want[j]);
                }
            }
        }
        // The backward of a linear map is its transpose: <R·x, g> = <x, Rᵀ·g> for any g, which
        // is the finite-difference check of a linear op done exactly.
        let g = randn(b * t * d, 8);
        let mut gt = g.clone();
        rope_backward(&mut gt, &table, b, t, nh, nkv, hs);
        let lhs: f64 = y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = x.iter().zip(&gt).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        // And a direct central difference on one coordinate of the loss <rope(x), g>.
        let h = 1e-2f32;
        for k in (0..x.len()).step_by(13) {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[k] += h;
            m[k] -= h;
            rope_forward(&mut p, &table, b, t, nh, nkv, hs, 0);
            rope_forward(&mut m, &table, b, t, nh, nkv, hs, 0);
            let f = |v: &[f32]| v.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            let fd = (f(&p) - f(&m)) / (2.0 * h as f64);
            assert!((fd - gt[k] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "d[{k}]: {} vs {fd}", gt[k]);
        }
    }
}
