//! The cluster commands: `coordinator`, `worker`, `submit`, `status`, `watch`, `cancel`,
//! `workers`.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use liandan_proto::auth::{ADMIN_TOKEN_ENV, Client, TlsFiles, TokenSource, WORKER_TOKEN_ENV};
use liandan_proto::v1::*;

use crate::CliError;

/// Default coordinator address for the client commands.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Credentials of this process (every command takes them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Credentials {
    /// File with the bearer token to send, one per line, the first is sent (default: the
    /// LIANDAN_ADMIN_TOKEN variable for client commands, LIANDAN_WORKER_TOKEN for `worker`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// TLS: this process's certificate, PEM (the coordinator's server certificate; a client's
    /// certificate for mutual TLS).
    #[arg(long, global = true)]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the key of --tls-cert, PEM.
    #[arg(long, global = true)]
    pub tls_key: Option<PathBuf>,
    /// TLS: the cluster CA, PEM (clients verify the coordinator with it; the coordinator requires
    /// client certificates signed by it). Clients then use https:// coordinator addresses.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
}

impl Credentials {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles { cert: self.tls_cert.clone(), key: self.tls_key.clone(), ca: self.tls_ca.clone() }
    }

    /// The token a client sends: --token-file, else the variable `env`.
    pub fn token(&self, env: &str) -> Result<Option<TokenSource>, CliError> {
        TokenSource::from_file_or_env(self.token_file.as_deref(), env).map_err(|e| CliError::Usage(e.to_string()))
    }
}

/// Where client commands go and with which credentials.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub creds: Credentials,
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// SQLite store.
    #[arg(long, default_value = "runs/coordinator.db")]
    pub store: PathBuf,
    /// Write the bound address here once listening (for scripts and tests).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Milliseconds without a heartbeat after which a worker is dead.
    #[arg(long, default_value_t = 3000)]
    pub lease_ms: u64,
    /// Most heartbeats per second asked of all workers together: a larger cluster heartbeats
    /// less often than every 500 ms, and its leases grow by as much (0: no limit).
    #[arg(long, default_value_t = 5000)]
    pub max_heartbeats_per_s: u64,
    /// File with the admin tokens, one per line (default: the LIANDAN_ADMIN_TOKEN variable).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// File with the worker tokens, one per line (default: the LIANDAN_WORKER_TOKEN variable).
    #[arg(long)]
    pub worker_token_file: Option<PathBuf>,
    /// Accept calls without tokens; only allowed when listening on a loopback address.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Serve the dashboard, its JSON API and Prometheus /metrics on this address (port 0 picks
    /// a free port). Off when absent.
    #[arg(long)]
    pub http: Option<String>,
    /// Write the bound HTTP address here once listening (for scripts and tests).
    #[arg(long)]
    pub http_addr_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Coordinator address.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Host the collective listener binds and advertises to peers.
    #[arg(long, default_value = "127.0.0.1")]
    pub ring_host: String,
    /// Give up after this many failed attempts to reach the coordinator in a row (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Memory a phase may use on this worker, GiB (default: the device's: the GPU's memory, or
    /// the host's available memory at start). The coordinator gives this worker no phase that
    /// needs more.
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// The device to train on: auto (a GPU when one is usable, else the CPU), cpu, cuda (GPU 0),
    /// cuda:N, or cuda-emu (the emulated CUDA device: the CUDA backend on the CPU, for tests).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// How a CUDA worker's group sums gradients: nccl (default on a GPU) or ring (the TCP ring:
    /// several processes on one GPU, or the emulated device). CPU workers always use the ring.
    #[arg(long)]
    pub collective: Option<String>,
    /// Matmul precision on CUDA devices: bf16 (f32 accumulation, f32 master weights) or f32.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
}

fn rt() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| CliError::Usage(format!("tokio runtime: {e}")))
}

