//! The CPU backend: f32, `gemm` (AVX-512 kernels via the `x86-v4` feature) for matmuls and rayon
//! for everything row- or column-parallel. One file per op, each with `<op>_forward` and
//! `<op>_backward`; ops whose fast path is not obviously right carry a plain reference beside it
//! and a test comparing the two.
//!
//! Determinism: every reduction runs in a fixed order that does not depend on how rayon splits
//! the work (column-parallel sums walk rows in order; row-parallel ops own their rows), and
//! `gemm` splits only output tiles across threads, so a run is bit-reproducible for a given
//! seed and thread count.

pub mod attention;
pub mod crossentropy;
pub mod embedding;
pub mod encoder;
pub mod gelu;
pub mod gqa_attention;
pub mod layernorm;
pub mod math;
pub mod matmul;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub(crate) mod mat;

/// Columns per task in column-parallel reductions (bias and LayerNorm parameter gradients).
/// Fixed, so the summation order never depends on the thread count.
pub(crate) const COL_CHUNK: usize = 64;

/// Rows per task in row-parallel element-wise ops: big enough to amortise rayon's task cost.
pub(crate) const ROW_CHUNK_ELEMS: usize = 1 << 14;

/// Adds `sum over rows of src` into `dst` (`src` is `(rows, dst.len())`), column-parallel in a
/// fixed row order.
pub(crate) fn add_column_sums(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    let cols = dst.len();
    debug_assert_eq!(src.len() % cols, 0);
    let rows = src.len() / cols;
    dst.par_chunks_mut(COL_CHUNK).enumerate().for_each(|(ci, d)| {
        let c0 = ci * COL_CHUNK;
        for r in 0..rows {
            let row = &src[r * cols + c0..r * cols + c0 + d.len()];
            for (x, y) in d.iter_mut().zip(row) {
                *x += *y;
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod testutil;
