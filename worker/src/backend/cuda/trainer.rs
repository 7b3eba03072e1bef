//! A training step on the GPU: the CPU's [`crate::train::Trainer::train_step`] with gradient
//! accumulation, an optional NCCL all-reduce of the gradients on the device, global-norm
//! clipping and AdamW, with no host round trip except the loss and the norm for the stats.

use std::sync::Arc;

use crate::model::config::GptConfig;
use crate::model::gpt::{init_params, loss_denominator};
use crate::model::params::ParamKind;
use crate::rng::Rng;
use crate::train::{MicroBatch, StepStats, TrainConfig};
use crate::error::EngineError;

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
        Self::with_model(model, config)
    }

    /// Wraps a model whose parameters are already set (e.g. copied from a CPU model).
    pub fn with_model(model: CudaGpt, config: TrainConfig) -> Result<Self> {
        let n = model.layout.len();
        let dev = model.dev.clone();
        Ok(CudaTrainer { m: dev.alloc(n)?, v: dev.alloc(n)?, norm: dev.alloc(1)?, norm_partial: dev.alloc(NORM_BLOCKS)?, model, config, step: 0 })
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
        if !(denom > 0.0) {
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
        ops::global_norm(&dev, self.norm.all(), self.norm_partial.all(), self.model.grads.all(), n)?;
        if self.config.grad_clip > 0.0 {
            ops::clip_scale(&dev, self.model.grads.all(), self.norm.all(), n, self.config.grad_clip)?;
        }
        let lr = self.config.schedule.lr(self.step);
        self.adamw(lr)?;
        let mut norm = [0.0f32];
        dev.download(&self.norm, 0, &mut norm)?;
        let stats = StepStats { step: self.step, loss: loss as f32, grad_norm: norm[0], lr, tokens };
        self.step += 1;
        Ok(stats)
    }

    /// AdamW over every parameter span (the CPU's [`crate::optim::AdamW::step`]).
    pub(crate) fn adamw(&mut self, lr: f32) -> Result<()> {
        let t = self.step + 1;
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
        Ok(())
    }
}
