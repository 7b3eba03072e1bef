//! A phase's inputs as its workers read them: the prepared data's tokenizer, SFT examples
//! packed into rows, comparisons as token pairs, RL prompts. The phases load through these
//! functions, and the coordinator calls [`check`] at submit, so a file a worker would refuse is
//! refused before any worker starts.
//!
//! # Layout
//! - [`sft`]: SFT examples, the held-out split, packing into rows of `T + 1` tokens.
//! - [`pairs`]: comparisons (file, labelled, both) tokenized for the reward and DPO phases.
//! - [`prompts`]: the prompts PPO and GRPO answer, and the poem form each asks for.

pub mod pairs;
pub mod prompts;
pub mod sft;

use liandan_data::shard::{Manifest, sha256_hex};
use liandan_data::tokenizer::ChatTokenizer;

use crate::ledger::Ledger;
use crate::phase::{DpoSettings, GrpoSettings, PhasePlan};

/// Why a phase's inputs cannot be used: the plan lacks something, or a data file is wrong.
/// Every message names the file (and the line, where there is one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("data: {0}")]
    Data(String),
    #[error("{0}")]
    Plan(String),
}

/// Name of the tokenizer inside prepared data and checkpoints.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Largest tokenizer file read (a 150k-token BPE is about 10 MiB).
const TOKENIZER_MAX_BYTES: u64 = 256 << 20;

