//! The kernel sources (`kernels/*.cu`, embedded with `include_str!`), their NVRTC compilation
//! for the device's compute capability, and the on-disk PTX cache.
//!
//! Every file is compiled as its own NVRTC program: [`PRELUDE`] (`common.cuh`: warp and block
//! reductions, `cuda_bf16.h`) first, then `#line 1 "<file>.cu"` so NVRTC's log points at the
//! file and line a person can open. NVRTC has no built-in `cuda_bf16.h` or `mma.h`, so
//! compilation needs the CUDA include folder: [`find_include_dir`] looks at
//! `LIANDAN_CUDA_INCLUDE`, the toolkit's usual places, and next to every `lib` folder on
//! `LD_LIBRARY_PATH` (the layout of NVIDIA's Python wheels, `nvidia/cu13/{lib,include}`; `mma.h`
//! includes `crt/mma.h`, which comes with the nvidia-cuda-crt wheel).
//!
//! PTX is cached under [`cache_dir`], keyed by a SHA-256 of the source, the target architecture,
//! the compile options and NVRTC's version, so a changed kernel, GPU or NVRTC never loads stale PTX.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{CudaError, Result};

/// Helpers every kernel file uses, prepended to each before compilation.
pub const PRELUDE: &str = include_str!("kernels/common.cuh");

/// One `.cu` file: an NVRTC program and the CUDA module loaded from its PTX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFile {
    Encoder,
    LayerNorm,
    Gelu,
    Residual,
    CrossEntropy,
    Attention,
    FlashAttention,
    AdamW,
    Norm,
    Head,
    RmsNorm,
    Rope,
    SwiGlu,
    Embedding,
}

impl KernelFile {
    pub const ALL: [KernelFile; 14] = [
        KernelFile::Encoder,
        KernelFile::LayerNorm,
        KernelFile::Gelu,
        KernelFile::Residual,
        KernelFile::CrossEntropy,
        KernelFile::Attention,
        KernelFile::FlashAttention,
        KernelFile::AdamW,
        KernelFile::Norm,
        KernelFile::Head,
        KernelFile::RmsNorm,
        KernelFile::Rope,
        KernelFile::SwiGlu,
        KernelFile::Embedding,
    ];

