//! The learner's errors.

#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error(transparent)]
    Model(#[from] ril_model::ModelError),
    #[error(transparent)]
    Data(#[from] ril_data::DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A row the model cannot take (its id and why).
    #[error(transparent)]
    Prompt(#[from] ril_prompt::PromptError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A loss or statistic that must be finite is not; nothing was updated.
    #[error("non-finite {what}: {detail}")]
    NonFinite { what: &'static str, detail: String },
    /// A coordinator RPC failed (transport error or error status).
    #[error("coordinator {rpc} failed: {source}")]
    Coordinator {
        rpc: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// GetWeights asked for a version this learner does not hold.
    #[error(
        "policy version {requested} is not held: this learner holds version {held} only \
         (request version 0 for the current one)"
    )]
    VersionNotHeld { requested: u64, held: u64 },
    /// The learner is still loading its model or waiting for the coordinator.
    #[error("the learner is not ready: {0}")]
    NotReady(String),
    /// A training step failed earlier; the learner takes no more groups.
    #[error("the learner stopped after a failed training step: {0}")]
    Failed(String),
    /// A collective operation failed (a dead or stalled peer rank, ranks out of step).
    #[error("collective: {0}")]
    Collective(String),
    #[error("the learner is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Serve(#[from] ril_proto::server::ServeError),
}

pub type Result<T, E = LearnerError> = std::result::Result<T, E>;
