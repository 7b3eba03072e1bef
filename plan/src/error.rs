//! The plan crate's error type. Every variant names what a person needs to fix the input: the
//! field and the numbers, the file and the tensor.

use std::path::PathBuf;

/// Errors of configs, plans and checkpoint files. The worker's engine error has the same
/// variants and converts from this one, so a message reads the same wherever it is raised.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A model or training configuration value is out of range.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A checkpoint (or model directory) file is missing, corrupt, or does not match the config.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl PlanError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PlanError::Io { path: path.into(), source }
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        PlanError::Checkpoint { path: path.into(), reason: reason.into() }
    }
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;
