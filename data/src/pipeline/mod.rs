//! The staged data pipeline: the same stages for `liandan data prepare` (one process) and for
//! the coordinator's `data` phase (a gang of workers over a shared filesystem).
//!
//! | # | stage | tasks | what a task does |
//! |---|---|---|---|
//! | 1 | `clean` | one per input task | stream documents, rewrites and line rules; emit boilerplate keys by partition |
//! | 2 | `boilerplate` | one per partition | count (site, line) pairs across documents; pick the boilerplate lines |
//! | 3 | `filter` | one per input task | drop boilerplate lines, document filters; exact key, MinHash signature, LSH band keys by partition |
//! | 4 | `pairs` | one per partition | documents sharing a band key (or the exact key) and similar enough: duplicate pairs |
//! | 5 | `clusters` | 1 | union of the pairs into clusters; every member but the first document is removed |
//! | 6 | `tokenizer` | 1 | BPE on a deterministic sample of the training split (or the given tokenizer) |
//! | 7 | `tokenize` | one per input task | split, encode, sorted runs of documents |
//! | 8 | `shards` | 1 | merge the runs in hash order into shards; `manifest.json`, `report.json` |
//!
//! Input tasks are files packed, or large files cut, to about `task_bytes` ([`crate::stream`]);
//! partitions are a function of the input size. Neither depends on the number of workers, and
//! every decision depends only on document content and position in the sorted input, so the
//! output is byte-identical for any world size. In each stage rank r runs tasks i ≡ r (mod
//! world); each task's files and completion record ([`work`]) are written atomically, stages are
//! separated by waiting for every record and a barrier, and a re-formed group skips tasks whose
//! records verify: a killed worker costs its unfinished task.
//!
//! Memory: every stage streams. Documents are held one at a time (capped by [`Limits`]); the
//! keyed stages sort on disk past their share of `memory_budget` ([`crate::extsort`]); tokenized
//! runs are written sorted in pieces of the budget and merged; the tokenizer is trained on a
//! sample of at most `tokenizer_sample_bytes`. What grows with the corpus is only per-document
//! bookkeeping of duplicates (the clusters stage: about 50 bytes per document that has one).

mod clean_stage;
mod dedup_stage;
mod token_stage;
pub mod work;

pub use token_stage::TokenizerTask;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clean::CleanConfig;
use crate::dedup::DedupConfig;
use crate::error::{DataError, Result};
use crate::ingest::{IngestOptions, expand_inputs};
use crate::prepare::{Progress, Report};
use crate::shard::SplitRatios;
use crate::stream::{Chunk, Limits, plan_chunks};
use work::Owner;

/// The stages, in order.
pub const STAGES: [&str; 8] = ["clean", "boilerplate", "filter", "pairs", "clusters", "tokenizer", "tokenize", "shards"];

/// Everything the pipeline needs (`[phases.data]` in a job spec; `liandan data prepare`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    /// Files, directories or globs.
    pub inputs: Vec<String>,
    /// The output directory (in a job: the spec's `data.prepared`).
    pub out: PathBuf,
    pub ingest: IngestOptions,
    pub clean: CleanConfig,
    pub dedup: DedupConfig,
    pub split: SplitRatios,
    /// Vocabulary of the tokenizer to train (ignored with `tokenizer`).
    pub vocab_size: usize,
    /// Use this existing `tokenizer.json` (or a model directory holding it with its
    /// `tokenizer_config.json`) instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Tokens per shard file.
    pub shard_tokens: usize,
    /// Bytes the pipeline may hold in memory (all threads together).
    pub memory_budget: u64,
    /// Input bytes per task.
    pub task_bytes: u64,
    /// Most bytes of training text the tokenizer is trained on (a deterministic sample beyond);
    /// default `memory_budget / 128`: BPE training held about 75 bytes per byte of text on the
    /// chinese-poetry corpus and about 100 on the synthetic one (the byte-level pre-tokenizer
    /// makes every clause of Chinese text one long word).
    pub tokenizer_sample_bytes: Option<u64>,
    pub limits: Limits,
    /// Pad a trained vocabulary that came out smaller than `vocab_size` with reserved tokens, so
    /// that a model sized before the data existed fits it (set by the coordinator).
    pub exact_vocab: bool,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            inputs: Vec::new(),
            out: PathBuf::new(),
            ingest: IngestOptions::default(),
            clean: CleanConfig::default(),
            dedup: DedupConfig::default(),
            split: SplitRatios::default(),
            vocab_size: 8192,
            tokenizer: None,
            shard_tokens: 10_000_000,
            memory_budget: 1 << 30,
            task_bytes: 8 << 20,
            tokenizer_sample_bytes: None,
            limits: Limits::default(),
            exact_vocab: false,
        }
    }
}

