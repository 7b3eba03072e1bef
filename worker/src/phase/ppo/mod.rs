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
//!
//! # Layout
//! - [`rollout`]: prompts, sampling the answers, scoring them (log-probs, entropy, values).
//! - [`losses`]: GAE, the clipped surrogate and value losses, the policy gradient in the logits.
//! - [`kl`]: the KL controller (β fixed or adapted toward a target).
//! - here: the models, the step, the phase through the driver.

pub mod kl;
pub mod losses;
pub mod rollout;

use std::path::Path;

use serde::{Deserialize, Serialize};

use self::losses::{PolicyStats, policy_loss_grad, value_backward};
pub use self::losses::{clipped_surrogate, clipped_value_loss, gae};
pub use self::rollout::requested_form;
use self::rollout::{PpoPrompt, Rollout, answer_logps, answer_values, padded, read_prompts};
use super::driver::{Ctx, Run, Start, StepOut, drive, optimizer_shard};
use super::sft::load_tokenizer;
use super::{PhaseError, PhaseIo, PhaseOutcome, PhaseStep};
use crate::checkpoint;
use crate::collective::{Collective, CollectiveError, Shard};
use crate::engine::head::{ScalarHead, adam_step};
use crate::engine::{Engine, Model, Replica};
use crate::generate::SamplingConfig;
use crate::ledger::Ledger;
use crate::optim::LrSchedule;
use crate::plan::{PhasePlan, PpoSettings, RewardSource};
use crate::rng::Rng;
use crate::train::TrainConfig;
use liandan_data::tokenizer::ChatTokenizer;

