//! The GRPO phase end to end on small random models: two ranks (TCP ring) follow one rank, a
//! phase stopped at a checkpoint and resumed ends bit-identical to an uninterrupted one, a
//! reward that is the same for every answer (zero advantages) leaves the policy exactly where
//! it was, and bad settings are refused before any training.

use std::path::Path;

use liandan_tests::post::{Recorder, final_params, fixture, max_diff, run, run_ring, value};
use liandan_tests::scratch_dir;
use liandan_worker::checkpoint;
use liandan_worker::collective::Local;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::phase::{PhaseOutcome, Start, check_inputs};
use liandan_worker::plan::{GrpoSettings, PhaseKind, PhasePlan, RewardSource};

/// 3 prompts × G = 4 answers per step, reward model plus verifier, two epochs of two
/// minibatches (so the ratio moves and clips), KL coefficient 0.1.
fn plan(d: &Path, steps: u64) -> PhasePlan {
    let f = fixture(d);
    PhasePlan {
        kind: PhaseKind::Grpo,
        steps,
        global_batch: 3,
        examples: Some(f.prompts.clone()),
        reward_checkpoint: Some(f.reward.clone()),
        grpo: Some(GrpoSettings {
            group_size: 4,
            reward: RewardSource::Both,
            max_new_tokens: 10,
            epochs: 2,
            minibatches: 2,
            kl_coef: 0.1,
            entropy_coef: 0.01,
            ..Default::default()
        }),
        ..f.base
    }
}

const KEYS: [&str; 10] = ["reward", "reward_std", "zero_signal", "rm_score", "kl", "clip_frac", "entropy", "verifier_pass", "verifier_score", "answer_tokens"];

#[test]
fn grpo_on_two_ranks_follows_one_rank() {
    let d = scratch_dir("grpo-world");
    let plan = plan(&d, 3);
    let mut one = Recorder::default();
    let single = final_params(&run(&CpuEngine, &plan, Start::Fresh, &d.join("one"), &mut Local, &mut one));
    assert_eq!(one.steps.len(), 3);
    for m in &one.steps {
        for k in KEYS {
            assert!(value(m, k).is_finite(), "step {} {k} = {}", m.step, value(m, k));
        }
        assert!(value(m, "entropy") > 0.0 && value(m, "answer_tokens") >= 1.0);
        assert!((0.0..=1.0).contains(&value(m, "clip_frac")) && (0.0..=1.0).contains(&value(m, "zero_signal")) && (0.0..=1.0).contains(&value(m, "verifier_pass")));
        assert!(value(m, "reward_std") > 0.0, "the reward model scores differ within groups: {:?}", m.values);
        eprintln!("grpo step {}: loss {:.5} {:?}", m.step, m.loss, m.values);
    }
    // The first rollout comes from the reference itself: k3 is 0 exactly.
    assert_eq!(value(&one.steps[0], "kl"), 0.0);
    assert!(value(&one.steps[2], "kl") > 0.0, "the policy moved away from the reference");
    assert!(one.steps.iter().any(|m| value(m, "clip_frac") > 0.0), "later minibatches move the ratio");
    assert!(single != final_params(&PhaseOutcome::Finished { final_checkpoint: Some(plan.init_checkpoint.clone().unwrap()) }), "the policy was updated");

    let results = run_ring(&CpuEngine, &plan, Start::Fresh, &d.join("two"), 2);
    let two = final_params(&results[0].1);
    assert_eq!(results[1].1, PhaseOutcome::Finished { final_checkpoint: None }, "only rank 0 writes");
    // Tolerance: the rollouts are the same answers (seeded by step and answer index, and the
    // rewards summed exactly); the runs differ only in float summation order (the ring's
    // reduction, the split of the batch), ~1e-7 relative per step, amplified a little by Adam.
    let worst = max_diff(&single, &two);
    eprintln!("grpo 1 vs 2 ranks: max |Δ weight| {worst:.3e}");
    assert!(worst < 1e-4, "parameters differ by up to {worst}");
    for (a, b) in one.steps.iter().zip(&results[0].0.steps) {
        assert!((a.loss - b.loss).abs() < 1e-4, "step {}: policy loss {} vs {}", a.step, a.loss, b.loss);
        for k in KEYS {
            assert!((value(a, k) - value(b, k)).abs() < 1e-4 * value(a, k).abs().max(1.0), "step {} {k}: {} vs {}", a.step, value(a, k), value(b, k));
        }
        // Same answers: the lengths and verifier verdicts are identical, not just close.
        assert_eq!(value(a, "answer_tokens"), value(b, "answer_tokens"));
        assert_eq!(value(a, "verifier_pass"), value(b, "verifier_pass"));
    }
}

