//! Engine behaviour on small models: gradients by finite differences, gradient accumulation,
//! determinism, the checkpoint round trip, and cached generation.

use liandan_tests::{assert_close, scratch_dir, small_train_config, synthetic_tokens};
use liandan_worker::checkpoint::DataCursor;
use liandan_worker::generate::{Generator, SamplingConfig};
use liandan_worker::model::gpt::loss_denominator;
use liandan_worker::rng::Rng;
use liandan_worker::train::{MicroBatch, TokenStream, Trainer};
use liandan_worker::{Gpt, GptConfig};

/// A tiny model with non-trivial LayerNorm parameters and biases (random, not 1/0).
fn tiny_model(b: usize, t: usize, seed: u64) -> Gpt {
    let cfg = GptConfig::new(23, 8, 2, 2, 8);
    let mut m = Gpt::new(cfg, b, t).unwrap();
    let mut rng = Rng::new(seed);
    // Larger than GPT-2's 0.02 so every path carries signal well above f32 noise.
    m.params.iter_mut().for_each(|p| *p = 0.3 * rng.normal());
    let wte = m.layout.range(liandan_worker::model::params::ParamKind::Wte);
    let real = m.config.vocab_size * m.config.n_embd;
    m.params[wte.start + real..wte.end].fill(0.0);
    m
}

fn batch_with_ignores_and_weights(b: usize, t: usize, vocab: u32, seed: u64) -> MicroBatch {
    let mut rng = Rng::new(seed);
    let inputs: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| if i % 5 == 2 { -1 } else { rng.below(vocab as u64) as i32 }).collect();
    let weights: Vec<f32> = (0..b * t).map(|_| 0.5 + rng.next_f32()).collect();
    MicroBatch { inputs, targets, weights: Some(weights), b, t }
}

fn loss_of(m: &mut Gpt, mb: &MicroBatch, denom: f32) -> f64 {
    m.forward(&mb.inputs, mb.b, mb.t).unwrap();
    m.loss(&mb.targets, mb.weights.as_deref(), denom, false).unwrap() as f64
}

