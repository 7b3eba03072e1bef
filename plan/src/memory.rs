//! How much memory a model needs on one rank, computed from the same shapes the allocations use
//! (and checked against them in tests), so a job that cannot fit is refused before it starts:
//! by the coordinator at submit, by the scheduler when it picks workers, and by a worker before
//! it allocates.

use serde::{Deserialize, Serialize};

use crate::config::{Family, GptConfig};

/// Bytes on one rank, by what holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Parameters (f32), every model the phase holds.
    pub weights: u64,
    /// Parameter gradients (f32).
    pub gradients: u64,
    /// Optimizer state (AdamW `m` and `v`, f32).
    pub optimizer: u64,
    /// Activations and activation gradients for the largest batch, and the token buffers.
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.gradients).saturating_add(self.optimizer).saturating_add(self.activations)
    }

    /// `self` plus `other` (None on overflow).
    pub fn plus(self, other: MemoryEstimate) -> Option<MemoryEstimate> {
        Some(MemoryEstimate {
            weights: self.weights.checked_add(other.weights)?,
            gradients: self.gradients.checked_add(other.gradients)?,
            optimizer: self.optimizer.checked_add(other.optimizer)?,
            activations: self.activations.checked_add(other.activations)?,
        })
    }
}

/// Floats of the worker's `model::acts::Activations` for batches up to `(b, t)`.
pub fn activation_floats(cfg: &GptConfig, b: usize, t: usize) -> Option<u128> {
    let (c, l, nh, vp) = (cfg.n_embd as u128, cfg.n_layer as u128, cfg.n_head as u128, cfg.padded_vocab_size as u128);
    let bt = (b as u128).checked_mul(t as u128)?;
    let att = l.checked_mul(b as u128)?.checked_mul(nh)?.checked_mul((t as u128).checked_mul(t as u128)?)?;
    // encoded, lnf, proj: bt·c; ln1, atty, residual2, ln2, residual3: l·bt·c; qkv: l·bt·3c;
    // fch, fch_gelu: l·bt·4c; the five LayerNorm statistics and the losses: bt or l·bt each.
    let per_c = bt.checked_mul(c)?;
    let total = per_c.checked_mul(3)?.checked_add(l.checked_mul(per_c)?.checked_mul(5 + 3 + 8)?)?.checked_add(att)?;
    total.checked_add(l.checked_mul(bt)?.checked_mul(4)?)?.checked_add(bt.checked_mul(3)?)?.checked_add(bt.checked_mul(vp)?)
}

/// Floats of the worker's `model::acts::GradActivations` for batches up to `(b, t)`.
pub fn grad_activation_floats(cfg: &GptConfig, b: usize, t: usize) -> Option<u128> {
    let (c, nh) = (cfg.n_embd as u128, cfg.n_head as u128);
    let bt = (b as u128).checked_mul(t as u128)?;
    // dresidual, dln, datty: bt·c; dqkv: bt·3c; dfch, dfch_gelu: bt·4c; datt: b·nh·t·t.
    bt.checked_mul(c)?.checked_mul(3 + 3 + 8)?.checked_add((b as u128).checked_mul(nh)?.checked_mul((t as u128).checked_mul(t as u128)?)?)
}

/// Floats of the worker's llama activations and their gradients (`LlamaActs`, `LlamaGrads`)
/// for batches up to `(b, t)` (None on overflow).
pub fn llama_activation_floats(cfg: &GptConfig, b: usize, t: usize) -> Option<(u128, u128)> {
    let (c, l, nh, vp) = (cfg.n_embd as u128, cfg.n_layer as u128, cfg.n_head as u128, cfg.padded_vocab_size as u128);
    let (d, i) = (cfg.qkv_dim() as u128, cfg.mlp_dim() as u128);
    let n = (b as u128).checked_mul(t as u128)?;
    let tt = (t as u128).checked_mul(t as u128)?;
    let att = (b as u128).checked_mul(nh)?.checked_mul(tt)?;
    // encoded, lnf, proj: n·c; lnf_rstd, losses: n; logits: n·vp. Per layer: ln1, atty,
    // residual2, ln2, residual3: n·c; two rstd: n; qkv: n·d; fch: n·2i; fch_act: n·i; att.
    let per_layer = n.checked_mul(c.checked_mul(5)?.checked_add(2)?.checked_add(d)?.checked_add(i.checked_mul(3)?)?)?.checked_add(att)?;
    let acts = n.checked_mul(c.checked_mul(3)?.checked_add(2)?.checked_add(vp)?)?.checked_add(l.checked_mul(per_layer)?)?;
    let grads = n.checked_mul(c.checked_mul(3)?.checked_add(d)?.checked_add(i.checked_mul(3)?)?)?.checked_add(att)?;
    Some((acts, grads))
}

/// One model (the worker's `Gpt`, or `Llama` for the llama family) allocated
/// for batches up to `(b, t)`: weights, gradients, activations; with `optimizer`, AdamW's two
/// moments too. None when the sizes overflow.
pub fn gpt(cfg: &GptConfig, b: usize, t: usize, optimizer: bool) -> Option<MemoryEstimate> {
    let params = cfg.checked_num_parameters()? as u128;
    let acts = match cfg.family {
        Family::Gpt2 => activation_floats(cfg, b, t)?.checked_add(grad_activation_floats(cfg, b, t)?)?,
        Family::Llama => {
            let (a, g) = llama_activation_floats(cfg, b, t)?;
            // The rotary table: cos and sin for maxT positions and hs/2 frequencies.
            let rope = (t as u128).checked_mul(cfg.head_size() as u128)?;
            a.checked_add(g)?.checked_add(rope)?
        }
    };
    let bytes = |floats: u128| floats.checked_mul(4).and_then(|x| u64::try_from(x).ok());
    // The input token buffer is b·t u32s.
    let tokens = (b as u128).checked_mul(t as u128)?;
    Some(MemoryEstimate {
        weights: bytes(params)?,
        gradients: bytes(params)?,
        optimizer: if optimizer { bytes(params.checked_mul(2)?)? } else { 0 },
        activations: bytes(acts.checked_add(tokens)?)?,
    })
}

/// Human-readable bytes (GiB, MiB, KiB).
pub fn show_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let x = b as f64;
    if x >= K * K * K {
        format!("{:.2} GiB", x / (K * K * K))
    } else if x >= K * K {
        format!("{:.1} MiB", x / (K * K))
    } else {
        format!("{:.1} KiB", x / K)
    }
}
