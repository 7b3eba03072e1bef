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
use liandan_data::ingest::{IngestOptions, expand_inputs, read_file};
use liandan_data::prepare::{PrepareConfig, Progress, prepare};
use liandan_data::shard::SplitRatios;

use crate::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Clean documents and write them as JSONL for inspection (one object per document with its
    /// source and the rules that removed something).
    Clean(CleanArgs),
    /// Run the whole pipeline: ingest, clean, dedup, split, train the tokenizer, write shards.
    Prepare(PrepareArgs),
    /// Measure the pipeline's throughput (MB/s, per core) and peak memory, in one process and as
    /// a data phase on 1, 2, … local workers, next to tokenizers' encode-only speed on the same text.
    Bench(crate::data_bench::BenchArgs),
    /// Write a synthetic corpus (Chinese-like JSONL with duplicates) of a given size, for benchmarks.
    Synth(SynthArgs),
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
    /// Tokenize with this existing tokenizer instead of training one: a tokenizer.json, or a
    /// model directory (tokenizer.json, tokenizer_config.json with its chat template and special
    /// tokens, generation_config.json), whose config files go along into the output.
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
    /// Train the tokenizer on at most about this much training text (a deterministic sample;
    /// default: the memory budget / 128, what BPE training fits in it).
    #[arg(long, value_parser = parse_bytes)]
    pub tokenizer_sample: Option<u64>,
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

/// `liandan data synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Bytes of JSONL to write (e.g. 900MB).
    #[arg(long, value_parser = parse_bytes)]
    pub bytes: u64,
    /// Directory to write `synth-NNNN.jsonl` into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn run(cmd: DataCommand, threads: usize) -> Result<(), CliError> {
    match cmd {
        DataCommand::Clean(a) => clean(a),
        DataCommand::Prepare(a) => prepare_cmd(a),
        DataCommand::Bench(a) => crate::data_bench::run(a, threads),
        DataCommand::Synth(a) => {
            let files = liandan_data::synth::write_corpus(&a.out, a.bytes, a.seed)?;
            eprintln!("wrote {} files ({} bytes) to {}", files.len(), a.bytes, a.out.display());
            Ok(())
        }
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
