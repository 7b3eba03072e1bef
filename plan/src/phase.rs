//! What a worker is asked to run: the coordinator resolves a job spec's phase into a
//! [`PhasePlan`] and sends it as JSON with the assignment.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::memory::{self, MemoryEstimate};
use crate::training::{AdamWConfig, LrSchedule};

/// What a phase does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    /// The data pipeline, sharded over the group (the worker's `phase::data`).
    Data,
    Pretrain,
    Sft,
    Reward,
    Ppo,
    /// Group-relative policy optimisation (the worker's `phase::grpo`).
    Grpo,
    /// Direct preference optimisation (the worker's `phase::dpo`).
    Dpo,
}

impl PhaseKind {
    /// Whether [`PhasePlan::shard_optimizer`] applies: every phase that trains a model (ppo
    /// shards both the policy's and the value model's), not a data phase.
    pub fn can_shard_optimizer(self) -> bool {
        self != PhaseKind::Data
    }
}

/// One phase, resolved against its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhasePlan {
    pub kind: PhaseKind,
    pub model: GptConfig,
    /// A directory written by `liandan data prepare`.
    pub data_dir: PathBuf,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step over all ranks (fixed, whatever the world size); data: the most tasks in one stage (the most workers it can use).
    pub global_batch: usize,
    pub seq_len: usize,
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub grad_clip: f32,
    /// Seeds weight initialisation and the sample ledger's permutations.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// The phase's examples (JSONL): SFT pairs for sft, comparisons for reward.
    #[serde(default)]
    pub examples: Option<PathBuf>,
    /// The phase (index in the job) whose output this one starts from; `None` for a phase that
    /// starts from scratch or from an explicit checkpoint.
    #[serde(default)]
    pub from_phase: Option<usize>,
    /// ppo: the reward phase whose model scores the rollouts (when no explicit checkpoint is given).
    #[serde(default)]
    pub reward_phase: Option<usize>,
    /// The checkpoint this phase starts from when it is not a previous phase's output (`init` in
    /// the spec); for ppo also the frozen reference policy. Filled by the coordinator at
    /// assignment time from `from_phase` when that is set.
    #[serde(default)]
    pub init_checkpoint: Option<PathBuf>,
    /// ppo: the reward model's checkpoint (with `score_head.json`), from the spec or resolved by
    /// the coordinator from `reward_phase`.
    #[serde(default)]
    pub reward_checkpoint: Option<PathBuf>,
    /// ppo: the algorithm's settings.
    #[serde(default)]
    pub ppo: Option<PpoSettings>,
    /// grpo: the algorithm's settings.
    #[serde(default)]
    pub grpo: Option<GrpoSettings>,
    /// dpo: the algorithm's settings.
    #[serde(default)]
    pub dpo: Option<DpoSettings>,
    /// reward and dpo: which comparisons to train on.
    #[serde(default)]
    pub comparisons: ComparisonSource,
    /// sft, reward and dpo: only the examples (or comparisons) whose `task` is one of these;
    /// empty = all. (ppo and grpo take theirs in `ppo.tasks` and `grpo.tasks`.)
    #[serde(default)]
    pub tasks: Vec<String>,
    /// reward: the comparisons labelled through the coordinator (`liandan label`), exported to a
    /// JSONL file by the coordinator when the phase starts.
    #[serde(default)]
    pub labelled_examples: Option<PathBuf>,
    /// Steps with a non-finite loss or gradient norm skipped (no update) before the phase fails.
    #[serde(default)]
    pub max_skipped_steps: u64,
    /// The device kind the phase's workers must have ([`DEVICE_KINDS`]); None: any, one kind
    /// per group.
    #[serde(default)]
    pub device: Option<String>,
    /// data: the pipeline's settings (`out` is the job's prepared-data directory).
    #[serde(default)]
    pub prepare: Option<liandan_data::prepare::PrepareConfig>,
    /// The trained model's AdamW state sharded over the data-parallel ranks (ZeRO-1): each rank
    /// keeps `m` and `v` of its own `1/world` of the parameters, receives only that part of the
    /// summed gradients (a reduce-scatter) and all-gathers the updated parameters. Phases where
    /// [`PhaseKind::can_shard_optimizer`] holds.
    #[serde(default)]
    pub shard_optimizer: bool,
}

/// Device kinds a phase may require.
pub const DEVICE_KINDS: [&str; 3] = ["cpu", "cuda", "cuda-emu"];

