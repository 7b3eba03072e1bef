//! Checkpoints: a directory that `transformers` can load (`GPT2LMHeadModel`, or
//! `LlamaForCausalLM` / `Qwen2ForCausalLM` for the llama family) and that liandan resumes from
//! bit for bit. [`load`] also imports a Hugging Face model directory as downloaded.
//!
//! ```text
//! DIR/model.safetensors      weights, Hugging Face names and layouts (wte without padding rows)
//! DIR/optimizer.safetensors  AdamW moments "m" and "v" in the flat parameter layout
//! DIR/config.json            Hugging Face GPT2Config
//! DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json
//!                            when the model has a BPE tokenizer: with the chat template, so
//!                            `AutoTokenizer.from_pretrained(DIR)` formats chats as liandan does
//! DIR/state.json             step, RNG state, model and training config, data cursor, tokenizer,
//!                            and the size and SHA-256 of every other file; its own SHA-256 too
//! ```
//!
//! Writing is atomic: everything goes into a temporary sibling directory, each file is fsynced,
//! the directory is renamed into place and its parent fsynced. A crash leaves either the old
//! checkpoint or the new one, never a mix. Loading verifies sizes and checksums before parsing,
//! then every tensor's name, dtype and shape against the config.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::GptConfig;
use crate::error::{PlanError, Result};
use crate::params::{ParamKind, ParamLayout};
use crate::training::TrainConfig;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const HF_CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.json";
/// The files in which phases record an evaluation of their checkpoint (SFT validation loss
/// and task scores, reward-model held-out accuracy, PPO and GRPO step statistics, DPO held-out
/// accuracy), checksummed like every other file; the coordinator shows them with the job.
pub mod eval_files {
    pub const SFT: &str = "sft_eval.json";
    pub const REWARD: &str = "reward_eval.json";
    pub const PPO: &str = "ppo_eval.json";
    pub const GRPO: &str = "grpo_eval.json";
    pub const DPO: &str = "dpo_eval.json";
    pub const ALL: [&str; 5] = [SFT, REWARD, PPO, GRPO, DPO];
}
const FORMAT: &str = "liandan-checkpoint";
const VERSION: u32 = 1;

/// Where the data reader stands, so a resumed run reads what an uninterrupted one would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCursor {
    /// Next token of the stream (single-process byte training).
    pub position: u64,
}

/// Size and SHA-256 of one file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub bytes: u64,
    pub sha256: String,
}

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    pub format: String,
    pub version: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// [`crate::rng::Rng::state`], hex (JSON numbers lose precision above 2^53 in many readers).
    pub rng_state: String,
    pub model_config: GptConfig,
    pub train_config: Option<TrainConfig>,
    /// Updates applied by AdamW (its bias-correction `t`); 0 when no optimizer state was saved.
    pub optimizer_t: u64,
    pub data_cursor: DataCursor,
    /// Tokenizer the model was trained with (`bytes` for the byte-level vocabulary, or a tokenizer file name).
    pub tokenizer: String,
    pub files: BTreeMap<String, FileSum>,
    /// SHA-256 of this JSON with this field empty.
    pub sha256: String,
}

impl CheckpointState {
    pub fn rng_state(&self) -> Result<u64> {
        u64::from_str_radix(&self.rng_state, 16).map_err(|e| PlanError::checkpoint(STATE_FILE, format!("rng_state '{}': {e}", self.rng_state)))
    }
}

/// What to save besides the weights.
#[derive(Debug, Clone)]
pub struct SaveInfo<'a> {
    pub step: u64,
    pub rng_state: u64,
    pub train_config: Option<&'a TrainConfig>,
    pub data_cursor: DataCursor,
    pub tokenizer: &'a str,
    /// Other files to store in the checkpoint (name, bytes), checksummed like the rest: the
    /// tokenizer a model needs to be used.
    pub extra_files: &'a [(String, Vec<u8>)],
}

