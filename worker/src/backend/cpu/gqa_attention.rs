//! Causal grouped-query attention (Llama, Qwen2): `NH` query heads share `NKV` key/value heads,
//! query head `h` reading key/value head `h / (NH/NKV)`. With `NKV = NH` it is ordinary
//! multi-head attention over a different buffer layout than GPT-2's [`super::attention`].
//!
//! Shapes: `qkv` is `(B, T, Dqkv)` with `Dqkv = (NH + 2·NKV)·hs`, the queries in the first
//! `NH·hs` columns, then the keys, then the values; `att` is `(B, NH, T, T)`; `out` is
//! `(B, T, NH·hs)`.
//!
//! The forward runs one task per `(b, h)`; the backward one per `(b, kv head)`, looping over
//! the query heads of its group, so the key and value gradients that several heads share are
//! summed by one task in a fixed order (no races, deterministic).

use rayon::prelude::*;

use super::mat::{MatMut, MatRef, Par, matmul};
use super::math;

/// Sizes of one grouped-query attention.
#[derive(Debug, Clone, Copy)]
pub struct Gqa {
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

impl Gqa {
    /// Columns of one fused `qkv` row.
    pub fn dqkv(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }
    fn group(&self) -> usize {
        self.nh / self.nkv
    }
    /// Column of query head `h`, key head `g`, value head `g` within a row.
    fn q_col(&self, h: usize) -> usize {
        h * self.hs
    }
    fn k_col(&self, g: usize) -> usize {
        (self.nh + g) * self.hs
    }
    fn v_col(&self, g: usize) -> usize {
        (self.nh + self.nkv + g) * self.hs
    }
}

/// Forward. `att` keeps the softmax probabilities for the backward.
pub fn gqa_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, s: Gqa) {
    let (d, c) = (s.dqkv(), s.nh * s.hs);
    assert!(qkv.len() >= b * t * d && out.len() >= b * t * c && att.len() >= b * s.nh * t * t);
    let scale = 1.0 / (s.hs as f32).sqrt();
    let (out_p, att_p, qkv_p) = (Ptr(out.as_mut_ptr()), Ptr(att.as_mut_ptr()), qkv.as_ptr() as usize);
    (0..b * s.nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / s.nh, bh % s.nh);
        let g = h / s.group();
        // SAFETY: offsets stay inside the asserted lengths; task (b, h) writes only its own T×T
        // block of `att` and its own head's columns of `out`.
        unsafe {
            let base = (qkv_p as *const f32).add(bi * t * d);
            let q = MatRef::strided(base.add(s.q_col(h)), t, s.hs, d);
            let k = MatRef::strided(base.add(s.k_col(g)), t, s.hs, d);
            let v = MatRef::strided(base.add(s.v_col(g)), t, s.hs, d);
            let a_ptr = att_p.get().add(bh * t * t);
            matmul(MatMut::strided(a_ptr, t, t, t), q, k.t(), false, scale, Par::Serial);
            let a = std::slice::from_raw_parts_mut(a_ptr, t * t);
            for (i, row) in a.chunks_mut(t).enumerate() {
                softmax_causal_row(row, i);
            }
            let o = MatMut::strided(out_p.get().add(bi * t * c + h * s.hs), t, s.hs, c);
            matmul(o, MatRef::strided(a_ptr, t, t, t), v, false, 1.0, Par::Serial);
        }
    });
}

/// Softmax of `row[..=i]` in place; `row[i+1..]` (future positions) set to zero.
fn softmax_causal_row(row: &mut [f32], i: usize) {
    let (live, masked) = row.split_at_mut(i + 1);
    let max = math::max(live);
    for x in live.iter_mut() {
        *x = math::exp(*x - max);
    }
    let inv = 1.0 / math::sum(live);
    live.iter_mut().for_each(|x| *x *= inv);
    masked.fill(0.0);
}

