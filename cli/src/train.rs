//! `liandan train`: one process; data from a prepared directory (`liandan data prepare`: token
//! shards + tokenizer) or a plain text file read as UTF-8 bytes; checkpoints in a run directory.
//!
//! The model runs through the engine interface on the CPU ([`CpuEngine`]: GPT-2 or the llama
//! family), so `--init` takes any model the import path reads: a liandan checkpoint or a
//! Hugging Face model directory (`config.json` + safetensors), with the data's tokenizer checked
//! against the model's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use liandan_data::shard::{Manifest, Split, read_split, sha256_hex};
use liandan_worker::checkpoint::{self, DataCursor, SaveInfo};
use liandan_worker::collective::Shard;
use liandan_worker::engine::cpu::CpuEngine;
use liandan_worker::engine::{Engine, Replica};
use liandan_worker::model::params::ParamLayout;
use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::rng::Rng;
use liandan_worker::tokenizer::{BYTES, ByteTokenizer};
use liandan_worker::train::{MicroBatch, TokenStream, TrainConfig, replica_step, step_denominator};
use liandan_worker::{EngineError, GptConfig};

use crate::CliError;
use crate::progress::Progress;
use liandan_worker::phase::pretrain::TOKENIZER_FILE;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Prepared data directory (from `liandan data prepare`): trains on the train shards,
    /// validates on the val shards, and stores the tokenizer in every checkpoint.
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    pub data: Option<PathBuf>,
    /// Or a UTF-8 text file, trained on as bytes (its last 5% is held out for validation).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Run directory: checkpoints go to OUT/step-NNNNNNNN and OUT/latest names the newest.
    #[arg(long)]
    pub out: PathBuf,
    /// Model preset: nano, tiny, small-256, gpt2.
    #[arg(long, default_value = "nano", conflicts_with = "init")]
    pub model: String,
    /// Override the preset's number of layers (L).
    #[arg(long, conflicts_with = "init")]
    pub layers: Option<usize>,
    /// Override the preset's attention heads (NH).
    #[arg(long, conflicts_with = "init")]
    pub heads: Option<usize>,
    /// Override the preset's channels (C); must divide evenly by the heads.
    #[arg(long, conflicts_with = "init")]
    pub channels: Option<usize>,
    /// Start from these weights instead of a fresh model: a liandan checkpoint (or run
    /// directory), or a Hugging Face model directory (gpt2, llama or qwen2 `config.json` and
    /// safetensors). Its config is the model; the optimizer and schedule start fresh. The
    /// data's tokens must fit its vocabulary, and its tokenizer (when it has one) must be the
    /// data's.
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Sequences per micro-batch (B).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (T); at most the preset's context.
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps in total.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    pub min_lr: Option<f32>,
    /// Linear warmup steps (default: 5% of steps).
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// Seed of weight initialisation.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Write a checkpoint every N steps (the last step is always saved).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Evaluate validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Continue from this checkpoint (or run directory); its model and training config are used.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Training and validation tokens with the tokenizer they were made with.
struct Corpus {
    train: Vec<u32>,
    val: Option<Vec<u32>>,
    vocab_size: usize,
    /// [`BYTES`] or the tokenizer file's name inside checkpoints.
    tokenizer: String,
    /// Files stored in every checkpoint (the tokenizer).
    extra_files: Vec<(String, Vec<u8>)>,
    /// Where the data came from, for error messages.
    origin: PathBuf,
}

fn load_corpus(args: &TrainArgs) -> Result<Corpus, CliError> {
    if let Some(dir) = &args.data {
        let manifest = Manifest::load(dir)?;
        let tok_path = dir.join(&manifest.tokenizer);
        let tok_bytes = std::fs::read(&tok_path).map_err(|e| EngineError::io(&tok_path, e))?;
        if sha256_hex(&tok_bytes) != manifest.tokenizer_sha256 {
            return Err(CliError::Usage(format!("{}: sha256 does not match manifest.json (corrupt or replaced tokenizer)", tok_path.display())));
        }
        let train = read_split(dir, &manifest, Split::Train)?;
        let val = read_split(dir, &manifest, Split::Val)?;
        // The tokenizer first (resume compares it); a model's template and stop tokens after it.
        let mut extra_files = vec![(TOKENIZER_FILE.to_string(), tok_bytes)];
        extra_files.extend(liandan_worker::hf_tokenizer::data_configs(dir, &extra_files).map_err(CliError::Usage)?);
        return Ok(Corpus {
            train,
            val: if val.is_empty() { None } else { Some(val) },
            vocab_size: manifest.vocab_size,
            tokenizer: TOKENIZER_FILE.into(),
            extra_files,
            origin: dir.clone(),
        });
    }
    let path = args.text.clone().ok_or_else(|| CliError::Usage("give --data DIR or --text FILE".into()))?;
    let raw = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
    if raw.is_empty() {
        return Err(EngineError::Data { path, reason: "is empty: nothing to train on".into() }.into());
    }
    let tokens = ByteTokenizer.encode(&String::from_utf8_lossy(&raw));
    let split = tokens.len() - tokens.len() / 20;
    Ok(Corpus {
        train: tokens[..split].to_vec(),
        val: Some(tokens[split..].to_vec()),
        vocab_size: ByteTokenizer::VOCAB_SIZE,
        tokenizer: BYTES.into(),
        extra_files: vec![],
        origin: path,
    })
}

