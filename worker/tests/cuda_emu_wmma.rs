//! The emulated warp matrix functions (`nvcuda::wmma`, `emu/include/mma.h`) through the probe
//! kernels of `emu/probe_wmma.cu`: tile products in every layout and padded leading dimension
//! against a plain f64 reference, in-place accumulation over K, the element mapping, the
//! missing implicit barrier after a store, and the calls the Programming Guide forbids.

use liandan_worker::backend::cuda::device::{Arg, LaunchConfig};
use liandan_worker::backend::cuda::emu::{EmuOptions, Order};
use liandan_worker::backend::cuda::selftest::bf16_rne;
use liandan_worker::backend::cuda::{CudaDevice, CudaError};
use liandan_worker::rng::Rng;

fn dev() -> CudaDevice {
    CudaDevice::emulated().expect("the emulated device opens")
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn err(r: Result<(), CudaError>) -> String {
    r.expect_err("the emulated device must refuse this").to_string()
}

/// `n` values rounded to bf16: the bits and their exact f32 values.
fn bf16_values(n: usize, rng: &mut Rng) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = (0..n).map(|_| bf16_rne(rng.normal())).collect();
    let vals = bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    (bits, vals)
}

/// Element (r, c) of a 16×16 tile stored with leading dimension `ld`.
fn at(col_major: bool, ld: usize, r: usize, c: usize) -> usize {
    if col_major { c * ld + r } else { r * ld + c }
}

/// Bound on the f32 error of `c + Σ_k a·b` summed term by term: n additions each within half
/// an ulp (u = 2⁻²⁴) of the running sum, bounded by Σ|terms| (the recursive-summation bound
/// γ_n·Σ|x| with n = k + 1). The products themselves are exact (bf16 × bf16 fits in f32).
fn sum_bound(terms_abs: f64, n: usize) -> f64 {
    n as f64 * f64::powi(2.0, -24) * terms_abs * 1.0001
}

#[test]
fn a_tile_product_matches_a_plain_reference_in_every_layout() {
    let d = dev();
    let mut rng = Rng::new(41);
    // Leading dimensions past 16 (multiples of 16 bytes), so a swapped row/column stride fails.
    let (lda, ldb, ldc, ldd) = (24usize, 16usize, 20usize, 28usize);
    for bits in 0..16 {
        let (a_col, b_col, c_col, d_col) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
        let (abits, a) = bf16_values(16 * lda, &mut rng);
        let (bbits, b) = bf16_values(16 * ldb, &mut rng);
        let c: Vec<f32> = (0..16 * ldc).map(|_| rng.normal()).collect();
        let (ga, gb, gc) = (d.upload_new(&abits).unwrap(), d.upload_new(&bbits).unwrap(), d.upload_new(&c).unwrap());
        let sentinel = -1234.5f32;
        let gd = d.upload_new(&vec![sentinel; 16 * ldd]).unwrap();
        let flag = |x: bool| Arg::I(x as i32);
        let args = [
            Arg::P(gd.ptr()),
            Arg::P(ga.ptr()),
            Arg::P(gb.ptr()),
            Arg::P(gc.ptr()),
            flag(a_col),
            flag(b_col),
            flag(c_col),
            flag(d_col),
            Arg::I(lda as i32),
            Arg::I(ldb as i32),
            Arg::I(ldc as i32),
            Arg::I(ldd as i32),
        ];
        d.launch("probe_wmma_mma", cfg(1, 32), &args).unwrap();
        let got = d.to_host(&gd).unwrap();
        let mut written = vec![false; 16 * ldd];
        for m in 0..16 {
            for n in 0..16 {
                let cv = c[at(c_col, ldc, m, n)] as f64;
                let (mut want, mut abs) = (cv, cv.abs());
                for k in 0..16 {
                    let p = a[at(a_col, lda, m, k)] as f64 * b[at(b_col, ldb, k, n)] as f64;
                    want += p;
                    abs += p.abs();
                }
                let i = at(d_col, ldd, m, n);
                written[i] = true;
                let e = (got[i] as f64 - want).abs();
                assert!(e <= sum_bound(abs, 17), "layouts a_col={a_col} b_col={b_col} c_col={c_col} d_col={d_col}: d[{m}][{n}] = {} vs {want} (err {e:e})", got[i]);
            }
        }
        for (i, w) in written.iter().enumerate() {
            if !w {
                assert_eq!(got[i], sentinel, "element {i} of d's padding was written (layouts {bits:04b})");
            }
        }
    }
}

/// With small integers every partial sum is exact in f32, so the product must be exact: bf16
/// operands are taken at their exact values and accumulated in f32.
#[test]
fn integer_tiles_multiply_exactly() {
    let d = dev();
    let mut rng = Rng::new(42);
    let small = |rng: &mut Rng| (rng.below(9) as f32) - 4.0;
    let a: Vec<f32> = (0..256).map(|_| small(&mut rng)).collect();
    let b: Vec<f32> = (0..256).map(|_| small(&mut rng)).collect();
    let c: Vec<f32> = (0..256).map(|_| small(&mut rng) * 100.0).collect();
    let to_bits = |v: &[f32]| v.iter().map(|&x| bf16_rne(x)).collect::<Vec<u16>>();
    let (ga, gb, gc, gd) = (d.upload_new(&to_bits(&a)).unwrap(), d.upload_new(&to_bits(&b)).unwrap(), d.upload_new(&c).unwrap(), d.alloc::<f32>(256).unwrap());
    let z = Arg::I(0);
    d.launch("probe_wmma_mma", cfg(1, 32), &[Arg::P(gd.ptr()), Arg::P(ga.ptr()), Arg::P(gb.ptr()), Arg::P(gc.ptr()), z, z, z, z, Arg::I(16), Arg::I(16), Arg::I(16), Arg::I(16)])
        .unwrap();
    let got = d.to_host(&gd).unwrap();
    for m in 0..16 {
        for n in 0..16 {
            let want: f32 = c[m * 16 + n] + (0..16).map(|k| a[m * 16 + k] * b[k * 16 + n]).sum::<f32>();
            assert_eq!(got[m * 16 + n], want, "d[{m}][{n}]");
        }
    }
}

