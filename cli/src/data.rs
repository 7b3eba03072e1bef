//! `liandan data …`: the data pipeline's commands.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use liandan_data::clean::filters::FilterConfig;
use liandan_data::clean::{CleanConfig, Cleaner};
use liandan_data::dedup::DedupConfig;
use liandan_data::ingest::{expand_inputs, read_file, IngestOptions};
use liandan_data::prepare::{prepare, PrepareConfig, Progress};
use liandan_data::shard::SplitRatios;

use crate::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Clean documents and write them as JSONL for inspection (one object per document with its
    /// source and the rules that removed something).
    Clean(CleanArgs),
    /// Run the whole pipeline: ingest, clean, dedup, split, train the tokenizer, write shards.
    Prepare(PrepareArgs),
    /// Measure pipeline throughput (MB/s) next to tokenizers' encode-only speed on the same text.
    Bench(BenchArgs),
}

/// Options shared by `clean` and `prepare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CleanOptions {
    /// Convert Traditional to Simplified Chinese.
    #[arg(long)]
    pub t2s: bool,
    /// Switch rules off, by name (comma-separated), e.g. `--disable short_line,boilerplate`.
    #[arg(long, value_delimiter = ',')]
    pub disable: Vec<String>,
    /// JSONL field that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Fail on the first malformed JSONL line instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Drop documents with fewer non-space characters than this.
    #[arg(long, default_value_t = 12)]
    pub min_chars: usize,
    /// Keep only documents in these languages (ISO 639-3, comma-separated: cmn,eng); default all.
    #[arg(long, value_delimiter = ',')]
    pub languages: Vec<String>,
    /// Remove a line the learned quality model scores as spam with at least this probability.
    #[arg(long, default_value_t = 0.65)]
    pub quality_threshold: f32,
}

impl CleanOptions {
    fn ingest(&self) -> IngestOptions {
        IngestOptions { text_field: self.text_field.clone(), strict: self.strict }
    }

    fn clean(&self) -> CleanConfig {
        CleanConfig {
            t2s: self.t2s,
            disabled: self.disable.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<BTreeSet<_>>(),
            filters: FilterConfig { min_chars: self.min_chars, ..Default::default() },
            languages: self.languages.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            quality_line_threshold: self.quality_threshold,
            ..Default::default()
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CleanArgs {
    /// Files, directories or globs.
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Output JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the documents that a filter dropped (with `dropped_by`).
    #[arg(long)]
    pub include_dropped: bool,
    #[command(flatten)]
    pub opts: CleanOptions,
}

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Files, directories or globs.
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Output directory (replaced atomically when the run succeeds).
    #[arg(long)]
    pub out: PathBuf,
    /// Vocabulary size of the BPE tokenizer (special tokens included).
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Reuse this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Split ratios train,val,test.
    #[arg(long, default_value = "0.98,0.01,0.01")]
    pub split: String,
    /// Jaccard similarity at which documents count as near-duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub dedup_threshold: f32,
    /// Skip near-duplicate detection (exact duplicates are still removed).
    #[arg(long)]
    pub no_near_dedup: bool,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 10_000_000)]
    pub shard_tokens: usize,
    /// Memory the pipeline may hold, all threads together (bytes, or with KiB/MiB/GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub memory_budget: u64,
    /// Input bytes per task (the unit of work that a worker, or a thread here, takes).
    #[arg(long, default_value = "8MiB", value_parser = parse_bytes)]
    pub task_bytes: u64,
    /// Train the tokenizer on at most about this much training text (a deterministic sample).
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub tokenizer_sample: u64,
    #[command(flatten)]
    pub opts: CleanOptions,
}

/// `123`, `64KiB`, `512MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size like 512MiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("'{s}': unknown unit '{u}' (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Corpus to measure on (files, directories or globs).
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Tokenizer to encode with (default: train one of --vocab-size on the corpus first, untimed).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    #[arg(long)]
    pub t2s: bool,
}

pub fn run(cmd: DataCommand) -> Result<(), CliError> {
    match cmd {
        DataCommand::Clean(a) => clean(a),
        DataCommand::Prepare(a) => prepare_cmd(a),
        DataCommand::Bench(a) => bench(a),
    }
}

fn clean(a: CleanArgs) -> Result<(), CliError> {
    let cleaner = Cleaner::new(a.opts.clean())?;
    let files = expand_inputs(&a.inputs)?;
    let mut docs = Vec::new();
    let mut ingest = liandan_data::ingest::IngestStats::default();
    for f in &files {
        let (d, s) = read_file(f, &a.opts.ingest())?;
        docs.extend(d);
        ingest.merge(s);
    }
    for w in &ingest.warnings {
        eprintln!("warning: {w}");
    }
    let n_in = docs.len();
    let (cleaned, stats) = cleaner.clean_corpus(docs);
    let tmp = a.out.with_extension("jsonl.tmp");
    let io = |e| CliError::Io { path: tmp.display().to_string(), source: e };
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    let mut written = 0;
    for d in &cleaned {
        if d.dropped_by.is_none() || a.include_dropped {
            let line = serde_json::to_string(d).map_err(|e| CliError::Usage(e.to_string()))?;
            writeln!(w, "{line}").map_err(io)?;
            written += 1;
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, &a.out).map_err(|e| CliError::Io { path: a.out.display().to_string(), source: e })?;
    eprintln!("{n_in} documents read from {} files, {written} written to {}", files.len(), a.out.display());
    eprintln!("{:<20} {:>9} {:>9} {:>11}", "rule", "documents", "lines", "characters");
    for (rule, c) in &stats.rules {
        eprintln!("{rule:<20} {:>9} {:>9} {:>11}", c.documents, c.lines, c.chars);
    }
    Ok(())
}

/// Progress bars on a terminal (one per stage, with counts and rates); stage lines otherwise.
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    started: Mutex<Instant>,
    tty: bool,
}