pub fn run(args: TrainArgs) -> Result<(), CliError> {
    let corpus = load_corpus(&args)?;
    let (mut trainer, cursor) = match &args.resume {
        Some(dir) => {
            let dir = resolve_checkpoint(dir)?;
            let (t, state) = Run::resume(&dir)?;
            if state.tokenizer != corpus.tokenizer {
                return Err(CliError::Usage(format!("{}: trained with tokenizer '{}', but the data uses '{}'", dir.display(), state.tokenizer, corpus.tokenizer)));
            }
            if let Some((name, bytes)) = corpus.extra_files.first() {
                let ck = liandan_worker::checkpoint::read_verified(&dir, name, &state)?;
                if &ck != bytes {
                    return Err(CliError::Usage(format!("{}: its {name} differs from the data's (a tokenizer from another vocabulary)", dir.display())));
                }
            }
            // The tokenizer is the data's (checked above); a model's own may have more embedding
            // rows than tokens (Qwen2 rounds them up).
            if t.model_config().vocab_size < corpus.vocab_size {
                return Err(CliError::Usage(format!("{}: vocab_size {} does not fit the data's {}", dir.display(), t.model_config().vocab_size, corpus.vocab_size)));
            }
            eprintln!("resuming {} at step {}", dir.display(), state.step);
            (t, state.data_cursor.position as usize)
        }
        None => {
            let config = TrainConfig {
                batch_size: args.batch,
                seq_len: args.seq,
                grad_accum: args.grad_accum,
                schedule: LrSchedule {
                    max_lr: args.lr,
                    min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
                    warmup_steps: args.warmup.unwrap_or(args.steps / 20),
                    total_steps: args.steps,
                },
                adamw: AdamWConfig { weight_decay: args.weight_decay, ..Default::default() },
                grad_clip: args.clip,
                seed: args.seed,
            };
            let run = match &args.init {
                Some(dir) => {
                    let (model, params) = load_init(dir, &corpus)?;
                    Run::new(model, config, Some(params))?
                }
                None => {
                    let mut model = GptConfig::preset(&args.model, corpus.vocab_size)?;
                    model.n_layer = args.layers.unwrap_or(model.n_layer);
                    model.n_head = args.heads.unwrap_or(model.n_head);
                    model.n_embd = args.channels.unwrap_or(model.n_embd);
                    model.validate()?;
                    Run::new(model, config, None)?
                }
            };
            (run, 0)
        }
    };
    let cfg = trainer.config.clone();
    let (b, t) = (cfg.batch_size, cfg.seq_len);
    let total = cfg.schedule.total_steps;

    let mut stream = TokenStream::new(corpus.train, b, t, &corpus.origin)?;
    stream.cursor = cursor;
    // Validation needs at least one micro-batch of tokens.
    let mut val = corpus.val.filter(|v| v.len() > b * t).map(|v| TokenStream::new(v, b, t, &corpus.origin)).transpose()?;

    let m = trainer.model_config().clone();
    eprintln!(
        "model: {:?} L={} C={} NH={} V={} ({:.2}M parameters); B={b} T={t} accum={}; {} training tokens, {} validation",
        m.family,
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.vocab_size,
        m.num_real_parameters() as f64 / 1e6,
        cfg.grad_accum,
        stream.len(),
        val.as_ref().map_or(0, |v| v.len()),
    );

    let progress = Progress::new(total, trainer.step, "train");
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut last_loss = f32::NAN;
    let mut last_val = None;
    let mut saved = None;
    while trainer.step < total {
        let micro: Vec<_> = (0..cfg.grad_accum).map(|_| stream.next_batch(b, t)).collect();
        let st = trainer.train_step(&micro)?;
        if !st.loss.is_finite() {
            return Err(CliError::Usage(format!("loss became {} at step {}: lower --lr or check the data", st.loss, st.step)));
        }
        tokens_done += st.tokens;
        last_loss = st.loss;
        let tps = tokens_done as f64 / started.elapsed().as_secs_f64();
        let done = trainer.step;
        progress.step(done, total, &format!("loss {:.4} | lr {:.2e} | norm {:.2} | {:.0} tok/s", st.loss, st.lr, st.grad_norm, tps));
        if args.eval_every > 0
            && done % args.eval_every == 0
            && done < total
            && let Some(v) = val.as_mut()
        {
            let l = eval(&mut trainer, v, b, t)?;
            progress.println(&format!("step {done}: val loss {l:.4}"));
            last_val = Some(l);
        }
        let periodic = args.checkpoint_every.is_some_and(|k| k > 0 && done % k == 0);
        if periodic || done == total {
            let dir = checkpoint::step_dir(&args.out, done);
            trainer.save(&dir, DataCursor { position: stream.cursor as u64 }, &corpus.tokenizer, &corpus.extra_files)?;
            write_latest(&args.out, &dir)?;
            saved = Some(dir);
        }
    }
    progress.finish();
    if let Some(v) = val.as_mut() {
        last_val = Some(eval(&mut trainer, v, b, t)?);
    }
    let checkpoint = match saved {
        Some(d) => d,
        None => resolve_checkpoint(args.resume.as_deref().unwrap_or(&args.out))?,
    };
    let tokens_per_s = tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "done: step {total}, train loss {last_loss:.4}, val loss {}, {tokens_per_s:.0} tok/s; checkpoint {}",
        last_val.map_or("n/a".into(), |v| format!("{v:.4}")),
        checkpoint.display()
    );
    Ok(())
}