/// Backward: `dqkv` (overwritten) from `dout`; `datt` is `(B, NH, T, T)` scratch.
pub fn gqa_backward(dqkv: &mut [f32], datt: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], b: usize, t: usize, s: Gqa) {
    let (d, c) = (s.dqkv(), s.nh * s.hs);
    assert!(dqkv.len() >= b * t * d && dout.len() >= b * t * c && datt.len() >= b * s.nh * t * t);
    assert!(qkv.len() >= b * t * d && att.len() >= b * s.nh * t * t);
    let scale = 1.0 / (s.hs as f32).sqrt();
    let (dqkv_p, datt_p) = (Ptr(dqkv.as_mut_ptr()), Ptr(datt.as_mut_ptr()));
    let (qkv_p, att_p, dout_p) = (qkv.as_ptr() as usize, att.as_ptr() as usize, dout.as_ptr() as usize);
    (0..b * s.nkv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / s.nkv, bg % s.nkv);
        // SAFETY: task (b, g) writes only the key/value columns of kv head g, the query
        // columns of the heads of its group, and those heads' T×T blocks of `datt`.
        unsafe {
            let base = (qkv_p as *const f32).add(bi * t * d);
            let dbase = dqkv_p.get().add(bi * t * d);
            let k = MatRef::strided(base.add(s.k_col(g)), t, s.hs, d);
            let v = MatRef::strided(base.add(s.v_col(g)), t, s.hs, d);
            let (dk, dv) = (MatMut::strided(dbase.add(s.k_col(g)), t, s.hs, d), MatMut::strided(dbase.add(s.v_col(g)), t, s.hs, d));
            for (j, h) in (g * s.group()..(g + 1) * s.group()).enumerate() {
                let acc = j > 0;
                let bh = bi * s.nh + h;
                let q = MatRef::strided(base.add(s.q_col(h)), t, s.hs, d);
                let a = MatRef::strided((att_p as *const f32).add(bh * t * t), t, t, t);
                let gout = MatRef::strided((dout_p as *const f32).add(bi * t * c + h * s.hs), t, s.hs, c);
                let dq = MatMut::strided(dbase.add(s.q_col(h)), t, s.hs, d);
                let da_ptr = datt_p.get().add(bh * t * t);
                // dV += attᵀ·dout ; datt = dout·Vᵀ
                matmul(dv, a.t(), gout, acc, 1.0, Par::Serial);
                matmul(MatMut::strided(da_ptr, t, t, t), gout, v.t(), false, 1.0, Par::Serial);
                // Softmax backward in place: dpre = att ⊙ (datt − Σ_j att·datt), times 1/√hs.
                let da = std::slice::from_raw_parts_mut(da_ptr, t * t);
                let arows = std::slice::from_raw_parts(a.ptr, t * t);
                for i in 0..t {
                    let (ar, dr) = (&arows[i * t..i * t + t], &mut da[i * t..i * t + t]);
                    let dot = math::dot(&ar[..=i], &dr[..=i]);
                    for jj in 0..=i {
                        dr[jj] = ar[jj] * (dr[jj] - dot) * scale;
                    }
                    dr[i + 1..].fill(0.0);
                }
                let dpre = MatRef::strided(da_ptr, t, t, t);
                // dQ = dpre·K ; dK += dpreᵀ·Q
                matmul(dq, dpre, k, false, 1.0, Par::Serial);
                matmul(dk, dpre.t(), q, acc, 1.0, Par::Serial);
            }
        }
    });
}

/// Attention of `n` new tokens at positions `pos0..pos0+n` against a KV cache that already
/// holds positions `0..pos0` and into which the new keys and values have been written.
///
/// - `out`: `(n, NH·hs)`; `q`: `(n, Dqkv)` rows whose first `NH·hs` columns are the queries
/// - `k_cache`, `v_cache`: `(maxT, NKV·hs)`; `scores`: scratch of at least `NH·(pos0+n)` floats
pub fn gqa_forward_cached(out: &mut [f32], scores: &mut [f32], q: &[f32], k_cache: &[f32], v_cache: &[f32], pos0: usize, n: usize, s: Gqa) {
    let (d, c, kvw) = (s.dqkv(), s.nh * s.hs, s.nkv * s.hs);
    let scale = 1.0 / (s.hs as f32).sqrt();
    let total = pos0 + n;
    for i in 0..n {
        let len = pos0 + i + 1;
        let orow = &mut out[i * c..(i + 1) * c];
        orow.par_chunks_mut(s.hs).zip(scores[..s.nh * total].par_chunks_mut(total)).enumerate().for_each(|(h, (o, sc))| {
            let g = h / s.group();
            let qh = &q[i * d + h * s.hs..i * d + (h + 1) * s.hs];
            for j in 0..len {
                sc[j] = math::dot(qh, &k_cache[j * kvw + g * s.hs..j * kvw + (g + 1) * s.hs]) * scale;
            }
            softmax_causal_row(&mut sc[..len], len - 1);
            o.fill(0.0);
            for j in 0..len {
                let vh = &v_cache[j * kvw + g * s.hs..j * kvw + (g + 1) * s.hs];
                let p = sc[j];
                for e in 0..s.hs {
                    o[e] += p * vh[e];
                }
            }
        });
    }
}

