//! The GPT-2 model: configuration, parameter layout, activations and the forward/backward pass.

pub mod acts;
pub mod gpt;
pub mod llama;
pub mod llama_generate;
pub mod profile;

// The configuration, layout and memory estimate are shared with the coordinator (liandan-plan).
pub use liandan_plan::{config, memory, params};

/// Gradient checks for tests: a model's analytic gradient against central differences.
#[cfg(test)]
pub(crate) mod gradcheck {
    use super::gpt::Gpt;
    use crate::rng::Rng;

    /// The derivative of `loss` along a random unit direction of the parameters (seeded), from
    /// the gradient already in `m.grads` and from central differences with step `h`:
    /// `(analytic, numeric)`. Leaves the parameters perturbed; tests use the model no further.
    pub fn directional(m: &mut Gpt, mut loss: impl FnMut(&mut Gpt) -> f64, seed: u64, h: f32) -> (f64, f64) {
        let g = m.grads.clone();
        let base = m.params.clone();
        let mut rng = Rng::new(seed);
        let u: Vec<f32> = (0..base.len()).map(|_| rng.normal()).collect();
        let norm = u.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        let analytic: f64 = g.iter().zip(&u).map(|(a, b)| *a as f64 * (*b / norm) as f64).sum();
        let mut at = |sign: f32, m: &mut Gpt| {
            m.params.iter_mut().zip(base.iter().zip(&u)).for_each(|(p, (b, u))| *p = b + sign * h * u / norm);
            loss(m)
        };
        let up = at(1.0, m);
        let down = at(-1.0, m);
        (analytic, (up - down) / (2.0 * h as f64))
    }
}

/// The memory estimate of `liandan-plan` against what the models really allocate.
#[cfg(test)]
mod memory_estimate {
    use crate::model::gpt::Gpt;
    use liandan_plan::config::GptConfig;
    use liandan_plan::memory::*;

    #[test]
    fn the_estimate_is_what_the_model_allocates() {
        for (cfg, b, t) in [(GptConfig::new(300, 64, 2, 4, 32), 3, 16), (GptConfig::new(1000, 128, 3, 2, 48), 2, 128)] {
            let m = Gpt::new(cfg.clone(), b, t).unwrap();
            let a = &m.acts;
            let acts = [
                &a.encoded,
                &a.ln1,
                &a.ln1_mean,
                &a.ln1_rstd,
                &a.qkv,
                &a.att,
                &a.atty,
                &a.residual2,
                &a.ln2,
                &a.ln2_mean,
                &a.ln2_rstd,
                &a.fch,
                &a.fch_gelu,
                &a.residual3,
                &a.lnf,
                &a.lnf_mean,
                &a.lnf_rstd,
                &a.logits,
                &a.losses,
                &a.proj,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>();
            let g = &m.gacts;
            let gacts = [&g.dresidual, &g.dln, &g.dqkv, &g.datt, &g.datty, &g.dfch, &g.dfch_gelu].iter().map(|v| v.len()).sum::<usize>();
            assert_eq!(activation_floats(&cfg, b, t), Some(acts as u128));
            assert_eq!(grad_activation_floats(&cfg, b, t), Some(gacts as u128));
            let e = gpt(&cfg, b, t, true).unwrap();
            assert_eq!(e.weights, 4 * m.params.len() as u64);
            assert_eq!(e.gradients, 4 * m.grads.len() as u64);
            assert_eq!(e.optimizer, 8 * m.params.len() as u64);
            assert_eq!(e.activations, 4 * (acts + gacts + b * t) as u64);
        }
    }

    #[test]
    fn the_llama_estimate_is_what_the_model_allocates() {
        let mut cfg = GptConfig::llama(300, 64, 2, 4, 2, 32, 48);
        cfg.attention_bias = true;
        let (b, t) = (3, 16);
        let m = crate::model::llama::Llama::new(cfg.clone(), b, t).unwrap();
        let a = &m.acts;
        let acts: usize = [
            &a.encoded,
            &a.ln1,
            &a.ln1_rstd,
            &a.qkv,
            &a.att,
            &a.atty,
            &a.residual2,
            &a.ln2,
            &a.ln2_rstd,
            &a.fch,
            &a.fch_act,
            &a.residual3,
            &a.lnf,
            &a.lnf_rstd,
            &a.logits,
            &a.losses,
            &a.proj,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        let g = &m.gacts;
        let gacts: usize = [&g.dresidual, &g.dln, &g.dqkv, &g.datt, &g.datty, &g.dfch, &g.dfch_act].iter().map(|v| v.len()).sum();
        let rope = m.rope.cos.len() + m.rope.sin.len();
        let e = gpt(&cfg, b, t, true).unwrap();
        assert_eq!(e.weights, 4 * m.params.len() as u64);
        assert_eq!(e.optimizer, 8 * m.params.len() as u64);
        assert_eq!(e.activations, 4 * (acts + gacts + rope + b * t) as u64);
    }

    #[test]
    fn absurd_sizes_do_not_overflow() {
        let cfg = GptConfig::new(1 << 20, 1 << 20, 1 << 20, 1 << 10, 1 << 20);
        assert_eq!(gpt(&cfg, usize::MAX, usize::MAX, true), None);
        assert!(gpt(&GptConfig::new(50257, 1024, 12, 12, 768), 1 << 20, 1024, true).is_none_or(|e| e.total() > 1 << 40));
    }
}
