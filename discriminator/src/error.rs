//! The discriminator crate's error type. Every variant says what was wrong and where; its
//! [`ServiceError`] kind is how the gRPC adapter reports it (`ril_proto::error::status`).

use std::path::PathBuf;

use ril_model::ModelError;
use ril_openai::OpenAiError;
use ril_proto::{RpcError, ServiceError, ServiceErrorCode};

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

    /// `discriminator.device` is not a device string, or names a device this build or machine
    /// cannot open. (The error's text is the message, so it is not also the source.)
    #[error("discriminator.device: {error}")]
    Device { error: ril_model::DeviceError },

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

    /// A checkpoint file or directory could not be written (atomically: what was there is
    /// intact).
    #[error(transparent)]
    Write(#[from] ril_common::fs::WriteError),

    #[error("discriminator checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A teacher server failed to answer a question (pre-training asks them for answers).
    #[error("question {question:?}: {source}")]
    Teacher {
        question: String,
        #[source]
        source: RpcError,
    },

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

impl ServiceError for DiscriminatorError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::InvalidRequest { .. } | Self::Question { .. } => {
                ServiceErrorCode::InvalidArgument
            }
            Self::NotReady(_) => ServiceErrorCode::Unavailable,
            Self::Config { .. } | Self::Device { .. } => ServiceErrorCode::FailedPrecondition,
            Self::Judge(e) => match e {
                JudgeError::InvalidConfig { .. } => ServiceErrorCode::FailedPrecondition,
                JudgeError::Client(e) => match e {
                    OpenAiError::InvalidConfig(_) | OpenAiError::ClientBuild { .. } => {
                        ServiceErrorCode::FailedPrecondition
                    }
                    // The judge is down, overloaded or garbled its reply: asking again later
                    // may work.
                    OpenAiError::Transport { .. }
                    | OpenAiError::Http { .. }
                    | OpenAiError::Unreachable { .. }
                    | OpenAiError::Unparseable { .. } => ServiceErrorCode::Unavailable,
                },
            },
            Self::Teacher { .. } => ServiceErrorCode::Unavailable,
            Self::NonFiniteLoss { .. }
            | Self::Model(_)
            | Self::Io { .. }
            | Self::Write(_)
            | Self::Checkpoint { .. }
            | Self::Data(_)
            | Self::Serve(_)
            | Self::Task(_) => ServiceErrorCode::Internal,
        }
    }
}

pub type Result<T, E = DiscriminatorError> = std::result::Result<T, E>;

impl From<candle_core::Error> for DiscriminatorError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Tensor(e))
    }
}