/// β, the value head and its Adam moments (JSON inside a PPO checkpoint).
pub const STATE_FILE: &str = "ppo_state.json";
/// The value model's weights (same layout as `model.safetensors`).
pub const CRITIC_FILE: &str = "critic.safetensors";
/// The value model's AdamW moments.
pub const CRITIC_OPT_FILE: &str = "critic_optimizer.safetensors";
/// The metrics of the step that wrote the checkpoint.
pub const EVAL_FILE: &str = liandan_plan::checkpoint::eval_files::PPO;

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
    pub fn values(&self) -> Vec<(String, f64)> {
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

/// The policy's models on one rank: the policy and value model are trained (replicas), the
/// reference and reward model are frozen.
#[derive(Debug)]
struct Models {
    policy: Box<dyn Replica>,
    reference: Box<dyn Model>,
    reward: Box<dyn Model>,
    critic: Box<dyn Replica>,
    reward_head: ScalarHead,
    state: PpoState,
}

/// Loads a checkpoint the phase needs, naming its role in the error.
pub(crate) fn load_role(dir: &Path, role: &str, plan: &PhasePlan) -> Result<checkpoint::Checkpoint, PhaseError> {
    checkpoint::load(dir, Some(&plan.model)).map_err(|e| PhaseError::Plan(format!("the {role} checkpoint {}: {e}", dir.display())))
}

/// The reward model's scalar head, or why `dir` is not a reward checkpoint.
pub fn load_reward_head(dir: &Path, state: &checkpoint::CheckpointState) -> Result<ScalarHead, PhaseError> {
    ScalarHead::load(dir, state).map_err(|e| PhaseError::Plan(e.to_string()))
}

impl Models {
    /// From the reference (SFT) and reward checkpoints, the policy from `start` (the reference
    /// itself, or this phase's own checkpoint to continue). Returns the first step.
    /// `shard`: the part of the policy's and the value model's optimizer state this rank keeps.
    fn load(plan: &PhasePlan, engine: &dyn Engine, reference: &Path, reward: &Path, start: Start<'_>, b: usize, shard: Shard) -> Result<(Models, u64), PhaseError> {
        let t = plan.seq_len;
        let cfg = &plan.model;
        let ref_ck = load_role(reference, "reference (SFT)", plan)?;
        let rm_ck = load_role(reward, "reward model", plan)?;
        let reward_head = load_reward_head(reward, &rm_ck.state)?;
        let frozen = |params: &[f32]| -> Result<Box<dyn Model>, PhaseError> {
            let mut m = engine.model(cfg, b, t)?;
            m.set_params(params)?;
            Ok(m)
        };
        let trained = |params: &[f32]| -> Result<Box<dyn Replica>, PhaseError> {
            let mut r = engine.replica(cfg, b, t, &plan.adamw(), shard)?;
            r.model().set_params(params)?;
            Ok(r)
        };
        let mut m = Models {
            policy: trained(&ref_ck.params)?,
            reference: frozen(&ref_ck.params)?,
            reward: frozen(&rm_ck.params)?,
            critic: trained(&rm_ck.params)?,
            state: PpoState {
                beta: plan.ppo.as_ref().map_or(PpoSettings::default().kl_coef, |s| s.kl_coef),
                value_head: reward_head.clone(),
                head_m: vec![0.0; cfg.n_embd + 1],
                head_v: vec![0.0; cfg.n_embd + 1],
                critic_t: 0,
            },
            reward_head,
        };
        let dir = match start {
            Start::Continue(dir) => dir,
            Start::From(dir) if dir != reference => {
                let ck = load_role(dir, "starting", plan)?;
                m.policy.model().set_params(&ck.params)?;
                return Ok((m, 0));
            }
            Start::From(_) | Start::Fresh => return Ok((m, 0)),
        };
        let ck = load_role(dir, "PPO", plan)?;
        m.policy.model().set_params(&ck.params)?;
        if let Some((mm, vv)) = &ck.moments {
            m.policy.set_moments(mm, vv, ck.state.optimizer_t)?;
        }
        let read = |name: &str| checkpoint::read_verified(dir, name, &ck.state).map_err(PhaseError::from);
        let bad = |name: &str, e: String| PhaseError::Data(format!("{}: {e}", dir.join(name).display()));
        let layout = m.critic.model_ref().layout().clone();
        let n = layout.len();
        m.critic.model().set_params(&checkpoint::deserialize_model(cfg, &layout, &read(CRITIC_FILE)?).map_err(|e| bad(CRITIC_FILE, e))?)?;
        let (cm, cv) = checkpoint::deserialize_moments(&read(CRITIC_OPT_FILE)?, n).map_err(|e| bad(CRITIC_OPT_FILE, e))?;
        m.state = serde_json::from_slice(&read(STATE_FILE)?).map_err(|e| bad(STATE_FILE, e.to_string()))?;
        m.critic.set_moments(&cm, &cv, m.state.critic_t)?;
        Ok((m, ck.state.step))
    }

    /// The checkpoint's extra files besides the policy.
    fn extra_files(&self, tokenizer: &[u8], stats: &PpoStepStats) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        let critic = self.critic.model_ref();
        let ser = |e: String| PhaseError::Data(format!("serialising the value model: {e}"));
        let (cm, cv) = self.critic.moments()?;
        Ok(vec![
            (super::pretrain::TOKENIZER_FILE.to_string(), tokenizer.to_vec()),
            (CRITIC_FILE.to_string(), checkpoint::serialize_model(critic.config(), critic.layout(), &critic.params()?).map_err(ser)?),
            (CRITIC_OPT_FILE.to_string(), checkpoint::serialize_moments(&cm, &cv, critic.layout().len()).map_err(ser)?),
            (STATE_FILE.to_string(), to_json(&self.state)),
            (EVAL_FILE.to_string(), to_json(stats)),
        ])
    }
}

