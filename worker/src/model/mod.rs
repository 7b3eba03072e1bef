//! The GPT-2 model: configuration, parameter layout, activations and the forward/backward pass.

pub mod acts;
pub mod config;
pub mod gpt;
pub mod params;
pub mod profile;
