//! A training step on the GPU: the CPU's [`crate::train::Trainer::train_step`] with gradient
//! accumulation, an optional NCCL all-reduce of the gradients on the device, global-norm
//! clipping and AdamW, with no host round trip except the loss and the norm for the stats; and
//! checkpoints in the CPU trainer's format (weights, AdamW moments, step, RNG state), so a run
//! resumes bit for bit and a checkpoint moves between the CPU and CUDA trainers.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{CheckpointState, DataCursor, SaveInfo};
use crate::error::EngineError;
use crate::model::config::GptConfig;
use crate::model::gpt::{init_params, loss_denominator};
use crate::model::params::ParamKind;
use crate::rng::Rng;
use crate::train::{MicroBatch, StepStats, TrainConfig};

use super::device::{CudaDevice, DevBuf};
use super::error::Result;
use super::matmul::Precision;
use super::model::CudaGpt;
use super::ops::{self, AdamWArgs, NORM_BLOCKS};
use crate::collective::Nccl;

/// A model on one GPU, its AdamW moments and the training position.
#[derive(Debug)]
pub struct CudaTrainer {
    pub model: CudaGpt,
    pub config: TrainConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Updates AdamW has applied (its bias-correction `t`), as the CPU's `AdamW::t`.
    pub opt_t: u64,
    /// The generator after weight initialisation, saved in checkpoints as the CPU trainer's.
    pub rng: Rng,
    m: DevBuf<f32>,
    v: DevBuf<f32>,
    norm: DevBuf<f32>,
    norm_partial: DevBuf<f64>,
}

impl CudaTrainer {
    /// A model initialised from `config.seed` exactly as the CPU [`crate::train::Trainer::new`]
    /// does (same generator, same order), so both start from the same weights.
    ///
    /// # Errors
    /// Invalid config, or the device is out of memory.
    pub fn new(dev: Arc<CudaDevice>, model_config: GptConfig, config: TrainConfig, precision: Precision) -> Result<Self> {
        config.validate(&model_config)?;
        let mut rng = Rng::new(config.seed);
        let mut model = CudaGpt::new(dev, model_config, config.batch_size, config.seq_len, precision)?;
        let mut host = vec![0.0f32; model.layout.len()];
        init_params(&model.config, &model.layout, &mut host, &mut rng);
        model.set_params(&host)?;
        let mut tr = Self::with_model(model, config)?;
        tr.rng = rng;
        Ok(tr)
    }

    /// Wraps a model whose parameters are already set (e.g. copied from a CPU model), with
    /// zero moments at step 0.
    pub fn with_model(model: CudaGpt, config: TrainConfig) -> Result<Self> {
        let n = model.layout.len();
        let dev = model.dev.clone();
        let rng = Rng::new(config.seed);
        Ok(CudaTrainer { m: dev.alloc(n)?, v: dev.alloc(n)?, norm: dev.alloc(1)?, norm_partial: dev.alloc(NORM_BLOCKS)?, model, config, step: 0, opt_t: 0, rng })
    }

