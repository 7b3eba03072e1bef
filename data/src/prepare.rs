//! `liandan data prepare`: ingest → clean → deduplicate → split → tokenizer → shards, with
//! progress, a funnel report (`report.json`) and nothing half-written: everything is built in a
//! temporary sibling directory and renamed into place at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::clean::{CleanConfig, CleanStats, Cleaner};
use crate::dedup::{dedup, DedupConfig, DedupStats};
use crate::error::{DataError, Result};
use crate::ingest::{expand_inputs, read_file, IngestOptions, IngestStats, RawDoc};
use crate::shard::{dtype_for, sha256_hex, write_atomic, Manifest, ShardWriter, Split, SplitInfo, SplitRatios, VERSION};
use crate::tokenizer::ChatTokenizer;

/// Progress of a long stage (drawn as bars by the CLI).
pub trait Progress: Sync {
    /// A stage of `total` units starts (0 when unknown).
    fn begin(&self, stage: &str, total: u64);
    fn advance(&self, n: u64);
    /// The stage ended; `summary` is one line for the log.
    fn end(&self, stage: &str, summary: &str);
}

/// No progress output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self, _: &str, _: &str) {}
}

/// Everything `prepare` needs.
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub ingest: IngestOptions,
    pub clean: CleanConfig,
    pub dedup: DedupConfig,
    pub split: SplitRatios,
    /// Vocabulary of the tokenizer to train (ignored with `tokenizer`).
    pub vocab_size: usize,
    /// Use this existing `tokenizer.json` instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Tokens per shard file.
    pub shard_tokens: usize,
}

/// Documents, characters and tokens of one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitCount {
    pub documents: u64,
    pub chars: u64,
    pub tokens: u64,
}

/// The funnel: what came in, what each step removed, what went out.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub inputs: Vec<String>,
    pub ingest: IngestStats,
    pub documents_in: u64,
    pub chars_in: u64,
    pub clean: CleanStats,
    pub documents_after_clean: u64,
    pub chars_after_clean: u64,
    pub dedup: DedupStats,
    pub splits: BTreeMap<String, SplitCount>,
    pub vocab_size: usize,
    pub tokenizer_trained: bool,
    /// Wall time per stage.
    pub seconds: BTreeMap<String, f64>,
}

impl Report {
    /// The funnel as a text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let row = |s: &mut String, a: &str, d: String, c: String| s.push_str(&format!("{a:<34} {d:>12} {c:>14}\n"));
        row(&mut s, "stage", "documents".into(), "characters".into());
        row(&mut s, &format!("read ({} files)", self.ingest.files), self.documents_in.to_string(), self.chars_in.to_string());
        for (rule, c) in &self.clean.rules {
            let what = if c.lines > 0 { format!("  {rule} ({} lines)", c.lines) } else { format!("  {rule}") };
            let chars = format!("{}", -c.chars);
            row(&mut s, &what, format!("{}", c.documents), chars);
        }
        row(&mut s, "after cleaning", self.documents_after_clean.to_string(), self.chars_after_clean.to_string());
        row(&mut s, "  exact duplicates", format!("-{}", self.dedup.exact), String::new());
        row(&mut s, "  near duplicates", format!("-{}", self.dedup.near), String::new());
        row(&mut s, "after dedup", self.dedup.kept.to_string(), String::new());
        for (name, c) in &self.splits {
            row(&mut s, &format!("{name} ({} tokens)", c.tokens), c.documents.to_string(), c.chars.to_string());
        }
        s.push_str(&format!(
            "(rewrites count documents changed; line rules and filters count documents touched or dropped; invalid UTF-8 replaced: {}; malformed lines skipped: {})\n",
            self.ingest.invalid_utf8, self.ingest.malformed_lines
        ));
        s
    }
}

