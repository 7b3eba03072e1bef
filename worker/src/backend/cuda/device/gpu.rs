//! The real GPU behind [`super::DeviceApi`]: a CUDA context and stream through cudarc, the
//! kernels compiled by NVRTC and loaded from [`crate::backend::cuda::kernels`], and cuBLASLt
//! ([`super::cublaslt`]: one handle and workspace, a plan cached per shape). cudarc's event
//! tracking is switched off: the kernels, copies and gemms run on one main stream, whose order
//! is their synchronisation; the side stream NCCL sums gradient buckets on is ordered against
//! it by the device's own events (ready marks, [`super::DeviceApi::mark`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::sys as ltsys;
use cudarc::driver::sys::{CUevent, CUevent_flags, CUevent_wait_flags};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DevicePtr, PushKernelArg};

use super::blas::Matmul;
use super::cublaslt::Blas;
use super::{Arg, DPtr, DeviceApi, LaunchConfig, Memory, Staging};
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::{self, KernelFile};

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
    if !unsafe { ltsys::is_culib_present() } {
        return Err(CudaError::LibraryMissing {
            lib: "libcublasLt",
            hint: "install the CUDA toolkit or `pip install nvidia-cublas`, and put the folder with libcublasLt.so.13 on LD_LIBRARY_PATH".into(),
        });
    }
    Ok(())
}

/// What [`GpuDevice::open`] learned about the device.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    pub capability: (i32, i32),
    pub kernels: String,
    /// Device memory, bytes.
    pub memory: u64,
}

/// One GPU with its stream, loaded kernels and cuBLASLt handle.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The side stream: NCCL's gradient sums, overlapping the main stream's backward.
    side: Arc<CudaStream>,
    /// One event per ready-mark slot, created on first use.
    marks: Mutex<Vec<CUevent>>,
    /// Recorded on the side stream for the main stream to wait on.
    side_done: CUevent,
    functions: HashMap<&'static str, CudaFunction>,
    blas: Blas,
}

// SAFETY: the events are owned by this device and used only through its methods; CUDA event
// handles may be used from any thread with the context current.
unsafe impl Send for GpuDevice {}
// SAFETY: as above; the mark table is behind a mutex.
unsafe impl Sync for GpuDevice {}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice").field("kernels", &self.functions.len()).finish_non_exhaustive()
    }
}

impl GpuDevice {
    /// Opens GPU `ordinal`: checks the libraries ([`probe`]), creates the context and a stream,
    /// compiles every kernel file for the device's compute capability (or loads it from the
    /// cache) and creates the cuBLASLt handle.
    ///
    /// # Errors
    /// A library or the device is missing, a kernel does not compile, or a driver call fails.
    pub fn open(ordinal: usize) -> Result<(GpuDevice, GpuInfo)> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver(format!("open device {ordinal}")))?;
        // SAFETY: this backend uses one stream per device; stream order is its only synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(CudaError::driver("create stream"))?;
        let side = ctx.new_stream().map_err(CudaError::driver("create the side stream"))?;
        let side_done = cudarc::driver::result::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(CudaError::driver("create the side stream's event"))?;
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
                return Err(CudaError::Shape {
                    op: "load kernels",
                    reason: format!("{}: PTX contains a NUL byte (corrupt cache file? remove {})", file.file_name(), cache.display()),
                });
            }
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(CudaError::driver(format!("load {}", file.file_name())))?;
            for &f in file.functions() {
                let func = module.load_function(f).map_err(CudaError::driver(format!("load kernel {f}")))?;
                functions.insert(f, func);
            }
        }
        let blas = Blas::new(stream.clone(), capability.0)?;
        let kernels = format!("NVRTC {}.{} ({arch} PTX; {cached_files} of {} files from the cache {})", nvrtc_version.0, nvrtc_version.1, KernelFile::ALL.len(), cache.display());
        tracing::info!(device = %name, sm = format!("{}.{}", capability.0, capability.1), kernels = %kernels, "CUDA device ready");
        let memory = ctx.total_mem().map_err(CudaError::driver("total memory"))? as u64;
        Ok((GpuDevice { ctx, stream, side, marks: Mutex::new(Vec::new()), side_done, functions, blas }, GpuInfo { name, capability, kernels, memory }))
    }

    /// The event of mark `slot`, created when first asked for.
    fn mark_event(&self, slot: usize) -> Result<CUevent> {
        let mut marks = self.marks.lock().map_err(|_| CudaError::Shape { op: "mark", reason: "mark table poisoned".into() })?;
        while marks.len() <= slot {
            marks.push(cudarc::driver::result::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(CudaError::driver("create a mark event"))?);
        }
        Ok(marks[slot])
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| CudaError::Launch { kernel: name.to_string(), reason: "no such kernel is loaded".into() })
    }
}

