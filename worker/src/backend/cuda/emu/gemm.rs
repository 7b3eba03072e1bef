//! `cublasLtMatmul` on the CPU, implemented from cuBLASLt's documented contract (restated in
//! [`crate::backend::cuda::device::blas`]), not from the row-major wrapper that calls it, so a
//! wrong layout, transpose or leading dimension in the wrapper gives wrong numbers (or a refusal)
//! here as it would on a GPU.
//!
//! Checked as cuBLASLt checks (its status in the message): supported types (A and B both f32 or
//! both bf16, C and D f32, compute and scale f32), `ld >= rows`, `op(A)` `m × k` against `op(B)`
//! `k × n` and `C`, `D` `m × n`, `C` and `D` the same layout when they are the same matrix.
//! Beyond cuBLASLt: every matrix must lie inside one live allocation, and `D` may not overlap
//! `A` or `B` (undefined on a GPU).
//!
//! Arithmetic: bf16 operands are widened to f32 exactly; products and sums are f32 (the gemm
//! crate, in its own summation order); `C` is not read when `beta == 0`. The bias epilogue adds
//! `bias[i]` to every element of row `i` of `D` after the product (one more f32 rounding); its
//! vector must be `m` f32 inside one allocation, not overlapping `D`, and
//! [`BIAS_ALIGN`]-byte aligned (what cuBLASLt needs in practice; it is undocumented). The GELU
//! epilogues follow [`crate::backend::cuda::device::blas`]: the aux matrix is `m × n` f32 with
//! its own leading dimension (a multiple of [`AUX_LD_MULTIPLE`], at least `m`, else
//! INVALID_VALUE), [`BIAS_ALIGN`]-aligned, inside one allocation and apart from `D`, `A` and `B`;
//! GELU and its derivative are computed here in f32 from the tanh formula ([`gelu`],
//! [`gelu_grad`]), not by the kernels' code. BGRADA writes `Σ_p op(A)(i, p)` (unscaled) to its
//! vector, summed in f64 and rounded once (cuBLASLt's order is its own), under the bias vector's
//! rules, and it may not overlap A or B either: it is an output.

use crate::backend::cuda::device::blas::{AUX_LD_MULTIPLE, BIAS_ALIGN, DataType, Epilogue, Matmul, MatrixLayout};

