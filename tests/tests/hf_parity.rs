//! The llama family against transformers: `scripts/hf_fixture.py` built a tiny random
//! `LlamaForCausalLM` (grouped-query attention, untied head) and `Qwen2ForCausalLM` (q/k/v
//! biases, tied head, θ = 1e6), saved them with `save_pretrained`, and wrote one batch's logits,
//! loss, every gradient and a 10-step AdamW run. These tests import the directories through
//! liandan's Hugging Face import path and compare everything; then a round trip: import → 5
//! steps → checkpoint (Hugging Face names) → import again gives the same logits.

use std::path::Path;

use liandan_tests::{assert_close, fixture, max_abs, scratch_dir};
use liandan_worker::checkpoint::{self, SaveInfo};
use liandan_worker::collective::Shard;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::engine::{Engine, Model};
use liandan_worker::hf::weights::{extract, llama_tensors};
use liandan_worker::model::config::Family;
use liandan_worker::model::gpt::loss_denominator;
use liandan_worker::model::llama::Llama;
use liandan_worker::model::params::ParamLayout;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::train::{MicroBatch, replica_step};
use safetensors::SafeTensors;

struct Reference {
    bytes: Vec<u8>,
    train: serde_json::Value,
}

impl Reference {
    fn load(name: &str) -> Reference {
        let path = fixture(&format!("{name}.ref.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().as_ref().expect("fixture metadata");
        assert_eq!(meta["format"], "liandan-hf-fixture");
        let train = serde_json::from_str(&meta["train"]).expect("train json");
        Reference { bytes, train }
    }

    fn raw(&self, name: &str) -> Vec<[u8; 4]> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
        v.data().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name).into_iter().map(f32::from_le_bytes).collect()
    }

    fn batch(&self) -> MicroBatch {
        let (b, t) = (self.train["B"].as_u64().unwrap() as usize, self.train["T"].as_u64().unwrap() as usize);
        let inputs = self.raw("inputs").into_iter().map(|c| i32::from_le_bytes(c) as u32).collect();
        let targets = self.raw("targets").into_iter().map(i32::from_le_bytes).collect();
        MicroBatch { inputs, targets, weights: Some(self.f32s("weights")), b, t }
    }

    fn f(&self, k: &str) -> f32 {
        self.train[k].as_f64().unwrap_or_else(|| panic!("train.{k}")) as f32
    }
}

/// The logits of the real vocabulary columns, `(B·T, V)`.
fn real_logits(m: &mut dyn Model) -> Vec<f32> {
    let (v, vp) = (m.config().vocab_size, m.config().padded_vocab_size);
    m.logits().unwrap().chunks(vp).flat_map(|row| row[..v].to_vec()).collect()
}

fn logits_loss_and_gradients(name: &str) {
    let dir = fixture(name);
    let ck = checkpoint::load(&dir, None).unwrap_or_else(|e| panic!("import {}: {e}", dir.display()));
    let cfg = ck.state.model_config.clone();
    assert_eq!(cfg.family, Family::Llama);
    let r = Reference::load(name);
    let mb = r.batch();
    // The concrete model (what CpuEngine::model builds for a llama-family config), for its
    // gradient buffer.
    let mut m = Llama::new(cfg.clone(), mb.b, mb.t).unwrap();
    m.params.copy_from_slice(&ck.params);
    m.forward(&mb.inputs, mb.b, mb.t).unwrap();
    // Logits are O(1–10); f32 sums of 32–64 terms in another order differ by a few ulps of the
    // largest value, so 3e-5 absolute plus 1e-5 relative is ~30× the expected error.
    assert_close(&real_logits(&mut m), &r.f32s("logits"), 3e-5, 1e-5, &format!("{name} logits"));
    let denom = loss_denominator([(&mb.targets[..], mb.weights.as_deref())]);
    let loss = m.loss(&mb.targets, mb.weights.as_deref(), denom, true).unwrap();
    let want = r.f32s("loss")[0];
    eprintln!("{name} loss: liandan {loss:.7}, transformers {want:.7}");
    assert!((loss - want).abs() < 1e-5, "{name} loss {loss} vs {want}");
    m.zero_grad();
    m.backward().unwrap();
    // Gradients: per tensor, 1e-5 of its largest entry plus 1e-4 relative (near-zero entries
    // come from cancelling sums, so a tolerance scaled by the tensor is the fair one). The
    // engine's fused q/k/v and gate/up gradients are split back into Hugging Face tensors.
    let layout = ParamLayout::new(&cfg);
    let mut checked = 0;
    let g = m.grads.clone();
    for t in llama_tensors(&cfg) {
        let want = r.f32s(&format!("grads.{}", t.name));
        let got = extract(&cfg, &layout, &g, &t);
        assert_close(&got, &want, 1e-5 * max_abs(&want), 1e-4, &format!("{name} grad {}", t.name));
        checked += 1;
    }
    let per_layer = if cfg.attention_bias { 12 } else { 9 };
    assert_eq!(checked, 2 + usize::from(!cfg.tie_word_embeddings) + per_layer * cfg.n_layer, "every parameter tensor compared");
}

