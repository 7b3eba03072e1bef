//! The optimizer, whole-step and NCCL sections of the selftest.

use super::{BF16, Check, Ctx, EW, Tolerance, compare, randn};
use crate::backend::cpu;
use crate::backend::cuda::device::DeviceKind;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::matmul::Precision;
use crate::backend::cuda::model::CudaGpt;
use crate::backend::cuda::ops;
use crate::backend::cuda::trainer::CudaTrainer;
use crate::collective::{Collective, Nccl, NcclOptions};
use crate::model::config::GptConfig;
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::rng::Rng;
use crate::train::{MicroBatch, TrainConfig, Trainer};

/// Relative L2 bound of the bf16 trainer's step-0 gradients against the CPU's f32 ones.
const BF16_GRADS: Tolerance = Tolerance::RelativeL2 { rel: 5e-2 };

/// AdamW (two steps, so the moments are not trivial), global norm and clipping.
pub(super) fn optimizer(cx: &mut Ctx<'_, '_>) -> Result<()> {
    let cfg = GptConfig::new(64, 8, 1, 2, 16);
    let mut model = CudaGpt::new(cx.dev.clone(), cfg, 1, 8, Precision::Bf16)?;
    let layout = model.layout.clone();
    let n = layout.len();
    let (p0, g) = (randn(n, 25), randn(n, 26));
    model.set_params(&p0)?;
    let tc = TrainConfig {
        batch_size: 1,
        seq_len: 8,
        grad_accum: 1,
        schedule: LrSchedule { max_lr: 1e-2, min_lr: 1e-3, warmup_steps: 0, total_steps: 10 },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed: 1,
    };
    let mut tr = CudaTrainer::with_model(model, tc)?;
    let mut opt = AdamW::new(AdamWConfig::default(), &layout);
    let mut p = p0.clone();
    for _ in 0..2 {
        opt.step(&mut p, &g, 1e-2);
        cx.d().upload(&tr.model.grads, 0, &g)?;
        tr.adamw(1e-2)?;
    }
    cx.push(compare(format!("adamw_step x2 params n={n}"), &tr.model.params_to_host()?, &p, EW));
    let (m, v) = tr.moments_to_host()?;
    cx.push(compare(format!("adamw_step x2 m n={n}"), &m, &opt.m, EW));
    cx.push(compare(format!("adamw_step x2 v n={n}"), &v, &opt.v, EW));
    let mut pb = vec![0u16; n];
    cx.d().download(&tr.model.params_bf16, 0, &mut pb)?;
    let got: Vec<f32> = pb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    let params = tr.model.params_to_host()?;
    let want: Vec<f32> = params.iter().map(|&x| f32::from_bits((super::ops::bf16_rne(x) as u32) << 16)).collect();
    cx.push(compare(format!("adamw_step x2 bf16 copy = bf16(params) n={n}"), &got, &want, Tolerance::Exact));
    let mut g2 = g.clone();
    let norm = crate::optim::clip_grad_norm(&mut g2, 1.0);
    let (gg, gn) = (cx.up(&g)?, cx.out(1)?);
    let gp = cx.d().upload_new(&vec![f64::NAN; ops::NORM_BLOCKS])?;
    ops::global_norm(cx.d(), gn.all(), gp.all(), gg.all(), n)?;
    let got = cx.down(&gn, 1)?;
    cx.push(compare(format!("global_norm n={n}"), &got, &[norm], EW));
    ops::clip_scale(cx.d(), gg.all(), gn.all(), n, 1.0)?;
    let got = cx.down(&gg, n)?;
    cx.push(compare(format!("clip_scale n={n}"), &got, &g2, EW));
    Ok(())
}

/// The model, training config and micro-batches of the whole-step sections: 2 layers, C = 64,
/// V = 300 (padded 320), B = 4, T = 32, 2 micro-batches with an ignored target and weights.
pub fn step_setup() -> (GptConfig, TrainConfig, Vec<MicroBatch>) {
    let cfg = GptConfig::new(300, 32, 2, 2, 64);
    let tc = TrainConfig {
        batch_size: 4,
        seq_len: 32,
        grad_accum: 2,
        schedule: LrSchedule { max_lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 10 },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed: 7,
    };
    let mut rng = Rng::new(8);
    let micro = (0..2)
        .map(|_| {
            let toks: Vec<u32> = (0..4 * 32 + 1).map(|_| rng.below(300) as u32).collect();
            let mut targets: Vec<i32> = toks[1..].iter().map(|&x| x as i32).collect();
            targets[3] = cpu::crossentropy::IGNORE_INDEX;
            MicroBatch { inputs: toks[..128].to_vec(), targets, weights: Some((0..128).map(|i| 0.5 + (i % 2) as f32).collect()), b: 4, t: 32 }
        })
        .collect();
    (cfg, tc, micro)
}