/// Memory BPE training holds per byte of sampled text (measured: see `sample_bytes`).
pub const BPE_BYTES_PER_BYTE: u64 = 128;

/// Smallest memory budget: below it the fixed costs (tokenizer, rules, buffers) do not fit.
pub const MIN_BUDGET: u64 = 32 << 20;

impl PrepareConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// The field and why.
    pub fn validate(&self) -> Result<()> {
        self.split.validate()?;
        self.dedup.validate()?;
        self.clean.validate()?;
        let bad = |field: &'static str, reason: String| Err(DataError::Config { field, reason });
        if self.memory_budget < MIN_BUDGET {
            return bad("memory_budget", format!("must be at least {} MiB, got {} bytes", MIN_BUDGET >> 20, self.memory_budget));
        }
        if self.task_bytes < 4096 {
            return bad("task_bytes", format!("must be at least 4096, got {}", self.task_bytes));
        }
        if self.shard_tokens == 0 {
            return bad("shard_tokens", "must be at least 1".into());
        }
        let doc = self.limits.max_doc_bytes as u64;
        if self.limits.max_line_bytes == 0 || doc == 0 {
            return bad("limits", "max_line_bytes and max_doc_bytes must be at least 1".into());
        }
        // A document is held a few times over while it is cleaned (rewrites, line lists) on
        // every thread at once: the caps must leave room in the budget.
        if 16 * doc * rayon::current_num_threads() as u64 > self.memory_budget {
            return bad(
                "limits.max_doc_bytes",
                format!("{doc} is too large for memory_budget {} on {} threads (16 × max_doc_bytes × threads must fit)", self.memory_budget, rayon::current_num_threads()),
            );
        }
        if self.tokenizer_sample_bytes == Some(0) && self.tokenizer.is_none() {
            return bad("tokenizer_sample_bytes", "must be at least 1 when a tokenizer is trained".into());
        }
        Ok(())
    }

    /// The tokenizer's sample size.
    pub fn sample_bytes(&self) -> u64 {
        self.tokenizer_sample_bytes.unwrap_or(self.memory_budget / BPE_BYTES_PER_BYTE)
    }

    /// Bytes one task may hold: the budget shared by the threads that run tasks at once.
    fn task_budget(&self) -> usize {
        (self.memory_budget / rayon::current_num_threads().max(1) as u64 / 2) as usize
    }
}

/// Tasks per stage, fixed by the inputs and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub files: usize,
    pub input_bytes: u64,
    pub tasks: Vec<Vec<Chunk>>,
    pub partitions: usize,
    /// SHA-256 of the settings and of every input's path, size and modification time.
    pub fingerprint: String,
}

impl Plan {
    /// Tasks of stage `s`.
    pub fn stage_tasks(&self, s: usize) -> usize {
        match STAGES[s] {
            "clean" | "filter" | "tokenize" => self.tasks.len(),
            "boilerplate" | "pairs" => self.partitions,
            _ => 1,
        }
    }

    /// Tasks of all stages: the data phase's steps.
    pub fn total_tasks(&self) -> u64 {
        (0..STAGES.len()).map(|s| self.stage_tasks(s) as u64).sum()
    }
}

/// Expands the inputs and cuts them into tasks.
///
/// # Errors
/// Bad settings; inputs that match nothing or are not regular files, named.
pub fn plan(cfg: &PrepareConfig) -> Result<Plan> {
    cfg.validate()?;
    let files = expand_inputs(&cfg.inputs)?;
    let tasks = plan_chunks(&files, cfg.task_bytes)?;
    let input_bytes: u64 = tasks.iter().flatten().map(|c| c.bytes).sum();
    let partitions = input_bytes.div_ceil(4 * cfg.task_bytes).clamp(1, 256) as usize;
    let mut h = sha2::Sha256::new();
    use sha2::Digest;
    h.update(serde_json::to_vec(cfg).map_err(|e| DataError::Config { field: "config", reason: e.to_string() })?);
    for f in &files {
        let m = std::fs::metadata(f).map_err(|e| DataError::io(f, e))?;
        let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        h.update(format!("{}\0{}\0{mtime}\n", f.display(), m.len()).as_bytes());
    }
    let fingerprint = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Plan { files: files.len(), input_bytes, tasks, partitions, fingerprint })
}

