//! Scheduling decisions, all made inside one store transaction each: which workers form a
//! phase's group, with which ranks and generation, and when a group re-forms.
//!
//! - A queued job's first phase starts when `min_workers` workers are idle.
//! - A running phase re-forms (new generation, resume from the last committed checkpoint) when a
//!   member's lease expires, and at a checkpoint boundary when idle workers can join (up to
//!   `max_workers` and the global batch) or a member is draining.
//! - Metrics past the resume step are deleted on re-form: those steps will be computed again.

use crate::spec::PhasePlan;
use crate::store::{PhaseRow, Result, Store, WorkerRow};
use liandan_plan::phase::device_kind;

/// Why a group re-forms (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Start,
    WorkerLost,
    Boundary,
    Waiting,
}

/// Lease expiry (the workers `overdue` in [`crate::membership::Membership`]), lost members and queued jobs.
/// Returns lines for the log.
pub fn tick(s: &Store, overdue: &[(u64, u64)]) -> Result<Vec<String>> {
    let mut log = Vec::new();
    let mut dead = Vec::new();
    for &(id, last_ms) in overdue {
        if let Some(w) = s.mark_dead(id, last_ms)? {
            log.push(format!("worker {} lease expired (was {} in job {} generation {})", w.id, w.state, w.job_id, w.generation));
            dead.push(w);
        }
    }
    for p in s.running_phases()? {
        let lost = dead.iter().any(|w| w.job_id == p.job_id && w.phase_idx == p.idx && w.generation == p.generation);
        if lost {
            log.extend(reform(s, &p, Reason::WorkerLost)?);
        } else if p.world == 0 {
            log.extend(reform(s, &p, Reason::Waiting)?);
        }
    }
    for job in s.jobs_in_state("queued")? {
        let phases = s.phases(job)?;
        let Some(first) = phases.first() else { continue };
        let need = memory_need(first);
        let idle: Vec<WorkerRow> = s.workers_in_state("idle")?.into_iter().filter(|w| fits(w, need)).collect();
        // Enough idle workers of one kind (the required one, when the phase names one).
        let enough = match required_kind(first) {
            Some(k) => idle.iter().filter(|w| device_kind(&w.device) == k).count() as u32 >= first.min_workers,
            None => idle.iter().any(|w| idle.iter().filter(|x| device_kind(&x.device) == device_kind(&w.device)).count() as u32 >= first.min_workers),
        };
        if enough {
            s.set_job_state(job, "running", "")?;
            s.set_phase_state(job, 0, "running", "")?;
            log.push(format!("job {job} starts phase 0 ({})", first.name));
            let p = s.phase(job, 0)?.unwrap_or_else(|| first.clone());
            log.extend(reform(s, &p, Reason::Start)?);
        }
    }
    Ok(log)
}

/// Whether a running phase should re-form at a checkpoint boundary: a worker can join, or a
/// member is draining.
pub fn boundary_wants_regroup(s: &Store, p: &PhaseRow) -> Result<bool> {
    let draining = s.group_members(p.job_id, p.idx, p.generation)?.iter().any(|w| member(w, p) && w.state == "draining");
    if draining {
        return Ok(true);
    }
    if (p.world as usize) >= capacity(p) {
        return Ok(false);
    }
    let need = memory_need(p);
    let kind = s.group_members(p.job_id, p.idx, p.generation)?.first().map(|w| device_kind(&w.device).to_string());
    Ok(s.workers_in_state("idle")?.iter().any(|w| fits(w, need) && kind.as_deref().is_none_or(|k| device_kind(&w.device) == k)))
}

/// The device kind a phase requires, if any.
fn required_kind(p: &PhaseRow) -> Option<String> {
    serde_json::from_str::<PhasePlan>(&p.plan_json).ok().and_then(|pl| pl.device)
}

/// Bytes a rank of phase `p` needs at its largest share of the batch (the smallest group).
pub fn memory_need(p: &PhaseRow) -> u64 {
    serde_json::from_str::<PhasePlan>(&p.plan_json).ok().and_then(|pl| pl.memory_per_rank(p.min_workers.max(1) as usize)).map_or(0, |m| m.total())
}

