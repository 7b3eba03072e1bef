//! The GPT-2 model on the CPU backend: parameters, gradients and activations in buffers
//! allocated once; forward, fused loss, backward.
//!
//! A training step is `zero_grad` → for each micro-batch (`forward` → `loss(.., true)` →
//! `backward`) → optimizer. Gradients accumulate across micro-batches; the loss denominator
//! passed to [`Gpt::loss`] makes the sum equal the full-batch gradient.

use crate::backend::cpu::attention::{attention_backward, attention_forward};
use crate::backend::cpu::crossentropy::{IGNORE_INDEX, softmax_crossentropy};
use crate::backend::cpu::encoder::{encoder_backward, encoder_forward};
use crate::backend::cpu::gelu::{gelu_backward, gelu_forward};
use crate::backend::cpu::layernorm::{layernorm_backward, layernorm_forward};
use crate::backend::cpu::matmul::{lm_head_backward, lm_head_forward, matmul_backward, matmul_forward};
use crate::backend::cpu::residual::residual_forward;
use crate::error::{EngineError, Result};
use crate::rng::Rng;

use super::acts::{Activations, GradActivations, layer, layer_mut};
use super::config::GptConfig;
use super::params::{ParamKind as K, ParamLayout};
use super::profile::{OpProfile, timed};

/// A GPT-2 model with its training buffers.
#[derive(Debug)]
pub struct Gpt {
    pub config: GptConfig,
    pub layout: ParamLayout,
    /// All parameters, flat, in [`ParamLayout`] order.
    pub params: Vec<f32>,
    /// Gradients, same layout; accumulated by `backward`, cleared by `zero_grad`.
    pub grads: Vec<f32>,
    pub(crate) acts: Activations,
    pub(crate) gacts: GradActivations,
    max_b: usize,
    max_t: usize,
    /// Tokens of the last forward, `(B, T)`, needed by the embedding backward.
    inputs: Vec<u32>,
    /// `(B, T)` of the last forward.
    shape: Option<(usize, usize)>,
    /// Set by `loss(.., with_grad = true)`: the logits buffer holds `dlogits`.
    dlogits_ready: bool,
    /// Per-op timings, when a benchmark asks for them.
    pub profile: Option<OpProfile>,
}

impl Gpt {
    /// A model with zeroed parameters and buffers for batches up to `max_b × max_t`.
    ///
    /// # Errors
    /// The config is invalid, or `max_t` exceeds `n_positions`.
    pub fn new(config: GptConfig, max_b: usize, max_t: usize) -> Result<Self> {
        config.validate()?;
        if max_b == 0 {
            return Err(EngineError::InvalidConfig { field: "batch_size", reason: "must be at least 1".into() });
        }
        if max_t == 0 || max_t > config.n_positions {
            return Err(EngineError::InvalidConfig { field: "seq_len", reason: format!("must be in 1..={} (n_positions), got {max_t}", config.n_positions) });
        }
        let layout = ParamLayout::new(&config);
        let n = layout.len();
        Ok(Gpt {
            acts: Activations::new(&config, max_b, max_t),
            gacts: GradActivations::new(&config, max_b, max_t),
            params: vec![0.0; n],
            grads: vec![0.0; n],
            layout,
            config,
            max_b,
            max_t,
            inputs: vec![0; max_b * max_t],
            shape: None,
            dlogits_ready: false,
            profile: None,
        })
    }

    /// GPT-2's initialisation: weights `N(0, 0.02)`, the two residual projections
    /// `N(0, 0.02/√(2L))`, biases 0, LayerNorm weights 1; padded embedding rows stay 0.
    pub fn init_weights(&mut self, rng: &mut Rng) {
        init_params(&self.config, &self.layout, &mut self.params, rng);
    }

    /// Largest `(B, T)` the buffers hold.
    pub fn max_batch(&self) -> (usize, usize) {
        (self.max_b, self.max_t)
    }

    pub fn zero_grad(&mut self) {
        self.grads.fill(0.0);
    }

