//! `liandan bench`: throughput measurements (benchmarks measure speed; tests never do).
//!
//! `bench train` times full training steps (forward, loss, backward, clip, AdamW) on random
//! tokens and reports tokens/s and achieved GFLOP/s using
//! [`liandan_worker::GptConfig::train_flops_per_token`] (`6·N + 6·L·C·T`).

use std::time::Instant;

use liandan_worker::GptConfig;
use liandan_worker::backend::Device;
use liandan_worker::collective::Shard;
use liandan_worker::engine::Engine;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::model::profile::OpProfile;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::rng::Rng;
use liandan_worker::train::{MicroBatch, TrainConfig, replica_step, step_denominator};

use crate::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Training-step throughput on a model preset.
    Train(BenchTrainArgs),
    /// Ring all-reduce bus bandwidth on loopback next to memcpy bandwidth, measured in one run.
    Allreduce(BenchAllreduceArgs),
    /// The coordinator under many simulated workers heartbeating: RPC latency and CPU.
    Coordinator(BenchCoordinatorArgs),
}

#[derive(Debug, clap::Args)]
pub struct BenchAllreduceArgs {
    /// World sizes (ranks run as threads over 127.0.0.1).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    pub ranks: Vec<usize>,
    /// Buffer sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub sizes_mib: Vec<usize>,
    /// Timed iterations per point (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

#[derive(Debug, clap::Args)]
pub struct BenchCoordinatorArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Seconds of heartbeating to measure.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// The coordinator's heartbeat rate limit (`liandan coordinator --max-heartbeats-per-s`);
    /// the simulated workers heartbeat as often as it asks, as real ones do (0: every 500 ms).
    #[arg(long, default_value_t = 5000)]
    pub max_heartbeats_per_s: u64,
    /// Connections the simulated workers share (a real worker has its own; thousands of
    /// connections from one process would measure the load generator).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
}

#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// Backend: cpu, cuda, or cuda-emu (the emulated CUDA device: checks the CUDA path runs,
    /// not its speed).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Matmul precision on cuda: bf16 (f32 accumulation, f32 master weights) or f32.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    /// Preset: tiny, small-256, nano, gpt2 (alias gpt2-124m), or qwen2.5-0.5b (the llama family
    /// at Qwen2.5-0.5B's shape; the CPU only, with --seq: its context is 32768).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Sequences per step (B).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (T); default the preset's context.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Vocabulary size (default: GPT-2's 50257, padded to 50304; Qwen2.5's 151936 for
    /// qwen2.5-0.5b).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (page faults, caches, thread start-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also print where the time goes, per op (forward, backward, optimizer).
    #[arg(long)]
    pub profile: bool,
    /// Attention kernels on cuda: tensor-core (bf16 WMMA, head sizes 64 and 128) or reference
    /// (f32). Default: tensor-core for bf16 where they apply, else reference.
    #[arg(long)]
    pub attention: Option<String>,
    /// On cuda: the size n of the square n×n×n gemm timed for the measured matmul peak
    /// (default 8192 on a GPU, 256 on the emulated device; 0 skips it).
    #[arg(long)]
    pub gemm_size: Option<usize>,
    /// On cuda: read `--profile`'s roofline and the MFU against the datasheet peaks of this
    /// device name (e.g. H200) instead of the device's own, for one the table does not know
    /// (the emulated device).
    #[arg(long)]
    pub peaks_of: Option<String>,
}

pub fn run(cmd: BenchCommand, threads: usize) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a, threads),
        BenchCommand::Allreduce(a) => bench_allreduce(a),
        BenchCommand::Coordinator(a) => bench_coordinator(a),
    }
}

