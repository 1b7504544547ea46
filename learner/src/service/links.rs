//! The learner's peers as the service sees them: the coordinator, the discriminator and the
//! other learner ranks, behind traits with domain types only. The gRPC clients implementing
//! them are in [`crate::client`]; tests use fakes.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::error::Result;
use crate::service::discriminator::LabelledGroup;
use crate::service::groups::IncomingGroup;

/// What identifies a group to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    pub lease_id: String,
    pub position: u64,
    pub question_id: String,
    pub iteration: u64,
}

/// The coordinator's answer to AcceptGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted,
    Refused(String),
}

/// What a rank tells the coordinator when it joins the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub rank: u32,
    /// Where actors and rank 0 reach this rank's gRPC services.
    pub addr: String,
    /// This rank's ring listener (empty: no ring).
    pub collective_addr: String,
    /// Rank 0's NCCL unique id (empty otherwise).
    pub collective_id: Vec<u8>,
    /// The policy version this rank starts from.
    pub version: u64,
}

/// The coordinator's answer to a join: ready once every rank has joined.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinReply {
    /// The coordinator's number of ranks (0: it does not say).
    pub world_size: u32,
    pub ready: bool,
    /// Every rank's gRPC address, by rank (when ready).
    pub rank_addrs: Vec<String>,
    /// Every rank's ring address, by rank; empty for a rank that has not joined yet.
    pub collective_addrs: Vec<String>,
    pub collective_id: Vec<u8>,
}

/// The coordinator RPCs the learner makes.
pub trait CoordinatorLink: Send + Sync + 'static {
    fn accept_group(&self, key: GroupKey) -> impl Future<Output = Result<Acceptance>> + Send;
    /// Hands back `position`, whose group came under `lease_id` (the call's idempotency key: a
    /// repeat after the question was re-issued changes nothing).
    fn return_question(
        &self,
        position: u64,
        lease_id: String,
        reason: String,
    ) -> impl Future<Output = Result<()>> + Send;
    fn publish_version(
        &self,
        version: u64,
        iteration: u64,
        checkpoint: Option<PathBuf>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn report_metrics(
        &self,
        iteration: u64,
        metrics: BTreeMap<String, f64>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// JoinLearner: the rank rendezvous, and the learner's first contact with the coordinator.
    fn join_learner(&self, request: JoinRequest) -> impl Future<Output = Result<JoinReply>> + Send;
}

/// The answer to one discriminator step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscriminatorStep {
    pub loss: f32,
    /// D's accuracy on the batch before the step.
    pub accuracy: f32,
    /// D's optimizer steps so far.
    pub step: u64,
    /// D did not step (frozen, or it had already trained on this iteration).
    pub skipped: bool,
}

/// The discriminator's online training: one step per learner iteration on that iteration's
/// labelled responses (RIL's mu = 1).
pub trait DiscriminatorLink: Send + Sync + 'static {
    fn train(
        &self,
        iteration: u64,
        groups: Vec<LabelledGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<DiscriminatorStep>> + Send + '_>>;
}

/// Rank 0's line to the other learner ranks: each takes its shard of an iteration (possibly
/// empty) and trains on it; its step joins rank 0's in the gradient all-reduce. Resolves with
/// the rank's new policy version once its step is done.
pub trait ShardPeers: Send + Sync + 'static {
    fn train_shard(
        &self,
        rank: u32,
        iteration: u64,
        groups: Vec<IncomingGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<u64>> + Send + '_>>;
}