/// Page-locked host memory for uploads that do not wait, and an event recorded after the copy
/// that reads it: the next upload waits on that event (long done, in a training step: the copy
/// ran before the previous micro-batch's kernels) before it overwrites the memory.
struct PinnedStaging {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    host: *mut u8,
    bytes: usize,
    event: cudarc::driver::sys::CUevent,
    /// A copy from `host` was queued after the event was last waited on.
    pending: bool,
}

// SAFETY: the host memory and the event are owned by this struct alone; the memory is written
// only through `&mut self` and after the event says the device has finished reading it.
unsafe impl Send for PinnedStaging {}
// SAFETY: as above; `&self` gives access to nothing but the capacity.
unsafe impl Sync for PinnedStaging {}

impl PinnedStaging {
    fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, bytes: usize) -> Result<PinnedStaging> {
        use cudarc::driver::result;
        let bytes = bytes.max(1);
        ctx.bind_to_thread().map_err(CudaError::driver("bind context to thread"))?;
        let event = result::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(CudaError::driver("create staging event"))?;
        // SAFETY: a plain allocation of `bytes` page-locked bytes; it is only ever written before it is read.
        let host = match unsafe { result::malloc_host(bytes, 0) } {
            Ok(h) => h.cast::<u8>(),
            Err(e) => {
                // SAFETY: the event was created above and is not used anywhere else.
                let _ = unsafe { result::event::destroy(event) };
                return Err(CudaError::driver(format!("page-lock {bytes} bytes of host memory"))(e));
            }
        };
        Ok(PinnedStaging { ctx, stream, host, bytes, event, pending: false })
    }

    fn wait(&mut self) -> Result<()> {
        if self.pending {
            // SAFETY: the event is alive (owned by self) and was recorded on our stream.
            unsafe { cudarc::driver::result::event::synchronize(self.event) }.map_err(CudaError::driver("wait for a staged upload"))?;
            self.pending = false;
        }
        Ok(())
    }
}

impl Staging for PinnedStaging {
    fn capacity(&self) -> usize {
        self.bytes
    }

    fn upload(&mut self, dst: DPtr, src: &[u8]) -> Result<()> {
        use cudarc::driver::result;
        if src.len() > self.bytes {
            return Err(CudaError::Shape { op: "staged upload", reason: format!("{} bytes through a staging buffer of {}", src.len(), self.bytes) });
        }
        self.ctx.bind_to_thread().map_err(CudaError::driver("bind context to thread"))?;
        self.wait()?;
        // SAFETY: `host` holds `bytes >= src.len()` bytes, and the device no longer reads them
        // (the wait above).
        let staged = unsafe { std::slice::from_raw_parts_mut(self.host, src.len()) };
        staged.copy_from_slice(src);
        let stream = self.stream.cu_stream();
        // SAFETY: the caller ([`super::StagingBuf::upload`]) checked `dst` against its buffer;
        // `staged` stays valid and unwritten until the event recorded next has completed.
        unsafe { result::memcpy_htod_async(dst.0, staged, stream) }.map_err(CudaError::driver("queue a staged upload"))?;
        // SAFETY: event and stream are alive.
        unsafe { result::event::record(self.event, stream) }.map_err(CudaError::driver("record a staged upload"))?;
        self.pending = true;
        Ok(())
    }
}

impl Drop for PinnedStaging {
    fn drop(&mut self) {
        use cudarc::driver::result;
        if self.ctx.bind_to_thread().is_err() || self.wait().is_err() {
            // A copy may still read the memory: leaking it is the only safe choice.
            tracing::warn!(bytes = self.bytes, "a staged upload could not be waited for; its page-locked buffer is leaked");
            return;
        }
        // SAFETY: no copy reads the memory any more (the wait above); both were created in `new`.
        unsafe {
            let _ = result::free_host(self.host.cast());
            let _ = result::event::destroy(self.event);
        }
    }
}

