//! Activations and activation gradients, allocated once for the largest batch the model serves.
//!
//! Per-layer buffers hold all `L` layers at a fixed stride of `maxB·maxT·width`, so a smaller
//! batch uses a prefix of each layer's slot.

use super::config::GptConfig;

/// Forward activations kept for the backward pass.
#[derive(Debug)]
pub struct Activations {
    /// `(B, T, C)` token + position embedding, the residual stream's start.
    pub encoded: Vec<f32>,
    /// `(L, B, T, C)` output of the first LayerNorm; `ln1_mean`/`ln1_rstd` are `(L, B, T)`.
    pub ln1: Vec<f32>,
    pub ln1_mean: Vec<f32>,
    pub ln1_rstd: Vec<f32>,
    /// `(L, B, T, 3C)` queries, keys and values.
    pub qkv: Vec<f32>,
    /// `(L, B, NH, T, T)` attention probabilities.
    pub att: Vec<f32>,
    /// `(L, B, T, C)` attention output before its projection.
    pub atty: Vec<f32>,
    /// `(L, B, T, C)` residual stream after the attention block.
    pub residual2: Vec<f32>,
    /// `(L, B, T, C)` output of the second LayerNorm; stats `(L, B, T)`.
    pub ln2: Vec<f32>,
    pub ln2_mean: Vec<f32>,
    pub ln2_rstd: Vec<f32>,
    /// `(L, B, T, 4C)` MLP hidden layer before and after GELU.
    pub fch: Vec<f32>,
    pub fch_gelu: Vec<f32>,
    /// `(L, B, T, C)` residual stream after the MLP block (the layer's output).
    pub residual3: Vec<f32>,
    /// `(B, T, C)` final LayerNorm output; stats `(B, T)`.
    pub lnf: Vec<f32>,
    pub lnf_mean: Vec<f32>,
    pub lnf_rstd: Vec<f32>,
    /// `(B, T, Vp)` logits; after `loss(.., with_grad = true)` they hold `dlogits` instead.
    pub logits: Vec<f32>,
    /// `(B, T)` per-position cross-entropy (unweighted; zero where the target is ignored).
    pub losses: Vec<f32>,
    /// `(B, T, C)` scratch: a projection's output before it joins the residual stream.
    pub proj: Vec<f32>,
}

/// Gradients of activations: one layer's worth, reused from the last layer down to the first.
#[derive(Debug)]
pub struct GradActivations {
    /// `(B, T, C)` gradient of the residual stream, flowing down through every layer.
    pub dresidual: Vec<f32>,
    /// `(B, T, C)` gradient of a LayerNorm's output.
    pub dln: Vec<f32>,
    /// `(B, T, 3C)`.
    pub dqkv: Vec<f32>,
    /// `(B, NH, T, T)` scratch for the attention backward.
    pub datt: Vec<f32>,
    /// `(B, T, C)`.
    pub datty: Vec<f32>,
    /// `(B, T, 4C)` each.
    pub dfch: Vec<f32>,
    pub dfch_gelu: Vec<f32>,
}

impl Activations {
    pub fn new(cfg: &GptConfig, max_b: usize, max_t: usize) -> Self {
        let (c, l, nh, vp) = (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.padded_vocab_size);
        let bt = max_b * max_t;
        let z = |n: usize| vec![0.0f32; n];
        Activations {
            encoded: z(bt * c),
            ln1: z(l * bt * c),
            ln1_mean: z(l * bt),
            ln1_rstd: z(l * bt),
            qkv: z(l * bt * 3 * c),
            att: z(l * max_b * nh * max_t * max_t),
            atty: z(l * bt * c),
            residual2: z(l * bt * c),
            ln2: z(l * bt * c),
            ln2_mean: z(l * bt),
            ln2_rstd: z(l * bt),
            fch: z(l * bt * 4 * c),
            fch_gelu: z(l * bt * 4 * c),
            residual3: z(l * bt * c),
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * vp),
            losses: z(bt),
            proj: z(bt * c),
        }
    }
}

impl GradActivations {
    pub fn new(cfg: &GptConfig, max_b: usize, max_t: usize) -> Self {
        let (c, nh) = (cfg.n_embd, cfg.n_head);
        let bt = max_b * max_t;
        let z = |n: usize| vec![0.0f32; n];
        GradActivations {
            dresidual: z(bt * c),
            dln: z(bt * c),
            dqkv: z(bt * 3 * c),
            datt: z(max_b * nh * max_t * max_t),
            datty: z(bt * c),
            dfch: z(bt * 4 * c),
            dfch_gelu: z(bt * 4 * c),
        }
    }
}

/// Layer `l`'s slot of a per-layer buffer whose layers are `per` floats apart.
pub fn layer(buf: &[f32], l: usize, per: usize) -> &[f32] {
    &buf[l * per..(l + 1) * per]
}

/// Mutable [`layer`].
pub fn layer_mut(buf: &mut [f32], l: usize, per: usize) -> &mut [f32] {
    &mut buf[l * per..(l + 1) * per]
}
