//! The cluster end to end: a real coordinator and real workers (child processes) on 127.0.0.1
//! with ephemeral ports, synchronised by polling status with deadlines.
//!
//! Equivalence tolerance: the global batch is fixed, so 1, 2 or 3 workers compute the same
//! trajectory up to float summation order (the ring sums each segment in a different order than
//! one process's matmuls). On this tiny model that is ~1e-6 relative per step; after the few
//! steps these tests run, the losses agree to 1e-4 relative, which any real bug (a sample read
//! twice, a gradient not divided by the global batch, a wrong resume step) exceeds by orders of
//! magnitude.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::local::{Proc, prepared, spawn, wait_for};
use common::{liandan, s, scratch};
use liandan_coordinator::store::Store;

const TOLERANCE: f64 = 1e-4;

fn spec(dir: &Path, data: &Path, steps: u64, every: u64, min_workers: u32) -> PathBuf {
    spec_with(dir, data, steps, every, min_workers, 16)
}

/// `seq_len` sets the work per step (longer steps leave time to inject a failure mid-phase).
fn spec_with(dir: &Path, data: &Path, steps: u64, every: u64, min_workers: u32, seq_len: usize) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "test"
[model]
preset = "nano"
layers = 1
channels = 32
heads = 2
[data]
prepared = "{}"
[cluster]
min_workers = {min_workers}
max_workers = 3
[checkpoint]
dir = "{}"
every = {every}
[[phases]]
name = "pretrain"
kind = "pretrain"
steps = {steps}
global_batch = 6
seq_len = {seq_len}
lr = 1e-2
warmup = 2
"#,
            data.display(),
            dir.join("ckpt").display()
        ),
    )
    .unwrap();
    p
}

struct Cluster {
    dir: PathBuf,
    addr: String,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
}

impl Cluster {
    fn start(dir: &Path, workers: usize) -> Cluster {
        let addr_file = dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let coordinator = spawn(
            &["coordinator", "--listen", "127.0.0.1:0", "--store", s(&dir.join("store.db")), "--addr-file", s(&addr_file), "--lease-ms", "1500"],
            &dir.join("coordinator.log"),
        );
        let addr = wait_for(20, "the coordinator's address file", || std::fs::read_to_string(&addr_file).ok().filter(|a| a.ends_with('\n'))).trim().to_string();
        let mut c = Cluster { dir: dir.to_path_buf(), addr, coordinator: Some(coordinator), workers: vec![] };
        for _ in 0..workers {
            c.add_worker();
        }
        c.wait_idle(workers);
        c
    }

    fn add_worker(&mut self) {
        let i = self.workers.len();
        let w = spawn(&["worker", "--coordinator", &self.addr, "--threads", "1"], &self.dir.join(format!("worker-{i}.log")));
        self.workers.push(w);
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        liandan(&[args, &["--coordinator", &self.addr]].concat())
    }