impl DeviceApi for GpuDevice {
    fn alloc_zeroed(&self, bytes: usize) -> Result<Memory> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(CudaError::driver(format!("allocate {bytes} bytes")))?;
        let base = slice.device_ptr(&self.stream).0;
        Ok(Memory::new(base, bytes, Box::new(slice)))
    }

    fn copy_to_device(&self, dst: DPtr, src: &[u8]) -> Result<()> {
        // SAFETY: the caller ([`super::CudaDevice::upload`]) checked the range against the buffer.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.0, src, self.stream.cu_stream()) }.map_err(CudaError::driver("copy to device"))?;
        self.synchronize()
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DPtr) -> Result<()> {
        // SAFETY: the caller checked the range; `dst` is valid for writes until the sync below.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src.0, self.stream.cu_stream()) }.map_err(CudaError::driver("copy to host"))?;
        self.synchronize()
    }

    fn staging(&self, bytes: usize) -> Result<Box<dyn Staging>> {
        Ok(Box::new(PinnedStaging::new(self.ctx.clone(), self.stream.clone(), bytes)?))
    }

    fn memset_zero(&self, dst: DPtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller checked the range against the buffer.
        unsafe { cudarc::driver::result::memset_d8_async(dst.0, 0, bytes, self.stream.cu_stream()) }.map_err(CudaError::driver("memset"))
    }

    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(&p.0),
                Arg::I(x) => b.arg(x),
                Arg::L(x) => b.arg(x),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = cudarc::driver::LaunchConfig { grid_dim: cfg.grid_dim, block_dim: cfg.block_dim, shared_mem_bytes: cfg.shared_mem_bytes };
        // SAFETY: every op wrapper checks its pointers and lengths against the buffers and the
        // kernel's argument list before calling this (and the emulated device checks the list
        // against the kernel's signature in CI).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver(name))?;
        Ok(())
    }

    fn set_max_dynamic_shared(&self, name: &'static str, bytes: u32) -> Result<()> {
        let f = self.function(name)?;
        let v = i32::try_from(bytes).map_err(|_| CudaError::Launch { kernel: name.to_string(), reason: format!("{bytes} bytes of shared memory") })?;
        f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v)
            .map_err(CudaError::driver(format!("{name}: set max dynamic shared memory")))
    }

    fn matmul(&self, m: &Matmul) -> Result<()> {
        self.blas.matmul(m)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver("synchronize"))
    }

    fn is_idle(&self) -> Result<bool> {
        stream_idle(self.stream.cu_stream())
    }

    fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(CudaError::driver("bind context to thread"))
    }

    fn cuda_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        Some(self.stream.cu_stream())
    }

    fn mark(&self, slot: usize, _ranges: &[(DPtr, usize)]) -> Result<()> {
        let ev = self.mark_event(slot)?;
        // SAFETY: the event and the stream are alive (owned by self).
        unsafe { cudarc::driver::result::event::record(ev, self.stream.cu_stream()) }.map_err(CudaError::driver("record a mark"))
    }

    fn side_after_mark(&self, slot: usize) -> Result<()> {
        let ev = self.mark_event(slot)?;
        // SAFETY: as above; an event never recorded makes the wait a no-op.
        unsafe { cudarc::driver::result::stream::wait_event(self.side.cu_stream(), ev, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(CudaError::driver("side stream waits for a mark"))
    }

    fn main_after_side(&self) -> Result<()> {
        // SAFETY: the event and both streams are alive (owned by self).
        unsafe {
            cudarc::driver::result::event::record(self.side_done, self.side.cu_stream()).map_err(CudaError::driver("record the side stream's event"))?;
            cudarc::driver::result::stream::wait_event(self.stream.cu_stream(), self.side_done, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(CudaError::driver("main stream waits for the side stream"))
        }
    }

    fn side_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        Some(self.side.cu_stream())
    }

    fn side_is_idle(&self) -> Result<bool> {
        stream_idle(self.side.cu_stream())
    }
}

/// `cuStreamQuery`: done, not yet, or the asynchronous error of its work.
fn stream_idle(stream: cudarc::driver::sys::CUstream) -> Result<bool> {
    // SAFETY: the caller passes a live stream of this device.
    match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
        cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(true),
        cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(CudaError::Shape { op: "stream query", reason: format!("{other:?}") }),
    }
}

impl Drop for GpuDevice {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // Both streams drained first: no queued record or wait may outlive its event.
        let _ = self.stream.synchronize();
        let _ = self.side.synchronize();
        let marks = self.marks.get_mut().map(std::mem::take).unwrap_or_default();
        for ev in marks.into_iter().chain([self.side_done]) {
            // SAFETY: created by this device, destroyed once, no longer used by queued work.
            let _ = unsafe { cudarc::driver::result::event::destroy(ev) };
        }
    }
}