/// The coordinator's accepted tokens, or the refusal to start without them.
fn coordinator_auth(a: &CoordinatorArgs, loopback: bool) -> Result<liandan_coordinator::auth::Auth, CliError> {
    use liandan_coordinator::auth::Auth;
    let usage = |e: liandan_proto::auth::AuthError| CliError::Usage(e.to_string());
    let admin = TokenSource::from_file_or_env(a.admin_token_file.as_deref(), ADMIN_TOKEN_ENV).map_err(usage)?;
    let worker = TokenSource::from_file_or_env(a.worker_token_file.as_deref(), WORKER_TOKEN_ENV).map_err(usage)?;
    if a.insecure_no_auth {
        if !loopback {
            return Err(CliError::Usage(format!("--insecure-no-auth is only allowed on a loopback address, not {}", a.listen)));
        }
        if let Some(h) = a.http.as_deref().filter(|h| !is_loopback(h)) {
            return Err(CliError::Usage(format!("--insecure-no-auth is only allowed on loopback addresses, and --http {h} is not one")));
        }
        tracing::warn!("no authentication (--insecure-no-auth): any local process may call this coordinator");
        return Ok(Auth::insecure());
    }
    match (admin, worker) {
        (Some(admin), Some(worker)) => {
            if admin.tokens().iter().any(|t| worker.accepts(t.as_bytes())) {
                return Err(CliError::Usage("the admin and worker tokens must differ (a worker would have the admin's rights)".into()));
            }
            tracing::info!("tokens: admin from {}, worker from {}", admin.origin(), worker.origin());
            Ok(Auth::new(admin, worker))
        }
        _ => Err(CliError::Usage(format!(
            "the coordinator needs an admin token (--admin-token-file or {ADMIN_TOKEN_ENV}) and a worker token (--worker-token-file or {WORKER_TOKEN_ENV}); --insecure-no-auth runs without them on a loopback address"
        ))),
    }
}

/// Whether `host:port` names a loopback address (resolved; a name that does not resolve is not).
fn is_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs().is_ok_and(|mut a| a.all(|x| x.ip().is_loopback()))
}

/// Raises this process's open-file limit to its hard limit (one descriptor per worker
/// connection: the default soft limit, often 1,024, would refuse a large cluster). Returns the
/// limit now in force.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

pub fn coordinator(a: CoordinatorArgs, creds: &Credentials) -> Result<(), CliError> {
    let fds = raise_fd_limit();
    let wanted = 2 * liandan_coordinator::incoming::MAX_CONNECTIONS as u64;
    if fds < wanted {
        tracing::warn!("open-file limit is {fds}: fewer than {wanted} workers and clients can connect at once (raise `ulimit -n`)");
    }
    rt()?.block_on(async move {
        let (listener, addr) = liandan_coordinator::bind(&a.listen).await.map_err(|e| CliError::Usage(e.to_string()))?;
        let auth = coordinator_auth(&a, addr.ip().is_loopback())?;
        let tls = creds.tls();
        let http = match &a.http {
            Some(h) => {
                let (l, haddr) = liandan_coordinator::bind(h).await.map_err(|e| CliError::Usage(format!("--http: {e}")))?;
                if let Some(f) = &a.http_addr_file {
                    std::fs::write(f, format!("http://{haddr}\n")).map_err(|e| CliError::Io { path: f.display().to_string(), source: e })?;
                }
                tracing::info!("dashboard on http://{haddr}/ (JSON under /api, Prometheus /metrics)");
                Some(l)
            }
            None => None,
        };
        let scheme = if tls.is_empty() { "http" } else { "https" };
        let opts = liandan_coordinator::ServeOptions { auth, tls: (!tls.is_empty()).then_some(tls), http };
        if let Some(f) = &a.addr_file {
            std::fs::write(f, format!("{scheme}://{addr}\n")).map_err(|e| CliError::Io { path: f.display().to_string(), source: e })?;
        }
        tracing::info!("coordinator listening on {addr}, store {}", a.store.display());
        let config = liandan_coordinator::service::CoordinatorConfig { lease_ms: a.lease_ms, max_heartbeats_per_s: a.max_heartbeats_per_s, ..Default::default() };
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        liandan_coordinator::serve(&a.store, listener, config, opts, shutdown).await.map_err(|e| CliError::Usage(e.to_string()))
    })
}