/// Mean loss over the first (up to) 8 micro-batches of the validation stream.
fn eval(trainer: &mut Run, val: &mut TokenStream, b: usize, t: usize) -> Result<f32, CliError> {
    val.cursor = 0;
    let n = ((val.len() - 1) / (b * t)).clamp(1, 8);
    let micro: Vec<_> = (0..n).map(|_| val.next_batch(b, t)).collect();
    trainer.eval_loss(&micro)
}

/// Weights to start from (`--init`): a liandan checkpoint or a Hugging Face model directory,
/// refused when the data does not fit it.
fn load_init(path: &Path, corpus: &Corpus) -> Result<(GptConfig, Vec<f32>), CliError> {
    let hf = liandan_worker::hf::is_hf_dir(path);
    let dir = if hf { path.to_path_buf() } else { resolve_checkpoint(path)? };
    let ck = checkpoint::load(&dir, None)?;
    let model = ck.state.model_config.clone();
    let init = format!("--init {}", dir.display());
    // The model's tokenizer, when it names one, must be the data's: same tokens, same ids (a
    // Hugging Face directory without tokenizer.json names none).
    let theirs = ck.state.tokenizer.clone();
    if !theirs.is_empty() && theirs != corpus.tokenizer {
        let what = |t: &str| if t == BYTES { "bytes".to_string() } else { format!("the BPE in {t}") };
        return Err(CliError::Usage(format!("{init}: the model reads {}, but the data was made with {}", what(&theirs), what(&corpus.tokenizer))));
    }
    if corpus.vocab_size > model.vocab_size {
        return Err(CliError::Usage(format!(
            "{init}: the data's vocabulary of {} tokens does not fit the model's {} (prepare the data with the model's tokenizer: liandan data prepare --tokenizer DIR)",
            corpus.vocab_size, model.vocab_size
        )));
    }
    if theirs.is_empty() {
        return Ok((model, ck.params));
    }
    if theirs != BYTES {
        let model_tok =
            if hf { std::fs::read(dir.join(&theirs)).map_err(|e| EngineError::io(dir.join(&theirs), e))? } else { checkpoint::read_verified(&dir, &theirs, &ck.state)? };
        let data_tok = corpus.extra_files.first().map(|(_, b)| b.as_slice()).unwrap_or_default();
        if vocabulary(&model_tok) != vocabulary(data_tok) {
            return Err(CliError::Usage(format!(
                "{init}: its {theirs} is not the tokenizer the data in {} was made with (other tokens or ids); prepare the data with --tokenizer {}",
                corpus.origin.display(),
                dir.display()
            )));
        }
    }
    Ok((model, ck.params))
}

/// A `tokenizer.json`'s vocabulary: the model's token → id map and the added tokens (None when
/// the file is not JSON). Formatting and key order do not count: the data pipeline re-saves a
/// given tokenizer.
fn vocabulary(bytes: &[u8]) -> Option<(serde_json::Value, Vec<(u64, String)>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let added = v["added_tokens"].as_array().map(|a| a.iter().filter_map(|t| Some((t["id"].as_u64()?, t["content"].as_str()?.to_string()))).collect()).unwrap_or_default();
    Some((v["model"]["vocab"].clone(), added))
}

/// A model on the CPU engine (GPT-2 or llama family), its AdamW state and the position.
#[derive(Debug)]
struct Run {
    replica: Box<dyn Replica>,
    config: TrainConfig,
    /// Optimizer steps taken so far.
    step: u64,
    /// Seeded with `config.seed`; its state after initialisation is saved with each checkpoint.
    rng: Rng,
}

