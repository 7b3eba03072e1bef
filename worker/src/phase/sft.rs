//! The SFT phase: supervised fine-tuning on `{prompt, response}` / `{messages}` examples with the
//! chat template, loss only on the assistant's tokens.
//!
//! Examples are tokenized once, then packed greedily into rows of `T + 1` tokens (short examples
//! share a row; an example longer than a row is cut, and one whose answer is cut away entirely is
//! skipped). A target is the next token where that token
//! belongs to an assistant turn, and ignored elsewhere, so prompts and padding teach nothing.
//! Packed examples can attend to the earlier examples of their row (no block-diagonal mask), as
//! in most packing implementations; each starts with `<|bos|>`, which marks the boundary.
//! 5% of the examples (chosen by a hash of their text) are held out for validation.

use liandan_data::chat::{SftExample, read_sft, tokenize_chat};
use liandan_data::tokenizer::ChatTokenizer;

use super::driver::Start;
use super::pretrain::{BatchSource, data_tokenizer, run_lm_phase};
use super::{PhaseError, PhaseIo, PhaseOutcome};
use crate::engine::Model;
use crate::ledger::Ledger;
use crate::plan::PhasePlan;

/// Share of examples held out for validation.
pub const VAL_SHARE: f64 = 0.05;

/// Packed rows: `rows × (T + 1)` input tokens and the matching targets.
#[derive(Debug, Clone)]
pub struct PackedRows {
    pub row_len: usize,
    /// Tokens, `rows × row_len`.
    pub tokens: Vec<u32>,
    /// `targets[r·row_len + i]` is the target of position `i` of row `r` (the next token if it
    /// is an assistant token, else −1); the last position of a row has none.
    pub targets: Vec<i32>,
}

impl PackedRows {
    pub fn rows(&self) -> usize {
        self.tokens.len() / self.row_len
    }
}

/// Whether an example is held out (by a hash of its text, so the split is stable).
pub fn held_out(ex: &SftExample) -> bool {
    let text: String = ex.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\u{1}");
    super::held_out_by_hash(&text, VAL_SHARE)
}

/// Tokenizes and packs examples into rows of `seq_len + 1` tokens.
pub fn pack(tk: &ChatTokenizer, examples: &[SftExample], seq_len: usize) -> Result<PackedRows, PhaseError> {
    let row_len = seq_len + 1;
    let pad = tk.special.pad;
    let mut tokens = Vec::new();
    let mut learn = Vec::new();
    let mut row_fill = 0;
    for ex in examples {
        let mut c = tokenize_chat(tk, &ex.messages).map_err(|e| PhaseError::Data(format!("{}: {e}", ex.source)))?;
        c.ids.truncate(row_len);
        c.mask.truncate(row_len);
        // An example whose answer does not fit in a row teaches nothing: skip it.
        if !c.mask.contains(&1) {
            continue;
        }
        if row_fill + c.ids.len() > row_len {
            // Pad the rest of the row.
            let rest = row_len - row_fill;
            tokens.extend(std::iter::repeat_n(pad, rest));
            learn.extend(std::iter::repeat_n(0u8, rest));
            row_fill = 0;
        }
        row_fill += c.ids.len();
        tokens.extend(c.ids);
        learn.extend(c.mask);
        if row_fill == row_len {
            row_fill = 0;
        }
    }
    if row_fill > 0 {
        let rest = row_len - row_fill;
        tokens.extend(std::iter::repeat_n(pad, rest));
        learn.extend(std::iter::repeat_n(0u8, rest));
    }
    let mut targets = vec![-1i32; tokens.len()];
    for r in 0..tokens.len() / row_len {
        for i in 0..row_len - 1 {
            let at = r * row_len + i;
            if learn[at + 1] == 1 {
                targets[at] = tokens[at + 1] as i32;
            }
        }
    }
    Ok(PackedRows { row_len, tokens, targets })
}

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

/// Loads the tokenizer of the plan's data.
pub fn load_tokenizer(plan: &PhasePlan) -> Result<(ChatTokenizer, Vec<u8>), PhaseError> {
    let (manifest, bytes) = data_tokenizer(plan)?;
    let tk = ChatTokenizer::load(&plan.data_dir.join(&manifest.tokenizer), Some(plan.model.vocab_size)).map_err(|e| PhaseError::Data(e.to_string()))?;
    // A template that cannot mask an answer or open one is refused before anything trains.
    tk.check_chat().map_err(|e| PhaseError::Data(e.to_string()))?;
    Ok((tk, bytes))
}

/// An SFT phase's data, tokenized and packed.
pub(crate) struct SftData {
    tk: ChatTokenizer,
    tok_bytes: Vec<u8>,
    /// Held-out examples and their packed rows.
    val: Vec<SftExample>,
    val_rows: PackedRows,
    source: SftRows,
}

/// Reads, splits, tokenizes and packs the phase's examples: what the phase trains on, and what
/// the coordinator checks at submit (so a file the worker would refuse is refused there).
pub(crate) fn load_data(plan: &PhasePlan) -> Result<SftData, PhaseError> {
    let file = plan.examples.as_ref().ok_or_else(|| PhaseError::Plan("an sft phase needs `data` (a JSONL of examples)".into()))?;
    let examples = read_sft(file).map_err(|e| PhaseError::Data(e.to_string()))?;
    let (train, val): (Vec<SftExample>, Vec<SftExample>) = examples.into_iter().partition(|e| !held_out(e));
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let packed = pack(&tk, &train, plan.seq_len)?;
    let val_rows = pack(&tk, &val, plan.seq_len)?;
    let ledger = Ledger::over_rows(packed.rows(), packed.row_len, plan.global_batch, plan.seed)
        .ok_or_else(|| PhaseError::Data(format!("{}: no training example fits a sequence of {} tokens", file.display(), plan.seq_len)))?;
    Ok(SftData { tk, tok_bytes, val, val_rows, source: SftRows { packed, ledger } })
}

/// Runs (or resumes) the SFT phase on this rank, from the previous phase's checkpoint.
pub fn run_sft(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let SftData { tk, tok_bytes, val, val_rows, mut source } = load_data(plan)?;
    let prompts = task_prompts(&val);
    let mut eval = |model: &mut dyn Model| -> Result<(String, Vec<u8>), PhaseError> {
        let loss = validation_loss(model, &val_rows)?;
        let scores = crate::eval::evaluate(model, &tk, &prompts, TASK_PROMPTS, 64).map_err(PhaseError::Data)?;
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
pub const EVAL_FILE: &str = "sft_eval.json";

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
