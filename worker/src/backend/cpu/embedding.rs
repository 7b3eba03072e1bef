//! Token embedding without positions (the llama family's positions are rotary, applied in
//! attention): `out[b,t,:] = wte[inp[b,t],:]`.

use rayon::prelude::*;

use super::COL_CHUNK;
use super::encoder::SendPtr;

/// Forward. `out`: `(N, C)`; `inp`: `(N)` token ids (checked by the caller to be `< V`).
pub fn embedding_forward(out: &mut [f32], inp: &[u32], wte: &[f32], n: usize, c: usize) {
    out[..n * c].par_chunks_mut(c).zip(inp[..n].par_iter()).with_min_len(16).for_each(|(o, &tok)| {
        o.copy_from_slice(&wte[tok as usize * c..(tok as usize + 1) * c]);
    });
}

/// Backward: `dwte[tok] += dout`, column-parallel with the rows walked in order, so repeated
/// tokens accumulate in a fixed order.
pub fn embedding_backward(dwte: &mut [f32], dout: &[f32], inp: &[u32], n: usize, c: usize) {
    let ptr = SendPtr(dwte.as_mut_ptr());
    let len = dwte.len();
    (0..c.div_ceil(COL_CHUNK)).into_par_iter().for_each(|ci| {
        let c0 = ci * COL_CHUNK;
        let w = COL_CHUNK.min(c - c0);
        for r in 0..n {
            let tok = inp[r] as usize;
            assert!((tok + 1) * c <= len);
            let g = &dout[r * c + c0..r * c + c0 + w];
            // SAFETY: each task owns columns [c0, c0 + w) of every row; bounds asserted above.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(tok * c + c0), w) };
            for i in 0..w {
                dst[i] += g[i];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_sums_the_rows_of_repeated_tokens() {
        let (c, wte) = (70, (0..3 * 70).map(|i| i as f32).collect::<Vec<f32>>());
        let inp = [2u32, 0, 2];
        let mut out = vec![0.0; 3 * c];
        embedding_forward(&mut out, &inp, &wte, 3, c);
        assert_eq!(&out[..c], &wte[2 * c..]);
        let dout: Vec<f32> = (0..3 * c).map(|i| (i % 7) as f32).collect();
        let mut d = vec![1.0; 3 * c];
        embedding_backward(&mut d, &dout, &inp, 3, c);
        for j in 0..c {
            assert_eq!(d[j], 1.0 + dout[c + j]);
            assert_eq!(d[c + j], 1.0);
            assert_eq!(d[2 * c + j], 1.0 + dout[j] + dout[2 * c + j]);
        }
    }
}
