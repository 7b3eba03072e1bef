//! Comparisons (`{prompt, chosen, rejected}`) from the phase's sources, tokenized: as
//! (chosen, rejected) conversations for the reward model, and with the shared prompt length
//! for DPO. 10% of the pairs (by a hash of their text) are held out.

use std::path::Path;

use liandan_data::chat::{Message, PreferencePair, Role, prompt_ids, read_preferences, tokenize_chat};
use liandan_data::tokenizer::ChatTokenizer;

use super::InputError;
use crate::phase::PhasePlan;

/// The phase's comparisons: its `data` file, the comparisons labelled through the coordinator,
/// or both (`comparisons`), only those of the plan's `tasks` when it names some (a comparison
/// without a `task` is then left out). Logs how many of each label source it trains on.
pub fn comparisons(plan: &PhasePlan) -> Result<Vec<PreferencePair>, InputError> {
    use crate::phase::ComparisonSource as S;
    let mut pairs = Vec::new();
    if matches!(plan.comparisons, S::File | S::Both) {
        let file = plan.examples.as_ref().ok_or_else(|| InputError::Plan("a reward phase needs `data` (a JSONL of comparisons)".into()))?;
        pairs.extend(read_preferences(file).map_err(|e| InputError::Data(e.to_string()))?);
    }
    if matches!(plan.comparisons, S::Labelled | S::Both) {
        let file = plan.labelled_examples.as_ref().ok_or_else(|| InputError::Plan("the coordinator did not export the labelled comparisons".into()))?;
        let empty = std::fs::metadata(file).map(|m| m.len() == 0).unwrap_or(false);
        if empty && plan.comparisons == S::Labelled {
            return Err(InputError::Data(format!("{}: no comparison has been labelled yet (label some with `liandan label JOB`)", file.display())));
        }
        if !empty {
            pairs.extend(read_preferences(file).map_err(|e| InputError::Data(e.to_string()))?);
        }
    }
    let source = plan.examples.clone().or_else(|| plan.labelled_examples.clone()).unwrap_or_default();
    let pairs = super::of_tasks(pairs, |p| p.task.as_deref(), &plan.tasks, &source, "comparison")?;
    let human = pairs.iter().filter(|p| p.label_source == liandan_data::chat::LabelSource::Human).count();
    tracing::info!(human, rule = pairs.len() - human, "reward model comparisons by label source");
    Ok(pairs)
}

pub fn held_out(p: &PreferencePair) -> bool {
    super::held_out_by_hash(&format!("{}\u{1}{}\u{1}{}", p.prompt, p.chosen, p.rejected), 0.1)
}

/// Token ids of prompt + answer (cut to `t`), and the index of the last token.
pub fn conversation(tk: &ChatTokenizer, prompt: &str, answer: &str, t: usize) -> Result<Vec<u32>, InputError> {
    let msgs = [Message { role: Role::User, content: prompt.into() }, Message { role: Role::Assistant, content: answer.into() }];
    let mut ids = tokenize_chat(tk, &msgs).map_err(|e| InputError::Data(e.to_string()))?.ids;
    ids.truncate(t);
    Ok(ids)
}

/// Comparisons as token ids: (chosen, rejected) conversations cut to `t`, training and held out.
#[derive(Debug, Clone)]
pub struct RewardPairs {
    pub train: Vec<(Vec<u32>, Vec<u32>)>,
    pub heldout: Vec<(Vec<u32>, Vec<u32>)>,
    pub heldout_tasks: Vec<String>,
}

/// Tokenizes and splits the comparisons (what the phase trains on, and what the coordinator
/// checks at submit). `file` names them in errors.
pub fn reward_pairs(tk: &ChatTokenizer, pairs: &[PreferencePair], t: usize, file: &Path) -> Result<RewardPairs, InputError> {
    let mut out = RewardPairs { train: Vec::new(), heldout: Vec::new(), heldout_tasks: Vec::new() };
    for p in pairs {
        let pair = (conversation(tk, &p.prompt, &p.chosen, t)?, conversation(tk, &p.prompt, &p.rejected, t)?);
        if held_out(p) {
            out.heldout.push(pair);
            out.heldout_tasks.push(p.task.clone().unwrap_or_default());
        } else {
            out.train.push(pair)
        }
    }
    if out.train.is_empty() {
        return Err(InputError::Data(format!("{}: no training pairs ({} comparisons, all held out)", file.display(), pairs.len())));
    }
    Ok(out)
}

/// A comparison as token ids: both conversations (cut to `seq_len`) share the prompt's first
/// `prompt_len` tokens; the answer is the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub prompt_len: usize,
}

/// The phase's pairs, training and held out, and how many were dropped.
#[derive(Debug, Clone)]
pub struct DpoPairs {
    pub train: Vec<DpoPair>,
    pub heldout: Vec<DpoPair>,
    /// RewardPairs whose chosen and rejected ids are the same after tokenization and the cut.
    pub identical: usize,
}

/// Tokenizes and splits the comparisons (what the phase trains on, and what the coordinator
/// checks at submit). `file` names them in errors.
pub fn dpo_pairs(tk: &ChatTokenizer, pairs: &[PreferencePair], t: usize, file: &Path) -> Result<DpoPairs, InputError> {
    let mut out = DpoPairs { train: Vec::new(), heldout: Vec::new(), identical: 0 };
    let mut no_room = 0;
    for p in pairs {
        let prompt = prompt_ids(tk, &[Message { role: Role::User, content: p.prompt.clone() }]).map_err(|e| InputError::Data(format!("{}: {e}", p.source)))?;
        let chosen = conversation(tk, &p.prompt, &p.chosen, t)?;
        let rejected = conversation(tk, &p.prompt, &p.rejected, t)?;
        if chosen.len() <= prompt.len() || rejected.len() <= prompt.len() {
            no_room += 1;
            continue;
        }
        if chosen == rejected {
            out.identical += 1;
            continue;
        }
        let pair = DpoPair { chosen, rejected, prompt_len: prompt.len() };
        if held_out(p) { out.heldout.push(pair) } else { out.train.push(pair) }
    }
    if out.train.is_empty() {
        let n = pairs.len();
        let why = if out.identical == n {
            format!("all {n} pairs are identical after tokenization (chosen and rejected cut to seq_len = {t} tokens): DPO has no preference to learn")
        } else if no_room + out.identical == n {
            format!("no pair leaves room for an answer in seq_len = {t} tokens ({no_room} prompts too long, {} pairs identical after the cut)", out.identical)
        } else {
            format!("no training pairs ({n} comparisons, {} held out, {} identical after tokenization, {no_room} without room for an answer)", out.heldout.len(), out.identical)
        };
        return Err(InputError::Data(format!("{}: {why}", file.display())));
    }
    if out.identical > 0 || no_room > 0 {
        tracing::warn!(identical = out.identical, no_room, "dpo pairs dropped: identical after tokenization, or no room for an answer in seq_len");
    }
    Ok(out)
}

/// The phase's pairs from its comparison sources, tokenized and split.
pub fn load_dpo_pairs(plan: &PhasePlan, tk: &ChatTokenizer) -> Result<DpoPairs, InputError> {
    let pairs = comparisons(plan)?;
    let file = plan.examples.clone().or_else(|| plan.labelled_examples.clone()).unwrap_or_default();
    dpo_pairs(tk, &pairs, plan.seq_len, &file)
}