/// Whether a piece of data is held out, from a stable hash of its text (FNV-1a: the same on every
/// platform and version), so the split never depends on order or on the world size.
pub fn held_out_by_hash(text: &str, share: f64) -> bool {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// The prepared data's tokenizer file, verified against its manifest.
pub fn data_tokenizer(plan: &PhasePlan) -> Result<(Manifest, Vec<u8>), InputError> {
    let manifest = Manifest::load(&plan.data_dir).map_err(|e| InputError::Data(e.to_string()))?;
    // A model's own tokenizer may have fewer tokens than its embedding has rows (Qwen2 rounds
    // the embedding up); liandan's is padded to exactly the model's vocabulary.
    let model_tokenizer = plan.data_dir.join(liandan_data::hf_tokenizer::TOKENIZER_CONFIG).is_file();
    if manifest.vocab_size > plan.model.vocab_size || (manifest.vocab_size != plan.model.vocab_size && !model_tokenizer) {
        return Err(InputError::Plan(format!("data vocabulary {} differs from the model's {}", manifest.vocab_size, plan.model.vocab_size)));
    }
    let tok_path = plan.data_dir.join(&manifest.tokenizer);
    let tokenizer = liandan_data::files::read_bounded(&tok_path, TOKENIZER_MAX_BYTES).map_err(|e| InputError::Data(e.to_string()))?;
    if sha256_hex(&tokenizer) != manifest.tokenizer_sha256 {
        return Err(InputError::Data(format!("{}: sha256 does not match manifest.json", tok_path.display())));
    }
    Ok((manifest, tokenizer))
}

/// Loads the tokenizer of the plan's data.
pub fn load_tokenizer(plan: &PhasePlan) -> Result<(ChatTokenizer, Vec<u8>), InputError> {
    let (manifest, bytes) = data_tokenizer(plan)?;
    let tk = ChatTokenizer::load(&plan.data_dir.join(&manifest.tokenizer), Some(plan.model.vocab_size)).map_err(|e| InputError::Data(e.to_string()))?;
    // A template that cannot mask an answer or open one is refused before anything trains.
    tk.check_chat().map_err(|e| InputError::Data(e.to_string()))?;
    Ok((tk, bytes))
}

/// Keeps the items whose task is one of `tasks` (all when it is empty); none left is an error
/// naming the file, the tasks asked for and the ones it has. `what` names the items in it.
pub fn of_tasks<T>(items: Vec<T>, task: impl Fn(&T) -> Option<&str>, tasks: &[String], file: &std::path::Path, what: &str) -> Result<Vec<T>, InputError> {
    if tasks.is_empty() {
        return Ok(items);
    }
    let mut present: Vec<String> = items.iter().filter_map(|x| task(x).map(str::to_string)).collect();
    present.sort();
    present.dedup();
    let kept: Vec<T> = items.into_iter().filter(|x| task(x).is_some_and(|t| tasks.iter().any(|w| w == t))).collect();
    if kept.is_empty() {
        return Err(InputError::Data(format!("{}: no {what} of tasks {tasks:?} (its tasks: {present:?})", file.display())));
    }
    Ok(kept)
}

/// The sample ledger over `tokens` training tokens, or why they are too few.
pub fn ledger(plan: &PhasePlan, tokens: usize) -> Result<Ledger, InputError> {
    Ledger::new(tokens, plan.seq_len, plan.global_batch, plan.seed)
        .ok_or_else(|| InputError::Data(format!("{}: {tokens} training tokens do not make one sequence of {}", plan.data_dir.display(), plan.seq_len)))
}

/// The checked settings of a grpo phase.
pub fn grpo_settings(plan: &PhasePlan) -> Result<GrpoSettings, InputError> {
    let s = plan.grpo.clone().unwrap_or_default();
    s.validate().map_err(|(f, r)| InputError::Plan(format!("grpo.{f}: {r}")))?;
    Ok(s)
}

/// The checked settings of a dpo phase.
pub fn dpo_settings(plan: &PhasePlan) -> Result<DpoSettings, InputError> {
    let s = plan.dpo.clone().unwrap_or_default();
    s.validate().map_err(|(f, r)| InputError::Plan(format!("dpo.{f}: {r}")))?;
    Ok(s)
}

/// What a worker would refuse about a phase's inputs, found before any worker starts (the
/// coordinator calls this at submit): the same loaders the phases run. Checkpoints named by
/// other phases do not exist yet and are not checked here.
///
/// # Errors
/// The error the phase itself would end with.
pub fn check(plan: &PhasePlan) -> Result<(), InputError> {
    use crate::phase::{ComparisonSource, PhaseKind};
    match plan.kind {
        PhaseKind::Data => {
            let cfg = plan.prepare.as_ref().ok_or_else(|| InputError::Plan("a data phase needs [phases.prepare]".into()))?;
            liandan_data::pipeline::plan(cfg).map(|_| ()).map_err(|e| InputError::Data(e.to_string()))
        }
        PhaseKind::Pretrain => {
            let (manifest, _) = data_tokenizer(plan)?;
            let tokens = manifest.splits.get("train").map_or(0, |s| s.tokens);
            ledger(plan, usize::try_from(tokens).unwrap_or(usize::MAX)).map(|_| ())
        }
        PhaseKind::Sft => sft::load(plan).map(|_| ()),
        PhaseKind::Reward => {
            let (tk, _) = load_tokenizer(plan)?;
            // Labelled comparisons only exist once people label them.
            if plan.comparisons != ComparisonSource::File {
                return Ok(());
            }
            let pairs = pairs::comparisons(plan)?;
            let file = plan.examples.clone().unwrap_or_default();
            pairs::reward_pairs(&tk, &pairs, plan.seq_len, &file).map(|_| ())
        }
        PhaseKind::Ppo => {
            let s = plan.ppo.clone().unwrap_or_default();
            s.validate().map_err(|(f, r)| InputError::Plan(format!("ppo.{f}: {r}")))?;
            let file = plan.examples.as_ref().ok_or_else(|| InputError::Plan("a ppo phase needs `data` (a JSONL of prompts in the SFT format)".into()))?;
            let (tk, _) = load_tokenizer(plan)?;
            prompts::read_prompts(file, &tk, &s.tasks, plan.seq_len).map(|_| ())
        }
        PhaseKind::Grpo => {
            let s = grpo_settings(plan)?;
            let (tk, _) = load_tokenizer(plan)?;
            prompts::grpo_prompts(plan, &tk, &s).map(|_| ())
        }
        PhaseKind::Dpo => {
            dpo_settings(plan)?;
            let (tk, _) = load_tokenizer(plan)?;
            // Labelled comparisons only exist once people label them.
            if plan.comparisons != ComparisonSource::File {
                return Ok(());
            }
            pairs::load_dpo_pairs(plan, &tk).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_tasks_keeps_the_named_tasks_and_names_what_a_file_has_when_none_match() {
        let items: Vec<(&str, Option<String>)> = vec![("a", Some("poem".into())), ("b", Some("xhy".into())), ("c", None), ("d", Some("poem".into()))];
        fn task<'a>(x: &'a (&str, Option<String>)) -> Option<&'a str> {
            x.1.as_deref()
        }
        let f = std::path::Path::new("sft.jsonl");
        let all = of_tasks(items.clone(), task, &[], f, "example").unwrap();
        assert_eq!(all.len(), 4, "no tasks named: everything");
        let poems = of_tasks(items.clone(), task, &["poem".into()], f, "example").unwrap();
        assert_eq!(poems.iter().map(|x| x.0).collect::<Vec<_>>(), ["a", "d"]);
        let e = of_tasks(items, task, &["idiom".into()], f, "example").unwrap_err().to_string();
        assert_eq!(e, r#"data: sft.jsonl: no example of tasks ["idiom"] (its tasks: ["poem", "xhy"])"#);
    }
}
