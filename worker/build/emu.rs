//! The emulated device's build step, as functions: used by `worker/build.rs` to compile the CUDA
//! kernels for the CPU, and by `worker/tests/cuda_emu_build.rs` to check that a kernel using
//! something the emulation header lacks fails with a message naming it.
//!
//! Per kernel file: compose the translation unit exactly as NVRTC sees it (`common.cuh`, then
//! the file, each with its own `#line`), behind `#include "cuda_emu.h"`; rewrite the
//! `__shared__` declarations into per-block storage (one line for one line, so line numbers
//! stay); preprocess once to find every `extern "C" __global__` kernel; append a table that
//! maps each kernel's name to a thunk calling it from an argument array, with its signature.

use std::path::Path;
use std::process::Command;

/// Flags of every emulated-kernel compile. No standard headers (NVRTC has none either), no
/// exceptions or RTTI (no C++ runtime is linked), no contraction of `a*b+c` into FMA (so the
/// result does not depend on the host CPU's instruction set).
pub const FLAGS: &[&str] = &[
    "-std=c++17",
    "-nostdinc",
    "-nostdinc++",
    "-fno-exceptions",
    "-fno-rtti",
    "-fno-threadsafe-statics",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
];

/// Rewrites the `__shared__` declarations of `src` (see the module docs). `name` is the file's
/// name for error messages.
///
/// # Errors
/// A `__shared__` declaration this step cannot translate, with its line.
pub fn rewrite_shared(src: &str, name: &str) -> Result<String, String> {
    let mut out = String::with_capacity(src.len() + 256);
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or(line);
        match code.find("__shared__") {
            None => out.push_str(line),
            Some(at) => out.push_str(&rewrite_decl(line, at, i + 1).map_err(|why| format!("{name}:{}: {why}: `{}`", i + 1, line.trim()))?),
        }
        out.push('\n');
    }
    Ok(out)
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn rewrite_decl(line: &str, at: usize, lineno: usize) -> Result<String, String> {
    const HOW: &str = "write shared memory as `__shared__ T name[N];` or `extern __shared__ T name[];`, one per line";
    let before = &line[..at];
    let (indent, is_extern) = match before.trim_end().strip_suffix("extern") {
        Some(ind) if ind.trim().is_empty() => (ind.to_string(), true),
        _ if before.trim().is_empty() => (before.to_string(), false),
        _ => return Err(HOW.into()),
    };
    let rest = &line[at + "__shared__".len()..];
    let semi = rest.find(';').ok_or_else(|| HOW.to_string())?;
    if !rest[semi + 1..].split("//").next().unwrap_or("").trim().is_empty() {
        return Err(HOW.into());
    }
    let decl = rest[..semi].trim();
    let (head, dims) = match decl.find('[') {
        Some(b) => (decl[..b].trim(), decl[b..].trim()),
        None => (decl, ""),
    };
    let split = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).ok_or_else(|| HOW.to_string())?;
    let (ty, var) = (head[..split + 1].trim(), &head[split + 1..]);
    if ty.is_empty() || !is_ident(var) || ty.contains('=') || dims.contains('=') {
        return Err(HOW.into());
    }
    if is_extern {
        if dims.replace(' ', "") != "[]" {
            return Err("dynamic shared memory must be an unsized array `extern __shared__ T name[];`".into());
        }
        return Ok(format!("{indent}{ty}* {var} = ({ty}*)ld_emu_dynamic_shared();"));
    }
    if dims.contains("[]") {
        return Err("a static __shared__ array needs its size".into());
    }
    let site = format!("ld_emu_site_{lineno}_{var}");
    Ok(if dims.is_empty() {
        format!("{indent}static const char {site} = 0; {ty}& {var} = *({ty}*)ld_emu_static_shared(&{site}, sizeof({ty}), alignof({ty}), __FILE__, __LINE__);")
    } else {
        format!("{indent}static const char {site} = 0; {ty} (&{var}){dims} = *({ty}(*){dims})ld_emu_static_shared(&{site}, sizeof({ty}{dims}), alignof({ty}), __FILE__, __LINE__);")
    })
}

/// The translation unit of one kernel file: the emulation header, then what NVRTC compiles
/// (`backend::cuda::kernels::KernelFile::program_source`: the prelude, then the file, each with
/// its own line numbers), with the shared-memory rewrite applied. The kernel code goes in an
/// unnamed namespace: each file is its own module on a GPU, so the prelude's functions (and the
/// kernels) must not clash between files; only the table appended after it is visible.
///
/// # Errors
/// As [`rewrite_shared`].
pub fn compose(prelude: &str, prelude_path: &str, src: &str, src_path: &str) -> Result<String, String> {
    Ok(format!(
        "#include \"cuda_emu.h\"\nnamespace {{\n#line 1 \"{prelude_path}\"\n{}\n#line 1 \"{src_path}\"\n{}\n}} // namespace\n",
        rewrite_shared(prelude, prelude_path)?,
        rewrite_shared(src, src_path)?
    ))
}

