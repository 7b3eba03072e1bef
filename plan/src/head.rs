//! The scalar head `r = h·w + b` that reward and value models put on a final hidden state
//! `(C)`, its gradient, and its own Adam. Host-side: a head is `C + 1` numbers, and its input and
//! output gradient travel through the engine's `Model::hidden` and `Model::backward_from_hidden`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::error::{PlanError, Result};

/// File of the head inside a reward checkpoint.
pub const HEAD_FILE: &str = "score_head.json";

/// `r = h·w + b` on a `(C)` hidden state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalarHead {
    pub weight: Vec<f32>,
    pub bias: f32,
}

impl ScalarHead {
    /// A zero head on `c` channels.
    pub fn zeros(c: usize) -> Self {
        ScalarHead { weight: vec![0.0; c], bias: 0.0 }
    }

    pub fn score(&self, h: &[f32]) -> f32 {
        h.iter().zip(&self.weight).map(|(a, b)| a * b).sum::<f32>() + self.bias
    }

    /// Backward of `d·score(h)` at one position: writes `dh = d·w` and adds `d·h` (and `d` for the
    /// bias) into `grad` `(C + 1)`.
    pub fn backward(&self, h: &[f32], d: f32, dh: &mut [f32], grad: &mut [f32]) {
        let c = self.weight.len();
        for k in 0..c {
            dh[k] = d * self.weight[k];
            grad[k] += d * h[k];
        }
        grad[c] += d;
    }

    /// The head stored in the checkpoint at `dir` (a reward phase's output).
    ///
    /// # Errors
    /// The checkpoint has no head (it is not a reward model's), or the file is not a head of
    /// the model's width.
    pub fn load(dir: &Path, state: &checkpoint::CheckpointState) -> Result<ScalarHead> {
        let bytes = checkpoint::read_verified(dir, HEAD_FILE, state)
            .map_err(|e| PlanError::Checkpoint { path: dir.to_path_buf(), reason: format!("is not a reward-model checkpoint (a reward phase's output): {e}") })?;
        let head: ScalarHead = serde_json::from_slice(&bytes).map_err(|e| PlanError::checkpoint(dir.join(HEAD_FILE), e.to_string()))?;
        if head.weight.len() != state.model_config.n_embd {
            return Err(PlanError::checkpoint(dir.join(HEAD_FILE), format!("a head of {} weights on a model of {} channels", head.weight.len(), state.model_config.n_embd)));
        }
        Ok(head)
    }
}

/// Adam for a head (no weight decay on a 1-output head): update `t` (1-based) with gradient `g`.
pub fn adam_step(head: &mut ScalarHead, g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, t: u64) {
    let (b1, b2, eps) = (0.9f32, 0.95f32, 1e-8f32);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..g.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let upd = lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
        if i < head.weight.len() {
            head.weight[i] -= upd;
        } else {
            head.bias -= upd;
        }
    }
}
