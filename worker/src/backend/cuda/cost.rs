//! The work of each op of the CUDA GPT-2 step, for the roofline column of
//! `liandan bench train --profile` ([`crate::model::profile::Cost`]).
//!
//! FLOPs count the math an op must do (a multiply-add is 2), not what a kernel recomputes: the
//! attention backward is 4 products of `T × T × hs` halved by the causal mask, although the
//! kernels recompute the scores in each of their two passes. Bytes count each operand read
//! once and each result written once, in the element types the wrapper uses (an output a bf16
//! model keeps as f32 and bf16 counts both). A bf16 matmul's bound is the gemm's own traffic
//! (bf16 operands and weights, f32 output): where the op still casts an f32 operand first (the
//! MLP's `dfch`), that cast shows as time above the bound. Element-wise FLOP counts are rough (a
//! `tanh` as a few); those ops are memory-bound by far, so their roofline is their bytes.

use super::device::View;
use super::matmul::Precision;
use super::ops::Grad;
use crate::model::profile::Cost;

/// Bytes of an f32.
const F32: f64 = 4.0;

fn operand_bytes(prec: Precision) -> f64 {
    match prec {
        Precision::Bf16 => 2.0,
        Precision::F32 => 4.0,
    }
}

/// Bytes a gemm reads of an activation operand of `len` elements it reads `reads` times.
fn activation(prec: Precision, len: f64, reads: f64) -> f64 {
    reads * len * operand_bytes(prec)
}

/// `n` elements of each of `reads` f32 inputs read and `writes` f32 outputs written, with
/// `flops` per element.
pub fn elementwise(n: usize, reads: usize, writes: usize, flops: f64) -> Cost {
    let n = n as f64;
    Cost::new(flops * n, n * (reads + writes) as f64 * F32)
}

/// `out(N,OC) = inp(N,K)·w(K,OC) + bias`.
pub fn matmul_forward(prec: Precision, n: usize, k: usize, oc: usize, bias: bool) -> Cost {
    let (n, k, oc) = (n as f64, k as f64, oc as f64);
    let b = if bias { oc * F32 + n * oc } else { 0.0 };
    Cost::new(2.0 * n * k * oc + if bias { n * oc } else { 0.0 }, activation(prec, n * k, 1.0) + k * oc * operand_bytes(prec) + n * oc * F32 + b)
}

/// `dinp = dout·wᵀ`, `dw += inpᵀ·dout`, `dbias += Σ_rows dout`.
pub fn matmul_backward(prec: Precision, n: usize, k: usize, oc: usize, bias: bool) -> Cost {
    let (n, k, oc) = (n as f64, k as f64, oc as f64);
    // The bias gradient is summed as the dW gemm reads dout (its BGRADA epilogue): only the
    // vector itself is extra traffic.
    let db = if bias { Cost::new(n * oc, 2.0 * oc * F32) } else { Cost::default() };
    // dout feeds both gemms; inp only the weight gradient; dw is read and written (accumulated).
    let bytes = activation(prec, n * oc, 2.0) + activation(prec, n * k, 1.0) + k * oc * operand_bytes(prec) + n * k * F32 + 2.0 * k * oc * F32;
    Cost::new(4.0 * n * k * oc, bytes) + db
}

/// [`matmul_forward`] then GELU: at f32 in the gemm's epilogue (GELU's input written too); at
/// bf16 by `gelu_forward`, which reads GELU's input and writes the output as bf16 only.
pub fn matmul_forward_gelu(prec: Precision, n: usize, k: usize, oc: usize) -> Cost {
    let gelu = match prec {
        Precision::F32 => elementwise(n * oc, 0, 1, 10.0),
        Precision::Bf16 => Cost::new(10.0 * (n * oc) as f64, (n * oc) as f64 * (F32 + 2.0)),
    };
    matmul_forward(prec, n, k, oc, true) + gelu
}

/// [`matmul_backward`] with GELU's backward in the input gradient's epilogue: GELU's input read.
pub fn matmul_backward_gelu(prec: Precision, n: usize, k: usize, oc: usize) -> Cost {
    matmul_backward(prec, n, k, oc, true) + elementwise(n * k, 1, 0, 16.0)
}

