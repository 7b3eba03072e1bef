//! The engine's error type. Every variant names what a person needs to fix the input: the
//! field and the numbers, the file and the tensor.

use std::path::PathBuf;

/// Errors of the engine. Library code returns these instead of panicking on input.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model or training configuration value is out of range.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A batch does not fit the buffers allocated for the model.
    #[error("batch of B={b}, T={t} does not fit: the model was allocated for B<={max_b}, T<={max_t}")]
    BatchTooLarge { b: usize, t: usize, max_b: usize, max_t: usize },

    /// An input slice has the wrong length for the batch shape.
    #[error("{what}: expected {expected} values for B×T, got {got}")]
    BadLength { what: &'static str, expected: usize, got: usize },

    /// A token id outside the vocabulary.
    #[error("{what}[{position}] = {token} is outside the vocabulary (V={vocab})")]
    TokenOutOfRange { what: &'static str, position: usize, token: i64, vocab: usize },

    /// `backward` was called without a preceding `forward` + `loss(with_grad = true)`.
    #[error("backward called without a forward pass and loss with gradients")]
    NoForward,

    /// A checkpoint (or fixture) file is missing, corrupt, or does not match the config.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A training text is empty or too short for one batch.
    #[error("{}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },

    /// The CUDA backend failed (a library, the driver, a launch, NVRTC).
    #[error(transparent)]
    Cuda(Box<crate::backend::cuda::CudaError>),

    /// A collective failed while a trainer summed gradients.
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
}

impl From<crate::backend::cuda::CudaError> for EngineError {
    fn from(e: crate::backend::cuda::CudaError) -> Self {
        match e {
            crate::backend::cuda::CudaError::Engine(inner) => inner,
            other => EngineError::Cuda(Box::new(other)),
        }
    }
}

impl From<liandan_plan::PlanError> for EngineError {
    fn from(e: liandan_plan::PlanError) -> Self {
        use liandan_plan::PlanError as P;
        match e {
            P::InvalidConfig { field, reason } => EngineError::InvalidConfig { field, reason },
            P::Checkpoint { path, reason } => EngineError::Checkpoint { path, reason },
            P::Io { path, source } => EngineError::Io { path, source },
        }
    }
}

impl EngineError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EngineError::Checkpoint { path: path.into(), reason: reason.into() }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
