//! The PPO phase: the SFT policy is fine-tuned against a reward with proximal policy
//! optimisation, kept near the SFT model (the frozen reference) by a per-token KL penalty.
//!
//! Each step (one rollout batch of `global_batch` prompts):
//! 1. **Rollouts.** Every rank samples answers to its share of the prompts with the KV cache.
//!    The sampling seed of an answer depends only on `(seed, step, its index in the global batch)`,
//!    so the rollouts do not depend on the world size.
//! 2. **Scoring.** One batched forward each of the policy (`log π_old` of every answer token and
//!    the entropy), the reference (`log π_ref`), the value model (`V` before every answer token)
//!    and the reward model (its score on the last token). The per-token reward is
//!    `−β·(log π_old − log π_ref)`, plus at the last token the answer's reward: the reward model's
//!    score, the poem-form verifier's graded score, or both (`reward` setting). β is fixed or
//!    adapts toward `kl_target`.
//! 3. **GAE** per answer (γ, λ), advantages whitened over the whole global batch.
//! 4. **Updates.** `epochs` passes over the batch, each cut into `minibatches` global minibatches
//!    (a seeded permutation); each minibatch is one optimizer step of the policy (clipped
//!    surrogate) and of the value model (clipped value loss), gradients all-reduced. Losses are
//!    means over the minibatch's answer tokens in the whole group, as in the other phases.
//!
//! The value model is a copy of the reward model (trunk and scalar head) trained on the returns.
//! The verifier's strict pass share is always logged, whatever the reward, so the learned reward
//! model is never the only judge. A checkpoint holds the policy (the usual model files, so
//! `liandan chat` reads it), its optimizer, the value model and its optimizer, β and the head's
//! moments: a resumed phase continues exactly (its rollouts are a function of the step).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use liandan_data::chat::{prompt_ids, read_sft, Role};
use liandan_data::tokenizer::ChatTokenizer;
use liandan_data::verify::{form_score, PoemForm};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::reward::{adam_head, ScalarHead, HEAD_FILE};
use super::sft::load_tokenizer;
use super::{collective_outcome, save_boundary, PhaseError, PhaseEvents, PhaseOutcome, StepMetrics};
use crate::checkpoint;
use crate::collective::Collective;
use crate::generate::{Generator, SamplingConfig};
use crate::ledger::Ledger;
use crate::model::gpt::Gpt;
use crate::optim::{clip_grad_norm, global_norm, AdamW, LrSchedule};
use crate::plan::{PhasePlan, PpoSettings, RewardSource};
use crate::rng::Rng;
use crate::train::TrainConfig;

/// β, the value head and its Adam moments (JSON inside a PPO checkpoint).
pub const STATE_FILE: &str = "ppo_state.json";
/// The value model's weights (same layout as `model.safetensors`).
pub const CRITIC_FILE: &str = "critic.safetensors";
/// The value model's AdamW moments.
pub const CRITIC_OPT_FILE: &str = "critic_optimizer.safetensors";
/// The metrics of the step that wrote the checkpoint.
pub const EVAL_FILE: &str = "ppo_eval.json";

/// A prompt to answer, ready for generation.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoPrompt {
    /// The chat template up to `<|assistant|>`.
    pub ids: Vec<u32>,
    /// The form a poem request asks for (the verifier's target), if any.
    pub form: Option<PoemForm>,
}

/// The form named in a prompt (`写一首五言绝句…`), if any.
pub fn requested_form(prompt: &str) -> Option<PoemForm> {
    PoemForm::ALL.into_iter().find(|f| prompt.contains(f.name()))
}

/// The prompts of a PPO phase: the examples' conversations up to their last answer, only the
/// `tasks` asked for, without the SFT phase's held-out examples, and only those that leave room
/// in `seq_len` for an answer.
pub fn read_prompts(file: &Path, tk: &ChatTokenizer, tasks: &[String], seq_len: usize) -> Result<Vec<PpoPrompt>, PhaseError> {
    let examples = read_sft(file).map_err(|e| PhaseError::Data(e.to_string()))?;
    let mut out = Vec::new();
    for ex in examples {
        if !tasks.is_empty() && !ex.task.as_ref().is_some_and(|t| tasks.contains(t)) {
            continue;
        }
        if super::sft::held_out(&ex) {
            continue;
        }
        let upto = ex.messages.iter().rposition(|m| m.role == Role::Assistant).unwrap_or(ex.messages.len());
        let msgs = &ex.messages[..upto];
        if msgs.is_empty() {
            continue;
        }
        let ids = prompt_ids(tk, msgs).map_err(|e| PhaseError::Data(format!("{}: {e}", ex.source)))?;
        if ids.len() >= seq_len {
            continue;
        }
        let text: String = msgs.iter().filter(|m| m.role == Role::User).map(|m| m.content.as_str()).collect();
        out.push(PpoPrompt { ids, form: requested_form(&text) });
    }
    if out.is_empty() {
        let which = if tasks.is_empty() { String::new() } else { format!(" of tasks {tasks:?}") };
        return Err(PhaseError::Data(format!("{}: no prompts{which} fit a sequence of {seq_len} tokens", file.display())));
    }
    Ok(out)
}

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
    fn position(&self, k: usize) -> usize {
        self.prompt_len - 1 + k
    }
}

