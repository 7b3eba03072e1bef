//! How a model is trained, as checkpoints record it: AdamW's hyper-parameters, the
//! learning-rate schedule, and the single-process training config.

use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::error::{PlanError, Result};

/// Hyper-parameters of AdamW (PyTorch's defaults except `beta2`, which follows GPT-3/nanoGPT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied only to matrices and embeddings (see [`ParamKind::decays`]).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(PlanError::InvalidConfig { field, reason: format!("must be in [0, 1), got {v}") });
            }
        }
        if !(self.eps > 0.0) {
            return Err(PlanError::InvalidConfig { field: "eps", reason: format!("must be > 0, got {}", self.eps) });
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(PlanError::InvalidConfig { field: "weight_decay", reason: format!("must be >= 0, got {}", self.weight_decay) });
        }
        Ok(())
    }
}

/// Cosine learning-rate schedule with linear warmup (as llm.c and nanoGPT):
/// step `s < W`: `max·(s+1)/W`; then cosine from `max` down to `min` at step `S`; `min` after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn validate(&self) -> Result<()> {
        if !(self.max_lr > 0.0 && self.max_lr.is_finite()) {
            return Err(PlanError::InvalidConfig { field: "max_lr", reason: format!("must be > 0, got {}", self.max_lr) });
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.max_lr) {
            return Err(PlanError::InvalidConfig { field: "min_lr", reason: format!("must be in [0, max_lr={}], got {}", self.max_lr, self.min_lr) });
        }
        Ok(())
    }

    /// The learning rate of step `s` (0-based).
    pub fn lr(&self, s: u64) -> f32 {
        let (w, total) = (self.warmup_steps, self.total_steps);
        if s < w {
            return self.max_lr * (s + 1) as f32 / w as f32;
        }
        if s >= total {
            return self.min_lr;
        }
        let ratio = (s - w) as f64 / (total - w) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        (self.min_lr as f64 + coeff * (self.max_lr - self.min_lr) as f64) as f32
    }
}

/// How a model is trained. Saved in every checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `B`: sequences per micro-batch.
    pub batch_size: usize,
    /// `T`: tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step; the step's batch is `grad_accum·B·T` tokens.
    pub grad_accum: usize,
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    /// Seeds weight initialisation (and anything else random in training).
    pub seed: u64,
}

impl TrainConfig {
    /// Checks every field against the model; the error names the field and the numbers.
    pub fn validate(&self, model: &GptConfig) -> Result<()> {
        if self.batch_size == 0 {
            return Err(PlanError::InvalidConfig { field: "batch_size", reason: "must be at least 1".into() });
        }
        if self.seq_len == 0 || self.seq_len > model.n_positions {
            return Err(PlanError::InvalidConfig { field: "seq_len", reason: format!("must be in 1..={} (the model's n_positions), got {}", model.n_positions, self.seq_len) });
        }
        if self.grad_accum == 0 {
            return Err(PlanError::InvalidConfig { field: "grad_accum", reason: "must be at least 1".into() });
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return Err(PlanError::InvalidConfig { field: "grad_clip", reason: format!("must be >= 0, got {}", self.grad_clip) });
        }
        self.schedule.validate()?;
        self.adamw.validate()
    }
}
