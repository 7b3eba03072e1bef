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
    /// The emulated CUDA device: the CUDA backend's host code and kernel sources on the CPU
    /// (tests and CI). Only ever chosen by name, never by [`Device::detect`].
    CudaEmu,
}

impl Device {
    /// The best device this machine offers: `Cuda` when the CUDA driver loads and reports at
    /// least one GPU and NVRTC and cuBLASLt load too; `Cpu` otherwise (never `CudaEmu`, which
    /// is for tests: it is far slower than the CPU backend). Never panics.
    pub fn detect() -> Device {
        if Device::cuda_unavailable_reason().is_none() { Device::Cuda } else { Device::Cpu }
    }

    /// Why `Cuda` cannot be used here, or `None` when it can: the first missing library, or
    /// the driver's answer when it has no device.
    pub fn cuda_unavailable_reason() -> Option<CudaError> {
        super::cuda::device::gpu::probe().err()
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::CudaEmu => "cuda-emu",
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
            "cuda-emu" => Ok(Device::CudaEmu),
            other => Err(format!("unknown device '{other}' (known: cpu, cuda, cuda-emu)")),
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
        assert_eq!("cuda-emu".parse::<Device>(), Ok(Device::CudaEmu));
        assert_eq!(Device::CudaEmu.to_string(), "cuda-emu");
        assert!("tpu".parse::<Device>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn detect_never_panics_and_agrees_with_the_reason() {
        // On a machine without a GPU (CI) this is Cpu with a reason; with one, Cuda and none.
        let d = Device::detect();
        assert_eq!(d == Device::Cpu, Device::cuda_unavailable_reason().is_some());
        assert_ne!(d, Device::CudaEmu, "the emulated device is chosen by name only");
    }
}
