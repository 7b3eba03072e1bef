//! The reward phase: a scalar head on the final hidden state of the answer's last token
//! (`r = h·w + b`), trained from the SFT model on comparisons with the Bradley–Terry loss
//! `−log σ(r_chosen − r_rejected)`, data-parallel like the other phases. 10% of the pairs
//! (by a hash of their text) are held out; the pairwise accuracy on them is written with every
//! checkpoint (`reward_eval.json`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use liandan_data::chat::{read_preferences, tokenize_chat, Message, PreferencePair, Role};
use liandan_data::tokenizer::ChatTokenizer;
use serde::{Deserialize, Serialize};

use super::sft::load_tokenizer;
use super::{collective_outcome, save_boundary, PhaseError, PhaseEvents, PhaseOutcome, StepMetrics};
use crate::checkpoint;
use crate::collective::{Collective, CollectiveError};
use crate::ledger::Ledger;
use crate::model::gpt::Gpt;
use crate::optim::{clip_grad_norm, AdamW};
use crate::plan::PhasePlan;
use crate::train::TrainConfig;

/// File of the head inside a reward checkpoint.
pub const HEAD_FILE: &str = "score_head.json";
/// File of the held-out accuracy inside a reward checkpoint.
pub const EVAL_FILE: &str = "reward_eval.json";

/// `r = h·w + b` on a `(C)` hidden state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalarHead {
    pub weight: Vec<f32>,
    pub bias: f32,
}

impl ScalarHead {
    pub fn score(&self, h: &[f32]) -> f32 {
        h.iter().zip(&self.weight).map(|(a, b)| a * b).sum::<f32>() + self.bias
    }
}

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

/// The phase's comparisons: its `data` file, the comparisons labelled through the coordinator,
/// or both (`comparisons`). Logs how many of each label source it trains on.
pub fn comparisons(plan: &PhasePlan) -> Result<Vec<PreferencePair>, PhaseError> {
    use crate::plan::ComparisonSource as S;
    let mut pairs = Vec::new();
    if matches!(plan.comparisons, S::File | S::Both) {
        let file = plan.examples.as_ref().ok_or_else(|| PhaseError::Plan("a reward phase needs `data` (a JSONL of comparisons)".into()))?;
        pairs.extend(read_preferences(file).map_err(|e| PhaseError::Data(e.to_string()))?);
    }
    if matches!(plan.comparisons, S::Labelled | S::Both) {
        let file = plan.labelled_examples.as_ref().ok_or_else(|| PhaseError::Plan("the coordinator did not export the labelled comparisons".into()))?;
        let empty = std::fs::metadata(file).map(|m| m.len() == 0).unwrap_or(false);
        if empty && plan.comparisons == S::Labelled {
            return Err(PhaseError::Data(format!("{}: no comparison has been labelled yet (label some with `liandan label JOB`)", file.display())));
        }
        if !empty {
            pairs.extend(read_preferences(file).map_err(|e| PhaseError::Data(e.to_string()))?);
        }
    }
    let human = pairs.iter().filter(|p| p.label_source == liandan_data::chat::LabelSource::Human).count();
    tracing::info!(human, rule = pairs.len() - human, "reward model comparisons by label source");
    Ok(pairs)
}

fn held_out(p: &PreferencePair) -> bool {
    super::held_out_by_hash(&format!("{}\u{1}{}\u{1}{}", p.prompt, p.chosen, p.rejected), 0.1)
}

/// Token ids of prompt + answer (cut to `t`), and the index of the last token.
fn conversation(tk: &ChatTokenizer, prompt: &str, answer: &str, t: usize) -> Result<Vec<u32>, PhaseError> {
    let msgs = [Message { role: Role::User, content: prompt.into() }, Message { role: Role::Assistant, content: answer.into() }];
    let mut ids = tokenize_chat(tk, &msgs).map_err(|e| PhaseError::Data(e.to_string()))?.ids;
    ids.truncate(t);
    Ok(ids)
}

/// Rows padded to `t` and the last real index of each.
fn rows(convs: &[&Vec<u32>], t: usize, pad: u32) -> (Vec<u32>, Vec<usize>) {
    (super::padded_rows(convs.iter().map(|c| c.as_slice()), t, pad), convs.iter().map(|c| c.len() - 1).collect())
}

/// Scores of conversations with the model and head (forward only).
pub fn scores(model: &mut Gpt, head: &ScalarHead, convs: &[&Vec<u32>], t: usize, pad: u32) -> Result<Vec<f32>, PhaseError> {
    let (max_b, _) = model.max_batch();
    let c = model.config.n_embd;
    let mut out = Vec::with_capacity(convs.len());
    for chunk in convs.chunks(max_b.max(1)) {
        let (tokens, last) = rows(chunk, t, pad);
        model.forward(&tokens, chunk.len(), t)?;
        let h = model.hidden();
        for (i, &l) in last.iter().enumerate() {
            let at = (i * t + l) * c;
            out.push(head.score(&h[at..at + c]));
        }
    }
    Ok(out)
}

