//! Helpers shared by the workspace integration tests.

use std::path::PathBuf;

use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::train::TrainConfig;

/// Path of a committed test fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A fresh scratch directory under the system temp directory, unique to this process and name.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("liandan-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir under CARGO_TARGET_TMPDIR is writable");
    dir
}

/// Asserts `|a - b| <= atol + rtol·|b|` element-wise, naming the first offending index.
pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f32;
    for (i, (&x, &y)) in got.iter().zip(want).enumerate() {
        let err = (x - y).abs();
        assert!(err <= atol + rtol * y.abs(), "{what}[{i}]: got {x}, want {y} (|diff| {err}, atol {atol}, rtol {rtol})");
        worst = worst.max(err);
    }
    eprintln!("{what}: max |diff| {worst:.3e} over {} values", got.len());
}

/// Largest absolute value.
pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// A small training config for tests.
pub fn small_train_config(b: usize, t: usize, steps: u64, seed: u64) -> TrainConfig {
    TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accum: 1,
        schedule: LrSchedule { max_lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, total_steps: steps },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed,
    }
}

/// A deterministic pseudo-text of `n` byte tokens with some structure to learn.
pub fn synthetic_tokens(n: usize) -> Vec<u32> {
    let text = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？";
    text.bytes().cycle().take(n).map(u32::from).collect()
}

/// Fixtures of the post-training phases (GRPO, DPO): small random models and poem data.
pub mod post {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;

    use liandan_data::shard::{Manifest, sha256_hex};
    use liandan_data::tokenizer::ChatTokenizer;
    use liandan_worker::checkpoint::{self, DataCursor, SaveInfo};
    use liandan_worker::collective::{Collective, RingOptions, TcpRing};
    use liandan_worker::engine::Engine;
    use liandan_worker::phase::reward::{HEAD_FILE, ScalarHead};
    use liandan_worker::phase::{self, PhaseEvents, PhaseIo, PhaseOutcome, Start, StepMetrics};
    use liandan_worker::plan::{PhaseKind, PhasePlan};
    use liandan_worker::rng::Rng;
    use liandan_worker::{Gpt, GptConfig};

