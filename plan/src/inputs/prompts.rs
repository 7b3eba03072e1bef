//! The prompts PPO and GRPO answer: the SFT data's conversations up to their last answer,
//! and the poem form each asks for (the verifier's target).

use std::path::Path;

use liandan_data::chat::{Role, prompt_ids, read_sft};
use liandan_data::tokenizer::ChatTokenizer;
use liandan_data::verify::PoemForm;

use super::InputError;
use crate::phase::{GrpoSettings, PhasePlan, RewardSource};

/// A prompt to answer, ready for generation.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoPrompt {
    /// The chat template up to `<|assistant|>`.
    pub ids: Vec<u32>,
    /// The form a poem request asks for (the verifier's target), if any.
    pub form: Option<PoemForm>,
}

/// The form named in a prompt (`写一首五言绝句…`), if any.
pub fn requested_form(prompt: &str) -> Option<PoemForm> {
    PoemForm::ALL.into_iter().find(|f| prompt.contains(f.name()))
}

/// The prompts of a PPO phase: the examples' conversations up to their last answer, only the
/// `tasks` asked for, without the SFT phase's held-out examples, and only those that leave room
/// in `seq_len` for an answer.
pub fn read_prompts(file: &Path, tk: &ChatTokenizer, tasks: &[String], seq_len: usize) -> Result<Vec<PpoPrompt>, InputError> {
    let examples = read_sft(file).map_err(|e| InputError::Data(e.to_string()))?;
    let mut out = Vec::new();
    for ex in examples {
        if !tasks.is_empty() && !ex.task.as_ref().is_some_and(|t| tasks.contains(t)) {
            continue;
        }
        if super::sft::held_out(&ex) {
            continue;
        }
        let upto = ex.messages.iter().rposition(|m| m.role == Role::Assistant).unwrap_or(ex.messages.len());
        let msgs = &ex.messages[..upto];
        if msgs.is_empty() {
            continue;
        }
        let ids = prompt_ids(tk, msgs).map_err(|e| InputError::Data(format!("{}: {e}", ex.source)))?;
        if ids.len() >= seq_len {
            continue;
        }
        let text: String = msgs.iter().filter(|m| m.role == Role::User).map(|m| m.content.as_str()).collect();
        out.push(PpoPrompt { ids, form: requested_form(&text) });
    }
    if out.is_empty() {
        let which = if tasks.is_empty() { String::new() } else { format!(" of tasks {tasks:?}") };
        return Err(InputError::Data(format!("{}: no prompts{which} fit a sequence of {seq_len} tokens", file.display())));
    }
    Ok(out)
}

/// The prompts of a grpo phase; with the verifier as the whole reward, at least one must ask
/// for a poem form (the verifier scores nothing else).
pub fn grpo_prompts(plan: &PhasePlan, tk: &ChatTokenizer, s: &GrpoSettings) -> Result<Vec<PpoPrompt>, InputError> {
    let file = plan.examples.as_ref().ok_or_else(|| InputError::Plan("a grpo phase needs `data` (a JSONL of prompts in the SFT format)".into()))?;
    let prompts = read_prompts(file, tk, &s.tasks, plan.seq_len)?;
    if s.reward == RewardSource::Verifier && prompts.iter().all(|p| p.form.is_none()) {
        return Err(InputError::Plan(format!(
            "grpo.reward = \"verifier\", but none of the {} prompts of {} asks for a poem form (the verifier scores nothing else): every reward would be 0",
            prompts.len(),
            file.display()
        )));
    }
    Ok(prompts)
}
