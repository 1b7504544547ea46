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
    /// A coordinator call whose outcome stayed unknown (unreachable, deadlines, broken
    /// connections) for `[actors] coordinator_deadline_ms`, asked again all along.
    #[error(
        "coordinator: {call} got no answer for {waited_s} s ({attempts} attempts; [actors] \
         coordinator_deadline_ms); the last failure: {last}"
    )]
    CoordinatorGaveUp {
        call: &'static str,
        waited_s: u64,
        attempts: u32,
        #[source]
        last: Box<ActorError>,
    },
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

    /// Whether the learner's weights could not be had for now (unreachable, a transfer that
    /// broke or timed out, a version not served yet): the lease goes back and the actor tries
    /// again, e.g. while the learner restarts.
    pub fn weights_unavailable(&self) -> bool {
        match self {
            Self::Sync(
                crate::sync::SyncError::Transport(_) | crate::sync::SyncError::Timeout { .. },
            )
            | Self::StaleWeights { .. } => true,
            Self::Rpc(e) => e.outcome_unknown(),
            _ => false,
        }
    }

    /// Whether a call may or may not have taken effect (see [`RpcError::outcome_unknown`]).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Rpc(e) if e.outcome_unknown())
    }
}

/// The actor serves no RPCs, but its errors are classified like every role's, so a supervisor
/// (or a later RPC) reads them the same way.
impl ServiceError for ActorError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::Model(_) | Self::Task { .. } => ServiceErrorCode::Internal,
            Self::Prompt(_) => ServiceErrorCode::InvalidArgument,
            Self::Sync(_) | Self::Connect(_) | Self::CoordinatorGaveUp { .. } => {
                ServiceErrorCode::Unavailable
            }
            Self::Rpc(e) => e.kind(),
            Self::Reply { .. } | Self::TooFewAnswers { .. } | Self::ScoreCount { .. } => {
                ServiceErrorCode::Internal
            }
            Self::StaleWeights { .. } => ServiceErrorCode::DeadlineExceeded,
        }
    }
}
