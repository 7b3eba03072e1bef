//! Hugging Face weights to and from the flat parameter layout: the tensor names, their shapes,
//! and how each lands in [`ParamLayout`] (Llama `Linear` weights are `(out, in)` and are
//! transposed into the engine's `(in, out)`; q/k/v and gate/up are fused into one matrix each).
//! Reads `model.safetensors` or the shards a `model.safetensors.index.json` names, in f32, f16
//! or bf16.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo, TensorView};

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

/// Largest safetensors header read (the format's own limit).
const HEADER_MAX_BYTES: u64 = 100_000_000;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into [`WeightIndex`]'s files.
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// The tensors of one safetensors file from its header alone (no tensor data is read): name,
/// dtype and shape, after checking that the offsets hold exactly those elements and that the
/// tensors fill the file's data section.
///
/// # Errors
/// The file cannot be read, or its header is not a valid safetensors header for its size.
fn read_header(path: &Path) -> Result<Vec<(String, Dtype, Vec<usize>)>> {
    use std::io::Read;
    let bad = |why: String| PlanError::checkpoint(path, format!("not a valid safetensors file: {why}"));
    let mut f = std::fs::File::open(path).map_err(|e| PlanError::io(path, e))?;
    let len = f.metadata().map_err(|e| PlanError::io(path, e))?.len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(|_| bad(format!("{len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(n8);
    if n > HEADER_MAX_BYTES || n > len - 8 {
        return Err(bad(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut raw = vec![0u8; n as usize];
    f.read_exact(&mut raw).map_err(|e| PlanError::io(path, e))?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&raw).map_err(|e| bad(format!("header: {e}")))?;
    let data = len - 8 - n;
    let mut end = 0u64;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo = serde_json::from_value(v).map_err(|e| bad(format!("header entry {name}: {e}")))?;
        let (start, stop) = info.data_offsets;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        if stop < start || stop as u64 > data || bits.map(|b| b.div_ceil(8)) != Some(stop - start) {
            return Err(bad(format!("tensor {name}: bytes {start}..{stop} do not hold a {:?} {:?} inside the {data} data bytes", info.dtype, info.shape)));
        }
        end = end.max(stop as u64);
        tensors.push((name, info.dtype, info.shape));
    }
    if end != data {
        return Err(bad(format!("its tensors end at byte {end} of a {data}-byte data section (truncated, or bytes after the last tensor)")));
    }
    Ok(tensors)
}

/// What a directory's weight files hold, from their headers: every tensor's file, dtype and
/// shape. Reading it costs the headers, whatever the model's size, so the coordinator checks an
/// `init` directory with it at submit.
#[derive(Debug)]
pub struct WeightIndex {
    paths: Vec<PathBuf>,
    /// Tensor name to its entry (the index's names for a sharded directory).
    entries: HashMap<String, Entry>,
}

impl WeightIndex {
    /// Reads the headers of `dir/model.safetensors`, or of the shards
    /// `dir/model.safetensors.index.json` lists.
    ///
    /// # Errors
    /// Neither file exists, the index is not valid or names a shard that is missing or a tensor
    /// its shard lacks, a header is not valid: naming the file.
    pub fn open(dir: &Path) -> Result<WeightIndex> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            let raw = std::fs::read(&index).map_err(|e| PlanError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| PlanError::checkpoint(&index, format!("not valid JSON: {e}")))?;
            let wm = v.get("weight_map").and_then(|w| w.as_object()).ok_or_else(|| PlanError::checkpoint(&index, "weight_map: missing or not an object"))?;
            let mut names: BTreeMap<String, usize> = BTreeMap::new();
            let mut paths = Vec::new();
            let mut placed = Vec::new();
            for (tensor, file) in wm {
                let file = file.as_str().ok_or_else(|| PlanError::checkpoint(&index, format!("weight_map.{tensor}: not a file name")))?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(PlanError::checkpoint(&index, format!("weight_map.{tensor}: '{file}' is not a plain file name")));
                }
                let next = names.len();
                let at = *names.entry(file.to_string()).or_insert(next);
                if at == paths.len() {
                    let path = dir.join(file);
                    if !path.is_file() {
                        return Err(PlanError::checkpoint(&index, format!("names shard {file} (for {tensor}), which is missing from {}", dir.display())));
                    }
                    paths.push(path);
                }
                placed.push((tensor.clone(), at));
            }
            let headers: Vec<HashMap<String, (Dtype, Vec<usize>)>> =
                paths.iter().map(|p| Ok(read_header(p)?.into_iter().map(|(n, d, s)| (n, (d, s))).collect())).collect::<Result<_>>()?;
            let mut entries = HashMap::new();
            for (tensor, file) in placed {
                let (dtype, shape) = headers[file]
                    .get(&tensor)
                    .cloned()
                    .ok_or_else(|| PlanError::checkpoint(&paths[file], format!("tensor {tensor} is missing (the index places it in this shard)")))?;
                entries.insert(tensor, Entry { file, dtype, shape });
            }
            return Ok(WeightIndex { paths, entries });
        }
        if !single.is_file() {
            return Err(PlanError::checkpoint(dir, format!("has neither {SINGLE_FILE} nor {INDEX_FILE}")));
        }
        let entries = read_header(&single)?.into_iter().map(|(name, dtype, shape)| (name, Entry { file: 0, dtype, shape })).collect();
        Ok(WeightIndex { paths: vec![single], entries })
    }

    /// Names of every tensor in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The file a tensor is in (or would be: the single file, the first shard).
    pub fn file_of(&self, name: &str) -> &Path {
        self.entries.get(name).map_or(&self.paths[0], |e| &self.paths[e.file])
    }
}

/// The weights of a directory: one file or the shards of an index, read into memory.
#[derive(Debug)]
pub struct WeightFiles {
    pub index: WeightIndex,
    /// The bytes of each of the index's files.
    bytes: Vec<Vec<u8>>,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or the shards `dir/model.safetensors.index.json` lists,
    /// and reads them.
    ///
    /// # Errors
    /// As [`WeightIndex::open`], or a file does not parse as safetensors: naming the file.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let index = WeightIndex::open(dir)?;
        let mut bytes = Vec::with_capacity(index.paths.len());
        for path in &index.paths {
            let b = std::fs::read(path).map_err(|e| PlanError::io(path, e))?;
            SafeTensors::deserialize(&b).map_err(|e| PlanError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
            bytes.push(b);
        }
        Ok(WeightFiles { index, bytes })
    }

    /// One tensor as f32 with its shape; None when it is not in the files.
    ///
    /// # Errors
    /// A dtype other than f32, f16 or bf16, naming the tensor and the file.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Some(e) = self.index.entries.get(name) else { return Ok(None) };
        let path = &self.index.paths[e.file];
        // open() checked every file parses.
        let st = SafeTensors::deserialize(&self.bytes[e.file]).map_err(|e| PlanError::checkpoint(path, e.to_string()))?;
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let vals = to_f32(&view).ok_or_else(|| unreadable(name, view.dtype(), path))?;
        Ok(Some((view.shape().to_vec(), vals)))
    }
}