    /// The file's name under `worker/src/backend/cuda/kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::Encoder => "encoder.cu",
            KernelFile::LayerNorm => "layernorm.cu",
            KernelFile::Gelu => "gelu.cu",
            KernelFile::Residual => "residual.cu",
            KernelFile::CrossEntropy => "crossentropy.cu",
            KernelFile::Attention => "attention.cu",
            KernelFile::FlashAttention => "flash_attention.cu",
            KernelFile::AdamW => "adamw.cu",
            KernelFile::Norm => "norm.cu",
            KernelFile::Head => "head.cu",
            KernelFile::RmsNorm => "rmsnorm.cu",
            KernelFile::Rope => "rope.cu",
            KernelFile::SwiGlu => "swiglu.cu",
            KernelFile::Embedding => "embedding.cu",
        }
    }

    /// The file's text as written.
    pub fn source(self) -> &'static str {
        match self {
            KernelFile::Encoder => include_str!("kernels/encoder.cu"),
            KernelFile::LayerNorm => include_str!("kernels/layernorm.cu"),
            KernelFile::Gelu => include_str!("kernels/gelu.cu"),
            KernelFile::Residual => include_str!("kernels/residual.cu"),
            KernelFile::CrossEntropy => include_str!("kernels/crossentropy.cu"),
            KernelFile::Attention => include_str!("kernels/attention.cu"),
            KernelFile::FlashAttention => include_str!("kernels/flash_attention.cu"),
            KernelFile::AdamW => include_str!("kernels/adamw.cu"),
            KernelFile::Norm => include_str!("kernels/norm.cu"),
            KernelFile::Head => include_str!("kernels/head.cu"),
            KernelFile::RmsNorm => include_str!("kernels/rmsnorm.cu"),
            KernelFile::Rope => include_str!("kernels/rope.cu"),
            KernelFile::SwiGlu => include_str!("kernels/swiglu.cu"),
            KernelFile::Embedding => include_str!("kernels/embedding.cu"),
        }
    }

    /// The `extern "C"` kernels the host loads from this file.
    pub fn functions(self) -> &'static [&'static str] {
        match self {
            KernelFile::Encoder => &["encoder_forward", "encoder_backward_wpe", "encoder_backward_wte"],
            KernelFile::LayerNorm => &["layernorm_forward", "residual_layernorm_forward", "layernorm_backward_input", "layernorm_backward_params_partial"],
            KernelFile::Gelu => &["gelu_forward", "gelu_backward"],
            KernelFile::Residual => &["residual_forward", "bias_broadcast", "column_sum_partial", "column_sum_reduce", "cast_f32_to_bf16"],
            KernelFile::CrossEntropy => &["softmax_crossentropy", "loss_sum"],
            KernelFile::Attention => &[
                "attention_forward_hs32",
                "attention_forward_hs64",
                "attention_forward_hs128",
                "attention_backward_delta",
                "attention_backward_dq_hs32",
                "attention_backward_dq_hs64",
                "attention_backward_dq_hs128",
                "attention_backward_dkdv_hs32",
                "attention_backward_dkdv_hs64",
                "attention_backward_dkdv_hs128",
                "attention_forward_cached",
                "kv_cache_write",
                "gqa_attention_forward_hs32",
                "gqa_attention_forward_hs64",
                "gqa_attention_forward_hs128",
                "gqa_attention_backward_dq_hs32",
                "gqa_attention_backward_dq_hs64",
                "gqa_attention_backward_dq_hs128",
                "gqa_attention_backward_dkdv_hs32",
                "gqa_attention_backward_dkdv_hs64",
                "gqa_attention_backward_dkdv_hs128",
            ],
            KernelFile::FlashAttention => &[
                "flash_attention_forward_hs64",
                "flash_attention_forward_hs128",
                "flash_attention_backward_dq_hs64",
                "flash_attention_backward_dq_hs128",
                "flash_attention_backward_dkdv_hs64",
                "flash_attention_backward_dkdv_hs128",
            ],
            KernelFile::AdamW => &["adamw_step"],
            KernelFile::Norm => &["global_norm_partial", "global_norm_finish", "clip_scale"],
            KernelFile::Head => &["scalar_head_forward", "scalar_head_backward_hidden", "scalar_head_backward_params"],
            KernelFile::RmsNorm => &["rmsnorm_forward", "rmsnorm_backward_input", "rmsnorm_backward_weight_partial"],
            KernelFile::Rope => &["rope_apply"],
            KernelFile::SwiGlu => &["swiglu_forward", "swiglu_backward"],
            KernelFile::Embedding => &["embedding_forward", "embedding_backward"],
        }
    }

    /// What NVRTC compiles: the prelude, then the file with its own line numbers.
    pub fn program_source(self) -> String {
        format!("#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{}\"\n{}", self.file_name(), self.source())
    }
}

/// Options of every compilation besides the architecture and include folder: precise division
/// and square root (the kernels are checked against f32 CPU code), no fast-math.
pub const OPTIONS: [&str; 3] = ["--std=c++17", "--prec-div=true", "--prec-sqrt=true"];

/// Whether libnvrtc can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's `(major, minor)` version.
///
/// # Errors
/// libnvrtc is missing.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the out-pointers are valid.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| CudaError::Compile { file: "(nvrtcVersion)", arch: String::new(), log: format!("{e:?}") })?;
    Ok((major, minor))
}

pub(crate) fn nvrtc_missing() -> CudaError {
    CudaError::LibraryMissing {
        lib: "libnvrtc",
        hint: "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`, and put the folder with libnvrtc.so.13 on LD_LIBRARY_PATH".into(),
    }
}

/// Folders looked at for `cuda_bf16.h`, in order.
pub fn include_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("LIANDAN_CUDA_INCLUDE") {
        out.push(PathBuf::from(dir));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(dir) = std::env::var_os(var) {
            out.push(PathBuf::from(dir).join("include"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/include"));
    out.push(PathBuf::from("/usr/local/cuda-13.0/include"));
    out.push(PathBuf::from("/usr/include"));
    // NVIDIA's wheels keep include/ beside lib/ (site-packages/nvidia/cu13/{lib,include}).
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            if let Some(parent) = lib.parent() {
                out.push(parent.join("include"));
            }
        }
    }
    out
}

/// The first folder of [`include_candidates`] that holds `cuda_bf16.h` and `crt/mma.h`.
///
/// # Errors
/// [`CudaError::IncludeMissing`] naming every folder looked at.
pub fn find_include_dir() -> Result<PathBuf> {
    let candidates = include_candidates();
    candidates
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file() && d.join("crt/mma.h").is_file())
        .cloned()
        .ok_or_else(|| CudaError::IncludeMissing { looked: candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ") })
}

/// The virtual architecture NVRTC targets for compute capability `(major, minor)`: PTX for
/// `compute_XY`, which the driver turns into code for the device when it loads the module.
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles one file to PTX for `arch` (e.g. `compute_90`, the PTX target of sm_90).
///
/// # Errors
/// libnvrtc is missing, or NVRTC rejects the file ([`CudaError::Compile`] carries its log).
pub fn compile_ptx(file: KernelFile, arch: &str, include: &Path) -> Result<String> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths: vec![include.display().to_string()],
        options: OPTIONS.iter().map(|s| s.to_string()).chain([format!("--gpu-architecture={arch}")]).collect(),
        name: Some(file.file_name().to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(file.program_source(), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(CudaError::Compile { file: file.file_name(), arch: arch.to_string(), log: log.to_string_lossy().into_owned() })
        }
        Err(e) => Err(CudaError::Compile { file: file.file_name(), arch: arch.to_string(), log: format!("{e:?}") }),
    }
}

/// Where compiled PTX is kept: `LIANDAN_KERNEL_CACHE`, else `$XDG_CACHE_HOME/liandan/kernels`,
/// else `$HOME/.cache/liandan/kernels`, else a folder under the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LIANDAN_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("liandan").join("kernels");
    }
    if let Some(d) = std::env::var_os("HOME") {
        return PathBuf::from(d).join(".cache").join("liandan").join("kernels");
    }
    std::env::temp_dir().join("liandan-kernels")
}

