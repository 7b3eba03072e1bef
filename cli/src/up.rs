//! `liandan up`: the main job on the embedded demo data, on a local cluster.
//!
//! 1. The embedded raw data (Tang poems, 宋词, 诗经, 论语 and five noisy web pages, see
//!    `data/demo/DATA_LICENSES`) goes through `liandan data prepare` (clean with
//!    Traditional→Simplified, dedup, BPE tokenizer, shards).
//! 2. A coordinator and N workers start as child processes (logs in `OUT/logs/`); the embedded
//!    demo job (`examples/demo.toml`) is submitted and followed with progress bars.
//! 3. Each phase's final checkpoint answers the held-out prompts (`data/demo/eval.jsonl`), scored
//!    by rule: the form verifier for poem requests, exact match for the rest.
//!
//! Ctrl-C or the end of the job stops the children (SIGINT, then SIGKILL after a grace period).

use std::path::{Path, PathBuf};

use liandan_data::clean::CleanConfig;
use liandan_data::dedup::DedupConfig;
use liandan_data::ingest::IngestOptions;
use liandan_data::prepare::PrepareConfig;
use liandan_data::shard::SplitRatios;

use crate::CliError;

/// The raw demo corpus, embedded so the binary runs anywhere (built by
/// `scripts/build_demo_data.py`).
const RAW: &[(&str, &str)] = &[
    ("pretrain/tang.jsonl", include_str!("../../data/demo/pretrain/tang.jsonl")),
    ("pretrain/songci.jsonl", include_str!("../../data/demo/pretrain/songci.jsonl")),
    ("pretrain/shijing.jsonl", include_str!("../../data/demo/pretrain/shijing.jsonl")),
    ("pretrain/lunyu.txt", include_str!("../../data/demo/pretrain/lunyu.txt")),
    ("web/moyun-jueju.html", include_str!("../../data/demo/web/moyun-jueju.html")),
    ("web/moyun-wangwei.html", include_str!("../../data/demo/web/moyun-wangwei.html")),
    ("web/qingming-lvcha.html", include_str!("../../data/demo/web/qingming-lvcha.html")),
    ("web/qingming-diancha.html", include_str!("../../data/demo/web/qingming-diancha.html")),
    ("web/hanmo-kaishu.html", include_str!("../../data/demo/web/hanmo-kaishu.html")),
    ("DATA_LICENSES", include_str!("../../data/demo/DATA_LICENSES")),
    ("sft.jsonl", include_str!("../../data/demo/sft.jsonl")),
    ("preference.jsonl", include_str!("../../data/demo/preference.jsonl")),
];

/// The demo job, with `runs/demo` standing for the output directory.
const DEMO_JOB: &str = include_str!("../../examples/demo.toml");

/// Held-out prompts answered per task in the final table (the demo has 80 poem requests and 30
/// of each other task).
const EVAL_PER_TASK: usize = 80;

/// Held-out evaluation prompts (kept out of every training file).
const EVAL: &str = include_str!("../../data/demo/eval.jsonl");

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where the raw data copy, the prepared data and the checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// The first phase's steps; every later phase's steps scale by the same factor (default:
    /// the spec's own).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Local workers to start.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The workers' device (`liandan worker --device`): `cpu` by default, because the demo's
    /// sizes and documented numbers are the CPU's; `cuda` runs it on the GPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The workers' collective (`liandan worker --collective`; default: NCCL on CUDA). Several
    /// workers on one GPU need `ring` (NCCL refuses two ranks on one device).
    #[arg(long)]
    pub collective: Option<String>,
    /// Run this job spec on the demo data instead of the embedded `examples/demo.toml` (its
    /// `runs/demo` paths are replaced by --out, as the demo's are): to try other sizes, steps or
    /// settings on the same data and held-out prompts.
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

