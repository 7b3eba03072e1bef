//! The GPT-2 model: configuration, parameter layout, activations and the forward/backward pass.

pub mod acts;
pub mod config;
pub mod gpt;
pub mod llama;
pub mod llama_generate;
pub mod memory;
pub mod params;
pub mod profile;

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
