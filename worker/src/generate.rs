//! Text generation with a KV cache: each new token runs the model on one row, attending to the
//! keys and values of every earlier position kept in the cache.

use serde::{Deserialize, Serialize};

use crate::backend::cpu::attention::attention_forward_cached;
use crate::backend::cpu::encoder::encoder_forward;
use crate::backend::cpu::gelu::gelu_forward;
use crate::backend::cpu::layernorm::layernorm_forward;
use crate::backend::cpu::matmul::{lm_head_forward, matmul_forward};
use crate::backend::cpu::residual::residual_forward;
use crate::error::{EngineError, Result};
use crate::model::gpt::Gpt;
use crate::model::params::ParamKind as K;
use crate::rng::Rng;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// Softmax temperature; `<= 0` or `greedy` means argmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<u32>,
    pub greedy: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { max_new_tokens: 64, temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0, stop_tokens: Vec::new(), greedy: false }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    StopToken,
    /// The context (`n_positions`) is full.
    ContextFull,
}

/// The new tokens and why generation ended.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// A model with a KV cache and the buffers of a cached forward, for one sequence.
#[derive(Debug)]
pub struct Generator<'m> {
    model: &'m Gpt,
    /// `(L, maxT, C)` keys and values of every position fed so far.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    /// Positions held in the cache.
    len: usize,
    // Row buffers for up to maxT new tokens at once (a prompt).
    x: Vec<f32>,
    x2: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    proj: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Gpt) -> Self {
        let cfg = &model.config;
        let (t, c, l) = (cfg.n_positions, cfg.n_embd, cfg.n_layer);
        let z = |n: usize| vec![0.0f32; n];
        Generator {
            model,
            k_cache: z(l * t * c),
            v_cache: z(l * t * c),
            len: 0,
            x: z(t * c),
            x2: z(t * c),
            ln: z(t * c),
            mean: z(t),
            rstd: z(t),
            qkv: z(t * 3 * c),
            atty: z(t * c),
            proj: z(t * c),
            fch: z(t * 4 * c),
            fch_gelu: z(t * 4 * c),
            scores: z(cfg.n_head * t),
            logits: z(cfg.padded_vocab_size),
        }
    }

    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Appends `tokens` to the sequence and returns the logits `(V)` that follow the last one.
    ///
    /// # Errors
    /// No tokens, a token outside the vocabulary, or the context would overflow.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let cfg = &self.model.config;
        let (c, nh, vp, v, maxt) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size, cfg.vocab_size, cfg.n_positions);
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::BadLength { what: "tokens to feed", expected: 1, got: 0 });
        }
        if self.len + n > maxt {
            return Err(EngineError::InvalidConfig { field: "context", reason: format!("{} cached + {n} new tokens exceed n_positions = {maxt}", self.len) });
        }
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= v) {
            return Err(EngineError::TokenOutOfRange { what: "tokens", position: i, token: tok as i64, vocab: v });
        }
        let (p, lay) = (&self.model.params, &self.model.layout);
        let pos0 = self.len;
        encoder_forward(&mut self.x, tokens, lay.get(p, K::Wte, 0), lay.get(p, K::Wpe, 0), 1, n, c, pos0);
        for l in 0..cfg.n_layer {
            layernorm_forward(&mut self.ln, &mut self.mean, &mut self.rstd, &self.x, lay.get(p, K::Ln1W, l), lay.get(p, K::Ln1B, l), n, c);
            matmul_forward(&mut self.qkv, &self.ln, lay.get(p, K::QkvW, l), Some(lay.get(p, K::QkvB, l)), n, c, 3 * c);
            let cache = l * maxt * c;
            for i in 0..n {
                let row = &self.qkv[i * 3 * c..(i + 1) * 3 * c];
                let at = cache + (pos0 + i) * c;
                self.k_cache[at..at + c].copy_from_slice(&row[c..2 * c]);
                self.v_cache[at..at + c].copy_from_slice(&row[2 * c..]);
            }
            let (kc, vc) = (&self.k_cache[cache..cache + maxt * c], &self.v_cache[cache..cache + maxt * c]);
            attention_forward_cached(&mut self.atty, &mut self.scores, &self.qkv, kc, vc, pos0, n, c, nh);
            matmul_forward(&mut self.proj, &self.atty, lay.get(p, K::AttProjW, l), Some(lay.get(p, K::AttProjB, l)), n, c, c);
            residual_forward(&mut self.x2[..n * c], &self.x[..n * c], &self.proj[..n * c]);
            layernorm_forward(&mut self.ln, &mut self.mean, &mut self.rstd, &self.x2, lay.get(p, K::Ln2W, l), lay.get(p, K::Ln2B, l), n, c);
            matmul_forward(&mut self.fch, &self.ln, lay.get(p, K::FcW, l), Some(lay.get(p, K::FcB, l)), n, c, 4 * c);
            gelu_forward(&mut self.fch_gelu[..n * 4 * c], &self.fch[..n * 4 * c]);
            matmul_forward(&mut self.proj, &self.fch_gelu, lay.get(p, K::FcProjW, l), Some(lay.get(p, K::FcProjB, l)), n, 4 * c, c);
            residual_forward(&mut self.x[..n * c], &self.x2[..n * c], &self.proj[..n * c]);
        }
        let last = &self.x[(n - 1) * c..n * c];
        layernorm_forward(&mut self.ln, &mut self.mean, &mut self.rstd, last, lay.get(p, K::LnfW, 0), lay.get(p, K::LnfB, 0), 1, c);
        lm_head_forward(&mut self.logits, &self.ln[..c], lay.get(p, K::Wte, 0), 1, c, vp);
        self.len += n;
        Ok(&self.logits[..v])
    }

    /// Feeds `prompt`, then samples up to `cfg.max_new_tokens` tokens.
    pub fn generate(&mut self, prompt: &[u32], cfg: &SamplingConfig) -> Result<Generation> {
        self.reset();
        let max_t = self.model.config.n_positions;
        decode(prompt, cfg, max_t, |tokens, rng| {
            let next = sample(self.feed(tokens)?, cfg, rng);
            Ok((next, self.len))
        })
    }
}

