//! Compute backends. `cpu` is the reference for every op and the backend CI runs; `cuda` holds
//! the same ops as NVRTC-compiled kernels plus cuBLASLt matmuls, each checked against its CPU
//! counterpart by `liandan selftest --device cuda`.

pub mod cpu;
pub mod cuda;

mod device;
pub use device::Device;
