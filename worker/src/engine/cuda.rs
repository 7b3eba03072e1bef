//! The engine on the CUDA backend: [`CudaGpt`] as a [`Model`], [`CudaReplica`] (the model, its
//! AdamW moments on the device, the norm buffers) as a [`Replica`], on a GPU or on the emulated
//! device. Every entry point binds the device's context to the calling thread first: phases run
//! on worker threads, not on the thread that opened the device.
//!
//! Gradients are summed on the device through NCCL when the collective is NCCL, and staged
//! through the host otherwise (the TCP ring: two processes on one GPU, or the emulated device).

use std::borrow::Cow;
use std::sync::Arc;

use super::shard::{Gathered, own_part};
use super::{Engine, Model, Replica};
use crate::backend::cuda::Precision;
use crate::backend::cuda::device::{CudaDevice, DevBuf};
use crate::backend::cuda::generate::CudaGenerator;
use crate::backend::cuda::model::CudaGpt;
use crate::backend::cuda::ops::{self, AdamWArgs, NORM_BLOCKS};
use crate::collective::{Collective, CollectiveError, Shard, overlap};
use crate::error::{EngineError, Result};
use crate::generate::{Generation, SamplingConfig};
use crate::model::config::GptConfig;
use crate::model::gpt::init_params;
use crate::model::params::{ParamKind, ParamLayout};
use crate::model::profile::OpProfile;
use crate::optim::AdamWConfig;
use crate::rng::Rng;

/// Makes models on one CUDA device (a GPU, or the emulated device).
#[derive(Debug, Clone)]
pub struct CudaEngine {
    pub dev: Arc<CudaDevice>,
    pub precision: Precision,
}

impl CudaEngine {
    pub fn new(dev: Arc<CudaDevice>, precision: Precision) -> Self {
        CudaEngine { dev, precision }
    }
}

/// The CUDA kernels implement the gpt2 family only (so far); a llama config runs on the CPU.
fn refuse_llama(config: &GptConfig) -> Result<()> {
    if config.family != crate::model::config::Family::Gpt2 {
        return Err(crate::EngineError::InvalidConfig {
            field: "family",
            reason: format!("the CUDA backend implements the gpt2 family only; run this {:?}-family model with --device cpu", config.family),
        });
    }
    Ok(())
}

impl Engine for CudaEngine {
    fn name(&self) -> String {
        self.dev.kind.label()
    }

    fn model(&self, config: &GptConfig, max_b: usize, max_t: usize) -> Result<Box<dyn Model>> {
        refuse_llama(config)?;
        self.dev.bind_to_thread()?;
        Ok(Box::new(CudaGpt::new(self.dev.clone(), config.clone(), max_b, max_t, self.precision)?))
    }

    fn replica(&self, config: &GptConfig, max_b: usize, max_t: usize, adamw: &AdamWConfig, shard: Shard) -> Result<Box<dyn Replica>> {
        refuse_llama(config)?;
        self.dev.bind_to_thread()?;
        let model = CudaGpt::new(self.dev.clone(), config.clone(), max_b, max_t, self.precision)?;
        Ok(Box::new(CudaReplica::sharded(model, adamw.clone(), shard)?))
    }
}

impl Model for CudaGpt {
    fn config(&self) -> &GptConfig {
        &self.config
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn max_batch(&self) -> (usize, usize) {
        (self.max_b, self.max_t)
    }

    fn device(&self) -> String {
        self.dev.kind.label()
    }

    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::forward(self, inputs, b, t)?)
    }

    fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::loss(self, targets, weights, denom, with_grad)?)
    }

    fn loss_deferred(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32) -> Result<Option<f32>> {
        self.dev.bind_to_thread()?;
        CudaGpt::loss_deferred(self, targets, weights, denom)?;
        Ok(None)
    }

    fn take_loss(&mut self) -> Result<f64> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::take_loss(self)?)
    }

    fn backward(&mut self) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::backward(self)?)
    }

    fn logits(&mut self) -> Result<Cow<'_, [f32]>> {
        self.dev.bind_to_thread()?;
        Ok(Cow::Owned(self.logits_to_host()?))
    }

    fn hidden(&mut self) -> Result<Cow<'_, [f32]>> {
        self.dev.bind_to_thread()?;
        Ok(Cow::Owned(self.hidden_to_host()?))
    }

    fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::backward_from_hidden(self, dhidden)?)
    }

    fn backward_from_logits(&mut self, write: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::backward_from_logits(self, write)?)
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::zero_grad(self)?)
    }

    fn params(&self) -> Result<Cow<'_, [f32]>> {
        self.dev.bind_to_thread()?;
        Ok(Cow::Owned(self.params_to_host()?))
    }

    fn set_params(&mut self, params: &[f32]) -> Result<()> {
        self.dev.bind_to_thread()?;
        Ok(CudaGpt::set_params(self, params)?)
    }

    fn init_weights(&mut self, seed: u64) -> Result<()> {
        // On the host with the CPU's generator and order, so every device starts alike.
        let mut host = vec![0.0f32; self.layout.len()];
        init_params(&self.config, &self.layout, &mut host, &mut Rng::new(seed));
        Model::set_params(self, &host)
    }

    fn generate(&self, jobs: &[(Vec<u32>, SamplingConfig)]) -> Result<Vec<Generation>> {
        self.dev.bind_to_thread()?;
        let mut g = CudaGenerator::new(self)?;
        jobs.iter().map(|(prompt, cfg)| g.generate(prompt, cfg).map_err(EngineError::from)).collect()
    }

    fn profile(&mut self) -> &mut Option<OpProfile> {
        &mut self.profile
    }

    fn sync(&self) -> Result<()> {
        Ok(self.dev.sync()?)
    }
}

