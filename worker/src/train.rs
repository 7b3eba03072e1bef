//! One process's training loop pieces: the training config, micro-batches, a training step with
//! gradient accumulation, and a byte-stream batcher for plain text files.

use std::path::Path;

use crate::backend::cuda::cost;
use crate::collective::Collective;
use crate::engine::cpu::CpuReplica;
use crate::engine::{Model, Replica};
use crate::error::{EngineError, Result};
use crate::model::config::GptConfig;
use crate::model::gpt::{Gpt, loss_denominator};
use crate::model::profile::Cost;
use crate::optim::AdamW;
use crate::rng::Rng;
pub use liandan_plan::training::TrainConfig;

/// Inputs and targets of one micro-batch, `(B, T)` each; optional per-position loss weights.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub inputs: Vec<u32>,
    /// Next tokens, or [`crate::backend::cpu::crossentropy::IGNORE_INDEX`] where no loss is taken.
    pub targets: Vec<i32>,
    pub weights: Option<Vec<f32>>,
    pub b: usize,
    pub t: usize,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Index of the step just taken (0-based).
    pub step: u64,
    /// Mean loss over the step's counted positions.
    pub loss: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Tokens processed (all positions of all micro-batches).
    pub tokens: usize,
}

/// Forward, loss and backward of every micro-batch into `model`'s gradients (gradient
/// accumulation): each micro-batch's loss is divided by `denom`, the whole step's loss weight,
/// so the accumulated gradient is the gradient of the step's mean loss. Returns the summed loss
/// that stayed on the host (a device model keeps its part for [`Model::take_loss`], so no
/// micro-batch waits for the device) and the tokens processed.
pub fn accumulate(model: &mut dyn Model, micro: &[MicroBatch], denom: f32) -> Result<(f64, usize)> {
    let mut loss = 0.0f64;
    let mut tokens = 0;
    for mb in micro {
        model.forward(&mb.inputs, mb.b, mb.t)?;
        if let Some(l) = model.loss_deferred(&mb.targets, mb.weights.as_deref(), denom)? {
            loss += l as f64;
        }
        model.backward()?;
        tokens += mb.b * mb.t;
    }
    Ok((loss, tokens))
}

/// The training step of one process, on any device: gradients zeroed, accumulated over `micro`
/// (divided by `denom`), summed over `coll` when given, clipped to `clip` (0: not clipped) and
/// applied by AdamW at `lr`. Returns `(loss, norm before clipping, tokens)`. The phases use the
/// same pieces through the phase driver ([`crate::phase::driver`]).
pub fn replica_step(replica: &mut dyn Replica, micro: &[MicroBatch], denom: f32, coll: Option<&mut dyn Collective>, clip: f32, lr: f32) -> Result<(f64, f32, usize)> {
    replica.model().zero_grad()?;
    let (host_loss, tokens) = accumulate(replica.model(), micro, denom)?;
    let mut local = crate::collective::Local;
    let coll = coll.unwrap_or(&mut local);
    replica.all_reduce_grads(coll)?;
    let params = replica.model_ref().layout().len();
    let norm = timed_op(replica, "opt.clip", cost::global_norm(params, clip > 0.0), |r| r.clip(clip, coll))?;
    // Reading the norm waited for the whole backward, so the device's loss is ready: read it
    // now, while the device is idle, rather than wait once more after AdamW.
    let loss = host_loss + replica.model().take_loss()?;
    timed_op(replica, "opt.adamw", cost::adamw(params), |r| r.step(lr, coll))?;
    Ok((loss, norm, tokens))
}

/// Runs `f` on the replica, charging its time (after the device's queue drains) and `work` to
/// `op` when the model is profiling.
fn timed_op<T>(replica: &mut dyn Replica, op: &'static str, work: Cost, f: impl FnOnce(&mut dyn Replica) -> Result<T>) -> Result<T> {
    if replica.model().profile().is_none() {
        return f(replica);
    }
    let t0 = std::time::Instant::now();
    let r = f(&mut *replica)?;
    replica.model_ref().sync()?;
    if let Some(p) = replica.model().profile() {
        p.add_cost(op, t0.elapsed(), work);
    }
    Ok(r)
}

/// A CPU model, its optimizer and the training position.
#[derive(Debug)]
pub struct Trainer {
    pub replica: CpuReplica,
    pub config: TrainConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub rng: Rng,
}

impl std::ops::Deref for Trainer {
    type Target = CpuReplica;

    fn deref(&self) -> &CpuReplica {
        &self.replica
    }
}

impl std::ops::DerefMut for Trainer {
    fn deref_mut(&mut self) -> &mut CpuReplica {
        &mut self.replica
    }
}

impl Trainer {
    /// A fresh model initialised from `config.seed`.
    pub fn new(model_config: GptConfig, config: TrainConfig) -> Result<Self> {
        config.validate(&model_config)?;
        let mut rng = Rng::new(config.seed);
        let mut model = Gpt::new(model_config, config.batch_size, config.seq_len)?;
        model.init_weights(&mut rng);
        let opt = AdamW::new(config.adamw.clone(), &model.layout);
        Ok(Trainer { replica: CpuReplica::new(model, opt), config, step: 0, rng })
    }