fn ten_adamw_steps(name: &str) {
    let dir = fixture(name);
    let ck = checkpoint::load(&dir, None).unwrap();
    let cfg = ck.state.model_config.clone();
    let r = Reference::load(name);
    let mb = r.batch();
    let adamw = AdamWConfig { beta1: r.f("beta1"), beta2: r.f("beta2"), eps: r.f("eps"), weight_decay: r.f("weight_decay") };
    let schedule =
        LrSchedule { max_lr: r.f("max_lr"), min_lr: r.f("min_lr"), warmup_steps: r.train["warmup_steps"].as_u64().unwrap(), total_steps: r.train["total_steps"].as_u64().unwrap() };
    let mut rep = CpuEngine.replica(&cfg, mb.b, mb.t, &adamw, Shard::WHOLE).unwrap();
    rep.model().set_params(&ck.params).unwrap();
    let denom = loss_denominator([(&mb.targets[..], mb.weights.as_deref())]);
    let (want_losses, want_lrs, want_norms) = (r.f32s("losses"), r.f32s("lrs"), r.f32s("grad_norms"));
    let mut losses = Vec::new();
    for s in 0..want_losses.len() {
        let lr = schedule.lr(s as u64);
        let (loss, norm, _) = replica_step(rep.as_mut(), std::slice::from_ref(&mb), denom, None, r.f("grad_clip"), lr).unwrap();
        eprintln!("{name} step {s}: loss {loss:.6} (transformers {:.6}), lr {lr:.6}, norm {norm:.5} (transformers {:.5})", want_losses[s], want_norms[s]);
        assert!((lr - want_lrs[s]).abs() <= 1e-7 * want_lrs[s].max(1.0), "lr at step {s}");
        // The norm is clipped from step 0 on (it exceeds 1), so every update is direction-only
        // and small differences do not compound fast; 2e-4 relative covers ten steps.
        assert!((norm - want_norms[s]).abs() <= 2e-4 * want_norms[s], "{name} grad norm at step {s}: {norm} vs {}", want_norms[s]);
        losses.push(loss as f32);
    }
    // As for GPT-2: AdamW amplifies f32 rounding a little over ten steps at lr 1e-2; any real
    // bug (decay mask, bias correction, clip factor) moves the losses by more than 1e-3.
    assert_close(&losses, &want_losses, 0.0, 5e-5, &format!("{name} 10-step losses"));
    assert!(losses[9] < losses[0] - 1.0, "the model learns the batch");
}

#[test]
fn llama_logits_loss_and_every_gradient_match_transformers() {
    logits_loss_and_gradients("llama_tiny");
}

#[test]
fn qwen2_logits_loss_and_every_gradient_match_transformers() {
    logits_loss_and_gradients("qwen2_tiny");
}

#[test]
fn llama_ten_adamw_steps_follow_transformers() {
    ten_adamw_steps("llama_tiny");
}

#[test]
fn qwen2_ten_adamw_steps_follow_transformers() {
    ten_adamw_steps("qwen2_tiny");
}

