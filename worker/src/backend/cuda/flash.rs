//! Which attention kernels run, and the host wrappers of the tensor-core ones
//! (`kernels/flash_attention.cu`): FlashAttention-2-style forward and backward with bf16 WMMA
//! operands and f32 accumulation, for head sizes 64 and 128 on sm_80 and later.
//!
//! [`AttentionKernels::Reference`] is `attention.cu` (f32, one thread per row, any head size up
//! to 128): the reference the selftest compares the tensor-core kernels with, the path of
//! [`Precision::F32`] (which checks the model against the CPU), and the fallback where the
//! tensor-core kernels do not apply. Both keep the same buffers: `lse` `(B,NH,T)` from the
//! forward, `dqkv` overwritten by the backward, `delta` `(B,NH,T)` scratch. Both take an
//! optional bf16 copy of their output (`out_bf16`, `dqkv_bf16`), the operand of the matmul that
//! reads it next: the tensor-core kernels write it from the same store as the f32 value, the
//! reference ones are followed by a cast; either way it is the f32 output rounded to nearest even.

use super::device::{Arg, CudaDevice, LaunchConfig, View, grid_1d};
use super::error::{CudaError, Result};
use super::matmul::Precision;
use super::ops;

/// The attention kernels a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// `attention.cu`: f32 throughout, one thread per query (or key) row.
    Reference,
    /// `flash_attention.cu`: tensor cores, bf16 operands, f32 accumulation and softmax.
    TensorCore,
}

/// Head sizes the tensor-core kernels are instantiated for.
pub const TENSOR_CORE_HEAD_SIZES: [usize; 2] = [64, 128];
/// Query (and key) rows per block and per streamed tile; `FA_ROWS` in flash_attention.cu.
const ROWS: usize = 64;
/// Threads per block; `FA_THREADS`.
const THREADS: u32 = 128;
/// The largest dynamic shared memory a block may have without the opt-in attribute.
const SHARED_DEFAULT: u32 = 48 << 10;

impl AttentionKernels {
    /// What a model at `precision` with head size `hs` runs on `dev` unless told otherwise: the
    /// tensor-core kernels for bf16 training where they apply, else the reference.
    pub fn default_for(dev: &CudaDevice, precision: Precision, hs: usize) -> AttentionKernels {
        if precision == Precision::Bf16 && AttentionKernels::TensorCore.check(dev, hs).is_ok() { AttentionKernels::TensorCore } else { AttentionKernels::Reference }
    }

    /// Whether these kernels can run heads of size `hs` on `dev`.
    ///
    /// # Errors
    /// [`CudaError::Shape`] saying why not (head size, or a device before sm_80).
    pub fn check(self, dev: &CudaDevice, hs: usize) -> Result<()> {
        const OP: &str = "attention kernels";
        match self {
            AttentionKernels::Reference if (1..=128).contains(&hs) => Ok(()),
            AttentionKernels::Reference => Err(CudaError::Shape { op: OP, reason: format!("head size {hs} is outside the reference kernels' 1..=128") }),
            AttentionKernels::TensorCore if !TENSOR_CORE_HEAD_SIZES.contains(&hs) => {
                Err(CudaError::Shape { op: OP, reason: format!("head size {hs}: the tensor-core kernels are built for {TENSOR_CORE_HEAD_SIZES:?}") })
            }
            AttentionKernels::TensorCore if dev.capability.0 < 8 => Err(CudaError::Shape {
                op: OP,
                reason: format!("the tensor-core kernels need sm_80 or later (bf16 WMMA); this device is sm_{}{}", dev.capability.0, dev.capability.1),
            }),
            AttentionKernels::TensorCore => Ok(()),
        }
    }
}

impl std::str::FromStr for AttentionKernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "reference" => Ok(AttentionKernels::Reference),
            "tensor-core" => Ok(AttentionKernels::TensorCore),
            other => Err(format!("attention kernels {other}: expected reference or tensor-core")),
        }
    }
}