    pub const POEMS: [&str; 4] = [
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
        "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    ];

    /// What [`fixture`] wrote.
    #[derive(Debug, Clone)]
    pub struct Fixture {
        /// A plan with the shared fields set (kind pretrain, no examples).
        pub base: PhasePlan,
        pub prompts: PathBuf,
        pub prefs: PathBuf,
        /// A random "SFT" checkpoint (the reference) and a reward checkpoint (random trunk,
        /// random head).
        pub sft: PathBuf,
        pub reward: PathBuf,
        pub tokenizer_bytes: Vec<u8>,
    }

    /// Prepared data (tokenizer and manifest; no shards: these phases read none), 24 poem
    /// prompts, 60 comparisons, and two random checkpoints of a 1-layer model of C = 64.
    pub fn fixture(dir: &Path) -> Fixture {
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
        let prefs = dir.join("prefs.jsonl");
        let lines: String = (0..60)
            .map(|i| {
                let rejected: String = POEMS[(i + 1) % 4].chars().take(6).collect();
                serde_json::json!({"prompt": format!("写一首五言绝句，题目是《月{i}》"), "chosen": POEMS[i % 4], "rejected": rejected, "label_source": "rule", "task": "poem"})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(&prefs, lines).unwrap();
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
        let sft = save("sft", 1, None);
        let reward = save("reward", 2, Some(&head));
        let base = PhasePlan {
            kind: PhaseKind::Pretrain,
            model,
            data_dir: data,
            steps: 3,
            global_batch: 4,
            seq_len: 40,
            max_lr: 3e-3,
            min_lr: 3e-4,
            warmup: 1,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 7,
            checkpoint_every: 2,
            examples: None,
            from_phase: None,
            reward_phase: None,
            init_checkpoint: Some(sft.clone()),
            reward_checkpoint: None,
            ppo: None,
            grpo: None,
            dpo: None,
            comparisons: Default::default(),
            tasks: Vec::new(),
            labelled_examples: None,
            max_skipped_steps: 0,
            device: None,
            prepare: None,
            shard_optimizer: false,
        };
        Fixture { base, prompts, prefs, sft, reward, tokenizer_bytes: bytes }
    }

    /// A checkpoint of the fixture's model with a reward head of zero weights and bias
    /// `bias`: every answer scores `bias`.
    pub fn constant_reward(dir: &Path, f: &Fixture, bias: f32) -> PathBuf {
        let ck = checkpoint::load(&f.sft, None).unwrap();
        let head = ScalarHead { weight: vec![0.0; f.base.model.n_embd], bias };
        let extra = vec![("tokenizer.json".to_string(), f.tokenizer_bytes.clone()), (HEAD_FILE.to_string(), serde_json::to_vec(&head).unwrap())];
        let info = SaveInfo { step: 1, rng_state: 0, train_config: None, data_cursor: DataCursor { position: 0 }, tokenizer: "tokenizer.json", extra_files: &extra };
        let d = dir.join("constant-reward");
        checkpoint::save(&d, &f.base.model, &ck.params, None, &info).unwrap();
        d
    }

    /// Collects rank 0's steps; stops the phase at `stop_at` (as a re-forming group would).
    #[derive(Debug, Default)]
    pub struct Recorder {
        pub steps: Vec<StepMetrics>,
        pub stop_at: Option<u64>,
    }

    impl PhaseEvents for Recorder {
        fn step(&mut self, m: StepMetrics) {
            self.steps.push(m);
        }
        fn checkpoint(&mut self, step: u64, _path: &Path) -> Result<bool, String> {
            Ok(self.stop_at == Some(step))
        }
    }

    /// Runs `plan` through its phase's entry point on one rank.
    pub fn run(engine: &dyn Engine, plan: &PhasePlan, start: Start<'_>, ckpt: &Path, coll: &mut dyn Collective, ev: &mut Recorder) -> PhaseOutcome {
        let io = PhaseIo { checkpoint_dir: ckpt, engine, coll, abort: &AtomicBool::new(false), events: ev };
        phase::entry(plan.kind)(plan, start, io).unwrap_or_else(|e| panic!("{:?}: {e}", plan.kind))
    }

    /// Runs `plan` on a TCP ring of `world` in-process ranks; returns each rank's steps and outcome.
    pub fn run_ring(engine: &(dyn Engine + Sync), plan: &PhasePlan, start: Start<'_>, ckpt: &Path, world: usize) -> Vec<(Recorder, PhaseOutcome)> {
        let listeners: Vec<_> = (0..world).map(|_| TcpRing::listen("127.0.0.1:0").unwrap()).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let peers = &peers;
                    s.spawn(move || {
                        let mut ring = TcpRing::connect(&l, rank, peers, 1, RingOptions::default()).unwrap();
                        let mut ev = Recorder::default();
                        let out = run(engine, plan, start, ckpt, &mut ring, &mut ev);
                        (ev, out)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// The weights of a finished phase's final checkpoint.
    pub fn final_params(outcome: &PhaseOutcome) -> Vec<f32> {
        let PhaseOutcome::Finished { final_checkpoint: Some(dir) } = outcome else { panic!("not finished: {outcome:?}") };
        checkpoint::load(dir, None).unwrap().params
    }

    /// A step's named value.
    pub fn value(m: &StepMetrics, k: &str) -> f64 {
        m.values.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k} in {:?}", m.values)).1
    }

    /// Largest absolute difference of two weight vectors.
    pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
    }
}

/// The tiny random `Qwen2ForCausalLM` of `tests/fixtures/qwen2_tiny_chat/`, whose vocabulary
/// (512) holds the 503 tokens of `tests/fixtures/hf_tokenizer_tiny`, so data prepared with that
/// tokenizer trains it: C = 32, 2 layers, 4 query heads over 2 key/value heads, I = 64, q/k/v
/// biases, tied head, θ = 1e6, context 128. Weights from liandan's initialisation with seed
/// 20261202; the RMSNorm weights are `1 + 0.1·N(0, 1)` and the q/k/v biases `0.1·N(0, 1)` so a
/// mistake in either shows in the logits. `cargo run --release -p liandan-tests --example
/// qwen2_tiny_chat` writes the directory; `tests/tests/hf_fixture.rs` checks that the committed
/// files are what this function makes.
pub fn qwen2_tiny_chat() -> (liandan_worker::GptConfig, Vec<f32>) {
    use liandan_worker::model::params::{ParamKind, ParamLayout};
    let mut cfg = liandan_worker::GptConfig::llama(512, 128, 2, 4, 2, 32, 64);
    cfg.attention_bias = true;
    cfg.tie_word_embeddings = true;
    cfg.rope_theta = 1e6;
    cfg.rms_norm_eps = 1e-6;
    let layout = ParamLayout::new(&cfg);
    let mut params = vec![0.0f32; layout.len()];
    let mut rng = liandan_worker::rng::Rng::new(20261202);
    liandan_worker::model::gpt::init_params(&cfg, &layout, &mut params, &mut rng);
    for kind in [ParamKind::Ln1W, ParamKind::Ln2W, ParamKind::LnfW] {
        params[layout.range(kind)].iter_mut().for_each(|x| *x = 1.0 + 0.1 * rng.normal());
    }
    params[layout.range(ParamKind::QkvB)].iter_mut().for_each(|x| *x = 0.1 * rng.normal());
    (cfg, params)
}

/// The files of the [`qwen2_tiny_chat`] directory, as a model hub serves one: `config.json`
/// (with the tokenizer's special-token ids), `generation_config.json`, `model.safetensors`
/// (f32, Hugging Face names).
pub fn qwen2_tiny_chat_files() -> Vec<(&'static str, Vec<u8>)> {
    let (cfg, params) = qwen2_tiny_chat();
    let mut config = cfg.to_hf_config_json();
    // <|endoftext|> = 500, <|im_end|> = 502 in hf_tokenizer_tiny.
    config["bos_token_id"] = serde_json::json!(500);
    config["eos_token_id"] = serde_json::json!(502);
    config["pad_token_id"] = serde_json::json!(500);
    let generation = serde_json::json!({"bos_token_id": 500, "eos_token_id": [502, 500], "pad_token_id": 500});
    let pretty = |v: &serde_json::Value| {
        let mut s = serde_json::to_string_pretty(v).expect("a JSON value serialises");
        s.push('\n');
        s.into_bytes()
    };
    vec![
        ("config.json", pretty(&config)),
        ("generation_config.json", pretty(&generation)),
        ("model.safetensors", liandan_worker::hf::weights::serialize(&cfg, &params).expect("the layout's own tensors serialise")),
    ]
}
