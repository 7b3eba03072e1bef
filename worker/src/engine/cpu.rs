//! The engine on the CPU: [`Gpt`] and [`Llama`] (the op library of [`crate::backend::cpu`]),
//! picked by the config's family, and [`AdamW`].
//! Every method is the model's own, so numbers are exactly the CPU backend's; host buffers are
//! borrowed, never copied.

use std::borrow::Cow;

use rayon::prelude::*;

use super::shard::{Gathered, own_part};
use super::{Engine, Model, Replica};
use crate::collective::{Collective, CollectiveError, Shard};
use crate::error::Result;
use crate::generate::{Generation, Generator, SamplingConfig};
use crate::model::config::{Family, GptConfig};
use crate::model::gpt::Gpt;
use crate::model::llama::Llama;
use crate::model::params::ParamLayout;
use crate::model::profile::OpProfile;
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, global_norm, scale_to_norm, sum_of_squares};
use crate::rng::Rng;

/// Makes CPU models.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuEngine;

impl Engine for CpuEngine {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn model(&self, config: &GptConfig, max_b: usize, max_t: usize) -> Result<Box<dyn Model>> {
        Ok(match config.family {
            Family::Gpt2 => Box::new(Gpt::new(config.clone(), max_b, max_t)?),
            Family::Llama => Box::new(Llama::new(config.clone(), max_b, max_t)?),
        })
    }

    fn replica(&self, config: &GptConfig, max_b: usize, max_t: usize, adamw: &AdamWConfig, shard: Shard) -> Result<Box<dyn Replica>> {
        Ok(match config.family {
            Family::Gpt2 => Box::new(CpuReplica::sharded(Gpt::new(config.clone(), max_b, max_t)?, adamw.clone(), shard)),
            Family::Llama => Box::new(CpuReplica::sharded(Llama::new(config.clone(), max_b, max_t)?, adamw.clone(), shard)),
        })
    }
}

/// A CPU model's flat parameters and gradients, what [`CpuReplica`] steps.
pub trait FlatModel: Model {
    fn params_mut(&mut self) -> &mut Vec<f32>;
    fn grads_mut(&mut self) -> &mut Vec<f32>;
    /// Parameters and gradients at once (the optimizer reads one and writes the other).
    fn params_and_grads(&mut self) -> (&mut [f32], &[f32]);
}

/// [`Model`] and [`FlatModel`] for a CPU model type whose inherent methods have the trait's
/// names; `$generate` answers one `(prompt, config)`.
macro_rules! cpu_model {
    ($ty:ty, $generate:expr) => {
        impl Model for $ty {
            fn config(&self) -> &GptConfig {
                &self.config
            }

            fn layout(&self) -> &ParamLayout {
                &self.layout
            }

            fn max_batch(&self) -> (usize, usize) {
                <$ty>::max_batch(self)
            }

            fn device(&self) -> String {
                "cpu".into()
            }

            fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
                <$ty>::forward(self, inputs, b, t)
            }

            fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32> {
                <$ty>::loss(self, targets, weights, denom, with_grad)
            }

            fn backward(&mut self) -> Result<()> {
                <$ty>::backward(self)
            }

            fn logits(&mut self) -> Result<Cow<'_, [f32]>> {
                Ok(Cow::Borrowed(<$ty>::logits(self)))
            }

            fn hidden(&mut self) -> Result<Cow<'_, [f32]>> {
                Ok(Cow::Borrowed(<$ty>::hidden(self)))
            }

            fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()> {
                <$ty>::backward_from_hidden(self, dhidden)
            }

            fn backward_from_logits(&mut self, write: &mut dyn FnMut(&mut [f32])) -> Result<()> {
                <$ty>::backward_from_logits(self, write)
            }

            fn zero_grad(&mut self) -> Result<()> {
                <$ty>::zero_grad(self);
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
                <$ty>::init_weights(self, &mut Rng::new(seed));
                Ok(())
            }

            fn generate(&self, jobs: &[(Vec<u32>, SamplingConfig)]) -> Result<Vec<Generation>> {
                // One KV cache per answer; answers are independent, so they run in parallel.
                let one = $generate;
                jobs.par_iter().map(|(prompt, cfg)| one(self, prompt, cfg)).collect()
            }

            fn profile(&mut self) -> &mut Option<OpProfile> {
                &mut self.profile
            }

            fn sync(&self) -> Result<()> {
                Ok(())
            }
        }

        impl FlatModel for $ty {
            fn params_mut(&mut self) -> &mut Vec<f32> {
                &mut self.params
            }
            fn grads_mut(&mut self) -> &mut Vec<f32> {
                &mut self.grads
            }
            fn params_and_grads(&mut self) -> (&mut [f32], &[f32]) {
                (&mut self.params, &self.grads)
            }
        }
    };
}

