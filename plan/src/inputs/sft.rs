//! SFT examples as the phase trains on them: 5% held out by a hash of their text, the rest
//! tokenized with the chat template and packed greedily into rows of `T + 1` tokens (short
//! examples share a row; an example longer than a row is cut, one whose answer is cut away
//! entirely is skipped). A target is the next token where that token belongs to an assistant
//! turn, and ignored (−1) elsewhere.

use liandan_data::chat::{SftExample, read_sft, tokenize_chat};
use liandan_data::tokenizer::ChatTokenizer;

use super::{InputError, load_tokenizer};
use crate::ledger::Ledger;
use crate::phase::PhasePlan;

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
pub fn pack(tk: &ChatTokenizer, examples: &[SftExample], seq_len: usize) -> Result<PackedRows, InputError> {
    let row_len = seq_len + 1;
    let pad = tk.special.pad;
    let mut tokens = Vec::new();
    let mut learn = Vec::new();
    let mut row_fill = 0;
    for ex in examples {
        let mut c = tokenize_chat(tk, &ex.messages).map_err(|e| InputError::Data(format!("{}: {e}", ex.source)))?;
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

/// An SFT phase's examples, split, tokenized and packed.
#[derive(Debug)]
pub struct SftInputs {
    pub tk: ChatTokenizer,
    /// The tokenizer file as checkpoints carry it.
    pub tok_bytes: Vec<u8>,
    /// Training rows and the ledger that picks them at each step.
    pub train: PackedRows,
    pub ledger: Ledger,
    /// Held-out examples and their packed rows.
    pub val: Vec<SftExample>,
    pub val_rows: PackedRows,
}

/// Reads, splits, tokenizes and packs the phase's examples.
pub fn load(plan: &PhasePlan) -> Result<SftInputs, InputError> {
    let file = plan.examples.as_ref().ok_or_else(|| InputError::Plan("an sft phase needs `data` (a JSONL of examples)".into()))?;
    let examples = read_sft(file).map_err(|e| InputError::Data(e.to_string()))?;
    let examples = super::of_tasks(examples, |e| e.task.as_deref(), &plan.tasks, file, "example")?;
    let (train, val): (Vec<SftExample>, Vec<SftExample>) = examples.into_iter().partition(|e| !held_out(e));
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let packed = pack(&tk, &train, plan.seq_len)?;
    let val_rows = pack(&tk, &val, plan.seq_len)?;
    let ledger = Ledger::over_rows(packed.rows(), packed.row_len, plan.global_batch, plan.seed)
        .ok_or_else(|| InputError::Data(format!("{}: no training example fits a sequence of {} tokens", file.display(), plan.seq_len)))?;
    Ok(SftInputs { tk, tok_bytes, train: packed, ledger, val, val_rows })
}
