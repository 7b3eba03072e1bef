//! The phase driver: the one training loop every phase runs through. A phase brings its own
//! step logic and data ([`PhaseStep`]); the driver owns what they all share:
//!
//! - where the phase starts ([`Start`]: its own checkpoint, the input checkpoint, or fresh),
//! - the abort flag (a new generation ends the loop between steps),
//! - the optimizer update ([`Ctx::update`]: gradients summed over the group, clipped, checked for
//!   divergence, AdamW at the step's learning rate),
//! - collective failures (the generation ended, or the group broke: never the phase's failure),
//! - step timing and the metrics rank 0 reports,
//! - checkpoint boundaries: rank 0 writes `step-N` (weights and optimizer of the primary
//!   replica plus the phase's files), commits it, and stops when the group re-forms there.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{Divergence, PhaseError, PhaseEvents, PhaseOutcome, StepMetrics, collective_outcome};
use crate::checkpoint::{self, CheckpointState, DataCursor, SaveInfo};
use crate::collective::{Collective, CollectiveError, Shard};
use crate::engine::Replica;
use crate::optim::LrSchedule;
use crate::plan::PhasePlan;
use crate::train::TrainConfig;

/// Where a phase starts, as the coordinator says with the assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start<'a> {
    /// This phase's own checkpoint: continue at its step with its optimizer state.
    Continue(&'a Path),
    /// The checkpoint the phase starts from (a previous phase's output or the spec's `init`):
    /// its weights, a fresh optimizer, step 0.
    From(&'a Path),
    /// Random weights from the plan's seed.
    Fresh,
}

impl Start<'_> {
    /// The checkpoint to read, if any.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Start::Continue(d) | Start::From(d) => Some(d),
            Start::Fresh => None,
        }
    }
}

/// Loads the start into `primary`: weights (and, continuing, the optimizer); returns the first
/// step and the checkpoint's state when one was read.
pub fn start_replica(primary: &mut dyn Replica, plan: &PhasePlan, start: Start<'_>) -> Result<(u64, Option<CheckpointState>), PhaseError> {
    match start {
        Start::Fresh => {
            primary.model().init_weights(plan.seed)?;
            Ok((0, None))
        }
        Start::From(dir) | Start::Continue(dir) => {
            let ck = checkpoint::load(dir, Some(&plan.model))?;
            primary.model().set_params(&ck.params)?;
            if let Start::Continue(_) = start {
                if let Some((m, v)) = &ck.moments {
                    primary.set_moments(m, v, ck.state.optimizer_t)?;
                }
                return Ok((ck.state.step, Some(ck.state)));
            }
            Ok((0, Some(ck.state)))
        }
    }
}

/// What one step reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOut {
    /// Mean loss over the global batch (the phase's own loss).
    pub loss: f64,
    /// Gradient norm of the primary replica before clipping (the last update's, when a step
    /// makes several).
    pub grad_norm: f32,
    /// Tokens of the global batch.
    pub tokens: u64,
    /// Phase-specific values.
    pub values: Vec<(String, f64)>,
    /// A few sampled answers to show (RL phases; empty elsewhere).
    pub samples: Vec<super::RolloutSample>,
}

/// The part of the trained model's optimizer state this rank keeps: its `1/world` when the
/// plan shards the optimizer (ZeRO-1, where the phase kind allows it), else the whole.
pub fn optimizer_shard(plan: &PhasePlan, coll: &dyn Collective) -> Shard {
    if plan.shard_optimizer && plan.kind.can_shard_optimizer() { Shard { rank: coll.rank(), world: coll.world() } } else { Shard::WHOLE }
}

/// A phase's own part: its data, its models and what one step does with them.
pub trait PhaseStep {
    /// The replica whose weights and optimizer a checkpoint holds (the policy, for ppo).
    fn primary(&mut self) -> &mut dyn Replica;
    /// On every rank at a boundary, before rank 0 saves: a sharded optimizer's moments are
    /// gathered whole ([`Replica::gather_moments`]) for every trained model the checkpoint holds.
    fn gather_moments(&mut self, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        self.primary().gather_moments(coll)
    }
    /// Runs step `ctx.step()` (0-based) through `ctx`'s collective and updates.
    fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<StepOut, PhaseError>;
    /// Rank 0 at a boundary after `step` steps: files to store with the checkpoint besides the
    /// weights and optimizer (tokenizer, heads, evaluations, other models).
    fn boundary_files(&mut self, step: u64) -> Result<Vec<(String, Vec<u8>)>, PhaseError>;
}

