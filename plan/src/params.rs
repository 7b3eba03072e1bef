//! The parameter layout: every tensor of the model lives in one flat `f32` buffer (the same
//! layout for parameters, gradients and both AdamW moments), so the optimizer, clipping and
//! all-reduce see one contiguous slice.
//!
//! # Layout
//! - gpt2: all sixteen GPT-2 kinds below, in declaration order (no [`ParamKind::LmHead`]).
//! - llama: `Wte`, `Ln1W` (RMSNorm), `QkvW` `(C, (NH+2·NKV)·hs)` with Q, K, V column blocks,
//!   `QkvB` (only with `attention_bias`), `AttProjW`, `Ln2W` (RMSNorm), `FcW` `(C, 2I)` with the
//!   gate then the up projection, `FcProjW` `(I, C)`, `LnfW`, `LmHead` (only untied). Kinds a
//!   family lacks have an empty range.
//!
//! Matrices are `(in, out)` like GPT-2's Conv1D; Hugging Face Llama `Linear` weights are
//! `(out, in)` and are transposed by [`crate::hf::weights`].

use crate::config::{Family, GptConfig};

/// The parameter tensors, in buffer order. Per-layer kinds hold all `L` layers back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `(Vp, C)` token embedding, tied with the LM head.
    Wte,
    /// `(maxT, C)` position embedding.
    Wpe,
    /// `(L, C)` first LayerNorm weight.
    Ln1W,
    /// `(L, C)` first LayerNorm bias.
    Ln1B,
    /// `(L, C, 3C)` attention input projection (query, key, value), `(in, out)`.
    QkvW,
    /// `(L, 3C)`.
    QkvB,
    /// `(L, C, C)` attention output projection.
    AttProjW,
    /// `(L, C)`.
    AttProjB,
    /// `(L, C)` second LayerNorm weight.
    Ln2W,
    /// `(L, C)`.
    Ln2B,
    /// `(L, C, 4C)` MLP up projection.
    FcW,
    /// `(L, 4C)`.
    FcB,
    /// `(L, 4C, C)` MLP down projection.
    FcProjW,
    /// `(L, C)`.
    FcProjB,
    /// `(C)` final LayerNorm weight.
    LnfW,
    /// `(C)`.
    LnfB,
    /// `(Vp, C)` untied LM head (llama only).
    LmHead,
}

/// Number of [`ParamKind`]s.
const KINDS: usize = 17;

impl ParamKind {
    pub const ALL: [ParamKind; KINDS] = [
        ParamKind::Wte,
        ParamKind::Wpe,
        ParamKind::Ln1W,
        ParamKind::Ln1B,
        ParamKind::QkvW,
        ParamKind::QkvB,
        ParamKind::AttProjW,
        ParamKind::AttProjB,
        ParamKind::Ln2W,
        ParamKind::Ln2B,
        ParamKind::FcW,
        ParamKind::FcB,
        ParamKind::FcProjW,
        ParamKind::FcProjB,
        ParamKind::LnfW,
        ParamKind::LnfB,
        ParamKind::LmHead,
    ];

    /// Whether the family's layout holds this kind.
    pub fn present(self, cfg: &GptConfig) -> bool {
        match cfg.family {
            Family::Gpt2 => self != ParamKind::LmHead,
            Family::Llama => match self {
                ParamKind::Wte | ParamKind::Ln1W | ParamKind::QkvW | ParamKind::AttProjW | ParamKind::Ln2W | ParamKind::FcW | ParamKind::FcProjW | ParamKind::LnfW => true,
                ParamKind::QkvB => cfg.attention_bias,
                ParamKind::LmHead => !cfg.tie_word_embeddings,
                _ => false,
            },
        }
    }

    /// Whether the tensor holds one slice per layer.
    pub fn per_layer(self) -> bool {
        !matches!(self, ParamKind::Wte | ParamKind::Wpe | ParamKind::LnfW | ParamKind::LnfB | ParamKind::LmHead)
    }

    /// AdamW's decoupled weight decay applies to matrices and embeddings, not to biases or
    /// LayerNorm parameters (as in nanoGPT and llm.c).
    pub fn decays(self) -> bool {
        matches!(self, ParamKind::Wte | ParamKind::Wpe | ParamKind::QkvW | ParamKind::AttProjW | ParamKind::FcW | ParamKind::FcProjW | ParamKind::LmHead)
    }

