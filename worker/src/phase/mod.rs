//! Phases as workers run them, one rank of a data-parallel group each.

pub mod pretrain;
pub mod reward;
pub mod sft;

use std::path::PathBuf;

/// Metrics of one optimizer step over the whole group.
#[derive(Debug, Clone, Copy, PartialEq)]
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
}

/// How a phase talks to the outside (the coordinator, or a test).
pub trait PhaseEvents {
    /// Rank 0 finished a step.
    fn step(&mut self, m: StepMetrics);
    /// Rank 0 wrote a complete checkpoint. `Ok(true)`: the group re-forms at this boundary, so
    /// stop here.
    fn checkpoint(&mut self, step: u64, path: &std::path::Path) -> Result<bool, String>;
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
    #[error("{0}")]
    Plan(String),
}