/// GELU, the tanh approximation (GPT-2's, and the one the GELU epilogues implement).
pub fn gelu(x: f32) -> f32 {
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

/// `d gelu(x) / dx` of [`gelu`].
pub fn gelu_grad(x: f32) -> f32 {
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    let th = (k * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x)
}

fn overlaps(a: (u64, usize), b: (u64, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 as u64 && b.0 < a.0 + a.1 as u64
}

/// The bytes a column-major matrix spans from its first element.
fn footprint(l: &MatrixLayout) -> usize {
    if l.rows == 0 || l.cols == 0 { 0 } else { ((l.cols as usize - 1) * l.ld as usize + l.rows as usize) * l.dtype.bytes() }
}

/// Validates `m` as cuBLASLt would; `inside(addr, bytes)` says whether a range lies in a live
/// allocation.
///
/// # Errors
/// The status cuBLASLt would return and why.
pub fn check(m: &Matmul, inside: &dyn Fn(u64, usize) -> bool) -> Result<(), String> {
    let not_supported = |why: String| Err(format!("CUBLAS_STATUS_NOT_SUPPORTED: {why}"));
    let invalid = |why: String| Err(format!("CUBLAS_STATUS_INVALID_VALUE: {why}"));
    if m.a_layout.dtype != m.b_layout.dtype {
        return not_supported(format!("A is {:?} and B is {:?}", m.a_layout.dtype, m.b_layout.dtype));
    }
    if m.c_layout.dtype != DataType::F32 || m.d_layout.dtype != DataType::F32 {
        return not_supported(format!("C and D must be f32 for {:?} operands with compute type 32F, got {:?} and {:?}", m.a_layout.dtype, m.c_layout.dtype, m.d_layout.dtype));
    }
    for (name, l) in [("A", &m.a_layout), ("B", &m.b_layout), ("C", &m.c_layout), ("D", &m.d_layout)] {
        if l.ld < 1 || (l.ld as u64) < l.rows {
            return invalid(format!("{name} is {}×{} with ld {}: ld must be at least the rows", l.rows, l.cols, l.ld));
        }
    }
    let (rows, cols, k) = m.dims();
    let (a_rows, a_cols) = if m.trans_a { (m.a_layout.cols, m.a_layout.rows) } else { (m.a_layout.rows, m.a_layout.cols) };
    let (b_rows, b_cols) = if m.trans_b { (m.b_layout.cols, m.b_layout.rows) } else { (m.b_layout.rows, m.b_layout.cols) };
    if a_rows != rows || b_cols != cols || b_rows != k || (m.c_layout.rows, m.c_layout.cols) != (rows, cols) {
        return invalid(format!(
            "op(A) is {a_rows}×{a_cols} (transa={}), op(B) {b_rows}×{b_cols} (transb={}), C {}×{}, D {rows}×{cols}: need op(A) m×k, op(B) k×n, C and D m×n",
            m.trans_a, m.trans_b, m.c_layout.rows, m.c_layout.cols
        ));
    }
    if m.c == m.d && m.c_layout != m.d_layout {
        return invalid("C and D are the same matrix with different layouts".into());
    }
    let d_span = (m.d.0, footprint(&m.d_layout));
    if let Some((aux, aux_ld)) = m.epilogue.aux() {
        if aux_ld < rows as i64 || aux_ld % AUX_LD_MULTIPLE != 0 {
            return invalid(format!("the GELU aux matrix has ld {aux_ld}: it must be a multiple of {AUX_LD_MULTIPLE} and at least m = {rows}"));
        }
        if !aux.0.is_multiple_of(BIAS_ALIGN) {
            return not_supported(format!("the GELU aux matrix at {:#x} is not {BIAS_ALIGN}-byte aligned", aux.0));
        }
        let span = (aux.0, footprint(&MatrixLayout { dtype: DataType::F32, rows, cols, ld: aux_ld }));
        if span.1 > 0 && !inside(span.0, span.1) {
            return Err(format!("the GELU aux matrix ({rows}×{cols}, ld {aux_ld}, from {:#x}) is not inside one device allocation", aux.0));
        }
        for (name, p, l) in [("D", m.d, &m.d_layout), ("A", m.a, &m.a_layout), ("B", m.b, &m.b_layout)] {
            if overlaps(span, (p.0, footprint(l))) {
                return Err(format!("the GELU aux matrix overlaps {name}: cuBLASLt's result is undefined when they alias"));
            }
        }
    }
    if let Some(bias) = m.epilogue.bias() {
        let bytes = rows as usize * 4;
        if !bias.0.is_multiple_of(BIAS_ALIGN) {
            return not_supported(format!("the bias vector at {:#x} is not {BIAS_ALIGN}-byte aligned", bias.0));
        }
        if bytes > 0 && !inside(bias.0, bytes) {
            return Err(format!("the bias vector ({rows} f32 from {:#x}) is not inside one device allocation", bias.0));
        }
        if bytes > 0 && d_span.1 > 0 && bias.0 < d_span.0 + d_span.1 as u64 && d_span.0 < bias.0 + bytes as u64 {
            return Err("D overlaps the bias vector: cuBLASLt's result is undefined when the output aliases an input".into());
        }
        if matches!(m.epilogue, Epilogue::BGradA(_)) {
            for (name, p, l) in [("A", m.a, &m.a_layout), ("B", m.b, &m.b_layout)] {
                if overlaps((bias.0, bytes), (p.0, footprint(l))) {
                    return Err(format!("the bias gradient overlaps {name}: cuBLASLt's result is undefined when an output aliases an input"));
                }
            }
        }
    }
    for (name, p, l) in [("A", m.a, &m.a_layout), ("B", m.b, &m.b_layout), ("C", m.c, &m.c_layout), ("D", m.d, &m.d_layout)] {
        let bytes = footprint(l);
        if bytes > 0 && !inside(p.0, bytes) {
            return Err(format!("{name} ({}×{}, ld {}, {bytes} bytes from {:#x}) is not inside one device allocation", l.rows, l.cols, l.ld, p.0));
        }
        if (name == "A" || name == "B") && bytes > 0 && d_span.1 > 0 && p.0 < d_span.0 + d_span.1 as u64 && d_span.0 < p.0 + bytes as u64 {
            return Err(format!("D overlaps {name}: cuBLASLt's result is undefined when the output aliases an input"));
        }
    }
    Ok(())
}

/// The stored matrix at `p` as f32 (bf16 widened exactly), with its own leading dimension.
///
/// # Safety
/// `p` spans [`footprint`]`(l)` readable bytes.
unsafe fn widen(p: u64, l: &MatrixLayout) -> Vec<f32> {
    let n = footprint(l) / l.dtype.bytes();
    match l.dtype {
        // SAFETY: the caller guarantees n elements at p.
        DataType::F32 => unsafe { std::slice::from_raw_parts(p as *const f32, n) }.to_vec(),
        DataType::Bf16 => unsafe { std::slice::from_raw_parts(p as *const u16, n) }.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect(),
    }
}

/// Runs a [`check`]ed matmul, on the rayon pool it is called in when `parallel`.
///
/// # Safety
/// [`check`] passed for `m` (every matrix inside a live allocation, D not overlapping A or B)
/// and nothing else touches these matrices meanwhile.
pub unsafe fn run(m: &Matmul, parallel: bool) {
    let (rows, cols, k) = m.dims();
    let (rows, cols, k) = (rows as usize, cols as usize, k as usize);
    if rows == 0 || cols == 0 {
        return;
    }
    // SAFETY: check() placed A and B inside live allocations.
    let (a, b) = unsafe { (widen(m.a.0, &m.a_layout), widen(m.b.0, &m.b_layout)) };
    if let Epilogue::BGradA(bias) = m.epilogue {
        // Element (i, p) of op(A), as for the product below.
        let lda = m.a_layout.ld as usize;
        let at = |i: usize, p: usize| if m.trans_a { a[p + i * lda] } else { a[i + p * lda] };
        // SAFETY: check() placed `rows` f32 of the vector inside an allocation apart from A, B and D.
        let out = unsafe { std::slice::from_raw_parts_mut(bias.0 as *mut f32, rows) };
        for (i, o) in out.iter_mut().enumerate() {
            *o = (0..k).map(|p| at(i, p) as f64).sum::<f64>() as f32;
        }
    }
    let d = m.d.0 as *mut f32;
    let ldd = m.d_layout.ld as isize;
    let read_dst = m.beta != 0.0;
    if read_dst && m.c != m.d {
        let ldc = m.c_layout.ld as usize;
        for j in 0..cols {
            for i in 0..rows {
                // SAFETY: (i, j) is inside C's and D's footprints (check()); they may overlap
                // only as the same matrix, which this branch excludes.
                unsafe { *d.offset(i as isize + j as isize * ldd) = *(m.c.0 as *const f32).add(i + j * ldc) };
            }
        }
    }
    if k == 0 {
        for j in 0..cols {
            for i in 0..rows {
                // SAFETY: inside D's footprint.
                unsafe {
                    let x = d.offset(i as isize + j as isize * ldd);
                    *x = if read_dst { m.beta * *x } else { 0.0 };
                }
            }
        }
        epilogue(m, d, rows, cols, ldd);
        return;
    }
    // Element (i, p) of op(A): A(i, p) at i + p·lda, or A(p, i) at p + i·lda when transposed.
    let lda = m.a_layout.ld as isize;
    let (a_rs, a_cs) = if m.trans_a { (lda, 1) } else { (1, lda) };
    let ldb = m.b_layout.ld as isize;
    let (b_rs, b_cs) = if m.trans_b { (ldb, 1) } else { (1, ldb) };
    // SAFETY: the strides address op(A) m×k inside `a`, op(B) k×n inside `b` and D m×n inside
    // D's footprint (check()); the gemm crate computes dst = beta_g·dst + alpha_g·lhs·rhs.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            d,
            ldd,
            1,
            read_dst,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            m.beta,
            m.alpha,
            false,
            false,
            false,
            if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None },
        )
    }
    epilogue(m, d, rows, cols, ldd);
}