/// Reshuffles the rollouts' global indices for pass `epoch` over step `step`'s batch: a seeded
/// permutation (the same on every rank, whatever the world size), applied to the previous pass's
/// order.
pub(crate) fn shuffle_for_epoch(order: &mut [usize], seed: u64, step: u64, epoch: usize) {
    let mut rng = Rng::new(rollout::mix(seed, step, 1 + epoch as u64));
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

/// Minibatch `mb` of `n`: a contiguous slice of the pass's order.
pub(crate) fn minibatch(order: &[usize], mb: usize, n: usize) -> &[usize] {
    &order[mb * order.len() / n..(mb + 1) * order.len() / n]
}

/// Pretty JSON of a value whose type always serialises (plain structs of numbers).
pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

/// One PPO step per driver step: rollouts, scores, advantages, epochs of minibatch updates.
struct PpoStep {
    m: Models,
    s: PpoSettings,
    prompts: Vec<PpoPrompt>,
    ledger: Ledger,
    tk: ChatTokenizer,
    tok_bytes: Vec<u8>,
    value_schedule: LrSchedule,
    seed: u64,
    b_global: usize,
    t: usize,
    /// The last step's statistics (saved with the checkpoint).
    last: PpoStepStats,
}

impl PhaseStep for PpoStep {
    fn primary(&mut self) -> &mut dyn Replica {
        self.m.policy.as_mut()
    }

    /// The value model's moments travel in the boundary files: both trained models gather.
    fn gather_moments(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        self.m.policy.gather_moments(coll)?;
        self.m.critic.gather_moments(coll)
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError> {
        let (step, rank, world) = (ctx.step(), ctx.rank(), ctx.world());
        let (s, t, b_global, m) = (&self.s, self.t, self.b_global, &mut self.m);
        let pad = self.tk.special.pad;
        let cfg = m.policy.model_ref().config().clone();
        let (v, vp, c) = (cfg.vocab_size, cfg.padded_vocab_size, cfg.n_embd);
        // The policy is the sampling distribution softmax(logits/τ): log-probs, ratios, KL and
        // entropy are all taken at the rollouts' temperature.
        let inv_temp = 1.0 / s.temperature;
        // 1. Rollouts of this rank's share of the step's prompts.
        let mine: Vec<(usize, usize)> = Ledger::share(b_global, rank, world).zip(self.ledger.rank_offsets(step, rank, world)).collect();
        let base =
            SamplingConfig { max_new_tokens: s.max_new_tokens, temperature: s.temperature, top_k: 0, top_p: 1.0, seed: 0, stop_tokens: self.tk.stop_tokens(), greedy: false };
        let mut rolls = rollout::sample(m.policy.model_ref(), &self.prompts, &mine, &self.tk, &base, t, self.seed, step)?;
        // 2. Scores, per-token rewards, advantages.
        let beta = m.state.beta;
        if !rolls.is_empty() {
            let rows: Vec<&Rollout> = rolls.iter().collect();
            let old = answer_logps(m.policy.model(), &rows, t, pad, inv_temp)?;
            let refs = answer_logps(m.reference.as_mut(), &rows, t, pad, inv_temp)?;
            let values = answer_values(m.critic.model(), &m.state.value_head, &rows, t, pad)?;
            let convs: Vec<&Vec<u32>> = rows.iter().map(|r| &r.ids).collect();
            let rm = super::reward::scores(m.reward.as_mut(), &m.reward_head, &convs, t, pad)?;
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
        ctx.sum_buf(&mut lens)?;
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
        ctx.sum_each(&mut g)?;
        let [adv_sum, adv_sq, tokens, reward_sum, rm_sum, kl_sum, ent_sum, ver_sum, passed, forms, all_tokens] = g;
        let mean = adv_sum / tokens.max(1.0);
        let std = (adv_sq / tokens.max(1.0) - mean * mean).max(0.0).sqrt();
        for r in &mut rolls {
            r.adv.iter_mut().for_each(|a| *a = ((*a as f64 - mean) / (std + 1e-8)) as f32);
        }
        // 4. Epochs of minibatch updates.
        let (lr, value_lr) = (ctx.lr(), self.value_schedule.lr(step));
        let mut totals = [0.0f64; 3]; // policy loss, clipped tokens, value loss
        let mut grad_norm = 0.0;
        let mut order: Vec<usize> = (0..b_global).collect();
        for epoch in 0..s.epochs {
            shuffle_for_epoch(&mut order, self.seed, step, epoch);
            for mb in 0..s.minibatches {
                let members = minibatch(&order, mb, s.minibatches);
                let denom = members.iter().map(|&j| lens[j]).sum::<f32>().max(1.0);
                let rows: Vec<&Rollout> = members.iter().filter_map(|&j| rolls.iter().find(|r| r.global == j)).collect();
                m.policy.model().zero_grad()?;
                m.critic.model().zero_grad()?;
                let mut head_grad = vec![0.0f32; c + 1];
                let mut local = [0.0f64; 3];
                if !rows.is_empty() {
                    let policy = m.policy.model();
                    policy.forward(&padded(&rows, t, pad), rows.len(), t)?;
                    let mut st = PolicyStats::default();
                    policy.backward_from_logits(&mut |logits| st = policy_loss_grad(logits, &rows, t, v, vp, inv_temp, s.clip, s.entropy_coef, 0.0, denom))?;
                    local[0] = st.loss;
                    local[1] = st.clipped;
                    local[2] = value_backward(m.critic.model(), &m.state.value_head, &mut head_grad, &rows, t, pad, s.value_clip, denom)?;
                }
                ctx.sum_each(&mut local)?;
                // Policy and value losses and both models' gradient norms must be finite.
                let u = ctx.update(&mut [(m.policy.as_mut(), lr), (m.critic.as_mut(), value_lr)], &mut [&mut head_grad], local[0] + local[2])?;
                grad_norm = u.norm;
                if u.applied {
                    m.state.critic_t = m.critic.optimizer_t();
                    adam_step(&mut m.state.value_head, &head_grad, &mut m.state.head_m, &mut m.state.head_v, value_lr, m.state.critic_t);
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
        m.state.beta = kl::next_beta(beta, stats.kl, s.kl_target, s.kl_horizon, b);
        if rank == 0 {
            tracing::info!(
                step = step + 1,
                reward = stats.reward,
                kl = stats.kl,
                verifier_pass = stats.verifier_pass,
                clip_frac = stats.clip_frac,
                entropy = stats.entropy,
                value_loss = stats.value_loss,
                "ppo step"
            );
        }
        let samples = if rank == 0 { rollout::samples(&rolls, &self.tk, super::SAMPLES_PER_STEP) } else { Vec::new() };
        let out = StepOut { loss: stats.policy_loss, grad_norm, tokens: all_tokens as u64, values: stats.values(), samples };
        self.last = stats;
        Ok(out)
    }

    fn boundary_files(&mut self, _step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        self.m.extra_files(&self.tok_bytes, &self.last)
    }
}

/// Runs (or resumes) the PPO phase on this rank: the policy starts from `plan.init_checkpoint`
/// (the SFT model, also the frozen reference), the reward and value models from
/// `plan.reward_checkpoint`.
pub fn run_ppo(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let world = io.coll.world();
    let s = plan.ppo.clone().unwrap_or_default();
    s.validate().map_err(|(f, r)| PhaseError::Plan(format!("ppo.{f}: {r}")))?;
    let file = plan.examples.as_ref().ok_or_else(|| PhaseError::Plan("a ppo phase needs `data` (a JSONL of prompts in the SFT format)".into()))?;
    let reference =
        plan.init_checkpoint.clone().ok_or_else(|| PhaseError::Plan("a ppo phase starts from an SFT checkpoint (the policy and its frozen reference); none was given".into()))?;
    let reward = plan.reward_checkpoint.clone().ok_or_else(|| PhaseError::Plan("a ppo phase needs a reward model: a reward phase before it, or `reward_checkpoint`".into()))?;
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let t = plan.seq_len;
    let prompts = read_prompts(file, &tk, &s.tasks, t)?;
    let b_global = plan.global_batch;
    let b_max = b_global.div_ceil(world).max(1);
    let (m, first) = Models::load(plan, io.engine, &reference, &reward, start, b_max, optimizer_shard(plan, &*io.coll))?;
    let ledger = Ledger::over_rows(prompts.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no prompts", file.display())))?;
    let schedule = plan.schedule();
    let value_max = s.value_lr.unwrap_or(plan.max_lr);
    let value_schedule = LrSchedule { max_lr: value_max, min_lr: value_max * plan.min_lr / plan.max_lr, ..schedule.clone() };
    let train_config = TrainConfig { batch_size: b_max, seq_len: t, grad_accum: 1, schedule, adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let mut phase = PpoStep { m, s, prompts, ledger, tk, tok_bytes, value_schedule, seed: plan.seed, b_global, t, last: PpoStepStats::default() };
    let run = Run { plan, checkpoint_dir: io.checkpoint_dir, coll: io.coll, abort: io.abort, events: io.events, train_config, tokenizer: super::pretrain::TOKENIZER_FILE };
    drive(run, &mut phase, first)
}
