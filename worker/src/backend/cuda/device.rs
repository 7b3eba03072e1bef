//! One GPU: its context and stream, the kernels loaded from [`super::kernels`], the cuBLASLt
//! handle, and device buffers addressed by raw pointers.
//!
//! Why raw pointers: the model's buffers are long-lived, owned by one struct and used on one
//! stream, and its ops read one layer's slot of a buffer while writing another's. cudarc's
//! borrow-checked views cannot express that without a split for every call, so buffers are
//! [`DevBuf`]s (owning a `CudaSlice`) and ops take [`DPtr`]s into them; every op wrapper checks
//! its lengths against the buffers before it launches. Event tracking is switched off: with a
//! single stream, stream order is the only synchronisation needed.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::error::{CudaError, Result};
use super::kernels::{self, KernelFile};
use super::matmul::Blas;

/// Checks that the CUDA driver, NVRTC and cuBLASLt load and that the driver sees a GPU. Cheap
/// (dlopen and `cuDeviceGetCount`) and never panics.
///
/// # Errors
/// The first missing library, or [`CudaError::NoDevice`].
pub fn probe() -> Result<()> {
    // SAFETY: each call only tries to dlopen a library by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::LibraryMissing { lib: "libcuda", hint: "no NVIDIA driver on this machine".into() });
    }
    match CudaContext::device_count() {
        Ok(0) => return Err(CudaError::NoDevice { reason: "the driver reports 0 devices".into() }),
        Ok(_) => {}
        Err(e) => return Err(CudaError::NoDevice { reason: e.to_string() }),
    }
    if !kernels::nvrtc_available() {
        return Err(kernels::nvrtc_missing());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(CudaError::LibraryMissing {
            lib: "libcublasLt",
            hint: "install the CUDA toolkit or `pip install nvidia-cublas`, and put the folder with libcublasLt.so.13 on LD_LIBRARY_PATH".into(),
        });
    }
    Ok(())
}

/// A device address (`CUdeviceptr`) of an `f32`, `bf16`, `u32`, `i32` or `f64` element. Plain
/// data; the buffer it points into must outlive every launch that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DPtr(pub u64);

impl DPtr {
    /// The null pointer, for a kernel's optional argument.
    pub const NULL: DPtr = DPtr(0);
}

/// A device buffer of `len` elements of `T`, allocated once.
#[derive(Debug)]
pub struct DevBuf<T> {
    slice: CudaSlice<T>,
    base: u64,
}

