//! PPO's losses and their gradients: generalised advantage estimation, the clipped surrogate,
//! the clipped value loss, log-probabilities and entropy at the rollout temperature, the k3 KL
//! estimator (GRPO's KL term), and the gradient of the policy loss written into the logits
//! (shared by PPO and GRPO).

use super::rollout::{Rollout, padded};
use crate::engine::Model;
use crate::engine::head::ScalarHead;
use crate::phase::PhaseError;

/// Generalised advantage estimation over one answer: `δ_t = r_t + γ·V_{t+1} − V_t` (`V` after
/// the last token is 0), `A_t = δ_t + γλ·A_{t+1}`; returns `(A, A + V)`.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut next_adv = 0.0f32;
    for i in (0..n).rev() {
        let next_v = if i + 1 < n { values[i + 1] } else { 0.0 };
        let delta = rewards[i] + gamma * next_v - values[i];
        next_adv = delta + gamma * lambda * next_adv;
        adv[i] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// PPO's clipped surrogate for one token, `max(−A·ρ, −A·clip(ρ, 1 ± ε))` with
/// `ρ = exp(log π − log π_old)`: `(loss, d loss / d log π, clipped)`. The derivative is zero
/// where the clipped branch is the larger one; `clipped` counts tokens with `|ρ − 1| > ε`.
pub fn clipped_surrogate(logp: f32, old_logp: f32, adv: f32, eps: f32) -> (f64, f32, bool) {
    let ratio = (logp - old_logp).exp();
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    let grad = if unclipped >= clipped { -adv * ratio } else { 0.0 };
    (unclipped.max(clipped) as f64, grad, (ratio - 1.0).abs() > eps)
}

/// The k3 estimator of KL(π ‖ π_ref) from one token sampled from π:
/// `exp(d) − d − 1` with `d = log π_ref − log π` (unbiased, never negative); returns
/// `(k3, d k3 / d log π = 1 − exp(d))`.
pub fn k3(logp: f32, ref_logp: f32) -> (f64, f32) {
    let d = (ref_logp - logp) as f64;
    (d.exp() - d - 1.0, (1.0 - d.exp()) as f32)
}

/// The clipped value loss for one token, `½·max((V − R)², (V_clip − R)²)` with
/// `V_clip = V_old + clip(V − V_old, ±c)`: `(loss, d loss / d V)`.
pub fn clipped_value_loss(v: f32, v_old: f32, ret: f32, clip: f32) -> (f64, f32) {
    let d = v - v_old;
    let v_clip = v_old + d.clamp(-clip, clip);
    let (a, b) = (v - ret, v_clip - ret);
    if a * a >= b * b {
        (0.5 * (a * a) as f64, a)
    } else {
        // Through the clip: V_clip moves with V only inside the clip range.
        (0.5 * (b * b) as f64, if d.abs() < clip { b } else { 0.0 })
    }
}

/// `log softmax(row/τ)[target]` and that softmax's entropy, over a row of real-vocabulary
/// logits (`inv_temp` = 1/τ: the rollouts' sampling distribution).
pub(crate) fn logp_entropy(row: &[f32], target: usize, inv_temp: f32) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let mut dot = 0.0f64;
    for &x in row {
        let z = ((x - max) * inv_temp) as f64;
        let e = z.exp();
        sum += e;
        dot += e * z;
    }
    let lse = sum.ln();
    // log p = z_target − lse; H = lse − Σ p·z.
    ((((row[target] - max) * inv_temp) as f64 - lse) as f32, lse - dot / sum)
}

/// Sums of the policy loss over a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyStats {
    /// Σ surrogate / denom.
    pub loss: f64,
    /// Tokens with `|ρ − 1| > ε`.
    pub clipped: f64,
    pub tokens: f64,
}

