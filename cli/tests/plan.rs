//! `liandan plan SPEC`: the per-rank estimate of every phase, printed before a job is
//! submitted, is the estimate the coordinator checks (`PhasePlan::memory_per_rank`), here
//! recomputed from `memory::gpt` and the phase rules by hand for `examples/demo.toml`.

mod common;

use std::path::Path;

use common::{assert_one_line_error, command, s, scratch};
use liandan_worker::GptConfig;
use liandan_worker::model::memory::{self, MemoryEstimate, show_bytes};

fn demo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml")
}

/// `liandan plan ARGS` run in `dir` (the demo's paths are relative to where liandan runs).
fn plan(dir: &Path, args: &[&str]) -> std::process::Output {
    command().current_dir(dir).arg("plan").args(args).output().expect("run liandan plan")
}

fn rows(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn sum(parts: &[MemoryEstimate]) -> MemoryEstimate {
    parts.iter().fold(MemoryEstimate::default(), |a, &b| a.plus(b).unwrap())
}

/// The demo's phases by hand: (name, trained models, frozen models, sequences per rank).
fn expected(world: usize) -> Vec<(&'static str, usize, usize, usize)> {
    let share = |n: usize| n.div_ceil(world);
    // pretrain and sft: 8 sequences; reward: 16 pairs, a chosen and a rejected answer each;
    // ppo: 16 prompts, the policy and value model trained, the reference and reward model frozen.
    vec![("pretrain", 1, 0, share(8)), ("sft", 1, 0, share(8)), ("reward", 1, 0, 2 * share(16)), ("ppo", 2, 2, share(16))]
}

#[test]
fn the_demo_plan_is_the_estimate_per_phase_and_rank() {
    let d = scratch("plan");
    // The demo's data is not prepared here: its vocabulary (4096, the demo's BPE) is given.
    let model = GptConfig::preset("nano", 4096).unwrap();
    let params = model.checked_num_parameters().unwrap();
    for world in [1usize, 2, 3] {
        let w = world.to_string();
        let mut args = vec![s(&demo()).to_string(), "--vocab-size".into(), "4096".into(), "--json".into()];
        if world != 1 {
            args.extend(["--workers".to_string(), w.clone()]);
        }
        let got = rows(&plan(&d, &args.iter().map(String::as_str).collect::<Vec<_>>()));
        let want = expected(world);
        assert_eq!(got.len(), want.len());
        for (r, (name, trained, frozen, b)) in got.iter().zip(want) {
            let at = format!("{name} at {world} rank(s)");
            assert_eq!(r["phase"], name, "{at}");
            assert_eq!((r["trained_models"].as_u64(), r["frozen_models"].as_u64()), (Some(trained as u64), Some(frozen as u64)), "{at}");
            assert_eq!(r["sequences_per_rank"].as_u64(), Some(b as u64), "{at}");
            assert_eq!(r["seq_len"], 128, "{at}");
            assert_eq!(r["params_per_model"].as_u64(), Some(params), "{at}");
            assert_eq!(r["params"].as_u64(), Some(params * (trained + frozen) as u64), "{at}");
            let e = sum(&[vec![memory::gpt(&model, b, 128, true).unwrap(); trained], vec![memory::gpt(&model, b, 128, false).unwrap(); frozen]].concat());
            for (k, v) in [("weights", e.weights), ("gradients", e.gradients), ("optimizer", e.optimizer), ("activations", e.activations), ("total", e.total())] {
                assert_eq!(r[k].as_u64(), Some(v), "{at}: {k}");
            }
            // Weights are 4 bytes per parameter held; AdamW's two moments only for trained models.
            assert_eq!(e.weights, 4 * params * (trained + frozen) as u64);
            assert_eq!(e.optimizer, 8 * params * trained as u64);
        }
    }

    // The table: one row per phase with the same numbers, readable.
    let o = plan(&d, &[s(&demo()), "--vocab-size", "4096"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{table}");
    assert!(table.contains("model: gpt2 L=4 C=128 NH=4 T≤128 V=4096") && table.contains("preset nano"), "{table}");
    assert!(table.contains("per rank at 1 rank(s) (cluster.min_workers"), "{table}");
    for (name, trained, frozen, b) in expected(1) {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no row for {name}: {table}"));
        let e = sum(&[vec![memory::gpt(&model, b, 128, true).unwrap(); trained], vec![memory::gpt(&model, b, 128, false).unwrap(); frozen]].concat());
        for v in [e.weights, e.gradients, e.activations, e.total()] {
            assert!(line.contains(&show_bytes(v)), "{name}: {} missing from '{line}'", show_bytes(v));
        }
    }
    assert!(table.contains("largest: phase 'ppo'"), "{table}");
    // Nothing was written where the spec points (no checkpoint directory made).
    assert!(!d.join("runs").exists(), "liandan plan wrote runs/");
}

#[test]
fn a_plan_without_its_data_or_with_a_bad_world_says_what_to_give() {
    let d = scratch("plan-bad");
    assert_one_line_error(&plan(&d, &[s(&demo())]), &["data.prepared", "runs/demo/data", "--vocab-size"]);
    assert_one_line_error(&plan(&d, &[s(&demo()), "--vocab-size", "4096", "--workers", "0"]), &["--workers must be at least 1"]);
    let short = d.join("short.toml");
    std::fs::write(&short, std::fs::read_to_string(demo()).unwrap().replacen("seq_len = 128", "seq_len = 4096", 1)).unwrap();
    assert_one_line_error(&plan(&d, &[s(&short), "--vocab-size", "4096"]), &["short.toml", "phases[0].seq_len", "must be <= the model's context 128"]);
}
