//! `liandan selftest --device cuda`: every kernel's forward and backward against the CPU backend
//! at several shapes (odd sizes for edge tiles, GPT-2 sizes for the real ones), a whole training
//! step against the CPU trainer, and an NCCL all-reduce of world size 1.
//!
//! Tolerances, and why:
//! - f32 element-wise ops (encoder, GELU, residual, LayerNorm, softmax/CE, AdamW, head): the GPU
//!   uses libdevice `expf`/`tanhf` and another summation order than the CPU's vectorised
//!   polynomials; both are within ~1e-6 relative of exact, so `1e-5 + 1e-4·|x|` covers them.
//! - f32 matmuls and attention: dot products of length K in another order; error grows like
//!   √K·ε·|x|, so `1e-4 + 1e-3·|x|` up to K = 3072.
//! - bf16 matmuls: inputs rounded to 8 bits of mantissa (relative 2⁻⁹), so the result is
//!   compared by relative L2 error, ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-2.
//! - whole step (f32): losses to 1e-4 relative, gradients to `1e-5 + 1e-3·|g|` (the embedding
//!   gradient sums repeated tokens with atomics, in another order than the CPU).

use std::sync::Arc;

use crate::backend::cpu;
use crate::collective::{Collective, Nccl, NcclOptions};
use crate::model::config::GptConfig;
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::rng::Rng;
use crate::train::{MicroBatch, TrainConfig, Trainer};

use super::device::CudaDevice;
use super::error::Result;
use super::matmul::Precision;
use super::model::CudaGpt;
use super::ops::{self, Bf16Scratch};
use super::trainer::CudaTrainer;

/// How one comparison is judged.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Every element: `|gpu − cpu| <= atol + rtol·|cpu|`.
    Elementwise { atol: f32, rtol: f32 },
    /// `‖gpu − cpu‖₂ / ‖cpu‖₂ <= rel`.
    RelativeL2 { rel: f64 },
}

/// The outcome of one comparison.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    pub tolerance: Tolerance,
    pub pass: bool,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tol = match self.tolerance {
            Tolerance::Elementwise { atol, rtol } => format!("|err| <= {atol:e} + {rtol:e}·|x|"),
            Tolerance::RelativeL2 { rel } => format!("rel L2 <= {rel:e}"),
        };
        write!(f, "{} {:<48} max|err| {:.3e}  rel L2 {:.3e}  ({tol})", if self.pass { "PASS" } else { "FAIL" }, self.name, self.max_abs_err, self.rel_l2_err)
    }
}

/// Compares `got` with `want` under `tol`.
pub fn compare(name: impl Into<String>, got: &[f32], want: &[f32], tol: Tolerance) -> Check {
    let mut max_abs = 0.0f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut elementwise_ok = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        let e = (g as f64 - w as f64).abs();
        max_abs = max_abs.max(if e.is_nan() { f64::INFINITY } else { e });
        num += e * e;
        den += w as f64 * w as f64;
        if let Tolerance::Elementwise { atol, rtol } = tol {
            elementwise_ok &= e <= (atol + rtol * w.abs()) as f64;
        }
    }
    let rel = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    let pass = match tol {
        Tolerance::Elementwise { .. } => elementwise_ok,
        Tolerance::RelativeL2 { rel: r } => got.len() == want.len() && rel <= r,
    };
    Check { name: name.into(), max_abs_err: max_abs, rel_l2_err: rel, tolerance: tol, pass }
}