/// Turns the logits `x` of a forward over `rows` (each padded to `t`) into the gradient of the
/// minibatch's policy loss `Σ_tokens [surrogate + kl_coef·k3 − entropy_coef·H] / denom`, where
/// the policy is `π = softmax(x/τ)` (`inv_temp` = 1/τ):
/// `d/dx = (1/τ)·[g·(onehot − p) + entropy_coef·p·(log p + H)/denom]` at each answer position,
/// with `g = d (surrogate + kl_coef·k3) / d log π / denom`; zero elsewhere and in the padding
/// columns. The k3 term (GRPO's) reads each row's `ref_logp`; PPO passes `kl_coef = 0`, its KL
/// being in the rewards.
pub fn policy_loss_grad(logits: &mut [f32], rows: &[&Rollout], t: usize, v: usize, vp: usize, inv_temp: f32, eps: f32, entropy_coef: f32, kl_coef: f32, denom: f32) -> PolicyStats {
    let mut stats = PolicyStats::default();
    for (i, r) in rows.iter().enumerate() {
        let answer = r.prompt_len - 1..r.ids.len() - 1;
        for pos in 0..t {
            let row = &mut logits[(i * t + pos) * vp..(i * t + pos + 1) * vp];
            if !answer.contains(&pos) {
                row.fill(0.0);
                continue;
            }
            let k = pos + 1 - r.prompt_len;
            let target = r.ids[pos + 1] as usize;
            let (logp, entropy) = logp_entropy(&row[..v], target, inv_temp);
            let (mut loss, mut dlogp, clipped) = clipped_surrogate(logp, r.old_logp[k], r.adv[k], eps);
            // Only with a KL term, so that PPO's numbers stay exactly what they were.
            if kl_coef != 0.0 {
                let (kl, dkl) = k3(logp, r.ref_logp[k]);
                loss += kl_coef as f64 * kl;
                dlogp += kl_coef * dkl;
            }
            stats.loss += (loss - entropy_coef as f64 * entropy) / denom as f64;
            stats.clipped += clipped as u8 as f64;
            stats.tokens += 1.0;
            let g = dlogp / denom;
            // log p_j = x_j/τ − (x_target/τ − log p_target).
            let shift = row[target] * inv_temp - logp;
            let h = entropy as f32;
            for (j, x) in row[..v].iter_mut().enumerate() {
                let logp_j = *x * inv_temp - shift;
                let p = logp_j.exp();
                let onehot = if j == target { 1.0 } else { 0.0 };
                *x = inv_temp * (g * (onehot - p) + entropy_coef * p * (logp_j + h) / denom);
            }
            row[v..].fill(0.0);
        }
    }
    stats
}