/// The group of ranks a run belongs to: one process, or the workers of a data phase.
pub trait Group {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Raised when the run must stop (the generation ended); tasks watch it.
    fn stop_signal(&self) -> &std::sync::atomic::AtomicBool;
    fn stopped(&self) -> bool {
        self.stop_signal().load(Ordering::SeqCst)
    }
    /// Returns once every rank has reached it; `Err` when the group broke.
    fn barrier(&mut self) -> std::result::Result<(), String>;
}

/// A group of one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl Group for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn stop_signal(&self) -> &std::sync::atomic::AtomicBool {
        static NEVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        &NEVER
    }
    fn barrier(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// How a run ended on this rank.
#[derive(Debug)]
pub enum RunOutcome {
    /// The output is in place; rank 0 returns the report.
    Done(Option<Box<Report>>),
    /// The group stopped (generation over) or broke; the reason.
    Stopped(String),
}

/// The work directory of an output directory: `parent/.<name>.work`.
pub fn work_dir(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| DataError::Config { field: "out", reason: format!("'{}' has no directory name", out.display()) })?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.work", name.to_string_lossy())))
}

/// What the stages share.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a PrepareConfig,
    pub plan: &'a Plan,
    pub work: PathBuf,
    pub stopped: &'a (dyn Fn() -> bool + Sync),
}