/// The kind of a worker's device label: `cuda:3` → `cuda`; `cpu` and `cuda-emu` are their own.
pub fn device_kind(label: &str) -> &str {
    label.split(':').next().unwrap_or(label)
}

/// Where a reward phase's comparisons come from. Every comparison keeps its `label_source`
/// (`rule` or `human`), so a model trained on rule-derived ones is never passed off as human-aligned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComparisonSource {
    /// The phase's `data` file.
    #[default]
    File,
    /// Comparisons labelled through the coordinator (`liandan label`).
    Labelled,
    /// Both.
    Both,
}

/// What a PPO (or GRPO) phase rewards at the end of each answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardSource {
    /// The learned reward model's score.
    Model,
    /// The poem-form verifier's graded score (0..1) for prompts that ask for a form; 0 elsewhere.
    Verifier,
    /// The reward model's score plus `verifier_weight` × the verifier's.
    Both,
}

/// PPO settings (`[phases.ppo]` in a job spec). Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoSettings {
    /// The reward at the end of an answer: `model`, `verifier` or `both`.
    pub reward: RewardSource,
    /// Weight of the verifier's score under `both`.
    pub verifier_weight: f32,
    /// Only prompts of these tasks (the examples' `task` field); empty = all.
    pub tasks: Vec<String>,
    /// Longest sampled answer, tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature τ of the rollouts; the policy PPO optimises is softmax(logits/τ).
    pub temperature: f32,
    /// Passes over each rollout batch.
    pub epochs: usize,
    /// Minibatches per pass (each one optimizer step).
    pub minibatches: usize,
    /// PPO's ratio clip ε: the surrogate ignores ratios beyond 1 ± ε.
    pub clip: f32,
    /// Clip of the value update around the rollout's values.
    pub value_clip: f32,
    /// Discount γ.
    pub gamma: f32,
    /// GAE λ.
    pub lambda: f32,
    /// β of the per-token penalty −β·(log π − log π_ref).
    pub kl_coef: f32,
    /// With a target, β adapts toward it (nats per answer): β·(1 + clip(KL/target − 1, ±0.2)·B/horizon).
    pub kl_target: Option<f32>,
    pub kl_horizon: f32,
    /// Peak learning rate of the value model (default: the phase's `lr`).
    pub value_lr: Option<f32>,
    /// Weight of the entropy bonus.
    pub entropy_coef: f32,
}

impl Default for PpoSettings {
    fn default() -> Self {
        PpoSettings {
            reward: RewardSource::Model,
            verifier_weight: 1.0,
            tasks: Vec::new(),
            max_new_tokens: 48,
            temperature: 1.0,
            epochs: 2,
            minibatches: 1,
            clip: 0.2,
            value_clip: 0.2,
            gamma: 1.0,
            lambda: 0.95,
            kl_coef: 0.05,
            kl_target: None,
            kl_horizon: 10_000.0,
            value_lr: None,
            entropy_coef: 0.0,
        }
    }
}

/// Longest answer a rollout may sample.
pub const MAX_NEW_TOKENS: usize = 1 << 16;
/// Most epochs (or minibatches) per rollout batch.
pub const MAX_PASSES: usize = 1000;

impl PpoSettings {
    /// Checks every field: `Err((field, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let unit = |f: f32| (0.0..=1.0).contains(&f);
        let checks: [(&'static str, bool, &str); 11] = [
            ("verifier_weight", self.verifier_weight >= 0.0 && self.verifier_weight.is_finite(), "must be >= 0"),
            ("max_new_tokens", (1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens), "must be in 1..=65536"),
            ("temperature", self.temperature > 0.0 && self.temperature.is_finite(), "must be > 0"),
            ("epochs", (1..=MAX_PASSES).contains(&self.epochs), "must be in 1..=1000"),
            ("minibatches", (1..=MAX_PASSES).contains(&self.minibatches), "must be in 1..=1000"),
            ("clip", self.clip > 0.0 && self.clip < 1.0, "must be in (0, 1)"),
            ("value_clip", self.value_clip > 0.0 && self.value_clip.is_finite(), "must be > 0"),
            ("gamma", unit(self.gamma), "must be in [0, 1]"),
            ("lambda", unit(self.lambda), "must be in [0, 1]"),
            ("kl_coef", self.kl_coef >= 0.0 && self.kl_coef.is_finite(), "must be >= 0"),
            ("entropy_coef", self.entropy_coef >= 0.0 && self.entropy_coef.is_finite(), "must be >= 0"),
        ];
        for (field, ok, why) in checks {
            if !ok {
                return Err((field, why.to_string()));
            }
        }
        if let Some(t) = self.kl_target {
            if !(t > 0.0 && t.is_finite()) {
                return Err(("kl_target", format!("must be > 0, got {t}")));
            }
            if !(self.kl_horizon > 0.0) {
                return Err(("kl_horizon", "must be > 0".into()));
            }
        }
        if let Some(v) = self.value_lr
            && !(v > 0.0 && v.is_finite())
        {
            return Err(("value_lr", format!("must be > 0, got {v}")));
        }
        Ok(())
    }
}

