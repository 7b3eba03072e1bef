//! Kernel files compiled by NVRTC all the way to a cubin for a real architecture (`sm_90`), with
//! ptxas's resource report (`-Xptxas -v`): registers, spill stores and loads, stack frame and
//! static shared memory per kernel. Needs only libnvrtc and the CUDA headers, no GPU, so CI
//! sees what the GPU's loader would: a kernel that spills, or that needs more registers or
//! shared memory than planned (`worker/tests/nvrtc_compile.rs`; the table is in docs/CUDA.md).

use std::ffi::{CString, c_char};
use std::path::Path;

use cudarc::nvrtc::{result, sys};

use super::error::{CudaError, Result};
use super::kernels::{KernelFile, OPTIONS, nvrtc_available, nvrtc_missing};

/// One kernel's resources as ptxas reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes stored to and loaded from local memory because registers ran out.
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Bytes of local memory per thread (spills and arrays indexed at run time).
    pub stack_frame: u32,
    /// Static shared memory per block, bytes (dynamic shared memory is set at launch).
    pub shared: u32,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// The per-kernel entries of a ptxas `-v` log, in the order ptxas compiled them.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    // The number right before `unit` in `line` (e.g. "1160 bytes stack frame" -> 1160).
    let before = |line: &str, unit: &str| -> Option<u32> { line.find(unit).and_then(|i| line[..i].split_whitespace().next_back()?.parse().ok()) };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(KernelResources { kernel: rest.split('\'').next().unwrap_or_default().to_string(), ..Default::default() });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_frame = before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("registers") {
            k.registers = before(line, "registers").unwrap_or(0);
            k.shared = before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// Compiles `file` to a cubin for `arch` (a real architecture, e.g. `sm_90`) with the options of
/// every GPU compile; returns the cubin's size in bytes and each kernel's resources.
///
/// # Errors
/// libnvrtc is missing, or NVRTC rejects the file ([`CudaError::Compile`] with its log).
pub fn compile_cubin(file: KernelFile, arch: &str, include: &Path) -> Result<(usize, Vec<KernelResources>)> {
    compile_cubin_source(file.file_name(), &file.program_source(), arch, include)
}

/// [`compile_cubin`] of any source, named `file` in NVRTC's log.
///
/// # Errors
/// As [`compile_cubin`].
pub fn compile_cubin_source(file: &'static str, source: &str, arch: &str, include: &Path) -> Result<(usize, Vec<KernelResources>)> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let fail = |log: String| CudaError::Compile { file, arch: arch.to_string(), log };
    let src = CString::new(source).map_err(|e| fail(format!("source holds a NUL byte: {e}")))?;
    let name = CString::new(file).map_err(|e| fail(e.to_string()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.extend([format!("--gpu-architecture={arch}"), format!("--include-path={}", include.display()), "-Xptxas".into(), "-v".into()]);
    // SAFETY: `prog` was created above and is destroyed once, below; `src` and `name` outlive it.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }.map(|l| c_log(&l)).unwrap_or_default();
    let size = compiled.map_err(|e| fail(format!("{e:?}\n{log}"))).and_then(|()| {
        let mut n = 0usize;
        // SAFETY: as above; the size is written to a local.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) }.result().map_err(|e| fail(format!("no cubin: {e:?}")))?;
        Ok(n)
    });
    // SAFETY: as above.
    let _ = unsafe { result::destroy_program(prog) };
    Ok((size?, parse_ptxas_report(&log)))
}

fn c_log(l: &[c_char]) -> String {
    let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_are_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'a' for 'sm_90'\n\
                   ptxas info    : Function properties for a\n\
                   ptxas         .     1160 bytes stack frame, 1252 bytes spill stores, 1248 bytes spill loads\n\
                   ptxas info    : Used 255 registers, used 1 barriers, 1160 bytes cumulative stack size\n\
                   ptxas info    : Compiling entry function 'b' for 'sm_90'\n\
                   ptxas info    : Function properties for b\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 32 registers, used 1 barriers, 256 bytes smem\n";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], KernelResources { kernel: "a".into(), registers: 255, spill_stores: 1252, spill_loads: 1248, stack_frame: 1160, shared: 0 });
        assert!(r[0].spills());
        assert_eq!(r[1], KernelResources { kernel: "b".into(), registers: 32, spill_stores: 0, spill_loads: 0, stack_frame: 0, shared: 256 });
        assert!(!r[1].spills());
    }
}