/// What the driver lends a step: the collective, the schedule and the update.
pub struct Ctx<'a> {
    coll: &'a mut dyn Collective,
    divergence: &'a mut Divergence,
    schedule: &'a LrSchedule,
    grad_clip: f32,
    step: u64,
    /// The last update's loss and norm (reported when it diverged).
    last: (f64, f32),
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ctx(step {}, {:?})", self.step, self.coll)
    }
}

/// The outcome of [`Ctx::update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// False when the step was skipped (non-finite, within `max_skipped_steps`).
    pub applied: bool,
    /// Norm of the first replica's gradients before clipping.
    pub norm: f32,
}

impl Ctx<'_> {
    /// The step being run, 0-based.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn rank(&self) -> usize {
        self.coll.rank()
    }

    pub fn world(&self) -> usize {
        self.coll.world()
    }

    /// The plan's learning rate at this step.
    pub fn lr(&self) -> f32 {
        self.schedule.lr(self.step)
    }

    pub fn coll(&mut self) -> &mut dyn Collective {
        &mut *self.coll
    }

    /// Sum over the group of one number per rank.
    pub fn sum(&mut self, x: f64) -> Result<f64, PhaseError> {
        Ok(self.coll.all_reduce_scalar(x)?)
    }

    /// [`sum`](Self::sum) of each value, in order.
    pub fn sum_each(&mut self, xs: &mut [f64]) -> Result<(), PhaseError> {
        for x in xs.iter_mut() {
            *x = self.coll.all_reduce_scalar(*x)?;
        }
        Ok(())
    }

    /// In-place sum of a buffer over the group.
    pub fn sum_buf(&mut self, buf: &mut [f32]) -> Result<(), PhaseError> {
        Ok(self.coll.all_reduce_sum(buf)?)
    }

    /// The optimizer update every phase shares: sums each replica's gradients over the group
    /// (then each of `extra`, small gradients the phase keeps itself, such as a head's), clips
    /// each replica to the plan's `grad_clip`, checks `loss` (summed over the group) and the
    /// norms for divergence, and steps each replica at its learning rate. The phase applies its
    /// own extra updates when `applied`.
    ///
    /// # Errors
    /// A collective or device failure; [`PhaseError::Diverged`] when the loss or a norm is not
    /// finite and no more steps may be skipped.
    pub fn update(&mut self, replicas: &mut [(&mut dyn Replica, f32)], extra: &mut [&mut [f32]], loss: f64) -> Result<Update, PhaseError> {
        for (r, _) in replicas.iter_mut() {
            r.all_reduce_grads(&mut *self.coll)?;
        }
        for buf in extra.iter_mut() {
            self.coll.all_reduce_sum(buf)?;
        }
        let mut norms = Vec::with_capacity(replicas.len());
        for (r, _) in replicas.iter_mut() {
            norms.push(r.clip(self.grad_clip, &mut *self.coll).map_err(collective_first)?);
        }
        let norm = norms.first().copied().unwrap_or(0.0);
        // A non-finite norm of any replica counts; the first replica's is the one reported.
        let worst = norms.iter().copied().find(|n| !n.is_finite()).unwrap_or(norm);
        self.last = (loss, worst);
        let applied = self.divergence.check(self.step + 1, loss, worst)?;
        if applied {
            for (r, lr) in replicas.iter_mut() {
                r.step(*lr, &mut *self.coll).map_err(collective_first)?;
            }
        }
        Ok(Update { applied, norm })
    }
}

/// An engine error that is a collective's (a sharded optimizer's norm or all-gather) stays one,
/// so the driver ends the generation instead of failing the phase.
fn collective_first(e: crate::EngineError) -> PhaseError {
    match e {
        crate::EngineError::Collective(c) => PhaseError::Collective(c),
        other => PhaseError::Engine(other),
    }
}

