//! The worker process: register → heartbeat → assignment → run the phase → report, with retries
//! and backoff on every RPC, and an abort flag that the heartbeat raises when the coordinator
//! moves the group to a new generation (a member died, a worker joins or drains, the job is
//! cancelled).
//!
//! The phase itself runs on a blocking thread; it reports steps and commits checkpoints through
//! this runtime's gRPC client (`Handle::block_on`), and all-reduces over a [`TcpRing`] connected
//! for its generation.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use liandan_proto::PROTOCOL_VERSION;
use liandan_proto::auth::{Client, TlsFiles, TokenSource};
use liandan_proto::v1::*;
use tracing::{error, info, warn};

use crate::collective::{Collective, Local, RingListener, RingOptions, TcpRing};
use crate::phase::{PhaseEvents, PhaseOutcome, StepMetrics};
use crate::phase::{PhaseIo, Start};
use crate::plan::PhasePlan;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `http://host:port` of the coordinator.
    pub coordinator: String,
    /// Host (or IP) the ring listener binds and advertises.
    pub ring_host: String,
    /// Give up after this many failed attempts to reach the coordinator in a row (None: never).
    pub max_attempts: Option<u32>,
    /// The worker token sent with every call (None: send none; a coordinator with tokens then
    /// refuses the worker at registration).
    pub token: Option<TokenSource>,
    /// TLS files (the cluster CA to verify the coordinator; a certificate and key for mutual TLS).
    pub tls: TlsFiles,
    /// Memory a phase may use here, bytes (None: the device's: the host's available memory,
    /// or the GPU's memory).
    pub memory_bytes: Option<u64>,
    /// The device to train on: auto, cpu, cuda, cuda:N, cuda-emu ([`crate::engine::open`]).
    pub device: String,
    /// CUDA matmul precision.
    pub precision: crate::backend::cuda::Precision,
    /// How a CUDA worker's group sums gradients: `nccl` (default on a GPU) or `ring` (the TCP
    /// ring: two processes sharing one GPU, or the emulated device). CPU workers use the ring.
    pub collective: Option<String>,
}

/// What this worker trains with.
#[derive(Debug, Clone)]
struct Node {
    opened: crate::engine::Opened,
    /// Memory a phase may use, bytes.
    memory: u64,
    /// Whether groups of more than one rank use NCCL (else the TCP ring).
    nccl: bool,
}

/// Errors that end the worker process.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("coordinator {addr}: {reason}")]
    Coordinator { addr: String, reason: String },
    #[error("coordinator at {addr} not reachable after {attempts} attempts: {last}")]
    Unreachable { addr: String, attempts: u32, last: String },
    #[error("ring listener: {0}")]
    Ring(String),
    #[error("{0}")]
    Device(String),
}

/// What the worker is doing, shared with the heartbeat task.
#[derive(Debug, Default)]
struct Current {
    job: AtomicU64,
    generation: AtomicU64,
    step: AtomicU64,
}

/// Who this worker is to the coordinator: its id and the secret issued at Register, replaced
/// when it registers again.
#[derive(Debug, Clone, Default)]
struct Credential {
    id: u64,
    secret: Vec<u8>,
}

#[derive(Debug, Default)]
struct Identity(std::sync::RwLock<Credential>);

impl Identity {
    fn get(&self) -> Credential {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, r: &RegisterReply) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Credential { id: r.worker_id, secret: r.worker_secret.clone() };
    }
}

/// The host's available memory (`MemAvailable` of /proc/meminfo), bytes; 0 when unknown.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|v| v.trim().strip_suffix("kB")).and_then(|v| v.trim().parse::<u64>().ok())))
        .map_or(0, |kb| kb * 1024)
}

/// Backoff between retries: 200 ms doubling up to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5000))
}

