//! Host wrappers of the kernels: one function per op with the CPU backend's name and argument
//! order, each checking every operand's length against the shapes before it launches. Shapes
//! follow the crate glossary (N = B·T rows). The llama family's ops are in [`llama`] and
//! re-exported here.

pub mod llama;

pub use llama::{
    RopeTableDev, embedding_backward, embedding_forward, gqa_backward, gqa_forward, rmsnorm_backward, rmsnorm_forward, rmsnorm_partial_len, rope_apply, rope_backward,
    rope_forward, swiglu_backward, swiglu_forward,
};

use super::device::blas::{AUX_LD_MULTIPLE, BIAS_ALIGN};
use super::device::{Arg, CudaDevice, DPtr, LaunchConfig, View, grid_1d};
use super::error::{CudaError, Result};
use super::matmul::{self, Precision};

/// Threads per block of element-wise kernels.
const BLOCK: u32 = 256;
/// Rows per partial sum of the column-sum reductions (bias and LayerNorm parameter gradients).
pub const ROWS_PER_CHUNK: usize = 256;
/// Blocks of the global-norm reduction: fixed, so the summation order depends only on the length.
pub const NORM_BLOCKS: usize = 1024;
/// Query (or key) rows per block of the attention kernels.
const ATT_ROWS: u32 = 64;
/// Keys (or queries) per shared-memory tile; must match ATT_TILE in attention.cu.
const ATT_TILE: usize = 32;

/// Floats a column-sum scratch needs for `n` rows of `cols` columns (×2 for LayerNorm's pair).
pub fn partial_len(n: usize, cols: usize) -> usize {
    n.div_ceil(ROWS_PER_CHUNK) * 2 * cols
}

fn need(op: &'static str, what: &str, v: View, n: usize) -> Result<()> {
    if v.len < n {
        return Err(CudaError::Shape { op, reason: format!("{what} holds {} elements, the shape needs {n}", v.len) });
    }
    Ok(())
}

fn int(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| CudaError::Shape { op, reason: format!("{what} = {x} does not fit a 32-bit int") })
}

fn p(v: View) -> Arg {
    Arg::P(v.ptr)
}

/// CPU: [`crate::backend::cpu::encoder::encoder_forward`].
pub fn encoder_forward(dev: &CudaDevice, out: View, inp: View, wte: View, wpe: View, b: usize, t: usize, c: usize, pos0: usize) -> Result<()> {
    const OP: &str = "encoder_forward";
    need(OP, "out", out, b * t * c)?;
    need(OP, "inp", inp, b * t)?;
    need(OP, "wpe", wpe, (pos0 + t) * c)?;
    let _ = wte; // token ids are checked against V by the caller; wte is (Vp, C)
    dev.launch(
        OP,
        grid_1d(b * t * c, BLOCK),
        &[p(out), p(inp), p(wte), p(wpe), Arg::I(int(OP, "B", b)?), Arg::I(int(OP, "T", t)?), Arg::I(int(OP, "C", c)?), Arg::I(int(OP, "pos0", pos0)?)],
    )
}

/// CPU: [`crate::backend::cpu::encoder::encoder_backward`] (dwte by atomics, see encoder.cu).
pub fn encoder_backward(dev: &CudaDevice, dwte: View, dwpe: View, dout: View, inp: View, b: usize, t: usize, c: usize) -> Result<()> {
    const OP: &str = "encoder_backward";
    need(OP, "dwpe", dwpe, t * c)?;
    need(OP, "dout", dout, b * t * c)?;
    need(OP, "inp", inp, b * t)?;
    let (bi, ti, ci) = (int(OP, "B", b)?, int(OP, "T", t)?, int(OP, "C", c)?);
    dev.launch("encoder_backward_wpe", grid_1d(t * c, BLOCK), &[p(dwpe), p(dout), Arg::I(bi), Arg::I(ti), Arg::I(ci)])?;
    dev.launch("encoder_backward_wte", grid_1d(b * t * c, BLOCK), &[p(dwte), p(dout), p(inp), Arg::I(bi), Arg::I(ti), Arg::I(ci)])
}

/// CPU: [`crate::backend::cpu::layernorm::layernorm_forward`].
/// With `out_bf16`, `out` rounded to bf16 goes there too (the next matmul's operand); `out` may
/// then be absent, when nothing reads the f32 values. One of the two must be given.
pub fn layernorm_forward(
    dev: &CudaDevice,
    out: Option<View>,
    out_bf16: Option<View>,
    mean: View,
    rstd: View,
    inp: View,
    weight: View,
    bias: View,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    for (what, v, len) in [("inp", inp, n * c), ("mean", mean, n), ("rstd", rstd, n), ("weight", weight, c), ("bias", bias, c)] {
        need(OP, what, v, len)?;
    }
    let (o, ob) = outputs(OP, out, out_bf16, n * c)?;
    let warps = BLOCK as usize / 32;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(warps) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch(OP, cfg, &[o, p(mean), p(rstd), p(inp), p(weight), p(bias), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "C", c)?), ob])
}

