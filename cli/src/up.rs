//! `liandan up`: the main job on the built-in demo text.
//!
//! Until the coordinator and workers land, the main job is one process: train a small model on
//! the embedded Analects (论语, `data/demo/lunyu.txt`), checkpoint it, and generate from it.

use std::path::PathBuf;

use liandan_worker::generate::SamplingConfig;

use crate::train::TrainArgs;
use crate::CliError;

/// The demo text, built by `scripts/build_demo_text.sh` (see `data/demo/DATA_LICENSES`).
const DEMO_TEXT: &str = include_str!("../../data/demo/lunyu.txt");

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where the run's checkpoints and the demo text copy go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
}

pub fn run(a: UpArgs) -> Result<(), CliError> {
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::Io { path: a.out.display().to_string(), source: e })?;
    let text = a.out.join("lunyu.txt");
    std::fs::write(&text, DEMO_TEXT).map_err(|e| CliError::Io { path: text.display().to_string(), source: e })?;
    eprintln!("liandan up: training the nano model on the built-in 论语 text ({} bytes)", DEMO_TEXT.len());
    let outcome = crate::train::run(TrainArgs {
        text,
        out: a.out.clone(),
        model: "nano".into(),
        layers: None,
        heads: None,
        channels: None,
        batch: 8,
        seq: 128,
        grad_accum: 1,
        steps: a.steps,
        lr: 2e-3,
        min_lr: None,
        warmup: None,
        weight_decay: 0.1,
        clip: 1.0,
        seed: 1337,
        checkpoint_every: Some((a.steps / 3).max(1)),
        eval_every: (a.steps / 4).max(1),
        resume: None,
    })?;
    let model = crate::generate::load_model(&outcome.checkpoint)?;
    println!("\nsamples from {} (temperature 0.8, top-k 40):", outcome.checkpoint.display());
    for (i, prompt) in ["子曰：", "学而", "君子"].iter().enumerate() {
        let cfg = SamplingConfig { max_new_tokens: 90, temperature: 0.8, top_k: 40, top_p: 0.95, seed: i as u64, stop_tokens: vec![b'\n' as u32], greedy: false };
        let text = crate::generate::complete(&model, prompt, &cfg)?;
        println!("  {prompt}{}", text.trim_end());
    }
    println!(
        "\ntrain loss {:.3}, val loss {} (nats per byte), {:.0} tokens/s\nartifacts: {} (checkpoints step-*, newest in 'latest'; model.safetensors loads in transformers as GPT2LMHeadModel)",
        outcome.train_loss,
        outcome.val_loss.map_or("n/a".into(), |v| format!("{v:.3}")),
        outcome.tokens_per_s,
        a.out.display()
    );
    Ok(())
}
