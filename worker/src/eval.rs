//! Evaluation on held-out prompts: the model answers with the chat template (greedy), and each
//! answer is scored by rule — exact match for next-line, idiom and 歇后语 answers and for a poem's
//! source, the poem-form verifier for poem requests — so no learned model is the judge.

use std::path::Path;

use liandan_data::chat::{Message, Role, prompt_ids};
use liandan_data::tokenizer::ChatTokenizer;
use liandan_data::verify::{PoemForm, poem_form};
use serde::{Deserialize, Serialize};

use crate::engine::cpu::CpuEngine;
use crate::engine::{Engine, Model};
use crate::generate::SamplingConfig;

/// The longest answer, in tokens, that held-out scoring generates. A 七言律诗 (8 lines of 7
/// characters, punctuation, line breaks) is 67–70 tokens with the demo's tokenizer, which gives
/// every Han character its own token; a smaller cap would fail every one of them unread.
pub const ANSWER_TOKENS: usize = 80;

/// One held-out prompt (`data/demo/eval.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalItem {
    pub prompt: String,
    pub reference: String,
    pub task: String,
    /// For poem requests: the form asked for (`五言绝句`, …).
    #[serde(default)]
    pub form: Option<String>,
}

/// Reads an eval JSONL file; the error names the file and line.
pub fn read_eval(path: &Path) -> Result<Vec<EvalItem>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))).collect()
}

/// Whether `answer` passes `item`'s rule.
pub fn passes(item: &EvalItem, answer: &str) -> bool {
    let norm = |s: &str| s.chars().filter(|c| !c.is_whitespace() && !"，。！？；、,.!?;".contains(*c)).collect::<String>();
    match item.task.as_str() {
        "poem" => item.form.as_deref().and_then(PoemForm::from_name).is_some_and(|f| poem_form(answer) == Ok(f)),
        _ => !answer.trim().is_empty() && norm(answer) == norm(&item.reference),
    }
}

/// The model's greedy answer to `prompt` with the chat template (up to `max_new` tokens).
pub fn answer(model: &dyn Model, tk: &ChatTokenizer, prompt: &str, max_new: usize) -> Result<String, String> {
    answer_with(model, tk, prompt, SamplingConfig { max_new_tokens: max_new, greedy: true, ..Default::default() })
}

/// The model's answer to `prompt` with the chat template, sampled by `cfg` (its stop tokens
/// are the template's; its length is cut to the context).
pub fn answer_with(model: &dyn Model, tk: &ChatTokenizer, prompt: &str, mut cfg: SamplingConfig) -> Result<String, String> {
    let ids = prompt_ids(tk, &[Message { role: Role::User, content: prompt.to_string() }]).map_err(|e| e.to_string())?;
    let room = model.config().n_positions.saturating_sub(ids.len());
    if room == 0 {
        return Ok(String::new());
    }
    cfg.max_new_tokens = cfg.max_new_tokens.min(room);
    cfg.stop_tokens = tk.stop_tokens();
    let out = model.generate(&[(ids, cfg)]).map_err(|e| e.to_string())?;
    let tokens = out.into_iter().next().map(|g| g.tokens).unwrap_or_default();
    tk.decode_text(&tokens).map_err(|e| e.to_string())
}

/// A checkpoint (or Hugging Face model directory) for inference on the CPU: the model, of
/// either family (buffers for one row; generation keeps its own KV cache), and its chat
/// tokenizer, or `None` for a byte-level checkpoint.
pub fn load_for_inference(dir: &Path) -> Result<(Box<dyn Model>, Option<ChatTokenizer>), String> {
    let ck = crate::checkpoint::load(dir, None).map_err(|e| e.to_string())?;
    let hf = crate::hf::is_hf_dir(dir);
    let tk = if ck.state.tokenizer == crate::tokenizer::BYTES {
        None
    } else if ck.state.tokenizer.is_empty() {
        return Err(format!("{}: no tokenizer.json beside the model, so no text can be read or written with it", dir.display()));
    } else {
        // A liandan checkpoint's files are read against their checksums; a Hugging Face
        // directory has none, so its files are read as they are.
        let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
            if hf {
                let p = dir.join(name);
                match std::fs::read(&p) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("{}: {e}", p.display())),
                }
            } else if ck.state.files.contains_key(name) {
                crate::checkpoint::read_verified(dir, name, &ck.state).map(Some).map_err(|e| e.to_string())
            } else {
                Ok(None)
            }
        };
        let what = dir.join(&ck.state.tokenizer);
        let bytes = read(&ck.state.tokenizer)?.ok_or_else(|| format!("{}: missing", what.display()))?;
        // The template and stop tokens written beside it (checkpoints from before they were
        // written have liandan's template).
        let config = read(liandan_data::hf_tokenizer::TOKENIZER_CONFIG)?;
        let generation = read(liandan_data::hf_tokenizer::GENERATION_CONFIG)?;
        Some(ChatTokenizer::from_parts(&bytes, config.as_deref(), generation.as_deref(), &what, Some(ck.state.model_config.vocab_size)).map_err(|e| e.to_string())?)
    };
    let mut model = CpuEngine.model(&ck.state.model_config, 1, 1).map_err(|e| e.to_string())?;
    model.set_params(&ck.params).map_err(|e| e.to_string())?;
    Ok((model, tk))
}

