//! Matmul with bias: the linear layers of attention and the MLP.
//!
//! Weights are `(C, OC)` (`in, out`, Hugging Face `Conv1D` layout).

use rayon::prelude::*;

use super::mat::{MatMut, MatRef, Par, matmul};
use super::{ROW_CHUNK_ELEMS, add_column_sums};

/// `out = inp·w + bias`.
///
/// - `out`: `(N, OC)` where `N = B·T` rows
/// - `inp`: `(N, C)`, `w`: `(C, OC)`, `bias`: `(OC)` or none
pub fn matmul_forward(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    let out = &mut out[..n * oc];
    let accumulate = match bias {
        Some(b) => {
            let rows_per_task = (ROW_CHUNK_ELEMS / oc).max(1);
            out.par_chunks_mut(rows_per_task * oc).for_each(|chunk| {
                for row in chunk.chunks_mut(oc) {
                    row.copy_from_slice(b);
                }
            });
            true
        }
        None => false,
    };
    // SAFETY: the views cover exactly the slices above, which do not overlap.
    unsafe { matmul(MatMut::rows(out, n, oc), MatRef::rows(inp, n, c), MatRef::rows(w, c, oc), accumulate, 1.0, Par::Pool) }
}

/// Backward of [`matmul_forward`]:
/// - `dinp = dout·wᵀ` (overwritten), `(N, C)`
/// - `dw += inpᵀ·dout`, `(C, OC)`
/// - `dbias += Σ_rows dout`, `(OC)`
pub fn matmul_backward(dinp: &mut [f32], dw: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], w: &[f32], n: usize, c: usize, oc: usize) {
    let dout_m = MatRef::rows(dout, n, oc);
    // SAFETY: distinct buffers; views within their lengths (checked by MatRef/MatMut::rows).
    unsafe {
        matmul(MatMut::rows(dinp, n, c), dout_m, MatRef::rows(w, c, oc).t(), false, 1.0, Par::Pool);
        matmul(MatMut::rows(dw, c, oc), MatRef::rows(inp, n, c).t(), dout_m, true, 1.0, Par::Pool);
    }
    if let Some(db) = dbias {
        add_column_sums(&mut db[..oc], &dout[..n * oc]);
    }
}

/// Rows of `dwte` per task in [`lm_head_backward`].
const VOCAB_BLOCK: usize = 2048;

/// The tied LM head: `logits = x·wteᵀ`.
///
/// - `logits`: `(N, Vp)`; `x`: `(N, C)`; `wte`: `(Vp, C)` (the token embedding, `out, in`)
pub fn lm_head_forward(logits: &mut [f32], x: &[f32], wte: &[f32], n: usize, c: usize, vp: usize) {
    // SAFETY: distinct buffers; views within their lengths (checked by MatRef/MatMut::rows).
    unsafe { matmul(MatMut::rows(logits, n, vp), MatRef::rows(x, n, c), MatRef::rows(wte, vp, c).t(), false, 1.0, Par::Pool) }
}

/// Backward of [`lm_head_forward`]: `dx = dlogits·wte` (overwritten), `dwte += dlogitsᵀ·x`.
///
/// `dwte` is computed in blocks of [`VOCAB_BLOCK`] rows, one serial matmul per task: for this
/// tall, thin product (`Vp` ≫ `C`, a transposed left operand) that is 1.3–1.7× faster than
/// letting `gemm` split the whole product (measured with `liandan bench train --profile`).
pub fn lm_head_backward(dx: &mut [f32], dwte: &mut [f32], dlogits: &[f32], x: &[f32], wte: &[f32], n: usize, c: usize, vp: usize) {
    let g = MatRef::rows(dlogits, n, vp);
    // SAFETY: distinct buffers; views within their lengths (checked by MatRef/MatMut::rows).
    unsafe { matmul(MatMut::rows(dx, n, c), g, MatRef::rows(wte, vp, c), false, 1.0, Par::Pool) };
    let xm = MatRef::rows(x, n, c);
    let g_addr = dlogits.as_ptr() as usize;
    dwte[..vp * c].par_chunks_mut(VOCAB_BLOCK * c).enumerate().for_each(|(i, block)| {
        let rows = block.len() / c;
        // Columns [i·VOCAB_BLOCK, +rows) of dlogits, viewed transposed: (rows, N).
        let gt = MatRef { ptr: (g_addr as *const f32).wrapping_add(i * VOCAB_BLOCK), rows, cols: n, rs: 1, cs: vp as isize };
        // SAFETY: `gt` stays inside dlogits (column block of an (N, Vp) matrix); each task
        // writes only its own block of rows of dwte.
        unsafe { matmul(MatMut::rows(block, rows, c), gt, xm, true, 1.0, Par::Serial) };
    });
}

