//! Residual connections: `out = a + b`. The backward is the identity into both branches: the
//! model keeps one running gradient of the residual stream and hands it to both, so there is no
//! backward function to call.

use rayon::prelude::*;

use super::ROW_CHUNK_ELEMS;

/// `out = a + b`, all `(N, C)` flattened.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(ROW_CHUNK_ELEMS).zip(a.par_chunks(ROW_CHUNK_ELEMS).zip(b.par_chunks(ROW_CHUNK_ELEMS))).for_each(|(o, (a, b))| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}
