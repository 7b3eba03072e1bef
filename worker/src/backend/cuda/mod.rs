//! The CUDA backend: every op of [`crate::backend::cpu`] as a kernel in `kernels/*.cu`, and
//! matmuls through cuBLASLt (bf16 with f32 accumulation, or f32 for checking), on a device layer
//! with two implementations: a real GPU (cudarc: NVRTC compiles the kernels at start, cached on
//! disk) and the emulated device (the same `.cu` files compiled for the CPU by `worker/build.rs`,
//! host memory, cuBLASLt's contract on the CPU), so CI runs this host code and these kernels.
//! cudarc reaches the CUDA libraries through dlopen, so this module builds everywhere; on a
//! machine without a GPU or without the libraries, [`CudaDevice::open`] returns one clear
//! [`CudaError`].
//!
//! # Layout
//! - [`kernels`]: the `.cu` sources, NVRTC compilation and the PTX cache.
//! - [`cubin`]: sm_90 cubins and ptxas's per-kernel resource report (registers, spills).
//! - [`device`]: the device interface ([`device::DeviceApi`]), the handle [`CudaDevice`],
//!   buffers ([`device::DevBuf`], [`device::View`]) and the GPU implementation.
//! - [`emu`]: the emulated device (kernels on the CPU, launch limits, the cuBLASLt contract).
//! - [`matmul`]: the row-major gemm at [`matmul::Precision::Bf16`] or `F32`.
//! - [`ops`]: one host wrapper per kernel, named and ordered like the CPU functions.
//! - [`flash`]: the choice of attention kernels and the wrappers of the tensor-core ones.
//! - [`model`]: the GPT-2 forward, loss and backward on device buffers.
//! - [`trainer`]: a training step (accumulation, NCCL all-reduce, clipping, AdamW), checkpoints.
//! - [`selftest`]: every op and a whole step against the CPU backend, for `liandan selftest`.
//! - [`peak`]: datasheet peak FLOP/s and memory bandwidth by device name, for MFU and the
//!   roofline.
//! - [`cost`]: each op's FLOPs and bytes, for the roofline of `bench train --profile`.
//!
//! What has run where is stated in docs/CUDA.md.

pub mod cost;
pub mod cubin;
pub mod device;
pub mod emu;
pub mod error;
pub mod flash;
pub mod generate;
pub mod kernels;
pub mod matmul;
pub mod model;
pub mod ops;
pub mod peak;
pub mod selftest;
pub mod trainer;

pub use device::CudaDevice;
pub use error::CudaError;
pub use matmul::Precision;
