//! Language-model phases on one rank (pretrain, SFT): a [`BatchSource`] says which rows this
//! rank trains on at each step; gradients are summed over the group each step, every rank applies
//! the same AdamW update, rank 0 writes checkpoints.
//!
//! Every rank divides its loss by the global batch's count of target tokens, so the all-reduced
//! sum of gradients is the gradient of the global batch's mean loss: the trajectory does not
//! depend on the world size except through float summation order.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use liandan_data::shard::{read_split, sha256_hex, Manifest, Split};

use super::{collective_outcome, save_boundary, PhaseError, PhaseEvents, PhaseOutcome, StepMetrics};
use crate::checkpoint;
use crate::collective::{Collective, CollectiveError};
use crate::ledger::Ledger;
use crate::model::gpt::Gpt;
use crate::optim::{clip_grad_norm, AdamW};
use crate::plan::PhasePlan;
use crate::rng::Rng;
use crate::train::TrainConfig;

/// Name of the tokenizer inside prepared data and checkpoints.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Largest tokenizer file read (a 150k-token BPE is about 10 MiB).
const TOKENIZER_MAX_BYTES: u64 = 256 << 20;

/// Rows of a phase's data: `T + 1` tokens each (inputs are the first `T`, targets the last `T`).
pub trait BatchSource {
    /// Inputs `(b, T)` and targets `(b, T)` (`-1` where no loss is taken) of this rank's rows at
    /// `step`, appended to the vectors; returns `b`.
    fn rank_batch(&mut self, step: u64, rank: usize, world: usize, inputs: &mut Vec<u32>, targets: &mut Vec<i32>) -> usize;
    /// Target tokens that take a loss in the whole global batch of `step`.
    fn global_denominator(&mut self, step: u64) -> f32;
}

/// Pretraining rows: windows of the training split chosen by the [`Ledger`].
#[derive(Debug)]
pub struct TokenWindows {
    tokens: Vec<u32>,
    ledger: Ledger,
    t: usize,
    global_batch: usize,
}

impl BatchSource for TokenWindows {
    fn rank_batch(&mut self, step: u64, rank: usize, world: usize, inputs: &mut Vec<u32>, targets: &mut Vec<i32>) -> usize {
        let offsets = self.ledger.rank_offsets(step, rank, world);
        for &o in &offsets {
            inputs.extend_from_slice(&self.tokens[o..o + self.t]);
            targets.extend(self.tokens[o + 1..o + self.t + 1].iter().map(|&x| x as i32));
        }
        offsets.len()
    }

    fn global_denominator(&mut self, _step: u64) -> f32 {
        (self.global_batch * self.t) as f32
    }
}

/// The prepared data's tokenizer file, verified against its manifest.
pub fn data_tokenizer(plan: &PhasePlan) -> Result<(Manifest, Vec<u8>), PhaseError> {
    let manifest = Manifest::load(&plan.data_dir).map_err(|e| PhaseError::Data(e.to_string()))?;
    if manifest.vocab_size != plan.model.vocab_size {
        return Err(PhaseError::Plan(format!("data vocabulary {} differs from the model's {}", manifest.vocab_size, plan.model.vocab_size)));
    }
    let tok_path = plan.data_dir.join(&manifest.tokenizer);
    let tokenizer = liandan_data::files::read_bounded(&tok_path, TOKENIZER_MAX_BYTES).map_err(|e| PhaseError::Data(e.to_string()))?;
    if sha256_hex(&tokenizer) != manifest.tokenizer_sha256 {
        return Err(PhaseError::Data(format!("{}: sha256 does not match manifest.json", tok_path.display())));
    }
    Ok((manifest, tokenizer))
}

/// The sample ledger over `tokens` training tokens, or why they are too few.
pub(crate) fn ledger(plan: &PhasePlan, tokens: usize) -> Result<Ledger, PhaseError> {
    Ledger::new(tokens, plan.seq_len, plan.global_batch, plan.seed)
        .ok_or_else(|| PhaseError::Data(format!("{}: {tokens} training tokens do not make one sequence of {}", plan.data_dir.display(), plan.seq_len)))
}

/// Runs (or resumes) the pretrain phase on this rank.
///
/// `resume`: a checkpoint to continue from (its step is the data cursor). `checkpoint_dir`:
/// where rank 0 writes `step-NNNNNNNN` checkpoints.
pub fn run_pretrain(
    plan: &PhasePlan,
    resume: Option<&Path>,
    checkpoint_dir: &Path,
    coll: &mut dyn Collective,
    abort: &AtomicBool,
    events: &mut dyn PhaseEvents,
) -> Result<PhaseOutcome, PhaseError> {
    let (manifest, tokenizer) = data_tokenizer(plan)?;
    let tokens = read_split(&plan.data_dir, &manifest, Split::Train).map_err(|e| PhaseError::Data(e.to_string()))?;
    let t = plan.seq_len;
    let ledger = ledger(plan, tokens.len())?;
    let mut source = TokenWindows { tokens, ledger, t, global_batch: plan.global_batch };
    run_lm_phase(plan, &mut source, tokenizer, resume, checkpoint_dir, coll, abort, events, None)
}

