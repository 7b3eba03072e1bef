//! The tensor-core attention sections of the selftest (`kernels/flash_attention.cu`): forward
//! and backward against the CPU backend and against the f32 reference kernels of attention.cu,
//! and whole bf16 training steps of a model that runs them.
//!
//! Tolerances, and why (measured on the emulated device at every shape below, small and full):
//! - Against the CPU (f32 inputs): the kernels round Q, K, V and dO to bf16 (relative error up
//!   to 2⁻⁹ each), and P and dS before their products; each output sums many such terms with
//!   independent errors, so the relative L2 error stays near 2⁻⁹: measured 1.5e-3..3.0e-3 for the
//!   output, 2.8e-3..4.2e-3 for dQ, dK, dV. Bound: rel L2 ≤ 1e-2 for both.
//! - Against the reference kernels fed the same bf16-rounded inputs: the scores are then the same
//!   products in f32 (bf16 × bf16 is exact), so the log-sum-exp agrees to f32 summation order
//!   (`1e-4 + 1e-4·|x|`, as the f32 matmul checks; measured max 1.9e-6); the output differs only
//!   by P's rounding (measured rel L2 ≤ 1.2e-3, bound 5e-3) and the gradients by P's and dS's
//!   (measured ≤ 2.3e-3, and 4.0e-3 at T = 1, where the exact dQ and dK cancel to zero and only
//!   rounding is left; bound 1e-2).
//! - The bf16 copies of the output and of dqkv (the next matmul's operand), from the
//!   tensor-core kernels' own stores and from the cast after the reference kernels: bit for bit
//!   the f32 result rounded to nearest even.
//! - Whole steps: as the bf16 whole step of [`super::train`] (losses rel L2 ≤ 1e-2, step-0
//!   gradients ≤ 5e-2 against the CPU), and step-0 gradients ≤ 2e-2 against the same bf16 model
//!   on the reference attention (only attention differs).

use super::ops::{as_f32, bf16_rne};
use super::{BF16, Ctx, Tolerance, compare, pick, randn};
use crate::backend::cpu;
use crate::backend::cuda::device::DevBuf;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::flash::{self, AttentionKernels};
use crate::backend::cuda::matmul::Precision;
use crate::backend::cuda::trainer::CudaTrainer;
use crate::model::config::GptConfig;
use crate::train::Trainer;

const VS_CPU_OUT: Tolerance = Tolerance::RelativeL2 { rel: 1e-2 };
const VS_CPU_GRAD: Tolerance = Tolerance::RelativeL2 { rel: 1e-2 };
const VS_REF_LSE: Tolerance = Tolerance::Elementwise { atol: 1e-4, rtol: 1e-4 };
const VS_REF_OUT: Tolerance = Tolerance::RelativeL2 { rel: 5e-3 };
const VS_REF_GRAD: Tolerance = Tolerance::RelativeL2 { rel: 1e-2 };

/// `len` bf16 NaNs on the device: a copy a kernel failed to write stays NaN.
fn nan_bits(cx: &Ctx<'_, '_>, len: usize) -> Result<DevBuf<u16>> {
    cx.d().upload_new(&vec![0x7fc1u16; len])
}

/// Pushes the check that `copy` (bf16 bits, prefilled with a NaN) holds `f32s` rounded to bf16.
fn check_bf16_copy(cx: &mut Ctx<'_, '_>, name: String, copy: &DevBuf<u16>, f32s: &[f32]) -> Result<()> {
    let want = as_f32(&f32s.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
    let got = cx.d().to_host(copy)?;
    cx.push(compare(name, &as_f32(&got[..f32s.len()]), &want, Tolerance::Exact));
    Ok(())
}

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f32::from_bits((bf16_rne(v) as u32) << 16)).collect()
}

/// Columns `part·C .. (part+1)·C` of every row of `dqkv` `(N, 3C)`: dQ, dK or dV.
fn part(dqkv: &[f32], c: usize, part: usize) -> Vec<f32> {
    dqkv.chunks(3 * c).flat_map(|row| row[part * c..(part + 1) * c].iter().copied()).collect()
}

