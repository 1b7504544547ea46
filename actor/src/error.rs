use ril_proto::error::{RpcError, ServiceError, ServiceErrorCode};

use crate::convert::ConvertError;

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// Loading the student, generating, tokenising or applying weights.
    #[error(transparent)]
    Model(#[from] ril_model::ModelError),
    /// A question the student's chat template cannot take (boxed: it carries a model error).
    #[error(transparent)]
    Prompt(Box<ril_prompt::PromptError>),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    /// A call to a peer failed: the peer, its address, the call and the code.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// A peer answered with a reply that breaks the protocol.
    #[error("{peer} at {addr}: {call} reply: {source}")]
    Reply {
        peer: &'static str,
        addr: String,
        call: &'static str,
        #[source]
        source: ConvertError,
    },
    #[error("teacher at {addr}: sent {sent} answers, {asked} were asked for")]
    TooFewAnswers {
        addr: String,
        sent: usize,
        asked: usize,
    },
    #[error("discriminator at {addr}: {scores} scores for {responses} responses")]
    ScoreCount {
        addr: String,
        scores: usize,
        responses: usize,
    },
    #[error("learner at {addr}: serves version {served} but the lease needs {needed}")]
    StaleWeights {
        addr: String,
        served: u64,
        needed: u64,
    },
    #[error(transparent)]
    Connect(#[from] ril_proto::server::ServeError),
    /// A blocking task (loading, generating, applying weights) panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl From<ril_prompt::PromptError> for ActorError {
    fn from(e: ril_prompt::PromptError) -> Self {
        Self::Prompt(Box::new(e))
    }
}

impl ActorError {
    /// Whether a call failed because the peer is not ready yet (the coordinator before the
    /// run's learner has joined).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Rpc(e) if e.code == tonic::Code::Unavailable)
    }
}

/// The actor serves no RPCs, but its errors are classified like every role's, so a supervisor
/// (or a later RPC) reads them the same way.
impl ServiceError for ActorError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::Model(_) | Self::Task { .. } => ServiceErrorCode::Internal,
            Self::Prompt(_) => ServiceErrorCode::InvalidArgument,
            Self::Sync(_) | Self::Connect(_) => ServiceErrorCode::Unavailable,
            Self::Rpc(e) => e.kind(),
            Self::Reply { .. } | Self::TooFewAnswers { .. } | Self::ScoreCount { .. } => {
                ServiceErrorCode::Internal
            }
            Self::StaleWeights { .. } => ServiceErrorCode::DeadlineExceeded,
        }
    }
}
