//! The gRPC service: maps RPCs onto the store and the scheduler, and store errors onto
//! `tonic::Status`. No request data is trusted: unknown ids are NOT_FOUND, stale generations
//! FAILED_PRECONDITION, replays no-ops.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use liandan_proto::v1::coordinator_server::Coordinator;
use liandan_proto::v1::*;
use liandan_proto::PROTOCOL_VERSION;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::scheduler::{self, Reason};
use crate::spec::{JobSpec, PhaseKind, PhasePlan};
use crate::store::{now_ms, MetricRow, Store, StoreError};

/// Timing of membership.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A worker not heard from for this long is dead.
    pub lease_ms: u64,
    /// How often workers heartbeat.
    pub heartbeat_ms: u64,
    /// How often the scheduler runs.
    pub tick_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig { lease_ms: 3000, heartbeat_ms: 500, tick_ms: 200 }
    }
}

/// The coordinator's shared state: the store behind a mutex (SQLite calls are short).
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    store: Arc<Mutex<Store>>,
    pub config: CoordinatorConfig,
    /// The model that samples answers for human comparisons, loaded once per checkpoint.
    sampler: Arc<Mutex<Option<Sampler>>>,
    /// What each committed checkpoint recorded about itself, read once (it never changes).
    evaluations: Arc<Mutex<std::collections::HashMap<String, String>>>,
}

/// A checkpoint and the prompts it answers, loaded to sample answers for comparisons.
#[derive(Debug)]
struct Sampler {
    checkpoint: String,
    model: liandan_worker::Gpt,
    tokenizer: liandan_data::tokenizer::ChatTokenizer,
    examples: std::path::PathBuf,
    prompts: Vec<liandan_data::chat::SftExample>,
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

impl CoordinatorService {
    pub fn new(store: Store, config: CoordinatorConfig) -> Result<Self, StoreError> {
        // After a restart, give workers a full lease to reconnect before declaring them dead.
        store.renew_all_leases(config.lease_ms)?;
        Ok(CoordinatorService { store: Arc::new(Mutex::new(store)), config, sampler: Arc::new(Mutex::new(None)), evaluations: Arc::default() })
    }

    pub(crate) fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, Status> {
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(internal)
    }

    /// One scheduler pass (lease expiry, lost members, queued jobs).
    pub fn tick(&self) -> Result<(), Status> {
        let log = self.with_store(|s| s.transaction(scheduler::tick))?;
        for line in log {
            info!(target: "liandan::scheduler", "{line}");
        }
        Ok(())
    }

