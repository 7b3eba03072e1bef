//! `liandan plan SPEC`: what each phase of a job needs on one rank, before it is submitted.
//!
//! The spec is resolved as the coordinator resolves it at submit
//! ([`liandan_coordinator::spec::JobSpec::resolve`]: the preset with its overrides, or the
//! `config.json` of a Hugging Face model directory named by `init`; each phase's batch, sequence
//! length and settings), and each phase's estimate is [`PhasePlan::memory_per_rank`], the
//! number the coordinator compares with the largest registered worker's memory. Nothing is
//! written and no data file is read; the vocabulary comes from the prepared data's manifest,
//! the data phase's settings, or `--vocab-size` before the data exists.

use std::path::PathBuf;

use liandan_coordinator::spec::{JobSpec, PhaseKind, PhasePlan};
use liandan_worker::GptConfig;
use liandan_worker::model::config::Family;
use liandan_worker::model::memory::{MemoryEstimate, show_bytes};

use crate::CliError;

#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// The job spec (TOML), as for `liandan submit`.
    pub spec: PathBuf,
    /// Ranks the global batch is split over (default: the spec's cluster.min_workers, the world
    /// the coordinator checks at submit).
    #[arg(long)]
    pub workers: Option<usize>,
    /// The data's vocabulary, for a spec whose data is not prepared yet (default: read from
    /// data.prepared's manifest, or the data phase's settings).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// One JSON object per line (one per phase) with every number in bytes, instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One phase's row.
#[derive(Debug, serde::Serialize)]
struct Row {
    phase: String,
    kind: String,
    /// Models held on a rank: trained (with gradients and AdamW state) and frozen.
    trained_models: usize,
    frozen_models: usize,
    /// Parameters of one model, and of all the models a rank holds.
    params_per_model: u64,
    params: u64,
    /// Sequences each model is sized for, of `seq_len` tokens.
    sequences_per_rank: usize,
    seq_len: usize,
    #[serde(flatten)]
    memory: MemoryEstimate,
    total: u64,
}

pub fn run(a: PlanArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&a.spec).map_err(|e| CliError::Io { path: a.spec.display().to_string(), source: e })?;
    let source = a.spec.display().to_string();
    let spec = JobSpec::parse(&text, &source).map_err(|e| CliError::Usage(e.to_string()))?;
    let vocab = match a.vocab_size {
        Some(0) => return Err(CliError::Usage("--vocab-size must be at least 1".into())),
        Some(v) => v,
        None => spec.vocab_size(&source).map_err(|e| CliError::Usage(format!("{e} (give --vocab-size N to plan before the data is prepared)")))?,
    };
    let world = a.workers.unwrap_or(spec.cluster.min_workers as usize);
    if world == 0 {
        return Err(CliError::Usage("--workers must be at least 1".into()));
    }
    let (model, plans) = spec.resolve(vocab, None, &source).map_err(|e| CliError::Usage(e.to_string()))?;
    let rows = spec.phases.iter().zip(&plans).enumerate().map(|(i, (p, plan))| row(&p.name, plan, world).ok_or_else(|| overflow(&source, i))).collect::<Result<Vec<_>, _>>()?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).map_err(|e| CliError::Usage(e.to_string()))?);
        }
        return Ok(());
    }
    print!("{}", table(&source, &spec, &model, vocab, a.vocab_size.is_some(), world, &rows));
    Ok(())
}

fn overflow(source: &str, i: usize) -> CliError {
    CliError::Usage(format!("{source}: phases[{i}]: the model and batch need more memory than any machine has (the sizes overflow)"))
}

fn row(name: &str, plan: &PhasePlan, world: usize) -> Option<Row> {
    let memory = plan.memory_per_rank(world)?;
    let (trained, frozen) = plan.models();
    let per_model = if plan.kind == PhaseKind::Data { 0 } else { plan.model.checked_num_parameters()? };
    Some(Row {
        phase: name.to_string(),
        kind: format!("{:?}", plan.kind).to_lowercase(),
        trained_models: trained,
        frozen_models: frozen,
        params_per_model: per_model,
        params: per_model.checked_mul((trained + frozen) as u64)?,
        sequences_per_rank: plan.sequences_per_rank(world)?,
        seq_len: plan.seq_len,
        total: memory.total(),
        memory,
    })
}

