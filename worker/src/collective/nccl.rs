//! The NCCL collective: one rank per GPU, through cudarc's NCCL bindings (dlopen of libnccl).
//!
//! # Rendezvous
//! NCCL ranks meet through a 128-byte unique id that rank 0 creates ([`NcclId::new`]) and every
//! other rank must receive before [`Nccl::connect`] can return. This module does not know how
//! the bytes travel: the caller passes a `rendezvous` function. For rank 0 it is called with
//! `Some(id_bytes)` and must publish them (the worker runtime sends them in the coordinator's
//! `PublishRendezvous` for this job and generation) and return them; for other ranks it is
//! called with `None` and must return rank 0's bytes (from the coordinator's `Assignment` of the
//! same generation). The communicator is made without blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`): its progress is polled, watching the abort flag and the timeout, so a peer
//! that never arrives ends the wait (`ncclCommAbort`) instead of hanging the rank.
//!
//! # Overlap
//! [`Nccl::all_reduce_buckets`] sums the gradients layer by layer on the device's side stream,
//! each bucket after the ready mark the backward records when that layer's gradients are final.
//! The host queues the whole backward before it gets there (a step has no waits), so the sums
//! of the last layers run while the main stream is still on the backward of the first. With the
//! optimizer sharded (ZeRO-1), the same buckets are reduced only to the rank that owns each
//! element, and [`Nccl::all_gather_device`] then broadcasts each rank's updated parameters.
//!
//! # Failure model
//! Every op is enqueued on one of the device's streams and then waited for by polling, so the wait can
//! look at the abort flag (raised by the runtime when the coordinator moves to a new generation)
//! and at NCCL's asynchronous error. On abort or timeout the communicator is torn down with
//! `ncclCommAbort` and the op returns [`CollectiveError::Aborted`] or `Timeout`; after any
//! error the communicator is broken for good, as with the TCP ring.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::nccl::sys;

use super::{Collective, CollectiveError, overlap};
use crate::backend::cuda::device::{CudaDevice, DevBuf, View};

/// NCCL's unique id: 128 opaque bytes, created by rank 0 and shared with every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl NcclId {
    /// A fresh id (rank 0 only).
    ///
    /// # Errors
    /// libnccl is missing or NCCL fails.
    pub fn new() -> Result<NcclId, CollectiveError> {
        require_nccl()?;
        let id = cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// The id as bytes, to publish.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// An id received as bytes.
    ///
    /// # Errors
    /// The slice is not 128 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId, CollectiveError> {
        let arr: [u8; 128] = bytes.try_into().map_err(|_| CollectiveError::Config { reason: format!("an NCCL unique id is 128 bytes, got {}", bytes.len()) })?;
        Ok(NcclId(arr))
    }
}

/// Options of an NCCL communicator.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// Elements (f32) per all-reduce call: gradients are reduced bucket by bucket, so a stuck
    /// peer is noticed within one bucket and host-buffer ops need only one bucket of staging.
    pub bucket_elems: usize,
    /// Longest an op may wait without completing before the communicator is aborted.
    pub timeout: Duration,
    /// Raised by the runtime when the generation changes: the op in flight is aborted.
    pub abort: Option<Arc<AtomicBool>>,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions { bucket_elems: 25 << 18, timeout: Duration::from_secs(300), abort: None }
    }
}

/// An NCCL communicator of `world` ranks on one GPU of this process.
pub struct Nccl {
    comm: sys::ncclComm_t,
    dev: Arc<CudaDevice>,
    /// The device's CUDA stream, which NCCL enqueues on (a GPU device always has one).
    stream: cudarc::driver::sys::CUstream,
    rank: usize,
    world: usize,
    generation: u64,
    opts: NcclOptions,
    /// Device staging for the trait's host-buffer ops, `bucket_elems` floats.
    staging: DevBuf<f32>,
    staging_f64: DevBuf<f64>,
    /// Why the communicator is unusable, once it is.
    broken: Option<String>,
    aborted: bool,
}

