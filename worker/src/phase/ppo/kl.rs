//! The KL controller: β, the weight of the per-token penalty `−β·(log π − log π_ref)`, fixed or
//! adapted toward a target KL per answer (the adaptive controller of Ziegler et al.'s RLHF):
//! `β ← β·(1 + clip(KL/target − 1, ±0.2)·B/horizon)`, where `B` is the step's rollout count.

/// β for the next step after a step whose mean KL per answer was `kl`, over `b` rollouts.
/// Without a target β stays.
pub fn next_beta(beta: f32, kl: f64, target: Option<f32>, horizon: f32, b: f64) -> f32 {
    match target {
        None => beta,
        Some(target) => {
            let err = (kl / target as f64 - 1.0).clamp(-0.2, 0.2);
            (beta as f64 * (1.0 + err * b / horizon as f64)) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_moves_toward_the_target_and_is_bounded() {
        assert_eq!(next_beta(0.05, 12.0, None, 1000.0, 16.0), 0.05, "fixed β");
        // KL twice the target: the error is clipped to +0.2, β grows by 0.2·16/1000.
        // β is an f32: compared within one f32 rounding at 0.05 (about 4e-9).
        let up = next_beta(0.05, 12.0, Some(6.0), 1000.0, 16.0);
        assert!((up as f64 - 0.05f32 as f64 * (1.0 + 0.2 * 16.0 / 1000.0)).abs() < 1e-8, "{up}");
        // KL at 90% of the target: −0.1.
        let down = next_beta(0.05, 5.4, Some(6.0), 1000.0, 16.0);
        assert!((down as f64 - 0.05f32 as f64 * (1.0 - 0.1 * 16.0 / 1000.0)).abs() < 1e-8, "{down}");
        assert_eq!(next_beta(0.05, 6.0, Some(6.0), 1000.0, 16.0), 0.05, "on target");
    }
}
