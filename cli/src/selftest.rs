//! `liandan selftest --device cuda|cuda-emu`: runs [`liandan_worker::backend::cuda::selftest`]
//! and prints one line per comparison, a line per section and a summary; exits non-zero when
//! any comparison fails. Every section runs even when an earlier one fails. On a machine
//! without a GPU or the CUDA libraries, `--device cuda` prints one line saying which is missing.

use std::sync::Arc;
use std::time::Instant;

use liandan_worker::backend::Device;
use liandan_worker::backend::cuda::CudaDevice;
use liandan_worker::backend::cuda::selftest::{self, Shapes};

use crate::CliError;

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// The device to check against the CPU reference: cuda (a GPU) or cuda-emu (the emulated
    /// device: the same host code and kernel sources on the CPU).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// small (odd shapes only: fast, for the emulated device and compute-sanitizer) or full
    /// (also GPT-2 124M sizes).
    #[arg(long, default_value = "full")]
    pub shapes: String,
    /// Run only these sections (comma-separated; see --list).
    #[arg(long, value_delimiter = ',')]
    pub section: Vec<String>,
    /// List the sections and exit.
    #[arg(long)]
    pub list: bool,
}

pub fn run(a: SelftestArgs) -> Result<(), CliError> {
    if a.list {
        for s in selftest::section_names() {
            println!("{s}");
        }
        return Ok(());
    }
    let device: Device = a.device.parse().map_err(CliError::Usage)?;
    let shapes: Shapes = a.shapes.parse().map_err(CliError::Usage)?;
    if device == Device::Cpu {
        return Err(CliError::Usage("--device cpu: the CPU backend is the reference; its checks are `cargo test`".into()));
    }
    let known = selftest::section_names();
    if let Some(bad) = a.section.iter().find(|s| !known.contains(&s.as_str())) {
        return Err(CliError::Usage(format!("--section {bad}: no such section (known: {})", known.join(", "))));
    }
    if device == Device::Cuda
        && let Some(e) = Device::cuda_unavailable_reason()
    {
        return Err(e.into());
    }
    let dev = Arc::new(CudaDevice::for_device(device, a.gpu)?);
    println!("selftest: {} (sm_{}{}), {}, {shapes:?} shapes", dev.name, dev.capability.0, dev.capability.1, dev.kernels);
    let sections: Vec<&str> = if a.section.is_empty() { known.clone() } else { a.section.iter().map(String::as_str).collect() };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failed_sections = Vec::new();
    for name in sections {
        let t0 = Instant::now();
        let checks = selftest::run_section(&dev, name, shapes, &mut |c| println!("{c}")).map_err(CliError::Usage)?;
        let f = checks.iter().filter(|c| c.failed()).count();
        let p = checks.iter().filter(|c| c.passed()).count();
        println!("section {name}: {p} passed, {f} failed, {} skipped in {:.2} s", checks.len() - p - f, t0.elapsed().as_secs_f64());
        passed += p;
        failed += f;
        skipped += checks.len() - p - f;
        if f > 0 {
            failed_sections.push(name);
        }
    }
    println!("selftest: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        return Err(CliError::Usage(format!("selftest: {failed} comparisons failed, in sections {}", failed_sections.join(", "))));
    }
    Ok(())
}
