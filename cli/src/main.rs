//! `liandan`: the command-line entry point.
//!
//! # Layout
//! - `train`: single-process training (prepared data or a text file; from scratch, `--init` a
//!   checkpoint or Hugging Face model directory, or `--resume`) with checkpoints
//! - `generate`: sampling from a checkpoint
//! - `plan`: a job spec's memory per rank, phase by phase, before it is submitted
//! - `bench`: training throughput (tokens/s, GFLOP/s, MFU on a GPU) on a preset
//! - `selftest`: the CUDA backend's kernels and a training step against the CPU backend
//! - `up`: the main job on the embedded demo text — train, checkpoint, generate
//!
//! Errors print as one line (`error: …`) and exit with status 1; nothing here panics on input.

mod bench;
mod chat;
mod cluster;
mod data;
mod data_bench;
mod evaluate;
mod generate;
mod plan;
mod progress;
mod selftest;
mod train;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// liandan (炼丹): train GPT-style chat models.
#[derive(Debug, Parser)]
#[command(name = "liandan", version, about)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Log format: pretty or json (filter with RUST_LOG, e.g. RUST_LOG=liandan=debug).
    #[arg(long, global = true, default_value = "pretty")]
    log_format: String,
    /// Coordinator address for client commands.
    #[arg(long, global = true, default_value = cluster::DEFAULT_COORDINATOR)]
    coordinator: String,
    #[command(flatten)]
    creds: cluster::Credentials,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole recipe on the embedded demo data: prepare the data, start a local coordinator
    /// and workers, run pretrain → SFT → reward model → PPO as one job, then score every
    /// phase's checkpoint on held-out prompts and print the table.
    Up(up::UpArgs),
    /// Train a model in this process: on prepared data or a text file (UTF-8 bytes as tokens),
    /// from scratch or from a checkpoint or Hugging Face model directory (`--init`).
    Train(train::TrainArgs),
    /// Generate text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (chat template; needs a BPE checkpoint).
    Chat(chat::ChatArgs),
    /// Score a checkpoint on held-out prompts (form verifier for poems, exact match otherwise).
    Eval(evaluate::EvalArgs),
    /// Run the coordinator (gRPC control plane with a SQLite store).
    Coordinator(cluster::CoordinatorArgs),
    /// Run a worker that takes assignments from the coordinator.
    Worker(cluster::WorkerArgs),
    /// Show what each phase of a job spec needs per rank (parameters; bytes of weights,
    /// gradients, optimizer state, activations), resolved as the coordinator does at submit.
    Plan(plan::PlanArgs),
    /// Submit a job spec (TOML) to the coordinator.
    Submit { file: std::path::PathBuf },
    /// Show jobs (or one job): phase, step/total, loss, tokens/s, ETA, workers, last checkpoint.
    Status { job: Option<u64> },
    /// Follow a job with live progress bars until it ends.
    Watch { job: u64 },
    /// Cancel a job.
    Cancel { job: u64 },
    /// Resume a failed job at the phase that failed, from its last checkpoint.
    Resume { job: u64 },
    /// Label comparisons of two sampled answers for a job's reward model (human feedback).
    Label {
        job: u64,
        /// Your name, stored with each label.
        #[arg(long, default_value_t = default_labeler())]
        labeler: String,
        /// Stop after this many labels (default: until `q` or the end of input).
        #[arg(long)]
        count: Option<u64>,
    },
    /// List workers, or drain one (`liandan workers drain ID`).
    Workers {
        #[command(subcommand)]
        action: Option<WorkersAction>,
    },
    /// The data pipeline: clean, prepare (clean + dedup + tokenizer + shards), bench.
    Data {
        #[command(subcommand)]
        what: data::DataCommand,
    },
    /// Check the CUDA backend against the CPU backend (every kernel, a training step, NCCL).
    Selftest(selftest::SelftestArgs),
    /// Measure training throughput.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum WorkersAction {
    /// Let a worker leave cleanly at the next checkpoint boundary.
    Drain { id: u64 },
}

/// The CLI's error: one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Engine(#[from] liandan_worker::EngineError),
    #[error(transparent)]
    Data(#[from] liandan_data::DataError),
    #[error("{0}")]
    Usage(String),
    #[error("--device cuda: {0}")]
    Cuda(#[from] liandan_worker::backend::cuda::CudaError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl From<liandan_plan::PlanError> for CliError {
    fn from(e: liandan_plan::PlanError) -> Self {
        CliError::Engine(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        eprintln!("error: could not start {threads} worker threads: {e}");
        return ExitCode::FAILURE;
    }
    if !matches!(cli.log_format.as_str(), "pretty" | "json") {
        eprintln!("error: --log-format {}: expected pretty or json", cli.log_format);
        return ExitCode::FAILURE;
    }
    init_logging(&cli.log_format);
    let coord = cluster::Target { addr: cli.coordinator.clone(), creds: cli.creds.clone() };
    let result = match cli.command {
        Command::Coordinator(a) => cluster::coordinator(a, &cli.creds),
        Command::Worker(a) => cluster::worker(a, &cli.creds),
        Command::Plan(a) => plan::run(a),
        Command::Submit { file } => cluster::submit(file, &coord),
        Command::Status { job } => cluster::status(job, &coord),
        Command::Watch { job } => cluster::watch(job, &coord),
        Command::Cancel { job } => cluster::cancel(job, &coord),
        Command::Resume { job } => cluster::resume(job, &coord),
        Command::Label { job, labeler, count } => cluster::label(job, &labeler, count, &coord),
        Command::Workers { action } => cluster::workers(action.map(|WorkersAction::Drain { id }| id), &coord),
        Command::Up(a) => up::run(a, threads),
        Command::Train(a) => train::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Eval(a) => evaluate::run(a),
        Command::Data { what } => data::run(what, threads),
        Command::Bench { what } => bench::run(what, threads),
        Command::Selftest(a) => selftest::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The labeler name when none is given: the login name.
fn default_labeler() -> String {
    std::env::var("USER").or_else(|_| std::env::var("USERNAME")).unwrap_or_else(|_| "anonymous".into())
}

/// Logs through tracing-subscriber to stderr: `pretty` (human) or `json`, filtered by RUST_LOG
/// (default: info for liandan, warn for the rest).
fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,liandan=info,liandan_worker=info,liandan_coordinator=info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    // JSON: one object per line, the span's fields (job, phase, rank, generation) under "span".
    let _ = if format == "json" { builder.json().with_current_span(true).with_span_list(false).try_init() } else { builder.compact().try_init() };
}
