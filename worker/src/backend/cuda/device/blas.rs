//! One `cublasLtMatmul` call, described in cuBLASLt's own terms, so both device implementations
//! receive exactly what the row-major wrapper ([`crate::backend::cuda::matmul`]) would hand
//! cuBLASLt.
//!
//! The contract (cuBLASLt documentation, `cublasLtMatmul`): `D = alpha·op(A)·op(B) + beta·C`,
//! every matrix column-major (`CUBLASLT_ORDER_COL`, the default order of a matrix layout), with
//! element `(i, j)` of a stored `rows × cols` matrix at `i + j·ld`. A layout describes the matrix
//! *as stored*; `op(X)` is `X` or `Xᵀ` per the descriptor's `TRANSA` / `TRANSB`. So `op(A)` is
//! `m × k`, `op(B)` is `k × n`, `C` and `D` are `m × n`, where `m` and `n` are `D`'s rows and
//! columns. `ld >= rows` for every layout. When `beta == 0`, `C` is not read. Compute type
//! `CUBLAS_COMPUTE_32F` with scale type f32: products and sums in f32, `alpha` and `beta` f32.
//!
//! Epilogue (`CUBLASLT_MATMUL_DESC_EPILOGUE`): with `CUBLASLT_EPILOGUE_BIAS` a packed f32 vector
//! of `m` elements (`CUBLASLT_MATMUL_DESC_BIAS_POINTER`, the type of D by default) is broadcast
//! to every column and added last: `D = alpha·op(A)·op(B) + beta·C + bias`. cuBLASLt does not
//! document an alignment for it, but it fails on bias vectors that are not 16-byte aligned in
//! practice, so [`BIAS_ALIGN`] is required here (and checked by the emulated device).
//!
//! GELU epilogues use an auxiliary matrix (`CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER`, column
//! major, `m × n`, leading dimension `CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD` in elements, which
//! must be divisible by 8 and at least `m`; its type is D's, f32, by default):
//! - `CUBLASLT_EPILOGUE_GELU_AUX_BIAS`: `x = alpha·op(A)·op(B) + beta·C + bias`; the aux matrix
//!   receives `x` (GELU's input, kept for the backward) and `D = GELU(x)`.
//! - `CUBLASLT_EPILOGUE_DGELU`: `D = (alpha·op(A)·op(B) + beta·C) ⊙ GELU'(aux)`, the aux matrix
//!   read: the forward's GELU input.
//!
//! - `CUBLASLT_EPILOGUE_BGRADA`: `D` as with the default epilogue, and the bias gradient of the
//!   input matrix A, `bias[i] = Σ_p op(A)(i, p)` (the reduction over the gemm's `k`), written to
//!   (overwriting) the f32 vector of `m` elements at the bias pointer. The wrappers here use it
//!   only with `alpha = 1`, where the documentation leaves no doubt about its scale.
//!
//! GELU is the tanh approximation `x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, GPT-2's. The aux
//! pointer is required to be [`BIAS_ALIGN`]-aligned like the bias (the heuristic reads its
//! alignment; unaligned ones are not sent to cuBLASLt).

/// The alignment, in bytes, a bias vector of the bias epilogue (and a GELU epilogue's aux
/// matrix) must have.
pub const BIAS_ALIGN: u64 = 16;

/// What the aux matrix's leading dimension (elements) must be a multiple of.
pub const AUX_LD_MULTIPLE: i64 = 8;

/// Element type of a matrix (`cudaDataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `CUDA_R_32F`.
    F32,
    /// `CUDA_R_16BF` (bf16 bits in a u16).
    Bf16,
}

impl DataType {
    pub fn bytes(self) -> usize {
        match self {
            DataType::F32 => 4,
            DataType::Bf16 => 2,
        }
    }
}

/// A `cublasLtMatrixLayout_t`: a column-major matrix as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatrixLayout {
    pub dtype: DataType,
    pub rows: u64,
    pub cols: u64,
    /// Leading dimension: elements between the starts of two columns.
    pub ld: i64,
}

/// What runs after the product (`cublasLtEpilogue_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `CUBLASLT_EPILOGUE_DEFAULT`: `D = alpha·op(A)·op(B) + beta·C`.
    Default,
    /// `CUBLASLT_EPILOGUE_BIAS` with the f32 vector of `m` elements at this address.
    Bias(super::DPtr),
    /// `CUBLASLT_EPILOGUE_GELU_AUX_BIAS`: bias added, GELU's input written to `aux` (f32,
    /// `m × n`, leading dimension `aux_ld`), `D = GELU(·)`.
    GeluAuxBias { bias: super::DPtr, aux: super::DPtr, aux_ld: i64 },
    /// `CUBLASLT_EPILOGUE_DGELU`: the product times `GELU'(aux)`, `aux` as above (read).
    DGelu { aux: super::DPtr, aux_ld: i64 },
    /// `CUBLASLT_EPILOGUE_BGRADA`: the default product, and `Σ_k op(A)` written to the f32
    /// vector of `m` elements at this address.
    BGradA(super::DPtr),
}

impl Epilogue {
    /// The bias vector (`CUBLASLT_MATMUL_DESC_BIAS_POINTER`): read by the epilogues that add
    /// one, written by BGRADA.
    pub fn bias(&self) -> Option<super::DPtr> {
        match *self {
            Epilogue::Bias(b) | Epilogue::GeluAuxBias { bias: b, .. } | Epilogue::BGradA(b) => Some(b),
            _ => None,
        }
    }

    /// The aux matrix and its leading dimension, for the GELU epilogues.
    pub fn aux(&self) -> Option<(super::DPtr, i64)> {
        match *self {
            Epilogue::GeluAuxBias { aux, aux_ld, .. } | Epilogue::DGelu { aux, aux_ld } => Some((aux, aux_ld)),
            _ => None,
        }
    }
}

/// One matmul: the descriptor's transposes, the scalars, the four matrices and their layouts.
#[derive(Debug, Clone, Copy)]
pub struct Matmul {
    /// `CUBLASLT_MATMUL_DESC_TRANSA`: `op(A) = Aᵀ`.
    pub trans_a: bool,
    /// `CUBLASLT_MATMUL_DESC_TRANSB`: `op(B) = Bᵀ`.
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub a: super::DPtr,
    pub a_layout: MatrixLayout,
    pub b: super::DPtr,
    pub b_layout: MatrixLayout,
    pub c: super::DPtr,
    pub c_layout: MatrixLayout,
    pub d: super::DPtr,
    pub d_layout: MatrixLayout,
    pub epilogue: Epilogue,
}

impl Matmul {
    /// `(m, n, k)` as cuBLASLt derives them: `m × n` from `D`, `k` from `op(A)`.
    pub fn dims(&self) -> (u64, u64, u64) {
        let k = if self.trans_a { self.a_layout.rows } else { self.a_layout.cols };
        (self.d_layout.rows, self.d_layout.cols, k)
    }
}