/// GRPO settings (`[phases.grpo]` in a job spec). Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSettings {
    /// G, answers sampled per prompt (at least 2: the advantage is relative to the group).
    pub group_size: usize,
    /// The reward of an answer: `verifier` (default), `model` or `both` (as PPO's).
    pub reward: RewardSource,
    /// Weight of the verifier's score under `both`.
    pub verifier_weight: f32,
    /// Only prompts of these tasks (the examples' `task` field); empty = all.
    pub tasks: Vec<String>,
    /// Longest sampled answer, tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature τ; the policy GRPO optimises is softmax(logits/τ).
    pub temperature: f32,
    /// Passes over each rollout batch.
    pub epochs: usize,
    /// Minibatches per pass (each one optimizer step).
    pub minibatches: usize,
    /// The ratio clip ε.
    pub clip: f32,
    /// β of the per-token KL term β·k3 to the frozen reference (0: no KL term).
    pub kl_coef: f32,
    /// Weight of the entropy bonus.
    pub entropy_coef: f32,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        GrpoSettings {
            group_size: 4,
            reward: RewardSource::Verifier,
            verifier_weight: 1.0,
            tasks: Vec::new(),
            max_new_tokens: 48,
            temperature: 1.0,
            epochs: 1,
            minibatches: 1,
            clip: 0.2,
            kl_coef: 0.04,
            entropy_coef: 0.0,
        }
    }
}

/// Largest group a GRPO phase samples per prompt.
pub const MAX_GROUP: usize = 1024;

impl GrpoSettings {
    /// Checks every field: `Err((field, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let checks: [(&'static str, bool, String); 9] = [
            ("group_size", (2..=MAX_GROUP).contains(&self.group_size), format!("must be in 2..={MAX_GROUP} (advantages are relative to the group), got {}", self.group_size)),
            ("verifier_weight", self.verifier_weight >= 0.0 && self.verifier_weight.is_finite(), format!("must be finite and >= 0, got {}", self.verifier_weight)),
            ("max_new_tokens", (1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens), "must be in 1..=65536".into()),
            ("temperature", self.temperature > 0.0 && self.temperature.is_finite(), format!("must be finite and > 0, got {}", self.temperature)),
            ("epochs", (1..=MAX_PASSES).contains(&self.epochs), "must be in 1..=1000".into()),
            ("minibatches", (1..=MAX_PASSES).contains(&self.minibatches), "must be in 1..=1000".into()),
            ("clip", self.clip > 0.0 && self.clip < 1.0, format!("must be in (0, 1), got {}", self.clip)),
            ("kl_coef", self.kl_coef >= 0.0 && self.kl_coef.is_finite(), format!("must be finite and >= 0, got {}", self.kl_coef)),
            ("entropy_coef", self.entropy_coef >= 0.0 && self.entropy_coef.is_finite(), format!("must be finite and >= 0, got {}", self.entropy_coef)),
        ];
        for (field, ok, why) in checks {
            if !ok {
                return Err((field, why));
            }
        }
        Ok(())
    }

    /// Whether the reward needs a reward model.
    pub fn needs_reward_model(&self) -> bool {
        self.reward != RewardSource::Verifier
    }
}

/// DPO settings (`[phases.dpo]` in a job spec); the comparisons come from `data` and
/// `comparisons` as for a reward phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSettings {
    /// β: the strength of the implicit KL to the reference; the loss is
    /// −log σ(β·((log π_c − log π_ref,c) − (log π_r − log π_ref,r))).
    pub beta: f32,
}

