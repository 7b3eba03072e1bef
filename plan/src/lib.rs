//! liandan-plan: what the coordinator and the workers agree on, with no model in it. The
//! coordinator resolves job specs into these types, checks a job's inputs and checkpoints with
//! them at submit, and sends the plans to workers; the workers (liandan-worker) train with them.
//! Nothing here runs a forward pass: the engine, its backends and the collectives live in the
//! worker crate, which the coordinator does not link.
//!
//! # Layout
//! - [`config`]: the model configuration (GPT-2 and the llama family), presets, validation.
//! - [`params`]: the flat parameter layout (Hugging Face tensor names, shapes, offsets).
//! - [`memory`]: what a rank needs for weights, gradients, optimizer state and activations.
//! - [`training`]: AdamW's hyper-parameters, the learning-rate schedule, the training config.
//! - [`phase`]: the phase plan a worker is sent, and each phase kind's settings.
//! - [`checkpoint`], [`hf`], [`hf_tokenizer`], [`head`]: the files of a checkpoint (a Hugging
//!   Face model directory with liandan's `state.json`), a downloaded model directory, the
//!   tokenizer files, the reward model's score head.
//! - [`inputs`]: a phase's data as its workers read it, and the submit-time check of it.
//! - [`ledger`], [`rng`]: which sequences each rank reads at each step, from a seeded generator.
//!
//! Shapes in comments use the worker crate's glossary (`B`, `T`, `C`, `V`, `Vp`, …).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod head;
pub mod hf;
pub mod hf_tokenizer;
pub mod inputs;
pub mod ledger;
pub mod memory;
pub mod params;
pub mod phase;
pub mod rng;
pub mod training;

pub use config::GptConfig;
pub use error::PlanError;
pub use phase::PhasePlan;