/// Runs until drained, or until the coordinator cannot be reached for `max_attempts` tries.
pub async fn run_worker(opts: WorkerOptions) -> Result<(), RuntimeError> {
    let listener = TcpRing::listen(&format!("{}:0", opts.ring_host)).map_err(|e| RuntimeError::Ring(e.to_string()))?;
    let ring_address = listener.local_addr().to_string();
    let endpoint = liandan_proto::auth::endpoint(&opts.coordinator, &opts.tls)
        .map_err(|e| RuntimeError::Coordinator { addr: opts.coordinator.clone(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    let client = liandan_proto::auth::client(endpoint.connect_lazy(), opts.token.clone());
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    // This process's identity to the coordinator: a retried Register with the same instance is
    // the same worker.
    let instance = liandan_proto::auth::random_bytes::<16>().map(|b| liandan_proto::auth::hex(&b)).map_err(|e| RuntimeError::Ring(e.to_string()))?;
    let opened = crate::engine::open(&opts.device, opts.precision).map_err(RuntimeError::Device)?;
    let nccl = match (opts.collective.as_deref(), &opened.cuda) {
        (None | Some("nccl"), Some(dev)) => dev.cuda_stream().is_some(),
        (Some("nccl"), None) => return Err(RuntimeError::Device(format!("--collective nccl needs a CUDA device; this worker trains on {}", opened.label))),
        (None | Some("ring"), _) => false,
        (Some(other), _) => return Err(RuntimeError::Device(format!("--collective {other}: not a collective (nccl, ring)"))),
    };
    if opts.collective.as_deref() == Some("nccl") && !nccl {
        return Err(RuntimeError::Device(format!("--collective nccl needs a GPU; {} has none (use --collective ring)", opened.label)));
    }
    let memory_bytes = opts.memory_bytes.unwrap_or(opened.memory);
    let register = RegisterRequest { protocol_version: PROTOCOL_VERSION, hostname, device: opened.label.clone(), ring_address: ring_address.clone(), instance, memory_bytes };
    let node = Arc::new(Node { opened, memory: memory_bytes, nccl });
    let reply = register_with_retry(&client, &register, &opts).await?;
    let identity = Arc::new(Identity::default());
    identity.set(&reply);
    info!(worker = reply.worker_id, device = %node.opened.label, collective = if node.nccl { "nccl" } else { "ring" }, ring = %ring_address, memory = %crate::model::memory::show_bytes(memory_bytes), "registered with {}", opts.coordinator);

    let current = Arc::new(Current::default());
    let abort = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(AtomicBool::new(false));
    {
        let (client, current, abort, drain, identity) = (client.clone(), current.clone(), abort.clone(), drain.clone(), identity.clone());
        let (register, opts2) = (register.clone(), opts.clone());
        // The coordinator paces heartbeats: each reply may change the interval.
        let mut every = Duration::from_millis(reply.heartbeat_ms.max(50));
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            loop {
                tokio::time::sleep_until(next).await;
                // A late heartbeat is not followed by a burst of catching up.
                next = (next + every).max(tokio::time::Instant::now());
                let me = identity.get();
                let req = HeartbeatRequest {
                    worker_id: me.id,
                    worker_secret: me.secret,
                    job_id: current.job.load(Ordering::SeqCst),
                    generation: current.generation.load(Ordering::SeqCst),
                    step: current.step.load(Ordering::SeqCst),
                };
                match client.clone().heartbeat(req).await {
                    Ok(r) => match Action::try_from(paced(r.into_inner(), &mut every)).unwrap_or(Action::Continue) {
                        Action::Continue => {}
                        Action::Abort => {
                            if !abort.swap(true, Ordering::SeqCst) {
                                warn!("coordinator: generation {} is over, aborting the assignment", current.generation.load(Ordering::SeqCst));
                            }
                        }
                        Action::Drain => {
                            drain.store(true, Ordering::SeqCst);
                            abort.store(true, Ordering::SeqCst);
                        }
                        Action::Reregister => {
                            if let Ok(r) = register_with_retry(&client, &register, &opts2).await {
                                every = Duration::from_millis(r.heartbeat_ms.max(50));
                                identity.set(&r);
                                abort.store(true, Ordering::SeqCst);
                                warn!("re-registered as worker {}", r.worker_id);
                            }
                        }
                    },
                    Err(e) => warn!("heartbeat failed: {}", e.message()),
                }
            }
        });
    }

    let listener = Arc::new(listener);
    let sampler: Arc<SamplerCache> = Arc::default();
    let mut failures = 0u32;
    // Broken groups per (job, generation): a generation that breaks this often without the
    // coordinator replacing it is reported as a failure instead of retried forever.
    let mut broken: (u64, u64, u32) = (0, 0, 0);
    loop {
        if drain.load(Ordering::SeqCst) {
            info!("drained: leaving");
            return Ok(());
        }
        let me = identity.get();
        let id = me.id;
        let a = match client.clone().next_assignment(AssignmentRequest { worker_id: id, worker_secret: me.secret.clone() }).await {
            Ok(a) => {
                failures = 0;
                a.into_inner()
            }
            Err(e) => {
                failures += 1;
                if opts.max_attempts.is_some_and(|m| failures >= m) {
                    return Err(RuntimeError::Unreachable { addr: opts.coordinator.clone(), attempts: failures, last: e.message().to_string() });
                }
                warn!("next assignment: {} (retry {failures} in {:?})", e.message(), backoff(failures));
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        if !a.assigned {
            match a.sample {
                Some(req) => {
                    let cache = sampler.clone();
                    let id = req.request_id;
                    let answers = tokio::task::spawn_blocking(move || sample_answers(&cache, &req)).await.unwrap_or_else(|e| Err(format!("the sampling thread panicked: {e}")));
                    let (answers, error) = match answers {
                        Ok(a) => (a, String::new()),
                        Err(e) => (Vec::new(), e),
                    };
                    let res = SampleResult { worker_id: me.id, worker_secret: me.secret.clone(), request_id: id, answers, error };
                    if let Err(e) = client.clone().submit_samples(res).await {
                        warn!("sampled answers not delivered: {}", e.message());
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(250)).await,
            }
            continue;
        }
        abort.store(false, Ordering::SeqCst);
        current.job.store(a.job_id, Ordering::SeqCst);
        current.generation.store(a.generation, Ordering::SeqCst);
        current.step.store(0, Ordering::SeqCst);
        // Every line logged while this assignment runs (on the phase thread, or here about it)
        // carries job, phase, rank and generation.
        let span = tracing::info_span!("phase", job = a.job_id, phase = %a.phase_name, rank = a.rank, generation = a.generation);
        info!(parent: &span, world = a.world, peers = a.peers.len(), "assignment");
        let handle = tokio::runtime::Handle::current();
        let (client2, abort2, listener2, current2, a2, span2, me2, node2) =
            (client.clone(), abort.clone(), listener.clone(), current.clone(), a.clone(), span.clone(), me.clone(), node.clone());
        let result = tokio::task::spawn_blocking(move || span2.in_scope(|| run_assignment(&handle, &node2, client2, me2, &a2, &listener2, abort2, &current2)))
            .await
            .unwrap_or_else(|e| Err(format!("the phase thread panicked: {e}")));
        current.job.store(0, Ordering::SeqCst);
        current.generation.store(0, Ordering::SeqCst);
        let (ok, error, final_checkpoint) = match result {
            Ok(PhaseOutcome::Finished { final_checkpoint }) => (true, String::new(), final_checkpoint.map(|p| p.display().to_string()).unwrap_or_default()),
            Ok(PhaseOutcome::Regroup) | Ok(PhaseOutcome::Aborted) => {
                info!(parent: &span, "assignment ended by a regroup");
                continue;
            }
            Ok(PhaseOutcome::GroupBroken { reason }) => {
                broken = if (broken.0, broken.1) == (a.job_id, a.generation) { (a.job_id, a.generation, broken.2 + 1) } else { (a.job_id, a.generation, 1) };
                if broken.2 < 5 {
                    warn!(parent: &span, "group broken ({reason}); waiting for the coordinator to re-form it");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                (false, format!("generation {} broke {} times without being replaced: {reason}", a.generation, broken.2), String::new())
            }
            Err(e) => {
                error!(parent: &span, "phase failed: {e}");
                (false, e, String::new())
            }
        };
        let res = AssignmentResult {
            worker_id: id,
            worker_secret: me.secret.clone(),
            rank: a.rank,
            job_id: a.job_id,
            phase_index: a.phase_index,
            generation: a.generation,
            ok,
            error,
            final_checkpoint,
        };
        for attempt in 0..10 {
            match client.clone().finish_assignment(res.clone()).await {
                Ok(_) => {
                    info!(parent: &span, ok, "assignment finished");
                    break;
                }
                Err(e) => {
                    warn!(parent: &span, "finish assignment: {} (retry {attempt})", e.message());
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }
}

/// The reply's action; takes up the interval the coordinator asks for (it grows with the cluster).
fn paced(reply: liandan_proto::v1::HeartbeatReply, every: &mut Duration) -> i32 {
    if reply.heartbeat_ms > 0 {
        *every = Duration::from_millis(reply.heartbeat_ms.max(50));
    }
    reply.action
}

async fn register_with_retry(client: &Client, req: &RegisterRequest, opts: &WorkerOptions) -> Result<RegisterReply, RuntimeError> {
    let mut attempt = 0u32;
    loop {
        match client.clone().register(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            // Retrying cannot fix a refused token or another protocol version.
            Err(e) if matches!(e.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                return Err(RuntimeError::Coordinator { addr: opts.coordinator.clone(), reason: e.message().to_string() });
            }
            Err(e) => {
                attempt += 1;
                let reason = if e.code() == tonic::Code::Unavailable { format!("not reachable ({})", e.message()) } else { e.message().to_string() };
                if opts.max_attempts.is_some_and(|m| attempt >= m) {
                    return Err(RuntimeError::Unreachable { addr: opts.coordinator.clone(), attempts: attempt, last: reason });
                }
                let wait = backoff(attempt);
                warn!("coordinator {}: {reason}; retry {attempt} in {} ms", opts.coordinator, wait.as_millis());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Reports steps and commits checkpoints through the coordinator, from the phase thread.
struct Reporter<'a> {
    handle: &'a tokio::runtime::Handle,
    client: Client,
    me: Credential,
    a: &'a Assignment,
    current: &'a Current,
}

impl PhaseEvents for Reporter<'_> {
    fn step(&mut self, m: StepMetrics) {
        self.current.step.store(m.step, Ordering::SeqCst);
        let req = StepReport {
            worker_id: self.me.id,
            worker_secret: self.me.secret.clone(),
            rank: self.a.rank,
            job_id: self.a.job_id,
            phase_index: self.a.phase_index,
            generation: self.a.generation,
            step: m.step,
            loss: m.loss,
            lr: m.lr as f64,
            grad_norm: m.grad_norm as f64,
            tokens: m.tokens,
            step_ms: m.step_ms,
            world: self.a.world,
            values: m.values.into_iter().collect(),
            samples: m
                .samples
                .into_iter()
                .map(|x| liandan_proto::v1::RolloutSample {
                    prompt: x.prompt,
                    answer: x.answer,
                    reward: x.reward,
                    rm_score: x.rm_score,
                    verified: x.verifier.is_some(),
                    verifier_score: x.verifier.map_or(0.0, |v| v.0),
                    verifier_pass: x.verifier.is_some_and(|v| v.1),
                    kl: x.kl,
                })
                .collect(),
        };
        // Metrics are best effort: a coordinator that is down for a moment must not stop training.
        if let Err(e) = self.handle.block_on(self.client.clone().report_step(req)) {
            warn!(step = m.step, "step report not delivered: {}", e.message());
        }
    }

    fn checkpoint(&mut self, step: u64, path: &std::path::Path) -> Result<bool, String> {
        let req = CheckpointInfo {
            worker_id: self.me.id,
            worker_secret: self.me.secret.clone(),
            rank: self.a.rank,
            job_id: self.a.job_id,
            phase_index: self.a.phase_index,
            generation: self.a.generation,
            step,
            path: path.display().to_string(),
        };
        // The commit must land (it is the resume point): retry for up to a minute.
        let mut last = String::new();
        for attempt in 0..20 {
            match self.handle.block_on(self.client.clone().commit_checkpoint(req.clone())) {
                Ok(r) => {
                    let regroup = r.into_inner().regroup;
                    info!(step, regroup, path = %path.display(), "checkpoint committed");
                    return Ok(regroup);
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition => return Ok(true),
                Err(e) => {
                    last = e.message().to_string();
                    std::thread::sleep(backoff(attempt));
                }
            }
        }
        Err(format!("checkpoint {} not committed: {last}", path.display()))
    }
}

fn run_assignment(
    handle: &tokio::runtime::Handle,
    node: &Node,
    client: Client,
    me: Credential,
    a: &Assignment,
    listener: &RingListener,
    abort: Arc<AtomicBool>,
    current: &Current,
) -> Result<PhaseOutcome, String> {
    let plan: PhasePlan = serde_json::from_str(&a.phase_json).map_err(|e| format!("bad phase plan from the coordinator: {e}"))?;
    // Refuse what cannot fit before allocating anything: a clear failure, and this worker lives on.
    let need = plan.memory_per_rank(a.world as usize).ok_or_else(|| "the phase's model and batch sizes overflow any memory".to_string())?;
    let memory_bytes = node.memory;
    if memory_bytes != 0 && need.total() > memory_bytes {
        use crate::model::memory::show_bytes;
        return Err(format!(
            "the phase needs {} per rank (weights {}, gradients {}, optimizer {}, activations {}) and this worker has {}",
            show_bytes(need.total()),
            show_bytes(need.weights),
            show_bytes(need.gradients),
            show_bytes(need.optimizer),
            show_bytes(need.activations),
            show_bytes(memory_bytes)
        ));
    }
    let mut coll: Box<dyn Collective> = if a.world <= 1 {
        Box::new(Local)
    } else if let (true, Some(dev)) = (node.nccl, &node.opened.cuda) {
        match nccl_group(handle, &client, &me, a, dev.clone(), abort.clone()) {
            Ok(n) => Box::new(n),
            Err(e) if abort.load(Ordering::SeqCst) => {
                info!("NCCL group not formed, generation over: {e}");
                return Ok(PhaseOutcome::Aborted);
            }
            Err(e) => return Ok(PhaseOutcome::GroupBroken { reason: format!("NCCL: {e}") }),
        }
    } else {
        if a.ring_secret.len() < 16 {
            return Err("the assignment has no ring key: a coordinator of another version?".into());
        }
        let opts = RingOptions { abort: Some(abort.clone()), key: a.ring_secret.clone(), ..Default::default() };
        match TcpRing::connect(listener, a.rank as usize, &a.peers, a.generation, opts) {
            Ok(r) => Box::new(r),
            Err(e) if abort.load(Ordering::SeqCst) => {
                info!("ring not formed, generation over: {e}");
                return Ok(PhaseOutcome::Aborted);
            }
            Err(e) => return Err(format!("ring: {e}")),
        }
    };
    // Where the phase starts, as the coordinator says: its own last checkpoint, its input (the
    // phase it follows or the checkpoint its spec names), or fresh.
    let resume = PathBuf::from(&a.resume_checkpoint);
    let start = match liandan_proto::v1::Start::try_from(a.start) {
        Ok(liandan_proto::v1::Start::Continue) if !a.resume_checkpoint.is_empty() => Start::Continue(&resume),
        Ok(liandan_proto::v1::Start::FromInput) if !a.resume_checkpoint.is_empty() => Start::From(&resume),
        Ok(liandan_proto::v1::Start::Fresh) => Start::Fresh,
        _ => return Err(format!("the assignment's start ({}) does not fit its checkpoint '{}': a coordinator of another version?", a.start, a.resume_checkpoint)),
    };
    let mut reporter = Reporter { handle, client, me, a, current };
    let dir = PathBuf::from(&a.checkpoint_dir);
    let io = PhaseIo { checkpoint_dir: &dir, engine: node.opened.engine.as_ref(), coll: coll.as_mut(), abort: &abort, events: &mut reporter };
    crate::phase::entry(plan.kind)(&plan, start, io).map_err(|e| e.to_string())
}

/// Longest a rank waits for rank 0's NCCL id.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);

/// An NCCL communicator for the assignment's generation: rank 0 publishes its unique id through
/// the coordinator, the others poll for it (until it comes, the generation ends or
/// [`RENDEZVOUS_TIMEOUT`] passes); initialisation itself does not block (see [`Nccl::connect`]).
fn nccl_group(
    handle: &tokio::runtime::Handle,
    client: &Client,
    me: &Credential,
    a: &Assignment,
    dev: Arc<crate::backend::cuda::CudaDevice>,
    abort: Arc<AtomicBool>,
) -> Result<crate::collective::Nccl, String> {
    use crate::collective::{Nccl, NcclOptions};
    let seat = Rendezvous {
        worker_id: me.id,
        worker_secret: me.secret.clone(),
        job_id: a.job_id,
        phase_index: a.phase_index,
        generation: a.generation,
        rank: a.rank,
        nccl_id: Vec::new(),
    };
    let rendezvous = |id: Option<&[u8]>| -> Result<Vec<u8>, String> {
        if let Some(id) = id {
            handle.block_on(client.clone().publish_rendezvous(Rendezvous { nccl_id: id.to_vec(), ..seat.clone() })).map_err(|e| e.message().to_string())?;
            return Ok(id.to_vec());
        }
        let start = std::time::Instant::now();
        loop {
            match handle.block_on(client.clone().fetch_rendezvous(seat.clone())) {
                Ok(r) => return Ok(r.into_inner().nccl_id),
                Err(e) if e.code() == tonic::Code::Unavailable => {}
                Err(e) => return Err(e.message().to_string()),
            }
            if abort.load(Ordering::SeqCst) {
                return Err(format!("generation {} ended before rank 0 published its NCCL id", a.generation));
            }
            if start.elapsed() > RENDEZVOUS_TIMEOUT {
                return Err(format!("rank 0 did not publish its NCCL id within {} s", RENDEZVOUS_TIMEOUT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let opts = NcclOptions { abort: Some(abort.clone()), ..Default::default() };
    Nccl::connect(dev, a.rank as usize, a.world as usize, a.generation, opts, rendezvous).map_err(|e| e.to_string())
}

/// The chat model answers for human comparisons come from, loaded once per checkpoint.
type SamplerCache = std::sync::Mutex<Option<(String, Box<dyn crate::engine::Model>, liandan_data::tokenizer::ChatTokenizer)>>;

/// One answer per seed of `req`, sampled from its checkpoint with the chat template (on the CPU:
/// two short answers, whatever device this worker trains on).
fn sample_answers(cache: &SamplerCache, req: &SampleRequest) -> Result<Vec<String>, String> {
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    if guard.as_ref().is_none_or(|(c, _, _)| *c != req.checkpoint) {
        let (model, tk) = crate::eval::load_chat_model(std::path::Path::new(&req.checkpoint))?;
        *guard = Some((req.checkpoint.clone(), model, tk));
    }
    let Some((_, model, tk)) = guard.as_ref() else { return Err("no model loaded".into()) };
    req.seeds
        .iter()
        .map(|&seed| {
            let cfg = crate::generate::SamplingConfig {
                max_new_tokens: req.max_new_tokens as usize,
                temperature: req.temperature,
                top_k: req.top_k as usize,
                top_p: req.top_p,
                seed,
                ..Default::default()
            };
            crate::eval::answer_with(model.as_ref(), tk, &req.prompt, cfg)
        })
        .collect()
}
