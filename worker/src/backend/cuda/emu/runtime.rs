//! Runs one block of an emulated kernel: every GPU thread a fiber (a corosensei coroutine with
//! its own stack, reused from a per-OS-thread pool), all of the block's fibers on the calling OS
//! thread, switching only where the CUDA header calls back into this module.
//!
//! # Scheduling
//! Warps are run in turn; within a warp, each ready lane runs until it suspends at a barrier, a
//! shuffle, `__syncwarp` or a warp exchange (the WMMA operations of `emu/include/mma.h`), or returns, and the warp is run again while any of its lanes is
//! ready. A warp op completes when every lane of its mask waits at the same op (same kind, mask
//! and source line); a `__syncthreads` completes when every thread of the block waits at the
//! same one. [`Order::Descending`] runs warps and lanes from the last to the first, so a kernel
//! that reads what another thread writes without a barrier between sees a different value in
//! one of the two orders.
//!
//! # What it refuses (each an error naming the block, the thread and the source line)
//! A `__syncthreads` some threads of the block have exited before (or that threads wait for at
//! different lines), a warp op whose mask leaves out the calling lane, names lanes that do not
//! exist or have exited, or reads from a lane outside the mask, a block in which no thread can
//! move, shared memory beyond the block's limit, and `__trap()`.
//!
//! # Shared memory
//! One arena per OS thread, 128-byte aligned: the launch's dynamic shared memory first, then each static
//! `__shared__` variable on first use in the block (keyed by its declaration). Everything used is
//! filled with 0xff bytes at the start of each block, as real shared memory holds garbage.

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, c_char, c_int, c_void};

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// x, y, z of a launch dimension or index (`uint3` / `dim3`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub fn new((x, y, z): (u32, u32, u32)) -> Dim3 {
        Dim3 { x, y, z }
    }

    pub fn count(self) -> u64 {
        self.x as u64 * self.y as u64 * self.z as u64
    }
}

impl std::fmt::Display for Dim3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({},{},{})", self.x, self.y, self.z)
    }
}

/// What a GPU thread can ask about itself: `ld_emu_thread_ctx` of cuda_emu.h.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ThreadCtx {
    thread_idx: Dim3,
    block_idx: Dim3,
    block_dim: Dim3,
    grid_dim: Dim3,
}

unsafe extern "C" {
    /// Sets the header's `ld_emu_self` (emu/support.cc).
    fn ld_emu_set_self(ctx: *const ThreadCtx);
}

/// The generated thunk of a kernel: calls it with the arguments `args[i]` point at.
pub type Thunk = unsafe extern "C" fn(args: *const *mut c_void);

/// The order fibers are run in (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Ascending,
    Descending,
}

/// Everything one block needs besides its index.
#[derive(Debug, Clone, Copy)]
pub struct BlockLaunch {
    pub thunk: Thunk,
    pub args: *const *mut c_void,
    pub grid: Dim3,
    pub block: Dim3,
    pub dynamic_shared: usize,
    /// Static + dynamic shared memory a block may use.
    pub shared_limit: usize,
    pub order: Order,
}

/// Stack of each fiber. The deepest kernel frame (attention's per-thread arrays at hs=128)
/// needs a few KiB; pages are only touched as used.
const STACK_BYTES: usize = 256 << 10;
/// The largest shared memory a block may have (sm_90's opt-in maximum is 227 KiB).
pub const ARENA_BYTES: usize = 232_448;
/// Alignment of a block's shared memory. A block's shared window on the GPU starts far more
/// aligned than the 32 bytes WMMA tiles need; 128 is what the emulation promises.
const ARENA_ALIGN: usize = 128;

/// A source location reported by the header (`__builtin_FILE()`, `__builtin_LINE()`).
#[derive(Debug, Clone, Copy)]
struct Site {
    file: *const c_char,
    line: c_int,
}

