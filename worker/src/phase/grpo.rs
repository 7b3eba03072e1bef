//! The GRPO phase (group-relative policy optimisation): G answers are sampled per prompt, each
//! answer's advantage is its reward relative to its group's, and the policy is updated with
//! PPO's clipped ratio objective plus a KL term to the frozen reference. No value model.
//!
//! Each step (`global_batch` prompts, `G = group_size` answers each):
//! 1. **Rollouts.** The `B·G` answers of the step are split over the ranks (contiguous shares of
//!    the global answer index `j = prompt slot · G + answer index`); answer `j` is sampled with
//!    the seed `(seed, step, j)`, so the rollouts do not depend on the world size.
//! 2. **Scoring.** One forward each of the policy (`log π_old`, entropy) and the frozen
//!    reference (`log π_ref`); the reward is the verifier's graded score, the reward model's
//!    score, or both (`reward`, as in PPO). The rewards are summed over the group of ranks, so
//!    every rank sees all of them.
//! 3. **Advantages** per group of G: `A = (r − mean) / (std + ε)` with the unbiased std and
//!    `ε = 1e-4`, the same for every token of an answer. A group whose rewards are all equal
//!    has no signal (A = 0): the share of such groups is logged.
//! 4. **Updates.** `epochs` passes over the answers, each cut into `minibatches` (PPO's seeded
//!    permutation); each minibatch is one optimizer step of
//!    `Σ_tokens [clipped surrogate + β·k3 − entropy_coef·H] / (answer tokens of the minibatch)`,
//!    where `k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1` is the unbiased per-token KL
//!    estimator (token-level mean over the group, as the other phases' losses).
//!
//! A checkpoint holds the policy and its optimizer (the usual model files, so `liandan chat`
//! reads it) and the last step's statistics; the rollouts are a function of the step, so a
//! resumed phase continues exactly.

use serde::{Deserialize, Serialize};

use super::driver::{Ctx, Run, Start, StepOut, drive, optimizer_shard, start_replica};
use super::ppo::losses::{PolicyStats, k3, policy_loss_grad};
use super::ppo::rollout::{PpoPrompt, Rollout, answer_logps, padded, sample};
use super::ppo::{load_reward_head, load_role, minibatch, shuffle_for_epoch, to_json};
use super::sft::load_tokenizer;
use super::{PhaseError, PhaseIo, PhaseOutcome, PhaseStep};
use crate::engine::head::ScalarHead;
use crate::engine::{Engine, Model, Replica};
use crate::generate::SamplingConfig;
use crate::ledger::Ledger;
use crate::plan::{GrpoSettings, PhasePlan, RewardSource};
use crate::train::TrainConfig;
use liandan_data::tokenizer::ChatTokenizer;
use liandan_plan::inputs::grpo_settings;
use liandan_plan::inputs::prompts::grpo_prompts;

/// The metrics of the step that wrote the checkpoint.
pub const EVAL_FILE: &str = liandan_plan::checkpoint::eval_files::GRPO;

/// ε of the advantage's denominator `std + ε`: a group with all-equal rewards gets A = 0.
pub const ADV_EPS: f64 = 1e-4;

/// Whole-group means of one GRPO step, reported with the step and saved with checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpoStepStats {
    pub step: u64,
    /// Mean reward of an answer.
    pub reward: f64,
    /// Mean over groups of the rewards' (unbiased) standard deviation within the group.
    pub reward_std: f64,
    /// Share of groups whose G rewards are all equal (no learning signal).
    pub zero_signal: f64,
    /// Mean reward-model score (0 when the reward is the verifier alone).
    pub rm_score: f64,
    /// Mean Σ_t k3 per answer at the rollouts (the KL estimate to the reference), nats.
    pub kl: f64,
    /// Share of answer tokens whose ratio left 1 ± ε, over all epochs and minibatches.
    pub clip_frac: f64,
    /// Mean policy entropy per answer token, nats.
    pub entropy: f64,
    pub policy_loss: f64,
    /// Share of form-requesting prompts' answers that pass the verifier exactly.
    pub verifier_pass: f64,
    /// Mean graded verifier score over form-requesting prompts' answers.
    pub verifier_score: f64,
    /// Mean answer length, tokens.
    pub answer_tokens: f64,
}

