//! Job specs: TOML in, a validated [`JobSpec`] out. Unknown keys and bad values are rejected
//! with the key path (`phases[0].steps`) and the reason.
//!
//! ```toml
//! name = "demo"
//! [model]
//! preset = "nano"            # nano | tiny | small-256 | gpt2; layers/heads/channels override
//! [data]
//! prepared = "runs/demo/data" # output of `liandan data prepare` (shards + tokenizer)
//! [cluster]
//! min_workers = 1            # a phase starts (and keeps running) with at least this many
//! max_workers = 4            # and uses at most this many
//! [checkpoint]
//! dir = "runs/demo/checkpoints"
//! every = 100                # steps between checkpoints
//! [[phases]]
//! name = "pretrain"
//! kind = "pretrain"
//! steps = 600
//! global_batch = 16          # sequences per step, whatever the number of workers
//! seq_len = 128
//! lr = 3e-3
//! ```
//!
//! A job may start with a `data` phase that prepares `data.prepared` from raw text on the
//! workers (the settings of `liandan data prepare`, see `liandan_data::pipeline::PrepareConfig`):
//!
//! ```toml
//! [[phases]]
//! name = "data"
//! kind = "data"
//! [phases.prepare]
//! inputs = ["raw/web", "raw/books/*.jsonl"]
//! vocab_size = 8192
//! memory_budget = 1073741824
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use liandan_plan::GptConfig;
pub use liandan_plan::phase::{ComparisonSource, PhaseKind, PhasePlan};

/// A spec error: where (`phases[0].steps`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {path}: {reason}")]
pub struct SpecError {
    pub source_name: String,
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    pub checkpoint: CheckpointSpec,
    pub phases: Vec<PhaseSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub preset: String,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub channels: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A directory written by `liandan data prepare`.
    pub prepared: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default = "one")]
    pub min_workers: u32,
    #[serde(default = "eight")]
    pub max_workers: u32,
    /// The device kind every phase's workers must have: `cpu`, `cuda` or `cuda-emu` (absent:
    /// any; a group is always of one kind). A phase's own `device` overrides it.
    #[serde(default)]
    pub device: Option<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec { min_workers: 1, max_workers: 8, device: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    pub dir: PathBuf,
    #[serde(default = "hundred")]
    pub every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    pub kind: PhaseKind,
    /// Optimizer steps (required for every kind but data).
    #[serde(default)]
    pub steps: u64,
    /// Sequences per optimizer step over all workers.
    #[serde(default)]
    pub global_batch: usize,
    #[serde(default)]
    pub seq_len: usize,
    #[serde(default)]
    pub lr: f32,
    pub min_lr: Option<f32>,
    pub warmup: Option<u64>,
    #[serde(default = "weight_decay")]
    pub weight_decay: f32,
    #[serde(default = "grad_clip")]
    pub grad_clip: f32,
    #[serde(default = "seed")]
    pub seed: u64,
    /// sft: the JSONL of examples (`{prompt, response}` or `{messages}`); reward and dpo: the
    /// JSONL of comparisons (`{prompt, chosen, rejected, label_source}`); ppo and grpo: the
    /// prompts (SFT format; the answers are not used).
    pub data: Option<PathBuf>,
    /// Start from this checkpoint instead of an earlier phase's output.
    pub init: Option<PathBuf>,
    /// Start from the output of this earlier phase (by name). Default: the previous phase; for
    /// ppo, grpo and dpo the last sft phase before it (also their frozen reference).
    pub from: Option<String>,
    /// ppo (and grpo with `reward = "model"` or `"both"`): the reward phase (by name) whose
    /// model scores the answers. Default: the last reward phase before it.
    pub reward_model: Option<String>,
    /// ppo and grpo: a reward-model checkpoint (a reward phase's output) instead of a reward phase.
    pub reward_checkpoint: Option<PathBuf>,
    /// ppo: the algorithm's settings (`[phases.ppo]`; every field has a default).
    pub ppo: Option<liandan_plan::phase::PpoSettings>,
    /// grpo: the algorithm's settings (`[phases.grpo]`; every field has a default).
    pub grpo: Option<liandan_plan::phase::GrpoSettings>,
    /// dpo: the algorithm's settings (`[phases.dpo]`; every field has a default).
    pub dpo: Option<liandan_plan::phase::DpoSettings>,
    /// reward and dpo: `file` (the `data` JSONL, default), `labelled` (comparisons labelled
    /// through `liandan label`), or `both`.
    #[serde(default)]
    pub comparisons: liandan_plan::phase::ComparisonSource,
    /// sft, reward and dpo: train only on the examples (comparisons) whose `task` field is one
    /// of these; empty (default) = all. ppo and grpo take theirs in `ppo.tasks`/`grpo.tasks`.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// The device kind this phase's workers must have (overrides `cluster.device`).
    pub device: Option<String>,
    /// Steps whose loss or gradient norm is not finite that the phase skips (no update, counted
    /// as `skipped_steps`) before it fails. Default 0: the first such step fails the phase.
    #[serde(default)]
    pub max_skipped_steps: u64,
    /// data: the pipeline's settings (`[phases.prepare]`); the output is `data.prepared`.
    pub prepare: Option<liandan_data::prepare::PrepareConfig>,
    /// Every phase but data: shard the trained models' AdamW state over the phase's
    /// data-parallel workers (ZeRO-1), so each keeps `1/world` of the moments (ppo: of the
    /// policy's and the value model's); the numbers match an unsharded run to f32 rounding.
    /// Default false.
    #[serde(default)]
    pub shard_optimizer: bool,
}

/// A parser's message on one line, each of its lines cut to [`QUOTED_CHARS`]: a spec error that
/// quotes a line of a megabyte still comes back whole, and small enough for any RPC.
fn one_line(msg: &str) -> String {
    msg.trim().lines().map(|l| crate::limits::cut(l, QUOTED_CHARS)).collect::<Vec<_>>().join(" ")
}

/// The most of one line of the spec an error quotes.
const QUOTED_CHARS: usize = 200;

/// Upper bounds of a spec's values: past them a value is a typo (or an attack), not a plan.
pub const MAX_NAME_CHARS: usize = 128;
pub const MAX_PHASES: usize = 64;
pub const MAX_PHASE_NAME: usize = 64;
pub const MAX_WORKERS: u32 = 4096;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_CHANNELS: usize = 65536;
pub const MAX_STEPS: u64 = 100_000_000;
pub const MAX_BATCH: usize = 1 << 20;
pub const MAX_SEQ_LEN: usize = 1 << 20;
pub const MAX_LR: f32 = 1e3;
/// Most steps with a non-finite loss or gradient norm a phase may skip (`max_skipped_steps`).
pub const MAX_SKIPPED: u64 = 10_000;

