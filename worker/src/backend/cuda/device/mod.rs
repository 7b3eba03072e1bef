//! The device layer: the few operations the CUDA backend's host code needs from a device, and
//! the handle ([`CudaDevice`]) every op wrapper, the model, the trainer, the NCCL collective and
//! the selftest go through.
//!
//! Two implementations of [`DeviceApi`]:
//! - [`gpu`]: a real GPU through cudarc (driver context and stream, NVRTC-compiled kernels,
//!   cuBLASLt);
//! - [`crate::backend::cuda::emu`]: the emulated device — host memory, the same `.cu` files
//!   compiled for the CPU by `worker/build.rs`, and a gemm that implements cuBLASLt's contract —
//!   so CI runs the same host code and the same kernel sources without a GPU.
//!
//! The interface is byte-level and object-safe (`Box<dyn DeviceApi>`); [`CudaDevice`] adds the
//! typed buffers on top. Device addresses are plain `u64` ([`DPtr`]) on both: a `CUdeviceptr` on
//! a GPU, a host address on the emulated device.
//!
//! Why raw pointers: the model's buffers are long-lived, owned by one struct and used on one
//! stream, and its ops read one layer's slot of a buffer while writing another's. Borrow-checked
//! views cannot express that without a split for every call, so buffers are [`DevBuf`]s (owning
//! the allocation) and ops take [`View`]s into them; every op wrapper checks its lengths against
//! the views before it launches. Work is ordered by one stream per device; the emulated device
//! runs each call to completion before it returns.

pub mod blas;
mod cublaslt;
pub mod gpu;

use std::marker::PhantomData;

pub use blas::{DataType, Epilogue, Matmul, MatrixLayout};

use super::emu::{EmuDevice, EmuOptions};
use super::error::{CudaError, Result};

/// A device address (`CUdeviceptr` on a GPU, a host address on the emulated device) of an
/// element of a buffer. Plain data; the buffer it points into must outlive every use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DPtr(pub u64);

impl DPtr {
    /// The null pointer, for a kernel's optional argument.
    pub const NULL: DPtr = DPtr(0);
}

/// One kernel argument, as the kernel's C signature declares it.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device pointer (`float*`, `const int*`, ..., or null).
    P(DPtr),
    /// `int`.
    I(i32),
    /// `long long`.
    L(i64),
    /// `float`.
    F(f32),
}

impl Arg {
    /// The code the emulated launcher compares with the kernel's signature (`p`, `i`, `l`, `f`).
    pub fn code(self) -> u8 {
        match self {
            Arg::P(_) => b'p',
            Arg::I(_) => b'i',
            Arg::L(_) => b'l',
            Arg::F(_) => b'f',
        }
    }
}

/// Grid, block and dynamic shared memory of one launch (the fields of `cuLaunchKernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes (`extern __shared__` arrays).
    pub shared_mem_bytes: u32,
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Which implementation a [`CudaDevice`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// GPU `ordinal` through the CUDA driver.
    Gpu { ordinal: usize },
    /// The emulated device (kernels compiled for the CPU).
    Emulated,
}

impl DeviceKind {
    /// `cuda:N` or `cuda-emu`, as `--device` names it.
    pub fn label(&self) -> String {
        match self {
            DeviceKind::Gpu { ordinal } => format!("cuda:{ordinal}"),
            DeviceKind::Emulated => "cuda-emu".to_string(),
        }
    }
}

/// A device allocation: its address and size, and whatever frees it when dropped.
pub struct Memory {
    pub base: u64,
    pub bytes: usize,
    _owner: Box<dyn Send + Sync>,
}