    /// Forward pass of `inputs` `(B, T)`; the logits are then in [`Gpt::logits`].
    ///
    /// # Errors
    /// The batch does not fit the buffers, or a token is outside the vocabulary.
    pub fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 || b > self.max_b || t > self.max_t {
            return Err(EngineError::BatchTooLarge { b, t, max_b: self.max_b, max_t: self.max_t });
        }
        if inputs.len() != b * t {
            return Err(EngineError::BadLength { what: "inputs", expected: b * t, got: inputs.len() });
        }
        let v = self.config.vocab_size;
        if let Some((i, &tok)) = inputs.iter().enumerate().find(|(_, tok)| **tok as usize >= v) {
            return Err(EngineError::TokenOutOfRange { what: "inputs", position: i, token: tok as i64, vocab: v });
        }
        self.inputs[..b * t].copy_from_slice(inputs);
        self.shape = Some((b, t));
        self.dlogits_ready = false;
        let mut prof = self.profile.take();

        let cfg = &self.config;
        let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size);
        let n = b * t;
        let cap = self.max_b * self.max_t;
        let (pc, p1, p3, p4) = (cap * c, cap, cap * 3 * c, cap * 4 * c);
        let patt = self.max_b * nh * self.max_t * self.max_t;
        let (p, lay, a) = (&self.params, &self.layout, &mut self.acts);

        timed(&mut prof, "fwd.encoder", || encoder_forward(&mut a.encoded, inputs, lay.get(p, K::Wte, 0), lay.get(p, K::Wpe, 0), b, t, c, 0));
        for l in 0..cfg.n_layer {
            let res_in = if l == 0 { &a.encoded[..] } else { layer(&a.residual3, l - 1, pc) };
            let ln1 = layer_mut(&mut a.ln1, l, pc);
            timed(&mut prof, "fwd.layernorm", || {
                layernorm_forward(ln1, layer_mut(&mut a.ln1_mean, l, p1), layer_mut(&mut a.ln1_rstd, l, p1), res_in, lay.get(p, K::Ln1W, l), lay.get(p, K::Ln1B, l), n, c)
            });
            let qkv = layer_mut(&mut a.qkv, l, p3);
            timed(&mut prof, "fwd.matmul", || matmul_forward(qkv, ln1, lay.get(p, K::QkvW, l), Some(lay.get(p, K::QkvB, l)), n, c, 3 * c));
            let atty = layer_mut(&mut a.atty, l, pc);
            timed(&mut prof, "fwd.attention", || attention_forward(atty, layer_mut(&mut a.att, l, patt), qkv, b, t, c, nh));
            timed(&mut prof, "fwd.matmul", || matmul_forward(&mut a.proj, atty, lay.get(p, K::AttProjW, l), Some(lay.get(p, K::AttProjB, l)), n, c, c));
            let res2 = layer_mut(&mut a.residual2, l, pc);
            timed(&mut prof, "fwd.residual", || residual_forward(&mut res2[..n * c], &res_in[..n * c], &a.proj[..n * c]));
            let ln2 = layer_mut(&mut a.ln2, l, pc);
            timed(&mut prof, "fwd.layernorm", || {
                layernorm_forward(ln2, layer_mut(&mut a.ln2_mean, l, p1), layer_mut(&mut a.ln2_rstd, l, p1), res2, lay.get(p, K::Ln2W, l), lay.get(p, K::Ln2B, l), n, c)
            });
            let fch = layer_mut(&mut a.fch, l, p4);
            timed(&mut prof, "fwd.matmul", || matmul_forward(fch, ln2, lay.get(p, K::FcW, l), Some(lay.get(p, K::FcB, l)), n, c, 4 * c));
            let fch_gelu = layer_mut(&mut a.fch_gelu, l, p4);
            timed(&mut prof, "fwd.gelu", || gelu_forward(&mut fch_gelu[..n * 4 * c], &fch[..n * 4 * c]));
            timed(&mut prof, "fwd.matmul", || matmul_forward(&mut a.proj, fch_gelu, lay.get(p, K::FcProjW, l), Some(lay.get(p, K::FcProjB, l)), n, 4 * c, c));
            let res3 = layer_mut(&mut a.residual3, l, pc);
            timed(&mut prof, "fwd.residual", || residual_forward(&mut res3[..n * c], &res2[..n * c], &a.proj[..n * c]));
        }
        let last = layer(&a.residual3, cfg.n_layer - 1, pc);
        timed(&mut prof, "fwd.layernorm", || layernorm_forward(&mut a.lnf, &mut a.lnf_mean, &mut a.lnf_rstd, last, lay.get(p, K::LnfW, 0), lay.get(p, K::LnfB, 0), n, c));
        timed(&mut prof, "fwd.lm_head", || lm_head_forward(&mut a.logits, &a.lnf, lay.get(p, K::Wte, 0), n, c, vp));
        self.profile = prof;
        Ok(())
    }

    /// Logits of the last forward, `(B, T, Vp)`; columns `V..Vp` are padding. Meaningless after
    /// `loss(.., with_grad = true)`, which overwrites them with their gradient.
    pub fn logits(&self) -> &[f32] {
        let (b, t) = self.shape.unwrap_or((0, 0));
        &self.acts.logits[..b * t * self.config.padded_vocab_size]
    }

    /// Per-position cross-entropy of the last `loss` call, `(B, T)`.
    pub fn position_losses(&self) -> &[f32] {
        let (b, t) = self.shape.unwrap_or((0, 0));
        &self.acts.losses[..b * t]
    }

    /// The loss `Σ_i w_i·ce_i / denom` of the last forward (`w_i = 1` without weights; positions
    /// whose target is [`IGNORE_INDEX`] count nothing). With `with_grad`, also prepares
    /// `dloss/dlogits` for [`Gpt::backward`].
    ///
    /// Use [`loss_denominator`] over the whole global batch as `denom` so accumulated
    /// micro-batch gradients equal the full-batch gradient.
    ///
    /// # Errors
    /// No forward ran, lengths do not match `(B, T)`, a target is out of range, `denom <= 0`.
    pub fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        if self.dlogits_ready {
            // The logits were already turned into gradients by an earlier call.
            return Err(EngineError::NoForward);
        }
        validate_targets(targets, weights, b * t, self.config.vocab_size)?;
        if !(denom > 0.0 && denom.is_finite()) {
            return Err(EngineError::InvalidConfig { field: "loss denominator", reason: format!("must be positive and finite, got {denom}") });
        }
        let (v, vp) = (self.config.vocab_size, self.config.padded_vocab_size);
        let n = b * t;
        let mut prof = self.profile.take();
        timed(&mut prof, "loss.softmax_ce", || softmax_crossentropy(&mut self.acts.logits, &mut self.acts.losses, targets, weights, 1.0 / denom, n, v, vp, with_grad));
        let mut total = 0.0f64;
        for i in 0..n {
            if targets[i] != IGNORE_INDEX {
                total += weights.map_or(1.0, |w| w[i] as f64) * self.acts.losses[i] as f64;
            }
        }
        self.profile = prof;
        self.dlogits_ready = with_grad;
        Ok((total / denom as f64) as f32)
    }

    /// Backward pass of the last `forward` + `loss(.., with_grad = true)`; adds into `grads`.
    ///
    /// # Errors
    /// [`EngineError::NoForward`] if there is no loss gradient to propagate.
    pub fn backward(&mut self) -> Result<()> {
        if !self.dlogits_ready {
            return Err(EngineError::NoForward);
        }
        self.dlogits_ready = false;
        self.backward_impl(None)
    }

    /// The final hidden states of the last forward, `(B, T, C)` (after the last LayerNorm): what
    /// a scalar head (reward, value) reads.
    pub fn hidden(&self) -> &[f32] {
        let (b, t) = self.shape.unwrap_or((0, 0));
        &self.acts.lnf[..b * t * self.config.n_embd]
    }

    /// Backward from a gradient of the final hidden states, `dhidden` `(B, T, C)`, instead of from
    /// the LM head's logits (for reward and value heads); adds into `grads`.
    ///
    /// # Errors
    /// No forward ran, or `dhidden` has the wrong length.
    pub fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let n = b * t * self.config.n_embd;
        if dhidden.len() != n {
            return Err(EngineError::BadLength { what: "dhidden", expected: n, got: dhidden.len() });
        }
        self.dlogits_ready = false;
        self.backward_impl(Some(dhidden))
    }

    /// Backward from a gradient of the logits: `write` receives the logits of the last forward,
    /// `(B, T, Vp)`, and must overwrite them in place with `dloss/dlogits` (padding columns
    /// `V..Vp` zero); then the gradient flows back as from [`Gpt::loss`]. For losses the fused
    /// cross-entropy does not express (PPO's clipped surrogate). Adds into `grads`.
    ///
    /// # Errors
    /// No forward ran, or its logits were already consumed.
    pub fn backward_from_logits(&mut self, write: impl FnOnce(&mut [f32])) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        if self.dlogits_ready {
            return Err(EngineError::NoForward);
        }
        write(&mut self.acts.logits[..b * t * self.config.padded_vocab_size]);
        self.backward_impl(None)
    }

    fn backward_impl(&mut self, dhidden: Option<&[f32]>) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let mut prof = self.profile.take();
        let cfg = &self.config;
        let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size);
        let n = b * t;
        let cap = self.max_b * self.max_t;
        let (pc, p1, p3, p4) = (cap * c, cap, cap * 3 * c, cap * 4 * c);
        let patt = self.max_b * nh * self.max_t * self.max_t;
        let (p, lay, a, g) = (&self.params, &self.layout, &self.acts, &mut self.gacts);
        let grads = &mut self.grads;

        let dres = &mut g.dresidual[..n * c];
        dres.fill(0.0);
        match dhidden {
            Some(d) => g.dln[..n * c].copy_from_slice(d),
            None => timed(&mut prof, "bwd.lm_head", || lm_head_backward(&mut g.dln, lay.get_mut(grads, K::Wte, 0), &a.logits, &a.lnf, lay.get(p, K::Wte, 0), n, c, vp)),
        }
        {
            let (dw, db) = pair_mut(grads, lay, K::LnfW, K::LnfB, 0);
            let last = layer(&a.residual3, cfg.n_layer - 1, pc);
            timed(&mut prof, "bwd.layernorm", || layernorm_backward(dres, dw, db, &g.dln, last, lay.get(p, K::LnfW, 0), &a.lnf_mean, &a.lnf_rstd, n, c));
        }
        for l in (0..cfg.n_layer).rev() {
            let res_in = if l == 0 { &a.encoded[..] } else { layer(&a.residual3, l - 1, pc) };
            // MLP block: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))).
            let (dw, db) = pair_mut(grads, lay, K::FcProjW, K::FcProjB, l);
            timed(&mut prof, "bwd.matmul", || matmul_backward(&mut g.dfch_gelu, dw, Some(db), dres, layer(&a.fch_gelu, l, p4), lay.get(p, K::FcProjW, l), n, 4 * c, c));
            timed(&mut prof, "bwd.gelu", || gelu_backward(&mut g.dfch[..n * 4 * c], &layer(&a.fch, l, p4)[..n * 4 * c], &g.dfch_gelu[..n * 4 * c]));
            let (dw, db) = pair_mut(grads, lay, K::FcW, K::FcB, l);
            timed(&mut prof, "bwd.matmul", || matmul_backward(&mut g.dln, dw, Some(db), &g.dfch, layer(&a.ln2, l, pc), lay.get(p, K::FcW, l), n, c, 4 * c));
            let (dw, db) = pair_mut(grads, lay, K::Ln2W, K::Ln2B, l);
            timed(&mut prof, "bwd.layernorm", || {
                layernorm_backward(dres, dw, db, &g.dln, layer(&a.residual2, l, pc), lay.get(p, K::Ln2W, l), layer(&a.ln2_mean, l, p1), layer(&a.ln2_rstd, l, p1), n, c)
            });
            // Attention block: residual2 = res_in + attproj(attention(qkv(ln1(res_in)))).
            let (dw, db) = pair_mut(grads, lay, K::AttProjW, K::AttProjB, l);
            timed(&mut prof, "bwd.matmul", || matmul_backward(&mut g.datty, dw, Some(db), dres, layer(&a.atty, l, pc), lay.get(p, K::AttProjW, l), n, c, c));
            timed(&mut prof, "bwd.attention", || attention_backward(&mut g.dqkv, &mut g.datt, &g.datty, layer(&a.qkv, l, p3), layer(&a.att, l, patt), b, t, c, nh));
            let (dw, db) = pair_mut(grads, lay, K::QkvW, K::QkvB, l);
            timed(&mut prof, "bwd.matmul", || matmul_backward(&mut g.dln, dw, Some(db), &g.dqkv, layer(&a.ln1, l, pc), lay.get(p, K::QkvW, l), n, c, 3 * c));
            let (dw, db) = pair_mut(grads, lay, K::Ln1W, K::Ln1B, l);
            timed(&mut prof, "bwd.layernorm", || {
                layernorm_backward(dres, dw, db, &g.dln, res_in, lay.get(p, K::Ln1W, l), layer(&a.ln1_mean, l, p1), layer(&a.ln1_rstd, l, p1), n, c)
            });
        }
        let (dwte, dwpe) = pair_mut(grads, lay, K::Wte, K::Wpe, 0);
        timed(&mut prof, "bwd.encoder", || encoder_backward(dwte, dwpe, dres, &self.inputs[..n], b, t, c));
        self.profile = prof;
        Ok(())
    }
}

