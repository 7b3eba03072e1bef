//! PPO's rollouts: the prompts (the SFT data's conversations up to their last answer), the
//! answers sampled from the policy with the KV cache (each seeded by `(seed, step, index in the
//! global batch)`, so rollouts do not depend on the world size), and the log-probabilities,
//! entropies and values scored on them.

use liandan_data::tokenizer::ChatTokenizer;
use liandan_data::verify::form_score;

use super::losses::logp_entropy;
use crate::engine::Model;
use crate::engine::head::ScalarHead;
use crate::generate::SamplingConfig;
use crate::phase::PhaseError;
use crate::rng::Rng;

pub use liandan_plan::inputs::prompts::{PpoPrompt, read_prompts, requested_form};

/// One sampled answer and everything PPO computes about it.
#[derive(Debug, Clone, Default)]
pub struct Rollout {
    /// Index in the step's global batch.
    pub global: usize,
    /// Prompt and answer tokens.
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// `log π_old` of each answer token.
    pub old_logp: Vec<f32>,
    /// `log π_ref` of each answer token.
    pub ref_logp: Vec<f32>,
    /// `V` before each answer token.
    pub values: Vec<f32>,
    /// Whitened GAE advantages and the returns, per answer token.
    pub adv: Vec<f32>,
    pub returns: Vec<f32>,
    /// The reward at the end of the answer, the reward model's score, the verifier's graded
    /// score, whether it passes strictly, and whether the prompt asked for a form at all.
    pub reward: f32,
    pub rm_score: f32,
    pub verifier: f32,
    pub passed: bool,
    pub has_form: bool,
    /// Summed entropy of the policy over the answer's positions (nats).
    pub entropy: f64,
}

impl Rollout {
    pub fn answer_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }

    /// Row position whose logits predict answer token `k`.
    pub(crate) fn position(&self, k: usize) -> usize {
        self.prompt_len - 1 + k
    }
}

/// Rows `(b, t)` of the rollouts' tokens, padded with `pad`.
pub(crate) fn padded(rows: &[&Rollout], t: usize, pad: u32) -> Vec<u32> {
    crate::phase::padded_rows(rows.iter().map(|r| r.ids.as_slice()), t, pad)
}

/// `log π` (and the entropy) of every answer token under `model` at temperature `1/inv_temp`,
/// per row.
pub(crate) fn answer_logps(model: &mut dyn Model, rows: &[&Rollout], t: usize, pad: u32, inv_temp: f32) -> Result<Vec<(Vec<f32>, f64)>, PhaseError> {
    model.forward(&padded(rows, t, pad), rows.len(), t)?;
    let (v, vp) = (model.config().vocab_size, model.config().padded_vocab_size);
    let logits = model.logits()?;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut ent = 0.0;
            let lp = (0..r.answer_len())
                .map(|k| {
                    let pos = r.position(k);
                    let (lp, h) = logp_entropy(&logits[(i * t + pos) * vp..(i * t + pos) * vp + v], r.ids[pos + 1] as usize, inv_temp);
                    ent += h;
                    lp
                })
                .collect();
            (lp, ent)
        })
        .collect())
}

/// `V` before every answer token (value head on the hidden state that predicts it), per row.
pub(crate) fn answer_values(model: &mut dyn Model, head: &ScalarHead, rows: &[&Rollout], t: usize, pad: u32) -> Result<Vec<Vec<f32>>, PhaseError> {
    model.forward(&padded(rows, t, pad), rows.len(), t)?;
    let c = model.config().n_embd;
    let h = model.hidden()?;
    Ok(rows.iter().enumerate().map(|(i, r)| (0..r.answer_len()).map(|k| head.score(&h[(i * t + r.position(k)) * c..][..c])).collect()).collect())
}

/// A seed from a few numbers (splitmix-style mixing through [`Rng::new`]).
pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.rotate_left(29).wrapping_mul(0xBF58_476D_1CE4_E5B9)).next_u64()
}

/// Samples this rank's answers: `mine` is `(index in the global batch, prompt index)`; each
/// answer is cut to the context and scored by the verifier when its prompt asks for a form.
pub(crate) fn sample(
    policy: &dyn Model,
    prompts: &[PpoPrompt],
    mine: &[(usize, usize)],
    tk: &ChatTokenizer,
    base: &SamplingConfig,
    t: usize,
    seed: u64,
    step: u64,
) -> Result<Vec<Rollout>, PhaseError> {
    let jobs: Vec<(Vec<u32>, SamplingConfig)> = mine
        .iter()
        .map(|&(j, pi)| {
            let p = &prompts[pi];
            let cfg = SamplingConfig { max_new_tokens: base.max_new_tokens.min(t - p.ids.len()), seed: mix(seed, step, j as u64), ..base.clone() };
            (p.ids.clone(), cfg)
        })
        .collect();
    let answers = policy.generate(&jobs)?;
    mine.iter()
        .zip(answers)
        .map(|(&(j, pi), g)| {
            let p = &prompts[pi];
            let (verifier, passed) = match p.form {
                Some(f) => {
                    let text = tk.decode_text(&g.tokens).map_err(|e| PhaseError::Data(e.to_string()))?;
                    (form_score(&text, f), liandan_data::verify::is_form(&text, f))
                }
                None => (0.0, false),
            };
            let mut ids = p.ids.clone();
            ids.extend(g.tokens);
            Ok(Rollout { global: j, ids, prompt_len: p.ids.len(), verifier, passed, has_form: p.form.is_some(), ..Default::default() })
        })
        .collect()
}

/// The first `n` of this rank's rollouts as the dashboard shows them (decoded text, rewards,
/// verdict, KL).
pub fn samples(rolls: &[Rollout], tk: &ChatTokenizer, n: usize) -> Vec<crate::phase::RolloutSample> {
    rolls
        .iter()
        .take(n)
        .map(|r| crate::phase::RolloutSample {
            prompt: tk.decode_text(&r.ids[..r.prompt_len]).unwrap_or_default(),
            answer: tk.decode_text(&r.ids[r.prompt_len..]).unwrap_or_default(),
            reward: r.reward as f64,
            rm_score: r.rm_score as f64,
            verifier: r.has_form.then_some((r.verifier as f64, r.passed)),
            kl: r.old_logp.iter().zip(&r.ref_logp).map(|(a, b)| (a - b) as f64).sum(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use liandan_data::verify::PoemForm;

    #[test]
    fn requested_forms_are_read_from_the_prompt() {
        assert_eq!(requested_form("写一首七言律诗，题目是《有忆》"), Some(PoemForm::QiyanLushi));
        assert_eq!(requested_form("请接出下一句：床前明月光，"), None);
    }
}
