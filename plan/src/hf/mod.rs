//! Hugging Face model directories, as a user downloads them from a model hub: reading one into
//! a model config and parameters (`init = DIR`, `--init`, `--checkpoint`), and the names and
//! layouts liandan's checkpoints write so `transformers` loads them.
//!
//! # Layout
//! - [`config`]: `config.json` ⇄ [`GptConfig`] (gpt2, llama, qwen2), refusing what the engine
//!   does not implement.
//! - [`weights`]: tensor names and shapes, `model.safetensors` or sharded files with their
//!   index, f32/f16/bf16.

pub mod config;
pub mod weights;

use std::path::Path;

use crate::config::GptConfig;
use crate::error::{PlanError, Result};

/// The file that marks a Hugging Face model directory.
pub const CONFIG_FILE: &str = "config.json";

/// Largest `config.json` read (a real one is a few KiB).
const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// Whether `dir` looks like a Hugging Face model directory rather than a liandan checkpoint:
/// a `config.json` and no `state.json`.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && !dir.join(crate::checkpoint::STATE_FILE).exists()
}

/// Reads `dir/config.json` into a model config.
///
/// # Errors
/// The file is missing, too large or not JSON; the architecture or a field is unsupported.
pub fn read_config(dir: &Path) -> Result<(config::Arch, GptConfig)> {
    let path = dir.join(CONFIG_FILE);
    let meta = std::fs::metadata(&path).map_err(|e| PlanError::io(&path, e))?;
    if meta.len() > CONFIG_MAX_BYTES {
        return Err(PlanError::checkpoint(&path, format!("{} bytes is more than the {CONFIG_MAX_BYTES} a config.json may have", meta.len())));
    }
    let raw = std::fs::read(&path).map_err(|e| PlanError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| PlanError::checkpoint(&path, format!("not valid JSON: {e}")))?;
    config::from_hf_config(&path, &v)
}

/// Checks a Hugging Face model directory without reading its weights: the config, and from the
/// safetensors headers every tensor's presence, shape and dtype (what [`load`] would refuse
/// about them). Returns the model config.
///
/// # Errors
/// As [`read_config`] and [`weights::check_params`].
pub fn check(dir: &Path) -> Result<GptConfig> {
    let (_, cfg) = read_config(dir)?;
    weights::check_params(&cfg, &weights::WeightIndex::open(dir)?)?;
    Ok(cfg)
}

/// Reads a Hugging Face model directory: its config and its weights in the flat layout.
///
/// # Errors
/// As [`read_config`] and [`weights::load_params`]: one line naming the file and the field or
/// tensor.
pub fn load(dir: &Path) -> Result<(GptConfig, Vec<f32>)> {
    let (_, cfg) = read_config(dir)?;
    let files = weights::WeightFiles::open(dir)?;
    let params = weights::load_params(&cfg, &files)?;
    Ok((cfg, params))
}