/// An op's f32 and bf16 outputs of `len` elements, each optional but not both absent.
fn outputs(op: &'static str, out: Option<View>, out_bf16: Option<View>, len: usize) -> Result<(Arg, Arg)> {
    if out.is_none() && out_bf16.is_none() {
        return Err(CudaError::Shape { op, reason: "neither an f32 nor a bf16 output was given".into() });
    }
    Ok((optional(op, "out", out, len)?, optional(op, "out_bf16", out_bf16, len)?))
}

/// An optional pointer argument of `len` elements: null when absent.
pub(super) fn optional(op: &'static str, what: &str, v: Option<View>, len: usize) -> Result<Arg> {
    match v {
        Some(v) => {
            need(op, what, v, len)?;
            Ok(p(v))
        }
        None => Ok(Arg::P(DPtr::NULL)),
    }
}

/// `residual = a + b`, then `out = LayerNorm(residual)` in one launch. CPU:
/// [`crate::backend::cpu::residual::residual_forward`] then
/// [`crate::backend::cpu::layernorm::layernorm_forward`]; bit for bit the two kernels'. `out` and
/// `out_bf16` as in [`layernorm_forward`].
pub fn residual_layernorm_forward(
    dev: &CudaDevice,
    residual: View,
    out: Option<View>,
    out_bf16: Option<View>,
    mean: View,
    rstd: View,
    a: View,
    b: View,
    weight: View,
    bias: View,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "residual_layernorm_forward";
    for (what, v, len) in [("residual", residual, n * c), ("a", a, n * c), ("b", b, n * c), ("mean", mean, n), ("rstd", rstd, n), ("weight", weight, c), ("bias", bias, c)] {
        need(OP, what, v, len)?;
    }
    let (o, ob) = outputs(OP, out, out_bf16, n * c)?;
    let warps = BLOCK as usize / 32;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(warps) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch(OP, cfg, &[p(residual), o, p(mean), p(rstd), p(a), p(b), p(weight), p(bias), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "C", c)?), ob])
}

/// CPU: [`crate::backend::cpu::layernorm::layernorm_backward`]. `partial` is scratch of
/// [`partial_len`]`(n, c)` floats.
pub fn layernorm_backward(
    dev: &CudaDevice,
    dinp: View,
    dinp_bf16: Option<View>,
    dweight: View,
    dbias: View,
    dout: View,
    inp: View,
    weight: View,
    mean: View,
    rstd: View,
    partial: View,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    for (what, v, len) in [
        ("dinp", dinp, n * c),
        ("dout", dout, n * c),
        ("inp", inp, n * c),
        ("mean", mean, n),
        ("rstd", rstd, n),
        ("weight", weight, c),
        ("dweight", dweight, c),
        ("dbias", dbias, c),
        ("partial", partial, partial_len(n, c)),
    ] {
        need(OP, what, v, len)?;
    }
    let db = optional(OP, "dinp_bf16", dinp_bf16, n * c)?;
    let (ni, ci) = (int(OP, "N", n)?, int(OP, "C", c)?);
    let warps = BLOCK as usize / 32;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(warps) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("layernorm_backward_input", cfg, &[p(dinp), p(dout), p(inp), p(weight), p(mean), p(rstd), Arg::I(ni), Arg::I(ci), db])?;
    let chunks = n.div_ceil(ROWS_PER_CHUNK);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(BLOCK as usize) as u32, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("layernorm_backward_params_partial", cfg, &[p(partial), p(dout), p(inp), p(mean), p(rstd), Arg::I(ni), Arg::I(ci), Arg::I(ROWS_PER_CHUNK as i32)])?;
    let stride = Arg::L(2 * c as i64);
    let ch = Arg::I(chunks as i32);
    dev.launch("column_sum_reduce", grid_1d(c, BLOCK), &[p(dweight), p(partial), ch, Arg::I(ci), stride])?;
    dev.launch("column_sum_reduce", grid_1d(c, BLOCK), &[p(dbias), Arg::P(DPtr(partial.ptr.0 + (c * 4) as u64)), ch, Arg::I(ci), stride])
}

/// `dst += Σ_rows src` for `src` `(n, cols)`: CPU [`crate::backend::cpu::add_column_sums`].
pub fn add_column_sums(dev: &CudaDevice, dst: View, src: View, partial: View, n: usize, cols: usize) -> Result<()> {
    const OP: &str = "add_column_sums";
    need(OP, "dst", dst, cols)?;
    need(OP, "src", src, n * cols)?;
    need(OP, "partial", partial, partial_len(n, cols) / 2)?;
    let (ni, ci) = (int(OP, "N", n)?, int(OP, "cols", cols)?);
    let chunks = n.div_ceil(ROWS_PER_CHUNK);
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(BLOCK as usize) as u32, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("column_sum_partial", cfg, &[p(partial), p(src), Arg::I(ni), Arg::I(ci), Arg::I(ROWS_PER_CHUNK as i32)])?;
    dev.launch("column_sum_reduce", grid_1d(cols, BLOCK), &[p(dst), p(partial), Arg::I(chunks as i32), Arg::I(ci), Arg::L(cols as i64)])
}

