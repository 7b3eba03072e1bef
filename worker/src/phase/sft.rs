//! The SFT phase: supervised fine-tuning on `{prompt, response}` / `{messages}` examples with the
//! chat template, loss only on the assistant's tokens.
//!
//! Examples are tokenized once, then packed greedily into rows of `T + 1` tokens
//! ([`liandan_plan::inputs::sft`]), so prompts and padding teach nothing. Packed examples can
//! attend to the earlier examples of their row (no block-diagonal mask), as in most packing
//! implementations; each starts with `<|bos|>`, which marks the boundary. 5% of the examples
//! (chosen by a hash of their text) are held out for validation.

use liandan_data::chat::SftExample;
use liandan_plan::inputs::sft::{self, SftInputs};

use super::driver::Start;
use super::pretrain::{BatchSource, run_lm_phase};
use super::{PhaseError, PhaseIo, PhaseOutcome};
use crate::engine::Model;
use crate::ledger::Ledger;
use crate::plan::PhasePlan;

pub use liandan_plan::inputs::load_tokenizer;
pub use liandan_plan::inputs::sft::{PackedRows, VAL_SHARE, held_out, pack};

/// Rows for the training loop, chosen by a [`Ledger`] over rows.
#[derive(Debug)]
pub struct SftRows {
    pub packed: PackedRows,
    ledger: Ledger,
}

impl BatchSource for SftRows {
    fn rank_batch(&mut self, step: u64, rank: usize, world: usize, inputs: &mut Vec<u32>, targets: &mut Vec<i32>) -> usize {
        let t = self.packed.row_len - 1;
        let offsets = self.ledger.rank_offsets(step, rank, world);
        for &o in &offsets {
            inputs.extend_from_slice(&self.packed.tokens[o..o + t]);
            targets.extend_from_slice(&self.packed.targets[o..o + t]);
        }
        offsets.len()
    }

    fn global_denominator(&mut self, step: u64) -> f32 {
        let t = self.packed.row_len - 1;
        self.ledger.step_offsets(step).iter().map(|&o| self.packed.targets[o..o + t].iter().filter(|&&x| x >= 0).count()).sum::<usize>() as f32
    }
}

/// Runs (or resumes) the SFT phase on this rank, from the previous phase's checkpoint.
pub fn run_sft(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let SftInputs { tk, tok_bytes, train, ledger, val, val_rows } = sft::load(plan)?;
    let mut source = SftRows { packed: train, ledger };
    let prompts = task_prompts(&val);
    let mut eval = |model: &mut dyn Model| -> Result<(String, Vec<u8>), PhaseError> {
        let loss = validation_loss(model, &val_rows)?;
        let scores = crate::eval::evaluate(model, &tk, &prompts, TASK_PROMPTS, crate::eval::ANSWER_TOKENS).map_err(PhaseError::Data)?;
        let tasks: std::collections::BTreeMap<&str, (usize, usize)> = scores.tasks.iter().map(|(t, p, n)| (t.as_str(), (*p, *n))).collect();
        tracing::info!(val_loss = loss, examples = val.len(), ?tasks, "sft validation loss and task scores on held-out examples");
        let json = serde_json::json!({ "val_loss": loss, "examples": val.len(), "tasks": tasks });
        Ok((EVAL_FILE.to_string(), serde_json::to_vec(&json).unwrap_or_default()))
    };
    run_lm_phase(plan, &mut source, tok_bytes, start, io, Some(&mut eval))
}

/// Held-out prompts per task answered at each checkpoint for the task score.
pub const TASK_PROMPTS: usize = 10;

/// Held-out single-turn examples as scored prompts: exact match against the reference answer,
/// or the form verifier when the prompt asks for a poem form.
fn task_prompts(val: &[SftExample]) -> Vec<crate::eval::EvalItem> {
    val.iter()
        .filter_map(|ex| {
            let [user, answer] = &ex.messages[..] else { return None };
            let form = super::ppo::requested_form(&user.content);
            let task = ex.task.clone().unwrap_or_else(|| if form.is_some() { "poem".into() } else { "answer".into() });
            Some(crate::eval::EvalItem { prompt: user.content.clone(), reference: answer.content.clone(), task, form: form.map(|f| f.name().to_string()) })
        })
        .collect()
}

/// File of the validation result inside an SFT checkpoint.
pub const EVAL_FILE: &str = liandan_plan::checkpoint::eval_files::SFT;

/// Mean loss over the assistant tokens of packed held-out rows (0 when there are none).
pub fn validation_loss(model: &mut dyn Model, rows: &PackedRows) -> Result<f64, PhaseError> {
    let t = rows.row_len - 1;
    let denom = rows.targets.iter().filter(|&&x| x >= 0).count();
    if denom == 0 {
        return Ok(0.0);
    }
    let (max_b, _) = model.max_batch();
    let mut total = 0.0f64;
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let n = rows.rows();
    let mut r = 0;
    while r < n {
        let b = max_b.min(n - r);
        inputs.clear();
        targets.clear();
        for k in r..r + b {
            let o = k * rows.row_len;
            inputs.extend_from_slice(&rows.tokens[o..o + t]);
            targets.extend_from_slice(&rows.targets[o..o + t]);
        }
        model.forward(&inputs, b, t)?;
        if targets.iter().any(|&x| x >= 0) {
            total += model.loss(&targets, None, denom as f32, false)? as f64;
        }
        r += b;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use liandan_data::chat::{Message, Role};
    use liandan_data::tokenizer::ChatTokenizer;

    fn tokenizer() -> ChatTokenizer {
        let corpus = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "请接出下一句：白日依山尽，黄河入海流。"];
        ChatTokenizer::train(corpus.iter().cycle().take(100), 320).unwrap()
    }

    fn ex(p: &str, r: &str) -> SftExample {
        SftExample { messages: vec![Message { role: Role::User, content: p.into() }, Message { role: Role::Assistant, content: r.into() }], task: None, source: "t:1".into() }
    }

    #[test]
    fn packing_takes_loss_only_on_assistant_tokens() {
        let tk = tokenizer();
        let examples = [ex("请接出下一句：床前明月光，", "疑是地上霜。"), ex("举头望明月，", "低头思故乡。")];
        let packed = pack(&tk, &examples, 63).unwrap();
        assert_eq!(packed.tokens.len() % packed.row_len, 0);
        // The learned targets, decoded, are exactly the two replies with their end markers.
        let learned: Vec<u32> = packed.targets.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect();
        assert_eq!(tk.decode(&learned).unwrap(), "疑是地上霜。<|end|>低头思故乡。<|end|>");
        // Every target is the next input token.
        for (i, &t) in packed.targets.iter().enumerate() {
            if t >= 0 {
                assert_eq!(packed.tokens[i + 1] as i32, t);
            }
        }
        // A row too short for both examples puts the second in a new row, padded.
        let small = pack(&tk, &examples, 20).unwrap();
        assert!(small.rows() >= 2);
        let learned: Vec<u32> = small.targets.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect();
        assert!(tk.decode(&learned).unwrap().contains("低头思故乡"));
    }
}