pub fn worker(a: WorkerArgs, creds: &Credentials) -> Result<(), CliError> {
    let token = creds.token(WORKER_TOKEN_ENV)?;
    rt()?.block_on(async move {
        let opts = liandan_worker::runtime::WorkerOptions {
            coordinator: a.coordinator,
            ring_host: a.ring_host,
            max_attempts: (a.max_attempts > 0).then_some(a.max_attempts),
            token,
            tls: creds.tls(),
            memory_bytes: a.memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
            device: a.device,
            precision: parse_precision(&a.precision)?,
            collective: a.collective,
        };
        tokio::select! {
            r = liandan_worker::runtime::run_worker(opts) => r.map_err(|e| CliError::Usage(e.to_string())),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

/// `bf16` or `f32`.
pub fn parse_precision(s: &str) -> Result<liandan_worker::backend::cuda::Precision, CliError> {
    use liandan_worker::backend::cuda::Precision;
    match s {
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        other => Err(CliError::Usage(format!("--precision {other}: bf16 or f32"))),
    }
}

/// A client of the coordinator at `t.addr` that sends the admin token.
pub async fn connect(t: &Target) -> Result<Client, CliError> {
    let addr = &t.addr;
    let token = t.creds.token(ADMIN_TOKEN_ENV)?;
    let ep = liandan_proto::auth::endpoint(addr, &t.creds.tls()).map_err(|e| CliError::Usage(format!("--coordinator {addr}: {e}")))?;
    let ch = ep.connect_timeout(Duration::from_secs(3)).connect().await.map_err(|e| CliError::Usage(format!("coordinator at {addr} not reachable: {e}")))?;
    Ok(liandan_proto::auth::client(ch, token))
}

fn status_err(s: tonic::Status) -> CliError {
    CliError::Usage(s.message().to_string())
}

pub fn submit(file: PathBuf, coordinator: &Target) -> Result<(), CliError> {
    let spec = std::fs::read_to_string(&file).map_err(|e| CliError::Io { path: file.display().to_string(), source: e })?;
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        let r = c.submit_job(SubmitJobRequest { spec_toml: spec, source: file.display().to_string() }).await.map_err(status_err)?;
        println!("job {} submitted", r.into_inner().job_id);
        Ok(())
    })
}

fn fmt_eta(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s / 60 % 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

/// Human-readable status lines of a job.
pub fn describe(j: &JobStatus) -> String {
    let mut out = format!("job {} '{}': {}{}\n", j.job_id, printable(&j.name), j.state, if j.error.is_empty() { String::new() } else { format!(" ({})", printable(&j.error)) });
    for p in &j.phases {
        out.push_str(&format!(
            "  phase {} {:<10} {:<9} step {}/{}  loss {:.4}  {:.0} tok/s  eta {}  world {} gen {}  ckpt {}{}\n",
            p.index,
            printable(&p.name),
            p.state,
            p.step,
            p.total_steps,
            p.loss,
            p.tokens_per_s,
            fmt_eta(p.eta_ms),
            p.world,
            p.generation,
            if p.last_checkpoint.is_empty() { "-".to_string() } else { format!("{} (step {})", printable(&p.last_checkpoint), p.last_checkpoint_step) },
            if p.input_checkpoint.is_empty() { String::new() } else { format!("  from {}", printable(&p.input_checkpoint)) },
        ));
        // A data phase reports its stage (1-based) and the stage's task counts.
        if let (Some(stage), Some(done), Some(tasks)) = (p.values.get("stage"), p.values.get("stage_done"), p.values.get("stage_tasks")) {
            let name = liandan_data::pipeline::STAGES.get((*stage as usize).saturating_sub(1)).copied().unwrap_or("?");
            out.push_str(&format!("    stage {stage}/{} {name}: {done}/{tasks} tasks\n", liandan_data::pipeline::STAGES.len()));
        } else if !p.values.is_empty() {
            let mut v: Vec<_> = p.values.iter().collect();
            v.sort_by(|a, b| a.0.cmp(b.0));
            out.push_str(&format!("    last step: {}\n", v.iter().map(|(k, x)| format!("{} {x:.4}", printable(k))).collect::<Vec<_>>().join("  ")));
        }
        if !p.evaluation.is_empty() {
            out.push_str(&format!("    evaluation: {}\n", printable(&p.evaluation)));
        }
    }
    if !j.workers.is_empty() {
        out.push_str(&format!("  workers (by rank): {:?}\n", j.workers));
    }
    out
}

pub fn status(job: Option<u64>, coordinator: &Target) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        match job {
            Some(id) => print!("{}", describe(&c.get_job(JobRef { job_id: id }).await.map_err(status_err)?.into_inner())),
            None => {
                let mut page_token = String::new();
                let mut any = false;
                loop {
                    let r = c.list_jobs(ListJobsRequest { page_size: 0, page_token }).await.map_err(status_err)?.into_inner();
                    for j in &r.jobs {
                        print!("{}", describe(j));
                    }
                    any |= !r.jobs.is_empty();
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    page_token = r.next_page_token;
                }
                if !any {
                    println!("no jobs");
                }
            }
        }
        Ok(())
    })
}

