//! The emulated CUDA device (`--device cuda-emu`): the CUDA backend's host code and its own
//! kernel sources, run on the CPU, so every CI machine executes what a GPU would except the
//! driver, cuBLASLt's own kernels and the hardware (docs/CUDA.md says what that leaves).
//!
//! - Memory is host memory: a device address is a host address. Each allocation is 256-byte
//!   aligned with a 256-byte guard on both sides filled with the f32 signalling NaN 0x7f800001:
//!   a kernel that reads there gets NaN, and one that writes there is reported after its launch
//!   (a value computed from a guard read is a quiet NaN, so even that write changes the bits).
//! - Kernels are `kernels/*.cu` compiled by `worker/build.rs` against `cuda_emu.h`, found by
//!   name in the tables the build generates. A launch is checked before it runs: sm_90's limits
//!   ([`limits`]), the argument count and kinds against the kernel's C signature, and every
//!   pointer argument against the live allocations (null allowed).
//! - Blocks run on a persistent pool of OS threads (every core by default), each block's GPU
//!   threads as fibers on one of them ([`runtime`]). A launch returns when all blocks are done,
//!   so the stream is synchronous and `synchronize` has nothing to wait for.
//! - Matmuls follow cuBLASLt's contract on the CPU ([`gemm`]).

pub mod gemm;
pub mod limits;
pub mod runtime;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{Arg, DPtr, DeviceApi, Epilogue, LaunchConfig, Matmul, Memory, Staging};
use super::error::{CudaError, Result};
use super::kernels::KernelFile;
pub use runtime::Order;
use runtime::{BlockLaunch, Dim3, Thunk};

/// The device's name (not in the peak table, so no MFU is claimed for it).
pub const DEVICE_NAME: &str = "liandan emulated CUDA device (sm_90 limits)";
/// Guard bytes before and after every allocation.
const GUARD: usize = 256;
/// The guard's bytes, repeated from every 4-aligned address: the f32 signalling NaN 0x7f800001.
const GUARD_WORD: [u8; 4] = 0x7f80_0001u32.to_le_bytes();

/// One kernel of the generated tables: `ld_emu_kernel` of cuda_emu.h.
#[repr(C)]
#[derive(Debug)]
pub struct RawKernel {
    name: *const c_char,
    thunk: Thunk,
    signature: *const c_char,
}

include!(concat!(env!("OUT_DIR"), "/emu_tables.rs"));

#[derive(Debug, Clone, Copy)]
struct Kernel {
    thunk: Thunk,
    signature: &'static str,
    file: &'static str,
}

/// How the emulated device runs blocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmuOptions {
    /// OS threads that run blocks; 0 means one per core. With 1, blocks run one after another
    /// in order, so atomics add in a fixed order and every result is bit-reproducible.
    pub threads: usize,
    /// The order of warps and lanes within a block ([`Order`]).
    pub order: Order,
    /// Answer CUBLAS_STATUS_NOT_SUPPORTED to every epilogue but the default and the bias, as a
    /// cuBLASLt without algorithms for them would: what runs the callers' unfused fallbacks.
    pub refuse_fused_epilogues: bool,
}