    fn wait_idle(&self, n: usize) {
        wait_for(30, &format!("{n} idle workers"), || {
            let o = self.cli(&["workers"]);
            let idle = String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(" idle ")).count();
            (idle >= n).then_some(())
        });
    }

    fn submit(&self, spec: &Path) -> u64 {
        let o = self.cli(&["submit", s(spec)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn status(&self, job: u64) -> String {
        String::from_utf8_lossy(&self.cli(&["status", &job.to_string()]).stdout).into_owned()
    }

    fn wait_state(&self, job: u64, state: &str, secs: u64) -> String {
        wait_for(secs, &format!("job {job} to be {state}"), || {
            let st = self.status(job);
            assert!(!st.contains(": failed"), "job failed: {st}\n{}", self.logs());
            st.lines().next().is_some_and(|l| l.contains(&format!(": {state}"))).then_some(st)
        })
    }

    /// Waits until the phase has committed a checkpoint at or after `step`.
    fn wait_checkpoint(&self, job: u64, step: u64) {
        wait_for(120, &format!("a checkpoint at step {step}"), || {
            let st = self.status(job);
            let at = st.split("(step ").nth(1).and_then(|t| t.split(')').next()).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            (at >= step).then_some(())
        });
    }

    fn losses(&self, job: u64) -> Vec<f64> {
        let store = Store::open_read_only(&self.dir.join("store.db")).unwrap();
        store.metrics(job, 0).unwrap().iter().map(|m| m.loss).collect()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                s.push_str(&format!("--- {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
            }
        }
        s
    }
}

fn assert_trajectories_match(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(((x - y) / y).abs() < TOLERANCE, "{what}: step {} loss {x} vs {y}", i + 1);
    }
}

fn run_world(name: &str, workers: usize, steps: u64, every: u64, seq_len: usize) -> Vec<f64> {
    let d = scratch(name);
    let data = prepared(&d);
    let c = Cluster::start(&d, workers);
    let job = c.submit(&spec_with(&d, &data, steps, every, workers as u32, seq_len));
    let st = c.wait_state(job, "succeeded", 180);
    assert!(st.contains(&format!("world {workers}")), "{st}");
    c.losses(job)
}

#[test]
fn one_two_and_three_workers_follow_the_same_trajectory() {
    let one = run_world("w1", 1, 8, 4, 16);
    assert_eq!(one.len(), 8);
    assert!(one[7] < one[0], "the loss falls: {one:?}");
    eprintln!("1 worker: {one:?}");
    let two = run_world("w2", 2, 8, 4, 16);
    eprintln!("2 workers: {two:?}");
    assert_trajectories_match(&two, &one, "2 workers vs 1");
    let three = run_world("w3", 3, 8, 4, 16);
    assert_trajectories_match(&three, &one, "3 workers vs 1");
}

#[test]
fn a_killed_worker_is_replaced_by_the_survivors_from_the_last_checkpoint() {
    // Long enough (a few seconds) that the kill lands mid-phase.
    let (steps, every, seq_len) = (300, 50, 48);
    let reference = run_world("kill-ref", 1, steps, every, seq_len);
    let d = scratch("kill");
    let data = prepared(&d);
    let mut c = Cluster::start(&d, 2);
    let job = c.submit(&spec_with(&d, &data, steps, every, 1, seq_len));
    c.wait_checkpoint(job, every);
    // SIGKILL one worker mid-phase.
    let mut victim = c.workers.remove(1);
    victim.child.kill().unwrap();
    let st = c.wait_state(job, "succeeded", 180);
    assert!(st.contains("world 1"), "the survivor finished alone: {st}");
    let generation: u64 = st.split(" gen ").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|g| g.parse().ok()).unwrap();
    assert!(generation >= 2, "the group re-formed: {st}");
    assert_trajectories_match(&c.losses(job), &reference, "with a failure vs 1 worker");
    let workers = String::from_utf8_lossy(&c.cli(&["workers"]).stdout).into_owned();
    assert!(workers.contains(" dead "), "{workers}");
}