const EW: Tolerance = Tolerance::Elementwise { atol: 1e-5, rtol: 1e-4 };
const MM: Tolerance = Tolerance::Elementwise { atol: 1e-4, rtol: 1e-3 };
const BF16: Tolerance = Tolerance::RelativeL2 { rel: 1e-2 };

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// Runs every check, calling `report` after each; returns them all.
///
/// # Errors
/// A CUDA failure (launch, copy, allocation); a numeric mismatch is a failed [`Check`], not an error.
pub fn run(dev: &Arc<CudaDevice>, report: &mut dyn FnMut(&Check)) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let mut push = |c: Check, out: &mut Vec<Check>| {
        report(&c);
        out.push(c);
    };
    let d = &**dev;
    let up = |x: &[f32]| d.upload_new(x);
    let down = |b: &super::device::DevBuf<f32>, n: usize| -> Result<Vec<f32>> {
        let mut v = vec![0.0; n];
        d.download(b, 0, &mut v)?;
        Ok(v)
    };

    // Encoder.
    for &(b, t, c, vp) in &[(1, 1, 8, 16), (2, 7, 16, 32), (4, 64, 768, 50304)] {
        let mut r = Rng::new(1);
        let inp: Vec<u32> = (0..b * t).map(|_| r.below(vp as u64 - 1) as u32).collect();
        let (wte, wpe, dout) = (randn(vp * c, 2), randn(t * c, 3), randn(b * t * c, 4));
        let mut want = vec![0.0; b * t * c];
        cpu::encoder::encoder_forward(&mut want, &inp, &wte, &wpe, b, t, c, 0);
        let (gi, gwte, gwpe, gout) = (d.upload_new(&inp)?, up(&wte)?, up(&wpe)?, d.alloc::<f32>(b * t * c)?);
        ops::encoder_forward(d, gout.all(), gi.all(), gwte.all(), gwpe.all(), b, t, c, 0)?;
        push(compare(format!("encoder_forward B={b} T={t} C={c}"), &down(&gout, b * t * c)?, &want, EW), &mut out);
        let (mut dwte, mut dwpe) = (vec![0.5; vp * c], vec![0.25; t * c]);
        cpu::encoder::encoder_backward(&mut dwte, &mut dwpe, &dout, &inp, b, t, c);
        let (gdwte, gdwpe, gdout) = (up(&vec![0.5; vp * c])?, up(&vec![0.25; t * c])?, up(&dout)?);
        ops::encoder_backward(d, gdwte.all(), gdwpe.all(), gdout.all(), gi.all(), b, t, c)?;
        push(compare(format!("encoder_backward dwte B={b} T={t} C={c}"), &down(&gdwte, vp * c)?, &dwte, EW), &mut out);
        push(compare(format!("encoder_backward dwpe B={b} T={t} C={c}"), &down(&gdwpe, t * c)?, &dwpe, EW), &mut out);
    }

    // LayerNorm.
    for &(n, c) in &[(1, 8), (37, 64), (512, 768)] {
        let (x, w, bias, dout) = (randn(n * c, 5), randn(c, 6), randn(c, 7), randn(n * c, 8));
        let (mut o, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        cpu::layernorm::layernorm_forward(&mut o, &mut m, &mut s, &x, &w, &bias, n, c);
        let (gx, gw, gb, go, gm, gs) = (up(&x)?, up(&w)?, up(&bias)?, d.alloc::<f32>(n * c)?, d.alloc::<f32>(n)?, d.alloc::<f32>(n)?);
        ops::layernorm_forward(d, go.all(), gm.all(), gs.all(), gx.all(), gw.all(), gb.all(), n, c)?;
        push(compare(format!("layernorm_forward N={n} C={c}"), &down(&go, n * c)?, &o, EW), &mut out);
        let (mut di, mut dw, mut db) = (vec![0.1; n * c], vec![0.2; c], vec![0.3; c]);
        cpu::layernorm::layernorm_backward(&mut di, &mut dw, &mut db, &dout, &x, &w, &m, &s, n, c);
        let (gdi, gdw, gdb, gdo, part) = (up(&vec![0.1; n * c])?, up(&vec![0.2; c])?, up(&vec![0.3; c])?, up(&dout)?, d.alloc::<f32>(ops::partial_len(n, c))?);
        ops::layernorm_backward(d, gdi.all(), gdw.all(), gdb.all(), gdo.all(), gx.all(), gw.all(), gm.all(), gs.all(), part.all(), n, c)?;
        push(compare(format!("layernorm_backward dinp N={n} C={c}"), &down(&gdi, n * c)?, &di, MM), &mut out);
        push(compare(format!("layernorm_backward dweight N={n} C={c}"), &down(&gdw, c)?, &dw, MM), &mut out);
        push(compare(format!("layernorm_backward dbias N={n} C={c}"), &down(&gdb, c)?, &db, MM), &mut out);
    }

    // GELU and residual.
    for &n in &[1usize, 1000, 1 << 20] {
        let (x, g, y) = (randn(n, 9), randn(n, 10), randn(n, 11));
        let mut o = vec![0.0; n];
        cpu::gelu::gelu_forward(&mut o, &x);
        let (gx, gg, gy, go) = (up(&x)?, up(&g)?, up(&y)?, d.alloc::<f32>(n)?);
        ops::gelu_forward(d, go.all(), gx.all(), n)?;
        push(compare(format!("gelu_forward n={n}"), &down(&go, n)?, &o, EW), &mut out);
        cpu::gelu::gelu_backward(&mut o, &x, &g);
        ops::gelu_backward(d, go.all(), gx.all(), gg.all(), n)?;
        push(compare(format!("gelu_backward n={n}"), &down(&go, n)?, &o, EW), &mut out);
        cpu::residual::residual_forward(&mut o, &x, &y);
        ops::residual_forward(d, go.all(), gx.all(), gy.all(), n)?;
        push(compare(format!("residual_forward n={n}"), &down(&go, n)?, &o, EW), &mut out);
    }

    // Matmul (+ bias), both precisions.
    for &(n, c, oc) in &[(7, 13, 5), (64, 32, 96), (256, 768, 2304)] {
        let (x, w, bias, dout) = (randn(n * c, 12), randn(c * oc, 13), randn(oc, 14), randn(n * oc, 15));
        let mut o = vec![0.0; n * oc];
        cpu::matmul::matmul_forward(&mut o, &x, &w, Some(&bias), n, c, oc);
        let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.5; c * oc], vec![0.25; oc]);
        cpu::matmul::matmul_backward(&mut di, &mut dw, Some(&mut db), &dout, &x, &w, n, c, oc);
        let (gx, gw, gb, gdo) = (up(&x)?, up(&w)?, up(&bias)?, up(&dout)?);
        let gwb = d.alloc::<u16>(c * oc)?;
        ops::cast_to_bf16(d, gwb.all(), gw.all(), c * oc)?;
        let big = (n * c).max(n * oc);
        let (sa, sb) = (d.alloc::<u16>(big)?, d.alloc::<u16>(big)?);
        let sc = Bf16Scratch { a: sa.all(), b: sb.all() };
        let part = d.alloc::<f32>(ops::partial_len(n, oc))?;
        for (prec, tol) in [(Precision::F32, MM), (Precision::Bf16, BF16)] {
            let go = d.alloc::<f32>(n * oc)?;
            ops::matmul_forward(d, prec, go.all(), gx.all(), gw.all(), gwb.all(), Some(gb.all()), sc, n, c, oc)?;
            push(compare(format!("matmul_forward {prec:?} N={n} C={c} OC={oc}"), &down(&go, n * oc)?, &o, tol), &mut out);
            let (gdi, gdw, gdb) = (d.alloc::<f32>(n * c)?, up(&vec![0.5; c * oc])?, up(&vec![0.25; oc])?);
            ops::matmul_backward(d, prec, gdi.all(), gdw.all(), Some(gdb.all()), gdo.all(), gx.all(), gw.all(), gwb.all(), sc, part.all(), n, c, oc)?;
            push(compare(format!("matmul_backward dinp {prec:?} N={n} C={c} OC={oc}"), &down(&gdi, n * c)?, &di, tol), &mut out);
            push(compare(format!("matmul_backward dw {prec:?} N={n} C={c} OC={oc}"), &down(&gdw, c * oc)?, &dw, tol), &mut out);
            push(compare(format!("matmul_backward dbias {prec:?} N={n} C={c} OC={oc}"), &down(&gdb, oc)?, &db, MM), &mut out);
        }
    }

    // Tied LM head.
    for &(n, c, vp) in &[(5, 12, 4133), (64, 768, 50304)] {
        let (x, wte, dl) = (randn(n * c, 16), randn(vp * c, 17), randn(n * vp, 18));
        let mut lo = vec![0.0; n * vp];
        cpu::matmul::lm_head_forward(&mut lo, &x, &wte, n, c, vp);
        let (mut dx, mut dwte) = (vec![0.0; n * c], vec![0.5; vp * c]);
        cpu::matmul::lm_head_backward(&mut dx, &mut dwte, &dl, &x, &wte, n, c, vp);
        let (gx, gw, gdl, glo, gdx, gdw) = (up(&x)?, up(&wte)?, up(&dl)?, d.alloc::<f32>(n * vp)?, d.alloc::<f32>(n * c)?, up(&vec![0.5; vp * c])?);
        let none = Bf16Scratch { a: gx.view(0, 0), b: gx.view(0, 0) };
        ops::lm_head_forward(d, Precision::F32, glo.all(), gx.all(), gw.all(), gw.view(0, 0), none, n, c, vp)?;
        push(compare(format!("lm_head_forward F32 N={n} C={c} Vp={vp}"), &down(&glo, n * vp)?, &lo, MM), &mut out);
        ops::lm_head_backward(d, Precision::F32, gdx.all(), gdw.all(), gdl.all(), gx.all(), gw.all(), gw.view(0, 0), none, n, c, vp)?;
        push(compare(format!("lm_head_backward dx F32 N={n} C={c} Vp={vp}"), &down(&gdx, n * c)?, &dx, MM), &mut out);
        push(compare(format!("lm_head_backward dwte F32 N={n} C={c} Vp={vp}"), &down(&gdw, vp * c)?, &dwte, MM), &mut out);
    }

    // Attention (all three head-size instantiations).
    for &(b, t, c, nh) in &[(1, 1, 8, 2), (2, 7, 16, 4), (2, 65, 128, 2), (1, 130, 256, 2), (2, 256, 768, 12)] {
        let (qkv, dout) = (randn(b * t * 3 * c, 19), randn(b * t * c, 20));
        let (mut o, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_forward(&mut o, &mut att, &qkv, b, t, c, nh);
        let (mut dqkv, mut datt) = (vec![0.0; b * t * 3 * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, c, nh);
        let (gq, gdo, go, gl, gdq, gdelta) = (up(&qkv)?, up(&dout)?, d.alloc::<f32>(b * t * c)?, d.alloc::<f32>(b * nh * t)?, d.alloc::<f32>(b * t * 3 * c)?, d.alloc::<f32>(b * nh * t)?);
        ops::attention_forward(d, go.all(), gl.all(), gq.all(), b, t, c, nh)?;
        push(compare(format!("attention_forward B={b} T={t} C={c} NH={nh}"), &down(&go, b * t * c)?, &o, MM), &mut out);
        ops::attention_backward(d, gdq.all(), gdelta.all(), gdo.all(), gq.all(), go.all(), gl.all(), b, t, c, nh)?;
        push(compare(format!("attention_backward B={b} T={t} C={c} NH={nh}"), &down(&gdq, b * t * 3 * c)?, &dqkv, MM), &mut out);
    }

    // KV-cache attention: prefill 4 tokens, then one at a time.
    {
        let (t, c, nh) = (9, 16, 4);
        let qkv = randn(t * 3 * c, 31);
        let (mut kc, mut vc) = (vec![0.0; t * c], vec![0.0; t * c]);
        for i in 0..t {
            kc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + c..i * 3 * c + 2 * c]);
            vc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + 2 * c..i * 3 * c + 3 * c]);
        }
        let (mut want, mut scores) = (vec![0.0; t * c], vec![0.0; nh * t]);
        cpu::attention::attention_forward_cached(&mut want[..4 * c], &mut scores, &qkv[..4 * 3 * c], &kc, &vc, 0, 4, c, nh);
        for i in 4..t {
            cpu::attention::attention_forward_cached(&mut want[i * c..(i + 1) * c], &mut scores, &qkv[i * 3 * c..(i + 1) * 3 * c], &kc, &vc, i, 1, c, nh);
        }
        let (gq, gk, gv, go) = (up(&qkv)?, d.alloc::<f32>(t * c)?, d.alloc::<f32>(t * c)?, d.alloc::<f32>(t * c)?);
        ops::kv_cache_write(d, gk.all(), gv.all(), gq.view(0, 4 * 3 * c), 0, 4, c)?;
        ops::attention_forward_cached(d, go.view(0, 4 * c), gq.view(0, 4 * 3 * c), gk.all(), gv.all(), 0, 4, c, nh)?;
        for i in 4..t {
            let q = gq.view(i * 3 * c, 3 * c);
            ops::kv_cache_write(d, gk.all(), gv.all(), q, i, 1, c)?;
            ops::attention_forward_cached(d, go.view(i * c, c), q, gk.all(), gv.all(), i, 1, c, nh)?;
        }
        push(compare(format!("attention_forward_cached T={t} C={c} NH={nh}"), &down(&go, t * c)?, &want, MM), &mut out);
    }

    // Fused softmax cross-entropy with weights and the ignore index.
    for &(n, v, vp) in &[(3, 5, 8), (64, 1000, 1024), (32, 50257, 50304)] {
        let logits = randn(n * vp, 21);
        let targets: Vec<i32> = (0..n).map(|i| if i % 5 == 1 { cpu::crossentropy::IGNORE_INDEX } else { ((i * 7919) % v) as i32 }).collect();
        let weights: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let (mut l, mut losses) = (logits.clone(), vec![0.0; n]);
        cpu::crossentropy::softmax_crossentropy(&mut l, &mut losses, &targets, Some(&weights), 0.25, n, v, vp, true);
        let (gl, glo, gt, gw) = (up(&logits)?, d.alloc::<f32>(n)?, d.upload_new(&targets)?, up(&weights)?);
        ops::softmax_crossentropy(d, gl.all(), glo.all(), gt.all(), Some(gw.all()), 0.25, n, v, vp, true)?;
        push(compare(format!("softmax_crossentropy loss N={n} V={v}"), &down(&glo, n)?, &losses, EW), &mut out);
        push(compare(format!("softmax_crossentropy dlogits N={n} V={v}"), &down(&gl, n * vp)?, &l, EW), &mut out);
    }

    // Scalar head.
    {
        let (rows_total, c, n) = (40, 64, 6);
        let hidden = randn(rows_total * c, 22);
        let w = randn(c, 23);
        let rows: Vec<i32> = (0..n as i32).map(|i| i * 7 % rows_total as i32).collect();
        let dr = randn(n, 24);
        let head = crate::phase::reward::ScalarHead { weight: w.clone(), bias: 0.3 };
        let want: Vec<f32> = rows.iter().map(|&r| head.score(&hidden[r as usize * c..(r as usize + 1) * c])).collect();
        let (mut dh, mut dw) = (vec![0.0; rows_total * c], vec![0.0; c + 1]);
        for (i, &r) in rows.iter().enumerate() {
            let at = r as usize * c;
            for k in 0..c {
                dh[at + k] = dr[i] * w[k];
                dw[k] += dr[i] * hidden[at + k];
            }
            dw[c] += dr[i];
        }
        let (gh, gw, grows, gdr, gr, gdh, gdw) = (up(&hidden)?, up(&w)?, d.upload_new(&rows)?, up(&dr)?, d.alloc::<f32>(n)?, d.alloc::<f32>(rows_total * c)?, d.alloc::<f32>(c + 1)?);
        ops::scalar_head_forward(d, gr.all(), gh.all(), grows.all(), gw.all(), 0.3, n, c, rows_total)?;
        push(compare(format!("scalar_head_forward n={n} C={c}"), &down(&gr, n)?, &want, EW), &mut out);
        ops::scalar_head_backward(d, gdh.all(), gdw.all(), gdr.all(), gh.all(), grows.all(), gw.all(), n, c, rows_total)?;
        push(compare(format!("scalar_head_backward dhidden n={n} C={c}"), &down(&gdh, rows_total * c)?, &dh, EW), &mut out);
        push(compare(format!("scalar_head_backward dw n={n} C={c}"), &down(&gdw, c + 1)?, &dw, EW), &mut out);
    }

    // AdamW (two steps, so the moments are not trivial), global norm and clipping.
    {
        let cfg = GptConfig::new(64, 8, 1, 2, 16);
        let model = CudaGpt::new(dev.clone(), cfg.clone(), 1, 8, Precision::Bf16)?;
        let layout = model.layout.clone();
        let n = layout.len();
        let (p0, g) = (randn(n, 25), randn(n, 26));
        let mut model = model;
        model.set_params(&p0)?;
        let tc = TrainConfig { batch_size: 1, seq_len: 8, grad_accum: 1, schedule: LrSchedule { max_lr: 1e-2, min_lr: 1e-3, warmup_steps: 0, total_steps: 10 }, adamw: AdamWConfig::default(), grad_clip: 1.0, seed: 1 };
        let mut tr = CudaTrainer::with_model(model, tc)?;
        let mut opt = AdamW::new(AdamWConfig::default(), &layout);
        let mut p = p0.clone();
        for s in 0..2 {
            opt.step(&mut p, &g, 1e-2);
            d.upload(&tr.model.grads, 0, &g)?;
            tr.adamw(1e-2)?;
            tr.step = s + 1;
        }
        push(compare(format!("adamw_step x2 n={n}"), &tr.model.params_to_host()?, &p, EW), &mut out);
        let mut g2 = g.clone();
        let norm = crate::optim::clip_grad_norm(&mut g2, 1.0);
        let (gg, gn, gp) = (up(&g)?, d.alloc::<f32>(1)?, d.alloc::<f64>(ops::NORM_BLOCKS)?);
        ops::global_norm(d, gn.all(), gp.all(), gg.all(), n)?;
        push(compare(format!("global_norm n={n}"), &down(&gn, 1)?, &[norm], EW), &mut out);
        ops::clip_scale(d, gg.all(), gn.all(), n, 1.0)?;
        push(compare(format!("clip_scale n={n}"), &down(&gg, n)?, &g2, EW), &mut out);
    }

    // A whole training step against the CPU trainer, then bf16.
    {
        let cfg = GptConfig::new(300, 32, 2, 2, 64);
        let tc = TrainConfig { batch_size: 4, seq_len: 32, grad_accum: 2, schedule: LrSchedule { max_lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 10 }, adamw: AdamWConfig::default(), grad_clip: 1.0, seed: 7 };
        let mut rng = Rng::new(8);
        let micro: Vec<MicroBatch> = (0..2)
            .map(|_| {
                let toks: Vec<u32> = (0..4 * 32 + 1).map(|_| rng.below(300) as u32).collect();
                let mut targets: Vec<i32> = toks[1..].iter().map(|&x| x as i32).collect();
                targets[3] = cpu::crossentropy::IGNORE_INDEX;
                MicroBatch { inputs: toks[..128].to_vec(), targets, weights: Some((0..128).map(|i| 0.5 + (i % 2) as f32).collect()), b: 4, t: 32 }
            })
            .collect();
        let mut cpu_tr = Trainer::new(cfg.clone(), tc.clone())?;
        let mut gpu_tr = CudaTrainer::new(dev.clone(), cfg.clone(), tc.clone(), Precision::F32)?;
        push(compare("whole step: initial parameters (same seed)", &gpu_tr.model.params_to_host()?, &cpu_tr.model.params, Tolerance::Elementwise { atol: 0.0, rtol: 0.0 }), &mut out);
        let (mut lc, mut lg) = (Vec::new(), Vec::new());
        for s in 0..3 {
            let a = cpu_tr.train_step(&micro)?;
            let b = gpu_tr.train_step(&micro, None, None)?;
            lc.push(a.loss);
            lg.push(b.loss);
            if s == 0 {
                push(compare("whole step 0: clipped gradients (f32)", &gpu_tr.model.grads_to_host()?, &cpu_tr.model.grads, Tolerance::Elementwise { atol: 1e-5, rtol: 1e-3 }), &mut out);
                push(compare("whole step 0: grad norm (f32)", &[b.grad_norm], &[a.grad_norm], Tolerance::Elementwise { atol: 0.0, rtol: 1e-4 }), &mut out);
            }
        }
        push(compare("whole step: loss of steps 0..3 (f32)", &lg, &lc, Tolerance::Elementwise { atol: 0.0, rtol: 1e-4 }), &mut out);
        let mut bf = CudaTrainer::new(dev.clone(), cfg, tc, Precision::Bf16)?;
        let lb: Vec<f32> = (0..3).map(|_| bf.train_step(&micro, None, None).map(|s| s.loss)).collect::<Result<_>>()?;
        push(compare("whole step: loss of steps 0..3 (bf16 matmuls)", &lb, &lc, BF16), &mut out);
    }

    // NCCL, world size 1: the sum over one rank is the buffer itself.
    {
        let mut comm = Nccl::connect(dev.clone(), 0, 1, 0, NcclOptions { bucket_elems: 1000, ..Default::default() }, |id| id.map(|b| b.to_vec()).ok_or_else(|| "rank 0 has the id".to_string()))
            .map_err(|e| super::CudaError::Nccl { op: "connect", status: e.to_string() })?;
        let x = randn(2500, 27);
        let mut y = x.clone();
        comm.all_reduce_sum(&mut y).map_err(|e| super::CudaError::Nccl { op: "all_reduce_sum", status: e.to_string() })?;
        push(compare("nccl all_reduce_sum world=1 (3 buckets)", &y, &x, Tolerance::Elementwise { atol: 0.0, rtol: 0.0 }), &mut out);
        let s = comm.all_reduce_scalar(2.5).map_err(|e| super::CudaError::Nccl { op: "all_reduce_scalar", status: e.to_string() })?;
        push(compare("nccl all_reduce_scalar world=1", &[s as f32], &[2.5], Tolerance::Elementwise { atol: 0.0, rtol: 0.0 }), &mut out);
        let g = up(&x)?;
        comm.all_reduce_device(d, g.all(), x.len())?;
        push(compare("nccl all_reduce_device world=1", &down(&g, x.len())?, &x, Tolerance::Elementwise { atol: 0.0, rtol: 0.0 }), &mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_judges_both_kinds_of_tolerance() {
        assert!(compare("x", &[1.0, 2.0], &[1.0, 2.0], EW).pass);
        assert!(!compare("x", &[1.0, 2.1], &[1.0, 2.0], EW).pass);
        assert!(!compare("x", &[f32::NAN], &[1.0], EW).pass);
        assert!(compare("x", &[1.001, 2.0], &[1.0, 2.0], BF16).pass);
        assert!(!compare("x", &[1.5, 2.0], &[1.0, 2.0], BF16).pass);
        assert!(!compare("x", &[1.0], &[1.0, 2.0], BF16).pass, "length mismatch fails");
    }
}