/// The decoding loop every KV-cache generator shares. `step` feeds tokens to the cache, samples
/// the next token from the last position's logits with the generation's RNG, and returns it with
/// the cache's length; the answer ends at a stop token, after `cfg.max_new_tokens` tokens, or
/// when the cache holds `max_t` positions.
pub fn decode<E>(
    prompt: &[u32],
    cfg: &SamplingConfig,
    max_t: usize,
    mut step: impl FnMut(&[u32], &mut Rng) -> std::result::Result<(u32, usize), E>,
) -> std::result::Result<Generation, E> {
    let mut rng = Rng::new(cfg.seed);
    let mut out = Vec::new();
    let (mut next, mut len) = step(prompt, &mut rng)?;
    loop {
        out.push(next);
        if cfg.stop_tokens.contains(&next) {
            return Ok(Generation { tokens: out, stop: StopReason::StopToken });
        }
        if out.len() >= cfg.max_new_tokens {
            return Ok(Generation { tokens: out, stop: StopReason::MaxTokens });
        }
        if len >= max_t {
            return Ok(Generation { tokens: out, stop: StopReason::ContextFull });
        }
        (next, len) = step(&[next], &mut rng)?;
    }
}

/// Picks a token from `logits` `(V)`: argmax when greedy (lowest index on ties), else a draw
/// from the temperature-scaled softmax restricted by top-k and top-p.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> u32 {
    if cfg.greedy || cfg.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Descending by logit; ties by index so the order is deterministic.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.truncate(cfg.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) / cfg.temperature) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u = rng.next_f32() as f64;
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(3);
        let k1 = SamplingConfig { top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &k1, &mut rng), 1);
        }
        // p(1) ≈ 0.50, p(2) ≈ 0.45: top_p = 0.9 keeps exactly {1, 2}.
        let p = SamplingConfig { top_p: 0.9, ..Default::default() };
        let mut seen = [0; 4];
        for _ in 0..500 {
            seen[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 150 && seen[2] > 150, "{seen:?}");
    }
}
