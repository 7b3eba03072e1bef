//! A synthetic corpus of any size, for the memory test and the benchmarks: JSONL files of
//! Chinese-looking documents whose characters follow a Zipf-like law over the CJK block, with
//! clause punctuation, some repeated documents (exact duplicates) and some edited copies (near
//! duplicates), from a fixed seed: the same bytes on every machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Bytes per file written.
const FILE_BYTES: u64 = 64 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A character: rank k of 3000 drawn with probability ∝ 1/(k+1) (approximately, by inverting
/// the harmonic law with a uniform draw).
fn zipf_char(r: &mut Rng) -> char {
    let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
    let k = ((3001f64).powf(u) - 1.0) as u32;
    char::from_u32(0x4E00 + (k.wrapping_mul(2_654_435_761) % 20_000)).unwrap_or('的')
}

fn document(r: &mut Rng) -> String {
    let mut s = String::new();
    let lines = 1 + r.below(12);
    for l in 0..lines {
        if l > 0 {
            s.push('\n');
        }
        let clauses = 2 + r.below(8);
        for c in 0..clauses {
            for _ in 0..4 + r.below(6) {
                s.push(zipf_char(r));
            }
            s.push(if c + 1 == clauses { '。' } else { '，' });
        }
    }
    s
}

/// Writes about `bytes` of JSONL under `dir` (`synth-NNNN.jsonl`, 64 MiB each); returns the files.
///
/// # Errors
/// I/O errors, named.
pub fn write_corpus(dir: &Path, bytes: u64, seed: u64) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut r = Rng(seed | 1);
    let mut files = Vec::new();
    let mut written = 0u64;
    let mut recent: Vec<String> = Vec::new();
    while written < bytes {
        let path = dir.join(format!("synth-{:04}.jsonl", files.len()));
        let f = std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
        let mut w = std::io::BufWriter::new(f);
        let mut in_file = 0u64;
        while in_file < FILE_BYTES.min(bytes - written) {
            let roll = r.below(100);
            let text = if roll < 3 && !recent.is_empty() {
                recent[r.below(recent.len() as u64) as usize].clone()
            } else if roll < 6 && !recent.is_empty() {
                // An edited copy: one clause changed.
                let base = &recent[r.below(recent.len() as u64) as usize];
                let mut chars: Vec<char> = base.chars().collect();
                let at = r.below(chars.len() as u64) as usize;
                for c in chars.iter_mut().skip(at).take(3) {
                    if *c != '\n' && *c != '，' && *c != '。' {
                        *c = zipf_char(&mut r);
                    }
                }
                chars.into_iter().collect()
            } else {
                document(&mut r)
            };
            let line = serde_json::json!({ "text": text }).to_string();
            w.write_all(line.as_bytes()).and_then(|_| w.write_all(b"\n")).map_err(|e| DataError::io(&path, e))?;
            in_file += line.len() as u64 + 1;
            if recent.len() < 256 {
                recent.push(text);
            } else {
                let i = r.below(256) as usize;
                recent[i] = text;
            }
        }
        w.flush().map_err(|e| DataError::io(&path, e))?;
        written += in_file;
        files.push(path);
    }
    Ok(files)
}