/// `dst = bf16(src)` for `n` values.
pub fn cast_to_bf16(dev: &CudaDevice, dst: View, src: View, n: usize) -> Result<()> {
    need("cast_to_bf16", "dst", dst, n)?;
    need("cast_to_bf16", "src", src, n)?;
    dev.launch("cast_f32_to_bf16", grid_1d(n, BLOCK), &[p(dst), p(src), Arg::L(n as i64)])
}

/// The f32 operands of one matmul and where their bf16 copies go when the precision is bf16.
#[derive(Debug, Clone, Copy)]
pub struct Bf16Scratch {
    /// Two bf16 buffers, each as large as the largest activation operand (`B·T·max(4C, Vp)`).
    pub a: View,
    pub b: View,
}

/// An activation a matmul reads: f32, or already bf16 (written so by the kernel that produced
/// it: a LayerNorm's copy of its output, the loss kernel's logits gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// f32, cast to bf16 in a scratch buffer first when the matmuls are bf16.
    F32(View),
    /// bf16 bits; bf16 matmuls only.
    Bf16(View),
}

/// The operand to hand cuBLASLt for `n` elements of `act` (`what` of `op`, for errors): an f32
/// view as it is for f32 matmuls or cast into `scratch` for bf16 ones, a bf16 view as it is.
fn operand(dev: &CudaDevice, prec: Precision, op: &'static str, what: &str, act: Act, scratch: View, n: usize) -> Result<DPtr> {
    match (act, prec) {
        (Act::F32(v), Precision::F32) | (Act::Bf16(v), Precision::Bf16) => {
            need(op, what, v, n)?;
            Ok(v.ptr)
        }
        (Act::F32(v), Precision::Bf16) => {
            need(op, what, v, n)?;
            cast_to_bf16(dev, scratch, v, n)?;
            Ok(scratch.ptr)
        }
        (Act::Bf16(_), Precision::F32) => Err(CudaError::Shape { op, reason: format!("{what} is bf16: it needs bf16 matmuls") }),
    }
}

/// A weight operand: f32 master or its bf16 copy (kept in step by the optimizer).
fn weight(prec: Precision, w: View, w_bf16: View) -> DPtr {
    match prec {
        Precision::F32 => w.ptr,
        Precision::Bf16 => w_bf16.ptr,
    }
}

/// CPU: [`crate::backend::cpu::matmul::matmul_forward`]: `out(N,OC) = inp(N,C)·w(C,OC) + bias`.
pub fn matmul_forward(
    dev: &CudaDevice,
    prec: Precision,
    out: View,
    inp: Act,
    w: View,
    w_bf16: View,
    bias: Option<View>,
    scratch: Bf16Scratch,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_forward";
    need(OP, "out", out, n * oc)?;
    need(OP, "w", w, c * oc)?;
    if prec == Precision::Bf16 {
        need(OP, "w_bf16", w_bf16, c * oc)?;
    }
    let a = operand(dev, prec, OP, "inp", inp, scratch.a, n * c)?;
    let wp = weight(prec, w, w_bf16);
    match bias {
        // In the gemm's epilogue where cuBLASLt takes the vector; else broadcast first, beta = 1.
        Some(bv) if bv.ptr.0.is_multiple_of(BIAS_ALIGN) => {
            need(OP, "bias", bv, oc)?;
            matmul::gemm_bias(dev, prec, out.ptr, a, wp, false, false, n, oc, c, bv.ptr)
        }
        Some(bv) => {
            need(OP, "bias", bv, oc)?;
            dev.launch("bias_broadcast", grid_1d(n * oc, BLOCK), &[p(out), p(bv), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "OC", oc)?)])?;
            matmul::gemm(dev, prec, out.ptr, a, wp, false, false, n, oc, c, 1.0, 1.0)
        }
        None => matmul::gemm(dev, prec, out.ptr, a, wp, false, false, n, oc, c, 1.0, 0.0),
    }
}

/// Whether a GELU epilogue can take `width` columns with these vectors and aux matrices.
fn gelu_epilogue_fits(width: usize, pointers: &[View]) -> bool {
    (width as i64) % AUX_LD_MULTIPLE == 0 && pointers.iter().all(|v| v.ptr.0.is_multiple_of(BIAS_ALIGN))
}