/// Plain triple-loop reference of [`matmul_forward`] (f64 accumulation), for tests.
pub fn matmul_forward_reference(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    for i in 0..n {
        for o in 0..oc {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for k in 0..c {
                acc += inp[i * c + k] as f64 * w[k * oc + o] as f64;
            }
            out[i * oc + o] = acc as f32;
        }
    }
}

/// Plain reference of [`matmul_backward`] (f64 accumulation), for tests.
pub fn matmul_backward_reference(dinp: &mut [f32], dw: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], w: &[f32], n: usize, c: usize, oc: usize) {
    for i in 0..n {
        for k in 0..c {
            let mut acc = 0.0f64;
            for o in 0..oc {
                acc += dout[i * oc + o] as f64 * w[k * oc + o] as f64;
            }
            dinp[i * c + k] = acc as f32;
        }
    }
    for k in 0..c {
        for o in 0..oc {
            let mut acc = 0.0f64;
            for i in 0..n {
                acc += inp[i * c + k] as f64 * dout[i * oc + o] as f64;
            }
            dw[k * oc + o] += acc as f32;
        }
    }
    if let Some(db) = dbias {
        for o in 0..oc {
            db[o] += (0..n).map(|i| dout[i * oc + o] as f64).sum::<f64>() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, randn};

    #[test]
    fn fast_matches_reference_at_several_sizes() {
        // Odd sizes exercise gemm's edge tiles.
        for &(n, c, oc) in &[(1, 1, 1), (7, 13, 5), (64, 32, 96), (33, 65, 129)] {
            let inp = randn(n * c, 1);
            let w = randn(c * oc, 2);
            let b = randn(oc, 3);
            let dout = randn(n * oc, 4);
            let (mut o1, mut o2) = (vec![0.0; n * oc], vec![0.0; n * oc]);
            matmul_forward(&mut o1, &inp, &w, Some(&b), n, c, oc);
            matmul_forward_reference(&mut o2, &inp, &w, Some(&b), n, c, oc);
            // f32 dot products of length <= 65 against f64: 1e-5 relative is ~100 ulps of slack.
            assert_close(&o1, &o2, 1e-5, 1e-5, "forward");

            let (mut di1, mut di2) = (vec![0.0; n * c], vec![0.0; n * c]);
            let (mut dw1, mut dw2) = (vec![0.5; c * oc], vec![0.5; c * oc]);
            let (mut db1, mut db2) = (vec![0.25; oc], vec![0.25; oc]);
            matmul_backward(&mut di1, &mut dw1, Some(&mut db1), &dout, &inp, &w, n, c, oc);
            matmul_backward_reference(&mut di2, &mut dw2, Some(&mut db2), &dout, &inp, &w, n, c, oc);
            assert_close(&di1, &di2, 1e-5, 1e-5, "dinp");
            assert_close(&dw1, &dw2, 1e-5, 1e-5, "dw (accumulated)");
            assert_close(&db1, &db2, 1e-5, 1e-5, "dbias (accumulated)");
        }
    }

    #[test]
    fn lm_head_matches_reference_across_vocab_blocks() {
        // Vp spans two VOCAB_BLOCKs plus a ragged tail.
        let (n, c, vp) = (5, 12, 2 * VOCAB_BLOCK + 37);
        let x = randn(n * c, 5);
        let wte = randn(vp * c, 6);
        let dlogits = randn(n * vp, 7);
        let mut logits = vec![0.0; n * vp];
        lm_head_forward(&mut logits, &x, &wte, n, c, vp);
        // logits = x·wteᵀ is matmul_forward with w = wteᵀ laid out (C, Vp).
        let wt: Vec<f32> = (0..c * vp).map(|i| wte[(i % vp) * c + i / vp]).collect();
        let mut want = vec![0.0; n * vp];
        matmul_forward_reference(&mut want, &x, &wt, None, n, c, vp);
        assert_close(&logits, &want, 1e-5, 1e-5, "logits");

        let mut dx = vec![0.0; n * c];
        let mut dwte = vec![0.5; vp * c];
        lm_head_backward(&mut dx, &mut dwte, &dlogits, &x, &wte, n, c, vp);
        let (mut dx2, mut dwt2) = (vec![0.0; n * c], vec![0.0; c * vp]);
        matmul_backward_reference(&mut dx2, &mut dwt2, None, &dlogits, &x, &wt, n, c, vp);
        assert_close(&dx, &dx2, 1e-4, 1e-5, "dx");
        let dwte2: Vec<f32> = (0..vp * c).map(|i| 0.5 + dwt2[(i % c) * vp + i / c]).collect();
        assert_close(&dwte, &dwte2, 1e-5, 1e-5, "dwte (accumulated)");
    }
}
