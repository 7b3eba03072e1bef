//! The cluster commands: `coordinator`, `worker`, `submit`, `status`, `watch`, `cancel`,
//! `workers`.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use liandan_proto::v1::coordinator_client::CoordinatorClient;
use liandan_proto::v1::*;
use tonic::transport::Channel;

use crate::CliError;

/// Default coordinator address for the client commands.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

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
}

fn rt() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| CliError::Usage(format!("tokio runtime: {e}")))
}

pub fn coordinator(a: CoordinatorArgs) -> Result<(), CliError> {
    rt()?.block_on(async move {
        let (listener, addr) = liandan_coordinator::bind(&a.listen).await.map_err(|e| CliError::Usage(e.to_string()))?;
        if let Some(f) = &a.addr_file {
            std::fs::write(f, format!("http://{addr}\n")).map_err(|e| CliError::Io { path: f.display().to_string(), source: e })?;
        }
        tracing::info!("coordinator listening on {addr}, store {}", a.store.display());
        let config = liandan_coordinator::service::CoordinatorConfig { lease_ms: a.lease_ms, ..Default::default() };
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        liandan_coordinator::serve(&a.store, listener, config, shutdown).await.map_err(|e| CliError::Usage(e.to_string()))
    })
}

pub fn worker(a: WorkerArgs) -> Result<(), CliError> {
    rt()?.block_on(async move {
        let opts = liandan_worker::runtime::WorkerOptions {
            coordinator: a.coordinator,
            ring_host: a.ring_host,
            max_attempts: (a.max_attempts > 0).then_some(a.max_attempts),
        };
        tokio::select! {
            r = liandan_worker::runtime::run_worker(opts) => r.map_err(|e| CliError::Usage(e.to_string())),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

async fn connect(addr: &str) -> Result<CoordinatorClient<Channel>, CliError> {
    let ep = tonic::transport::Endpoint::from_shared(addr.to_string()).map_err(|e| CliError::Usage(format!("--coordinator {addr}: {e}")))?;
    let ch = ep.connect_timeout(Duration::from_secs(3)).connect().await.map_err(|e| CliError::Usage(format!("coordinator at {addr} not reachable: {e}")))?;
    Ok(CoordinatorClient::new(ch))
}

fn status_err(s: tonic::Status) -> CliError {
    CliError::Usage(s.message().to_string())
}

pub fn submit(file: PathBuf, coordinator: &str) -> Result<(), CliError> {
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
    let mut out = format!("job {} '{}': {}{}\n", j.job_id, j.name, j.state, if j.error.is_empty() { String::new() } else { format!(" ({})", j.error) });
    for p in &j.phases {
        out.push_str(&format!(
            "  phase {} {:<10} {:<9} step {}/{}  loss {:.4}  {:.0} tok/s  eta {}  world {} gen {}  ckpt {}{}\n",
            p.index,
            p.name,
            p.state,
            p.step,
            p.total_steps,
            p.loss,
            p.tokens_per_s,
            fmt_eta(p.eta_ms),
            p.world,
            p.generation,
            if p.last_checkpoint.is_empty() { "-".to_string() } else { format!("{} (step {})", p.last_checkpoint, p.last_checkpoint_step) },
            if p.input_checkpoint.is_empty() { String::new() } else { format!("  from {}", p.input_checkpoint) },
        ));
        if !p.values.is_empty() {
            let mut v: Vec<_> = p.values.iter().collect();
            v.sort_by(|a, b| a.0.cmp(b.0));
            out.push_str(&format!("    last step: {}\n", v.iter().map(|(k, x)| format!("{k} {x:.4}")).collect::<Vec<_>>().join("  ")));
        }
        if !p.evaluation.is_empty() {
            out.push_str(&format!("    evaluation: {}\n", p.evaluation));
        }
    }
    if !j.workers.is_empty() {
        out.push_str(&format!("  workers (by rank): {:?}\n", j.workers));
    }
    out
}

pub fn status(job: Option<u64>, coordinator: &str) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        match job {
            Some(id) => print!("{}", describe(&c.get_job(JobRef { job_id: id }).await.map_err(status_err)?.into_inner())),
            None => {
                let jobs = c.list_jobs(ListJobsRequest {}).await.map_err(status_err)?.into_inner().jobs;
                if jobs.is_empty() {
                    println!("no jobs");
                }
                for j in jobs {
                    print!("{}", describe(&j));
                }
            }
        }
        Ok(())
    })
}

/// Streams a job's status with a progress bar per phase until it ends; returns the final status.
pub async fn watch_async(c: &mut CoordinatorClient<Channel>, id: u64, bars: bool) -> Result<JobStatus, CliError> {
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
            let key = item.phases.iter().map(|p| format!("{}:{}:{}:{}", p.state, p.world, p.generation, p.step * 10 / p.total_steps.max(1))).collect::<Vec<_>>().join(",") + &item.state;
            if key != last_line {
                let line = item.phases.iter().map(|p| format!("{} {} {}/{} loss {:.4} world {} gen {}", p.name, p.state, p.step, p.total_steps, p.loss, p.world, p.generation)).collect::<Vec<_>>().join("; ");
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

pub fn watch(id: u64, coordinator: &str) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let last = watch_async(&mut c, id, tty).await?;
        print!("{}", describe(&last));
        Ok(())
    })
}

pub fn cancel(id: u64, coordinator: &str) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        c.cancel_job(JobRef { job_id: id }).await.map_err(status_err)?;
        println!("job {id} cancelled");
        Ok(())
    })
}

pub fn resume(id: u64, coordinator: &str) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        c.resume_job(JobRef { job_id: id }).await.map_err(status_err)?;
        println!("job {id} resumes at its failed phase (follow it with `liandan watch {id}`)");
        Ok(())
    })
}

/// `liandan label JOB`: shows a prompt and two sampled answers, reads 1 / 2 / t / s / q from
/// stdin, and stores each choice through the coordinator, until `q`, the end of input, or
/// `count` labels.
pub fn label(job: u64, labeler: &str, count: Option<u64>, coordinator: &str) -> Result<(), CliError> {
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
                cmp.checkpoint,
                cmp.prompt,
                cmp.answer_a.replace('\n', " / "),
                cmp.answer_b.replace('\n', " / ")
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
        println!("{done} comparison(s) labelled as {labeler} (label_source = human)");
        Ok(())
    })
}

pub fn workers(drain: Option<u64>, coordinator: &str) -> Result<(), CliError> {
    rt()?.block_on(async {
        let mut c = connect(coordinator).await?;
        if let Some(id) = drain {
            c.drain_worker(WorkerRef { worker_id: id }).await.map_err(status_err)?;
            println!("worker {id} will leave at the next checkpoint boundary");
            return Ok(());
        }
        let ws = c.list_workers(ListWorkersRequest {}).await.map_err(status_err)?.into_inner().workers;
        println!("{:>4} {:<9} {:<8} {:>10} {:>5} {:>5} {:>4}  ring", "id", "state", "device", "heartbeat", "job", "rank", "gen");
        for w in ws {
            println!("{:>4} {:<9} {:<8} {:>8}ms {:>5} {:>5} {:>4}  {}", w.worker_id, w.state, w.device, w.heartbeat_age_ms, w.job_id, w.rank, w.generation, w.ring_address);
        }
        Ok(())
    })
}