// SAFETY: an NCCL communicator (and the stream handle kept beside it) may be used from any
// thread as long as calls on it are not concurrent; `Nccl` is used through `&mut self` only.
unsafe impl Send for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("rank", &self.rank).field("world", &self.world).field("generation", &self.generation).finish_non_exhaustive()
    }
}

fn require_nccl() -> Result<(), CollectiveError> {
    // SAFETY: only tries to dlopen libnccl by its candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CollectiveError::Config {
            reason: "libnccl not found: put a folder with libnccl.so (a link to libnccl.so.2, e.g. from the nvidia-nccl-cu13 wheel) on LD_LIBRARY_PATH".into(),
        })
    }
}

fn nccl_err(op: &'static str, e: cudarc::nccl::result::NcclError) -> CollectiveError {
    CollectiveError::Device { op, reason: format!("{:?}", e.0) }
}

/// NCCL's `NCCL_CONFIG_UNDEF_INT`: a config field left to NCCL's default.
const UNDEF_INT: i32 = i32::MIN;

/// `ncclCommInitRankConfig` with `blocking = 0`, then its progress polled until it is done, the
/// abort flag rises or `opts.timeout` passes (the communicator is then aborted).
fn init_nonblocking(unique: sys::ncclUniqueId, rank: usize, world: usize, generation: u64, opts: &NcclOptions) -> Result<sys::ncclComm_t, CollectiveError> {
    // NCCL_CONFIG_INITIALIZER of the 2.30 headers the bindings are generated from, with
    // blocking off. NCCL reads `size` and `version`, so a newer library accepts it.
    let mut config = sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 2 * 10000 + 30 * 100,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    };
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer and config; the id is 128 bytes as NCCL requires.
    let r = unsafe { sys::ncclCommInitRankConfig(&mut comm, world as i32, unique, rank as i32, &mut config) };
    if r != sys::ncclResult_t::ncclSuccess && r != sys::ncclResult_t::ncclInProgress {
        return Err(CollectiveError::Device { op: "ncclCommInitRankConfig", reason: format!("{r:?}") });
    }
    let start = Instant::now();
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` was returned by ncclCommInitRankConfig; valid out-pointer.
        let _ = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if state == sys::ncclResult_t::ncclSuccess {
            return Ok(comm);
        }
        let aborted = opts.abort.as_deref().is_some_and(|a| a.load(Ordering::Relaxed));
        let failed = state != sys::ncclResult_t::ncclInProgress;
        if aborted || failed || start.elapsed() > opts.timeout {
            // SAFETY: aborting a communicator whose initialisation is in flight or failed.
            let _ = unsafe { sys::ncclCommAbort(comm) };
            return Err(if aborted {
                CollectiveError::Aborted { generation }
            } else if failed {
                CollectiveError::Device { op: "ncclCommInitRankConfig", reason: format!("{state:?}") }
            } else {
                CollectiveError::Timeout { op: "NCCL init", peer: format!("NCCL world {world}"), after_ms: opts.timeout.as_millis() as u64 }
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Nccl {
    /// Joins a communicator of `world` ranks as `rank` for `generation`. `rendezvous` moves rank
    /// 0's unique id to the others (see the module docs); it is called exactly once.
    ///
    /// # Errors
    /// Bad rank or world, libnccl missing, the rendezvous fails, or NCCL fails to initialise.
    pub fn connect(
        dev: Arc<CudaDevice>,
        rank: usize,
        world: usize,
        generation: u64,
        opts: NcclOptions,
        rendezvous: impl FnOnce(Option<&[u8]>) -> Result<Vec<u8>, String>,
    ) -> Result<Nccl, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config { reason: format!("rank {rank} of world {world}") });
        }
        if opts.bucket_elems == 0 {
            return Err(CollectiveError::Config { reason: "bucket_elems must be at least 1".into() });
        }
        // The emulated device has no CUDA stream for NCCL to enqueue on: it uses the TCP ring.
        let stream = dev.cuda_stream().ok_or_else(|| CollectiveError::Config { reason: format!("NCCL needs a GPU; {} has no CUDA stream (use the TCP ring)", dev.name) })?;
        require_nccl()?;
        let bytes = if rank == 0 {
            let id = NcclId::new()?;
            rendezvous(Some(&id.to_bytes())).map_err(|reason| CollectiveError::Config { reason: format!("rendezvous: {reason}") })?
        } else {
            rendezvous(None).map_err(|reason| CollectiveError::Config { reason: format!("rendezvous: {reason}") })?
        };
        let id = NcclId::from_bytes(&bytes)?;
        let unique = sys::ncclUniqueId { internal: id.0.map(|b| b as ::core::ffi::c_char) };
        dev.bind_to_thread().map_err(|e| CollectiveError::Device { op: "bind context", reason: e.to_string() })?;
        let comm = init_nonblocking(unique, rank, world, generation, &opts)?;
        let alloc = |e: crate::backend::cuda::CudaError| CollectiveError::Device { op: "allocate staging", reason: e.to_string() };
        let staging = dev.alloc::<f32>(opts.bucket_elems).map_err(alloc)?;
        let staging_f64 = dev.alloc::<f64>(1).map_err(alloc)?;
        Ok(Nccl { comm, dev, stream, rank, world, generation, opts, staging, staging_f64, broken: None, aborted: false })
    }

    /// The generation this communicator belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Tears the communicator down with `ncclCommAbort` (idempotent); every later op fails.
    pub fn abort(&mut self) {
        if !self.aborted {
            // SAFETY: `comm` came from ncclCommInitRank and is aborted once.
            let _ = unsafe { cudarc::nccl::result::comm_abort(self.comm) };
            self.aborted = true;
        }
        self.broken.get_or_insert_with(|| format!("generation {} aborted", self.generation));
    }

    fn check(&mut self) -> Result<(), CollectiveError> {
        if self.opts.abort.as_deref().is_some_and(|a| a.load(Ordering::Relaxed)) {
            self.abort();
            return Err(CollectiveError::Aborted { generation: self.generation });
        }
        match &self.broken {
            Some(why) => Err(CollectiveError::Protocol { reason: format!("the NCCL communicator is broken: {why}") }),
            None => Ok(()),
        }
    }

    /// Waits for the main stream, watching the abort flag, NCCL's async error and the timeout.
    fn wait(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        self.wait_until(op, CudaDevice::is_idle)
    }

    /// Polls `idle` (a stream of the device) until it is true, watching the abort flag, NCCL's
    /// async error and the timeout.
    fn wait_until(&mut self, op: &'static str, idle: impl Fn(&CudaDevice) -> crate::backend::cuda::error::Result<bool>) -> Result<(), CollectiveError> {
        let start = Instant::now();
        loop {
            match idle(&self.dev) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort();
                    return Err(CollectiveError::Device { op, reason: e.to_string() });
                }
            }
            if self.opts.abort.as_deref().is_some_and(|a| a.load(Ordering::Relaxed)) {
                self.abort();
                return Err(CollectiveError::Aborted { generation: self.generation });
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is alive (not aborted: `check` ran before the op); valid out-pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if async_err != sys::ncclResult_t::ncclSuccess && async_err != sys::ncclResult_t::ncclInProgress {
                self.abort();
                return Err(CollectiveError::Device { op, reason: format!("asynchronous NCCL error {async_err:?}") });
            }
            if start.elapsed() > self.opts.timeout {
                self.abort();
                return Err(CollectiveError::Timeout { op, peer: format!("NCCL world {}", self.world), after_ms: self.opts.timeout.as_millis() as u64 });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// In-place sum of `n` f32 of `buf` (device memory) over all ranks, bucket by bucket.
    ///
    /// # Errors
    /// Aborted (new generation), timeout, NCCL error, or `buf` shorter than `n`.
    pub fn all_reduce_device(&mut self, dev: &CudaDevice, buf: View, n: usize) -> Result<(), crate::backend::cuda::CudaError> {
        let to_cuda = |e: CollectiveError| crate::backend::cuda::CudaError::Nccl { op: "all-reduce", status: e.to_string() };
        if buf.len < n {
            return Err(crate::backend::cuda::CudaError::Shape { op: "all_reduce_device", reason: format!("buffer of {} for {n} elements", buf.len) });
        }
        let _ = dev; // the communicator's own device; the parameter documents where `buf` lives
        self.check().map_err(to_cuda)?;
        let mut off = 0;
        while off < n {
            let len = self.opts.bucket_elems.min(n - off);
            let ptr = buf.sub(off, len, 4).ptr.0;
            self.enqueue_sum(ptr, len, sys::ncclDataType_t::ncclFloat32).map_err(to_cuda)?;
            self.wait("ncclAllReduce").map_err(to_cuda)?;
            off += len;
        }
        Ok(())
    }

    /// Sums gradient buckets over all ranks on the device's side stream while the main stream
    /// goes on: bucket `(slot, ranges)` holds the elements `ranges` of `grads` (f32) and is summed
    /// in place after the device's ready mark `slot` (one NCCL group per bucket), in the order
    /// given, which every rank must share (the backward's: the last layer first). With `sharded`,
    /// each element is summed only on the rank whose [`shard`](super::shard) of `grads` holds it
    /// (a reduce to that owner: ZeRO-1's reduce-scatter, in pieces that follow the buckets);
    /// otherwise on every rank. Returns once every sum is done (polled, as every op here), with
    /// the main stream ordered after them.
    ///
    /// # Errors
    /// Aborted (new generation), timeout, an NCCL or driver error; the device has no side stream;
    /// a range outside `grads`.
    pub fn all_reduce_buckets(&mut self, dev: &CudaDevice, grads: View, buckets: &[(usize, Vec<Range<usize>>)], sharded: bool) -> Result<(), crate::backend::cuda::CudaError> {
        let to_cuda = |e: CollectiveError| crate::backend::cuda::CudaError::Nccl { op: "all-reduce (overlapped)", status: e.to_string() };
        self.check().map_err(to_cuda)?;
        let side = dev.side_stream().ok_or_else(|| to_cuda(CollectiveError::Config { reason: format!("{} has no side stream for NCCL", dev.name) }))?;
        if let Some(r) = buckets.iter().flat_map(|(_, rs)| rs).find(|r| r.start > r.end || r.end > grads.len) {
            return Err(crate::backend::cuda::CudaError::Shape { op: "all_reduce_buckets", reason: format!("range {r:?} outside {} gradients", grads.len) });
        }
        let (n, world) = (grads.len, self.world);
        for (slot, ranges) in buckets {
            dev.side_after_mark(*slot)?;
            cudarc::nccl::result::group_start().map_err(|e| to_cuda(self.fail("ncclGroupStart", e)))?;
            let mut queued = Ok(());
            'queue: for r in ranges {
                let pieces: Vec<(Option<usize>, Range<usize>)> = if sharded {
                    (0..world).map(|root| (Some(root), overlap(r, &super::shard(n, root, world)))).filter(|(_, p)| !p.is_empty()).collect()
                } else {
                    vec![(None, r.clone())]
                };
                for (root, p) in pieces {
                    let ptr = grads.sub(p.start, p.len(), 4).ptr.0;
                    queued = match root {
                        Some(root) => self.enqueue_reduce_on(side, ptr, p.len(), root),
                        None => self.enqueue_sum_on(side, ptr, p.len(), sys::ncclDataType_t::ncclFloat32),
                    };
                    if queued.is_err() {
                        break 'queue;
                    }
                }
            }
            // The group is closed even after a failed call, so NCCL's group state is left clean.
            let closed = cudarc::nccl::result::group_end().map_err(|e| self.fail("ncclGroupEnd", e));
            queued.and(closed).map_err(to_cuda)?;
            self.settle("ncclGroupEnd").map_err(to_cuda)?;
        }
        self.wait_until("ncclAllReduce (overlapped)", CudaDevice::side_is_idle).map_err(to_cuda)?;
        dev.main_after_side()
    }

    /// All-gather of `buf` (f32, device memory) on the main stream: every rank's
    /// [`shard`](super::shard) broadcast from its owner to every rank, bit for bit (ZeRO-1's
    /// updated parameters).
    ///
    /// # Errors
    /// Aborted (new generation), timeout, an NCCL or driver error.
    pub fn all_gather_device(&mut self, dev: &CudaDevice, buf: View) -> Result<(), crate::backend::cuda::CudaError> {
        let to_cuda = |e: CollectiveError| crate::backend::cuda::CudaError::Nccl { op: "all-gather", status: e.to_string() };
        let _ = dev; // the communicator's own device; the parameter documents where `buf` lives
        self.check().map_err(to_cuda)?;
        self.gather_piece(buf.ptr.0, 0..buf.len, buf.len).map_err(to_cuda)
    }

    /// Broadcasts, in one group on the main stream, the part of each rank's shard of a
    /// `total`-element buffer that falls in `piece` (which starts at device address `ptr`), then
    /// waits.
    fn gather_piece(&mut self, ptr: u64, piece: Range<usize>, total: usize) -> Result<(), CollectiveError> {
        cudarc::nccl::result::group_start().map_err(|e| self.fail("ncclGroupStart", e))?;
        let mut queued = Ok(());
        for root in 0..self.world {
            let p = overlap(&piece, &super::shard(total, root, self.world));
            if p.is_empty() {
                continue;
            }
            let at = ptr + ((p.start - piece.start) * 4) as u64;
            // SAFETY: `at` addresses `p.len()` f32 inside the caller's checked piece on this
            // communicator's device; in place is allowed by NCCL; the stream is the device's.
            let r = unsafe { cudarc::nccl::result::broadcast(at as *const _, at as *mut _, p.len(), sys::ncclDataType_t::ncclFloat32, root as i32, self.comm, self.stream as _) };
            if let Err(e) = r {
                queued = Err(self.fail("ncclBroadcast", e));
                break;
            }
        }
        let closed = cudarc::nccl::result::group_end().map_err(|e| self.fail("ncclGroupEnd", e));
        queued.and(closed)?;
        self.settle("ncclGroupEnd")?;
        self.wait("ncclBroadcast")
    }

    /// After a call of a nonblocking communicator returned `ncclInProgress`, NCCL must see its
    /// state leave `InProgress` before the next call; polls it, watching the abort flag and the
    /// timeout.
    fn settle(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        let start = Instant::now();
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is alive (`check` ran before the op); valid out-pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                other => {
                    self.abort();
                    return Err(CollectiveError::Device { op, reason: format!("asynchronous NCCL error {other:?}") });
                }
            }
            if self.opts.abort.as_deref().is_some_and(|a| a.load(Ordering::Relaxed)) {
                self.abort();
                return Err(CollectiveError::Aborted { generation: self.generation });
            }
            if start.elapsed() > self.opts.timeout {
                self.abort();
                return Err(CollectiveError::Timeout { op, peer: format!("NCCL world {}", self.world), after_ms: self.opts.timeout.as_millis() as u64 });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// An NCCL call failed: the communicator is aborted (broken for good) and the error named.
    fn fail(&mut self, op: &'static str, e: cudarc::nccl::result::NcclError) -> CollectiveError {
        let err = nccl_err(op, e);
        self.abort();
        err
    }

    fn enqueue_reduce_on(&mut self, stream: cudarc::driver::sys::CUstream, ptr: u64, count: usize, root: usize) -> Result<(), CollectiveError> {
        // SAFETY: as `enqueue_sum_on`; a non-root rank's receive buffer is not written.
        let r = unsafe {
            cudarc::nccl::result::reduce(ptr as *const _, ptr as *mut _, count, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, root as i32, self.comm, stream as _)
        };
        r.map(|_| ()).map_err(|e| self.fail("ncclReduce", e))
    }

    fn enqueue_sum(&mut self, ptr: u64, count: usize, dtype: sys::ncclDataType_t) -> Result<(), CollectiveError> {
        self.enqueue_sum_on(self.stream, ptr, count, dtype)
    }

    fn enqueue_sum_on(&mut self, stream: cudarc::driver::sys::CUstream, ptr: u64, count: usize, dtype: sys::ncclDataType_t) -> Result<(), CollectiveError> {
        // SAFETY: `ptr` addresses `count` elements of `dtype` on this communicator's device (the
        // callers take it from a checked view); in place is allowed by NCCL; `stream` is one of
        // the device's.
        let r = unsafe { cudarc::nccl::result::all_reduce(ptr as *const _, ptr as *mut _, count, dtype, sys::ncclRedOp_t::ncclSum, self.comm, stream as _) };
        r.map(|_| ()).map_err(|e| self.fail("ncclAllReduce", e))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn as_nccl(&mut self) -> Option<&mut Nccl> {
        Some(self)
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.check()?;
        let dev = self.dev.clone();
        let dev_err = |e: crate::backend::cuda::CudaError| CollectiveError::Device { op: "staging copy", reason: e.to_string() };
        for chunk in buf.chunks_mut(self.opts.bucket_elems) {
            dev.upload(&self.staging, 0, chunk).map_err(dev_err)?;
            let ptr = self.staging.ptr().0;
            self.enqueue_sum(ptr, chunk.len(), sys::ncclDataType_t::ncclFloat32)?;
            self.wait("ncclAllReduce")?;
            dev.download(&self.staging, 0, chunk).map_err(dev_err)?;
        }
        Ok(())
    }

    fn all_reduce_scalar(&mut self, x: f64) -> Result<f64, CollectiveError> {
        self.check()?;
        let dev = self.dev.clone();
        let dev_err = |e: crate::backend::cuda::CudaError| CollectiveError::Device { op: "staging copy", reason: e.to_string() };
        dev.upload(&self.staging_f64, 0, &[x]).map_err(dev_err)?;
        let ptr = self.staging_f64.ptr().0;
        self.enqueue_sum(ptr, 1, sys::ncclDataType_t::ncclFloat64)?;
        self.wait("ncclAllReduce")?;
        let mut out = [0.0f64];
        dev.download(&self.staging_f64, 0, &mut out).map_err(dev_err)?;
        Ok(out[0])
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_scalar(0.0).map(|_| ())
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.check()?;
        let dev = self.dev.clone();
        let dev_err = |e: crate::backend::cuda::CudaError| CollectiveError::Device { op: "staging copy", reason: e.to_string() };
        let (total, step) = (buf.len(), self.opts.bucket_elems);
        for (k, chunk) in buf.chunks_mut(step).enumerate() {
            dev.upload(&self.staging, 0, chunk).map_err(dev_err)?;
            let ptr = self.staging.ptr().0;
            self.gather_piece(ptr, k * step..k * step + chunk.len(), total)?;
            dev.download(&self.staging, 0, chunk).map_err(dev_err)?;
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: `comm` came from ncclCommInitRank; destroyed once (abort already freed it otherwise).
            let _ = unsafe { cudarc::nccl::result::comm_destroy(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_bytes_and_reject_other_lengths() {
        let id = NcclId([7u8; 128]);
        assert_eq!(NcclId::from_bytes(&id.to_bytes()).expect("128 bytes"), id);
        let msg = NcclId::from_bytes(&[0u8; 12]).unwrap_err().to_string();
        assert!(msg.contains("128") && msg.contains("12"), "{msg}");
    }
}
