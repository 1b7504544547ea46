//! The teacher's errors. Every message is complete on one line (causes are rendered into it),
//! names what was wrong and where (question id, field, endpoint, file), and never contains an API
//! key. Its [`ServiceError`] kind says how the gRPC adapter reports it
//! (`ril_proto::error::status`).

use std::path::PathBuf;

use ril_model::ModelError;
use ril_openai::OpenAiError;
use ril_proto::{ServiceError, ServiceErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// A request field (`n`, `sampling.top_p`, `question.messages`, ...) is invalid.
    #[error("invalid request: `{field}` {reason}")]
    InvalidArgument { field: String, reason: String },

    /// A question whose content the model cannot take (an undecodable image, a prompt longer
    /// than the model's context): rejected with its id.
    #[error("question {id:?}: {reason}")]
    BadQuestion { id: String, reason: String },

    /// The replay backend has no (or too few) answers for the question.
    #[error("no replay answers for question {id:?} from teacher {teacher:?}: {reason}")]
    NotFound {
        id: String,
        teacher: String,
        reason: String,
    },

    /// A `TeacherOptions` field is invalid (reported when the server starts).
    #[error("invalid teacher config: `{field}` {reason}")]
    Config { field: String, reason: String },

    /// The candle backend's `device` is not a device string, or names a device this build or
    /// machine cannot open. (The error's text is the message, so it is not also the source.)
    #[error("invalid teacher config: `device`: {error}")]
    Device { error: ril_model::DeviceError },

    /// The backend could not be loaded (checkpoint, replay file, HTTP client).
    #[error("cannot load the {backend} backend from {what}: {reason}")]
    Load {
        backend: &'static str,
        what: String,
        reason: String,
    },

    /// The server is still loading its backend.
    #[error("teacher {name:?} is still loading its backend")]
    Loading { name: String },

    /// The server is shutting down, or its generation worker stopped.
    #[error("teacher is shutting down: {0}")]
    ShuttingDown(String),

    /// An OpenAI-compatible endpoint refused the request (bad key, unknown model, prompt too
    /// long), gave an unreadable reply, or kept failing transiently (connect errors, timeouts,
    /// 429, 5xx) until the retries ran out.
    #[error("teacher endpoint {0}")]
    Endpoint(#[from] OpenAiError),

    /// Generation failed inside the model.
    #[error("generation failed for question {id:?}: {source}")]
    Model {
        id: String,
        #[source]
        source: ModelError,
    },

    /// The answer cache failed.
    #[error("answer cache {}: {reason}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(in memory)".into()))]
    Cache {
        path: Option<PathBuf>,
        reason: String,
    },

    /// Binding or running the gRPC server failed.
    #[error(transparent)]
    Serve(#[from] ril_proto::server::ServeError),

    /// A fault of this server that none of the above describes.
    #[error("internal error: {0}")]
    Internal(String),
}

impl TeacherError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A model error for question `id`: bad input (an image that does not decode, a prompt that
    /// does not fit) is the question's fault, anything else the server's.
    pub(crate) fn model(id: &str, source: ModelError) -> Self {
        match source {
            ModelError::Image { .. } | ModelError::Input(_) | ModelError::Template(_) => {
                Self::BadQuestion {
                    id: id.to_string(),
                    reason: source.to_string(),
                }
            }
            source => Self::Model {
                id: id.to_string(),
                source,
            },
        }
    }
}

impl ServiceError for TeacherError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::InvalidArgument { .. } | Self::BadQuestion { .. } => {
                ServiceErrorCode::InvalidArgument
            }
            Self::NotFound { .. } => ServiceErrorCode::NotFound,
            Self::Loading { .. } | Self::ShuttingDown(_) => ServiceErrorCode::Unavailable,
            // Down or overloaded: asking again later can work. A refusal or a garbled reply
            // would come again.
            Self::Endpoint(e) => match e {
                OpenAiError::Unreachable { .. } | OpenAiError::Transport { .. } => {
                    ServiceErrorCode::Unavailable
                }
                OpenAiError::InvalidConfig(_)
                | OpenAiError::ClientBuild { .. }
                | OpenAiError::Http { .. }
                | OpenAiError::Unparseable { .. } => ServiceErrorCode::Internal,
            },
            Self::Config { .. }
            | Self::Device { .. }
            | Self::Load { .. }
            | Self::Model { .. }
            | Self::Cache { .. }
            | Self::Serve(_)
            | Self::Internal(_) => ServiceErrorCode::Internal,
        }
    }
}

/// `error: cause: cause`, for messages that must name the root problem on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    ril_proto::error::source_chain(e)
}