#[test]
fn a_resumed_grpo_phase_ends_where_an_uninterrupted_one_does() {
    let d = scratch_dir("grpo-resume");
    let plan = plan(&d, 4);
    let mut all = Recorder::default();
    let straight = final_params(&run(&CpuEngine, &plan, Start::Fresh, &d.join("a"), &mut Local, &mut all));
    let ckpt = d.join("b");
    let mut first = Recorder { stop_at: Some(2), ..Default::default() };
    assert_eq!(run(&CpuEngine, &plan, Start::Fresh, &ckpt, &mut Local, &mut first), PhaseOutcome::Regroup);
    assert_eq!(first.steps.len(), 2);
    let step2 = checkpoint::step_dir(&ckpt, 2);
    assert!(step2.join("grpo_eval.json").exists() && step2.join("tokenizer.json").exists());
    let mut rest = Recorder::default();
    let resumed = final_params(&run(&CpuEngine, &plan, Start::Continue(&step2), &ckpt, &mut Local, &mut rest));
    assert_eq!(rest.steps.iter().map(|m| m.step).collect::<Vec<_>>(), vec![3, 4]);
    // Policy, optimizer and the rollouts' seeds come back: bit-identical weights and metrics.
    assert!(straight == resumed, "resumed run diverged: max diff {}", max_diff(&straight, &resumed));
    assert_eq!(
        all.steps[2..],
        rest.steps.iter().map(|m| liandan_worker::phase::StepMetrics { step_ms: all.steps[m.step as usize - 1].step_ms, ..m.clone() }).collect::<Vec<_>>()[..]
    );
}

#[test]
fn equal_rewards_give_zero_advantages_and_leave_the_policy_unchanged() {
    let d = scratch_dir("grpo-flat");
    let f = fixture(&d);
    // Every answer scores 0.5: every group is all-equal, every advantage 0. Without the KL and
    // entropy terms the loss has zero gradient, so AdamW (no weight decay) leaves each weight.
    let plan = PhasePlan {
        kind: PhaseKind::Grpo,
        steps: 2,
        global_batch: 3,
        examples: Some(f.prompts.clone()),
        reward_checkpoint: Some(liandan_tests::post::constant_reward(&d, &f, 0.5)),
        grpo: Some(GrpoSettings { group_size: 4, reward: RewardSource::Model, max_new_tokens: 8, kl_coef: 0.0, ..Default::default() }),
        ..f.base.clone()
    };
    let mut ev = Recorder::default();
    let after = final_params(&run(&CpuEngine, &plan, Start::Fresh, &d.join("ck"), &mut Local, &mut ev));
    for m in &ev.steps {
        assert_eq!((value(m, "zero_signal"), value(m, "reward_std"), m.grad_norm), (1.0, 0.0, 0.0), "step {}: {m:?}", m.step);
        assert!((value(m, "reward") - 0.5).abs() < 1e-7);
    }
    let before = checkpoint::load(&f.sft, None).unwrap().params;
    assert!(after == before, "the policy moved by up to {}", max_diff(&after, &before));
}

#[test]
fn bad_grpo_settings_are_refused_before_training() {
    let d = scratch_dir("grpo-bad");
    let good = plan(&d, 1);
    check_inputs(&good).unwrap();
    let with = |s: GrpoSettings| check_inputs(&PhasePlan { grpo: Some(s), ..good.clone() }).unwrap_err().to_string();
    let base = good.grpo.clone().unwrap();
    let e = with(GrpoSettings { group_size: 1, ..base.clone() });
    assert!(e.contains("grpo.group_size: must be in 2..=") && e.contains("got 1"), "{e}");
    let e = with(GrpoSettings { kl_coef: f32::NAN, ..base.clone() });
    assert!(e.contains("grpo.kl_coef: must be finite and >= 0"), "{e}");
    // The verifier alone on prompts that ask for no form: every reward would be 0.
    let f = fixture(&d);
    let plain = d.join("plain.jsonl");
    std::fs::write(&plain, "{\"prompt\": \"请接出下一句：床前明月光，\", \"response\": \"疑是地上霜。\"}\n").unwrap();
    let e =
        check_inputs(&PhasePlan { examples: Some(plain), grpo: Some(GrpoSettings { reward: RewardSource::Verifier, ..base.clone() }), ..good.clone() }).unwrap_err().to_string();
    assert!(e.contains("grpo.reward = \"verifier\"") && e.contains("asks for a poem form") && e.contains("plain.jsonl"), "{e}");
    // A reward model that does not exist, named when the phase starts.
    let io_err = {
        let plan = PhasePlan { reward_checkpoint: Some(d.join("nowhere")), ..good.clone() };
        let mut ev = Recorder::default();
        let io = liandan_worker::phase::PhaseIo { checkpoint_dir: &d.join("x"), engine: &CpuEngine, coll: &mut Local, abort: &Default::default(), events: &mut ev };
        liandan_worker::phase::grpo::run_grpo(&plan, Start::Fresh, io).unwrap_err().to_string()
    };
    assert!(io_err.contains("the reward model checkpoint") && io_err.contains("nowhere"), "{io_err}");
    assert!(!d.join("x").exists() && f.sft.exists(), "nothing was written");
}
