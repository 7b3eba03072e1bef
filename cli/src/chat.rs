//! `liandan chat`: talk to a trained model in the terminal, with the chat template.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use liandan_data::chat::{Message, Role, prompt_ids};
use liandan_worker::generate::SamplingConfig;

use crate::CliError;
use crate::generate::{Codec, generate_one, load_model};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Checkpoint directory (or run directory, or Hugging Face model directory) of a model with a
    /// chat tokenizer.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest reply, in tokens.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
}

pub fn run(a: ChatArgs) -> Result<(), CliError> {
    let (model, codec) = load_model(&a.checkpoint)?;
    let Codec::Bpe(tk) = &codec else {
        return Err(CliError::Usage(format!("{}: chat needs a model trained with a chat tokenizer (this one reads bytes)", a.checkpoint.display())));
    };
    let stdin = std::io::stdin();
    let mut history: Vec<Message> = Vec::new();
    eprintln!("chatting with {} (empty line or Ctrl-D to quit)", a.checkpoint.display());
    let mut turn = 0u64;
    loop {
        eprint!("你> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| CliError::Io { path: "stdin".into(), source: e })? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(Message { role: Role::User, content: line.trim().to_string() });
        // Keep the conversation inside the context: drop the oldest turns first.
        let mut ids = prompt_ids(tk, &history)?;
        while ids.len() + 8 > model.config().n_positions && history.len() > 1 {
            history.remove(0);
            ids = prompt_ids(tk, &history)?;
        }
        let room = model.config().n_positions.saturating_sub(ids.len());
        let cfg = SamplingConfig {
            max_new_tokens: a.max_new_tokens.min(room.max(1)),
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: 0.95,
            seed: a.seed + turn,
            stop_tokens: codec.stop_tokens(),
            greedy: a.temperature <= 0.0,
        };
        let reply = codec.decode(&generate_one(model.as_ref(), ids, cfg)?)?;
        println!("模型> {}", reply.trim());
        history.push(Message { role: Role::Assistant, content: reply.trim().to_string() });
        turn += 1;
    }
}
