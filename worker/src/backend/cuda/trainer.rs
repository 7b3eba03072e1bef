//! A training step on the GPU: the CPU's [`crate::train::Trainer::train_step`] with gradient
//! accumulation, an optional NCCL all-reduce of the gradients on the device, global-norm
//! clipping and AdamW, with no host round trip except the loss and the norm for the stats; and
//! checkpoints in the CPU trainer's format (weights, AdamW moments, step, RNG state), so a run
//! resumes bit for bit and a checkpoint moves between the CPU and CUDA trainers.

use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::{CheckpointState, DataCursor, SaveInfo};
use crate::collective::{Collective, Nccl};
use crate::engine::Replica;
use crate::engine::cuda::CudaReplica;
use crate::error::EngineError;
use crate::model::config::GptConfig;
use crate::model::gpt::{init_params, loss_denominator};
use crate::rng::Rng;
use crate::train::{MicroBatch, StepStats, TrainConfig, replica_step};

use super::device::CudaDevice;
use super::error::Result;
use super::matmul::Precision;
use super::model::CudaGpt;

/// A model on one GPU, its AdamW moments and the training position: the CPU's
/// [`crate::train::Trainer`] over a [`CudaReplica`], through the same step
/// ([`crate::train::replica_step`]).
#[derive(Debug)]
pub struct CudaTrainer {
    pub replica: CudaReplica,
    pub config: TrainConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// The generator after weight initialisation, saved in checkpoints as the CPU trainer's.
    pub rng: Rng,
}

impl std::ops::Deref for CudaTrainer {
    type Target = CudaReplica;

    fn deref(&self) -> &CudaReplica {
        &self.replica
    }
}

impl std::ops::DerefMut for CudaTrainer {
    fn deref_mut(&mut self) -> &mut CudaReplica {
        &mut self.replica
    }
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
        let rng = Rng::new(config.seed);
        let replica = CudaReplica::new(model, config.adamw.clone()).map_err(cuda)?;
        Ok(CudaTrainer { replica, config, step: 0, rng })
    }

    /// Updates AdamW has applied (its bias-correction `t`), as the CPU's `AdamW::t`.
    pub fn opt_t(&self) -> u64 {
        self.replica.opt_t
    }

    /// Sets AdamW's moments from the host (a checkpoint's), keeping its update count.
    ///
    /// # Errors
    /// Wrong lengths, or a failed copy.
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let t = self.replica.opt_t;
        Replica::set_moments(&mut self.replica, m, v, t).map_err(cuda)
    }

    /// Saves weights, moments and the training position to `dir` in the CPU trainer's format
    /// ([`crate::train::Trainer::save`]).
    ///
    /// # Errors
    /// A failed copy from the device, or an I/O error naming the file.
    pub fn save(&self, dir: &Path, data_cursor: DataCursor, tokenizer: &str, extra_files: &[(String, Vec<u8>)]) -> Result<()> {
        let params = self.replica.model.params_to_host()?;
        let (m, v) = self.replica.moments_to_host().map_err(cuda)?;
        let info = SaveInfo { step: self.step, rng_state: self.rng.state(), train_config: Some(&self.config), data_cursor, tokenizer, extra_files };
        Ok(crate::checkpoint::save(dir, &self.replica.model.config, &params, Some((&m, &v, self.replica.opt_t)), &info)?)
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
        let config =
            ckpt.state.train_config.clone().ok_or_else(|| EngineError::checkpoint(&state_path, "has no train_config: a weights-only checkpoint cannot resume training"))?;
        let (m, v) =
            ckpt.moments.ok_or_else(|| EngineError::checkpoint(dir.join(crate::checkpoint::OPTIMIZER_FILE), "missing: the checkpoint has no optimizer state to resume from"))?;
        config.validate(&ckpt.state.model_config)?;
        let mut model = CudaGpt::new(dev, ckpt.state.model_config.clone(), config.batch_size, config.seq_len, precision)?;
        model.set_params(&ckpt.params)?;
        let mut tr = Self::with_model(model, config)?;
        Replica::set_moments(&mut tr.replica, &m, &v, ckpt.state.optimizer_t).map_err(cuda)?;
        tr.step = ckpt.state.step;
        tr.rng = Rng::from_state(ckpt.state.rng_state()?);
        Ok((tr, ckpt.state))
    }

    /// One optimizer step over `micro` ([`crate::train::replica_step`]); with `nccl`,
    /// gradients are summed over ranks on the device before clipping (each rank's loss is
    /// divided by the global denominator its caller computed, so pass that as `global_denom`,
    /// or `None` for one process).
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
        let lr = self.config.schedule.lr(self.step);
        let coll = nccl.map(|n| n as &mut dyn Collective);
        let (loss, grad_norm, tokens) = replica_step(&mut self.replica, micro, denom, coll, self.config.grad_clip, lr).map_err(cuda)?;
        let stats = StepStats { step: self.step, loss: loss as f32, grad_norm, lr, tokens };
        self.step += 1;
        Ok(stats)
    }
}

/// The engine's error as the CUDA backend's (the engine wraps the backend's own errors).
fn cuda(e: EngineError) -> super::CudaError {
    match e {
        EngineError::Cuda(inner) => *inner,
        other => super::CudaError::Engine(other),
    }
}
