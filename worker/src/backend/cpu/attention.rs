//! Causal multi-head self-attention.
//!
//! Per `(b, h)` pair the forward is three small matmuls and a masked softmax:
//! `pre = Q·Kᵀ/√hs`, `att = softmax(pre)` over `j <= i`, `out = att·V`. Pairs run in parallel,
//! each matmul on its own thread, so the work is split into `B·NH` independent tasks that write
//! disjoint regions.
//!
//! Shapes: `qkv` is `(B, T, 3C)` with Q, K, V side by side; `att` is `(B, NH, T, T)` (laid out
//! for the batch's `T`, so a smaller batch uses a prefix of the buffer); `out` is `(B, T, C)`.

use rayon::prelude::*;

use super::mat::{MatMut, MatRef, Par, matmul};
use super::math;

/// Forward. `att` keeps the softmax probabilities for the backward.
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    assert!(qkv.len() >= b * t * 3 * c && out.len() >= b * t * c && att.len() >= b * nh * t * t);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let (out_p, att_p, qkv_p) = (Ptr(out.as_mut_ptr()), Ptr(att.as_mut_ptr()), qkv.as_ptr() as usize);
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let qkv = qkv_p as *const f32;
        // SAFETY: offsets stay inside the asserted lengths; task (b, h) writes only its own T×T
        // block of `att` and its own head's columns of `out`.
        unsafe {
            let base = qkv.add(bi * t * 3 * c + h * hs);
            let q = MatRef::strided(base, t, hs, 3 * c);
            let k = MatRef::strided(base.add(c), t, hs, 3 * c);
            let v = MatRef::strided(base.add(2 * c), t, hs, 3 * c);
            let a_ptr = att_p.get().add(bh * t * t);
            matmul(MatMut::strided(a_ptr, t, t, t), q, k.t(), false, scale, Par::Serial);
            let a = std::slice::from_raw_parts_mut(a_ptr, t * t);
            for (i, row) in a.chunks_mut(t).enumerate() {
                softmax_causal_row(row, i);
            }
            let o = MatMut::strided(out_p.get().add(bi * t * c + h * hs), t, hs, c);
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
pub fn attention_backward(dqkv: &mut [f32], datt: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    assert!(dqkv.len() >= b * t * 3 * c && dout.len() >= b * t * c && datt.len() >= b * nh * t * t);
    assert!(qkv.len() >= b * t * 3 * c && att.len() >= b * nh * t * t);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let (dqkv_p, datt_p) = (Ptr(dqkv.as_mut_ptr()), Ptr(datt.as_mut_ptr()));
    let (qkv_p, att_p, dout_p) = (qkv.as_ptr() as usize, att.as_ptr() as usize, dout.as_ptr() as usize);
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        // SAFETY: as in the forward; task (b, h) writes only its head's columns of `dqkv` and
        // its own T×T block of `datt`.
        unsafe {
            let base = (qkv_p as *const f32).add(bi * t * 3 * c + h * hs);
            let q = MatRef::strided(base, t, hs, 3 * c);
            let k = MatRef::strided(base.add(c), t, hs, 3 * c);
            let v = MatRef::strided(base.add(2 * c), t, hs, 3 * c);
            let a = MatRef::strided((att_p as *const f32).add(bh * t * t), t, t, t);
            let g = MatRef::strided((dout_p as *const f32).add(bi * t * c + h * hs), t, hs, c);
            let dbase = dqkv_p.get().add(bi * t * 3 * c + h * hs);
            let (dq, dk, dv) = (MatMut::strided(dbase, t, hs, 3 * c), MatMut::strided(dbase.add(c), t, hs, 3 * c), MatMut::strided(dbase.add(2 * c), t, hs, 3 * c));
            let da_ptr = datt_p.get().add(bh * t * t);
            // dV = attᵀ·dout ; datt = dout·Vᵀ
            matmul(dv, a.t(), g, false, 1.0, Par::Serial);
            matmul(MatMut::strided(da_ptr, t, t, t), g, v.t(), false, 1.0, Par::Serial);
            // Softmax backward in place: dpre = att ⊙ (datt − Σ_j att·datt), times the 1/√hs scale.
            let da = std::slice::from_raw_parts_mut(da_ptr, t * t);
            let arows = std::slice::from_raw_parts(a.ptr, t * t);
            for i in 0..t {
                let (ar, dr) = (&arows[i * t..i * t + t], &mut da[i * t..i * t + t]);
                let dot = math::dot(&ar[..=i], &dr[..=i]);
                for j in 0..=i {
                    dr[j] = ar[j] * (dr[j] - dot) * scale;
                }
                dr[i + 1..].fill(0.0);
            }
            let dpre = MatRef::strided(da_ptr, t, t, t);
            // dQ = dpre·K ; dK = dpreᵀ·Q
            matmul(dq, dpre, k, false, 1.0, Par::Serial);
            matmul(dk, dpre.t(), q, false, 1.0, Par::Serial);
        }
    });
}