/// Optimizer moments to save: `(m, v, t)` in the flat layout.
pub type Moments<'a> = (&'a [f32], &'a [f32], u64);

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Checkpoint {
    pub state: CheckpointState,
    /// Parameters in the flat [`ParamLayout`] (padding rows zero).
    pub params: Vec<f32>,
    /// AdamW `m` and `v`, if the checkpoint has them.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
}

/// Writes a checkpoint of `params` (and optionally optimizer moments) to `dir`, atomically.
///
/// # Errors
/// I/O errors, naming the file.
pub fn save(dir: &Path, config: &GptConfig, params: &[f32], moments: Option<Moments<'_>>, info: &SaveInfo<'_>) -> Result<()> {
    let layout = ParamLayout::new(config);
    if params.len() != layout.len() {
        return Err(PlanError::checkpoint(dir, format!("params have {} floats, the config needs {}", params.len(), layout.len())));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| PlanError::io(parent, e))?;
    let name = dir.file_name().ok_or_else(|| PlanError::checkpoint(dir, "checkpoint path has no directory name"))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| PlanError::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| PlanError::io(&tmp, e))?;

    let mut files = BTreeMap::new();
    let model_bytes = serialize_model(config, &layout, params).map_err(|e| PlanError::checkpoint(dir, e))?;
    files.insert(MODEL_FILE.to_string(), write_synced(&tmp.join(MODEL_FILE), &model_bytes)?);
    let optimizer_t = match moments {
        Some((m, v, t)) => {
            let bytes = serialize_moments(m, v, layout.len()).map_err(|e| PlanError::checkpoint(dir, e))?;
            files.insert(OPTIMIZER_FILE.to_string(), write_synced(&tmp.join(OPTIMIZER_FILE), &bytes)?);
            t
        }
        None => 0,
    };
    for (name, bytes) in info.extra_files {
        if [MODEL_FILE, OPTIMIZER_FILE, HF_CONFIG_FILE, STATE_FILE].contains(&name.as_str()) || name.contains('/') {
            return Err(PlanError::checkpoint(dir, format!("extra file name '{name}' is reserved or not a plain name")));
        }
        files.insert(name.clone(), write_synced(&tmp.join(name), bytes)?);
    }
    // The tokenizer's config files (chat template, special tokens, stop ids): a checkpoint with a
    // tokenizer is a Hugging Face model directory `AutoTokenizer` loads.
    let exported = crate::hf_tokenizer::export_files(info.extra_files, config.n_positions).map_err(|why| PlanError::checkpoint(dir, format!("tokenizer files: {why}")))?;
    for (name, bytes) in &exported {
        files.insert(name.clone(), write_synced(&tmp.join(name), bytes)?);
    }
    let hf = serde_json::to_vec_pretty(&config.to_hf_config_json()).map_err(|e| PlanError::checkpoint(dir, e.to_string()))?;
    files.insert(HF_CONFIG_FILE.to_string(), write_synced(&tmp.join(HF_CONFIG_FILE), &hf)?);

    let mut state = CheckpointState {
        format: FORMAT.into(),
        version: VERSION,
        step: info.step,
        rng_state: format!("{:016x}", info.rng_state),
        model_config: config.clone(),
        train_config: info.train_config.cloned(),
        optimizer_t,
        data_cursor: info.data_cursor.clone(),
        tokenizer: info.tokenizer.to_string(),
        files,
        sha256: String::new(),
    };
    state.sha256 = state_digest(&state)?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| PlanError::checkpoint(dir, e.to_string()))?;
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(&tmp)?;

    // Swap into place. A directory cannot be renamed over a non-empty one, so an existing
    // checkpoint is moved aside first and removed only after the new one is in place.
    let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
    let had_old = dir.exists();
    if had_old {
        fs::rename(dir, &old).map_err(|e| PlanError::io(dir, e))?;
    }
    fs::rename(&tmp, dir).map_err(|e| PlanError::io(dir, e))?;
    sync_dir(parent)?;
    if had_old {
        fs::remove_dir_all(&old).map_err(|e| PlanError::io(&old, e))?;
    }
    Ok(())
}

