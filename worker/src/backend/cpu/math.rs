//! Element-wise math written so the compiler vectorises it: a polynomial `exp` (no libm call
//! per element), `tanh` from it, and sums/maxima over 16 independent lanes (a single scalar
//! accumulator is a serial dependency chain that strict IEEE ordering forbids the compiler to
//! split). Each is checked against `f64` in the tests below.

/// Lanes of the vectorised reductions; the summation order depends only on the length.
const LANES: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two (Cody–Waite) so `x − k·ln2` is exact for the k that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `eˣ` with a relative error below 2·10⁻⁷ on `[-87, 88]` (Cephes `expf` polynomial).
/// Inputs below −87.3 return ~1.2·10⁻³⁸ (not 0) and above 88 return ~1.6·10³⁸ (not ∞): the
/// callers (softmax, GELU) never need the extremes exactly.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.0);
    // x = k·ln2 + r with |r| <= ln2/2.
    let k = (x * LOG2E + 0.5).floor();
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // 2^k by building the exponent field; k is in [-126, 127] after the clamp.
    y * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// `tanh(x) = 1 − 2/(e^{2x} + 1)`; absolute error below 2·10⁻⁷.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// `Σ f(x_i)` over 16 lanes, then the lanes in order.
#[inline(always)]
fn map_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// `Σ x_i`.
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    map_sum(x, |v| v)
}

/// `Σ exp(x_i − shift)`.
#[inline]
pub fn exp_sum(x: &[f32], shift: f32) -> f32 {
    map_sum(x, |v| exp(v - shift))
}

/// `Σ (x_i − mu)²`.
#[inline]
pub fn sum_sq_dev(x: &[f32], mu: f32) -> f32 {
    map_sum(x, |v| (v - mu) * (v - mu))
}

/// Maximum (NaN-ignoring, like `f32::max`).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().chain(rest).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Dot product over 16 lanes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_tenths_of_a_micro_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 2e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn tanh_is_within_two_tenths_of_a_micro_absolute() {
        let mut worst = 0.0f64;
        let mut x = -20.0f32;
        while x < 20.0 {
            worst = worst.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            x += 0.000_73;
        }
        assert!(worst < 2e-7, "max absolute error {worst:e}");
        assert_eq!(tanh(30.0), 1.0);
        assert_eq!(tanh(-30.0), -1.0);
    }

    #[test]
    fn reductions_match_f64() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let s64: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - s64).abs() < 1e-4);
        assert_eq!(max(&x), 0.5);
        let d64: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((dot(&x, &x) as f64 - d64).abs() < 1e-4);
        let e64: f64 = x.iter().map(|&v| (v as f64 - 0.5).exp()).sum();
        assert!((exp_sum(&x, 0.5) as f64 - e64).abs() < 1e-3 * e64);
    }
}
