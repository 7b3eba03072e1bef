//! Which backend a process runs on.

use std::fmt;
use std::str::FromStr;

use super::cuda::CudaError;

/// A compute device kind, as `--device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// f32 on the CPU (gemm + rayon): the reference backend.
    Cpu,
    /// An NVIDIA GPU through the CUDA driver, NVRTC kernels, cuBLASLt and NCCL.
    Cuda,
}

impl Device {
    /// The best device this machine offers: `Cuda` when the CUDA driver loads and reports at
    /// least one GPU and NVRTC and cuBLASLt load too; `Cpu` otherwise. Never panics.
    pub fn detect() -> Device {
        if Device::cuda_unavailable_reason().is_none() { Device::Cuda } else { Device::Cpu }
    }

    /// Why `Cuda` cannot be used here, or `None` when it can: the first missing library, or
    /// the driver's answer when it has no device.
    pub fn cuda_unavailable_reason() -> Option<CudaError> {
        super::cuda::device::probe().err()
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            other => Err(format!("unknown device '{other}' (known: cpu, cuda)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert!("tpu".parse::<Device>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn detect_never_panics_and_agrees_with_the_reason() {
        // On a machine without a GPU (CI) this is Cpu with a reason; with one, Cuda and none.
        let d = Device::detect();
        assert_eq!(d == Device::Cpu, Device::cuda_unavailable_reason().is_some());
    }
}
