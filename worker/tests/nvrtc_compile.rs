//! Every CUDA kernel file compiles with NVRTC for sm_90 (the H200's architecture), on a machine
//! without a GPU: only libnvrtc and the CUDA headers are needed. Besides the PTX the GPU loads,
//! each file is compiled to an sm_90 cubin with ptxas's resource report, and a kernel that
//! spills registers fails the test (the table of every kernel's resources is in docs/CUDA.md).
//!
//! Where they come from: the CUDA toolkit, or NVIDIA's Python wheels (`pip install
//! nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt`, as `.ci/run` does), found through
//! `LD_LIBRARY_PATH` (libnvrtc.so.13) and `LIANDAN_CUDA_INCLUDE` or the folder beside the
//! library's (cuda_bf16.h, crt/mma.h). With `LIANDAN_REQUIRE_NVRTC=1` (CI) a missing NVRTC fails the test;
//! without it the test prints why it skipped, so a plain `cargo test` works on any machine.

use liandan_worker::backend::cuda::cubin::{KernelResources, compile_cubin, compile_cubin_source};
use liandan_worker::backend::cuda::kernels::{KernelFile, compile_ptx, find_include_dir, nvrtc_available, nvrtc_version};

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

/// Kernels allowed to spill: attention.cu's f32 reference kernels keep a whole head-size vector
/// per thread in registers (q and o; q, dout and dq; k, v, dk and dv), which does not fit at head
/// size 128 (nor dK/dV at 64). They are the f32 checking path and the fallback; bf16 training
/// runs the tensor-core kernels of flash_attention.cu, which must not spill. The grouped-query
/// instantiations (gqa_attention_*) are the same code and spill at the same head sizes. An entry
/// here that stops spilling fails the test too, so the list stays true.
const SPILL_ALLOWED: &[&str] = &[
    "attention_forward_hs128",
    "attention_backward_dq_hs128",
    "attention_backward_dkdv_hs64",
    "attention_backward_dkdv_hs128",
    "gqa_attention_forward_hs128",
    "gqa_attention_backward_dq_hs128",
    "gqa_attention_backward_dkdv_hs64",
    "gqa_attention_backward_dkdv_hs128",
];

/// The real architecture the resource check compiles for.
const SM: &str = "sm_90";

fn table(rows: &[(&str, KernelResources)]) -> String {
    let mut t =
        String::from("| file | kernel | registers | spill stores / loads (bytes) | stack frame (bytes) | static shared (bytes) |\n| --- | --- | ---: | ---: | ---: | ---: |\n");
    for (file, r) in rows {
        t.push_str(&format!("| {file} | {} | {} | {} / {} | {} | {} |\n", r.kernel, r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared));
    }
    t
}

#[test]
fn every_kernel_compiles_to_an_sm_90_cubin_and_none_spills_but_the_reference_attention() {
    let Some(include) = setup() else { return };
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    for file in KernelFile::ALL {
        match compile_cubin(file, SM, &include) {
            Ok((bytes, kernels)) => {
                eprintln!("{}: {bytes} bytes of {SM} cubin", file.file_name());
                for f in file.functions() {
                    match kernels.iter().find(|k| k.kernel == *f) {
                        None => failures.push(format!("{}: ptxas reported nothing for {f}", file.file_name())),
                        Some(k) if k.spills() && !SPILL_ALLOWED.contains(f) => {
                            failures.push(format!("{}: {f} spills ({} bytes stored, {} loaded, {} registers)", file.file_name(), k.spill_stores, k.spill_loads, k.registers))
                        }
                        Some(k) if !k.spills() && SPILL_ALLOWED.contains(f) => failures.push(format!("{f} no longer spills: take it off SPILL_ALLOWED")),
                        Some(k) => rows.push((file.file_name(), k.clone())),
                    }
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    let t = table(&rows);
    eprintln!("{t}");
    if let Some(path) = std::env::var_os("LIANDAN_RESOURCE_TABLE") {
        std::fs::write(&path, &t).expect("LIANDAN_RESOURCE_TABLE names a writable file");
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

/// The spill check can fail: a kernel that keeps 96 floats live under a 32-register budget
/// (1024 threads × 2 blocks per SM) is reported as spilling.
#[test]
fn a_kernel_that_runs_out_of_registers_is_reported_as_spilling() {
    let Some(include) = setup() else { return };
    let src = r#"
extern "C" __global__ void __launch_bounds__(1024, 2) spiller(float* x, int n) {
    float v[96];
#pragma unroll
    for (int i = 0; i < 96; i++) v[i] = x[i * n + threadIdx.x];
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int i = 0; i < 96; i++) { v[i] = v[i] * v[(i + r + 1) % 96] + 1.0f; s += v[i]; }
    x[threadIdx.x] = s;
}
"#;
    let (_, kernels) = compile_cubin_source("spiller.cu", src, SM, &include).expect("the probe kernel compiles");
    let k = kernels.iter().find(|k| k.kernel == "spiller").expect("ptxas reports the kernel");
    assert!(k.registers <= 32, "the launch bounds cap registers at 32, got {}", k.registers);
    assert!(k.spills(), "96 live floats in 32 registers must spill: {k:?}");
}
