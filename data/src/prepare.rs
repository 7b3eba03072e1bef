//! `liandan data prepare`: the staged pipeline ([`crate::pipeline`]) in one process, with
//! progress and a funnel report (`report.json`); nothing half-written: everything is built in a
//! work directory beside the output and renamed into place at the end.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::clean::CleanStats;
use crate::dedup::DedupStats;
use crate::error::{DataError, Result};
use crate::ingest::IngestStats;
pub use crate::pipeline::TokenizerTask;

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

pub use crate::pipeline::PrepareConfig;

/// Documents, characters and tokens of one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SplitCount {
    pub documents: u64,
    pub chars: u64,
    pub tokens: u64,
}

/// The funnel: what came in, what each step removed, what went out.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub inputs: Vec<String>,
    pub ingest: IngestStats,
    pub documents_in: u64,
    pub chars_in: u64,
    /// UTF-8 bytes of the documents' text (what throughput is measured in).
    #[serde(default)]
    pub text_bytes_in: u64,
    pub clean: CleanStats,
    pub documents_after_clean: u64,
    pub chars_after_clean: u64,
    pub dedup: DedupStats,
    pub splits: BTreeMap<String, SplitCount>,
    pub vocab_size: usize,
    pub tokenizer_trained: bool,
    /// What the tokenizer was trained on.
    pub tokenizer: TokenizerTask,
    /// Input tasks and key partitions of the run.
    pub tasks: usize,
    pub partitions: usize,
    pub memory_budget: u64,
    /// The plan this output was made from (inputs and settings).
    pub fingerprint: String,
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
        if self.tokenizer.trained {
            let t = &self.tokenizer;
            row(&mut s, &format!("tokenizer sample ({:.0}%)", 100.0 * t.sample_rate), t.sample_documents.to_string(), format!("{} B", t.sample_bytes));
        }
        for (name, c) in &self.splits {
            row(&mut s, &format!("{name} ({} tokens)", c.tokens), c.documents.to_string(), c.chars.to_string());
        }
        let i = &self.ingest;
        s.push_str(&format!(
            "(rewrites count documents changed; line rules and filters count documents touched or dropped; invalid UTF-8 replaced: {}; malformed lines skipped: {}; over-long lines cut or dropped: {}; documents cut: {}; files skipped: {})\n",
            i.invalid_utf8, i.malformed_lines, i.cut_lines, i.cut_documents, i.skipped_files
        ));
        s
    }
}

/// Runs the pipeline in this process and writes `out/`: `tokenizer.json`,
/// `<split>-NNNNN.bin`, `manifest.json`, `report.json` (the stages of [`crate::pipeline`], every
/// task of each stage on this process's threads).
///
/// # Errors
/// Bad inputs or settings, named; I/O errors, named. On error nothing is left at `out` (an
/// earlier complete output there is kept) and the work directory is removed.
pub fn prepare(cfg: &PrepareConfig, progress: &dyn Progress) -> Result<Report> {
    let plan = crate::pipeline::plan(cfg)?;
    let host = hostname();
    let owner = format!("liandan data prepare (pid {} on {host})", std::process::id());
    // A run of this command on this host whose process is gone left its work directory behind.
    let stale = |o: &crate::pipeline::work::Owner| {
        o.owner
            .strip_prefix("liandan data prepare (pid ")
            .and_then(|r| r.strip_suffix(&format!(" on {host})")))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    match crate::pipeline::run(cfg, &plan, &owner, &stale, false, &mut crate::pipeline::Alone, progress)? {
        crate::pipeline::RunOutcome::Done(Some(r)) => Ok(*r),
        _ => Err(DataError::Input { what: cfg.out.display().to_string(), reason: "the run stopped before its output was complete".into() }),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
