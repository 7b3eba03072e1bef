//! `liandan selftest --device cuda|cuda-emu`: every kernel's forward and backward against the
//! CPU backend at several shapes (odd sizes for edge tiles and partial blocks; with
//! [`Shapes::Full`] also GPT-2 sizes and the llama family's: Qwen2-0.5B, Llama 2 7B, Llama 3
//! 8B), whole training steps against the CPU trainer, and an NCCL all-reduce of world size 1
//! (GPU only). `cargo test` runs it on the emulated device
//! (`worker/tests/cuda_emu.rs`); `scripts/gpu_check.sh` on the GPU, one section per process.
//!
//! Sections run independently: an error in one (a failed launch, an out-of-memory) becomes a
//! failed check of that section and the next section still runs. Every buffer a kernel
//! overwrites starts filled with a NaN sentinel, so an element it forgets to write fails the
//! comparison; buffers a kernel accumulates into start at chosen non-zero values.
//!
//! Tolerances, and why:
//! - f32 element-wise ops (encoder, GELU, residual, LayerNorm, softmax/CE, AdamW, head; the
//!   llama family's RMSNorm forward, RoPE, SwiGLU and token-embedding backward): the GPU
//!   uses libdevice `expf`/`tanhf` (the emulated device glibc's) and another summation order than
//!   the CPU's vectorised polynomials; all are within ~1e-6 relative of exact, so
//!   `1e-5 + 1e-4·|x|` covers them.
//! - f32 matmuls and attention (GPT-2's and grouped-query), and the backward of the norms: dot
//!   products of length K in another order; error grows like √K·ε·|x|, so `1e-4 + 1e-3·|x|` up
//!   to K = 3072.
//! - the token-embedding forward (a copy of table rows): bit for bit; so is grouped-query
//!   attention with NKV = NH against GPT-2's attention kernels (the same code on the same layout).
//! - the input gradient of a matmul with GELU's backward fused in (f32): a dot product times
//!   GELU'(pre), so an element can be small while its error is that of the larger dot product;
//!   relative L2 ≤ 1e-5 (measured 2.1e-7 at K = 768).
//! - bf16 matmuls (and the bf16 LM head): inputs rounded to 8 bits of mantissa (relative 2⁻⁹),
//!   so the result is compared by relative L2 error, ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-2 (measured on the
//!   emulated device: 2.4e-3 at K = 768).
//! - the f32 → bf16 cast: exact, bit for bit, against an independent round-to-nearest-even.
//! - whole step (f32): losses to 1e-4 relative, gradients to `1e-5 + 1e-3·|g|` (the embedding
//!   gradient sums repeated tokens with atomics, in another order than the CPU).
//! - whole step (bf16 matmuls): losses by relative L2 ≤ 1e-2, gradients of step 0 by relative
//!   L2 ≤ 5e-2 (every matmul of forward and backward rounds its operands to bf16, and the
//!   errors compound through the layers; measured on the emulated device: see docs/CUDA.md).
//! - tensor-core attention (bf16 operands): relative L2 against the CPU and against the f32
//!   reference kernels fed the same bf16-rounded inputs; the bounds and why are in [`flash`].

mod flash;
mod ops;
mod train;

pub use ops::bf16_rne;
pub use train::step_setup;

use std::sync::Arc;

use super::device::{CudaDevice, DevBuf};
use super::error::Result;
use crate::rng::Rng;

/// How one comparison is judged.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Every element: `|gpu − cpu| <= atol + rtol·|cpu|`.
    Elementwise { atol: f32, rtol: f32 },
    /// `‖gpu − cpu‖₂ / ‖cpu‖₂ <= rel`.
    RelativeL2 { rel: f64 },
    /// Bit for bit.
    Exact,
}

/// What a check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Not run on this device, and why (NCCL on the emulated device).
    Skip(String),
}