/// Streams a job's status with a progress bar per phase until it ends; returns the final status.
pub async fn watch_async(c: &mut Client, id: u64, bars: bool) -> Result<JobStatus, CliError> {
    let mut stream = c.watch_job(JobRef { job_id: id }).await.map_err(status_err)?.into_inner();
    let multi = MultiProgress::new();
    let mut pbs: Vec<ProgressBar> = Vec::new();
    let mut last = None;
    let mut last_line = String::new();
    while let Some(item) = stream.message().await.map_err(status_err)? {
        if bars {
            for p in &item.phases {
                let i = p.index as usize;
                while pbs.len() <= i {
                    let pb = multi.add(ProgressBar::new(1));
                    // A constant template known to parse.
                    pb.set_style(ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}").expect("static template").progress_chars("=> "));
                    pbs.push(pb);
                }
                let pb = &pbs[i];
                pb.set_prefix(p.name.clone());
                pb.set_length(p.total_steps.max(1));
                pb.set_position(p.step);
                pb.set_message(format!("{} loss {:.4} | {:.0} tok/s | eta {} | world {} gen {}", p.state, p.loss, p.tokens_per_s, fmt_eta(p.eta_ms), p.world, p.generation));
            }
        } else {
            // Without a terminal: a line when a state or world changes, or every 10% of a phase.
            let key =
                item.phases.iter().map(|p| format!("{}:{}:{}:{}", p.state, p.world, p.generation, p.step * 10 / p.total_steps.max(1))).collect::<Vec<_>>().join(",") + &item.state;
            if key != last_line {
                let line = item
                    .phases
                    .iter()
                    .map(|p| format!("{} {} {}/{} loss {:.4} world {} gen {}", p.name, p.state, p.step, p.total_steps, p.loss, p.world, p.generation))
                    .collect::<Vec<_>>()
                    .join("; ");
                eprintln!("job {} {}: {line}", item.job_id, item.state);
                last_line = key;
            }
        }
        last = Some(item);
    }
    for pb in pbs {
        pb.finish();
    }
    last.ok_or_else(|| CliError::Usage(format!("job {id}: no status received")))
}

pub fn watch(id: u64, coordinator: &Target) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let last = watch_async(&mut c, id, tty).await?;
        print!("{}", describe(&last));
        Ok(())
    })
}

pub fn cancel(id: u64, coordinator: &Target) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        c.cancel_job(JobRef { job_id: id }).await.map_err(status_err)?;
        println!("job {id} cancelled");
        Ok(())
    })
}

