//! KV-cache generation on the device: the CPU's [`crate::generate::Generator`], op for op, with
//! the keys and values of every layer cached on the device. Each new token costs one pass of
//! one row through the blocks, attending to the cache; only the last row's logits come back to
//! the host, where [`crate::generate::sample`] picks the next token (the same sampler, so a seed
//! gives the same answer on every device up to the logits' rounding).

use crate::error::EngineError;
use crate::generate::{Generation, SamplingConfig, decode, sample};
use crate::model::params::ParamKind as K;

use super::device::DevBuf;
use super::error::Result;
use super::model::CudaGpt;
use super::ops::{self, Act, Bf16Scratch};

/// The cache and row buffers of one sequence, for up to `maxT` positions.
#[derive(Debug)]
pub struct CudaGenerator<'m> {
    model: &'m CudaGpt,
    /// `(L, maxT, C)` keys and values.
    k_cache: DevBuf<f32>,
    v_cache: DevBuf<f32>,
    /// Positions in the cache.
    len: usize,
    tokens: DevBuf<u32>,
    x: DevBuf<f32>,
    x2: DevBuf<f32>,
    ln: DevBuf<f32>,
    mean: DevBuf<f32>,
    rstd: DevBuf<f32>,
    qkv: DevBuf<f32>,
    atty: DevBuf<f32>,
    proj: DevBuf<f32>,
    fch: DevBuf<f32>,
    fch_gelu: DevBuf<f32>,
    logits: DevBuf<f32>,
    scratch_a: DevBuf<u16>,
    scratch_b: DevBuf<u16>,
    host_logits: Vec<f32>,
}

impl<'m> CudaGenerator<'m> {
    /// Buffers for one sequence of up to the model's context.
    ///
    /// # Errors
    /// The device is out of memory.
    pub fn new(model: &'m CudaGpt) -> Result<Self> {
        let cfg = &model.config;
        let (t, c, l, vp) = (cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size);
        let dev = &model.dev;
        let z = |n: usize| dev.alloc::<f32>(n);
        let scratch = match model.precision {
            super::Precision::Bf16 => t * (4 * c).max(vp),
            super::Precision::F32 => 1,
        };
        Ok(CudaGenerator {
            model,
            k_cache: z(l * t * c)?,
            v_cache: z(l * t * c)?,
            len: 0,
            tokens: dev.alloc::<u32>(t)?,
            x: z(t * c)?,
            x2: z(t * c)?,
            ln: z(t * c)?,
            mean: z(t)?,
            rstd: z(t)?,
            qkv: z(t * 3 * c)?,
            atty: z(t * c)?,
            proj: z(t * c)?,
            fch: z(t * 4 * c)?,
            fch_gelu: z(t * 4 * c)?,
            logits: z(vp)?,
            scratch_a: dev.alloc::<u16>(scratch)?,
            scratch_b: dev.alloc::<u16>(scratch)?,
            host_logits: vec![0.0; vp],
        })
    }

