//! Peak dense throughput of known GPUs, for MFU (model FLOPs utilisation). Numbers are the
//! vendors' datasheet figures for dense (not 2:4 sparse) math; a device not in the table gets no
//! MFU rather than a guess.

/// `(substring of the driver's device name, bf16 dense TFLOP/s, f32 non-tensor TFLOP/s)`.
/// Order matters: the first match wins, so longer names come before their prefixes.
const PEAKS: &[(&str, f64, f64)] = &[
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A10G", 70.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.2, 82.6),
    ("V100", 125.0, 15.7),
];

/// Peak FLOP/s of the device called `name` for matmuls at `precision`, if the table knows it.
pub fn peak_flops(name: &str, precision: super::matmul::Precision) -> Option<f64> {
    PEAKS.iter().find(|(k, _, _)| name.contains(k)).map(|&(_, bf16, f32)| {
        1e12 * match precision {
            super::matmul::Precision::Bf16 => bf16,
            super::matmul::Precision::F32 => f32,
        }
    })
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
    }
}
