//! ZeRO-1, the optimizer sharded over the data-parallel ranks, against the unsharded optimizer:
//! replicas on the CPU and on the emulated CUDA device (f32 and bf16 matmuls) over a real TCP
//! ring end every step with the same bits on every rank and within f32 rounding of one rank
//! that trains on every micro-batch, moments included; through the phase driver, an SFT phase
//! with its optimizer sharded writes checkpoints (whole moments) that match the unsharded run's,
//! and resumes from one on another number of ranks.

use std::sync::Arc;

use liandan_tests::post::{final_params, fixture, max_diff, run_ring};
use liandan_tests::scratch_dir;
use liandan_worker::GptConfig;
use liandan_worker::backend::cuda::emu::EmuOptions;
use liandan_worker::backend::cuda::{CudaDevice, Precision};
use liandan_worker::checkpoint;
use liandan_worker::collective::{Collective, RingOptions, Shard, TcpRing};
use liandan_worker::engine::Engine;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::engine::cuda::CudaEngine;
use liandan_worker::model::gpt::loss_denominator;
use liandan_worker::optim::AdamWConfig;
use liandan_worker::phase::Start;
use liandan_worker::plan::{PhaseKind, PhasePlan};
use liandan_worker::rng::Rng;
use liandan_worker::train::{MicroBatch, replica_step};

const STEPS: usize = 3;
const LR: f32 = 3e-3;
/// Small enough that the clip acts on the first steps.
const CLIP: f32 = 0.5;

/// One micro-batch per rank of random tokens, B = 2, T = 16.
fn micro_batches(n: usize, vocab: usize) -> Vec<MicroBatch> {
    let mut rng = Rng::new(11);
    (0..n)
        .map(|_| {
            let toks: Vec<u32> = (0..2 * 16 + 1).map(|_| rng.below(vocab as u64) as u32).collect();
            MicroBatch { inputs: toks[..32].to_vec(), targets: toks[1..].iter().map(|&x| x as i32).collect(), weights: None, b: 2, t: 16 }
        })
        .collect()
}

/// What a rank holds after [`STEPS`] steps: parameters, then the whole `m` and `v` (empty on
/// the ranks of a sharded run but 0).
type State = (Vec<f32>, Vec<f32>, Vec<f32>);

