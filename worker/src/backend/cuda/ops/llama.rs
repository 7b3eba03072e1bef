//! Host wrappers of the llama family's kernels (Llama 2/3, Qwen2): RMSNorm, rotary embeddings,
//! SwiGLU, the position-free token embedding and grouped-query attention. As in [`super`], one
//! function per op with the CPU backend's name and argument order, every operand's length
//! checked against the shapes before the launch.
//!
//! Shapes: N = B·T rows, C channels, I the MLP's intermediate size, NH query heads sharing NKV
//! key/value heads of size hs, Dqkv = (NH + 2·NKV)·hs the fused projection's row.

use super::{ATT_ROWS, ATT_TILE, BLOCK, ROWS_PER_CHUNK, head_variant, int, need, p};
use crate::backend::cpu::gqa_attention::Gqa;
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cuda::device::{Arg, CudaDevice, DevBuf, LaunchConfig, View, grid_1d};
use crate::backend::cuda::error::{CudaError, Result};

/// The largest grid `y` a launch may have (CUDA's limit).
const GRID_Y_MAX: usize = 65_535;

/// Floats the RMSNorm dweight scratch needs for `n` rows of `c` channels.
pub fn rmsnorm_partial_len(n: usize, c: usize) -> usize {
    n.div_ceil(ROWS_PER_CHUNK) * c
}

fn warp_rows(n: usize) -> LaunchConfig {
    let warps = BLOCK as usize / 32;
    LaunchConfig { grid_dim: (n.div_ceil(warps).max(1) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// CPU: [`crate::backend::cpu::rmsnorm::rmsnorm_forward`].
pub fn rmsnorm_forward(dev: &CudaDevice, out: View, rstd: View, inp: View, weight: View, n: usize, c: usize, eps: f32) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    for (what, v, len) in [("out", out, n * c), ("rstd", rstd, n), ("inp", inp, n * c), ("weight", weight, c)] {
        need(OP, what, v, len)?;
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(CudaError::Shape { op: OP, reason: format!("eps = {eps} must be positive and finite") });
    }
    dev.launch(OP, warp_rows(n), &[p(out), p(rstd), p(inp), p(weight), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "C", c)?), Arg::F(eps)])
}

/// CPU: [`crate::backend::cpu::rmsnorm::rmsnorm_backward`]: `dinp +=`, `dweight +=`. `partial` is
/// scratch of [`rmsnorm_partial_len`]`(n, c)` floats.
pub fn rmsnorm_backward(dev: &CudaDevice, dinp: View, dweight: View, dout: View, inp: View, weight: View, rstd: View, partial: View, n: usize, c: usize) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    for (what, v, len) in [
        ("dinp", dinp, n * c),
        ("dweight", dweight, c),
        ("dout", dout, n * c),
        ("inp", inp, n * c),
        ("weight", weight, c),
        ("rstd", rstd, n),
        ("partial", partial, rmsnorm_partial_len(n, c)),
    ] {
        need(OP, what, v, len)?;
    }
    let (ni, ci) = (int(OP, "N", n)?, int(OP, "C", c)?);
    dev.launch("rmsnorm_backward_input", warp_rows(n), &[p(dinp), p(dout), p(inp), p(weight), p(rstd), Arg::I(ni), Arg::I(ci)])?;
    let chunks = n.div_ceil(ROWS_PER_CHUNK);
    if chunks == 0 {
        return Ok(());
    }
    if chunks > GRID_Y_MAX {
        return Err(CudaError::Shape { op: OP, reason: format!("N = {n} needs {chunks} row chunks, more than a grid's {GRID_Y_MAX}") });
    }
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(BLOCK as usize).max(1) as u32, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    dev.launch("rmsnorm_backward_weight_partial", cfg, &[p(partial), p(dout), p(inp), p(rstd), Arg::I(ni), Arg::I(ci), Arg::I(ROWS_PER_CHUNK as i32)])?;
    dev.launch("column_sum_reduce", grid_1d(c, BLOCK), &[p(dweight), p(partial), Arg::I(chunks as i32), Arg::I(ci), Arg::L(c as i64)])
}

/// A [`RopeTable`] on the device: its `cos` and `sin`, `(maxT, hs/2)` each, as the CPU built them
/// from the config's θ (uploaded rather than recomputed, so both backends rotate by the same
/// f32 angles).
#[derive(Debug)]
pub struct RopeTableDev {
    pub cos: DevBuf<f32>,
    pub sin: DevBuf<f32>,
    /// `hs/2`, the pairs per head.
    pub half: usize,
    /// Positions the table holds.
    pub max_t: usize,
}