/// A CUDA model with its AdamW moments on the device (of every parameter, or of one shard).
#[derive(Debug)]
pub struct CudaReplica {
    pub model: CudaGpt,
    pub adamw: AdamWConfig,
    /// Updates AdamW has applied (its bias-correction `t`), as the CPU's `AdamW::t`.
    pub opt_t: u64,
    /// The optimizer state this replica keeps; `m` and `v` hold `shard.range(n)`.
    shard: Shard,
    m: DevBuf<f32>,
    v: DevBuf<f32>,
    norm: DevBuf<f32>,
    norm_partial: DevBuf<f64>,
    /// The gradient buckets `(slot, ranges)` in the order the backward finishes them (the last
    /// layer first, the shared tensors last), as the all-reduce takes them.
    buckets: Vec<(usize, Vec<std::ops::Range<usize>>)>,
    /// Host staging for the gradients (and, sharded, the parameters) when the collective is not NCCL.
    staging: Vec<f32>,
    gathered: Gathered,
}

impl CudaReplica {
    /// `model` (its parameters already set) with zero moments.
    ///
    /// # Errors
    /// The device is out of memory.
    pub fn new(model: CudaGpt, adamw: AdamWConfig) -> Result<Self> {
        Self::sharded(model, adamw, Shard::WHOLE)
    }

    /// `model` with zero moments of `shard`'s parameters only (ZeRO-1).
    ///
    /// # Errors
    /// The device is out of memory.
    pub fn sharded(model: CudaGpt, adamw: AdamWConfig, shard: Shard) -> Result<Self> {
        let own = shard.range(model.layout.len()).len();
        let dev = model.dev.clone();
        let last = model.layout.buckets() - 1;
        let buckets = (0..last).rev().chain([last]).map(|slot| (slot, model.layout.bucket(slot))).collect();
        Ok(CudaReplica {
            buckets,
            m: dev.alloc(own)?,
            v: dev.alloc(own)?,
            norm: dev.alloc(1)?,
            norm_partial: dev.alloc(NORM_BLOCKS)?,
            model,
            adamw,
            opt_t: 0,
            shard,
            staging: Vec::new(),
            gathered: Gathered::default(),
        })
    }

    /// The parameters whose optimizer state this replica keeps.
    fn own(&self) -> std::ops::Range<usize> {
        self.shard.range(self.model.layout.len())
    }

    /// AdamW's moments of this replica's shard (all of them unless sharded), copied to the host.
    pub fn moments_to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let dev = &self.model.dev;
        Ok((dev.to_host(&self.m)?, dev.to_host(&self.v)?))
    }

    fn norm(&mut self, max_norm: f32) -> Result<f32> {
        let (dev, n) = (&self.model.dev, self.model.layout.len());
        ops::global_norm(dev, self.norm.all(), self.norm_partial.all(), self.model.grads.all(), n)?;
        if max_norm > 0.0 {
            ops::clip_scale(dev, self.model.grads.all(), self.norm.all(), n, max_norm)?;
        }
        let mut norm = [0.0f32];
        dev.download(&self.norm, 0, &mut norm)?;
        Ok(norm[0])
    }

    /// The norm over the group when only this rank's shard holds summed gradients: the shard's
    /// `Σ g²` (f64 parts summed in order on the host) summed over `coll`, then the shard scaled.
    fn sharded_norm(&mut self, max_norm: f32, coll: &mut dyn Collective) -> Result<f32> {
        let own = self.own();
        let dev = &self.model.dev;
        let grads = self.model.grads.view(own.start, own.len());
        ops::sum_of_squares(dev, self.norm_partial.all(), grads, own.len())?;
        let mut partial = [0.0f64; NORM_BLOCKS];
        dev.download(&self.norm_partial, 0, &mut partial)?;
        let norm = coll.all_reduce_scalar(partial.iter().sum())?.sqrt() as f32;
        if max_norm > 0.0 {
            dev.upload(&self.norm, 0, &[norm])?;
            ops::clip_scale(dev, grads, self.norm.all(), own.len(), max_norm)?;
        }
        Ok(norm)
    }

    /// AdamW over every parameter span of this replica's shard (the CPU's
    /// [`crate::optim::AdamW::step`]); one update.
    pub(crate) fn adamw(&mut self, lr: f32) -> Result<()> {
        let t = self.opt_t + 1;
        let c = &self.adamw;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t as i32);
        let base = AdamWArgs { step_size: (lr as f64 / bc1) as f32, bc2_sqrt: bc2.sqrt() as f32, beta1: c.beta1, beta2: c.beta2, eps: c.eps, decay: 1.0 };
        let own = self.own();
        let m = &self.model;
        for kind in ParamKind::ALL {
            let r = overlap(&m.layout.range(kind), &own);
            if r.is_empty() {
                continue;
            }
            let decay = if kind.decays() { 1.0 - lr * c.weight_decay } else { 1.0 };
            let pb = (m.precision == Precision::Bf16).then(|| m.params_bf16.view(r.start, r.len()));
            let at = r.start - own.start;
            ops::adamw_step(
                &m.dev,
                m.params.view(r.start, r.len()),
                pb,
                m.grads.view(r.start, r.len()),
                self.m.view(at, r.len()),
                self.v.view(at, r.len()),
                r.len(),
                AdamWArgs { decay, ..base },
            )?;
        }
        self.opt_t = t;
        Ok(())
    }

    /// ZeRO-1's last half: every rank's updated shard of the parameters to every rank (on the
    /// device through NCCL, else through the host), then their bf16 copy rewritten.
    fn all_gather_params(&mut self, coll: &mut dyn Collective) -> Result<()> {
        let n = self.model.layout.len();
        if let Some(nccl) = coll.as_nccl() {
            nccl.all_gather_device(&self.model.dev, self.model.params.view(0, n))?;
        } else {
            self.staging.resize(n, 0.0);
            self.model.dev.download(&self.model.params, 0, &mut self.staging)?;
            coll.all_gather(&mut self.staging)?;
            self.model.dev.upload(&self.model.params, 0, &self.staging)?;
        }
        Ok(self.model.refresh_bf16_params()?)
    }
}

