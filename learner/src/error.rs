//! The learner's errors, and their kinds at the RPC edge ([`ServiceError`]).

use std::sync::Arc;

use ril_proto::error::{RpcError, ServiceError, ServiceErrorCode};

use crate::service::Rejection;

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
    /// A checkpoint file, the metrics log or another file could not be written (atomically).
    #[error(transparent)]
    Write(#[from] ril_common::fs::WriteError),
    /// Settings or an input that are wrong, with what and where.
    #[error("{0}")]
    Invalid(String),
    /// The device setting (`key`) is not a device string, or names a device this build or
    /// machine cannot open. (The error's text is the message, so it is not also the source.)
    #[error("{key}: {error}")]
    Device {
        key: &'static str,
        error: ril_model::DeviceError,
    },
    /// A loss or statistic that must be finite is not; nothing was updated.
    #[error("non-finite {what}: {detail}")]
    NonFinite { what: &'static str, detail: String },
    /// A coordinator RPC failed (transport error or error status).
    #[error(transparent)]
    Coordinator(RpcError),
    /// The discriminator's Train call failed.
    #[error(transparent)]
    Discriminator(RpcError),
    /// Rank 0's TrainShard call to another rank failed.
    #[error("learner rank {rank}, iteration {iteration}: {source}")]
    PeerRank {
        rank: u32,
        iteration: u64,
        #[source]
        source: RpcError,
    },
    /// The coordinator's rendezvous answer does not fit this learner's settings.
    #[error("{0}")]
    Rendezvous(String),
    /// GetWeights asked for a version this learner does not hold.
    #[error(
        "policy version {requested} is not held: this learner holds version {held} only \
         (request version 0 for the current one)"
    )]
    VersionNotHeld { requested: u64, held: u64 },
    /// The learner is still loading its model or waiting for the coordinator.
    #[error("the learner is not ready: {0}")]
    NotReady(String),
    /// A training step failed earlier (the error it failed with); the learner takes no more
    /// groups.
    #[error("the learner stopped after a failed training step: {0}")]
    Stopped(Arc<LearnerError>),
    /// A thread of the learner panicked while it held the trainer.
    #[error("a learner thread panicked while holding the trainer")]
    TrainerPoisoned,
    /// A task the learner ran on another thread failed (panicked or was cancelled).
    #[error("{task} failed: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A collective operation failed (a dead or stalled peer rank, ranks out of step).
    #[error("collective: {0}")]
    Collective(String),
    /// PushGroups reached a rank other than 0 (only rank 0 takes groups).
    #[error("this is learner rank {rank}: push to rank 0 at {}", rank0_addr.as_deref().unwrap_or("(unknown)"))]
    NotRankZero {
        rank: u32,
        rank0_addr: Option<String>,
    },
    /// PushGroups without groups (actors push only when they have some).
    #[error("PushGroups: field `groups`: no groups (push at least one scored group)")]
    NoGroups,
    /// TrainShard reached rank 0 (rank 0 sends shards, it does not take them).
    #[error("TrainShard goes to learner ranks > 0; this is rank 0")]
    ShardToRankZero,
    /// A shard arrived while this rank was training.
    #[error("iteration {iteration} is already training on this rank")]
    ShardWhileTraining { iteration: u64 },
    /// A shard of another iteration than the one this rank is at.
    #[error(
        "a shard of iteration {iteration}, but this rank is at iteration {rank_iteration} \
         (version {version})"
    )]
    ShardOutOfStep {
        iteration: u64,
        rank_iteration: u64,
        version: u64,
    },
    /// A TrainShard group that does not convert from the wire.
    #[error("TrainShard: {0}")]
    MalformedShard(Rejection),
    /// A group rank 0 accepted that this rank's model refuses (the ranks disagree).
    #[error("learner rank {rank} refuses a group of its shard: {source}")]
    ShardRejected {
        rank: u32,
        #[source]
        source: Rejection,
    },
    /// A buffered group that should have kept its wire form for another rank did not.
    #[error("group at position {position} was buffered without its wire form")]
    ShardFormMissing { position: u64 },
    #[error("the learner is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Serve(#[from] ril_proto::server::ServeError),
}

