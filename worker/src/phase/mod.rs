//! Phases as workers run them, one rank of a data-parallel group each.
//!
//! # Layout
//! - [`driver`]: the one training loop (start, abort, updates, divergence, metrics, checkpoint
//!   boundaries, commit and regroup) that every phase runs through.
//! - [`pretrain`], [`sft`], [`reward`], [`ppo`], [`grpo`], [`dpo`]: each phase's own step logic
//!   and data.
//! - [`data`]: the data pipeline's stages, this rank's share of their tasks.

pub mod data;
pub mod dpo;
pub mod driver;
pub mod grpo;
pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod sft;

pub use driver::{PhaseStep, Start};
/// What a worker would refuse about a phase's inputs (the coordinator runs it at submit).
pub use liandan_plan::inputs::check as check_inputs;

use std::path::PathBuf;

/// The files in which phases record an evaluation of their checkpoint (SFT validation loss,
/// reward-model held-out accuracy, PPO and GRPO step statistics, DPO held-out accuracy).
pub const EVAL_FILES: [&str; 5] = liandan_plan::checkpoint::eval_files::ALL;

/// Metrics of one optimizer step over the whole group.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Steps completed (1-based).
    pub step: u64,
    /// Mean loss over the global batch, nats per token.
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    /// Tokens of the global batch.
    pub tokens: u64,
    pub step_ms: u64,
    /// Phase-specific values (ppo: reward, kl, clip_frac, entropy, value_loss, verifier_pass, …;
    /// grpo: reward, reward_std, zero_signal, kl, …; dpo: margin, chosen_drift, heldout_accuracy, …).
    pub values: Vec<(String, f64)>,
    /// A few of the step's sampled answers (RL phases, rank 0's share), to look at.
    pub samples: Vec<RolloutSample>,
}

/// One sampled answer of an RL step, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutSample {
    /// The prompt and the answer, decoded (special tokens dropped).
    pub prompt: String,
    pub answer: String,
    /// The reward the policy was trained on, and the learned reward model's score.
    pub reward: f64,
    pub rm_score: f64,
    /// The verifier's graded score, and whether it passes strictly; None when the prompt asks
    /// for no form.
    pub verifier: Option<(f64, bool)>,
    /// Σ over the answer of `log π − log π_ref`, nats.
    pub kl: f64,
}

/// Samples an RL step reports, at most.
pub const SAMPLES_PER_STEP: usize = 4;

/// How a phase talks to the outside (the coordinator, or a test).
pub trait PhaseEvents {
    /// Rank 0 finished a step.
    fn step(&mut self, m: StepMetrics);
    /// Rank 0 wrote a complete checkpoint. `Ok(true)`: the group re-forms at this boundary, so
    /// stop here.
    fn checkpoint(&mut self, step: u64, path: &std::path::Path) -> Result<bool, String>;
}

/// What a phase talks to besides its plan: where rank 0 writes `step-N` checkpoints, the
/// device its models live on, the group's collective, the abort flag that ends the generation,
/// and the coordinator (or a test).
pub struct PhaseIo<'a> {
    pub checkpoint_dir: &'a std::path::Path,
    pub engine: &'a dyn crate::engine::Engine,
    pub coll: &'a mut dyn crate::collective::Collective,
    pub abort: &'a std::sync::atomic::AtomicBool,
    pub events: &'a mut dyn PhaseEvents,
}

impl std::fmt::Debug for PhaseIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PhaseIo({}, {}, rank {} of {})", self.checkpoint_dir.display(), self.engine.name(), self.coll.rank(), self.coll.world())
    }
}

/// A phase's entry point on one rank.
pub type PhaseFn = fn(&crate::plan::PhasePlan, Start<'_>, PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError>;

/// The entry point of a phase kind.
pub fn entry(kind: crate::plan::PhaseKind) -> PhaseFn {
    use crate::plan::PhaseKind;
    match kind {
        PhaseKind::Data => data::run_data,
        PhaseKind::Pretrain => pretrain::run_pretrain,
        PhaseKind::Sft => sft::run_sft,
        PhaseKind::Reward => reward::run_reward,
        PhaseKind::Ppo => ppo::run_ppo,
        PhaseKind::Grpo => grpo::run_grpo,
        PhaseKind::Dpo => dpo::run_dpo,
    }
}

/// How a phase ended on this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseOutcome {
    /// All steps done; rank 0 returns the final checkpoint.
    Finished { final_checkpoint: Option<PathBuf> },
    /// Stopped at a checkpoint boundary because the group re-forms.
    Regroup,
    /// The generation ended under us (the abort flag).
    Aborted,
    /// The group broke (a peer vanished or stopped answering) before the coordinator announced
    /// a new generation; the runtime waits for the coordinator's decision.
    GroupBroken { reason: String },
}