#[test]
fn a_late_worker_joins_at_a_checkpoint_boundary_and_a_drained_one_leaves() {
    let d = scratch("join");
    let data = prepared(&d);
    let mut c = Cluster::start(&d, 1);
    let job = c.submit(&spec_with(&d, &data, 300, 50, 1, 48));
    wait_for(60, "the job to run", || c.status(job).contains("running").then_some(()));
    c.add_worker();
    // It joins at the next boundary: the phase reaches world 2.
    wait_for(120, "world 2", || c.status(job).contains("world 2").then_some(()));
    // Drain the newcomer: it leaves at the next boundary and its process exits cleanly.
    let o = c.cli(&["workers", "drain", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = c.wait_state(job, "succeeded", 180);
    let exit = wait_for(30, "the drained worker to exit", || c.workers[1].child.try_wait().unwrap());
    assert!(exit.success(), "drained worker exit: {exit:?}");
    let workers = String::from_utf8_lossy(&c.cli(&["workers"]).stdout).into_owned();
    assert!(workers.contains(" drained "), "{workers}\n{st}");
    assert_eq!(c.losses(job).len(), 300);
}

#[test]
fn the_coordinator_restarts_from_its_store_and_the_job_finishes() {
    let d = scratch("restart");
    let data = prepared(&d);
    let mut c = Cluster::start(&d, 2);
    let job = c.submit(&spec_with(&d, &data, 300, 50, 1, 48));
    c.wait_checkpoint(job, 50);
    let mut coord = c.coordinator.take().unwrap();
    coord.child.kill().unwrap();
    let _ = coord.child.wait();
    // Restart on the same address with the same store.
    let listen = c.addr.trim_start_matches("http://").to_string();
    let restarted = spawn(&["coordinator", "--listen", &listen, "--store", s(&d.join("store.db")), "--lease-ms", "1500"], &d.join("coordinator2.log"));
    c.coordinator = Some(restarted);
    let st = c.wait_state(job, "succeeded", 180);
    assert!(st.contains("step 300/300"), "{st}");
}

#[test]
fn standard_grpc_tools_see_health_and_reflection() {
    let d = scratch("health");
    let c = Cluster::start(&d, 0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(c.addr.clone()).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        // Health needs no token (load balancers and probes have none); reflection needs the admin token.
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: "liandan.v1.Coordinator".into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut refl = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let refused = refl.server_reflection_info(tokio_stream::iter(vec![req.clone()])).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let mut authed = tonic::Request::new(tokio_stream::iter(vec![req]));
        authed.metadata_mut().insert("authorization", format!("Bearer {}", common::ADMIN_TOKEN).parse().unwrap());
        let mut stream = refl.server_reflection_info(authed).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected reflection reply") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"liandan.v1.Coordinator".to_string()), "{names:?}");
    });
}

#[test]
fn cancel_bad_specs_and_an_absent_coordinator() {
    let d = scratch("cancel");
    let data = prepared(&d);
    let c = Cluster::start(&d, 1);
    let job = c.submit(&spec(&d, &data, 100_000, 1000, 1));
    wait_for(60, "the job to run", || c.status(job).contains("running").then_some(()));
    let o = c.cli(&["cancel", &job.to_string()]);
    assert!(o.status.success());
    c.wait_state(job, "cancelled", 30);
    c.wait_idle(1);

    // A typo'd key: refused with the key path; the store has no new job.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, std::fs::read_to_string(spec(&d, &data, 5, 5, 1)).unwrap().replace("global_batch", "global_bacth")).unwrap();
    let o = c.cli(&["submit", s(&bad)]);
    common::assert_one_line_error(&o, &["bad.toml", "phases[0]", "global_bacth"]);
    let o = c.cli(&["status"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).matches("job ").count(), 1, "only the cancelled job exists");
    let o = c.cli(&["status", "999"]);
    common::assert_one_line_error(&o, &["job 999 does not exist"]);

    // A worker pointed at a coordinator that is not there: retries with backoff, then a clear error.
    let o = liandan(&["worker", "--coordinator", "http://127.0.0.1:9", "--max-attempts", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("retry 1") && err.contains("retry 2"), "{err}");
    assert!(err.contains("error: coordinator at http://127.0.0.1:9 not reachable after 3 attempts"), "{err}");
}

#[test]
fn pretrain_then_sft_with_lineage_and_a_bad_sft_file_refused_at_submit() {
    let d = scratch("sft");
    let data = prepared(&d);
    let sft = d.join("sft.jsonl");
    let mut lines = String::new();
    for i in 0..200 {
        lines.push_str(&serde_json::json!({"prompt": format!("请接出下一句：床前明月光{i}，"), "response": "疑是地上霜。"}).to_string());
        lines.push('\n');
    }
    std::fs::write(&sft, lines).unwrap();
    let base = std::fs::read_to_string(spec(&d, &data, 6, 3, 1)).unwrap();
    let two_phase = format!("{base}\n[[phases]]\nname = \"sft\"\nkind = \"sft\"\ndata = \"{}\"\nsteps = 4\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n", sft.display());
    let spec_path = d.join("two.toml");
    std::fs::write(&spec_path, &two_phase).unwrap();
    let c = Cluster::start(&d, 2);
    let job = c.submit(&spec_path);
    let st = c.wait_state(job, "succeeded", 180);
    assert!(st.contains("phase 1 sft") && st.contains("step 4/4"), "{st}");
    assert!(st.contains("from ") && st.contains("0-pretrain/step-00000006"), "the sft phase records its input checkpoint: {st}");
    let store = Store::open_read_only(&d.join("store.db")).unwrap();
    assert_eq!(store.metrics(job, 1).unwrap().len(), 4);
    let ckpt = store.phase(job, 1).unwrap().unwrap().last_checkpoint;
    let eval: serde_json::Value = serde_json::from_slice(&std::fs::read(Path::new(&ckpt).join("sft_eval.json")).unwrap()).unwrap();
    assert!(eval["val_loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0), "{eval}");
    // The task score: held-out prompts answered greedily and scored by exact match.
    let (passed, total) = (eval["tasks"]["answer"][0].as_u64(), eval["tasks"]["answer"][1].as_u64());
    assert!(passed.is_some() && total.is_some_and(|n| n > 0), "{eval}");

    // An SFT line without a response: refused before any training, naming file, line and field.
    std::fs::write(&sft, "{\"prompt\": \"只有问题\"}\n").unwrap();
    let o = c.cli(&["submit", s(&spec_path)]);
    common::assert_one_line_error(&o, &["phases[1].data", "sft.jsonl:1", "field 'response' is missing"]);
}

/// Writes the SFT examples and rule-derived comparisons of the recipe tests.
fn recipe_files(d: &Path) -> (PathBuf, PathBuf) {
    let sft = d.join("sft.jsonl");
    let pref = d.join("pref.jsonl");
    let (mut a, mut b) = (String::new(), String::new());
    for i in 0..40 {
        a.push_str(&serde_json::json!({"prompt": format!("请接出下一句：床前明月光{i}，"), "response": "疑是地上霜。", "task": "next_line"}).to_string());
        a.push('\n');
        b.push_str(
            &serde_json::json!({"prompt": format!("请接出下一句：床前明月光{i}，"), "chosen": "疑是地上霜。", "rejected": "黄河入海流。", "label_source": "rule"}).to_string(),
        );
        b.push('\n');
    }
    std::fs::write(&sft, a).unwrap();
    std::fs::write(&pref, b).unwrap();
    (sft, pref)
}

const PPO_PHASE: &str =
    "\n[[phases]]\nname = \"ppo\"\nkind = \"ppo\"\ndata = \"SFT\"\nsteps = 3\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n[phases.ppo]\nmax_new_tokens = 8\nreward = \"both\"\n";

#[test]
fn the_whole_recipe_pretrain_sft_reward_ppo_and_a_degenerate_pair_refused_at_submit() {
    let d = scratch("reward");
    let data = prepared(&d);
    let (sft, pref) = recipe_files(&d);
    let base = std::fs::read_to_string(spec(&d, &data, 4, 2, 1)).unwrap();
    let phases = format!(
        "{base}\n[[phases]]\nname = \"sft\"\nkind = \"sft\"\ndata = \"{}\"\nsteps = 2\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n\n[[phases]]\nname = \"reward\"\nkind = \"reward\"\ndata = \"{}\"\nsteps = 4\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n{}",
        sft.display(),
        pref.display(),
        PPO_PHASE.replace("SFT", s(&sft))
    );
    let spec_path = d.join("four.toml");
    std::fs::write(&spec_path, &phases).unwrap();
    let c = Cluster::start(&d, 2);
    let job = c.submit(&spec_path);
    let st = c.wait_state(job, "succeeded", 240);
    assert!(st.contains("phase 2 reward") && st.contains("step 4/4"), "{st}");
    let store = Store::open_read_only(&d.join("store.db")).unwrap();
    let losses: Vec<f64> = store.metrics(job, 2).unwrap().iter().map(|m| m.loss).collect();
    assert_eq!(losses.len(), 4);
    // The head starts at zero, so the first Bradley–Terry loss is exactly ln 2.
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-9, "{losses:?}");
    let ckpt = store.phase(job, 2).unwrap().unwrap().last_checkpoint;
    assert!(Path::new(&ckpt).join("reward_eval.json").exists() && Path::new(&ckpt).join("score_head.json").exists(), "{ckpt}");

    // PPO started from the SFT model (not from the reward model just before it), reported its
    // statistics with every step, and the status shows them with the lineage and evaluations.
    let sft_ckpt = store.phase(job, 1).unwrap().unwrap().last_checkpoint;
    let ppo = store.phase(job, 3).unwrap().unwrap();
    assert_eq!(ppo.input_checkpoint, sft_ckpt);
    let m = store.metrics(job, 3).unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[0].values["kl"], 0.0, "the first rollout comes from the reference itself");
    for k in ["reward", "rm_score", "clip_frac", "entropy", "value_loss", "verifier_pass"] {
        assert!(m.iter().all(|r| r.values[k].is_finite()), "{k}: {m:?}");
    }
    // Rank 0's first sampled answers of each step are kept to look at (global batch 4 over 2
    // workers: 2 per step), with the reward they got; the first step's KL is zero.
    let samples = store.recent_samples(job, 3, 10).unwrap();
    assert_eq!(samples.iter().map(|x| x.step).collect::<Vec<_>>(), [3, 3, 2, 2, 1, 1], "{samples:?}");
    assert!(samples.iter().all(|x| !x.prompt.is_empty() && x.reward.is_finite() && x.rm_score.is_finite()), "{samples:?}");
    assert!(samples.iter().filter(|x| x.step == 1).all(|x| x.kl == 0.0), "{samples:?}");
    for f in ["critic.safetensors", "critic_optimizer.safetensors", "ppo_state.json", "ppo_eval.json", "tokenizer.json"] {
        assert!(Path::new(&ppo.last_checkpoint).join(f).exists(), "{f} in {}", ppo.last_checkpoint);
    }
    assert!(st.contains("phase 3 ppo") && st.contains(&format!("from {sft_ckpt}")), "{st}");
    assert!(st.contains("last step:") && st.contains("kl ") && st.contains("evaluation: {") && st.contains("\"accuracy\""), "{st}");

    // chosen == rejected: refused before any training, naming file, line and fields.
    std::fs::write(&pref, "{\"prompt\": \"p\", \"chosen\": \"同\", \"rejected\": \"同\"}\n").unwrap();
    let o = c.cli(&["submit", s(&spec_path)]);
    common::assert_one_line_error(&o, &["phases[2].data", "pref.jsonl:1", "'chosen' and 'rejected' are the same"]);
    // A ppo phase whose reward checkpoint is of another kind (the SFT model has no scalar head).
    let bad = format!(
        "{base}{}reward_checkpoint = \"{sft_ckpt}\"\ninit = \"{sft_ckpt}\"\n",
        PPO_PHASE.replace("SFT", s(&sft)).replace("[phases.ppo]\nmax_new_tokens = 8\nreward = \"both\"\n", "")
    );
    std::fs::write(&spec_path, bad).unwrap();
    let o = c.cli(&["submit", s(&spec_path)]);
    common::assert_one_line_error(&o, &["phases[1].reward_checkpoint", "is not a reward-model checkpoint"]);
}

#[test]
fn grpo_and_dpo_from_one_sft_model_on_two_workers_and_bad_settings_refused_at_submit() {
    let d = scratch("grpo-dpo");
    let data = prepared(&d);
    let (sft, pref) = recipe_files(&d);
    let base = std::fs::read_to_string(spec(&d, &data, 4, 2, 1)).unwrap();
    let phase = |name: &str, kind: &str, data: &Path, steps: u64, extra: &str| {
        format!("\n[[phases]]\nname = \"{name}\"\nkind = \"{kind}\"\ndata = \"{}\"\nsteps = {steps}\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n{extra}", data.display())
    };
    // The recipe's prompts ask for no poem form, so GRPO is scored by the reward model here.
    let phases = format!(
        "{base}{}{}{}{}",
        phase("sft", "sft", &sft, 2, ""),
        phase("reward", "reward", &pref, 2, ""),
        phase("grpo", "grpo", &sft, 3, "[phases.grpo]\ngroup_size = 3\nreward = \"model\"\nmax_new_tokens = 8\n"),
        phase("dpo", "dpo", &pref, 3, "from = \"sft\"\n[phases.dpo]\nbeta = 0.2\n"),
    );
    let spec_path = d.join("post.toml");
    std::fs::write(&spec_path, &phases).unwrap();
    let c = Cluster::start(&d, 2);
    let job = c.submit(&spec_path);
    let st = c.wait_state(job, "succeeded", 240);
    let store = Store::open_read_only(&d.join("store.db")).unwrap();
    let sft_ckpt = store.phase(job, 1).unwrap().unwrap().last_checkpoint;
    // Both start from the SFT model (GRPO's reference; DPO's reference and start).
    for k in [3, 4] {
        assert_eq!(store.phase(job, k).unwrap().unwrap().input_checkpoint, sft_ckpt, "phase {k}");
    }
    let g = store.metrics(job, 3).unwrap();
    assert_eq!(g.len(), 3);
    assert_eq!(g[0].values["kl"], 0.0, "the first rollout comes from the reference itself");
    for k in ["reward", "reward_std", "zero_signal", "rm_score", "clip_frac", "entropy", "answer_tokens", "verifier_pass"] {
        assert!(g.iter().all(|r| r.values[k].is_finite()), "{k}: {g:?}");
    }
    let m = store.metrics(job, 4).unwrap();
    assert_eq!(m.len(), 3);
    assert!((m[0].loss - std::f64::consts::LN_2).abs() < 1e-5, "DPO starts at its reference: loss ln 2, got {}", m[0].loss);
    assert!(m[1].values.contains_key("heldout_accuracy") && m[2].values.contains_key("heldout_accuracy"), "{m:?}");
    let dpo = store.phase(job, 4).unwrap().unwrap().last_checkpoint;
    for f in ["dpo_reference.bin", "dpo_eval.json", "tokenizer.json"] {
        assert!(Path::new(&dpo).join(f).exists(), "{f} in {dpo}");
    }
    assert!(Path::new(&store.phase(job, 3).unwrap().unwrap().last_checkpoint).join("grpo_eval.json").exists());
    assert!(st.contains("phase 3 grpo") && st.contains("phase 4 dpo"), "{st}");

    // At submit: G = 1, β = 0, a reward model that does not exist, pairs identical once cut.
    let refuse = |toml: String, needles: &[&str]| {
        std::fs::write(&spec_path, toml).unwrap();
        common::assert_one_line_error(&c.cli(&["submit", s(&spec_path)]), needles);
    };
    let sft_phase = phase("sft", "sft", &sft, 2, "");
    refuse(format!("{base}{sft_phase}{}", phase("g", "grpo", &sft, 2, "[phases.grpo]\ngroup_size = 1\nreward = \"model\"\n")), &["phases[2].grpo.group_size", "got 1"]);
    refuse(format!("{base}{sft_phase}{}", phase("d", "dpo", &pref, 2, "[phases.dpo]\nbeta = 0.0\n")), &["phases[2].dpo.beta", "must be finite and > 0"]);
    refuse(format!("{base}{sft_phase}{}", phase("g", "grpo", &sft, 2, "[phases.grpo]\nreward = \"both\"\n")), &["phases[2].reward_model", "needs a reward model"]);
    refuse(
        format!("{base}{sft_phase}{}", phase("g", "grpo", &sft, 2, "reward_model = \"judge\"\n[phases.grpo]\nreward = \"model\"\n")),
        &["phases[2].reward_model", "no phase named 'judge'"],
    );
    let same = d.join("same.jsonl");
    let long = "床前明月光".repeat(30);
    std::fs::write(&same, format!("{{\"prompt\": \"p\", \"chosen\": \"{long}甲\", \"rejected\": \"{long}乙\"}}\n")).unwrap();
    refuse(format!("{base}{}", phase("d", "dpo", &same, 2, &format!("init = \"{sft_ckpt}\"\n"))), &["phases[1].data", "same.jsonl", "identical after tokenization"]);
}

/// `liandan label` with its answers piped in.
fn label(c: &Cluster, job: u64, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = common::command()
        .args(["label", &job.to_string(), "--labeler", "tester", "--coordinator", &c.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn human_labels_train_a_reward_model_and_a_failed_job_resumes_at_its_phase() {
    let d = scratch("label");
    let data = prepared(&d);
    let (sft, _) = recipe_files(&d);
    let base = std::fs::read_to_string(spec(&d, &data, 2, 2, 1)).unwrap();
    let spec_a = d.join("a.toml");
    std::fs::write(&spec_a, format!("{base}\n[[phases]]\nname = \"sft\"\nkind = \"sft\"\ndata = \"{}\"\nsteps = 2\nglobal_batch = 4\nseq_len = 64\nlr = 1e-3\n", sft.display()))
        .unwrap();
    let c = Cluster::start(&d, 1);
    let a = c.submit(&spec_a);
    c.wait_state(a, "succeeded", 180);

    // Three comparisons shown; 1, 2, then an unknown key, then skip.
    let o = label(&c, a, "1\n2\nx\ns\n");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("[1] ") && out.contains("[2] ") && out.contains("'x' is not one of") && out.contains("3 comparison(s) labelled as tester"), "{out}");
    let store = Store::open_read_only(&d.join("store.db")).unwrap();
    // A fourth was shown when the input ended: it stays open for the next session.
    assert_eq!(store.comparison_counts(a).unwrap(), (4, 3));
    assert_eq!(store.open_comparison(a).unwrap().map(|c| c.id), Some(4));
    assert_eq!(store.decided_comparisons(0, 100).unwrap().len(), 2, "the skipped one trains nothing");

    // Bad labels: refused with the right status, nothing changes.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cl = liandan_proto::v1::coordinator_client::CoordinatorClient::connect(c.addr.clone()).await.unwrap();
        let cases = [(1, "b", tonic::Code::FailedPrecondition), (999, "a", tonic::Code::NotFound), (1, "best", tonic::Code::InvalidArgument)];
        for (id, choice, code) in cases {
            let mut req = tonic::Request::new(liandan_proto::v1::PreferenceLabel { comparison_id: id, choice: choice.into(), labeler: "x".into() });
            req.metadata_mut().insert("authorization", format!("Bearer {}", common::ADMIN_TOKEN).parse().unwrap());
            assert_eq!(cl.clone().submit_preference(req).await.unwrap_err().code(), code, "comparison {id} '{choice}'");
        }
    });
    assert_eq!(store.comparison(1).unwrap().unwrap().choice, "a");

    // Job B: a reward model on the human labels, then PPO, both from job A's SFT model. The
    // PPO prompts vanish while the reward phase runs: the job fails in the ppo phase, and
    // resumes there once they are back.
    let sft_ckpt = store.phase(a, 1).unwrap().unwrap().last_checkpoint;
    let prompts = d.join("prompts.jsonl");
    std::fs::copy(&sft, &prompts).unwrap();
    let spec_b = d.join("b.toml");
    let head = base.split("[[phases]]").next().unwrap();
    std::fs::write(
        &spec_b,
        format!(
            "{head}[[phases]]\nname = \"reward\"\nkind = \"reward\"\ninit = \"{sft_ckpt}\"\ncomparisons = \"labelled\"\nsteps = 20\nglobal_batch = 2\nseq_len = 64\nlr = 1e-3\n{}init = \"{sft_ckpt}\"\n",
            PPO_PHASE.replace("SFT", s(&prompts)).replace("[phases.ppo]\nmax_new_tokens = 8\nreward = \"both\"\n", "")
        ),
    )
    .unwrap();
    let b = c.submit(&spec_b);
    std::fs::remove_file(&prompts).unwrap();
    let st = wait_for(180, "job b to fail", || {
        let st = c.status(b);
        st.lines().next().is_some_and(|l| l.contains(": failed")).then_some(st)
    });
    assert!(st.contains("phase 1 ppo") && st.contains("prompts.jsonl"), "{st}");
    let reward = store.phase(b, 0).unwrap().unwrap();
    let exported = std::fs::read_to_string(Path::new(&reward.checkpoint_dir).join("labelled_comparisons.jsonl")).unwrap();
    assert_eq!(exported.lines().count(), 2);
    assert!(exported.lines().all(|l| l.contains("\"label_source\":\"human\"") && l.contains("\"labeler\":\"tester\"")), "{exported}");
    std::fs::copy(&sft, &prompts).unwrap();
    let o = c.cli(&["resume", &b.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = c.wait_state(b, "succeeded", 180);
    assert!(st.contains("phase 0 reward") && st.contains("step 20/20"), "the reward phase was not run again: {st}");
    assert_eq!(store.metrics(b, 0).unwrap().len(), 20);
    assert_eq!(store.metrics(b, 1).unwrap().len(), 3);
    let o = c.cli(&["resume", &b.to_string()]);
    common::assert_one_line_error(&o, &["only a failed job resumes"]);
}
