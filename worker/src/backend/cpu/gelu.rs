//! GELU with the tanh approximation (`gelu_new` in Hugging Face, GPT-2's activation):
//! `gelu(x) = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, with the vectorised [`math::tanh`].

use rayon::prelude::*;

use super::ROW_CHUNK_ELEMS;
use super::math;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044715;

/// `out = gelu(inp)`, element-wise.
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(ROW_CHUNK_ELEMS).zip(inp.par_chunks(ROW_CHUNK_ELEMS)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
            *o = 0.5 * x * (1.0 + math::tanh(u));
        }
    });
}

/// `dinp = dout · gelu'(inp)` (overwritten).
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(ROW_CHUNK_ELEMS).zip(inp.par_chunks(ROW_CHUNK_ELEMS).zip(dout.par_chunks(ROW_CHUNK_ELEMS))).for_each(|(d, (x, g))| {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
            let th = math::tanh(u);
            let sech2 = 1.0 - th * th;
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
            *d = g * (0.5 * (1.0 + th) + 0.5 * x * sech2 * du);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivative_matches_central_differences() {
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.1).collect();
        let mut d = vec![0.0; xs.len()];
        gelu_backward(&mut d, &xs, &vec![1.0; xs.len()]);
        for (&x, &d) in xs.iter().zip(&d) {
            let h = 1e-3f64;
            let g = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            let fd = (g(x as f64 + h) - g(x as f64 - h)) / (2.0 * h);
            // f64 central difference has O(h²)≈1e-6 error; f32 evaluation adds ~1e-6.
            assert!((fd - d as f64).abs() < 1e-5, "x={x}: analytic {d}, numeric {fd}");
        }
    }
}