/// One allocation as `std::alloc` made it (guards included).
#[derive(Debug)]
struct Allocation {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the allocation is plain memory owned by this value; moving it between threads is fine.
unsafe impl Send for Allocation {}
// SAFETY: shared access only reads the fields; the memory is written through device calls.
unsafe impl Sync for Allocation {}

/// Live allocations by base address, shared with the [`Memory`] owners that remove themselves.
type Registry = Arc<Mutex<BTreeMap<u64, usize>>>;

/// Whether `bytes` at `addr` lie inside one live allocation.
fn inside(registry: &Registry, addr: u64, bytes: usize) -> bool {
    let Ok(r) = registry.lock() else { return false };
    r.range(..=addr).next_back().is_some_and(|(&base, &len)| addr.checked_add(bytes as u64).is_some_and(|end| end <= base + len as u64))
}

fn check_range(registry: &Registry, op: &'static str, addr: u64, bytes: usize) -> Result<()> {
    if inside(registry, addr, bytes) {
        Ok(())
    } else {
        Err(CudaError::Shape { op, reason: format!("{bytes} bytes at {addr:#x} are not inside one allocation of the emulated device") })
    }
}

/// The emulated device's [`Staging`]: its copies finish before they return, so there is nothing
/// to wait for and no reason to copy through a buffer of its own; it keeps the capacity so a
/// caller that overruns it fails here as on a GPU.
struct EmuStaging {
    registry: Registry,
    capacity: usize,
}

impl Staging for EmuStaging {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn upload(&mut self, dst: DPtr, src: &[u8]) -> Result<()> {
        if src.len() > self.capacity {
            return Err(CudaError::Shape { op: "staged upload", reason: format!("{} bytes through a staging buffer of {}", src.len(), self.capacity) });
        }
        check_range(&self.registry, "staged upload", dst.0, src.len())?;
        // SAFETY: the destination range is inside a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0 as *mut u8, src.len()) };
        Ok(())
    }
}

struct Freed {
    alloc: Allocation,
    registry: Registry,
    base: u64,
}

impl Drop for Freed {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.lock() {
            r.remove(&self.base);
        }
        // SAFETY: allocated in `alloc_zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.alloc.ptr, self.alloc.layout) };
    }
}

/// A range a ready mark covers: its address and its bytes at the mark.
type MarkedRange = (u64, Vec<u8>);

/// The emulated device.
pub struct EmuDevice {
    kernels: HashMap<&'static str, Kernel>,
    registry: Registry,
    max_dynamic: Mutex<HashMap<&'static str, u32>>,
    launches: Mutex<BTreeMap<&'static str, u64>>,
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    order: Order,
    refuse_fused_epilogues: bool,
    /// Ready marks by slot: each marked range with a copy of its bytes at the mark.
    marks: Mutex<HashMap<usize, Vec<MarkedRange>>>,
}

impl std::fmt::Debug for EmuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuDevice").field("kernels", &self.kernels.len()).field("threads", &self.threads).field("order", &self.order).finish_non_exhaustive()
    }
}

fn launch_err(kernel: &str, reason: impl Into<String>) -> CudaError {
    CudaError::Launch { kernel: kernel.to_string(), reason: reason.into() }
}

