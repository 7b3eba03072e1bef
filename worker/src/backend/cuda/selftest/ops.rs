//! The kernel sections of the selftest: each op's forward and backward against its CPU
//! reference (tolerances in the module docs of [`super`]).

use super::{BF16, Ctx, EW, F32_NORM, MM, Tolerance, compare, pick, randn};
use crate::backend::cpu;
use crate::backend::cuda::error::Result;
use crate::backend::cuda::matmul::Precision;
use crate::backend::cuda::ops::{self, Act, Bf16Scratch};
use crate::rng::Rng;

pub(super) fn encoder(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for (b, t, c, vp) in pick(cx.shapes, &[(1, 1, 8, 16), (2, 7, 16, 32), (3, 37, 40, 100)], &[(4, 64, 768, 50304)]) {
        let mut r = Rng::new(1);
        let inp: Vec<u32> = (0..b * t).map(|_| r.below(vp as u64 - 1) as u32).collect();
        let (wte, wpe, dout) = (randn(vp * c, 2), randn(t * c, 3), randn(b * t * c, 4));
        let mut want = vec![0.0; b * t * c];
        cpu::encoder::encoder_forward(&mut want, &inp, &wte, &wpe, b, t, c, 0);
        let (gi, gwte, gwpe, gout) = (cx.d().upload_new(&inp)?, cx.up(&wte)?, cx.up(&wpe)?, cx.out(b * t * c)?);
        ops::encoder_forward(cx.d(), gout.all(), gi.all(), gwte.all(), gwpe.all(), b, t, c, 0)?;
        let got = cx.down(&gout, b * t * c)?;
        cx.push(compare(format!("encoder_forward B={b} T={t} C={c}"), &got, &want, EW));
        let (mut dwte, mut dwpe) = (vec![0.5; vp * c], vec![0.25; t * c]);
        cpu::encoder::encoder_backward(&mut dwte, &mut dwpe, &dout, &inp, b, t, c);
        let (gdwte, gdwpe, gdout) = (cx.up(&vec![0.5; vp * c])?, cx.up(&vec![0.25; t * c])?, cx.up(&dout)?);
        ops::encoder_backward(cx.d(), gdwte.all(), gdwpe.all(), gdout.all(), gi.all(), b, t, c)?;
        let (g1, g2) = (cx.down(&gdwte, vp * c)?, cx.down(&gdwpe, t * c)?);
        cx.push(compare(format!("encoder_backward dwte B={b} T={t} C={c}"), &g1, &dwte, EW));
        cx.push(compare(format!("encoder_backward dwpe B={b} T={t} C={c}"), &g2, &dwpe, EW));
    }
    Ok(())
}