impl Memory {
    /// An allocation at `base` of `bytes`, freed when `owner` is dropped.
    pub fn new(base: u64, bytes: usize, owner: Box<dyn Send + Sync>) -> Memory {
        Memory { base, bytes, _owner: owner }
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Memory({:#x}, {} bytes)", self.base, self.bytes)
    }
}

/// Host memory that uploads are queued from without the host waiting for the copy: page-locked
/// on a GPU, so the copy engine reads it while the host goes on queueing kernels; plain memory
/// on the emulated device, whose copies finish before they return.
pub trait Staging: Send + Sync {
    /// Bytes it holds.
    fn capacity(&self) -> usize;
    /// Waits until the device has read what the previous call queued, copies `src` in and
    /// queues its copy to `dst` after all earlier work; returns without waiting for that copy.
    fn upload(&mut self, dst: DPtr, src: &[u8]) -> Result<()>;
}

/// What the host code needs from a device. Every call is ordered after the calls before it on
/// the same device (one stream); copies to the host return after the data has arrived.
pub trait DeviceApi: Send + Sync {
    /// A zero-filled allocation of `bytes` (at least 1).
    fn alloc_zeroed(&self, bytes: usize) -> Result<Memory>;
    /// Copies `src` to device address `dst` (inside an allocation of this device).
    fn copy_to_device(&self, dst: DPtr, src: &[u8]) -> Result<()>;
    /// Copies `dst.len()` bytes from device address `src` into `dst`, after all earlier work.
    fn copy_to_host(&self, dst: &mut [u8], src: DPtr) -> Result<()>;
    /// A [`Staging`] buffer of `bytes` (at least 1) for uploads that do not wait.
    fn staging(&self, bytes: usize) -> Result<Box<dyn Staging>>;
    /// Sets `bytes` bytes at `dst` to zero.
    fn memset_zero(&self, dst: DPtr, bytes: usize) -> Result<()>;
    /// Launches kernel `name` with `cfg` and `args` (in the kernel's parameter order).
    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;
    /// Lets kernel `name` use up to `bytes` of dynamic shared memory per block, beyond the
    /// default 48 KiB (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`, the opt-in of sm_70+).
    fn set_max_dynamic_shared(&self, name: &'static str, bytes: u32) -> Result<()>;
    /// One `cublasLtMatmul` as [`Matmul`] describes it.
    fn matmul(&self, m: &Matmul) -> Result<()>;
    /// Waits for all queued work; reports any asynchronous error.
    fn synchronize(&self) -> Result<()>;
    /// Whether all queued work is done (`cuStreamQuery`), without blocking.
    fn is_idle(&self) -> Result<bool>;
    /// Makes the device current on the calling thread (a CUDA context is per thread).
    fn bind_to_thread(&self) -> Result<()>;
    /// The CUDA stream, for libraries that enqueue on it themselves (NCCL); `None` on the
    /// emulated device, which has no stream a library could use.
    fn cuda_stream(&self) -> Option<cudarc::driver::sys::CUstream>;
    /// The emulated device, when this is one (for its launch counts in tests).
    fn as_emulated(&self) -> Option<&EmuDevice> {
        None
    }

    /// Ready mark `slot`: the bytes of `ranges` are final once the work queued so far is done.
    /// A later [`DeviceApi::side_after_mark`] of the slot orders the side stream after that
    /// work. Marking a slot again replaces its mark (a CUDA event, recorded again).
    fn mark(&self, slot: usize, ranges: &[(DPtr, usize)]) -> Result<()>;
    /// Orders the side stream (where NCCL sums gradient buckets while the backward goes on)
    /// after mark `slot`. The emulated device, whose work is done when it is queued, checks
    /// instead that the marked bytes have not changed since the mark: a change means work
    /// queued after the mark wrote them, which on a GPU would race with the side stream.
    fn side_after_mark(&self, slot: usize) -> Result<()>;
    /// Orders the main stream after all side-stream work queued so far.
    fn main_after_side(&self) -> Result<()>;
    /// The side stream, for NCCL; `None` on the emulated device.
    fn side_stream(&self) -> Option<cudarc::driver::sys::CUstream>;
    /// Whether the side stream's queued work is done, without blocking.
    fn side_is_idle(&self) -> Result<bool>;
}

/// Element types a device buffer may hold: plain data in which every bit pattern is a value,
/// so buffers can be copied to and from the host as bytes.
///
/// # Safety
/// Implement only for types without padding whose every bit pattern is valid.
pub unsafe trait DeviceElem: Copy + Send + Sync + 'static {}
// SAFETY: primitive numbers: no padding, every bit pattern valid.
unsafe impl DeviceElem for f32 {}
// SAFETY: as above.
unsafe impl DeviceElem for f64 {}
// SAFETY: as above.
unsafe impl DeviceElem for u8 {}
// SAFETY: as above.
unsafe impl DeviceElem for u16 {}
// SAFETY: as above.
unsafe impl DeviceElem for u32 {}
// SAFETY: as above.
unsafe impl DeviceElem for i32 {}

fn as_bytes<T: DeviceElem>(x: &[T]) -> &[u8] {
    // SAFETY: T is plain data without padding (DeviceElem), so its bytes may be read.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn as_bytes_mut<T: DeviceElem>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: every bit pattern is a valid T (DeviceElem), so any bytes may be written.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// A device buffer of `len` elements of `T`, allocated once and freed on drop.
#[derive(Debug)]
pub struct DevBuf<T> {
    mem: Memory,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: DeviceElem> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of element `i` (`i <= len`, so the one-past-the-end address of a prefix works).
    ///
    /// # Panics
    /// When `i > len`: an op computed an offset outside its own buffer, a bug in this crate.
    pub fn at(&self, i: usize) -> DPtr {
        assert!(i <= self.len, "offset {i} outside a buffer of {}", self.len);
        DPtr(self.mem.base + (i * std::mem::size_of::<T>()) as u64)
    }

    /// The address of the first element.
    pub fn ptr(&self) -> DPtr {
        DPtr(self.mem.base)
    }

    /// Elements `offset..offset + len` as a [`View`] that ops check their shapes against.
    ///
    /// # Panics
    /// When the range is outside the buffer: offsets come from the model's own sizes (the batch
    /// is validated first), so this is a bug in this crate, not bad input.
    pub fn view(&self, offset: usize, len: usize) -> View {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.len), "view {offset}+{len} outside a buffer of {}", self.len);
        View { ptr: self.at(offset), len }
    }

    /// The whole buffer as a [`View`].
    pub fn all(&self) -> View {
        View { ptr: self.ptr(), len: self.len }
    }
}

/// `len` elements at `ptr`: what an op receives, so it can check that every operand is large
/// enough for the shapes it is given before it launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub ptr: DPtr,
    pub len: usize,
}

impl View {
    /// Elements `offset..offset + len` of this view (in units of the view's element type).
    ///
    /// # Panics
    /// When the range is outside the view (a bug in this crate, see [`DevBuf::view`]).
    pub fn sub(self, offset: usize, len: usize, elem_bytes: usize) -> View {
        assert!(offset + len <= self.len, "sub-view {offset}+{len} outside a view of {}", self.len);
        View { ptr: DPtr(self.ptr.0 + (offset * elem_bytes) as u64), len }
    }
}

/// A [`Staging`] buffer for up to `len` elements of `T`: the model's inputs, targets and loss
/// weights go to the device through these, so a training step does not wait for its uploads.
pub struct StagingBuf<T> {
    inner: Box<dyn Staging>,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> std::fmt::Debug for StagingBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagingBuf({} elements)", self.len)
    }
}

