//! `liandan data bench`: the data pipeline's throughput and peak memory, next to `tokenizers`'
//! encode-only speed on the same text in the same run.
//!
//! Each configuration runs as real processes, so each one's memory is its own: `liandan data
//! prepare` as a child process, and the data phase on a local coordinator with 1, 2, … workers
//! (each worker gets `threads / workers` threads, so every row uses the same cores). Peak memory
//! is the largest `VmHWM` (peak resident set) that `/proc/<pid>/status` shows for any of the
//! configuration's processes, polled every 100 ms while they run (the high-water mark only
//! grows, so the last reading is the peak). Throughput is UTF-8 bytes of document text (the
//! report's `text_bytes_in`) per second of wall time; per core divides by the threads used.
//! Every configuration's `manifest.json` must be the same bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use liandan_data::ingest::IngestOptions;
use liandan_data::stream::{Limits, plan_chunks, read_chunk};

use crate::CliError;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Corpus to measure on (files, directories or globs).
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Where the outputs, logs and the local cluster's store go (replaced).
    #[arg(long, default_value = "runs/data-bench")]
    pub out: PathBuf,
    /// Worker counts for the data phase runs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
    /// Also run `liandan data prepare` in one process.
    #[arg(long)]
    pub one_process: bool,
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    #[arg(long)]
    pub t2s: bool,
    /// The pipeline's memory budget.
    #[arg(long, default_value = "1GiB", value_parser = crate::data::parse_bytes)]
    pub memory_budget: u64,
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io { path: p.display().to_string(), source: e }
}

