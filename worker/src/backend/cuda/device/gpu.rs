//! The real GPU behind [`super::DeviceApi`]: a CUDA context and stream through cudarc, the
//! kernels compiled by NVRTC and loaded from [`crate::backend::cuda::kernels`], and a cuBLASLt
//! handle with its workspace. Event tracking is switched off: with a single stream, stream order
//! is the only synchronisation needed.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, PushKernelArg};

use super::blas::{DataType, Matmul, MatrixLayout};
use super::{Arg, DPtr, DeviceApi, LaunchConfig, Memory};
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
}

/// One GPU with its stream, loaded kernels and cuBLASLt handle.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    blas: Blas,
}

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
        let kernels = format!("NVRTC {}.{} ({arch} PTX; {cached_files} of {} files from the cache {})", nvrtc_version.0, nvrtc_version.1, KernelFile::ALL.len(), cache.display());
        tracing::info!(device = %name, sm = format!("{}.{}", capability.0, capability.1), kernels = %kernels, "CUDA device ready");
        Ok((GpuDevice { ctx, stream, functions, blas }, GpuInfo { name, capability, kernels }))
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| CudaError::Launch { kernel: name.to_string(), reason: "no such kernel is loaded".into() })
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
        f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v).map_err(CudaError::driver(format!("{name}: set max dynamic shared memory")))
    }

    fn matmul(&self, m: &Matmul) -> Result<()> {
        self.blas.matmul(m)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver("synchronize"))
    }

    fn is_idle(&self) -> Result<bool> {
        // SAFETY: the stream is alive (owned by self).
        match unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) } {
            cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(true),
            cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(CudaError::Shape { op: "stream query", reason: format!("{other:?}") }),
        }
    }

    fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(CudaError::driver("bind context to thread"))
    }

    fn cuda_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        Some(self.stream.cu_stream())
    }
}

/// A cuBLASLt handle with its workspace, bound to one stream.
struct Blas {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is used only through &self methods that enqueue on the one stream; cuBLASLt
// handles may be used from any thread as long as calls are not concurrent. The host code drives
// a device from one thread at a time (the trainer and model take `&mut self`).
unsafe impl Send for Blas {}
// SAFETY: as above; `matmul` only reads the handle.
unsafe impl Sync for Blas {}

impl Blas {
    /// A handle and a workspace sized as NVIDIA recommends (32 MiB on Hopper, 4 MiB before).
    fn new(stream: Arc<CudaStream>, sm_major: i32) -> Result<Blas> {
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        let size = if sm_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(size).map_err(CudaError::driver("allocate cuBLASLt workspace"))?;
        let workspace_ptr = workspace.device_ptr(&stream).0;
        Ok(Blas { handle, workspace, workspace_ptr, stream })
    }

    fn matmul(&self, mm: &Matmul) -> Result<()> {
        let (m, n, k) = mm.dims();
        let op = || format!("matmul m={m} n={n} k={k} transa={} transb={}", mm.trans_a, mm.trans_b);
        let a = Layout::new(&mm.a_layout).map_err(|e| blas_err(&op(), e))?;
        let b = Layout::new(&mm.b_layout).map_err(|e| blas_err(&op(), e))?;
        let c = Layout::new(&mm.c_layout).map_err(|e| blas_err(&op(), e))?;
        let d = Layout::new(&mm.d_layout).map_err(|e| blas_err(&op(), e))?;
        let desc = Desc::new().map_err(|e| blas_err(&op(), e))?;
        desc.set_op(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, mm.trans_a).map_err(|e| blas_err(&op(), e))?;
        desc.set_op(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, mm.trans_b).map_err(|e| blas_err(&op(), e))?;
        let pref = Pref::new(self.workspace.len()).map_err(|e| blas_err(&op(), e))?;
        // SAFETY: all descriptors are alive for the duration of the calls; the pointers come
        // from buffers whose lengths the callers checked against these shapes.
        unsafe {
            let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, d.0, pref.0).map_err(|e| blas_err(&op(), e))?;
            lt::matmul(
                self.handle,
                desc.0,
                (&mm.alpha) as *const f32 as *const _,
                (&mm.beta) as *const f32 as *const _,
                mm.a.0 as *const _,
                a.0,
                mm.b.0 as *const _,
                b.0,
                mm.c.0 as *const _,
                c.0,
                mm.d.0 as *mut _,
                d.0,
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

fn data_type(dt: DataType) -> ltsys::cudaDataType {
    match dt {
        DataType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DataType::Bf16 => ltsys::cudaDataType::CUDA_R_16BF,
    }
}

/// Owned descriptors, destroyed on every path (errors included).
struct Layout(ltsys::cublasLtMatrixLayout_t);
impl Layout {
    fn new(l: &MatrixLayout) -> Result<Layout, lt::CublasError> {
        lt::create_matrix_layout(data_type(l.dtype), l.rows, l.cols, l.ld).map(Layout)
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(ltsys::cublasLtMatmulDesc_t);
impl Desc {
    fn new() -> Result<Desc, lt::CublasError> {
        lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, ltsys::cudaDataType::CUDA_R_32F).map(Desc)
    }
    fn set_op(&self, attr: ltsys::cublasLtMatmulDescAttributes_t, transpose: bool) -> Result<(), lt::CublasError> {
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

struct Pref(ltsys::cublasLtMatmulPreference_t);
impl Pref {
    fn new(workspace: usize) -> Result<Pref, lt::CublasError> {
        let p = Pref(lt::create_matmul_pref()?);
        // SAFETY: the attribute takes a size_t, passed by address with its size.
        unsafe {
            lt::set_matmul_pref_attribute(
                p.0,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
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
