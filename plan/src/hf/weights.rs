//! Hugging Face weights to and from the flat parameter layout: the tensor names, their shapes,
//! and how each lands in [`ParamLayout`] (Llama `Linear` weights are `(out, in)` and are
//! transposed into the engine's `(in, out)`; q/k/v and gate/up are fused into one matrix each).
//! Reads `model.safetensors` or the shards a `model.safetensors.index.json` names, in f32, f16
//! or bf16.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::config::{Family, GptConfig};
use crate::error::{PlanError, Result};
use crate::params::{ParamKind as K, ParamLayout};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How one Hugging Face tensor lands in its layer's slice of a parameter kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Copied as is to `at..` of the slice (vectors, and `(V, C)` tables into `(Vp, C)`).
    Copy { at: usize },
    /// An `(out, in)` matrix transposed into columns `col0..col0+out` of the slice, an
    /// `(in, cols)` matrix.
    Transposed { col0: usize, cols: usize },
}

/// One tensor of the Hugging Face state dict.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub name: String,
    /// Shape as Hugging Face stores it.
    pub shape: Vec<usize>,
    pub kind: K,
    pub layer: usize,
    pub slot: Slot,
}

/// Every tensor of a llama-family model, in state-dict order.
pub fn llama_tensors(cfg: &GptConfig) -> Vec<HfTensor> {
    let (c, v, i) = (cfg.n_embd, cfg.vocab_size, cfg.intermediate_size);
    let kvw = cfg.kv_heads() * cfg.head_size();
    let dqkv = cfg.qkv_dim();
    let t = |name: String, shape: Vec<usize>, kind, layer, slot| HfTensor { name, shape, kind, layer, slot };
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, c], K::Wte, 0, Slot::Copy { at: 0 })];
    for l in 0..cfg.n_layer {
        let p = format!("model.layers.{l}.");
        out.push(t(format!("{p}input_layernorm.weight"), vec![c], K::Ln1W, l, Slot::Copy { at: 0 }));
        for (name, col0, rows) in [("q", 0, c), ("k", c, kvw), ("v", c + kvw, kvw)] {
            out.push(t(format!("{p}self_attn.{name}_proj.weight"), vec![rows, c], K::QkvW, l, Slot::Transposed { col0, cols: dqkv }));
            if cfg.attention_bias {
                out.push(t(format!("{p}self_attn.{name}_proj.bias"), vec![rows], K::QkvB, l, Slot::Copy { at: col0 }));
            }
        }
        out.push(t(format!("{p}self_attn.o_proj.weight"), vec![c, c], K::AttProjW, l, Slot::Transposed { col0: 0, cols: c }));
        out.push(t(format!("{p}post_attention_layernorm.weight"), vec![c], K::Ln2W, l, Slot::Copy { at: 0 }));
        out.push(t(format!("{p}mlp.gate_proj.weight"), vec![i, c], K::FcW, l, Slot::Transposed { col0: 0, cols: 2 * i }));
        out.push(t(format!("{p}mlp.up_proj.weight"), vec![i, c], K::FcW, l, Slot::Transposed { col0: i, cols: 2 * i }));
        out.push(t(format!("{p}mlp.down_proj.weight"), vec![c, i], K::FcProjW, l, Slot::Transposed { col0: 0, cols: c }));
    }
    out.push(t("model.norm.weight".into(), vec![c], K::LnfW, 0, Slot::Copy { at: 0 }));
    if !cfg.tie_word_embeddings {
        out.push(t("lm_head.weight".into(), vec![v, c], K::LmHead, 0, Slot::Copy { at: 0 }));
    }
    out
}

/// Every tensor of a gpt2 model (the names liandan's checkpoints use).
pub fn gpt2_tensors(cfg: &GptConfig) -> Vec<HfTensor> {
    ParamLayout::new(cfg)
        .named_slices(cfg)
        .into_iter()
        .map(|s| {
            let shape = if s.kind == K::Wte { vec![cfg.vocab_size, cfg.n_embd] } else { s.shape.clone() };
            HfTensor { name: s.kind.hf_name(s.layer), shape, kind: s.kind, layer: s.layer, slot: Slot::Copy { at: 0 } }
        })
        .collect()
}

/// The tensors of `cfg`'s family.
pub fn tensors(cfg: &GptConfig) -> Vec<HfTensor> {
    match cfg.family {
        Family::Gpt2 => gpt2_tensors(cfg),
        Family::Llama => llama_tensors(cfg),
    }
}