/// Plain reference of [`gqa_forward`] (f64 accumulation), for tests.
pub fn gqa_reference(qkv: &[f32], b: usize, t: usize, s: Gqa) -> Vec<f64> {
    let (d, c) = (s.dqkv(), s.nh * s.hs);
    let scale = 1.0 / (s.hs as f64).sqrt();
    let mut out = vec![0.0; b * t * c];
    for bi in 0..b {
        for h in 0..s.nh {
            let g = h / s.group();
            for i in 0..t {
                let q = &qkv[(bi * t + i) * d + s.q_col(h)..][..s.hs];
                let mut w: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &qkv[(bi * t + j) * d + s.k_col(g)..][..s.hs];
                        q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                    })
                    .collect();
                let max = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = w.iter().sum();
                for e in 0..s.hs {
                    out[(bi * t + i) * c + h * s.hs + e] = (0..=i).map(|j| w[j] / sum * qkv[(bi * t + j) * d + s.v_col(g) + e] as f64).sum();
                }
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: tasks write disjoint regions (see each use); the buffers outlive the parallel loop.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::randn;

    const SHAPES: [(usize, usize, Gqa); 3] = [(1, 1, Gqa { nh: 2, nkv: 1, hs: 4 }), (2, 7, Gqa { nh: 4, nkv: 2, hs: 4 }), (2, 9, Gqa { nh: 6, nkv: 6, hs: 8 })];

    #[test]
    fn forward_matches_reference() {
        for &(b, t, s) in &SHAPES {
            let qkv = randn(b * t * s.dqkv(), 11);
            let mut out = vec![0.0; b * t * s.nh * s.hs];
            let mut att = vec![0.0; b * s.nh * t * t];
            gqa_forward(&mut out, &mut att, &qkv, b, t, s);
            for (a, w) in out.iter().zip(gqa_reference(&qkv, b, t, s)) {
                // f32 softmax and short dot products against f64.
                assert!((*a as f64 - w).abs() < 2e-5 * (1.0 + w.abs()), "{a} vs {w}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(b, t, s) in &SHAPES[1..] {
            let qkv = randn(b * t * s.dqkv(), 21);
            let dout = randn(b * t * s.nh * s.hs, 22);
            let mut out = vec![0.0; dout.len()];
            let mut att = vec![0.0; b * s.nh * t * t];
            gqa_forward(&mut out, &mut att, &qkv, b, t, s);
            let (mut dqkv, mut datt) = (vec![f32::NAN; qkv.len()], vec![0.0; att.len()]);
            gqa_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, s);
            let loss = |x: &[f32]| gqa_reference(x, b, t, s).iter().zip(&dout).map(|(a, g)| a * *g as f64).sum::<f64>();
            for idx in (0..qkv.len()).step_by(5) {
                let h = 1e-2f32;
                let (mut p, mut m) = (qkv.clone(), qkv.clone());
                p[idx] += h;
                m[idx] -= h;
                let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
                // Central differences with h = 1e-2: O(h²) truncation on O(1) curvature.
                assert!((fd - dqkv[idx] as f64).abs() < 2e-3 + 1e-2 * fd.abs(), "dqkv[{idx}]: {} vs {fd}", dqkv[idx]);
            }
        }
    }

    #[test]
    fn cached_matches_full_forward() {
        let (t, s) = (9, Gqa { nh: 4, nkv: 2, hs: 4 });
        let (d, c, kvw) = (s.dqkv(), s.nh * s.hs, s.nkv * s.hs);
        let qkv = randn(t * d, 31);
        let mut full = vec![0.0; t * c];
        let mut att = vec![0.0; s.nh * t * t];
        gqa_forward(&mut full, &mut att, &qkv, 1, t, s);
        let (mut kc, mut vc) = (vec![0.0; t * kvw], vec![0.0; t * kvw]);
        for i in 0..t {
            kc[i * kvw..(i + 1) * kvw].copy_from_slice(&qkv[i * d + c..i * d + c + kvw]);
            vc[i * kvw..(i + 1) * kvw].copy_from_slice(&qkv[i * d + c + kvw..(i + 1) * d]);
        }
        let mut out = vec![0.0; t * c];
        let mut scores = vec![0.0; s.nh * t];
        gqa_forward_cached(&mut out[..4 * c], &mut scores, &qkv[..4 * d], &kc, &vc, 0, 4, s);
        for i in 4..t {
            gqa_forward_cached(&mut out[i * c..(i + 1) * c], &mut scores, &qkv[i * d..(i + 1) * d], &kc, &vc, i, 1, s);
        }
        for (a, b) in out.iter().zip(&full) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