impl Bars {
    pub fn new() -> Self {
        Bars { bar: Mutex::new(None), started: Mutex::new(Instant::now()), tty: std::io::stderr().is_terminal() }
    }
}

impl Progress for Bars {
    fn begin(&self, stage: &str, total: u64) {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if !self.tty {
            return;
        }
        let bar = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
        let template = if total > 0 { "{prefix:>11} [{bar:30}] {pos}/{len} tasks {per_sec} ({elapsed}, eta {eta})" } else { "{prefix:>11} {spinner} {elapsed}" };
        // The templates are constants known to parse.
        bar.set_style(ProgressStyle::with_template(template).expect("static template").progress_chars("=> "));
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            b.inc(n);
        }
    }

    fn end(&self, stage: &str, summary: &str) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
        let secs = self.started.lock().unwrap_or_else(|p| p.into_inner()).elapsed().as_secs_f64();
        eprintln!("{stage:>11}: {summary} ({secs:.1} s)");
    }
}

pub fn prepare_cmd(a: PrepareArgs) -> Result<(), CliError> {
    let cfg = PrepareConfig {
        inputs: a.inputs.clone(),
        out: a.out.clone(),
        ingest: a.opts.ingest(),
        clean: a.opts.clean(),
        dedup: DedupConfig { threshold: a.dedup_threshold, near: !a.no_near_dedup, ..Default::default() },
        split: SplitRatios::parse(&a.split)?,
        vocab_size: a.vocab_size,
        tokenizer: a.tokenizer.clone(),
        shard_tokens: a.shard_tokens,
        memory_budget: a.memory_budget,
        task_bytes: a.task_bytes,
        tokenizer_sample_bytes: a.tokenizer_sample,
        ..Default::default()
    };
    let bars = Bars::new();
    let report = prepare(&cfg, &bars)?;
    for w in &report.ingest.warnings {
        eprintln!("warning: {w}");
    }
    println!("{}", report.table());
    println!("wrote {}: tokenizer.json, manifest.json, report.json and the shards", a.out.display());
    Ok(())
}

fn bench(a: BenchArgs) -> Result<(), CliError> {
    let files = expand_inputs(&a.inputs)?;
    let mut docs = Vec::new();
    for f in &files {
        docs.extend(read_file(f, &IngestOptions::default())?.0);
    }
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    let mb = bytes as f64 / 1e6;
    eprintln!("corpus: {} documents, {mb:.1} MB of UTF-8 from {} files", docs.len(), files.len());
    let tokenizer = match &a.tokenizer {
        Some(p) => liandan_data::tokenizer::ChatTokenizer::load(p, None)?,
        None => {
            eprintln!("training a {}-token tokenizer first (not timed)…", a.vocab_size);
            liandan_data::tokenizer::ChatTokenizer::train(docs.iter().map(|d| d.text.as_str()), a.vocab_size)?
        }
    };
    use rayon::prelude::*;
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();

    // Ceiling: tokenizers' own batch encode of the raw text.
    let t = Instant::now();
    let inputs: Vec<tokenizers::EncodeInput> = texts.iter().map(|t| (*t).into()).collect();
    let enc = tokenizer.inner().encode_batch(inputs, false).map_err(|e| CliError::Usage(format!("encode_batch: {e}")))?;
    let encode_s = t.elapsed().as_secs_f64();
    let tokens: usize = enc.iter().map(|e| e.len()).sum();

    // The pipeline: clean + dedup + tokenize.
    let t = Instant::now();
    let cleaner = Cleaner::new(CleanConfig { t2s: a.t2s, ..Default::default() })?;
    let (cleaned, _) = cleaner.clean_corpus(docs.clone());
    let t_clean = t.elapsed().as_secs_f64();
    let kept: Vec<&str> = cleaned.iter().filter(|d| d.dropped_by.is_none()).map(|d| d.text.as_str()).collect();
    let (dups, _) = liandan_data::dedup::dedup(&kept, &DedupConfig::default());
    let t_dedup = t.elapsed().as_secs_f64() - t_clean;
    let unique: Vec<&str> = kept.iter().zip(&dups).filter(|(_, d)| d.is_none()).map(|(t, _)| *t).collect();
    let n: usize = unique.par_iter().map(|t| tokenizer.encode(t).map(|v| v.len()).unwrap_or(0)).sum();
    let total_s = t.elapsed().as_secs_f64();
    let t_tok = total_s - t_clean - t_dedup;
    let threads = rayon::current_num_threads();
    println!("corpus {mb:.1} MB, {threads} threads");
    println!("tokenizers encode_batch only:   {:>8.2} MB/s  ({tokens} tokens in {encode_s:.2} s)", mb / encode_s);
    println!("clean + dedup + tokenize:       {:>8.2} MB/s  ({total_s:.2} s: clean {t_clean:.2}, dedup {t_dedup:.2}, tokenize {t_tok:.2}; {n} tokens)", mb / total_s);
    println!("ratio pipeline / encode-only:   {:>8.2}", encode_s / total_s);
    println!("bench_result impl=liandan-data mb={mb:.1} pipeline_mb_s={:.2} encode_only_mb_s={:.2}", mb / total_s, mb / encode_s);
    Ok(())
}