    /// Runs [`tick`](Self::tick) every `tick_ms` until the process ends.
    pub fn spawn_scheduler(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(me.config.tick_ms));
            loop {
                iv.tick().await;
                if let Err(e) = me.tick() {
                    warn!("scheduler: {e}");
                }
            }
        });
    }

    /// The status of a job (used by GetJob, ListJobs and WatchJob).
    pub fn job_status(&self, job_id: u64) -> Result<JobStatus, Status> {
        self.with_store(|s| {
            let Some(job) = s.job(job_id)? else { return Ok(None) };
            let mut phases = Vec::new();
            let mut workers = Vec::new();
            for p in s.phases(job_id)? {
                let recent = s.recent_metrics(job_id, p.idx, 20)?;
                let (tokens, ms): (u64, u64) = recent.iter().fold((0, 0), |(t, m), r| (t + r.tokens, m + r.step_ms));
                let tokens_per_s = if ms > 0 { tokens as f64 * 1000.0 / ms as f64 } else { 0.0 };
                let step_ms = if recent.is_empty() { 0 } else { ms / recent.len() as u64 };
                let eta_ms = if p.state == "running" { step_ms * p.total_steps.saturating_sub(p.step) } else { 0 };
                if p.state == "running" {
                    let mut members: Vec<_> = s.workers()?.into_iter().filter(|w| w.job_id == job_id && w.phase_idx == p.idx && w.generation == p.generation).collect();
                    members.sort_by_key(|w| w.rank);
                    workers = members.iter().map(|w| w.id).collect();
                }
                phases.push(PhaseStatus {
                    index: p.idx,
                    name: p.name.clone(),
                    state: p.state.clone(),
                    step: p.step,
                    total_steps: p.total_steps,
                    generation: p.generation,
                    loss: recent.first().map_or(0.0, |m| m.loss),
                    tokens_per_s,
                    eta_ms,
                    last_checkpoint: p.last_checkpoint.clone(),
                    last_checkpoint_step: p.last_checkpoint_step,
                    world: p.world,
                    error: p.error.clone(),
                    input_checkpoint: p.input_checkpoint.clone(),
                    values: recent.first().map(|m| m.values.clone().into_iter().collect()).unwrap_or_default(),
                    evaluation: String::new(),
                });
            }
            Ok(Some(JobStatus { job_id, name: job.name, state: job.state, phases, workers, error: job.error, created_ms: job.created_ms }))
        })?
        .map(|mut j| {
            // Outside the store's lock: file reads, cached per checkpoint.
            j.phases.iter_mut().for_each(|p| p.evaluation = self.evaluation(&p.last_checkpoint));
            j
        })
        .ok_or_else(|| Status::not_found(format!("job {job_id} does not exist")))
    }

    /// What a committed checkpoint recorded about itself (one of the phases' eval files, as
    /// compact JSON), or "". Read once per checkpoint: a committed checkpoint never changes.
    fn evaluation(&self, dir: &str) -> String {
        if dir.is_empty() {
            return String::new();
        }
        let mut cache = self.evaluations.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(dir.to_string())
            .or_insert_with(|| {
                liandan_worker::phase::EVAL_FILES
                    .iter()
                    .find_map(|f| std::fs::read(std::path::Path::new(dir).join(f)).ok())
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// A new comparison for `job_id`: a prompt of the job's SFT data and two answers sampled
    /// from its newest SFT or PPO checkpoint (blocking: runs the model).
    pub fn make_comparison(&self, job_id: u64) -> Result<crate::store::NewComparison, Status> {
        let (checkpoint, examples, made) = self.with_store(|s| {
            let Some(_) = s.job(job_id)? else { return Ok(Err(Status::not_found(format!("job {job_id} does not exist")))) };
            let plans: Vec<(crate::store::PhaseRow, PhasePlan)> =
                s.phases(job_id)?.into_iter().filter_map(|p| serde_json::from_str::<PhasePlan>(&p.plan_json).ok().map(|pl| (p, pl))).collect();
            let chat = |k: PhaseKind| matches!(k, PhaseKind::Sft | PhaseKind::Ppo);
            let Some((p, _)) = plans.iter().rev().find(|(p, pl)| chat(pl.kind) && !p.last_checkpoint.is_empty()) else {
                return Ok(Err(Status::failed_precondition(format!("job {job_id} has no SFT or PPO checkpoint yet to sample answers from"))));
            };
            let Some(examples) = plans.iter().find(|(_, pl)| pl.kind == PhaseKind::Sft).and_then(|(_, pl)| pl.examples.clone()) else {
                return Ok(Err(Status::failed_precondition(format!("job {job_id} has no sft phase whose prompts could be asked"))));
            };
            Ok(Ok((p.last_checkpoint.clone(), examples, s.comparison_counts(job_id)?.0)))
        })??;
        let mut guard = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|m| m.checkpoint != checkpoint || m.examples != examples) {
            let (model, tokenizer) = liandan_worker::eval::load_chat_model(std::path::Path::new(&checkpoint)).map_err(Status::failed_precondition)?;
            let prompts = liandan_data::chat::read_sft(&examples).map_err(|e| Status::failed_precondition(e.to_string()))?;
            *guard = Some(Sampler { checkpoint: checkpoint.clone(), model, tokenizer, examples, prompts });
        }
        let Some(m) = guard.as_ref() else { return Err(Status::internal("sampler not loaded")) };
        let prompts = &m.prompts;
        // Walk the prompts in a fixed pseudo-random order; skip pairs whose answers are equal.
        for attempt in 0..16u64 {
            let k = made * 16 + attempt;
            let ex = &prompts[(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % prompts.len()];
            let Some(prompt) = ex.messages.iter().find(|m| m.role == liandan_data::chat::Role::User).map(|m| m.content.clone()) else { continue };
            let sample = |seed: u64| {
                let cfg = liandan_worker::generate::SamplingConfig { max_new_tokens: 64, temperature: 0.9, top_k: 50, top_p: 0.95, seed, ..Default::default() };
                liandan_worker::eval::answer_with(&m.model, &m.tokenizer, &prompt, cfg).map_err(Status::internal)
            };
            let (a, b) = (sample(2 * k)?, sample(2 * k + 1)?);
            if a.trim() != b.trim() && !a.trim().is_empty() && !b.trim().is_empty() {
                return Ok(crate::store::NewComparison { job_id, prompt, task: ex.task.clone().unwrap_or_default(), answer_a: a.trim().into(), answer_b: b.trim().into(), checkpoint });
            }
        }
        Err(Status::resource_exhausted(format!("{checkpoint}: 16 attempts gave no two different answers")))
    }

    /// The next comparison of a job to label: its oldest open one, or a newly sampled one.
    pub async fn next_comparison_for(&self, job_id: u64) -> Result<Comparison, Status> {
        let open = self.with_store(|s| s.open_comparison(job_id))?;
        let row = match open {
            Some(row) => row,
            None => {
                let me = self.clone();
                let new = tokio::task::spawn_blocking(move || me.make_comparison(job_id)).await.map_err(|e| Status::internal(e.to_string()))??;
                let id = self.with_store(|s| s.insert_comparison(&new))?;
                info!(job = job_id, comparison = id, "new comparison sampled from {}", new.checkpoint);
                crate::store::ComparisonRow { id, new, choice: String::new(), labeler: String::new() }
            }
        };
        let (total, labelled) = self.with_store(|s| s.comparison_counts(job_id))?;
        let n = row.new;
        Ok(Comparison { comparison_id: row.id, job_id, prompt: n.prompt, answer_a: n.answer_a, answer_b: n.answer_b, task: n.task, checkpoint: n.checkpoint, total, labelled })
    }

    /// Labels a comparison once (`a`, `b`, `tie`, `skip`); a refusal is logged and changes nothing.
    pub fn label(&self, id: u64, choice: &str, labeler: &str) -> Result<(), Status> {
        let result = if ["a", "b", "tie", "skip"].contains(&choice) {
            self.with_store(|s| {
                let Some(c) = s.comparison(id)? else { return Ok(Err(Status::not_found(format!("comparison {id} does not exist")))) };
                if !s.label_comparison(c.id, choice, labeler)? {
                    return Ok(Err(Status::failed_precondition(format!("comparison {id} was already labelled ('{}' by '{}')", c.choice, c.labeler))));
                }
                Ok(Ok(()))
            })?
        } else {
            Err(Status::invalid_argument(format!("choice must be a, b, tie or skip, got '{choice}'")))
        };
        match &result {
            Ok(()) => info!(comparison = id, choice, labeler, "comparison labelled"),
            Err(e) => warn!(comparison = id, "label refused: {}", e.message()),
        }
        result
    }

    /// Submits a spec; the error names the key (INVALID_ARGUMENT).
    pub fn submit(&self, spec_toml: &str, source: &str) -> Result<u64, Status> {
        let spec = JobSpec::parse(spec_toml, source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plans = spec.plans(source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A job with a data phase makes its data; the others register the data they train on.
        let manifest = match spec.data_settings() {
            Some(_) => None,
            None => Some(liandan_data::shard::Manifest::load(&spec.data.prepared).map_err(|e| Status::invalid_argument(e.to_string()))?),
        };
        let phases: Vec<(String, String, u64)> = spec
            .phases
            .iter()
            .zip(&plans)
            .map(|(p, plan)| (p.name.clone(), serde_json::to_string(plan).unwrap_or_default(), plan.steps))
            .collect();
        let root = spec.checkpoint.dir.display().to_string();
        let id = self.with_store(|s| {
            if let Some(manifest) = &manifest {
                let train_tokens = manifest.splits.get("train").map_or(0, |t| t.tokens);
                s.register_dataset(&spec.data.prepared.display().to_string(), manifest.vocab_size, train_tokens, &manifest.tokenizer_sha256)?;
            }
            let id = s.insert_job(&spec.name, spec_toml, &phases, spec.cluster.min_workers, spec.cluster.max_workers, &root)?;
            // A first phase that starts from a checkpoint (`init`) has it as its input from the
            // start (the job is still queued); later phases get theirs when the phase before succeeds.
            if let Some(first) = s.phase(id, 0)? {
                s.set_phase_input(id, 0, &phase_input(s, &first)?)?;
            }
            Ok(id)
        })?;
        info!("job {id} '{}' submitted from {source}: {} phase(s)", spec.name, phases.len());
        self.tick()?;
        Ok(id)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            warn!("refused a worker at {} speaking protocol {} (this coordinator speaks {PROTOCOL_VERSION})", r.ring_address, r.protocol_version);
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this coordinator speaks version {PROTOCOL_VERSION}; run the same liandan release on workers and coordinator",
                r.protocol_version
            )));
        }
        if r.ring_address.is_empty() {
            return Err(Status::invalid_argument("ring_address is empty"));
        }
        let lease = self.config.lease_ms;
        let id = self.with_store(|s| s.register_worker(r.previous_id, &r.hostname, &r.device, &r.ring_address, lease))?;
        info!("worker {id} registered ({}, {}, ring {})", r.hostname, r.device, r.ring_address);
        self.tick()?;
        Ok(Response::new(RegisterReply { worker_id: id, lease_ms: lease, heartbeat_ms: self.config.heartbeat_ms }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let lease = self.config.lease_ms;
        let action = self.with_store(|s| {
            let Some(w) = s.heartbeat(r.worker_id, lease)? else { return Ok(Action::Reregister) };
            if w.state == "dead" {
                return Ok(Action::Reregister);
            }
            if w.state == "drained" {
                return Ok(Action::Drain);
            }
            if r.job_id == 0 {
                return Ok(Action::Continue);
            }
            // Running something: is it still the current generation of a running phase?
            let current = w.job_id == r.job_id && w.generation == r.generation && matches!(w.state.as_str(), "busy" | "draining");
            let phase_running = s.phase(w.job_id, w.phase_idx)?.is_some_and(|p| p.state == "running" && p.generation == r.generation);
            Ok(if current && phase_running { Action::Continue } else { Action::Abort })
        })?;
        Ok(Response::new(HeartbeatReply { action: action as i32 }))
    }

    async fn next_assignment(&self, req: Request<AssignmentRequest>) -> Result<Response<Assignment>, Status> {
        let id = req.into_inner().worker_id;
        let a = self.with_store(|s| {
            let Some(w) = s.worker(id)? else { return Ok(None) };
            if !matches!(w.state.as_str(), "busy" | "draining") || w.job_id == 0 {
                return Ok(Some(Assignment::default()));
            }
            let Some(p) = s.phase(w.job_id, w.phase_idx)? else { return Ok(Some(Assignment::default())) };
            if p.state != "running" || p.generation != w.generation || p.world == 0 {
                return Ok(Some(Assignment::default()));
            }
            let mut group: Vec<_> = s.workers()?.into_iter().filter(|x| x.job_id == p.job_id && x.phase_idx == p.idx && x.generation == p.generation).collect();
            group.sort_by_key(|x| x.rank);
            let resume = if p.last_checkpoint.is_empty() { p.input_checkpoint.clone() } else { p.last_checkpoint.clone() };
            let phase_json = resolve_plan_inputs(s, &p)?;
            Ok(Some(Assignment {
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
            }))
        })?;
        a.map(Response::new).ok_or_else(|| Status::not_found(format!("worker {id} is not registered")))
    }

    async fn report_step(&self, req: Request<StepReport>) -> Result<Response<Ack>, Status> {
        let r = req.into_inner();
        self.with_store(|s| {
            let Some(p) = s.phase(r.job_id, r.phase_index)? else { return Ok(Err(Status::not_found(format!("job {} phase {} does not exist", r.job_id, r.phase_index)))) };
            if p.generation != r.generation || p.state != "running" {
                return Ok(Err(Status::failed_precondition(format!("stale report: generation {} is not the current {}", r.generation, p.generation))));
            }
            let m = MetricRow { step: r.step, loss: r.loss, lr: r.lr, grad_norm: r.grad_norm, tokens: r.tokens, step_ms: r.step_ms, world: r.world, generation: r.generation, values: r.values.into_iter().collect() };
            s.insert_metric(r.job_id, r.phase_index, &m)?;
            s.advance_phase(r.job_id, r.phase_index, r.step.min(p.total_steps))?;
            Ok(Ok(()))
        })??;
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(&self, req: Request<CheckpointInfo>) -> Result<Response<CommitReply>, Status> {
        let r = req.into_inner();
        let path = std::path::PathBuf::from(&r.path);
        if !path.join(liandan_worker::checkpoint::STATE_FILE).is_file() {
            return Err(Status::invalid_argument(format!("{} is not a complete checkpoint (no state.json)", r.path)));
        }
        let (regroup, log) = self.with_store(|s| {
            s.transaction(|s| {
                let Some(p) = s.phase(r.job_id, r.phase_index)? else { return Ok(Err(Status::not_found(format!("job {} phase {} does not exist", r.job_id, r.phase_index)))) };
                if p.generation != r.generation || p.state != "running" {
                    return Ok(Err(Status::failed_precondition(format!("stale commit: generation {} is not the current {}", r.generation, p.generation))));
                }
                s.commit_checkpoint(r.job_id, r.phase_index, r.step, &r.path, r.generation)?;
                s.advance_phase(r.job_id, r.phase_index, r.step)?;
                let p = s.phase(r.job_id, r.phase_index)?.unwrap_or(p);
                if r.step < p.total_steps && scheduler::boundary_wants_regroup(s, &p)? {
                    return Ok(Ok((true, scheduler::reform(s, &p, Reason::Boundary)?)));
                }
                Ok(Ok((false, vec![])))
            })
        })??;
        info!("job {} phase {} committed checkpoint at step {}: {}", r.job_id, r.phase_index, r.step, r.path);
        for line in log {
            info!(target: "liandan::scheduler", "{line}");
        }
        Ok(Response::new(CommitReply { regroup }))
    }

    async fn finish_assignment(&self, req: Request<AssignmentResult>) -> Result<Response<Ack>, Status> {
        let r = req.into_inner();
        let log = self.with_store(|s| {
            s.transaction(|s| {
                let mut log = Vec::new();
                let Some(w) = s.worker(r.worker_id)? else { return Ok(Err(Status::not_found(format!("worker {} is not registered", r.worker_id)))) };
                let Some(p) = s.phase(r.job_id, r.phase_index)? else { return Ok(Err(Status::not_found(format!("job {} phase {} does not exist", r.job_id, r.phase_index)))) };
                let current = p.generation == r.generation && p.state == "running";
                if current && !r.ok {
                    s.set_phase_state(r.job_id, r.phase_index, "failed", &r.error)?;
                    s.set_job_state(r.job_id, "failed", &format!("phase {} ({}): {}", p.idx, p.name, r.error))?;
                    log.push(format!("job {} failed in phase {}: {}", r.job_id, p.name, r.error));
                } else if current && r.ok && w.rank == 0 && !r.final_checkpoint.is_empty() {
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
        })??;
        for line in log {
            info!("{line}");
        }
        self.tick()?;
        Ok(Response::new(Ack {}))
    }

    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<SubmitJobReply>, Status> {
        let r = req.into_inner();
        let source = if r.source.is_empty() { "job spec".to_string() } else { r.source };
        let job_id = self.submit(&r.spec_toml, &source)?;
        Ok(Response::new(SubmitJobReply { job_id }))
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        Ok(Response::new(self.job_status(req.into_inner().job_id)?))
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        let ids: Vec<u64> = self.with_store(|s| Ok(s.jobs()?.into_iter().map(|j| j.id).collect()))?;
        let jobs = ids.into_iter().map(|id| self.job_status(id)).collect::<Result<_, _>>()?;
        Ok(Response::new(ListJobsReply { jobs }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, req: Request<JobRef>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let first = self.job_status(id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                if matches!(last.state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = me.job_status(id);
                let changed = now.as_ref().map_or(true, |n| *n != last);
                if changed {
                    let stop = now.is_err();
                    if let Ok(n) = &now {
                        last = n.clone();
                    }
                    if tx.send(now).await.is_err() || stop {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<JobRef>) -> Result<Response<Ack>, Status> {
        let id = req.into_inner().job_id;
        self.with_store(|s| {
            s.transaction(|s| {
                let Some(job) = s.job(id)? else { return Ok(Err(Status::not_found(format!("job {id} does not exist")))) };
                if matches!(job.state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return Ok(Ok(()));
                }
                s.set_job_state(id, "cancelled", "cancelled by request")?;
                for p in s.phases(id)? {
                    if matches!(p.state.as_str(), "queued" | "running") {
                        s.set_phase_state(id, p.idx, "cancelled", "")?;
                    }
                }
                for w in s.workers()? {
                    if w.job_id == id && w.state == "busy" {
                        s.assign_worker(w.id, 0, 0, 0, 0)?;
                    }
                }
                Ok(Ok(()))
            })
        })??;
        info!("job {id} cancelled");
        Ok(Response::new(Ack {}))
    }

    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersReply>, Status> {
        let now = now_ms();
        let workers = self.with_store(|s| s.workers())?;
        Ok(Response::new(ListWorkersReply {
            workers: workers
                .into_iter()
                .map(|w| WorkerInfo {
                    worker_id: w.id,
                    hostname: w.hostname,
                    device: w.device,
                    ring_address: w.ring_address,
                    state: w.state,
                    heartbeat_age_ms: now.saturating_sub(w.last_heartbeat_ms),
                    job_id: w.job_id,
                    rank: w.rank,
                    generation: w.generation,
                })
                .collect(),
        }))
    }

    async fn drain_worker(&self, req: Request<WorkerRef>) -> Result<Response<Ack>, Status> {
        let id = req.into_inner().worker_id;
        self.with_store(|s| {
            let Some(w) = s.worker(id)? else { return Ok(Err(Status::not_found(format!("worker {id} does not exist")))) };
            let next = match w.state.as_str() {
                "busy" => "draining",
                "idle" => "drained",
                other => other,
            };
            s.set_worker_state(id, next)?;
            Ok(Ok(()))
        })??;
        info!("worker {id} asked to drain");
        Ok(Response::new(Ack {}))
    }

    async fn next_comparison(&self, req: Request<ComparisonRequest>) -> Result<Response<Comparison>, Status> {
        Ok(Response::new(self.next_comparison_for(req.into_inner().job_id).await?))
    }

    async fn submit_preference(&self, req: Request<PreferenceLabel>) -> Result<Response<Ack>, Status> {
        let r = req.into_inner();
        self.label(r.comparison_id, &r.choice, &r.labeler)?;
        Ok(Response::new(Ack {}))
    }

    async fn resume_job(&self, req: Request<JobRef>) -> Result<Response<Ack>, Status> {
        let id = req.into_inner().job_id;
        let log = self.with_store(|s| {
            s.transaction(|s| {
                let Some(job) = s.job(id)? else { return Ok(Err(Status::not_found(format!("job {id} does not exist")))) };
                if job.state != "failed" {
                    return Ok(Err(Status::failed_precondition(format!("job {id} is {}: only a failed job resumes", job.state))));
                }
                let Some(p) = s.phases(id)?.into_iter().find(|p| p.state == "failed") else {
                    return Ok(Err(Status::failed_precondition(format!("job {id} has no failed phase"))));
                };
                s.set_job_state(id, "running", "")?;
                s.set_phase_state(id, p.idx, "running", "")?;
                let p = s.phase(id, p.idx)?.unwrap_or(p);
                let mut log = vec![format!("job {id} resumes phase {} ({}) from step {}", p.idx, p.name, p.last_checkpoint_step)];
                log.extend(scheduler::reform(s, &p, Reason::Start)?);
                Ok(Ok(log))
            })
        })??;
        for line in log {
            info!(target: "liandan::scheduler", "{line}");
        }
        Ok(Response::new(Ack {}))
    }
}

/// The checkpoint a phase starts from: the output of the phase it names (`from_phase`), or the
/// checkpoint its spec names (`init`), or none.
fn phase_input(s: &Store, p: &crate::store::PhaseRow) -> Result<String, StoreError> {
    let Ok(plan) = serde_json::from_str::<PhasePlan>(&p.plan_json) else { return Ok(String::new()) };
    Ok(match plan.from_phase {
        Some(k) => s.phase(p.job_id, k as u32)?.map(|q| q.last_checkpoint).unwrap_or_default(),
        None => plan.init_checkpoint.map(|d| d.display().to_string()).unwrap_or_default(),
    })
}

/// The plan sent to workers, with the checkpoints it needs from other phases filled in: the
/// starting checkpoint (a ppo phase's frozen reference) and a ppo phase's reward model.
fn resolve_plan_inputs(s: &Store, p: &crate::store::PhaseRow) -> Result<String, StoreError> {
    let Ok(mut plan) = serde_json::from_str::<PhasePlan>(&p.plan_json) else { return Ok(p.plan_json.clone()) };
    if plan.init_checkpoint.is_none() && !p.input_checkpoint.is_empty() {
        plan.init_checkpoint = Some(p.input_checkpoint.clone().into());
    }
    if plan.kind == PhaseKind::Reward && plan.comparisons != crate::spec::ComparisonSource::File {
        plan.labelled_examples = Some(export_labelled(s, p)?);
    }
    if let Some(k) = plan.reward_phase {
        let done = s.phase(p.job_id, k as u32)?.map(|q| q.last_checkpoint).unwrap_or_default();
        if !done.is_empty() {
            plan.reward_checkpoint = Some(done.into());
        }
    }
    Ok(serde_json::to_string(&plan).unwrap_or_else(|_| p.plan_json.clone()))
}

/// Writes the comparisons labelled so far (with a winner) to `labelled_comparisons.jsonl` in the
/// phase's checkpoint directory, once: later generations of the phase train on the same set.
fn export_labelled(s: &Store, p: &crate::store::PhaseRow) -> Result<std::path::PathBuf, StoreError> {
    let path = std::path::Path::new(&p.checkpoint_dir).join("labelled_comparisons.jsonl");
    if path.exists() {
        return Ok(path);
    }
    let mut body = String::new();
    for c in s.decided_comparisons()? {
        let n = &c.new;
        let (chosen, rejected) = if c.choice == "a" { (&n.answer_a, &n.answer_b) } else { (&n.answer_b, &n.answer_a) };
        let line = serde_json::json!({
            "prompt": n.prompt, "chosen": chosen, "rejected": rejected, "label_source": "human",
            "task": n.task, "comparison_id": c.id, "labeler": c.labeler, "sampled_from": n.checkpoint,
        });
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&p.checkpoint_dir).map_err(io)?;
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> CoordinatorService {
        CoordinatorService::new(Store::in_memory().unwrap(), CoordinatorConfig::default()).unwrap()
    }

    fn reg(v: u32) -> Request<RegisterRequest> {
        Request::new(RegisterRequest { protocol_version: v, hostname: "h".into(), device: "cpu".into(), ring_address: "127.0.0.1:1".into(), previous_id: 0 })
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_and_nothing_is_stored() {
        let s = svc();
        let e = s.register(reg(PROTOCOL_VERSION + 1)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("protocol version 2 is not supported"), "{}", e.message());
        assert!(s.list_workers(Request::new(ListWorkersRequest {})).await.unwrap().into_inner().workers.is_empty());
        assert!(s.register(reg(PROTOCOL_VERSION)).await.is_ok());
    }

    #[tokio::test]
    async fn unknown_ids_and_stale_or_replayed_reports() {
        let s = svc();
        assert_eq!(s.get_job(Request::new(JobRef { job_id: 7 })).await.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(s.cancel_job(Request::new(JobRef { job_id: 7 })).await.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(s.drain_worker(Request::new(WorkerRef { worker_id: 7 })).await.unwrap_err().code(), tonic::Code::NotFound);
        let hb = s.heartbeat(Request::new(HeartbeatRequest { worker_id: 7, ..Default::default() })).await.unwrap().into_inner();
        assert_eq!(hb.action, Action::Reregister as i32);
        let report = StepReport { job_id: 7, step: 1, ..Default::default() };
        assert_eq!(s.report_step(Request::new(report)).await.unwrap_err().code(), tonic::Code::NotFound);

        // A running phase: a report from another generation is refused, a replay is a no-op.
        let job = s.with_store(|st| st.insert_job("j", "", &[("pretrain".into(), "{}".into(), 10)], 1, 1, "/tmp")).unwrap();
        s.with_store(|st| {
            st.set_job_state(job, "running", "")?;
            st.set_phase_state(job, 0, "running", "")?;
            st.set_phase_group(job, 0, 3, 1, 0)
        })
        .unwrap();
        let r = StepReport { job_id: job, phase_index: 0, generation: 3, step: 1, loss: 2.5, tokens: 10, step_ms: 5, world: 1, ..Default::default() };
        s.report_step(Request::new(r.clone())).await.unwrap();
        s.report_step(Request::new(StepReport { loss: 9.0, ..r.clone() })).await.unwrap();
        let stale = s.report_step(Request::new(StepReport { generation: 2, step: 2, ..r })).await.unwrap_err();
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        let m = s.with_store(|st| st.metrics(job, 0)).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].loss, 2.5, "the replay did not overwrite the first report");
    }

    #[tokio::test]
    async fn a_spec_whose_checkpoint_dir_is_not_writable_is_refused() {
        let s = svc();
        let data = std::env::temp_dir().join(format!("liandan-svc-data-{}", std::process::id()));
        std::fs::create_dir_all(&data).unwrap();
        let manifest = liandan_data::shard::Manifest {
            format: "liandan-shards".into(),
            version: 1,
            tokenizer: "tokenizer.json".into(),
            tokenizer_sha256: String::new(),
            vocab_size: 320,
            dtype: 2,
            eos: 1,
            splits: Default::default(),
        };
        manifest.save(&data).unwrap();
        // A regular file where the checkpoint directory should be.
        let blocker = data.join("not-a-dir");
        std::fs::write(&blocker, "x").unwrap();
        let spec = format!(
            "name = \"x\"\n[model]\npreset = \"nano\"\n[data]\nprepared = \"{}\"\n[checkpoint]\ndir = \"{}/sub\"\n[[phases]]\nname = \"p\"\nkind = \"pretrain\"\nsteps = 1\nglobal_batch = 1\nseq_len = 8\nlr = 0.001\n",
            data.display(),
            blocker.display()
        );
        let e = s.submit_job(Request::new(SubmitJobRequest { spec_toml: spec, source: "job.toml".into() })).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("checkpoint.dir") && e.message().contains("not writable"), "{}", e.message());
        assert!(s.list_jobs(Request::new(ListJobsRequest {})).await.unwrap().into_inner().jobs.is_empty(), "nothing stored");
    }
}