/// Why a phase failed.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Engine(#[from] crate::EngineError),
    #[error("data: {0}")]
    Data(String),
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    #[error("checkpoint commit: {0}")]
    Commit(String),
    /// A step's loss or gradient norm was not finite (and no more steps may be skipped), or the
    /// weights are not finite at a checkpoint.
    #[error("diverged at step {step}: {detail}")]
    Diverged { step: u64, detail: String },
    #[error("{0}")]
    Plan(String),
}

/// Steps whose loss or gradient norm is not finite: the phase fails at the first one, or skips
/// up to the plan's `max_skipped_steps` (no update; counted and reported as `skipped_steps`).
/// Every rank sees the same all-reduced loss and norm, so every rank decides the same.
#[derive(Debug, Clone)]
pub(crate) struct Divergence {
    max_skipped: u64,
    pub skipped: u64,
}

impl Divergence {
    pub fn new(plan: &crate::plan::PhasePlan) -> Self {
        Divergence { max_skipped: plan.max_skipped_steps, skipped: 0 }
    }

    /// `Ok(true)`: take step `step` (1-based); `Ok(false)`: skip it; `Err`: the phase fails.
    pub fn check(&mut self, step: u64, loss: f64, grad_norm: f32) -> Result<bool, PhaseError> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(true);
        }
        if self.skipped < self.max_skipped {
            self.skipped += 1;
            tracing::warn!(step, loss, grad_norm, skipped = self.skipped, "non-finite loss or gradient norm: step skipped");
            return Ok(false);
        }
        let allowed = if self.max_skipped == 0 { String::new() } else { format!(" after skipping {} such steps (max_skipped_steps)", self.skipped) };
        Err(PhaseError::Diverged {
            step,
            detail: format!("the loss is {loss} and the gradient norm {grad_norm}{allowed}; lower lr, raise warmup, clip gradients, or allow skipped steps with max_skipped_steps"),
        })
    }

    /// The values to report with a step.
    pub fn values(&self) -> Vec<(String, f64)> {
        if self.max_skipped == 0 { Vec::new() } else { vec![("skipped_steps".to_string(), self.skipped as f64)] }
    }
}

/// Fails when any weight is not finite: no checkpoint with NaN weights is ever written.
pub(crate) fn check_weights(step: u64, params: &[f32]) -> Result<(), PhaseError> {
    match params.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(PhaseError::Diverged { step, detail: format!("weight {i} is {} (of {} weights); no checkpoint is written", params[i], params.len()) }),
    }
}

/// What a failed collective means for the phase: the generation ended (abort flag), or the group
/// broke before the coordinator said so; never the phase's own failure.
pub(crate) fn collective_outcome(e: crate::collective::CollectiveError, abort: &std::sync::atomic::AtomicBool) -> PhaseOutcome {
    use crate::collective::CollectiveError;
    match e {
        CollectiveError::Aborted { .. } => PhaseOutcome::Aborted,
        _ if abort.load(std::sync::atomic::Ordering::SeqCst) => PhaseOutcome::Aborted,
        other => PhaseOutcome::GroupBroken { reason: other.to_string() },
    }
}

/// Token sequences as `(b, t)` rows, each padded with `pad` to `t` (none is longer).
pub(crate) fn padded_rows<'a>(seqs: impl Iterator<Item = &'a [u32]>, t: usize, pad: u32) -> Vec<u32> {
    let mut tokens = Vec::new();
    for s in seqs {
        tokens.extend_from_slice(s);
        tokens.extend(std::iter::repeat_n(pad, t - s.len()));
    }
    tokens
}

impl From<liandan_plan::PlanError> for PhaseError {
    fn from(e: liandan_plan::PlanError) -> Self {
        PhaseError::Engine(e.into())
    }
}

impl From<liandan_plan::inputs::InputError> for PhaseError {
    fn from(e: liandan_plan::inputs::InputError) -> Self {
        use liandan_plan::inputs::InputError as I;
        match e {
            I::Data(s) => PhaseError::Data(s),
            I::Plan(s) => PhaseError::Plan(s),
        }
    }
}
