//! The reward phase: a scalar head on the final hidden state of the answer's last token
//! (`r = h·w + b`), trained from the SFT model on comparisons with the Bradley–Terry loss
//! `−log σ(r_chosen − r_rejected)`, data-parallel like the other phases. 10% of the pairs
//! (by a hash of their text) are held out; the pairwise accuracy on them is written with every
//! checkpoint (`reward_eval.json`).

use serde::{Deserialize, Serialize};

use super::driver::{Ctx, Run, Start, StepOut, drive, optimizer_shard, start_replica};
use super::sft::load_tokenizer;
use super::{PhaseError, PhaseIo, PhaseOutcome, PhaseStep};
use crate::engine::head::adam_step;
use crate::engine::{Model, Replica};
use crate::ledger::Ledger;
use crate::plan::PhasePlan;
use crate::train::TrainConfig;

/// File of the held-out accuracy inside a reward checkpoint.
pub const EVAL_FILE: &str = liandan_plan::checkpoint::eval_files::REWARD;

pub use crate::engine::head::{HEAD_FILE, ScalarHead};
pub use liandan_plan::inputs::pairs::{RewardPairs, comparisons, conversation, held_out, reward_pairs};

/// Held-out pairwise accuracy, overall and per task (`(correct, pairs)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardEval {
    pub pairs: usize,
    pub correct: usize,
    pub accuracy: f64,
    #[serde(default)]
    pub by_task: std::collections::BTreeMap<String, (usize, usize)>,
}

/// Bradley–Terry over pairs: the summed loss and `dL/dr` for chosen and rejected, each divided
/// by `n` (the global number of pairs, so ranks' gradients add up to the mean's).
pub fn bradley_terry(rc: &[f32], rr: &[f32], n: f32) -> (f64, Vec<f32>, Vec<f32>) {
    let mut loss = 0.0f64;
    let (mut dc, mut dr) = (Vec::with_capacity(rc.len()), Vec::with_capacity(rr.len()));
    for (&c, &r) in rc.iter().zip(rr) {
        let delta = (c - r) as f64;
        // −log σ(Δ) = softplus(−Δ), computed stably.
        loss += if delta > 0.0 { (-delta).exp().ln_1p() } else { -delta + delta.exp().ln_1p() };
        let s = 1.0 / (1.0 + delta.exp()); // σ(−Δ)
        dc.push((-s / n as f64) as f32);
        dr.push((s / n as f64) as f32);
    }
    (loss, dc, dr)
}

/// Rows padded to `t` and the last real index of each.
fn rows(convs: &[&Vec<u32>], t: usize, pad: u32) -> (Vec<u32>, Vec<usize>) {
    (super::padded_rows(convs.iter().map(|c| c.as_slice()), t, pad), convs.iter().map(|c| c.len() - 1).collect())
}

/// Scores of conversations with the model and head (forward only).
pub fn scores(model: &mut dyn Model, head: &ScalarHead, convs: &[&Vec<u32>], t: usize, pad: u32) -> Result<Vec<f32>, PhaseError> {
    let (max_b, _) = model.max_batch();
    let c = model.config().n_embd;
    let mut out = Vec::with_capacity(convs.len());
    for chunk in convs.chunks(max_b.max(1)) {
        let (tokens, last) = rows(chunk, t, pad);
        model.forward(&tokens, chunk.len(), t)?;
        let h = model.hidden()?;
        for (i, &l) in last.iter().enumerate() {
            let at = (i * t + l) * c;
            out.push(head.score(&h[at..at + c]));
        }
    }
    Ok(out)
}

/// The reward phase's step: this rank's pairs, chosen and rejected in one forward, the
/// Bradley–Terry loss through the head into the hidden states, one update of the trunk and the
/// head.
struct RewardStep {
    replica: Box<dyn Replica>,
    head: ScalarHead,
    /// The head's own Adam moments (C + 1 values; restarted on resume, which the tiny head
    /// shrugs off).
    hm: Vec<f32>,
    hv: Vec<f32>,
    ledger: Ledger,
    train: Vec<(Vec<u32>, Vec<u32>)>,
    heldout: Vec<(Vec<u32>, Vec<u32>)>,
    heldout_tasks: Vec<String>,
    tok_bytes: Vec<u8>,
    b_global: usize,
    t: usize,
    pad: u32,
}