/// Reads and verifies the checkpoint in `dir`. With `expect`, the checkpoint's model config
/// must equal it (a checkpoint of another vocabulary or shape is refused, naming the field).
///
/// # Errors
/// [`PlanError::Checkpoint`] naming the file and what is wrong: missing, truncated, checksum
/// mismatch, a tensor missing or of the wrong shape or dtype, a config that differs from `expect`.
///
/// A Hugging Face model directory (a `config.json` and no `state.json`, as a user downloads one)
/// is imported instead: see [`import_hf`].
pub fn load(dir: &Path, expect: Option<&GptConfig>) -> Result<Checkpoint> {
    if crate::hf::is_hf_dir(dir) {
        let ck = import_hf(dir)?;
        if let Some(want) = expect {
            compare_configs(&ck.state.model_config, want).map_err(|why| PlanError::checkpoint(dir.join(HF_CONFIG_FILE), why))?;
        }
        return Ok(ck);
    }
    let state = read_state(dir)?;
    let state_path = dir.join(STATE_FILE);
    if let Some(want) = expect {
        compare_configs(&state.model_config, want).map_err(|why| PlanError::checkpoint(&state_path, why))?;
    }
    let config = &state.model_config;
    let layout = ParamLayout::new(config);
    // The declared shapes must fit the files before anything the size of the model is
    // allocated: a state.json that declares a huge model over a small file stops here.
    let need = tensor_bytes(config);
    let have = state.files.get(MODEL_FILE).map_or(0, |f| f.bytes);
    if need.is_none_or(|n| have < n) {
        return Err(PlanError::checkpoint(
            dir.join(MODEL_FILE),
            format!(
                "{have} bytes cannot hold the {} parameters state.json declares ({} bytes of f32)",
                config.num_parameters(),
                need.map_or_else(|| "too many".to_string(), |n| n.to_string())
            ),
        ));
    }

    let model_bytes = read_verified(dir, MODEL_FILE, &state)?;
    let model_path = dir.join(MODEL_FILE);
    let params = deserialize_model(config, &layout, &model_bytes).map_err(|why| PlanError::checkpoint(&model_path, why))?;
    let moments = if state.files.contains_key(OPTIMIZER_FILE) {
        let bytes = read_verified(dir, OPTIMIZER_FILE, &state)?;
        let path = dir.join(OPTIMIZER_FILE);
        Some(deserialize_moments(&bytes, layout.len()).map_err(|why| PlanError::checkpoint(&path, why))?)
    } else {
        None
    };
    Ok(Checkpoint { state, params, moments })
}

/// Checks that `dir` is a checkpoint (or Hugging Face model directory) that loads, with
/// `expect`'s config when given, and returns its model config. A Hugging Face directory is
/// checked from its config and safetensors headers without reading the weights (the
/// coordinator runs this at submit, where a multi-gigabyte model must not be read into memory);
/// a liandan checkpoint is loaded and verified in full.
///
/// # Errors
/// As [`load`].
pub fn check(dir: &Path, expect: Option<&GptConfig>) -> Result<GptConfig> {
    if !crate::hf::is_hf_dir(dir) {
        return Ok(load(dir, expect)?.state.model_config);
    }
    let config = crate::hf::check(dir)?;
    if let Some(want) = expect {
        compare_configs(&config, want).map_err(|why| PlanError::checkpoint(dir.join(HF_CONFIG_FILE), why))?;
    }
    Ok(config)
}