impl<T: DeviceRepr> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// The address of element `i` (`i <= len`, so the one-past-the-end address of a prefix works).
    ///
    /// # Panics
    /// When `i > len`: an op computed an offset outside its own buffer, a bug in this crate.
    pub fn at(&self, i: usize) -> DPtr {
        assert!(i <= self.len(), "offset {i} outside a buffer of {}", self.len());
        DPtr(self.base + (i * std::mem::size_of::<T>()) as u64)
    }

    /// The address of the first element.
    pub fn ptr(&self) -> DPtr {
        DPtr(self.base)
    }

    /// Elements `offset..offset + len` as a [`View`] that ops check their shapes against.
    ///
    /// # Panics
    /// When the range is outside the buffer: offsets come from the model's own sizes (the batch
    /// is validated first), so this is a bug in this crate, not bad input.
    pub fn view(&self, offset: usize, len: usize) -> View {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.len()), "view {offset}+{len} outside a buffer of {}", self.len());
        View { ptr: self.at(offset), len }
    }

    /// The whole buffer as a [`View`].
    pub fn all(&self) -> View {
        View { ptr: self.ptr(), len: self.len() }
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

/// One kernel argument.
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

/// One GPU with the kernels loaded.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The driver's name of the device (e.g. "NVIDIA H200"), the key of the peak table.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub capability: (i32, i32),
    /// NVRTC's version, part of the kernel cache key.
    pub nvrtc_version: (i32, i32),
    functions: HashMap<&'static str, CudaFunction>,
    /// How many kernel files came from the on-disk cache rather than NVRTC.
    pub cached_files: usize,
    pub(crate) blas: Blas,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name).field("capability", &self.capability).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the libraries ([`probe`]), creates the context and a stream,
    /// compiles every kernel file for the device's compute capability (or loads it from the
    /// cache) and creates the cuBLASLt handle.
    ///
    /// # Errors
    /// A library or the device is missing, a kernel does not compile, or a driver call fails.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver(format!("open device {ordinal}")))?;
        // SAFETY: this backend uses one stream per device; stream order is its only synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(CudaError::driver("create stream"))?;
        let name = ctx.name().map_err(CudaError::driver("device name"))?;
        let capability = ctx.compute_capability().map_err(CudaError::driver("compute capability"))?;
        let nvrtc_version = kernels::nvrtc_version()?;
        let include = kernels::find_include_dir()?;
        let arch = kernels::arch_for(capability.0, capability.1);
        let cache = kernels::cache_dir();
        let mut functions = HashMap::new();
        let mut cached_files = 0;
        for file in KernelFile::ALL {
            let (ptx, cached) = kernels::load_or_compile(file, &arch, &include, &cache)?;
            cached_files += cached as usize;
            if ptx.contains('\0') {
                return Err(CudaError::Shape { op: "load kernels", reason: format!("{}: PTX contains a NUL byte (corrupt cache file? remove {})", file.file_name(), cache.display()) });
            }
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(CudaError::driver(format!("load {}", file.file_name())))?;
            for &f in file.functions() {
                let func = module.load_function(f).map_err(CudaError::driver(format!("load kernel {f}")))?;
                functions.insert(f, func);
            }
        }
        let blas = Blas::new(stream.clone(), capability.0)?;
        tracing::info!(device = %name, sm = format!("{}.{}", capability.0, capability.1), nvrtc = format!("{}.{}", nvrtc_version.0, nvrtc_version.1), cached_files, "CUDA device ready");
        Ok(CudaDevice { ctx, stream, name, capability, nvrtc_version, functions, cached_files, blas })
    }

    /// Launches kernel `name` on the device's stream.
    ///
    /// # Errors
    /// The kernel is not loaded or the launch fails.
    pub fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.functions.get(name).ok_or_else(|| CudaError::Shape { op: "launch", reason: format!("kernel {name} is not loaded") })?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(&p.0),
                Arg::I(x) => b.arg(x),
                Arg::L(x) => b.arg(x),
                Arg::F(x) => b.arg(x),
            };
        }
        // SAFETY: every op wrapper checks its pointers and lengths against the buffers and the
        // kernel's argument list before calling this.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver(name))?;
        Ok(())
    }

    /// A zeroed buffer of `len` elements.
    ///
    /// # Errors
    /// Out of device memory.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DevBuf<T>> {
        let slice = self.stream.alloc_zeros::<T>(len.max(1)).map_err(CudaError::driver(format!("allocate {} bytes", len * std::mem::size_of::<T>())))?;
        let base = slice.device_ptr(&self.stream).0;
        Ok(DevBuf { slice, base })
    }

    /// A buffer holding a copy of `data`.
    ///
    /// # Errors
    /// Out of device memory or a failed copy.
    pub fn upload_new<T: DeviceRepr + ValidAsZeroBits>(&self, data: &[T]) -> Result<DevBuf<T>> {
        let buf = self.alloc::<T>(data.len())?;
        self.upload(&buf, 0, data)?;
        Ok(buf)
    }

    /// Copies `data` into `buf[offset..offset + data.len()]` (asynchronously, in stream order;
    /// returns after the copy because the source is pageable host memory).
    ///
    /// # Errors
    /// The range does not fit the buffer, or the copy fails.
    pub fn upload<T: DeviceRepr>(&self, buf: &DevBuf<T>, offset: usize, data: &[T]) -> Result<()> {
        check_range("upload", buf.len(), offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination range lies inside `buf` (checked above).
        unsafe { cudarc::driver::result::memcpy_htod_async(buf.at(offset).0, data, self.stream.cu_stream()) }.map_err(CudaError::driver("copy to device"))?;
        self.sync()
    }

    /// Copies `buf[offset..offset + out.len()]` into `out`, after all work queued before it.
    ///
    /// # Errors
    /// The range does not fit the buffer, or the copy fails (including an earlier kernel's
    /// asynchronous error, which surfaces here).
    pub fn download<T: DeviceRepr>(&self, buf: &DevBuf<T>, offset: usize, out: &mut [T]) -> Result<()> {
        check_range("download", buf.len(), offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: the source range lies inside `buf` (checked above); `out` is valid for writes.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, buf.at(offset).0, self.stream.cu_stream()) }.map_err(CudaError::driver("copy to host"))?;
        self.sync()
    }

    /// Sets `len` elements from `offset` to zero bits.
    ///
    /// # Errors
    /// The range does not fit, or the memset fails.
    pub fn zero<T: DeviceRepr>(&self, buf: &DevBuf<T>, offset: usize, len: usize) -> Result<()> {
        check_range("zero", buf.len(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside `buf` (checked above).
        unsafe { cudarc::driver::result::memset_d8_async(buf.at(offset).0, 0, len * std::mem::size_of::<T>(), self.stream.cu_stream()) }
            .map_err(CudaError::driver("memset"))
    }

    /// Waits for all queued work.
    ///
    /// # Errors
    /// Any asynchronous error of queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver("synchronize"))
    }
}

fn check_range(op: &'static str, len: usize, offset: usize, n: usize) -> Result<()> {
    if offset.checked_add(n).is_none_or(|end| end > len) {
        return Err(CudaError::Shape { op, reason: format!("range {offset}..{} outside a buffer of {len}", offset.saturating_add(n)) });
    }
    Ok(())
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}
