//! The CUDA backend's own host code and kernel sources, run on the emulated device
//! (`--device cuda-emu`): the selftest (every kernel forward and backward against the CPU
//! backend, whole training steps in f32 and bf16), the cuBLASLt contract of the emulated gemm
//! against a naive reference, and checkpoint save and bit-exact resume through the CUDA trainer.

use std::sync::Arc;

use liandan_worker::backend::cuda::device::{DPtr, DataType, DevBuf, Epilogue, Matmul, MatrixLayout};
use liandan_worker::backend::cuda::emu::{EmuOptions, Order};
use liandan_worker::backend::cuda::kernels::KernelFile;
use liandan_worker::backend::cuda::selftest::{self, Shapes, Status};
use liandan_worker::backend::cuda::trainer::CudaTrainer;
use liandan_worker::backend::cuda::{CudaDevice, Precision};
use liandan_worker::checkpoint::DataCursor;
use liandan_worker::rng::Rng;
use liandan_worker::train::Trainer;

fn run_selftest(dev: &Arc<CudaDevice>) {
    let mut lines = Vec::new();
    let checks = selftest::run(dev, Shapes::Small, &mut |c| lines.push(c.to_string()));
    let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "{} of {} checks failed:\n{}", failed.len(), checks.len(), failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"));
    let skipped: Vec<&str> = checks.iter().filter(|c| matches!(c.status, Status::Skip(_))).map(|c| c.name.as_str()).collect();
    assert_eq!(skipped, vec!["nccl"], "only NCCL (GPU only) may be skipped");
    assert!(checks.len() > 100, "the selftest ran only {} checks", checks.len());
}

#[test]
fn selftest_passes_on_the_emulated_device_and_launches_every_kernel() {
    let dev = Arc::new(CudaDevice::emulated().expect("the emulated device opens"));
    run_selftest(&dev);
    let counts = dev.emulator().expect("an emulated device").launch_counts();
    let missed: Vec<&str> = KernelFile::ALL.iter().flat_map(|f| f.functions().iter().copied()).filter(|k| !counts.contains_key(k)).collect();
    assert!(missed.is_empty(), "the selftest never launched {missed:?}");
}

/// Warps and lanes in reverse order: a kernel that reads what another thread writes without a
/// barrier in between sees another value in one of the two orders.
#[test]
fn selftest_passes_with_threads_run_in_reverse_order() {
    let dev = Arc::new(CudaDevice::emulated_with(EmuOptions { order: Order::Descending, ..Default::default() }).unwrap());
    run_selftest(&dev);
}

/// A cuBLASLt with no algorithm for the fused epilogues (GELU_AUX_BIAS, DGELU, BGRADA): every
/// op and whole step still matches, through the unfused fallbacks, and those ran.
#[test]
fn selftest_passes_when_cublaslt_refuses_the_fused_epilogues() {
    let dev = Arc::new(CudaDevice::emulated_with(EmuOptions { refuse_fused_epilogues: true, ..Default::default() }).unwrap());
    run_selftest(&dev);
    let counts = dev.emulator().unwrap().launch_counts();
    for k in ["gelu_forward", "gelu_backward", "column_sum_partial"] {
        assert!(counts.get(k).copied().unwrap_or(0) > 0, "the fallback kernel {k} never ran");
    }
}

/// `D = alpha·op(A)·op(B) + beta·C`, column-major, computed term by term in f64 from the
/// cuBLASLt documentation: element (i, j) of a stored matrix is at `i + j·ld`.
fn reference(m: usize, n: usize, k: usize, ta: bool, tb: bool, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &[f32], ldc: usize, alpha: f32, beta: f32) -> Vec<f32> {
    let mut d = vec![0.0f32; ldc * n];
    for j in 0..n {
        for i in 0..m {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                s += av as f64 * bv as f64;
            }
            let cv = if beta == 0.0 { 0.0 } else { beta as f64 * c[i + j * ldc] as f64 };
            d[i + j * ldc] = (alpha as f64 * s + cv) as f32;
        }
    }
    d
}

/// A gemm operand on the device, as f32 or as bf16 bits.
enum Operand {
    F32(DevBuf<f32>),
    Bf16(DevBuf<u16>),
}