/// `pre(N,OC) = inp(N,C)·w(C,OC) + bias` and `out = GELU(pre)`: in the gemm's GELU_AUX_BIAS
/// epilogue where it applies (`OC` a multiple of 8, `bias` and `pre` 16-byte aligned), else the
/// matmul then `gelu_forward`. With `out_bf16` (a bf16 model, whose next matmul reads the GELU
/// output as bf16) always the matmul then `gelu_forward`, which writes the bf16 copy (and `out`
/// when given): `pre` written, read and 2 bytes written per element, where the epilogue's f32
/// output and a cast would move 14. CPU: [`crate::backend::cpu::matmul::matmul_forward`] then
/// [`crate::backend::cpu::gelu::gelu_forward`].
pub fn matmul_forward_gelu(
    dev: &CudaDevice,
    prec: Precision,
    out: Option<View>,
    out_bf16: Option<View>,
    pre: View,
    inp: Act,
    w: View,
    w_bf16: View,
    bias: View,
    scratch: Bf16Scratch,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_forward_gelu";
    for (what, v, len) in [("pre", pre, n * oc), ("w", w, c * oc), ("bias", bias, oc)] {
        need(OP, what, v, len)?;
    }
    outputs(OP, out, out_bf16, n * oc)?;
    let unfused = || {
        matmul_forward(dev, prec, pre, inp, w, w_bf16, Some(bias), scratch, n, c, oc)?;
        gelu_forward(dev, out, out_bf16, pre, n * oc)
    };
    let Some(out) = out.filter(|_| out_bf16.is_none()) else { return unfused() };
    if !gelu_epilogue_fits(oc, &[bias, pre]) {
        return unfused();
    }
    if prec == Precision::Bf16 {
        need(OP, "w_bf16", w_bf16, c * oc)?;
    }
    let a = operand(dev, prec, OP, "inp", inp, scratch.a, n * c)?;
    match matmul::gemm_bias_gelu(dev, prec, out.ptr, pre.ptr, a, weight(prec, w, w_bf16), false, false, n, oc, c, bias.ptr) {
        // A cuBLASLt without an algorithm for this epilogue and type mix: the unfused pair.
        Err(e) if e.is_not_supported() => unfused(),
        r => r,
    }
}

/// [`matmul_backward`] of a matmul whose input was `GELU(pre)`, with GELU's backward fused into
/// the input gradient: `dpre = (dout·wᵀ) ⊙ GELU'(pre)` (overwritten), `dw += inpᵀ·dout`,
/// `dbias += Σ_rows dout`, where `inp = GELU(pre)` `(N,C)`. In the gemm's DGELU epilogue where it
/// applies (`C` a multiple of 8, `pre` 16-byte aligned), else through `dinp_scratch` `(N,C)` and
/// `gelu_backward`. CPU: [`crate::backend::cpu::matmul::matmul_backward`] then
/// [`crate::backend::cpu::gelu::gelu_backward`].
pub fn matmul_backward_gelu(
    dev: &CudaDevice,
    prec: Precision,
    dpre: View,
    dinp_scratch: View,
    dw: View,
    dbias: Option<View>,
    dout: View,
    dout_bf16: Option<View>,
    inp: Act,
    pre: View,
    w: View,
    w_bf16: View,
    scratch: Bf16Scratch,
    partial: View,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_backward_gelu";
    for (what, v, len) in [("dpre", dpre, n * c), ("pre", pre, n * c), ("dw", dw, c * oc), ("dout", dout, n * oc), ("w", w, c * oc)] {
        need(OP, what, v, len)?;
    }
    let unfused = || {
        need(OP, "dinp_scratch", dinp_scratch, n * c)?;
        matmul_backward(dev, prec, dinp_scratch, dw, dbias, dout, dout_bf16, inp, w, w_bf16, scratch, partial, n, c, oc)?;
        gelu_backward(dev, dpre, pre, dinp_scratch, n * c)
    };
    if !gelu_epilogue_fits(c, &[pre]) {
        return unfused();
    }
    if prec == Precision::Bf16 {
        need(OP, "w_bf16", w_bf16, c * oc)?;
    }
    match backward_gemms(dev, prec, dpre, Some(pre), dw, dbias, dout, dout_bf16, inp, w, w_bf16, scratch, partial, n, c, oc) {
        // As in matmul_forward_gelu; the DGELU gemm is the first, so nothing was accumulated yet.
        Err(e) if e.is_not_supported() => unfused(),
        r => r,
    }
}

/// The gemms of a matmul's backward: `dinp = dout·wᵀ` (times `GELU'(pre)` in the epilogue when
/// `pre` is given), `dw += inpᵀ·dout`, and the bias gradient.
fn backward_gemms(
    dev: &CudaDevice,
    prec: Precision,
    dinp: View,
    pre: Option<View>,
    dw: View,
    dbias: Option<View>,
    dout: View,
    dout_bf16: Option<View>,
    inp: Act,
    w: View,
    w_bf16: View,
    scratch: Bf16Scratch,
    partial: View,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_backward";
    let g = match dout_bf16 {
        Some(d) => operand(dev, prec, OP, "dout_bf16", Act::Bf16(d), scratch.a, n * oc)?,
        None => operand(dev, prec, OP, "dout", Act::F32(dout), scratch.a, n * oc)?,
    };
    let wp = weight(prec, w, w_bf16);
    match pre {
        Some(pre) => matmul::gemm_dgelu(dev, prec, dinp.ptr, pre.ptr, g, wp, false, true, n, c, oc)?,
        None => matmul::gemm(dev, prec, dinp.ptr, g, wp, false, true, n, c, oc, 1.0, 0.0)?,
    }
    let x = operand(dev, prec, OP, "inp", inp, scratch.b, n * c)?;
    let Some(db) = dbias else { return matmul::gemm(dev, prec, dw.ptr, x, g, true, false, c, oc, n, 1.0, 1.0) };
    // The bias gradient in the dW gemm's BGRADA epilogue (it reads `dout` once, for both), into
    // `partial` (the epilogue overwrites; the gradients accumulate), then added; else the
    // column sums. A refused epilogue ran nothing, so the fallback starts from scratch.
    if partial.len >= oc && partial.ptr.0.is_multiple_of(BIAS_ALIGN) {
        match matmul::gemm_accumulate_bias_grad(dev, prec, dw.ptr, x, g, true, false, c, oc, n, partial.ptr) {
            Ok(()) => return add_vector(dev, db, partial, oc),
            Err(e) if e.is_not_supported() => {}
            Err(e) => return Err(e),
        }
    }
    matmul::gemm(dev, prec, dw.ptr, x, g, true, false, c, oc, n, 1.0, 1.0)?;
    add_column_sums(dev, db, dout, partial, n, oc)
}