/// The kernels of a preprocessed translation unit (compiled with `-DLD_EMU_SCAN`, which turns
/// `__global__` into the marker `__ld_emu_kernel__`), in order of appearance.
///
/// # Errors
/// A `__global__` function that is not `extern "C" ... void name(`.
pub fn scan_kernels(preprocessed: &str) -> Result<Vec<String>, String> {
    const MARK: &str = "__ld_emu_kernel__";
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(i) = preprocessed[from..].find(MARK) {
        let at = from + i;
        from = at + MARK.len();
        let before: String = preprocessed[..at].split_whitespace().rev().take(2).collect::<Vec<_>>().join(" ");
        let rest = preprocessed[from..].trim_start();
        let name = rest.strip_prefix("void").filter(|r| r.starts_with(char::is_whitespace)).map_or("", |r| {
            let r = r.trim_start();
            &r[..r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(r.len())]
        });
        if before != "\"C\" extern" || !is_ident(name) {
            let context: String = preprocessed[at.saturating_sub(60)..(from + 60).min(preprocessed.len())].split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(format!("every __global__ function must be `extern \"C\" __global__ void name(...)` so the host can launch it by name; found: {context}"));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// C++ appended to a translation unit: one thunk per kernel and the table
/// `ld_emu_kernels_<table>` of `{name, thunk, signature}` that `emu/mod.rs` reads.
pub fn registration(names: &[String], table: &str) -> String {
    let mut s = String::from("\n// Generated by worker/build.rs: the kernels of this file, by name.\n");
    for n in names {
        s.push_str(&format!("static void ld_emu_thunk_{n}(void* const* args) {{ ld_emu_thunk<&{n}>(args); }}\n"));
    }
    s.push_str(&format!("extern \"C\" const ld_emu_kernel ld_emu_kernels_{table}[] = {{\n"));
    for n in names {
        s.push_str(&format!("    {{\"{n}\", &ld_emu_thunk_{n}, ld_emu_signature(&{n})}},\n"));
    }
    s.push_str("};\n");
    s
}

/// The name a compiler error line says is unknown (g++ and clang wordings), if it says so.
fn unknown_name(l: &str) -> Option<&str> {
    let after = |pat: &str| l.find(pat).map(|i| &l[i + pat.len()..]);
    if let Some(i) = l.find("' was not declared in this scope") {
        let head = &l[..i];
        return Some(&head[head.rfind('\'')? + 1..]);
    }
    if let Some(rest) = after("use of undeclared identifier '") {
        return rest.split('\'').next();
    }
    if let Some(rest) = after("no matching function for call to '") {
        return rest.split('(').next();
    }
    if l.contains("No such file") {
        return after("fatal error: ")?.split(':').next();
    }
    None
}

/// The compiler's complaints about names it does not know, as one line each naming the file,
/// the line and the name; `None` when the log has none (another kind of error).
pub fn explain(log: &str, header: &Path) -> Option<String> {
    let mut lines: Vec<String> = Vec::new();
    for l in log.lines() {
        if let Some(name) = unknown_name(l) {
            let at = l.split(": error").next().unwrap_or("").split(": fatal error").next().unwrap_or("");
            let line = format!("{at}: `{name}` is not provided by the CUDA emulation header {}: add it there with its CUDA semantics, or do without it", header.display());
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Runs `compiler` (with its flags) over `file` with `extra` arguments; the log on failure.
pub fn run(mut compiler: Command, extra: &[&str], file: &Path) -> Result<String, String> {
    compiler.args(extra).arg(file).env("LC_ALL", "C");
    match compiler.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(format!("cannot run the C++ compiler {compiler:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_declarations_are_rewritten_line_for_line() {
        let src = "a\n    __shared__ float scratch[32];\n    extern __shared__ float smem[]; // tiles\nb\n";
        let out = rewrite_shared(src, "x.cu").expect("valid declarations");
        assert_eq!(out.lines().count(), src.lines().count());
        assert!(out.contains("float (&scratch)[32] = *(float(*)[32])ld_emu_static_shared("), "{out}");
        assert!(out.contains("float* smem = (float*)ld_emu_dynamic_shared();"), "{out}");
        assert!(rewrite_shared("int x = 1; __shared__ float s[4];\n", "x.cu").unwrap_err().contains("x.cu:1"));
        assert!(rewrite_shared("extern __shared__ float s[8];\n", "x.cu").is_err());
    }

    #[test]
    fn kernels_are_found_and_non_extern_c_ones_refused() {
        let pre = "extern \"C\" __ld_emu_kernel__ void a(float* x) {}\nextern \"C\" __ld_emu_kernel__ void b (int n) {}";
        assert_eq!(scan_kernels(pre).expect("two kernels"), vec!["a".to_string(), "b".to_string()]);
        assert!(scan_kernels("__ld_emu_kernel__ void c(int n) {}").is_err());
    }
}