/// Comparisons as token ids: (chosen, rejected) conversations cut to `t`, training and held out.
pub(crate) struct Pairs {
    pub train: Vec<(Vec<u32>, Vec<u32>)>,
    pub heldout: Vec<(Vec<u32>, Vec<u32>)>,
    pub heldout_tasks: Vec<String>,
}

/// Tokenizes and splits the comparisons (what the phase trains on, and what the coordinator
/// checks at submit). `file` names them in errors.
pub(crate) fn tokenized_pairs(tk: &ChatTokenizer, pairs: &[PreferencePair], t: usize, file: &Path) -> Result<Pairs, PhaseError> {
    let mut out = Pairs { train: Vec::new(), heldout: Vec::new(), heldout_tasks: Vec::new() };
    for p in pairs {
        let pair = (conversation(tk, &p.prompt, &p.chosen, t)?, conversation(tk, &p.prompt, &p.rejected, t)?);
        if held_out(p) {
            out.heldout.push(pair);
            out.heldout_tasks.push(p.task.clone().unwrap_or_default());
        } else {
            out.train.push(pair)
        }
    }
    if out.train.is_empty() {
        return Err(PhaseError::Data(format!("{}: no training pairs ({} comparisons, all held out)", file.display(), pairs.len())));
    }
    Ok(out)
}