impl UpArgs {
    /// What each worker is started with besides its coordinator and threads.
    fn worker_args(&self) -> Vec<String> {
        let mut v = vec!["--device".to_string(), self.device.clone()];
        if let Some(c) = &self.collective {
            v.extend(["--collective".to_string(), c.clone()]);
        }
        v
    }
}

pub fn run(a: UpArgs, threads: usize) -> Result<(), CliError> {
    let raw_dir = a.out.join("raw");
    for (name, body) in RAW {
        let p = raw_dir.join(name);
        write(&p, body)?;
    }
    eprintln!("liandan up: 1/3 data: preparing the embedded demo corpus in {}", raw_dir.display());
    let data_dir = a.out.join("data");
    let report = liandan_data::prepare::prepare(
        &PrepareConfig {
            inputs: vec![raw_dir.join("pretrain").display().to_string(), raw_dir.join("web").display().to_string()],
            out: data_dir.clone(),
            ingest: IngestOptions::default(),
            clean: CleanConfig { t2s: true, ..Default::default() },
            dedup: DedupConfig::default(),
            split: SplitRatios { train: 0.9, val: 0.05, test: 0.05 },
            vocab_size: 4096,
            tokenizer: None,
            shard_tokens: 10_000_000,
            ..Default::default()
        },
        &liandan_data::prepare::Silent,
    )?;
    println!("{}", report.table());

    let job = match &a.spec {
        Some(p) => std::fs::read_to_string(p).map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))?,
        None => DEMO_JOB.to_string(),
    };
    let mut spec = job.replace("runs/demo", &a.out.display().to_string());
    if let Some(steps) = a.steps {
        spec = scale_steps(&spec, steps)?;
    }
    let workers = a.workers.max(1);
    let per_worker_threads = (threads / workers).max(1);
    eprintln!("liandan up: 2/3 train: a coordinator and {workers} local workers ({per_worker_threads} thread(s) each); logs in {}", a.out.join("logs").display());
    let mut cluster = LocalCluster::start(&a.out, workers, per_worker_threads, &a.worker_args())?;
    let source = a.spec.as_ref().map_or("examples/demo.toml".to_string(), |p| p.display().to_string());
    let outcome = cluster.run_job(&spec, &source);
    cluster.stop();
    let final_status = outcome?;
    print!("{}", crate::cluster::describe(&final_status));
    if final_status.state != "succeeded" {
        return Err(CliError::Usage(format!("job {} ended {}: {} (see {})", final_status.job_id, final_status.state, final_status.error, a.out.join("logs").display())));
    }
    let ckpts: Vec<PathBuf> = final_status.phases.iter().map(|p| PathBuf::from(&p.last_checkpoint)).collect();

    eprintln!("liandan up: 3/3 evaluate: held-out prompts answered after each phase, scored by rule");
    // The held-out prompts of the tasks the job's SFT trained on (all of them when it names none):
    // a task no phase trained scores 0 after every phase and only costs generation time.
    let trained = sft_tasks(&spec);
    let items: Vec<_> = eval_items().into_iter().filter(|i| trained.is_empty() || trained.contains(&i.task)).collect();
    let mut reports = Vec::new();
    let mut reward_accuracy = None;
    let mut ppo_stats = None;
    let mut sft_eval = None;
    for (phase, ckpt) in final_status.phases.iter().zip(&ckpts) {
        // What each phase's final checkpoint recorded about itself, as the coordinator reports it.
        if let Ok(r) = serde_json::from_str::<liandan_worker::phase::reward::RewardEval>(&phase.evaluation) {
            reward_accuracy = Some(r);
            continue;
        }
        if let Ok(s) = serde_json::from_str::<liandan_worker::phase::ppo::PpoStepStats>(&phase.evaluation) {
            ppo_stats = Some((phase.name.clone(), s));
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&phase.evaluation)
            && v.get("val_loss").is_some()
        {
            sft_eval = Some((phase.name.clone(), v));
        }
        let (model, codec) = crate::generate::load_model(ckpt)?;
        let crate::generate::Codec::Bpe(tk) = &codec else { continue };
        let r = liandan_worker::eval::evaluate(model.as_ref(), tk, &items, EVAL_PER_TASK, liandan_worker::eval::ANSWER_TOKENS).map_err(CliError::Usage)?;
        let sampled = liandan_worker::eval::poem_pass_sampled(model.as_ref(), tk, &items, 0.7, 4, liandan_worker::eval::ANSWER_TOKENS).map_err(CliError::Usage)?;
        reports.push((phase.name.clone(), r, sampled));
    }
    let tasks: Vec<String> = reports.first().map(|(_, r, _)| r.tasks.iter().map(|t| t.0.clone()).collect()).unwrap_or_default();
    println!("\nheld-out prompts passed (greedy answers; poem = the form verifier, others = exact match;");
    println!("poem@0.7 = 4 answers per poem request sampled at temperature 0.7, as PPO's rollouts are):");
    print!("{:<12}", "after");
    for t in &tasks {
        print!("{t:>12}");
    }
    println!("{:>14}", "poem@0.7");
    for (phase, r, (passed, total)) in &reports {
        print!("{phase:<12}");
        for t in &r.tasks {
            print!("{:>12}", format!("{}/{}", t.1, t.2));
        }
        println!("{:>14}", format!("{passed}/{total} {:.1}%", 100.0 * *passed as f64 / (*total).max(1) as f64));
    }
    if let Some((phase, r, _)) = reports.last() {
        println!("\nsample answers after {phase}:");
        for (prompt, answer, ok) in r.samples.iter().take(10) {
            println!("  {} {prompt} → {}", if *ok { "✓" } else { "✗" }, answer.trim().replace('\n', " / "));
        }
    }
    if let Some((name, v)) = &sft_eval {
        println!("\n{name}: validation loss {:.3} nats per assistant token on {} held-out examples", v["val_loss"].as_f64().unwrap_or(f64::NAN), v["examples"]);
    }
    if let Some(r) = &reward_accuracy {
        let tasks: Vec<String> = r.by_task.iter().map(|(t, (c, n))| format!("{t} {:.0}% of {n}", 100.0 * *c as f64 / (*n).max(1) as f64)).collect();
        println!("reward model: pairwise accuracy {:.1}% on {} held-out rule-derived comparisons ({})", 100.0 * r.accuracy, r.pairs, tasks.join(", "));
    }
    let sampled_share = |name: &str| reports.iter().find(|(n, _, _)| n == name).map(|(_, _, (p, t))| *p as f64 / (*t).max(1) as f64);
    let aims = Aims {
        sft_sampled: sft_eval.as_ref().and_then(|(name, _)| sampled_share(name)),
        reward_accuracy: reward_accuracy.as_ref().map(|r| r.accuracy),
        ppo: ppo_stats.as_ref().and_then(|(name, s)| Some((sampled_share(name)?, s.kl))),
    };
    if let Some((_, s)) = ppo_stats {
        println!(
            "ppo, last rollout batch: KL to the SFT model {:.2} nats per answer (β {:.3}), verifier pass {:.1}% of sampled poems, reward-model score {:.3}",
            s.kl,
            s.beta,
            100.0 * s.verifier_pass,
            s.rm_score
        );
    }
    let aim_lines = aims.lines();
    if !aim_lines.is_empty() {
        println!("\naims (docs/BENCHMARKS.md, \"Demo job\", says why a missed one is missed):");
        for l in aim_lines {
            println!("  {l}");
        }
    }
    for p in &final_status.phases {
        println!("{}: {} steps, final loss {:.3}, {:.0} tokens/s on {} worker(s)", p.name, p.step, p.loss, p.tokens_per_s, p.world);
    }
    println!(
        "artifacts: {} — raw/ (input), data/ (shards, tokenizer.json, report.json), checkpoints/ (step-* per phase), coordinator.db (job history), logs/\nchat with the result: liandan chat --checkpoint {}",
        a.out.display(),
        ckpts.last().map(|c| c.display().to_string()).unwrap_or_default()
    );
    Ok(())
}

