//! RL phases' sampled answers, a few per step, kept for a phase's latest steps only.

use rusqlite::params;

use super::jobs::{read_f64, sql_f64};
use super::{Result, Store};

/// One sampled answer of an RL step.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub step: u64,
    pub prompt: String,
    pub answer: String,
    pub reward: f64,
    pub rm_score: f64,
    /// The verifier's graded score and strict verdict; None when the prompt asks for no form.
    pub verifier: Option<(f64, bool)>,
    /// Σ over the answer of `log π − log π_ref`, nats.
    pub kl: f64,
}

impl Store {
    /// Records a step's samples (a replayed step keeps the first) and drops the phase's samples
    /// older than its latest `keep_steps` steps.
    pub fn insert_samples(&self, job_id: u64, idx: u32, step: u64, samples: &[SampleRow], keep_steps: u64) -> Result<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO rollout_samples (job_id, phase_idx, step, idx, prompt, answer, reward, rm_score, verified, verifier_score, verifier_pass, kl) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        for (i, x) in samples.iter().enumerate() {
            let (verified, score, pass) = match x.verifier {
                Some((s, p)) => (true, s, p),
                None => (false, 0.0, false),
            };
            st.execute(params![
                job_id as i64,
                idx as i64,
                step as i64,
                i as i64,
                x.prompt,
                x.answer,
                sql_f64(x.reward),
                sql_f64(x.rm_score),
                verified,
                sql_f64(score),
                pass,
                sql_f64(x.kl)
            ])?;
        }
        self.conn.execute(
            "DELETE FROM rollout_samples WHERE job_id = ?1 AND phase_idx = ?2 AND step <= ?3",
            params![job_id as i64, idx as i64, step.saturating_sub(keep_steps).min(i64::MAX as u64) as i64],
        )?;
        Ok(())
    }

    /// The samples of a phase's latest `steps` steps that have any, newest step first.
    pub fn recent_samples(&self, job_id: u64, idx: u32, steps: usize) -> Result<Vec<SampleRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT step, prompt, answer, reward, rm_score, verified, verifier_score, verifier_pass, kl FROM rollout_samples \
             WHERE job_id = ?1 AND phase_idx = ?2 AND step IN (SELECT DISTINCT step FROM rollout_samples WHERE job_id = ?1 AND phase_idx = ?2 ORDER BY step DESC LIMIT ?3) \
             ORDER BY step DESC, idx",
        )?;
        let rows = st.query_map(params![job_id as i64, idx as i64, steps.min(i64::MAX as usize) as i64], |r| {
            let verified: bool = r.get(5)?;
            Ok(SampleRow {
                step: r.get::<_, i64>(0)? as u64,
                prompt: r.get(1)?,
                answer: r.get(2)?,
                reward: read_f64(r, 3)?,
                rm_score: read_f64(r, 4)?,
                verifier: if verified { Some((read_f64(r, 6)?, r.get(7)?)) } else { None },
                kl: read_f64(r, 8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64, answer: &str, verifier: Option<(f64, bool)>) -> SampleRow {
        SampleRow { step, prompt: "写一首五言绝句".into(), answer: answer.into(), reward: 1.5, rm_score: f64::NAN, verifier, kl: 0.25 }
    }

    #[test]
    fn samples_round_trip_and_only_the_latest_steps_are_kept() {
        let dir = std::env::temp_dir().join(format!("liandan-samples-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::open(&dir.join("s.db")).unwrap();
        for step in 1..=5 {
            s.insert_samples(7, 3, step, &[sample(step, &format!("a{step}"), Some((0.5, step % 2 == 0))), sample(step, "b", None)], 3).unwrap();
        }
        // A replayed step keeps what was first recorded.
        s.insert_samples(7, 3, 5, &[sample(5, "replayed", None)], 3).unwrap();
        let got = s.recent_samples(7, 3, 10).unwrap();
        assert_eq!(got.iter().map(|x| x.step).collect::<Vec<_>>(), [5, 5, 4, 4, 3, 3], "steps 1 and 2 are past the latest 3");
        assert_eq!(got[0].answer, "a5");
        assert_eq!(got[0].verifier, Some((0.5, false)));
        assert_eq!(got[1].verifier, None);
        assert!(got[0].rm_score.is_nan(), "NaN is kept, not dropped");
        assert_eq!(s.recent_samples(7, 3, 1).unwrap().len(), 2);
        assert!(s.recent_samples(7, 4, 10).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