fn unreadable(name: &str, dtype: Dtype, path: &Path) -> PlanError {
    PlanError::checkpoint(path, format!("tensor {name} has dtype {dtype:?}: liandan reads F32, F16 and BF16"))
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

/// Checks from the headers that `index` holds every tensor of `cfg` at its shape in a dtype
/// liandan reads, and nothing the model has no place for; returns each tensor with the name it
/// is stored under.
///
/// # Errors
/// A tensor missing, of the wrong shape, or of an unsupported dtype; a tensor in the files that
/// the model has no place for. One line naming the tensor and the file.
pub fn check_params(cfg: &GptConfig, index: &WeightIndex) -> Result<Vec<(HfTensor, String)>> {
    let wanted = tensors(cfg);
    // GPT-2 exports from the hub name tensors without the "transformer." prefix.
    let bare = cfg.family == Family::Gpt2 && !index.entries.contains_key("transformer.wte.weight");
    let stored = |name: &str| if bare { name.strip_prefix("transformer.").unwrap_or(name).to_string() } else { name.to_string() };
    let mut plan = Vec::with_capacity(wanted.len());
    for t in &wanted {
        let name = stored(&t.name);
        let e = index.entries.get(&name).ok_or_else(|| PlanError::checkpoint(index.file_of(&name), format!("tensor {name} is missing")))?;
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(unreadable(&name, e.dtype, index.file_of(&name)));
        }
        if e.shape != t.shape {
            return Err(PlanError::checkpoint(index.file_of(&name), format!("tensor {name} has shape {:?}, the config expects {:?}", e.shape, t.shape)));
        }
        plan.push((t.clone(), name));
    }
    let known: std::collections::HashSet<&str> = plan.iter().map(|(_, n)| n.as_str()).collect();
    let mut extra: Vec<&str> = index.names().filter(|n| !known.contains(*n) && !ignorable(n, cfg)).collect();
    extra.sort();
    if let Some(n) = extra.first() {
        return Err(PlanError::checkpoint(
            index.file_of(n),
            format!("tensor {n} has no place in a {:?}-family model of this config ({} unexpected tensors)", cfg.family, extra.len()),
        ));
    }
    Ok(plan)
}

