//! The worker calls: Register, Heartbeat, NextAssignment, ReportStep, CommitCheckpoint and
//! FinishAssignment.
//!
//! Every call after Register proves the worker's identity with the secret Register issued
//! ([`crate::membership`]). The calls that move a job are accepted only from the worker that
//! holds that (job, phase, generation, rank) assignment: a call for an ended generation is
//! FAILED_PRECONDITION (a worker of an old group learns its group is gone), and a wrong secret,
//! a non-member or a forged rank is PERMISSION_DENIED. Each refusal is logged, counted in
//! `liandan_rpc_refused_total`, and changes nothing. A checkpoint is recorded only when it lies
//! under the phase's checkpoint directory and verifies (sizes, checksums, step, model).

use std::path::{Path, PathBuf};

use liandan_proto::PROTOCOL_VERSION;
use liandan_proto::v1::*;
use tonic::Status;
use tracing::{info, warn};

use super::{CoordinatorService, phase_input, resolve_plan_inputs};
use crate::limits;
use crate::membership::Denied;
use crate::scheduler::{self, Reason};
use crate::spec::PhasePlan;
use crate::store::{MetricRow, NewWorker, PhaseRow, SampleRow, Store, StoreError, WorkerRow};

/// Bytes of an `ncclUniqueId`.
const NCCL_ID_BYTES: usize = 128;

/// What a worker call claims to be: its identity and, for calls that move a job, the
/// assignment it acts for.
struct Claim<'a> {
    method: &'static str,
    worker_id: u64,
    secret: &'a [u8],
}

/// The assignment a call acts for.
#[derive(Debug, Clone, Copy)]
struct Seat {
    job_id: u64,
    phase: u32,
    generation: u64,
    rank: u32,
}

impl CoordinatorService {
    /// Logs and counts a refused worker call; returns the status to answer with.
    fn refuse(&self, method: &str, worker_id: u64, status: Status) -> Status {
        warn!(method, worker = worker_id, code = ?status.code(), "refused a worker call: {}", status.message());
        self.rpc.refused(method, status.code());
        status
    }

    /// Checks the worker's secret.
    fn identify(&self, c: &Claim<'_>) -> Result<(), Status> {
        self.members.check(c.worker_id, c.secret).map_err(|d| {
            let why = match d {
                Denied::Unknown => format!("worker {} has no lease here (not registered, or declared dead): register again", c.worker_id),
                Denied::WrongSecret => format!("worker {}: the worker secret is not the one issued to this worker", c.worker_id),
            };
            self.refuse(c.method, c.worker_id, Status::permission_denied(why))
        })
    }

    /// Inside the store: the phase `seat` names, if the call is from the worker that holds that
    /// seat of its current generation.
    fn seated(&self, s: &Store, c: &Claim<'_>, seat: Seat) -> Result<Result<(WorkerRow, PhaseRow), Status>, StoreError> {
        let Some(p) = s.phase(seat.job_id, seat.phase)? else {
            return Ok(Err(Status::not_found(format!("job {} phase {} does not exist", seat.job_id, seat.phase))));
        };
        if p.generation != seat.generation || p.state != "running" {
            return Ok(Err(Status::failed_precondition(format!(
                "stale: generation {} of job {} phase {} is not the current {} ({})",
                seat.generation, seat.job_id, seat.phase, p.generation, p.state
            ))));
        }
        let Some(w) = s.worker(c.worker_id)? else {
            return Ok(Err(Status::permission_denied(format!("worker {} is not registered", c.worker_id))));
        };
        let member = w.job_id == seat.job_id && w.phase_idx == seat.phase && w.generation == seat.generation && matches!(w.state.as_str(), "busy" | "draining");
        if !member {
            return Ok(Err(Status::permission_denied(format!(
                "worker {} is not a member of job {} phase {} generation {}",
                c.worker_id, seat.job_id, seat.phase, seat.generation
            ))));
        }
        if w.rank != seat.rank {
            return Ok(Err(Status::permission_denied(format!("worker {} holds rank {} of this generation, not rank {}", c.worker_id, w.rank, seat.rank))));
        }
        Ok(Ok((w, p)))
    }

    /// [`seated`](Self::seated) for calls only rank 0 makes.
    fn seated_rank0(&self, s: &Store, c: &Claim<'_>, seat: Seat) -> Result<Result<(WorkerRow, PhaseRow), Status>, StoreError> {
        let r = self.seated(s, c, seat)?;
        Ok(r.and_then(|wp| {
            if seat.rank == 0 { Ok(wp) } else { Err(Status::permission_denied(format!("only rank 0 makes {}; worker {} is rank {}", c.method, c.worker_id, seat.rank))) }
        }))
    }

