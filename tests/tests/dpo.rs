//! The DPO phase end to end on small random models: the first loss is ln 2 (the policy is its
//! own reference), two ranks (TCP ring) follow one rank, a phase stopped at a checkpoint and
//! resumed (reading the cached reference log-probs back) ends bit-identical to an uninterrupted
//! one, and pairs that are identical after tokenization, or a β ≤ 0, are refused before training.

use std::path::Path;

use liandan_tests::post::{Recorder, final_params, fixture, max_diff, run, run_ring, value};
use liandan_tests::scratch_dir;
use liandan_worker::checkpoint;
use liandan_worker::collective::Local;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::phase::dpo::REFERENCE_FILE;
use liandan_worker::phase::{PhaseOutcome, Start, StepMetrics, check_inputs};
use liandan_worker::plan::{DpoSettings, PhaseKind, PhasePlan};

fn plan(d: &Path, steps: u64) -> PhasePlan {
    let f = fixture(d);
    PhasePlan { kind: PhaseKind::Dpo, steps, global_batch: 6, max_lr: 1e-2, examples: Some(f.prefs.clone()), dpo: Some(DpoSettings { beta: 0.5 }), ..f.base }
}

const KEYS: [&str; 4] = ["margin", "chosen_drift", "rejected_drift", "accuracy"];

fn start(plan: &PhasePlan) -> Start<'_> {
    Start::From(plan.init_checkpoint.as_deref().unwrap())
}

#[test]
fn dpo_on_two_ranks_follows_one_rank() {
    let d = scratch_dir("dpo-world");
    let plan = plan(&d, 3);
    let mut one = Recorder::default();
    let single = final_params(&run(&CpuEngine, &plan, start(&plan), &d.join("one"), &mut Local, &mut one));
    assert_eq!(one.steps.len(), 3);
    for m in &one.steps {
        eprintln!("dpo step {}: loss {:.6} {:?}", m.step, m.loss, m.values);
        for k in KEYS {
            assert!(value(m, k).is_finite(), "{k}");
        }
    }
    // Step 1 is taken at the reference: every margin is 0 up to the rounding of two forwards
    // of the same weights in different batches, so the loss is ln 2.
    assert!((one.steps[0].loss - std::f64::consts::LN_2).abs() < 1e-5, "{}", one.steps[0].loss);
    assert!(value(&one.steps[0], "margin").abs() < 1e-5);
    // Training pushes chosen up relative to rejected: the margin grows and the loss falls.
    assert!(value(&one.steps[2], "margin") > 0.0 && one.steps[2].loss < std::f64::consts::LN_2, "{:?}", one.steps[2]);
    // The held-out accuracy is measured at the boundaries (every 2 steps, and the last).
    let heldout: Vec<f64> = one.steps.iter().filter_map(|m| m.values.iter().find(|(k, _)| k == "heldout_accuracy").map(|v| v.1)).collect();
    assert_eq!(heldout.len(), 2, "steps 2 and 3");
    assert!(heldout.iter().all(|a| (0.0..=1.0).contains(a)));

    let results = run_ring(&CpuEngine, &plan, start(&plan), &d.join("two"), 2);
    let two = final_params(&results[0].1);
    assert_eq!(results[1].1, PhaseOutcome::Finished { final_checkpoint: None }, "only rank 0 writes");
    // Tolerance: the same pairs each step; the runs differ in float summation order (ring
    // reduction, the split of the batch and of the reference computation), ~1e-7 relative per
    // step, amplified a little by Adam.
    let worst = max_diff(&single, &two);
    eprintln!("dpo 1 vs 2 ranks: max |Δ weight| {worst:.3e}");
    assert!(worst < 1e-4, "parameters differ by up to {worst}");
    for (a, b) in one.steps.iter().zip(&results[0].0.steps) {
        assert!((a.loss - b.loss).abs() < 1e-5, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert_eq!(a.values.len(), b.values.len());
        for ((k, x), (_, y)) in a.values.iter().zip(&b.values) {
            assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "step {} {k}: {x} vs {y}", a.step);
        }
    }
}