/// Imports a Hugging Face model directory (gpt2, llama or qwen2 `config.json`; weights in
/// `model.safetensors` or shards with their index; f32, f16 or bf16) as a checkpoint at step 0
/// with no optimizer state. The state names `tokenizer.json` when the directory has one.
///
/// # Errors
/// One line naming the file and the field or tensor: an unsupported architecture or config
/// field, a missing shard, a missing or misshapen tensor.
pub fn import_hf(dir: &Path) -> Result<Checkpoint> {
    let (model_config, params) = crate::hf::load(dir)?;
    let tokenizer = if dir.join("tokenizer.json").is_file() { "tokenizer.json".to_string() } else { String::new() };
    let mut state = CheckpointState {
        format: FORMAT.into(),
        version: VERSION,
        step: 0,
        rng_state: format!("{:016x}", 0),
        model_config,
        train_config: None,
        optimizer_t: 0,
        data_cursor: DataCursor::default(),
        tokenizer,
        files: BTreeMap::new(),
        sha256: String::new(),
    };
    state.sha256 = state_digest(&state)?;
    Ok(Checkpoint { state, params, moments: None })
}

/// The model config of a checkpoint or Hugging Face model directory, without its weights.
///
/// # Errors
/// As [`read_state`] or [`crate::hf::read_config`].
pub fn read_model_config(dir: &Path) -> Result<GptConfig> {
    if crate::hf::is_hf_dir(dir) { Ok(crate::hf::read_config(dir)?.1) } else { Ok(read_state(dir)?.model_config) }
}

/// Largest `state.json` read: a real one is a few KiB.
const STATE_MAX_BYTES: u64 = 16 << 20;

/// Reads `state.json` (bounded in size before it is read), checks its format, its own
/// checksum and its model config.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let state_path = dir.join(STATE_FILE);
    let raw = read_bounded(&state_path, STATE_MAX_BYTES).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PlanError::checkpoint(&state_path, "missing: not a liandan checkpoint (or an unfinished one)"),
        _ => PlanError::io(&state_path, e),
    })?;
    let state: CheckpointState = serde_json::from_slice(&raw).map_err(|e| PlanError::checkpoint(&state_path, format!("not valid checkpoint state: {e}")))?;
    if state.format != FORMAT || state.version != VERSION {
        return Err(PlanError::checkpoint(&state_path, format!("format {} v{} is not {FORMAT} v{VERSION}", state.format, state.version)));
    }
    let digest = state_digest(&state)?;
    if digest != state.sha256 {
        return Err(PlanError::checkpoint(&state_path, format!("sha256 mismatch: recorded {}, computed {digest}", state.sha256)));
    }
    state.model_config.validate().map_err(|e| PlanError::checkpoint(&state_path, format!("model_config: {e}")))?;
    Ok(state)
}

/// Verifies a checkpoint without loading it: `state.json` as [`read_state`] does, then the
/// size and SHA-256 of every file it lists, read in pieces (memory does not grow with the
/// model). What the coordinator runs before it records a checkpoint.
///
/// # Errors
/// [`PlanError::Checkpoint`] naming the file: missing, truncated, corrupt, a listed name that
/// is not a plain file name.
pub fn verify(dir: &Path) -> Result<CheckpointState> {
    use std::io::Read;
    let state = read_state(dir)?;
    for (name, sum) in &state.files {
        let path = dir.join(name);
        if name.contains('/') || name == ".." || name.is_empty() {
            return Err(PlanError::checkpoint(&path, "state.json lists a file that is not a plain name"));
        }
        let mut f = File::open(&path).map_err(|e| PlanError::io(&path, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| PlanError::io(&path, e))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            if bytes > sum.bytes {
                break;
            }
            h.update(&buf[..n]);
        }
        if bytes != sum.bytes {
            return Err(PlanError::checkpoint(
                &path,
                format!("truncated or extended: {bytes}{} bytes, state.json records {}", if bytes > sum.bytes { "+" } else { "" }, sum.bytes),
            ));
        }
        let digest = hex(&h.finalize());
        if digest != sum.sha256 {
            return Err(PlanError::checkpoint(&path, format!("sha256 mismatch (corrupt file): recorded {}, computed {digest}", sum.sha256)));
        }
    }
    Ok(state)
}

