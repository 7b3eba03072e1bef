//! `liandan train --init DIR`: single-process training from a Hugging Face model directory
//! (the tiny random Qwen2 of `tests/fixtures/qwen2_tiny_chat`) or a liandan checkpoint, through
//! the engine interface, and the mismatches it refuses in one line.

mod common;

use std::path::Path;

use common::local::prepared_hf;
use common::{assert_one_line_error, fixture, liandan, s, scratch};
use liandan_data::shard::{Manifest, Split, read_split};
use liandan_worker::checkpoint;
use liandan_worker::collective::Shard;
use liandan_worker::engine::Engine;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::train::{TokenStream, replica_step, step_denominator};

const STEPS: u64 = 4;

/// `liandan train --init INIT` for `steps` steps of 2 × 32 tokens.
fn train(data: &Path, init: &Path, out: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    let steps = steps.to_string();
    let base = ["train", "--data", s(data), "--init", s(init), "--out", s(out), "--steps", &steps, "--batch", "2", "--seq", "32", "--lr", "3e-3", "--warmup", "1"];
    liandan(&[&base[..], extra].concat())
}

#[test]
fn a_qwen2_directory_trains_in_one_process_as_the_engine_does_and_resumes() {
    let d = scratch("train-init");
    let data = prepared_hf(&d, &fixture("hf_tokenizer_tiny"));
    let init = fixture("qwen2_tiny_chat");
    let run = d.join("run");
    let o = train(&data, &init, &run, STEPS, &["--checkpoint-every", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model: Llama L=2 C=32 NH=4 V=512"), "{err}");

    // The same four steps by hand: the imported weights, the CPU engine's replica, the same
    // token windows and schedule. Same code, same order: equal bit for bit.
    let start = checkpoint::load(&init, None).unwrap();
    let cfg = start.state.model_config.clone();
    let mut replica = CpuEngine.replica(&cfg, 2, 32, &AdamWConfig { weight_decay: 0.1, ..Default::default() }, Shard::WHOLE).unwrap();
    replica.model().set_params(&start.params).unwrap();
    let manifest = Manifest::load(&data).unwrap();
    let mut stream = TokenStream::new(read_split(&data, &manifest, Split::Train).unwrap(), 2, 32, &data).unwrap();
    let schedule = LrSchedule { max_lr: 3e-3, min_lr: 3e-3f32 / 10.0, warmup_steps: 1, total_steps: STEPS };
    let mut losses = vec![];
    for step in 0..STEPS {
        let mb = stream.next_batch(2, 32);
        let denom = step_denominator(std::slice::from_ref(&mb)).unwrap();
        let (loss, _, _) = replica_step(&mut *replica, std::slice::from_ref(&mb), denom, None, 1.0, schedule.lr(step)).unwrap();
        losses.push(loss);
    }
    eprintln!("losses by hand: {losses:?}");
    let done = checkpoint::load(&run.join("step-00000004"), None).unwrap();
    assert_eq!(done.state.model_config, cfg);
    assert!(done.params == replica.model_ref().params().unwrap().as_ref(), "liandan train --init differs from the engine run by hand");
    assert!(done.params != start.params);
    let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("step-00000004/config.json")).unwrap()).unwrap();
    assert_eq!(hf["model_type"], "qwen2");

    // Resuming the step-2 checkpoint finishes with the same weights.
    let o = liandan(&["train", "--data", s(&data), "--out", s(&d.join("resumed")), "--resume", s(&run.join("step-00000002"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(checkpoint::load(&d.join("resumed/step-00000004"), None).unwrap().params == done.params, "resumed llama run differs");

    // A liandan checkpoint as --init: its weights, a fresh optimizer and schedule.
    let o = train(&data, &run.join("step-00000004"), &d.join("again"), 1, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = checkpoint::load(&d.join("again/step-00000001"), None).unwrap();
    assert_eq!((again.state.step, again.state.optimizer_t), (1, 1));
}

#[test]
fn init_mismatches_are_refused_in_one_line() {
    let d = scratch("train-init-bad");
    let data = prepared_hf(&d, &fixture("hf_tokenizer_tiny"));
    // A model whose vocabulary (128) is smaller than the data's (503).
    assert_one_line_error(&train(&data, &fixture("qwen2_tiny"), &d.join("a"), 1, &[]), &["--init", "qwen2_tiny", "503 tokens does not fit the model's 128"]);
    // A model directory whose tokenizer is not the data's: the fixture model with a tokenizer
    // trained by `liandan data prepare` on other text.
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let own = common::local::prepared(&other);
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen2_tiny_chat").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(own.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    assert_one_line_error(&train(&data, &model, &d.join("b"), 1, &[]), &["--init", "tokenizer.json is not the tokenizer the data", "--tokenizer"]);
    // With the data's own tokenizer beside it, the same directory trains.
    std::fs::copy(data.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let o = train(&data, &model, &d.join("c"), 1, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A byte-level checkpoint on BPE data.
    let text = d.join("t.txt");
    std::fs::write(&text, "子曰：学而时习之。".repeat(40)).unwrap();
    let bytes_run = d.join("bytes");
    let o = liandan(&["train", "--text", s(&text), "--out", s(&bytes_run), "--steps", "1", "--batch", "2", "--seq", "16", "--layers", "1", "--channels", "32", "--heads", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_one_line_error(&train(&data, &bytes_run, &d.join("e"), 1, &[]), &["--init", "the model reads bytes, but the data was made with the BPE"]);
    // Not a model at all.
    assert_one_line_error(&train(&data, &d, &d.join("f"), 1, &[]), &["not a checkpoint"]);
}