fn one() -> u32 {
    1
}
fn eight() -> u32 {
    8
}
fn hundred() -> u64 {
    100
}
fn weight_decay() -> f32 {
    0.1
}
fn grad_clip() -> f32 {
    1.0
}
fn seed() -> u64 {
    1337
}

impl JobSpec {
    /// Parses and validates `text`; `source_name` (a file name) prefixes every error.
    pub fn parse(text: &str, source_name: &str) -> Result<JobSpec, SpecError> {
        let err = |path: &str, reason: String| SpecError { source_name: crate::limits::cut(source_name, 256), path: crate::limits::cut(path, QUOTED_CHARS), reason };
        let de = toml::Deserializer::parse(text).map_err(|e| err("(toml)", one_line(&e.to_string())))?;
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(if path.is_empty() || path == "." { "(root)" } else { &path }, one_line(&e.into_inner().to_string()))
        })?;
        spec.validate().map_err(|(p, r)| err(&p, r))?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |p: &str, r: String| Err((p.to_string(), r));
        if self.name.trim().is_empty() {
            return bad("name", "must not be empty".into());
        }
        if self.name.chars().count() > MAX_NAME_CHARS {
            return bad("name", format!("is {} characters; at most {MAX_NAME_CHARS}", self.name.chars().count()));
        }
        for (key, v, max) in [("model.layers", self.model.layers, MAX_LAYERS), ("model.heads", self.model.heads, MAX_HEADS), ("model.channels", self.model.channels, MAX_CHANNELS)]
        {
            if let Some(v) = v
                && (v == 0 || v > max)
            {
                return bad(key, format!("must be in 1..={max}, got {v}"));
            }
        }
        if self.cluster.min_workers == 0 {
            return bad("cluster.min_workers", "must be at least 1".into());
        }
        let known = |d: &Option<String>| d.as_deref().is_none_or(|d| liandan_plan::phase::DEVICE_KINDS.contains(&d));
        if !known(&self.cluster.device) {
            return bad("cluster.device", format!("'{}' is not a device kind (cpu, cuda, cuda-emu)", self.cluster.device.as_deref().unwrap_or_default()));
        }
        if let Some(i) = self.phases.iter().position(|p| !known(&p.device)) {
            return bad(&format!("phases[{i}].device"), format!("'{}' is not a device kind (cpu, cuda, cuda-emu)", self.phases[i].device.as_deref().unwrap_or_default()));
        }
        if self.cluster.max_workers > MAX_WORKERS {
            return bad("cluster.max_workers", format!("must be at most {MAX_WORKERS}, got {}", self.cluster.max_workers));
        }
        if self.cluster.max_workers < self.cluster.min_workers {
            return bad("cluster.max_workers", format!("must be >= min_workers ({}), got {}", self.cluster.min_workers, self.cluster.max_workers));
        }
        if self.checkpoint.every == 0 {
            return bad("checkpoint.every", "must be at least 1 step".into());
        }
        if self.phases.is_empty() {
            return bad("phases", "at least one phase is needed".into());
        }
        if self.phases.len() > MAX_PHASES {
            return bad("phases", format!("{} phases; at most {MAX_PHASES}", self.phases.len()));
        }
        for (i, p) in self.phases.iter().enumerate() {
            let at = |k: &str| format!("phases[{i}].{k}");
            // The name is part of the phase's checkpoint directory.
            let plain = !p.name.is_empty() && p.name.len() <= MAX_PHASE_NAME && !p.name.starts_with('.') && p.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !plain {
                return bad(
                    &at("name"),
                    format!(
                        "'{}' must be 1..={MAX_PHASE_NAME} of A-Z a-z 0-9 - _ . (not starting with '.'): it names the phase's checkpoint directory",
                        p.name.chars().take(80).collect::<String>()
                    ),
                );
            }
            if self.phases[..i].iter().any(|q| q.name == p.name) {
                return bad(&at("name"), format!("'{}' is the name of an earlier phase too", p.name));
            }
            let kind = format!("{:?}", p.kind).to_lowercase();
            let a = if p.kind == PhaseKind::Sft { "an" } else { "a" };
            // Keys of some kinds only, data phases included.
            if !p.tasks.is_empty() && !matches!(p.kind, PhaseKind::Sft | PhaseKind::Reward | PhaseKind::Dpo) {
                let hint = if matches!(p.kind, PhaseKind::Ppo | PhaseKind::Grpo) { format!(" (a {kind} phase's prompts are chosen by `{kind}.tasks`)") } else { String::new() };
                return bad(&at("tasks"), format!("`tasks` belongs to sft, reward and dpo phases, not {kind}{hint}"));
            }
            if p.tasks.iter().any(|t| t.trim().is_empty()) {
                return bad(&at("tasks"), "a task name must not be empty".into());
            }
            if !takes_comparisons(p.kind) && p.comparisons != ComparisonSource::File {
                return bad(&at("comparisons"), format!("`comparisons` belongs to reward and dpo phases, not {kind}"));
            }
            if p.shard_optimizer && !p.kind.can_shard_optimizer() {
                return bad(&at("shard_optimizer"), format!("`shard_optimizer` belongs to phases that train a model, not {kind}"));
            }
            if p.kind == PhaseKind::Data {
                self.validate_data_phase(i).map_err(|(k, r)| (at(&k), r))?;
                continue;
            }
            if p.prepare.is_some() {
                return bad(&at("prepare"), format!("`prepare` belongs to data phases, not {kind}"));
            }
            // The phase a fine-tuning phase starts from: none before it but a data phase.
            let first_model = i == 0 || (self.phases[i - 1].kind == PhaseKind::Data && p.from.is_none() && !starts_from_sft(p.kind));
            if p.kind != PhaseKind::Pretrain {
                if first_model && p.init.is_none() {
                    return bad(&at("kind"), format!("{a} {kind} phase fine-tunes an earlier phase's output: put a pretrain phase before it (or give `init`)"));
                }
                let labelled_only = takes_comparisons(p.kind) && p.comparisons == ComparisonSource::Labelled;
                if p.data.is_none() && !labelled_only {
                    return bad(&at("data"), format!("{a} {kind} phase needs a JSONL file of examples"));
                }
            }
            if p.init.is_some() && p.from.is_some() {
                return bad(&at("from"), "give `init` (a checkpoint) or `from` (a phase), not both".into());
            }
            self.from_phase(i).map_err(|r| (at("from"), r))?;
            for (key, given, owner) in [("ppo", p.ppo.is_some(), PhaseKind::Ppo), ("grpo", p.grpo.is_some(), PhaseKind::Grpo), ("dpo", p.dpo.is_some(), PhaseKind::Dpo)] {
                if given && p.kind != owner {
                    return bad(&at(key), format!("`{key}` belongs to {key} phases, not {kind}"));
                }
            }
            if let Some(s) = &p.ppo {
                s.validate().map_err(|(f, r)| (at(&format!("ppo.{f}")), r))?;
            }
            if let Some(s) = &p.grpo {
                s.validate().map_err(|(f, r)| (at(&format!("grpo.{f}")), r))?;
            }
            if let Some(s) = &p.dpo {
                s.validate().map_err(|(f, r)| (at(&format!("dpo.{f}")), r))?;
            }
            let scored = p.reward_model.is_some() || p.reward_checkpoint.is_some();
            match p.kind {
                PhaseKind::Ppo => {
                    self.reward_phase(i).map_err(|r| (at("reward_model"), r))?;
                }
                PhaseKind::Grpo if p.grpo.clone().unwrap_or_default().needs_reward_model() => {
                    self.reward_phase(i).map_err(|r| (at("reward_model"), r))?;
                }
                PhaseKind::Grpo if scored => {
                    return bad(
                        &at("reward_model"),
                        "grpo.reward = \"verifier\" (the default) uses no reward model: drop `reward_model` and `reward_checkpoint`, or set grpo.reward = \"model\" or \"both\""
                            .into(),
                    );
                }
                _ if scored => return bad(&at("reward_model"), format!("`reward_model` and `reward_checkpoint` belong to ppo and grpo phases, not {kind}")),
                _ => {}
            }
            if p.steps == 0 || p.steps > MAX_STEPS {
                return bad(&at("steps"), if p.steps == 0 { "must be at least 1".into() } else { format!("must be at most {MAX_STEPS}, got {}", p.steps) });
            }
            if p.global_batch == 0 || p.global_batch > MAX_BATCH {
                return bad(
                    &at("global_batch"),
                    if p.global_batch == 0 { "must be at least 1 sequence".into() } else { format!("must be at most {MAX_BATCH} sequences, got {}", p.global_batch) },
                );
            }
            if p.seq_len == 0 || p.seq_len > MAX_SEQ_LEN {
                return bad(&at("seq_len"), if p.seq_len == 0 { "must be at least 1".into() } else { format!("must be at most {MAX_SEQ_LEN}, got {}", p.seq_len) });
            }
            if p.warmup.is_some_and(|w| w > p.steps) {
                return bad(&at("warmup"), format!("must be at most steps ({}), got {}", p.steps, p.warmup.unwrap_or(0)));
            }
            if !(p.lr > 0.0 && p.lr.is_finite()) {
                return bad(&at("lr"), format!("must be > 0, got {}", p.lr));
            }
            if p.lr > MAX_LR {
                return bad(&at("lr"), format!("must be at most {MAX_LR}, got {}", p.lr));
            }
            if p.max_skipped_steps > MAX_SKIPPED {
                return bad(&at("max_skipped_steps"), format!("must be at most {MAX_SKIPPED}, got {}", p.max_skipped_steps));
            }
            if let Some(m) = p.min_lr
                && !(0.0..=p.lr).contains(&m)
            {
                return bad(&at("min_lr"), format!("must be in [0, lr={}], got {m}", p.lr));
            }
            let finite_non_negative = |x: f32| x >= 0.0 && x.is_finite();
            if !finite_non_negative(p.grad_clip) || !finite_non_negative(p.weight_decay) {
                return bad(&at("grad_clip"), "grad_clip and weight_decay must be finite and >= 0".into());
            }
        }
        Ok(())
    }

    /// A data phase: first in the job, with pipeline settings whose output (if given) is the
    /// job's `data.prepared`, and none of the training keys.
    fn validate_data_phase(&self, i: usize) -> Result<(), (String, String)> {
        let p = &self.phases[i];
        if i != 0 {
            return Err(("kind".into(), "a data phase must be the first phase of its job".into()));
        }
        let Some(cfg) = &p.prepare else {
            return Err(("prepare".into(), "a data phase needs [phases.prepare] with its inputs".into()));
        };
        if cfg.inputs.is_empty() {
            return Err(("prepare.inputs".into(), "must name at least one file, directory or glob".into()));
        }
        if !cfg.out.as_os_str().is_empty() && cfg.out != self.data.prepared {
            return Err(("prepare.out".into(), format!("a data phase writes data.prepared ({}); leave `out` out", self.data.prepared.display())));
        }
        let trains = p.steps != 0 || p.global_batch != 0 || p.seq_len != 0 || p.lr != 0.0;
        let post = p.ppo.is_some() || p.grpo.is_some() || p.dpo.is_some() || p.reward_model.is_some() || p.reward_checkpoint.is_some();
        if trains || post || p.data.is_some() || p.init.is_some() || p.from.is_some() {
            return Err(("kind".into(), "a data phase takes only name, kind and [phases.prepare] (no steps, batch, lr, data, init, from, ppo, grpo or dpo keys)".into()));
        }
        let mut cfg = cfg.clone();
        cfg.out = self.data.prepared.clone();
        cfg.validate().map_err(|e| ("prepare".to_string(), e.to_string()))
    }

    /// The data phase's settings, resolved: `out` is `data.prepared`; the vocabulary is padded
    /// to exactly `vocab_size` when phases after it size their model by it.
    pub fn data_settings(&self) -> Option<liandan_data::prepare::PrepareConfig> {
        let p = self.phases.first().filter(|p| p.kind == PhaseKind::Data)?;
        let mut cfg = p.prepare.clone()?;
        cfg.out = self.data.prepared.clone();
        cfg.exact_vocab = self.phases.len() > 1;
        Some(cfg)
    }

    /// The earlier phase that phase `i` starts from, if any.
    pub fn from_phase(&self, i: usize) -> Result<Option<usize>, String> {
        let p = &self.phases[i];
        if p.init.is_some() {
            return Ok(None);
        }
        if let Some(name) = &p.from {
            return match self.phases[..i].iter().position(|q| &q.name == name) {
                Some(k) if self.phases[k].kind == PhaseKind::Data => Err(format!("phase '{name}' is a data phase: it makes data, not a model")),
                Some(k) => Ok(Some(k)),
                None => Err(format!("no phase named '{name}' before this one")),
            };
        }
        if starts_from_sft(p.kind) {
            let kind = format!("{:?}", p.kind).to_lowercase();
            return self.phases[..i]
                .iter()
                .rposition(|q| q.kind == PhaseKind::Sft)
                .map(Some)
                .ok_or_else(|| format!("a {kind} phase starts from an SFT model: put an sft phase before it, or give `from` or `init`"));
        }
        Ok(i.checked_sub(1).filter(|&k| self.phases[k].kind != PhaseKind::Data))
    }

    /// The reward phase whose model a ppo (or grpo) phase `i` uses (`None` with `reward_checkpoint`).
    pub fn reward_phase(&self, i: usize) -> Result<Option<usize>, String> {
        let p = &self.phases[i];
        match (&p.reward_model, &p.reward_checkpoint) {
            (Some(_), Some(_)) => Err("give `reward_model` (a phase) or `reward_checkpoint`, not both".into()),
            (None, Some(_)) => Ok(None),
            (Some(name), None) => match self.phases[..i].iter().position(|q| &q.name == name) {
                Some(k) if self.phases[k].kind == PhaseKind::Reward => Ok(Some(k)),
                Some(_) => Err(format!("phase '{name}' is not a reward phase")),
                None => Err(format!("no phase named '{name}' before this one")),
            },
            (None, None) => self.phases[..i].iter().rposition(|q| q.kind == PhaseKind::Reward).map(Some).ok_or_else(|| match p.kind {
                PhaseKind::Grpo => {
                    let r = format!("{:?}", p.grpo.clone().unwrap_or_default().reward).to_lowercase();
                    format!(
                        "a grpo phase with grpo.reward = \"{r}\" needs a reward model: put a reward phase before it, give `reward_checkpoint`, or set grpo.reward = \"verifier\""
                    )
                }
                _ => "a ppo phase needs a reward model: put a reward phase before it, or give `reward_checkpoint`".into(),
            }),
        }
    }

    /// The model config for a vocabulary, with the spec's overrides.
    pub fn model_config(&self, vocab_size: usize) -> Result<GptConfig, (String, String)> {
        let mut m = GptConfig::preset(&self.model.preset, vocab_size).map_err(|e| ("model.preset".to_string(), e.to_string()))?;
        m.n_layer = self.model.layers.unwrap_or(m.n_layer);
        m.n_head = self.model.heads.unwrap_or(m.n_head);
        m.n_embd = self.model.channels.unwrap_or(m.n_embd);
        m.validate().map_err(|e| ("model".to_string(), e.to_string()))?;
        Ok(m)
    }

    /// The vocabulary the model is sized by: the data phase's (its tokenizer's, or
    /// `vocab_size`) when the job makes its data, else the prepared data's manifest.
    ///
    /// # Errors
    /// The manifest or the data phase's tokenizer cannot be read (key `data.prepared` or
    /// `phases[0].prepare.tokenizer`).
    pub fn vocab_size(&self, source_name: &str) -> Result<usize, SpecError> {
        let err = |path: &str, reason: String| SpecError { source_name: source_name.to_string(), path: path.into(), reason };
        match self.data_settings() {
            Some(cfg) => match &cfg.tokenizer {
                Some(t) => Ok(liandan_data::tokenizer::ChatTokenizer::load(t, None).map_err(|e| err("phases[0].prepare.tokenizer", e.to_string()))?.vocab_size()),
                None => Ok(cfg.vocab_size),
            },
            None => Ok(liandan_data::shard::Manifest::load(&self.data.prepared).map_err(|e| err("data.prepared", e.to_string()))?.vocab_size),
        }
    }

    /// The model every phase trains, for a data vocabulary of `vocab` tokens: the `config.json`
    /// of a phase's `init` when that is a Hugging Face model directory (the data's tokens must
    /// fit its vocabulary), else the preset with the spec's overrides. Reads no weights.
    ///
    /// # Errors
    /// The directory's config is unreadable or unsupported, the vocabulary does not fit, the
    /// preset or its overrides are invalid.
    pub fn resolve_model(&self, vocab: usize, source_name: &str) -> Result<GptConfig, SpecError> {
        let err = |path: String, reason: String| SpecError { source_name: source_name.to_string(), path, reason };
        let imported = self.phases.iter().enumerate().find_map(|(i, p)| p.init.as_ref().filter(|d| liandan_plan::hf::is_hf_dir(d)).map(|d| (i, d)));
        match imported {
            Some((i, dir)) => {
                let m = liandan_plan::checkpoint::read_model_config(dir).map_err(|e| err(format!("phases[{i}].init"), e.to_string()))?;
                if vocab > m.vocab_size {
                    return Err(err(format!("phases[{i}].init"), format!("{}: the data's vocabulary of {vocab} tokens does not fit the model's {}", dir.display(), m.vocab_size)));
                }
                Ok(m)
            }
            None => self.model_config(vocab).map_err(|(p, r)| err(p, r)),
        }
    }

    /// Phase `i`'s plan for `model`, as the coordinator sends it (before the checks of
    /// [`JobSpec::plans`]); `data_plan` sizes a data phase (its steps are its tasks).
    pub fn phase_plan(&self, i: usize, model: &GptConfig, data_plan: Option<&liandan_data::pipeline::Plan>) -> PhasePlan {
        let p = &self.phases[i];
        let data = self.data_settings();
        PhasePlan {
            kind: p.kind,
            model: model.clone(),
            data_dir: self.data.prepared.clone(),
            steps: match (data_plan, p.kind) {
                (Some(d), PhaseKind::Data) => d.total_tasks(),
                _ => p.steps,
            },
            // A data phase's "batch" is its widest stage: more workers than tasks idle.
            global_batch: match (data_plan, p.kind) {
                (Some(d), PhaseKind::Data) => d.tasks.len().max(d.partitions),
                _ => p.global_batch,
            },
            seq_len: p.seq_len,
            max_lr: p.lr,
            min_lr: p.min_lr.unwrap_or(p.lr / 10.0),
            warmup: p.warmup.unwrap_or(p.steps / 20),
            weight_decay: p.weight_decay,
            grad_clip: p.grad_clip,
            seed: p.seed,
            checkpoint_every: self.checkpoint.every,
            examples: p.data.clone(),
            // Validated by `parse`.
            from_phase: self.from_phase(i).unwrap_or(None),
            reward_phase: if scored_by_a_model(p) { self.reward_phase(i).unwrap_or(None) } else { None },
            init_checkpoint: p.init.clone(),
            reward_checkpoint: p.reward_checkpoint.clone(),
            ppo: (p.kind == PhaseKind::Ppo).then(|| p.ppo.clone().unwrap_or_default()),
            grpo: (p.kind == PhaseKind::Grpo).then(|| p.grpo.clone().unwrap_or_default()),
            dpo: (p.kind == PhaseKind::Dpo).then(|| p.dpo.clone().unwrap_or_default()),
            comparisons: p.comparisons,
            tasks: p.tasks.clone(),
            labelled_examples: None,
            max_skipped_steps: p.max_skipped_steps,
            device: p.device.clone().or_else(|| self.cluster.device.clone()),
            prepare: if p.kind == PhaseKind::Data { data } else { None },
            shard_optimizer: p.shard_optimizer,
        }
    }

    /// The model and every phase's plan for a data vocabulary of `vocab` tokens, with the
    /// checks that need no file beyond a model directory's `config.json`: each phase's
    /// `seq_len` within the model's context, and memory sizes that do not overflow. What
    /// [`JobSpec::plans`] and `liandan plan` share.
    ///
    /// # Errors
    /// As [`JobSpec::resolve_model`]; a `seq_len` past the context; sizes that overflow.
    pub fn resolve(&self, vocab: usize, data_plan: Option<&liandan_data::pipeline::Plan>, source_name: &str) -> Result<(GptConfig, Vec<PhasePlan>), SpecError> {
        let err = |path: String, reason: String| SpecError { source_name: source_name.to_string(), path, reason };
        // A phase that starts from a Hugging Face model directory fixes the model: its
        // config.json, not the preset, is the architecture.
        let model = self.resolve_model(vocab, source_name)?;
        let plans = (0..self.phases.len())
            .map(|i| {
                let p = &self.phases[i];
                if p.seq_len > model.n_positions {
                    return Err(err(format!("phases[{i}].seq_len"), format!("must be <= the model's context {}, got {}", model.n_positions, p.seq_len)));
                }
                let plan = self.phase_plan(i, &model, data_plan);
                if plan.memory_per_rank(self.cluster.min_workers as usize).is_none() {
                    return Err(err(format!("phases[{i}]"), "the model and batch need more memory than any machine has (the sizes overflow)".into()));
                }
                Ok(plan)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((model, plans))
    }

    /// Resolves every phase against the data: reads the manifest (vocabulary), checks sequence
    /// lengths against the model, and that the checkpoint directory is writable.
    pub fn plans(&self, source_name: &str) -> Result<Vec<PhasePlan>, SpecError> {
        let err = |path: String, reason: String| SpecError { source_name: source_name.to_string(), path, reason };
        let data = self.data_settings();
        // With a data phase the data does not exist yet: the model is sized by the vocabulary
        // it will have (a given tokenizer's, or `vocab_size`, padded to exactly that).
        let vocab = self.vocab_size(source_name)?;
        let data_plan = match &data {
            Some(cfg) => Some(liandan_data::pipeline::plan(cfg).map_err(|e| err("phases[0].prepare".into(), e.to_string()))?),
            None => None,
        };
        let (model, plans) = self.resolve(vocab, data_plan.as_ref(), source_name)?;
        std::fs::create_dir_all(&self.checkpoint.dir)
            .and_then(|_| {
                let probe = self.checkpoint.dir.join(".liandan-write-probe");
                std::fs::write(&probe, b"ok")?;
                std::fs::remove_file(probe)
            })
            .map_err(|e| err("checkpoint.dir".into(), format!("{} is not writable: {e}", self.checkpoint.dir.display())))?;
        for (i, (p, plan)) in self.phases.iter().zip(&plans).enumerate() {
            if let (Some(file), true) = (&p.data, takes_comparisons(p.kind)) {
                // Every comparison line is valid now, also when the phase adds labelled ones.
                liandan_data::chat::read_preferences(file).map_err(|e| err(format!("phases[{i}].data"), e.to_string()))?;
            }
            // Checkpoints named in the spec must exist and fit the model now, not when a
            // worker reaches the phase.
            if let Some(dir) = &p.init {
                liandan_plan::checkpoint::check(dir, Some(&model)).map_err(|e| err(format!("phases[{i}].init"), e.to_string()))?;
            }
            if let Some(dir) = &p.reward_checkpoint {
                let ck = liandan_plan::checkpoint::load(dir, Some(&model)).map_err(|e| err(format!("phases[{i}].reward_checkpoint"), e.to_string()))?;
                liandan_plan::head::ScalarHead::load(dir, &ck.state).map_err(|e| err(format!("phases[{i}].reward_checkpoint"), e.to_string()))?;
            }
            // Whatever the worker would refuse about the inputs, refused now (the same loaders).
            // Phases after a data phase read data that does not exist yet: their workers check
            // it when the phase starts.
            if data.is_some() && plan.kind != PhaseKind::Data {
                continue;
            }
            liandan_plan::inputs::check(plan).map_err(|e| {
                let key = match (plan.kind, &e) {
                    (PhaseKind::Pretrain, _) => "data.prepared".to_string(),
                    (PhaseKind::Data, _) => format!("phases[{i}].prepare"),
                    (_, liandan_plan::inputs::InputError::Data(_)) => format!("phases[{i}].data"),
                    _ => format!("phases[{i}]"),
                };
                err(key, e.to_string())
            })?;
        }
        Ok(plans)
    }
}

/// The kinds that start from the last sft phase by default (their frozen reference).
fn starts_from_sft(kind: PhaseKind) -> bool {
    matches!(kind, PhaseKind::Ppo | PhaseKind::Grpo | PhaseKind::Dpo)
}

/// The kinds that train on comparisons (`comparisons`, preference `data`).
fn takes_comparisons(kind: PhaseKind) -> bool {
    matches!(kind, PhaseKind::Reward | PhaseKind::Dpo)
}

/// Whether a phase's answers are scored by a reward model.
fn scored_by_a_model(p: &PhaseSpec) -> bool {
    match p.kind {
        PhaseKind::Ppo => true,
        PhaseKind::Grpo => p.grpo.clone().unwrap_or_default().needs_reward_model(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[model]
preset = "nano"
[data]
prepared = "/nonexistent"
[checkpoint]
dir = "/tmp/x"
[[phases]]
name = "pretrain"
kind = "pretrain"
steps = 10
global_batch = 4
seq_len = 32
lr = 1e-3
"#;

    #[test]
    fn good_spec_parses_with_defaults() {
        let s = JobSpec::parse(GOOD, "job.toml").unwrap();
        assert_eq!(s.cluster, ClusterSpec { min_workers: 1, max_workers: 8, device: None });
        assert_eq!(s.checkpoint.every, 100);
        assert_eq!(s.phases[0].seed, 1337);
    }

    #[test]
    fn typo_and_bad_values_name_the_key() {
        let e = JobSpec::parse(&GOOD.replace("steps = 10", "stpes = 10"), "job.toml").unwrap_err().to_string();
        assert!(e.starts_with("job.toml: phases[0]") && e.contains("stpes"), "{e}");
        let e = JobSpec::parse(&GOOD.replace("steps = 10", "steps = 0"), "job.toml").unwrap_err().to_string();
        assert_eq!(e, "job.toml: phases[0].steps: must be at least 1");
        let e = JobSpec::parse(&GOOD.replace("lr = 1e-3", "lr = -1.0"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].lr: must be > 0"), "{e}");
        let e = JobSpec::parse(&GOOD.replace("global_batch = 4", "global_batch = \"four\""), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].global_batch"), "{e}");
        let e = JobSpec::parse(&GOOD.replace("kind = \"pretrain\"", "kind = \"ppo\""), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].kind: a ppo phase fine-tunes an earlier phase"), "{e}");
        let e = JobSpec::parse(&GOOD.replace("kind = \"pretrain\"", "kind = \"sft\""), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].kind: an sft phase fine-tunes an earlier phase"), "{e}");
        let e = JobSpec::parse(&format!("{GOOD}\n[cluster]\nmin_workers = 3\nmax_workers = 2\n"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("cluster.max_workers: must be >= min_workers (3), got 2"), "{e}");
    }

    fn with_phase(extra: &str) -> String {
        format!("{GOOD}\n[[phases]]\nname = \"sft\"\nkind = \"sft\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-4\n{extra}")
    }

    #[test]
    fn ppo_phases_need_an_sft_model_and_a_reward_model() {
        let ppo = "[[phases]]\nname = \"ppo\"\nkind = \"ppo\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-5\n";
        let e = JobSpec::parse(&with_phase(ppo), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[2].reward_model: a ppo phase needs a reward model"), "{e}");
        let rm = "[[phases]]\nname = \"rm\"\nkind = \"reward\"\ndata = \"p.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-4\n";
        let spec = JobSpec::parse(&with_phase(&format!("{rm}{ppo}")), "job.toml").unwrap();
        // ppo starts from the sft phase (index 1), not from the reward phase just before it.
        assert_eq!((spec.from_phase(3), spec.reward_phase(3)), (Ok(Some(1)), Ok(Some(2))));
        assert_eq!(spec.from_phase(2), Ok(Some(1)));
        let e = JobSpec::parse(&with_phase(&format!("{rm}{ppo}[phases.ppo]\nclip = 1.5\n")), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[3].ppo.clip: must be in (0, 1)"), "{e}");
        let e = JobSpec::parse(&with_phase(&format!("{rm}{ppo}[phases.ppo]\ncilp = 0.1\n")), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[3].ppo") && e.contains("cilp"), "{e}");
        let e = JobSpec::parse(&with_phase(&format!("{rm}{}", ppo.replace("lr = 1e-5", "lr = 1e-5\nreward_model = \"sft\""))), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[3].reward_model: phase 'sft' is not a reward phase"), "{e}");
        let e = JobSpec::parse(&with_phase("[phases.ppo]\nclip = 0.1\n"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[1].ppo: `ppo` belongs to ppo phases, not sft"), "{e}");
    }

    #[test]
    fn grpo_and_dpo_phases_are_checked_at_submit() {
        let grpo = "[[phases]]\nname = \"grpo\"\nkind = \"grpo\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-5\n";
        let dpo = "[[phases]]\nname = \"dpo\"\nkind = \"dpo\"\ndata = \"p.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-5\n";
        let rm = "[[phases]]\nname = \"rm\"\nkind = \"reward\"\ndata = \"p.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-4\n";
        let parse = |extra: String| JobSpec::parse(&with_phase(&extra), "job.toml");
        let err = |extra: String| parse(extra).unwrap_err().to_string();
        // Both start from the sft phase; grpo's default reward (the verifier) needs no reward model.
        let spec = parse(format!("{grpo}{dpo}")).unwrap();
        assert_eq!((spec.from_phase(2), spec.from_phase(3), spec.reward_phase(2).is_err()), (Ok(Some(1)), Ok(Some(1)), true));
        let spec = parse(format!("{rm}{grpo}[phases.grpo]\nreward = \"both\"\n")).unwrap();
        assert_eq!((spec.from_phase(3), spec.reward_phase(3)), (Ok(Some(1)), Ok(Some(2))));
        // G = 1, β ≤ 0 or not finite: one line naming the phase and the field.
        assert_eq!(err(format!("{grpo}[phases.grpo]\ngroup_size = 1\n")), "job.toml: phases[2].grpo.group_size: must be in 2..=1024 (advantages are relative to the group), got 1");
        assert_eq!(err(format!("{dpo}[phases.dpo]\nbeta = 0.0\n")), "job.toml: phases[2].dpo.beta: must be finite and > 0, got 0");
        assert_eq!(err(format!("{dpo}[phases.dpo]\nbeta = -0.1\n")), "job.toml: phases[2].dpo.beta: must be finite and > 0, got -0.1");
        assert_eq!(err(format!("{dpo}[phases.dpo]\nbeta = nan\n")), "job.toml: phases[2].dpo.beta: must be finite and > 0, got NaN");
        assert_eq!(err(format!("{grpo}[phases.grpo]\nkl_coef = inf\n")), "job.toml: phases[2].grpo.kl_coef: must be finite and >= 0, got inf");
        // Reward sources that do not exist.
        let e = err(format!("{grpo}[phases.grpo]\nreward = \"model\"\n"));
        assert!(e.starts_with("job.toml: phases[2].reward_model: a grpo phase with grpo.reward = \"model\" needs a reward model"), "{e}");
        let e = err(format!("{rm}{}[phases.grpo]\nreward = \"both\"\n", grpo.replace("lr = 1e-5", "lr = 1e-5\nreward_model = \"nope\"")));
        assert_eq!(e, "job.toml: phases[3].reward_model: no phase named 'nope' before this one");
        let e = err(format!("{rm}{}", grpo.replace("lr = 1e-5", "lr = 1e-5\nreward_model = \"rm\"")));
        assert!(e.starts_with("job.toml: phases[3].reward_model: grpo.reward = \"verifier\" (the default) uses no reward model"), "{e}");
        let e = err(format!("{grpo}[phases.grpo]\nreward = \"judge\"\n"));
        assert!(e.contains("phases[2].grpo.reward") && e.contains("judge"), "{e}");
        let e = err(format!("{grpo}[phases.grpo]\ngroup = 4\n"));
        assert!(e.contains("phases[2].grpo") && e.contains("group"), "{e}");
        // Settings and keys of other kinds.
        assert_eq!(err(format!("{dpo}[phases.grpo]\ngroup_size = 4\n")), "job.toml: phases[2].grpo: `grpo` belongs to grpo phases, not dpo");
        assert_eq!(err(format!("{grpo}[phases.dpo]\nbeta = 0.1\n")), "job.toml: phases[2].dpo: `dpo` belongs to dpo phases, not grpo");
        assert!(
            err(dpo.replace("lr = 1e-5", "lr = 1e-5\nreward_model = \"rm\""))
                .contains("phases[2].reward_model: `reward_model` and `reward_checkpoint` belong to ppo and grpo phases, not dpo")
        );
        // DPO takes the reward phase's comparison sources; labelled ones need no file.
        parse(dpo.replace("data = \"p.jsonl\"\n", "comparisons = \"labelled\"\n")).unwrap();
        let e = err(grpo.replace("lr = 1e-5", "lr = 1e-5\ncomparisons = \"both\""));
        assert!(e.contains("phases[2].comparisons: `comparisons` belongs to reward and dpo phases, not grpo"), "{e}");
        // `tasks` narrows sft, reward and dpo data; ppo and grpo name theirs in their settings.
        let spec = parse(dpo.replace("lr = 1e-5", "lr = 1e-5\ntasks = [\"poem\"]")).unwrap();
        assert_eq!(spec.phases[2].tasks, vec!["poem".to_string()]);
        let e = err(grpo.replace("lr = 1e-5", "lr = 1e-5\ntasks = [\"poem\"]"));
        assert_eq!(e, "job.toml: phases[2].tasks: `tasks` belongs to sft, reward and dpo phases, not grpo (a grpo phase's prompts are chosen by `grpo.tasks`)");
        let e = err(dpo.replace("lr = 1e-5", "lr = 1e-5\ntasks = [\" \"]"));
        assert_eq!(e, "job.toml: phases[2].tasks: a task name must not be empty");
        // A sharded optimizer belongs to every phase that trains a model.
        for one in [dpo, grpo, rm] {
            let spec = parse(one.replace("lr = 1e-", "shard_optimizer = true\nlr = 1e-")).unwrap();
            assert!(spec.phases[2].shard_optimizer, "{one}");
        }
        let ppo = "[[phases]]\nname = \"ppo\"\nkind = \"ppo\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 32\nlr = 1e-5\nshard_optimizer = true\n";
        assert!(parse(format!("{rm}{ppo}")).unwrap().phases[3].shard_optimizer);
        let spec = parse("shard_optimizer = true\n".into()).unwrap();
        assert!(spec.phases[1].shard_optimizer && !spec.phases[0].shard_optimizer);
        // The example job parses.
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/post-training.toml")).unwrap();
        let spec = JobSpec::parse(&example, "examples/post-training.toml").unwrap();
        assert_eq!((spec.from_phase(2), spec.from_phase(3)), (Ok(Some(1)), Ok(Some(1))), "grpo and dpo both start from the sft phase");
        // The long run: ppo, grpo and dpo all start from its sft phase; sft, reward and dpo train on poems.
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/poetry.toml")).unwrap();
        let spec = JobSpec::parse(&example, "examples/poetry.toml").unwrap();
        let kinds: Vec<&str> = spec.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(kinds, ["pretrain", "sft", "reward", "ppo", "grpo", "dpo"]);
        assert_eq!((spec.from_phase(3), spec.from_phase(4), spec.from_phase(5)), (Ok(Some(1)), Ok(Some(1)), Ok(Some(1))));
        for i in [1, 2, 5] {
            assert_eq!(spec.phases[i].tasks, vec!["poem".to_string()], "{}", spec.phases[i].name);
        }
        let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo.toml")).unwrap();
        let spec = JobSpec::parse(&demo, "examples/demo.toml").unwrap();
        assert_eq!((spec.phases[1].tasks.as_slice(), spec.phases[2].tasks.as_slice()), (["poem".to_string()].as_slice(), ["poem".to_string()].as_slice()));
    }

    #[test]
    fn the_models_and_sequences_a_plan_names_are_what_its_memory_estimate_counts() {
        use liandan_plan::memory;
        let rm = "[[phases]]\nname = \"rm\"\nkind = \"reward\"\ndata = \"p.jsonl\"\nsteps = 2\nglobal_batch = 5\nseq_len = 32\nlr = 1e-4\n";
        let ppo = "[[phases]]\nname = \"ppo\"\nkind = \"ppo\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 7\nseq_len = 32\nlr = 1e-5\n";
        let grpo = |name: &str, reward: &str| {
            format!(
                "[[phases]]\nname = \"{name}\"\nkind = \"grpo\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 3\nseq_len = 16\nlr = 1e-5\n[phases.grpo]\ngroup_size = 3\nreward = \"{reward}\"\n"
            )
        };
        let dpo = "[[phases]]\nname = \"dpo\"\nkind = \"dpo\"\ndata = \"p.jsonl\"\nsteps = 2\nglobal_batch = 3\nseq_len = 16\nlr = 1e-5\n";
        let spec = JobSpec::parse(&with_phase(&format!("{rm}{ppo}{}{}{dpo}", grpo("g1", "verifier"), grpo("g2", "both"))), "job.toml").unwrap();
        let model = spec.model_config(300).unwrap();
        for world in [1, 2, 3] {
            for i in 0..spec.phases.len() {
                let plan = spec.phase_plan(i, &model, None);
                let ((trained, frozen), b) = (plan.models(), plan.sequences_per_rank(world).unwrap());
                let one = |opt| memory::gpt(&model, b, plan.seq_len, opt).unwrap();
                let mut want = MemoryEstimateSum::default();
                (0..trained).for_each(|_| want.add(one(true)));
                (0..frozen).for_each(|_| want.add(one(false)));
                assert_eq!(plan.memory_per_rank(world), Some(want.0), "phase {i} ({:?}) at world {world}", plan.kind);
            }
        }
        let counts: Vec<_> = (0..spec.phases.len()).map(|i| spec.phase_plan(i, &model, None).models()).collect();
        assert_eq!(counts, [(1, 0), (1, 0), (1, 0), (2, 2), (1, 1), (1, 2), (1, 0)]);
        // Sequences at world 2: the share of the global batch, ×2 for pairs, ×G for groups.
        let b: Vec<_> = (0..spec.phases.len()).map(|i| spec.phase_plan(i, &model, None).sequences_per_rank(2).unwrap()).collect();
        assert_eq!(b, [2, 1, 6, 4, 5, 5, 4]);
        // A sharded optimizer keeps its rank's share of AdamW's moments (the trained models';
        // frozen models have none); nothing else shrinks.
        for i in 0..spec.phases.len() {
            let mut sharded = spec.phase_plan(i, &model, None);
            sharded.shard_optimizer = true;
            for world in [1, 2, 3] {
                let (whole, part) = (spec.phase_plan(i, &model, None).memory_per_rank(world).unwrap(), sharded.memory_per_rank(world).unwrap());
                assert_eq!(part.optimizer, whole.optimizer.div_ceil(world as u64), "phase {i} world {world}");
                assert_eq!((part.weights, part.gradients, part.activations), (whole.weights, whole.gradients, whole.activations));
            }
        }
    }

    #[derive(Default)]
    struct MemoryEstimateSum(liandan_plan::memory::MemoryEstimate);

    impl MemoryEstimateSum {
        fn add(&mut self, e: liandan_plan::memory::MemoryEstimate) {
            self.0 = self.0.plus(e).unwrap();
        }
    }

    #[test]
    fn plans_need_prepared_data() {
        let s = JobSpec::parse(GOOD, "job.toml").unwrap();
        let e = s.plans("job.toml").unwrap_err().to_string();
        assert!(e.contains("data.prepared") && e.contains("/nonexistent/manifest.json"), "{e}");
    }

    const DATA: &str = r#"
name = "d"
[model]
preset = "nano"
[data]
prepared = "/tmp/out"
[checkpoint]
dir = "/tmp/x"
[[phases]]
name = "data"
kind = "data"
[phases.prepare]
inputs = ["raw"]
vocab_size = 512
"#;

    #[test]
    fn data_phases_come_first_take_only_their_settings_and_make_no_model() {
        let s = JobSpec::parse(DATA, "job.toml").unwrap();
        let d = s.data_settings().unwrap();
        assert_eq!((d.out.as_path(), d.exact_vocab), (std::path::Path::new("/tmp/out"), false));
        let pre = "[[phases]]\nname = \"pretrain\"\nkind = \"pretrain\"\nsteps = 2\nglobal_batch = 2\nseq_len = 8\nlr = 1e-3\n";
        let s = JobSpec::parse(&format!("{DATA}{pre}"), "job.toml").unwrap();
        assert_eq!(s.from_phase(1), Ok(None), "pretraining after a data phase starts from scratch");
        assert!(s.data_settings().unwrap().exact_vocab, "a model sized before the data exists needs the exact vocabulary");
        let e = JobSpec::parse(&format!("{DATA}{}", pre.replace("steps = 2", "from = \"data\"\nsteps = 2")), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[1].from: phase 'data' is a data phase"), "{e}");
        let sft = "[[phases]]\nname = \"sft\"\nkind = \"sft\"\ndata = \"s.jsonl\"\nsteps = 2\nglobal_batch = 2\nseq_len = 8\nlr = 1e-3\n";
        let e = JobSpec::parse(&format!("{DATA}{sft}"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[1].kind: an sft phase fine-tunes an earlier phase"), "{e}");
        let e = JobSpec::parse(&DATA.replace("kind = \"data\"", "kind = \"data\"\nshard_optimizer = true"), "job.toml").unwrap_err().to_string();
        assert_eq!(e, "job.toml: phases[0].shard_optimizer: `shard_optimizer` belongs to phases that train a model, not data");
        let e = JobSpec::parse(&DATA.replace("kind = \"data\"", "kind = \"data\"\ntasks = [\"poem\"]"), "job.toml").unwrap_err().to_string();
        assert_eq!(e, "job.toml: phases[0].tasks: `tasks` belongs to sft, reward and dpo phases, not data");
        let e = JobSpec::parse(&DATA.replace("kind = \"data\"", "kind = \"data\"\ncomparisons = \"labelled\""), "job.toml").unwrap_err().to_string();
        assert_eq!(e, "job.toml: phases[0].comparisons: `comparisons` belongs to reward and dpo phases, not data");
        let e = JobSpec::parse(&DATA.replace("kind = \"data\"", "kind = \"data\"\nsteps = 3"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].kind: a data phase takes only"), "{e}");
        let e = JobSpec::parse(&DATA.replace("inputs = [\"raw\"]", "inputs = []"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].prepare.inputs"), "{e}");
        let e = JobSpec::parse(&DATA.replace("vocab_size = 512", "vocab_sise = 512"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[0].prepare") && e.contains("vocab_sise"), "{e}");
        let e = JobSpec::parse(&format!("{GOOD}[[phases]]\nname = \"data\"\nkind = \"data\"\n[phases.prepare]\ninputs = [\"raw\"]\n"), "job.toml").unwrap_err().to_string();
        assert!(e.contains("phases[1].kind: a data phase must be the first phase"), "{e}");
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data-then-pretrain.toml")).unwrap();
        JobSpec::parse(&example, "examples/data-then-pretrain.toml").unwrap();
    }

    #[test]
    fn the_dashboard_names_the_data_stages_in_order() {
        let html = include_str!("dashboard.html").replace(' ', "");
        let want = format!("DATA_STAGES={};", serde_json::to_string(&liandan_data::pipeline::STAGES).unwrap());
        assert!(html.contains(&want), "dashboard.html's DATA_STAGES differs from {want}");
    }
}
