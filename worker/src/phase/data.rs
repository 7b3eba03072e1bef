//! The data phase: this rank's share of the staged data pipeline ([`liandan_data::pipeline`]).
//!
//! The plan carries the pipeline's settings (`[phases.prepare]` of the job spec, with `out` set to
//! the job's `data.prepared`); every worker reads the inputs and writes the work directory beside
//! `out` on a filesystem they share. Rank r runs tasks i ≡ r (mod world) of each stage; the ring's
//! barrier separates the stages. When the group re-forms (a worker died, one joined), the new
//! generation runs the phase again from the start and skips every task whose completion record
//! verifies, so only unfinished tasks are redone and the output is the same bytes.
//!
//! Its result (what the coordinator records as the phase's output) is the prepared directory.
//!
//! Progress: rank 0 reports one step per completed task over all stages (the plan's `steps`),
//! with the stage (1-based), the tasks done in it and its task count as step values.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use liandan_data::pipeline::{self, Group, RunOutcome, STAGES};
use liandan_data::prepare::Progress;

use super::{PhaseError, PhaseEvents, PhaseIo, PhaseOutcome, Start, StepMetrics};
use crate::collective::Collective;
use crate::plan::PhasePlan;

/// The ranks of this generation, as the pipeline sees them.
struct Ranks<'a> {
    coll: &'a mut dyn Collective,
    abort: &'a AtomicBool,
}

impl Group for Ranks<'_> {
    fn rank(&self) -> usize {
        self.coll.rank()
    }
    fn world(&self) -> usize {
        self.coll.world()
    }
    fn stop_signal(&self) -> &AtomicBool {
        self.abort
    }
    fn barrier(&mut self) -> Result<(), String> {
        self.coll.barrier().map_err(|e| e.to_string())
    }
}

/// Progress as counters the phase thread reports from.
struct Counters {
    /// Tasks of the stages before the current one.
    base: AtomicU64,
    stage: AtomicU64,
    done: AtomicU64,
    total: AtomicU64,
    plan: pipeline::Plan,
}

impl Progress for Counters {
    fn begin(&self, stage: &str, total: u64) {
        let s = STAGES.iter().position(|x| *x == stage).unwrap_or(0);
        let base: u64 = (0..s).map(|i| self.plan.stage_tasks(i) as u64).sum();
        self.done.store(0, Ordering::SeqCst);
        self.total.store(total, Ordering::SeqCst);
        self.base.store(base, Ordering::SeqCst);
        self.stage.store(s as u64 + 1, Ordering::SeqCst);
    }
    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::SeqCst);
    }
    fn end(&self, stage: &str, summary: &str) {
        tracing::info!(stage, "{summary}");
    }
}

/// Runs this rank's share of the data phase.
/// The start does not matter: a data phase always runs every stage and skips the tasks whose
/// records verify. The engine is not used.
pub fn run_data(plan: &PhasePlan, _start: Start<'_>, io: PhaseIo<'_>) -> Result<PhaseOutcome, PhaseError> {
    let PhaseIo { checkpoint_dir, coll, abort, events, .. } = io;
    let cfg = plan.prepare.as_ref().ok_or_else(|| PhaseError::Plan("a data phase without [phases.prepare] settings".into()))?;
    let data_plan = pipeline::plan(cfg).map_err(|e| PhaseError::Data(e.to_string()))?;
    let rank = coll.rank();
    let counters = Counters { base: AtomicU64::new(0), stage: AtomicU64::new(0), done: AtomicU64::new(0), total: AtomicU64::new(0), plan: data_plan.clone() };
    // The job's phase is named by its checkpoint directory, which the coordinator makes unique.
    let owner = format!("the data phase of {}", checkpoint_dir.display());
    let finished = AtomicBool::new(false);
    let started = Instant::now();
    let outcome = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut group = Ranks { coll, abort };
            let r = pipeline::run(cfg, &data_plan, &owner, &|_| false, true, &mut group, &counters);
            finished.store(true, Ordering::SeqCst);
            r
        });
        // Rank 0 reports progress while the pipeline runs.
        let mut last = u64::MAX;
        while !finished.load(Ordering::SeqCst) {
            if rank == 0 {
                report(&counters, &mut last, started, events);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        worker.join()
    });
    let outcome = outcome.map_err(|_| PhaseError::Data("the data pipeline thread panicked".into()))?;
    match outcome {
        Ok(RunOutcome::Done(_)) => {
            if rank == 0 {
                let total = data_plan.total_tasks();
                counters.base.store(total, Ordering::SeqCst);
                counters.done.store(0, Ordering::SeqCst);
                counters.stage.store(STAGES.len() as u64, Ordering::SeqCst);
                let mut last = u64::MAX;
                report(&counters, &mut last, started, events);
            }
            // Rank 0 names the phase's output (the prepared directory) as its result.
            Ok(PhaseOutcome::Finished { final_checkpoint: (rank == 0).then(|| cfg.out.clone()) })
        }
        Ok(RunOutcome::Stopped(reason)) if abort.load(Ordering::SeqCst) => {
            tracing::info!("data phase stopped: {reason}");
            Ok(PhaseOutcome::Aborted)
        }
        Ok(RunOutcome::Stopped(reason)) => Ok(PhaseOutcome::GroupBroken { reason }),
        Err(e) => Err(PhaseError::Data(e.to_string())),
    }
}

fn report(c: &Counters, last: &mut u64, started: Instant, events: &mut dyn PhaseEvents) {
    let (done, total) = (c.done.load(Ordering::SeqCst), c.total.load(Ordering::SeqCst));
    let step = c.base.load(Ordering::SeqCst) + done.min(total);
    if step == *last || step == 0 {
        return;
    }
    *last = step;
    events.step(StepMetrics {
        step,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        tokens: 0,
        step_ms: started.elapsed().as_millis() as u64,
        values: vec![("stage".into(), c.stage.load(Ordering::SeqCst) as f64), ("stage_done".into(), done as f64), ("stage_tasks".into(), total as f64)],
        samples: Vec::new(),
    });
}
