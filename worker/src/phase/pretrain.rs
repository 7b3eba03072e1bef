//! Language-model phases on one rank (pretrain, SFT): a [`BatchSource`] says which rows this
//! rank trains on at each step; gradients are summed over the group each step, every rank applies
//! the same AdamW update, rank 0 writes checkpoints.
//!
//! Every rank divides its loss by the global batch's count of target tokens, so the all-reduced
//! sum of gradients is the gradient of the global batch's mean loss: the trajectory does not
//! depend on the world size except through float summation order.

use liandan_data::shard::{Split, read_split};
use liandan_plan::inputs::ledger;

use super::driver::{Ctx, Run, Start, StepOut, drive, optimizer_shard, start_replica};
use super::{PhaseError, PhaseIo, PhaseOutcome, PhaseStep};
use crate::engine::{Model, Replica};
use crate::ledger::Ledger;
use crate::plan::PhasePlan;
use crate::train::TrainConfig;

pub use liandan_plan::inputs::{TOKENIZER_FILE, data_tokenizer};

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

/// Runs (or resumes) the pretrain phase on this rank; rank 0 writes `step-NNNNNNNN`
/// checkpoints under `checkpoint_dir`.
pub fn run_pretrain(plan: &PhasePlan, start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let (manifest, tokenizer) = data_tokenizer(plan)?;
    let tokens = read_split(&plan.data_dir, &manifest, Split::Train).map_err(|e| PhaseError::Data(e.to_string()))?;
    let t = plan.seq_len;
    let ledger = ledger(plan, tokens.len())?;
    let mut source = TokenWindows { tokens, ledger, t, global_batch: plan.global_batch };
    run_lm_phase(plan, &mut source, tokenizer, start, io, None)
}

/// Evaluation at each checkpoint boundary (rank 0): returns a file to store in the checkpoint.
pub type BoundaryEval<'a> = &'a mut dyn FnMut(&mut dyn Model) -> Result<(String, Vec<u8>), PhaseError>;

/// A language-model phase's step: this rank's rows of the step's global batch, the loss divided
/// by the global batch's target count, one update.
struct LmStep<'s, 'e> {
    replica: Box<dyn Replica>,
    source: &'s mut dyn BatchSource,
    tokenizer: Vec<u8>,
    boundary_eval: Option<BoundaryEval<'e>>,
    t: usize,
    inputs: Vec<u32>,
    targets: Vec<i32>,
}

impl PhaseStep for LmStep<'_, '_> {
    fn primary(&mut self) -> &mut dyn Replica {
        self.replica.as_mut()
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError> {
        let (step, rank, world, t) = (ctx.step(), ctx.rank(), ctx.world(), self.t);
        self.inputs.clear();
        self.targets.clear();
        let b = self.source.rank_batch(step, rank, world, &mut self.inputs, &mut self.targets);
        let denom = self.source.global_denominator(step).max(1.0);
        let model = self.replica.model();
        model.zero_grad()?;
        let mut local_loss = 0.0f64;
        if b > 0 && self.targets.iter().any(|&x| x >= 0) {
            model.forward(&self.inputs, b, t)?;
            // Deferred: the backward is queued before anything waits for the device.
            local_loss = model.loss_deferred(&self.targets, None, denom)?.map_or(0.0, f64::from);
            model.backward()?;
            local_loss += model.take_loss()?;
        }
        let loss = ctx.sum(local_loss)?;
        let lr = ctx.lr();
        let u = ctx.update(&mut [(self.replica.as_mut(), lr)], &mut [], loss)?;
        Ok(StepOut { loss, grad_norm: u.norm, tokens: denom as u64, values: Vec::new(), samples: Vec::new() })
    }

    fn boundary_files(&mut self, _step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError> {
        let mut files = vec![(TOKENIZER_FILE.to_string(), self.tokenizer.clone())];
        if let Some(eval) = self.boundary_eval.as_mut() {
            files.push(eval(self.replica.model())?);
        }
        Ok(files)
    }
}

/// The data-parallel language-model phases (pretrain, sft) through the driver.
pub fn run_lm_phase(
    plan: &PhasePlan,
    source: &mut dyn BatchSource,
    tokenizer: Vec<u8>,
    start: Start<'_>,
    io: PhaseIo<'_>,
    boundary_eval: Option<BoundaryEval<'_>>,
) -> Result<PhaseOutcome, PhaseError> {
    let world = io.coll.world();
    let (b_global, t) = (plan.global_batch, plan.seq_len);
    let b_max = b_global.div_ceil(world).max(1);
    let mut replica = io.engine.replica(&plan.model, b_max, t, &plan.adamw(), optimizer_shard(plan, &*io.coll))?;
    let (first, _) = start_replica(replica.as_mut(), plan, start)?;
    let train_config = TrainConfig { batch_size: b_max, seq_len: t, grad_accum: 1, schedule: plan.schedule(), adamw: plan.adamw(), grad_clip: plan.grad_clip, seed: plan.seed };
    let mut phase = LmStep { replica, source, tokenizer, boundary_eval, t, inputs: Vec::with_capacity(b_max * t), targets: Vec::with_capacity(b_max * t) };
    let run = Run { plan, checkpoint_dir: io.checkpoint_dir, coll: io.coll, abort: io.abort, events: io.events, train_config, tokenizer: TOKENIZER_FILE };
    drive(run, &mut phase, first)
}
