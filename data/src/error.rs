//! The data crate's errors: each names the file, the row and the field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}, row {row}{}, field `{field}`: {reason}", id.as_ref().map(|i| format!(" (id {i})")).unwrap_or_default())]
    BadRow {
        file: PathBuf,
        row: usize,
        id: Option<String>,
        field: String,
        reason: String,
    },

    #[error("{path}: {what} not found")]
    Missing { path: PathBuf, what: String },

    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