    /// One optimizer step over `micro` ([`replica_step`]).
    pub fn train_step(&mut self, micro: &[MicroBatch]) -> Result<StepStats> {
        let denom = step_denominator(micro)?;
        let lr = self.config.schedule.lr(self.step);
        let (loss, grad_norm, tokens) = replica_step(&mut self.replica, micro, denom, None, self.config.grad_clip, lr)?;
        let stats = StepStats { step: self.step, loss: loss as f32, grad_norm, lr, tokens };
        self.step += 1;
        Ok(stats)
    }

    /// Mean loss over `micro` without touching gradients or the optimizer.
    pub fn eval_loss(&mut self, micro: &[MicroBatch]) -> Result<f32> {
        let denom = step_denominator(micro)?;
        let mut loss = 0.0f64;
        for mb in micro {
            self.model.forward(&mb.inputs, mb.b, mb.t)?;
            loss += self.model.loss(&mb.targets, mb.weights.as_deref(), denom, false)? as f64;
        }
        Ok(loss as f32)
    }
}

/// The whole step's loss weight, or why the step has none.
pub fn step_denominator(micro: &[MicroBatch]) -> Result<f32> {
    let denom = loss_denominator(micro.iter().map(|m| (&m.targets[..], m.weights.as_deref())));
    if denom > 0.0 { Ok(denom) } else { Err(EngineError::InvalidConfig { field: "batch", reason: "no position takes a loss (all targets ignored or weights zero)".into() }) }
}

/// Contiguous windows of a token stream: micro-batch `k` reads `B·T + 1` tokens from the cursor,
/// which then advances by `B·T` and wraps at the end. The cursor is the checkpoint's data cursor.
#[derive(Debug, Clone)]
pub struct TokenStream {
    tokens: Vec<u32>,
    /// Next token to read.
    pub cursor: usize,
}

impl TokenStream {
    /// A stream over `tokens`; needs at least `b·t + 1` of them.
    ///
    /// # Errors
    /// [`EngineError::Data`] naming `path` if the text is too short for one micro-batch.
    pub fn new(tokens: Vec<u32>, b: usize, t: usize, path: &Path) -> Result<Self> {
        if tokens.len() < b * t + 1 {
            return Err(EngineError::Data {
                path: path.to_path_buf(),
                reason: if tokens.is_empty() {
                    "is empty: nothing to train on".into()
                } else {
                    format!("has {} tokens; one micro-batch of B={b}, T={t} needs {}", tokens.len(), b * t + 1)
                },
            });
        }
        Ok(TokenStream { tokens, cursor: 0 })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The next `(B, T)` micro-batch with next-token targets.
    pub fn next_batch(&mut self, b: usize, t: usize) -> MicroBatch {
        let need = b * t + 1;
        if self.cursor + need > self.tokens.len() {
            self.cursor = 0;
        }
        let w = &self.tokens[self.cursor..self.cursor + need];
        let mb = MicroBatch { inputs: w[..b * t].to_vec(), targets: w[1..].iter().map(|&x| x as i32).collect(), weights: None, b, t };
        self.cursor += b * t;
        mb
    }
}

impl Trainer {
    /// Saves weights, optimizer moments and the training position to `dir` (atomically).
    /// `extra_files` (name, bytes) are stored and checksummed with the checkpoint (the tokenizer).
    pub fn save(&self, dir: &Path, data_cursor: crate::checkpoint::DataCursor, tokenizer: &str, extra_files: &[(String, Vec<u8>)]) -> Result<()> {
        let info = crate::checkpoint::SaveInfo { step: self.step, rng_state: self.rng.state(), train_config: Some(&self.config), data_cursor, tokenizer, extra_files };
        Ok(crate::checkpoint::save(dir, &self.model.config, &self.model.params, Some((&self.opt.m, &self.opt.v, self.opt.t)), &info)?)
    }

    /// Rebuilds a trainer from a verified checkpoint, continuing exactly where it stopped.
    ///
    /// # Errors
    /// The checkpoint lacks a training config or optimizer state (a weights-only export).
    pub fn resume(dir: &Path) -> Result<(Self, crate::checkpoint::CheckpointState)> {
        let ckpt = crate::checkpoint::load(dir, None)?;
        let state_path = dir.join(crate::checkpoint::STATE_FILE);
        let config =
            ckpt.state.train_config.clone().ok_or_else(|| EngineError::checkpoint(&state_path, "has no train_config: a weights-only checkpoint cannot resume training"))?;
        let (m, v) =
            ckpt.moments.ok_or_else(|| EngineError::checkpoint(dir.join(crate::checkpoint::OPTIMIZER_FILE), "missing: the checkpoint has no optimizer state to resume from"))?;
        config.validate(&ckpt.state.model_config)?;
        let mut model = Gpt::new(ckpt.state.model_config.clone(), config.batch_size, config.seq_len)?;
        model.params = ckpt.params;
        let mut opt = AdamW::new(config.adamw.clone(), &model.layout);
        opt.m = m;
        opt.v = v;
        opt.t = ckpt.state.optimizer_t;
        let rng = Rng::from_state(ckpt.state.rng_state()?);
        Ok((Trainer { replica: CpuReplica::new(model, opt), config, step: ckpt.state.step, rng }, ckpt.state))
    }
}
