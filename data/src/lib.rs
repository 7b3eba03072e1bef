//! liandan-data: the data pipeline — from raw text, JSONL, crawled HTML and the chinese-poetry
//! collections to clean, deduplicated, tokenized shards; plus the chat formats for SFT and
//! preference data and the poem-form verifier.
//!
//! # Layout
//! - [`ingest`]: expand files, directories and globs; read text, JSONL, HTML and chinese-poetry
//!   JSON (gzip too) into documents; count invalid UTF-8 and malformed lines.
//! - [`html`]: article text from an HTML page (script, style, nav, footer … dropped).
//! - [`clean`]: named cleaning rules, each with a counter and a switch: normalisation,
//!   Traditional→Simplified, spam-line rules, cross-document boilerplate, document filters.
//! - [`dedup`]: exact (hash of the normalised text) and near-duplicate (MinHash LSH).
//! - [`tokenizer`]: byte-level BPE training with the chat template's special tokens; the
//!   [`tokenizer::ChatTokenizer`] every phase formats conversations with.
//! - [`template`]: chat templates as Jinja (minijinja, Hugging Face's conventions) and where
//!   each assistant turn lands in the rendered text.
//! - [`hf_tokenizer`]: a model's own `tokenizer_config.json` / `generation_config.json`, read
//!   and written.
//! - [`shard`]: deterministic split by document hash, binary token shards, `manifest.json`.
//! - [`chat`]: SFT (`{prompt, response}` / `{messages}`) and preference (`{prompt, chosen,
//!   rejected}`) JSONL, validated with file:line errors and tokenized with an assistant mask.
//! - [`files`]: opening files named by others: regular files only, sizes and lines bounded.
//! - [`verify`]: the poem-form checker (五言/七言 绝句/律诗).
//! - [`stream`]: the same readers one document at a time, with caps on lines and documents, and
//!   large files cut into tasks at document boundaries.
//! - [`quality`]: the learned line-quality score (character n-gram logistic regression).
//! - [`extsort`]: fixed-size records on disk and an external sort within a memory budget.
//! - [`pipeline`]: the stages, their tasks and completion records in a shared work directory;
//!   run by one process or by the ranks of a data phase.
//! - [`prepare`]: the pipeline in one process, with progress and a funnel report.
//! - [`synth`]: a synthetic corpus for the memory test and benchmarks.

pub mod chat;
pub mod clean;
pub mod dedup;
pub mod error;
pub mod extsort;
pub mod files;
pub mod hf_tokenizer;
pub mod html;
pub mod ingest;
pub mod pipeline;
pub mod prepare;
pub mod quality;
pub mod shard;
pub mod stream;
pub mod synth;
pub mod template;
pub mod tokenizer;
pub mod verify;

pub use error::DataError;
