//! The discriminator crate's error type. Every variant says what was wrong and where; the gRPC
//! adapter maps them to status codes through one table (`grpc::status`).

use std::path::PathBuf;

use ril_model::ModelError;

use crate::judge::JudgeError;

#[derive(Debug, thiserror::Error)]
pub enum DiscriminatorError {
    /// A request that can never succeed as sent: the field is named as the proto spells it
    /// (`responses`, `items[3].question`).
    #[error("invalid request: field `{field}`: {problem}")]
    InvalidRequest { field: String, problem: String },

    /// A question the model cannot take (an image that does not decode, a prompt longer than
    /// the model's context).
    #[error("question {id:?}: {source}")]
    Question {
        id: String,
        #[source]
        source: ModelError,
    },

    #[error("invalid discriminator config: `{field}` {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },

    /// The loss of a training step was NaN or infinite: the step was refused before any weight
    /// or optimizer moment changed.
    #[error(
        "discriminator loss is {loss} at step {step}: the step was refused and the weights are \
         unchanged (lower `lr` or check the inputs)"
    )]
    NonFiniteLoss { loss: f32, step: u64 },

    #[error(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    Judge(#[from] JudgeError),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("discriminator checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("teacher {addr}: {detail}")]
    Teacher { addr: String, detail: String },

    #[error(transparent)]
    Data(#[from] ril_data::DataError),

    #[error(transparent)]
    Serve(#[from] ril_proto::server::ServeError),

    /// The model is still loading or the judge has not answered yet.
    #[error("the discriminator is not ready yet: {0}")]
    NotReady(&'static str),

    /// A blocking model task panicked or was cancelled.
    #[error("discriminator task failed: {0}")]
    Task(String),
}

impl DiscriminatorError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn config(field: &'static str, problem: impl Into<String>) -> Self {
        Self::Config {
            field,
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = DiscriminatorError> = std::result::Result<T, E>;

impl From<candle_core::Error> for DiscriminatorError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Tensor(e))
    }
}