pub(super) fn attention(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // Both head sizes; T = 1, 37, 129 and 130 leave partial query blocks and key tiles (64 rows),
    // T = 64 and 128 fill them exactly; B·NH from 1 to 4 (the grid's y).
    let small = [(1, 1, 64, 1), (2, 37, 128, 2), (1, 129, 64, 1), (2, 64, 256, 2), (1, 130, 256, 2), (1, 128, 128, 1)];
    let full = [(4, 1024, 768, 12), (2, 512, 1536, 12)];
    for (b, t, c, nh) in pick(cx.shapes, &small, &full) {
        let tag = format!("B={b} T={t} C={c} NH={nh} hs={}", c / nh);
        let (qkv, dout) = (randn(b * t * 3 * c, 51), randn(b * t * c, 52));
        let (mut o, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_forward(&mut o, &mut att, &qkv, b, t, c, nh);
        let (mut dqkv, mut datt) = (vec![0.0; b * t * 3 * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, c, nh);

        // The tensor-core kernels on the f32 inputs.
        let (gq, gdo) = (cx.up(&qkv)?, cx.up(&dout)?);
        let (go, gl, gdq, gdelta) = (cx.out(b * t * c)?, cx.out(b * nh * t)?, cx.out(b * t * 3 * c)?, cx.out(b * nh * t)?);
        let (gob, gdqb) = (nan_bits(cx, b * t * c)?, nan_bits(cx, b * t * 3 * c)?);
        flash::flash_attention_forward(cx.d(), go.all(), Some(gob.all()), gl.all(), gq.all(), b, t, c, nh)?;
        flash::flash_attention_backward(cx.d(), gdq.all(), Some(gdqb.all()), gdelta.all(), gdo.all(), gq.all(), go.all(), gl.all(), b, t, c, nh)?;
        let (out, lse, grad) = (cx.down(&go, b * t * c)?, cx.down(&gl, b * nh * t)?, cx.down(&gdq, b * t * 3 * c)?);
        check_bf16_copy(cx, format!("flash_attention_forward bf16 out {tag}"), &gob, &out)?;
        check_bf16_copy(cx, format!("flash_attention_backward bf16 dqkv {tag}"), &gdqb, &grad)?;

        // The reference kernels on the same inputs rounded to bf16, through the model's call
        // sites (which cast their outputs to the bf16 copies).
        let (qr, dor) = (cx.up(&round_bf16(&qkv))?, cx.up(&round_bf16(&dout))?);
        let (ro, rl, rdq, rdelta) = (cx.out(b * t * c)?, cx.out(b * nh * t)?, cx.out(b * t * 3 * c)?, cx.out(b * nh * t)?);
        let (rob, rdqb) = (nan_bits(cx, b * t * c)?, nan_bits(cx, b * t * 3 * c)?);
        let reference = AttentionKernels::Reference;
        flash::attention_forward(cx.d(), reference, ro.all(), Some(rob.all()), rl.all(), qr.all(), b, t, c, nh)?;
        flash::attention_backward(cx.d(), reference, rdq.all(), Some(rdqb.all()), rdelta.all(), dor.all(), qr.all(), ro.all(), rl.all(), b, t, c, nh)?;
        let (ref_out, ref_lse, ref_grad) = (cx.down(&ro, b * t * c)?, cx.down(&rl, b * nh * t)?, cx.down(&rdq, b * t * 3 * c)?);
        check_bf16_copy(cx, format!("reference attention_forward bf16 out {tag}"), &rob, &ref_out)?;
        check_bf16_copy(cx, format!("reference attention_backward bf16 dqkv {tag}"), &rdqb, &ref_grad)?;

        cx.push(compare(format!("flash_attention_forward out vs CPU {tag}"), &out, &o, VS_CPU_OUT));
        cx.push(compare(format!("flash_attention_forward out vs reference kernels (bf16 inputs) {tag}"), &out, &ref_out, VS_REF_OUT));
        cx.push(compare(format!("flash_attention_forward lse vs reference kernels (bf16 inputs) {tag}"), &lse, &ref_lse, VS_REF_LSE));
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let (got, cpu_want, ref_want) = (part(&grad, c, i), part(&dqkv, c, i), part(&ref_grad, c, i));
            cx.push(compare(format!("flash_attention_backward {name} vs CPU {tag}"), &got, &cpu_want, VS_CPU_GRAD));
            cx.push(compare(format!("flash_attention_backward {name} vs reference kernels (bf16 inputs) {tag}"), &got, &ref_want, VS_REF_GRAD));
        }
    }
    Ok(())
}

/// Three bf16 steps of a model with head size 64 (one head of C = 64), which runs the
/// tensor-core attention, against the CPU trainer; and its step-0 gradients against the same
/// model on the reference attention.
pub(super) fn train_bf16_tensor_core(cx: &mut Ctx<'_, '_>) -> Result<()> {
    let (_, tc, micro) = super::step_setup();
    let cfg = GptConfig::new(300, 32, 2, 1, 64);
    let mut cpu_tr = Trainer::new(cfg.clone(), tc.clone())?;
    let mut gpu_tr = CudaTrainer::new(cx.dev.clone(), cfg.clone(), tc.clone(), Precision::Bf16)?;
    if gpu_tr.model.attention() != AttentionKernels::TensorCore {
        return Err(CudaError::Shape {
            op: "train_bf16_tensor_core",
            reason: format!("a bf16 model of head size 64 runs {:?} attention, not the tensor-core kernels", gpu_tr.model.attention()),
        });
    }
    let mut ref_tr = CudaTrainer::new(cx.dev.clone(), cfg, tc, Precision::Bf16)?;
    ref_tr.model.set_attention(AttentionKernels::Reference)?;
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    for s in 0..3 {
        let a = cpu_tr.train_step(&micro)?;
        let g = gpu_tr.train_step(&micro, None, None)?;
        lc.push(a.loss);
        lg.push(g.loss);
        if s == 0 {
            ref_tr.train_step(&micro, None, None)?;
            let grads = gpu_tr.model.grads_to_host()?;
            cx.push(compare("whole step bf16 tensor-core attention: step 0 clipped gradients vs CPU", &grads, &cpu_tr.model.grads, Tolerance::RelativeL2 { rel: 5e-2 }));
            cx.push(compare(
                "whole step bf16 tensor-core attention: step 0 clipped gradients vs reference attention",
                &grads,
                &ref_tr.model.grads_to_host()?,
                Tolerance::RelativeL2 { rel: 2e-2 },
            ));
        }
    }
    cx.push(compare("whole step bf16 tensor-core attention: losses of steps 0..3 vs CPU", &lg, &lc, BF16));
    cx.push(compare("whole step bf16 tensor-core attention: parameters after 3 steps vs CPU", &gpu_tr.model.params_to_host()?, &cpu_tr.model.params, BF16));
    Ok(())
}