/// Three steps of the CUDA trainer at `prec` against the CPU trainer from the same seed:
/// initial weights, step-0 gradients and norm, the losses, and the weights after.
fn whole_step(cx: &mut Ctx<'_, '_>, prec: Precision) -> Result<()> {
    let (cfg, tc, micro) = step_setup();
    let mut cpu_tr = Trainer::new(cfg.clone(), tc.clone())?;
    let mut gpu_tr = CudaTrainer::new(cx.dev.clone(), cfg, tc, prec)?;
    let tag = format!("{prec:?}");
    let (grad_tol, loss_tol, param_tol) = match prec {
        Precision::F32 => (Tolerance::Elementwise { atol: 1e-5, rtol: 1e-3 }, Tolerance::Elementwise { atol: 0.0, rtol: 1e-4 }, Tolerance::Elementwise { atol: 1e-5, rtol: 1e-3 }),
        Precision::Bf16 => (BF16_GRADS, BF16, BF16),
    };
    cx.push(compare(format!("whole step {tag}: initial parameters (same seed)"), &gpu_tr.model.params_to_host()?, &cpu_tr.model.params, Tolerance::Exact));
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    for s in 0..3 {
        let a = cpu_tr.train_step(&micro)?;
        let b = gpu_tr.train_step(&micro, None, None)?;
        lc.push(a.loss);
        lg.push(b.loss);
        if s == 0 {
            cx.push(compare(format!("whole step {tag}: step 0 clipped gradients"), &gpu_tr.model.grads_to_host()?, &cpu_tr.model.grads, grad_tol));
            let norm_tol = if prec == Precision::F32 { Tolerance::Elementwise { atol: 0.0, rtol: 1e-4 } } else { BF16 };
            cx.push(compare(format!("whole step {tag}: step 0 grad norm"), &[b.grad_norm], &[a.grad_norm], norm_tol));
        }
    }
    cx.push(compare(format!("whole step {tag}: losses of steps 0..3"), &lg, &lc, loss_tol));
    cx.push(compare(format!("whole step {tag}: parameters after 3 steps"), &gpu_tr.model.params_to_host()?, &cpu_tr.model.params, param_tol));
    let (m, v) = gpu_tr.moments_to_host()?;
    cx.push(compare(
        format!("whole step {tag}: AdamW m after 3 steps"),
        &m,
        &cpu_tr.opt.m,
        if prec == Precision::F32 { Tolerance::Elementwise { atol: 1e-6, rtol: 1e-2 } } else { BF16_GRADS },
    ));
    cx.push(compare(
        format!("whole step {tag}: AdamW v after 3 steps"),
        &v,
        &cpu_tr.opt.v,
        if prec == Precision::F32 { Tolerance::Elementwise { atol: 1e-9, rtol: 1e-2 } } else { BF16_GRADS },
    ));
    Ok(())
}

pub(super) fn train_f32(cx: &mut Ctx<'_, '_>) -> Result<()> {
    whole_step(cx, Precision::F32)
}

pub(super) fn train_bf16(cx: &mut Ctx<'_, '_>) -> Result<()> {
    whole_step(cx, Precision::Bf16)
}

/// NCCL, world size 1: the sum over one rank is the buffer itself (GPU only).
pub(super) fn nccl(cx: &mut Ctx<'_, '_>) -> Result<()> {
    if cx.dev.kind == DeviceKind::Emulated {
        cx.push(Check::skip("nccl".into(), "NCCL needs a GPU; the emulated device's workers use the TCP ring".into()));
        return Ok(());
    }
    let nccl_err = |op: &'static str| move |e: crate::collective::CollectiveError| CudaError::Nccl { op, status: e.to_string() };
    let mut comm = Nccl::connect(cx.dev.clone(), 0, 1, 0, NcclOptions { bucket_elems: 1000, timeout: std::time::Duration::from_secs(30), ..Default::default() }, |id| {
        id.map(|b| b.to_vec()).ok_or_else(|| "rank 0 has the id".to_string())
    })
    .map_err(nccl_err("connect"))?;
    let x = randn(2500, 27);
    let mut y = x.clone();
    comm.all_reduce_sum(&mut y).map_err(nccl_err("all_reduce_sum"))?;
    cx.push(compare("nccl all_reduce_sum world=1 (3 buckets)", &y, &x, Tolerance::Exact));
    let s = comm.all_reduce_scalar(2.5).map_err(nccl_err("all_reduce_scalar"))?;
    cx.push(compare("nccl all_reduce_scalar world=1", &[s as f32], &[2.5], Tolerance::Exact));
    let g = cx.up(&x)?;
    comm.all_reduce_device(cx.d(), g.all(), x.len())?;
    let got = cx.down(&g, x.len())?;
    cx.push(compare("nccl all_reduce_device world=1", &got, &x, Tolerance::Exact));
    // The overlapped path: two buckets on the side stream, each after its ready mark.
    let g = cx.up(&x)?;
    let halves = [g.view(0, 1200), g.view(1200, x.len() - 1200)];
    for (slot, v) in halves.iter().enumerate() {
        cx.d().mark(slot, &[*v], 4)?;
    }
    let buckets = [(1, vec![1200..1800, 1800..x.len()]), (0, vec![0..500, 500..1200])];
    comm.all_reduce_buckets(cx.d(), g.view(0, x.len()), &buckets, false)?;
    let got = cx.down(&g, x.len())?;
    cx.push(compare("nccl all_reduce_buckets world=1 (side stream, 2 buckets)", &got, &x, Tolerance::Exact));
    // ZeRO-1's halves: reduce to the owner, bucket by bucket, then all-gather.
    for (slot, v) in halves.iter().enumerate() {
        cx.d().mark(slot, &[*v], 4)?;
    }
    comm.all_reduce_buckets(cx.d(), g.view(0, x.len()), &buckets, true)?;
    comm.all_gather_device(cx.d(), g.view(0, x.len()))?;
    let got = cx.down(&g, x.len())?;
    cx.push(compare("nccl reduce to owners + all_gather_device world=1", &got, &x, Tolerance::Exact));
    let mut y = x.clone();
    comm.all_gather(&mut y).map_err(nccl_err("all_gather"))?;
    cx.push(compare("nccl all_gather world=1 (3 buckets)", &y, &x, Tolerance::Exact));
    Ok(())
}