/// Bytes per element of an output written to the f32 and bf16 views given.
pub fn written(f32s: Option<View>, bf16: Option<View>) -> f64 {
    f32s.map_or(0.0, |_| F32) + bf16.map_or(0.0, |_| 2.0)
}

/// Causal attention forward: `S = Q·Kᵀ`, softmax, `O = P·V`, over `B·NH` heads; `out_bytes`
/// per output element ([`written`]).
pub fn attention_forward(b: usize, t: usize, c: usize, nh: usize, out_bytes: f64) -> Cost {
    let (n, t_, c_) = ((b * t) as f64, t as f64, c as f64);
    let pairs = (b * nh) as f64 * t_ * (t_ + 1.0) / 2.0;
    let hs = c_ / nh as f64;
    // Two products of 2·hs FLOPs per visible (query, key) pair, plus a few for the softmax.
    Cost::new(pairs * (4.0 * hs + 5.0), n * 3.0 * c_ * F32 + n * c_ * out_bytes + (b * nh * t) as f64 * F32)
}

/// Causal attention backward: `dP = dO·Vᵀ`, `dS`, `dV = Pᵀ·dO`, `dQ = dS·K`, `dK = dSᵀ·Q` (the
/// kernels also recompute the scores, which is not counted); `dqkv_bytes` per element of dqkv.
pub fn attention_backward(b: usize, t: usize, c: usize, nh: usize, dqkv_bytes: f64) -> Cost {
    let (n, t_, c_) = ((b * t) as f64, t as f64, c as f64);
    let pairs = (b * nh) as f64 * t_ * (t_ + 1.0) / 2.0;
    let hs = c_ / nh as f64;
    let rows = (b * nh * t) as f64;
    // Reads qkv, out and dout; writes dqkv; lse and delta per row (delta written then read).
    Cost::new(pairs * (8.0 * hs + 8.0) + n * c_ * 2.0, n * (3.0 + 1.0 + 1.0) * c_ * F32 + n * 3.0 * c_ * dqkv_bytes + 3.0 * rows * F32)
}

/// LayerNorm forward over `n` rows of `c`; `out_bytes` per output element (4 for f32, 2 for
/// a bf16 model's inner LayerNorms, 6 for both).
pub fn layernorm_forward(n: usize, c: usize, out_bytes: f64) -> Cost {
    Cost::new(8.0 * (n * c) as f64, (n * c + 2 * c + 2 * n) as f64 * F32 + (n * c) as f64 * out_bytes)
}

/// The fused residual add + LayerNorm: reads `a`, `b`; writes the residual and the norm
/// (`out_bytes` as in [`layernorm_forward`]).
pub fn residual_layernorm_forward(n: usize, c: usize, out_bytes: f64) -> Cost {
    Cost::new(9.0 * (n * c) as f64, (3 * n * c + 2 * c + 2 * n) as f64 * F32 + (n * c) as f64 * out_bytes)
}

/// LayerNorm backward: `dinp` accumulated, `dweight`, `dbias` from row chunks.
pub fn layernorm_backward(n: usize, c: usize) -> Cost {
    // Reads dout, inp, dinp; writes dinp; the parameter half reads dout and inp again.
    Cost::new(16.0 * (n * c) as f64, (6 * n * c + 4 * c + 2 * n) as f64 * F32)
}

/// Token + position embedding of `b·t` tokens.
pub fn encoder_forward(b: usize, t: usize, c: usize) -> Cost {
    let n = b * t;
    Cost::new((n * c) as f64, (2 * n * c + t * c + n) as f64 * F32)
}

/// The embeddings' gradients: `dwpe` summed over the batch, `dwte` rows accumulated.
pub fn encoder_backward(b: usize, t: usize, c: usize) -> Cost {
    let n = b * t;
    Cost::new(2.0 * (n * c) as f64, (n * c + 2 * t * c + 2 * n * c + n) as f64 * F32)
}