/// `1.84M`, `494.03M`, `7.62B`.
fn show_count(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

fn describe_model(spec: &JobSpec, m: &GptConfig) -> String {
    let origin = match spec.phases.iter().position(|p| p.init.as_ref().is_some_and(|d| liandan_worker::hf::is_hf_dir(d))) {
        Some(i) => format!("config.json of phases[{i}].init"),
        None => format!("preset {}", spec.model.preset),
    };
    match m.family {
        Family::Gpt2 => format!("gpt2 L={} C={} NH={} T≤{} V={} (Vp {}), from {origin}", m.n_layer, m.n_embd, m.n_head, m.n_positions, m.vocab_size, m.padded_vocab_size),
        Family::Llama => format!(
            "llama L={} C={} NH={} NKV={} I={} T≤{} V={} (Vp {}){}{}, from {origin}",
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.kv_heads(),
            m.intermediate_size,
            m.n_positions,
            m.vocab_size,
            m.padded_vocab_size,
            if m.attention_bias { ", q/k/v bias" } else { "" },
            if m.tie_word_embeddings { ", tied head" } else { ", untied head" },
        ),
    }
}

fn table(source: &str, spec: &JobSpec, model: &GptConfig, vocab: usize, vocab_given: bool, world: usize, rows: &[Row]) -> String {
    let mut out = format!("{source}: job '{}', {} phase(s)\n", spec.name, rows.len());
    out.push_str(&format!("model: {}\n", describe_model(spec, model)));
    out.push_str(&format!(
        "data vocabulary: {vocab} tokens{}\n",
        if vocab_given {
            " (--vocab-size)"
        } else if spec.data_settings().is_some() {
            " (the data phase's)"
        } else {
            " (data.prepared's manifest)"
        }
    ));
    let why = if world == spec.cluster.min_workers as usize { "cluster.min_workers, the world the coordinator checks at submit" } else { "--workers" };
    out.push_str(&format!("per rank at {world} rank(s) ({why}); f32 weights, gradients, AdamW m and v; activations for the largest batch\n\n"));
    let head = ["phase", "kind", "models", "params", "B/rank", "T", "weights", "gradients", "optimizer", "activations", "total"];
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|r| {
            let models = match (r.trained_models, r.frozen_models) {
                (0, 0) => "-".to_string(),
                (t, 0) => format!("{t}"),
                (t, f) => format!("{t}+{f} frozen"),
            };
            let data = r.kind == "data";
            [
                r.phase.clone(),
                r.kind.clone(),
                models,
                show_count(r.params),
                if data { "-".into() } else { r.sequences_per_rank.to_string() },
                if data { "-".into() } else { r.seq_len.to_string() },
                show_bytes(r.memory.weights),
                show_bytes(r.memory.gradients),
                show_bytes(r.memory.optimizer),
                if data { format!("{} (budget)", show_bytes(r.memory.activations)) } else { show_bytes(r.memory.activations) },
                show_bytes(r.total),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..head.len()).map(|c| cells.iter().map(|r| r[c].chars().count()).chain([head[c].len()]).max().unwrap_or(0)).collect();
    let line = |vals: Vec<&str>| {
        let mut l = String::new();
        for (c, v) in vals.iter().enumerate() {
            let pad = widths[c].saturating_sub(v.chars().count());
            // Names left-aligned, numbers right-aligned.
            if c < 3 { l.push_str(&format!("{v}{}  ", " ".repeat(pad))) } else { l.push_str(&format!("{}{v}  ", " ".repeat(pad))) }
        }
        format!("{}\n", l.trim_end())
    };
    out.push_str(&line(head.to_vec()));
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if let Some(big) = rows.iter().max_by_key(|r| r.total) {
        out.push_str(&format!(
            "\nlargest: phase '{}' needs {} per rank; the coordinator refuses the job at submit when that is more than the largest registered worker's memory\n",
            big.phase,
            show_bytes(big.total)
        ));
    }
    out
}