impl<T: DeviceElem> StagingBuf<T> {
    /// Queues a copy of `data` into `buf[offset..offset + data.len()]` after all earlier work
    /// and returns without waiting for it (see [`Staging::upload`]); `data` may be reused at once.
    ///
    /// # Errors
    /// The range does not fit the buffer, `data` is longer than this staging buffer, or the
    /// copy cannot be queued.
    pub fn upload(&mut self, buf: &DevBuf<T>, offset: usize, data: &[T]) -> Result<()> {
        check_range("staged upload", buf.len(), offset, data.len())?;
        if data.len() > self.len {
            return Err(CudaError::Shape { op: "staged upload", reason: format!("{} elements through a staging buffer of {}", data.len(), self.len) });
        }
        if data.is_empty() {
            return Ok(());
        }
        self.inner.upload(buf.at(offset), as_bytes(data))
    }
}

/// One device (a GPU or the emulated one) with the kernels loaded: what all host code holds.
pub struct CudaDevice {
    api: Box<dyn DeviceApi>,
    pub kind: DeviceKind,
    /// The driver's name of the device (e.g. "NVIDIA H200"), the key of the peak table.
    pub name: String,
    /// Compute capability `(major, minor)` (the emulated device follows sm_90's limits).
    pub capability: (i32, i32),
    /// Device memory, bytes (the emulated device: the host's available memory).
    pub memory: u64,
    /// How the kernels were built, for logs: NVRTC's version and the cache, or the host compiler.
    pub kernels: String,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("kind", &self.kind).field("name", &self.name).field("capability", &self.capability).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal` (see [`gpu::GpuDevice::open`]).
    ///
    /// # Errors
    /// A library or the device is missing, a kernel does not compile, or a driver call fails.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        let (api, info) = gpu::GpuDevice::open(ordinal)?;
        Ok(CudaDevice { api: Box::new(api), kind: DeviceKind::Gpu { ordinal }, name: info.name, capability: info.capability, kernels: info.kernels, memory: info.memory })
    }

    /// The emulated device with the default options (every core, blocks in parallel).
    ///
    /// # Errors
    /// A kernel the host loads is missing from the emulated build, or the thread pool fails to start.
    pub fn emulated() -> Result<CudaDevice> {
        CudaDevice::emulated_with(EmuOptions::default())
    }

    /// The emulated device with `opts` (e.g. one thread, for bit-reproducible atomics).
    ///
    /// # Errors
    /// As [`CudaDevice::emulated`].
    pub fn emulated_with(opts: EmuOptions) -> Result<CudaDevice> {
        let emu = EmuDevice::new(opts)?;
        let kernels = emu.describe();
        Ok(CudaDevice {
            api: Box::new(emu),
            kind: DeviceKind::Emulated,
            name: super::emu::DEVICE_NAME.to_string(),
            capability: (9, 0),
            kernels,
            memory: crate::runtime::available_memory(),
        })
    }

    /// The device `--device` names: `Cuda` opens GPU `ordinal`, `CudaEmu` the emulated device.
    ///
    /// # Errors
    /// `Cpu` (not a CUDA device), or what [`CudaDevice::open`] / [`CudaDevice::emulated`] return.
    pub fn for_device(device: crate::backend::Device, ordinal: usize) -> Result<CudaDevice> {
        match device {
            crate::backend::Device::Cuda => CudaDevice::open(ordinal),
            crate::backend::Device::CudaEmu => CudaDevice::emulated(),
            crate::backend::Device::Cpu => Err(CudaError::NoDevice { reason: "--device cpu is not a CUDA device".into() }),
        }
    }

    /// The emulated device behind this handle, if it is one.
    pub fn emulator(&self) -> Option<&EmuDevice> {
        self.api.as_emulated()
    }

    /// Launches kernel `name` on the device's stream.
    ///
    /// # Errors
    /// The kernel is not loaded, the launch is refused (limits, arguments), or it fails.
    pub fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.api.launch(name, cfg, args)
    }

    /// Lets kernel `name` use more than 48 KiB of dynamic shared memory (see [`DeviceApi`]).
    ///
    /// # Errors
    /// Unknown kernel, or more than the device allows.
    pub fn set_max_dynamic_shared(&self, name: &'static str, bytes: u32) -> Result<()> {
        self.api.set_max_dynamic_shared(name, bytes)
    }

    /// One cuBLASLt matmul (the row-major wrapper is [`super::matmul::gemm`]).
    ///
    /// # Errors
    /// cuBLASLt (or the emulated contract) refuses the layouts or fails.
    pub fn matmul(&self, m: &Matmul) -> Result<()> {
        self.api.matmul(m)
    }

    /// A zeroed buffer of `len` elements.
    ///
    /// # Errors
    /// Out of device memory.
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<DevBuf<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        Ok(DevBuf { mem: self.api.alloc_zeroed(bytes)?, len, _elem: PhantomData })
    }

    /// A buffer holding a copy of `data`.
    ///
    /// # Errors
    /// Out of device memory or a failed copy.
    pub fn upload_new<T: DeviceElem>(&self, data: &[T]) -> Result<DevBuf<T>> {
        let buf = self.alloc::<T>(data.len())?;
        self.upload(&buf, 0, data)?;
        Ok(buf)
    }

    /// Copies `data` into `buf[offset..offset + data.len()]` (returns after the copy: the
    /// source is pageable host memory).
    ///
    /// # Errors
    /// The range does not fit the buffer, or the copy fails.
    pub fn upload<T: DeviceElem>(&self, buf: &DevBuf<T>, offset: usize, data: &[T]) -> Result<()> {
        check_range("upload", buf.len(), offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.api.copy_to_device(buf.at(offset), as_bytes(data))
    }

    /// A staging buffer for uploads of up to `len` elements that do not wait ([`StagingBuf::upload`]).
    ///
    /// # Errors
    /// The host cannot lock the memory, or the device cannot create the event that tracks it.
    pub fn staging<T: DeviceElem>(&self, len: usize) -> Result<StagingBuf<T>> {
        Ok(StagingBuf { inner: self.api.staging(len.max(1) * std::mem::size_of::<T>())?, len, _elem: PhantomData })
    }

    /// Copies `buf[offset..offset + out.len()]` into `out`, after all work queued before it.
    ///
    /// # Errors
    /// The range does not fit the buffer, or the copy fails (including an earlier kernel's
    /// asynchronous error, which surfaces here).
    pub fn download<T: DeviceElem>(&self, buf: &DevBuf<T>, offset: usize, out: &mut [T]) -> Result<()> {
        check_range("download", buf.len(), offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.api.copy_to_host(as_bytes_mut(out), buf.at(offset))
    }

    /// The whole buffer, copied to the host.
    ///
    /// # Errors
    /// As [`CudaDevice::download`].
    pub fn to_host<T: DeviceElem + Default>(&self, buf: &DevBuf<T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); buf.len()];
        self.download(buf, 0, &mut out)?;
        Ok(out)
    }

    /// Sets `len` elements from `offset` to zero bits.
    ///
    /// # Errors
    /// The range does not fit, or the memset fails.
    pub fn zero<T: DeviceElem>(&self, buf: &DevBuf<T>, offset: usize, len: usize) -> Result<()> {
        check_range("zero", buf.len(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.api.memset_zero(buf.at(offset), len * std::mem::size_of::<T>())
    }

    /// Waits for all queued work.
    ///
    /// # Errors
    /// Any asynchronous error of queued work.
    pub fn sync(&self) -> Result<()> {
        self.api.synchronize()
    }

    /// Whether all queued work is done, without blocking.
    ///
    /// # Errors
    /// An asynchronous error of queued work.
    pub fn is_idle(&self) -> Result<bool> {
        self.api.is_idle()
    }

    /// Makes this device current on the calling thread.
    ///
    /// # Errors
    /// The driver refuses.
    pub fn bind_to_thread(&self) -> Result<()> {
        self.api.bind_to_thread()
    }

    /// The CUDA stream for NCCL; `None` on the emulated device.
    pub fn cuda_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        self.api.cuda_stream()
    }

    /// Ready mark `slot` over `views` of `T` elements ([`DeviceApi::mark`]).
    ///
    /// # Errors
    /// The driver refuses the event.
    pub fn mark(&self, slot: usize, views: &[View], elem_bytes: usize) -> Result<()> {
        let ranges: Vec<(DPtr, usize)> = views.iter().map(|v| (v.ptr, v.len * elem_bytes)).collect();
        self.api.mark(slot, &ranges)
    }

    /// The side stream waits for mark `slot` ([`DeviceApi::side_after_mark`]).
    ///
    /// # Errors
    /// The driver refuses; on the emulated device, the marked bytes changed after the mark.
    pub fn side_after_mark(&self, slot: usize) -> Result<()> {
        self.api.side_after_mark(slot)
    }

    /// The main stream waits for the side stream's queued work.
    ///
    /// # Errors
    /// The driver refuses.
    pub fn main_after_side(&self) -> Result<()> {
        self.api.main_after_side()
    }

    /// The side stream for NCCL; `None` on the emulated device.
    pub fn side_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        self.api.side_stream()
    }

    /// Whether the side stream is idle, without blocking.
    ///
    /// # Errors
    /// An asynchronous error of the side stream's work.
    pub fn side_is_idle(&self) -> Result<bool> {
        self.api.side_is_idle()
    }
}

fn check_range(op: &'static str, len: usize, offset: usize, n: usize) -> Result<()> {
    if offset.checked_add(n).is_none_or(|end| end > len) {
        return Err(CudaError::Shape { op, reason: format!("range {offset}..{} outside a buffer of {len}", offset.saturating_add(n)) });
    }
    Ok(())
}