impl RopeTableDev {
    /// Uploads `table`.
    ///
    /// # Errors
    /// The table is empty or its `cos` and `sin` disagree in length, or an allocation fails.
    pub fn upload(dev: &CudaDevice, table: &RopeTable) -> Result<RopeTableDev> {
        if table.half == 0 || table.cos.len() != table.sin.len() || !table.cos.len().is_multiple_of(table.half) {
            return Err(CudaError::Shape {
                op: "rope table",
                reason: format!("half = {}, {} cos and {} sin values: not a (maxT, half) table", table.half, table.cos.len(), table.sin.len()),
            });
        }
        Ok(RopeTableDev { cos: dev.upload_new(&table.cos)?, sin: dev.upload_new(&table.sin)?, half: table.half, max_t: table.cos.len() / table.half })
    }
}

/// CPU: [`crate::backend::cpu::rope::rope_apply`]: rotates, in place, heads `0..heads` of width
/// `2·half` from column `col0` of `rows` rows of `stride` floats (row `r` at position
/// `pos0 + r % t`); `inverse` rotates by the opposite angle.
pub fn rope_apply(dev: &CudaDevice, x: View, table: &RopeTableDev, rows: usize, t: usize, stride: usize, col0: usize, heads: usize, pos0: usize, inverse: bool) -> Result<()> {
    const OP: &str = "rope_apply";
    let half = table.half;
    need(OP, "x", x, rows * stride)?;
    if col0 + heads * 2 * half > stride {
        return Err(CudaError::Shape { op: OP, reason: format!("{heads} heads of {} from column {col0} do not fit a row of {stride}", 2 * half) });
    }
    if rows > 0 && t == 0 {
        return Err(CudaError::Shape { op: OP, reason: format!("{rows} rows with T = 0") });
    }
    let last = pos0 + t.min(rows);
    if last > table.max_t {
        return Err(CudaError::Shape { op: OP, reason: format!("positions up to {last} but the table holds {}", table.max_t) });
    }
    let args = [
        p(x),
        p(table.cos.all()),
        p(table.sin.all()),
        Arg::I(int(OP, "rows", rows)?),
        Arg::I(int(OP, "T", t)?),
        Arg::I(int(OP, "stride", stride)?),
        Arg::I(int(OP, "col0", col0)?),
        Arg::I(int(OP, "heads", heads)?),
        Arg::I(int(OP, "half", half)?),
        Arg::I(int(OP, "pos0", pos0)?),
        Arg::I(inverse as i32),
    ];
    dev.launch(OP, grid_1d(rows * heads * half, BLOCK), &args)
}

fn rope_heads(op: &'static str, table: &RopeTableDev, hs: usize) -> Result<()> {
    if hs != 2 * table.half {
        return Err(CudaError::Shape { op, reason: format!("head size {hs} but the table is for {}", 2 * table.half) });
    }
    Ok(())
}

/// CPU: [`crate::backend::cpu::rope::rope_forward`]: rotates the queries and keys of the fused
/// `(B·T, Dqkv)` buffer in place; values stay as they are.
pub fn rope_forward(dev: &CudaDevice, qkv: View, table: &RopeTableDev, b: usize, t: usize, nh: usize, nkv: usize, hs: usize, pos0: usize) -> Result<()> {
    rope_heads("rope_forward", table, hs)?;
    rope_apply(dev, qkv, table, b * t, t, (nh + 2 * nkv) * hs, 0, nh + nkv, pos0, false)
}

/// CPU: [`crate::backend::cpu::rope::rope_backward`]: the inverse rotation of the gradient
/// `dqkv`, in place.
pub fn rope_backward(dev: &CudaDevice, dqkv: View, table: &RopeTableDev, b: usize, t: usize, nh: usize, nkv: usize, hs: usize) -> Result<()> {
    rope_heads("rope_backward", table, hs)?;
    rope_apply(dev, dqkv, table, b * t, t, (nh + 2 * nkv) * hs, 0, nh + nkv, 0, true)
}

/// CPU: [`crate::backend::cpu::swiglu::swiglu_forward`]: `out (N, I)` from `inp (N, 2I)`.
pub fn swiglu_forward(dev: &CudaDevice, out: View, inp: View, n: usize, i: usize) -> Result<()> {
    const OP: &str = "swiglu_forward";
    need(OP, "out", out, n * i)?;
    need(OP, "inp", inp, n * 2 * i)?;
    dev.launch(OP, grid_1d(n * i, BLOCK), &[p(out), p(inp), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "I", i)?)])
}

