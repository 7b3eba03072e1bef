//! liandan-worker: the data plane of liandan — the GPT-2 engine, its optimizer, checkpoints and
//! generation. The `liandan` binary uses it directly for `train`, `generate` and `bench`.
//!
//! # Layout
//! - [`engine`]: the seam every phase uses — a model on a device and a replica (model,
//!   gradients, AdamW) — with CPU and CUDA implementations.
//! - [`model`]: the GPT-2 configuration, the parameter layout (one flat buffer, Hugging Face
//!   `GPT2LMHeadModel` names), activations allocated once, forward and backward.
//! - [`backend::cpu`]: one file per op (`<op>_forward` / `<op>_backward`), f32, `gemm` + rayon.
//! - [`optim`]: AdamW with decoupled weight decay, the cosine schedule with warmup, global-norm clipping.
//! - [`train`]: a training step with gradient accumulation over micro-batches.
//! - [`checkpoint`]: safetensors weights + optimizer moments + `state.json`, atomic, verified on load.
//! - [`collective`]: how data-parallel ranks sum gradients: `Local` (world 1) and `TcpRing`, a
//!   ring all-reduce over std TCP with a versioned handshake, timeouts and an abort flag.
//! - [`generate`]: sampling with a KV cache (temperature, top-k, top-p, stop tokens, greedy).
//! - [`rng`]: the seeded generator whose state checkpoints carry.
//! - [`tokenizer`]: the byte-level vocabulary (for plain text files; prepared data brings a BPE).
//! - [`plan`], [`ledger`], [`phase`]: what a worker runs for the coordinator — the phase plan,
//!   the sample ledger (which sequences each rank reads at each step), the phases themselves.
//!
//! # Glossary
//! Used in every shape comment of this crate:
//! - `B` batch (sequences per micro-batch), `T` sequence length (tokens per sequence),
//! - `C` channels (`n_embd`), `NH` heads, `hs` head size (`C / NH`), `L` layers,
//! - `V` vocabulary size, `Vp` padded vocabulary size (`V` rounded up so matmuls tile well;
//!   rows `V..Vp` of the embedding stay zero and never receive a logit's probability mass),
//! - `OC` output channels of a matmul, `maxT` the context length (`n_positions`).
//!
//! Matmul weights are stored as Hugging Face's `Conv1D` does, `(in, out)` row-major, so a
//! checkpoint is written without transposes and `transformers` loads it as it is.

pub mod backend;
pub mod collective;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod model;
pub mod optim;
pub mod phase;
pub mod runtime;
pub mod tokenizer;
pub mod train;

// What the worker shares with the coordinator lives in liandan-plan; re-exported at the paths
// the engine and the phases use.
pub use liandan_plan::phase as plan;
pub use liandan_plan::{checkpoint, hf, hf_tokenizer, ledger, rng};

pub use error::EngineError;
pub use model::{config::GptConfig, gpt::Gpt};
