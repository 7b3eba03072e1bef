//! `liandan up`: the main job on the embedded demo data.
//!
//! Until the coordinator and workers land, the main job runs in this process:
//! 1. the embedded raw data (Tang poems, 宋词, 诗经, 论语 and five noisy web pages, see
//!    `data/demo/DATA_LICENSES`) goes through `liandan data prepare` (clean with
//!    Traditional→Simplified, dedup, BPE tokenizer, shards);
//! 2. a small GPT pretrains on the shards, with checkpoints;
//! 3. it writes poems for held-out titles, and the poem-form verifier scores them.

use std::path::{Path, PathBuf};

use liandan_data::clean::CleanConfig;
use liandan_data::dedup::DedupConfig;
use liandan_data::ingest::IngestOptions;
use liandan_data::prepare::PrepareConfig;
use liandan_data::shard::SplitRatios;
use liandan_data::verify::poem_form;
use liandan_worker::generate::SamplingConfig;

use crate::train::TrainArgs;
use crate::CliError;

/// The raw demo corpus, embedded so the binary runs anywhere (built by
/// `scripts/build_demo_data.py`).
const RAW: &[(&str, &str)] = &[
    ("pretrain/tang.jsonl", include_str!("../../data/demo/pretrain/tang.jsonl")),
    ("pretrain/songci.jsonl", include_str!("../../data/demo/pretrain/songci.jsonl")),
    ("pretrain/shijing.jsonl", include_str!("../../data/demo/pretrain/shijing.jsonl")),
    ("pretrain/lunyu.txt", include_str!("../../data/demo/pretrain/lunyu.txt")),
    ("web/moyun-jueju.html", include_str!("../../data/demo/web/moyun-jueju.html")),
    ("web/moyun-wangwei.html", include_str!("../../data/demo/web/moyun-wangwei.html")),
    ("web/qingming-lvcha.html", include_str!("../../data/demo/web/qingming-lvcha.html")),
    ("web/qingming-diancha.html", include_str!("../../data/demo/web/qingming-diancha.html")),
    ("web/hanmo-kaishu.html", include_str!("../../data/demo/web/hanmo-kaishu.html")),
    ("DATA_LICENSES", include_str!("../../data/demo/DATA_LICENSES")),
];

/// Held-out evaluation prompts (kept out of every training file).
const EVAL: &str = include_str!("../../data/demo/eval.jsonl");

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where the raw data copy, the prepared data and the checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1200)]
    pub steps: u64,
}

pub fn run(a: UpArgs) -> Result<(), CliError> {
    let raw_dir = a.out.join("raw");
    for (name, body) in RAW {
        let p = raw_dir.join(name);
        write(&p, body)?;
    }
    eprintln!("liandan up: 1/3 data: preparing the embedded demo corpus in {}", raw_dir.display());
    let data_dir = a.out.join("data");
    let report = liandan_data::prepare::prepare(
        &PrepareConfig {
            inputs: vec![raw_dir.join("pretrain").display().to_string(), raw_dir.join("web").display().to_string()],
            out: data_dir.clone(),
            ingest: IngestOptions::default(),
            clean: CleanConfig { t2s: true, ..Default::default() },
            dedup: DedupConfig::default(),
            split: SplitRatios { train: 0.9, val: 0.05, test: 0.05 },
            vocab_size: 4096,
            tokenizer: None,
            shard_tokens: 10_000_000,
        },
        &liandan_data::prepare::Silent,
    )?;
    println!("{}", report.table());

    eprintln!("liandan up: 2/3 pretrain: the nano model on {}", data_dir.display());
    let ckpt_dir = a.out.join("pretrain");
    let outcome = crate::train::run(TrainArgs {
        data: Some(data_dir),
        text: None,
        out: ckpt_dir,
        model: "nano".into(),
        layers: None,
        heads: None,
        channels: None,
        batch: 8,
        seq: 128,
        grad_accum: 1,
        steps: a.steps,
        lr: 3e-3,
        min_lr: None,
        warmup: None,
        weight_decay: 0.1,
        clip: 1.0,
        seed: 1337,
        checkpoint_every: Some((a.steps / 4).max(1)),
        eval_every: (a.steps / 4).max(1),
        resume: None,
    })?;

    eprintln!("liandan up: 3/3 generate: poems for held-out titles, scored by the form verifier");
    let (model, codec) = crate::generate::load_model(&outcome.checkpoint)?;
    let titles = eval_titles(8);
    let mut regular = 0;
    println!("\nsamples from {} (temperature 0.8, top-k 40); a document is 'title / author / lines':", outcome.checkpoint.display());
    for (i, title) in titles.iter().enumerate() {
        let cfg = SamplingConfig { max_new_tokens: 80, temperature: 0.8, top_k: 40, top_p: 0.95, seed: i as u64, stop_tokens: codec.stop_tokens(), greedy: false };
        let prompt = format!("{title}\n");
        let text = crate::generate::complete(&model, &codec, &prompt, &cfg)?;
        // The first generated line is the author; the rest is the poem.
        let body: String = text.lines().skip(1).collect::<Vec<_>>().join("\n");
        let verdict = match poem_form(&body) {
            Ok(form) => {
                regular += 1;
                form.name().to_string()
            }
            Err(e) => format!("not regular: {e}"),
        };
        println!("  《{title}》 → {} [{verdict}]", text.trim_end().replace('\n', " / "));
    }
    println!(
        "\npretrain: train loss {:.3}, val loss {} (nats per token), {:.0} tokens/s; regular-form poems: {regular}/{}",
        outcome.train_loss,
        outcome.val_loss.map_or("n/a".into(), |v| format!("{v:.3}")),
        outcome.tokens_per_s,
        titles.len()
    );
    println!("artifacts: {} (raw/, data/ with shards and report.json, pretrain/ with checkpoints; 'latest' names the newest)", a.out.display());
    Ok(())
}

/// Titles of the first `n` held-out poem requests (`写一首…，题目是《title》`).
fn eval_titles(n: usize) -> Vec<String> {
    EVAL.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["task"] == "poem")
        .filter_map(|v| v["prompt"].as_str().and_then(|p| p.split('《').nth(1)).and_then(|t| t.split('》').next()).map(str::to_string))
        .take(n)
        .collect()
}

fn write(path: &Path, body: &str) -> Result<(), CliError> {
    let io = |e| CliError::Io { path: path.display().to_string(), source: e };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, body).map_err(io)
}
