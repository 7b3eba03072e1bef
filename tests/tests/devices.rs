//! Every phase through the one phase driver on the CPU and on the emulated CUDA device
//! (`cuda-emu`: the CUDA backend's host code and its kernel sources on the CPU): pretrain from
//! scratch, SFT, the reward model, PPO, GRPO and DPO run on both, each device's phase starting
//! from the CPU's previous checkpoint, and every step's values agree within the stated tolerance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use liandan_data::shard::{Manifest, ShardWriter, Split, sha256_hex};
use liandan_data::tokenizer::ChatTokenizer;
use liandan_worker::GptConfig;
use liandan_worker::backend::cuda::{CudaDevice, Precision};
use liandan_worker::collective::Local;
use liandan_worker::engine::Engine;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::engine::cuda::CudaEngine;
use liandan_worker::phase::{self, PhaseEvents, PhaseIo, PhaseOutcome, Start, StepMetrics};
use liandan_worker::plan::{DpoSettings, GrpoSettings, PhaseKind, PhasePlan, PpoSettings, RewardSource};

const POEMS: [&str; 4] = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
];

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("liandan-devices-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Default)]
struct Recorder(Vec<StepMetrics>);

impl PhaseEvents for Recorder {
    fn step(&mut self, m: StepMetrics) {
        self.0.push(m);
    }
    fn checkpoint(&mut self, _step: u64, _path: &Path) -> Result<bool, String> {
        Ok(false)
    }
}

/// Prepared data (a tokenizer and a train split of poems), SFT examples and comparisons; the
/// plan of each phase kind on a 1-layer model.
fn plans(dir: &Path) -> [PhasePlan; 6] {
    let corpus: Vec<String> = POEMS.iter().map(|p| format!("写一首五言绝句，题目是《静夜》\n{p}")).collect();
    let tk = ChatTokenizer::train(corpus.iter().cycle().take(200), 300).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    tk.save(&data.join("tokenizer.json")).unwrap();
    let bytes = std::fs::read(data.join("tokenizer.json")).unwrap();
    let mut w = ShardWriter::new(&data, Split::Train, 2, 1 << 16);
    for i in 0..40 {
        w.push_document(&tk.encode(&corpus[i % 4]).unwrap()).unwrap();
    }
    let train = w.finish().unwrap();
    let manifest = Manifest {
        format: "liandan-shards".into(),
        version: liandan_data::shard::VERSION,
        tokenizer: "tokenizer.json".into(),
        tokenizer_sha256: sha256_hex(&bytes),
        vocab_size: tk.vocab_size(),
        dtype: 2,
        eos: tk.special.eos,
        splits: [("train".to_string(), train)].into_iter().collect(),
    };
    manifest.save(&data).unwrap();
    let sft = dir.join("sft.jsonl");
    let lines: String =
        (0..24).map(|i| serde_json::json!({"prompt": format!("写一首五言绝句，题目是《月{i}》"), "response": POEMS[i % 4], "task": "poem"}).to_string() + "\n").collect();
    std::fs::write(&sft, lines).unwrap();
    let prefs = dir.join("prefs.jsonl");
    let lines: String = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("写一首五言绝句，题目是《月{i}》"), "chosen": POEMS[i % 4], "rejected": &POEMS[(i + 1) % 4][..15], "label_source": "rule", "task": "poem"}).to_string() + "\n")
        .collect();
    std::fs::write(&prefs, lines).unwrap();
    let base = PhasePlan {
        kind: PhaseKind::Pretrain,
        model: GptConfig::new(tk.vocab_size(), 48, 1, 2, 16),
        data_dir: data,
        steps: 4,
        global_batch: 4,
        seq_len: 16,
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup: 1,
        weight_decay: 0.1,
        grad_clip: 1.0,
        seed: 7,
        checkpoint_every: 100,
        examples: None,
        from_phase: None,
        reward_phase: None,
        init_checkpoint: None,
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
    let ppo = PpoSettings { reward: RewardSource::Both, max_new_tokens: 6, epochs: 1, minibatches: 2, entropy_coef: 0.01, ..Default::default() };
    let grpo = GrpoSettings { group_size: 3, reward: RewardSource::Both, max_new_tokens: 6, epochs: 2, minibatches: 2, kl_coef: 0.1, ..Default::default() };
    [
        base.clone(),
        PhasePlan { kind: PhaseKind::Sft, seq_len: 40, examples: Some(sft.clone()), ..base.clone() },
        PhasePlan { kind: PhaseKind::Reward, seq_len: 40, examples: Some(prefs.clone()), ..base.clone() },
        PhasePlan { kind: PhaseKind::Ppo, steps: 2, seq_len: 40, examples: Some(sft.clone()), ppo: Some(ppo), ..base.clone() },
        PhasePlan { kind: PhaseKind::Grpo, steps: 2, global_batch: 2, seq_len: 40, examples: Some(sft), grpo: Some(grpo), ..base.clone() },
        PhasePlan { kind: PhaseKind::Dpo, steps: 3, global_batch: 4, seq_len: 40, examples: Some(prefs), dpo: Some(DpoSettings { beta: 0.5 }), checkpoint_every: 2, ..base },
    ]
}