/// Import → 5 SFT-style steps (prompt positions ignored) → checkpoint → import again: the same
/// logits, bit for bit, through the liandan checkpoint and through the Hugging Face files alone.
#[test]
fn import_train_export_import_round_trips() {
    for name in ["llama_tiny", "qwen2_tiny"] {
        let ck = checkpoint::load(&fixture(name), None).unwrap();
        let cfg = ck.state.model_config.clone();
        let r = Reference::load(name);
        let mut mb = r.batch();
        // SFT masks the prompt: the first 5 positions of every row take no loss.
        for (i, t) in mb.targets.iter_mut().enumerate() {
            if i % mb.t < 5 {
                *t = -1;
            }
        }
        mb.weights = None;
        let mut rep = CpuEngine.replica(&cfg, mb.b, mb.t, &AdamWConfig::default(), Shard::WHOLE).unwrap();
        rep.model().set_params(&ck.params).unwrap();
        let denom = loss_denominator([(&mb.targets[..], None)]);
        for _ in 0..5 {
            replica_step(rep.as_mut(), std::slice::from_ref(&mb), denom, None, 1.0, 3e-3).unwrap();
        }
        let trained = rep.model().params().unwrap().to_vec();
        assert_ne!(trained, ck.params, "the steps moved the weights");
        rep.model().forward(&mb.inputs, mb.b, mb.t).unwrap();
        let want = real_logits(rep.model());

        let out = scratch_dir(&format!("hf-roundtrip-{name}"));
        let saved = out.join("ckpt");
        let info = SaveInfo { step: 5, rng_state: 0, train_config: None, data_cursor: Default::default(), tokenizer: "", extra_files: &[] };
        checkpoint::save(&saved, &cfg, &trained, None, &info).unwrap();
        // The exported config.json names the architecture transformers loads.
        let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(saved.join("config.json")).unwrap()).unwrap();
        assert_eq!(hf["architectures"][0], if cfg.attention_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" });
        // As a Hugging Face directory: only config.json and model.safetensors.
        let bare = out.join("hf");
        std::fs::create_dir_all(&bare).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(saved.join(f), bare.join(f)).unwrap();
        }
        for dir in [&saved, &bare] {
            let back = checkpoint::load(dir, Some(&cfg)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert_eq!(back.params, trained, "{}: parameters round-trip", dir.display());
            let mut m = CpuEngine.model(&back.state.model_config, mb.b, mb.t).unwrap();
            m.set_params(&back.params).unwrap();
            m.forward(&mb.inputs, mb.b, mb.t).unwrap();
            assert_eq!(real_logits(m.as_mut()), want, "{}: logits after the round trip", dir.display());
        }
        if let Ok(keep) = std::env::var("LIANDAN_EXPORT_DIR") {
            keep_for_transformers(Path::new(&keep), name, &saved, &mb, &want, cfg.vocab_size);
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// With `LIANDAN_EXPORT_DIR` set, the trained checkpoint is copied there with the logits liandan
/// computed (`reference_logits.safetensors`: `inputs` (B, T), `logits` (B, T, V)), for
/// `scripts/check_hf_load.py DIR --logits DIR/reference_logits.safetensors`.
fn keep_for_transformers(root: &Path, name: &str, saved: &Path, mb: &MicroBatch, logits: &[f32], v: usize) {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(saved).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let ib: Vec<u8> = mb.inputs.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect();
    let lb: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("inputs".to_string(), TensorView::new(Dtype::I32, vec![mb.b, mb.t], &ib).unwrap()),
        ("logits".to_string(), TensorView::new(Dtype::F32, vec![mb.b, mb.t, v], &lb).unwrap()),
    ];
    std::fs::write(dir.join("reference_logits.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Bad directories are refused with one line naming the file and the tensor or field.
#[test]
fn bad_directories_are_refused_by_file_and_field() {
    let out = scratch_dir("hf-bad");
    let copy = |name: &str| {
        let d = out.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("qwen2_tiny").join(f), d.join(f)).unwrap();
        }
        d
    };
    // The submit-time check (headers only) refuses what the import refuses, with the same line.
    let err = |d: &Path| {
        let m = checkpoint::load(d, None).expect_err("must be refused").to_string();
        assert_eq!(checkpoint::check(d, None).expect_err("the check must refuse it too").to_string(), m);
        m
    };
    // A Mistral config.
    let d = copy("mistral");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    v["model_type"] = "mistral".into();
    v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let m = err(&d);
    assert!(m.contains("config.json") && m.contains("model_type") && m.contains("mistral"), "{m}");
    // A config whose width disagrees with the tensors.
    let d = copy("shape");
    v = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    v["intermediate_size"] = 48.into();
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let m = err(&d);
    assert!(m.contains("model.safetensors") && m.contains("mlp.gate_proj.weight") && m.contains("shape"), "{m}");
    // A sharded index naming a missing shard.
    let d = copy("shards");
    std::fs::rename(d.join("model.safetensors"), d.join("model-00001-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = err(&d);
    assert!(m.contains("model.safetensors.index.json") && m.contains("model-00002-of-00002.safetensors") && m.contains("missing"), "{m}");
    let _ = std::fs::remove_dir_all(&out);
}
