//! The learner's errors.

#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error(transparent)]
    Model(#[from] ril_model::ModelError),
    #[error(transparent)]
    Data(#[from] ril_data::DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("row {id}: {source}")]
    Row {
        id: String,
        #[source]
        source: ril_model::ModelError,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = LearnerError> = std::result::Result<T, E>;