fn run(engine: &dyn Engine, plan: &PhasePlan, start: Start<'_>, dir: &Path) -> (Vec<StepMetrics>, PathBuf) {
    let mut ev = Recorder::default();
    let io = PhaseIo { checkpoint_dir: dir, engine, coll: &mut Local, abort: &AtomicBool::new(false), events: &mut ev };
    let out = phase::entry(plan.kind)(plan, start, io).unwrap_or_else(|e| panic!("{:?} on {}: {e}", plan.kind, engine.name()));
    let PhaseOutcome::Finished { final_checkpoint: Some(ck) } = out else { panic!("{:?} on {}: {out:?}", plan.kind, engine.name()) };
    (ev.0, ck)
}

#[test]
fn every_phase_runs_on_the_cpu_and_on_the_emulated_cuda_device_alike() {
    let d = scratch("chain");
    let [pretrain, mut sft, mut reward, mut ppo, mut grpo, mut dpo] = plans(&d);
    let cpu = CpuEngine;
    let emu = CudaEngine::new(Arc::new(CudaDevice::emulated().unwrap()), Precision::F32);
    // Each device's phase starts from the CPU's previous checkpoint, so a difference in one
    // phase does not carry into the next.
    let compare = |plan: &PhasePlan, start: Start<'_>, name: &str| -> PathBuf {
        let (a, ck) = run(&cpu, plan, start, &d.join(format!("cpu-{name}")));
        let (b, _) = run(&emu, plan, start, &d.join(format!("emu-{name}")));
        assert_eq!((a.len(), b.len()), (plan.steps as usize, plan.steps as usize), "{name}: steps");
        for (x, y) in a.iter().zip(&b) {
            // f32 on both; the devices sum in different orders (block reductions, atomics in
            // the embedding gradient), ~1e-6 relative per op, grown by a few Adam steps: 1e-3
            // relative still separates any real difference (a wrong index or layout is > 1e-1).
            let close = |p: f64, q: f64| (p - q).abs() <= 1e-3 * p.abs().max(q.abs()).max(1e-2);
            assert!(close(x.loss, y.loss), "{name} step {}: loss {} (cpu) vs {} (cuda-emu)", x.step, x.loss, y.loss);
            assert!(close(x.grad_norm as f64, y.grad_norm as f64), "{name} step {}: grad norm {} vs {}", x.step, x.grad_norm, y.grad_norm);
            for ((k, p), (k2, q)) in x.values.iter().zip(&y.values) {
                assert_eq!(k, k2);
                assert!(close(*p, *q), "{name} step {}: {k} {p} vs {q}", x.step);
            }
        }
        ck
    };
    let pre = compare(&pretrain, Start::Fresh, "pretrain");
    sft.init_checkpoint = Some(pre.clone());
    let sft_ck = compare(&sft, Start::From(&pre), "sft");
    reward.init_checkpoint = Some(sft_ck.clone());
    let rm = compare(&reward, Start::From(&sft_ck), "reward");
    ppo.init_checkpoint = Some(sft_ck.clone());
    ppo.reward_checkpoint = Some(rm.clone());
    compare(&ppo, Start::From(&sft_ck), "ppo");
    grpo.init_checkpoint = Some(sft_ck.clone());
    grpo.reward_checkpoint = Some(rm);
    compare(&grpo, Start::From(&sft_ck), "grpo");
    dpo.init_checkpoint = Some(sft_ck.clone());
    compare(&dpo, Start::From(&sft_ck), "dpo");
}