/// The cache key of `file` compiled for `arch` by NVRTC `version`: hex SHA-256 over everything
/// that changes the PTX.
pub fn cache_key(file: KernelFile, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(file.program_source().as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    h.update([0]);
    h.update(OPTIONS.join(" ").as_bytes());
    h.update([0]);
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// PTX of `file` for `arch`: from `cache` when a file with its key exists, else compiled and
/// written there (atomically: a temporary name, then a rename). Returns the PTX and whether it
/// came from the cache. A cache that cannot be written costs a recompile next time, not an error.
///
/// # Errors
/// libnvrtc is missing, NVRTC rejects the file, or a cached file exists but cannot be read.
pub fn load_or_compile(file: KernelFile, arch: &str, include: &Path, cache: &Path) -> Result<(String, bool)> {
    let key = cache_key(file, arch, nvrtc_version()?);
    let path = cache.join(format!("{}-{key}.ptx", file.file_name().trim_end_matches(".cu")));
    match std::fs::read_to_string(&path) {
        Ok(ptx) => return Ok((ptx, true)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(CudaError::Cache { path, source }),
    }
    let ptx = compile_ptx(file, arch, include)?;
    let tmp = path.with_extension(format!("ptx.{}.tmp", std::process::id()));
    let written = std::fs::create_dir_all(cache).and_then(|_| std::fs::write(&tmp, &ptx)).and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), error = %e, "could not cache compiled kernel");
    }
    Ok((ptx, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_listed_and_every_kernel_is_loaded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda/kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("the kernels folder is part of the crate")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = KernelFile::ALL.iter().map(|f| f.file_name().to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "KernelFile::ALL must name every .cu file");
        for f in KernelFile::ALL {
            let src = f.source();
            for name in f.functions() {
                // Instantiated kernels (attention_*_hsN) come from a macro; their stem is in the file.
                let stem = name.split("_hs").next().unwrap_or(name);
                assert!(src.contains(stem), "{}: no kernel {name}", f.file_name());
            }
            let declared = src.matches("extern \"C\" __global__").count();
            let macro_made = f.functions().iter().filter(|n| n.contains("_hs")).count();
            // An attention macro declares each of its kernels once and is expanded per head
            // size: one declaration per distinct stem of the `_hsN` names.
            let mut stems: Vec<&str> = f.functions().iter().filter(|n| n.contains("_hs")).filter_map(|n| n.split("_hs").next()).collect();
            stems.sort_unstable();
            stems.dedup();
            let expected = f.functions().len() - macro_made + stems.len();
            assert_eq!(declared, expected, "{}: kernels declared vs listed", f.file_name());
            let references = src.matches("CPU reference:").count() + src.matches("No CPU counterpart").count();
            assert!(references >= declared, "{}: {declared} kernels but {references} CPU references", f.file_name());
        }
    }

    #[test]
    fn cache_key_changes_with_arch_and_version() {
        let a = cache_key(KernelFile::Gelu, "compute_90", (13, 0));
        assert_eq!(a.len(), 64);
        assert_ne!(a, cache_key(KernelFile::Gelu, "compute_80", (13, 0)));
        assert_ne!(a, cache_key(KernelFile::Gelu, "compute_90", (13, 1)));
        assert_ne!(a, cache_key(KernelFile::Encoder, "compute_90", (13, 0)));
    }
}