pub fn resume(id: u64, coordinator: &Target) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        c.resume_job(JobRef { job_id: id }).await.map_err(status_err)?;
        println!("job {id} resumes at its failed phase (follow it with `liandan watch {id}`)");
        Ok(())
    })
}

/// Every worker, a page at a time.
pub async fn all_workers(c: &mut Client) -> Result<Vec<WorkerInfo>, CliError> {
    let (mut out, mut page_token) = (Vec::new(), String::new());
    loop {
        let r = c.list_workers(ListWorkersRequest { page_size: 0, page_token }).await.map_err(status_err)?.into_inner();
        out.extend(r.workers);
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = r.next_page_token;
    }
}

/// `text` with control characters (terminal escapes, carriage returns, newlines) shown as
/// `\u{..}`: names and messages from workers and specs cannot rewrite the terminal.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// `liandan label JOB`: shows a prompt and two sampled answers, reads 1 / 2 / t / s / q from
/// stdin, and stores each choice through the coordinator, until `q`, the end of input, or
/// `count` labels.
pub fn label(job: u64, labeler: &str, count: Option<u64>, coordinator: &Target) -> Result<(), CliError> {
    use std::io::{BufRead, Write};
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        let stdin = std::io::stdin();
        let mut done = 0u64;
        while count.is_none_or(|n| done < n) {
            let cmp = c.next_comparison(ComparisonRequest { job_id: job }).await.map_err(status_err)?.into_inner();
            println!(
                "\ncomparison {} (job {}, {} of {} labelled; answers sampled from {})\n问 {}\n[1] {}\n[2] {}",
                cmp.comparison_id,
                cmp.job_id,
                cmp.labelled,
                cmp.total,
                printable(&cmp.checkpoint),
                printable(&cmp.prompt),
                printable(&cmp.answer_a.replace('\n', " / ")),
                printable(&cmp.answer_b.replace('\n', " / "))
            );
            let choice = loop {
                print!("better answer: 1 / 2 / t (tie) / s (skip) / q (quit)> ");
                let _ = std::io::stdout().flush();
                let mut line = String::new();
                if stdin.lock().read_line(&mut line).map_err(|e| CliError::Io { path: "stdin".into(), source: e })? == 0 {
                    break None;
                }
                match line.trim() {
                    "1" => break Some("a"),
                    "2" => break Some("b"),
                    "t" | "tie" => break Some("tie"),
                    "s" | "skip" => break Some("skip"),
                    "q" | "quit" => break None,
                    other => println!("'{other}' is not one of 1, 2, t, s, q"),
                }
            };
            let Some(choice) = choice else { break };
            c.submit_preference(PreferenceLabel { comparison_id: cmp.comparison_id, choice: choice.into(), labeler: labeler.into() }).await.map_err(status_err)?;
            done += 1;
        }
        println!("{done} comparison(s) labelled as {} (label_source = human)", printable(labeler));
        Ok(())
    })
}

pub fn workers(drain: Option<u64>, coordinator: &Target) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        if let Some(id) = drain {
            c.drain_worker(WorkerRef { worker_id: id }).await.map_err(status_err)?;
            println!("worker {id} will leave at the next checkpoint boundary");
            return Ok(());
        }
        println!("{:>4} {:<9} {:<8} {:>10} {:>10} {:>5} {:>5} {:>4}  ring", "id", "state", "device", "memory", "heartbeat", "job", "rank", "gen");
        for w in all_workers(&mut c).await? {
            let memory = if w.memory_bytes == 0 { "-".to_string() } else { liandan_worker::model::memory::show_bytes(w.memory_bytes) };
            println!(
                "{:>4} {:<9} {:<8} {:>10} {:>8}ms {:>5} {:>5} {:>4}  {}",
                w.worker_id,
                w.state,
                printable(&w.device),
                memory,
                w.heartbeat_age_ms,
                w.job_id,
                w.rank,
                w.generation,
                printable(&w.ring_address)
            );
        }
        Ok(())
    })
}