impl Run {
    /// A model from `params`, or initialised from `config.seed` (GPT-2's initialisation,
    /// the same weights as the worker's phases draw).
    fn new(model: GptConfig, config: TrainConfig, params: Option<Vec<f32>>) -> Result<Run, CliError> {
        config.validate(&model)?;
        let mut replica = CpuEngine.replica(&model, config.batch_size, config.seq_len, &config.adamw, Shard::WHOLE)?;
        let mut rng = Rng::new(config.seed);
        let params = match params {
            Some(p) => p,
            None => {
                let layout = ParamLayout::new(&model);
                let mut p = vec![0.0; layout.len()];
                liandan_worker::model::gpt::init_params(&model, &layout, &mut p, &mut rng);
                p
            }
        };
        replica.model().set_params(&params)?;
        Ok(Run { replica, config, step: 0, rng })
    }

    /// Continues a checkpoint exactly where it stopped.
    ///
    /// # Errors
    /// The checkpoint lacks a training config or optimizer state (a weights-only export or a
    /// Hugging Face directory: start from it with `--init`).
    fn resume(dir: &Path) -> Result<(Run, checkpoint::CheckpointState), CliError> {
        let ck = checkpoint::load(dir, None)?;
        let state_path = dir.join(checkpoint::STATE_FILE);
        let config = ck
            .state
            .train_config
            .clone()
            .ok_or_else(|| EngineError::checkpoint(&state_path, "has no train_config: a weights-only checkpoint cannot resume training (use --init)"))?;
        let (m, v) = ck
            .moments
            .ok_or_else(|| EngineError::checkpoint(dir.join(checkpoint::OPTIMIZER_FILE), "missing: the checkpoint has no optimizer state to resume from (use --init)"))?;
        let mut run = Run::new(ck.state.model_config.clone(), config, Some(ck.params))?;
        run.replica.set_moments(&m, &v, ck.state.optimizer_t)?;
        run.step = ck.state.step;
        run.rng = Rng::from_state(ck.state.rng_state()?);
        Ok((run, ck.state))
    }

    fn model_config(&self) -> &GptConfig {
        self.replica.model_ref().config()
    }

    /// One optimizer step over `micro` ([`replica_step`]), at the schedule's rate for this step.
    fn train_step(&mut self, micro: &[MicroBatch]) -> Result<liandan_worker::train::StepStats, CliError> {
        let denom = step_denominator(micro)?;
        let lr = self.config.schedule.lr(self.step);
        let (loss, grad_norm, tokens) = replica_step(&mut *self.replica, micro, denom, None, self.config.grad_clip, lr)?;
        let stats = liandan_worker::train::StepStats { step: self.step, loss: loss as f32, grad_norm, lr, tokens };
        self.step += 1;
        Ok(stats)
    }

    /// Mean loss over `micro` without touching gradients or the optimizer.
    fn eval_loss(&mut self, micro: &[MicroBatch]) -> Result<f32, CliError> {
        let denom = step_denominator(micro)?;
        let model = self.replica.model();
        let mut loss = 0.0f64;
        for mb in micro {
            model.forward(&mb.inputs, mb.b, mb.t)?;
            loss += model.loss(&mb.targets, mb.weights.as_deref(), denom, false)? as f64;
        }
        Ok(loss as f32)
    }

    /// Weights, AdamW moments and the position, atomically ([`checkpoint::save`]).
    fn save(&self, dir: &Path, data_cursor: DataCursor, tokenizer: &str, extra_files: &[(String, Vec<u8>)]) -> Result<(), CliError> {
        let model = self.replica.model_ref();
        let (m, v) = self.replica.moments()?;
        let info = SaveInfo { step: self.step, rng_state: self.rng.state(), train_config: Some(&self.config), data_cursor, tokenizer, extra_files };
        checkpoint::save(dir, model.config(), &model.params()?, Some((&m, &v, self.replica.optimizer_t())), &info)?;
        Ok(())
    }
}

/// Records `dir` as the newest checkpoint of the run `out` (atomically: temp file + rename).
fn write_latest(out: &Path, dir: &Path) -> Result<(), CliError> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = out.join(".latest.tmp");
    let io = |p: &Path, e| CliError::Io { path: p.display().to_string(), source: e };
    std::fs::write(&tmp, format!("{name}\n")).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, out.join("latest")).map_err(|e| io(&out.join("latest"), e))
}

/// A checkpoint directory itself, or the newest checkpoint of a run directory.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, CliError> {
    if path.join(checkpoint::STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    match std::fs::read_to_string(&latest) {
        Ok(name) => Ok(path.join(name.trim())),
        Err(_) => Err(CliError::Usage(format!("{}: not a checkpoint (no {}) and not a run directory (no latest)", path.display(), checkpoint::STATE_FILE))),
    }
}
