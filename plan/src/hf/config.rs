//! Hugging Face `config.json` to and from [`GptConfig`]: `GPT2LMHeadModel`, `LlamaForCausalLM`
//! and `Qwen2ForCausalLM`. Everything the engine does not implement is refused with the file and
//! the field (rope scaling, sliding-window attention, MLP biases, another activation, a head
//! size other than `hidden_size / num_attention_heads`), never silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{DEFAULT_RMS_NORM_EPS, DEFAULT_ROPE_THETA, Family, GptConfig};
use crate::error::{PlanError, Result};

/// The architectures an imported directory may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Qwen2,
}

/// Reads `config.json` (already parsed) into a model config; `path` names the file in errors.
///
/// # Errors
/// An unknown or unsupported architecture, a missing or out-of-range field, a field the engine
/// does not implement: one line naming `path` and the field.
pub fn from_hf_config(path: &Path, v: &Value) -> Result<(Arch, GptConfig)> {
    let bad = |field: &str, why: String| PlanError::checkpoint(path, format!("{field}: {why}"));
    let obj = v.as_object().ok_or_else(|| bad("config.json", "is not a JSON object".into()))?;
    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = obj.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let arch = match (model_type, archs.as_slice()) {
        ("gpt2", _) => Arch::Gpt2,
        ("llama", _) => Arch::Llama,
        ("qwen2", _) => Arch::Qwen2,
        ("", ["GPT2LMHeadModel"]) => Arch::Gpt2,
        ("", ["LlamaForCausalLM"]) => Arch::Llama,
        ("", ["Qwen2ForCausalLM"]) => Arch::Qwen2,
        (other, _) => {
            return Err(bad(
                "model_type",
                format!(
                    "'{other}' (architectures {archs:?}) is not supported: liandan trains gpt2, llama and qwen2 causal LMs (no Mistral, mixture-of-experts, vision or encoder models)"
                ),
            ));
        }
    };
    for a in &archs {
        let ok = matches!((arch, *a), (Arch::Gpt2, "GPT2LMHeadModel") | (Arch::Llama, "LlamaForCausalLM") | (Arch::Qwen2, "Qwen2ForCausalLM"));
        if !ok {
            return Err(bad("architectures", format!("'{a}' is not a causal LM head liandan implements for model_type '{model_type}'")));
        }
    }
    let f = Fields { obj, path };
    let cfg = match arch {
        Arch::Gpt2 => gpt2(&f)?,
        Arch::Llama | Arch::Qwen2 => llama(&f, arch)?,
    };
    cfg.validate().map_err(|e| PlanError::checkpoint(path, e.to_string()))?;
    Ok((arch, cfg))
}

/// Typed access to the fields of one `config.json`.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, why: impl std::fmt::Display) -> PlanError {
        PlanError::checkpoint(self.path, format!("{field}: {why}"))
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(field, format!("must be a non-negative integer, got {v}"))),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("must be true or false, got {v}"))),
        }
    }

    fn str_is(&self, field: &str, allowed: &[&str]) -> Result<()> {
        match self.present(field) {
            None => Ok(()),
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
            Some(v) => Err(self.err(field, format!("{v} is not supported (liandan implements {allowed:?})"))),
        }
    }

    /// The field must be absent, null, or equal to `ok`.
    fn only(&self, field: &str, ok: &Value, why: &str) -> Result<()> {
        match self.present(field) {
            Some(v) if v != ok => Err(self.err(field, format!("{v} is not supported: {why}"))),
            _ => Ok(()),
        }
    }
}

fn gpt2(f: &Fields<'_>) -> Result<GptConfig> {
    f.str_is("activation_function", &["gelu_new"])?;
    let eps = f.f64_or("layer_norm_epsilon", 1e-5)?;
    if eps != 1e-5 {
        return Err(f.err("layer_norm_epsilon", format!("{eps} is not supported: liandan's GPT-2 LayerNorm uses 1e-5")));
    }
    if !f.bool_or("tie_word_embeddings", true)? {
        return Err(f.err("tie_word_embeddings", "false is not supported for gpt2 (its LM head is the token embedding)"));
    }
    let n_positions = f.usize("n_positions")?;
    Ok(GptConfig::new(f.usize("vocab_size")?, n_positions, f.usize("n_layer")?, f.usize("n_head")?, f.usize("n_embd")?))
}