/// A checkpoint and the chat tokenizer stored in it, for answering prompts.
pub fn load_chat_model(dir: &Path) -> Result<(Box<dyn Model>, ChatTokenizer), String> {
    match load_for_inference(dir)? {
        (model, Some(tk)) => Ok((model, tk)),
        (_, None) => Err(format!("{}: not a chat model (it reads bytes, with no chat tokenizer)", dir.display())),
    }
}

/// Pass counts per task.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvalReport {
    /// `(task, passed, total)` in first-seen order.
    pub tasks: Vec<(String, usize, usize)>,
    /// A few `(prompt, answer, passed)` samples.
    pub samples: Vec<(String, String, bool)>,
}

impl EvalReport {
    pub fn rate(&self, task: &str) -> Option<f64> {
        self.tasks.iter().find(|t| t.0 == task).map(|t| t.1 as f64 / t.2.max(1) as f64)
    }
}

/// Scores `items` (at most `per_task` of each task).
pub fn evaluate(model: &dyn Model, tk: &ChatTokenizer, items: &[EvalItem], per_task: usize, max_new: usize) -> Result<EvalReport, String> {
    let mut report = EvalReport::default();
    for item in items {
        let idx = match report.tasks.iter().position(|t| t.0 == item.task) {
            Some(i) => i,
            None => {
                report.tasks.push((item.task.clone(), 0, 0));
                report.tasks.len() - 1
            }
        };
        if report.tasks[idx].2 >= per_task {
            continue;
        }
        let a = answer(model, tk, &item.prompt, max_new)?;
        let ok = passes(item, &a);
        report.tasks[idx].2 += 1;
        if ok {
            report.tasks[idx].1 += 1;
        }
        if report.tasks[idx].2 <= 2 {
            report.samples.push((item.prompt.clone(), a, ok));
        }
    }
    Ok(report)
}

