//! Warnings an RL phase's metrics raise on the dashboard: the signs of reward hacking that a
//! loss curve does not show.
//!
//! Each rule compares the first and the last quarter of the phase's steps so far (at least
//! [`MIN_STEPS`] steps, so that a few noisy steps raise nothing):
//! - **learned reward up, verifier down**: the reward model's score (`rm_score`) rose while the
//!   verifier's graded score (`verifier_score`) fell: the policy is learning what the reward
//!   model likes, not what the verifier checks;
//! - **answer length drift**: the mean answer length (`answer_tokens`) grew or shrank by more
//!   than half;
//! - **KL past its target**: the last quarter's mean KL to the reference (`kl`, nats per
//!   answer) is over 1.5 × the phase's `kl_target` (or over [`KL_LIMIT`] without one).

use crate::store::MetricRow;

/// Steps a phase needs before any rule applies.
pub const MIN_STEPS: usize = 12;
/// The rise of the reward model's score and the fall of the verifier's that, together, warn.
pub const RM_RISE: f64 = 0.1;
pub const VERIFIER_FALL: f64 = 0.05;
/// Answer length ratio (last quarter over first) outside `1/x..x` warns.
pub const LENGTH_DRIFT: f64 = 1.5;
/// KL, nats per answer, that warns when the phase sets no target.
pub const KL_LIMIT: f64 = 10.0;

/// The means of `key` over the first and the last quarter of `rows` (None: too few steps, or
/// the key is missing or not finite there).
fn quarters(rows: &[MetricRow], key: &str) -> Option<(f64, f64)> {
    if rows.len() < MIN_STEPS {
        return None;
    }
    let q = rows.len() / 4;
    let mean = |part: &[MetricRow]| -> Option<f64> {
        let v: Vec<f64> = part.iter().filter_map(|r| r.values.get(key).copied()).filter(|x| x.is_finite()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Some((mean(&rows[..q])?, mean(&rows[rows.len() - q..])?))
}

/// The warnings `rows` (one phase's metrics in step order) raise; `kl_target` is the phase's.
pub fn warnings(rows: &[MetricRow], kl_target: Option<f64>) -> Vec<String> {
    let mut out = Vec::new();
    let span = || {
        let q = rows.len() / 4;
        format!("steps {}–{} vs {}–{}", rows[0].step, rows[q - 1].step, rows[rows.len() - q].step, rows[rows.len() - 1].step)
    };
    if let (Some((rm0, rm1)), Some((v0, v1))) = (quarters(rows, "rm_score"), quarters(rows, "verifier_score"))
        && rm1 - rm0 > RM_RISE
        && v0 - v1 > VERIFIER_FALL
    {
        out.push(format!(
            "the learned reward rose ({rm0:.2} → {rm1:.2}) while the verifier's score fell ({v0:.2} → {v1:.2}), {}: the policy may be exploiting the reward model",
            span()
        ));
    }
    if let Some((l0, l1)) = quarters(rows, "answer_tokens")
        && l0 > 0.0
        && (l1 / l0 > LENGTH_DRIFT || l1 / l0 < 1.0 / LENGTH_DRIFT)
    {
        out.push(format!("answer length drifted from {l0:.1} to {l1:.1} tokens, {}", span()));
    }
    if let Some((_, k1)) = quarters(rows, "kl") {
        let limit = kl_target.map_or(KL_LIMIT, |t| 1.5 * t);
        if k1 > limit {
            let what = kl_target.map_or(format!("the {KL_LIMIT} nats this dashboard warns at"), |t| format!("1.5 × its target of {t}"));
            out.push(format!("KL to the reference is {k1:.1} nats per answer over the last quarter of the steps, past {what}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(f: impl Fn(usize) -> Vec<(&'static str, f64)>) -> Vec<MetricRow> {
        (0..20)
            .map(|i| MetricRow {
                step: i as u64 + 1,
                loss: 0.0,
                lr: 0.0,
                grad_norm: 0.0,
                tokens: 0,
                step_ms: 0,
                world: 1,
                generation: 1,
                values: f(i).into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            })
            .collect()
    }

    #[test]
    fn reward_hacking_is_flagged_and_a_healthy_run_is_not() {
        // The demo's own trial: the reward model's score 1.05 → 1.80, the verifier's 0.49 → 0.34.
        let hacked = rows(|i| vec![("rm_score", 1.05 + 0.75 * i as f64 / 19.0), ("verifier_score", 0.49 - 0.15 * i as f64 / 19.0), ("answer_tokens", 20.0), ("kl", 3.0)]);
        let w = warnings(&hacked, Some(6.0));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("learned reward rose") && w[0].contains("steps 1–5 vs 16–20"), "{}", w[0]);
        // Both rising: what RLHF is for.
        let healthy = rows(|i| vec![("rm_score", 1.0 + 0.05 * i as f64), ("verifier_score", 0.3 + 0.01 * i as f64), ("answer_tokens", 20.0 + 0.1 * i as f64), ("kl", 5.0)]);
        assert!(warnings(&healthy, Some(6.0)).is_empty());
        assert!(warnings(&hacked[..MIN_STEPS - 1], Some(6.0)).is_empty(), "too few steps to judge");
    }

    #[test]
    fn length_drift_and_kl_past_target_are_flagged() {
        let long = rows(|i| vec![("answer_tokens", 20.0 + 2.0 * i as f64), ("kl", 2.0 + i as f64)]);
        let w = warnings(&long, Some(6.0));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("answer length drifted from 24.0 to 54.0"), "{}", w[0]);
        assert!(w[1].contains("19.0 nats") && w[1].contains("target of 6"), "{}", w[1]);
        assert_eq!(warnings(&long, Some(20.0)).len(), 1, "KL 19 is under 1.5 × 20");
        let short = rows(|i| vec![("answer_tokens", 30.0 - i as f64)]);
        assert_eq!(warnings(&short, None).len(), 1, "shrinking answers drift too");
        assert!(warnings(&rows(|_| vec![("kl", 9.0)]), None).is_empty(), "under the limit without a target");
        assert!(warnings(&rows(|_| vec![("kl", f64::NAN)]), None).is_empty(), "no finite values, no verdict");
    }
}