fn llama(f: &Fields<'_>, arch: Arch) -> Result<GptConfig> {
    f.str_is("hidden_act", &["silu"])?;
    // transformers 4 writes `rope_theta` (and `rope_scaling` when scaled); transformers 5
    // writes `rope_parameters {rope_type, rope_theta, ...}`. Only the default type is supported.
    let mut theta = f.f64_or("rope_theta", DEFAULT_ROPE_THETA)?;
    for field in ["rope_scaling", "rope_parameters"] {
        let Some(v) = f.present(field) else { continue };
        let o = v.as_object().ok_or_else(|| f.err(field, format!("{v} is not an object")))?;
        let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(Value::as_str).unwrap_or("default");
        let extra: Vec<&String> = o.keys().filter(|k| !["rope_type", "type", "rope_theta"].contains(&k.as_str())).collect();
        if kind != "default" || !extra.is_empty() {
            return Err(f.err(field, format!("{v} is not supported: liandan implements plain rotary embeddings (rope_type default; no linear, dynamic, yarn or llama3 scaling)")));
        }
        if let Some(t) = o.get("rope_theta") {
            theta = t.as_f64().ok_or_else(|| f.err(&format!("{field}.rope_theta"), format!("must be a number, got {t}")))?;
        }
    }
    if let Some(Value::Array(types)) = f.present("layer_types")
        && let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention"))
    {
        return Err(f.err("layer_types", format!("{t} is not supported: liandan attends to the whole context in every layer")));
    }
    f.only("mlp_bias", &Value::Bool(false), "liandan's SwiGLU MLP has no biases")?;
    let heads = f.usize("num_attention_heads")?;
    let hidden = f.usize("hidden_size")?;
    if let Some(hd) = f.opt_usize("head_dim")?
        && heads > 0
        && hd * heads != hidden
    {
        return Err(f.err("head_dim", format!("{hd} is not supported: liandan needs head_dim = hidden_size / num_attention_heads = {hidden} / {heads}")));
    }
    let attention_bias = match arch {
        // Qwen2 always has q/k/v biases and none on the output projection.
        Arch::Qwen2 => {
            if f.bool_or("use_sliding_window", false)? {
                return Err(f.err("use_sliding_window", "true is not supported: liandan attends to the whole context"));
            }
            true
        }
        _ => {
            // LlamaConfig.attention_bias also puts a bias on o_proj, which liandan does not have.
            f.only("attention_bias", &Value::Bool(false), "a Llama attention bias includes o_proj's, which liandan does not implement (Qwen2's q/k/v bias is supported)")?;
            false
        }
    };
    let mut cfg = GptConfig::llama(
        f.usize("vocab_size")?,
        f.usize("max_position_embeddings")?,
        f.usize("num_hidden_layers")?,
        heads,
        f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        hidden,
        f.usize("intermediate_size")?,
    );
    cfg.rope_theta = theta;
    cfg.rms_norm_eps = f.f64_or("rms_norm_eps", DEFAULT_RMS_NORM_EPS)?;
    cfg.tie_word_embeddings = f.bool_or("tie_word_embeddings", false)?;
    cfg.attention_bias = attention_bias;
    Ok(cfg)
}

/// `config.json` for a llama-family config: `Qwen2ForCausalLM` with q/k/v biases, else
/// `LlamaForCausalLM`. Token ids are left to `generation_config.json` and the tokenizer files.
pub fn llama_config_json(cfg: &GptConfig) -> Value {
    debug_assert_eq!(cfg.family, Family::Llama);
    let mut v = serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads(),
        "max_position_embeddings": cfg.n_positions,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": "float32"
    });
    let extra = if cfg.attention_bias {
        serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": false, "sliding_window": null, "max_window_layers": cfg.n_layer})
    } else {
        serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": false, "mlp_bias": false, "head_dim": cfg.head_size(), "pretraining_tp": 1})
    };
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> Value {
        serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true, "use_sliding_window": false, "rope_scaling": null})
    }

    fn err(v: &Value) -> String {
        from_hf_config(Path::new("m/config.json"), v).unwrap_err().to_string()
    }

    #[test]
    fn qwen2_reads_and_round_trips() {
        let (arch, cfg) = from_hf_config(Path::new("config.json"), &qwen()).unwrap();
        assert_eq!(arch, Arch::Qwen2);
        assert_eq!((cfg.family, cfg.kv_heads(), cfg.intermediate_size, cfg.attention_bias, cfg.tie_word_embeddings), (Family::Llama, 2, 64, true, true));
        assert_eq!(cfg.rope_theta, 1e6);
        let (_, again) = from_hf_config(Path::new("config.json"), &llama_config_json(&cfg)).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let mut v = qwen();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let m = err(&v);
        assert!(m.contains("m/config.json") && m.contains("rope_scaling"), "{m}");
        let mut v = qwen();
        v["use_sliding_window"] = Value::Bool(true);
        assert!(err(&v).contains("use_sliding_window"));
        let mut v = qwen();
        v["model_type"] = "mixtral".into();
        v["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
        let m = err(&v);
        assert!(m.contains("model_type") && m.contains("mixtral"), "{m}");
        let mut v = qwen();
        v["num_key_value_heads"] = 3.into();
        let m = err(&v);
        assert!(m.contains("n_kv_head (3) must divide n_head (4)"), "{m}");
        let mut v = qwen();
        v["model_type"] = "llama".into();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["attention_bias"] = Value::Bool(true);
        assert!(err(&v).contains("attention_bias"));
        let mut v = qwen();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(&v).contains("hidden_size: missing"));
    }
}
