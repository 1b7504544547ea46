//! The teacher's errors. Every message is complete on one line (causes are rendered into it),
//! names what was wrong and where (question id, field, endpoint, file), and never contains an API
//! key. [`TeacherError::kind`] says how the gRPC adapter reports it.

use std::path::PathBuf;

use ril_model::ModelError;

/// How an error is reported to a client: the adapter maps each to a gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// The backend has no answer for the question (`NOT_FOUND`).
    NotFound,
    /// Try again later: still loading, shutting down, or the endpoint is down (`UNAVAILABLE`).
    Unavailable,
    /// A fault of this server or of its backend that asking again will not fix (`INTERNAL`).
    Internal,
}

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

    /// An OpenAI-compatible endpoint answered with an error status that asking again will not
    /// fix (bad key, unknown model, prompt too long), or an unreadable reply.
    #[error("teacher endpoint {endpoint} {detail}")]
    Endpoint { endpoint: String, detail: String },

    /// An OpenAI-compatible endpoint kept failing transiently (connect errors, timeouts, 429,
    /// 5xx) until the retries ran out.
    #[error(
        "teacher endpoint {endpoint} unreachable after {attempts} attempt{}; last error: {last_error}",
        if *.attempts == 1 { "" } else { "s" }
    )]
    Unreachable {
        endpoint: String,
        attempts: u32,
        last_error: String,
    },

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

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument { .. } | Self::BadQuestion { .. } => ErrorKind::InvalidArgument,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Loading { .. } | Self::ShuttingDown(_) | Self::Unreachable { .. } => {
                ErrorKind::Unavailable
            }
            Self::Endpoint { .. }
            | Self::Config { .. }
            | Self::Load { .. }
            | Self::Model { .. }
            | Self::Cache { .. }
            | Self::Serve(_)
            | Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// `error: cause: cause`, for messages that must name the root problem on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    ril_proto::error::source_chain(e)
}
