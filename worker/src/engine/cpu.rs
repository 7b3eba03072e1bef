//! The engine on the CPU: [`Gpt`] (the op library of [`crate::backend::cpu`]) and [`AdamW`].
//! Every method is the model's own, so numbers are exactly the CPU backend's; host buffers are
//! borrowed, never copied.

use std::borrow::Cow;

use rayon::prelude::*;

use super::{Engine, Model, Replica};
use crate::collective::{Collective, CollectiveError};
use crate::error::Result;
use crate::generate::{Generation, Generator, SamplingConfig};
use crate::model::config::GptConfig;
use crate::model::gpt::Gpt;
use crate::model::params::ParamLayout;
use crate::model::profile::OpProfile;
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, global_norm};
use crate::rng::Rng;

/// Makes CPU models.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuEngine;

impl Engine for CpuEngine {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn model(&self, config: &GptConfig, max_b: usize, max_t: usize) -> Result<Box<dyn Model>> {
        Ok(Box::new(Gpt::new(config.clone(), max_b, max_t)?))
    }

    fn replica(&self, config: &GptConfig, max_b: usize, max_t: usize, adamw: &AdamWConfig) -> Result<Box<dyn Replica>> {
        let model = Gpt::new(config.clone(), max_b, max_t)?;
        let opt = AdamW::new(adamw.clone(), &model.layout);
        Ok(Box::new(CpuReplica { model, opt }))
    }
}

impl Model for Gpt {
    fn config(&self) -> &GptConfig {
        &self.config
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn max_batch(&self) -> (usize, usize) {
        Gpt::max_batch(self)
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        Gpt::forward(self, inputs, b, t)
    }

    fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32> {
        Gpt::loss(self, targets, weights, denom, with_grad)
    }

    fn backward(&mut self) -> Result<()> {
        Gpt::backward(self)
    }

    fn logits(&mut self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(Gpt::logits(self)))
    }

    fn hidden(&mut self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(Gpt::hidden(self)))
    }

    fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()> {
        Gpt::backward_from_hidden(self, dhidden)
    }

    fn backward_from_logits(&mut self, write: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        Gpt::backward_from_logits(self, write)
    }

    fn zero_grad(&mut self) -> Result<()> {
        Gpt::zero_grad(self);
        Ok(())
    }

    fn params(&self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(&self.params))
    }

    fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(crate::EngineError::BadLength { what: "params", expected: self.params.len(), got: params.len() });
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    fn init_weights(&mut self, seed: u64) -> Result<()> {
        Gpt::init_weights(self, &mut Rng::new(seed));
        Ok(())
    }

    fn generate(&self, jobs: &[(Vec<u32>, SamplingConfig)]) -> Result<Vec<Generation>> {
        // One KV cache per answer; answers are independent, so they run in parallel.
        jobs.par_iter().map(|(prompt, cfg)| Generator::new(self).generate(prompt, cfg)).collect()
    }

    fn profile(&mut self) -> &mut Option<OpProfile> {
        &mut self.profile
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// A CPU model with its AdamW.
#[derive(Debug)]
pub struct CpuReplica {
    pub model: Gpt,
    pub opt: AdamW,
}

impl Replica for CpuReplica {
    fn model(&mut self) -> &mut dyn Model {
        &mut self.model
    }

    fn model_ref(&self) -> &dyn Model {
        &self.model
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        coll.all_reduce_sum(&mut self.model.grads)
    }

    fn clip(&mut self, max_norm: f32) -> Result<f32> {
        Ok(if max_norm > 0.0 { clip_grad_norm(&mut self.model.grads, max_norm) } else { global_norm(&self.model.grads) })
    }

    fn step(&mut self, lr: f32) -> Result<()> {
        self.opt.step(&mut self.model.params, &self.model.grads, lr);
        Ok(())
    }

    fn optimizer_t(&self) -> u64 {
        self.opt.t
    }

    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.opt.m.clone(), self.opt.v.clone()))
    }

    fn set_moments(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        let n = self.model.params.len();
        if m.len() != n || v.len() != n {
            return Err(crate::EngineError::BadLength { what: "optimizer moments", expected: n, got: m.len().min(v.len()) });
        }
        self.opt.m.copy_from_slice(m);
        self.opt.v.copy_from_slice(v);
        self.opt.t = t;
        Ok(())
    }
}
