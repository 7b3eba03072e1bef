//! `liandan bench`: throughput measurements (benchmarks measure speed; tests never do).
//!
//! `bench train` times full training steps (forward, loss, backward, clip, AdamW) on random
//! tokens and reports tokens/s and achieved GFLOP/s using
//! [`liandan_worker::GptConfig::train_flops_per_token`] (`6·N + 6·L·C·T`).

use std::time::Instant;

use liandan_worker::model::profile::OpProfile;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::rng::Rng;
use liandan_worker::train::{MicroBatch, TrainConfig, Trainer};
use liandan_worker::GptConfig;

use crate::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Training-step throughput on a model preset.
    Train(BenchTrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// Backend: cpu (cuda arrives with the GPU backend).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Preset: tiny, small-256, nano, gpt2.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Sequences per step (B).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (T); default the preset's context.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Vocabulary size (GPT-2's by default, padded to 50304).
    #[arg(long, default_value_t = 50257)]
    pub vocab: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (page faults, caches, thread start-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also print where the time goes, per op (forward, backward, optimizer).
    #[arg(long)]
    pub profile: bool,
}

pub fn run(cmd: BenchCommand, threads: usize) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a, threads),
    }
}

fn bench_train(a: BenchTrainArgs, threads: usize) -> Result<(), CliError> {
    if a.device != "cpu" {
        return Err(CliError::Usage(format!("--device {}: only the cpu backend is built so far", a.device)));
    }
    if a.steps == 0 {
        return Err(CliError::Usage("--steps must be at least 1".into()));
    }
    let model = GptConfig::preset(&a.model, a.vocab)?;
    let (b, t) = (a.batch, a.seq.unwrap_or(model.n_positions));
    let config = TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accum: 1,
        schedule: LrSchedule { max_lr: 3e-4, min_lr: 3e-5, warmup_steps: 0, total_steps: (a.steps + a.warmup) as u64 },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed: 1,
    };
    let mut trainer = Trainer::new(model.clone(), config)?;
    let mut rng = Rng::new(2);
    let tokens: Vec<u32> = (0..b * t + 1).map(|_| rng.below(a.vocab as u64) as u32).collect();
    let mb = MicroBatch { inputs: tokens[..b * t].to_vec(), targets: tokens[1..].iter().map(|&x| x as i32).collect(), weights: None, b, t };
    eprintln!(
        "bench train: {} (L={} C={} NH={} V={}, {:.1}M params), B={b} T={t}, {threads} threads, {} warmup + {} timed steps",
        a.model,
        model.n_layer,
        model.n_embd,
        model.n_head,
        model.vocab_size,
        model.num_real_parameters() as f64 / 1e6,
        a.warmup,
        a.steps
    );
    for _ in 0..a.warmup {
        trainer.train_step(std::slice::from_ref(&mb))?;
    }
    if a.profile {
        trainer.model.profile = Some(OpProfile::default());
    }
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps {
        let t0 = Instant::now();
        let st = trainer.train_step(std::slice::from_ref(&mb))?;
        let dt = t0.elapsed().as_secs_f64();
        times.push(dt);
        eprintln!("step {i}: {:.1} ms, loss {:.4}", dt * 1e3, st.loss);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens_per_s = (b * t) as f64 / mean;
    let gflops = model.train_flops_per_token(t) * tokens_per_s / 1e9;
    if let Some(prof) = &trainer.model.profile {
        print_profile(prof, a.steps, mean);
    }
    println!("tokens/s: {tokens_per_s:.1}  step: {:.1} ms  achieved: {gflops:.1} GFLOP/s (6·N + 6·L·C·T per token)", mean * 1e3);
    println!(
        "bench_result impl=liandan model={} batch={b} seq={t} threads={threads} tokens_per_s={tokens_per_s:.1} step_ms={:.1} gflops={gflops:.1}",
        a.model,
        mean * 1e3
    );
    Ok(())
}

/// A table of per-op time per step and its share of the step.
fn print_profile(prof: &OpProfile, steps: usize, step_s: f64) {
    let mut rows: Vec<_> = prof.entries().to_vec();
    rows.sort_by(|a, b| b.1.cmp(&a.1));
    println!("{:<18} {:>10} {:>7} {:>8}", "op", "ms/step", "share", "calls");
    let mut accounted = 0.0;
    for (op, d, calls) in rows {
        let ms = d.as_secs_f64() * 1e3 / steps as f64;
        accounted += ms;
        println!("{op:<18} {ms:>10.1} {:>6.1}% {:>8}", 100.0 * ms / (step_s * 1e3), calls / steps as u64);
    }
    println!("{:<18} {:>10.1} {:>6.1}%", "(other)", step_s * 1e3 - accounted, 100.0 * (1.0 - accounted / (step_s * 1e3)));
}