/// `dst[..n] += src[..n]` (the one-chunk reduce of [`add_column_sums`]).
fn add_vector(dev: &CudaDevice, dst: View, src: View, n: usize) -> Result<()> {
    const OP: &str = "add_vector";
    need(OP, "dst", dst, n)?;
    need(OP, "src", src, n)?;
    let ni = int(OP, "n", n)?;
    dev.launch("column_sum_reduce", grid_1d(n, BLOCK), &[p(dst), p(src), Arg::I(1), Arg::I(ni), Arg::L(n as i64)])
}

/// CPU: [`crate::backend::cpu::matmul::matmul_backward`]: `dinp = dout·wᵀ` (overwritten),
/// `dw += inpᵀ·dout`, `dbias += Σ_rows dout`. `partial`: [`partial_len`]`(n, oc)` floats.
/// `dout_bf16`, when given (bf16 matmuls), is `dout` already rounded to bf16 (a LayerNorm
/// backward's copy): the gemms read it instead of a cast.
pub fn matmul_backward(
    dev: &CudaDevice,
    prec: Precision,
    dinp: View,
    dw: View,
    dbias: Option<View>,
    dout: View,
    dout_bf16: Option<View>,
    inp: Act,
    w: View,
    w_bf16: View,
    scratch: Bf16Scratch,
    partial: View,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_backward";
    need(OP, "dinp", dinp, n * c)?;
    need(OP, "dw", dw, c * oc)?;
    need(OP, "dout", dout, n * oc)?;
    need(OP, "w", w, c * oc)?;
    backward_gemms(dev, prec, dinp, None, dw, dbias, dout, dout_bf16, inp, w, w_bf16, scratch, partial, n, c, oc)
}

/// CPU: [`crate::backend::cpu::matmul::lm_head_forward`]: `logits(N,Vp) = x(N,C)·wteᵀ`.
pub fn lm_head_forward(dev: &CudaDevice, prec: Precision, logits: View, x: Act, wte: View, wte_bf16: View, scratch: Bf16Scratch, n: usize, c: usize, vp: usize) -> Result<()> {
    const OP: &str = "lm_head_forward";
    need(OP, "logits", logits, n * vp)?;
    need(OP, "wte", wte, vp * c)?;
    let a = operand(dev, prec, OP, "x", x, scratch.a, n * c)?;
    matmul::gemm(dev, prec, logits.ptr, a, weight(prec, wte, wte_bf16), false, true, n, vp, c, 1.0, 0.0)
}

/// CPU: [`crate::backend::cpu::matmul::lm_head_backward`]: `dx = dlogits·wte` (overwritten),
/// `dwte += dlogitsᵀ·x`.
pub fn lm_head_backward(
    dev: &CudaDevice,
    prec: Precision,
    dx: View,
    dwte: View,
    dlogits: Act,
    x: Act,
    wte: View,
    wte_bf16: View,
    scratch: Bf16Scratch,
    n: usize,
    c: usize,
    vp: usize,
) -> Result<()> {
    const OP: &str = "lm_head_backward";
    need(OP, "dx", dx, n * c)?;
    need(OP, "dwte", dwte, vp * c)?;
    let g = operand(dev, prec, OP, "dlogits", dlogits, scratch.a, n * vp)?;
    matmul::gemm(dev, prec, dx.ptr, g, weight(prec, wte, wte_bf16), false, false, n, c, vp, 1.0, 0.0)?;
    let xa = operand(dev, prec, OP, "x", x, scratch.b, n * c)?;
    matmul::gemm(dev, prec, dwte.ptr, g, xa, true, false, vp, c, n, 1.0, 1.0)
}