/// `world` ranks of `engine` over a TCP ring, rank `r` on micro-batch `r`, each step summed over
/// the ring; the optimizer sharded when `sharded`. Every rank's state.
fn ranks(engine: &(dyn Engine + Sync), cfg: &GptConfig, world: usize, sharded: bool) -> Vec<State> {
    let micro = micro_batches(world, cfg.vocab_size);
    let denom = loss_denominator(micro.iter().map(|m| (&m.targets[..], m.weights.as_deref())));
    let listeners: Vec<_> = (0..world).map(|_| TcpRing::listen("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, micro) = (&peers, &micro);
                s.spawn(move || {
                    let mut ring = TcpRing::connect(l, rank, peers, 0, RingOptions::default()).unwrap();
                    let shard = if sharded { Shard { rank, world } } else { Shard::WHOLE };
                    let mut r = engine.replica(cfg, 2, 16, &AdamWConfig::default(), shard).unwrap();
                    r.model().init_weights(5).unwrap();
                    for _ in 0..STEPS {
                        let coll: &mut dyn Collective = &mut ring;
                        replica_step(r.as_mut(), &micro[rank..rank + 1], denom, Some(coll), CLIP, LR).unwrap();
                    }
                    r.gather_moments(&mut ring).unwrap();
                    // Rank 0 (the one that writes checkpoints) keeps the gathered moments, once;
                    // the others hold none.
                    let (m, v) = match r.moments() {
                        Ok(mv) if rank == 0 || !sharded => mv,
                        Ok(_) => panic!("rank {rank} kept gathered moments"),
                        Err(e) if rank > 0 && sharded => {
                            assert!(e.to_string().contains("rank 0 keeps them"), "{e}");
                            (Vec::new(), Vec::new())
                        }
                        Err(e) => panic!("rank {rank}: {e}"),
                    };
                    if rank == 0 && sharded {
                        assert!(r.moments().is_err(), "the moments are taken once");
                    }
                    (r.model_ref().params().unwrap().into_owned(), m, v)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One unsharded rank on every micro-batch of a `world`-rank step.
fn one_rank(engine: &dyn Engine, cfg: &GptConfig, world: usize) -> State {
    let micro = micro_batches(world, cfg.vocab_size);
    let denom = loss_denominator(micro.iter().map(|m| (&m.targets[..], m.weights.as_deref())));
    let mut r = engine.replica(cfg, 2, 16, &AdamWConfig::default(), Shard::WHOLE).unwrap();
    r.model().init_weights(5).unwrap();
    for _ in 0..STEPS {
        replica_step(r.as_mut(), &micro, denom, None, CLIP, LR).unwrap();
    }
    let (m, v) = r.moments().unwrap();
    (r.model_ref().params().unwrap().into_owned(), m, v)
}

/// `|got − want| ≤ rel · max|want|` elementwise: sums in another order, through a few steps.
fn close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let scale = want.iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-30);
    let worst = max_diff(got, want);
    assert!(worst <= rel * scale, "{what}: worst |Δ| {worst} against a scale of {scale}");
}

fn check(engine: &(dyn Engine + Sync), name: &str) {
    // n = 33 + … parameters: neither world divides the layout evenly into its kinds.
    let cfg = GptConfig::new(97, 24, 2, 2, 16);
    for world in [2, 3] {
        let sharded = ranks(engine, &cfg, world, true);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (rank, s) in sharded.iter().enumerate() {
            assert!(bits(&s.0) == bits(&sharded[0].0), "{name} world {world}: rank {rank}'s parameters differ from rank 0's");
        }
        let whole = ranks(engine, &cfg, world, false);
        let one = one_rank(engine, &cfg, world);
        // The sharded run sums in another order than the ring's all-reduce: rounding only.
        close(&sharded[0].0, &whole[0].0, 1e-5, &format!("{name} world {world}: sharded vs unsharded parameters"));
        close(&sharded[0].1, &whole[0].1, 1e-4, &format!("{name} world {world}: m"));
        close(&sharded[0].2, &whole[0].2, 1e-4, &format!("{name} world {world}: v"));
        close(&sharded[0].0, &one.0, 1e-5, &format!("{name} world {world}: sharded vs one rank"));
        close(&sharded[0].2, &one.2, 1e-4, &format!("{name} world {world}: v vs one rank"));
    }
}

#[test]
fn a_sharded_cpu_optimizer_follows_the_unsharded_one() {
    check(&CpuEngine, "cpu");
}

#[test]
fn a_sharded_optimizer_on_the_emulated_device_follows_the_unsharded_one() {
    for precision in [Precision::F32, Precision::Bf16] {
        let dev = Arc::new(CudaDevice::emulated_with(EmuOptions { threads: 1, ..Default::default() }).unwrap());
        check(&CudaEngine::new(dev, precision), &format!("cuda-emu {precision:?}"));
    }
}

#[test]
fn an_sft_phase_with_a_sharded_optimizer_checkpoints_whole_moments_and_resumes_on_another_world() {
    let d = scratch_dir("sharded-optimizer");
    let f = fixture(&d);
    let plan = |shard: bool| PhasePlan {
        kind: PhaseKind::Sft,
        steps: 4,
        global_batch: 6,
        seq_len: 40,
        max_lr: 1e-2,
        checkpoint_every: 2,
        examples: Some(f.prompts.clone()),
        shard_optimizer: shard,
        ..f.base.clone()
    };
    let start = Start::From(&f.sft);
    let whole = run_ring(&CpuEngine, &plan(false), start, &d.join("whole"), 2);
    let sharded = run_ring(&CpuEngine, &plan(true), start, &d.join("sharded"), 2);
    let losses = |runs: &[(liandan_tests::post::Recorder, _)]| runs[0].0.steps.iter().map(|m| m.loss as f32).collect::<Vec<_>>();
    close(&losses(&sharded), &losses(&whole), 1e-5, "losses");
    for step in [2, 4] {
        let a = checkpoint::load(&checkpoint::step_dir(&d.join("whole"), step), None).unwrap();
        let b = checkpoint::load(&checkpoint::step_dir(&d.join("sharded"), step), None).unwrap();
        let ((am, av), (bm, bv)) = (a.moments.unwrap(), b.moments.unwrap());
        assert_eq!((bm.len(), b.state.optimizer_t), (a.params.len(), a.state.optimizer_t), "step {step}: whole moments in the checkpoint");
        close(&b.params, &a.params, 1e-5, &format!("step {step}: parameters"));
        close(&bm, &am, 1e-4, &format!("step {step}: m"));
        close(&bv, &av, 1e-4, &format!("step {step}: v"));
    }
    // Resumed from step 2 on three ranks, still sharded: the shards are cut anew.
    let step2 = checkpoint::step_dir(&d.join("sharded"), 2);
    let resumed = run_ring(&CpuEngine, &plan(true), Start::Continue(&step2), &d.join("resumed"), 3);
    close(&final_params(&resumed[0].1), &final_params(&whole[0].1), 1e-5, "resumed on 3 ranks vs the unsharded run");
}

#[test]
fn reward_dpo_grpo_and_ppo_phases_with_a_sharded_optimizer_follow_the_unsharded_ones() {
    use liandan_worker::plan::{DpoSettings, GrpoSettings, PpoSettings, RewardSource};
    let d = scratch_dir("sharded-optimizer-post");
    let f = fixture(&d);
    let base = PhasePlan { steps: 2, max_lr: 1e-2, checkpoint_every: 2, ..f.base.clone() };
    let plans = [
        ("reward", PhasePlan { kind: PhaseKind::Reward, global_batch: 4, seq_len: 40, examples: Some(f.prefs.clone()), ..base.clone() }),
        ("dpo", PhasePlan { kind: PhaseKind::Dpo, global_batch: 4, seq_len: 40, examples: Some(f.prefs.clone()), dpo: Some(DpoSettings { beta: 0.5 }), ..base.clone() }),
        (
            "grpo",
            PhasePlan {
                kind: PhaseKind::Grpo,
                global_batch: 2,
                examples: Some(f.prompts.clone()),
                reward_checkpoint: Some(f.reward.clone()),
                grpo: Some(GrpoSettings { group_size: 2, reward: RewardSource::Model, max_new_tokens: 8, ..Default::default() }),
                ..base.clone()
            },
        ),
        // Two trained models: the policy (the checkpoint's own moments) and the value model (its
        // moments in a boundary file), both sharded.
        (
            "ppo",
            PhasePlan {
                kind: PhaseKind::Ppo,
                global_batch: 4,
                seq_len: 40,
                examples: Some(f.prompts.clone()),
                reward_checkpoint: Some(f.reward.clone()),
                ppo: Some(PpoSettings { reward: RewardSource::Model, max_new_tokens: 8, minibatches: 2, ..Default::default() }),
                ..base.clone()
            },
        ),
    ];
    for (name, plan) in plans {
        let dir = |what: &str| d.join(format!("{name}-{what}"));
        let whole = run_ring(&CpuEngine, &plan, Start::From(&f.sft), &dir("whole"), 2);
        let sharded = run_ring(&CpuEngine, &PhasePlan { shard_optimizer: true, ..plan.clone() }, Start::From(&f.sft), &dir("sharded"), 2);
        let losses = |runs: &[(liandan_tests::post::Recorder, _)]| runs[0].0.steps.iter().map(|m| m.loss as f32).collect::<Vec<_>>();
        assert_eq!(losses(&sharded).len(), 2, "{name}: two steps");
        close(&losses(&sharded), &losses(&whole), 1e-5, &format!("{name}: losses"));
        close(&final_params(&sharded[0].1), &final_params(&whole[0].1), 1e-5, &format!("{name}: final parameters"));
        let (a, b) = (checkpoint::load(&checkpoint::step_dir(&dir("whole"), 2), None).unwrap(), checkpoint::load(&checkpoint::step_dir(&dir("sharded"), 2), None).unwrap());
        let ((am, av), (bm, bv)) = (a.moments.unwrap(), b.moments.unwrap());
        assert_eq!(bm.len(), a.params.len(), "{name}: whole moments in the checkpoint");
        close(&bm, &am, 1e-4, &format!("{name}: m"));
        close(&bv, &av, 1e-4, &format!("{name}: v"));
        // Ppo's value model (the policy's shape) keeps its moments in a boundary file.
        for file in if name == "ppo" { vec![liandan_worker::phase::ppo::CRITIC_OPT_FILE] } else { Vec::new() } {
            let read = |what: &str| std::fs::read(checkpoint::step_dir(&dir(what), 2).join(file)).unwrap();
            let n = a.params.len();
            let ((am, av), (bm, bv)) = (checkpoint::deserialize_moments(&read("whole"), n).unwrap(), checkpoint::deserialize_moments(&read("sharded"), n).unwrap());
            close(&bm, &am, 1e-4, &format!("{name}: {file} m"));
            close(&bv, &av, 1e-4, &format!("{name}: {file} v"));
        }
    }
}
