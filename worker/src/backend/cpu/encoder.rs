//! Token + position embedding.

use rayon::prelude::*;

use super::COL_CHUNK;

/// `out[b,t,:] = wte[inp[b,t],:] + wpe[pos0 + t,:]`.
///
/// - `out`: `(B, T, C)`; `inp`: `(B, T)` token ids (checked by the caller to be `< V`)
/// - `wte`: `(Vp, C)`, `wpe`: `(maxT, C)`; `pos0` is the position of the first token (non-zero
///   when a KV cache already holds the earlier ones)
pub fn encoder_forward(out: &mut [f32], inp: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize, pos0: usize) {
    out[..b * t * c].par_chunks_mut(c).enumerate().with_min_len(16).for_each(|(bt, o)| {
        let tok = inp[bt] as usize;
        let pos = pos0 + bt % t;
        let te = &wte[tok * c..(tok + 1) * c];
        let pe = &wpe[pos * c..(pos + 1) * c];
        for i in 0..c {
            o[i] = te[i] + pe[i];
        }
    });
}

/// Backward of [`encoder_forward`] (with `pos0 = 0`): `dwte[tok] += dout`, `dwpe[t] += dout`.
///
/// Column-parallel with `(b, t)` walked in order, so tokens that repeat accumulate in a fixed order.
pub fn encoder_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], inp: &[u32], b: usize, t: usize, c: usize) {
    let chunks = c.div_ceil(COL_CHUNK);
    let dwte_ptr = SendPtr(dwte.as_mut_ptr());
    let dwpe_ptr = SendPtr(dwpe.as_mut_ptr());
    let (wte_len, wpe_len) = (dwte.len(), dwpe.len());
    (0..chunks).into_par_iter().for_each(|ci| {
        let c0 = ci * COL_CHUNK;
        let w = COL_CHUNK.min(c - c0);
        for bt in 0..b * t {
            let tok = inp[bt] as usize;
            let pos = bt % t;
            let g = &dout[bt * c + c0..bt * c + c0 + w];
            assert!((tok + 1) * c <= wte_len && (pos + 1) * c <= wpe_len);
            // SAFETY: each task owns columns [c0, c0 + w) of every row; the bounds are asserted above.
            unsafe {
                let te = std::slice::from_raw_parts_mut(dwte_ptr.get().add(tok * c + c0), w);
                let pe = std::slice::from_raw_parts_mut(dwpe_ptr.get().add(pos * c + c0), w);
                for i in 0..w {
                    te[i] += g[i];
                    pe[i] += g[i];
                }
            }
        }
    });
}

/// A raw pointer that may cross into rayon tasks which write disjoint parts of its buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: users guarantee tasks write disjoint regions and the buffer outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// A method (rather than field access) so closures capture the whole `Send` wrapper.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