/// Reads a file of at most `max` bytes (refusing a larger one, and anything that is not a
/// regular file, before reading it).
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} bytes is more than the {max} expected", meta.len())));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// Bytes of the model's tensors as stored (f32, the embedding without padding rows); None
/// when they overflow.
fn tensor_bytes(config: &GptConfig) -> Option<u64> {
    // Untied llama models have two padded tables (embedding and LM head).
    let tables = if config.family == crate::config::Family::Llama && !config.tie_word_embeddings { 2 } else { 1 };
    let padding = (config.padded_vocab_size as u64 - config.vocab_size as u64).checked_mul(config.n_embd as u64)?.checked_mul(tables)?;
    config.checked_num_parameters()?.checked_sub(padding)?.checked_mul(4)
}

fn compare_configs(got: &GptConfig, want: &GptConfig) -> std::result::Result<(), String> {
    let pairs = [
        ("vocab_size", got.vocab_size, want.vocab_size),
        ("padded_vocab_size", got.padded_vocab_size, want.padded_vocab_size),
        ("n_positions", got.n_positions, want.n_positions),
        ("n_layer", got.n_layer, want.n_layer),
        ("n_head", got.n_head, want.n_head),
        ("n_embd", got.n_embd, want.n_embd),
    ];
    if got.family != want.family {
        return Err(format!("model_config.family is {:?}, expected {:?}", got.family, want.family));
    }
    for (field, g, w) in pairs {
        if g != w {
            return Err(format!("model_config.{field} is {g}, expected {w}"));
        }
    }
    let more = [
        ("n_kv_head", got.kv_heads().to_string(), want.kv_heads().to_string()),
        ("intermediate_size", got.intermediate_size.to_string(), want.intermediate_size.to_string()),
        ("rope_theta", got.rope_theta.to_string(), want.rope_theta.to_string()),
        ("rms_norm_eps", got.rms_norm_eps.to_string(), want.rms_norm_eps.to_string()),
        ("tie_word_embeddings", got.tie_word_embeddings.to_string(), want.tie_word_embeddings.to_string()),
        ("attention_bias", got.attention_bias.to_string(), want.attention_bias.to_string()),
    ];
    for (field, g, w) in more {
        if g != w {
            return Err(format!("model_config.{field} is {g}, expected {w}"));
        }
    }
    Ok(())
}

/// Reads a file of a loaded checkpoint, verifying its size and checksum against `state.json`.
pub fn read_verified(dir: &Path, name: &str, state: &CheckpointState) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let sum = state.files.get(name).ok_or_else(|| PlanError::checkpoint(&path, "not listed in state.json"))?;
    let bytes = read_bounded(&path, sum.bytes).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => PlanError::checkpoint(&path, format!("extended: {e}, state.json records {}", sum.bytes)),
        _ => PlanError::io(&path, e),
    })?;
    if bytes.len() as u64 != sum.bytes {
        return Err(PlanError::checkpoint(&path, format!("truncated or extended: {} bytes, state.json records {}", bytes.len(), sum.bytes)));
    }
    let digest = hex(&Sha256::digest(&bytes));
    if digest != sum.sha256 {
        return Err(PlanError::checkpoint(&path, format!("sha256 mismatch (corrupt file): recorded {}, computed {digest}", sum.sha256)));
    }
    Ok(bytes)
}

