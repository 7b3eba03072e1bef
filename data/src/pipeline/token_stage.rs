//! Stages 6–8: the tokenizer, tokenized runs per task, and the shards.
//!
//! The shards hold the kept documents ordered by a hash of their text (a shuffle that does not
//! depend on input order or world size): each `tokenize` task writes its documents as runs
//! sorted by that hash, in pieces that fit the memory budget, and the `shards` task merges all
//! runs, streaming them into the split's shard files.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::clean_stage::{CleanTask, FilterTask};
use super::dedup_stage::removed_rows;
use super::work::{self, BlobReader, BlobWriter, TaskOut, task_file};
use super::{Ctx, Plan, PrepareConfig};
use crate::dedup::DedupStats;
use crate::error::{DataError, Result};
use crate::ingest::IngestStats;
use crate::prepare::{Report, SplitCount};
use crate::shard::{Manifest, ShardWriter, Split, SplitInfo, VERSION, dtype_for};
use crate::tokenizer::ChatTokenizer;

/// Seed of the order hash (the same as the single-process pipeline always used).
const ORDER_SEED: u64 = 0x5A0F;

/// Counters of the `tokenizer` task.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TokenizerTask {
    pub trained: bool,
    /// Training documents and bytes the BPE saw, and the sampling rate that chose them.
    pub sample_documents: u64,
    pub sample_bytes: u64,
    pub sample_rate: f64,
    /// Reserved tokens added to reach `vocab_size` (`exact_vocab`).
    pub padded: u64,
    pub vocab_size: usize,
}

/// Counters of a `tokenize` task.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct TokenizeTask {
    pub runs: u64,
    pub splits: BTreeMap<String, SplitCount>,
}

fn tokenizer_path(work: &Path) -> PathBuf {
    task_file(work, "tokenizer", 0, "tokenizer.json")
}

/// Kept, non-duplicate documents of one task, in order, as `(text)`.
fn for_each_unique(ctx: &Ctx, task: usize, f: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
    let removed = removed_rows(ctx, task)?;
    let path = task_file(&ctx.work, "filter", task, "kept");
    let mut r = BlobReader::open(&path)?;
    let mut buf = Vec::new();
    let mut row = 0u32;
    let mut next_removed = 0usize;
    while r.next_into(&mut buf)? {
        if (ctx.stopped)() {
            return Err(DataError::Stopped);
        }
        let this = row;
        row += 1;
        if removed.get(next_removed) == Some(&this) {
            next_removed += 1;
            continue;
        }
        let text = std::str::from_utf8(&buf).map_err(|_| DataError::file(&path, "a kept document is not UTF-8"))?;
        f(text)?;
    }
    Ok(())
}