impl Default for DpoSettings {
    fn default() -> Self {
        DpoSettings { beta: 0.1 }
    }
}

impl DpoSettings {
    /// Checks every field: `Err((field, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(("beta", format!("must be finite and > 0, got {}", self.beta)));
        }
        Ok(())
    }
}

impl PhasePlan {
    /// Memory one rank needs when the group has `world` ranks (so the largest share of the
    /// global batch), from the models the phase holds: pretrain and sft one trained model;
    /// reward one trained model on chosen and rejected rows together; ppo a trained policy and
    /// value model and a frozen reference and reward model. None when the sizes overflow.
    pub fn memory_per_rank(&self, world: usize) -> Option<MemoryEstimate> {
        let m = self.unsharded_memory_per_rank(world)?;
        // A sharded optimizer keeps its rank's share of the moments (the frozen models have none).
        if self.shard_optimizer && self.kind.can_shard_optimizer() { Some(MemoryEstimate { optimizer: m.optimizer.div_ceil(world.max(1) as u64), ..m }) } else { Some(m) }
    }

    fn unsharded_memory_per_rank(&self, world: usize) -> Option<MemoryEstimate> {
        let b = self.global_batch.div_ceil(world.max(1)).max(1);
        let t = self.seq_len;
        let trained = |b| memory::gpt(&self.model, b, t, true);
        match self.kind {
            // The pipeline holds at most its budget, whatever the model.
            PhaseKind::Data => Some(MemoryEstimate { activations: self.prepare.as_ref().map_or(0, |c| c.memory_budget), ..Default::default() }),
            PhaseKind::Pretrain | PhaseKind::Sft => trained(b),
            PhaseKind::Reward => trained(b.checked_mul(2)?),
            PhaseKind::Ppo => {
                let frozen = memory::gpt(&self.model, b, t, false)?;
                trained(b)?.plus(trained(b)?)?.plus(frozen)?.plus(frozen)
            }
            // G answers per prompt: a trained policy, the frozen reference and, when the reward
            // needs it, the frozen reward model, each over this rank's share of the answers.
            PhaseKind::Grpo => {
                let s = self.grpo.clone().unwrap_or_default();
                let b = self.global_batch.checked_mul(s.group_size)?.div_ceil(world.max(1)).max(1);
                let frozen = memory::gpt(&self.model, b, t, false)?;
                let policy = trained(b)?.plus(frozen)?;
                if s.needs_reward_model() { policy.plus(frozen) } else { Some(policy) }
            }
            PhaseKind::Dpo => trained(b.checked_mul(2)?),
        }
    }

    /// The models a rank of this phase holds, `(trained, frozen)`, as [`Self::memory_per_rank`]
    /// counts them: ppo trains the policy and the value model and keeps the reference and the
    /// reward model frozen; grpo trains the policy against a frozen reference (and a frozen
    /// reward model when its reward needs one); a data phase holds none.
    pub fn models(&self) -> (usize, usize) {
        match self.kind {
            PhaseKind::Data => (0, 0),
            PhaseKind::Pretrain | PhaseKind::Sft | PhaseKind::Reward | PhaseKind::Dpo => (1, 0),
            PhaseKind::Ppo => (2, 2),
            PhaseKind::Grpo => (1, if self.grpo.clone().unwrap_or_default().needs_reward_model() { 2 } else { 1 }),
        }
    }

    /// The sequences each model of a rank is sized for at `world` ranks, as
    /// [`Self::memory_per_rank`] sizes them: the rank's share of the global batch, twice that
    /// for reward and dpo (a chosen and a rejected answer per pair), G times for grpo.
    pub fn sequences_per_rank(&self, world: usize) -> Option<usize> {
        let share = |n: usize| n.div_ceil(world.max(1)).max(1);
        match self.kind {
            PhaseKind::Data => Some(0),
            PhaseKind::Pretrain | PhaseKind::Sft | PhaseKind::Ppo => Some(share(self.global_batch)),
            PhaseKind::Reward | PhaseKind::Dpo => share(self.global_batch).checked_mul(2),
            PhaseKind::Grpo => Some(share(self.global_batch.checked_mul(self.grpo.clone().unwrap_or_default().group_size)?)),
        }
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { max_lr: self.max_lr, min_lr: self.min_lr, warmup_steps: self.warmup, total_steps: self.steps }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { weight_decay: self.weight_decay, ..Default::default() }
    }
}
