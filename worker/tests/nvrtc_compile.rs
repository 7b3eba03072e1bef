//! Every CUDA kernel file compiles with NVRTC for sm_90 (the H200's architecture), on a machine
//! without a GPU: only libnvrtc and the CUDA headers are needed.
//!
//! Where they come from: the CUDA toolkit, or NVIDIA's Python wheels
//! (`pip install nvidia-cuda-nvrtc nvidia-cuda-runtime`, as `.ci/run` does), found through
//! `LD_LIBRARY_PATH` (libnvrtc.so.13) and `LIANDAN_CUDA_INCLUDE` or the folder beside the
//! library's (cuda_bf16.h). With `LIANDAN_REQUIRE_NVRTC=1` (CI) a missing NVRTC fails the test;
//! without it the test prints why it skipped, so a plain `cargo test` works on any machine.

use liandan_worker::backend::cuda::kernels::{compile_ptx, find_include_dir, nvrtc_available, nvrtc_version, KernelFile};

/// The PTX target of sm_90: NVRTC emits PTX for a virtual architecture, which the driver
/// compiles for the real one when it loads the module.
const ARCH: &str = "compute_90";

fn required() -> bool {
    std::env::var("LIANDAN_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// The include folder, or None (after printing why) when NVRTC is not set up and not required.
fn setup() -> Option<std::path::PathBuf> {
    if !nvrtc_available() {
        let msg = "libnvrtc not found (install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH)";
        assert!(!required(), "LIANDAN_REQUIRE_NVRTC=1: {msg}");
        eprintln!("skipped: {msg}");
        return None;
    }
    match find_include_dir() {
        Ok(dir) => Some(dir),
        Err(e) => {
            assert!(!required(), "LIANDAN_REQUIRE_NVRTC=1: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn every_kernel_file_compiles_for_sm_90() {
    let Some(include) = setup() else { return };
    let version = nvrtc_version().expect("NVRTC is present (checked in setup)");
    eprintln!("NVRTC {}.{}, headers from {}", version.0, version.1, include.display());
    let mut failures = Vec::new();
    for file in KernelFile::ALL {
        match compile_ptx(file, ARCH, &include) {
            Ok(ptx) => {
                for f in file.functions() {
                    // Each kernel the host loads must be an entry point of the module.
                    if !ptx.contains(&format!(".entry {f}(")) {
                        failures.push(format!("{}: no entry point {f} in the PTX", file.file_name()));
                    }
                }
                eprintln!("{}: {} kernels, {} bytes of PTX", file.file_name(), file.functions().len(), ptx.len());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{} of {} kernel files failed:\n{}", failures.len(), KernelFile::ALL.len(), failures.join("\n\n"));
}

/// The check above can fail: a broken kernel is reported with NVRTC's log, naming the file and line.
#[test]
fn a_broken_kernel_fails_with_nvrtcs_log() {
    let Some(include) = setup() else { return };
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths: vec![include.display().to_string()],
        options: vec![format!("--gpu-architecture={ARCH}")],
        name: Some("broken.cu".into()),
        ..Default::default()
    };
    let src = "#line 1 \"broken.cu\"\nextern \"C\" __global__ void k(float* x) {\n  x[0] = undeclared_name;\n}\n";
    match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
        Ok(_) => panic!("NVRTC accepted a kernel that uses an undeclared name"),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            let log = log.to_string_lossy();
            assert!(log.contains("broken.cu") && log.contains("undeclared_name"), "log: {log}");
        }
        Err(e) => panic!("unexpected NVRTC error: {e:?}"),
    }
}
