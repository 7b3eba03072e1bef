//! Matmuls through cuBLASLt: bf16 operands with f32 accumulation and f32 output (the training
//! path), or f32 throughout (the path that checks against the CPU backend).
//!
//! cuBLASLt is column-major and the model is row-major. A row-major `(r, c)` matrix is the
//! column-major `(c, r)` matrix with the same bytes, so `C = op(A)·op(B)` in row-major is
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ` in column-major: [`Blas::gemm`] passes B first and A second, each with its
//! own transpose flag, and never copies or transposes data.

use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::DPtr;
use super::error::{CudaError, Result};

/// The element type of the matmul operands `A` and `B` (`C` is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16 operands, f32 accumulation and output: mixed-precision training.
    Bf16,
    /// f32 operands, f32 accumulation (no TF32): for checking against the CPU.
    F32,
}

impl Precision {
    fn data_type(self) -> sys::cudaDataType {
        match self {
            Precision::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Precision::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// A cuBLASLt handle with its workspace, bound to one stream.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is used only through &self methods that enqueue on the one stream; cuBLASLt
// handles may be used from any thread as long as calls are not concurrent, which `CudaDevice`
// (not `Sync`-shared across threads by this crate) guarantees.
unsafe impl Send for Blas {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("workspace_bytes", &self.workspace.len()).finish_non_exhaustive()
    }
}

impl Blas {
    /// A handle and a workspace sized as NVIDIA recommends (32 MiB on Hopper, 4 MiB before).
    pub fn new(stream: Arc<CudaStream>, sm_major: i32) -> Result<Blas> {
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        let size = if sm_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(size).map_err(CudaError::driver("allocate cuBLASLt workspace"))?;
        let workspace_ptr = workspace.device_ptr(&stream).0;
        Ok(Blas { handle, workspace, workspace_ptr, stream })
    }

    /// Row-major `C(M,N) = alpha·op(A)·op(B) + beta·C`.
    ///
    /// Stored shapes: `A` is `(M,K)`, or `(K,M)` with `trans_a`; `B` is `(K,N)`, or `(N,K)` with
    /// `trans_b`; `C` is `(M,N)` f32. `A` and `B` hold `precision` elements.
    ///
    /// # Errors
    /// cuBLASLt has no algorithm for the shape or fails to launch.
    pub fn gemm(&self, precision: Precision, c: DPtr, a: DPtr, b: DPtr, trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize, alpha: f32, beta: f32) -> Result<()> {
        let op = || format!("gemm {precision:?} M={m} N={n} K={k} trans_a={trans_a} trans_b={trans_b}");
        let dt = precision.data_type();
        let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
        let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
        // Column-major views: first operand = stored B, second = stored A, output = Cᵀ (N, M).
        let first = Layout::new(dt, b_cols, b_rows, b_cols).map_err(|e| blas_err(&op(), e))?;
        let second = Layout::new(dt, a_cols, a_rows, a_cols).map_err(|e| blas_err(&op(), e))?;
        let out = Layout::new(sys::cudaDataType::CUDA_R_32F, n, m, n).map_err(|e| blas_err(&op(), e))?;
        let desc = Desc::new().map_err(|e| blas_err(&op(), e))?;
        desc.set_op(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, trans_b).map_err(|e| blas_err(&op(), e))?;
        desc.set_op(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, trans_a).map_err(|e| blas_err(&op(), e))?;
        let pref = Pref::new(self.workspace.len()).map_err(|e| blas_err(&op(), e))?;
        // SAFETY: all descriptors are alive for the duration of the calls; the pointers come
        // from buffers whose lengths the callers checked against these shapes.
        unsafe {
            let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc.0, first.0, second.0, out.0, out.0, pref.0).map_err(|e| blas_err(&op(), e))?;
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                b.0 as *const _,
                first.0,
                a.0 as *const _,
                second.0,
                c.0 as *const _,
                out.0,
                c.0 as *mut _,
                out.0,
                &heuristic.algo,
                self.workspace_ptr as *mut _,
                self.workspace.len(),
                self.stream.cu_stream() as *mut _,
            )
            .map_err(|e| blas_err(&op(), e))
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn blas_err(op: &str, e: lt::CublasError) -> CudaError {
    CudaError::Blas { op: op.to_string(), status: format!("{:?}", e.0) }
}

/// Owned descriptors, destroyed on every path (errors included).
struct Layout(sys::cublasLtMatrixLayout_t);
impl Layout {
    fn new(dt: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Layout, lt::CublasError> {
        lt::create_matrix_layout(dt, rows as u64, cols as u64, ld as i64).map(Layout)
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Desc {
    fn new() -> Result<Desc, lt::CublasError> {
        lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map(Desc)
    }
    fn set_op(&self, attr: sys::cublasLtMatmulDescAttributes_t, transpose: bool) -> Result<(), lt::CublasError> {
        let v: i32 = transpose as i32; // cublasOperation_t: 0 = N, 1 = T
        // SAFETY: the attribute takes a cublasOperation_t (an i32), passed by address with its size.
        unsafe { lt::set_matmul_desc_attribute(self.0, attr, (&v) as *const i32 as *const _, std::mem::size_of::<i32>()) }
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Pref {
    fn new(workspace: usize) -> Result<Pref, lt::CublasError> {
        let p = Pref(lt::create_matmul_pref()?);
        // SAFETY: the attribute takes a size_t, passed by address with its size.
        unsafe {
            lt::set_matmul_pref_attribute(
                p.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )?
        };
        Ok(p)
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