/// Runs (or resumes) the reward phase on this rank, from the SFT phase's checkpoint.
pub fn run_reward(
    plan: &PhasePlan,
    resume: Option<&Path>,
    checkpoint_dir: &Path,
    coll: &mut dyn Collective,
    abort: &AtomicBool,
    events: &mut dyn PhaseEvents,
) -> Result<PhaseOutcome, PhaseError> {
    let (rank, world) = (coll.rank(), coll.world());
    let pairs = comparisons(plan)?;
    let file = plan.examples.clone().or_else(|| plan.labelled_examples.clone()).unwrap_or_default();
    let file = &file;
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let t = plan.seq_len;
    let pad = tk.special.pad;
    let Pairs { train, heldout, heldout_tasks } = tokenized_pairs(&tk, &pairs, t, file)?;
    let b_global = plan.global_batch;
    let b_max = b_global.div_ceil(world).max(1);
    // `tokenized_pairs` made sure there is at least one training pair.
    let mut ledger = Ledger::over_rows(train.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no training pairs", file.display())))?;
    let mut model = Gpt::new(plan.model.clone(), 2 * b_max, t)?;
    let c = plan.model.n_embd;
    let mut head = ScalarHead { weight: vec![0.0; c], bias: 0.0 };
    let mut opt = AdamW::new(plan.adamw(), &model.layout);
    let mut step = 0;
    let dir = resume.ok_or_else(|| PhaseError::Plan("a reward phase starts from the SFT phase's checkpoint; none was given".into()))?;
    let ck = checkpoint::load(dir, Some(&plan.model))?;
    model.params = ck.params;
    if dir.starts_with(checkpoint_dir) {
        step = ck.state.step;
        if let Some((m, v)) = ck.moments {
            opt.m = m;
            opt.v = v;
            opt.t = ck.state.optimizer_t;
        }
        let bytes = checkpoint::read_verified(dir, HEAD_FILE, &ck.state)?;
        head = serde_json::from_slice(&bytes).map_err(|e| PhaseError::Data(format!("{}: {e}", dir.join(HEAD_FILE).display())))?;
    }
    // The head's own Adam moments (C + 1 values; restarted on resume, which the tiny head shrugs off).
    let (mut hm, mut hv) = (vec![0.0f32; c + 1], vec![0.0f32; c + 1]);
    let schedule = plan.schedule();
    let train_config = TrainConfig { batch_size: 2 * b_max, seq_len: t, grad_accum: 1, schedule: schedule.clone(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let broken = |e: CollectiveError| -> Result<PhaseOutcome, PhaseError> { Ok(collective_outcome(e, abort)) };
    let mut divergence = super::Divergence::new(plan);
    while step < plan.steps {
        if abort.load(Ordering::SeqCst) {
            return Ok(PhaseOutcome::Aborted);
        }
        let started = Instant::now();
        let mine = ledger.rank_offsets(step, rank, world);
        model.zero_grad();
        let mut head_grad = vec![0.0f32; c + 1];
        let mut stats = [0.0f64; 2]; // loss sum, correct
        if !mine.is_empty() {
            let convs: Vec<&Vec<u32>> = mine.iter().map(|&i| &train[i].0).chain(mine.iter().map(|&i| &train[i].1)).collect();
            let (tokens, last) = rows(&convs, t, pad);
            let nb = convs.len();
            model.forward(&tokens, nb, t)?;
            let h = model.hidden().to_vec();
            let r: Vec<f32> = last.iter().enumerate().map(|(i, &l)| head.score(&h[(i * t + l) * c..(i * t + l + 1) * c])).collect();
            let (rc, rr) = r.split_at(mine.len());
            let (loss, dc, dr) = bradley_terry(rc, rr, b_global as f32);
            stats[0] = loss;
            stats[1] = rc.iter().zip(rr).filter(|(a, b)| a > b).count() as f64;
            let mut dh = vec![0.0f32; nb * t * c];
            for (i, &l) in last.iter().enumerate() {
                let d = if i < mine.len() { dc[i] } else { dr[i - mine.len()] };
                let at = (i * t + l) * c;
                for k in 0..c {
                    dh[at + k] = d * head.weight[k];
                    head_grad[k] += d * h[at + k];
                }
                head_grad[c] += d;
            }
            model.backward_from_hidden(&dh)?;
        }
        if let Err(e) = coll.all_reduce_sum(&mut model.grads).and_then(|_| coll.all_reduce_sum(&mut head_grad)) {
            return broken(e);
        }
        let (loss, correct) = match coll.all_reduce_scalar(stats[0]).and_then(|l| coll.all_reduce_scalar(stats[1]).map(|c| (l, c))) {
            Ok(v) => v,
            Err(e) => return broken(e),
        };
        let grad_norm = if plan.grad_clip > 0.0 { clip_grad_norm(&mut model.grads, plan.grad_clip) } else { crate::optim::global_norm(&model.grads) };
        let lr = schedule.lr(step);
        let take = divergence.check(step + 1, loss, grad_norm);
        if matches!(take, Ok(true)) {
            opt.step(&mut model.params, &model.grads, lr);
            adam_head(&mut head, &head_grad, &mut hm, &mut hv, lr, step + 1);
        }
        step += 1;
        if rank == 0 {
            tracing::debug!(step, accuracy = correct / b_global as f64, "reward step");
            events.step(StepMetrics { step, loss: loss / b_global as f64, lr, grad_norm, tokens: (2 * b_global * t) as u64, step_ms: started.elapsed().as_millis() as u64, values: divergence.values() });
        }
        take?;
        let boundary = step % plan.checkpoint_every.max(1) == 0 || step == plan.steps;
        if boundary && rank == 0 {
            let eval = evaluate(&mut model, &head, &heldout, &heldout_tasks, t, pad)?;
            tracing::info!(step, accuracy = eval.accuracy, pairs = eval.pairs, "reward model held-out pairwise accuracy");
            let extra = vec![
                (crate::phase::pretrain::TOKENIZER_FILE.to_string(), tok_bytes.clone()),
                (HEAD_FILE.to_string(), serde_json::to_vec(&head).unwrap_or_default()),
                (EVAL_FILE.to_string(), serde_json::to_vec(&eval).unwrap_or_default()),
            ];
            if let Some(outcome) = save_boundary(checkpoint_dir, step, plan.steps, &model, &opt, &train_config, &extra, events)? {
                return Ok(outcome);
            }
        }
    }
    Ok(PhaseOutcome::Finished { final_checkpoint: None })
}

fn evaluate(model: &mut Gpt, head: &ScalarHead, pairs: &[(Vec<u32>, Vec<u32>)], tasks: &[String], t: usize, pad: u32) -> Result<RewardEval, PhaseError> {
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

/// Adam for the head (no weight decay on a 1-output head).
pub(crate) fn adam_head(head: &mut ScalarHead, g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, t: u64) {
    let (b1, b2, eps) = (0.9f32, 0.95f32, 1e-8f32);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..g.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let upd = lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
        if i < head.weight.len() {
            head.weight[i] -= upd;
        } else {
            head.bias -= upd;
        }
    }
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
        // Score one sequence; check d score / d params along a random direction.
        let cfg = crate::GptConfig::new(40, 8, 1, 2, 8);
        let mut m = Gpt::new(cfg, 1, 6).unwrap();
        let mut rng = crate::rng::Rng::new(4);
        m.params.iter_mut().for_each(|p| *p = 0.3 * rng.normal());
        let head = ScalarHead { weight: (0..8).map(|_| rng.normal()).collect(), bias: 0.1 };
        let ids: Vec<u32> = vec![1, 5, 9, 3, 7, 2];
        let score = |m: &mut Gpt| -> f64 {
            m.forward(&ids, 1, 6).unwrap();
            head.score(&m.hidden()[5 * 8..6 * 8]) as f64
        };
        score(&mut m);
        let mut dh = vec![0.0f32; 6 * 8];
        dh[5 * 8..].copy_from_slice(&head.weight);
        m.zero_grad();
        m.backward_from_hidden(&dh).unwrap();
        let (analytic, numeric) = crate::model::gradcheck::directional(&mut m, score, 4, 1e-2);
        // Central differences with h = 1e-2: O(h²) truncation; 1e-2 relative is well above it.
        assert!((analytic - numeric).abs() <= 1e-2 * analytic.abs().max(1e-2), "{analytic} vs {numeric}");
    }
}