/// CPU: [`crate::backend::cpu::swiglu::swiglu_backward`]: `dinp (N, 2I)` (overwritten).
pub fn swiglu_backward(dev: &CudaDevice, dinp: View, inp: View, dout: View, n: usize, i: usize) -> Result<()> {
    const OP: &str = "swiglu_backward";
    need(OP, "dinp", dinp, n * 2 * i)?;
    need(OP, "inp", inp, n * 2 * i)?;
    need(OP, "dout", dout, n * i)?;
    dev.launch(OP, grid_1d(n * i, BLOCK), &[p(dinp), p(inp), p(dout), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "I", i)?)])
}

/// CPU: [`crate::backend::cpu::embedding::embedding_forward`]. Token ids are checked against V
/// by the caller; `wte` is `(Vp, C)`.
pub fn embedding_forward(dev: &CudaDevice, out: View, inp: View, wte: View, n: usize, c: usize) -> Result<()> {
    const OP: &str = "embedding_forward";
    need(OP, "out", out, n * c)?;
    need(OP, "inp", inp, n)?;
    dev.launch(OP, grid_1d(n * c, BLOCK), &[p(out), p(inp), p(wte), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "C", c)?)])
}

/// CPU: [`crate::backend::cpu::embedding::embedding_backward`]: `dwte[tok] += dout` (by atomics,
/// see embedding.cu).
pub fn embedding_backward(dev: &CudaDevice, dwte: View, dout: View, inp: View, n: usize, c: usize) -> Result<()> {
    const OP: &str = "embedding_backward";
    need(OP, "dout", dout, n * c)?;
    need(OP, "inp", inp, n)?;
    dev.launch(OP, grid_1d(n * c, BLOCK), &[p(dwte), p(dout), p(inp), Arg::I(int(OP, "N", n)?), Arg::I(int(OP, "C", c)?)])
}

fn gqa_kernel(stem: &str, variant: &str) -> &'static str {
    match (stem, variant) {
        ("fwd", "32") => "gqa_attention_forward_hs32",
        ("fwd", "64") => "gqa_attention_forward_hs64",
        ("fwd", _) => "gqa_attention_forward_hs128",
        ("dq", "32") => "gqa_attention_backward_dq_hs32",
        ("dq", "64") => "gqa_attention_backward_dq_hs64",
        ("dq", _) => "gqa_attention_backward_dq_hs128",
        ("dkdv", "32") => "gqa_attention_backward_dkdv_hs32",
        ("dkdv", "64") => "gqa_attention_backward_dkdv_hs64",
        _ => "gqa_attention_backward_dkdv_hs128",
    }
}

/// Checks the head counts and returns the kernels' size arguments `(B, T, NH, NKV, hs)`.
fn gqa_dims(op: &'static str, b: usize, t: usize, s: Gqa) -> Result<[Arg; 5]> {
    if s.nkv == 0 || s.nh == 0 || !s.nh.is_multiple_of(s.nkv) {
        return Err(CudaError::Shape { op, reason: format!("NH = {} is not a positive multiple of NKV = {}", s.nh, s.nkv) });
    }
    if b * s.nh > GRID_Y_MAX {
        return Err(CudaError::Shape { op, reason: format!("B·NH = {} exceeds a grid's {GRID_Y_MAX} block rows", b * s.nh) });
    }
    Ok([Arg::I(int(op, "B", b)?), Arg::I(int(op, "T", t)?), Arg::I(int(op, "NH", s.nh)?), Arg::I(int(op, "NKV", s.nkv)?), Arg::I(int(op, "hs", s.hs)?)])
}

/// CPU: [`crate::backend::cpu::gqa_attention::gqa_forward`], flash-style: keeps `lse`
/// `(B, NH, T)` instead of the `(B, NH, T, T)` probabilities. `qkv` `(B, T, Dqkv)`, `out`
/// `(B, T, NH·hs)`.
pub fn gqa_forward(dev: &CudaDevice, out: View, lse: View, qkv: View, b: usize, t: usize, s: Gqa) -> Result<()> {
    const OP: &str = "gqa_forward";
    let dims = gqa_dims(OP, b, t, s)?;
    if b * t == 0 {
        return Ok(());
    }
    need(OP, "out", out, b * t * s.nh * s.hs)?;
    need(OP, "lse", lse, b * s.nh * t)?;
    need(OP, "qkv", qkv, b * t * s.dqkv())?;
    let name = gqa_kernel("fwd", head_variant(OP, s.hs)?);
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(ATT_ROWS as usize).max(1) as u32, (b * s.nh) as u32, 1),
        block_dim: (ATT_ROWS, 1, 1),
        shared_mem_bytes: (2 * ATT_TILE * s.hs * 4) as u32,
    };
    let mut args = vec![p(out), p(lse), p(qkv)];
    args.extend(dims);
    dev.launch(name, cfg, &args)
}