impl Operand {
    fn ptr(&self) -> DPtr {
        match self {
            Operand::F32(b) => b.ptr(),
            Operand::Bf16(b) => b.ptr(),
        }
    }
}

fn bf16_round(x: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = x.iter().map(|&v| selftest::bf16_rne(v)).collect();
    let back = bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    (bits, back)
}

#[test]
fn emulated_gemm_follows_the_cublaslt_contract() {
    let dev = CudaDevice::emulated().unwrap();
    let (m, n, k) = (7usize, 5usize, 9usize);
    let mut rng = Rng::new(3);
    for dtype in [DataType::F32, DataType::Bf16] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for pad in [0usize, 3] {
                // The bias epilogue: D = alpha·op(A)·op(B) + beta·C + bias, bias (m) broadcast over columns.
                for (alpha, beta, with_bias) in [(1.0f32, 0.0f32, false), (0.5, 1.0, false), (2.0, -0.25, false), (1.0, 0.0, true), (0.5, 1.0, true)] {
                    // Stored shapes: A is m×k (k×m when transposed), B k×n (n×k), ld = rows + pad.
                    let (ar, ac) = if ta { (k, m) } else { (m, k) };
                    let (br, bc) = if tb { (n, k) } else { (k, n) };
                    let (lda, ldb, ldc) = (ar + pad, br + pad, m + pad);
                    let mut a: Vec<f32> = (0..lda * ac).map(|_| rng.normal()).collect();
                    let mut b: Vec<f32> = (0..ldb * bc).map(|_| rng.normal()).collect();
                    let c: Vec<f32> = (0..ldc * n).map(|_| rng.normal()).collect();
                    let bias: Vec<f32> = (0..m).map(|_| rng.normal()).collect();
                    let gbias = dev.upload_new(&bias).unwrap();
                    let (ga, gb) = match dtype {
                        DataType::F32 => (Operand::F32(dev.upload_new(&a).unwrap()), Operand::F32(dev.upload_new(&b).unwrap())),
                        DataType::Bf16 => {
                            let (abits, aback) = bf16_round(&a);
                            let (bbits, bback) = bf16_round(&b);
                            (a, b) = (aback, bback);
                            (Operand::Bf16(dev.upload_new(&abits).unwrap()), Operand::Bf16(dev.upload_new(&bbits).unwrap()))
                        }
                    };
                    // C in place; with beta = 0 it holds NaN, which cuBLASLt must not read.
                    let c_init: Vec<f32> = if beta == 0.0 { vec![f32::NAN; ldc * n] } else { c.clone() };
                    let gc = dev.upload_new(&c_init).unwrap();
                    let lay = |dt, rows: usize, cols: usize, ld: usize| MatrixLayout { dtype: dt, rows: rows as u64, cols: cols as u64, ld: ld as i64 };
                    let mm = Matmul {
                        trans_a: ta,
                        trans_b: tb,
                        alpha,
                        beta,
                        a: ga.ptr(),
                        a_layout: lay(dtype, ar, ac, lda),
                        b: gb.ptr(),
                        b_layout: lay(dtype, br, bc, ldb),
                        c: gc.ptr(),
                        c_layout: lay(DataType::F32, m, n, ldc),
                        d: gc.ptr(),
                        d_layout: lay(DataType::F32, m, n, ldc),
                        epilogue: if with_bias { Epilogue::Bias(gbias.ptr()) } else { Epilogue::Default },
                    };
                    dev.matmul(&mm).unwrap();
                    let got = dev.to_host(&gc).unwrap();
                    let mut want = reference(m, n, k, ta, tb, &a, lda, &b, ldb, &c, ldc, alpha, beta);
                    if with_bias {
                        for j in 0..n {
                            for i in 0..m {
                                want[i + j * ldc] += bias[i];
                            }
                        }
                    }
                    for j in 0..n {
                        for i in 0..m {
                            let (g, w) = (got[i + j * ldc], want[i + j * ldc]);
                            // f32 sums of 9 products in another order: a few ulps of the magnitudes summed.
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{dtype:?} ta={ta} tb={tb} pad={pad} alpha={alpha} beta={beta} bias={with_bias}: D({i},{j}) = {g}, want {w}"
                            );
                        }
                        for i in m..ldc {
                            assert_eq!(got[i + j * ldc].to_bits(), c_init[i + j * ldc].to_bits(), "padding row {i} of column {j} was written");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn emulated_gemm_refuses_what_cublaslt_refuses() {
    let dev = CudaDevice::emulated().unwrap();
    let (a, b, c) = (dev.alloc::<f32>(64).unwrap(), dev.alloc::<f32>(64).unwrap(), dev.alloc::<f32>(64).unwrap());
    let lay = |rows: u64, cols: u64, ld: i64| MatrixLayout { dtype: DataType::F32, rows, cols, ld };
    let good = Matmul {
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
        a: a.ptr(),
        a_layout: lay(4, 3, 4),
        b: b.ptr(),
        b_layout: lay(3, 5, 3),
        c: c.ptr(),
        c_layout: lay(4, 5, 4),
        d: c.ptr(),
        d_layout: lay(4, 5, 4),
        epilogue: Epilogue::Default,
    };
    dev.matmul(&good).unwrap();
    let e = dev.matmul(&Matmul { a_layout: lay(4, 3, 3), ..good }).unwrap_err().to_string();
    assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains("ld must be at least the rows"), "{e}");
    let e = dev.matmul(&Matmul { trans_a: true, ..good }).unwrap_err().to_string();
    assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains("op(A) is 3×4"), "{e}");
    let e = dev.matmul(&Matmul { b_layout: MatrixLayout { dtype: DataType::Bf16, ..lay(3, 5, 3) }, ..good }).unwrap_err().to_string();
    assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED"), "{e}");
    let e = dev.matmul(&Matmul { a_layout: lay(8, 9, 8), c_layout: lay(8, 5, 8), d_layout: lay(8, 5, 8), b_layout: lay(9, 5, 9), ..good }).unwrap_err().to_string();
    assert!(e.contains("not inside one device allocation"), "{e}");
    let e = dev.matmul(&Matmul { d: a.ptr(), c: a.ptr(), ..good }).unwrap_err().to_string();
    assert!(e.contains("D overlaps A"), "{e}");
    let e = dev.matmul(&Matmul { a: DPtr(8), ..good }).unwrap_err().to_string();
    assert!(e.contains("not inside one device allocation"), "{e}");
    // The bias epilogue: a vector of m f32, 16-byte aligned, inside one allocation, not D.
    let bias = dev.alloc::<f32>(8).unwrap();
    dev.matmul(&Matmul { epilogue: Epilogue::Bias(bias.ptr()), ..good }).unwrap();
    let e = dev.matmul(&Matmul { epilogue: Epilogue::Bias(bias.at(1)), ..good }).unwrap_err().to_string();
    assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED") && e.contains("16-byte aligned"), "{e}");
    let e = dev.matmul(&Matmul { epilogue: Epilogue::Bias(bias.at(8)), ..good }).unwrap_err().to_string();
    assert!(e.contains("bias vector") && e.contains("not inside one device allocation"), "{e}");
    let e = dev.matmul(&Matmul { epilogue: Epilogue::Bias(c.ptr()), ..good }).unwrap_err().to_string();
    assert!(e.contains("D overlaps the bias vector"), "{e}");
}

/// Training on the emulated device follows the CPU trainer step for step (f32), and a
/// checkpoint taken midway resumes bit for bit through the CUDA trainer (f32 and bf16).
/// One block thread: atomics (the embedding gradient) then add in a fixed order, so two runs
/// of the same steps give the same bits.
#[test]
fn cuda_trainer_checkpoints_resume_bit_for_bit() {
    let dev = Arc::new(CudaDevice::emulated_with(EmuOptions { threads: 1, ..Default::default() }).unwrap());
    let (cfg, tc, micro) = selftest::step_setup();
    let tmp = std::env::temp_dir().join(format!("liandan-cuda-resume-{}", std::process::id()));
    for prec in [Precision::F32, Precision::Bf16] {
        let mut a = CudaTrainer::new(dev.clone(), cfg.clone(), tc.clone(), prec).unwrap();
        for _ in 0..2 {
            a.train_step(&micro, None, None).unwrap();
        }
        let dir = tmp.join(format!("{prec:?}"));
        let rng_at_save = a.rng.state();
        a.save(&dir, DataCursor { position: 42 }, "bytes", &[]).unwrap();
        let la: Vec<f32> = (0..3).map(|_| a.train_step(&micro, None, None).unwrap().loss).collect();
        let (mut b, state) = CudaTrainer::resume(dev.clone(), &dir, prec).unwrap();
        assert_eq!((state.step, state.optimizer_t, state.data_cursor.position), (2, 2, 42));
        assert_eq!(b.rng.state(), rng_at_save, "RNG restored");
        let lb: Vec<f32> = (0..3).map(|_| b.train_step(&micro, None, None).unwrap().loss).collect();
        assert_eq!(la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lb.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{prec:?}: losses after resume");
        assert_eq!(a.step, b.step);
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert!(bits(a.model.params_to_host().unwrap()) == bits(b.model.params_to_host().unwrap()), "{prec:?}: parameters after resume differ");
        let ((ma, va), (mb, vb)) = (a.moments_to_host().unwrap(), b.moments_to_host().unwrap());
        assert!(bits(ma) == bits(mb) && bits(va) == bits(vb), "{prec:?}: AdamW moments after resume differ");
        assert_eq!(dev.to_host(&a.model.params_bf16).unwrap(), dev.to_host(&b.model.params_bf16).unwrap(), "{prec:?}: bf16 weight copy");
    }

    // A CPU trainer's checkpoint continues on the CUDA trainer as on the CPU (f32, within the
    // whole-step tolerance: another summation order, not another trajectory).
    let mut cpu = Trainer::new(cfg.clone(), tc.clone()).unwrap();
    cpu.train_step(&micro).unwrap();
    let dir = tmp.join("cpu");
    cpu.save(&dir, DataCursor::default(), "bytes", &[]).unwrap();
    let (mut gpu, _) = CudaTrainer::resume(dev.clone(), &dir, Precision::F32).unwrap();
    assert_eq!(gpu.rng.state(), cpu.rng.state());
    for s in 0..4 {
        let (lc, lg) = (cpu.train_step(&micro).unwrap().loss, gpu.train_step(&micro, None, None).unwrap().loss);
        assert!((lc - lg).abs() <= 1e-4 * lc.abs(), "step {s} after resume: CPU loss {lc}, CUDA loss {lg}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A short run on the emulated device learns: 30 steps of the whole-step model lower the loss
/// on a repeated batch, as the CPU trainer's do, and both trajectories agree (f32).
#[test]
fn a_short_training_run_on_the_emulated_device_tracks_the_cpu() {
    let dev = Arc::new(CudaDevice::emulated().unwrap());
    let (cfg, mut tc, micro) = selftest::step_setup();
    tc.schedule.total_steps = 30;
    tc.schedule.max_lr = 1e-2;
    tc.schedule.min_lr = 1e-3;
    let mut cpu = Trainer::new(cfg.clone(), tc.clone()).unwrap();
    let mut gpu = CudaTrainer::new(dev, cfg, tc, Precision::F32).unwrap();
    let (mut first, mut last) = (0.0, 0.0);
    for s in 0..30 {
        let (lc, lg) = (cpu.train_step(&micro).unwrap().loss, gpu.train_step(&micro, None, None).unwrap().loss);
        // Rounding differences grow over steps; 1e-3 relative still separates any real bug.
        assert!((lc - lg).abs() <= 1e-3 * lc.abs(), "step {s}: CPU loss {lc}, CUDA loss {lg}");
        if s == 0 {
            first = lg;
        }
        last = lg;
    }
    assert!(last < 0.5 * first, "30 steps on one batch should halve the loss: {first} -> {last}");
}

#[test]
fn measured_gemm_peak_runs_on_the_emulated_device_and_refuses_an_empty_size() {
    use liandan_worker::backend::cuda::peak::measured_gemm_flops;
    let dev = CudaDevice::emulated().unwrap();
    for prec in [Precision::Bf16, Precision::F32] {
        let f = measured_gemm_flops(&dev, prec, 48, 2).unwrap();
        assert!(f.is_finite() && f > 0.0, "{prec:?}: {f}");
    }
    let e = measured_gemm_flops(&dev, Precision::Bf16, 0, 1).unwrap_err().to_string();
    assert!(e.contains("n = 0"), "{e}");
}

/// GELU in f64, the tanh form the GELU epilogues follow, and its derivative.
fn gelu64(x: f64) -> (f64, f64) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let th = (k * (x + 0.044715 * x.powi(3))).tanh();
    (0.5 * x * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x))
}

#[test]
fn emulated_gelu_epilogues_follow_the_contract_and_refuse_a_bad_aux_matrix() {
    let dev = CudaDevice::emulated().unwrap();
    let (m, n, k) = (7usize, 5usize, 9usize);
    let mut rng = Rng::new(4);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    let bias: Vec<f32> = (0..m).map(|_| rng.normal()).collect();
    let (ga, gb, gbias) = (dev.upload_new(&a).unwrap(), dev.upload_new(&b).unwrap(), dev.upload_new(&bias).unwrap());
    let lay = |rows: usize, cols: usize, ld: usize| MatrixLayout { dtype: DataType::F32, rows: rows as u64, cols: cols as u64, ld: ld as i64 };
    let prod = reference(m, n, k, false, false, &a, m, &b, k, &[], m, 1.0, 0.0);
    for aux_ld in [8usize, 16] {
        // Forward: aux = A·B + bias, D = GELU(aux); aux rows past m untouched.
        let (gd, gaux) = (dev.upload_new(&vec![f32::NAN; m * n]).unwrap(), dev.upload_new(&vec![-7.0f32; aux_ld * n]).unwrap());
        let mm = Matmul {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            a: ga.ptr(),
            a_layout: lay(m, k, m),
            b: gb.ptr(),
            b_layout: lay(k, n, k),
            c: gd.ptr(),
            c_layout: lay(m, n, m),
            d: gd.ptr(),
            d_layout: lay(m, n, m),
            epilogue: Epilogue::GeluAuxBias { bias: gbias.ptr(), aux: gaux.ptr(), aux_ld: aux_ld as i64 },
        };
        dev.matmul(&mm).unwrap();
        let (d, aux) = (dev.to_host(&gd).unwrap(), dev.to_host(&gaux).unwrap());
        for j in 0..n {
            for i in 0..m {
                let x = prod[i + j * m] as f64 + bias[i] as f64;
                let (g, _) = gelu64(x);
                assert!((aux[i + j * aux_ld] as f64 - x).abs() <= 1e-5 * (1.0 + x.abs()), "aux({i},{j}) = {}, want {x}", aux[i + j * aux_ld]);
                assert!((d[i + j * m] as f64 - g).abs() <= 1e-5 * (1.0 + g.abs()), "D({i},{j}) = {}, want {g}", d[i + j * m]);
            }
            for i in m..aux_ld {
                assert_eq!(aux[i + j * aux_ld], -7.0, "aux padding row {i} of column {j} was written");
            }
        }
        // Backward: D = (A·B) ⊙ GELU'(aux), the aux matrix read.
        let gd2 = dev.upload_new(&vec![f32::NAN; m * n]).unwrap();
        dev.matmul(&Matmul { c: gd2.ptr(), d: gd2.ptr(), epilogue: Epilogue::DGelu { aux: gaux.ptr(), aux_ld: aux_ld as i64 }, ..mm }).unwrap();
        let d2 = dev.to_host(&gd2).unwrap();
        for j in 0..n {
            for i in 0..m {
                let (_, dg) = gelu64(aux[i + j * aux_ld] as f64);
                let w = prod[i + j * m] as f64 * dg;
                assert!((d2[i + j * m] as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "DGELU D({i},{j}) = {}, want {w}", d2[i + j * m]);
            }
        }
        // Refusals: the leading dimension, the alignment, the allocation, aliasing D.
        let with = |aux: DPtr, ld: i64| Matmul { epilogue: Epilogue::DGelu { aux, aux_ld: ld }, ..mm };
        let e = dev.matmul(&with(gaux.ptr(), 12)).unwrap_err().to_string();
        assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains("multiple of 8"), "{e}");
        let e = dev.matmul(&with(gaux.ptr(), 0)).unwrap_err().to_string();
        assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains("at least m = 7"), "{e}");
        let e = dev.matmul(&with(gaux.at(1), aux_ld as i64)).unwrap_err().to_string();
        assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED") && e.contains("16-byte aligned"), "{e}");
        let e = dev.matmul(&with(gaux.at(aux_ld), aux_ld as i64)).unwrap_err().to_string();
        assert!(e.contains("not inside one device allocation"), "{e}");
        let big = dev.alloc::<f32>(aux_ld * n).unwrap();
        let e = dev
            .matmul(&Matmul { c: big.ptr(), d: big.ptr(), epilogue: Epilogue::GeluAuxBias { bias: gbias.ptr(), aux: big.ptr(), aux_ld: aux_ld as i64 }, ..mm })
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps D"), "{e}");
    }
}

/// Uploads through a staging buffer arrive in order (the buffer is reused at once), and one
/// that overruns the staging buffer or the destination is refused, leaving the data as it was.
#[test]
fn staged_uploads_arrive_and_refuse_what_does_not_fit() {
    let dev = CudaDevice::emulated().unwrap();
    let buf: DevBuf<u32> = dev.alloc(8).unwrap();
    let mut stage = dev.staging::<u32>(4).unwrap();
    stage.upload(&buf, 0, &[1, 2, 3, 4]).unwrap();
    stage.upload(&buf, 4, &[5, 6]).unwrap();
    assert_eq!(dev.to_host(&buf).unwrap(), vec![1, 2, 3, 4, 5, 6, 0, 0]);
    let e = stage.upload(&buf, 0, &[9; 5]).unwrap_err().to_string();
    assert!(e.contains("staging buffer of 4"), "{e}");
    let e = stage.upload(&buf, 6, &[9; 3]).unwrap_err().to_string();
    assert!(e.contains("outside a buffer of 8"), "{e}");
    assert_eq!(dev.to_host(&buf).unwrap(), vec![1, 2, 3, 4, 5, 6, 0, 0]);
}

/// BGRADA: `D = op(A)·op(B) + beta·C` as with no epilogue, and `Σ_p op(A)(i, p)` written over
/// the vector, with A stored either way; a vector that is unaligned or aliases A is refused.
#[test]
fn emulated_bias_gradient_epilogue_follows_the_contract() {
    let dev = CudaDevice::emulated().unwrap();
    let (m, n, k) = (6usize, 4usize, 11usize);
    let mut rng = Rng::new(5);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
    let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
    let (ga, gb) = (dev.upload_new(&a).unwrap(), dev.upload_new(&b).unwrap());
    let lay = |rows: usize, cols: usize, ld: usize| MatrixLayout { dtype: DataType::F32, rows: rows as u64, cols: cols as u64, ld: ld as i64 };
    for trans_a in [false, true] {
        // op(A) is m×k: stored m×k (ld m), or k×m (ld k) when transposed.
        let (a_layout, lda) = if trans_a { (lay(k, m, k), k) } else { (lay(m, k, m), m) };
        let at = |i: usize, p: usize| if trans_a { a[p + i * lda] } else { a[i + p * lda] };
        let (gd, gbias) = (dev.upload_new(&c0).unwrap(), dev.upload_new(&vec![f32::NAN; m + 4]).unwrap());
        let mm = Matmul {
            trans_a,
            trans_b: false,
            alpha: 1.0,
            beta: 1.0,
            a: ga.ptr(),
            a_layout,
            b: gb.ptr(),
            b_layout: lay(k, n, k),
            c: gd.ptr(),
            c_layout: lay(m, n, m),
            d: gd.ptr(),
            d_layout: lay(m, n, m),
            epilogue: Epilogue::BGradA(gbias.ptr()),
        };
        dev.matmul(&mm).unwrap();
        let want_d = reference(m, n, k, trans_a, false, &a, lda, &b, k, &c0, m, 1.0, 1.0);
        let (d, bias) = (dev.to_host(&gd).unwrap(), dev.to_host(&gbias).unwrap());
        for (i, (&g, &w)) in d.iter().zip(&want_d).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "transa={trans_a}: D[{i}] = {g}, want {w}");
        }
        for i in 0..m {
            let w: f64 = (0..k).map(|p| at(i, p) as f64).sum();
            assert!((bias[i] as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "transa={trans_a}: dbias[{i}] = {}, want {w}", bias[i]);
        }
        assert!(bias[m..].iter().all(|x| x.is_nan()), "BGRADA wrote past m elements: {bias:?}");
        let e = dev.matmul(&Matmul { epilogue: Epilogue::BGradA(gbias.at(1)), ..mm }).unwrap_err().to_string();
        assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED") && e.contains("16-byte aligned"), "{e}");
        let e = dev.matmul(&Matmul { epilogue: Epilogue::BGradA(ga.ptr()), ..mm }).unwrap_err().to_string();
        assert!(e.contains("bias gradient overlaps A"), "{e}");
    }
}

/// Two ranks, each on its own emulated device, sum their gradients over a real TCP ring in
/// the bucket order the overlapped NCCL path uses (each bucket checked against its ready
/// mark): both end with the same bits, and with what one rank gets from both micro-batches.
#[test]
fn two_ranks_sum_gradient_buckets_after_their_ready_marks() {
    use liandan_worker::collective::{Collective, RingOptions, TcpRing};
    use liandan_worker::model::gpt::loss_denominator;
    use liandan_worker::train::replica_step;
    let (cfg, tc, micro) = selftest::step_setup();
    let denom = loss_denominator(micro.iter().map(|m| (&m.targets[..], m.weights.as_deref())));
    let emu = || Arc::new(CudaDevice::emulated_with(EmuOptions { threads: 1, ..Default::default() }).unwrap());
    let listeners: Vec<_> = (0..2).map(|_| TcpRing::listen("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let ranks: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (cfg, tc, micro, peers) = (cfg.clone(), tc.clone(), micro.clone(), peers.clone());
                s.spawn(move || {
                    let mut ring = TcpRing::connect(l, rank, &peers, 0, RingOptions::default()).unwrap();
                    let mut tr = CudaTrainer::new(emu(), cfg, tc.clone(), Precision::F32).unwrap();
                    let coll: &mut dyn Collective = &mut ring;
                    replica_step(&mut tr.replica, &micro[rank..rank + 1], denom, Some(coll), tc.grad_clip, 1e-3).unwrap();
                    tr.model.params_to_host().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&ranks[0]) == bits(&ranks[1]), "the two ranks' parameters differ after the step");
    let mut one = CudaTrainer::new(emu(), cfg, tc.clone(), Precision::F32).unwrap();
    replica_step(&mut one.replica, &micro, denom, None, tc.grad_clip, 1e-3).unwrap();
    let want = one.model.params_to_host().unwrap();
    let worst = ranks[0].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // Another order of summing the same two gradients; one AdamW step of lr 1e-3 moves each
    // weight by about 1e-3, so 1e-6 tells a rounding apart from a missing bucket.
    assert!(worst <= 1e-6, "two ranks vs one rank with both micro-batches: worst |Δparam| {worst}");
}

/// A write into a gradient bucket after its ready mark is what would race with the side
/// stream's all-reduce on a GPU: the emulated device refuses the bucket's wait, naming it, and
/// the other buckets still pass.
#[test]
fn a_gradient_bucket_written_after_its_mark_is_refused() {
    use liandan_worker::engine::Model;
    let dev = Arc::new(CudaDevice::emulated_with(EmuOptions { threads: 1, ..Default::default() }).unwrap());
    let (cfg, tc, micro) = selftest::step_setup();
    let mut tr = CudaTrainer::new(dev.clone(), cfg, tc, Precision::F32).unwrap();
    let model = &mut tr.replica.model;
    Model::zero_grad(model).unwrap();
    for mb in &micro {
        Model::forward(model, &mb.inputs, mb.b, mb.t).unwrap();
        Model::loss(model, &mb.targets, mb.weights.as_deref(), 1.0, true).unwrap();
        Model::backward(model).unwrap();
    }
    let buckets = model.layout.buckets();
    for slot in 0..buckets {
        dev.side_after_mark(slot).unwrap();
    }
    // Layer 0's first slice, overwritten after the backward marked it.
    let r = model.layout.bucket(0)[0].clone();
    dev.zero(&model.grads, r.start, 4).unwrap();
    let err = dev.side_after_mark(0).unwrap_err().to_string();
    assert!(err.contains("mark 0") && err.contains("changed after the mark"), "{err}");
    for slot in 1..buckets {
        dev.side_after_mark(slot).unwrap();
    }
}
