//! The model configuration and its validation.

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

/// The architecture a config describes.
///
/// - `gpt2`: LayerNorm, learned position embeddings, GELU MLP, biases everywhere, tied LM head.
/// - `llama`: Llama 2/3 and Qwen2/2.5: RMSNorm, rotary position embeddings, SwiGLU MLP,
///   grouped-query attention, no biases except the optional q/k/v bias (Qwen2), tied or untied
///   LM head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Gpt2,
    Llama,
}

impl Family {
    fn is_gpt2(&self) -> bool {
        *self == Family::Gpt2
    }
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}
fn is_false(x: &bool) -> bool {
    !*x
}
fn is_true(x: &bool) -> bool {
    *x
}
fn yes() -> bool {
    true
}
/// Llama's and Qwen2's default base of the rotary frequencies.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;
/// Llama's and Qwen2's default RMSNorm epsilon.
pub const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
fn default_rope_theta() -> f64 {
    DEFAULT_ROPE_THETA
}
fn default_rms_norm_eps() -> f64 {
    DEFAULT_RMS_NORM_EPS
}
fn is_default_rope_theta(x: &f64) -> bool {
    *x == DEFAULT_ROPE_THETA
}
fn is_default_rms_norm_eps(x: &f64) -> bool {
    *x == DEFAULT_RMS_NORM_EPS
}

/// Shape of a model. Field names follow Hugging Face's `GPT2Config` (and `LlamaConfig` for the
/// Llama fields) where one exists.
///
/// The Llama fields have defaults and are not written when they hold them, so a GPT-2 config
/// serialises exactly as before the family existed (old `state.json` files keep their checksums).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// The architecture; `gpt2` when absent.
    #[serde(default, skip_serializing_if = "Family::is_gpt2")]
    pub family: Family,
    /// `V`: number of real tokens (the tokenizer's vocabulary).
    pub vocab_size: usize,
    /// `Vp`: rows of the embedding table, `>= vocab_size`; the extra rows are zero padding so the
    /// LM-head matmul has a friendly width. Logits of padded columns are never used.
    pub padded_vocab_size: usize,
    /// `maxT`: the context length (rows of the position embedding).
    pub n_positions: usize,
    /// `L`: transformer blocks.
    pub n_layer: usize,
    /// `NH`: attention heads per block.
    pub n_head: usize,
    /// `C`: channels of the residual stream; must divide evenly by `n_head`.
    pub n_embd: usize,
    /// `NKV` (llama): key/value heads of grouped-query attention; divides `n_head`. 0 (the
    /// default, and the only value for gpt2) means `n_head`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n_kv_head: usize,
    /// `I` (llama): width of the SwiGLU MLP's hidden layer. 0 for gpt2 (whose MLP is `4C`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub intermediate_size: usize,
    /// `θ` (llama): base of the rotary frequencies `θ^(-2i/hs)`.
    #[serde(default = "default_rope_theta", skip_serializing_if = "is_default_rope_theta")]
    pub rope_theta: f64,
    /// (llama) epsilon inside RMSNorm's square root.
    #[serde(default = "default_rms_norm_eps", skip_serializing_if = "is_default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Whether the LM head is the token embedding (always for gpt2; llama models may have a
    /// separate `lm_head`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub tie_word_embeddings: bool,
    /// (llama) biases on the query, key and value projections (Qwen2); never on the output
    /// projection or the MLP.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
}

/// Largest value any size field may take: keeps products like `Vp·C` and `B·NH·T·T` far from
/// overflowing `usize` and catches typos (a stray zero or two) before allocating.
const MAX_DIM: usize = 1 << 20;

/// The names [`GptConfig::preset`] knows.
pub const PRESETS: [&str; 5] = ["nano", "tiny", "small-256", "gpt2", "qwen2.5-0.5b"];

/// Most parameters a config may declare (2^40, about 1.1 trillion): every product of sizes the
/// engine computes stays far from overflowing, whatever a config file says.
pub const MAX_PARAMS: u64 = 1 << 40;