pub(super) fn layernorm(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for (n, c) in pick(cx.shapes, &[(1, 8), (37, 64), (300, 100)], &[(512, 768)]) {
        let (x, w, bias, dout) = (randn(n * c, 5), randn(c, 6), randn(c, 7), randn(n * c, 8));
        let (mut o, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        cpu::layernorm::layernorm_forward(&mut o, &mut m, &mut s, &x, &w, &bias, n, c);
        let (gx, gw, gb, go, gm, gs) = (cx.up(&x)?, cx.up(&w)?, cx.up(&bias)?, cx.out(n * c)?, cx.out(n)?, cx.out(n)?);
        let gob = cx.d().upload_new(&vec![0x7fc1u16; n * c])?;
        ops::layernorm_forward(cx.d(), Some(go.all()), Some(gob.all()), gm.all(), gs.all(), gx.all(), gw.all(), gb.all(), n, c)?;
        let (g_o, g_m, g_s) = (cx.down(&go, n * c)?, cx.down(&gm, n)?, cx.down(&gs, n)?);
        cx.push(compare(format!("layernorm_forward out N={n} C={c}"), &g_o, &o, EW));
        // The bf16 copy (the next matmul's operand) is the f32 output rounded to nearest even.
        let want_b = as_f32(&g_o.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
        cx.push(compare(format!("layernorm_forward bf16 out N={n} C={c}"), &as_f32(&cx.d().to_host(&gob)?), &want_b, Tolerance::Exact));
        // Without the f32 output (a bf16 model's inner LayerNorms): the same bf16 copy.
        let gob_only = cx.d().upload_new(&vec![0x7fc1u16; n * c])?;
        ops::layernorm_forward(cx.d(), None, Some(gob_only.all()), gm.all(), gs.all(), gx.all(), gw.all(), gb.all(), n, c)?;
        cx.push(compare(format!("layernorm_forward bf16 out only N={n} C={c}"), &as_f32(&cx.d().to_host(&gob_only)?), &want_b, Tolerance::Exact));
        cx.push(compare(format!("layernorm_forward mean N={n} C={c}"), &g_m, &m, EW));
        cx.push(compare(format!("layernorm_forward rstd N={n} C={c}"), &g_s, &s, EW));
        let (mut di, mut dw, mut db) = (vec![0.1; n * c], vec![0.2; c], vec![0.3; c]);
        cpu::layernorm::layernorm_backward(&mut di, &mut dw, &mut db, &dout, &x, &w, &m, &s, n, c);
        let (gdi, gdw, gdb, gdo, part) = (cx.up(&vec![0.1; n * c])?, cx.up(&vec![0.2; c])?, cx.up(&vec![0.3; c])?, cx.up(&dout)?, cx.out(ops::partial_len(n, c))?);
        let gdib = cx.d().upload_new(&vec![0x7fc1u16; n * c])?;
        ops::layernorm_backward(cx.d(), gdi.all(), Some(gdib.all()), gdw.all(), gdb.all(), gdo.all(), gx.all(), gw.all(), gm.all(), gs.all(), part.all(), n, c)?;
        let (g1, g2, g3) = (cx.down(&gdi, n * c)?, cx.down(&gdw, c)?, cx.down(&gdb, c)?);
        cx.push(compare(format!("layernorm_backward dinp N={n} C={c}"), &g1, &di, MM));
        // The bf16 copy is the accumulated f32 dinp rounded to nearest even.
        let want_b = as_f32(&g1.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
        cx.push(compare(format!("layernorm_backward bf16 dinp N={n} C={c}"), &as_f32(&cx.d().to_host(&gdib)?), &want_b, Tolerance::Exact));
        cx.push(compare(format!("layernorm_backward dweight N={n} C={c}"), &g2, &dw, MM));
        cx.push(compare(format!("layernorm_backward dbias N={n} C={c}"), &g3, &db, MM));

        // The fused residual + LayerNorm: against the CPU's two ops, and bit for bit against
        // the two kernels it replaces.
        let y = randn(n * c, 9);
        let mut res = vec![0.0; n * c];
        cpu::residual::residual_forward(&mut res, &x, &y);
        cpu::layernorm::layernorm_forward(&mut o, &mut m, &mut s, &res, &w, &bias, n, c);
        let gy = cx.up(&y)?;
        let (fr, fo, fm, fs) = (cx.out(n * c)?, cx.out(n * c)?, cx.out(n)?, cx.out(n)?);
        let fob = cx.d().upload_new(&vec![0x7fc1u16; n * c])?;
        ops::residual_layernorm_forward(cx.d(), fr.all(), Some(fo.all()), Some(fob.all()), fm.all(), fs.all(), gx.all(), gy.all(), gw.all(), gb.all(), n, c)?;
        let (ur, uo, um, us) = (cx.out(n * c)?, cx.out(n * c)?, cx.out(n)?, cx.out(n)?);
        ops::residual_forward(cx.d(), ur.all(), gx.all(), gy.all(), n * c)?;
        ops::layernorm_forward(cx.d(), Some(uo.all()), None, um.all(), us.all(), ur.all(), gw.all(), gb.all(), n, c)?;
        let want_b = as_f32(&cx.down(&fo, n * c)?.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
        cx.push(compare(format!("residual_layernorm_forward bf16 out N={n} C={c}"), &as_f32(&cx.d().to_host(&fob)?), &want_b, Tolerance::Exact));
        let (fr_only, fob_only) = (cx.out(n * c)?, cx.d().upload_new(&vec![0x7fc1u16; n * c])?);
        ops::residual_layernorm_forward(cx.d(), fr_only.all(), None, Some(fob_only.all()), fm.all(), fs.all(), gx.all(), gy.all(), gw.all(), gb.all(), n, c)?;
        cx.push(compare(format!("residual_layernorm_forward bf16 out only N={n} C={c}"), &as_f32(&cx.d().to_host(&fob_only)?), &want_b, Tolerance::Exact));
        cx.push(compare(format!("residual_layernorm_forward residual (bf16 out only) N={n} C={c}"), &cx.down(&fr_only, n * c)?, &cx.down(&fr, n * c)?, Tolerance::Exact));
        for (what, fused, unfused, want, len) in [("residual", &fr, &ur, &res, n * c), ("out", &fo, &uo, &o, n * c), ("mean", &fm, &um, &m, n), ("rstd", &fs, &us, &s, n)] {
            let got = cx.down(fused, len)?;
            cx.push(compare(format!("residual_layernorm_forward {what} N={n} C={c}"), &got, want, EW));
            cx.push(compare(format!("residual_layernorm_forward {what} N={n} C={c} vs residual_forward + layernorm_forward"), &got, &cx.down(unfused, len)?, Tolerance::Exact));
        }
    }
    Ok(())
}

pub(super) fn gelu_residual(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for n in pick(cx.shapes, &[1usize, 1000, 70_001], &[1 << 20]) {
        let (x, g, y) = (randn(n, 9), randn(n, 10), randn(n, 11));
        let mut o = vec![0.0; n];
        cpu::gelu::gelu_forward(&mut o, &x);
        let (gx, gg, gy) = (cx.up(&x)?, cx.up(&g)?, cx.up(&y)?);
        let go = cx.out(n)?;
        let gob = cx.d().upload_new(&vec![0x7fc1u16; n])?;
        ops::gelu_forward(cx.d(), Some(go.all()), Some(gob.all()), gx.all(), n)?;
        let got = cx.down(&go, n)?;
        cx.push(compare(format!("gelu_forward n={n}"), &got, &o, EW));
        // The bf16 copy, with and without the f32 output: the f32 result rounded to nearest even.
        let want_b = as_f32(&got.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
        cx.push(compare(format!("gelu_forward bf16 out n={n}"), &as_f32(&cx.d().to_host(&gob)?), &want_b, Tolerance::Exact));
        let gob_only = cx.d().upload_new(&vec![0x7fc1u16; n])?;
        ops::gelu_forward(cx.d(), None, Some(gob_only.all()), gx.all(), n)?;
        cx.push(compare(format!("gelu_forward bf16 out only n={n}"), &as_f32(&cx.d().to_host(&gob_only)?), &want_b, Tolerance::Exact));
        cpu::gelu::gelu_backward(&mut o, &x, &g);
        let go = cx.out(n)?;
        ops::gelu_backward(cx.d(), go.all(), gx.all(), gg.all(), n)?;
        let got = cx.down(&go, n)?;
        cx.push(compare(format!("gelu_backward n={n}"), &got, &o, EW));
        cpu::residual::residual_forward(&mut o, &x, &y);
        let go = cx.out(n)?;
        ops::residual_forward(cx.d(), go.all(), gx.all(), gy.all(), n)?;
        let got = cx.down(&go, n)?;
        cx.push(compare(format!("residual_forward n={n}"), &got, &o, EW));
    }
    Ok(())
}

/// bf16 bits of `x`, round to nearest even (NaN → 0x7fff), written from IEEE 754's definition
/// of the rounding, independently of cuda_emu.h and of the GPU.
pub fn bf16_rne(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fff;
    }
    let u = x.to_bits();
    let (hi, lo) = (u >> 16, u & 0xffff);
    let up = lo > 0x8000 || (lo == 0x8000 && hi & 1 == 1);
    (hi + up as u32) as u16
}

/// bf16 bits widened to f32 (exact).
pub(super) fn as_f32(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect()
}

pub(super) fn cast_bf16(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // Ties to even both ways, the largest finite value rounding up to infinity, subnormals,
    // signed zeros, infinities and a NaN; then random values around 1 and across magnitudes.
    let mut x: Vec<f32> = [0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x7f7f_ffff, 0x0000_8000, 0x0001_8000, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0001, 0x0000_0001]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
    let mut r = Rng::new(12);
    x.extend((0..1500).map(|i| r.normal() * 10f32.powi(i % 13 - 6)));
    let n = x.len();
    let gx = cx.up(&x)?;
    let gout = cx.d().upload_new(&vec![0xffffu16; n])?;
    ops::cast_to_bf16(cx.d(), gout.all(), gx.all(), n)?;
    let mut got = vec![0u16; n];
    cx.d().download(&gout, 0, &mut got)?;
    let want: Vec<u16> = x.iter().map(|&v| bf16_rne(v)).collect();
    cx.push(compare(format!("cast_f32_to_bf16 n={n} (ties, overflow, subnormals, NaN)"), &as_f32(&got), &as_f32(&want), Tolerance::Exact));
    Ok(())
}

/// The matmuls with GELU fused into cuBLASLt's epilogues (GELU_AUX_BIAS forward, DGELU
/// backward), and their fallbacks (an output width that is not a multiple of 8, or a bias or
/// GELU input 4 bytes off 16-byte alignment), against the CPU's matmul then GELU.
pub(super) fn matmul_gelu(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // (N, K, OC) of the forward `pre(N,OC) = x(N,K)·w + b`; the backward is that of the matmul
    // that reads GELU(pre) `(N,OC)` as its input, with `out2` columns.
    for (n, k, oc, out2) in pick(cx.shapes, &[(7, 13, 16, 5), (33, 48, 40, 48), (9, 16, 12, 7)], &[(256, 768, 3072, 768)]) {
        let (x, w, bias) = (randn(n * k, 21), randn(k * oc, 22), randn(oc, 23));
        let (w2, dout) = (randn(oc * out2, 24), randn(n * out2, 25));
        let mut pre = vec![0.0; n * oc];
        cpu::matmul::matmul_forward(&mut pre, &x, &w, Some(&bias), n, k, oc);
        let mut act = vec![0.0; n * oc];
        cpu::gelu::gelu_forward(&mut act, &pre);
        let (mut dact, mut dw2, mut db2) = (vec![0.0; n * oc], vec![0.5; oc * out2], vec![0.25; out2]);
        cpu::matmul::matmul_backward(&mut dact, &mut dw2, Some(&mut db2[..]), &dout, &act, &w2, n, oc, out2);
        let mut dpre = vec![0.0; n * oc];
        cpu::gelu::gelu_backward(&mut dpre, &pre, &dact);
        let (gx, gw, gw2, gdo) = (cx.up(&x)?, cx.up(&w)?, cx.up(&w2)?, cx.up(&dout)?);
        let (gwb, gw2b) = (cx.d().alloc::<u16>(k * oc)?, cx.d().alloc::<u16>(oc * out2)?);
        ops::cast_to_bf16(cx.d(), gwb.all(), gw.all(), k * oc)?;
        ops::cast_to_bf16(cx.d(), gw2b.all(), gw2.all(), oc * out2)?;
        let big = (n * k).max(n * oc).max(n * out2);
        let (sa, sb) = (cx.d().alloc::<u16>(big)?, cx.d().alloc::<u16>(big)?);
        let sc = Bf16Scratch { a: sa.all(), b: sb.all() };
        let part = cx.out(ops::partial_len(n, out2))?;
        // at = 0: every pointer 16-byte aligned; at = 1: the bias and GELU's input 4 bytes off.
        for at in [0usize, 1] {
            let path = if at == 0 && oc % 8 == 0 { "epilogue" } else { "fallback" };
            let gbias = cx.up(&[vec![0.0; at], bias.clone()].concat())?;
            for (prec, tol) in [(Precision::F32, MM), (Precision::Bf16, BF16)] {
                let (gact, gpre) = (cx.out(n * oc)?, cx.out(at + n * oc)?);
                ops::matmul_forward_gelu(cx.d(), prec, Some(gact.all()), None, gpre.view(at, n * oc), Act::F32(gx.all()), gw.all(), gwb.all(), gbias.view(at, oc), sc, n, k, oc)?;
                let tag = format!("{prec:?} {path} N={n} K={k} OC={oc}");
                let got_act = cx.down(&gact, n * oc)?;
                cx.push(compare(format!("matmul_forward_gelu out {tag}"), &got_act, &act, tol));
                cx.push(compare(format!("matmul_forward_gelu pre {tag}"), &cx.down(&gpre, at + n * oc)?[at..], &pre, tol));
                if prec == Precision::Bf16 {
                    // A bf16 model's call: only the bf16 GELU output, by gelu_forward after the
                    // matmul; against the CPU, and bit for bit its own pre through gelu_forward.
                    let (gpre2, gob) = (cx.out(at + n * oc)?, cx.d().upload_new(&vec![0x7fc1u16; n * oc])?);
                    ops::matmul_forward_gelu(
                        cx.d(),
                        prec,
                        None,
                        Some(gob.all()),
                        gpre2.view(at, n * oc),
                        Act::F32(gx.all()),
                        gw.all(),
                        gwb.all(),
                        gbias.view(at, oc),
                        sc,
                        n,
                        k,
                        oc,
                    )?;
                    let got_b = as_f32(&cx.d().to_host(&gob)?);
                    cx.push(compare(format!("matmul_forward_gelu bf16 out only {tag}"), &got_b, &act, tol));
                    let (gact2, gob2) = (cx.out(n * oc)?, cx.d().upload_new(&vec![0x7fc1u16; n * oc])?);
                    ops::gelu_forward(cx.d(), Some(gact2.all()), Some(gob2.all()), gpre2.view(at, n * oc), n * oc)?;
                    cx.push(compare(format!("matmul_forward_gelu bf16 out only {tag} vs gelu_forward of its pre"), &got_b, &as_f32(&cx.d().to_host(&gob2)?), Tolerance::Exact));
                }
                // The backward reads the CPU's pre and GELU(pre), so only its own error counts.
                let gpre_in = cx.up(&[vec![0.0; at], pre.clone()].concat())?;
                let gact_in = cx.up(&act)?;
                let (gdpre, gscratch, gdw, gdb) = (cx.out(n * oc)?, cx.out(n * oc)?, cx.up(&vec![0.5; oc * out2])?, cx.up(&vec![0.25; out2])?);
                ops::matmul_backward_gelu(
                    cx.d(),
                    prec,
                    gdpre.all(),
                    gscratch.all(),
                    gdw.all(),
                    Some(gdb.all()),
                    gdo.all(),
                    None,
                    Act::F32(gact_in.all()),
                    gpre_in.view(at, n * oc),
                    gw2.all(),
                    gw2b.all(),
                    sc,
                    part.all(),
                    n,
                    oc,
                    out2,
                )?;
                let tag = format!("{prec:?} {path} N={n} C={oc} OC={out2}");
                // dpre is a dot product scaled by GELU'(pre): where that factor or the dot
                // product's cancellation makes it small, the dot product's own rounding (of its
                // terms' size) dominates, so f32 is judged by the norm (measured 2.1e-7 at K = 768).
                let dpre_tol = if prec == Precision::F32 { F32_NORM } else { tol };
                cx.push(compare(format!("matmul_backward_gelu dpre {tag}"), &cx.down(&gdpre, n * oc)?, &dpre, dpre_tol));
                cx.push(compare(format!("matmul_backward_gelu dw {tag}"), &cx.down(&gdw, oc * out2)?, &dw2, tol));
                // The dW gemm's BGRADA epilogue sums the operand it is handed: bf16 dout on the
                // bf16 path, so the bias gradient has a bf16 operand's error there.
                cx.push(compare(format!("matmul_backward_gelu dbias {tag}"), &cx.down(&gdb, out2)?, &db2, tol));
            }
        }
    }
    Ok(())
}

pub(super) fn matmul(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // C = OC (48) as in the attention projection, where a wrong transpose still fits the layouts.
    for (n, c, oc) in pick(cx.shapes, &[(7, 13, 5), (33, 48, 48), (64, 32, 96), (130, 72, 200)], &[(256, 768, 2304)]) {
        let (x, w, bias, dout) = (randn(n * c, 12), randn(c * oc, 13), randn(oc, 14), randn(n * oc, 15));
        // The bias at offset 0 (16-byte aligned: cuBLASLt's bias epilogue) and at offset 1 (4
        // bytes past: broadcast by a kernel before the gemm).
        let shifted: Vec<f32> = std::iter::once(0.0).chain(bias.iter().copied()).collect();
        let (gx, gw, gdo) = (cx.up(&x)?, cx.up(&w)?, cx.up(&dout)?);
        let gwb = cx.d().alloc::<u16>(c * oc)?;
        ops::cast_to_bf16(cx.d(), gwb.all(), gw.all(), c * oc)?;
        let big = (n * c).max(n * oc);
        let (sa, sb) = (cx.d().alloc::<u16>(big)?, cx.d().alloc::<u16>(big)?);
        let sc = Bf16Scratch { a: sa.all(), b: sb.all() };
        let part = cx.out(ops::partial_len(n, oc))?;
        for (with_bias, at) in [(true, 0usize), (true, 1), (false, 0)] {
            let bias_ref = with_bias.then_some(&bias[..]);
            let bias_view = if at == 0 { cx.up(&bias)? } else { cx.up(&shifted)? };
            let mut o = vec![0.0; n * oc];
            cpu::matmul::matmul_forward(&mut o, &x, &w, bias_ref, n, c, oc);
            let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.5; c * oc], vec![0.25; oc]);
            cpu::matmul::matmul_backward(&mut di, &mut dw, with_bias.then_some(&mut db[..]), &dout, &x, &w, n, c, oc);
            let tag = match (with_bias, at) {
                (false, _) => " no bias",
                (true, 0) => " bias epilogue",
                _ => " bias broadcast, column sums",
            };
            for (prec, tol) in [(Precision::F32, MM), (Precision::Bf16, BF16)] {
                let go = cx.out(n * oc)?;
                ops::matmul_forward(cx.d(), prec, go.all(), Act::F32(gx.all()), gw.all(), gwb.all(), with_bias.then(|| bias_view.view(at, oc)), sc, n, c, oc)?;
                let got = cx.down(&go, n * oc)?;
                cx.push(compare(format!("matmul_forward {prec:?}{tag} N={n} C={c} OC={oc}"), &got, &o, tol));
                let (gdi, gdw, gdb) = (cx.out(n * c)?, cx.up(&vec![0.5; c * oc])?, cx.up(&vec![0.25; oc])?);
                // With the bias 4 bytes off, `partial` is too: the bias gradient then takes the
                // column-sum kernels instead of the dW gemm's BGRADA epilogue.
                let pv = if at == 0 { part.all() } else { part.view(1, part.len() - 1) };
                ops::matmul_backward(cx.d(), prec, gdi.all(), gdw.all(), with_bias.then(|| gdb.all()), gdo.all(), None, Act::F32(gx.all()), gw.all(), gwb.all(), sc, pv, n, c, oc)?;
                let (g1, g2, g3) = (cx.down(&gdi, n * c)?, cx.down(&gdw, c * oc)?, cx.down(&gdb, oc)?);
                cx.push(compare(format!("matmul_backward dinp {prec:?}{tag} N={n} C={c} OC={oc}"), &g1, &di, tol));
                cx.push(compare(format!("matmul_backward dw {prec:?}{tag} N={n} C={c} OC={oc}"), &g2, &dw, tol));
                // As in matmul_gelu: on the bf16 path BGRADA sums the bf16 dout.
                cx.push(compare(format!("matmul_backward dbias {prec:?}{tag} N={n} C={c} OC={oc}"), &g3, &db, tol));
                if prec == Precision::Bf16 {
                    // The input already bf16 (a LayerNorm's copy): the same gemm operands as
                    // the cast, so bit for bit the same results, forward and backward; the
                    // backward also takes dout already bf16 (a LayerNorm backward's copy).
                    let gxb = cx.d().upload_new(&x.iter().map(|&v| bf16_rne(v)).collect::<Vec<_>>())?;
                    let gdob = cx.d().upload_new(&dout.iter().map(|&v| bf16_rne(v)).collect::<Vec<_>>())?;
                    let go2 = cx.out(n * oc)?;
                    ops::matmul_forward(cx.d(), prec, go2.all(), Act::Bf16(gxb.all()), gw.all(), gwb.all(), with_bias.then(|| bias_view.view(at, oc)), sc, n, c, oc)?;
                    cx.push(compare(format!("matmul_forward from bf16 input{tag} N={n} C={c} OC={oc}"), &cx.down(&go2, n * oc)?, &got, Tolerance::Exact));
                    let (gdi2, gdw2, gdb2) = (cx.out(n * c)?, cx.up(&vec![0.5; c * oc])?, cx.up(&vec![0.25; oc])?);
                    ops::matmul_backward(
                        cx.d(),
                        prec,
                        gdi2.all(),
                        gdw2.all(),
                        with_bias.then(|| gdb2.all()),
                        gdo.all(),
                        Some(gdob.all()),
                        Act::Bf16(gxb.all()),
                        gw.all(),
                        gwb.all(),
                        sc,
                        pv,
                        n,
                        c,
                        oc,
                    )?;
                    for (what, a, b, len) in [("dinp", &gdi2, &g1, n * c), ("dw", &gdw2, &g2, c * oc), ("dbias", &gdb2, &g3, oc)] {
                        cx.push(compare(format!("matmul_backward {what} from bf16 input and dout{tag} N={n} C={c} OC={oc}"), &cx.down(a, len)?, b, Tolerance::Exact));
                    }
                }
            }
        }
    }
    Ok(())
}

pub(super) fn lm_head(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for (n, c, vp) in pick(cx.shapes, &[(5, 12, 4133), (33, 64, 1000)], &[(64, 768, 50304)]) {
        let (x, wte, dl) = (randn(n * c, 16), randn(vp * c, 17), randn(n * vp, 18));
        let mut lo = vec![0.0; n * vp];
        cpu::matmul::lm_head_forward(&mut lo, &x, &wte, n, c, vp);
        let (mut dx, mut dwte) = (vec![0.0; n * c], vec![0.5; vp * c]);
        cpu::matmul::lm_head_backward(&mut dx, &mut dwte, &dl, &x, &wte, n, c, vp);
        let (gx, gw, gdl) = (cx.up(&x)?, cx.up(&wte)?, cx.up(&dl)?);
        let gwb = cx.d().alloc::<u16>(vp * c)?;
        ops::cast_to_bf16(cx.d(), gwb.all(), gw.all(), vp * c)?;
        let big = (n * c).max(n * vp);
        let (sa, sb) = (cx.d().alloc::<u16>(big)?, cx.d().alloc::<u16>(big)?);
        let sc = Bf16Scratch { a: sa.all(), b: sb.all() };
        for (prec, tol) in [(Precision::F32, MM), (Precision::Bf16, BF16)] {
            let (glo, gdx, gdw) = (cx.out(n * vp)?, cx.out(n * c)?, cx.up(&vec![0.5; vp * c])?);
            ops::lm_head_forward(cx.d(), prec, glo.all(), Act::F32(gx.all()), gw.all(), gwb.all(), sc, n, c, vp)?;
            let got = cx.down(&glo, n * vp)?;
            cx.push(compare(format!("lm_head_forward {prec:?} N={n} C={c} Vp={vp}"), &got, &lo, tol));
            ops::lm_head_backward(cx.d(), prec, gdx.all(), gdw.all(), Act::F32(gdl.all()), Act::F32(gx.all()), gw.all(), gwb.all(), sc, n, c, vp)?;
            let (g1, g2) = (cx.down(&gdx, n * c)?, cx.down(&gdw, vp * c)?);
            cx.push(compare(format!("lm_head_backward dx {prec:?} N={n} C={c} Vp={vp}"), &g1, &dx, tol));
            cx.push(compare(format!("lm_head_backward dwte {prec:?} N={n} C={c} Vp={vp}"), &g2, &dwte, tol));
            if prec == Precision::Bf16 {
                // The same from dlogits already in bf16 (the fused classifier's output): no cast,
                // so the same gemm operands and bit for bit the same results.
                let bits: Vec<u16> = dl.iter().map(|&x| bf16_rne(x)).collect();
                let (gdlb, gdx2, gdw2) = (cx.d().upload_new(&bits)?, cx.out(n * c)?, cx.up(&vec![0.5; vp * c])?);
                ops::lm_head_backward(cx.d(), prec, gdx2.all(), gdw2.all(), Act::Bf16(gdlb.all()), Act::F32(gx.all()), gw.all(), gwb.all(), sc, n, c, vp)?;
                cx.push(compare(format!("lm_head_backward dx from bf16 dlogits N={n} C={c} Vp={vp}"), &cx.down(&gdx2, n * c)?, &g1, Tolerance::Exact));
                cx.push(compare(format!("lm_head_backward dwte from bf16 dlogits N={n} C={c} Vp={vp}"), &cx.down(&gdw2, vp * c)?, &g2, Tolerance::Exact));
            }
        }
    }
    Ok(())
}

pub(super) fn attention(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // Head sizes 4, 64 and 128 reach the three instantiations; T = 65 and 130 leave partial
    // blocks (64 rows) and partial tiles (32 keys).
    for (b, t, c, nh) in pick(cx.shapes, &[(1, 1, 8, 2), (2, 7, 16, 4), (2, 65, 128, 2), (1, 130, 256, 2)], &[(2, 256, 768, 12)]) {
        let (qkv, dout) = (randn(b * t * 3 * c, 19), randn(b * t * c, 20));
        let (mut o, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_forward(&mut o, &mut att, &qkv, b, t, c, nh);
        let (mut dqkv, mut datt) = (vec![0.0; b * t * 3 * c], vec![0.0; b * nh * t * t]);
        cpu::attention::attention_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, c, nh);
        let (gq, gdo, go, gl, gdq, gdelta) = (cx.up(&qkv)?, cx.up(&dout)?, cx.out(b * t * c)?, cx.out(b * nh * t)?, cx.out(b * t * 3 * c)?, cx.out(b * nh * t)?);
        ops::attention_forward(cx.d(), go.all(), gl.all(), gq.all(), b, t, c, nh)?;
        let got = cx.down(&go, b * t * c)?;
        cx.push(compare(format!("attention_forward B={b} T={t} C={c} NH={nh}"), &got, &o, MM));
        ops::attention_backward(cx.d(), gdq.all(), gdelta.all(), gdo.all(), gq.all(), go.all(), gl.all(), b, t, c, nh)?;
        let got = cx.down(&gdq, b * t * 3 * c)?;
        cx.push(compare(format!("attention_backward dqkv B={b} T={t} C={c} NH={nh}"), &got, &dqkv, MM));
    }
    Ok(())
}

pub(super) fn kv_cache(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // Prefill 4 tokens, then one at a time.
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
    let (gq, gk, gv, go) = (cx.up(&qkv)?, cx.out(t * c)?, cx.out(t * c)?, cx.out(t * c)?);
    ops::kv_cache_write(cx.d(), gk.all(), gv.all(), gq.view(0, 4 * 3 * c), 0, 4, c)?;
    ops::attention_forward_cached(cx.d(), go.view(0, 4 * c), gq.view(0, 4 * 3 * c), gk.all(), gv.all(), 0, 4, c, nh)?;
    for i in 4..t {
        let q = gq.view(i * 3 * c, 3 * c);
        ops::kv_cache_write(cx.d(), gk.all(), gv.all(), q, i, 1, c)?;
        ops::attention_forward_cached(cx.d(), go.view(i * c, c), q, gk.all(), gv.all(), i, 1, c, nh)?;
    }
    let (g1, g2, g3) = (cx.down(&gk, t * c)?, cx.down(&gv, t * c)?, cx.down(&go, t * c)?);
    cx.push(compare(format!("kv_cache_write keys T={t} C={c}"), &g1, &kc, Tolerance::Exact));
    cx.push(compare(format!("kv_cache_write values T={t} C={c}"), &g2, &vc, Tolerance::Exact));
    cx.push(compare(format!("attention_forward_cached T={t} C={c} NH={nh}"), &g3, &want, MM));
    Ok(())
}

pub(super) fn crossentropy(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for (n, v, vp) in pick(cx.shapes, &[(3, 5, 8), (64, 1000, 1024), (7, 3001, 3072)], &[(32, 50257, 50304)]) {
        let logits = randn(n * vp, 21);
        let targets: Vec<i32> = (0..n).map(|i| if i % 5 == 1 { cpu::crossentropy::IGNORE_INDEX } else { ((i * 7919) % v) as i32 }).collect();
        let weights: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let (mut l, mut losses) = (logits.clone(), vec![0.0; n]);
        cpu::crossentropy::softmax_crossentropy(&mut l, &mut losses, &targets, Some(&weights), 0.25, n, v, vp, true);
        let (gl, glo, gt, gw) = (cx.up(&logits)?, cx.out(n)?, cx.d().upload_new(&targets)?, cx.up(&weights)?);
        // The bf16 gradient first (it leaves the logits as they are), then in place.
        let (gd, glo_b) = (cx.d().upload_new(&vec![0x7fc1u16; n * vp])?, cx.out(n)?);
        ops::softmax_crossentropy(cx.d(), gl.all(), glo_b.all(), gt.all(), Some(gw.all()), 0.25, n, v, vp, ops::Grad::Bf16(gd.all()))?;
        let untouched = cx.down(&gl, n * vp)?;
        cx.push(compare(format!("softmax_crossentropy logits kept with bf16 dlogits N={n} V={v}"), &untouched, &logits, Tolerance::Exact));
        let mut bits = vec![0u16; n * vp];
        cx.d().download(&gd, 0, &mut bits)?;
        ops::softmax_crossentropy(cx.d(), gl.all(), glo.all(), gt.all(), Some(gw.all()), 0.25, n, v, vp, ops::Grad::InPlace)?;
        let (g1, g2) = (cx.down(&glo, n)?, cx.down(&gl, n * vp)?);
        cx.push(compare(format!("softmax_crossentropy loss N={n} V={v}"), &g1, &losses, EW));
        cx.push(compare(format!("softmax_crossentropy dlogits N={n} V={v}"), &g2, &l, EW));
        cx.push(compare(format!("softmax_crossentropy loss with bf16 dlogits N={n} V={v}"), &cx.down(&glo_b, n)?, &g1, Tolerance::Exact));
        // The bf16 gradient is the f32 one rounded to nearest even, element for element.
        let want = as_f32(&g2.iter().map(|&x| bf16_rne(x)).collect::<Vec<_>>());
        cx.push(compare(format!("softmax_crossentropy bf16 dlogits N={n} V={v}"), &as_f32(&bits), &want, Tolerance::Exact));
        // The step's loss sum, added onto what the accumulator held (in f64 on both sides).
        let denom = 3.5f32;
        let sum = |l: &[f32], w: Option<&[f32]>| -> f64 {
            let s: f64 = (0..n).filter(|&i| targets[i] != cpu::crossentropy::IGNORE_INDEX).map(|i| w.map_or(1.0, |w| w[i] as f64) * l[i] as f64).sum();
            0.75 + s / denom as f64
        };
        for w in [Some(&weights[..]), None] {
            let acc = cx.d().upload_new(&[0.75f64])?;
            ops::loss_sum(cx.d(), acc.all(), glo.all(), gt.all(), w.map(|_| gw.all()), denom, n)?;
            let got = cx.d().to_host(&acc)?[0] as f32;
            let label = if w.is_some() { "weighted" } else { "unweighted" };
            cx.push(compare(format!("loss_sum {label} vs CPU N={n} V={v}"), &[got], &[sum(&losses, w) as f32], EW));
            // Against the device's own losses summed on the host: only the order of an f64 sum differs.
            cx.push(compare(format!("loss_sum {label} vs host sum N={n} V={v}"), &[got], &[sum(&g1, w) as f32], Tolerance::Elementwise { atol: 0.0, rtol: 1e-6 }));
        }
    }
    Ok(())
}

pub(super) fn scalar_head(cx: &mut Ctx<'_, '_>) -> Result<()> {
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
    // dhidden: the kernel writes only the scored rows; the host zeroes it first (its contract).
    let (gh, gw, grows, gdr, gr) = (cx.up(&hidden)?, cx.up(&w)?, cx.d().upload_new(&rows)?, cx.up(&dr)?, cx.out(n)?);
    let (gdh, gdw) = (cx.d().alloc::<f32>(rows_total * c)?, cx.d().alloc::<f32>(c + 1)?);
    ops::scalar_head_forward(cx.d(), gr.all(), gh.all(), grows.all(), gw.all(), 0.3, n, c, rows_total)?;
    let got = cx.down(&gr, n)?;
    cx.push(compare(format!("scalar_head_forward n={n} C={c}"), &got, &want, EW));
    ops::scalar_head_backward(cx.d(), gdh.all(), gdw.all(), gdr.all(), gh.all(), grows.all(), gw.all(), n, c, rows_total)?;
    let (g1, g2) = (cx.down(&gdh, rows_total * c)?, cx.down(&gdw, c + 1)?);
    cx.push(compare(format!("scalar_head_backward dhidden n={n} C={c}"), &g1, &dh, EW));
    cx.push(compare(format!("scalar_head_backward dw n={n} C={c}"), &g2, &dw, EW));
    Ok(())
}

pub(super) fn rmsnorm(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // C = 37 and 100 leave partial warps; N = 300 spans two row chunks of the dweight sum.
    for (k, (n, c)) in pick(cx.shapes, &[(1, 8), (7, 37), (37, 64), (300, 100)], &[(512, 896), (256, 4096)]).into_iter().enumerate() {
        let eps = if k % 2 == 0 { 1e-6 } else { 1e-5 };
        let x = randn(n * c, 40);
        let w: Vec<f32> = randn(c, 41).iter().map(|v| 1.0 + 0.3 * v).collect();
        let dout = randn(n * c, 42);
        let (mut o, mut s) = (vec![0.0; n * c], vec![0.0; n]);
        cpu::rmsnorm::rmsnorm_forward(&mut o, &mut s, &x, &w, n, c, eps);
        let (gx, gw, go, gs) = (cx.up(&x)?, cx.up(&w)?, cx.out(n * c)?, cx.out(n)?);
        ops::rmsnorm_forward(cx.d(), go.all(), gs.all(), gx.all(), gw.all(), n, c, eps)?;
        let (g_o, g_s) = (cx.down(&go, n * c)?, cx.down(&gs, n)?);
        cx.push(compare(format!("rmsnorm_forward out N={n} C={c} eps={eps:e}"), &g_o, &o, EW));
        cx.push(compare(format!("rmsnorm_forward rstd N={n} C={c} eps={eps:e}"), &g_s, &s, EW));
        let (mut di, mut dw) = (vec![0.1; n * c], vec![0.2; c]);
        cpu::rmsnorm::rmsnorm_backward(&mut di, &mut dw, &dout, &x, &w, &s, n, c);
        let (gdi, gdw, gdo, part) = (cx.up(&vec![0.1; n * c])?, cx.up(&vec![0.2; c])?, cx.up(&dout)?, cx.out(ops::rmsnorm_partial_len(n, c))?);
        ops::rmsnorm_backward(cx.d(), gdi.all(), gdw.all(), gdo.all(), gx.all(), gw.all(), gs.all(), part.all(), n, c)?;
        let (g1, g2) = (cx.down(&gdi, n * c)?, cx.down(&gdw, c)?);
        cx.push(compare(format!("rmsnorm_backward dinp N={n} C={c}"), &g1, &di, MM));
        cx.push(compare(format!("rmsnorm_backward dweight N={n} C={c}"), &g2, &dw, MM));
    }
    Ok(())
}

pub(super) fn rope(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // (B, T, NH, NKV, hs, pos0, θ): NKV = 1 and 2 under NH = 4, a start past position 0 (as in
    // generation), and Llama 2's, Qwen2's and Llama 3's θ.
    let small = [(1, 1, 4, 1, 8, 0, 1e4), (2, 7, 4, 2, 16, 0, 1e6), (2, 37, 4, 1, 8, 0, 5e5), (1, 9, 4, 2, 16, 5, 1e4), (1, 37, 4, 4, 64, 0, 1e6)];
    for (b, t, nh, nkv, hs, pos0, theta) in pick(cx.shapes, &small, &[(2, 256, 14, 2, 64, 0, 1e6), (1, 256, 32, 8, 128, 0, 5e5)]) {
        let d = (nh + 2 * nkv) * hs;
        let table = cpu::rope::RopeTable::new(pos0 + t, hs, theta);
        let gtable = ops::RopeTableDev::upload(cx.d(), &table)?;
        let x = randn(b * t * d, 43);
        let mut want = x.clone();
        cpu::rope::rope_forward(&mut want, &table, b, t, nh, nkv, hs, pos0);
        let gx = cx.up(&x)?;
        ops::rope_forward(cx.d(), gx.all(), &gtable, b, t, nh, nkv, hs, pos0)?;
        let got = cx.down(&gx, b * t * d)?;
        let tag = format!("B={b} T={t} NH={nh} NKV={nkv} hs={hs} pos0={pos0} theta={theta:e}");
        cx.push(compare(format!("rope_forward {tag}"), &got, &want, EW));
        if pos0 == 0 {
            let g = randn(b * t * d, 44);
            let mut want = g.clone();
            cpu::rope::rope_backward(&mut want, &table, b, t, nh, nkv, hs);
            let gg = cx.up(&g)?;
            ops::rope_backward(cx.d(), gg.all(), &gtable, b, t, nh, nkv, hs)?;
            let got = cx.down(&gg, b * t * d)?;
            cx.push(compare(format!("rope_backward {tag}"), &got, &want, EW));
        }
    }
    Ok(())
}

pub(super) fn swiglu(cx: &mut Ctx<'_, '_>) -> Result<()> {
    for (n, i) in pick(cx.shapes, &[(1, 1), (7, 37), (64, 100), (3, 1001)], &[(512, 4864), (256, 11008)]) {
        // Gates across [-6, 6], where σ saturates on both sides.
        let x: Vec<f32> = randn(n * 2 * i, 45).iter().map(|v| 2.0 * v).collect();
        let dout = randn(n * i, 46);
        let mut o = vec![0.0; n * i];
        cpu::swiglu::swiglu_forward(&mut o, &x, n, i);
        let mut dx = vec![0.0; n * 2 * i];
        cpu::swiglu::swiglu_backward(&mut dx, &x, &dout, n, i);
        let (gx, gdo, go, gdx) = (cx.up(&x)?, cx.up(&dout)?, cx.out(n * i)?, cx.out(n * 2 * i)?);
        ops::swiglu_forward(cx.d(), go.all(), gx.all(), n, i)?;
        let got = cx.down(&go, n * i)?;
        cx.push(compare(format!("swiglu_forward N={n} I={i}"), &got, &o, EW));
        ops::swiglu_backward(cx.d(), gdx.all(), gx.all(), gdo.all(), n, i)?;
        let got = cx.down(&gdx, n * 2 * i)?;
        cx.push(compare(format!("swiglu_backward N={n} I={i}"), &got, &dx, EW));
    }
    Ok(())
}

pub(super) fn embedding(cx: &mut Ctx<'_, '_>) -> Result<()> {
    // Vp = 5 with 74 rows: every token repeats, so dwte sums many rows per token.
    for (n, c, vp) in pick(cx.shapes, &[(1, 8, 16), (7, 37, 50), (74, 64, 5)], &[(512, 896, 32000)]) {
        let mut r = Rng::new(47);
        let inp: Vec<u32> = (0..n).map(|_| r.below(vp as u64) as u32).collect();
        let (wte, dout) = (randn(vp * c, 48), randn(n * c, 49));
        let mut want = vec![0.0; n * c];
        cpu::embedding::embedding_forward(&mut want, &inp, &wte, n, c);
        let (gi, gwte, gout) = (cx.d().upload_new(&inp)?, cx.up(&wte)?, cx.out(n * c)?);
        ops::embedding_forward(cx.d(), gout.all(), gi.all(), gwte.all(), n, c)?;
        let got = cx.down(&gout, n * c)?;
        // A copy of the table's rows: bit for bit.
        cx.push(compare(format!("embedding_forward N={n} C={c} Vp={vp}"), &got, &want, Tolerance::Exact));
        let mut dwte = vec![0.5; vp * c];
        cpu::embedding::embedding_backward(&mut dwte, &dout, &inp, n, c);
        let (gdwte, gdout) = (cx.up(&vec![0.5; vp * c])?, cx.up(&dout)?);
        ops::embedding_backward(cx.d(), gdwte.all(), gdout.all(), gi.all(), n, c)?;
        let got = cx.down(&gdwte, vp * c)?;
        cx.push(compare(format!("embedding_backward dwte N={n} C={c} Vp={vp}"), &got, &dwte, EW));
    }
    Ok(())
}

pub(super) fn gqa_attention(cx: &mut Ctx<'_, '_>) -> Result<()> {
    use cpu::gqa_attention::Gqa;
    // (B, T, NH, NKV, hs): head sizes 8/16, 64 and 128 reach the three instantiations; NKV = 1,
    // 2 and 4 (plain multi-head) under NH = 4; T = 37, 65 and 130 leave partial blocks (64 rows)
    // and partial tiles (32 keys).
    let small = [(1, 1, 4, 1, 8), (2, 7, 4, 2, 16), (2, 37, 4, 1, 8), (1, 37, 4, 2, 16), (2, 7, 4, 4, 8), (1, 65, 4, 2, 64), (1, 37, 4, 1, 128), (1, 130, 6, 3, 32)];
    for (b, t, nh, nkv, hs) in pick(cx.shapes, &small, &[(2, 256, 14, 2, 64), (1, 256, 32, 8, 128)]) {
        let s = Gqa { nh, nkv, hs };
        let (d, c) = (s.dqkv(), nh * hs);
        let (qkv, dout) = (randn(b * t * d, 50), randn(b * t * c, 51));
        let (mut o, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        cpu::gqa_attention::gqa_forward(&mut o, &mut att, &qkv, b, t, s);
        let (mut dqkv, mut datt) = (vec![0.0; b * t * d], vec![0.0; b * nh * t * t]);
        cpu::gqa_attention::gqa_backward(&mut dqkv, &mut datt, &dout, &qkv, &att, b, t, s);
        let (gq, gdo, go, gl, gdq, gdelta) = (cx.up(&qkv)?, cx.up(&dout)?, cx.out(b * t * c)?, cx.out(b * nh * t)?, cx.out(b * t * d)?, cx.out(b * nh * t)?);
        let tag = format!("B={b} T={t} NH={nh} NKV={nkv} hs={hs}");
        ops::gqa_forward(cx.d(), go.all(), gl.all(), gq.all(), b, t, s)?;
        let got = cx.down(&go, b * t * c)?;
        cx.push(compare(format!("gqa_forward {tag}"), &got, &o, MM));
        ops::gqa_backward(cx.d(), gdq.all(), gdelta.all(), gdo.all(), gq.all(), go.all(), gl.all(), b, t, s)?;
        let got = cx.down(&gdq, b * t * d)?;
        cx.push(compare(format!("gqa_backward dqkv {tag}"), &got, &dqkv, MM));
        if nkv == nh {
            // With NKV = NH the layout is GPT-2's (B, T, 3C) and both entry points run the same
            // code: their outputs agree bit for bit.
            let (go2, gl2, gdq2, gdelta2) = (cx.out(b * t * c)?, cx.out(b * nh * t)?, cx.out(b * t * d)?, cx.out(b * nh * t)?);
            ops::attention_forward(cx.d(), go2.all(), gl2.all(), gq.all(), b, t, c, nh)?;
            ops::attention_backward(cx.d(), gdq2.all(), gdelta2.all(), gdo.all(), gq.all(), go2.all(), gl2.all(), b, t, c, nh)?;
            let (a, bb) = (cx.down(&go2, b * t * c)?, cx.down(&go, b * t * c)?);
            cx.push(compare(format!("gqa_forward equals attention_forward {tag}"), &bb, &a, Tolerance::Exact));
            let (a, bb) = (cx.down(&gdq2, b * t * d)?, cx.down(&gdq, b * t * d)?);
            cx.push(compare(format!("gqa_backward equals attention_backward {tag}"), &bb, &a, Tolerance::Exact));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bf16_rne;

    #[test]
    fn bf16_reference_rounds_to_nearest_even() {
        assert_eq!(bf16_rne(1.0), 0x3f80);
        assert_eq!(bf16_rne(f32::from_bits(0x3f80_8000)), 0x3f80, "tie to even (down)");
        assert_eq!(bf16_rne(f32::from_bits(0x3f81_8000)), 0x3f82, "tie to even (up)");
        assert_eq!(bf16_rne(f32::from_bits(0x3f80_8001)), 0x3f81, "above the tie");
        assert_eq!(bf16_rne(f32::MAX), 0x7f80, "overflows to infinity");
        assert_eq!(bf16_rne(f32::NAN), 0x7fff);
        assert_eq!(bf16_rne(-0.0), 0x8000);
    }
}