    /// Shape of one slice (one layer's, for per-layer kinds).
    pub fn shape(self, cfg: &GptConfig) -> Vec<usize> {
        let c = cfg.n_embd;
        if cfg.family == Family::Llama {
            match self {
                ParamKind::QkvW => return vec![c, cfg.qkv_dim()],
                ParamKind::QkvB => return vec![cfg.qkv_dim()],
                ParamKind::FcW => return vec![c, 2 * cfg.mlp_dim()],
                ParamKind::FcProjW => return vec![cfg.mlp_dim(), c],
                _ => {}
            }
        }
        match self {
            ParamKind::Wte | ParamKind::LmHead => vec![cfg.padded_vocab_size, c],
            ParamKind::Wpe => vec![cfg.n_positions, c],
            ParamKind::Ln1W | ParamKind::Ln1B | ParamKind::Ln2W | ParamKind::Ln2B => vec![c],
            ParamKind::AttProjB | ParamKind::FcProjB | ParamKind::LnfW | ParamKind::LnfB => vec![c],
            ParamKind::QkvW => vec![c, 3 * c],
            ParamKind::QkvB => vec![3 * c],
            ParamKind::AttProjW => vec![c, c],
            ParamKind::FcW => vec![c, 4 * c],
            ParamKind::FcB => vec![4 * c],
            ParamKind::FcProjW => vec![4 * c, c],
        }
    }

    /// The Hugging Face `GPT2LMHeadModel` state-dict name of layer `layer`'s slice (gpt2 kinds;
    /// llama tensors are named by [`crate::hf::weights`], which also splits the fused ones).
    pub fn hf_name(self, layer: usize) -> String {
        let leaf = match self {
            ParamKind::LmHead => return "lm_head.weight".into(),
            ParamKind::Wte => return "transformer.wte.weight".into(),
            ParamKind::Wpe => return "transformer.wpe.weight".into(),
            ParamKind::LnfW => return "transformer.ln_f.weight".into(),
            ParamKind::LnfB => return "transformer.ln_f.bias".into(),
            ParamKind::Ln1W => "ln_1.weight",
            ParamKind::Ln1B => "ln_1.bias",
            ParamKind::QkvW => "attn.c_attn.weight",
            ParamKind::QkvB => "attn.c_attn.bias",
            ParamKind::AttProjW => "attn.c_proj.weight",
            ParamKind::AttProjB => "attn.c_proj.bias",
            ParamKind::Ln2W => "ln_2.weight",
            ParamKind::Ln2B => "ln_2.bias",
            ParamKind::FcW => "mlp.c_fc.weight",
            ParamKind::FcB => "mlp.c_fc.bias",
            ParamKind::FcProjW => "mlp.c_proj.weight",
            ParamKind::FcProjB => "mlp.c_proj.bias",
        };
        format!("transformer.h.{layer}.{leaf}")
    }
}

/// Offsets of every tensor in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    offsets: [usize; KINDS],
    sizes: [usize; KINDS],
    layers: usize,
    total: usize,
}

/// One named slice of the layout, as a checkpoint sees it.
#[derive(Debug, Clone)]
pub struct NamedSlice {
    pub kind: ParamKind,
    pub layer: usize,
    /// Offset and length in the flat buffer.
    pub offset: usize,
    pub len: usize,
    pub shape: Vec<usize>,
}

impl ParamLayout {
    pub fn new(cfg: &GptConfig) -> Self {
        let mut offsets = [0; KINDS];
        let mut sizes = [0; KINDS];
        let mut total = 0;
        for (i, kind) in ParamKind::ALL.iter().enumerate() {
            if !kind.present(cfg) {
                offsets[i] = total;
                continue;
            }
            let one: usize = kind.shape(cfg).iter().product();
            let n = if kind.per_layer() { one * cfg.n_layer } else { one };
            offsets[i] = total;
            sizes[i] = n;
            total += n;
        }
        ParamLayout { offsets, sizes, layers: cfg.n_layer, total }
    }

    /// Total number of floats.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The whole range of `kind` (all layers).
    pub fn range(&self, kind: ParamKind) -> std::ops::Range<usize> {
        let i = kind as usize;
        self.offsets[i]..self.offsets[i] + self.sizes[i]
    }

    /// The range of layer `layer`'s slice of a per-layer kind (or the whole tensor otherwise).
    pub fn layer_range(&self, kind: ParamKind, layer: usize) -> std::ops::Range<usize> {
        let r = self.range(kind);
        if !kind.per_layer() {
            return r;
        }
        let one = r.len() / self.layers;
        r.start + layer * one..r.start + (layer + 1) * one
    }

