//! `liandan generate`: sample from a checkpoint.

use std::path::PathBuf;

use liandan_data::tokenizer::ChatTokenizer;
use liandan_worker::engine::Model;
use liandan_worker::generate::SamplingConfig;
use liandan_worker::tokenizer::ByteTokenizer;

use crate::CliError;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, a run directory (its newest checkpoint is used), or a Hugging Face
    /// model directory (gpt2, llama or qwen2).
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
    /// Also stop at this text's first token (BPE checkpoints always stop at <|eos|> and <|end|>).
    #[arg(long)]
    pub stop: Option<String>,
}

/// How a checkpoint's tokens map to text.
#[derive(Debug)]
pub enum Codec {
    Bytes,
    Bpe(Box<ChatTokenizer>),
}

impl Codec {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CliError> {
        Ok(match self {
            Codec::Bytes => ByteTokenizer.encode(text),
            Codec::Bpe(tk) => tk.encode(text)?,
        })
    }

    /// Text of generated tokens (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> Result<String, CliError> {
        Ok(match self {
            Codec::Bytes => ByteTokenizer.decode(ids),
            Codec::Bpe(tk) => tk.decode_text(ids)?,
        })
    }

    /// Tokens that end a generation by default: the tokenizer's (`<|end|>` and `<|eos|>` for
    /// liandan's), none for bytes.
    pub fn stop_tokens(&self) -> Vec<u32> {
        match self {
            Codec::Bytes => vec![],
            Codec::Bpe(tk) => tk.stop_tokens(),
        }
    }
}

/// Loads a checkpoint or Hugging Face model directory for inference with the tokenizer it was
/// trained with.
pub fn load_model(path: &std::path::Path) -> Result<(Box<dyn Model>, Codec), CliError> {
    let dir = if liandan_worker::hf::is_hf_dir(path) { path.to_path_buf() } else { crate::train::resolve_checkpoint(path)? };
    let (model, tk) = liandan_worker::eval::load_for_inference(&dir).map_err(CliError::Usage)?;
    Ok((model, tk.map_or(Codec::Bytes, |t| Codec::Bpe(Box::new(t)))))
}

/// Continues `prompt` and returns the new text.
pub fn complete(model: &dyn Model, codec: &Codec, prompt: &str, cfg: &SamplingConfig) -> Result<String, CliError> {
    let ids = codec.encode(prompt)?;
    if ids.is_empty() {
        return Err(CliError::Usage("--prompt is empty: give at least one character".into()));
    }
    let tokens = generate_one(model, ids, cfg.clone())?;
    codec.decode(&tokens)
}

/// The tokens `model` generates after `ids` (the KV-cache generator of its family).
pub fn generate_one(model: &dyn Model, ids: Vec<u32>, cfg: SamplingConfig) -> Result<Vec<u32>, CliError> {
    let out = model.generate(&[(ids, cfg)])?;
    Ok(out.into_iter().next().map(|g| g.tokens).unwrap_or_default())
}

pub fn run(a: GenerateArgs) -> Result<(), CliError> {
    let (model, codec) = load_model(&a.checkpoint)?;
    let mut stop_tokens = codec.stop_tokens();
    if let Some(s) = &a.stop {
        stop_tokens.extend(codec.encode(s)?.into_iter().take(1));
    }
    let cfg = SamplingConfig { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed, stop_tokens, greedy: a.greedy };
    let text = complete(model.as_ref(), &codec, &a.prompt, &cfg)?;
    println!("{}{}", a.prompt, text);
    Ok(())
}
