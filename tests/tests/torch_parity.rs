//! The engine against PyTorch: `scripts/torch_fixture.py` ran Hugging Face's `GPT2LMHeadModel`
//! on a small config and saved weights, a batch (with ignored targets and per-position weights),
//! logits, loss, every parameter's gradient and a 10-step AdamW trajectory. This test loads the
//! same weights and compares everything.

use liandan_tests::{assert_close, fixture, max_abs};
use liandan_worker::checkpoint::deserialize_model;
use liandan_worker::model::params::ParamLayout;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::train::{MicroBatch, TrainConfig, Trainer};
use liandan_worker::{Gpt, GptConfig};
use safetensors::SafeTensors;

struct Fixture {
    config: GptConfig,
    meta: serde_json::Value,
    params: Vec<f32>,
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        let path = fixture("gpt2_tiny.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().as_ref().expect("fixture metadata");
        assert_eq!(meta["format"], "liandan-torch-fixture");
        let meta: serde_json::Value = serde_json::from_str(&meta["config"]).expect("config json");
        let u = |k: &str| meta[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
        let config = GptConfig::new(u("vocab_size"), u("n_positions"), u("n_layer"), u("n_head"), u("n_embd"));
        let layout = ParamLayout::new(&config);
        let params = deserialize_model(&config, &layout, &bytes).expect("fixture weights load with checkpoint names");
        Fixture { config, meta, params, bytes }
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
        v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn i32s(&self, name: &str) -> Vec<i32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
        v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn bt(&self) -> (usize, usize) {
        (self.meta["B"].as_u64().unwrap() as usize, self.meta["T"].as_u64().unwrap() as usize)
    }

    fn batch(&self) -> MicroBatch {
        let (b, t) = self.bt();
        MicroBatch { inputs: self.i32s("inputs").iter().map(|&x| x as u32).collect(), targets: self.i32s("targets"), weights: Some(self.f32s("weights")), b, t }
    }
}

#[test]
fn logits_loss_and_every_gradient_match_pytorch() {
    let fx = Fixture::load();
    let (b, t) = fx.bt();
    let mb = fx.batch();
    let mut model = Gpt::new(fx.config.clone(), b, t).unwrap();
    model.params.copy_from_slice(&fx.params);
    model.forward(&mb.inputs, b, t).unwrap();

    // Logits: compare the real vocabulary columns. Values are O(1); f32 sums of 32–128 terms in
    // a different order differ by a few ulps, so 1e-5 absolute is ~100× the expected error.
    let (v, vp) = (fx.config.vocab_size, fx.config.padded_vocab_size);
    let logits: Vec<f32> = model.logits().chunks(vp).flat_map(|row| row[..v].to_vec()).collect();
    assert_close(&logits, &fx.f32s("logits"), 1e-5, 1e-5, "logits");

    let denom = liandan_worker::model::gpt::loss_denominator([(&mb.targets[..], mb.weights.as_deref())]);
    let loss = model.loss(&mb.targets, mb.weights.as_deref(), denom, true).unwrap();
    let want_loss = fx.f32s("loss")[0];
    eprintln!("loss: liandan {loss:.7}, pytorch {want_loss:.7}");
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs {want_loss}");

    model.zero_grad();
    model.backward().unwrap();
    // Gradients: per tensor, 1e-5 of the tensor's largest entry plus 1e-4 relative. Entries
    // near zero come from cancelling sums, so a tolerance scaled by the tensor is the fair one.
    let layout = &model.layout;
    let mut checked = 0;
    for s in layout.named_slices(&fx.config) {
        let name = s.kind.hf_name(s.layer);
        let want = fx.f32s(&format!("grads.{name}"));
        let got = &model.grads[s.offset..s.offset + want.len()];
        assert_close(got, &want, 1e-5 * max_abs(&want), 1e-4, &format!("grad {name}"));
        checked += 1;
    }
    assert_eq!(checked, 4 + 12 * fx.config.n_layer, "every parameter tensor compared");
    // Padded embedding rows receive no gradient.
    let wte = layout.range(liandan_worker::model::params::ParamKind::Wte);
    assert!(model.grads[wte.start + v * fx.config.n_embd..wte.end].iter().all(|&g| g == 0.0));
}

#[test]
fn ten_adamw_steps_follow_pytorch() {
    let fx = Fixture::load();
    let (b, t) = fx.bt();
    let m = &fx.meta;
    let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("config.{k}")) as f32;
    let config = TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accum: 1,
        schedule: LrSchedule { max_lr: f("max_lr"), min_lr: f("min_lr"), warmup_steps: m["warmup_steps"].as_u64().unwrap(), total_steps: m["total_steps"].as_u64().unwrap() },
        adamw: AdamWConfig { beta1: f("beta1"), beta2: f("beta2"), eps: f("eps"), weight_decay: f("weight_decay") },
        grad_clip: f("grad_clip"),
        seed: 0,
    };
    let mut trainer = Trainer::new(fx.config.clone(), config).unwrap();
    trainer.model.params.copy_from_slice(&fx.params);
    let mb = fx.batch();
    let (want_losses, want_lrs, want_norms) = (fx.f32s("losses"), fx.f32s("lrs"), fx.f32s("grad_norms"));
    let mut losses = Vec::new();
    for s in 0..want_losses.len() {
        let st = trainer.train_step(std::slice::from_ref(&mb)).unwrap();
        eprintln!("step {s}: loss {:.6} (pytorch {:.6}), lr {:.6}, norm {:.5} (pytorch {:.5})", st.loss, want_losses[s], st.lr, st.grad_norm, want_norms[s]);
        assert!((st.lr - want_lrs[s]).abs() <= 1e-7 * want_lrs[s].max(1.0), "lr at step {s}");
        assert!((st.grad_norm - want_norms[s]).abs() <= 1e-4 * want_norms[s], "grad norm at step {s}");
        losses.push(st.loss);
    }
    // Ten steps at lr 1e-2 amplify f32 rounding slightly (Adam divides by √v, so tiny gradients
    // move weights by ~lr whatever their sign); observed drift is ~3e-7 relative, so 2e-5 leaves
    // room for another CPU's rounding while any real bug (a wrong decay mask, bias correction or
    // clip factor) shifts the losses by more than 1e-3.
    assert_close(&losses, &want_losses, 0.0, 2e-5, "10-step losses");
    assert!(losses[9] < losses[0] - 1.0, "the model learns the batch");
}