/// The demo's aims for what each phase adds, checked against a run's held-out numbers (shares in
/// 0..1; KL in nats per answer, PPO's last rollout batch).
struct Aims {
    sft_sampled: Option<f64>,
    reward_accuracy: Option<f64>,
    ppo: Option<(f64, f64)>,
}

impl Aims {
    const SFT_SAMPLED: f64 = 0.50;
    const REWARD_ACCURACY: f64 = 0.90;
    const PPO_GAIN: f64 = 0.20;
    const PPO_KL: f64 = 10.0;

    /// One line per aim this run can be judged on: met, or missed and by how much.
    fn lines(&self) -> Vec<String> {
        let verdict = |got: f64, aim: f64| if got >= aim { "met".to_string() } else { format!("missed by {:.1} points", 100.0 * (aim - got)) };
        let mut out = Vec::new();
        if let Some(s) = self.sft_sampled {
            out.push(format!("SFT: poem@0.7 ≥ {:.0}%: {:.1}%, {}", 100.0 * Self::SFT_SAMPLED, 100.0 * s, verdict(s, Self::SFT_SAMPLED)));
        }
        if let Some(a) = self.reward_accuracy {
            out.push(format!("reward model: held-out accuracy ≥ {:.0}%: {:.1}%, {}", 100.0 * Self::REWARD_ACCURACY, 100.0 * a, verdict(a, Self::REWARD_ACCURACY)));
        }
        if let (Some(sft), Some((ppo, kl))) = (self.sft_sampled, self.ppo) {
            let gain = ppo - sft;
            let kl_verdict = if kl < Self::PPO_KL { format!("KL {kl:.2} < {}", Self::PPO_KL) } else { format!("KL {kl:.2} over {}", Self::PPO_KL) };
            out.push(format!(
                "PPO: poem@0.7 ≥ {:.0} points over SFT at KL < {}: {:+.1} points, {}; {kl_verdict}",
                100.0 * Self::PPO_GAIN,
                Self::PPO_KL,
                100.0 * gain,
                verdict(gain, Self::PPO_GAIN)
            ));
        }
        out
    }
}

