//! The DPO phase (direct preference optimisation): the policy learns from `{prompt, chosen,
//! rejected}` comparisons (the reward phase's sources: the `data` file, the comparisons
//! labelled through the coordinator, or both) without a reward model or rollouts. With
//! `log π(y|x)` the summed log-probability of an answer's tokens (its closing `<|end|>`
//! included) and `π_ref` the starting model, the loss per pair is
//! `−log σ(β·((log π_c − log π_ref,c) − (log π_r − log π_ref,r)))`, averaged over the global
//! batch of pairs.
//!
//! The reference log-probs are computed once per pair, by the starting model before the first
//! update (the pairs split over the ranks), and kept: in memory, and in every checkpoint
//! (`dpo_reference.bin`, with a fingerprint of the pairs), so a resumed phase reads them back
//! instead of needing the starting model. 10% of the pairs (by a hash of their text, as the
//! reward phase splits them) are held out: at every checkpoint boundary the share of them whose
//! implicit reward margin is positive is logged (`heldout_accuracy`) and written
//! (`dpo_eval.json`). Pairs whose chosen and rejected answers are identical after tokenization
//! (cut to `seq_len`) carry no preference and are dropped; a phase left with none is refused.

use serde::{Deserialize, Serialize};

use super::driver::{Ctx, Run, Start, StepOut, drive, optimizer_shard, start_replica};
use super::ppo::losses::logp_entropy;
use super::sft::load_tokenizer;
use super::{PhaseError, PhaseIo, PhaseOutcome, PhaseStep};
use crate::checkpoint;
use crate::engine::{Model, Replica};
use crate::ledger::Ledger;
use crate::plan::PhasePlan;
use crate::train::TrainConfig;

use liandan_plan::inputs::dpo_settings;
pub use liandan_plan::inputs::pairs::{DpoPair, DpoPairs, dpo_pairs, load_dpo_pairs};

/// The statistics of the step that wrote the checkpoint, with the held-out accuracy.
pub const EVAL_FILE: &str = liandan_plan::checkpoint::eval_files::DPO;
/// The reference log-probs of every pair (see [`encode_reference`]).
pub const REFERENCE_FILE: &str = "dpo_reference.bin";

/// DPO's loss for one pair from the summed log-probs of the chosen and rejected answers under
/// the policy (`pc`, `pr`) and the reference (`rc`, `rr`): with
/// `z = β·((pc − rc) − (pr − rr))`, `(−log σ(z), dL/dpc = −β·σ(−z), dL/dpr = β·σ(−z))`.
pub fn dpo_loss(pc: f64, pr: f64, rc: f64, rr: f64, beta: f64) -> (f64, f64, f64) {
    let z = beta * ((pc - rc) - (pr - rr));
    // −log σ(z) = softplus(−z), computed stably.
    let loss = if z > 0.0 { (-z).exp().ln_1p() } else { -z + z.exp().ln_1p() };
    let s = 1.0 / (1.0 + z.exp()); // σ(−z)
    (loss, -beta * s, beta * s)
}

/// `log π` of the answer (positions `prompt_len..`) of one row of logits `(t, vp)`.
fn answer_logp(logits: &[f32], ids: &[u32], prompt_len: usize, v: usize, vp: usize) -> f64 {
    (prompt_len - 1..ids.len() - 1).map(|pos| logp_entropy(&logits[pos * vp..pos * vp + v], ids[pos + 1] as usize, 1.0).0 as f64).sum()
}

/// Writes into one row of logits `(t, vp)` the gradient of `coef · log π(answer)`:
/// `coef · (onehot − softmax)` at the answer's positions, zero elsewhere and in the padding
/// columns.
fn write_answer_grad(logits: &mut [f32], ids: &[u32], prompt_len: usize, v: usize, vp: usize, coef: f32) {
    let answer = prompt_len - 1..ids.len() - 1;
    for (pos, row) in logits.chunks_exact_mut(vp).enumerate() {
        if !answer.contains(&pos) {
            row.fill(0.0);
            continue;
        }
        let target = ids[pos + 1] as usize;
        let max = row[..v].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row[..v].iter().map(|&x| ((x - max) as f64).exp()).sum();
        for (j, x) in row[..v].iter_mut().enumerate() {
            let p = (((*x - max) as f64).exp() / sum) as f32;
            *x = coef * (if j == target { 1.0 } else { 0.0 } - p);
        }
        row[v..].fill(0.0);
    }
}