fn state_digest(state: &CheckpointState) -> Result<String> {
    let mut blank = state.clone();
    blank.sha256 = String::new();
    let bytes = serde_json::to_vec(&blank).map_err(|e| PlanError::checkpoint(STATE_FILE, e.to_string()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The Hugging Face shape of a slice: the embedding loses its padding rows.
fn hf_shape(config: &GptConfig, kind: ParamKind, shape: &[usize]) -> Vec<usize> {
    if kind == ParamKind::Wte { vec![config.vocab_size, config.n_embd] } else { shape.to_vec() }
}

pub fn serialize_model(config: &GptConfig, layout: &ParamLayout, params: &[f32]) -> std::result::Result<Vec<u8>, String> {
    if config.family == crate::config::Family::Llama {
        return crate::hf::weights::serialize(config, params);
    }
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for s in layout.named_slices(config) {
        let shape = hf_shape(config, s.kind, &s.shape);
        let n: usize = shape.iter().product();
        data.push((s.kind.hf_name(s.layer), shape, f32_bytes(&params[s.offset..s.offset + n])));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| e.to_string())?;
    // transformers refuses safetensors files without format metadata.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// Parses Hugging Face-named weights into the flat layout, checking names, dtypes and shapes.
/// Also reads PyTorch-written files (the numerics fixtures), which carry extra tensors.
pub fn deserialize_model(config: &GptConfig, layout: &ParamLayout, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    if config.family == crate::config::Family::Llama {
        let mut params = vec![0.0f32; layout.len()];
        for t in crate::hf::weights::llama_tensors(config) {
            let view = st.tensor(&t.name).map_err(|_| format!("tensor {} is missing", t.name))?;
            if view.dtype() != Dtype::F32 {
                return Err(format!("tensor {} has dtype {:?}, expected F32", t.name, view.dtype()));
            }
            if view.shape() != t.shape.as_slice() {
                return Err(format!("tensor {} has shape {:?}, the config expects {:?}", t.name, view.shape(), t.shape));
            }
            crate::hf::weights::place(layout, &mut params, &t, &bytes_f32(view.data()));
        }
        return Ok(params);
    }
    let mut params = vec![0.0f32; layout.len()];
    for s in layout.named_slices(config) {
        let name = s.kind.hf_name(s.layer);
        let view = st.tensor(&name).map_err(|_| format!("tensor {name} is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!("tensor {name} has dtype {:?}, expected F32", view.dtype()));
        }
        let want = hf_shape(config, s.kind, &s.shape);
        if view.shape() != want.as_slice() {
            return Err(format!("tensor {name} has shape {:?}, the config expects {:?}", view.shape(), want));
        }
        let vals = bytes_f32(view.data());
        params[s.offset..s.offset + vals.len()].copy_from_slice(&vals);
    }
    Ok(params)
}

pub fn serialize_moments(m: &[f32], v: &[f32], n: usize) -> std::result::Result<Vec<u8>, String> {
    if m.len() != n || v.len() != n {
        return Err(format!("optimizer moments have {}/{} floats, the model has {n}", m.len(), v.len()));
    }
    let (mb, vb) = (f32_bytes(m), f32_bytes(v));
    let views = vec![
        ("m".to_string(), TensorView::new(Dtype::F32, vec![n], &mb).map_err(|e| e.to_string())?),
        ("v".to_string(), TensorView::new(Dtype::F32, vec![n], &vb).map_err(|e| e.to_string())?),
    ];
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

pub fn deserialize_moments(bytes: &[u8], n: usize) -> std::result::Result<(Vec<f32>, Vec<f32>), String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let get = |name: &str| -> std::result::Result<Vec<f32>, String> {
        let view = st.tensor(name).map_err(|_| format!("tensor {name} is missing"))?;
        if view.dtype() != Dtype::F32 || view.shape() != [n] {
            return Err(format!("tensor {name} is {:?} {:?}, expected F32 [{n}]", view.dtype(), view.shape()));
        }
        Ok(bytes_f32(view.data()))
    };
    Ok((get("m")?, get("v")?))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileSum> {
    let mut f = File::create(path).map_err(|e| PlanError::io(path, e))?;
    f.write_all(bytes).map_err(|e| PlanError::io(path, e))?;
    f.sync_all().map_err(|e| PlanError::io(path, e))?;
    Ok(FileSum { bytes: bytes.len() as u64, sha256: hex(&Sha256::digest(bytes)) })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| PlanError::io(dir, e))
}

/// The checkpoint directory for `step` under `root` (`root/step-00000100`).
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}