/// The value model's clipped loss over `rows` (divided by `denom`): adds its gradient into the
/// model's `grads` and `head_grad` (`C` weights then the bias); returns the loss.
pub(crate) fn value_backward(
    critic: &mut dyn Model,
    head: &ScalarHead,
    head_grad: &mut [f32],
    rows: &[&Rollout],
    t: usize,
    pad: u32,
    clip: f32,
    denom: f32,
) -> Result<f64, PhaseError> {
    let c = critic.config().n_embd;
    critic.forward(&padded(rows, t, pad), rows.len(), t)?;
    let h = critic.hidden()?.into_owned();
    let mut dh = vec![0.0f32; h.len()];
    let mut loss = 0.0;
    for (i, r) in rows.iter().enumerate() {
        for k in 0..r.answer_len() {
            let at = (i * t + r.position(k)) * c;
            let hs = &h[at..at + c];
            let (l, dv) = clipped_value_loss(head.score(hs), r.values[k], r.returns[k], clip);
            loss += l / denom as f64;
            head.backward(hs, dv / denom, &mut dh[at..at + c], head_grad);
        }
    }
    critic.backward_from_hidden(&dh)?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Gpt;
    use crate::phase::ppo::rollout::{answer_logps, padded};
    use crate::rng::Rng;

    #[test]
    fn gae_matches_the_direct_sum_of_discounted_deltas() {
        let r = [0.1f32, -0.3, 0.0, 2.0];
        let v = [0.5f32, 0.2, -0.1, 0.7];
        let (gamma, lambda) = (0.9f32, 0.8f32);
        let (adv, ret) = gae(&r, &v, gamma, lambda);
        // A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t, V_T = 0, in f64.
        let delta: Vec<f64> = (0..4).map(|t| r[t] as f64 + gamma as f64 * if t < 3 { v[t + 1] as f64 } else { 0.0 } - v[t] as f64).collect();
        for t in 0..4 {
            let want: f64 = (t..4).map(|k| (gamma as f64 * lambda as f64).powi((k - t) as i32) * delta[k]).sum();
            assert!((adv[t] as f64 - want).abs() < 1e-6, "A[{t}] = {} vs {want}", adv[t]);
            assert!((ret[t] - (adv[t] + v[t])).abs() < 1e-7);
        }
        // λ = 1, γ = 1: the advantage is the return-to-go minus the value.
        let (adv, _) = gae(&r, &v, 1.0, 1.0);
        assert!((adv[0] - (1.8 - 0.5)).abs() < 1e-6, "{}", adv[0]);
    }

    #[test]
    fn losses_match_hand_computed_values() {
        // ρ = e^{0.1} = 1.10517 inside 1 ± 0.2: loss −A·ρ, d/dlogπ = −A·ρ.
        let (l, g, c) = clipped_surrogate(-1.0, -1.1, 2.0, 0.2);
        assert!((l - (-2.0 * 0.1f64.exp())).abs() < 1e-6 && (g as f64 + 2.0 * 0.1f64.exp()).abs() < 1e-5 && !c, "{l} {g} {c}");
        // ρ = e^{0.5} = 1.6487 > 1.2 with A > 0: the clipped branch (−1.2·A) wins, no gradient.
        let (l, g, c) = clipped_surrogate(-0.5, -1.0, 1.0, 0.2);
        assert!((l + 1.2).abs() < 1e-6 && g == 0.0 && c, "{l} {g} {c}");
        // Same ratio with A < 0: the unclipped branch (−A·ρ = 1.6487) is larger and keeps its gradient.
        let (l, g, c) = clipped_surrogate(-0.5, -1.0, -1.0, 0.2);
        assert!((l - 0.5f64.exp()).abs() < 1e-6 && (g as f64 - 0.5f64.exp()).abs() < 1e-5 && c, "{l} {g} {c}");
        // Value: V = 1.0, V_old = 0.0, R = 2.0, clip 0.2: unclipped ½·1² = 0.5 < clipped ½·1.8² = 1.62,
        // and V is outside the clip range, so no gradient flows.
        let (l, g) = clipped_value_loss(1.0, 0.0, 2.0, 0.2);
        assert!((l - 1.62).abs() < 1e-6 && g == 0.0, "{l} {g}");
        // V = 0.1 inside the clip range: both branches equal, gradient V − R = −1.9.
        let (l, g) = clipped_value_loss(0.1, 0.0, 2.0, 0.2);
        assert!((l - 0.5 * 1.9 * 1.9).abs() < 1e-6 && (g + 1.9).abs() < 1e-6, "{l} {g}");
    }

    fn tiny_rollout(adv: f32) -> (Gpt, Rollout) {
        let cfg = crate::GptConfig::new(40, 16, 1, 2, 8);
        let mut m = Gpt::new(cfg, 1, 8).unwrap();
        let mut rng = Rng::new(11);
        m.params.iter_mut().for_each(|p| *p = 0.3 * rng.normal());
        let ids = vec![1u32, 5, 9, 3, 7, 2];
        let mut r = Rollout { ids, prompt_len: 3, adv: vec![adv; 3], ..Default::default() };
        let rows = [&r.clone()];
        let (lp, _) = answer_logps(&mut m, &rows, 8, 0, 1.0 / 0.7).unwrap().remove(0);
        // Old log-probs a little off the current ones, so ratios are not all 1.
        r.old_logp = lp.iter().enumerate().map(|(i, x)| x + 0.05 * i as f32).collect();
        (m, r)
    }

    #[test]
    fn zero_advantages_give_a_zero_policy_gradient() {
        let (mut m, r) = tiny_rollout(0.0);
        m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.0, 0.0, 3.0);
        })
        .unwrap();
        assert!(m.grads.iter().all(|&g| g == 0.0), "max |g| = {}", m.grads.iter().fold(0.0f32, |a, g| a.max(g.abs())));
    }

    #[test]
    fn grpo_zero_advantages_give_a_zero_gradient_and_its_kl_term_matches_finite_differences() {
        // GRPO's loss adds β·k3 per token. A = 0 with the reference equal to the policy: the
        // surrogate and k3 both have zero gradient (k3' = 1 − exp(0) = 0), exactly.
        let (mut m, mut r) = tiny_rollout(0.0);
        let (lp, _) = answer_logps(&mut m, &[&r.clone()], 8, 0, 1.0 / 0.7).unwrap().remove(0);
        r.ref_logp = lp.clone();
        m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.0, 0.04, 3.0);
        })
        .unwrap();
        assert!(m.grads.iter().all(|&g| g == 0.0), "max |g| = {}", m.grads.iter().fold(0.0f32, |a, g| a.max(g.abs())));
        // A reference away from the policy and A ≠ 0: the whole loss's gradient (surrogate,
        // k3 with a large β so it matters, entropy) against central differences.
        r.ref_logp = lp.iter().enumerate().map(|(i, x)| x - 0.3 + 0.2 * i as f32).collect();
        r.adv = vec![0.7; 3];
        let loss = |m: &mut Gpt| -> f64 {
            m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
            let mut lg = Gpt::logits(m).to_vec();
            policy_loss_grad(&mut lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 0.5, 3.0).loss
        };
        loss(&mut m);
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 0.5, 3.0);
        })
        .unwrap();
        let (analytic, numeric) = crate::model::gradcheck::directional(&mut m, loss, 5, 1e-2);
        // As for PPO's: central differences, h = 1e-2 in f32, 2% relative.
        assert!((analytic - numeric).abs() <= 2e-2 * analytic.abs().max(1e-3), "{analytic} vs {numeric}");
    }

    #[test]
    fn the_policy_gradient_matches_finite_differences_of_the_loss() {
        let (mut m, r) = tiny_rollout(0.7);
        let loss = |m: &mut Gpt| -> f64 {
            m.forward(&padded(&[&r], 8, 0), 1, 8).unwrap();
            let mut lg = Gpt::logits(m).to_vec();
            policy_loss_grad(&mut lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 0.0, 3.0).loss
        };
        loss(&mut m);
        m.zero_grad();
        m.backward_from_logits(|lg| {
            policy_loss_grad(lg, &[&r], 8, 40, 128, 1.0 / 0.7, 0.2, 0.01, 0.0, 3.0);
        })
        .unwrap();
        let (analytic, numeric) = crate::model::gradcheck::directional(&mut m, loss, 5, 1e-2);
        // Central differences, h = 1e-2 in f32: 2% relative covers truncation and rounding.
        assert!((analytic - numeric).abs() <= 2e-2 * analytic.abs().max(1e-3), "{analytic} vs {numeric}");
    }
}