/// Poem requests answered by sampling (`samples` answers each at `temperature`, seeded by the
/// prompt's index and the sample's): `(passed, answers)` by the form verifier. Closer than greedy
/// decoding to what PPO optimises (the policy at its rollout temperature).
pub fn poem_pass_sampled(model: &dyn Model, tk: &ChatTokenizer, items: &[EvalItem], temperature: f32, samples: usize, max_new: usize) -> Result<(usize, usize), String> {
    let poems: Vec<&EvalItem> = items.iter().filter(|i| i.task == "poem").collect();
    let mut passed = 0;
    for (i, item) in poems.iter().enumerate() {
        for k in 0..samples {
            let cfg = SamplingConfig { max_new_tokens: max_new, temperature, seed: (i * samples + k) as u64, ..Default::default() };
            passed += passes(item, &answer_with(model, tk, &item.prompt, cfg)?) as usize;
        }
    }
    Ok((passed, poems.len() * samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_score_answers() {
        let poem = EvalItem { prompt: "写一首五言绝句".into(), reference: String::new(), task: "poem".into(), form: Some("五言绝句".into()) };
        assert!(passes(&poem, "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"));
        assert!(!passes(&poem, "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"));
        let line = EvalItem { prompt: "请接出下一句：床前明月光，".into(), reference: "疑是地上霜。".into(), task: "next_line".into(), form: None };
        assert!(passes(&line, "疑是地上霜"));
        assert!(!passes(&line, "疑是地上雪。"));
        assert!(!passes(&line, ""));
    }
}

/// Checkpoints carry the chat tokenizer files and load back for inference with them.
#[cfg(test)]
mod checkpoint_tokenizer_files {
    use std::path::Path;

    use crate::checkpoint::{self, DataCursor, SaveInfo};
    use crate::model::config::GptConfig;
    use crate::model::params::ParamLayout;
    use liandan_data::chat::{Message, Role, prompt_ids, tokenize_chat};
    use liandan_data::hf_tokenizer::{GENERATION_CONFIG, TOKENIZER_CONFIG};
    use liandan_data::tokenizer::ChatTokenizer;

    /// Conversations the export check compares (`scripts/check_hf_tokenizer.py`).
    fn conversations() -> Vec<Vec<Message>> {
        let m = |r, c: &str| Message { role: r, content: c.to_string() };
        vec![
            vec![m(Role::User, "床前明月光"), m(Role::Assistant, "疑是地上霜")],
            vec![m(Role::System, "你是诗人。"), m(Role::User, "白日依山尽"), m(Role::Assistant, "黄河入海流"), m(Role::User, "再来一句"), m(Role::Assistant, "欲穷千里目")],
        ]
    }

    /// A checkpoint saved with liandan's tokenizer carries the tokenizer files, checksummed, and
    /// loads back with the same chat format. With `LIANDAN_EXPORT_DIR` set, the checkpoint and the
    /// ids liandan gives (`liandan_ids.json`) are left there for the transformers check.
    #[test]
    fn checkpoints_carry_the_chat_tokenizer_files() {
        let corpus = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "你是诗人。再来一句"];
        let mut tk = ChatTokenizer::train(corpus.iter().cycle().take(200), 300).unwrap();
        tk.pad_to(300);
        let root = std::env::temp_dir().join(format!("liandan-hf-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        tk.save(&root.join("tokenizer.json")).unwrap();
        let tok_bytes = std::fs::read(root.join("tokenizer.json")).unwrap();
        let cfg = GptConfig::new(tk.vocab_size(), 64, 1, 2, 16);
        let params = vec![0.01f32; ParamLayout::new(&cfg).len()];
        let dir = root.join("step-1");
        let files = vec![("tokenizer.json".to_string(), tok_bytes)];
        let info = SaveInfo { step: 1, rng_state: 0, train_config: None, data_cursor: DataCursor::default(), tokenizer: "tokenizer.json", extra_files: &files };
        checkpoint::save(&dir, &cfg, &params, None, &info).unwrap();
        let state = checkpoint::verify(&dir).unwrap();
        for f in ["tokenizer.json", TOKENIZER_CONFIG, GENERATION_CONFIG, "special_tokens_map.json"] {
            assert!(state.files.contains_key(f), "{f} is not in state.json's checksums");
        }
        // A changed template is caught by the checksums.
        let p = dir.join(TOKENIZER_CONFIG);
        let orig = std::fs::read(&p).unwrap();
        std::fs::write(&p, String::from_utf8(orig.clone()).unwrap().replace("<|end|>", "<|eos|>")).unwrap();
        assert!(checkpoint::verify(&dir).unwrap_err().to_string().contains(TOKENIZER_CONFIG));
        std::fs::write(&p, &orig).unwrap();

        let (_, back) = crate::eval::load_for_inference(&dir).unwrap();
        let back = back.unwrap();
        assert_eq!(back.stop_tokens(), tk.stop_tokens());
        let mut cases = Vec::new();
        for conv in conversations() {
            let ids = tokenize_chat(&back, &conv).unwrap().ids;
            assert_eq!(ids, tokenize_chat(&tk, &conv).unwrap().ids);
            let upto = conv.len() - 1;
            let prompt = prompt_ids(&back, &conv[..upto]).unwrap();
            assert_eq!(prompt, prompt_ids(&tk, &conv[..upto]).unwrap());
            cases.push(serde_json::json!({ "messages": conv, "ids": ids, "prompt_ids": prompt }));
        }
        if let Some(out) = std::env::var_os("LIANDAN_EXPORT_DIR") {
            let out = Path::new(&out);
            std::fs::create_dir_all(out).unwrap();
            for f in state.files.keys().map(String::as_str).chain(["state.json"]) {
                std::fs::copy(dir.join(f), out.join(f)).unwrap();
            }
            let expect = serde_json::json!({ "stop_tokens": tk.stop_tokens(), "cases": cases });
            std::fs::write(out.join("liandan_ids.json"), serde_json::to_vec_pretty(&expect).unwrap()).unwrap();
        }
    }
}
