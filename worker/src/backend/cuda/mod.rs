//! The CUDA backend (work in progress; see docs/CUDA.md for what has run where).

pub mod device;
pub mod error;
pub mod kernels;
pub mod matmul;

pub use device::CudaDevice;
pub use error::CudaError;