/// The outcome of one comparison (or of a section that could not run).
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    pub tolerance: Tolerance,
    pub status: Status,
    /// The error of a section that failed before its comparisons, or empty.
    pub error: String,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.status == Status::Pass
    }

    pub fn failed(&self) -> bool {
        self.status == Status::Fail
    }

    fn error(name: String, error: String) -> Check {
        Check { name, max_abs_err: f64::INFINITY, rel_l2_err: f64::INFINITY, tolerance: Tolerance::Exact, status: Status::Fail, error }
    }

    fn skip(name: String, why: String) -> Check {
        Check { name, max_abs_err: 0.0, rel_l2_err: 0.0, tolerance: Tolerance::Exact, status: Status::Skip(why), error: String::new() }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Status::Skip(why) = &self.status {
            return write!(f, "SKIP {} ({why})", self.name);
        }
        if !self.error.is_empty() {
            return write!(f, "FAIL {}: {}", self.name, self.error);
        }
        let tol = match self.tolerance {
            Tolerance::Elementwise { atol, rtol } => format!("|err| <= {atol:e} + {rtol:e}·|x|"),
            Tolerance::RelativeL2 { rel } => format!("rel L2 <= {rel:e}"),
            Tolerance::Exact => "bit for bit".to_string(),
        };
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "{verdict} {:<52} max|err| {:.3e}  rel L2 {:.3e}  ({tol})", self.name, self.max_abs_err, self.rel_l2_err)
    }
}

/// Compares `got` with `want` under `tol`.
pub fn compare(name: impl Into<String>, got: &[f32], want: &[f32], tol: Tolerance) -> Check {
    let mut max_abs = 0.0f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut ok = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        let e = (g as f64 - w as f64).abs();
        max_abs = max_abs.max(if e.is_nan() { f64::INFINITY } else { e });
        num += e * e;
        den += w as f64 * w as f64;
        match tol {
            Tolerance::Elementwise { atol, rtol } => ok &= e <= (atol + rtol * w.abs()) as f64,
            Tolerance::Exact => ok &= g.to_bits() == w.to_bits(),
            Tolerance::RelativeL2 { .. } => {}
        }
    }
    let rel = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    if let Tolerance::RelativeL2 { rel: r } = tol {
        ok &= rel <= r;
    }
    Check { name: name.into(), max_abs_err: max_abs, rel_l2_err: rel, tolerance: tol, status: if ok { Status::Pass } else { Status::Fail }, error: String::new() }
}

const EW: Tolerance = Tolerance::Elementwise { atol: 1e-5, rtol: 1e-4 };
const MM: Tolerance = Tolerance::Elementwise { atol: 1e-4, rtol: 1e-3 };
const BF16: Tolerance = Tolerance::RelativeL2 { rel: 1e-2 };
/// f32 results whose small elements carry the rounding of larger intermediate terms (a dot
/// product times a factor near zero): judged by relative L2.
const F32_NORM: Tolerance = Tolerance::RelativeL2 { rel: 1e-5 };

/// Which shapes the kernel sections run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shapes {
    /// Small and odd shapes only (every kernel, edge tiles, partial blocks): `cargo test` on the
    /// emulated device, and runs under compute-sanitizer.
    Small,
    /// Small ones plus GPT-2 124M sizes (C = 768, Vp = 50304, T = 256).
    Full,
}

impl std::str::FromStr for Shapes {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "small" => Ok(Shapes::Small),
            "full" => Ok(Shapes::Full),
            other => Err(format!("--shapes {other}: expected small or full")),
        }
    }
}

/// `small`, plus `full` when the shapes are [`Shapes::Full`].
fn pick<T: Copy>(shapes: Shapes, small: &[T], full: &[T]) -> Vec<T> {
    let mut v = small.to_vec();
    if shapes == Shapes::Full {
        v.extend_from_slice(full);
    }
    v
}

/// Where a section's checks go: reported as they are made, and kept.
pub struct Sink<'a> {
    checks: Vec<Check>,
    report: &'a mut dyn FnMut(&Check),
}

impl std::fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("checks", &self.checks.len()).finish_non_exhaustive()
    }
}

impl Sink<'_> {
    fn push(&mut self, c: Check) {
        (self.report)(&c);
        self.checks.push(c);
    }
}

/// What a section gets: the device, the shapes and where its checks go.
struct Ctx<'a, 'b> {
    dev: &'a Arc<CudaDevice>,
    shapes: Shapes,
    sink: &'a mut Sink<'b>,
}

impl Ctx<'_, '_> {
    fn d(&self) -> &CudaDevice {
        self.dev
    }

    fn push(&mut self, c: Check) {
        self.sink.push(c);
    }

    fn up(&self, x: &[f32]) -> Result<DevBuf<f32>> {
        self.dev.upload_new(x)
    }