/// Runs the pipeline and writes `out/`: `tokenizer.json`, `<split>-NNNNN.bin`, `manifest.json`,
/// `report.json`.
///
/// # Errors
/// Bad inputs or settings, named; I/O errors, named. On error nothing is left at `out`
/// (an earlier complete output there is kept).
pub fn prepare(cfg: &PrepareConfig, progress: &dyn Progress) -> Result<Report> {
    cfg.split.validate()?;
    cfg.dedup.validate()?;
    let cleaner = Cleaner::new(cfg.clean.clone())?;
    let tokenizer_given = match &cfg.tokenizer {
        Some(p) => Some(ChatTokenizer::load(p, None)?),
        None => None,
    };
    let mut seconds = BTreeMap::new();

    // 1. Ingest, files in parallel, documents in file order.
    let t = Instant::now();
    let files = expand_inputs(&cfg.inputs)?;
    progress.begin("read", files.len() as u64);
    let per_file: Vec<(Vec<RawDoc>, IngestStats)> = files
        .par_iter()
        .map(|f| {
            let r = read_file(f, &cfg.ingest);
            progress.advance(1);
            r
        })
        .collect::<Result<_>>()?;
    let mut ingest = IngestStats::default();
    let mut docs = Vec::new();
    for (d, s) in per_file {
        docs.extend(d);
        ingest.merge(s);
    }
    if docs.is_empty() {
        return Err(DataError::Input { what: cfg.inputs.join(" "), reason: "no documents (empty inputs)".into() });
    }
    let documents_in = docs.len() as u64;
    let chars_in: u64 = docs.par_iter().map(|d| d.text.chars().count() as u64).sum();
    progress.end("read", &format!("{documents_in} documents, {chars_in} characters from {} files", files.len()));
    seconds.insert("read".into(), t.elapsed().as_secs_f64());

    // 2. Clean.
    let t = Instant::now();
    progress.begin("clean", 0);
    let (cleaned, clean_stats) = cleaner.clean_corpus(docs);
    let kept: Vec<_> = cleaned.into_iter().filter(|d| d.dropped_by.is_none() && !d.text.is_empty()).collect();
    let chars_after_clean: u64 = kept.iter().map(|d| d.text.chars().count() as u64).sum();
    progress.end("clean", &format!("{} documents kept", kept.len()));
    seconds.insert("clean".into(), t.elapsed().as_secs_f64());
    if kept.is_empty() {
        return Err(DataError::Input { what: cfg.inputs.join(" "), reason: "every document was removed by cleaning".into() });
    }

    // 3. Deduplicate.
    let t = Instant::now();
    progress.begin("dedup", 0);
    let texts: Vec<&str> = kept.iter().map(|d| d.text.as_str()).collect();
    let (dups, dedup_stats) = dedup(&texts, &cfg.dedup);
    let unique: Vec<&str> = texts.iter().zip(&dups).filter(|(_, d)| d.is_none()).map(|(t, _)| *t).collect();
    progress.end("dedup", &format!("{} exact and {} near duplicates removed", dedup_stats.exact, dedup_stats.near));
    seconds.insert("dedup".into(), t.elapsed().as_secs_f64());

    // 4. Split by document hash, and shuffle: documents arrive grouped by source file, and a
    // training run that reads shards in order must not see one source after another. The order
    // is a hash of the text, so it is deterministic and independent of the input order.
    let mut unique = unique;
    unique.par_sort_by_cached_key(|t| (xxhash_rust::xxh3::xxh3_64_with_seed(t.as_bytes(), 0x5A0F), *t));
    let assigned: Vec<Split> = unique.par_iter().map(|t| cfg.split.assign(t)).collect();

    // 5. Tokenizer: trained on the training split only, so val/test stay unseen.
    let t = Instant::now();
    let trained = tokenizer_given.is_none();
    let tokenizer = match tokenizer_given {
        Some(tk) => tk,
        None => {
            progress.begin("tokenizer", 0);
            let train_texts = unique.iter().zip(&assigned).filter(|(_, s)| **s == Split::Train).map(|(t, _)| *t);
            let tk = ChatTokenizer::train(train_texts, cfg.vocab_size)?;
            progress.end("tokenizer", &format!("byte-level BPE with {} tokens", tk.vocab_size()));
            tk
        }
    };
    seconds.insert("tokenizer".into(), t.elapsed().as_secs_f64());

    // 6. Tokenize (parallel) and shard (in order) into a temporary directory.
    let t = Instant::now();
    let tmp = sibling(&cfg.out, "tmp")?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let result = (|| -> Result<BTreeMap<String, (SplitInfo, u64)>> {
        progress.begin("tokenize", unique.len() as u64);
        let eos = tokenizer.special.eos;
        let encoded: Vec<Vec<u32>> = unique
            .par_iter()
            .map(|t| {
                let mut ids = tokenizer.encode(t)?;
                ids.push(eos);
                progress.advance(1);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let dtype = dtype_for(tokenizer.vocab_size());
        let mut out = BTreeMap::new();
        for split in Split::ALL {
            let mut w = ShardWriter::new(&tmp, split, dtype, cfg.shard_tokens);
            let mut chars = 0u64;
            for ((ids, s), text) in encoded.iter().zip(&assigned).zip(&unique) {
                if *s == split {
                    w.push_document(ids)?;
                    chars += text.chars().count() as u64;
                }
            }
            out.insert(split.name().to_string(), (w.finish()?, chars));
        }
        tokenizer.save(&tmp.join("tokenizer.json"))?;
        let tok_bytes = std::fs::read(tmp.join("tokenizer.json")).map_err(|e| DataError::io(tmp.join("tokenizer.json"), e))?;
        let manifest = Manifest {
            format: "liandan-shards".into(),
            version: VERSION,
            tokenizer: "tokenizer.json".into(),
            tokenizer_sha256: sha256_hex(&tok_bytes),
            vocab_size: tokenizer.vocab_size(),
            dtype,
            eos,
            splits: out.iter().map(|(k, (info, _))| (k.clone(), info.clone())).collect(),
        };
        manifest.save(&tmp)?;
        Ok(out)
    })();
    let splits_info = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    progress.end("tokenize", &format!("{} tokens", splits_info.values().map(|(i, _)| i.tokens).sum::<u64>()));
    seconds.insert("tokenize+shard".into(), t.elapsed().as_secs_f64());

    let report = Report {
        inputs: cfg.inputs.clone(),
        ingest,
        documents_in,
        chars_in,
        clean: clean_stats,
        documents_after_clean: kept.len() as u64,
        chars_after_clean,
        dedup: dedup_stats,
        splits: splits_info.iter().map(|(k, (i, chars))| (k.clone(), SplitCount { documents: i.documents, chars: *chars, tokens: i.tokens })).collect(),
        vocab_size: tokenizer.vocab_size(),
        tokenizer_trained: trained,
        seconds,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| DataError::file(&tmp, e.to_string()))?;
    write_atomic(&tmp.join("report.json"), &json)?;
    swap_into_place(&tmp, &cfg.out)?;
    Ok(report)
}

/// `parent/.name.<tag>-<pid>` beside `path`.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| DataError::Config { field: "out", reason: format!("'{}' has no directory name", path.display()) })?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    Ok(parent.join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

/// Replaces `out` by `tmp`; an existing `out` is moved aside first and removed after.
fn swap_into_place(tmp: &Path, out: &Path) -> Result<()> {
    let old = sibling(out, "old")?;
    let had = out.exists();
    if had {
        std::fs::rename(out, &old).map_err(|e| DataError::io(out, e))?;
    }
    std::fs::rename(tmp, out).map_err(|e| DataError::io(out, e))?;
    if had {
        std::fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
    }
    Ok(())
}
