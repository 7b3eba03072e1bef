//! The CUDA backend's error type. Every variant names what to fix: the library, the kernel file
//! and NVRTC's log, the op and the shapes.

use std::path::PathBuf;

/// Errors of the CUDA backend and the NCCL collective. Nothing in the backend panics on a
/// missing library or device: cudarc would (it panics when a dlopen fails), so every entry point
/// checks the library first and returns [`CudaError::LibraryMissing`].
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded (`lib` is the name cudarc dlopens).
    #[error("{lib} not found ({hint})")]
    LibraryMissing { lib: &'static str, hint: String },

    /// The driver loaded but offers no usable device.
    #[error("no CUDA device: {reason}")]
    NoDevice { reason: String },

    /// No folder with `cuda_bf16.h` and `crt/mma.h` for NVRTC to include.
    #[error(
        "CUDA headers not found: no folder with both cuda_bf16.h and crt/mma.h among {looked} (set LIANDAN_CUDA_INCLUDE to the toolkit's include folder, or install the nvidia-cuda-runtime and nvidia-cuda-crt wheels)"
    )]
    IncludeMissing { looked: String },

    /// NVRTC rejected a kernel file; `log` is NVRTC's own (file, line, message).
    #[error("NVRTC could not compile {file} for {arch}:\n{log}")]
    Compile { file: &'static str, arch: String, log: String },

    /// A CUDA driver call failed.
    #[error("CUDA driver: {op}: {source}")]
    Driver { op: String, source: cudarc::driver::DriverError },

    /// A cuBLASLt call failed (`CUBLAS_STATUS_NOT_SUPPORTED` from the heuristic means no algorithm
    /// exists for that shape, type and alignment).
    #[error("cuBLASLt: {op}: {status}")]
    Blas { op: String, status: String },

    /// An NCCL call failed.
    #[error("NCCL: {op}: {status}")]
    Nccl { op: &'static str, status: String },

    /// A launch was refused (the device's limits, or arguments that do not match the kernel's
    /// signature), or a kernel failed while it ran on the emulated device (a barrier not reached
    /// by every thread, a warp op with an exited lane, a write past the end of a buffer).
    #[error("kernel {kernel}: {reason}")]
    Launch { kernel: String, reason: String },

    /// Arguments that do not fit the buffers or the kernels (shapes, lengths, head size).
    #[error("{op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// The engine rejected the model, batch or targets (same checks as the CPU backend).
    #[error(transparent)]
    Engine(#[from] crate::error::EngineError),

    /// The on-disk kernel cache could not be read or written.
    #[error("kernel cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: std::io::Error },
}

impl CudaError {
    /// cuBLASLt has no algorithm for the call (`CUBLAS_STATUS_NOT_SUPPORTED`), as opposed to a
    /// refused argument or a failed launch: the caller may do the same work another way.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, CudaError::Blas { status, .. } if status.starts_with("CUBLAS_STATUS_NOT_SUPPORTED"))
    }

    /// Wraps a driver error with the op that failed.
    pub fn driver(op: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
        let op = op.into();
        move |source| CudaError::Driver { op, source }
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl From<liandan_plan::PlanError> for CudaError {
    fn from(e: liandan_plan::PlanError) -> Self {
        CudaError::Engine(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::CudaError;

    #[test]
    fn only_cublaslt_not_supported_counts_as_not_supported() {
        let blas = |status: &str| CudaError::Blas { op: "matmul".into(), status: status.into() };
        assert!(blas("CUBLAS_STATUS_NOT_SUPPORTED").is_not_supported());
        assert!(blas("CUBLAS_STATUS_NOT_SUPPORTED: the GELU aux matrix at 0x4 is not 16-byte aligned").is_not_supported());
        assert!(!blas("CUBLAS_STATUS_INVALID_VALUE: ld").is_not_supported());
        assert!(!CudaError::Shape { op: "x", reason: "y".into() }.is_not_supported());
    }
}