impl Replica for CudaReplica {
    fn model(&mut self) -> &mut dyn Model {
        &mut self.model
    }

    fn model_ref(&self) -> &dyn Model {
        &self.model
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        let sharded = !self.shard.is_whole();
        if sharded {
            self.shard.check(coll)?;
        }
        if coll.world() == 1 {
            return Ok(());
        }
        let device = |op: &'static str| move |e: crate::backend::cuda::CudaError| CollectiveError::Device { op, reason: e.to_string() };
        self.model.dev.bind_to_thread().map_err(device("bind the CUDA context"))?;
        let n = self.model.layout.len();
        if let Some(nccl) = coll.as_nccl() {
            return nccl.all_reduce_buckets(&self.model.dev, self.model.grads.view(0, n), &self.buckets, sharded).map_err(device("NCCL all-reduce"));
        }
        // Through the host: ordered as the side stream would be (on the emulated device, this
        // checks that no work after a bucket's ready mark wrote the bucket).
        for (slot, _) in &self.buckets {
            self.model.dev.side_after_mark(*slot).map_err(device("wait for a gradient bucket"))?;
        }
        self.model.dev.main_after_side().map_err(device("wait for the side stream"))?;
        self.staging.resize(n, 0.0);
        self.model.dev.download(&self.model.grads, 0, &mut self.staging).map_err(device("copy gradients to the host"))?;
        if !sharded {
            coll.all_reduce_sum(&mut self.staging)?;
            return self.model.dev.upload(&self.model.grads, 0, &self.staging).map_err(device("copy gradients to the device"));
        }
        coll.reduce_scatter_sum(&mut self.staging)?;
        let own = self.own();
        self.model.dev.upload(&self.model.grads, own.start, &self.staging[own]).map_err(device("copy gradients to the device"))
    }

    fn clip(&mut self, max_norm: f32, coll: &mut dyn Collective) -> Result<f32> {
        self.model.dev.bind_to_thread()?;
        if self.shard.is_whole() { self.norm(max_norm) } else { self.sharded_norm(max_norm, coll) }
    }

    fn step(&mut self, lr: f32, coll: &mut dyn Collective) -> Result<()> {
        self.model.dev.bind_to_thread()?;
        self.adamw(lr)?;
        if !self.shard.is_whole() {
            self.all_gather_params(coll)?;
        }
        Ok(())
    }

    fn optimizer_t(&self) -> u64 {
        self.opt_t
    }

    fn gather_moments(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        if self.shard.is_whole() {
            return Ok(());
        }
        let to_host = |e: EngineError| CollectiveError::Device { op: "copy optimizer moments to the host", reason: e.to_string() };
        self.model.dev.bind_to_thread().map_err(|e| to_host(e.into()))?;
        let (m, v) = self.moments_to_host().map_err(to_host)?;
        self.gathered.gather(self.shard, self.model.layout.len(), (&m, &v), self.opt_t, coll)
    }

    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        if !self.shard.is_whole() {
            return self.gathered.take(self.opt_t);
        }
        self.model.dev.bind_to_thread()?;
        self.moments_to_host()
    }

    fn set_moments(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        let (m, v) = own_part(self.shard, self.model.layout.len(), m, v)?;
        self.model.dev.bind_to_thread()?;
        self.model.dev.upload(&self.m, 0, m)?;
        self.model.dev.upload(&self.v, 0, v)?;
        self.opt_t = t;
        Ok(())
    }
}