fn bench_train(a: BenchTrainArgs, threads: usize) -> Result<(), CliError> {
    let device: Device = a.device.parse().map_err(CliError::Usage)?;
    if a.steps == 0 {
        return Err(CliError::Usage("--steps must be at least 1".into()));
    }
    if device != Device::Cpu {
        return bench_train_cuda(a, device);
    }
    if a.attention.is_some() || a.gemm_size.is_some() || a.peaks_of.is_some() {
        return Err(CliError::Usage("--attention, --gemm-size and --peaks-of are for CUDA: use them with --device cuda or cuda-emu".into()));
    }
    let (model, config) = bench_setup(&a)?;
    let (b, t) = (config.batch_size, config.seq_len);
    config.validate(&model)?;
    // The step the phases take on the CPU: the engine's replica for the config's family.
    let mut replica = CpuEngine.replica(&model, b, t, &config.adamw, Shard::WHOLE)?;
    replica.model().init_weights(config.seed)?;
    let mut rng = Rng::new(2);
    let tokens: Vec<u32> = (0..b * t + 1).map(|_| rng.below(model.vocab_size as u64) as u32).collect();
    let mb = MicroBatch { inputs: tokens[..b * t].to_vec(), targets: tokens[1..].iter().map(|&x| x as i32).collect(), weights: None, b, t };
    let denom = step_denominator(std::slice::from_ref(&mb))?;
    eprintln!(
        "bench train: {} ({:?}: L={} C={} NH={} NKV={} V={}, {:.1}M params), B={b} T={t}, {threads} threads, {} warmup + {} timed steps",
        a.model,
        model.family,
        model.n_layer,
        model.n_embd,
        model.n_head,
        model.kv_heads(),
        model.vocab_size,
        model.num_real_parameters() as f64 / 1e6,
        a.warmup,
        a.steps
    );
    let micro = std::slice::from_ref(&mb);
    let mut times = Vec::with_capacity(a.steps);
    for k in 0..a.warmup + a.steps {
        if k == a.warmup && a.profile {
            *replica.model().profile() = Some(OpProfile::default());
        }
        let t0 = Instant::now();
        let (loss, ..) = replica_step(replica.as_mut(), micro, denom, None, config.grad_clip, config.schedule.lr(k as u64))?;
        let dt = t0.elapsed().as_secs_f64();
        if k >= a.warmup {
            times.push(dt);
            eprintln!("step {}: {:.1} ms, loss {loss:.4}", k - a.warmup, dt * 1e3);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens_per_s = (b * t) as f64 / mean;
    let gflops = model.train_flops_per_token(t) * tokens_per_s / 1e9;
    if let Some(prof) = replica.model().profile() {
        print_profile(prof, a.steps, mean);
    }
    println!("tokens/s: {tokens_per_s:.1}  step: {:.1} ms  achieved: {gflops:.1} GFLOP/s (6·N + 6·L·C·T per token)", mean * 1e3);
    println!("bench_result impl=liandan model={} batch={b} seq={t} threads={threads} tokens_per_s={tokens_per_s:.1} step_ms={:.1} gflops={gflops:.1}", a.model, mean * 1e3);
    Ok(())
}

/// The preset behind a model name (`gpt2-124m` is GPT-2 small, the `gpt2` preset).
fn preset_name(model: &str) -> &str {
    if model == "gpt2-124m" { "gpt2" } else { model }
}

/// `bench train --device cuda|cuda-emu`: the same step on one GPU (or the emulated device),
/// with MFU against the device's datasheet peak ([`liandan_worker::backend::cuda::peak`]) and,
/// with `--profile`, the time per op.
fn bench_train_cuda(a: BenchTrainArgs, device: Device) -> Result<(), CliError> {
    use liandan_worker::backend::cuda::peak::{measured_gemm_flops, peak_flops, peaks};
    use liandan_worker::backend::cuda::{CudaDevice, Precision, trainer::CudaTrainer};
    if device == Device::Cuda
        && let Some(e) = Device::cuda_unavailable_reason()
    {
        return Err(e.into());
    }
    let precision = match a.precision.as_str() {
        "bf16" => Precision::Bf16,
        "f32" => Precision::F32,
        other => return Err(CliError::Usage(format!("--precision {other}: expected bf16 or f32"))),
    };
    let (model, config) = bench_setup(&a)?;
    let (b, t) = (config.batch_size, config.seq_len);
    let dev = std::sync::Arc::new(CudaDevice::for_device(device, 0)?);
    let mut trainer = CudaTrainer::new(dev.clone(), model.clone(), config, precision)?;
    let peak_name = a.peaks_of.as_deref().unwrap_or(&dev.name);
    if peak_flops(peak_name, precision).is_none() && a.peaks_of.is_some() {
        return Err(CliError::Usage(format!("--peaks-of {peak_name}: no datasheet peaks for that name (see backend/cuda/peak.rs)")));
    }
    if let Some(k) = &a.attention {
        trainer.model.set_attention(k.parse().map_err(CliError::Usage)?)?;
    }
    let mut rng = Rng::new(2);
    let tokens: Vec<u32> = (0..b * t + 1).map(|_| rng.below(model.vocab_size as u64) as u32).collect();
    let mb = MicroBatch { inputs: tokens[..b * t].to_vec(), targets: tokens[1..].iter().map(|&x| x as i32).collect(), weights: None, b, t };
    eprintln!(
        "bench train: {} (L={} C={} NH={} V={}, {:.1}M params), B={b} T={t}, {} ({}), {precision:?} matmuls, {:?} attention, {} warmup + {} timed steps",
        a.model,
        model.n_layer,
        model.n_embd,
        model.n_head,
        model.vocab_size,
        model.num_real_parameters() as f64 / 1e6,
        dev.name,
        format_args!("sm_{}{}", dev.capability.0, dev.capability.1),
        trainer.model.attention(),
        a.warmup,
        a.steps
    );
    for _ in 0..a.warmup {
        trainer.train_step(std::slice::from_ref(&mb), None, None)?;
    }
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps {
        let t0 = Instant::now();
        // train_step ends with a device-to-host copy of the norm, so the step's work is done.
        let st = trainer.train_step(std::slice::from_ref(&mb), None, None)?;
        let dt = t0.elapsed().as_secs_f64();
        times.push(dt);
        eprintln!("step {i}: {:.1} ms, loss {:.4}", dt * 1e3, st.loss);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    if a.profile {
        // Separate steps, so the timed ones above run without the per-op synchronisation.
        trainer.model.profile = Some(match peaks(peak_name, precision) {
            Some(p) => OpProfile::with_peaks(p),
            None => {
                eprintln!("no datasheet peaks for {peak_name}: the per-op table has no roofline");
                OpProfile::default()
            }
        });
        let t0 = Instant::now();
        for _ in 0..a.steps {
            trainer.train_step(std::slice::from_ref(&mb), None, None)?;
        }
        let profiled = t0.elapsed().as_secs_f64() / a.steps as f64;
        if let Some(prof) = trainer.model.profile.take() {
            println!("per-op time over {} more steps, each op followed by a device sync ({:.1} ms/step with the syncs):", a.steps, profiled * 1e3);
            print_profile(&prof, a.steps, profiled);
        }
    }
    let tokens_per_s = (b * t) as f64 / mean;
    let flops = model.train_flops_per_token(t) * tokens_per_s;
    let peak = peak_flops(peak_name, precision);
    let mfu = peak.map(|p| flops / p);
    // The gemm ceiling measured in this run: square products through the model's matmul path.
    let gemm_n = a.gemm_size.unwrap_or(if device == Device::CudaEmu { 256 } else { 8192 });
    let measured = if gemm_n > 0 { Some(measured_gemm_flops(&dev, precision, gemm_n, if device == Device::CudaEmu { 2 } else { 20 })?) } else { None };
    if let Some(g) = measured {
        println!(
            "measured {precision:?} gemm {gemm_n}×{gemm_n}×{gemm_n}: {:.1} TFLOP/s ({}); the step's FLOP/s are {:.1}% of it",
            g / 1e12,
            peak.map_or("no datasheet peak".to_string(), |p| format!("{:.1}% of the datasheet's {:.0}", 100.0 * g / p, p / 1e12)),
            100.0 * flops / g
        );
    }
    println!(
        "tokens/s: {tokens_per_s:.1}  step: {:.1} ms  achieved: {:.1} TFLOP/s  MFU: {} (6·N + 6·L·C·T per token; peak {} for {})",
        mean * 1e3,
        flops / 1e12,
        mfu.map_or("n/a".to_string(), |m| format!("{:.1}%", 100.0 * m)),
        peak.map_or("unknown".to_string(), |p| format!("{:.0} TFLOP/s", p / 1e12)),
        peak_name
    );
    println!(
        "bench_result impl=liandan-cuda device=\"{}\" model={} precision={precision:?} batch={b} seq={t} tokens_per_s={tokens_per_s:.1} step_ms={:.1} tflops={:.2} mfu={} gemm_tflops={} mfu_of_gemm={}",
        dev.name,
        a.model,
        mean * 1e3,
        flops / 1e12,
        mfu.map_or("nan".to_string(), |m| format!("{m:.4}")),
        measured.map_or("nan".to_string(), |g| format!("{:.2}", g / 1e12)),
        measured.map_or("nan".to_string(), |g| format!("{:.4}", flops / g))
    );
    Ok(())
}

/// A table of per-op time per step and its share of the step; with the device's peaks, each
/// op's work and its roofline (the least time its FLOPs and bytes take at peak compute and
/// bandwidth) next to the time it took.
fn print_profile(prof: &OpProfile, steps: usize, step_s: f64) {
    for line in profile_table(prof, steps, step_s) {
        println!("{line}");
    }
}

fn profile_table(prof: &OpProfile, steps: usize, step_s: f64) -> Vec<String> {
    let mut rows: Vec<_> = prof.entries().to_vec();
    rows.sort_by_key(|r| std::cmp::Reverse(r.time));
    let per = |x: f64| x / steps as f64;
    let roof = prof.peaks().is_some();
    let mut out = Vec::new();
    let mut head = format!("{:<24} {:>10} {:>7} {:>6}", "op", "ms/step", "share", "calls");
    if roof {
        head += &format!(" {:>9} {:>9} {:>8} {:>11} {:>11}", "GFLOP", "MB", "FLOP/B", "roofline ms", "of roofline");
    }
    out.push(head);
    let (mut accounted, mut bound) = (0.0, 0.0);
    for e in rows {
        let ms = per(e.time.as_secs_f64() * 1e3);
        accounted += ms;
        let mut line = format!("{:<24} {ms:>10.2} {:>6.1}% {:>6}", e.op, 100.0 * ms / (step_s * 1e3), e.calls / steps as u64);
        if roof {
            let b = per(e.bound_s * 1e3);
            bound += b;
            let intensity = if e.cost.bytes > 0.0 { e.cost.flops / e.cost.bytes } else { 0.0 };
            line +=
                &format!(" {:>9.2} {:>9.1} {intensity:>8.1} {b:>11.3} {:>10.1}%", per(e.cost.flops / 1e9), per(e.cost.bytes / 1e6), if ms > 0.0 { 100.0 * b / ms } else { 0.0 });
        }
        out.push(line);
    }
    out.push(format!("{:<24} {:>10.2} {:>6.1}%", "(other)", step_s * 1e3 - accounted, 100.0 * (1.0 - accounted / (step_s * 1e3))));
    if let Some(p) = prof.peaks() {
        out.push(format!(
            "roofline of the profiled ops: {bound:.2} ms/step at {:.0} TFLOP/s and {:.2} TB/s, {:.1}% of the {:.2} ms they took",
            p.flops_per_s / 1e12,
            p.bytes_per_s / 1e12,
            100.0 * bound / accounted.max(f64::MIN_POSITIVE),
            accounted
        ));
    }
    out
}

fn bench_allreduce(a: BenchAllreduceArgs) -> Result<(), CliError> {
    use liandan_worker::collective::bench::{memcpy_bandwidth, ring_busbw};
    println!("ring all-reduce over 127.0.0.1 (ranks are threads of this process on {} cores); busbw = algbw·2(n−1)/n", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("{:>6} {:>9} {:>12} {:>12} {:>12} {:>14} {:>10}", "ranks", "size", "time", "algbw GB/s", "busbw GB/s", "memcpy GB/s", "bus/memcpy");
    for &mib in &a.sizes_mib {
        let bytes = mib << 20;
        // memcpy of the same size in the same run: the ceiling for moving these bytes once.
        let mem = memcpy_bandwidth(bytes, a.iters.max(1));
        for &n in &a.ranks {
            let r = ring_busbw(n, bytes, a.iters.max(1)).map_err(|e| CliError::Usage(e.to_string()))?;
            println!("{n:>6} {:>6} MiB {:>9.2} ms {:>12.2} {:>12.2} {:>14.2} {:>10.3}", mib, r.seconds_per_iter * 1e3, r.algbw_gbps, r.busbw_gbps, mem, r.busbw_gbps / mem);
            println!("bench_result impl=ring ranks={n} bytes={bytes} busbw_gbps={:.3} memcpy_gbps={mem:.3}", r.busbw_gbps);
        }
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the ')'.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn bench_coordinator(a: BenchCoordinatorArgs) -> Result<(), CliError> {
    use liandan_proto::auth::{ADMIN_TOKEN_ENV, TokenSource, WORKER_TOKEN_ENV, random_token};
    use liandan_proto::v1::{HeartbeatRequest, RegisterRequest};
    let usage = |e: liandan_proto::auth::AuthError| CliError::Usage(e.to_string());
    let (admin_token, worker_token) = (random_token().map_err(usage)?, random_token().map_err(usage)?);
    let dir = std::env::temp_dir().join(format!("liandan-bench-coordinator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| CliError::Io { path: dir.display().to_string(), source: e })?;
    let addr_file = dir.join("addr");
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(e.to_string()))?;
    // The coordinator runs as its own process so its CPU time is its own; a long lease keeps the
    // simulated workers alive whatever the load generator's scheduling.
    let mut child = std::process::Command::new(exe)
        .env(ADMIN_TOKEN_ENV, &admin_token)
        .env(WORKER_TOKEN_ENV, &worker_token)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &dir.join("store.db").display().to_string(),
            "--addr-file",
            &addr_file.display().to_string(),
            "--lease-ms",
            "60000",
            "--max-heartbeats-per-s",
            &a.max_heartbeats_per_s.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| CliError::Usage(format!("cannot start the coordinator: {e}")))?;
    let pid = child.id();
    let result = (|| -> Result<(), CliError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && s.ends_with('\n')
            {
                break s.trim().to_string();
            }
            if Instant::now() > deadline {
                return Err(CliError::Usage("coordinator did not start".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| CliError::Usage(e.to_string()))?;
        rt.block_on(async move {
            // Every heartbeat carries the worker token and the worker's own secret, as a real
            // worker's does.
            let token = TokenSource::literal(&worker_token, "worker token").map_err(usage)?;
            let mut clients = Vec::new();
            for _ in 0..a.connections.max(1) {
                let ch = tonic::transport::Endpoint::from_shared(addr.clone())
                    .map_err(|e| CliError::Usage(e.to_string()))?
                    .connect()
                    .await
                    .map_err(|e| CliError::Usage(e.to_string()))?;
                clients.push(liandan_proto::auth::client(ch, Some(token.clone())));
            }
            let mut ids = Vec::with_capacity(a.workers);
            let t0 = Instant::now();
            for i in 0..a.workers {
                let instance = liandan_proto::auth::hex(&liandan_proto::auth::random_bytes::<16>().map_err(usage)?);
                let req = RegisterRequest {
                    protocol_version: liandan_proto::PROTOCOL_VERSION,
                    hostname: format!("sim-{i}"),
                    device: "cpu".into(),
                    ring_address: format!("127.0.0.1:{}", 20000 + i),
                    instance,
                    memory_bytes: 1 << 30,
                };
                let r = clients[i % clients.len()].clone().register(req).await.map_err(|e| CliError::Usage(e.message().to_string()))?.into_inner();
                ids.push((r.worker_id, r.worker_secret, r.heartbeat_ms));
            }
            let register_s = t0.elapsed().as_secs_f64();
            let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
            let start = Instant::now();
            let end = start + std::time::Duration::from_secs(a.seconds);
            let mut tasks = Vec::new();
            // The interval the last registered worker was told: what every worker hears once
            // all have registered.
            let told_ms = ids.last().map_or(500, |x| x.2.max(1));
            for (i, (id, secret, first_ms)) in ids.into_iter().enumerate() {
                let mut c = clients[i % clients.len()].clone();
                // Spread the workers' phases over the interval.
                let offset = std::time::Duration::from_millis(told_ms).mul_f64(i as f64 / a.workers as f64);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(offset).await;
                    let (mut lat, mut sent, mut every_ms) = (Vec::new(), 0usize, first_ms.max(1));
                    let mut next = tokio::time::Instant::now();
                    while Instant::now() < end {
                        tokio::time::sleep_until(next).await;
                        let t = Instant::now();
                        sent += 1;
                        if let Ok(r) = c.heartbeat(HeartbeatRequest { worker_id: id, worker_secret: secret.clone(), ..Default::default() }).await {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                            // Follow the coordinator's pacing, as a real worker does.
                            if r.get_ref().heartbeat_ms > 0 {
                                every_ms = r.get_ref().heartbeat_ms;
                            }
                        }
                        next += std::time::Duration::from_millis(every_ms);
                    }
                    (lat, sent, every_ms)
                }));
            }
            let (mut lat, mut sent, mut due) = (Vec::new(), 0usize, 0usize);
            for t in tasks {
                let (l, n, every_ms) = t.await.unwrap_or_default();
                lat.extend(l);
                sent += n;
                // A heartbeat is due every interval the worker was told: those not even sent
                // (the generator fell behind) count as missed too.
                due += (a.seconds * 1000 / every_ms.max(1)) as usize;
            }
            let wall = start.elapsed().as_secs_f64();
            let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
            println!(
                "{} simulated workers over {} connections, heartbeat every {} ms (paced by the coordinator, at most {}/s), {:.1} s: {} of {} sent ({} due) answered ({:.0}/s); registering all took {:.2} s",
                a.workers,
                a.connections.max(1),
                told_ms,
                a.max_heartbeats_per_s,
                wall,
                lat.len(),
                sent,
                due,
                lat.len() as f64 / wall,
                register_s
            );
            println!("heartbeat latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", pct(0.5), pct(0.99), lat.last().copied().unwrap_or(f64::NAN));
            println!("coordinator CPU: {cpu:.2} s over {wall:.1} s = {:.1}% of one core (leases in memory; the store is written on deaths only)", 100.0 * cpu / wall);
            println!(
                "bench_result impl=coordinator workers={} heartbeat_ms={told_ms} answered={} sent={} due={due} p50_ms={:.3} p99_ms={:.3} cpu_core_share={:.3}",
                a.workers,
                lat.len(),
                sent,
                pct(0.5),
                pct(0.99),
                cpu / wall
            );
            Ok(())
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The benchmark's model and training config (the same for every device): the preset at
/// `--batch` × `--seq` (default: the full context), AdamW, clip 1.0, seed 1.
fn bench_setup(a: &BenchTrainArgs) -> Result<(GptConfig, TrainConfig), CliError> {
    let name = preset_name(&a.model);
    let vocab = a.vocab.unwrap_or(if name == "qwen2.5-0.5b" { 151_936 } else { 50_257 });
    let model = GptConfig::preset(name, vocab)?;
    if a.seq.is_none() && model.n_positions > 1024 {
        return Err(CliError::Usage(format!("--model {}: its context is {} tokens; give --seq (256, say)", a.model, model.n_positions)));
    }
    let config = TrainConfig {
        batch_size: a.batch,
        seq_len: a.seq.unwrap_or(model.n_positions),
        grad_accum: 1,
        schedule: LrSchedule { max_lr: 3e-4, min_lr: 3e-5, warmup_steps: 0, total_steps: (a.steps + a.warmup) as u64 },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed: 1,
    };
    Ok((model, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use liandan_worker::model::profile::{Cost, Peaks};
    use std::time::Duration;

    #[test]
    fn the_profile_table_shows_work_and_roofline_per_op() {
        let mut p = OpProfile::with_peaks(Peaks { flops_per_s: 1e12, bytes_per_s: 1e9 });
        // Two steps: a compute-bound op (2 ms at roofline per call) and a memory-bound one (1 ms).
        for _ in 0..2 {
            p.add_cost("fwd.matmul", Duration::from_millis(4), Cost::new(2e9, 1e3));
            p.add_cost("fwd.gelu", Duration::from_millis(2), Cost::new(1e3, 1e6));
        }
        let lines = profile_table(&p, 2, 0.008);
        assert!(lines[0].contains("roofline ms") && lines[0].contains("of roofline"), "{}", lines[0]);
        let mm = lines.iter().find(|l| l.starts_with("fwd.matmul")).unwrap();
        // 4 ms/step, 50% of the step, 1 call, 2 GFLOP, 2 ms roofline = 50% of its time.
        assert!(mm.contains("4.00") && mm.contains("50.0%") && mm.contains("2.00") && mm.contains("2.000"), "{mm}");
        let ge = lines.iter().find(|l| l.starts_with("fwd.gelu")).unwrap();
        assert!(ge.contains("1.000") && ge.contains("50.0%"), "{ge}");
        let last = lines.last().unwrap();
        assert!(last.contains("3.00 ms/step") && last.contains("50.0% of the 6.00 ms"), "{last}");
        // Without peaks: time columns only.
        let mut plain = OpProfile::default();
        plain.add("fwd.matmul", Duration::from_millis(4));
        let lines = profile_table(&plain, 1, 0.005);
        assert!(!lines[0].contains("roofline") && lines.len() == 3, "{lines:?}");
        assert!(lines[2].starts_with("(other)") && lines[2].contains("1.00"), "{}", lines[2]);
    }
}