/// Everything the driver needs besides the phase.
pub struct Run<'a> {
    pub plan: &'a PhasePlan,
    pub checkpoint_dir: &'a Path,
    pub coll: &'a mut dyn Collective,
    pub abort: &'a AtomicBool,
    pub events: &'a mut dyn PhaseEvents,
    /// Recorded in every checkpoint's `state.json`.
    pub train_config: TrainConfig,
    /// The tokenizer name recorded in `state.json`.
    pub tokenizer: &'a str,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Run({}, {:?})", self.checkpoint_dir.display(), self.coll)
    }
}

/// Runs `phase` from step `first` to the plan's last step.
pub fn drive(run: Run<'_>, phase: &mut dyn PhaseStep, first: u64) -> Result<PhaseOutcome, PhaseError> {
    let Run { plan, checkpoint_dir, coll, abort, events, train_config, tokenizer } = run;
    let schedule = plan.schedule();
    let mut divergence = Divergence::new(plan);
    let rank = coll.rank();
    let mut step = first;
    while step < plan.steps {
        if abort.load(Ordering::SeqCst) {
            return Ok(PhaseOutcome::Aborted);
        }
        let started = Instant::now();
        let lr = schedule.lr(step);
        let mut ctx = Ctx { coll: &mut *coll, divergence: &mut divergence, schedule: &schedule, grad_clip: plan.grad_clip, step, last: (0.0, 0.0) };
        let out = match phase.step(&mut ctx) {
            Ok(out) => out,
            Err(PhaseError::Collective(e)) => return Ok(collective_outcome(e, abort)),
            Err(e @ PhaseError::Diverged { .. }) => {
                // The diverged step is reported (its non-finite values are kept) before the
                // phase fails.
                if rank == 0 {
                    let (loss, grad_norm) = ctx.last;
                    events.step(StepMetrics {
                        step: step + 1,
                        loss,
                        lr,
                        grad_norm,
                        tokens: 0,
                        step_ms: started.elapsed().as_millis() as u64,
                        values: divergence.values(),
                        samples: Vec::new(),
                    });
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        step += 1;
        if rank == 0 {
            let mut values = out.values;
            values.extend(divergence.values());
            events.step(StepMetrics {
                step,
                loss: out.loss,
                lr,
                grad_norm: out.grad_norm,
                tokens: out.tokens,
                step_ms: started.elapsed().as_millis() as u64,
                values,
                samples: out.samples,
            });
        }
        let boundary = step.is_multiple_of(plan.checkpoint_every.max(1)) || step == plan.steps;
        if boundary && let Err(e) = phase.gather_moments(&mut *coll) {
            // Every rank gathers a sharded optimizer's moments; rank 0 writes them.
            return Ok(collective_outcome(e, abort));
        }
        if boundary && rank == 0 {
            let mut files = phase.boundary_files(step)?;
            // A model's template and stop tokens travel with its tokenizer.
            files.extend(crate::hf_tokenizer::data_configs(&plan.data_dir, &files).map_err(PhaseError::Data)?);
            let dir = save(checkpoint_dir, step, phase.primary(), &train_config, tokenizer, &files)?;
            if step == plan.steps {
                return Ok(PhaseOutcome::Finished { final_checkpoint: Some(dir) });
            }
            if events.checkpoint(step, &dir).map_err(PhaseError::Commit)? {
                return Ok(PhaseOutcome::Regroup);
            }
        }
    }
    Ok(PhaseOutcome::Finished { final_checkpoint: None })
}

/// Writes `step-N` under `checkpoint_dir`: the primary replica's weights and optimizer and the
/// phase's files. Refuses non-finite weights: no checkpoint of a diverged model is ever written.
fn save(
    checkpoint_dir: &Path,
    step: u64,
    primary: &mut dyn Replica,
    train_config: &TrainConfig,
    tokenizer: &str,
    files: &[(String, Vec<u8>)],
) -> Result<std::path::PathBuf, PhaseError> {
    let dir = checkpoint::step_dir(checkpoint_dir, step);
    let (m, v) = primary.moments()?;
    let t = primary.optimizer_t();
    let model = primary.model_ref();
    let params = model.params()?;
    super::check_weights(step, &params)?;
    let info = SaveInfo { step, rng_state: 0, train_config: Some(train_config), data_cursor: DataCursor { position: step }, tokenizer, extra_files: files };
    checkpoint::save(&dir, model.config(), &params, Some((&m, &v, t)), &info)?;
    Ok(dir)
}