impl PhaseStep for RewardStep {
    fn primary(&mut self) -> &mut dyn Replica {
        self.replica.as_mut()
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError> {
        let (step, t, pad) = (ctx.step(), self.t, self.pad);
        let mine = self.ledger.rank_offsets(step, ctx.rank(), ctx.world());
        let c = self.head.weight.len();
        let model = self.replica.model();
        model.zero_grad()?;
        let mut head_grad = vec![0.0f32; c + 1];
        let mut stats = [0.0f64; 2]; // loss sum, correct
        if !mine.is_empty() {
            let convs: Vec<&Vec<u32>> = mine.iter().map(|&i| &self.train[i].0).chain(mine.iter().map(|&i| &self.train[i].1)).collect();
            let (tokens, last) = rows(&convs, t, pad);
            let nb = convs.len();
            model.forward(&tokens, nb, t)?;
            let h = model.hidden()?.into_owned();
            let r: Vec<f32> = last.iter().enumerate().map(|(i, &l)| self.head.score(&h[(i * t + l) * c..(i * t + l + 1) * c])).collect();
            let (rc, rr) = r.split_at(mine.len());
            let (loss, dc, dr) = bradley_terry(rc, rr, self.b_global as f32);
            stats[0] = loss;
            stats[1] = rc.iter().zip(rr).filter(|(a, b)| a > b).count() as f64;
            let mut dh = vec![0.0f32; nb * t * c];
            for (i, &l) in last.iter().enumerate() {
                let d = if i < mine.len() { dc[i] } else { dr[i - mine.len()] };
                let at = (i * t + l) * c;
                self.head.backward(&h[at..at + c], d, &mut dh[at..at + c], &mut head_grad);
            }
            model.backward_from_hidden(&dh)?;
        }
        ctx.sum_each(&mut stats)?;
        let [loss, correct] = stats;
        let lr = ctx.lr();
        let u = ctx.update(&mut [(self.replica.as_mut(), lr)], &mut [&mut head_grad], loss)?;
        if u.applied {
            adam_step(&mut self.head, &head_grad, &mut self.hm, &mut self.hv, lr, step + 1);
        }
        tracing::debug!(step = step + 1, accuracy = correct / self.b_global as f64, "reward step");
        Ok(StepOut { loss: loss / self.b_global as f64, grad_norm: u.norm, tokens: (2 * self.b_global * t) as u64, values: Vec::new(), samples: Vec::new() })
    }

    fn boundary_files(&mut self, step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        let eval = evaluate(self.replica.model(), &self.head, &self.heldout, &self.heldout_tasks, self.t, self.pad)?;
        tracing::info!(step, accuracy = eval.accuracy, pairs = eval.pairs, "reward model held-out pairwise accuracy");
        Ok(vec![
            (crate::phase::pretrain::TOKENIZER_FILE.to_string(), self.tok_bytes.clone()),
            (HEAD_FILE.to_string(), serde_json::to_vec(&self.head).unwrap_or_default()),
            (EVAL_FILE.to_string(), serde_json::to_vec(&eval).unwrap_or_default()),
        ])
    }
}

/// Runs (or resumes) the reward phase on this rank, from the SFT phase's checkpoint.
pub fn run_reward(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let world = io.coll.world();
    let pairs = comparisons(plan)?;
    let file = plan.examples.clone().or_else(|| plan.labelled_examples.clone()).unwrap_or_default();
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let t = plan.seq_len;
    let pad = tk.special.pad;
    let RewardPairs { train, heldout, heldout_tasks } = reward_pairs(&tk, &pairs, t, &file)?;
    let b_global = plan.global_batch;
    let b_max = b_global.div_ceil(world).max(1);
    // `reward_pairs` made sure there is at least one training pair.
    let ledger = Ledger::over_rows(train.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no training pairs", file.display())))?;
    if start.dir().is_none() {
        return Err(PhaseError::Plan("a reward phase starts from the SFT phase's checkpoint; none was given".into()));
    }
    let mut replica = io.engine.replica(&plan.model, 2 * b_max, t, &plan.adamw(), optimizer_shard(plan, &*io.coll))?;
    let (first, state) = start_replica(replica.as_mut(), plan, start)?;
    let c = plan.model.n_embd;
    let head = match (start, &state) {
        (Start::Continue(dir), Some(state)) => ScalarHead::load(dir, state)?,
        _ => ScalarHead::zeros(c),
    };
    let train_config = TrainConfig { batch_size: 2 * b_max, seq_len: t, grad_accum: 1, schedule: plan.schedule(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let mut phase = RewardStep { replica, head, hm: vec![0.0; c + 1], hv: vec![0.0; c + 1], ledger, train, heldout, heldout_tasks, tok_bytes, b_global, t, pad };
    let run = Run { plan, checkpoint_dir: io.checkpoint_dir, coll: io.coll, abort: io.abort, events: io.events, train_config, tokenizer: crate::phase::pretrain::TOKENIZER_FILE };
    drive(run, &mut phase, first)
}

fn evaluate(model: &mut dyn Model, head: &ScalarHead, pairs: &[(Vec<u32>, Vec<u32>)], tasks: &[String], t: usize, pad: u32) -> Result<RewardEval, PhaseError> {
    let convs: Vec<&Vec<u32>> = pairs.iter().map(|p| &p.0).chain(pairs.iter().map(|p| &p.1)).collect();
    let r = scores(model, head, &convs, t, pad)?;
    let (rc, rr) = r.split_at(pairs.len());
    let mut by_task = std::collections::BTreeMap::new();
    for ((c, r), task) in rc.iter().zip(rr).zip(tasks) {
        let e: &mut (usize, usize) = by_task.entry(task.clone()).or_default();
        e.0 += (c > r) as usize;
        e.1 += 1;
    }
    let correct = by_task.values().map(|v| v.0).sum();
    Ok(RewardEval { pairs: pairs.len(), correct, accuracy: correct as f64 / pairs.len().max(1) as f64, by_task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bradley_terry_matches_the_formula_and_its_derivative() {
        let (rc, rr) = ([1.0f32, -0.5, 3.0], [0.0f32, 0.5, -2.0]);
        let (loss, dc, dr) = bradley_terry(&rc, &rr, 3.0);
        let want: f64 = rc.iter().zip(&rr).map(|(c, r)| -(1.0 / (1.0 + (-(c - r) as f64).exp())).ln()).sum();
        assert!((loss - want).abs() < 1e-9, "{loss} vs {want}");
        for i in 0..3 {
            // d/drc of −log σ(rc − rr) / 3, by central differences in f64.
            let f = |c: f64| -(1.0 / (1.0 + (-(c - rr[i] as f64)).exp())).ln() / 3.0;
            let h = 1e-5;
            let fd = (f(rc[i] as f64 + h) - f(rc[i] as f64 - h)) / (2.0 * h);
            assert!((dc[i] as f64 - fd).abs() < 1e-6, "dc[{i}] {} vs {fd}", dc[i]);
            assert!((dr[i] + dc[i]).abs() < 1e-7, "antisymmetric");
        }
    }

    #[test]
    fn the_head_gradient_through_the_transformer_matches_finite_differences() {
        use crate::model::gpt::Gpt;
        // Score one sequence; check d score / d params along a random direction.
        let cfg = crate::GptConfig::new(40, 8, 1, 2, 8);
        let mut m = Gpt::new(cfg, 1, 6).unwrap();
        let mut rng = crate::rng::Rng::new(4);
        m.params.iter_mut().for_each(|p| *p = 0.3 * rng.normal());
        let head = ScalarHead { weight: (0..8).map(|_| rng.normal()).collect(), bias: 0.1 };
        let ids: Vec<u32> = vec![1, 5, 9, 3, 7, 2];
        let score = |m: &mut Gpt| -> f64 {
            m.forward(&ids, 1, 6).unwrap();
            head.score(&Gpt::hidden(m)[5 * 8..6 * 8]) as f64
        };
        score(&mut m);
        let mut dh = vec![0.0f32; 6 * 8];
        dh[5 * 8..].copy_from_slice(&head.weight);
        Gpt::zero_grad(&mut m);
        Gpt::backward_from_hidden(&mut m, &dh).unwrap();
        let (analytic, numeric) = crate::model::gradcheck::directional(&mut m, score, 4, 1e-2);
        // Central differences with h = 1e-2: O(h²) truncation; 1e-2 relative is well above it.
        assert!((analytic - numeric).abs() <= 1e-2 * analytic.abs().max(1e-2), "{analytic} vs {numeric}");
    }
}