    /// A store answer, refusals logged and counted.
    fn answer<T>(&self, c: &Claim<'_>, r: Result<Result<T, Status>, Status>) -> Result<T, Status> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(status)) => Err(self.refuse(c.method, c.worker_id, status)),
            Err(status) => Err(status),
        }
    }

    pub(super) fn admit_worker(&self, r: RegisterRequest) -> Result<RegisterReply, Status> {
        if r.protocol_version != PROTOCOL_VERSION {
            warn!("refused a worker at {} speaking protocol {} (this coordinator speaks {PROTOCOL_VERSION})", limits::cut(&r.ring_address, 64), r.protocol_version);
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this coordinator speaks version {PROTOCOL_VERSION}; run the same liandan release on workers and coordinator",
                r.protocol_version
            )));
        }
        limits::text("hostname", &r.hostname, limits::HOSTNAME_CHARS)?;
        limits::text("device", &r.device, limits::DEVICE_CHARS)?;
        limits::text("ring_address", &r.ring_address, limits::ADDRESS_CHARS)?;
        if r.ring_address.is_empty() {
            return Err(Status::invalid_argument("ring_address is empty"));
        }
        if !limits::INSTANCE_CHARS.contains(&r.instance.len()) || !r.instance.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "instance must be {}..={} hex digits (a random id chosen once per worker process)",
                limits::INSTANCE_CHARS.start(),
                limits::INSTANCE_CHARS.end()
            )));
        }
        let new =
            NewWorker { instance: r.instance.clone(), hostname: r.hostname.clone(), device: r.device.clone(), ring_address: r.ring_address.clone(), memory_bytes: r.memory_bytes };
        let (id, fresh) = self.with_store(|s| s.register_worker(&new))?;
        let (secret, pace) = self.members.admit(id, &r.instance);
        if fresh {
            info!("worker {id} registered ({}, {}, ring {}, {} of memory)", r.hostname, r.device, r.ring_address, liandan_plan::memory::show_bytes(r.memory_bytes));
        } else {
            info!("worker {id} registered again (same process; ring {})", r.ring_address);
        }
        self.tick()?;
        Ok(RegisterReply { worker_id: id, worker_secret: secret.to_vec(), lease_ms: pace.lease_ms, heartbeat_ms: pace.heartbeat_ms })
    }

    pub(super) fn heartbeat_action(&self, r: HeartbeatRequest) -> Result<HeartbeatReply, Status> {
        let mut heartbeat_ms = 0;
        let action = match self.members.renew(r.worker_id, &r.worker_secret) {
            // Declared dead (or never known): the process registers again and gets its id back.
            Err(Denied::Unknown) => Action::Reregister,
            Err(Denied::WrongSecret) => {
                return Err(self.refuse(
                    "Heartbeat",
                    r.worker_id,
                    Status::permission_denied(format!("worker {}: the worker secret is not the one issued to this worker", r.worker_id)),
                ));
            }
            Ok(pace) => self.with_store(|s| {
                heartbeat_ms = pace.heartbeat_ms;
                let Some(w) = s.worker(r.worker_id)? else { return Ok(Action::Reregister) };
                Ok(match w.state.as_str() {
                    "dead" => Action::Reregister,
                    "drained" => Action::Drain,
                    _ if r.job_id == 0 => Action::Continue,
                    _ => {
                        // Running something: is it still the current generation of a running phase?
                        let current = w.job_id == r.job_id && w.generation == r.generation && matches!(w.state.as_str(), "busy" | "draining");
                        let running = current && s.phase(w.job_id, w.phase_idx)?.is_some_and(|p| p.state == "running" && p.generation == r.generation);
                        if running { Action::Continue } else { Action::Abort }
                    }
                })
            })?,
        };
        Ok(HeartbeatReply { action: action as i32, heartbeat_ms })
    }

    pub(super) fn assignment_for(&self, r: AssignmentRequest) -> Result<Assignment, Status> {
        let c = Claim { method: "NextAssignment", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        let a = self.with_store(|s| {
            let Some(w) = s.worker(r.worker_id)? else { return Ok(Assignment::default()) };
            if !matches!(w.state.as_str(), "busy" | "draining") || w.job_id == 0 {
                return Ok(Assignment::default());
            }
            let Some(p) = s.phase(w.job_id, w.phase_idx)? else { return Ok(Assignment::default()) };
            if p.state != "running" || p.generation != w.generation || p.world == 0 {
                return Ok(Assignment::default());
            }
            let group = s.group_members(p.job_id, p.idx, p.generation)?;
            let (start, resume) = if !p.last_checkpoint.is_empty() {
                (Start::Continue, p.last_checkpoint.clone())
            } else if !p.input_checkpoint.is_empty() {
                (Start::FromInput, p.input_checkpoint.clone())
            } else {
                (Start::Fresh, String::new())
            };
            let phase_json = resolve_plan_inputs(s, &p)?;
            Ok(Assignment {
                assigned: true,
                job_id: p.job_id,
                phase_index: p.idx,
                phase_name: p.name.clone(),
                rank: w.rank,
                world: p.world,
                generation: p.generation,
                peers: group.iter().map(|x| x.ring_address.clone()).collect(),
                phase_json,
                resume_checkpoint: resume,
                checkpoint_dir: p.checkpoint_dir.clone(),
                ring_secret: liandan_proto::auth::unhex(&p.ring_secret).unwrap_or_default(),
                start: start as i32,
                sample: None,
            })
        })?;
        // An idle worker samples answers for human comparisons when some are wanted.
        if !a.assigned {
            return Ok(Assignment { sample: self.sampling.take(r.worker_id), ..a });
        }
        Ok(a)
    }

    pub(super) fn record_step(&self, r: StepReport) -> Result<(), Status> {
        let c = Claim { method: "ReportStep", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        if r.values.len() > limits::VALUES {
            return Err(Status::invalid_argument(format!("{} phase values in one report; at most {}", r.values.len(), limits::VALUES)));
        }
        if r.samples.len() > limits::SAMPLES {
            return Err(Status::invalid_argument(format!("{} samples in one report; at most {}", r.samples.len(), limits::SAMPLES)));
        }
        if let Some(k) = r.values.keys().find(|k| k.chars().count() > limits::VALUE_NAME_CHARS) {
            return Err(Status::invalid_argument(format!("value name '{}' is longer than {} characters", limits::cut(k, 32), limits::VALUE_NAME_CHARS)));
        }
        let seat = Seat { job_id: r.job_id, phase: r.phase_index, generation: r.generation, rank: r.rank };
        let result = self.with_store(|s| {
            let (_, p) = match self.seated_rank0(s, &c, seat)? {
                Ok(wp) => wp,
                Err(e) => return Ok(Err(e)),
            };
            let m = MetricRow {
                step: r.step,
                loss: r.loss,
                lr: r.lr,
                grad_norm: r.grad_norm,
                tokens: r.tokens,
                step_ms: r.step_ms,
                world: r.world,
                generation: r.generation,
                values: r.values.into_iter().collect(),
            };
            s.insert_metric(r.job_id, r.phase_index, &m)?;
            if !r.samples.is_empty() {
                let cut = |t: &str| limits::cut(t, limits::SAMPLE_CHARS);
                let rows: Vec<SampleRow> = r
                    .samples
                    .iter()
                    .map(|x| SampleRow {
                        step: r.step,
                        prompt: cut(&x.prompt),
                        answer: cut(&x.answer),
                        reward: x.reward,
                        rm_score: x.rm_score,
                        verifier: x.verified.then_some((x.verifier_score, x.verifier_pass)),
                        kl: x.kl,
                    })
                    .collect();
                s.insert_samples(r.job_id, r.phase_index, r.step, &rows, limits::SAMPLE_STEPS)?;
            }
            s.advance_phase(r.job_id, r.phase_index, r.step.min(p.total_steps))?;
            Ok(Ok(()))
        });
        self.answer(&c, result)
    }

    pub(super) async fn commit(&self, r: CheckpointInfo) -> Result<CommitReply, Status> {
        let c = Claim { method: "CommitCheckpoint", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        limits::text("path", &r.path, limits::PATH_CHARS)?;
        let seat = Seat { job_id: r.job_id, phase: r.phase_index, generation: r.generation, rank: r.rank };
        let p = self.answer(&c, self.with_store(|s| Ok(self.seated_rank0(s, &c, seat)?.map(|(_, p)| p))))?;
        if let Err(why) = self.verify_checkpoint(&p, &r.path, r.step).await {
            return Err(self.refuse(c.method, c.worker_id, Status::invalid_argument(why)));
        }
        let result = self.with_store(|s| {
            s.transaction(|s| {
                // The group may have changed while the checkpoint was verified.
                let p = match self.seated_rank0(s, &c, seat)? {
                    Ok((_, p)) => p,
                    Err(e) => return Ok(Err(e)),
                };
                s.commit_checkpoint(r.job_id, r.phase_index, r.step, &r.path, r.generation)?;
                s.advance_phase(r.job_id, r.phase_index, r.step)?;
                let p = s.phase(r.job_id, r.phase_index)?.unwrap_or(p);
                if r.step < p.total_steps && scheduler::boundary_wants_regroup(s, &p)? {
                    return Ok(Ok((true, scheduler::reform(s, &p, Reason::Boundary)?)));
                }
                Ok(Ok((false, vec![])))
            })
        });
        let (regroup, log) = self.answer(&c, result)?;
        info!("job {} phase {} committed checkpoint at step {}: {}", r.job_id, r.phase_index, r.step, r.path);
        for line in log {
            info!(target: "liandan::scheduler", "{line}");
        }
        Ok(CommitReply { regroup })
    }

    pub(super) async fn finish(&self, r: AssignmentResult) -> Result<(), Status> {
        let c = Claim { method: "FinishAssignment", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        limits::text("final_checkpoint", &r.final_checkpoint, limits::PATH_CHARS)?;
        let seat = Seat { job_id: r.job_id, phase: r.phase_index, generation: r.generation, rank: r.rank };
        let (mut ok, mut error) = (r.ok, limits::cut(&r.error, limits::ERROR_CHARS));
        // A finished phase's checkpoint is verified before the phase is marked done; one that
        // does not verify fails the phase (it can be resumed from its last commit).
        if ok
            && r.rank == 0
            && !r.final_checkpoint.is_empty()
            && let Ok(Ok((_, p))) = self.with_store(|s| self.seated_rank0(s, &c, seat))
            && let Err(why) = self.verify_checkpoint(&p, &r.final_checkpoint, p.total_steps).await
        {
            warn!(job = r.job_id, phase = r.phase_index, "the final checkpoint does not verify: {why}");
            (ok, error) = (false, format!("the final {why}"));
        }
        let result = self.with_store(|s| {
            s.transaction(|s| {
                let mut log = Vec::new();
                let (w, p) = match self.seated(s, &c, seat)? {
                    Ok(wp) => wp,
                    // A member of an ended generation leaves its old seat; that moves no job.
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                        if let Some(w) = s.worker(r.worker_id)?
                            && w.job_id == r.job_id
                            && w.phase_idx == r.phase_index
                            && w.generation <= r.generation
                            && w.state == "busy"
                        {
                            s.assign_worker(w.id, 0, 0, 0, 0)?;
                        }
                        return Ok(Ok(log));
                    }
                    Err(e) => return Ok(Err(e)),
                };
                if !ok {
                    s.set_phase_state(r.job_id, r.phase_index, "failed", &error)?;
                    s.set_job_state(r.job_id, "failed", &format!("phase {} ({}): {error}", p.idx, p.name))?;
                    log.push(format!("job {} failed in phase {}: {error}", r.job_id, p.name));
                } else if w.rank == 0 && !r.final_checkpoint.is_empty() {
                    // (Verified above, outside the store's lock.)
                    s.commit_checkpoint(r.job_id, r.phase_index, p.total_steps, &r.final_checkpoint, r.generation)?;
                    s.advance_phase(r.job_id, r.phase_index, p.total_steps)?;
                    s.set_phase_state(r.job_id, r.phase_index, "succeeded", "")?;
                    log.push(format!("job {} phase {} ({}) succeeded: {}", r.job_id, p.idx, p.name, r.final_checkpoint));
                    match s.phase(r.job_id, r.phase_index + 1)? {
                        Some(next) => {
                            s.set_phase_input(r.job_id, next.idx, &phase_input(s, &next)?)?;
                            s.set_phase_state(r.job_id, next.idx, "running", "")?;
                            let next = s.phase(r.job_id, next.idx)?.unwrap_or(next);
                            log.extend(scheduler::reform(s, &next, Reason::Start)?);
                        }
                        None => {
                            s.set_job_state(r.job_id, "succeeded", "")?;
                            log.push(format!("job {} succeeded", r.job_id));
                        }
                    }
                }
                // The worker leaves this assignment (unless already moved to another group).
                let w = s.worker(r.worker_id)?.unwrap_or(w);
                if w.job_id == r.job_id && w.phase_idx == r.phase_index && w.generation <= r.generation && w.state == "busy" {
                    s.assign_worker(w.id, 0, 0, 0, 0)?;
                }
                Ok(Ok(log))
            })
        });
        for line in self.answer(&c, result)? {
            info!("{line}");
        }
        self.tick()?;
        Ok(())
    }

    /// Rank 0 posts its NCCL id for its generation.
    pub(super) fn post_nccl_id(&self, r: Rendezvous) -> Result<(), Status> {
        let c = Claim { method: "PublishRendezvous", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        if r.nccl_id.len() != NCCL_ID_BYTES {
            return Err(Status::invalid_argument(format!("an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}", r.nccl_id.len())));
        }
        let seat = Seat { job_id: r.job_id, phase: r.phase_index, generation: r.generation, rank: r.rank };
        self.answer(&c, self.with_store(|s| Ok(self.seated_rank0(s, &c, seat)?.map(|_| ()))))?;
        self.rendezvous.lock().unwrap_or_else(|p| p.into_inner()).insert((r.job_id, r.phase_index), (r.generation, r.nccl_id));
        info!(job = r.job_id, phase = r.phase_index, generation = r.generation, "NCCL id published by rank 0");
        Ok(())
    }

    /// A member fetches rank 0's NCCL id of its generation.
    pub(super) fn nccl_id_for(&self, r: Rendezvous) -> Result<Rendezvous, Status> {
        let c = Claim { method: "FetchRendezvous", worker_id: r.worker_id, secret: &r.worker_secret };
        self.identify(&c)?;
        let seat = Seat { job_id: r.job_id, phase: r.phase_index, generation: r.generation, rank: r.rank };
        self.answer(&c, self.with_store(|s| Ok(self.seated(s, &c, seat)?.map(|_| ()))))?;
        let table = self.rendezvous.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(&(r.job_id, r.phase_index)) {
            Some((generation, id)) if *generation == r.generation => Ok(Rendezvous { nccl_id: id.clone(), worker_secret: Vec::new(), ..r }),
            // An id of an earlier generation is never handed out.
            _ => Err(Status::unavailable(format!("rank 0 of job {} phase {} generation {} has not published its NCCL id yet", r.job_id, r.phase_index, r.generation))),
        }
    }

    /// A checkpoint a member reports: under the phase's checkpoint directory, complete and
    /// intact (every file's size and checksum), of `step`, and of the phase's model. Runs off
    /// the async threads (it reads the whole checkpoint).
    async fn verify_checkpoint(&self, p: &PhaseRow, path: &str, step: u64) -> Result<(), String> {
        let (root, dir, plan_json) = (PathBuf::from(&p.checkpoint_dir), PathBuf::from(path), p.plan_json.clone());
        let checked = tokio::task::spawn_blocking(move || check_checkpoint(&root, &dir, &plan_json, step)).await.map_err(|e| e.to_string())?;
        checked.map_err(|why| format!("checkpoint {}: {why}", limits::cut(path, 256)))
    }
}

fn check_checkpoint(root: &Path, dir: &Path, plan_json: &str, step: u64) -> Result<(), String> {
    if let Ok(plan) = serde_json::from_str::<PhasePlan>(plan_json)
        && plan.kind == crate::spec::PhaseKind::Data
    {
        return check_prepared(&plan, dir);
    }
    let real = dir.canonicalize().map_err(|e| format!("cannot be opened: {e}"))?;
    let root = root.canonicalize().map_err(|e| format!("the phase's checkpoint directory {}: {e}", root.display()))?;
    if !real.starts_with(&root) || real == root {
        return Err(format!("is not under the phase's checkpoint directory {}", root.display()));
    }
    let state = liandan_plan::checkpoint::verify(&real).map_err(|e| e.to_string())?;
    if state.step != step {
        return Err(format!("holds step {}, reported as step {step}", state.step));
    }
    if let Ok(plan) = serde_json::from_str::<PhasePlan>(plan_json)
        && state.model_config != plan.model
    {
        return Err("its model is not the phase's model".into());
    }
    Ok(())
}

/// A data phase's result is no model but its prepared directory: the plan's `data_dir`, with a
/// manifest whose every shard is there at its recorded size (the workers checked the checksums
/// as they wrote them).
fn check_prepared(plan: &PhasePlan, dir: &Path) -> Result<(), String> {
    let real = dir.canonicalize().map_err(|e| format!("cannot be opened: {e}"))?;
    let want = plan.data_dir.canonicalize().map_err(|e| format!("data.prepared {}: {e}", plan.data_dir.display()))?;
    if real != want {
        return Err(format!("is not the job's data.prepared {}", want.display()));
    }
    let m = liandan_data::shard::Manifest::load(&real).map_err(|e| e.to_string())?;
    for s in m.splits.values().flat_map(|s| &s.shards) {
        let f = real.join(&s.file);
        let len = std::fs::metadata(&f).map_err(|e| format!("{}: {e}", f.display()))?.len();
        if len != s.bytes {
            return Err(format!("{}: {len} bytes, the manifest says {}", f.display(), s.bytes));
        }
    }
    Ok(())
}