/// `(log π_c, log π_r)` of each pair under `model` (forward only, in chunks of the model's
/// batch).
fn pair_logps(model: &mut dyn Model, pairs: &[&DpoPair], t: usize, pad: u32) -> Result<Vec<(f64, f64)>, PhaseError> {
    let (v, vp) = (model.config().vocab_size, model.config().padded_vocab_size);
    let per = (model.max_batch().0 / 2).max(1);
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(per) {
        let rows = super::padded_rows(chunk.iter().map(|p| p.chosen.as_slice()).chain(chunk.iter().map(|p| p.rejected.as_slice())), t, pad);
        model.forward(&rows, 2 * chunk.len(), t)?;
        let logits = model.logits()?;
        let row = |i: usize| &logits[i * t * vp..(i + 1) * t * vp];
        for (i, p) in chunk.iter().enumerate() {
            out.push((answer_logp(row(i), &p.chosen, p.prompt_len, v, vp), answer_logp(row(chunk.len() + i), &p.rejected, p.prompt_len, v, vp)));
        }
    }
    Ok(out)
}

/// Sums per-pair values over the group when each rank filled only its share (zeros elsewhere):
/// each f64 travels as two f32 (`hi`, the rounding residue `lo`), and a sum of one non-zero
/// with zeros is exact, so every rank gets the values to about 1e-14 relative.
fn share_over_group(ctx: &mut Ctx<'_>, values: &mut [(f64, f64)], mine: std::ops::Range<usize>) -> Result<(), PhaseError> {
    let mut buf = vec![0.0f32; 4 * values.len()];
    for k in mine {
        let (c, r) = values[k];
        let (ch, rh) = (c as f32, r as f32);
        buf[4 * k..4 * k + 4].copy_from_slice(&[ch, (c - ch as f64) as f32, rh, (r - rh as f64) as f32]);
    }
    ctx.sum_buf(&mut buf)?;
    for (k, v) in values.iter_mut().enumerate() {
        *v = (buf[4 * k] as f64 + buf[4 * k + 1] as f64, buf[4 * k + 2] as f64 + buf[4 * k + 3] as f64);
    }
    Ok(())
}

/// FNV-1a over the pairs' token ids and prompt lengths: which pairs a reference cache is of.
fn fingerprint(pairs: &[&DpoPair]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
    for p in pairs {
        eat(p.prompt_len as u64);
        p.chosen.iter().for_each(|&x| eat(x as u64));
        eat(u64::MAX);
        p.rejected.iter().for_each(|&x| eat(x as u64));
        eat(u64::MAX - 1);
    }
    h
}

/// The reference cache as bytes: the pairs' fingerprint, their count, then `(log π_ref,c,
/// log π_ref,r)` of each pair, all little-endian (u64, u64, f64 pairs).
pub fn encode_reference(fp: u64, values: &[(f64, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 16 * values.len());
    out.extend(fp.to_le_bytes());
    out.extend((values.len() as u64).to_le_bytes());
    for (c, r) in values {
        out.extend(c.to_le_bytes());
        out.extend(r.to_le_bytes());
    }
    out
}

/// Reads [`encode_reference`]'s bytes back, or why they are not the cache of these pairs.
pub fn decode_reference(bytes: &[u8], fp: u64, n: usize) -> Result<Vec<(f64, f64)>, String> {
    let word = |i: usize| -> [u8; 8] {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
        w
    };
    if bytes.len() < 16 || !(bytes.len() - 16).is_multiple_of(16) {
        return Err(format!("{} bytes is not a reference cache", bytes.len()));
    }
    let (got_fp, got_n) = (u64::from_le_bytes(word(0)), u64::from_le_bytes(word(1)));
    if got_fp != fp || got_n != n as u64 || bytes.len() != 16 + 16 * n {
        return Err(format!(
            "the cached reference log-probs are of other comparisons ({got_n} pairs, fingerprint {got_fp:016x}; now {n}, {fp:016x}): the data or seq_len changed since the checkpoint"
        ));
    }
    Ok((0..n).map(|k| (f64::from_le_bytes(word(2 + 2 * k)), f64::from_le_bytes(word(3 + 2 * k)))).collect())
}

/// Whole-group means of one DPO step (and, at boundaries, the held-out evaluation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoStats {
    pub step: u64,
    pub loss: f64,
    /// Mean implicit reward margin `β·((log π_c − log π_ref,c) − (log π_r − log π_ref,r))`.
    pub margin: f64,
    /// Mean `log π_c − log π_ref,c` (nats per answer): how far the chosen answers' log-prob moved.
    pub chosen_drift: f64,
    /// Mean `log π_r − log π_ref,r`.
    pub rejected_drift: f64,
    /// Share of the batch's pairs with a positive margin.
    pub accuracy: f64,
    pub heldout_pairs: usize,
    /// Share of held-out pairs with a positive margin (at the last boundary).
    pub heldout_accuracy: f64,
    pub heldout_margin: f64,
}