impl GptConfig {
    /// A config with `padded_vocab_size` rounded up to a multiple of 128 (as llm.c does).
    pub fn new(vocab_size: usize, n_positions: usize, n_layer: usize, n_head: usize, n_embd: usize) -> Self {
        GptConfig {
            family: Family::Gpt2,
            vocab_size,
            padded_vocab_size: vocab_size.div_ceil(128) * 128,
            n_positions,
            n_layer,
            n_head,
            n_embd,
            n_kv_head: 0,
            intermediate_size: 0,
            rope_theta: DEFAULT_ROPE_THETA,
            rms_norm_eps: DEFAULT_RMS_NORM_EPS,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    /// A llama-family config (untied, no biases, default θ and epsilon; set those fields after).
    pub fn llama(vocab_size: usize, n_positions: usize, n_layer: usize, n_head: usize, n_kv_head: usize, n_embd: usize, intermediate_size: usize) -> Self {
        GptConfig { family: Family::Llama, n_kv_head, intermediate_size, tie_word_embeddings: false, ..GptConfig::new(vocab_size, n_positions, n_layer, n_head, n_embd) }
    }

    /// `NKV`: key/value heads (`n_head` unless grouped-query attention says fewer).
    pub fn kv_heads(&self) -> usize {
        if self.n_kv_head == 0 { self.n_head } else { self.n_kv_head }
    }

    /// Width of the fused query/key/value projection: `C` for gpt2 (each of three), and
    /// `(NH + 2·NKV)·hs` for llama.
    pub fn qkv_dim(&self) -> usize {
        match self.family {
            Family::Gpt2 => 3 * self.n_embd,
            Family::Llama => (self.n_head + 2 * self.kv_heads()) * self.head_size(),
        }
    }

    /// Width of the MLP's hidden layer: `4C` (gpt2) or `I` (llama).
    pub fn mlp_dim(&self) -> usize {
        match self.family {
            Family::Gpt2 => 4 * self.n_embd,
            Family::Llama => self.intermediate_size,
        }
    }

    /// Named presets. `vocab_size` comes from the tokenizer in use.
    ///
    /// | name        | L  | C   | NH | maxT |
    /// |-------------|----|-----|----|------|
    /// | `nano`      | 4  | 128 | 4  | 128  |
    /// | `tiny`      | 4  | 256 | 4  | 256  |
    /// | `small-256` | 12 | 768 | 12 | 256  |
    /// | `gpt2`      | 12 | 768 | 12 | 1024 |
    /// | `qwen2.5-0.5b` (llama family, NKV 2, I 4864) | 24 | 896 | 14 | 32768 |
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let cfg = match name {
            "nano" => GptConfig::new(vocab_size, 128, 4, 4, 128),
            "tiny" => GptConfig::new(vocab_size, 256, 4, 4, 256),
            "small-256" => GptConfig::new(vocab_size, 256, 12, 12, 768),
            "gpt2" => GptConfig::new(vocab_size, 1024, 12, 12, 768),
            // Qwen2.5-0.5B's shape, from its config.json: 24 blocks, C = 896, 14 query heads
            // over 2 key/value heads (hs = 64), I = 4864, q/k/v biases, tied head, θ = 1e6,
            // a 32768-token context. Its own vocabulary is 151936.
            "qwen2.5-0.5b" => GptConfig { rope_theta: 1e6, tie_word_embeddings: true, attention_bias: true, ..GptConfig::llama(vocab_size, 32768, 24, 14, 2, 896, 4864) },
            other => {
                return Err(PlanError::InvalidConfig { field: "model", reason: format!("unknown preset '{other}' (known: {})", PRESETS.join(", ")) });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the error names the field and the numbers.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("vocab_size", self.vocab_size),
            ("padded_vocab_size", self.padded_vocab_size),
            ("n_positions", self.n_positions),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ];
        for (field, value) in fields {
            if value == 0 || value > MAX_DIM {
                return Err(PlanError::InvalidConfig { field, reason: format!("must be in 1..={MAX_DIM}, got {value}") });
            }
        }
        if self.padded_vocab_size < self.vocab_size {
            return Err(PlanError::InvalidConfig { field: "padded_vocab_size", reason: format!("must be >= vocab_size ({}), got {}", self.vocab_size, self.padded_vocab_size) });
        }
        match self.checked_num_parameters() {
            Some(n) if n <= MAX_PARAMS => {}
            n => {
                return Err(PlanError::InvalidConfig {
                    field: "model",
                    reason: format!(
                        "{} parameters (n_layer {}, n_embd {}, vocab {}) is more than the {MAX_PARAMS} this trainer allocates",
                        n.map_or_else(|| "over 2^64".to_string(), |n| n.to_string()),
                        self.n_layer,
                        self.n_embd,
                        self.padded_vocab_size
                    ),
                });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(PlanError::InvalidConfig { field: "n_embd", reason: format!("n_embd ({}) must be divisible by n_head ({})", self.n_embd, self.n_head) });
        }
        match self.family {
            Family::Gpt2 => self.validate_gpt2_fields(),
            Family::Llama => self.validate_llama_fields(),
        }
    }

    /// A gpt2 config carries the Llama fields only at their defaults.
    fn validate_gpt2_fields(&self) -> Result<()> {
        let bad = |field: &'static str, got: String| Err(PlanError::InvalidConfig { field, reason: format!("is a llama-family field; a gpt2 model takes none, got {got}") });
        if self.n_kv_head != 0 && self.n_kv_head != self.n_head {
            return bad("n_kv_head", self.n_kv_head.to_string());
        }
        if self.intermediate_size != 0 {
            return bad("intermediate_size", self.intermediate_size.to_string());
        }
        if !self.tie_word_embeddings {
            return bad("tie_word_embeddings", "false".into());
        }
        if self.attention_bias {
            return bad("attention_bias", "true".into());
        }
        if self.rope_theta != DEFAULT_ROPE_THETA {
            return bad("rope_theta", self.rope_theta.to_string());
        }
        if self.rms_norm_eps != DEFAULT_RMS_NORM_EPS {
            return bad("rms_norm_eps", self.rms_norm_eps.to_string());
        }
        Ok(())
    }

    fn validate_llama_fields(&self) -> Result<()> {
        let nkv = self.kv_heads();
        if nkv > self.n_head || !self.n_head.is_multiple_of(nkv) {
            return Err(PlanError::InvalidConfig { field: "n_kv_head", reason: format!("n_kv_head ({nkv}) must divide n_head ({})", self.n_head) });
        }
        if self.intermediate_size == 0 || self.intermediate_size > MAX_DIM {
            return Err(PlanError::InvalidConfig { field: "intermediate_size", reason: format!("must be in 1..={MAX_DIM}, got {}", self.intermediate_size) });
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(PlanError::InvalidConfig {
                field: "n_embd",
                reason: format!("rotary embeddings rotate channel pairs: head size n_embd/n_head = {}/{} = {} must be even", self.n_embd, self.n_head, self.head_size()),
            });
        }
        if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
            return Err(PlanError::InvalidConfig { field: "rope_theta", reason: format!("must be finite and > 1, got {}", self.rope_theta) });
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(PlanError::InvalidConfig { field: "rms_norm_eps", reason: format!("must be in (0, 1), got {}", self.rms_norm_eps) });
        }
        Ok(())
    }

    /// `hs`: channels per head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters, counting the padded embedding rows (they exist in memory).
    ///
    /// Panics only for a config [`validate`](Self::validate) refuses (too many to count).
    pub fn num_parameters(&self) -> usize {
        // validate() caps the count at MAX_PARAMS, far below usize::MAX.
        self.checked_num_parameters().expect("a validated config's parameter count fits") as usize
    }

    /// [`num_parameters`](Self::num_parameters) computed without overflow: None when the count
    /// does not fit in a u64 (only a config that [`validate`](Self::validate) refuses).
    ///
    /// - gpt2: `Vp·C + maxT·C + L·(12C² + 13C) + 2C`
    /// - llama: `Vp·C·(1 + untied) + L·(C·Dqkv + bias·Dqkv + C² + 3·C·I + 2C) + C`, with
    ///   `Dqkv = (NH + 2·NKV)·hs`
    pub fn checked_num_parameters(&self) -> Option<u64> {
        let (c, l, vp) = (self.n_embd as u128, self.n_layer as u128, self.padded_vocab_size as u128);
        let n = match self.family {
            Family::Gpt2 => vp * c + (self.n_positions as u128) * c + l * (12 * c * c + 13 * c) + 2 * c,
            Family::Llama => {
                let hs = c / (self.n_head.max(1) as u128);
                let dqkv = (self.n_head as u128 + 2 * self.kv_heads() as u128) * hs;
                let i = self.intermediate_size as u128;
                let head = if self.tie_word_embeddings { 0 } else { vp * c };
                let bias = if self.attention_bias { dqkv } else { 0 };
                vp * c + head + l * (c * dqkv + bias + c * c + 3 * c * i + 2 * c) + c
            }
        };
        u64::try_from(n).ok()
    }

    /// Parameters a token actually uses in matmuls and embeddings, excluding padding: the `N` of
    /// the usual `6·N` FLOPs-per-token estimate.
    pub fn num_real_parameters(&self) -> usize {
        let tables = if self.family == Family::Llama && !self.tie_word_embeddings { 2 } else { 1 };
        self.num_parameters() - tables * (self.padded_vocab_size - self.vocab_size) * self.n_embd
    }

    /// Training FLOPs per token at sequence length `t` (forward + backward), the estimate used
    /// by benchmarks:
    ///
    /// `6·N + 6·L·C·T`
    ///
    /// where `N` excludes the position embedding (a lookup, not a matmul) and the attention term
    /// counts `Q·Kᵀ` and `att·V` (2·2·C·T multiply-adds per token and layer forward, ×3 for
    /// forward + backward, halved for causality — the PaLM appendix B convention without the
    /// halving gives `12·L·C·T`; we count only the unmasked half, which is the work a causal
    /// kernel must do).
    /// For llama the lookup table excluded is the untied token embedding (none when tied).
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let lookup = match self.family {
            Family::Gpt2 => self.n_positions * self.n_embd,
            Family::Llama if self.tie_word_embeddings => 0,
            Family::Llama => self.vocab_size * self.n_embd,
        };
        let n = (self.num_real_parameters() - lookup) as f64;
        6.0 * n + 6.0 * (self.n_layer * self.n_embd * t) as f64
    }

    /// Serialises the config as Hugging Face's `config.json`: `GPT2LMHeadModel` for gpt2;
    /// for llama `Qwen2ForCausalLM` when the q/k/v projections have biases (Qwen2's layout;
    /// `LlamaConfig.attention_bias` would also put one on the output projection), else
    /// `LlamaForCausalLM`.
    pub fn to_hf_config_json(&self) -> serde_json::Value {
        if self.family == Family::Llama {
            return crate::hf::config::llama_config_json(self);
        }
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "bos_token_id": null,
            "eos_token_id": null,
            "torch_dtype": "float32"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_indivisible_heads_naming_the_numbers() {
        let cfg = GptConfig::new(256, 64, 2, 3, 100);
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("n_embd (100) must be divisible by n_head (3)"), "{msg}");
    }

    #[test]
    fn rejects_zero_and_small_padding() {
        let mut cfg = GptConfig::new(256, 64, 2, 4, 64);
        cfg.n_layer = 0;
        assert!(cfg.validate().unwrap_err().to_string().contains("n_layer"));
        let mut cfg = GptConfig::new(300, 64, 2, 4, 64);
        cfg.padded_vocab_size = 299;
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("padded_vocab_size") && msg.contains("300") && msg.contains("299"), "{msg}");
    }

    #[test]
    fn gpt2_small_has_124m_parameters() {
        let cfg = GptConfig::preset("gpt2", 50257).unwrap();
        assert_eq!(cfg.padded_vocab_size, 50304);
        // 124,439,808 is GPT-2 small's count with V=50257 (Hugging Face reports it).
        assert_eq!(cfg.num_real_parameters(), 124_439_808);
    }
}