/// The attention kernels' register-array size for head size `hs`.
fn head_variant(op: &'static str, hs: usize) -> Result<&'static str> {
    match hs {
        1..=32 => Ok("32"),
        33..=64 => Ok("64"),
        65..=128 => Ok("128"),
        _ => Err(CudaError::Shape { op, reason: format!("head size {hs} is outside the kernels' 1..=128") }),
    }
}

fn kernel_name(stem: &str, variant: &str) -> &'static str {
    match (stem, variant) {
        ("fwd", "32") => "attention_forward_hs32",
        ("fwd", "64") => "attention_forward_hs64",
        ("fwd", _) => "attention_forward_hs128",
        ("dq", "32") => "attention_backward_dq_hs32",
        ("dq", "64") => "attention_backward_dq_hs64",
        ("dq", _) => "attention_backward_dq_hs128",
        ("dkdv", "32") => "attention_backward_dkdv_hs32",
        ("dkdv", "64") => "attention_backward_dkdv_hs64",
        _ => "attention_backward_dkdv_hs128",
    }
}

fn attention_dims(op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<(usize, [Arg; 4])> {
    if nh == 0 || !c.is_multiple_of(nh) {
        return Err(CudaError::Shape { op, reason: format!("C={c} is not divisible by NH={nh}") });
    }
    Ok((c / nh, [Arg::I(int(op, "B", b)?), Arg::I(int(op, "T", t)?), Arg::I(int(op, "C", c)?), Arg::I(int(op, "NH", nh)?)]))
}

/// CPU: [`crate::backend::cpu::attention::attention_forward`], flash-style: keeps `lse`
/// `(B,NH,T)` instead of the `(B,NH,T,T)` probabilities.
pub fn attention_forward(dev: &CudaDevice, out: View, lse: View, qkv: View, b: usize, t: usize, c: usize, nh: usize) -> Result<()> {
    const OP: &str = "attention_forward";
    let (hs, dims) = attention_dims(OP, b, t, c, nh)?;
    need(OP, "out", out, b * t * c)?;
    need(OP, "lse", lse, b * nh * t)?;
    need(OP, "qkv", qkv, b * t * 3 * c)?;
    let name = kernel_name("fwd", head_variant(OP, hs)?);
    let cfg = LaunchConfig { grid_dim: (t.div_ceil(ATT_ROWS as usize) as u32, (b * nh) as u32, 1), block_dim: (ATT_ROWS, 1, 1), shared_mem_bytes: (2 * ATT_TILE * hs * 4) as u32 };
    let mut args = vec![p(out), p(lse), p(qkv)];
    args.extend(dims);
    dev.launch(name, cfg, &args)
}

/// CPU: [`crate::backend::cpu::attention::attention_backward`]: `dqkv` (overwritten) from
/// `dout`, recomputing probabilities from `lse`; `out` is the forward's output and `delta`
/// scratch of `B·NH·T` floats.
pub fn attention_backward(dev: &CudaDevice, dqkv: View, delta: View, dout: View, qkv: View, out: View, lse: View, b: usize, t: usize, c: usize, nh: usize) -> Result<()> {
    const OP: &str = "attention_backward";
    let (hs, dims) = attention_dims(OP, b, t, c, nh)?;
    for (what, v, len) in
        [("dqkv", dqkv, b * t * 3 * c), ("delta", delta, b * nh * t), ("dout", dout, b * t * c), ("qkv", qkv, b * t * 3 * c), ("out", out, b * t * c), ("lse", lse, b * nh * t)]
    {
        need(OP, what, v, len)?;
    }
    let variant = head_variant(OP, hs)?;
    let mut args = vec![p(delta), p(dout), p(out)];
    args.extend(dims);
    dev.launch("attention_backward_delta", grid_1d(b * nh * t, BLOCK), &args)?;
    let grid = (t.div_ceil(ATT_ROWS as usize) as u32, (b * nh) as u32, 1);
    let mut args = vec![p(dqkv), p(dout), p(qkv), p(lse), p(delta)];
    args.extend(dims);
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (ATT_ROWS, 1, 1), shared_mem_bytes: (2 * ATT_TILE * hs * 4) as u32 };
    dev.launch(kernel_name("dq", variant), cfg, &args)?;
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (ATT_ROWS, 1, 1), shared_mem_bytes: ((2 * ATT_TILE * hs + 2 * ATT_TILE) * 4) as u32 };
    dev.launch(kernel_name("dkdv", variant), cfg, &args)
}