    /// Appends `tokens` and returns the logits `(V)` that follow the last one (the CPU's
    /// [`crate::generate::Generator::feed`]).
    ///
    /// # Errors
    /// No tokens, a token outside the vocabulary, the context would overflow, or a launch fails.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let m = self.model;
        let cfg = &m.config;
        let (c, nh, vp, v, maxt) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size, cfg.vocab_size, cfg.n_positions);
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::BadLength { what: "tokens to feed", expected: 1, got: 0 }.into());
        }
        if self.len + n > maxt {
            return Err(EngineError::InvalidConfig { field: "context", reason: format!("{} cached + {n} new tokens exceed n_positions = {maxt}", self.len) }.into());
        }
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= v) {
            return Err(EngineError::TokenOutOfRange { what: "tokens", position: i, token: tok as i64, vocab: v }.into());
        }
        let (dev, prec) = (&*m.dev, m.precision);
        let sc = Bf16Scratch { a: self.scratch_a.all(), b: self.scratch_b.all() };
        let pos0 = self.len;
        dev.upload(&self.tokens, 0, tokens)?;
        let (x, x2, ln) = (self.x.view(0, n * c), self.x2.view(0, n * c), self.ln.view(0, n * c));
        let (mean, rstd) = (self.mean.view(0, n), self.rstd.view(0, n));
        let (qkv, atty, proj) = (self.qkv.view(0, n * 3 * c), self.atty.view(0, n * c), self.proj.view(0, n * c));
        let (fch, fch_gelu) = (self.fch.view(0, n * 4 * c), self.fch_gelu.view(0, n * 4 * c));
        ops::encoder_forward(dev, x, self.tokens.view(0, n), m.p(K::Wte, 0), m.p(K::Wpe, 0), 1, n, c, pos0)?;
        // Layer 0's first LayerNorm stands alone; the later ones are fused with the residual
        // add before them, as in the training forward.
        ops::layernorm_forward(dev, Some(ln), None, mean, rstd, x, m.p(K::Ln1W, 0), m.p(K::Ln1B, 0), n, c)?;
        for l in 0..cfg.n_layer {
            ops::matmul_forward(dev, prec, qkv, Act::F32(ln), m.p(K::QkvW, l), m.pb(K::QkvW, l), Some(m.p(K::QkvB, l)), sc, n, c, 3 * c)?;
            let (kc, vc) = (self.k_cache.view(l * maxt * c, maxt * c), self.v_cache.view(l * maxt * c, maxt * c));
            ops::kv_cache_write(dev, kc, vc, qkv, pos0, n, c)?;
            ops::attention_forward_cached(dev, atty, qkv, kc, vc, pos0, n, c, nh)?;
            ops::matmul_forward(dev, prec, proj, Act::F32(atty), m.p(K::AttProjW, l), m.pb(K::AttProjW, l), Some(m.p(K::AttProjB, l)), sc, n, c, c)?;
            ops::residual_layernorm_forward(dev, x2, Some(ln), None, mean, rstd, x, proj, m.p(K::Ln2W, l), m.p(K::Ln2B, l), n, c)?;
            ops::matmul_forward_gelu(dev, prec, Some(fch_gelu), None, fch, Act::F32(ln), m.p(K::FcW, l), m.pb(K::FcW, l), m.p(K::FcB, l), sc, n, c, 4 * c)?;
            ops::matmul_forward(dev, prec, proj, Act::F32(fch_gelu), m.p(K::FcProjW, l), m.pb(K::FcProjW, l), Some(m.p(K::FcProjB, l)), sc, n, 4 * c, c)?;
            if l + 1 < cfg.n_layer {
                ops::residual_layernorm_forward(dev, x, Some(ln), None, mean, rstd, x2, proj, m.p(K::Ln1W, l + 1), m.p(K::Ln1B, l + 1), n, c)?;
            } else {
                // Only the last position goes through the final LayerNorm.
                ops::residual_forward(dev, x, x2, proj, n * c)?;
            }
        }
        let last = self.x.view((n - 1) * c, c);
        let (ln1, mean1, rstd1) = (self.ln.view(0, c), self.mean.view(0, 1), self.rstd.view(0, 1));
        ops::layernorm_forward(dev, Some(ln1), None, mean1, rstd1, last, m.p(K::LnfW, 0), m.p(K::LnfB, 0), 1, c)?;
        ops::lm_head_forward(dev, prec, self.logits.all(), Act::F32(ln1), m.p(K::Wte, 0), m.pb(K::Wte, 0), sc, 1, c, vp)?;
        dev.download(&self.logits, 0, &mut self.host_logits)?;
        self.len += n;
        Ok(&self.host_logits[..v])
    }

    /// Feeds `prompt`, then samples up to `cfg.max_new_tokens` tokens (the CPU's
    /// [`crate::generate::Generator::generate`]).
    pub fn generate(&mut self, prompt: &[u32], cfg: &SamplingConfig) -> Result<Generation> {
        self.len = 0;
        let max_t = self.model.config.n_positions;
        decode(prompt, cfg, max_t, |tokens, rng| {
            let next = sample(self.feed(tokens)?, cfg, rng);
            Ok((next, self.len))
        })
    }
}
