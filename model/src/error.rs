//! The model crate's error type. Every variant says what was wrong and where.

use std::path::PathBuf;

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("config {what}: {reason}")]
    Config { what: String, reason: String },

    #[error("checkpoint {path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("checkpoint {path}: unexpected tensor `{name}` (not part of this model{hint})")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        hint: String,
    },

    #[error(
        "checkpoint {path}: tensor `{name}` has shape {found:?}, the config expects {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("tokenizer {what}: {reason}")]
    Tokenizer { what: String, reason: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("image {name}: {reason}")]
    Image { name: String, reason: String },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("non-finite value: {0}")]
    NonFinite(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(reason: impl Into<String>) -> Self {
        Self::Input(reason.into())
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl From<ril_common::SamplingError> for ModelError {
    fn from(e: ril_common::SamplingError) -> Self {
        Self::Input(e.to_string())
    }
}

impl From<ril_common::fs::WriteError> for ModelError {
    fn from(e: ril_common::fs::WriteError) -> Self {
        Self::Io {
            path: e.path,
            source: e.source,
        }
    }
}
