//! The engine: the one seam between the phases and the devices. A phase is written once,
//! against these traits; each device implements them over its own op library.
//!
//! - [`Model`]: a model on a device — forward, the fused loss (ignore index, weights, a global
//!   denominator), backward, the final hidden states and a backward from them (reward and value
//!   heads), a backward from a gradient written into the logits (PPO's surrogate, any loss the
//!   fused cross-entropy does not express), KV-cache generation, and the parameters to and from
//!   the host (checkpoints).
//! - [`Replica`]: a model with its gradients and AdamW state, one rank of a data-parallel
//!   group: it sums its gradients over a [`Collective`], clips them and steps. Its optimizer
//!   state may be sharded over the group (ZeRO-1, [`Shard`]): each rank then keeps `m` and `v`
//!   of its own shard, receives only that shard's summed gradients (a reduce-scatter), updates
//!   it, and all-gathers the parameters.
//! - [`Engine`]: makes models and replicas on one device.
//!
//! # Layout
//! - [`cpu`]: [`crate::model::gpt::Gpt`] and [`crate::optim::AdamW`] (the reference backend).
//! - [`cuda`]: the CUDA backend's model and trainer ([`crate::backend::cuda`]), on a GPU or on
//!   the emulated device.
//! - [`head`]: the scalar head (`r = h·w + b`) reward and value models put on the hidden states.
//!
//! Host buffers are the contract: what a method takes or returns is host memory in the shapes
//! its doc names (`(B, T, Vp)` logits, `(B, T, C)` hidden states, the flat parameter layout of
//! [`crate::model::params::ParamLayout`]). A device implementation copies where it must; the
//! CPU one borrows.

pub mod cpu;
pub mod cuda;
pub mod shard;
// The score head is a checkpoint file shared with the coordinator (liandan-plan).
pub use liandan_plan::head;

use std::borrow::Cow;

use crate::collective::{Collective, CollectiveError, Shard};
use crate::error::Result;
use crate::generate::{Generation, SamplingConfig};
use crate::model::config::GptConfig;
use crate::model::params::ParamLayout;
use crate::model::profile::OpProfile;
use crate::optim::AdamWConfig;

/// A model on a device, with buffers for batches up to [`Model::max_batch`].
pub trait Model: Send + std::fmt::Debug {
    fn config(&self) -> &GptConfig;
    fn layout(&self) -> &ParamLayout;
    /// `(maxB, maxT)` the buffers were allocated for.
    fn max_batch(&self) -> (usize, usize);
    /// Where the model lives ("cpu", "cuda:0", "cuda-emu").
    fn device(&self) -> String;

    /// Forward pass of `inputs` `(B, T)`.
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()>;
    /// `Σ_i w_i·ce_i / denom` over the last forward's positions (targets `-1` take none); with
    /// `with_grad`, prepares the logits' gradient for [`Model::backward`].
    fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32>;
    /// `loss(.., true)` for a training step. A device model adds the value to a sum it keeps
    /// and returns `None`, so nothing waits for the forward to finish, and
    /// [`Model::take_loss`] reads the sum once per step; a model whose loss is on the host
    /// anyway returns it (the default).
    fn loss_deferred(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32) -> Result<Option<f32>> {
        self.loss(targets, weights, denom, true).map(Some)
    }
    /// The sum of the losses [`Model::loss_deferred`] kept since the last call or
    /// [`Model::zero_grad`], which it resets (0 for a model that keeps none, the default).
    fn take_loss(&mut self) -> Result<f64> {
        Ok(0.0)
    }
    /// Backward of the last forward + loss; adds into the gradients.
    fn backward(&mut self) -> Result<()>;
    /// The last forward's logits `(B, T, Vp)`.
    fn logits(&mut self) -> Result<Cow<'_, [f32]>>;
    /// The last forward's final hidden states `(B, T, C)` (after the last LayerNorm).
    fn hidden(&mut self) -> Result<Cow<'_, [f32]>>;
    /// Backward from `dhidden` `(B, T, C)`, the gradient of the final hidden states.
    fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()>;
    /// Backward from the logits' gradient: `write` gets the last forward's logits `(B, T, Vp)`
    /// and overwrites them with `dloss/dlogits` (padding columns zero).
    fn backward_from_logits(&mut self, write: &mut dyn FnMut(&mut [f32])) -> Result<()>;
    /// Clears the gradients (and the deferred loss): the start of a step.
    fn zero_grad(&mut self) -> Result<()>;

    /// The parameters, flat layout.
    fn params(&self) -> Result<Cow<'_, [f32]>>;
    fn set_params(&mut self, params: &[f32]) -> Result<()>;
    /// GPT-2's initialisation from `seed` (the same weights on every device).
    fn init_weights(&mut self, seed: u64) -> Result<()>;

    /// Samples an answer to each `(prompt, config)` with the KV cache. Each answer depends only
    /// on its prompt and config (its seed), not on the others or their order.
    fn generate(&self, jobs: &[(Vec<u32>, SamplingConfig)]) -> Result<Vec<Generation>>;

