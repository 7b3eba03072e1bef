//! The emulated device's build step (`worker/build/emu.rs`, run by `worker/build.rs`): a kernel
//! that uses something the emulation header does not provide fails with a line naming the
//! file, the line and the name; and every real kernel file composes and compiles with the same
//! flags the build uses. Needs the host C++ compiler the build itself needs (`$CXX` or `c++`).

#[path = "../build/emu.rs"]
#[allow(dead_code)]
mod emu;

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compiler as the build invokes it: the emulation flags and include folders.
fn compiler() -> Command {
    let emu = manifest().join("src/backend/cuda/emu");
    let mut c = Command::new(std::env::var_os("CXX").unwrap_or_else(|| "c++".into()));
    c.args(emu::FLAGS).arg("-O2").arg("-I").arg(&emu).arg("-I").arg(emu.join("include"));
    c
}

fn prelude() -> String {
    std::fs::read_to_string(manifest().join("src/backend/cuda/kernels/common.cuh")).expect("the prelude is part of the crate")
}

fn unit(dir: &Path, name: &str, src: &str) -> PathBuf {
    let text = emu::compose(&prelude(), "worker/src/backend/cuda/kernels/common.cuh", src, &format!("kernels/{name}")).expect("declarations translate");
    let path = dir.join(format!("{name}.cc"));
    std::fs::write(&path, text).expect("temp dir is writable");
    path
}

#[test]
fn a_kernel_using_an_intrinsic_the_header_lacks_fails_naming_it() {
    let dir = std::env::temp_dir().join(format!("liandan-emu-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // __ldg and __half exist in CUDA but not in the emulation header (nothing uses them yet).
    let src = "#include <cuda_fp16.h>\nextern \"C\" __global__ void k(float* out, const float* in) {\n    out[threadIdx.x] = __ldg(&in[threadIdx.x]);\n}\n";
    let path = unit(&dir, "broken.cu", src);
    let log = emu::run(compiler(), &["-fsyntax-only"], &path).expect_err("the header has no __ldg and no cuda_fp16.h");
    let why = emu::explain(&log, Path::new("worker/src/backend/cuda/emu/cuda_emu.h")).unwrap_or_else(|| panic!("no explanation for:\n{log}"));
    assert!(why.contains("kernels/broken.cu:1") && why.contains("`cuda_fp16.h` is not provided by the CUDA emulation header"), "{why}");
    let src = "extern \"C\" __global__ void k(float* out, const float* in) {\n    out[threadIdx.x] = __ldg(&in[threadIdx.x]);\n}\n";
    let path = unit(&dir, "broken2.cu", src);
    let log = emu::run(compiler(), &["-fsyntax-only"], &path).expect_err("the header has no __ldg");
    let why = emu::explain(&log, Path::new("cuda_emu.h")).unwrap_or_else(|| panic!("no explanation for:\n{log}"));
    assert!(why.contains("kernels/broken2.cu:2") && why.contains("`__ldg` is not provided"), "{why}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_kernel_file_compiles_as_the_build_compiles_it() {
    let dir = std::env::temp_dir().join(format!("liandan-emu-build-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in liandan_worker::backend::cuda::kernels::KernelFile::ALL {
        let path = unit(&dir, f.file_name(), f.source());
        let pre = emu::run(compiler(), &["-E", "-DLD_EMU_SCAN"], &path).unwrap_or_else(|log| panic!("{}: {log}", f.file_name()));
        let mut found = emu::scan_kernels(&pre).expect("every kernel is extern \"C\"");
        let mut listed: Vec<String> = f.functions().iter().map(|s| s.to_string()).collect();
        found.sort();
        listed.sort();
        assert_eq!(found, listed, "{}: kernels in the file vs KernelFile::functions", f.file_name());
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + &emu::registration(&found, "t")).unwrap();
        emu::run(compiler(), &["-fsyntax-only"], &path).unwrap_or_else(|log| panic!("{}: {log}", f.file_name()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
