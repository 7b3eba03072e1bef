//! `liandan generate`: sample from a checkpoint.

use std::path::PathBuf;

use liandan_worker::checkpoint;
use liandan_worker::generate::{Generator, SamplingConfig};
use liandan_worker::tokenizer::{ByteTokenizer, BYTES};
use liandan_worker::Gpt;

use crate::CliError;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, or a run directory (its newest checkpoint is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    /// Stop after this text is produced (its bytes; the first byte ends generation).
    #[arg(long)]
    pub stop: Option<String>,
}

/// Loads a byte-level checkpoint for inference.
pub fn load_model(path: &std::path::Path) -> Result<Gpt, CliError> {
    let dir = crate::train::resolve_checkpoint(path)?;
    let ck = checkpoint::load(&dir, None)?;
    if ck.state.tokenizer != BYTES {
        return Err(CliError::Usage(format!("{}: tokenizer '{}' is not supported by this command yet", dir.display(), ck.state.tokenizer)));
    }
    let mut model = Gpt::new(ck.state.model_config.clone(), 1, 1)?;
    model.params = ck.params;
    Ok(model)
}

/// Continues `prompt` and returns the new text.
pub fn complete(model: &Gpt, prompt: &str, cfg: &SamplingConfig) -> Result<String, CliError> {
    let tok = ByteTokenizer;
    let ids = tok.encode(prompt);
    if ids.is_empty() {
        return Err(CliError::Usage("--prompt is empty: give at least one character".into()));
    }
    let mut g = Generator::new(model);
    let out = g.generate(&ids, cfg)?;
    Ok(tok.decode(&out.tokens))
}

pub fn run(a: GenerateArgs) -> Result<(), CliError> {
    let model = load_model(&a.checkpoint)?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_tokens: a.stop.map(|s| ByteTokenizer.encode(&s).into_iter().take(1).collect()).unwrap_or_default(),
        greedy: a.greedy,
    };
    let text = complete(&model, &a.prompt, &cfg)?;
    println!("{}{}", a.prompt, text);
    Ok(())
}