/// `logits(N,Vp) = x(N,C)·wteᵀ`.
pub fn lm_head_forward(prec: Precision, n: usize, c: usize, vp: usize) -> Cost {
    matmul_forward(prec, n, c, vp, false)
}

/// `dx = dlogits·wte`, `dwte += dlogitsᵀ·x`.
pub fn lm_head_backward(prec: Precision, n: usize, c: usize, vp: usize) -> Cost {
    matmul_backward(prec, n, c, vp, false)
}

/// Softmax + cross-entropy over `n` rows of `v` real logits (of `vp`): the f32 logits read, the
/// gradient written over them (f32) or to a bf16 buffer, or not at all.
pub fn softmax_crossentropy(n: usize, v: usize, vp: usize, grad: Grad) -> Cost {
    let grad_bytes = match grad {
        Grad::None => 0.0,
        Grad::InPlace => F32,
        Grad::Bf16(_) => 2.0,
    };
    Cost::new(5.0 * (n * v) as f64, (n * vp) as f64 * (F32 + grad_bytes) + (3 * n) as f64 * F32)
}

/// AdamW over `p` parameters: reads params, grads, m, v; writes params, m, v (f32; with bf16
/// matmuls the bf16 copy it also writes, 2 bytes a parameter, is not counted).
pub fn adamw(p: usize) -> Cost {
    Cost::new(14.0 * p as f64, 7.0 * F32 * p as f64)
}

/// The gradients' global norm, and the clip (a read and a write of every gradient) when on.
pub fn global_norm(p: usize, clip: bool) -> Cost {
    let (flops, bytes) = if clip { (3.0, 3.0 * F32) } else { (2.0, F32) };
    Cost::new(flops * p as f64, bytes * p as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_step_flops_match_the_six_n_rule() {
        // GPT-2 124M at B=8, T=1024: forward + backward matmul FLOPs (without attention) are
        // 6·N_matmul per token, N_matmul the matmul weights (layers' qkv, proj, fc, fcproj + wte).
        let (b, t, c, l, vp) = (8usize, 1024usize, 768usize, 12usize, 50304usize);
        let n = b * t;
        let mut flops = 0.0;
        for (k, oc) in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] {
            flops += l as f64 * (matmul_forward(Precision::Bf16, n, k, oc, false).flops + matmul_backward(Precision::Bf16, n, k, oc, false).flops);
        }
        flops += lm_head_forward(Precision::Bf16, n, c, vp).flops + lm_head_backward(Precision::Bf16, n, c, vp).flops;
        let weights = (l * 12 * c * c + vp * c) as f64;
        assert!((flops / (6.0 * weights * n as f64) - 1.0).abs() < 1e-12);
        // Attention: the usual 6·L·C·T per token is 2 products × 2 FLOPs × 3 (forward +
        // backward) over the T/2 keys a query sees on average; the count here adds the softmax
        // and the diagonal, under 3%.
        let att = l as f64 * (attention_forward(b, t, c, 12, F32).flops + attention_backward(b, t, c, 12, F32).flops);
        let ratio = att / (6.0 * (l * c * t) as f64 * n as f64);
        assert!((1.0..1.03).contains(&ratio), "{ratio}");
    }

    #[test]
    fn bf16_operands_halve_the_gemm_operand_bytes_and_bf16_outputs_count_their_bytes() {
        let f = matmul_forward(Precision::F32, 1024, 768, 3072, true);
        let h = matmul_forward(Precision::Bf16, 1024, 768, 3072, true);
        assert_eq!(f.flops, h.flops);
        // Weights and the activation operand halve; the f32 output does not.
        let diff = f.bytes - h.bytes;
        assert_eq!(diff, 768.0 * 3072.0 * 2.0 + 1024.0 * 768.0 * 2.0);
        // A bf16-only LayerNorm output saves 2 bytes per element; a bf16 copy adds 2.
        assert_eq!(layernorm_forward(10, 8, F32).bytes - layernorm_forward(10, 8, 2.0).bytes, 160.0);
        assert_eq!(attention_forward(1, 4, 8, 2, F32 + 2.0).bytes - attention_forward(1, 4, 8, 2, F32).bytes, 64.0);
    }
}