/// Dynamic shared memory of the three kernels at head size `hs`: `(forward, dq, dkdv)` bytes,
/// from the layouts of flash_attention.cu (`fa_forward_smem` and friends, which check it).
pub fn shared_bytes(hs: usize) -> (u32, u32, u32) {
    let tile = ROWS * (hs + 8) * 2;
    let (s, p, idx, rows) = (4 * 16 * 68 * 4, 4 * 16 * 72 * 2, 256 * 4, 64 * 4);
    let fwd = tile.max(s) + 2 * tile + p + rows + idx;
    let dq = 4 * tile + p + 2 * rows + idx;
    let dkdv = 4 * tile + 2 * p + 2 * rows + idx;
    (fwd as u32, dq as u32, dkdv as u32)
}

fn names(hs: usize) -> (&'static str, &'static str, &'static str) {
    if hs == 64 {
        ("flash_attention_forward_hs64", "flash_attention_backward_dq_hs64", "flash_attention_backward_dkdv_hs64")
    } else {
        ("flash_attention_forward_hs128", "flash_attention_backward_dq_hs128", "flash_attention_backward_dkdv_hs128")
    }
}

/// `(hs, grid)` of a tensor-core launch, after checking the shape.
fn dims(op: &'static str, dev: &CudaDevice, b: usize, t: usize, c: usize, nh: usize) -> Result<(usize, (u32, u32, u32))> {
    if nh == 0 || !c.is_multiple_of(nh) {
        return Err(CudaError::Shape { op, reason: format!("C={c} is not divisible by NH={nh}") });
    }
    let hs = c / nh;
    AttentionKernels::TensorCore.check(dev, hs).map_err(|e| CudaError::Shape { op, reason: e.to_string() })?;
    let heads = u32::try_from(b * nh)
        .ok()
        .filter(|&n| (1..=65_535).contains(&n))
        .ok_or_else(|| CudaError::Shape { op, reason: format!("B·NH = {} must be in 1..=65535 (grid y)", b * nh) })?;
    if t == 0 || i32::try_from(3 * c).is_err() || i32::try_from(t).is_err() {
        return Err(CudaError::Shape { op, reason: format!("T={t}, C={c}: need T >= 1 and 3C, T within a 32-bit int") });
    }
    Ok((hs, (t.div_ceil(ROWS) as u32, heads, 1)))
}

/// Raises `kernel`'s dynamic shared memory limit when it needs more than the default.
fn launch_with_shared(dev: &CudaDevice, kernel: &'static str, grid: (u32, u32, u32), bytes: u32, args: &[Arg]) -> Result<()> {
    if bytes > SHARED_DEFAULT {
        dev.set_max_dynamic_shared(kernel, bytes)?;
    }
    dev.launch(kernel, LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: bytes }, args)
}

fn need(op: &'static str, what: &str, v: View, n: usize) -> Result<()> {
    if v.len < n {
        return Err(CudaError::Shape { op, reason: format!("{what} holds {} elements, the shape needs {n}", v.len) });
    }
    Ok(())
}

/// The tensor-core forward: `out` `(B,T,C)` (and its bf16 copy `out_bf16`, `(B,T,C)` bf16
/// bits, when given) and `lse` `(B,NH,T)` from `qkv` `(B,T,3C)`.
/// CPU: [`crate::backend::cpu::attention::attention_forward`] (which keeps the probabilities).
pub fn flash_attention_forward(dev: &CudaDevice, out: View, out_bf16: Option<View>, lse: View, qkv: View, b: usize, t: usize, c: usize, nh: usize) -> Result<()> {
    const OP: &str = "flash_attention_forward";
    let (hs, grid) = dims(OP, dev, b, t, c, nh)?;
    need(OP, "out", out, b * t * c)?;
    need(OP, "lse", lse, b * nh * t)?;
    need(OP, "qkv", qkv, b * t * 3 * c)?;
    let ob = ops::optional(OP, "out_bf16", out_bf16, b * t * c)?;
    let (bytes, _, _) = shared_bytes(hs);
    let args = [Arg::P(out.ptr), Arg::P(lse.ptr), Arg::P(qkv.ptr), Arg::I(t as i32), Arg::I(c as i32), Arg::I(nh as i32), Arg::I(bytes as i32), ob];
    launch_with_shared(dev, names(hs).0, grid, bytes, &args)
}

