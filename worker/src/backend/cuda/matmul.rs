//! Matmuls through cuBLASLt: bf16 operands with f32 accumulation and f32 output (the training
//! path), or f32 throughout (the path that checks against the CPU backend).
//!
//! cuBLASLt is column-major and the model is row-major. A row-major `(r, c)` matrix is the
//! column-major `(c, r)` matrix with the same bytes, so `C = op(A)·op(B)` in row-major is
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ` in column-major: [`gemm`] passes B first and A second, each with its
//! own transpose flag, and never copies or transposes data. The call itself is a
//! [`Matmul`] handed to the device: cuBLASLt on a GPU, the same contract on the CPU on the
//! emulated device, so a wrong layout here fails in CI too.

use super::device::{CudaDevice, DPtr, DataType, Epilogue, Matmul, MatrixLayout};
use super::error::Result;

/// The element type of the matmul operands `A` and `B` (`C` is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16 operands, f32 accumulation and output: mixed-precision training.
    Bf16,
    /// f32 operands, f32 accumulation (no TF32): for checking against the CPU.
    F32,
}

impl Precision {
    fn data_type(self) -> DataType {
        match self {
            Precision::Bf16 => DataType::Bf16,
            Precision::F32 => DataType::F32,
        }
    }
}

/// Row-major `C(M,N) = alpha·op(A)·op(B) + beta·C`.
///
/// Stored shapes: `A` is `(M,K)`, or `(K,M)` with `trans_a`; `B` is `(K,N)`, or `(N,K)` with
/// `trans_b`; `C` is `(M,N)` f32. `A` and `B` hold `precision` elements.
///
/// # Errors
/// cuBLASLt has no algorithm for the shape, refuses the layouts, or fails to launch.
pub fn gemm(dev: &CudaDevice, precision: Precision, c: DPtr, a: DPtr, b: DPtr, trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize, alpha: f32, beta: f32) -> Result<()> {
    gemm_with(dev, precision, c, a, b, trans_a, trans_b, m, n, k, alpha, beta, Epilogue::Default)
}

/// Row-major `C(M,N) = op(A)·op(B) + bias` with `bias` `(N)` added to every row, in the gemm
/// itself (cuBLASLt's bias epilogue: the column-major `D = Cᵀ` has `N` rows, one bias element
/// each). `bias` must be [`super::device::blas::BIAS_ALIGN`]-byte aligned.
///
/// # Errors
/// As [`gemm`].
pub fn gemm_bias(dev: &CudaDevice, precision: Precision, c: DPtr, a: DPtr, b: DPtr, trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize, bias: DPtr) -> Result<()> {
    gemm_with(dev, precision, c, a, b, trans_a, trans_b, m, n, k, 1.0, 0.0, Epilogue::Bias(bias))
}

/// Row-major `pre(M,N) = op(A)·op(B) + bias` and `C = GELU(pre)` in one gemm (cuBLASLt's
/// GELU_AUX_BIAS epilogue: `pre` is its aux matrix, `(M,N)` row-major = column-major `N × M` with
/// leading dimension `N`). `N` must be a multiple of
/// [`super::device::blas::AUX_LD_MULTIPLE`]; `bias` and `pre` [`super::device::blas::BIAS_ALIGN`]-aligned.
///
/// # Errors
/// As [`gemm`].
pub fn gemm_bias_gelu(
    dev: &CudaDevice,
    precision: Precision,
    c: DPtr,
    pre: DPtr,
    a: DPtr,
    b: DPtr,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    bias: DPtr,
) -> Result<()> {
    gemm_with(dev, precision, c, a, b, trans_a, trans_b, m, n, k, 1.0, 0.0, Epilogue::GeluAuxBias { bias, aux: pre, aux_ld: n as i64 })
}

/// Row-major `C(M,N) = (op(A)·op(B)) ⊙ GELU'(pre)` with `pre` `(M,N)` the forward's GELU input
/// (cuBLASLt's DGELU epilogue); the same requirements on `N` and `pre` as [`gemm_bias_gelu`].
///
/// # Errors
/// As [`gemm`].
pub fn gemm_dgelu(dev: &CudaDevice, precision: Precision, c: DPtr, pre: DPtr, a: DPtr, b: DPtr, trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize) -> Result<()> {
    gemm_with(dev, precision, c, a, b, trans_a, trans_b, m, n, k, 1.0, 0.0, Epilogue::DGelu { aux: pre, aux_ld: n as i64 })
}

/// Row-major `C(M,N) += op(A)·op(B)` and `dbias(N) = Σ_k op(B)(k, ·)`, the column sums of
/// `op(B)` (`K × N`), in the same gemm: cuBLASLt's BGRADA epilogue, the row-major B being its A.
/// It overwrites `dbias` (f32, [`super::device::blas::BIAS_ALIGN`]-aligned, apart from the
/// operands).
///
/// # Errors
/// As [`gemm`].
pub fn gemm_accumulate_bias_grad(
    dev: &CudaDevice,
    precision: Precision,
    c: DPtr,
    a: DPtr,
    b: DPtr,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    dbias: DPtr,
) -> Result<()> {
    gemm_with(dev, precision, c, a, b, trans_a, trans_b, m, n, k, 1.0, 1.0, Epilogue::BGradA(dbias))
}

fn gemm_with(
    dev: &CudaDevice,
    precision: Precision,
    c: DPtr,
    a: DPtr,
    b: DPtr,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    epilogue: Epilogue,
) -> Result<()> {
    let dt = precision.data_type();
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
    let layout = |dtype, rows: usize, cols: usize, ld: usize| MatrixLayout { dtype, rows: rows as u64, cols: cols as u64, ld: ld as i64 };
    // Column-major views: cuBLASLt's A = stored B, its B = stored A, its C = D = Cᵀ (N, M).
    let out = layout(DataType::F32, n, m, n);
    dev.matmul(&Matmul {
        trans_a: trans_b,
        trans_b: trans_a,
        alpha,
        beta,
        a: b,
        a_layout: layout(dt, b_cols, b_rows, b_cols),
        b: a,
        b_layout: layout(dt, a_cols, a_rows, a_cols),
        c,
        c_layout: out,
        d: c,
        d_layout: out,
        epilogue,
    })
}