struct DpoStep {
    replica: Box<dyn Replica>,
    beta: f64,
    ledger: Ledger,
    pairs: DpoPairs,
    /// `(log π_ref,c, log π_ref,r)` of the training pairs then the held-out ones; empty until
    /// the first step computes it.
    reference: Vec<(f64, f64)>,
    fingerprint: u64,
    tok_bytes: Vec<u8>,
    b_global: usize,
    t: usize,
    pad: u32,
    steps: u64,
    every: u64,
    last: DpoStats,
}

impl std::fmt::Debug for DpoStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DpoStep(β {}, {} pairs)", self.beta, self.pairs.train.len())
    }
}

impl DpoStep {
    /// The reference log-probs of every pair under the model as it is now (the starting model:
    /// called before the first update), split over the group.
    fn compute_reference(&mut self, ctx: &mut Ctx<'_>) -> Result<Vec<(f64, f64)>, PhaseError> {
        let all: Vec<&DpoPair> = self.pairs.train.iter().chain(&self.pairs.heldout).collect();
        let mine = Ledger::share(all.len(), ctx.rank(), ctx.world());
        let got = pair_logps(self.replica.model(), &all[mine.clone()], self.t, self.pad)?;
        let mut values = vec![(0.0, 0.0); all.len()];
        values[mine.clone()].copy_from_slice(&got);
        share_over_group(ctx, &mut values, mine)?;
        Ok(values)
    }

    /// Held-out accuracy and mean margin of the policy as it is now, split over the group.
    fn evaluate(&mut self, ctx: &mut Ctx<'_>) -> Result<(f64, f64), PhaseError> {
        let n = self.pairs.heldout.len();
        let mine = Ledger::share(n, ctx.rank(), ctx.world());
        let rows: Vec<&DpoPair> = self.pairs.heldout[mine.clone()].iter().collect();
        let got = pair_logps(self.replica.model(), &rows, self.t, self.pad)?;
        let base = self.pairs.train.len();
        let mut sums = [0.0f64; 2];
        for ((pc, pr), k) in got.into_iter().zip(mine) {
            let (rc, rr) = self.reference[base + k];
            let z = self.beta * ((pc - rc) - (pr - rr));
            sums[0] += (z > 0.0) as u8 as f64;
            sums[1] += z;
        }
        ctx.sum_each(&mut sums)?;
        Ok((sums[0] / n.max(1) as f64, sums[1] / n.max(1) as f64))
    }
}