/// Reads every tensor of `cfg` from `files` into a flat buffer (padding rows zero).
///
/// # Errors
/// As [`check_params`].
pub fn load_params(cfg: &GptConfig, files: &WeightFiles) -> Result<Vec<f32>> {
    let layout = ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.len()];
    for (t, name) in check_params(cfg, &files.index)? {
        let (_, vals) = files.get(&name)?.ok_or_else(|| PlanError::checkpoint(files.index.file_of(&name), format!("tensor {name} is missing")))?;
        place(&layout, &mut params, &t, &vals);
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

    /// A fresh directory under the system temp dir, unique to this process and `name`.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-plan-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes `dir/model.safetensors` with a header for `cfg`'s tensors in bf16 and a data
    /// section of `data_len` bytes (a sparse file: nothing is written but the header).
    fn write_header_only(dir: &Path, cfg: &GptConfig, data_len: impl Fn(u64) -> u64) {
        let mut header = serde_json::Map::new();
        let mut at = 0usize;
        for t in tensors(cfg) {
            let bytes = t.shape.iter().product::<usize>() * 2;
            header.insert(t.name.clone(), serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [at, at + bytes]}));
            at += bytes;
        }
        let raw = serde_json::to_vec(&header).unwrap();
        let f = std::fs::File::create(dir.join(SINGLE_FILE)).unwrap();
        use std::io::Write;
        (&f).write_all(&(raw.len() as u64).to_le_bytes()).unwrap();
        (&f).write_all(&raw).unwrap();
        f.set_len(8 + raw.len() as u64 + data_len(at as u64)).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_hf_config_json().to_string()).unwrap();
    }

    /// Peak resident memory of this process so far, bytes (Linux).
    fn peak_rss() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    }

    #[test]
    fn a_directory_is_checked_from_its_headers_without_reading_the_weights() {
        // A 1M-token embedding of width 1024 in bf16: 2 GiB of weights, 4 GiB as f32.
        let mut cfg = GptConfig::llama(1 << 20, 32, 1, 4, 2, 1024, 64);
        cfg.tie_word_embeddings = true;
        let d = scratch("sparse");
        write_header_only(&d, &cfg, |n| n);
        let before = peak_rss();
        let got = crate::hf::check(&d).unwrap();
        assert_eq!(got, crate::hf::read_config(&d).unwrap().1);
        if let (Some(a), Some(b)) = (before, peak_rss()) {
            assert!(b - a < 64 << 20, "the check raised the peak resident memory by {} MiB", (b - a) >> 20);
        }
        // The same header over a data section one byte short, or one byte long, is refused.
        for (what, delta) in [("short", -1i64), ("long", 1)] {
            write_header_only(&d, &cfg, |n| (n as i64 + delta) as u64);
            let e = crate::hf::check(&d).expect_err(what).to_string();
            assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{what}: {e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn header_entries_that_do_not_hold_their_tensor_are_refused() {
        let d = scratch("bad-header");
        let p = d.join(SINGLE_FILE);
        let write = |header: serde_json::Value, data: usize| {
            let raw = serde_json::to_vec(&header).unwrap();
            let mut b = (raw.len() as u64).to_le_bytes().to_vec();
            b.extend(raw);
            b.extend(vec![0u8; data]);
            std::fs::write(&p, b).unwrap();
        };
        // Offsets too short for the shape.
        write(serde_json::json!({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}), 20);
        let e = read_header(&p).unwrap_err().to_string();
        assert!(e.contains("tensor w") && e.contains("[2, 3]"), "{e}");
        // Reversed offsets, an unknown dtype, a header longer than the file.
        write(serde_json::json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}), 4);
        assert!(read_header(&p).unwrap_err().to_string().contains("tensor w"));
        write(serde_json::json!({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}), 4);
        assert!(read_header(&p).unwrap_err().to_string().contains("header entry w"));
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert!(read_header(&p).unwrap_err().to_string().contains("a header of 1000 bytes"));
        // A well-formed one reads back.
        write(serde_json::json!({"__metadata__": {"format": "pt"}, "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}), 12);
        assert_eq!(read_header(&p).unwrap(), vec![("w".to_string(), Dtype::BF16, vec![2, 3])]);
        let _ = std::fs::remove_dir_all(&d);
    }

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
