//! Peak dense throughput and memory bandwidth of known GPUs, for MFU (model FLOPs utilisation)
//! and the roofline of `bench train --profile`. Numbers are the vendors' datasheet figures for
//! dense (not 2:4 sparse) math and for the largest memory of each name (the SXM part where there
//! are two); a device not in the table gets no MFU rather than a guess.

use crate::model::profile::Peaks;

/// `(substring of the driver's device name, bf16 dense TFLOP/s, f32 non-tensor TFLOP/s,
/// memory bandwidth TB/s)`. Order matters: the first match wins, so longer names come before
/// their prefixes.
const PEAKS: &[(&str, f64, f64, f64)] = &[
    ("GH200", 989.0, 67.0, 4.0),
    ("H200", 989.0, 67.0, 4.8),
    ("H100 PCIe", 756.0, 51.0, 2.0),
    ("H100", 989.0, 67.0, 3.35),
    ("B200", 2250.0, 80.0, 8.0),
    ("A100", 312.0, 19.5, 2.039),
    ("A10G", 70.0, 31.2, 0.6),
    ("L40S", 362.0, 91.6, 0.864),
    ("L4", 121.0, 30.3, 0.3),
    ("RTX 4090", 165.2, 82.6, 1.008),
    ("V100", 125.0, 15.7, 0.9),
];

fn row(name: &str) -> Option<&'static (&'static str, f64, f64, f64)> {
    PEAKS.iter().find(|r| name.contains(r.0))
}

/// Peak FLOP/s of the device called `name` for matmuls at `precision`, if the table knows it.
pub fn peak_flops(name: &str, precision: super::matmul::Precision) -> Option<f64> {
    row(name).map(|&(_, bf16, f32, _)| {
        1e12 * match precision {
            super::matmul::Precision::Bf16 => bf16,
            super::matmul::Precision::F32 => f32,
        }
    })
}

/// Peak FLOP/s at `precision` and memory bandwidth (bytes/s) of the device called `name`.
pub fn peaks(name: &str, precision: super::matmul::Precision) -> Option<Peaks> {
    let flops_per_s = peak_flops(name, precision)?;
    row(name).map(|r| Peaks { flops_per_s, bytes_per_s: r.3 * 1e12 })
}

/// Measured dense gemm throughput (FLOP/s) of `dev` at `precision`: `iters` timed square
/// `n × n × n` products through the same cuBLASLt path as the model's matmuls (f32 output), after
/// one untimed. The ceiling the model's matmuls can reach on this device in this run, next to
/// the datasheet's [`peak_flops`].
///
/// # Errors
/// `n` or `iters` is 0, the device is out of memory, or a gemm fails.
pub fn measured_gemm_flops(dev: &super::CudaDevice, precision: super::matmul::Precision, n: usize, iters: usize) -> super::error::Result<f64> {
    use super::matmul::{Precision, gemm};
    if n == 0 || iters == 0 {
        return Err(super::CudaError::Shape { op: "measured_gemm_flops", reason: format!("n = {n}, iters = {iters}: both must be at least 1") });
    }
    let mut rng = crate::rng::Rng::new(7);
    let values: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
    let c = dev.alloc::<f32>(n * n)?;
    // Operands in the precision's element type, filled with normal values (not zeros, which
    // could draw less power than real data).
    let (a32, b32, a16, b16);
    let (a, b) = match precision {
        Precision::F32 => {
            (a32, b32) = (dev.upload_new(&values)?, dev.upload_new(&values)?);
            (a32.all().ptr, b32.all().ptr)
        }
        Precision::Bf16 => {
            let bits: Vec<u16> = values.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            (a16, b16) = (dev.upload_new(&bits)?, dev.upload_new(&bits)?);
            (a16.all().ptr, b16.all().ptr)
        }
    };
    let run = || gemm(dev, precision, c.all().ptr, a, b, false, false, n, n, n, 1.0, 0.0);
    run()?;
    dev.sync()?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        run()?;
    }
    dev.sync()?;
    Ok(2.0 * (n as f64).powi(3) * iters as f64 / t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::matmul::Precision;

    #[test]
    fn known_devices_and_unknown_ones() {
        assert_eq!(peak_flops("NVIDIA H200", Precision::Bf16), Some(989e12));
        assert_eq!(peak_flops("NVIDIA H100 PCIe", Precision::Bf16), Some(756e12));
        assert_eq!(peak_flops("NVIDIA H100 80GB HBM3", Precision::Bf16), Some(989e12));
        assert_eq!(peak_flops("NVIDIA A100-SXM4-80GB", Precision::Bf16), Some(312e12));
        assert_eq!(peak_flops("Some Future GPU", Precision::Bf16), None);
        assert_eq!(peaks("NVIDIA H200", Precision::Bf16), Some(Peaks { flops_per_s: 989e12, bytes_per_s: 4.8e12 }));
        assert_eq!(peaks("NVIDIA GH200 480GB", Precision::F32).map(|p| p.bytes_per_s), Some(4.0e12));
        assert_eq!(peaks("Some Future GPU", Precision::Bf16), None);
    }
}