impl GrpoStepStats {
    pub fn values(&self) -> Vec<(String, f64)> {
        [
            ("reward", self.reward),
            ("reward_std", self.reward_std),
            ("zero_signal", self.zero_signal),
            ("rm_score", self.rm_score),
            ("kl", self.kl),
            ("clip_frac", self.clip_frac),
            ("entropy", self.entropy),
            ("verifier_pass", self.verifier_pass),
            ("verifier_score", self.verifier_score),
            ("answer_tokens", self.answer_tokens),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Group-relative advantages of `rewards` (groups of `g` consecutive answers):
/// `(r − mean) / (std + ADV_EPS)` with the unbiased std of the group. Also returns each
/// group's std and whether its rewards are all equal.
pub fn group_advantages(rewards: &[f32], g: usize) -> (Vec<f32>, Vec<(f64, bool)>) {
    let mut adv = Vec::with_capacity(rewards.len());
    let mut groups = Vec::with_capacity(rewards.len() / g.max(1));
    for grp in rewards.chunks(g.max(1)) {
        let n = grp.len() as f64;
        let mean = grp.iter().map(|&r| r as f64).sum::<f64>() / n;
        let var = grp.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let std = var.sqrt();
        let equal = grp.iter().all(|&r| r == grp[0]);
        // All equal: exactly zero (not a rounding residue of r − mean).
        adv.extend(grp.iter().map(|&r| if equal { 0.0 } else { ((r as f64 - mean) / (std + ADV_EPS)) as f32 }));
        groups.push((std, equal));
    }
    (adv, groups)
}

/// GRPO's loss for one answer token, `max(−A·ρ, −A·clip(ρ, 1 ± ε)) + β·k3`: `(loss, d/d log π)`
/// (what [`policy_loss_grad`] sums over the tokens; here for one token, as a reference).
pub fn token_loss(logp: f32, old_logp: f32, ref_logp: f32, adv: f32, eps: f32, beta: f32) -> (f64, f32) {
    let (s, ds, _) = super::ppo::clipped_surrogate(logp, old_logp, adv, eps);
    let (kl, dkl) = k3(logp, ref_logp);
    (s + beta as f64 * kl, ds + beta * dkl)
}

/// The models on one rank: the trained policy, the frozen reference, and the frozen reward
/// model when the reward needs one.
struct GrpoStep {
    policy: Box<dyn Replica>,
    reference: Box<dyn Model>,
    reward: Option<RewardModel>,
    s: GrpoSettings,
    prompts: Vec<PpoPrompt>,
    ledger: Ledger,
    tk: ChatTokenizer,
    tok_bytes: Vec<u8>,
    seed: u64,
    /// Prompts per step.
    b_global: usize,
    t: usize,
    last: GrpoStepStats,
}

impl std::fmt::Debug for GrpoStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GrpoStep(G {}, {} prompts)", self.s.group_size, self.prompts.len())
    }
}

impl PhaseStep for GrpoStep {
    fn primary(&mut self) -> &mut dyn Replica {
        self.policy.as_mut()
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError> {
        let (step, rank, world) = (ctx.step(), ctx.rank(), ctx.world());
        let (s, t) = (&self.s, self.t);
        let g = s.group_size;
        let n = self.b_global * g;
        let pad = self.tk.special.pad;
        let cfg = self.policy.model_ref().config().clone();
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size);
        let inv_temp = 1.0 / s.temperature;
        // 1. This rank's share of the step's B·G answers: answer j answers prompt slot j / G.
        let slots = self.ledger.step_offsets(step);
        let mine: Vec<(usize, usize)> = Ledger::share(n, rank, world).map(|j| (j, slots[j / g])).collect();
        let base =
            SamplingConfig { max_new_tokens: s.max_new_tokens, temperature: s.temperature, top_k: 0, top_p: 1.0, seed: 0, stop_tokens: self.tk.stop_tokens(), greedy: false };
        let mut rolls = sample(self.policy.model_ref(), &self.prompts, &mine, &self.tk, &base, t, self.seed, step)?;
        // 2. Log-probs of the policy and the reference, rewards.
        if !rolls.is_empty() {
            let rows: Vec<&Rollout> = rolls.iter().collect();
            let old = answer_logps(self.policy.model(), &rows, t, pad, inv_temp)?;
            let refs = answer_logps(self.reference.as_mut(), &rows, t, pad, inv_temp)?;
            let rm = match &mut self.reward {
                Some((model, head)) => {
                    let convs: Vec<&Vec<u32>> = rows.iter().map(|r| &r.ids).collect();
                    super::reward::scores(model.as_mut(), head, &convs, t, pad)?
                }
                None => vec![0.0; rows.len()],
            };
            for (((r, (old_logp, entropy)), (ref_logp, _)), rm) in rolls.iter_mut().zip(old).zip(refs).zip(rm) {
                r.reward = match s.reward {
                    RewardSource::Model => rm,
                    RewardSource::Verifier => r.verifier,
                    RewardSource::Both => rm + s.verifier_weight * r.verifier,
                };
                (r.old_logp, r.ref_logp, r.rm_score, r.entropy) = (old_logp, ref_logp, rm, entropy);
            }
        }
        // 3. Every answer's reward and length on every rank (one non-zero per entry: exact),
        // then the group-relative advantages.
        let mut rewards = vec![0.0f32; n];
        let mut lens = vec![0.0f32; n];
        for r in &rolls {
            rewards[r.global] = r.reward;
            lens[r.global] = r.answer_len() as f32;
        }
        ctx.sum_buf(&mut rewards)?;
        ctx.sum_buf(&mut lens)?;
        let (adv, groups) = group_advantages(&rewards, g);
        for r in &mut rolls {
            r.adv = vec![adv[r.global]; r.answer_len()];
        }
        let sum = |f: &dyn Fn(&Rollout) -> f64| rolls.iter().map(f).sum::<f64>();
        let mut totals = [
            sum(&|r| r.rm_score as f64),
            sum(&|r| r.old_logp.iter().zip(&r.ref_logp).map(|(&a, &b)| k3(a, b).0).sum()),
            sum(&|r| r.entropy),
            sum(&|r| r.verifier as f64),
            sum(&|r| r.passed as u8 as f64),
            sum(&|r| r.has_form as u8 as f64),
            sum(&|r| r.ids.len() as f64),
        ];
        ctx.sum_each(&mut totals)?;
        let [rm_sum, kl_sum, ent_sum, ver_sum, passed, forms, all_tokens] = totals;
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        // 4. Epochs of minibatch updates of the policy.
        let lr = ctx.lr();
        let mut acc = [0.0f64; 2]; // policy loss, clipped tokens
        let mut grad_norm = 0.0;
        let mut order: Vec<usize> = (0..n).collect();
        for epoch in 0..s.epochs {
            shuffle_for_epoch(&mut order, self.seed, step, epoch);
            for mb in 0..s.minibatches {
                let members = minibatch(&order, mb, s.minibatches);
                let denom = members.iter().map(|&j| lens[j]).sum::<f32>().max(1.0);
                let rows: Vec<&Rollout> = members.iter().filter_map(|&j| rolls.iter().find(|r| r.global == j)).collect();
                self.policy.model().zero_grad()?;
                let mut local = [0.0f64; 2];
                if !rows.is_empty() {
                    let policy = self.policy.model();
                    policy.forward(&padded(&rows, t, pad), rows.len(), t)?;
                    let mut st = PolicyStats::default();
                    policy.backward_from_logits(&mut |logits| st = policy_loss_grad(logits, &rows, t, v, vp, inv_temp, s.clip, s.entropy_coef, s.kl_coef, denom))?;
                    local = [st.loss, st.clipped];
                }
                ctx.sum_each(&mut local)?;
                let u = ctx.update(&mut [(self.policy.as_mut(), lr)], &mut [], local[0])?;
                grad_norm = u.norm;
                acc.iter_mut().zip(local).for_each(|(a, b)| *a += b);
            }
        }
        let answers = n as f64;
        let stats = GrpoStepStats {
            step: step + 1,
            reward: rewards.iter().map(|&r| r as f64).sum::<f64>() / answers,
            reward_std: groups.iter().map(|(sd, _)| sd).sum::<f64>() / groups.len().max(1) as f64,
            zero_signal: groups.iter().filter(|(_, eq)| *eq).count() as f64 / groups.len().max(1) as f64,
            rm_score: rm_sum / answers,
            kl: kl_sum / answers,
            clip_frac: acc[1] / (tokens * s.epochs as f64).max(1.0),
            entropy: ent_sum / tokens.max(1.0),
            policy_loss: acc[0] / (s.epochs * s.minibatches) as f64,
            verifier_pass: passed / forms.max(1.0),
            verifier_score: ver_sum / forms.max(1.0),
            answer_tokens: tokens / answers,
        };
        if rank == 0 {
            tracing::info!(
                step = step + 1,
                reward = stats.reward,
                reward_std = stats.reward_std,
                zero_signal = stats.zero_signal,
                kl = stats.kl,
                verifier_pass = stats.verifier_pass,
                clip_frac = stats.clip_frac,
                "grpo step"
            );
        }
        // Rank 0's first answers: the first group's, so the dashboard shows answers to one prompt side by side.
        let samples = if rank == 0 { super::ppo::rollout::samples(&rolls, &self.tk, super::SAMPLES_PER_STEP) } else { Vec::new() };
        let out = StepOut { loss: stats.policy_loss, grad_norm, tokens: all_tokens as u64, values: stats.values(), samples };
        self.last = stats;
        Ok(out)
    }

