//! Strided matrix views over raw pointers and the one call into `gemm`, so every op states its
//! matmuls as `C = A·B` with named transposes instead of raw stride arithmetic.

use gemm::Parallelism;

/// A read-only strided view: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef {
    pub ptr: *const f32,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatMut {
    pub ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: the views are plain pointers into buffers that outlive the parallel region that uses
// them, and every op hands each task a disjoint destination region.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

impl MatRef {
    /// Row-major `(rows, cols)` view of the start of `s`.
    pub fn rows(s: &[f32], rows: usize, cols: usize) -> Self {
        assert!(s.len() >= rows * cols, "matrix view {rows}x{cols} over {} floats", s.len());
        MatRef { ptr: s.as_ptr(), rows, cols, rs: cols as isize, cs: 1 }
    }

    /// A strided view; the caller guarantees it stays inside its buffer.
    pub fn strided(ptr: *const f32, rows: usize, cols: usize, rs: usize) -> Self {
        MatRef { ptr, rows, cols, rs: rs as isize, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { ptr: self.ptr, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

impl MatMut {
    pub fn rows(s: &mut [f32], rows: usize, cols: usize) -> Self {
        assert!(s.len() >= rows * cols, "matrix view {rows}x{cols} over {} floats", s.len());
        MatMut { ptr: s.as_mut_ptr(), rows, cols, rs: cols as isize, cs: 1 }
    }

    pub fn strided(ptr: *mut f32, rows: usize, cols: usize, rs: usize) -> Self {
        MatMut { ptr, rows, cols, rs: rs as isize, cs: 1 }
    }
}

/// Whether a matmul splits its output tiles across the rayon pool or runs on the calling thread
/// (inside an already parallel loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Par {
    Pool,
    Serial,
}

/// `dst = a·b` (`accumulate = false`) or `dst += a·b` (`accumulate = true`), times `scale`.
///
/// # Safety
/// The three views must describe memory that is valid for their whole extent, `dst` must not
/// overlap `a` or `b`, and no other thread may write `dst`'s region during the call.
pub(crate) unsafe fn matmul(dst: MatMut, a: MatRef, b: MatRef, accumulate: bool, scale: f32, par: Par) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!((dst.rows, dst.cols), (a.rows, b.cols), "output shape");
    let parallelism = match par {
        Par::Pool => Parallelism::Rayon(rayon::current_num_threads()),
        Par::Serial => Parallelism::None,
    };
    // SAFETY: forwarded from the caller; gemm computes dst := alpha·dst + beta·a·b.
    unsafe { gemm::gemm(dst.rows, dst.cols, a.cols, dst.ptr, dst.cs, dst.rs, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0, scale, false, false, false, parallelism) }
}