/// Generalised advantage estimation over one answer: `δ_t = r_t + γ·V_{t+1} − V_t` (`V` after
/// the last token is 0), `A_t = δ_t + γλ·A_{t+1}`; returns `(A, A + V)`.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut next_adv = 0.0f32;
    for i in (0..n).rev() {
        let next_v = if i + 1 < n { values[i + 1] } else { 0.0 };
        let delta = rewards[i] + gamma * next_v - values[i];
        next_adv = delta + gamma * lambda * next_adv;
        adv[i] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// PPO's clipped surrogate for one token, `max(−A·ρ, −A·clip(ρ, 1 ± ε))` with
/// `ρ = exp(log π − log π_old)`: `(loss, d loss / d log π, clipped)`. The derivative is zero
/// where the clipped branch is the larger one; `clipped` counts tokens with `|ρ − 1| > ε`.
pub fn clipped_surrogate(logp: f32, old_logp: f32, adv: f32, eps: f32) -> (f64, f32, bool) {
    let ratio = (logp - old_logp).exp();
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    let grad = if unclipped >= clipped { -adv * ratio } else { 0.0 };
    (unclipped.max(clipped) as f64, grad, (ratio - 1.0).abs() > eps)
}

/// The clipped value loss for one token, `½·max((V − R)², (V_clip − R)²)` with
/// `V_clip = V_old + clip(V − V_old, ±c)`: `(loss, d loss / d V)`.
pub fn clipped_value_loss(v: f32, v_old: f32, ret: f32, clip: f32) -> (f64, f32) {
    let d = v - v_old;
    let v_clip = v_old + d.clamp(-clip, clip);
    let (a, b) = (v - ret, v_clip - ret);
    if a * a >= b * b {
        (0.5 * (a * a) as f64, a)
    } else {
        // Through the clip: V_clip moves with V only inside the clip range.
        (0.5 * (b * b) as f64, if d.abs() < clip { b } else { 0.0 })
    }
}

/// `log softmax(row/τ)[target]` and that softmax's entropy, over a row of real-vocabulary
/// logits (`inv_temp` = 1/τ: the rollouts' sampling distribution).
fn logp_entropy(row: &[f32], target: usize, inv_temp: f32) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let mut dot = 0.0f64;
    for &x in row {
        let z = ((x - max) * inv_temp) as f64;
        let e = z.exp();
        sum += e;
        dot += e * z;
    }
    let lse = sum.ln();
    // log p = z_target − lse; H = lse − Σ p·z.
    ((((row[target] - max) * inv_temp) as f64 - lse) as f32, lse - dot / sum)
}

/// Sums of the policy loss over a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyStats {
    /// Σ surrogate / denom.
    pub loss: f64,
    /// Tokens with `|ρ − 1| > ε`.
    pub clipped: f64,
    pub tokens: f64,
}

/// Turns the logits `x` of a forward over `rows` (each padded to `t`) into the gradient of the
/// minibatch's policy loss `Σ_tokens [surrogate − entropy_coef·H] / denom`, where the policy is
/// `π = softmax(x/τ)` (`inv_temp` = 1/τ):
/// `d/dx = (1/τ)·[g·(onehot − p) + entropy_coef·p·(log p + H)/denom]` at each answer position,
/// with `g = d surrogate / d log π / denom`; zero elsewhere and in the padding columns.
pub fn policy_loss_grad(logits: &mut [f32], rows: &[&Rollout], t: usize, v: usize, vp: usize, inv_temp: f32, eps: f32, entropy_coef: f32, denom: f32) -> PolicyStats {
    let mut stats = PolicyStats::default();
    for (i, r) in rows.iter().enumerate() {
        let answer = r.prompt_len - 1..r.ids.len() - 1;
        for pos in 0..t {
            let row = &mut logits[(i * t + pos) * vp..(i * t + pos + 1) * vp];
            if !answer.contains(&pos) {
                row.fill(0.0);
                continue;
            }
            let k = pos + 1 - r.prompt_len;
            let target = r.ids[pos + 1] as usize;
            let (logp, entropy) = logp_entropy(&row[..v], target, inv_temp);
            let (loss, dlogp, clipped) = clipped_surrogate(logp, r.old_logp[k], r.adv[k], eps);
            stats.loss += (loss - entropy_coef as f64 * entropy) / denom as f64;
            stats.clipped += clipped as u8 as f64;
            stats.tokens += 1.0;
            let g = dlogp / denom;
            // log p_j = x_j/τ − (x_target/τ − log p_target).
            let shift = row[target] * inv_temp - logp;
            let h = entropy as f32;
            for (j, x) in row[..v].iter_mut().enumerate() {
                let logp_j = *x * inv_temp - shift;
                let p = logp_j.exp();
                let onehot = if j == target { 1.0 } else { 0.0 };
                *x = inv_temp * (g * (onehot - p) + entropy_coef * p * (logp_j + h) / denom);
            }
            row[v..].fill(0.0);
        }
    }
    stats
}

