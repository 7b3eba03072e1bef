//! The model configuration and its validation.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Shape of a GPT-2 model. Field names follow Hugging Face's `GPT2Config` where one exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
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
}

/// Largest value any size field may take: keeps products like `Vp·C` and `B·NH·T·T` far from
/// overflowing `usize` and catches typos (a stray zero or two) before allocating.
const MAX_DIM: usize = 1 << 20;

/// Most parameters a config may declare (2^40, about 1.1 trillion): every product of sizes the
/// engine computes stays far from overflowing, whatever a config file says.
pub const MAX_PARAMS: u64 = 1 << 40;

impl GptConfig {
    /// A config with `padded_vocab_size` rounded up to a multiple of 128 (as llm.c does).
    pub fn new(vocab_size: usize, n_positions: usize, n_layer: usize, n_head: usize, n_embd: usize) -> Self {
        GptConfig { vocab_size, padded_vocab_size: vocab_size.div_ceil(128) * 128, n_positions, n_layer, n_head, n_embd }
    }

    /// Named presets. `vocab_size` comes from the tokenizer in use.
    ///
    /// | name        | L  | C   | NH | maxT |
    /// |-------------|----|-----|----|------|
    /// | `nano`      | 4  | 128 | 4  | 128  |
    /// | `tiny`      | 4  | 256 | 4  | 256  |
    /// | `small-256` | 12 | 768 | 12 | 256  |
    /// | `gpt2`      | 12 | 768 | 12 | 1024 |
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let (l, c, nh, t) = match name {
            "nano" => (4, 128, 4, 128),
            "tiny" => (4, 256, 4, 256),
            "small-256" => (12, 768, 12, 256),
            "gpt2" => (12, 768, 12, 1024),
            other => {
                return Err(EngineError::InvalidConfig { field: "model", reason: format!("unknown preset '{other}' (known: nano, tiny, small-256, gpt2)") });
            }
        };
        let cfg = GptConfig::new(vocab_size, t, l, nh, c);
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
                return Err(EngineError::InvalidConfig { field, reason: format!("must be in 1..={MAX_DIM}, got {value}") });
            }
        }
        if self.padded_vocab_size < self.vocab_size {
            return Err(EngineError::InvalidConfig { field: "padded_vocab_size", reason: format!("must be >= vocab_size ({}), got {}", self.vocab_size, self.padded_vocab_size) });
        }
        match self.checked_num_parameters() {
            Some(n) if n <= MAX_PARAMS => {}
            n => {
                return Err(EngineError::InvalidConfig {
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
            return Err(EngineError::InvalidConfig { field: "n_embd", reason: format!("n_embd ({}) must be divisible by n_head ({})", self.n_embd, self.n_head) });
        }
        Ok(())
    }

    /// `hs`: channels per head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters, counting the padded embedding rows (they exist in memory).
    pub fn num_parameters(&self) -> usize {
        let (c, l) = (self.n_embd, self.n_layer);
        self.padded_vocab_size * c + self.n_positions * c + l * (12 * c * c + 13 * c) + 2 * c
    }

    /// [`num_parameters`](Self::num_parameters) computed without overflow: None when the count
    /// does not fit in a u64 (only a config that [`validate`](Self::validate) refuses).
    pub fn checked_num_parameters(&self) -> Option<u64> {
        let (c, l) = (self.n_embd as u128, self.n_layer as u128);
        let n = (self.padded_vocab_size as u128) * c + (self.n_positions as u128) * c + l * (12 * c * c + 13 * c) + 2 * c;
        u64::try_from(n).ok()
    }

    /// Parameters a token actually uses in matmuls and embeddings, excluding padding: the `N` of
    /// the usual `6·N` FLOPs-per-token estimate.
    pub fn num_real_parameters(&self) -> usize {
        self.num_parameters() - (self.padded_vocab_size - self.vocab_size) * self.n_embd
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
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let n = (self.num_real_parameters() - self.n_positions * self.n_embd) as f64;
        6.0 * n + 6.0 * (self.n_layer * self.n_embd * t) as f64
    }

    /// Serialises the config as Hugging Face's `config.json` for `GPT2LMHeadModel`.
    pub fn to_hf_config_json(&self) -> serde_json::Value {
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
