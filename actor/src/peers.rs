//! The actor's peers as traits over domain types: the coordinator, the learner, the teachers and
//! the discriminator. The gRPC clients implementing them live in [`crate::grpc`] (every call in
//! one place, with the wire conversions of [`crate::convert`] behind it); tests put in-process
//! fakes in their place.
//!
//! A peer that fails returns [`ActorError::Rpc`] (the peer, its address, the call and the code)
//! or [`ActorError::Reply`] (an answer that broke the protocol, naming the field). What the
//! actor checks across calls (enough teacher answers, one score per response, a new enough
//! version) it checks itself, in [`crate::actor`], so that every implementation gets the same
//! rules.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ril_common::SamplingParams;
use ril_data::Row;

use crate::convert::ConvertError;
use crate::error::ActorError;
use crate::sync::WeightPayload;

/// What the coordinator answers an actor that joins: the run's peers and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub run_id: String,
    pub learner_addr: String,
    pub discriminator_addr: String,
    /// In the run config's `[[teachers]]` order (slots are shared round-robin in this order).
    pub teacher_addrs: Vec<String>,
    pub settings: RolloutSettings,
}

/// How every group of the run is rolled out: read once, at registration.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSettings {
    /// G: student responses per question (at least 1).
    pub group_size: usize,
    /// Teacher answers per group, shared round-robin across the teachers.
    pub teacher_slots: usize,
    /// How the student samples (validated).
    pub student_sampling: SamplingParams,
    /// How teachers are asked to sample; `None`: each teacher server's own settings.
    pub teacher_sampling: Option<SamplingParams>,
    pub heartbeat_interval: Duration,
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// False after the coordinator forgot this actor (e.g. it restarted): register again.
    pub known: bool,
    pub run_finished: bool,
}

/// A request for questions to roll out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub actor_id: String,
    pub max_questions: u32,
    /// The version this actor samples with; `None` before its first weights.
    pub policy_version: Option<u64>,
    /// New for each lease asked for, the same when the request is repeated after a failure
    /// whose outcome is unknown: the coordinator answers a repeat with the same lease.
    pub request_id: String,
}

/// The coordinator's answer to a lease request.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseReply {
    /// The run is over: stop.
    Finished,
    /// Nothing may be leased now (on-policy runs wait for the learner's next version).
    Wait {
        retry_after: Duration,
    },
    Granted(Lease),
}

/// Questions leased to this actor, to be rolled out with at least `policy_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub lease_id: String,
    pub policy_version: u64,
    pub items: Vec<LeaseItem>,
    /// Positions whose question could not be read; they go back to the coordinator with the
    /// lease's completion (as a question that fails its rollout does), not the whole lease.
    pub unreadable: Vec<UnreadableItem>,
}

impl Lease {
    /// Every position of the lease, in the order they were leased.
    pub fn positions(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.items.iter().map(|i| i.position).collect();
        all.extend(self.unreadable.iter().map(|u| u.position));
        all
    }
}

/// One question of a lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseItem {
    /// Position in the run's question stream; unique per run.
    pub position: u64,
    /// The learner iteration this question belongs to.
    pub iteration: u64,
    pub question: Row,
}

/// A leased position whose question broke the protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableItem {
    pub position: u64,
    pub error: ConvertError,
}

/// The actor is done with a lease: its groups were pushed, `returned_positions` go back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCompletion {
    pub actor_id: String,
    pub lease_id: String,
    pub returned_positions: Vec<u64>,
    /// Why they came back (the failures, naming the peers).
    pub reason: String,
}

/// One answer of a teacher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeacherAnswer {
    /// The teacher's name, as it reports it.
    pub teacher: String,
    /// 0..n-1: the i-th answer for a question is always the same text.
    pub index: u32,
    pub text: String,
}

/// The discriminator's verdict on one response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResponseScore {
    /// D's probability, in [0, 1], that the response came from the student.
    pub d_prob: f32,
    /// The judge's answer score, in [0, 1].
    pub answer_score: f32,
}

/// Who wrote a response of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseSource {
    Student,
    Teacher { name: String },
}

/// One response of a scored group, with its rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredResponse {
    pub source: ResponseSource,
    pub text: String,
    /// Under the student's tokenizer (teacher answers re-tokenised by the actor).
    pub token_ids: Vec<u32>,
    /// Per token; empty for teacher answers.
    pub behaviour_logprobs: Vec<f32>,
    pub policy_version: u64,
    pub d_prob: f32,
    pub r_sim: f32,
    pub r_ans: f32,
    /// Generation stopped at `max_new_tokens`.
    pub truncated: bool,
}

/// A question's G student responses and its teacher answers, scored, for the learner.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredGroup {
    pub lease_id: String,
    pub position: u64,
    pub iteration: u64,
    pub question: Row,
    /// The prompt as the actor tokenised it (image placeholders expanded).
    pub prompt_token_ids: Vec<u32>,
    /// The G student responses first, then the teacher answers in slot order.
    pub responses: Vec<ScoredResponse>,
    pub actor_id: String,
    /// Milliseconds per phase of this group (generation, teacher, scoring): the learner's
    /// iteration breakdown reads them.
    pub timings_ms: BTreeMap<String, f64>,
}

/// The learner's verdict on one pushed group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupVerdict {
    pub position: u64,
    /// `None`: accepted; otherwise why it was refused.
    pub refused: Option<String>,
}

/// The run's control plane, as the actor uses it.
pub trait Coordinator: Send + Sync + 'static {
    /// Joins the run. While the run's peers are still joining, this fails with an
    /// [`ActorError::Rpc`] of code `Unavailable`.
    fn register(
        &self,
        actor_id: &str,
        device: &str,
    ) -> impl Future<Output = Result<Registration, ActorError>> + Send;
    fn heartbeat(
        &self,
        actor_id: &str,
        policy_version: Option<u64>,
    ) -> impl Future<Output = Result<HeartbeatReply, ActorError>> + Send;
    fn lease(
        &self,
        request: &LeaseRequest,
    ) -> impl Future<Output = Result<LeaseReply, ActorError>> + Send;
    fn complete_lease(
        &self,
        completion: &LeaseCompletion,
    ) -> impl Future<Output = Result<(), ActorError>> + Send;
}

/// The learner: its weights, and where scored groups go.
pub trait Learner: Send + Sync {
    /// Where it is, for error messages.
    fn addr(&self) -> &str;
    /// Its current weights, verified (a version is applied whole or not at all).
    fn fetch_weights(&self) -> impl Future<Output = Result<WeightPayload, ActorError>> + Send;
    /// One verdict per group.
    fn push_groups(
        &self,
        groups: Vec<ScoredGroup>,
    ) -> impl Future<Output = Result<Vec<GroupVerdict>, ActorError>> + Send;
}

/// A teacher server.
pub trait Teacher: Send + Sync {
    fn addr(&self) -> &str;
    /// Its answers `0..n` to `question` (in any order; the actor checks that `n` came).
    fn answers(
        &self,
        question: &Row,
        n: usize,
        sampling: Option<&SamplingParams>,
    ) -> impl Future<Output = Result<Vec<TeacherAnswer>, ActorError>> + Send;
}

/// The discriminator service (D and the judge).
pub trait Discriminator: Send + Sync {
    fn addr(&self) -> &str;
    /// One score per response, in order (the actor checks the count).
    fn score(
        &self,
        question: &Row,
        responses: &[String],
    ) -> impl Future<Output = Result<Vec<ResponseScore>, ActorError>> + Send;
}