/// Rows `(b, t)` of the rollouts' tokens, padded with `pad`.
fn padded(rows: &[&Rollout], t: usize, pad: u32) -> Vec<u32> {
    super::padded_rows(rows.iter().map(|r| r.ids.as_slice()), t, pad)
}

/// `log π` (and the entropy) of every answer token under `model` at temperature `1/inv_temp`,
/// per row.
fn answer_logps(model: &mut Gpt, rows: &[&Rollout], t: usize, pad: u32, inv_temp: f32) -> Result<Vec<(Vec<f32>, f64)>, PhaseError> {
    model.forward(&padded(rows, t, pad), rows.len(), t)?;
    let (v, vp) = (model.config.vocab_size, model.config.padded_vocab_size);
    let logits = model.logits();
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
fn answer_values(model: &mut Gpt, head: &ScalarHead, rows: &[&Rollout], t: usize, pad: u32) -> Result<Vec<Vec<f32>>, PhaseError> {
    model.forward(&padded(rows, t, pad), rows.len(), t)?;
    let c = model.config.n_embd;
    let h = model.hidden();
    Ok(rows.iter().enumerate().map(|(i, r)| (0..r.answer_len()).map(|k| head.score(&h[(i * t + r.position(k)) * c..][..c])).collect()).collect())
}

/// β, the value head and the head's Adam state, saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    pub beta: f32,
    pub value_head: ScalarHead,
    pub head_m: Vec<f32>,
    pub head_v: Vec<f32>,
    /// AdamW steps of the value model (its head takes the same number).
    pub critic_t: u64,
}

/// Whole-group means of one PPO step, reported with the step and saved with checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PpoStepStats {
    pub step: u64,
    /// Mean reward at the end of an answer (what the policy maximises, before the KL penalty).
    pub reward: f64,
    /// Mean reward-model score.
    pub rm_score: f64,
    /// Mean Σ_t (log π_old − log π_ref) per answer, nats.
    pub kl: f64,
    /// β used for this step's rewards.
    pub beta: f64,
    /// Share of answer tokens whose ratio left 1 ± ε, over all epochs and minibatches.
    pub clip_frac: f64,
    /// Mean policy entropy per answer token, nats.
    pub entropy: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    /// Share of form-requesting prompts whose answer passes the verifier exactly.
    pub verifier_pass: f64,
    /// Mean graded verifier score over form-requesting prompts.
    pub verifier_score: f64,
    pub answer_tokens: f64,
}

