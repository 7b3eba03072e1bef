//! KV-cache generation for the llama family: each new token runs the model on one row,
//! attending to the rotated keys and the values of every earlier position kept in the cache.
//! The cache holds `NKV` heads per position (grouped-query attention's saving) and is sized for
//! the prompt plus the answer, not the whole context (a 32k-context model would otherwise
//! allocate gigabytes per answer).

use crate::backend::cpu::embedding::embedding_forward;
use crate::backend::cpu::gqa_attention::gqa_forward_cached;
use crate::backend::cpu::matmul::{lm_head_forward, matmul_forward};
use crate::backend::cpu::residual::residual_forward;
use crate::backend::cpu::rmsnorm::rmsnorm_forward;
use crate::backend::cpu::rope::{RopeTable, rope_apply};
use crate::backend::cpu::swiglu::swiglu_forward;
use crate::error::{EngineError, Result};
use crate::generate::{Generation, SamplingConfig, decode, sample};

use super::llama::Llama;
use super::params::ParamKind as K;

/// A llama model with a KV cache for one sequence of at most `cap` positions.
#[derive(Debug)]
pub struct LlamaGenerator<'m> {
    model: &'m Llama,
    rope: RopeTable,
    cap: usize,
    /// `(L, cap, NKV·hs)` keys (rotated) and values.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    len: usize,
    x: Vec<f32>,
    x2: Vec<f32>,
    ln: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    proj: Vec<f32>,
    fch: Vec<f32>,
    act: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl<'m> LlamaGenerator<'m> {
    /// A generator for sequences of up to `cap` positions (at most `n_positions`) fed at most
    /// `cap` tokens at a time.
    pub fn new(model: &'m Llama, cap: usize) -> Self {
        let cfg = &model.config;
        let cap = cap.clamp(1, cfg.n_positions);
        let (c, l, d, i) = (cfg.n_embd, cfg.n_layer, cfg.qkv_dim(), cfg.mlp_dim());
        let kvw = cfg.kv_heads() * cfg.head_size();
        let z = |n: usize| vec![0.0f32; n];
        LlamaGenerator {
            model,
            rope: RopeTable::new(cap, cfg.head_size(), cfg.rope_theta),
            cap,
            k_cache: z(l * cap * kvw),
            v_cache: z(l * cap * kvw),
            len: 0,
            x: z(cap * c),
            x2: z(cap * c),
            ln: z(cap * c),
            rstd: z(cap),
            qkv: z(cap * d),
            atty: z(cap * c),
            proj: z(cap * c),
            fch: z(cap * 2 * i),
            act: z(cap * i),
            scores: z(cfg.n_head * cap),
            logits: z(cfg.padded_vocab_size),
        }
    }

    /// Appends `tokens` and returns the logits `(V)` that follow the last one.
    ///
    /// # Errors
    /// No tokens, a token outside the vocabulary, or the cache would overflow.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let m = self.model;
        let cfg = &m.config;
        let (c, vp, v, d, im, eps) = (cfg.n_embd, cfg.padded_vocab_size, cfg.vocab_size, cfg.qkv_dim(), cfg.mlp_dim(), cfg.rms_norm_eps as f32);
        let gqa = m.gqa();
        let kvw = gqa.nkv * gqa.hs;
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::BadLength { what: "tokens to feed", expected: 1, got: 0 });
        }
        if self.len + n > self.cap {
            return Err(EngineError::InvalidConfig { field: "context", reason: format!("{} cached + {n} new tokens exceed the {} positions of this cache", self.len, self.cap) });
        }
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= v) {
            return Err(EngineError::TokenOutOfRange { what: "tokens", position: i, token: tok as i64, vocab: v });
        }
        let (p, lay) = (&m.params, &m.layout);
        let pos0 = self.len;
        embedding_forward(&mut self.x, tokens, lay.get(p, K::Wte, 0), n, c);
        for l in 0..cfg.n_layer {
            rmsnorm_forward(&mut self.ln, &mut self.rstd, &self.x, lay.get(p, K::Ln1W, l), n, c, eps);
            let bias = cfg.attention_bias.then(|| lay.get(p, K::QkvB, l));
            matmul_forward(&mut self.qkv, &self.ln, lay.get(p, K::QkvW, l), bias, n, c, d);
            // Rows are positions pos0.. of one sequence: t = cap keeps `r % t` = r.
            rope_apply(&mut self.qkv, &self.rope, n, self.cap, d, 0, gqa.nh + gqa.nkv, pos0, false);
            let cache = l * self.cap * kvw;
            for i in 0..n {
                let row = &self.qkv[i * d..(i + 1) * d];
                let at = cache + (pos0 + i) * kvw;
                self.k_cache[at..at + kvw].copy_from_slice(&row[c..c + kvw]);
                self.v_cache[at..at + kvw].copy_from_slice(&row[c + kvw..]);
            }
            let (kc, vc) = (&self.k_cache[cache..cache + self.cap * kvw], &self.v_cache[cache..cache + self.cap * kvw]);
            gqa_forward_cached(&mut self.atty, &mut self.scores, &self.qkv, kc, vc, pos0, n, gqa);
            matmul_forward(&mut self.proj, &self.atty, lay.get(p, K::AttProjW, l), None, n, c, c);
            residual_forward(&mut self.x2[..n * c], &self.x[..n * c], &self.proj[..n * c]);
            rmsnorm_forward(&mut self.ln, &mut self.rstd, &self.x2, lay.get(p, K::Ln2W, l), n, c, eps);
            matmul_forward(&mut self.fch, &self.ln, lay.get(p, K::FcW, l), None, n, c, 2 * im);
            swiglu_forward(&mut self.act, &self.fch, n, im);
            matmul_forward(&mut self.proj, &self.act, lay.get(p, K::FcProjW, l), None, n, im, c);
            residual_forward(&mut self.x[..n * c], &self.x2[..n * c], &self.proj[..n * c]);
        }
        let last = &self.x[(n - 1) * c..n * c];
        rmsnorm_forward(&mut self.ln, &mut self.rstd, last, lay.get(p, K::LnfW, 0), 1, c, eps);
        lm_head_forward(&mut self.logits, &self.ln[..c], lay.get(p, m.head_kind(), 0), 1, c, vp);
        self.len += n;
        Ok(&self.logits[..v])
    }

    /// Feeds `prompt`, then samples up to `cfg.max_new_tokens` tokens (the same stopping rules
    /// as [`crate::generate::Generator::generate`]).
    pub fn generate(&mut self, prompt: &[u32], cfg: &SamplingConfig) -> Result<Generation> {
        self.len = 0;
        let max_t = self.model.config.n_positions;
        decode(prompt, cfg, max_t, |tokens, rng| {
            let next = sample(self.feed(tokens)?, cfg, rng);
            Ok((next, self.len))
        })
    }
}

