//! The PPO phase end to end on small random models: one rank equals two ranks (TCP ring), a
//! phase stopped at a checkpoint and resumed ends exactly where an uninterrupted one does, and
//! a bad reward model is refused before any training.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use liandan_data::shard::{Manifest, sha256_hex};
use liandan_data::tokenizer::ChatTokenizer;
use liandan_worker::checkpoint::{self, DataCursor, SaveInfo};
use liandan_worker::collective::{Collective, Local, RingOptions, TcpRing};
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::phase::ppo::run_ppo;
use liandan_worker::phase::reward::{HEAD_FILE, ScalarHead};
use liandan_worker::phase::{PhaseEvents, PhaseIo, PhaseOutcome, Start, StepMetrics};
use liandan_worker::plan::{PhaseKind, PhasePlan, PpoSettings, RewardSource};
use liandan_worker::rng::Rng;
use liandan_worker::{Gpt, GptConfig};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("liandan-ppo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const POEMS: [&str; 4] = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
];

/// Prepared data (tokenizer + manifest, no shards: PPO reads none), prompts, a reference
/// (SFT) checkpoint and a reward checkpoint of random small models. Returns the plan.
fn fixture(dir: &Path, steps: u64) -> PhasePlan {
    let corpus: Vec<String> = POEMS.iter().map(|p| format!("写一首五言绝句，题目是《静夜》\n{p}")).collect();
    let tk = ChatTokenizer::train(corpus.iter().cycle().take(200), 300).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    tk.save(&data.join("tokenizer.json")).unwrap();
    let bytes = std::fs::read(data.join("tokenizer.json")).unwrap();
    let manifest = Manifest {
        format: "liandan-shards".into(),
        version: liandan_data::shard::VERSION,
        tokenizer: "tokenizer.json".into(),
        tokenizer_sha256: sha256_hex(&bytes),
        vocab_size: tk.vocab_size(),
        dtype: 2,
        eos: tk.special.eos,
        splits: Default::default(),
    };
    manifest.save(&data).unwrap();
    let prompts = dir.join("prompts.jsonl");
    let lines: String =
        (0..24).map(|i| serde_json::json!({"prompt": format!("写一首五言绝句，题目是《月{i}》"), "response": POEMS[i % 4], "task": "poem"}).to_string() + "\n").collect();
    std::fs::write(&prompts, lines).unwrap();

    let model = GptConfig::new(tk.vocab_size(), 64, 1, 2, 16);
    let save = |name: &str, seed: u64, head: Option<&ScalarHead>| -> PathBuf {
        let mut m = Gpt::new(model.clone(), 1, 8).unwrap();
        m.init_weights(&mut Rng::new(seed));
        let mut extra = vec![("tokenizer.json".to_string(), bytes.clone())];
        if let Some(h) = head {
            extra.push((HEAD_FILE.to_string(), serde_json::to_vec(h).unwrap()));
        }
        let info = SaveInfo { step: 1, rng_state: 0, train_config: None, data_cursor: DataCursor { position: 0 }, tokenizer: "tokenizer.json", extra_files: &extra };
        let d = dir.join(name);
        checkpoint::save(&d, &model, &m.params, None, &info).unwrap();
        d
    };
    let mut rng = Rng::new(9);
    let head = ScalarHead { weight: (0..16).map(|_| rng.normal()).collect(), bias: 0.1 };
    let reference = save("sft", 1, None);
    let reward = save("reward", 2, Some(&head));
    PhasePlan {
        kind: PhaseKind::Ppo,
        model,
        data_dir: data,
        steps,
        global_batch: 4,
        seq_len: 40,
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup: 1,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 7,
        checkpoint_every: 2,
        examples: Some(prompts),
        from_phase: None,
        reward_phase: None,
        init_checkpoint: Some(reference),
        reward_checkpoint: Some(reward),
        ppo: Some(PpoSettings {
            reward: RewardSource::Both,
            max_new_tokens: 10,
            epochs: 2,
            minibatches: 2,
            kl_target: Some(1.0),
            kl_horizon: 100.0,
            entropy_coef: 0.01,
            ..Default::default()
        }),
        grpo: None,
        dpo: None,
        comparisons: Default::default(),
        tasks: Vec::new(),
        max_skipped_steps: 0,
        device: None,
        labelled_examples: None,
        prepare: None,
        shard_optimizer: false,
    }
}

/// Collects rank 0's steps; stops the phase at `stop_at` (as a re-forming group would).
#[derive(Default)]
struct Recorder {
    steps: Vec<StepMetrics>,
    stop_at: Option<u64>,
}

impl PhaseEvents for Recorder {
    fn step(&mut self, m: StepMetrics) {
        self.steps.push(m);
    }
    fn checkpoint(&mut self, step: u64, _path: &Path) -> Result<bool, String> {
        Ok(self.stop_at == Some(step))
    }
}

fn run(plan: &PhasePlan, resume: Option<&Path>, ckpt: &Path, coll: &mut dyn Collective, ev: &mut Recorder) -> PhaseOutcome {
    // `resume`: this phase's own checkpoint to continue; without it the policy starts from the
    // reference (the plan's init checkpoint).
    let start = resume.map_or(Start::Fresh, Start::Continue);
    let io = PhaseIo { checkpoint_dir: ckpt, engine: &CpuEngine, coll, abort: &AtomicBool::new(false), events: ev };
    run_ppo(plan, start, io).unwrap()
}

fn final_params(outcome: &PhaseOutcome) -> Vec<f32> {
    let PhaseOutcome::Finished { final_checkpoint: Some(dir) } = outcome else { panic!("not finished: {outcome:?}") };
    checkpoint::load(dir, None).unwrap().params
}