/// Runs the pipeline as one rank of `group`; the output appears at `cfg.out` when the last
/// stage is done (rank 0 moves it there). `owner` names this run in `owner.json`; `stale` says
/// whether another owner found there is gone. With `reuse`, an output at `cfg.out` that was made
/// from the same plan is kept as it is (a data phase that re-forms after it finished).
///
/// # Errors
/// Bad inputs or settings, I/O errors, each named; the work directory is removed (by rank 0)
/// unless another run owns it.
pub fn run(cfg: &PrepareConfig, plan: &Plan, owner: &str, stale: &dyn Fn(&Owner) -> bool, reuse: bool, group: &mut dyn Group, progress: &dyn Progress) -> Result<RunOutcome> {
    let work = work_dir(&cfg.out)?;
    let me = Owner { owner: owner.to_string(), fingerprint: plan.fingerprint.clone() };
    if reuse && let Some(r) = finished_report(&cfg.out, &plan.fingerprint) {
        // A rank 0 that died between moving the output into place and removing the work
        // directory left it behind.
        if group.rank() == 0 && work::claim(&work, &me, &|_| false).is_ok() {
            let _ = std::fs::remove_dir_all(&work);
        }
        return Ok(RunOutcome::Done((group.rank() == 0).then(|| Box::new(r))));
    }
    work::claim(&work, &me, stale)?;
    let result = run_stages(cfg, plan, &work, group, progress);
    if group.rank() == 0 && result.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

/// The report of a complete output made from the plan with `fingerprint`.
fn finished_report(out: &Path, fingerprint: &str) -> Option<Report> {
    let r: Report = serde_json::from_slice(&std::fs::read(out.join("report.json")).ok()?).ok()?;
    (r.fingerprint == fingerprint && out.join(crate::shard::MANIFEST).is_file()).then_some(r)
}

fn run_stages(cfg: &PrepareConfig, plan: &Plan, work: &Path, group: &mut dyn Group, progress: &dyn Progress) -> Result<RunOutcome> {
    let (rank, world) = (group.rank(), group.world().max(1));
    let mut seconds = BTreeMap::new();
    for (s, stage) in STAGES.iter().enumerate() {
        let t = Instant::now();
        let total = plan.stage_tasks(s);
        progress.begin(stage, total as u64);
        let seen = AtomicUsize::new(0);
        let mine: Vec<usize> = (0..total).filter(|i| i % world == rank).collect();
        let ran = {
            let stop_flag = group.stop_signal();
            let stopped = || stop_flag.load(Ordering::SeqCst);
            let ctx = Ctx { cfg, plan, work: work.to_path_buf(), stopped: &stopped };
            let pending: Vec<usize> = mine.into_par_iter().filter(|&i| work::verified_record(work, stage, i).is_none()).collect();
            let done_before = work::records_present(work, stage, total);
            seen.store(done_before, Ordering::SeqCst);
            progress.advance(done_before as u64);
            pending.par_iter().try_for_each(|&i| -> Result<()> {
                if stop_flag.load(Ordering::SeqCst) {
                    return Ok(());
                }
                run_task(&ctx, s, i)?;
                seen.fetch_add(1, Ordering::SeqCst);
                progress.advance(1);
                Ok(())
            })
        };
        match ran {
            Err(DataError::Stopped) => return Ok(RunOutcome::Stopped(format!("stopped in stage {stage}"))),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if group.stopped() {
            return Ok(RunOutcome::Stopped(format!("stopped in stage {stage}")));
        }
        // Wait for the other ranks' tasks of this stage.
        loop {
            let n = work::records_present(work, stage, total);
            let before = seen.swap(n, Ordering::SeqCst);
            if n > before {
                progress.advance((n - before) as u64);
            }
            if n == total {
                break;
            }
            if group.stopped() {
                return Ok(RunOutcome::Stopped(format!("stopped waiting in stage {stage}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = group.barrier() {
            return Ok(RunOutcome::Stopped(format!("barrier after stage {stage}: {e}")));
        }
        check_not_empty(cfg, plan, work, stage)?;
        let secs = t.elapsed().as_secs_f64();
        let mb = plan.input_bytes as f64 / 1e6;
        progress.end(stage, &format!("{total} task(s), {:.1} MB/s of input", mb / secs.max(1e-9)));
        seconds.insert(stage.to_string(), secs);
    }
    if rank != 0 {
        return Ok(RunOutcome::Done(None));
    }
    let mut report = token_stage::final_report(cfg, plan, work)?;
    report.seconds = seconds;
    let final_dir = work.join("final");
    let json = serde_json::to_vec_pretty(&report).map_err(|e| DataError::file(&final_dir, e.to_string()))?;
    crate::shard::write_atomic(&final_dir.join("report.json"), &json)?;
    swap_into_place(&final_dir, &cfg.out)?;
    std::fs::remove_dir_all(work).map_err(|e| DataError::io(work, e))?;
    Ok(RunOutcome::Done(Some(Box::new(report))))
}

/// Inputs with no documents, or with every document cleaned away, fail after the stage that
/// shows it (on every rank alike).
fn check_not_empty(cfg: &PrepareConfig, plan: &Plan, work: &Path, stage: &str) -> Result<()> {
    let what = || cfg.inputs.join(" ");
    match stage {
        "clean" => {
            let mut n = 0;
            for t in 0..plan.tasks.len() {
                n += work::load_stats::<clean_stage::CleanTask>(work, "clean", t)?.documents_in;
            }
            if n == 0 {
                return Err(DataError::Input { what: what(), reason: "no documents (empty inputs)".into() });
            }
        }
        "filter" => {
            let mut n = 0;
            for t in 0..plan.tasks.len() {
                n += work::load_stats::<clean_stage::FilterTask>(work, "filter", t)?.kept;
            }
            if n == 0 {
                return Err(DataError::Input { what: what(), reason: "every document was removed by cleaning".into() });
            }
        }
        _ => {}
    }
    Ok(())
}

fn run_task(ctx: &Ctx, stage: usize, task: usize) -> Result<()> {
    match STAGES[stage] {
        "clean" => clean_stage::clean(ctx, task),
        "boilerplate" => clean_stage::boilerplate(ctx, task),
        "filter" => clean_stage::filter(ctx, task),
        "pairs" => dedup_stage::pairs(ctx, task),
        "clusters" => dedup_stage::clusters(ctx),
        "tokenizer" => token_stage::tokenizer(ctx),
        "tokenize" => token_stage::tokenize(ctx, task),
        _ => token_stage::shards(ctx),
    }
}

/// Replaces `out` by `dir`; an existing `out` is moved aside first and removed after.
fn swap_into_place(dir: &Path, out: &Path) -> Result<()> {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let old = out.with_file_name(format!(".{name}.old-{}", std::process::id()));
    let had = out.exists();
    if had {
        std::fs::rename(out, &old).map_err(|e| DataError::io(out, e))?;
    }
    std::fs::rename(dir, out).map_err(|e| DataError::io(out, e))?;
    if had {
        std::fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
    }
    Ok(())
}

/// Stable 64-bit hash of a string (xxh3 with a fixed seed per use).
pub(crate) fn h64(s: &str, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), seed)
}
