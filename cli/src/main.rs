//! `liandan`: the command-line entry point.
//!
//! # Layout
//! - `train`: single-process training on a text file (byte-level vocabulary) with checkpoints
//! - `generate`: sampling from a checkpoint
//! - `bench`: training throughput (tokens/s, GFLOP/s) on a preset
//! - `up`: the main job on the embedded demo text — train, checkpoint, generate
//!
//! Errors print as one line (`error: …`) and exit with status 1; nothing here panics on input.

mod bench;
mod data;
mod generate;
mod progress;
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the main job on the built-in demo text: train a small model, checkpoint it, and
    /// generate from it.
    Up(up::UpArgs),
    /// Train a model on a text file in this process (UTF-8 bytes as tokens).
    Train(train::TrainArgs),
    /// Generate text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// The data pipeline: clean, prepare (clean + dedup + tokenizer + shards), bench.
    Data {
        #[command(subcommand)]
        what: data::DataCommand,
    },
    /// Measure training throughput.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
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
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        eprintln!("error: could not start {threads} worker threads: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Up(a) => up::run(a),
        Command::Train(a) => train::run(a).map(|_| ()),
        Command::Generate(a) => generate::run(a),
        Command::Data { what } => data::run(what),
        Command::Bench { what } => bench::run(what, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