    /// Gradient buckets: `0..layers` are the layers, each its per-layer slices (final once
    /// that layer's backward is done), and [`buckets`](Self::buckets)` - 1` is the tensors
    /// outside the layers (embeddings, the last norm, the head: final at the end of the
    /// backward). Together they cover the buffer once. Empty slices are left out.
    pub fn bucket(&self, slot: usize) -> Vec<std::ops::Range<usize>> {
        let in_layer = slot < self.layers;
        ParamKind::ALL
            .into_iter()
            .filter(|k| k.per_layer() == in_layer)
            .map(|k| if in_layer { self.layer_range(k, slot) } else { self.range(k) })
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// The number of gradient buckets: one per layer and one for the rest ([`bucket`](Self::bucket)).
    pub fn buckets(&self) -> usize {
        self.layers + 1
    }

    /// Every slice with its Hugging Face name, in buffer order.
    pub fn named_slices(&self, cfg: &GptConfig) -> Vec<NamedSlice> {
        let mut out = Vec::new();
        for kind in ParamKind::ALL.into_iter().filter(|k| k.present(cfg)) {
            let layers = if kind.per_layer() { cfg.n_layer } else { 1 };
            for layer in 0..layers {
                let r = self.layer_range(kind, layer);
                out.push(NamedSlice { kind, layer, offset: r.start, len: r.len(), shape: kind.shape(cfg) });
            }
        }
        out
    }

    /// A slice of a flat buffer with this layout.
    pub fn get<'a>(&self, buf: &'a [f32], kind: ParamKind, layer: usize) -> &'a [f32] {
        &buf[self.layer_range(kind, layer)]
    }

    /// A mutable slice of a flat buffer with this layout.
    pub fn get_mut<'a>(&self, buf: &'a mut [f32], kind: ParamKind, layer: usize) -> &'a mut [f32] {
        &mut buf[self.layer_range(kind, layer)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_the_parameter_count_without_gaps() {
        let cfg = GptConfig::new(100, 32, 3, 4, 32);
        let layout = ParamLayout::new(&cfg);
        assert_eq!(layout.len(), cfg.num_parameters());
        let mut next = 0;
        for s in layout.named_slices(&cfg) {
            assert_eq!(s.offset, next, "{}", s.kind.hf_name(s.layer));
            assert_eq!(s.len, s.shape.iter().product::<usize>());
            next += s.len;
        }
        assert_eq!(next, layout.len());
    }

    #[test]
    fn gradient_buckets_cover_the_buffer_once() {
        for cfg in [GptConfig::new(100, 32, 3, 4, 32), GptConfig::new(50, 16, 1, 2, 16)] {
            let layout = ParamLayout::new(&cfg);
            let mut seen = vec![0u8; layout.len()];
            for slot in 0..layout.buckets() {
                for r in layout.bucket(slot) {
                    seen[r].iter_mut().for_each(|s| *s += 1);
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "every parameter in exactly one bucket");
            // A layer's bucket is exactly its named slices.
            let want: usize = layout.named_slices(&cfg).iter().filter(|s| s.kind.per_layer() && s.layer == 1 % cfg.n_layer).map(|s| s.len).sum();
            assert_eq!(layout.bucket(1 % cfg.n_layer).iter().map(|r| r.len()).sum::<usize>(), want);
        }
    }

    #[test]
    fn llama_layouts_cover_the_parameter_count() {
        for (bias, tied) in [(false, false), (true, true), (true, false)] {
            let mut cfg = GptConfig::llama(100, 32, 3, 4, 2, 32, 48);
            cfg.attention_bias = bias;
            cfg.tie_word_embeddings = tied;
            cfg.validate().unwrap();
            let layout = ParamLayout::new(&cfg);
            assert_eq!(layout.len(), cfg.num_parameters());
            let total: usize = layout.named_slices(&cfg).iter().map(|s| s.len).sum();
            assert_eq!(total, layout.len());
            assert_eq!(layout.range(ParamKind::QkvB).len(), if bias { 3 * 64 } else { 0 });
            assert_eq!(layout.range(ParamKind::LmHead).len(), if tied { 0 } else { 128 * 32 });
            assert!(layout.range(ParamKind::Wpe).is_empty());
        }
    }
}