impl Site {
    fn same(&self, o: &Site) -> bool {
        // SAFETY: both are string literals of the kernel library (static, NUL-terminated).
        self.line == o.line && (self.file == o.file || unsafe { CStr::from_ptr(self.file) == CStr::from_ptr(o.file) })
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: as in `same`.
        write!(f, "{}:{}", unsafe { CStr::from_ptr(self.file) }.to_string_lossy(), self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WarpKind {
    Sync,
    /// PTX `shfl.sync` mode (0 up, 1 down, 2 bfly, 3 idx) and its `b` and `c` operands.
    Shfl {
        mode: i32,
        b: u32,
        c: u32,
    },
    /// Every lane of the mask hands `bytes` and gets every lane's copy ([`ld_emu_warp_exchange`]).
    Exchange {
        bytes: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct WarpOp {
    kind: WarpKind,
    mask: u32,
    site: Site,
}

impl WarpOp {
    fn same(&self, o: &WarpOp) -> bool {
        self.kind == o.kind && self.mask == o.mask && (self.kind == WarpKind::Sync || self.site.same(&o.site))
    }

    fn name(&self) -> &'static str {
        match self.kind {
            WarpKind::Sync => "__syncwarp",
            WarpKind::Shfl { mode: 0, .. } => "__shfl_up_sync",
            WarpKind::Shfl { mode: 1, .. } => "__shfl_down_sync",
            WarpKind::Shfl { mode: 2, .. } => "__shfl_xor_sync",
            WarpKind::Shfl { .. } => "__shfl_sync",
            WarpKind::Exchange { .. } => "a WMMA operation",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Ready,
    Barrier(Site),
    Warp(WarpOp),
    /// Stopped by an error it reported (shared memory over the limit, `__trap`).
    Failed,
    Done,
}

/// One fiber's mailbox: written by the fiber before it suspends, read by the scheduler.
struct Slot {
    state: State,
    /// The lane's value going into a shuffle, then the value it receives.
    value: u64,
    /// The yielder of the fiber running this thread.
    yielder: *const Yielder<bool, ()>,
}

/// The block being run on this OS thread. Reached by the fibers through [`CURRENT`]; the
/// scheduler touches it only between resumes.
struct Block {
    slots: Vec<Slot>,
    ctxs: Vec<ThreadCtx>,
    threads: usize,
    arena: *mut u8,
    dynamic_shared: usize,
    shared_limit: usize,
    /// Static `__shared__` variables placed so far: (declaration, offset, bytes).
    statics: Vec<(*const c_void, usize, usize)>,
    /// Per warp: the lanes' copies of the last warp exchange ([`EXCHANGE_MAX`] bytes per lane,
    /// allocated on first use and never moved, so a lane may read it until the next exchange).
    exchange: Vec<Vec<u8>>,
    static_end: usize,
    error: Option<String>,
}

thread_local! {
    /// The block and fiber running on this OS thread.
    static CURRENT: Cell<(*mut Block, usize)> = const { Cell::new((std::ptr::null_mut(), 0)) };
    /// Fiber stacks, reused across blocks and launches.
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
    /// Shared-memory arena of blocks run on this thread.
    static ARENA: RefCell<Vec<u128>> = const { RefCell::new(Vec::new()) };
}

/// Slot `i` of `b`.
///
/// # Safety
/// `b` is a live block, `i` one of its threads, and no other reference to this slot is in use.
unsafe fn slot<'a>(b: *mut Block, i: usize) -> &'a mut Slot {
    // SAFETY: as the caller guarantees.
    unsafe { &mut (&mut (*b).slots)[i] }
}

/// Suspends the running fiber after recording `state`.
fn suspend(state: State) {
    let (b, i) = CURRENT.with(Cell::get);
    // SAFETY: set by `run_block` before it resumed this fiber; the scheduler holds no reference
    // into the block while a fiber runs. The yielder lives on this fiber's stack.
    unsafe {
        let s = slot(b, i);
        s.state = state;
        let y = s.yielder;
        // Resumed with `true`: a fiber is only told to finish between threads.
        let _ = (*y).suspend(());
    }
}

/// Records an error and stops the fiber for good (the scheduler abandons the block).
fn fail(reason: String) {
    let (b, _) = CURRENT.with(Cell::get);
    // SAFETY: as in `suspend`.
    unsafe { (*b).error.get_or_insert(reason) };
    suspend(State::Failed);
}

/// `__syncthreads()`.
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_syncthreads(file: *const c_char, line: c_int) {
    suspend(State::Barrier(Site { file, line }));
}

/// `__syncwarp(mask)`.
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_syncwarp(mask: u32, file: *const c_char, line: c_int) {
    suspend(State::Warp(WarpOp { kind: WarpKind::Sync, mask, site: Site { file, line } }));
}

/// The most bytes one lane may hand in a warp exchange.
pub const EXCHANGE_MAX: usize = 64;

/// A warp exchange: every lane of `mask` hands `bytes` bytes from `mine` (at most
/// [`EXCHANGE_MAX`]); each gets a pointer to the warp's copies, lane `l`'s at `l·bytes`, copied
/// while every lane of the mask waits here, and valid until this warp's next exchange completes
/// (for which every lane must have arrived there, so done reading this one). The WMMA functions
/// of `emu/include/mma.h` are built on it.
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_warp_exchange(mine: *const c_void, bytes: usize, mask: u32, file: *const c_char, line: c_int) -> *const c_void {
    if bytes > EXCHANGE_MAX {
        fail(format!("a warp exchange of {bytes} bytes per lane at {} (at most {EXCHANGE_MAX})", Site { file, line }));
        return std::ptr::null();
    }
    let (blk, i) = CURRENT.with(Cell::get);
    // SAFETY: as in `suspend`.
    unsafe { slot(blk, i).value = mine as u64 };
    suspend(State::Warp(WarpOp { kind: WarpKind::Exchange { bytes: bytes as u32 }, mask, site: Site { file, line } }));
    // SAFETY: as above; the scheduler wrote the copies' address before resuming this fiber.
    unsafe { slot(blk, i).value as *const c_void }
}

/// `shfl.sync` of `bits`: returns the source lane's value (see [`shfl_source`]).
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_shfl(bits: u64, mode: c_int, b: u32, c: u32, mask: u32, file: *const c_char, line: c_int) -> u64 {
    let (blk, i) = CURRENT.with(Cell::get);
    // SAFETY: as in `suspend`.
    unsafe { slot(blk, i).value = bits };
    suspend(State::Warp(WarpOp { kind: WarpKind::Shfl { mode, b, c }, mask, site: Site { file, line } }));
    // SAFETY: as above; the scheduler wrote the received value before resuming this fiber.
    unsafe { slot(blk, i).value }
}

/// The block's dynamic shared memory (`extern __shared__`).
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_dynamic_shared() -> *mut c_void {
    let (b, _) = CURRENT.with(Cell::get);
    // SAFETY: as in `suspend`; the arena holds at least the launch's dynamic bytes.
    unsafe { (*b).arena.cast() }
}

/// Storage of the static `__shared__` variable declared at `site` (the same for every thread
/// of the block), placed and filled on first use.
#[unsafe(no_mangle)]
pub extern "C" fn ld_emu_static_shared(site: *const c_void, bytes: usize, align: usize, file: *const c_char, line: c_int) -> *mut c_void {
    let (b, _) = CURRENT.with(Cell::get);
    // SAFETY: as in `suspend`.
    let blk = unsafe { &mut *b };
    if let Some(&(_, off, _)) = blk.statics.iter().find(|s| s.0 == site) {
        // SAFETY: `off + bytes` was checked against the arena when the variable was placed.
        return unsafe { blk.arena.add(off).cast() };
    }
    let off = blk.static_end.next_multiple_of(align.max(1));
    if off + bytes > blk.shared_limit {
        let (at, statics, dynamic, limit) = (Site { file, line }, off + bytes - blk.dynamic_shared, blk.dynamic_shared, blk.shared_limit);
        fail(format!(
            "__shared__ variable at {at} ({bytes} bytes) brings the block's shared memory to {statics} static + {dynamic} dynamic bytes, over the limit of {limit} bytes"
        ));
        return std::ptr::null_mut();
    }
    blk.statics.push((site, off, bytes));
    blk.static_end = off + bytes;
    // SAFETY: inside the arena (checked above against the limit, which is at most its size).
    unsafe {
        std::ptr::write_bytes(blk.arena.add(off), 0xff, bytes);
        blk.arena.add(off).cast()
    }
}

/// `__trap()` and other errors the header detects.
///
/// # Safety
/// `what` and `file` are NUL-terminated strings that live for the program (the header passes
/// string literals).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ld_emu_trap(what: *const c_char, file: *const c_char, line: c_int) {
    // SAFETY: as the caller guarantees.
    let what = unsafe { CStr::from_ptr(what) }.to_string_lossy().into_owned();
    fail(format!("{what} at {}", Site { file, line }));
}

/// The lane a `shfl.sync` by `lane` reads from, as the PTX ISA defines it (`mode` 0 up, 1 down,
/// 2 bfly, 3 idx; `b` the lane or offset, `c` the clamp and segment mask): the lane itself when
/// the source is outside its segment or past the clamp, so it keeps its own value.
pub fn shfl_source(mode: i32, lane: u32, b: u32, c: u32) -> u32 {
    let bval = b & 0x1f;
    let cval = c & 0x1f;
    let segmask = (c >> 8) & 0x1f;
    let max_lane = (lane & segmask) | (cval & !segmask);
    let min_lane = lane & segmask;
    let (j, ok) = match mode {
        0 => {
            let j = lane as i32 - bval as i32;
            (j, j >= max_lane as i32)
        }
        1 => {
            let j = (lane + bval) as i32;
            (j, j <= max_lane as i32)
        }
        2 => {
            let j = (lane ^ bval) as i32;
            (j, j <= max_lane as i32)
        }
        _ => {
            let j = (min_lane | (bval & !segmask)) as i32;
            (j, j <= max_lane as i32)
        }
    };
    if ok { j as u32 } else { lane }
}

/// A fiber: runs GPU threads of a block one after another, each to completion (suspending at
/// its barriers on the way). Resumed with `true` to run the thread [`CURRENT`] names, with
/// `false` to finish.
type Fiber = Coroutine<bool, (), (), DefaultStack>;

/// Marks a thread's fiber in `fiber_of` as none yet.
const NO_FIBER: u32 = u32::MAX;

/// A fiber for `block` that runs `thunk(args)` for each thread it is given.
fn new_fiber(block: *mut Block, thunk: Thunk, args: *const *mut c_void) -> Result<Fiber, String> {
    let stack = match STACKS.with(|s| s.borrow_mut().pop()) {
        Some(s) => s,
        None => DefaultStack::new(STACK_BYTES).map_err(|e| format!("cannot allocate a fiber stack: {e}"))?,
    };
    Ok(Coroutine::with_stack(stack, move |y: &Yielder<bool, ()>, mut go: bool| {
        while go {
            let (_, t) = CURRENT.with(Cell::get);
            // SAFETY: the block outlives its fibers (freed after all of them are finished or
            // reset); the caller of run_block guarantees the thunk and its arguments.
            unsafe {
                let s = slot(block, t);
                s.yielder = y;
                thunk(args);
                // CURRENT was set to this thread again before every resume.
                slot(block, CURRENT.with(Cell::get).1).state = State::Done;
            }
            go = y.suspend(());
        }
    }))
}

/// Runs block `block_idx` of `launch` to completion on this thread.
///
/// # Errors
/// A rule of the module docs broken by the kernel, with the block, threads and lines.
///
/// # Safety
/// `launch.thunk` must be a kernel thunk and `launch.args` must point at arguments of its
/// signature, valid until this returns; the kernel's memory accesses must be valid.
pub unsafe fn run_block(launch: &BlockLaunch, block_idx: Dim3) -> Result<(), String> {
    let threads = launch.block.count() as usize;
    let mut arena = ARENA.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if arena.len() * 16 < ARENA_BYTES + ARENA_ALIGN {
        arena = vec![0u128; (ARENA_BYTES + ARENA_ALIGN).div_ceil(16)];
    }
    let base = arena.as_mut_ptr().cast::<u8>();
    // SAFETY: the vector holds ARENA_ALIGN bytes more than the arena, so the aligned start and
    // ARENA_BYTES after it are inside.
    let arena_ptr = unsafe { base.add(base.align_offset(ARENA_ALIGN)) };
    // SAFETY: the dynamic size was checked against the limit (<= ARENA_BYTES) at launch.
    unsafe { std::ptr::write_bytes(arena_ptr, 0xff, launch.dynamic_shared) };
    let (bx, by) = (launch.block.x, launch.block.y);
    let ctxs = (0..threads as u32)
        .map(|t| ThreadCtx { thread_idx: Dim3 { x: t % bx, y: (t / bx) % by, z: t / (bx * by) }, block_idx, block_dim: launch.block, grid_dim: launch.grid })
        .collect();
    let block = Box::into_raw(Box::new(Block {
        slots: (0..threads).map(|_| Slot { state: State::Ready, value: 0, yielder: std::ptr::null() }).collect(),
        ctxs,
        threads,
        arena: arena_ptr,
        dynamic_shared: launch.dynamic_shared,
        shared_limit: launch.shared_limit.min(ARENA_BYTES),
        statics: Vec::new(),
        exchange: vec![Vec::new(); threads.div_ceil(32)],
        static_end: launch.dynamic_shared,
        error: None,
    }));
    let mut fibers: Vec<Fiber> = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    // SAFETY: `block` is valid until freed below; fibers run only inside `schedule`.
    let mut result = unsafe { schedule(block, launch, &mut fibers, &mut idle) };
    for (i, mut f) in fibers.into_iter().enumerate() {
        if idle.contains(&i) {
            // An idle fiber is between threads: let it return.
            if let CoroutineResult::Yield(()) = f.resume(false) {
                result = result.and(Err("a fiber did not finish (emulator bug)".to_string()));
            }
        }
        if !f.done() {
            // SAFETY: an abandoned fiber's stack holds kernel frames and this module's frames,
            // none of which owns anything that needs dropping.
            unsafe { f.force_reset() };
        }
        let stack = f.into_stack();
        STACKS.with(|s| s.borrow_mut().push(stack));
    }
    CURRENT.with(|c| c.set((std::ptr::null_mut(), 0)));
    // SAFETY: created by Box::into_raw above; no fiber can run any more.
    let block = unsafe { Box::from_raw(block) };
    if let Some(e) = block.error {
        result = Err(e);
    }
    ARENA.with(|a| *a.borrow_mut() = arena);
    result.map_err(|e| format!("block {block_idx}: {e}"))
}

/// The scheduler loop of the module docs. A thread gets a fiber when it first runs (an idle
/// one, or a new one) and gives it back when it returns, so a kernel without barriers runs a
/// whole block on one fiber.
///
/// # Safety
/// `block` is valid; `fibers` and `idle` start empty.
unsafe fn schedule(block: *mut Block, launch: &BlockLaunch, fibers: &mut Vec<Fiber>, idle: &mut Vec<usize>) -> Result<(), String> {
    // SAFETY (for every `slot(block, ..)` below): no fiber is running while the scheduler reads
    // or writes the block; fibers run only inside `resume`.
    let threads = unsafe { (*block).threads };
    let warps = threads.div_ceil(32);
    let mut fiber_of = vec![NO_FIBER; threads];
    // Per warp: lanes waiting at a warp op, and lanes that have returned (bit masks).
    let (mut waiting, mut done) = (vec![0u32; warps], vec![0u32; warps]);
    let mut exited = 0usize;
    let mut at_barrier = 0usize;
    let mut barrier_site: Option<Site> = None;
    let nth = |i: usize, n: usize| if launch.order == Order::Ascending { i } else { n - 1 - i };
    while exited < threads {
        let mut progressed = false;
        for wi in 0..warps {
            let w = nth(wi, warps);
            let lanes = (threads - w * 32).min(32);
            loop {
                let mut ran = false;
                for li in 0..lanes {
                    let l = nth(li, lanes);
                    let t = w * 32 + l;
                    if !matches!(unsafe { slot(block, t).state }, State::Ready) {
                        continue;
                    }
                    ran = true;
                    progressed = true;
                    let f = match fiber_of[t] {
                        NO_FIBER => {
                            let f = match idle.pop() {
                                Some(f) => f,
                                None => {
                                    fibers.push(new_fiber(block, launch.thunk, launch.args)?);
                                    fibers.len() - 1
                                }
                            };
                            fiber_of[t] = f as u32;
                            f
                        }
                        f => f as usize,
                    };
                    CURRENT.with(|c| c.set((block, t)));
                    // SAFETY: the context lives in the block, which outlives the resume.
                    unsafe { ld_emu_set_self((*block).ctxs.as_ptr().add(t)) };
                    if let CoroutineResult::Return(()) = fibers[f].resume(true) {
                        return Err(format!("thread {t}'s fiber ended (emulator bug)"));
                    }
                    match unsafe { slot(block, t).state } {
                        State::Failed => return Err(String::new()),
                        State::Done => {
                            exited += 1;
                            idle.push(f);
                            fiber_of[t] = NO_FIBER;
                            done[w] |= 1 << l;
                            // A lane that leaves while its warp waits for it at a warp op.
                            if waiting[w] != 0 {
                                for o in 0..lanes {
                                    if let State::Warp(op) = unsafe { slot(block, w * 32 + o).state }
                                        && op.mask & (1 << l) != 0
                                    {
                                        return Err(format!("thread {t} exited while thread {} waits for it at {} (mask {:#010x}) at {}", w * 32 + o, op.name(), op.mask, op.site));
                                    }
                                }
                            }
                        }
                        State::Barrier(site) => {
                            if let Some(b) = barrier_site
                                && !b.same(&site)
                            {
                                return Err(format!("threads wait at different __syncthreads: thread {t} at {site}, others at {b}"));
                            }
                            barrier_site = Some(site);
                            at_barrier += 1;
                        }
                        State::Warp(op) => unsafe { warp_arrive(block, w, lanes, l, op, &mut waiting[w], done[w])? },
                        State::Ready => return Err(format!("thread {t} suspended without a reason (emulator bug)")),
                    }
                }
                if !ran {
                    break;
                }
            }
        }
        if at_barrier > 0 && at_barrier + exited == threads {
            let site = barrier_site.map_or_else(String::new, |s| s.to_string());
            if exited > 0 {
                return Err(format!(
                    "__syncthreads at {site} is reached by {at_barrier} of {threads} threads: {exited} exited before it (every thread of the block must reach it)"
                ));
            }
            for t in 0..threads {
                unsafe { slot(block, t).state = State::Ready };
            }
            at_barrier = 0;
            barrier_site = None;
            continue;
        }
        if !progressed && exited < threads {
            return Err(format!("no thread can continue: {}", unsafe { describe_waits(block) }));
        }
    }
    Ok(())
}

/// Lane `l` of warp `w` arrives at `op`: checks the op and completes it when every lane of
/// its mask waits at it. `waiting` and `done` are the warp's lanes at a warp op and returned.
///
/// # Safety
/// As [`schedule`].
unsafe fn warp_arrive(block: *mut Block, w: usize, lanes: usize, l: usize, op: WarpOp, waiting: &mut u32, done: u32) -> Result<(), String> {
    let t = w * 32 + l;
    let slots = unsafe { &mut (*block).slots };
    if op.mask & (1 << l) == 0 {
        return Err(format!("thread {t} (lane {l}) calls {} at {} with mask {:#010x}, which leaves out its own lane", op.name(), op.site, op.mask));
    }
    if lanes < 32 && op.mask >> lanes != 0 {
        return Err(format!("{} at {} with mask {:#010x} names lanes that do not exist: the last warp of this block has {lanes} threads", op.name(), op.site, op.mask));
    }
    if op.mask & done != 0 {
        let o = (op.mask & done).trailing_zeros() as usize;
        return Err(format!("thread {t} waits at {} (mask {:#010x}) at {} for thread {}, which has exited", op.name(), op.mask, op.site, w * 32 + o));
    }
    *waiting |= 1 << l;
    if *waiting & op.mask != op.mask {
        return Ok(()); // not every lane of the mask is here yet
    }
    for o in 0..lanes {
        if op.mask & (1 << o) != 0 && !matches!(slots[w * 32 + o].state, State::Warp(other) if other.same(&op)) {
            return Ok(()); // a lane of the mask waits at another warp op (a deadlock, if it lasts)
        }
    }
    *waiting &= !op.mask;
    if let WarpKind::Exchange { bytes } = op.kind {
        let buf = unsafe { &mut (&mut (*block).exchange)[w] };
        if buf.is_empty() {
            *buf = vec![0u8; 32 * EXCHANGE_MAX];
        }
        let bytes = bytes as usize;
        for o in 0..lanes {
            if op.mask & (1 << o) != 0 {
                // SAFETY: each lane of the mask waits inside ld_emu_warp_exchange, whose `mine`
                // (on the lane's stack, `bytes` long) stays valid until it is resumed.
                let src = unsafe { std::slice::from_raw_parts(slots[w * 32 + o].value as *const u8, bytes) };
                buf[o * bytes..(o + 1) * bytes].copy_from_slice(src);
            }
        }
        let at = buf.as_ptr() as u64;
        for o in 0..lanes {
            if op.mask & (1 << o) != 0 {
                slots[w * 32 + o].value = at;
            }
        }
    }
    if let WarpKind::Shfl { mode, b, c } = op.kind {
        let mut received = [0u64; 32];
        for o in 0..lanes {
            if op.mask & (1 << o) == 0 {
                continue;
            }
            let src = shfl_source(mode, o as u32, b, c) as usize;
            if op.mask & (1 << src) == 0 || src >= lanes {
                return Err(format!("thread {} reads lane {src} in {} at {}, outside the mask {:#010x} (the value is undefined)", w * 32 + o, op.name(), op.site, op.mask));
            }
            received[o] = slots[w * 32 + src].value;
        }
        for o in 0..lanes {
            if op.mask & (1 << o) != 0 {
                slots[w * 32 + o].value = received[o];
            }
        }
    }
    for o in 0..lanes {
        if op.mask & (1 << o) != 0 {
            slots[w * 32 + o].state = State::Ready;
        }
    }
    Ok(())
}

/// Where the threads of a stuck block wait, grouped (for the deadlock error).
///
/// # Safety
/// As [`schedule`].
unsafe fn describe_waits(block: *mut Block) -> String {
    let slots = unsafe { &(*block).slots };
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (t, s) in slots.iter().enumerate() {
        let what = match s.state {
            State::Barrier(site) => format!("__syncthreads at {site}"),
            State::Warp(op) => format!("{} (mask {:#010x}) at {}", op.name(), op.mask, op.site),
            State::Done => "exited".to_string(),
            State::Ready | State::Failed => continue,
        };
        match groups.iter_mut().find(|g| g.0 == what) {
            Some(g) => g.1.push(t),
            None => groups.push((what, vec![t])),
        }
    }
    groups
        .iter()
        .map(|(what, ts)| {
            let first = ts.iter().take(4).map(|t| t.to_string()).collect::<Vec<_>>().join(",");
            format!("threads {first}{} ({} in all) {what}", if ts.len() > 4 { ",…" } else { "" }, ts.len())
        })
        .collect::<Vec<_>>()
        .join("; ")
}
