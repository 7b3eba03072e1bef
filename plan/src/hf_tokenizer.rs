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
