//! The coordinator's errors. Request errors name the field that was wrong; dataset and state
//! errors name the file. Their [`ServiceError`] kind is how the gRPC adapter reports them
//! (`ril_proto::error::status`).

use std::path::PathBuf;

use ril_proto::{ServiceError, ServiceErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is missing or out of range (gRPC `INVALID_ARGUMENT`).
    #[error("field `{field}`: {problem}")]
    InvalidArgument {
        field: &'static str,
        problem: String,
    },

    /// The request is well-formed but the run's state does not allow it (gRPC
    /// `FAILED_PRECONDITION`), e.g. publishing a version out of order.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The caller may not make this request (gRPC `PERMISSION_DENIED`), e.g. a learner rank
    /// other than rank 0 publishing a version.
    #[error("{0}")]
    PermissionDenied(String),

    /// Not ready for this request yet; retry (gRPC `UNAVAILABLE`), e.g. an actor registering
    /// before the learner has joined.
    #[error("{0}")]
    Unavailable(String),

    /// The options are inconsistent (a setting named in the message).
    #[error("coordinator options: {0}")]
    Options(String),

    /// The dataset cannot be opened or read.
    #[error("dataset {path}: {source}")]
    Dataset {
        path: PathBuf,
        #[source]
        source: Box<ril_data::DataError>,
    },

    /// The dataset opened but cannot drive a run (no usable rows, changed under us, ...).
    #[error("dataset {path}: {problem}")]
    DatasetInvalid { path: PathBuf, problem: String },

    /// The state file belongs to another run or cannot be read.
    #[error("state file {path}: {problem}")]
    State { path: PathBuf, problem: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The state file could not be written (atomically: the previous one is intact).
    #[error(transparent)]
    Write(#[from] ril_common::fs::WriteError),

    #[error(transparent)]
    Serve(#[from] ril_proto::server::ServeError),

    /// The progress watchdog: the run made no progress for the stall limit. The message says
    /// for how long and what it was waiting for (the role and the call).
    #[error("the run stalled: {0}")]
    Stalled(String),

    /// A background task failed (a panic in a blocking task, a closed channel).
    #[error("internal: {0}")]
    Internal(String),
}

impl CoordinatorError {
    pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }

    pub(crate) fn dataset(path: impl Into<PathBuf>, source: ril_data::DataError) -> Self {
        Self::Dataset {
            path: path.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl ServiceError for CoordinatorError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::InvalidArgument { .. } => ServiceErrorCode::InvalidArgument,
            Self::FailedPrecondition(_) | Self::Stalled(_) => ServiceErrorCode::FailedPrecondition,
            Self::PermissionDenied(_) => ServiceErrorCode::PermissionDenied,
            // The state file could not be written (a full disk, a read-only volume): the change
            // was rolled back, so asking again later is safe, and callers do until their
            // deadlines, then stop naming the coordinator and the call.
            Self::Unavailable(_) | Self::Write(_) => ServiceErrorCode::Unavailable,
            Self::Options(_)
            | Self::Dataset { .. }
            | Self::DatasetInvalid { .. }
            | Self::State { .. }
            | Self::Io { .. }
            | Self::Serve(_)
            | Self::Internal(_) => ServiceErrorCode::Internal,
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