/// Stage 6: trains the BPE on the training split (all of it, or a hash-chosen sample of about
/// `tokenizer_sample_bytes`), or takes the given tokenizer.
pub(crate) fn tokenizer(ctx: &Ctx) -> Result<()> {
    let cfg = ctx.cfg;
    let mut out = TaskOut::new(&ctx.work, "tokenizer", 0)?;
    let tmp = out.file_at(tokenizer_path(&ctx.work));
    let mut st = TokenizerTask::default();
    let tk = match &cfg.tokenizer {
        Some(p) => ChatTokenizer::load(p, None)?,
        None => {
            let mut train_bytes = 0u64;
            for t in 0..ctx.plan.tasks.len() {
                train_bytes += work::load_stats::<FilterTask>(&ctx.work, "filter", t)?.train_bytes;
            }
            let rate = (cfg.sample_bytes() as f64 / train_bytes.max(1) as f64).min(1.0);
            st.sample_rate = rate;
            // The trainer pulls texts through an iterator on its own threads; the documents are
            // streamed to it through a bounded channel from this reader.
            let (tx, rx) = std::sync::mpsc::sync_channel::<String>(256);
            let failed: Mutex<Option<DataError>> = Mutex::new(None);
            let counts = Mutex::new((0u64, 0u64));
            let show = std::io::stderr().is_terminal();
            let trained = std::thread::scope(|s| {
                s.spawn(|| {
                    let r = (0..ctx.plan.tasks.len()).try_for_each(|t| {
                        for_each_unique(ctx, t, &mut |text| {
                            if cfg.split.assign(text) != Split::Train {
                                return Ok(());
                            }
                            let u = (xxhash_rust::xxh3::xxh3_64_with_seed(text.as_bytes(), 0x7A3B) >> 11) as f64 / (1u64 << 53) as f64;
                            if rate < 1.0 && u >= rate {
                                return Ok(());
                            }
                            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                            c.0 += 1;
                            c.1 += text.len() as u64;
                            drop(c);
                            // The trainer hung up: it failed, and says why itself.
                            tx.send(text.to_string()).map_err(|_| DataError::Stopped)
                        })
                    });
                    drop(tx);
                    if let Err(e) = r {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                });
                ChatTokenizer::train_with(rx.into_iter(), cfg.vocab_size, show)
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(e);
            }
            let mut tk = trained?;
            let (docs, bytes) = counts.into_inner().unwrap_or_else(|p| p.into_inner());
            (st.sample_documents, st.sample_bytes, st.trained) = (docs, bytes, true);
            if cfg.exact_vocab {
                st.padded = tk.pad_to(cfg.vocab_size) as u64;
            }
            tk
        }
    };
    st.vocab_size = tk.vocab_size();
    tk.save(&tmp)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| DataError::io(&tmp, e))?;
    // A model's tokenizer keeps its template and stop tokens beside it (where `ChatTokenizer::load`
    // of the tokenizer file finds them), and the shards stage copies them into the output.
    for name in crate::hf_tokenizer::CONFIG_FILES {
        let _ = std::fs::remove_file(ctx.work.join("tokenizer").join(name));
    }
    if tk.is_model_tokenizer() {
        for (name, bytes) in crate::hf_tokenizer::export_files(&tk, 0)? {
            let at = out.file_at(ctx.work.join("tokenizer").join(&name));
            crate::shard::write_atomic(&at, &bytes)?;
        }
    }
    out.commit(&st)?;
    Ok(())
}

/// One tokenized document in a run.
type Doc = (u64, Vec<u32>, u8, u32);

fn write_run(out: &mut TaskOut, k: u64, docs: &mut Vec<Doc>) -> Result<()> {
    docs.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut w = BlobWriter::create(&out.file(&format!("run.{k:04}")))?;
    let mut bytes = Vec::new();
    for (h, tokens, split, chars) in docs.drain(..) {
        bytes.clear();
        bytes.extend_from_slice(&h.to_be_bytes());
        bytes.push(split);
        bytes.extend_from_slice(&chars.to_le_bytes());
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        w.push(&[&bytes])?;
    }
    w.finish()
}

fn split_byte(s: Split) -> u8 {
    match s {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

/// Stage 7: the task's unique documents, split and encoded (ended by `<|eos|>`), as runs sorted
/// by the order hash.
pub(crate) fn tokenize(ctx: &Ctx, task: usize) -> Result<()> {
    let tk = ChatTokenizer::load(&tokenizer_path(&ctx.work), None)?;
    let eos = tk.special.eos;
    let mut out = TaskOut::new(&ctx.work, "tokenize", task)?;
    // The other half of the task's share is the tokenizer's own (its cache, each encoding).
    let budget = ctx.cfg.task_budget() / 2;
    let mut st = TokenizeTask::default();
    let mut docs: Vec<Doc> = Vec::new();
    let mut held = 0usize;
    let r = for_each_unique(ctx, task, &mut |text| {
        let split = ctx.cfg.split.assign(text);
        let mut ids = tk.encode(text)?;
        ids.reserve_exact(1);
        ids.push(eos);
        let chars = text.chars().count() as u32;
        let c = st.splits.entry(split.name().to_string()).or_default();
        (c.documents, c.chars, c.tokens) = (c.documents + 1, c.chars + chars as u64, c.tokens + ids.len() as u64);
        held += 64 + 4 * ids.capacity();
        docs.push((xxhash_rust::xxh3::xxh3_64_with_seed(text.as_bytes(), ORDER_SEED), ids, split_byte(split), chars));
        if held >= budget {
            write_run(&mut out, st.runs, &mut docs)?;
            st.runs += 1;
            held = 0;
        }
        Ok(())
    });
    if let Err(e) = r {
        out.abandon();
        return Err(e);
    }
    if !docs.is_empty() || st.runs == 0 {
        write_run(&mut out, st.runs, &mut docs)?;
        st.runs += 1;
    }
    out.commit(&st)?;
    Ok(())
}

/// Stage 8: merges every run into the shards of `final/`, with the tokenizer and the manifest.
pub(crate) fn shards(ctx: &Ctx) -> Result<()> {
    let final_dir = ctx.work.join("final");
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::create_dir_all(&final_dir).map_err(|e| DataError::io(&final_dir, e))?;
    let tk_bytes = std::fs::read(tokenizer_path(&ctx.work)).map_err(|e| DataError::io(tokenizer_path(&ctx.work), e))?;
    let tk = ChatTokenizer::load(&tokenizer_path(&ctx.work), None)?;
    for name in crate::hf_tokenizer::CONFIG_FILES {
        let p = ctx.work.join("tokenizer").join(name);
        if p.is_file() {
            let b = std::fs::read(&p).map_err(|e| DataError::io(&p, e))?;
            crate::shard::write_atomic(&final_dir.join(name), &b)?;
        }
    }
    let dtype = dtype_for(tk.vocab_size());
    let mut readers = Vec::new();
    for t in 0..ctx.plan.tasks.len() {
        let st: TokenizeTask = work::load_stats(&ctx.work, "tokenize", t)?;
        for k in 0..st.runs {
            readers.push(task_file(&ctx.work, "tokenize", t, &format!("run.{k:04}")));
        }
    }
    let mut heap = BinaryHeap::new();
    let mut open: Vec<BlobReader> = Vec::with_capacity(readers.len());
    let next = |r: &mut BlobReader, path: &Path| -> Result<Option<(u64, Vec<u32>, u8)>> {
        let mut buf = Vec::new();
        if !r.next_into(&mut buf)? {
            return Ok(None);
        }
        if buf.len() < 13 || (buf.len() - 13) % 4 != 0 {
            return Err(DataError::file(path, "a tokenized record of the wrong length"));
        }
        // Lengths checked above.
        let h = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
        let tokens = buf[13..].chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(Some((h, tokens, buf[8])))
    };
    for (i, p) in readers.iter().enumerate() {
        let mut r = BlobReader::open(p)?;
        if let Some((h, tokens, split)) = next(&mut r, p)? {
            heap.push(Reverse((h, tokens, split, i)));
        }
        open.push(r);
    }
    let mut writers: Vec<ShardWriter> = Split::ALL.iter().map(|s| ShardWriter::new(&final_dir, *s, dtype, ctx.cfg.shard_tokens)).collect();
    while let Some(Reverse((_, tokens, split, i))) = heap.pop() {
        if (ctx.stopped)() {
            return Err(DataError::Stopped);
        }
        writers[split as usize].push_document(&tokens)?;
        if let Some((h, t, s)) = next(&mut open[i], &readers[i])? {
            heap.push(Reverse((h, t, s, i)));
        }
    }
    let mut splits = BTreeMap::new();
    for (w, s) in writers.into_iter().zip(Split::ALL) {
        splits.insert(s.name().to_string(), w.finish()?);
    }
    crate::shard::write_atomic(&final_dir.join("tokenizer.json"), &tk_bytes)?;
    let manifest = Manifest {
        format: "liandan-shards".into(),
        version: VERSION,
        tokenizer: "tokenizer.json".into(),
        tokenizer_sha256: crate::shard::sha256_hex(&tk_bytes),
        vocab_size: tk.vocab_size(),
        dtype,
        eos: tk.special.eos,
        splits: splits.clone(),
    };
    manifest.save(&final_dir)?;
    let mut out = TaskOut::new(&ctx.work, "shards", 0)?;
    out.adopt(final_dir.join(crate::shard::MANIFEST));
    out.commit(&splits)?;
    Ok(())
}

/// The funnel, from every task's record (in task order, so any world size gives the same).
pub(crate) fn final_report(cfg: &PrepareConfig, plan: &Plan, work: &Path) -> Result<Report> {
    let mut ingest = IngestStats::default();
    let mut clean = crate::clean::CleanStats::default();
    let (mut documents_in, mut chars_in, mut bytes_in, mut kept, mut chars_after) = (0, 0, 0, 0, 0);
    let mut splits: BTreeMap<String, SplitCount> = BTreeMap::new();
    for t in 0..plan.tasks.len() {
        let c: CleanTask = work::load_stats(work, "clean", t)?;
        ingest.merge(c.ingest);
        clean.merge(c.clean);
        documents_in += c.documents_in;
        chars_in += c.chars_in;
        bytes_in += c.bytes_in;
        let f: FilterTask = work::load_stats(work, "filter", t)?;
        clean.merge(f.clean);
        kept += f.kept;
        chars_after += f.chars;
        let k: TokenizeTask = work::load_stats(work, "tokenize", t)?;
        for (name, s) in k.splits {
            let e = splits.entry(name).or_default();
            (e.documents, e.chars, e.tokens) = (e.documents + s.documents, e.chars + s.chars, e.tokens + s.tokens);
        }
    }
    for s in Split::ALL {
        splits.entry(s.name().to_string()).or_default();
    }
    let dedup: DedupStats = work::load_stats(work, "clusters", 0)?;
    let tok: TokenizerTask = work::load_stats(work, "tokenizer", 0)?;
    let shard_info: BTreeMap<String, SplitInfo> = work::load_stats(work, "shards", 0)?;
    if documents_in == 0 {
        return Err(DataError::Input { what: cfg.inputs.join(" "), reason: "no documents (empty inputs)".into() });
    }
    for (name, info) in &shard_info {
        let want = splits.get(name).map_or(0, |s| s.tokens);
        if info.tokens != want {
            return Err(DataError::file(work, format!("split {name}: shards hold {} tokens, the tokenize tasks counted {want}", info.tokens)));
        }
    }
    Ok(Report {
        inputs: cfg.inputs.clone(),
        ingest,
        documents_in,
        chars_in,
        text_bytes_in: bytes_in,
        clean,
        documents_after_clean: kept,
        chars_after_clean: chars_after,
        dedup,
        splits,
        vocab_size: tok.vocab_size,
        tokenizer_trained: tok.trained,
        tokenizer: tok,
        tasks: plan.tasks.len(),
        partitions: plan.partitions,
        memory_budget: cfg.memory_budget,
        fingerprint: plan.fingerprint.clone(),
        seconds: BTreeMap::new(),
    })
}