/// One tensor's values out of a flat buffer (parameters or gradients), in its HF shape.
pub fn extract(cfg: &GptConfig, layout: &ParamLayout, buf: &[f32], t: &HfTensor) -> Vec<f32> {
    let s = layout.get(buf, t.kind, t.layer);
    let n: usize = t.shape.iter().product();
    match t.slot {
        Slot::Copy { at } => s[at..at + n].to_vec(),
        Slot::Transposed { col0, cols } => {
            let (rows_out, ins) = (t.shape[0], t.shape[1]);
            let _ = cfg;
            let mut out = vec![0.0; n];
            for o in 0..rows_out {
                for k in 0..ins {
                    out[o * ins + k] = s[k * cols + col0 + o];
                }
            }
            out
        }
    }
}

/// Writes one tensor's values (HF shape) into a flat buffer.
pub fn place(layout: &ParamLayout, buf: &mut [f32], t: &HfTensor, vals: &[f32]) {
    let s = layout.get_mut(buf, t.kind, t.layer);
    match t.slot {
        Slot::Copy { at } => s[at..at + vals.len()].copy_from_slice(vals),
        Slot::Transposed { col0, cols } => {
            let (rows_out, ins) = (t.shape[0], t.shape[1]);
            for o in 0..rows_out {
                for k in 0..ins {
                    s[k * cols + col0 + o] = vals[o * ins + k];
                }
            }
        }
    }
}

/// The weights of a directory: one file or the shards of an index, read into memory.
#[derive(Debug)]
pub struct WeightFiles {
    /// `(path, bytes)` per file.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Tensor name to index into `files` (from the index; filled from the headers otherwise).
    map: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or the shards `dir/model.safetensors.index.json` lists.
    ///
    /// # Errors
    /// Neither file exists, the index is not valid or names a shard that is missing, a file is
    /// not safetensors: naming the file.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            let raw = std::fs::read(&index).map_err(|e| PlanError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| PlanError::checkpoint(&index, format!("not valid JSON: {e}")))?;
            let wm = v.get("weight_map").and_then(|w| w.as_object()).ok_or_else(|| PlanError::checkpoint(&index, "weight_map: missing or not an object"))?;
            let mut names: BTreeMap<String, usize> = BTreeMap::new();
            let mut files = Vec::new();
            let mut map = HashMap::new();
            for (tensor, file) in wm {
                let file = file.as_str().ok_or_else(|| PlanError::checkpoint(&index, format!("weight_map.{tensor}: not a file name")))?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(PlanError::checkpoint(&index, format!("weight_map.{tensor}: '{file}' is not a plain file name")));
                }
                let next = names.len();
                let at = *names.entry(file.to_string()).or_insert(next);
                if at == files.len() {
                    let path = dir.join(file);
                    if !path.is_file() {
                        return Err(PlanError::checkpoint(&index, format!("names shard {file} (for {tensor}), which is missing from {}", dir.display())));
                    }
                    let bytes = std::fs::read(&path).map_err(|e| PlanError::io(&path, e))?;
                    files.push((path, bytes));
                }
                map.insert(tensor.clone(), at);
            }
            let wf = WeightFiles { files, map };
            for (i, (path, bytes)) in wf.files.iter().enumerate() {
                let st = SafeTensors::deserialize(bytes).map_err(|e| PlanError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
                for (tensor, &f) in &wf.map {
                    if f == i && st.tensor(tensor).is_err() {
                        return Err(PlanError::checkpoint(path, format!("tensor {tensor} is missing (the index places it in this shard)")));
                    }
                }
            }
            return Ok(wf);
        }
        if !single.is_file() {
            return Err(PlanError::checkpoint(dir, format!("has neither {SINGLE_FILE} nor {INDEX_FILE}")));
        }
        let bytes = std::fs::read(&single).map_err(|e| PlanError::io(&single, e))?;
        let names: Vec<String> = SafeTensors::deserialize(&bytes)
            .map_err(|e| PlanError::checkpoint(&single, format!("not a valid safetensors file: {e}")))?
            .names()
            .into_iter()
            .map(|n| n.to_string())
            .collect();
        Ok(WeightFiles { map: names.into_iter().map(|n| (n, 0)).collect(), files: vec![(single, bytes)] })
    }

    /// Names of every tensor in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The file a tensor is in (or would be: the single file, the index).
    pub fn file_of(&self, name: &str) -> &Path {
        self.map.get(name).map_or(&self.files[0].0, |&i| &self.files[i].0)
    }

    /// One tensor as f32 with its shape; None when it is not in the files.
    ///
    /// # Errors
    /// A dtype other than f32, f16 or bf16, naming the tensor and the file.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Some(&i) = self.map.get(name) else { return Ok(None) };
        let (path, bytes) = &self.files[i];
        // open() checked every file parses.
        let st = SafeTensors::deserialize(bytes).map_err(|e| PlanError::checkpoint(path, e.to_string()))?;
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let vals = to_f32(&view).ok_or_else(|| PlanError::checkpoint(path, format!("tensor {name} has dtype {:?}: liandan reads F32, F16 and BF16", view.dtype())))?;
        Ok(Some((view.shape().to_vec(), vals)))
    }
}

fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    let two = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    Some(match view.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_bits(two(c)).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_bits(two(c)).to_f32()).collect(),
        _ => return None,
    })
}

/// Tensors a directory may carry that the engine does not use: rotary tables older Llama
/// exports saved, GPT-2's causal-mask buffers, and a copy of the tied LM head.
fn ignorable(name: &str, cfg: &GptConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Reads every tensor of `cfg` from `files` into a flat buffer (padding rows zero).
///
/// # Errors
/// A tensor missing, of the wrong shape, or of an unsupported dtype; a tensor in the files that
/// the model has no place for. One line naming the tensor and the file.
pub fn load_params(cfg: &GptConfig, files: &WeightFiles) -> Result<Vec<f32>> {
    let layout = ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.len()];
    let wanted = tensors(cfg);
    // GPT-2 exports from the hub name tensors without the "transformer." prefix.
    let bare = cfg.family == Family::Gpt2 && files.get("transformer.wte.weight")?.is_none();
    let stored = |name: &str| if bare { name.strip_prefix("transformer.").unwrap_or(name).to_string() } else { name.to_string() };
    for t in &wanted {
        let name = stored(&t.name);
        let (shape, vals) = files.get(&name)?.ok_or_else(|| PlanError::checkpoint(files.file_of(&name), format!("tensor {name} is missing")))?;
        if shape != t.shape {
            return Err(PlanError::checkpoint(files.file_of(&name), format!("tensor {name} has shape {shape:?}, the config expects {:?}", t.shape)));
        }
        place(&layout, &mut params, t, &vals);
    }
    let known: std::collections::HashSet<String> = wanted.iter().map(|t| stored(&t.name)).collect();
    let mut extra: Vec<&str> = files.names().filter(|n| !known.contains(*n) && !ignorable(n, cfg)).collect();
    extra.sort();
    if let Some(n) = extra.first() {
        return Err(PlanError::checkpoint(
            files.file_of(n),
            format!("tensor {n} has no place in a {:?}-family model of this config ({} unexpected tensors)", cfg.family, extra.len()),
        ));
    }
    Ok(params)
}

/// The safetensors bytes of `params` under Hugging Face names, f32, with `format: pt` metadata
/// (transformers refuses files without it).
pub fn serialize(cfg: &GptConfig, params: &[f32]) -> std::result::Result<Vec<u8>, String> {
    let layout = ParamLayout::new(cfg);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors(cfg).iter().map(|t| (t.name.clone(), t.shape.clone(), extract(cfg, &layout, params, t).iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_tensors_cover_the_layout_once() {
        for (bias, tied) in [(false, false), (true, true)] {
            let mut cfg = GptConfig::llama(100, 32, 2, 4, 2, 32, 48);
            cfg.attention_bias = bias;
            cfg.tie_word_embeddings = tied;
            let layout = ParamLayout::new(&cfg);
            let params: Vec<f32> = (0..layout.len()).map(|i| i as f32).collect();
            let mut back = vec![0.0; layout.len()];
            for t in llama_tensors(&cfg) {
                place(&layout, &mut back, &t, &extract(&cfg, &layout, &params, &t));
            }
            // Everything but the padded embedding rows round-trips; padding stays zero.
            for kind in [K::Wte, K::LmHead] {
                let r = layout.range(kind);
                if !r.is_empty() {
                    back[r.start + 100 * 32..r.end].copy_from_slice(&params[r.start + 100 * 32..r.end]);
                }
            }
            assert_eq!(back, params);
        }
    }
}