/// The `tasks` of the spec's first sft phase (empty: all tasks, or no sft phase).
fn sft_tasks(spec: &str) -> Vec<String> {
    let Ok(job) = liandan_coordinator::spec::JobSpec::parse(spec, "the job spec") else { return Vec::new() };
    job.phases.into_iter().find(|p| p.kind == liandan_plan::phase::PhaseKind::Sft).map(|p| p.tasks).unwrap_or_default()
}

/// `spec` with its first phase's steps set to `first` and every other phase's scaled by the
/// same factor (at least 1 step each).
fn scale_steps(spec: &str, first: u64) -> Result<String, CliError> {
    let mut doc: toml::Table = spec.parse().map_err(|e| CliError::Usage(format!("job spec: {e}")))?;
    let phases = doc.get_mut("phases").and_then(|p| p.as_array_mut()).filter(|p| !p.is_empty()).ok_or_else(|| CliError::Usage("job spec: --steps needs [[phases]]".into()))?;
    let steps_of = |p: &toml::Value| p.get("steps").and_then(|s| s.as_integer()).filter(|s| *s > 0);
    let base = steps_of(&phases[0]).ok_or_else(|| CliError::Usage("job spec: --steps needs the first phase's `steps`".into()))? as f64;
    for p in phases.iter_mut() {
        if let (Some(s), Some(t)) = (steps_of(p), p.as_table_mut()) {
            let scaled = ((s as f64) * first as f64 / base).round().max(1.0) as i64;
            t.insert("steps".into(), toml::Value::Integer(scaled));
        }
    }
    toml::to_string(&doc).map_err(|e| CliError::Usage(format!("job spec: {e}")))
}