/// CPU: [`crate::backend::cpu::gqa_attention::gqa_backward`]: `dqkv` (overwritten) from `dout`,
/// recomputing the probabilities from `lse`; `out` is the forward's output and `delta`
/// scratch of `B·NH·T` floats. The key/value gradients of a group's heads are summed by one
/// thread in a fixed order (deterministic).
pub fn gqa_backward(dev: &CudaDevice, dqkv: View, delta: View, dout: View, qkv: View, out: View, lse: View, b: usize, t: usize, s: Gqa) -> Result<()> {
    const OP: &str = "gqa_backward";
    let dims = gqa_dims(OP, b, t, s)?;
    if b * t == 0 {
        return Ok(());
    }
    let (c, d) = (s.nh * s.hs, s.dqkv());
    for (what, v, len) in
        [("dqkv", dqkv, b * t * d), ("delta", delta, b * s.nh * t), ("dout", dout, b * t * c), ("qkv", qkv, b * t * d), ("out", out, b * t * c), ("lse", lse, b * s.nh * t)]
    {
        need(OP, what, v, len)?;
    }
    let variant = head_variant(OP, s.hs)?;
    // The delta kernel reads only out and dout, (B, T, NH·hs) as in GPT-2's attention.
    let delta_args = [p(delta), p(dout), p(out), Arg::I(int(OP, "B", b)?), Arg::I(int(OP, "T", t)?), Arg::I(int(OP, "C", c)?), Arg::I(int(OP, "NH", s.nh)?)];
    dev.launch("attention_backward_delta", grid_1d(b * s.nh * t, BLOCK), &delta_args)?;
    let rows = t.div_ceil(ATT_ROWS as usize).max(1) as u32;
    let mut args = vec![p(dqkv), p(dout), p(qkv), p(lse), p(delta)];
    args.extend(dims);
    let cfg = LaunchConfig { grid_dim: (rows, (b * s.nh) as u32, 1), block_dim: (ATT_ROWS, 1, 1), shared_mem_bytes: (2 * ATT_TILE * s.hs * 4) as u32 };
    dev.launch(gqa_kernel("dq", variant), cfg, &args)?;
    let cfg = LaunchConfig { grid_dim: (rows, (b * s.nkv) as u32, 1), block_dim: (ATT_ROWS, 1, 1), shared_mem_bytes: ((2 * ATT_TILE * s.hs + 2 * ATT_TILE) * 4) as u32 };
    dev.launch(gqa_kernel("dkdv", variant), cfg, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes the kernels cannot run are refused with an error naming the op, before a launch.
    #[test]
    fn bad_shapes_are_refused_before_the_launch() {
        let dev = CudaDevice::emulated().expect("the emulated device opens");
        let buf = dev.alloc::<f32>(4096).expect("a small allocation");
        let x = buf.all();
        let shape_err = |r: Result<()>, op: &str| match r {
            Err(CudaError::Shape { op: o, reason }) => assert_eq!(o, op, "{reason}"),
            other => panic!("{op}: expected a shape error, got {other:?}"),
        };
        shape_err(gqa_forward(&dev, x, x, x, 1, 2, Gqa { nh: 4, nkv: 3, hs: 8 }), "gqa_forward");
        shape_err(gqa_backward(&dev, x, x, x, x, x, x, 1, 2, Gqa { nh: 4, nkv: 0, hs: 8 }), "gqa_backward");
        shape_err(gqa_forward(&dev, x, x, x, 1, 2, Gqa { nh: 4, nkv: 2, hs: 256 }), "gqa_forward");
        shape_err(gqa_forward(&dev, x, x, x, 1, 200, Gqa { nh: 4, nkv: 2, hs: 8 }), "gqa_forward");
        let table = RopeTableDev::upload(&dev, &RopeTable::new(4, 8, 1e4)).expect("a table of 4 positions");
        // Positions 2..6 but the table holds 4.
        shape_err(rope_forward(&dev, x, &table, 1, 4, 4, 2, 8, 2), "rope_apply");
        shape_err(rope_forward(&dev, x, &table, 1, 4, 4, 2, 16, 0), "rope_forward");
        shape_err(rmsnorm_forward(&dev, x, x, x, x, 8, 64, 0.0), "rmsnorm_forward");
        shape_err(swiglu_forward(&dev, x, x, 64, 64), "swiglu_forward");
        assert!(RopeTableDev::upload(&dev, &RopeTable { cos: vec![1.0; 6], sin: vec![0.0; 4], half: 2 }).is_err());
    }
}
