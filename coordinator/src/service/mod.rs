//! The gRPC service: maps RPCs onto the store and the scheduler, and store errors onto
//! `tonic::Status`. No request data is trusted: unknown ids are NOT_FOUND, stale generations
//! FAILED_PRECONDITION, replays no-ops, sizes past [`crate::limits`] INVALID_ARGUMENT.
//!
//! # Layout
//! - `workers`: the worker calls, each checked against the worker's identity and seat.
//! - `comparisons`: human comparisons (asking for answers, labels, their export).
//! - `sampling`: the queue of answers to sample, taken by idle workers.
//! - here: the service's state, the scheduler loop, job status and the user calls.

mod comparisons;
mod sampling;
mod workers;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use liandan_proto::v1::coordinator_server::Coordinator;
use liandan_proto::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::limits;
use crate::membership::{Membership, Pacing};
use crate::metrics::RpcMetrics;
use crate::scheduler::{self, Reason};
use crate::spec::{JobSpec, PhaseKind, PhasePlan};
use crate::store::{Store, StoreError, now_ms};

/// Timing of membership.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A worker not heard from for this long is dead.
    pub lease_ms: u64,
    /// How often workers heartbeat, at most (a large cluster is asked to heartbeat less often,
    /// see `max_heartbeats_per_s`).
    pub heartbeat_ms: u64,
    /// Most heartbeats per second the coordinator asks of all workers together: past
    /// `max_heartbeats_per_s × heartbeat_ms / 1000` workers the interval grows with their number
    /// (and each lease with it). 0: no limit.
    pub max_heartbeats_per_s: u64,
    /// How often the scheduler runs.
    pub tick_ms: u64,
    /// Dead and drained workers' rows are deleted this long after they were last heard from.
    pub prune_after_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig { lease_ms: 3000, heartbeat_ms: 500, max_heartbeats_per_s: 5000, tick_ms: 200, prune_after_ms: 10 * 60 * 1000 }
    }
}

/// How often dead workers are pruned.
const PRUNE_EVERY_MS: u64 = 60_000;

/// The coordinator's shared state: the store behind a mutex (SQLite calls are short).
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    store: Arc<Mutex<Store>>,
    pub config: CoordinatorConfig,
    /// The prompts comparisons are asked from (read once per SFT file).
    prompts: Arc<comparisons::PromptCache>,
    /// Sampling requests for human comparisons, answered by idle workers.
    sampling: Arc<sampling::Sampling>,
    /// What each committed checkpoint recorded about itself, read once (it never changes).
    evaluations: Arc<Mutex<std::collections::HashMap<String, String>>>,
    /// Worker secrets and leases (in memory; see [`crate::membership`]).
    members: Arc<Membership>,
    /// RPC latencies and refused calls, shared with the gRPC edge and `/metrics`.
    pub(crate) rpc: Arc<RpcMetrics>,
    /// When dead workers were last pruned.
    pruned_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Rank 0's NCCL id per (job, phase), with the generation it belongs to (in memory: a
    /// restarted coordinator re-forms the groups, whose ranks publish again).
    rendezvous: Arc<Mutex<NcclIds>>,
}

/// Rank 0's NCCL id by (job, phase index): `(generation, id)`.
type NcclIds = std::collections::HashMap<(u64, u32), (u64, Vec<u8>)>;

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

impl CoordinatorService {
    pub fn new(store: Store, config: CoordinatorConfig) -> Result<Self, StoreError> {
        let key = worker_key(&store)?;
        let pacing = Pacing { lease_ms: config.lease_ms, heartbeat_ms: config.heartbeat_ms, max_heartbeats_per_s: config.max_heartbeats_per_s };
        let members = Membership::new(key, pacing);
        // After a restart, give workers a full lease to reconnect before declaring them dead.
        members.restore(&store.live_workers()?);
        Ok(CoordinatorService {
            store: Arc::new(Mutex::new(store)),
            config,
            prompts: Arc::default(),
            sampling: Arc::default(),
            evaluations: Arc::default(),
            members: Arc::new(members),
            rpc: Arc::default(),
            pruned_ms: Arc::new(std::sync::atomic::AtomicU64::new(now_ms())),
            rendezvous: Arc::default(),
        })
    }