    /// Per-op times when set (`liandan bench train --profile`).
    fn profile(&mut self) -> &mut Option<OpProfile>;
    /// Waits for the device's queued work (a no-op on the CPU): for timing.
    fn sync(&self) -> Result<()>;
}

/// One rank's model with its gradients and optimizer state.
pub trait Replica: Send + std::fmt::Debug {
    fn model(&mut self) -> &mut dyn Model;
    fn model_ref(&self) -> &dyn Model;
    /// Sums the gradients over the group (every rank ends with the same bits). With the
    /// optimizer sharded only this rank's shard is summed: a reduce-scatter.
    fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError>;
    /// Scales the gradients to a global norm of at most `max_norm` (0: no clipping); returns the
    /// norm before clipping. A sharded optimizer sums its shard's squares over `coll`.
    fn clip(&mut self, max_norm: f32, coll: &mut dyn Collective) -> Result<f32>;
    /// One AdamW update at learning rate `lr`. A sharded optimizer updates its shard of the
    /// parameters, then all-gathers them over `coll`, so every rank ends with the same bits.
    fn step(&mut self, lr: f32, coll: &mut dyn Collective) -> Result<()>;
    /// Updates AdamW has applied (its bias-correction `t`).
    fn optimizer_t(&self) -> u64;
    /// Called on every rank before a checkpoint: a sharded optimizer all-gathers its moments so
    /// that [`Replica::moments`] on rank 0 can return them whole (the other ranks drop theirs).
    /// Nothing to do for an unsharded one.
    fn gather_moments(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        let _ = coll;
        Ok(())
    }
    /// AdamW's `m` and `v`, flat layout. A sharded optimizer's are those its last
    /// [`Replica::gather_moments`] at this step gathered, on rank 0 only (the rank that writes
    /// checkpoints), and they can be read once: the save takes them.
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Loads the whole `m` and `v` (a sharded optimizer keeps its shard of them).
    fn set_moments(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()>;
}

/// Makes models and replicas on one device.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// "cpu", "cuda:0", "cuda-emu".
    fn name(&self) -> String;
    /// A model for batches up to `(max_b, max_t)`, parameters zero.
    fn model(&self, config: &GptConfig, max_b: usize, max_t: usize) -> Result<Box<dyn Model>>;
    /// A replica: a model and a fresh AdamW that keeps the optimizer state of `shard`
    /// ([`Shard::WHOLE`], or one rank's part when the optimizer is sharded).
    fn replica(&self, config: &GptConfig, max_b: usize, max_t: usize, adamw: &AdamWConfig, shard: Shard) -> Result<Box<dyn Replica>>;
}

/// An engine opened for a worker: what it registers with and what the runtime needs besides.
#[derive(Debug, Clone)]
pub struct Opened {
    pub engine: std::sync::Arc<dyn Engine>,
    /// "cpu", "cuda:N" or "cuda-emu".
    pub label: String,
    /// Memory a phase may use, bytes (device memory for CUDA, available host memory for the CPU).
    pub memory: u64,
    /// The CUDA device, for NCCL (None on the CPU).
    pub cuda: Option<std::sync::Arc<crate::backend::cuda::CudaDevice>>,
}

/// Opens the device `--device` names: `auto` (a GPU when one is usable, else the CPU), `cpu`,
/// `cuda` (GPU 0), `cuda:N`, or `cuda-emu` (the emulated CUDA device, for tests; never chosen by
/// `auto`). `precision` is the CUDA matmul precision.
///
/// # Errors
/// One line saying why: an unknown name, no GPU or a missing CUDA library for `cuda`.
pub fn open(device: &str, precision: crate::backend::cuda::Precision) -> std::result::Result<Opened, String> {
    use crate::backend::Device;
    use crate::backend::cuda::CudaDevice;
    use std::sync::Arc;
    let (kind, ordinal) = match device {
        "auto" => (Device::detect(), 0),
        "cpu" => (Device::Cpu, 0),
        "cuda" => (Device::Cuda, 0),
        "cuda-emu" => (Device::CudaEmu, 0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => (Device::Cuda, n),
            _ => return Err(format!("--device {other}: not a device (auto, cpu, cuda, cuda:N, cuda-emu)")),
        },
    };
    if kind == Device::Cpu {
        return Ok(Opened { engine: Arc::new(cpu::CpuEngine), label: "cpu".into(), memory: crate::runtime::available_memory(), cuda: None });
    }
    if kind == Device::Cuda
        && let Some(e) = Device::cuda_unavailable_reason()
    {
        return Err(format!("--device {device}: {e}"));
    }
    let dev = Arc::new(CudaDevice::for_device(kind, ordinal).map_err(|e| format!("--device {device}: {e}"))?);
    let label = dev.kind.label();
    let memory = dev.memory;
    Ok(Opened { engine: Arc::new(cuda::CudaEngine::new(dev.clone(), precision)), label, memory, cuda: Some(dev) })
}
