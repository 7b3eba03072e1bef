//! The emulated CUDA device itself, through the probe kernels of `emu/probe.cu`: thread and
//! block indices, warp shuffles against the CUDA Programming Guide's definitions, barriers,
//! shared memory, atomics from parallel blocks, and the kernels and launches it must refuse —
//! each refusal naming what is wrong.

use liandan_worker::backend::cuda::device::{Arg, DPtr, LaunchConfig};
use liandan_worker::backend::cuda::emu::{EmuOptions, Order};
use liandan_worker::backend::cuda::{CudaDevice, CudaError};

fn dev() -> CudaDevice {
    CudaDevice::emulated().expect("the emulated device opens")
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: shared }
}

fn err(r: Result<(), CudaError>) -> String {
    r.expect_err("the emulated device must refuse this").to_string()
}

#[test]
fn indices_cover_a_3d_grid_of_3d_blocks() {
    let d = dev();
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let n = (3 * 2 * 2 * 4 * 3 * 2) as usize;
    let (t, b) = (d.alloc::<i32>(n).unwrap(), d.alloc::<i32>(n).unwrap());
    d.launch("probe_indices", cfg(grid, block, 0), &[Arg::P(t.ptr()), Arg::P(b.ptr())]).unwrap();
    let (t, b) = (d.to_host(&t).unwrap(), d.to_host(&b).unwrap());
    let mut i = 0;
    for bz in 0..2 {
        for by in 0..2 {
            for bx in 0..3 {
                for tz in 0..2 {
                    for ty in 0..3 {
                        for tx in 0..4 {
                            assert_eq!(t[i], tx | ty << 8 | tz << 16, "threadIdx of element {i}");
                            assert_eq!(b[i], bx | by << 8 | bz << 16, "blockIdx of element {i}");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// What lane `l` of a 32-lane warp receives from `__shfl_*_sync(full mask, v, arg, width)`,
/// written from the CUDA Programming Guide's description of each intrinsic.
fn shfl_expected(mode: i32, l: usize, arg: usize, width: usize) -> usize {
    let seg = l / width * width;
    match mode {
        0 => {
            if l - seg >= arg {
                l - arg
            } else {
                l
            }
        } // up: from lane - delta, if in the segment
        1 => {
            if l - seg + arg < width {
                l + arg
            } else {
                l
            }
        } // down: from lane + delta, if in the segment
        2 => {
            let s = l ^ arg; // xor: from lane ^ mask; a later segment gives back the own value
            if s / width > l / width { l } else { s }
        }
        _ => seg + arg % width, // idx: srcLane modulo width, in the segment
    }
}

#[test]
fn shuffles_follow_the_programming_guide_for_every_mode_and_width() {
    let d = dev();
    let n = 64; // two warps
    let input: Vec<f32> = (0..n).map(|i| 100.0 + i as f32).collect();
    let inp = d.upload_new(&input).unwrap();
    for mode in 0..4 {
        for width in [32usize, 16, 8, 4, 2, 1] {
            for arg in [0usize, 1, 3, 5, 16, 31] {
                let out = d.alloc::<f32>(n).unwrap();
                d.launch("probe_shfl", cfg((1, 1, 1), (n as u32, 1, 1), 0), &[Arg::P(out.ptr()), Arg::P(inp.ptr()), Arg::I(mode), Arg::I(arg as i32), Arg::I(width as i32)])
                    .unwrap();
                let got = d.to_host(&out).unwrap();
                for i in 0..n {
                    let (w, l) = (i / 32, i % 32);
                    // The PTX lane operand is 5 bits wide: xor and idx see arg mod 32.
                    let want = w * 32 + shfl_expected(mode, l, arg % 32, width);
                    assert_eq!(got[i], input[want], "mode {mode} width {width} arg {arg}: lane {i} got {} want lane {want}", got[i]);
                }
            }
        }
    }
}

#[test]
fn doubles_go_through_a_shuffle_whole() {
    let d = dev();
    let input: Vec<f64> = (0..32).map(|i| 1.0 + 1e-12 * i as f64).collect();
    let (inp, out) = (d.upload_new(&input).unwrap(), d.alloc::<f64>(32).unwrap());
    d.launch("probe_warp_sum_d", cfg((1, 1, 1), (32, 1, 1), 0), &[Arg::P(out.ptr()), Arg::P(inp.ptr())]).unwrap();
    let want: f64 = 32.0 + 1e-12 * (0..32).sum::<i32>() as f64;
    for v in d.to_host(&out).unwrap() {
        assert!((v - want).abs() < 1e-12, "{v} vs {want}: a double lost bits in a shuffle");
    }
}

#[test]
fn half_warps_may_shuffle_with_their_own_masks() {
    let d = dev();
    let out = d.alloc::<i32>(32).unwrap();
    d.launch("probe_half_masks", cfg((1, 1, 1), (32, 1, 1), 0), &[Arg::P(out.ptr())]).unwrap();
    let got = d.to_host(&out).unwrap();
    for l in 0..32 {
        assert_eq!(got[l] as usize, if l < 16 { l ^ 1 } else { l ^ 2 }, "lane {l}");
    }
}

#[test]
fn shared_memory_is_per_block_and_starts_as_garbage() {
    let d = dev();
    let (blocks, n) = (3usize, 256usize);
    let input: Vec<f32> = (0..blocks * n).map(|i| i as f32).collect();
    let (inp, out) = (d.upload_new(&input).unwrap(), d.alloc::<f32>(blocks * n).unwrap());
    d.launch("probe_shared_reverse", cfg((blocks as u32, 1, 1), (n as u32, 1, 1), (n * 4) as u32), &[Arg::P(out.ptr()), Arg::P(inp.ptr())]).unwrap();
    let got = d.to_host(&out).unwrap();
    for b in 0..blocks {
        for t in 0..n {
            assert_eq!(got[b * n + t], 3.0 * input[b * n + n - 1 - t], "block {b} thread {t}");
        }
    }
    let out = d.alloc::<f32>(64).unwrap();
    d.launch("probe_shared_unwritten", cfg((1, 1, 1), (64, 1, 1), 256), &[Arg::P(out.ptr())]).unwrap();
    assert!(d.to_host(&out).unwrap().iter().all(|x| x.is_nan()), "unwritten shared memory reads as NaN");
}

#[test]
fn syncwarp_orders_a_warps_shared_writes_before_its_reads() {
    for order in [Order::Ascending, Order::Descending] {
        let d = CudaDevice::emulated_with(EmuOptions { order, ..Default::default() }).unwrap();
        let out = d.alloc::<i32>(32).unwrap();
        d.launch("probe_syncwarp", cfg((1, 1, 1), (32, 1, 1), 0), &[Arg::P(out.ptr())]).unwrap();
        let got = d.to_host(&out).unwrap();
        for l in 0..32 {
            assert_eq!(got[l], ((l + 1) % 32) as i32 * 10, "{order:?}: lane {l}");
        }
    }
}

#[test]
fn atomics_from_parallel_blocks_lose_no_update() {
    let d = CudaDevice::emulated_with(EmuOptions { threads: 2, ..Default::default() }).unwrap();
    let (blocks, threads) = (512u32, 64u32);
    let (acc, iacc, dacc) = (d.alloc::<f32>(2).unwrap(), d.alloc::<i32>(1).unwrap(), d.alloc::<f64>(1).unwrap());
    d.launch("probe_atomics", cfg((blocks, 1, 1), (threads, 1, 1), 0), &[Arg::P(acc.ptr()), Arg::P(iacc.ptr()), Arg::P(dacc.ptr())]).unwrap();
    let total = (blocks * threads) as f64;
    // Every partial sum is an integer below 2^24, so float addition is exact in any order.
    assert_eq!(d.to_host(&acc).unwrap(), vec![total as f32, (threads as f64 * (blocks as f64 - 1.0) * blocks as f64 / 2.0) as f32]);
    assert_eq!(d.to_host(&iacc).unwrap(), vec![total as i32]);
    assert_eq!(d.to_host(&dacc).unwrap(), vec![0.5 * total]);
}

#[test]
fn bf16_conversions_round_to_nearest_even_and_widen_exactly() {
    let d = dev();
    // 1 + 2^-8 and 1 + 3·2^-8 are exact ties between two bf16 values (to even: down, then up).
    let ties = [f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)];
    let x: Vec<f32> = [1.0f32, ties[0], ties[1], -2.5e-40, f32::MAX, -0.0, f32::INFINITY, f32::NAN, std::f32::consts::PI, 65504.0, 1e-38]
        .into_iter()
        .chain((0..1000).map(|i| (i as f32 * 0.731).sin() * 1000.0))
        .collect();
    let n = x.len();
    let (inp, out, back) = (d.upload_new(&x).unwrap(), d.alloc::<u16>(n).unwrap(), d.alloc::<f32>(n).unwrap());
    d.launch("probe_bf16", cfg(((n as u32).div_ceil(128), 1, 1), (128, 1, 1), 0), &[Arg::P(out.ptr()), Arg::P(back.ptr()), Arg::P(inp.ptr()), Arg::L(n as i64)]).unwrap();
    let (bits, widened) = (d.to_host(&out).unwrap(), d.to_host(&back).unwrap());
    for i in 0..n {
        let want = liandan_worker::backend::cuda::selftest::bf16_rne(x[i]);
        assert_eq!(bits[i], want, "bf16({:e}) = {:#06x}, round-to-nearest-even gives {want:#06x}", x[i], bits[i]);
        assert_eq!(widened[i].to_bits(), (want as u32) << 16, "widening {want:#06x}");
    }
}

#[test]
fn broken_kernels_are_refused_with_the_line_that_broke_the_rule() {
    let d = dev();
    let out = d.alloc::<i32>(1024).unwrap();
    let one = |k: &'static str, threads: u32| err(d.launch(k, cfg((1, 1, 1), (threads, 1, 1), 0), &[Arg::P(out.ptr())]));
    let e = one("probe_divergent_barrier", 64);
    assert!(e.contains("different __syncthreads") && e.contains("probe.cu:"), "{e}");
    let e = one("probe_exit_before_barrier", 64);
    assert!(e.contains("reached by 63 of 64 threads") && e.contains("1 exited"), "{e}");
    let e = one("probe_exit_before_shfl", 32);
    assert!(e.contains("exited") && e.contains("__shfl_xor_sync"), "{e}");
    let e = one("probe_mask_without_self", 32);
    assert!(e.contains("leaves out its own lane"), "{e}");
    let e = one("probe_deadlock", 32);
    assert!(e.contains("no thread can continue") && e.contains("__syncthreads at") && e.contains("__shfl_xor_sync (mask 0xffffffff)"), "{e}");
    let e = one("probe_big_static_shared", 64);
    assert!(e.contains("50176 bytes") && e.contains("over the limit of 49152"), "{e}");
    // The device still works after refusals.
    d.launch("probe_half_masks", cfg((1, 1, 1), (32, 1, 1), 0), &[Arg::P(out.ptr())]).expect("a good kernel after bad ones");
}

#[test]
fn a_write_past_the_end_of_a_buffer_is_caught() {
    let d = dev();
    let buf = d.alloc::<f32>(100).unwrap();
    let e = err(d.launch("probe_write_past_end", cfg((1, 1, 1), (128, 1, 1), 0), &[Arg::P(buf.ptr()), Arg::I(100)]));
    assert!(e.contains("wrote outside an allocation of 400 bytes") && e.contains("the 4-byte word at byte 400, past its end"), "{e}");
}

#[test]
fn launches_beyond_sm90_limits_are_refused() {
    let d = dev();
    let out = d.alloc::<f32>(2048).unwrap();
    let p = [Arg::P(out.ptr())];
    let e = err(d.launch("probe_half_masks", cfg((1, 1, 1), (1025, 1, 1), 0), &p));
    assert!(e.contains("1025 threads per block") && e.contains("1024"), "{e}");
    let e = err(d.launch("probe_half_masks", cfg((1, 1, 1), (1, 1, 65), 0), &p));
    assert!(e.contains("block dimension z = 65") && e.contains("64"), "{e}");
    let e = err(d.launch("probe_half_masks", cfg((1, 65_536, 1), (32, 1, 1), 0), &p));
    assert!(e.contains("grid dimension y = 65536") && e.contains("65535"), "{e}");
    let e = err(d.launch("probe_half_masks", cfg((0, 1, 1), (32, 1, 1), 0), &p));
    assert!(e.contains("zero dimension"), "{e}");

    // Dynamic shared memory: 48 KiB by default, more only with the opt-in, at most 227 KiB.
    let floats = 12_544; // 49 KiB
    let args = [Arg::P(out.ptr()), Arg::I(floats)];
    let e = err(d.launch("probe_dynamic_shared", cfg((1, 1, 1), (32, 1, 1), (floats * 4) as u32), &args));
    assert!(e.contains("50176 bytes of dynamic shared memory") && e.contains("49152") && e.contains("set_max_dynamic_shared"), "{e}");
    d.set_max_dynamic_shared("probe_dynamic_shared", (floats * 4) as u32).unwrap();
    d.launch("probe_dynamic_shared", cfg((1, 1, 1), (32, 1, 1), (floats * 4) as u32), &args).expect("49 KiB after the opt-in");
    assert_eq!(d.to_host(&out).unwrap()[0], 3.0);
    let e = d.set_max_dynamic_shared("probe_dynamic_shared", 232_449).unwrap_err().to_string();
    assert!(e.contains("232449") && e.contains("232448"), "{e}");
}

#[test]
fn arguments_must_match_the_kernels_signature_and_point_into_device_memory() {
    let d = dev();
    let out = d.alloc::<f32>(1).unwrap();
    let c = cfg((1, 1, 1), (32, 1, 1), 0);
    d.launch("probe_args", c, &[Arg::P(out.ptr()), Arg::I(1), Arg::L(2), Arg::F(0.5)]).unwrap();
    assert_eq!(d.to_host(&out).unwrap(), vec![3.5]);
    let e = err(d.launch("probe_args", c, &[Arg::P(out.ptr()), Arg::I(1), Arg::I(2), Arg::F(0.5)]));
    assert!(e.contains("(pointer, int, int, float) do not match the kernel's parameters (pointer, int, long long, float)") && e.contains("probe.cu"), "{e}");
    let e = err(d.launch("probe_args", c, &[Arg::P(out.ptr()), Arg::I(1), Arg::L(2)]));
    assert!(e.contains("do not match"), "{e}");
    let host = [0.0f32; 4];
    let e = err(d.launch("probe_args", c, &[Arg::P(DPtr(host.as_ptr() as u64)), Arg::I(1), Arg::L(2), Arg::F(0.5)]));
    assert!(e.contains("argument 0") && e.contains("not an address inside a live allocation"), "{e}");
    let e = err(d.launch("no_such_kernel", c, &[]));
    assert!(e.contains("no_such_kernel") && e.contains("no such kernel"), "{e}");
}

#[test]
fn copies_outside_a_buffer_are_refused() {
    let d = dev();
    let buf = d.alloc::<f32>(10).unwrap();
    let e = d.upload(&buf, 8, &[1.0, 2.0, 3.0]).unwrap_err().to_string();
    assert!(e.contains("range 8..11 outside a buffer of 10"), "{e}");
}