/// GPT-2's initialisation of a flat parameter buffer (see [`Gpt::init_weights`]); shared with
/// the CUDA backend, which initialises on the host and uploads, and with the llama family
/// (norm weights 1, q/k/v bias 0, matrices `N(0, 0.02)`, the output and down projections
/// `N(0, 0.02/√(2L))`; kinds a family lacks have empty ranges and draw nothing).
pub fn init_params(cfg: &GptConfig, layout: &ParamLayout, params: &mut [f32], rng: &mut Rng) {
    let resid_std = 0.02 / (2.0 * cfg.n_layer as f32).sqrt();
    for kind in K::ALL {
        let range = layout.range(kind);
        let p = &mut params[range];
        match kind {
            K::Ln1W | K::Ln2W | K::LnfW => p.fill(1.0),
            K::Ln1B | K::Ln2B | K::LnfB | K::QkvB | K::AttProjB | K::FcB | K::FcProjB => p.fill(0.0),
            // LmHead exists only in untied llama layouts (empty for gpt2: no draws).
            K::Wte | K::LmHead => {
                let real = (cfg.vocab_size * cfg.n_embd).min(p.len());
                p[..real].iter_mut().for_each(|x| *x = 0.02 * rng.normal());
                p[real..].fill(0.0);
            }
            K::AttProjW | K::FcProjW => p.iter_mut().for_each(|x| *x = resid_std * rng.normal()),
            K::Wpe | K::QkvW | K::FcW => p.iter_mut().for_each(|x| *x = 0.02 * rng.normal()),
        }
    }
}