/// The tensor-core backward: `dqkv` `(B,T,3C)` (overwritten; and its bf16 copy `dqkv_bf16`
/// when given) from `dout` `(B,T,C)`, with `out` and `lse` from the forward; `delta` is scratch
/// of `B·NH·T` floats. CPU: [`crate::backend::cpu::attention::attention_backward`].
pub fn flash_attention_backward(
    dev: &CudaDevice,
    dqkv: View,
    dqkv_bf16: Option<View>,
    delta: View,
    dout: View,
    qkv: View,
    out: View,
    lse: View,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    const OP: &str = "flash_attention_backward";
    let (hs, grid) = dims(OP, dev, b, t, c, nh)?;
    for (what, v, len) in
        [("dqkv", dqkv, b * t * 3 * c), ("delta", delta, b * nh * t), ("dout", dout, b * t * c), ("qkv", qkv, b * t * 3 * c), ("out", out, b * t * c), ("lse", lse, b * nh * t)]
    {
        need(OP, what, v, len)?;
    }
    let gb = ops::optional(OP, "dqkv_bf16", dqkv_bf16, b * t * 3 * c)?;
    let (ti, ci, nhi) = (Arg::I(t as i32), Arg::I(c as i32), Arg::I(nh as i32));
    dev.launch("attention_backward_delta", grid_1d(b * nh * t, 256), &[Arg::P(delta.ptr), Arg::P(dout.ptr), Arg::P(out.ptr), Arg::I(b as i32), ti, ci, nhi])?;
    let (_, dq_bytes, dkdv_bytes) = shared_bytes(hs);
    let (_, dq, dkdv) = names(hs);
    let args = |bytes: u32| [Arg::P(dqkv.ptr), Arg::P(dout.ptr), Arg::P(qkv.ptr), Arg::P(lse.ptr), Arg::P(delta.ptr), ti, ci, nhi, Arg::I(bytes as i32), gb];
    launch_with_shared(dev, dkdv, grid, dkdv_bytes, &args(dkdv_bytes))?;
    launch_with_shared(dev, dq, grid, dq_bytes, &args(dq_bytes))
}

/// The forward with the chosen kernels (the model's one call site); `out_bf16` as in
/// [`flash_attention_forward`], cast after the reference kernels.
pub fn attention_forward(
    dev: &CudaDevice,
    kernels: AttentionKernels,
    out: View,
    out_bf16: Option<View>,
    lse: View,
    qkv: View,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    match kernels {
        AttentionKernels::Reference => {
            ops::attention_forward(dev, out, lse, qkv, b, t, c, nh)?;
            out_bf16.map_or(Ok(()), |ob| ops::cast_to_bf16(dev, ob, out, b * t * c))
        }
        AttentionKernels::TensorCore => flash_attention_forward(dev, out, out_bf16, lse, qkv, b, t, c, nh),
    }
}

/// The backward with the chosen kernels (the model's one call site); `dqkv_bf16` as in
/// [`flash_attention_backward`], cast after the reference kernels.
pub fn attention_backward(
    dev: &CudaDevice,
    kernels: AttentionKernels,
    dqkv: View,
    dqkv_bf16: Option<View>,
    delta: View,
    dout: View,
    qkv: View,
    out: View,
    lse: View,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    match kernels {
        AttentionKernels::Reference => {
            ops::attention_backward(dev, dqkv, delta, dout, qkv, out, lse, b, t, c, nh)?;
            dqkv_bf16.map_or(Ok(()), |gb| ops::cast_to_bf16(dev, gb, dqkv, b * t * 3 * c))
        }
        AttentionKernels::TensorCore => flash_attention_backward(dev, dqkv, dqkv_bf16, delta, dout, qkv, out, lse, b, t, c, nh),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_layouts() {
        // The figures written at the top of flash_attention.cu.
        assert_eq!(shared_bytes(64), (46_336, 47_616, 56_832));
        assert_eq!(shared_bytes(128), (62_720, 80_384, 89_600));
        for hs in TENSOR_CORE_HEAD_SIZES {
            let (f, q, k) = shared_bytes(hs);
            assert!(f.max(q).max(k) <= 232_448, "within sm_90's 227 KiB opt-in");
        }
    }

    #[test]
    fn kernels_parse() {
        assert_eq!("tensor-core".parse::<AttentionKernels>(), Ok(AttentionKernels::TensorCore));
        assert_eq!("reference".parse::<AttentionKernels>(), Ok(AttentionKernels::Reference));
        assert!("flash".parse::<AttentionKernels>().is_err());
    }
}