/// Evaluation at each checkpoint boundary (rank 0): returns a file to store in the checkpoint.
pub type BoundaryEval<'a> = &'a mut dyn FnMut(&mut Gpt) -> Result<(String, Vec<u8>), PhaseError>;

/// The data-parallel training loop shared by the language-model phases.
pub fn run_lm_phase(
    plan: &PhasePlan,
    source: &mut dyn BatchSource,
    tokenizer: Vec<u8>,
    resume: Option<&Path>,
    checkpoint_dir: &Path,
    coll: &mut dyn Collective,
    abort: &AtomicBool,
    events: &mut dyn PhaseEvents,
    mut boundary_eval: Option<BoundaryEval<'_>>,
) -> Result<PhaseOutcome, PhaseError> {
    let (rank, world) = (coll.rank(), coll.world());
    let (b_global, t) = (plan.global_batch, plan.seq_len);
    let b_max = b_global.div_ceil(world).max(1);

    let mut model = Gpt::new(plan.model.clone(), b_max, t)?;
    let mut opt = AdamW::new(plan.adamw(), &model.layout);
    let mut step = 0u64;
    match resume {
        Some(dir) => {
            let ck = checkpoint::load(dir, Some(&plan.model))?;
            model.params = ck.params;
            if let Some((m, v)) = ck.moments {
                opt.m = m;
                opt.v = v;
                opt.t = ck.state.optimizer_t;
            }
            // This phase's own checkpoint (under its checkpoint directory) continues at its
            // step with its optimizer state; a previous phase's output starts this one at step 0
            // with a fresh optimizer.
            if dir.starts_with(checkpoint_dir) {
                step = ck.state.step;
            } else {
                opt = AdamW::new(plan.adamw(), &model.layout);
            }
        }
        None => model.init_weights(&mut Rng::new(plan.seed)),
    }
    let schedule = plan.schedule();
    let train_config = TrainConfig {
        batch_size: b_max,
        seq_len: t,
        grad_accum: 1,
        schedule: schedule.clone(),
        adamw: plan.adamw(),
        grad_clip: plan.grad_clip,
        seed: plan.seed,
    };
    let extra = vec![(TOKENIZER_FILE.to_string(), tokenizer)];
    let aborted = |e: CollectiveError| -> Result<PhaseOutcome, PhaseError> { Ok(collective_outcome(e, abort)) };
    let mut inputs = Vec::with_capacity(b_max * t);
    let mut targets = Vec::with_capacity(b_max * t);
    let mut divergence = super::Divergence::new(plan);
    while step < plan.steps {
        if abort.load(Ordering::SeqCst) {
            return Ok(PhaseOutcome::Aborted);
        }
        let started = Instant::now();
        inputs.clear();
        targets.clear();
        let b = source.rank_batch(step, rank, world, &mut inputs, &mut targets);
        let denom = source.global_denominator(step).max(1.0);
        model.zero_grad();
        let mut local_loss = 0.0f64;
        if b > 0 && targets.iter().any(|&x| x >= 0) {
            model.forward(&inputs, b, t)?;
            local_loss = model.loss(&targets, None, denom, true)? as f64;
            model.backward()?;
        }
        if let Err(e) = coll.all_reduce_sum(&mut model.grads) {
            return aborted(e);
        }
        let loss = match coll.all_reduce_scalar(local_loss) {
            Ok(l) => l,
            Err(e) => return aborted(e),
        };
        let grad_norm = if plan.grad_clip > 0.0 { clip_grad_norm(&mut model.grads, plan.grad_clip) } else { crate::optim::global_norm(&model.grads) };
        let lr = schedule.lr(step);
        let take = divergence.check(step + 1, loss, grad_norm);
        if matches!(take, Ok(true)) {
            opt.step(&mut model.params, &model.grads, lr);
        }
        step += 1;
        if rank == 0 {
            events.step(StepMetrics { step, loss, lr, grad_norm, tokens: denom as u64, step_ms: started.elapsed().as_millis() as u64, values: divergence.values() });
        }
        take?;
        let boundary = step % plan.checkpoint_every.max(1) == 0 || step == plan.steps;
        if boundary && rank == 0 {
            let mut files = extra.clone();
            if let Some(eval) = boundary_eval.as_mut() {
                files.push(eval(&mut model)?);
            }
            if let Some(outcome) = save_boundary(checkpoint_dir, step, plan.steps, &model, &opt, &train_config, &files, events)? {
                return Ok(outcome);
            }
        }
    }
    Ok(PhaseOutcome::Finished { final_checkpoint: None })
}
