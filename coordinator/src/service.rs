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
use crate::spec::JobSpec;
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
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

impl CoordinatorService {
    pub fn new(store: Store, config: CoordinatorConfig) -> Result<Self, StoreError> {
        // After a restart, give workers a full lease to reconnect before declaring them dead.
        store.renew_all_leases(config.lease_ms)?;
        Ok(CoordinatorService { store: Arc::new(Mutex::new(store)), config })
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
                });
            }
            Ok(Some(JobStatus { job_id, name: job.name, state: job.state, phases, workers, error: job.error, created_ms: job.created_ms }))
        })?
        .ok_or_else(|| Status::not_found(format!("job {job_id} does not exist")))
    }

    /// Submits a spec; the error names the key (INVALID_ARGUMENT).
    pub fn submit(&self, spec_toml: &str, source: &str) -> Result<u64, Status> {
        let spec = JobSpec::parse(spec_toml, source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plans = spec.plans(source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let manifest = liandan_data::shard::Manifest::load(&spec.data.prepared).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let phases: Vec<(String, String, u64)> = spec
            .phases
            .iter()
            .zip(&plans)
            .map(|(p, plan)| (p.name.clone(), serde_json::to_string(plan).unwrap_or_default(), p.steps))
            .collect();
        let root = spec.checkpoint.dir.display().to_string();
        let id = self.with_store(|s| {
            let train_tokens = manifest.splits.get("train").map_or(0, |t| t.tokens);
            s.register_dataset(&spec.data.prepared.display().to_string(), manifest.vocab_size, train_tokens, &manifest.tokenizer_sha256)?;
            s.insert_job(&spec.name, spec_toml, &phases, spec.cluster.min_workers, spec.cluster.max_workers, &root)
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
            Ok(Some(Assignment {
                assigned: true,
                job_id: p.job_id,
                phase_index: p.idx,
                phase_name: p.name.clone(),
                rank: w.rank,
                world: p.world,
                generation: p.generation,
                peers: group.iter().map(|x| x.ring_address.clone()).collect(),
                phase_json: p.plan_json.clone(),
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
            let m = MetricRow { step: r.step, loss: r.loss, lr: r.lr, grad_norm: r.grad_norm, tokens: r.tokens, step_ms: r.step_ms, world: r.world, generation: r.generation };
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
                            s.set_phase_input(r.job_id, next.idx, &r.final_checkpoint)?;
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
