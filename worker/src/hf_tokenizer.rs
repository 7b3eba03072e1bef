//! The tokenizer files of a checkpoint beyond `tokenizer.json`, so that every checkpoint is a
//! Hugging Face model directory `AutoTokenizer.from_pretrained` loads with its chat template.
//!
//! - [`data_configs`]: a model's own `tokenizer_config.json` / `generation_config.json`, as
//!   `liandan data prepare --tokenizer DIR` copied them into the prepared data, go along with its
//!   `tokenizer.json` into each checkpoint.
//! - [`export_files`]: what [`crate::checkpoint::save`] adds for whatever is still missing:
//!   liandan's `tokenizer_config.json` (its Jinja template, `eos_token` = `<|end|>`),
//!   `special_tokens_map.json` and `generation_config.json` (eos ids `<|end|>`, `<|eos|>`). All
//!   are checksummed in `state.json` like every other file.

use std::path::Path;

use liandan_data::hf_tokenizer::{GENERATION_CONFIG, TOKENIZER_CONFIG, export_files as data_export};
use liandan_data::tokenizer::ChatTokenizer;

/// The tokenizer file of checkpoints.
const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest config file copied.
const CONFIG_MAX_BYTES: u64 = 4 << 20;

fn find<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    files.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
}

/// The config files in `data_dir` that `files` (a checkpoint's, with `tokenizer.json`) lacks.
///
/// # Errors
/// A config file that exists but cannot be read.
pub fn data_configs(data_dir: &Path, files: &[(String, Vec<u8>)]) -> Result<Vec<(String, Vec<u8>)>, String> {
    if find(files, TOKENIZER_FILE).is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for name in [TOKENIZER_CONFIG, GENERATION_CONFIG] {
        let p = data_dir.join(name);
        if find(files, name).is_none() && p.is_file() {
            out.push((name.to_string(), liandan_data::files::read_bounded(&p, CONFIG_MAX_BYTES).map_err(|e| e.to_string())?));
        }
    }
    Ok(out)
}

/// The tokenizer files that `files` lacks, made from its `tokenizer.json` (and config, when it
/// has one); `model_max_length` is the model's context. Nothing when there is no tokenizer, or
/// when it is not a chat tokenizer (a base model's without a chat template: the checkpoint
/// keeps what it was given, and a warning says so).
///
/// # Errors
/// The files could not be serialised.
pub fn export_files(files: &[(String, Vec<u8>)], model_max_length: usize) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(bytes) = find(files, TOKENIZER_FILE) else { return Ok(Vec::new()) };
    let what = Path::new(TOKENIZER_FILE);
    let tk = match ChatTokenizer::from_parts(bytes, find(files, TOKENIZER_CONFIG), find(files, GENERATION_CONFIG), what, None) {
        Ok(tk) => tk,
        Err(e) => {
            tracing::warn!(error = %e, "the checkpoint's tokenizer has no chat format: no tokenizer_config.json written");
            return Ok(Vec::new());
        }
    };
    let made = data_export(&tk, model_max_length).map_err(|e| e.to_string())?;
    Ok(made.into_iter().filter(|(n, _)| find(files, n).is_none()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{self, DataCursor, SaveInfo};
    use crate::model::config::GptConfig;
    use crate::model::params::ParamLayout;
    use liandan_data::chat::{Message, Role, prompt_ids, tokenize_chat};

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