#[test]
fn a_resumed_dpo_phase_ends_where_an_uninterrupted_one_does() {
    let d = scratch_dir("dpo-resume");
    let plan = plan(&d, 4);
    let mut all = Recorder::default();
    let straight = final_params(&run(&CpuEngine, &plan, start(&plan), &d.join("a"), &mut Local, &mut all));
    let ckpt = d.join("b");
    let mut first = Recorder { stop_at: Some(2), ..Default::default() };
    assert_eq!(run(&CpuEngine, &plan, start(&plan), &ckpt, &mut Local, &mut first), PhaseOutcome::Regroup);
    let step2 = checkpoint::step_dir(&ckpt, 2);
    assert!(step2.join(REFERENCE_FILE).exists() && step2.join("dpo_eval.json").exists());
    // The resumed phase needs no starting model: the reference log-probs come from the checkpoint.
    std::fs::rename(plan.init_checkpoint.as_ref().unwrap(), d.join("sft-gone")).unwrap();
    let mut rest = Recorder::default();
    let resumed = final_params(&run(&CpuEngine, &plan, Start::Continue(&step2), &ckpt, &mut Local, &mut rest));
    assert_eq!(rest.steps.iter().map(|m| m.step).collect::<Vec<_>>(), vec![3, 4]);
    assert!(straight == resumed, "resumed run diverged: max diff {}", max_diff(&straight, &resumed));
    let same = |m: &StepMetrics| StepMetrics { step_ms: 0, ..m.clone() };
    assert_eq!(all.steps[2..].iter().map(same).collect::<Vec<_>>(), rest.steps.iter().map(same).collect::<Vec<_>>());
    // A cache of other pairs (the data changed since the checkpoint) is refused by name.
    let prefs = plan.examples.clone().unwrap();
    let mut text = std::fs::read_to_string(&prefs).unwrap();
    text.push_str("{\"prompt\": \"新题\", \"chosen\": \"甲\", \"rejected\": \"乙\"}\n");
    std::fs::write(&prefs, text).unwrap();
    let mut ev = Recorder::default();
    let io = liandan_worker::phase::PhaseIo { checkpoint_dir: &ckpt, engine: &CpuEngine, coll: &mut Local, abort: &Default::default(), events: &mut ev };
    let e = liandan_worker::phase::dpo::run_dpo(&plan, Start::Continue(&step2), io).unwrap_err().to_string();
    assert!(e.contains(REFERENCE_FILE) && e.contains("other comparisons"), "{e}");
}

#[test]
fn identical_pairs_and_a_bad_beta_are_refused_before_training() {
    let d = scratch_dir("dpo-bad");
    let good = plan(&d, 1);
    check_inputs(&good).unwrap();
    let e = check_inputs(&PhasePlan { dpo: Some(DpoSettings { beta: 0.0 }), ..good.clone() }).unwrap_err().to_string();
    assert!(e.contains("dpo.beta: must be finite and > 0, got 0"), "{e}");
    let e = check_inputs(&PhasePlan { dpo: Some(DpoSettings { beta: f32::NAN }), ..good.clone() }).unwrap_err().to_string();
    assert!(e.contains("dpo.beta: must be finite and > 0, got NaN"), "{e}");
    // Chosen and rejected differ only past seq_len: identical once cut.
    let same = d.join("same.jsonl");
    let long = "床前明月光".repeat(20);
    let lines: String =
        (0..5).map(|i| serde_json::json!({"prompt": format!("题{i}"), "chosen": format!("{long}甲"), "rejected": format!("{long}乙")}).to_string() + "\n").collect();
    std::fs::write(&same, lines).unwrap();
    let e = check_inputs(&PhasePlan { examples: Some(same), ..good.clone() }).unwrap_err().to_string();
    assert!(e.contains("same.jsonl") && e.contains("all 5 pairs are identical after tokenization") && e.contains("seq_len = 40"), "{e}");
    // `tasks` keeps the comparisons of those tasks; one the file lacks is refused, naming the file.
    check_inputs(&PhasePlan { tasks: vec!["poem".into()], ..good.clone() }).unwrap();
    let e = check_inputs(&PhasePlan { tasks: vec!["idiom".into()], ..good.clone() }).unwrap_err().to_string();
    assert!(e.contains("prefs.jsonl: no comparison of tasks [\"idiom\"] (its tasks: [\"poem\"])"), "{e}");
}