    fn boundary_files(&mut self, _step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        Ok(vec![(super::pretrain::TOKENIZER_FILE.to_string(), self.tok_bytes.clone()), (EVAL_FILE.to_string(), to_json(&self.last))])
    }
}

/// A frozen reward model and its scalar head.
type RewardModel = (Box<dyn Model>, ScalarHead);

/// The reward model, when the reward needs one: its checkpoint and scalar head.
fn reward_model(plan: &PhasePlan, engine: &dyn Engine, s: &GrpoSettings, b: usize) -> Result<Option<RewardModel>, PhaseError> {
    if !s.needs_reward_model() {
        return Ok(None);
    }
    let dir = plan
        .reward_checkpoint
        .as_deref()
        .ok_or_else(|| PhaseError::Plan(format!("grpo.reward = {:?} needs a reward model: a reward phase before it, or `reward_checkpoint`", s.reward).to_lowercase()))?;
    let ck = load_role(dir, "reward model", plan)?;
    let head = load_reward_head(dir, &ck.state)?;
    let mut m = engine.model(&plan.model, b, plan.seq_len)?;
    m.set_params(&ck.params)?;
    Ok(Some((m, head)))
}

/// Runs (or resumes) the GRPO phase on this rank: the policy starts from `plan.init_checkpoint`
/// (the SFT model, also the frozen reference), the reward model (if the reward needs one) from
/// `plan.reward_checkpoint`.
pub fn run_grpo(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let world = io.coll.world();
    let s = grpo_settings(plan)?;
    let reference_dir =
        plan.init_checkpoint.clone().ok_or_else(|| PhaseError::Plan("a grpo phase starts from an SFT checkpoint (the policy and its frozen reference); none was given".into()))?;
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let t = plan.seq_len;
    let prompts = grpo_prompts(plan, &tk, &s)?;
    let b_global = plan.global_batch;
    let b_max = (b_global * s.group_size).div_ceil(world).max(1);
    let ref_ck = load_role(&reference_dir, "reference (SFT)", plan)?;
    let mut reference = io.engine.model(&plan.model, b_max, t)?;
    reference.set_params(&ref_ck.params)?;
    let reward = reward_model(plan, io.engine, &s, b_max)?;
    let mut policy = io.engine.replica(&plan.model, b_max, t, &plan.adamw(), optimizer_shard(plan, &*io.coll))?;
    let first = match start {
        Start::Fresh => {
            policy.model().set_params(&ref_ck.params)?;
            0
        }
        _ => start_replica(policy.as_mut(), plan, start)?.0,
    };
    let file = plan.examples.clone().unwrap_or_default();
    let ledger = Ledger::over_rows(prompts.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no prompts", file.display())))?;
    let train_config = TrainConfig { batch_size: b_max, seq_len: t, grad_accum: 1, schedule: plan.schedule(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let mut phase = GrpoStep { policy, reference, reward, s, prompts, ledger, tk, tok_bytes, seed: plan.seed, b_global, t, last: GrpoStepStats::default() };
    let run = Run { plan, checkpoint_dir: io.checkpoint_dir, coll: io.coll, abort: io.abort, events: io.events, train_config, tokenizer: super::pretrain::TOKENIZER_FILE };
    drive(run, &mut phase, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_advantages_match_hand_computed_values() {
        // Group 1: rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(4·0.25/3) = 0.5773503.
        // Group 2: all 0.3: no signal, A = 0 exactly.
        let (adv, groups) = group_advantages(&[1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3], 4);
        let a = 0.5 / (0.577_350_269_189_625_8 + 1e-4);
        let want = [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0];
        for (x, w) in adv.iter().zip(want) {
            assert!((*x as f64 - w).abs() < 1e-6, "{adv:?} vs {want:?}");
        }
        assert!(adv[4..].iter().all(|&x| x == 0.0));
        assert!((groups[0].0 - 0.577_350_269_189_625_8).abs() < 1e-12 && !groups[0].1);
        assert!(groups[1].0 < 1e-7 && groups[1].1);
        // G = 3: 2, 5, 8: mean 5, std 3 → A = ∓3/3.0001, 0.
        let (adv, _) = group_advantages(&[2.0, 5.0, 8.0], 3);
        assert!((adv[0] as f64 + 3.0 / 3.0001).abs() < 1e-6 && adv[1] == 0.0 && (adv[2] as f64 - 3.0 / 3.0001).abs() < 1e-6, "{adv:?}");
    }

    #[test]
    fn the_token_loss_matches_hand_computed_values() {
        // log π = −1.0, log π_old = −1.1 (ρ = e^0.1 = 1.1051709, inside 1 ± 0.2), log π_ref = −1.5,
        // A = 2, β = 0.04: d = ref − logp = −0.5, k3 = e^−0.5 + 0.5 − 1 = 0.1065307;
        // loss = −2·1.1051709 + 0.04·0.1065307 = −2.2060806;
        // d/dlogπ = −2·1.1051709 + 0.04·(1 − e^−0.5) = −2.1946033.
        let (l, g) = token_loss(-1.0, -1.1, -1.5, 2.0, 0.2, 0.04);
        assert!((l + 2.206_080_6).abs() < 1e-6, "{l}");
        assert!((g as f64 + 2.194_603_3).abs() < 1e-5, "{g}");
        // The k3 estimator itself: 0 where π = π_ref, never negative.
        assert_eq!(k3(-0.7, -0.7), (0.0, 0.0));
        let (kl, dkl) = k3(-2.0, -1.0);
        assert!((kl - (1f64.exp() - 2.0)).abs() < 1e-12 && (dkl as f64 - (1.0 - 1f64.exp())).abs() < 1e-6, "{kl} {dkl}");
        // ρ = e^0.5 > 1.2 with A > 0: the surrogate is clipped (no gradient); only the KL pulls.
        let (l, g) = token_loss(-0.5, -1.0, -0.5, 1.0, 0.2, 0.04);
        assert!((l + 1.2).abs() < 1e-6 && g == 0.0, "{l} {g}");
    }

    #[test]
    fn the_settings_refuse_a_group_of_one_and_bad_coefficients() {
        let bad = |s: GrpoSettings| s.validate().unwrap_err();
        assert_eq!(bad(GrpoSettings { group_size: 1, ..Default::default() }).0, "group_size");
        assert!(bad(GrpoSettings { group_size: 1, ..Default::default() }).1.contains("must be in 2..="));
        assert_eq!(bad(GrpoSettings { kl_coef: f32::NAN, ..Default::default() }).0, "kl_coef");
        assert_eq!(bad(GrpoSettings { kl_coef: -0.1, ..Default::default() }).0, "kl_coef");
        assert_eq!(bad(GrpoSettings { clip: 0.0, ..Default::default() }).0, "clip");
        GrpoSettings::default().validate().unwrap();
    }
}