/// CPU: [`crate::backend::cpu::attention::attention_forward_cached`]; `k_cache`, `v_cache`
/// `(maxT, C)` already hold positions `0..pos0 + n`.
pub fn attention_forward_cached(dev: &CudaDevice, out: View, q: View, k_cache: View, v_cache: View, pos0: usize, n: usize, c: usize, nh: usize) -> Result<()> {
    const OP: &str = "attention_forward_cached";
    let (_, _) = attention_dims(OP, 1, n, c, nh)?;
    need(OP, "out", out, n * c)?;
    need(OP, "q", q, n * 3 * c)?;
    need(OP, "k_cache", k_cache, (pos0 + n) * c)?;
    need(OP, "v_cache", v_cache, (pos0 + n) * c)?;
    let cfg = LaunchConfig { grid_dim: (n as u32, nh as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: ((pos0 + n) * 4) as u32 };
    dev.launch(OP, cfg, &[p(out), p(q), p(k_cache), p(v_cache), Arg::I(int(OP, "pos0", pos0)?), Arg::I(int(OP, "n", n)?), Arg::I(int(OP, "C", c)?), Arg::I(int(OP, "NH", nh)?)])
}

/// Writes the keys and values of `n` rows of `qkv` `(n, 3C)` into the caches at `pos0..pos0+n`.
pub fn kv_cache_write(dev: &CudaDevice, k_cache: View, v_cache: View, qkv: View, pos0: usize, n: usize, c: usize) -> Result<()> {
    const OP: &str = "kv_cache_write";
    need(OP, "k_cache", k_cache, (pos0 + n) * c)?;
    need(OP, "v_cache", v_cache, (pos0 + n) * c)?;
    need(OP, "qkv", qkv, n * 3 * c)?;
    dev.launch(OP, grid_1d(n * c, BLOCK), &[p(k_cache), p(v_cache), p(qkv), Arg::I(int(OP, "pos0", pos0)?), Arg::I(int(OP, "n", n)?), Arg::I(int(OP, "C", c)?)])
}

/// CPU: [`crate::backend::cpu::gelu::gelu_forward`].
/// `out` and `out_bf16` as in [`layernorm_forward`].
pub fn gelu_forward(dev: &CudaDevice, out: Option<View>, out_bf16: Option<View>, inp: View, n: usize) -> Result<()> {
    const OP: &str = "gelu_forward";
    need(OP, "inp", inp, n)?;
    let (o, ob) = outputs(OP, out, out_bf16, n)?;
    dev.launch(OP, grid_1d(n, BLOCK), &[o, p(inp), Arg::L(n as i64), ob])
}

/// CPU: [`crate::backend::cpu::gelu::gelu_backward`].
pub fn gelu_backward(dev: &CudaDevice, dinp: View, inp: View, dout: View, n: usize) -> Result<()> {
    for (what, v) in [("dinp", dinp), ("inp", inp), ("dout", dout)] {
        need("gelu_backward", what, v, n)?;
    }
    dev.launch("gelu_backward", grid_1d(n, BLOCK), &[p(dinp), p(inp), p(dout), Arg::L(n as i64)])
}

/// CPU: [`crate::backend::cpu::residual::residual_forward`].
pub fn residual_forward(dev: &CudaDevice, out: View, a: View, b: View, n: usize) -> Result<()> {
    for (what, v) in [("out", out), ("a", a), ("b", b)] {
        need("residual_forward", what, v, n)?;
    }
    dev.launch("residual_forward", grid_1d(n, BLOCK), &[p(out), p(a), p(b), Arg::L(n as i64)])
}

/// Where [`softmax_crossentropy`] puts the logits' gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// The loss only.
    None,
    /// Over the logits, in place (f32).
    InPlace,
    /// Into this bf16 buffer `(N, Vp)`, the logits left as they are: the operand
    /// [`lm_head_backward`] takes as `dlogits_bf16`.
    Bf16(View),
}

/// CPU: [`crate::backend::cpu::crossentropy::softmax_crossentropy`]. `targets` are i32 in
/// `[0, V)` or IGNORE_INDEX (checked by the caller).
pub fn softmax_crossentropy(
    dev: &CudaDevice,
    logits: View,
    losses: View,
    targets: View,
    weights: Option<View>,
    scale: f32,
    n: usize,
    v: usize,
    vp: usize,
    grad: Grad,
) -> Result<()> {
    const OP: &str = "softmax_crossentropy";
    need(OP, "logits", logits, n * vp)?;
    need(OP, "losses", losses, n)?;
    need(OP, "targets", targets, n)?;
    let w = optional(OP, "weights", weights, n)?;
    let out = match grad {
        Grad::Bf16(d) => {
            need(OP, "dlogits_bf16", d, n * vp)?;
            p(d)
        }
        _ => Arg::P(DPtr::NULL),
    };
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    let g = Arg::I((grad != Grad::None) as i32);
    dev.launch(OP, cfg, &[p(logits), p(losses), p(targets), w, Arg::F(scale), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "V", v)?), Arg::I(int(OP, "Vp", vp)?), g, out])
}

/// CPU: the sum [`crate::model::gpt::Gpt::loss`] takes: `acc[0] += Σ w_i·losses[i] / denom`
/// (f64, on the device) over the rows whose target is not ignored.
pub fn loss_sum(dev: &CudaDevice, acc: View, losses: View, targets: View, weights: Option<View>, denom: f32, n: usize) -> Result<()> {
    const OP: &str = "loss_sum";
    need(OP, "acc", acc, 1)?;
    need(OP, "losses", losses, n)?;
    need(OP, "targets", targets, n)?;
    let w = optional(OP, "weights", weights, n)?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    dev.launch(OP, cfg, &[p(acc), p(losses), p(targets), w, Arg::I(int(OP, "N", n)?), Arg::F(denom)])
}