impl PpoStepStats {
    fn values(&self) -> Vec<(String, f64)> {
        [
            ("reward", self.reward),
            ("rm_score", self.rm_score),
            ("kl", self.kl),
            ("beta", self.beta),
            ("clip_frac", self.clip_frac),
            ("entropy", self.entropy),
            ("value_loss", self.value_loss),
            ("verifier_pass", self.verifier_pass),
            ("verifier_score", self.verifier_score),
            ("answer_tokens", self.answer_tokens),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A seed from a few numbers (splitmix-style mixing through [`Rng::new`]).
fn mix(a: u64, b: u64, c: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.rotate_left(29).wrapping_mul(0xBF58_476D_1CE4_E5B9)).next_u64()
}

/// The policy's models and optimizers on one rank.
struct Models {
    policy: Gpt,
    reference: Gpt,
    reward: Gpt,
    critic: Gpt,
    reward_head: ScalarHead,
    opt: AdamW,
    critic_opt: AdamW,
    state: PpoState,
}

/// Loads a checkpoint the phase needs, naming its role in the error.
fn load_role(dir: &Path, role: &str, plan: &PhasePlan) -> Result<checkpoint::Checkpoint, PhaseError> {
    checkpoint::load(dir, Some(&plan.model)).map_err(|e| PhaseError::Plan(format!("the {role} checkpoint {}: {e}", dir.display())))
}

/// The reward model's scalar head, or why `dir` is not a reward checkpoint.
pub fn load_reward_head(dir: &Path, state: &checkpoint::CheckpointState) -> Result<ScalarHead, PhaseError> {
    let bytes = checkpoint::read_verified(dir, HEAD_FILE, state)
        .map_err(|e| PhaseError::Plan(format!("{} is not a reward-model checkpoint (a reward phase's output): {e}", dir.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| PhaseError::Plan(format!("{}: {e}", dir.join(HEAD_FILE).display())))
}

impl Models {
    /// Fresh from the reference (SFT) and reward checkpoints, or resumed from this phase's own.
    fn load(plan: &PhasePlan, reference: &Path, reward: &Path, own: Option<&Path>, b: usize) -> Result<(Models, u64), PhaseError> {
        let t = plan.seq_len;
        let cfg = &plan.model;
        let ref_ck = load_role(reference, "reference (SFT)", plan)?;
        let rm_ck = load_role(reward, "reward model", plan)?;
        let reward_head = load_reward_head(reward, &rm_ck.state)?;
        let new = |params: &Vec<f32>| -> Result<Gpt, PhaseError> {
            let mut m = Gpt::new(cfg.clone(), b, t)?;
            m.params.copy_from_slice(params);
            Ok(m)
        };
        let policy = new(&ref_ck.params)?;
        let opt = AdamW::new(plan.adamw(), &policy.layout);
        let mut m = Models {
            reference: new(&ref_ck.params)?,
            reward: new(&rm_ck.params)?,
            critic: new(&rm_ck.params)?,
            critic_opt: opt.clone(),
            opt,
            policy,
            state: PpoState {
                beta: plan.ppo.as_ref().map_or(PpoSettings::default().kl_coef, |s| s.kl_coef),
                value_head: reward_head.clone(),
                head_m: vec![0.0; cfg.n_embd + 1],
                head_v: vec![0.0; cfg.n_embd + 1],
                critic_t: 0,
            },
            reward_head,
        };
        let Some(dir) = own else { return Ok((m, 0)) };
        let ck = load_role(dir, "PPO", plan)?;
        m.policy.params = ck.params;
        if let Some((mm, vv)) = ck.moments {
            (m.opt.m, m.opt.v, m.opt.t) = (mm, vv, ck.state.optimizer_t);
        }
        let read = |name: &str| checkpoint::read_verified(dir, name, &ck.state).map_err(PhaseError::from);
        let bad = |name: &str, e: String| PhaseError::Data(format!("{}: {e}", dir.join(name).display()));
        let n = m.critic.layout.len();
        m.critic.params = checkpoint::deserialize_model(cfg, &m.critic.layout, &read(CRITIC_FILE)?).map_err(|e| bad(CRITIC_FILE, e))?;
        (m.critic_opt.m, m.critic_opt.v) = checkpoint::deserialize_moments(&read(CRITIC_OPT_FILE)?, n).map_err(|e| bad(CRITIC_OPT_FILE, e))?;
        m.state = serde_json::from_slice(&read(STATE_FILE)?).map_err(|e| bad(STATE_FILE, e.to_string()))?;
        m.critic_opt.t = m.state.critic_t;
        Ok((m, ck.state.step))
    }

    /// The checkpoint's extra files besides the policy.
    fn extra_files(&self, tokenizer: &[u8], stats: &PpoStepStats) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        let cfg = &self.critic.config;
        let ser = |e: String| PhaseError::Data(format!("serialising the value model: {e}"));
        Ok(vec![
            (super::pretrain::TOKENIZER_FILE.to_string(), tokenizer.to_vec()),
            (CRITIC_FILE.to_string(), checkpoint::serialize_model(cfg, &self.critic.layout, &self.critic.params).map_err(ser)?),
            (CRITIC_OPT_FILE.to_string(), checkpoint::serialize_moments(&self.critic_opt.m, &self.critic_opt.v, self.critic.layout.len()).map_err(ser)?),
            (STATE_FILE.to_string(), to_json(&self.state)),
            (EVAL_FILE.to_string(), to_json(stats)),
        ])
    }
}

/// Pretty JSON of a value whose type always serialises (plain structs of numbers).
fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

/// Sums `values` over the group.
fn reduce(coll: &mut dyn Collective, values: &mut [f64]) -> Result<(), crate::collective::CollectiveError> {
    for v in values.iter_mut() {
        *v = coll.all_reduce_scalar(*v)?;
    }
    Ok(())
}

/// Runs (or resumes) the PPO phase on this rank: the policy starts from `plan.init_checkpoint`
/// (the SFT model, also the frozen reference), the reward and value models from
/// `plan.reward_checkpoint`.
pub fn run_ppo(
    plan: &PhasePlan,
    resume: Option<&Path>,
    checkpoint_dir: &Path,
    coll: &mut dyn Collective,
    abort: &AtomicBool,
    events: &mut dyn PhaseEvents,
) -> Result<PhaseOutcome, PhaseError> {
    let (rank, world) = (coll.rank(), coll.world());
    let s = plan.ppo.clone().unwrap_or_default();
    s.validate().map_err(|(f, r)| PhaseError::Plan(format!("ppo.{f}: {r}")))?;
    let file = plan.examples.as_ref().ok_or_else(|| PhaseError::Plan("a ppo phase needs `data` (a JSONL of prompts in the SFT format)".into()))?;
    let reference: PathBuf = plan
        .init_checkpoint
        .clone()
        .ok_or_else(|| PhaseError::Plan("a ppo phase starts from an SFT checkpoint (the policy and its frozen reference); none was given".into()))?;
    let reward: PathBuf =
        plan.reward_checkpoint.clone().ok_or_else(|| PhaseError::Plan("a ppo phase needs a reward model: a reward phase before it, or `reward_checkpoint`".into()))?;
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let (t, pad) = (plan.seq_len, tk.special.pad);
    let prompts = read_prompts(file, &tk, &s.tasks, t)?;
    let b_global = plan.global_batch;
    let b_max = b_global.div_ceil(world).max(1);
    let own = resume.filter(|d| d.starts_with(checkpoint_dir));
    let (mut m, mut step) = Models::load(plan, &reference, &reward, own, b_max)?;
    let mut ledger = Ledger::over_rows(prompts.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no prompts", file.display())))?;
    let schedule = plan.schedule();
    let value_max = s.value_lr.unwrap_or(plan.max_lr);
    let value_schedule = LrSchedule { max_lr: value_max, min_lr: value_max * plan.min_lr / plan.max_lr, ..schedule.clone() };
    let train_config = TrainConfig { batch_size: b_max, seq_len: t, grad_accum: 1, schedule: schedule.clone(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let (v, vp, c) = (plan.model.vocab_size, plan.model.padded_vocab_size, plan.model.n_embd);
    let stop = vec![tk.special.end, tk.special.eos];
    // The policy is the sampling distribution softmax(logits/τ): log-probs, ratios, KL and
    // entropy are all taken at the rollouts' temperature.
    let inv_temp = 1.0 / s.temperature;
    macro_rules! collective {
        ($e:expr) => {
            match $e {
                Ok(x) => x,
                Err(e) => return Ok(collective_outcome(e, abort)),
            }
        };
    }
    let mut divergence = super::Divergence::new(plan);
    while step < plan.steps {
        if abort.load(Ordering::SeqCst) {
            return Ok(PhaseOutcome::Aborted);
        }
        let started = Instant::now();
        // 1. Rollouts of this rank's share of the step's prompts.
        let mine: Vec<(usize, usize)> = Ledger::share(b_global, rank, world).zip(ledger.rank_offsets(step, rank, world)).collect();
        let policy = &m.policy;
        let mut rolls: Vec<Rollout> = mine
            .par_iter()
            .map(|&(j, pi)| -> Result<Rollout, PhaseError> {
                let p = &prompts[pi];
                let cfg = SamplingConfig {
                    max_new_tokens: s.max_new_tokens.min(t - p.ids.len()),
                    temperature: s.temperature,
                    top_k: 0,
                    top_p: 1.0,
                    seed: mix(plan.seed, step, j as u64),
                    stop_tokens: stop.clone(),
                    greedy: false,
                };
                let answer = Generator::new(policy).generate(&p.ids, &cfg)?.tokens;
                let (verifier, passed) = match p.form {
                    Some(f) => {
                        let text = tk.decode_text(&answer).map_err(|e| PhaseError::Data(e.to_string()))?;
                        (form_score(&text, f), liandan_data::verify::is_form(&text, f))
                    }
                    None => (0.0, false),
                };
                let mut ids = p.ids.clone();
                ids.extend(answer);
                Ok(Rollout { global: j, ids, prompt_len: p.ids.len(), verifier, passed, has_form: p.form.is_some(), ..Default::default() })
            })
            .collect::<Result<_, _>>()?;
        // 2. Scores, per-token rewards, advantages.
        let beta = m.state.beta;
        if !rolls.is_empty() {
            let rows: Vec<&Rollout> = rolls.iter().collect();
            let old = answer_logps(&mut m.policy, &rows, t, pad, inv_temp)?;
            let refs = answer_logps(&mut m.reference, &rows, t, pad, inv_temp)?;
            let values = answer_values(&mut m.critic, &m.state.value_head, &rows, t, pad)?;
            let convs: Vec<&Vec<u32>> = rows.iter().map(|r| &r.ids).collect();
            let rm = super::reward::scores(&mut m.reward, &m.reward_head, &convs, t, pad)?;
            for (((r, (old_logp, entropy)), (ref_logp, _)), (values, rm)) in rolls.iter_mut().zip(old).zip(refs).zip(values.into_iter().zip(rm)) {
                r.reward = match s.reward {
                    RewardSource::Model => rm,
                    RewardSource::Verifier => r.verifier,
                    RewardSource::Both => rm + s.verifier_weight * r.verifier,
                };
                let mut rewards: Vec<f32> = old_logp.iter().zip(&ref_logp).map(|(a, b)| -beta * (a - b)).collect();
                if let Some(last) = rewards.last_mut() {
                    *last += r.reward;
                }
                (r.adv, r.returns) = gae(&rewards, &values, s.gamma, s.lambda);
                (r.old_logp, r.ref_logp, r.values, r.rm_score, r.entropy) = (old_logp, ref_logp, values, rm, entropy);
            }
        }
        // 3. Whole-group sums: answer lengths by global index, advantage moments, statistics.
        let mut lens = vec![0.0f32; b_global];
        for r in &rolls {
            lens[r.global] = r.answer_len() as f32;
        }
        collective!(coll.all_reduce_sum(&mut lens));
        let sum = |f: &dyn Fn(&Rollout) -> f64| rolls.iter().map(f).sum::<f64>();
        let mut g = [
            sum(&|r| r.adv.iter().map(|&a| a as f64).sum()),
            sum(&|r| r.adv.iter().map(|&a| (a as f64).powi(2)).sum()),
            sum(&|r| r.answer_len() as f64),
            sum(&|r| r.reward as f64),
            sum(&|r| r.rm_score as f64),
            sum(&|r| r.old_logp.iter().zip(&r.ref_logp).map(|(a, b)| (a - b) as f64).sum()),
            sum(&|r| r.entropy),
            sum(&|r| r.verifier as f64),
            sum(&|r| r.passed as u8 as f64),
            sum(&|r| r.has_form as u8 as f64),
            sum(&|r| r.ids.len() as f64),
        ];
        collective!(reduce(coll, &mut g));
        let [adv_sum, adv_sq, tokens, reward_sum, rm_sum, kl_sum, ent_sum, ver_sum, passed, forms, all_tokens] = g;
        let mean = adv_sum / tokens.max(1.0);
        let std = (adv_sq / tokens.max(1.0) - mean * mean).max(0.0).sqrt();
        for r in &mut rolls {
            r.adv.iter_mut().for_each(|a| *a = ((*a as f64 - mean) / (std + 1e-8)) as f32);
        }
        // 4. Epochs of minibatch updates.
        let (lr, value_lr) = (schedule.lr(step), value_schedule.lr(step));
        let mut totals = [0.0f64; 3]; // policy loss, clipped tokens, value loss
        let mut grad_norm = 0.0;
        let mut order: Vec<usize> = (0..b_global).collect();
        for epoch in 0..s.epochs {
            let mut rng = Rng::new(mix(plan.seed, step, 1 + epoch as u64));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for mb in 0..s.minibatches {
                let members = &order[mb * b_global / s.minibatches..(mb + 1) * b_global / s.minibatches];
                let denom = members.iter().map(|&j| lens[j]).sum::<f32>().max(1.0);
                let rows: Vec<&Rollout> = members.iter().filter_map(|&j| rolls.iter().find(|r| r.global == j)).collect();
                m.policy.zero_grad();
                m.critic.zero_grad();
                let mut head_grad = vec![0.0f32; c + 1];
                let mut local = [0.0f64; 3];
                if !rows.is_empty() {
                    m.policy.forward(&padded(&rows, t, pad), rows.len(), t)?;
                    let mut st = PolicyStats::default();
                    m.policy.backward_from_logits(|logits| st = policy_loss_grad(logits, &rows, t, v, vp, inv_temp, s.clip, s.entropy_coef, denom))?;
                    local[0] = st.loss;
                    local[1] = st.clipped;
                    local[2] = value_backward(&mut m.critic, &m.state.value_head, &mut head_grad, &rows, t, pad, s.value_clip, denom)?;
                }
                collective!(coll.all_reduce_sum(&mut m.policy.grads));
                collective!(coll.all_reduce_sum(&mut m.critic.grads));
                collective!(coll.all_reduce_sum(&mut head_grad));
                collective!(reduce(coll, &mut local));
                grad_norm = if plan.grad_clip > 0.0 { clip_grad_norm(&mut m.policy.grads, plan.grad_clip) } else { global_norm(&m.policy.grads) };
                let critic_norm = if plan.grad_clip > 0.0 { clip_grad_norm(&mut m.critic.grads, plan.grad_clip) } else { global_norm(&m.critic.grads) };
                // Policy and value losses and both models' gradient norms must be finite.
                let worst = if critic_norm.is_finite() { grad_norm } else { critic_norm };
                let take = divergence.check(step + 1, local[0] + local[2], worst);
                if let Err(e) = take {
                    if rank == 0 {
                        let step_ms = started.elapsed().as_millis() as u64;
                        events.step(StepMetrics { step: step + 1, loss: local[0], lr, grad_norm: worst, tokens: all_tokens as u64, step_ms, values: vec![("value_loss".into(), local[2])] });
                    }
                    return Err(e);
                }
                if matches!(take, Ok(true)) {
                    m.opt.step(&mut m.policy.params, &m.policy.grads, lr);
                    m.critic_opt.step(&mut m.critic.params, &m.critic.grads, value_lr);
                    m.state.critic_t = m.critic_opt.t;
                    adam_head(&mut m.state.value_head, &head_grad, &mut m.state.head_m, &mut m.state.head_v, value_lr, m.state.critic_t);
                }
                totals.iter_mut().zip(local).for_each(|(a, b)| *a += b);
            }
        }
        let updates = (s.epochs * s.minibatches) as f64;
        let b = b_global as f64;
        let stats = PpoStepStats {
            step: step + 1,
            reward: reward_sum / b,
            rm_score: rm_sum / b,
            kl: kl_sum / b,
            beta: beta as f64,
            clip_frac: totals[1] / (tokens * s.epochs as f64).max(1.0),
            entropy: ent_sum / tokens.max(1.0),
            policy_loss: totals[0] / updates,
            value_loss: totals[2] / updates,
            verifier_pass: passed / forms.max(1.0),
            verifier_score: ver_sum / forms.max(1.0),
            answer_tokens: tokens / b,
        };
        if let Some(target) = s.kl_target {
            let err = (stats.kl / target as f64 - 1.0).clamp(-0.2, 0.2);
            m.state.beta = (beta as f64 * (1.0 + err * b / s.kl_horizon as f64)) as f32;
        }
        step += 1;
        if rank == 0 {
            tracing::info!(
                step,
                reward = stats.reward,
                kl = stats.kl,
                verifier_pass = stats.verifier_pass,
                clip_frac = stats.clip_frac,
                entropy = stats.entropy,
                value_loss = stats.value_loss,
                "ppo step"
            );
            let step_ms = started.elapsed().as_millis() as u64;
            let mut values = stats.values();
            values.extend(divergence.values());
            events.step(StepMetrics { step, loss: stats.policy_loss, lr, grad_norm, tokens: all_tokens as u64, step_ms, values });
        }
        let boundary = step % plan.checkpoint_every.max(1) == 0 || step == plan.steps;
        if boundary && rank == 0 {
            let extra = m.extra_files(&tok_bytes, &stats)?;
            if let Some(outcome) = save_boundary(checkpoint_dir, step, plan.steps, &m.policy, &m.opt, &train_config, &extra, events)? {
                return Ok(outcome);
            }
        }
    }
    Ok(PhaseOutcome::Finished { final_checkpoint: None })
}

/// The value model's clipped loss over `rows` (divided by `denom`): adds its gradient into the
/// model's `grads` and `head_grad` (`C` weights then the bias); returns the loss.
fn value_backward(critic: &mut Gpt, head: &ScalarHead, head_grad: &mut [f32], rows: &[&Rollout], t: usize, pad: u32, clip: f32, denom: f32) -> Result<f64, PhaseError> {
    let c = critic.config.n_embd;
    critic.forward(&padded(rows, t, pad), rows.len(), t)?;
    let h = critic.hidden();
    let mut dh = vec![0.0f32; h.len()];
    let mut loss = 0.0;
    for (i, r) in rows.iter().enumerate() {
        for k in 0..r.answer_len() {
            let at = (i * t + r.position(k)) * c;
            let hs = &h[at..at + c];
            let (l, dv) = clipped_value_loss(head.score(hs), r.values[k], r.returns[k], clip);
            loss += l / denom as f64;
            let dv = dv / denom;
            for q in 0..c {
                dh[at + q] = dv * head.weight[q];
                head_grad[q] += dv * hs[q];
            }
            head_grad[c] += dv;
        }
    }
    critic.backward_from_hidden(&dh)?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_matches_the_direct_sum_of_discounted_deltas() {
        let r = [0.1f32, -0.3, 0.0, 2.0];
        let v = [0.5f32, 0.2, -0.1, 0.7];
        let (gamma, lambda) = (0.9f32, 0.8f32);
        let (adv, ret) = gae(&r, &v, gamma, lambda);
        // A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t, V_T = 0, in f64.
        let delta: Vec<f64> = (0..4).map(|t| r[t] as f64 + gamma as f64 * if t < 3 { v[t + 1] as f64 } else { 0.0 } - v[t] as f64).collect();
        for t in 0..4 {
            let want: f64 = (t..4).map(|k| (gamma as f64 * lambda as f64).powi((k - t) as i32) * delta[k]).sum();
            assert!((adv[t] as f64 - want).abs() < 1e-6, "A[{t}] = {} vs {want}", adv[t]);
            assert!((ret[t] - (adv[t] + v[t])).abs() < 1e-7);
        }
        // λ = 1, γ = 1: the advantage is the return-to-go minus the value.
        let (adv, _) = gae(&r, &v, 1.0, 1.0);
        assert!((adv[0] - (1.8 - 0.5)).abs() < 1e-6, "{}", adv[0]);
    }

    #[test]
    fn losses_match_hand_computed_values() {
        // ρ = e^{0.1} = 1.10517 inside 1 ± 0.2: loss −A·ρ, d/dlogπ = −A·ρ.
        let (l, g, c) = clipped_surrogate(-1.0, -1.1, 2.0, 0.2);
        assert!((l - (-2.0 * 0.1f64.exp())).abs() < 1e-6 && (g as f64 + 2.0 * 0.1f64.exp()).abs() < 1e-5 && !c, "{l} {g} {c}");
        // ρ = e^{0.5} = 1.6487 > 1.2 with A > 0: the clipped branch (−1.2·A) wins, no gradient.
        let (l, g, c) = clipped_surrogate(-0.5, -1.0, 1.0, 0.2);
        assert!((l + 1.2).abs() < 1e-6 && g == 0.0 && c, "{l} {g} {c}");
        // Same ratio with A < 0: the unclipped branch (−A·ρ = 1.6487) is larger and keeps its gradient.
        let (l, g, c) = clipped_surrogate(-0.5, -1.0, -1.0, 0.2);
        assert!((l - 0.5f64.exp()).abs() < 1e-6 && (g as f64 - 0.5f64.exp()).abs() < 1e-5 && c, "{l} {g} {c}");
        // Value: V = 1.0, V_old = 0.0, R = 2.0, clip 0.2: unclipped ½·1² = 0.5 < clipped ½·1.8² = 1.62,
        // and V is outside the clip range, so no gradient flows.
        let (l, g) = clipped_value_loss(1.0, 0.0, 2.0, 0.2);
        assert!((l - 1.62).abs() < 1e-6 && g == 0.0, "{l} {g}");
        // V = 0.1 inside the clip range: both branches equal, gradient V − R = −1.9.
        let (l, g) = clipped_value_loss(0.1, 0.0, 2.0, 0.2);
        assert!((l - 0.5 * 1.9 * 1.9).abs() < 1e-6 && (g + 1.9).abs() < 1e-6, "{l} {g}");
    }

    fn tiny_rollout(adv: f32) -> (Gpt, Rollout) {
        let cfg = crate::GptConfig::new(40, 16, 1, 2, 8);
        let mut m = Gpt::new(cfg, 1, 8).unwrap();
        let mut rng = Rng::new(11);
        m.params.iter_mut().for_each(|p| *p = 0.3 * rng.normal());
        let ids = vec![1u32, 5, 9, 3, 7, 2];
        let mut r = Rollout { ids, prompt_len: 3, adv: vec![adv; 3], ..Default::default() };
        let rows = [&r.clone()];
        let (lp, _) = answer_logps(&mut m, &rows, 8, 0, 1.0 / 0.7).unwrap().remove(0);
        // Old log-probs a little off the current ones, so ratios are not all 1.
        r.old_logp = lp.iter().enumerate().map(|(i, x)| x + 0.05 * i as f32).collect();
        (m, r)
    }

    #[test]
    fn zero_advantages_give_a_zero_policy_gradient() {
        let (mut m, r) = tiny_rollout(0.0);
        m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.0, 3.0);
        })
        .unwrap();
        assert!(m.grads.iter().all(|&g| g == 0.0), "max |g| = {}", m.grads.iter().fold(0.0f32, |a, g| a.max(g.abs())));
    }

    #[test]
    fn the_policy_gradient_matches_finite_differences_of_the_loss() {
        let (mut m, r) = tiny_rollout(0.7);
        let loss = |m: &mut Gpt| -> f64 {
            m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
            let mut lg = m.logits().to_vec();
            policy_loss_grad(&mut lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 3.0).loss
        };
        loss(&mut m);
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 3.0);
        })
        .unwrap();
        let (analytic, numeric) = crate::model::gradcheck::directional(&mut m, loss, 5, 1e-2);
        // Central differences, h = 1e-2 in f32: 2% relative covers truncation and rounding.
        assert!((analytic - numeric).abs() <= 2e-2 * analytic.abs().max(1e-3), "{analytic} vs {numeric}");
    }

    #[test]
    fn requested_forms_are_read_from_the_prompt() {
        assert_eq!(requested_form("写一首七言律诗，题目是《有忆》"), Some(PoemForm::QiyanLushi));
        assert_eq!(requested_form("请接出下一句：床前明月光，"), None);
    }
}