fn value(m: &StepMetrics, k: &str) -> f64 {
    m.values.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k} in {:?}", m.values)).1
}

#[test]
fn ppo_on_two_ranks_follows_one_rank() {
    let d = scratch("world");
    let plan = fixture(&d, 3);
    let mut one = Recorder::default();
    let single = final_params(&run(&plan, None, &d.join("one"), &mut Local, &mut one));
    assert_eq!(one.steps.len(), 3);
    for m in &one.steps {
        for k in ["reward", "kl", "clip_frac", "entropy", "value_loss", "verifier_pass", "beta"] {
            assert!(value(m, k).is_finite(), "{k} = {}", value(m, k));
        }
        assert!(value(m, "entropy") > 0.0 && (0.0..=1.0).contains(&value(m, "clip_frac")));
    }
    // The first rollout comes from the reference itself: KL 0 exactly.
    assert_eq!(value(&one.steps[0], "kl"), 0.0);
    assert!(one.steps.iter().any(|m| value(m, "clip_frac") > 0.0), "later epochs move the ratio");

    let listeners: Vec<_> = (0..2).map(|_| TcpRing::listen("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let results: Vec<(Recorder, PhaseOutcome)> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (plan, peers, d) = (&plan, &peers, &d);
                s.spawn(move || {
                    let mut ring = TcpRing::connect(&l, rank, peers, 1, RingOptions::default()).unwrap();
                    let mut ev = Recorder::default();
                    let out = run(plan, None, &d.join("two"), &mut ring, &mut ev);
                    (ev, out)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let two = final_params(&results[0].1);
    assert_eq!(results[1].1, PhaseOutcome::Finished { final_checkpoint: None }, "only rank 0 writes");
    // Tolerance: the two runs differ only in float summation order (the ring's reduction and
    // the split of the batch), ~1e-7 relative per step, amplified a little by Adam.
    let worst = single.iter().zip(&two).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "parameters differ by up to {worst}");
    for (a, b) in one.steps.iter().zip(&results[0].0.steps) {
        assert!((a.loss - b.loss).abs() < 1e-4, "step {}: policy loss {} vs {}", a.step, a.loss, b.loss);
        for k in ["reward", "kl", "value_loss", "verifier_score"] {
            assert!((value(a, k) - value(b, k)).abs() < 1e-4 * value(a, k).abs().max(1.0), "step {} {k}: {} vs {}", a.step, value(a, k), value(b, k));
        }
    }
}

#[test]
fn a_resumed_ppo_phase_ends_where_an_uninterrupted_one_does() {
    let d = scratch("resume");
    let plan = fixture(&d, 4);
    let straight = final_params(&run(&plan, None, &d.join("a"), &mut Local, &mut Recorder::default()));
    let ckpt = d.join("b");
    let mut first = Recorder { stop_at: Some(2), ..Default::default() };
    assert_eq!(run(&plan, None, &ckpt, &mut Local, &mut first), PhaseOutcome::Regroup);
    assert_eq!(first.steps.len(), 2);
    let mut rest = Recorder::default();
    let resumed = final_params(&run(&plan, Some(&checkpoint::step_dir(&ckpt, 2)), &ckpt, &mut Local, &mut rest));
    assert_eq!(rest.steps.iter().map(|m| m.step).collect::<Vec<_>>(), vec![3, 4]);
    // Policy, value model, both optimizers, β and the rollouts' seeds all come back: bit-identical.
    assert!(straight == resumed, "resumed run diverged: max diff {}", straight.iter().zip(&resumed).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max));
}

#[test]
fn a_bad_reward_model_is_refused_before_training() {
    let d = scratch("bad");
    let plan = fixture(&d, 1);
    let attempt = |plan: &PhasePlan| {
        let io = PhaseIo { checkpoint_dir: &d.join("x"), engine: &CpuEngine, coll: &mut Local, abort: &AtomicBool::new(false), events: &mut Recorder::default() };
        run_ppo(plan, Start::Fresh, io).unwrap_err().to_string()
    };
    let missing = PhasePlan { reward_checkpoint: Some(d.join("nowhere")), ..plan.clone() };
    let e = attempt(&missing);
    assert!(e.contains("the reward model checkpoint") && e.contains("nowhere") && e.contains("missing"), "{e}");
    // The SFT checkpoint has no scalar head: not a reward model.
    let headless = PhasePlan { reward_checkpoint: plan.init_checkpoint.clone(), ..plan.clone() };
    let e = attempt(&headless);
    assert!(e.contains("is not a reward-model checkpoint"), "{e}");
    // A reward model of another vocabulary.
    let other = GptConfig::new(plan.model.vocab_size + 200, 64, 1, 2, 16);
    let m = Gpt::new(other.clone(), 1, 8).unwrap();
    let extra = vec![(HEAD_FILE.to_string(), b"{\"weight\":[],\"bias\":0}".to_vec())];
    let info = SaveInfo { step: 1, rng_state: 0, train_config: None, data_cursor: DataCursor { position: 0 }, tokenizer: "tokenizer.json", extra_files: &extra };
    checkpoint::save(&d.join("rm-other"), &other, &m.params, None, &info).unwrap();
    let e = attempt(&PhasePlan { reward_checkpoint: Some(d.join("rm-other")), ..plan.clone() });
    assert!(e.contains("the reward model checkpoint") && e.contains("vocab_size"), "{e}");
    assert!(!d.join("x").exists(), "nothing was written");
}