/// Attention of `n` new tokens at positions `pos0..pos0+n` against a KV cache that already holds
/// positions `0..pos0` and into which the new keys and values have been written.
///
/// - `out`: `(n, C)`; `q`: `(n, 3C)` rows whose first `C` columns are the queries
/// - `k_cache`, `v_cache`: `(maxT, C)`; `scores`: scratch of at least `NH·(pos0+n)` floats
pub fn attention_forward_cached(out: &mut [f32], scores: &mut [f32], q: &[f32], k_cache: &[f32], v_cache: &[f32], pos0: usize, n: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let total = pos0 + n;
    for i in 0..n {
        let len = pos0 + i + 1;
        let orow = &mut out[i * c..(i + 1) * c];
        orow.par_chunks_mut(hs).zip(scores[..nh * total].par_chunks_mut(total)).enumerate().for_each(|(h, (o, s))| {
            let qh = &q[i * 3 * c + h * hs..i * 3 * c + (h + 1) * hs];
            for j in 0..len {
                let kh = &k_cache[j * c + h * hs..j * c + (h + 1) * hs];
                s[j] = math::dot(qh, kh) * scale;
            }
            softmax_causal_row(&mut s[..len], len - 1);
            o.fill(0.0);
            for j in 0..len {
                let vh = &v_cache[j * c + h * hs..j * c + (h + 1) * hs];
                let p = s[j];
                for d in 0..hs {
                    o[d] += p * vh[d];
                }
            }
        });
    }
}

/// Plain reference of [`attention_forward`] (f64 accumulation), for tests.
pub fn attention_forward_reference(out: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                let mut s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                        q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = s.iter().sum();
                for d in 0..hs {
                    let acc: f64 = (0..=i).map(|j| s[j] / sum * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d] as f64).sum();
                    out[(bi * t + i) * c + h * hs + d] = acc as f32;
                }
            }
        }
    }
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
    use crate::backend::cpu::testutil::{assert_close, randn};

    #[test]
    fn forward_matches_reference() {
        for &(b, t, c, nh) in &[(1, 1, 8, 2), (2, 7, 16, 4), (3, 33, 48, 3)] {
            let qkv = randn(b * t * 3 * c, 11);
            let mut out = vec![0.0; b * t * c];
            let mut att = vec![0.0; b * nh * t * t];
            attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
            let mut want = vec![0.0; b * t * c];
            attention_forward_reference(&mut want, &qkv, b, t, c, nh);
            // f32 softmax and dot products of length <= 33 vs f64: 2e-5 covers accumulated rounding.
            assert_close(&out, &want, 2e-5, 2e-5, "attention out");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, t, c, nh) = (2, 5, 8, 2);
        let qkv = randn(b * t * 3 * c, 21);
        let dout = randn(b * t * c, 22);
        let mut out = vec![0.0; b * t * c];
        let mut att = vec![0.0; b * nh * t * t];
        attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; qkv.len()];
        let mut datt = vec![0.0; att.len()];
        attention_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, c, nh);
        // loss = Σ dout·out, evaluated in f64 by the reference.
        let loss = |x: &[f32]| {
            let mut o = vec![0.0; b * t * c];
            attention_forward_reference(&mut o, x, b, t, c, nh);
            o.iter().zip(&dout).map(|(a, g)| *a as f64 * *g as f64).sum::<f64>()
        };
        for idx in (0..qkv.len()).step_by(7) {
            let h = 1e-2f32;
            let mut p = qkv.clone();
            p[idx] += h;
            let lp = loss(&p);
            p[idx] -= 2.0 * h;
            let lm = loss(&p);
            let fd = (lp - lm) / (2.0 * h as f64);
            // Central differences with h=1e-2 have O(h²) truncation error on O(1) curvature.
            assert!((fd - dqkv[idx] as f64).abs() < 2e-3 + 1e-2 * fd.abs(), "dqkv[{idx}]: {} vs {fd}", dqkv[idx]);
        }
    }

    #[test]
    fn cached_matches_full_forward() {
        let (t, c, nh) = (9, 16, 4);
        let qkv = randn(t * 3 * c, 31);
        let mut full = vec![0.0; t * c];
        let mut att = vec![0.0; nh * t * t];
        attention_forward(&mut full, &mut att, &qkv, 1, t, c, nh);
        let (mut kc, mut vc) = (vec![0.0; t * c], vec![0.0; t * c]);
        for i in 0..t {
            kc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + c..i * 3 * c + 2 * c]);
            vc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + 2 * c..i * 3 * c + 3 * c]);
        }
        // Prefill 4 tokens, then one at a time.
        let mut out = vec![0.0; t * c];
        let mut scores = vec![0.0; nh * t];
        attention_forward_cached(&mut out[..4 * c], &mut scores, &qkv[..4 * 3 * c], &kc, &vc, 0, 4, c, nh);
        for i in 4..t {
            attention_forward_cached(&mut out[i * c..(i + 1) * c], &mut scores, &qkv[i * 3 * c..(i + 1) * 3 * c], &kc, &vc, i, 1, c, nh);
        }
        assert_close(&out, &full, 1e-5, 1e-5, "cached vs full");
    }
}