impl PhaseStep for DpoStep {
    fn primary(&mut self) -> &mut dyn Replica {
        self.replica.as_mut()
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError> {
        let (step, t, pad) = (ctx.step(), self.t, self.pad);
        if self.reference.is_empty() {
            if step != 0 {
                return Err(PhaseError::Plan(format!("dpo step {step}: no reference log-probs (they are computed at step 0 and kept in every checkpoint)")));
            }
            self.reference = self.compute_reference(ctx)?;
        }
        let mine = self.ledger.rank_offsets(step, ctx.rank(), ctx.world());
        let model = self.replica.model();
        let (v, vp) = (model.config().vocab_size, model.config().padded_vocab_size);
        model.zero_grad()?;
        let mut local = [0.0f64; 5]; // loss, margin, chosen drift, rejected drift, correct
        if !mine.is_empty() {
            let pairs: Vec<&DpoPair> = mine.iter().map(|&i| &self.pairs.train[i]).collect();
            let refs: Vec<(f64, f64)> = mine.iter().map(|&i| self.reference[i]).collect();
            let m = pairs.len();
            let rows = super::padded_rows(pairs.iter().map(|p| p.chosen.as_slice()).chain(pairs.iter().map(|p| p.rejected.as_slice())), t, pad);
            model.forward(&rows, 2 * m, t)?;
            let (beta, n) = (self.beta, self.b_global as f64);
            model.backward_from_logits(&mut |logits| {
                let row = |i: usize| i * t * vp..(i + 1) * t * vp;
                // All log-probs first: the gradient overwrites the logits row by row.
                let lp: Vec<(f64, f64)> = pairs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (answer_logp(&logits[row(i)], &p.chosen, p.prompt_len, v, vp), answer_logp(&logits[row(m + i)], &p.rejected, p.prompt_len, v, vp)))
                    .collect();
                for (i, (p, ((pc, pr), (rc, rr)))) in pairs.iter().zip(lp.into_iter().zip(refs.iter().copied())).enumerate() {
                    let (loss, dc, dr) = dpo_loss(pc, pr, rc, rr, beta);
                    let z = beta * ((pc - rc) - (pr - rr));
                    local[0] += loss;
                    local[1] += z;
                    local[2] += pc - rc;
                    local[3] += pr - rr;
                    local[4] += (z > 0.0) as u8 as f64;
                    write_answer_grad(&mut logits[row(i)], &p.chosen, p.prompt_len, v, vp, (dc / n) as f32);
                    write_answer_grad(&mut logits[row(m + i)], &p.rejected, p.prompt_len, v, vp, (dr / n) as f32);
                }
                // Rows past the batch (a replica holds up to its largest share) stay zero.
                logits[row(2 * m).start..].fill(0.0);
            })?;
        }
        ctx.sum_each(&mut local)?;
        let lr = ctx.lr();
        let u = ctx.update(&mut [(self.replica.as_mut(), lr)], &mut [], local[0])?;
        let n = self.b_global as f64;
        let mut stats = DpoStats {
            step: step + 1,
            loss: local[0] / n,
            margin: local[1] / n,
            chosen_drift: local[2] / n,
            rejected_drift: local[3] / n,
            accuracy: local[4] / n,
            heldout_pairs: self.pairs.heldout.len(),
            heldout_accuracy: self.last.heldout_accuracy,
            heldout_margin: self.last.heldout_margin,
        };
        let mut values = vec![
            ("margin".to_string(), stats.margin),
            ("chosen_drift".into(), stats.chosen_drift),
            ("rejected_drift".into(), stats.rejected_drift),
            ("accuracy".into(), stats.accuracy),
        ];
        let done = step + 1;
        if (done.is_multiple_of(self.every.max(1)) || done == self.steps) && !self.pairs.heldout.is_empty() {
            (stats.heldout_accuracy, stats.heldout_margin) = self.evaluate(ctx)?;
            values.push(("heldout_accuracy".into(), stats.heldout_accuracy));
            values.push(("heldout_margin".into(), stats.heldout_margin));
            if ctx.rank() == 0 {
                tracing::info!(step = done, heldout_accuracy = stats.heldout_accuracy, pairs = stats.heldout_pairs, "dpo held-out preference accuracy");
            }
        }
        let out = StepOut { loss: stats.loss, grad_norm: u.norm, tokens: (2 * self.b_global * t) as u64, values, samples: Vec::new() };
        self.last = stats;
        Ok(out)
    }

    fn boundary_files(&mut self, _step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        Ok(vec![
            (super::pretrain::TOKENIZER_FILE.to_string(), self.tok_bytes.clone()),
            (REFERENCE_FILE.to_string(), encode_reference(self.fingerprint, &self.reference)),
            (EVAL_FILE.to_string(), super::ppo::to_json(&self.last)),
        ])
    }
}