/// The embedded held-out prompts.
pub fn eval_items() -> Vec<liandan_worker::eval::EvalItem> {
    EVAL.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A coordinator and workers as child processes of this one, with tokens made for this run
/// and passed through the environment (the admin token to the coordinator only).
pub(crate) struct LocalCluster {
    children: Vec<(String, std::process::Child)>,
    addr: String,
    admin_token: String,
}

impl LocalCluster {
    /// `worker_args`: extra arguments for every worker (`--device cpu`).
    pub(crate) fn start(out: &Path, workers: usize, threads: usize, worker_args: &[String]) -> Result<Self, CliError> {
        let exe = std::env::current_exe().map_err(|e| CliError::Usage(format!("cannot find the liandan executable: {e}")))?;
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| CliError::Io { path: logs.display().to_string(), source: e })?;
        let addr_file = out.join("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = |name: &str| -> Result<std::fs::File, CliError> {
            let p = logs.join(format!("{name}.log"));
            std::fs::File::create(&p).map_err(|e| CliError::Io { path: p.display().to_string(), source: e })
        };
        use liandan_proto::auth::{ADMIN_TOKEN_ENV, WORKER_TOKEN_ENV, random_token};
        let token = || random_token().map_err(|e| CliError::Usage(e.to_string()));
        let (admin_token, worker_token) = (token()?, token()?);
        let spawn = |name: &str, args: &[String]| -> Result<std::process::Child, CliError> {
            let f = log(name)?;
            let f2 = f.try_clone().map_err(|e| CliError::Io { path: name.into(), source: e })?;
            let mut cmd = std::process::Command::new(&exe);
            cmd.env(WORKER_TOKEN_ENV, &worker_token).env_remove(ADMIN_TOKEN_ENV);
            if name == "coordinator" {
                cmd.env(ADMIN_TOKEN_ENV, &admin_token);
            }
            cmd.args(args).stdout(f).stderr(f2).stdin(std::process::Stdio::null()).spawn().map_err(|e| CliError::Usage(format!("cannot start {name}: {e}")))
        };
        let mut children = Vec::new();
        let store = out.join("coordinator.db");
        children.push((
            "coordinator".to_string(),
            spawn(
                "coordinator",
                &[
                    "coordinator".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--store".into(),
                    store.display().to_string(),
                    "--addr-file".into(),
                    addr_file.display().to_string(),
                ],
            )?,
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && s.ends_with('\n')
            {
                break s.trim().to_string();
            }
            if std::time::Instant::now() > deadline {
                let mut c = LocalCluster { children, addr: String::new(), admin_token };
                c.stop();
                return Err(CliError::Usage(format!("the coordinator did not start within 30 s (see {})", logs.join("coordinator.log").display())));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        for i in 0..workers {
            let name = format!("worker-{i}");
            let mut args = vec!["worker".to_string(), "--coordinator".into(), addr.clone(), "--threads".into(), threads.to_string()];
            args.extend_from_slice(worker_args);
            children.push((name.clone(), spawn(&name, &args)?));
        }
        Ok(LocalCluster { children, addr, admin_token })
    }

    /// Submits the job and follows it until it ends or Ctrl-C.
    pub(crate) fn run_job(&mut self, spec: &str, source: &str) -> Result<liandan_proto::v1::JobStatus, CliError> {
        let expected_workers = self.children.len() - 1;
        let admin_token = self.admin_token.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| CliError::Usage(e.to_string()))?;
        let addr = self.addr.clone();
        rt.block_on(async move {
            let ep = tonic::transport::Endpoint::from_shared(addr.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
            let ch = ep.connect().await.map_err(|e| CliError::Usage(format!("coordinator at {addr}: {e}")))?;
            let token = liandan_proto::auth::TokenSource::literal(&admin_token, "the local cluster's admin token").map_err(|e| CliError::Usage(e.to_string()))?;
            let mut c = liandan_proto::auth::client(ch, Some(token));
            // Submit once every local worker has registered, so the job starts with all of them.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let ws = crate::cluster::all_workers(&mut c).await?;
                if ws.iter().filter(|w| w.state == "idle").count() >= expected_workers {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    eprintln!("only {} of {expected_workers} workers registered after 30 s; starting anyway", ws.len());
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let id = c
                .submit_job(liandan_proto::v1::SubmitJobRequest { spec_toml: spec.to_string(), source: source.to_string() })
                .await
                .map_err(|e| CliError::Usage(e.message().to_string()))?
                .into_inner()
                .job_id;
            eprintln!("job {id} submitted to {addr}");
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tokio::select! {
                r = crate::cluster::watch_async(&mut c, id, tty) => r,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted: cancelling job {id} and stopping the cluster");
                    let _ = c.cancel_job(liandan_proto::v1::JobRef { job_id: id }).await;
                    Err(CliError::Usage("interrupted".into()))
                }
            }
        })
    }

    /// Process ids of the workers.
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.children.iter().filter(|(n, _)| n.starts_with("worker")).map(|(_, c)| c.id()).collect()
    }

    /// SIGINT to every child, then SIGKILL to those still running after 5 s.
    pub(crate) fn stop(&mut self) {
        for (_, ch) in self.children.iter().rev() {
            let _ = std::process::Command::new("kill").args(["-INT", &ch.id().to_string()]).status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for (name, ch) in self.children.iter_mut().rev() {
            loop {
                match ch.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
                    _ => {
                        eprintln!("{name} did not stop: killing it");
                        let _ = ch.kill();
                        let _ = ch.wait();
                        break;
                    }
                }
            }
        }
    }
}

fn write(path: &Path, body: &str) -> Result<(), CliError> {
    let io = |e| CliError::Io { path: path.display().to_string(), source: e };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, body).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::Aims;

    #[test]
    fn steps_scale_every_phase_by_the_first_phases_factor() {
        let spec = "name = \"x\"\n[[phases]]\nname = \"a\"\nsteps = 1200\n[[phases]]\nname = \"b\"\nsteps = 1000\n[[phases]]\nname = \"c\"\nsteps = 1\n";
        let out: toml::Table = super::scale_steps(spec, 12).unwrap().parse().unwrap();
        let steps: Vec<i64> = out["phases"].as_array().unwrap().iter().map(|p| p["steps"].as_integer().unwrap()).collect();
        assert_eq!(steps, [12, 10, 1]);
        assert!(super::scale_steps("name = \"x\"\n", 5).is_err());
    }

    #[test]
    fn the_demo_is_scored_on_the_tasks_its_sft_phase_trains() {
        assert_eq!(super::sft_tasks(super::DEMO_JOB), ["poem"]);
        assert!(super::sft_tasks("[[phases]]\nname = \"s\"\nkind = \"sft\"\n").is_empty());
    }

    #[test]
    fn aims_say_met_or_by_how_much_they_miss() {
        let lines = Aims { sft_sampled: Some(0.194), reward_accuracy: Some(0.95), ppo: Some((0.30, 12.5)) }.lines();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("19.4%, missed by 30.6 points"), "{}", lines[0]);
        assert!(lines[1].ends_with("95.0%, met"), "{}", lines[1]);
        assert!(lines[2].contains("+10.6 points, missed by 9.4 points; KL 12.50 over 10"), "{}", lines[2]);
        let ppo_only = Aims { sft_sampled: None, reward_accuracy: None, ppo: Some((0.5, 1.0)) }.lines();
        assert!(ppo_only.is_empty(), "PPO's gain needs the SFT number: {ppo_only:?}");
    }
}