/// Whether worker `w` can hold a rank that needs `need` bytes (a worker that reports no memory
/// is taken at its word).
pub fn fits(w: &WorkerRow, need: u64) -> bool {
    w.memory_bytes == 0 || w.memory_bytes >= need
}

fn capacity(p: &PhaseRow) -> usize {
    let batch = serde_json::from_str::<PhasePlan>(&p.plan_json).map(|pl| pl.global_batch).unwrap_or(usize::MAX);
    (p.max_workers as usize).min(batch).max(1)
}

fn member(w: &WorkerRow, p: &PhaseRow) -> bool {
    w.job_id == p.job_id && w.phase_idx == p.idx && w.generation == p.generation && matches!(w.state.as_str(), "busy" | "draining")
}

/// Forms a new group for phase `p` from its live members and idle workers. Keeps the old ranks'
/// order first so a re-formed group changes as little as possible.
pub fn reform(s: &Store, p: &PhaseRow, reason: Reason) -> Result<Vec<String>> {
    let workers = s.workers()?;
    let mut keep: Vec<&WorkerRow> = workers.iter().filter(|w| member(w, p) && w.state == "busy").collect();
    keep.sort_by_key(|w| w.rank);
    // Workers that just finished an earlier phase of the same job are as good as idle.
    let need = memory_need(p);
    let mut fresh: Vec<&WorkerRow> =
        workers.iter().filter(|w| w.state == "idle" || (w.state == "busy" && w.job_id == p.job_id && w.phase_idx < p.idx)).filter(|w| fits(w, need)).collect();
    fresh.sort_by_key(|w| w.id);
    // One device kind per group: the required one, else the kept members', else that of the
    // kind with the most candidates (lowest id on a tie).
    let kind = required_kind(p).or_else(|| keep.first().map(|w| device_kind(&w.device).to_string())).or_else(|| {
        let count = |k: &str| fresh.iter().filter(|w| device_kind(&w.device) == k).count();
        fresh.iter().map(|w| device_kind(&w.device)).max_by_key(|k| (count(k), std::cmp::Reverse(fresh.iter().position(|w| device_kind(&w.device) == *k)))).map(str::to_string)
    });
    if let Some(k) = &kind {
        keep.retain(|w| device_kind(&w.device) == k);
        fresh.retain(|w| device_kind(&w.device) == k);
    }
    let cap = capacity(p);
    let chosen: Vec<&WorkerRow> = keep.into_iter().chain(fresh).take(cap).collect();
    if reason == Reason::Waiting && (chosen.len() as u32) < p.min_workers {
        return Ok(vec![]);
    }
    // Draining members leave now; members not chosen go back to idle.
    for w in workers.iter().filter(|w| w.job_id == p.job_id && w.phase_idx == p.idx) {
        if w.state == "draining" {
            s.assign_worker(w.id, 0, 0, 0, 0)?;
            s.set_worker_state(w.id, "drained")?;
        } else if !chosen.iter().any(|c| c.id == w.id) && w.state == "busy" {
            s.assign_worker(w.id, 0, 0, 0, 0)?;
        }
    }
    let generation = p.generation + 1;
    let resume_step = p.last_checkpoint_step;
    s.delete_metrics_after(p.job_id, p.idx, resume_step)?;
    if (chosen.len() as u32) < p.min_workers {
        s.set_phase_group(p.job_id, p.idx, generation, 0, resume_step, "")?;
        return Ok(vec![format!("job {} phase {} waits for workers: {} available, min_workers {} (generation {generation})", p.job_id, p.idx, chosen.len(), p.min_workers)]);
    }
    for (rank, w) in chosen.iter().enumerate() {
        s.assign_worker(w.id, p.job_id, p.idx, rank as u32, generation)?;
    }
    // A new key per generation: members of an ended generation cannot join the new ring.
    let ring_secret = liandan_proto::auth::random_bytes::<32>().map_err(|e| crate::store::StoreError::Io(e.to_string()))?;
    s.set_phase_group(p.job_id, p.idx, generation, chosen.len() as u32, resume_step, &liandan_proto::auth::hex(&ring_secret))?;
    let ids: Vec<String> = chosen.iter().map(|w| w.id.to_string()).collect();
    Ok(vec![format!("job {} phase {} generation {generation}: world {} (workers {}) from step {resume_step} ({reason:?})", p.job_id, p.idx, chosen.len(), ids.join(", "))])
}
