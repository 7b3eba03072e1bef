//! `liandan eval`: a checkpoint answers held-out prompts (greedy, chat template), scored by rule
//! — the poem-form verifier for poem requests, exact match for the rest.

use std::path::PathBuf;

use crate::CliError;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A checkpoint with a BPE tokenizer (an sft or ppo phase's output).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompts with references (`{prompt, reference, task, form}` JSONL); default: the demo's.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Prompts per task.
    #[arg(long, default_value_t = 20)]
    pub per_task: usize,
    /// Longest answer, tokens.
    #[arg(long, default_value_t = liandan_worker::eval::ANSWER_TOKENS)]
    pub max_new_tokens: usize,
}

pub fn run(a: EvalArgs) -> Result<(), CliError> {
    let items = match &a.prompts {
        Some(p) => liandan_worker::eval::read_eval(p).map_err(CliError::Usage)?,
        None => crate::up::eval_items(),
    };
    let (model, codec) = crate::generate::load_model(&a.checkpoint)?;
    let crate::generate::Codec::Bpe(tk) = &codec else {
        return Err(CliError::Usage(format!("{}: a byte-level checkpoint has no chat template to answer prompts with", a.checkpoint.display())));
    };
    let r = liandan_worker::eval::evaluate(model.as_ref(), tk, &items, a.per_task, a.max_new_tokens).map_err(CliError::Usage)?;
    for (task, passed, total) in &r.tasks {
        println!("{task:<12} {passed:>3}/{total:<3} {:>5.1}%", 100.0 * *passed as f64 / (*total).max(1) as f64);
    }
    for (prompt, answer, ok) in r.samples.iter().take(10) {
        println!("  {} {prompt} → {}", if *ok { "✓" } else { "✗" }, answer.trim().replace('\n', " / "));
    }
    Ok(())
}