/// The epilogue after the product (BGRADA's sum is taken before it, from A): `D(i, j) += bias[i]`; then for GELU_AUX_BIAS
/// `aux(i, j) = D(i, j)`, `D(i, j) = gelu(D(i, j))`; for DGELU `D(i, j) *= gelu'(aux(i, j))`.
fn epilogue(m: &Matmul, d: *mut f32, rows: usize, cols: usize, ldd: isize) {
    if let Some(bias) = m.epilogue.bias().filter(|_| !matches!(m.epilogue, Epilogue::BGradA(_))) {
        // SAFETY: check() placed `rows` f32 of bias inside an allocation that D does not overlap.
        let bias = unsafe { std::slice::from_raw_parts(bias.0 as *const f32, rows) };
        for j in 0..cols {
            for (i, &b) in bias.iter().enumerate() {
                // SAFETY: (i, j) is inside D's footprint (check()).
                unsafe { *d.offset(i as isize + j as isize * ldd) += b };
            }
        }
    }
    let Some((aux, aux_ld)) = m.epilogue.aux() else { return };
    let aux = aux.0 as *mut f32;
    let forward = matches!(m.epilogue, Epilogue::GeluAuxBias { .. });
    for j in 0..cols {
        for i in 0..rows {
            // SAFETY: (i, j) is inside D's and the aux matrix's footprints, which do not overlap
            // (check()).
            unsafe {
                let x = d.offset(i as isize + j as isize * ldd);
                let a = aux.offset(i as isize + j as isize * aux_ld as isize);
                if forward {
                    *a = *x;
                    *x = gelu(*x);
                } else {
                    *x *= gelu_grad(*a);
                }
            }
        }
    }
}