impl LearnerError {
    /// The failure of the thread that ran `task` (a panic, or a cancelled task), as
    /// [`LearnerError::Task`]: for `spawn_blocking(...).await.map_err(LearnerError::task(..))`.
    pub(crate) fn task(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Self {
        move |source| Self::Task { task, source }
    }
}

impl ServiceError for LearnerError {
    fn error_code(&self) -> ServiceErrorCode {
        match self {
            Self::Invalid(_)
            | Self::Device { .. }
            | Self::Data(_)
            | Self::Prompt(_)
            | Self::NoGroups => ServiceErrorCode::InvalidArgument,
            Self::MalformedShard(_) => ServiceErrorCode::InvalidArgument,
            Self::VersionNotHeld { .. }
            | Self::NotRankZero { .. }
            | Self::ShardToRankZero
            | Self::ShardWhileTraining { .. }
            | Self::ShardOutOfStep { .. }
            | Self::ShardRejected { .. }
            | Self::Rendezvous(_) => ServiceErrorCode::FailedPrecondition,
            Self::NotReady(_) | Self::ShuttingDown => ServiceErrorCode::Unavailable,
            // A peer that failed: asking again later may work.
            Self::Coordinator(_) | Self::Discriminator(_) | Self::PeerRank { .. } => {
                ServiceErrorCode::Unavailable
            }
            // The step failed (on every rank alike for a collective failure): the learner
            // stops and takes nothing more until it is restarted from its checkpoint.
            Self::Stopped(_)
            | Self::NonFinite { .. }
            | Self::Collective(_)
            | Self::TrainerPoisoned => ServiceErrorCode::Aborted,
            Self::Model(_)
            | Self::Tensor(_)
            | Self::Io { .. }
            | Self::Write(_)
            | Self::Task { .. }
            | Self::ShardFormMissing { .. }
            | Self::Serve(_) => ServiceErrorCode::Internal,
        }
    }
}

pub type Result<T, E = LearnerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes clients act on: a learner stopped by a failed step is ABORTED (do not retry),
    /// one still loading is UNAVAILABLE (retry), a bad request INVALID_ARGUMENT, a request that
    /// does not fit the learner's state FAILED_PRECONDITION.
    #[test]
    fn each_kind_of_failure_has_its_code() {
        let cases: Vec<(LearnerError, tonic::Code)> = vec![
            (
                LearnerError::Stopped(Arc::new(LearnerError::NonFinite {
                    what: "loss",
                    detail: "NaN".into(),
                })),
                tonic::Code::Aborted,
            ),
            (
                LearnerError::NotReady("loading".into()),
                tonic::Code::Unavailable,
            ),
            (LearnerError::ShuttingDown, tonic::Code::Unavailable),
            (LearnerError::NoGroups, tonic::Code::InvalidArgument),
            (
                LearnerError::MalformedShard(Rejection::new(3, "question", "missing")),
                tonic::Code::InvalidArgument,
            ),
            (
                LearnerError::VersionNotHeld {
                    requested: 7,
                    held: 1,
                },
                tonic::Code::FailedPrecondition,
            ),
            (
                LearnerError::NotRankZero {
                    rank: 1,
                    rank0_addr: Some("10.0.0.1:50054".into()),
                },
                tonic::Code::FailedPrecondition,
            ),
            (
                LearnerError::ShardToRankZero,
                tonic::Code::FailedPrecondition,
            ),
            (
                LearnerError::ShardOutOfStep {
                    iteration: 2,
                    rank_iteration: 1,
                    version: 1,
                },
                tonic::Code::FailedPrecondition,
            ),
            (LearnerError::TrainerPoisoned, tonic::Code::Aborted),
            (
                LearnerError::Coordinator(RpcError::new(
                    "coordinator",
                    "c:1",
                    "AcceptGroup",
                    tonic::Status::unavailable("down"),
                )),
                tonic::Code::Unavailable,
            ),
            (
                LearnerError::ShardFormMissing { position: 4 },
                tonic::Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = ril_proto::error::status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert!(status.message().contains(&error.to_string()), "{status:?}");
        }
        let pointed = LearnerError::NotRankZero {
            rank: 1,
            rank0_addr: Some("10.0.0.1:50054".into()),
        };
        assert_eq!(
            pointed.to_string(),
            "this is learner rank 1: push to rank 0 at 10.0.0.1:50054"
        );
    }
}