impl EmuDevice {
    /// The device with the kernel tables of this build.
    ///
    /// # Errors
    /// A kernel the host loads is missing from the emulated build (the build and
    /// [`KernelFile`] disagree), or the block thread pool cannot start.
    pub fn new(opts: EmuOptions) -> Result<EmuDevice> {
        let mut kernels = HashMap::new();
        for (file, table) in tables() {
            for k in table {
                // SAFETY: names and signatures are string literals of the generated tables.
                let (name, signature) = unsafe { (CStr::from_ptr(k.name), CStr::from_ptr(k.signature)) };
                let (Ok(name), Ok(signature)) = (name.to_str(), signature.to_str()) else {
                    return Err(launch_err("(tables)", format!("{file}: a kernel name or signature is not UTF-8")));
                };
                kernels.insert(name, Kernel { thunk: k.thunk, signature, file });
            }
        }
        for f in KernelFile::ALL {
            for name in f.functions() {
                if !kernels.contains_key(name) {
                    return Err(launch_err(name, format!("listed for {} but not in the emulated build", f.file_name())));
                }
            }
        }
        let threads = if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("cuda-emu-{i}"))
                    .build()
                    .map_err(|e| launch_err("(pool)", format!("cannot start {threads} threads: {e}")))?,
            )
        } else {
            None
        };
        Ok(EmuDevice {
            kernels,
            registry: Arc::new(Mutex::new(BTreeMap::new())),
            max_dynamic: Mutex::new(HashMap::new()),
            launches: Mutex::new(BTreeMap::new()),
            pool,
            threads,
            order: opts.order,
            refuse_fused_epilogues: opts.refuse_fused_epilogues,
            marks: Mutex::new(HashMap::new()),
        })
    }

    /// How the kernels were built, for logs.
    pub fn describe(&self) -> String {
        format!("{} kernels compiled for the CPU by {} into this binary; blocks on {} threads", self.kernels.len(), env!("LIANDAN_EMU_CXX"), self.threads)
    }

    /// Launches per kernel so far (which kernels a test exercised).
    pub fn launch_counts(&self) -> BTreeMap<&'static str, u64> {
        self.launches.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Every kernel of the build and its file (the CUDA kernels and the emulator's probes).
    pub fn kernel_names(&self) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = self.kernels.iter().map(|(n, k)| (*n, k.file)).collect();
        v.sort();
        v
    }

    /// Whether `bytes` from `addr` lie inside one live allocation.
    fn inside(&self, addr: u64, bytes: usize) -> bool {
        inside(&self.registry, addr, bytes)
    }

    fn check_range(&self, op: &'static str, addr: u64, bytes: usize) -> Result<()> {
        check_range(&self.registry, op, addr, bytes)
    }

    /// The first guard byte a kernel changed, as (allocation base, size, offset from base).
    fn damaged_guard(&self) -> Option<(u64, usize, i64)> {
        let r = self.registry.lock().ok()?;
        for (&base, &len) in r.iter() {
            let p = base as *const u8;
            let tail = len.next_multiple_of(GUARD) - len + GUARD;
            // SAFETY: every registered allocation has GUARD bytes before it and `tail` after.
            let (before, after) = unsafe { (std::slice::from_raw_parts(p.sub(GUARD), GUARD), std::slice::from_raw_parts(p.add(len), tail)) };
            // Both guards start at 4-aligned offsets from the (256-aligned) base: before at
            // -GUARD, after at `len`, whose position in the word is len % 4.
            if let Some(i) = before.iter().enumerate().position(|(i, &b)| b != GUARD_WORD[i % 4]) {
                return Some((base, len, i as i64 - GUARD as i64));
            }
            if let Some(i) = after.iter().enumerate().position(|(i, &b)| b != GUARD_WORD[(len + i) % 4]) {
                return Some((base, len, (len + i) as i64));
            }
        }
        None
    }

    fn check_args(&self, name: &'static str, k: &Kernel, args: &[Arg]) -> Result<()> {
        let want = k.signature.as_bytes();
        let got: Vec<u8> = args.iter().map(|a| a.code()).collect();
        if want != got.as_slice() {
            let show = |s: &[u8]| s.iter().map(|&c| kind_name(c)).collect::<Vec<_>>().join(", ");
            return Err(launch_err(name, format!("arguments ({}) do not match the kernel's parameters ({}) in {}", show(&got), show(want), k.file)));
        }
        for (i, a) in args.iter().enumerate() {
            if let Arg::P(p) = a
                && *p != DPtr::NULL
                && !self.inside(p.0, 0)
            {
                return Err(launch_err(name, format!("argument {i} ({:#x}) is not an address inside a live allocation of the emulated device", p.0)));
            }
        }
        Ok(())
    }
}

fn kind_name(c: u8) -> &'static str {
    match c {
        b'p' => "pointer",
        b'i' => "int",
        b'l' => "long long",
        b'f' => "float",
        _ => "?",
    }
}

/// A kernel argument as the thunk reads it: the parameter's own type at the slot's address.
#[repr(C)]
#[derive(Clone, Copy)]
union ArgSlot {
    p: u64,
    i: i32,
    l: i64,
    f: f32,
}

/// Raw launch data shared with the pool threads (pointers stay valid for the launch).
struct Shared(BlockLaunch);
// SAFETY: the pointers inside are read-only argument storage and kernel code, alive until the
// launch returns; blocks only write device memory, as on a GPU.
unsafe impl Sync for Shared {}