cpu_model!(Gpt, |m: &Gpt, prompt: &[u32], cfg: &SamplingConfig| Generator::new(m).generate(prompt, cfg));
cpu_model!(Llama, |m: &Llama, prompt: &[u32], cfg: &SamplingConfig| crate::model::llama_generate::generate(m, prompt, cfg));

/// A CPU model with its AdamW (of every parameter, or of one shard).
#[derive(Debug)]
pub struct CpuReplica<M = Gpt> {
    pub model: M,
    pub opt: AdamW,
    shard: Shard,
    gathered: Gathered,
}

impl<M: FlatModel> CpuReplica<M> {
    /// `model` with `opt`, an optimizer of every parameter.
    pub fn new(model: M, opt: AdamW) -> Self {
        CpuReplica { model, opt, shard: Shard::WHOLE, gathered: Gathered::default() }
    }

    /// `model` with a fresh AdamW of `shard`'s parameters.
    pub fn sharded(model: M, config: AdamWConfig, shard: Shard) -> Self {
        let opt = AdamW::sharded(config, model.layout(), shard.range(model.layout().len()));
        CpuReplica { model, opt, shard, gathered: Gathered::default() }
    }
}

impl<M: FlatModel> Replica for CpuReplica<M> {
    fn model(&mut self) -> &mut dyn Model {
        &mut self.model
    }

    fn model_ref(&self) -> &dyn Model {
        &self.model
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        if self.shard.is_whole() {
            return coll.all_reduce_sum(self.model.grads_mut());
        }
        self.shard.check(coll)?;
        coll.reduce_scatter_sum(self.model.grads_mut())
    }

    fn clip(&mut self, max_norm: f32, coll: &mut dyn Collective) -> Result<f32> {
        let g = self.model.grads_mut();
        if self.shard.is_whole() {
            return Ok(if max_norm > 0.0 { clip_grad_norm(g, max_norm) } else { global_norm(g) });
        }
        // Only this rank's shard holds summed gradients: the squares are summed over the group.
        let own = &mut g[self.opt.shard.clone()];
        let norm = coll.all_reduce_scalar(sum_of_squares(own))?.sqrt() as f32;
        if max_norm > 0.0 {
            scale_to_norm(own, norm, max_norm);
        }
        Ok(norm)
    }

    fn step(&mut self, lr: f32, coll: &mut dyn Collective) -> Result<()> {
        let (p, g) = self.model.params_and_grads();
        self.opt.step(p, g, lr);
        if !self.shard.is_whole() {
            coll.all_gather(self.model.params_mut())?;
        }
        Ok(())
    }

    fn optimizer_t(&self) -> u64 {
        self.opt.t
    }

    fn gather_moments(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        if self.shard.is_whole() {
            return Ok(());
        }
        let n = self.model.layout().len();
        self.gathered.gather(self.shard, n, (&self.opt.m, &self.opt.v), self.opt.t, coll)
    }

    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.shard.is_whole() {
            return Ok((self.opt.m.clone(), self.opt.v.clone()));
        }
        self.gathered.take(self.opt.t)
    }

    fn set_moments(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        let n = self.model.params_mut().len();
        let (m, v) = own_part(self.shard, n, m, v)?;
        self.opt.m.copy_from_slice(m);
        self.opt.v.copy_from_slice(v);
        self.opt.t = t;
        Ok(())
    }
}