/// The loss denominator for a set of micro-batches: the summed weights of positions whose target
/// is not ignored (their count without weights).
pub fn loss_denominator<'a>(batches: impl IntoIterator<Item = (&'a [i32], Option<&'a [f32]>)>) -> f32 {
    let mut total = 0.0f64;
    for (targets, weights) in batches {
        for (i, &tg) in targets.iter().enumerate() {
            if tg != IGNORE_INDEX {
                total += weights.map_or(1.0, |w| w[i] as f64);
            }
        }
    }
    total as f32
}

pub(crate) fn validate_targets(targets: &[i32], weights: Option<&[f32]>, n: usize, vocab: usize) -> Result<()> {
    if targets.len() != n {
        return Err(EngineError::BadLength { what: "targets", expected: n, got: targets.len() });
    }
    if let Some((i, &tg)) = targets.iter().enumerate().find(|(_, tg)| **tg != IGNORE_INDEX && (**tg < 0 || **tg as usize >= vocab)) {
        return Err(EngineError::TokenOutOfRange { what: "targets", position: i, token: tg as i64, vocab });
    }
    if let Some(w) = weights {
        if w.len() != n {
            return Err(EngineError::BadLength { what: "weights", expected: n, got: w.len() });
        }
        if let Some((i, x)) = w.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
            return Err(EngineError::InvalidConfig { field: "weights", reason: format!("weights[{i}] = {x}: must be finite and >= 0") });
        }
    }
    Ok(())
}

/// Two disjoint mutable slices of one flat buffer (a weight and its bias, or the two embeddings).
fn pair_mut<'a>(buf: &'a mut [f32], lay: &ParamLayout, a: K, b: K, l: usize) -> (&'a mut [f32], &'a mut [f32]) {
    let (ra, rb) = (lay.layer_range(a, l), lay.layer_range(b, l));
    // The layout orders every weight before its bias (and wte before wpe).
    assert!(ra.end <= rb.start, "pair_mut expects {a:?} before {b:?}");
    let (lo, hi) = buf.split_at_mut(rb.start);
    (&mut lo[ra], &mut hi[..rb.len()])
}
