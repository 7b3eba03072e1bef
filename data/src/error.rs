//! The data pipeline's error type: every variant names the file (and line, field) at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A bad line of a line-oriented file (JSONL), 1-based.
    #[error("{}:{line}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, reason: String },

    /// A file that is wrong as a whole (bad magic, checksum, format).
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },

    /// Inputs that yield nothing (an empty file list, a glob that matches nothing).
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },

    /// The run was asked to stop (a data phase whose generation ended); not a failure.
    #[error("stopped")]
    Stopped,

    /// A setting out of range.
    #[error("invalid setting {field}: {reason}")]
    Config { field: &'static str, reason: String },
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::File { path: path.into(), reason: reason.into() }
    }

    pub fn line(path: impl Into<PathBuf>, line: usize, reason: impl Into<String>) -> Self {
        DataError::Line { path: path.into(), line, reason: reason.into() }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