/// Runs (or resumes) the DPO phase on this rank, from the SFT phase's checkpoint (the reference).
pub fn run_dpo(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let world = io.coll.world();
    let s = dpo_settings(plan)?;
    let (tk, tok_bytes) = load_tokenizer(plan)?;
    let pairs = load_dpo_pairs(plan, &tk)?;
    let t = plan.seq_len;
    let b_global = plan.global_batch;
    let b_max = b_global.div_ceil(world).max(1);
    let file = plan.examples.clone().unwrap_or_default();
    // `tokenized_pairs` made sure there is at least one training pair.
    let ledger = Ledger::over_rows(pairs.train.len(), 1, b_global, plan.seed).ok_or_else(|| PhaseError::Data(format!("{}: no training pairs", file.display())))?;
    if start.dir().is_none() {
        return Err(PhaseError::Plan("a dpo phase starts from the SFT phase's checkpoint (its reference); none was given".into()));
    }
    let mut replica = io.engine.replica(&plan.model, 2 * b_max, t, &plan.adamw(), optimizer_shard(plan, &*io.coll))?;
    let (first, state) = start_replica(replica.as_mut(), plan, start)?;
    let all: Vec<&DpoPair> = pairs.train.iter().chain(&pairs.heldout).collect();
    let fp = fingerprint(&all);
    let n_all = all.len();
    let reference = match (start, &state) {
        (Start::Continue(dir), Some(state)) => {
            let bytes = checkpoint::read_verified(dir, REFERENCE_FILE, state)?;
            decode_reference(&bytes, fp, n_all).map_err(|e| PhaseError::Data(format!("{}: {e}", dir.join(REFERENCE_FILE).display())))?
        }
        _ => Vec::new(),
    };
    let train_config = TrainConfig { batch_size: 2 * b_max, seq_len: t, grad_accum: 1, schedule: plan.schedule(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let mut phase = DpoStep {
        replica,
        beta: s.beta as f64,
        ledger,
        pairs,
        reference,
        fingerprint: fp,
        tok_bytes,
        b_global,
        t,
        pad: tk.special.pad,
        steps: plan.steps,
        every: plan.checkpoint_every,
        last: DpoStats::default(),
    };
    let run = Run { plan, checkpoint_dir: io.checkpoint_dir, coll: io.coll, abort: io.abort, events: io.events, train_config, tokenizer: super::pretrain::TOKENIZER_FILE };
    drive(run, &mut phase, first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DpoSettings;

    #[test]
    fn the_dpo_loss_matches_hand_computed_values() {
        // β = 0.1; chosen moved +2 nats, rejected −1: z = 0.1·(2 − (−1)) = 0.3;
        // −log σ(0.3) = ln(1 + e^−0.3) = 0.5543552; σ(−0.3) = 0.4255575.
        let (l, dc, dr) = dpo_loss(-10.0, -20.0, -12.0, -19.0, 0.1);
        assert!((l - 0.554_355_2).abs() < 1e-6, "{l}");
        assert!((dc + 0.1 * 0.425_557_5).abs() < 1e-7 && (dr - 0.1 * 0.425_557_5).abs() < 1e-7, "{dc} {dr}");
        // At the reference (policy = reference): z = 0, loss ln 2, gradient ∓β/2.
        let (l, dc, dr) = dpo_loss(-5.0, -7.0, -5.0, -7.0, 0.5);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12 && (dc + 0.25).abs() < 1e-12 && (dr - 0.25).abs() < 1e-12);
        // Far on the wrong side (z = −50): loss ≈ 50, the gradient saturates at ∓β.
        let (l, dc, _) = dpo_loss(0.0, 0.0, 0.0, -500.0, 0.1);
        assert!((l - 50.0).abs() < 1e-9 && (dc + 0.1).abs() < 1e-12, "{l} {dc}");
        // dL/dpc by central differences.
        let h = 1e-6;
        let fd = (dpo_loss(-10.0 + h, -20.0, -12.0, -19.0, 0.1).0 - dpo_loss(-10.0 - h, -20.0, -12.0, -19.0, 0.1).0) / (2.0 * h);
        assert!((fd - dpo_loss(-10.0, -20.0, -12.0, -19.0, 0.1).1).abs() < 1e-8, "{fd}");
    }

    #[test]
    fn the_answer_gradient_is_that_of_the_summed_log_probs() {
        // One row of 3 positions over a vocabulary of 3 (padded to 4); prompt of 1 token.
        let logits = [0.5f32, -1.0, 2.0, 0.0, 1.5, 0.2, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0];
        let ids = [0u32, 2, 1];
        let lp = |lg: &[f32]| answer_logp(lg, &ids, 1, 3, 4);
        let mut g = logits.to_vec();
        write_answer_grad(&mut g, &ids, 1, 3, 4, 1.0);
        assert!(g[8..].iter().all(|&x| x == 0.0) && g[3] == 0.0 && g[7] == 0.0, "{g:?}");
        for i in [0usize, 1, 2, 4, 5, 6] {
            let h = 1e-3f32;
            let (mut a, mut b) = (logits.to_vec(), logits.to_vec());
            a[i] += h;
            b[i] -= h;
            let fd = (lp(&a) - lp(&b)) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() < 1e-3, "logit {i}: {fd} vs {}", g[i]);
        }
    }

    #[test]
    fn the_reference_cache_round_trips_and_refuses_other_pairs() {
        let v = vec![(-1.25f64, -3.5f64), (0.1, -7.0e-3)];
        let b = encode_reference(42, &v);
        assert_eq!(decode_reference(&b, 42, 2).unwrap(), v);
        assert!(decode_reference(&b, 43, 2).unwrap_err().contains("other comparisons"));
        assert!(decode_reference(&b[..20], 42, 2).is_err());
        assert!(DpoSettings { beta: 0.0 }.validate().is_err() && DpoSettings { beta: f32::INFINITY }.validate().is_err());
    }
}