impl DeviceApi for EmuDevice {
    fn alloc_zeroed(&self, bytes: usize) -> Result<Memory> {
        let bytes = bytes.max(1);
        let total = GUARD + bytes.next_multiple_of(GUARD) + GUARD;
        let layout = std::alloc::Layout::from_size_align(total, GUARD).map_err(|e| CudaError::Shape { op: "allocate", reason: format!("{bytes} bytes: {e}") })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(CudaError::Shape { op: "allocate", reason: format!("out of host memory for {bytes} bytes") });
        }
        // SAFETY: `ptr` holds `total` bytes: guard, zeroed data, guard (the rounding tail too).
        unsafe {
            let all = std::slice::from_raw_parts_mut(ptr, total);
            for (i, b) in all.iter_mut().enumerate() {
                *b = GUARD_WORD[i % 4];
            }
            std::ptr::write_bytes(ptr.add(GUARD), 0, bytes);
        }
        let base = ptr as u64 + GUARD as u64;
        self.registry.lock().map_err(|_| CudaError::Shape { op: "allocate", reason: "allocation registry poisoned".into() })?.insert(base, bytes);
        Ok(Memory::new(base, bytes, Box::new(Freed { alloc: Allocation { ptr, layout }, registry: self.registry.clone(), base })))
    }

    fn copy_to_device(&self, dst: DPtr, src: &[u8]) -> Result<()> {
        self.check_range("copy to device", dst.0, src.len())?;
        // SAFETY: the destination range is inside a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0 as *mut u8, src.len()) };
        Ok(())
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DPtr) -> Result<()> {
        self.check_range("copy to host", src.0, dst.len())?;
        // SAFETY: the source range is inside a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn staging(&self, bytes: usize) -> Result<Box<dyn Staging>> {
        Ok(Box::new(EmuStaging { registry: self.registry.clone(), capacity: bytes.max(1) }))
    }

    fn memset_zero(&self, dst: DPtr, bytes: usize) -> Result<()> {
        self.check_range("memset", dst.0, bytes)?;
        // SAFETY: inside a live allocation (checked above).
        unsafe { std::ptr::write_bytes(dst.0 as *mut u8, 0, bytes) };
        Ok(())
    }

    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let k = *self.kernels.get(name).ok_or_else(|| launch_err(name, "no such kernel in the emulated build"))?;
        let max_dynamic = self.max_dynamic.lock().ok().and_then(|m| m.get(name).copied()).unwrap_or(limits::SHARED_DEFAULT);
        limits::check(&cfg, max_dynamic).map_err(|r| launch_err(name, r))?;
        self.check_args(name, &k, args)?;
        if let Ok(mut l) = self.launches.lock() {
            *l.entry(name).or_default() += 1;
        }
        let mut slots: Vec<ArgSlot> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => ArgSlot { p: p.0 },
                Arg::I(i) => ArgSlot { i },
                Arg::L(l) => ArgSlot { l },
                Arg::F(f) => ArgSlot { f },
            })
            .collect();
        let ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut ArgSlot).cast()).collect();
        let grid = Dim3::new(cfg.grid_dim);
        let launch = Shared(BlockLaunch {
            thunk: k.thunk,
            args: ptrs.as_ptr(),
            grid,
            block: Dim3::new(cfg.block_dim),
            dynamic_shared: cfg.shared_mem_bytes as usize,
            shared_limit: limits::shared_limit(max_dynamic),
            order: self.order,
        });
        let blocks = grid.count();
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<String>> = Mutex::new(None);
        let run = |b: u64| {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let idx = Dim3 { x: (b % grid.x as u64) as u32, y: ((b / grid.x as u64) % grid.y as u64) as u32, z: (b / (grid.x as u64 * grid.y as u64)) as u32 };
            let shared = &launch;
            // SAFETY: the thunk is this kernel's and the argument slots match its signature
            // (checked above); they live until this function returns, after every block.
            if let Err(e) = unsafe { runtime::run_block(&shared.0, idx) } {
                failed.store(true, Ordering::Relaxed);
                if let Ok(mut f) = first_error.lock() {
                    f.get_or_insert(e);
                }
            }
        };
        match &self.pool {
            Some(pool) => pool.install(|| {
                use rayon::prelude::*;
                (0..blocks).into_par_iter().for_each(run);
            }),
            None => (0..blocks).for_each(run),
        }
        drop(ptrs);
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(launch_err(name, format!("grid {grid}, block {}: {e}", launch.0.block)));
        }
        if let Some((base, len, at)) = self.damaged_guard() {
            let word = at.div_euclid(4) * 4;
            let place = if at < 0 { format!("{} bytes before its start", -word) } else { format!("at byte {word}, past its end") };
            return Err(launch_err(name, format!("wrote outside an allocation of {len} bytes at {base:#x}: the 4-byte word {place}")));
        }
        Ok(())
    }

    fn set_max_dynamic_shared(&self, name: &'static str, bytes: u32) -> Result<()> {
        if !self.kernels.contains_key(name) {
            return Err(launch_err(name, "no such kernel in the emulated build"));
        }
        if bytes > limits::SHARED_OPTIN_MAX {
            return Err(launch_err(name, format!("{bytes} bytes of dynamic shared memory exceed the device's opt-in maximum of {}", limits::SHARED_OPTIN_MAX)));
        }
        self.max_dynamic.lock().map_err(|_| launch_err(name, "attribute table poisoned"))?.insert(name, bytes);
        Ok(())
    }

    fn matmul(&self, m: &Matmul) -> Result<()> {
        let (rows, cols, k) = m.dims();
        let op = format!("matmul m={rows} n={cols} k={k} transa={} transb={}", m.trans_a, m.trans_b);
        gemm::check(m, &|addr, bytes| self.inside(addr, bytes)).map_err(|status| CudaError::Blas { op: op.clone(), status })?;
        if self.refuse_fused_epilogues && !matches!(m.epilogue, Epilogue::Default | Epilogue::Bias(_)) {
            return Err(CudaError::Blas { op, status: format!("CUBLAS_STATUS_NOT_SUPPORTED: {:?} (this emulated device refuses fused epilogues)", m.epilogue) });
        }
        let go = || {
            // SAFETY: check() passed; the host code is the only user of these matrices now.
            unsafe { gemm::run(m, self.pool.is_some()) }
        };
        match &self.pool {
            Some(pool) => pool.install(go),
            None => go(),
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn is_idle(&self) -> Result<bool> {
        Ok(true)
    }

    fn bind_to_thread(&self) -> Result<()> {
        Ok(())
    }

    fn cuda_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        None
    }

    fn as_emulated(&self) -> Option<&EmuDevice> {
        Some(self)
    }

    fn mark(&self, slot: usize, ranges: &[(DPtr, usize)]) -> Result<()> {
        let mut kept = Vec::with_capacity(ranges.len());
        for &(ptr, bytes) in ranges {
            self.check_range("mark", ptr.0, bytes)?;
            // SAFETY: inside a live allocation (checked above); nothing runs concurrently with
            // a call on the emulated device.
            kept.push((ptr.0, unsafe { std::slice::from_raw_parts(ptr.0 as *const u8, bytes) }.to_vec()));
        }
        self.marks.lock().map_err(|_| CudaError::Shape { op: "mark", reason: "mark table poisoned".into() })?.insert(slot, kept);
        Ok(())
    }

    fn side_after_mark(&self, slot: usize) -> Result<()> {
        let marks = self.marks.lock().map_err(|_| CudaError::Shape { op: "side stream wait", reason: "mark table poisoned".into() })?;
        // A slot never marked is an event never recorded: waiting on it waits for nothing.
        let Some(ranges) = marks.get(&slot) else { return Ok(()) };
        for (addr, want) in ranges {
            self.check_range("side stream wait", *addr, want.len())?;
            // SAFETY: inside a live allocation (checked above).
            let now = unsafe { std::slice::from_raw_parts(*addr as *const u8, want.len()) };
            if let Some(i) = now.iter().zip(want).position(|(a, b)| a != b) {
                return Err(CudaError::Shape {
                    op: "side stream wait",
                    reason: format!(
                        "mark {slot}: byte {i} of the {} marked at {addr:#x} changed after the mark (work queued after it wrote a range the side stream reads)",
                        want.len()
                    ),
                });
            }
        }
        Ok(())
    }

    fn main_after_side(&self) -> Result<()> {
        Ok(())
    }

    fn side_stream(&self) -> Option<cudarc::driver::sys::CUstream> {
        None
    }

    fn side_is_idle(&self) -> Result<bool> {
        Ok(true)
    }
}