#[test]
fn gradients_match_finite_differences() {
    let (b, t) = (2, 6);
    let mut m = tiny_model(b, t, 5);
    let mb = batch_with_ignores_and_weights(b, t, 23, 6);
    let denom = loss_denominator([(&mb.targets[..], mb.weights.as_deref())]);
    m.forward(&mb.inputs, b, t).unwrap();
    m.loss(&mb.targets, mb.weights.as_deref(), denom, true).unwrap();
    m.zero_grad();
    m.backward().unwrap();
    let grads = m.grads.clone();
    let base = m.params.clone();

    // 1. Directional derivatives along random unit directions over all parameters: the loss
    //    change is |g|·h ≫ f32 noise, so central differences with h = 1e-2 are accurate to
    //    O(h²) ≈ 1e-4 relative; we allow 1e-2.
    let mut rng = Rng::new(9);
    for trial in 0..4 {
        let mut u: Vec<f32> = (0..base.len()).map(|_| rng.normal()).collect();
        let wte = m.layout.range(liandan_worker::model::params::ParamKind::Wte);
        u[wte.start + 23 * 8..wte.end].fill(0.0);
        let norm = u.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        u.iter_mut().for_each(|x| *x /= norm);
        let h = 1e-2f32;
        let analytic: f64 = grads.iter().zip(&u).map(|(g, u)| *g as f64 * *u as f64).sum();
        m.params.iter_mut().zip(base.iter().zip(&u)).for_each(|(p, (b0, u))| *p = b0 + h * u);
        let lp = loss_of(&mut m, &mb, denom);
        m.params.iter_mut().zip(base.iter().zip(&u)).for_each(|(p, (b0, u))| *p = b0 - h * u);
        let lm = loss_of(&mut m, &mb, denom);
        let numeric = (lp - lm) / (2.0 * h as f64);
        eprintln!("direction {trial}: analytic {analytic:.6}, numeric {numeric:.6}");
        assert!((analytic - numeric).abs() <= 1e-2 * analytic.abs().max(1e-2), "direction {trial}: {analytic} vs {numeric}");
    }

    // 2. Single coordinates: the largest-gradient entry of every tensor (so each op's weight
    //    and bias gradient is checked on its own). Same h; f32 loss noise (~1e-7) / h gives
    //    ~1e-5 absolute error, so 2e-3 absolute + 2e-2 relative is comfortably above noise.
    for s in m.layout.named_slices(&m.config) {
        let name = s.kind.hf_name(s.layer);
        let (i, g) = (s.offset..s.offset + s.len).map(|i| (i, grads[i])).fold((s.offset, 0.0f32), |a, x| if x.1.abs() > a.1.abs() { x } else { a });
        let h = 1e-2f32;
        m.params.copy_from_slice(&base);
        m.params[i] = base[i] + h;
        let lp = loss_of(&mut m, &mb, denom);
        m.params[i] = base[i] - h;
        let lm = loss_of(&mut m, &mb, denom);
        let numeric = (lp - lm) / (2.0 * h as f64);
        assert!((g as f64 - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(), "{name}[{}]: analytic {g}, numeric {numeric}", i - s.offset);
    }
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let (b, t) = (4, 6);
    let full = batch_with_ignores_and_weights(b, t, 23, 12);
    let mut big = tiny_model(b, t, 3);
    let denom = loss_denominator([(&full.targets[..], full.weights.as_deref())]);
    big.zero_grad();
    big.forward(&full.inputs, b, t).unwrap();
    let l_big = big.loss(&full.targets, full.weights.as_deref(), denom, true).unwrap();
    big.backward().unwrap();

    let mut small = tiny_model(2, t, 3);
    small.zero_grad();
    let mut l_small = 0.0;
    for half in 0..2 {
        let r = half * 2 * t..(half + 1) * 2 * t;
        let w = full.weights.as_ref().unwrap()[r.clone()].to_vec();
        small.forward(&full.inputs[r.clone()], 2, t).unwrap();
        l_small += small.loss(&full.targets[r], Some(&w), denom, true).unwrap();
        small.backward().unwrap();
    }
    // Same math, different summation order across the two halves: a few f32 ulps.
    assert!((l_big - l_small).abs() < 1e-6, "{l_big} vs {l_small}");
    let scale = liandan_tests::max_abs(&big.grads);
    assert_close(&small.grads, &big.grads, 1e-6 * scale, 1e-5, "accumulated grads");
}

fn run_steps(trainer: &mut Trainer, stream: &mut TokenStream, n: u64) -> Vec<f32> {
    let (b, t) = (trainer.config.batch_size, trainer.config.seq_len);
    (0..n).map(|_| trainer.train_step(&[stream.next_batch(b, t)]).unwrap().loss).collect()
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let cfg = GptConfig::new(256, 32, 2, 2, 32);
    let tokens = synthetic_tokens(4000);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut tr = Trainer::new(cfg.clone(), small_train_config(4, 32, 10, 42)).unwrap();
        let mut s = TokenStream::new(tokens.clone(), 4, 32, "synthetic".as_ref()).unwrap();
        run_steps(&mut tr, &mut s, 3);
        runs.push(tr.replica.model.params);
    }
    assert!(runs[0].iter().zip(&runs[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "two runs with one seed differ");
    let other = Trainer::new(cfg, small_train_config(4, 32, 10, 43)).unwrap();
    assert_ne!(other.model.params, Trainer::new(GptConfig::new(256, 32, 2, 2, 32), small_train_config(4, 32, 10, 42)).unwrap().model.params);
}

#[test]
fn resume_from_checkpoint_is_bit_identical() {
    let cfg = GptConfig::new(256, 32, 2, 2, 32);
    let tokens = synthetic_tokens(3000);
    let train_cfg = small_train_config(4, 32, 10, 7);

    let mut straight = Trainer::new(cfg.clone(), train_cfg.clone()).unwrap();
    let mut s1 = TokenStream::new(tokens.clone(), 4, 32, "synthetic".as_ref()).unwrap();
    let straight_losses = run_steps(&mut straight, &mut s1, 10);

    let mut first = Trainer::new(cfg, train_cfg).unwrap();
    let mut s2 = TokenStream::new(tokens.clone(), 4, 32, "synthetic".as_ref()).unwrap();
    let mut losses = run_steps(&mut first, &mut s2, 5);
    let dir = scratch_dir("resume").join("ckpt");
    first.save(&dir, DataCursor { position: s2.cursor as u64 }, "bytes", &[]).unwrap();
    drop(first);

    let (mut resumed, state) = Trainer::resume(&dir).unwrap();
    assert_eq!(resumed.step, 5);
    let mut s3 = TokenStream::new(tokens, 4, 32, "synthetic".as_ref()).unwrap();
    s3.cursor = state.data_cursor.position as usize;
    losses.extend(run_steps(&mut resumed, &mut s3, 5));

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&straight_losses), "loss trajectory");
    assert_eq!(bits(&resumed.model.params), bits(&straight.model.params), "weights after 10 steps");
    assert_eq!(bits(&resumed.opt.m), bits(&straight.opt.m), "AdamW m");
    assert_eq!(bits(&resumed.opt.v), bits(&straight.opt.v), "AdamW v");
    assert!(losses[9] < losses[0], "loss falls: {losses:?}");
}

#[test]
fn cached_decoding_gives_the_logits_of_a_full_forward() {
    let cfg = GptConfig::new(256, 32, 2, 4, 32);
    let mut rng = Rng::new(77);
    let mut model = Gpt::new(cfg.clone(), 1, 32).unwrap();
    model.init_weights(&mut rng);
    // Perturb every parameter so biases and LayerNorm terms are not trivially 0/1.
    model.params.iter_mut().for_each(|p| *p += 0.05 * rng.normal());
    let prompt: Vec<u32> = "子曰：".bytes().map(u32::from).collect();
    let sampling = SamplingConfig { max_new_tokens: 20, greedy: true, ..Default::default() };

    let mut cached_logits = Vec::new();
    let mut seq = prompt.clone();
    {
        let mut g = Generator::new(&model);
        let mut logits = g.feed(&prompt).unwrap().to_vec();
        for _ in 0..sampling.max_new_tokens {
            cached_logits.push(logits.clone());
            let next = liandan_worker::generate::sample(&logits, &sampling, &mut rng);
            seq.push(next);
            logits = g.feed(&[next]).unwrap().to_vec();
        }
    }
    // Uncached: a full forward over the sequence so far; the last row's logits.
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size);
    for (k, want) in cached_logits.iter().enumerate() {
        let len = prompt.len() + k;
        model.forward(&seq[..len], 1, len).unwrap();
        let row = &model.logits()[(len - 1) * vp..(len - 1) * vp + v];
        // Different summation orders (gemm tiles vs dot products): 1e-5 on O(1) logits.
        assert_close(want, row, 1e-5, 1e-5, &format!("logits after {len} tokens"));
    }
    // And the generator's own greedy loop emits the same tokens.
    let mut g = Generator::new(&model);
    let out = g.generate(&prompt, &sampling).unwrap();
    assert_eq!(out.tokens, seq[prompt.len()..].to_vec());
}