    /// A buffer of `n` NaN sentinels, for a kernel to overwrite.
    fn out(&self, n: usize) -> Result<DevBuf<f32>> {
        self.dev.upload_new(&vec![SENTINEL; n])
    }

    fn down(&self, b: &DevBuf<f32>, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0.0; n];
        self.dev.download(b, 0, &mut v)?;
        Ok(v)
    }
}

/// The sentinel outputs start as: a quiet NaN with a recognisable payload.
pub const SENTINEL: f32 = f32::from_bits(0x7fc0_5a5a);

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

type SectionFn = fn(&mut Ctx<'_, '_>) -> Result<()>;

/// Every section, in the order `run` runs them (NCCL last: it is the most likely to hang).
const SECTIONS: &[(&str, SectionFn)] = &[
    ("encoder", ops::encoder),
    ("layernorm", ops::layernorm),
    ("gelu_residual", ops::gelu_residual),
    ("cast_bf16", ops::cast_bf16),
    ("matmul", ops::matmul),
    ("matmul_gelu", ops::matmul_gelu),
    ("lm_head", ops::lm_head),
    ("attention", ops::attention),
    ("flash_attention", flash::attention),
    ("kv_cache", ops::kv_cache),
    ("rmsnorm", ops::rmsnorm),
    ("rope", ops::rope),
    ("swiglu", ops::swiglu),
    ("embedding", ops::embedding),
    ("gqa_attention", ops::gqa_attention),
    ("crossentropy", ops::crossentropy),
    ("scalar_head", ops::scalar_head),
    ("optimizer", train::optimizer),
    ("train_f32", train::train_f32),
    ("train_bf16", train::train_bf16),
    ("train_bf16_tensor_core", flash::train_bf16_tensor_core),
    ("nccl", train::nccl),
];

/// The names of [`SECTIONS`].
pub fn section_names() -> Vec<&'static str> {
    SECTIONS.iter().map(|s| s.0).collect()
}

/// Runs section `name`, calling `report` after each check; an error of the section becomes a
/// failed check named after it, so the caller can go on with the next.
///
/// # Errors
/// Only an unknown section name.
pub fn run_section(dev: &Arc<CudaDevice>, name: &str, shapes: Shapes, report: &mut dyn FnMut(&Check)) -> std::result::Result<Vec<Check>, String> {
    let f = SECTIONS.iter().find(|s| s.0 == name).ok_or_else(|| format!("no selftest section '{name}' (known: {})", section_names().join(", ")))?.1;
    let mut sink = Sink { checks: Vec::new(), report };
    let result = f(&mut Ctx { dev, shapes, sink: &mut sink });
    if let Err(e) = result {
        sink.push(Check::error(format!("section {name}"), e.to_string()));
    }
    Ok(sink.checks)
}

/// Runs every section in order, calling `report` after each check; returns them all.
pub fn run(dev: &Arc<CudaDevice>, shapes: Shapes, report: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut all = Vec::new();
    for (name, _) in SECTIONS {
        // The name comes from SECTIONS itself.
        all.extend(run_section(dev, name, shapes, report).unwrap_or_default());
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_judges_every_kind_of_tolerance() {
        assert!(compare("x", &[1.0, 2.0], &[1.0, 2.0], EW).passed());
        assert!(compare("x", &[1.0, 2.1], &[1.0, 2.0], EW).failed());
        assert!(compare("x", &[f32::NAN], &[1.0], EW).failed());
        assert!(compare("x", &[SENTINEL], &[1.0], BF16).failed(), "an unwritten sentinel fails a relative check");
        assert!(compare("x", &[1.001, 2.0], &[1.0, 2.0], BF16).passed());
        assert!(compare("x", &[1.5, 2.0], &[1.0, 2.0], BF16).failed());
        assert!(compare("x", &[1.0], &[1.0, 2.0], BF16).failed(), "length mismatch fails");
        assert!(compare("x", &[1.0], &[f32::from_bits(1.0f32.to_bits() + 1)], Tolerance::Exact).failed());
        assert!(compare("x", &[0.5], &[0.5], Tolerance::Exact).passed());
    }

    #[test]
    fn shapes_parse_and_sections_are_unique() {
        assert_eq!("small".parse::<Shapes>(), Ok(Shapes::Small));
        assert!("huge".parse::<Shapes>().is_err());
        let names = section_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), SECTIONS.len());
        assert_eq!(names.last(), Some(&"nccl"), "NCCL runs last");
    }
}
