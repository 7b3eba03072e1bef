//! Compute backends. `cpu` is the reference for every op and the backend CI trains with; `cuda`
//! holds the same ops as CUDA kernels plus cuBLASLt matmuls, each checked against its CPU
//! counterpart by `liandan selftest --device cuda` on a GPU and `--device cuda-emu` (the emulated
//! device, which CI runs) without one.

pub mod cpu;
pub mod cuda;

mod device;
pub use device::Device;