/// Hyper-parameters of one AdamW launch (see [`crate::optim::AdamW::step`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWArgs {
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub decay: f32,
}

/// CPU: [`crate::optim::AdamW::step`] on one span; also refreshes `params_bf16` when given.
pub fn adamw_step(dev: &CudaDevice, params: View, params_bf16: Option<View>, grads: View, m: View, v: View, n: usize, a: AdamWArgs) -> Result<()> {
    for (what, x) in [("params", params), ("grads", grads), ("m", m), ("v", v)] {
        need("adamw_step", what, x, n)?;
    }
    if let Some(pb) = params_bf16 {
        need("adamw_step", "params_bf16", pb, n)?;
    }
    let pb = params_bf16.map_or(Arg::P(DPtr::NULL), p);
    dev.launch(
        "adamw_step",
        grid_1d(n, BLOCK),
        &[p(params), pb, p(grads), p(m), p(v), Arg::L(n as i64), Arg::F(a.step_size), Arg::F(a.bc2_sqrt), Arg::F(a.beta1), Arg::F(a.beta2), Arg::F(a.eps), Arg::F(a.decay)],
    )
}

/// CPU: [`crate::optim::global_norm`]: writes `‖grads‖₂` to `norm[0]` (device), via `partial`
/// (`NORM_BLOCKS` doubles).
pub fn global_norm(dev: &CudaDevice, norm: View, partial: View, grads: View, n: usize) -> Result<()> {
    need("global_norm", "norm", norm, 1)?;
    sum_of_squares(dev, partial, grads, n)?;
    dev.launch("global_norm_finish", LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }, &[p(norm), p(partial), Arg::I(NORM_BLOCKS as i32)])
}

/// CPU: [`crate::optim::sum_of_squares`] in `NORM_BLOCKS` f64 parts: `partial[k]` is block
/// `k`'s `Σ g²` (their sum, in order, is one shard's part of a sharded optimizer's norm).
pub fn sum_of_squares(dev: &CudaDevice, partial: View, grads: View, n: usize) -> Result<()> {
    need("sum_of_squares", "grads", grads, n)?;
    need("sum_of_squares", "partial", partial, NORM_BLOCKS)?;
    let cfg = LaunchConfig { grid_dim: (NORM_BLOCKS as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("global_norm_partial", cfg, &[p(partial), p(grads), Arg::L(n as i64)])
}

/// CPU: [`crate::optim::clip_grad_norm`]'s scaling, reading the norm from the device.
pub fn clip_scale(dev: &CudaDevice, grads: View, norm: View, n: usize, max_norm: f32) -> Result<()> {
    need("clip_scale", "grads", grads, n)?;
    let cfg = LaunchConfig { grid_dim: (NORM_BLOCKS as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("clip_scale", cfg, &[p(grads), Arg::L(n as i64), p(norm), Arg::F(max_norm)])
}

/// CPU: [`crate::phase::reward::ScalarHead::score`] on rows `rows` `(n)` of `hidden` `(N, C)`.
pub fn scalar_head_forward(dev: &CudaDevice, r: View, hidden: View, rows: View, w: View, bias: f32, n: usize, c: usize, hidden_rows: usize) -> Result<()> {
    const OP: &str = "scalar_head_forward";
    need(OP, "r", r, n)?;
    need(OP, "rows", rows, n)?;
    need(OP, "w", w, c)?;
    need(OP, "hidden", hidden, hidden_rows * c)?;
    let warps = BLOCK as usize / 32;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(warps).max(1) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch(OP, cfg, &[p(r), p(hidden), p(rows), p(w), Arg::F(bias), Arg::I(int(OP, "n", n)?), Arg::I(int(OP, "C", c)?)])
}

/// The scalar head's backward (as in [`crate::phase::reward::run_reward`]): `dhidden` rows
/// `rows` set to `dr·w`, `dw[..C] += Σ dr·h`, `dw[C] += Σ dr`. Rows must be distinct and
/// `< hidden_rows` (checked by the caller).
pub fn scalar_head_backward(dev: &CudaDevice, dhidden: View, dw: View, dr: View, hidden: View, rows: View, w: View, n: usize, c: usize, hidden_rows: usize) -> Result<()> {
    const OP: &str = "scalar_head_backward";
    need(OP, "dhidden", dhidden, hidden_rows * c)?;
    need(OP, "hidden", hidden, hidden_rows * c)?;
    need(OP, "dw", dw, c + 1)?;
    need(OP, "dr", dr, n)?;
    need(OP, "rows", rows, n)?;
    need(OP, "w", w, c)?;
    let (ni, ci) = (int(OP, "n", n)?, int(OP, "C", c)?);
    dev.launch("scalar_head_backward_hidden", grid_1d(n * c, BLOCK), &[p(dhidden), p(dr), p(rows), p(w), Arg::I(ni), Arg::I(ci)])?;
    dev.launch("scalar_head_backward_params", grid_1d(c + 1, BLOCK), &[p(dw), p(dr), p(hidden), p(rows), Arg::I(ni), Arg::I(ci)])
}
