//! What a worker is asked to run: the coordinator resolves a job spec's phase into a
//! [`PhasePlan`] and sends it as JSON with the assignment.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::config::GptConfig;
use crate::optim::{AdamWConfig, LrSchedule};

/// What a phase does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    Pretrain,
    Sft,
    Reward,
    Ppo,
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
    /// Sequences per step over all ranks (fixed, whatever the world size).
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
}

impl PhasePlan {
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { max_lr: self.max_lr, min_lr: self.min_lr, warmup_steps: self.warmup, total_steps: self.steps }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { weight_decay: self.weight_decay, ..Default::default() }
    }
}