/// Generates an answer to `prompt` with a cache sized for it.
pub fn generate(model: &Llama, prompt: &[u32], cfg: &SamplingConfig) -> Result<Generation> {
    LlamaGenerator::new(model, prompt.len() + cfg.max_new_tokens).generate(prompt, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::GptConfig;
    use crate::rng::Rng;

    #[test]
    fn cached_logits_match_the_full_forward() {
        let mut cfg = GptConfig::llama(40, 16, 2, 4, 2, 16, 24);
        cfg.attention_bias = true;
        let mut m = Llama::new(cfg, 1, 10).unwrap();
        m.init_weights(&mut Rng::new(3));
        m.params.iter_mut().for_each(|x| *x *= 10.0);
        let toks: Vec<u32> = (0..10).map(|i| (i * 13 % 40) as u32).collect();
        m.forward(&toks, 1, 10).unwrap();
        let vp = m.config.padded_vocab_size;
        let full = m.logits().to_vec();
        let mut g = LlamaGenerator::new(&m, 10);
        let mut got = vec![g.feed(&toks[..4]).unwrap().to_vec()];
        for &t in &toks[4..] {
            got.push(g.feed(&[t]).unwrap().to_vec());
        }
        for (k, row) in got.iter().enumerate() {
            let pos = if k == 0 { 3 } else { 3 + k };
            let want = &full[pos * vp..pos * vp + 40];
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "position {pos}: {a} vs {b}");
            }
        }
    }
}
