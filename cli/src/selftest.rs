//! `liandan selftest --device cuda`: runs [`liandan_worker::backend::cuda::selftest`] and prints
//! one line per comparison, then a summary; exits non-zero when any comparison fails. On a
//! machine without a GPU or the CUDA libraries it prints one line saying which is missing.

use liandan_worker::backend::cuda::{selftest, CudaDevice};
use liandan_worker::backend::Device;

use crate::CliError;

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// The backend to check against the CPU reference (only cuda has one to check).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

pub fn run(a: SelftestArgs) -> Result<(), CliError> {
    let device: Device = a.device.parse().map_err(CliError::Usage)?;
    if device == Device::Cpu {
        return Err(CliError::Usage("--device cpu: the CPU backend is the reference; its checks are `cargo test`".into()));
    }
    if let Some(e) = Device::cuda_unavailable_reason() {
        return Err(e.into());
    }
    let dev = std::sync::Arc::new(CudaDevice::open(a.gpu)?);
    println!("selftest: {} (sm_{}{}), NVRTC {}.{}, {} of the kernel files from the cache", dev.name, dev.capability.0, dev.capability.1, dev.nvrtc_version.0, dev.nvrtc_version.1, dev.cached_files);
    let checks = selftest::run(&dev, &mut |c| println!("{c}"))?;
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!("selftest: {} passed, {failed} failed", checks.len() - failed);
    if failed > 0 {
        return Err(CliError::Usage(format!("selftest: {failed} of {} comparisons failed", checks.len())));
    }
    Ok(())
}