/// Peak resident memory (`VmHWM`, bytes) of a running process, if it is still there.
fn hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Polls the processes' peaks every 100 ms until `done` is set; returns the largest.
fn watch_peak(pids: Vec<u32>, done: &std::sync::atomic::AtomicBool) -> u64 {
    let mut peak = 0;
    let mut last = vec![0u64; pids.len()];
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        for (i, p) in pids.iter().enumerate() {
            if let Some(h) = hwm(*p) {
                last[i] = h;
            }
        }
        peak = peak.max(last.iter().copied().max().unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    peak
}

struct Row {
    what: String,
    threads: usize,
    seconds: f64,
    peak: u64,
}

fn prepare_settings(a: &BenchArgs) -> String {
    let inputs: Vec<String> = a.inputs.iter().map(|i| std::fs::canonicalize(i).map_or(i.clone(), |p| p.display().to_string())).collect();
    format!("inputs = {}\nvocab_size = {}\nmemory_budget = {}\nclean = {{ t2s = {} }}\n", serde_json::to_string(&inputs).unwrap_or_default(), a.vocab_size, a.memory_budget, a.t2s)
}

pub fn run(a: BenchArgs, threads: usize) -> Result<(), CliError> {
    let _ = std::fs::remove_dir_all(&a.out);
    std::fs::create_dir_all(&a.out).map_err(io(&a.out))?;
    let out = std::fs::canonicalize(&a.out).map_err(io(&a.out))?;
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(format!("cannot find the liandan executable: {e}")))?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    let mut rows = Vec::new();
    let mut outputs = Vec::new();
    for &w in &a.workers {
        let w = w.max(1);
        let per = (threads / w).max(1);
        let dir = out.join(format!("workers-{w}"));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let prepared = dir.join("prepared");
        let spec = format!(
            "name = \"data-bench\"\n[model]\npreset = \"nano\"\n[data]\nprepared = \"{}\"\n[cluster]\nmin_workers = {w}\nmax_workers = {w}\n[checkpoint]\ndir = \"{}\"\n[[phases]]\nname = \"data\"\nkind = \"data\"\n[phases.prepare]\n{}",
            prepared.display(),
            dir.join("ckpt").display(),
            prepare_settings(&a)
        );
        let mut cluster = crate::up::LocalCluster::start(&dir, w, per, &["--device".into(), "cpu".into()])?;
        let done = std::sync::atomic::AtomicBool::new(false);
        let pids = cluster.worker_pids();
        let t = Instant::now();
        let (status, peak) = std::thread::scope(|s| {
            let watcher = s.spawn(|| watch_peak(pids, &done));
            let r = cluster.run_job(&spec, "liandan data bench");
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (r, watcher.join().unwrap_or(0))
        });
        let seconds = t.elapsed().as_secs_f64();
        cluster.stop();
        let status = status?;
        if status.state != "succeeded" {
            return Err(CliError::Usage(format!("the data phase with {w} worker(s) ended {}: {} (logs in {})", status.state, status.error, dir.join("logs").display())));
        }
        rows.push(Row { what: format!("data phase, {w} worker(s)"), threads: w * per, seconds, peak });
        outputs.push(prepared);
    }
    if a.one_process {
        let prepared = out.join("one-process");
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["--threads", &threads.to_string(), "data", "prepare"]).args(&a.inputs).args([
            "--out",
            &prepared.display().to_string(),
            "--vocab-size",
            &a.vocab_size.to_string(),
            "--memory-budget",
            &a.memory_budget.to_string(),
        ]);
        if a.t2s {
            cmd.arg("--t2s");
        }
        let log = out.join("one-process.log");
        let f = std::fs::File::create(&log).map_err(io(&log))?;
        let f2 = f.try_clone().map_err(io(&log))?;
        let t = Instant::now();
        let mut child = cmd.stdout(f).stderr(f2).spawn().map_err(|e| CliError::Usage(format!("cannot start liandan data prepare: {e}")))?;
        let done = std::sync::atomic::AtomicBool::new(false);
        let pid = child.id();
        let (status, peak) = std::thread::scope(|s| {
            let watcher = s.spawn(|| watch_peak(vec![pid], &done));
            let r = child.wait();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (r, watcher.join().unwrap_or(0))
        });
        let seconds = t.elapsed().as_secs_f64();
        if !status.map_err(io(&log))?.success() {
            return Err(CliError::Usage(format!("liandan data prepare failed (see {})", log.display())));
        }
        rows.push(Row { what: "data prepare, one process".into(), threads, seconds, peak });
        outputs.push(prepared);
    }
    let Some(first) = outputs.first() else { return Err(CliError::Usage("nothing to measure: give --workers or --one-process".into())) };
    let report: liandan_data::prepare::Report =
        serde_json::from_slice(&std::fs::read(first.join("report.json")).map_err(io(first))?).map_err(|e| CliError::Usage(format!("{}: {e}", first.display())))?;
    let manifest = std::fs::read(first.join("manifest.json")).map_err(io(first))?;
    let same = outputs.iter().all(|o| std::fs::read(o.join("manifest.json")).ok().as_deref() == Some(&manifest[..]));

    // The peer: tokenizers' batch encode of the raw documents, same tokenizer, same threads.
    let tk = liandan_data::tokenizer::ChatTokenizer::load(&first.join("tokenizer.json"), None)?;
    let files = liandan_data::ingest::expand_inputs(&a.inputs)?;
    let chunks = plan_chunks(&files, 64 << 20)?;
    let (mut encode_s, mut bytes, mut batch) = (0f64, 0u64, Vec::new());
    let flush = |batch: &mut Vec<String>, encode_s: &mut f64| -> Result<(), CliError> {
        let inputs: Vec<tokenizers::EncodeInput> = batch.drain(..).map(|t| t.into()).collect();
        let t = Instant::now();
        tk.inner().encode_batch(inputs, false).map_err(|e| CliError::Usage(format!("encode_batch: {e}")))?;
        *encode_s += t.elapsed().as_secs_f64();
        Ok(())
    };
    for c in chunks.iter().flatten() {
        let mut docs = Vec::new();
        read_chunk(c, &IngestOptions::default(), &Limits::default(), &mut |d| {
            docs.push(d.text);
            Ok(())
        })?;
        for d in docs {
            bytes += d.len() as u64;
            batch.push(d);
            if batch.len() == 4096 {
                flush(&mut batch, &mut encode_s)?;
            }
        }
    }
    flush(&mut batch, &mut encode_s)?;
    let encode_mb_s = bytes as f64 / 1e6 / encode_s;
    let mb = report.text_bytes_in as f64 / 1e6;
    println!(
        "corpus: {} files, {} documents, {mb:.1} MB of text ({} MB on disk); {threads} threads; load average before: {}",
        files.len(),
        report.documents_in,
        sum_sizes(&files) / 1_000_000,
        load.trim()
    );
    println!("| run | threads | time | MB/s | MB/s per core | peak RSS (largest process) | pipeline / encode-only |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let mb_s = mb / r.seconds;
        println!(
            "| {} | {} | {:.1} s | {:.2} | {:.2} | {:.0} MiB | {:.2} |",
            r.what,
            r.threads,
            r.seconds,
            mb_s,
            mb_s / r.threads as f64,
            r.peak as f64 / (1 << 20) as f64,
            mb_s / encode_mb_s
        );
    }
    println!("| `tokenizers` encode_batch only (the peer) | {threads} | {encode_s:.1} s | {encode_mb_s:.2} | {:.2} | | 1.00 |", encode_mb_s / threads as f64);
    println!("manifests identical across runs: {}", if same { "yes" } else { "NO" });
    println!("load average after: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    if !same {
        return Err(CliError::Usage("the runs wrote different manifests".into()));
    }
    Ok(())
}

fn sum_sizes(files: &[PathBuf]) -> u64 {
    files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum()
}