    /// AdamW's moments `(m, v)`, copied to the host.
    pub fn moments_to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let dev = &self.model.dev;
        Ok((dev.to_host(&self.m)?, dev.to_host(&self.v)?))
    }

    /// Sets AdamW's moments from the host (a checkpoint's).
    ///
    /// # Errors
    /// Wrong lengths, or a failed copy.
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let n = self.model.layout.len();
        for (what, x) in [("optimizer m", m), ("optimizer v", v)] {
            if x.len() != n {
                return Err(EngineError::BadLength { what, expected: n, got: x.len() }.into());
            }
        }
        self.model.dev.upload(&self.m, 0, m)?;
        self.model.dev.upload(&self.v, 0, v)
    }

    /// Saves weights, moments and the training position to `dir` in the CPU trainer's format
    /// ([`crate::train::Trainer::save`]).
    ///
    /// # Errors
    /// A failed copy from the device, or an I/O error naming the file.
    pub fn save(&self, dir: &Path, data_cursor: DataCursor, tokenizer: &str, extra_files: &[(String, Vec<u8>)]) -> Result<()> {
        let params = self.model.params_to_host()?;
        let (m, v) = self.moments_to_host()?;
        let info = SaveInfo { step: self.step, rng_state: self.rng.state(), train_config: Some(&self.config), data_cursor, tokenizer, extra_files };
        Ok(crate::checkpoint::save(dir, &self.model.config, &params, Some((&m, &v, self.opt_t)), &info)?)
    }

    /// Rebuilds a trainer on `dev` from a verified checkpoint (written by this trainer or the
    /// CPU one), continuing exactly where it stopped; the bf16 copy of the weights is cast from
    /// the f32 master as the optimizer would have written it.
    ///
    /// # Errors
    /// The checkpoint is invalid, lacks a training config or optimizer state, or the device fails.
    pub fn resume(dev: Arc<CudaDevice>, dir: &Path, precision: Precision) -> Result<(Self, CheckpointState)> {
        let ckpt = crate::checkpoint::load(dir, None)?;
        let state_path = dir.join(crate::checkpoint::STATE_FILE);
        let config = ckpt.state.train_config.clone().ok_or_else(|| EngineError::checkpoint(&state_path, "has no train_config: a weights-only checkpoint cannot resume training"))?;
        let (m, v) = ckpt.moments.ok_or_else(|| EngineError::checkpoint(dir.join(crate::checkpoint::OPTIMIZER_FILE), "missing: the checkpoint has no optimizer state to resume from"))?;
        config.validate(&ckpt.state.model_config)?;
        let mut model = CudaGpt::new(dev, ckpt.state.model_config.clone(), config.batch_size, config.seq_len, precision)?;
        model.set_params(&ckpt.params)?;
        let mut tr = Self::with_model(model, config)?;
        tr.set_moments(&m, &v)?;
        tr.step = ckpt.state.step;
        tr.opt_t = ckpt.state.optimizer_t;
        tr.rng = Rng::from_state(ckpt.state.rng_state()?);
        Ok((tr, ckpt.state))
    }

    /// One optimizer step over `micro`; with `nccl`, gradients are summed over ranks on the
    /// device before clipping (each rank's loss is divided by the global denominator its caller
    /// computed, so pass that as `global_denom`, or `None` for one process).
    ///
    /// # Errors
    /// Bad batches, a failed launch or copy, or a failed all-reduce.
    pub fn train_step(&mut self, micro: &[MicroBatch], nccl: Option<&mut Nccl>, global_denom: Option<f32>) -> Result<StepStats> {
        let denom = match global_denom {
            Some(d) => d,
            None => loss_denominator(micro.iter().map(|m| (&m.targets[..], m.weights.as_deref()))),
        };
        if denom.is_nan() || denom <= 0.0 {
            return Err(EngineError::InvalidConfig { field: "targets", reason: "the step has no position that takes a loss".into() }.into());
        }
        self.model.zero_grad()?;
        let mut loss = 0.0f64;
        let mut tokens = 0;
        for mb in micro {
            self.model.forward(&mb.inputs, mb.b, mb.t)?;
            loss += self.model.loss(&mb.targets, mb.weights.as_deref(), denom, true)? as f64;
            self.model.backward()?;
            tokens += mb.b * mb.t;
        }
        let n = self.model.layout.len();
        let dev = self.model.dev.clone();
        if let Some(comm) = nccl {
            comm.all_reduce_device(&dev, self.model.grads.all(), n)?;
        }
        let t0 = Instant::now();
        ops::global_norm(&dev, self.norm.all(), self.norm_partial.all(), self.model.grads.all(), n)?;
        if self.config.grad_clip > 0.0 {
            ops::clip_scale(&dev, self.model.grads.all(), self.norm.all(), n, self.config.grad_clip)?;
        }
        self.charge("opt.clip", t0)?;
        let lr = self.config.schedule.lr(self.step);
        let t0 = Instant::now();
        self.adamw(lr)?;
        self.charge("opt.adamw", t0)?;
        let mut norm = [0.0f32];
        dev.download(&self.norm, 0, &mut norm)?;
        let stats = StepStats { step: self.step, loss: loss as f32, grad_norm: norm[0], lr, tokens };
        self.step += 1;
        Ok(stats)
    }

    /// When the model is profiling: waits for the device and charges the time since `t0` to `op`.
    fn charge(&mut self, op: &'static str, t0: Instant) -> Result<()> {
        if self.model.profile.is_some() {
            self.model.dev.sync()?;
            if let Some(p) = &mut self.model.profile {
                p.add(op, t0.elapsed());
            }
        }
        Ok(())
    }

    /// AdamW over every parameter span (the CPU's [`crate::optim::AdamW::step`]); one update.
    pub(crate) fn adamw(&mut self, lr: f32) -> Result<()> {
        let t = self.opt_t + 1;
        let c = &self.config.adamw;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t as i32);
        let base = AdamWArgs { step_size: (lr as f64 / bc1) as f32, bc2_sqrt: bc2.sqrt() as f32, beta1: c.beta1, beta2: c.beta2, eps: c.eps, decay: 1.0 };
        let m = &self.model;
        for kind in ParamKind::ALL {
            let r = m.layout.range(kind);
            let decay = if kind.decays() { 1.0 - lr * c.weight_decay } else { 1.0 };
            let pb = (m.precision == Precision::Bf16).then(|| m.params_bf16.view(r.start, r.len()));
            ops::adamw_step(
                &m.dev,
                m.params.view(r.start, r.len()),
                pb,
                m.grads.view(r.start, r.len()),
                self.m.view(r.start, r.len()),
                self.v.view(r.start, r.len()),
                r.len(),
                AdamWArgs { decay, ..base },
            )?;
        }
        self.opt_t = t;
        Ok(())
    }
}