    /// When worker `w` was last heard from: its lease's last heartbeat, else the stored time.
    pub fn last_heartbeat_ms(&self, w: &crate::store::WorkerRow) -> u64 {
        self.members.last_heartbeat_ms(w.id).unwrap_or(w.last_heartbeat_ms)
    }

    /// Whether the store can still be written (the health check).
    pub fn probe(&self) -> Result<(), StoreError> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).probe()
    }

    pub(crate) fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, Status> {
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(internal)
    }

    /// One scheduler pass (lease expiry, lost members, queued jobs), and now and then the
    /// pruning of long-dead workers.
    pub fn tick(&self) -> Result<(), Status> {
        use std::sync::atomic::Ordering;
        let overdue = self.members.overdue();
        let log = self.with_store(|s| s.transaction(|s| scheduler::tick(s, &overdue)))?;
        // Only once their deaths are stored: a failed pass leaves them to the next one.
        self.members.forget_overdue(&overdue);
        for line in log {
            info!(target: "liandan::scheduler", "{line}");
        }
        let now = now_ms();
        if now.saturating_sub(self.pruned_ms.load(Ordering::Relaxed)) >= PRUNE_EVERY_MS {
            self.pruned_ms.store(now, Ordering::Relaxed);
            let n = self.with_store(|s| s.prune_workers(now.saturating_sub(self.config.prune_after_ms)))?;
            if n > 0 {
                info!(target: "liandan::scheduler", "pruned {n} dead or drained worker(s) not heard from for {} s", self.config.prune_after_ms / 1000);
            }
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
                    workers = s.group_members(job_id, p.idx, p.generation)?.iter().map(|w| w.id).collect();
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
                liandan_plan::checkpoint::eval_files::ALL
                    .iter()
                    .find_map(|f| std::fs::read(std::path::Path::new(dir).join(f)).ok())
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// Submits a spec; the error names the key (INVALID_ARGUMENT).
    ///
    /// Everything a worker would refuse is refused here, before anything is stored: the spec's
    /// keys and bounds, its data files (regular files, every line), checkpoints it names, and
    /// the memory a rank needs against the registered workers' (when any are registered). The
    /// files are read off the async threads.
    pub async fn submit(&self, spec_toml: String, source: String) -> Result<u64, Status> {
        if spec_toml.len() > limits::SPEC_BYTES {
            return Err(Status::invalid_argument(format!("{}: the spec is {} bytes; at most {} are accepted", limits::cut(&source, 256), spec_toml.len(), limits::SPEC_BYTES)));
        }
        limits::text("source", &source, limits::SOURCE_CHARS)?;
        let (toml_text, src) = (spec_toml.clone(), source.clone());
        let (spec, plans, manifest) = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let spec = JobSpec::parse(&toml_text, &src).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let plans = spec.plans(&src).map_err(|e| Status::invalid_argument(e.to_string()))?;
            // A job with a data phase makes its data; the others register the data they train on.
            let manifest = match spec.data_settings() {
                Some(_) => None,
                None => Some(liandan_data::shard::Manifest::load(&spec.data.prepared).map_err(|e| Status::invalid_argument(e.to_string()))?),
            };
            Ok((spec, plans, manifest))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        self.check_fits(&source, &spec, &plans)?;
        let (spec_toml, source) = (spec_toml.as_str(), source.as_str());
        let phases: Vec<(String, String, u64)> =
            spec.phases.iter().zip(&plans).map(|(p, plan)| (p.name.clone(), serde_json::to_string(plan).unwrap_or_default(), plan.steps)).collect();
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

    /// Refuses a job none of whose phases' ranks fits any registered live worker's memory
    /// (workers that report none are taken at their word; with no workers yet, the job waits
    /// and the scheduler assigns only workers that fit).
    fn check_fits(&self, source: &str, spec: &JobSpec, plans: &[PhasePlan]) -> Result<(), Status> {
        let memories: Vec<u64> = self.with_store(|s| Ok(s.workers()?.into_iter().filter(|w| !matches!(w.state.as_str(), "dead" | "drained")).map(|w| w.memory_bytes).collect()))?;
        if memories.is_empty() || memories.contains(&0) {
            return Ok(());
        }
        let best = memories.iter().copied().max().unwrap_or(0);
        for (i, plan) in plans.iter().enumerate() {
            // `plans` refused plans whose estimate overflows.
            let need = plan.memory_per_rank(spec.cluster.min_workers as usize).unwrap_or_default();
            if need.total() > best {
                use liandan_plan::memory::show_bytes;
                return Err(Status::invalid_argument(format!(
                    "{source}: phases[{i}]: a rank needs {} (weights {}, gradients {}, optimizer {}, activations {} at {} sequences of {}), and the largest registered worker has {}; lower global_batch or seq_len, raise cluster.min_workers, or use a smaller model",
                    show_bytes(need.total()),
                    show_bytes(need.weights),
                    show_bytes(need.gradients),
                    show_bytes(need.optimizer),
                    show_bytes(need.activations),
                    plan.global_batch.div_ceil(spec.cluster.min_workers.max(1) as usize),
                    plan.seq_len,
                    show_bytes(best)
                )));
            }
        }
        Ok(())
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        Ok(Response::new(self.admit_worker(req.into_inner())?))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        Ok(Response::new(self.heartbeat_action(req.into_inner())?))
    }

    async fn next_assignment(&self, req: Request<AssignmentRequest>) -> Result<Response<Assignment>, Status> {
        Ok(Response::new(self.assignment_for(req.into_inner())?))
    }

    async fn report_step(&self, req: Request<StepReport>) -> Result<Response<Ack>, Status> {
        self.record_step(req.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(&self, req: Request<CheckpointInfo>) -> Result<Response<CommitReply>, Status> {
        Ok(Response::new(self.commit(req.into_inner()).await?))
    }

    async fn finish_assignment(&self, req: Request<AssignmentResult>) -> Result<Response<Ack>, Status> {
        self.finish(req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn publish_rendezvous(&self, req: Request<Rendezvous>) -> Result<Response<Ack>, Status> {
        self.post_nccl_id(req.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn fetch_rendezvous(&self, req: Request<Rendezvous>) -> Result<Response<Rendezvous>, Status> {
        Ok(Response::new(self.nccl_id_for(req.into_inner())?))
    }

    async fn submit_samples(&self, req: Request<SampleResult>) -> Result<Response<Ack>, Status> {
        self.samples(req.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<SubmitJobReply>, Status> {
        let r = req.into_inner();
        let source = if r.source.is_empty() { "job spec".to_string() } else { r.source };
        let job_id = self.submit(r.spec_toml, source).await?;
        Ok(Response::new(SubmitJobReply { job_id }))
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        Ok(Response::new(self.job_status(req.into_inner().job_id)?))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        let r = req.into_inner();
        let (before, size) = (limits::page_token(&r.page_token)?, limits::page(r.page_size, limits::JOBS_PAGE));
        // One more than the page tells whether another page follows.
        let ids: Vec<u64> = self.with_store(|s| Ok(s.jobs_page(before, size + 1)?.into_iter().map(|j| j.id).collect()))?;
        let next_page_token = if ids.len() > size { ids[size - 1].to_string() } else { String::new() };
        let jobs = ids.into_iter().take(size).map(|id| self.job_status(id)).collect::<Result<_, _>>()?;
        Ok(Response::new(ListJobsReply { jobs, next_page_token }))
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

    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersReply>, Status> {
        let r = req.into_inner();
        let (after, size) = (limits::page_token(&r.page_token)?, limits::page(r.page_size, limits::WORKERS_PAGE));
        let now = now_ms();
        let mut rows = self.with_store(|s| s.workers_page(after, size + 1))?;
        let next_page_token = if rows.len() > size { rows[size - 1].id.to_string() } else { String::new() };
        rows.truncate(size);
        let workers = rows
            .into_iter()
            .map(|w| WorkerInfo {
                worker_id: w.id,
                heartbeat_age_ms: now.saturating_sub(self.last_heartbeat_ms(&w)),
                hostname: w.hostname,
                device: w.device,
                ring_address: w.ring_address,
                state: w.state,
                job_id: w.job_id,
                rank: w.rank,
                generation: w.generation,
                memory_bytes: w.memory_bytes,
            })
            .collect();
        Ok(Response::new(ListWorkersReply { workers, next_page_token }))
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

/// The store's worker key (made on first use): worker secrets are derived from it.
fn worker_key(s: &Store) -> Result<[u8; 32], StoreError> {
    const KEY: &str = "worker_key";
    if let Some(hex) = s.meta(KEY)?
        && let Some(k) = liandan_proto::auth::unhex(&hex).and_then(|b| <[u8; 32]>::try_from(b).ok())
    {
        return Ok(k);
    }
    let k = liandan_proto::auth::random_bytes::<32>().map_err(|e| StoreError::Io(e.to_string()))?;
    s.set_meta(KEY, &liandan_proto::auth::hex(&k))?;
    Ok(k)
}

/// The checkpoint a phase starts from: the output of the phase it names (`from_phase`), or the
/// checkpoint its spec names (`init`), or none.
pub(super) fn phase_input(s: &Store, p: &crate::store::PhaseRow) -> Result<String, StoreError> {
    let Ok(plan) = serde_json::from_str::<PhasePlan>(&p.plan_json) else { return Ok(String::new()) };
    Ok(match plan.from_phase {
        Some(k) => s.phase(p.job_id, k as u32)?.map(|q| q.last_checkpoint).unwrap_or_default(),
        None => plan.init_checkpoint.map(|d| d.display().to_string()).unwrap_or_default(),
    })
}

/// The plan sent to workers, with the checkpoints it needs from other phases filled in: the
/// starting checkpoint (a ppo or grpo phase's frozen reference), a ppo or grpo phase's reward
/// model, and the labelled comparisons of a reward or dpo phase.
pub(super) fn resolve_plan_inputs(s: &Store, p: &crate::store::PhaseRow) -> Result<String, StoreError> {
    let Ok(mut plan) = serde_json::from_str::<PhasePlan>(&p.plan_json) else { return Ok(p.plan_json.clone()) };
    if plan.init_checkpoint.is_none() && !p.input_checkpoint.is_empty() {
        plan.init_checkpoint = Some(p.input_checkpoint.clone().into());
    }
    if matches!(plan.kind, PhaseKind::Reward | PhaseKind::Dpo) && plan.comparisons != crate::spec::ComparisonSource::File {
        plan.labelled_examples = Some(comparisons::export_labelled(s, p)?);
    }
    if let Some(k) = plan.reward_phase {
        let done = s.phase(p.job_id, k as u32)?.map(|q| q.last_checkpoint).unwrap_or_default();
        if !done.is_empty() {
            plan.reward_checkpoint = Some(done.into());
        }
    }
    Ok(serde_json::to_string(&plan).unwrap_or_else(|_| p.plan_json.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use liandan_proto::PROTOCOL_VERSION;

    fn svc() -> CoordinatorService {
        CoordinatorService::new(Store::in_memory().unwrap(), CoordinatorConfig::default()).unwrap()
    }

    fn reg(v: u32, instance: &str) -> Request<RegisterRequest> {
        Request::new(RegisterRequest {
            protocol_version: v,
            hostname: "h".into(),
            device: "cpu".into(),
            ring_address: "127.0.0.1:1".into(),
            instance: instance.into(),
            memory_bytes: 0,
        })
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// A running one-phase job at generation 3 with worker `instance` as its rank 0.
    async fn seated(s: &CoordinatorService, instance: &str) -> (u64, RegisterReply) {
        let me = s.register(reg(PROTOCOL_VERSION, instance)).await.unwrap().into_inner();
        let job = s.with_store(|st| st.insert_job("j", "", &[("pretrain".into(), "{}".into(), 10)], 1, 1, "/tmp")).unwrap();
        s.with_store(|st| {
            st.set_job_state(job, "running", "")?;
            st.set_phase_state(job, 0, "running", "")?;
            st.set_phase_group(job, 0, 3, 1, 0, "00")?;
            st.assign_worker(me.worker_id, job, 0, 0, 3)
        })
        .unwrap();
        (job, me)
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_and_nothing_is_stored() {
        let s = svc();
        let e = s.register(reg(PROTOCOL_VERSION + 1, A)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("protocol version 5 is not supported"), "{}", e.message());
        assert!(s.list_workers(Request::new(ListWorkersRequest::default())).await.unwrap().into_inner().workers.is_empty());
        assert!(s.register(reg(PROTOCOL_VERSION, A)).await.is_ok());
        let e = s.register(reg(PROTOCOL_VERSION, "short")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "an instance id must be random hex");
    }

    #[tokio::test]
    async fn a_retried_register_is_the_same_worker() {
        let s = svc();
        let first = s.register(reg(PROTOCOL_VERSION, A)).await.unwrap().into_inner();
        let again = s.register(reg(PROTOCOL_VERSION, A)).await.unwrap().into_inner();
        assert_eq!((again.worker_id, &again.worker_secret), (first.worker_id, &first.worker_secret));
        let other = s.register(reg(PROTOCOL_VERSION, B)).await.unwrap().into_inner();
        assert_ne!(other.worker_secret, first.worker_secret);
        assert_eq!(s.list_workers(Request::new(ListWorkersRequest::default())).await.unwrap().into_inner().workers.len(), 2);
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
        assert_eq!(s.report_step(Request::new(report)).await.unwrap_err().code(), tonic::Code::PermissionDenied, "no credential");

        // A member's report lands once; a replay is a no-op; another generation's is refused.
        let (job, me) = seated(&s, A).await;
        let r = StepReport {
            worker_id: me.worker_id,
            worker_secret: me.worker_secret.clone(),
            job_id: job,
            phase_index: 0,
            generation: 3,
            step: 1,
            loss: 2.5,
            tokens: 10,
            step_ms: 5,
            world: 1,
            ..Default::default()
        };
        s.report_step(Request::new(r.clone())).await.unwrap();
        s.report_step(Request::new(StepReport { loss: 9.0, ..r.clone() })).await.unwrap();
        let stale = s.report_step(Request::new(StepReport { generation: 2, step: 2, ..r })).await.unwrap_err();
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        let m = s.with_store(|st| st.metrics(job, 0)).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].loss, 2.5, "the replay did not overwrite the first report");
    }

    #[tokio::test]
    async fn only_the_member_moves_a_job() {
        let s = svc();
        let (job, me) = seated(&s, A).await;
        let stranger = s.register(reg(PROTOCOL_VERSION, B)).await.unwrap().into_inner();
        let report = |id: u64, secret: &[u8], rank: u32| StepReport {
            worker_id: id,
            worker_secret: secret.to_vec(),
            rank,
            job_id: job,
            phase_index: 0,
            generation: 3,
            step: 1,
            loss: 1.0,
            ..Default::default()
        };
        let finish = |id: u64, secret: &[u8], rank: u32| AssignmentResult {
            worker_id: id,
            worker_secret: secret.to_vec(),
            rank,
            job_id: job,
            phase_index: 0,
            generation: 3,
            ok: false,
            error: "ended by a stranger".into(),
            final_checkpoint: String::new(),
        };
        let commit = |id: u64, secret: &[u8], rank: u32| CheckpointInfo {
            worker_id: id,
            worker_secret: secret.to_vec(),
            rank,
            job_id: job,
            phase_index: 0,
            generation: 3,
            step: 1,
            path: "/tmp".into(),
        };
        let cases: [(&str, u64, Vec<u8>, u32); 4] = [
            ("a registered non-member", stranger.worker_id, stranger.worker_secret.clone(), 0),
            ("the member's id with another worker's secret", me.worker_id, stranger.worker_secret.clone(), 0),
            ("the member's id with no secret", me.worker_id, Vec::new(), 0),
            ("the member with a forged rank", me.worker_id, me.worker_secret.clone(), 1),
        ];
        for (what, id, secret, rank) in &cases {
            let e = s.report_step(Request::new(report(*id, secret, *rank))).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "ReportStep from {what}: {}", e.message());
            let e = s.finish_assignment(Request::new(finish(*id, secret, *rank))).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "FinishAssignment from {what}: {}", e.message());
            let e = s.commit_checkpoint(Request::new(commit(*id, secret, *rank))).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "CommitCheckpoint from {what}: {}", e.message());
        }
        let status = s.job_status(job).unwrap();
        assert_eq!((status.state.as_str(), status.phases[0].step), ("running", 0), "nothing moved");
        assert!(s.with_store(|st| st.metrics(job, 0)).unwrap().is_empty());
        assert!(crate::metrics::render(&s, &s.rpc).unwrap().contains("liandan_rpc_refused_total{method=\"FinishAssignment\",code=\"PermissionDenied\"} 4"));
        // The member itself may end the job.
        s.finish_assignment(Request::new(finish(me.worker_id, &me.worker_secret, 0))).await.unwrap();
        assert_eq!(s.job_status(job).unwrap().state, "failed");
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
        assert!(s.list_jobs(Request::new(ListJobsRequest::default())).await.unwrap().into_inner().jobs.is_empty(), "nothing stored");
    }
}