#[test]
fn a_tiled_gemm_accumulates_in_place_over_k() {
    let d = dev();
    let mut rng = Rng::new(43);
    let (m, n, k) = (32usize, 48usize, 64usize);
    let (abits, a) = bf16_values(m * k, &mut rng);
    let (bbits, b) = bf16_values(k * n, &mut rng);
    let (ga, gb) = (d.upload_new(&abits).unwrap(), d.upload_new(&bbits).unwrap());
    let gd = d.upload_new(&vec![f32::NAN; m * n]).unwrap();
    let tiles = (m / 16 * (n / 16)) as u32;
    d.launch("probe_wmma_gemm", cfg(tiles.div_ceil(2), 64), &[Arg::P(gd.ptr()), Arg::P(ga.ptr()), Arg::P(gb.ptr()), Arg::I(m as i32), Arg::I(n as i32), Arg::I(k as i32)]).unwrap();
    let got = d.to_host(&gd).unwrap();
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                let x = a[i * k + p] as f64 * b[p * n + j] as f64;
                want += x;
                abs += x.abs();
            }
            let e = (got[i * n + j] as f64 - want).abs();
            assert!(e <= sum_bound(abs, k), "d[{i}][{j}] = {} vs {want} (err {e:e})", got[i * n + j]);
        }
    }
}

#[test]
fn the_element_mapping_is_a_permutation_no_kernel_may_assume() {
    let d = dev();
    let out = d.alloc::<i32>(768).unwrap();
    d.launch("probe_wmma_mapping", cfg(1, 32), &[Arg::P(out.ptr())]).unwrap();
    let got = d.to_host(&out).unwrap();
    for (k, what) in ["accumulator", "matrix_a", "matrix_b"].iter().enumerate() {
        let map = &got[k * 256..(k + 1) * 256];
        let mut sorted = map.to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..256).collect::<Vec<i32>>(), "{what}: every tile element is held by exactly one lane");
        let identity = map.iter().enumerate().filter(|&(p, &e)| p as i32 == e).count();
        assert!(identity < 16, "{what}: {identity} of 256 elements sit where a row-major lane order would put them");
    }
    let same = (0..256).filter(|&p| got[p] == got[256 + p]).count();
    assert!(same < 16, "the accumulator and matrix_a mappings agree on {same} elements: a kernel reusing one as the other must fail");
}

#[test]
fn a_store_is_not_a_barrier_for_the_other_lanes() {
    for order in [Order::Ascending, Order::Descending] {
        let d = CudaDevice::emulated_with(EmuOptions { order, ..Default::default() }).unwrap();
        let out = d.alloc::<f32>(32).unwrap();
        d.launch("probe_wmma_store_then_read", cfg(1, 32), &[Arg::P(out.ptr()), Arg::I(1)]).unwrap();
        assert!(d.to_host(&out).unwrap().iter().all(|&x| x == 1.0), "{order:?}: after __syncwarp every lane reads the stored tile");
        d.launch("probe_wmma_store_then_read", cfg(1, 32), &[Arg::P(out.ptr()), Arg::I(0)]).unwrap();
        let nan = d.to_host(&out).unwrap().iter().filter(|x| x.is_nan()).count();
        assert!(nan > 0, "{order:?}: without __syncwarp some lane must read shared memory before its owner stored it");
    }
}

#[test]
fn wmma_calls_that_break_the_rules_are_refused() {
    let d = dev();
    let buf = d.alloc::<f32>(1024).unwrap();
    let one = |k: &'static str, threads: u32| err(d.launch(k, cfg(1, threads), &[Arg::P(buf.ptr())]));
    let e = one("probe_wmma_misaligned", 32);
    assert!(e.contains("not 256-bit (32-byte) aligned") && e.contains("probe_wmma.cu:"), "{e}");
    let e = one("probe_wmma_bad_ldm", 32);
    assert!(e.contains("ldm is not a multiple of 16 bytes"), "{e}");
    let e = one("probe_wmma_lane_pointers", 32);
    assert!(e.contains("different mptr, ldm or layout"), "{e}");
    let e = one("probe_wmma_divergent", 32);
    assert!(e.contains("a WMMA operation") && e.contains("exited"), "{e}");
    // WMMA needs whole warps: a block of 48 threads has a 16-thread warp.
    let e = err(d.launch("probe_wmma_store_then_read", cfg(1, 48), &[Arg::P(buf.ptr()), Arg::I(1)]));
    assert!(e.contains("names lanes that do not exist") && e.contains("a WMMA operation"), "{e}");
    // The device still works after refusals.
    let out = d.alloc::<i32>(768).unwrap();
    d.launch("probe_wmma_mapping", cfg(1, 32), &[Arg::P(out.ptr())]).expect("a good kernel after bad ones");
}
