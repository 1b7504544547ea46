//! The actor's peers over gRPC: one client type per peer implementing its trait of
//! [`crate::peers`]. Every call is built in `PeerClient::request`, which sends the peer's
//! deadline as `grpc-timeout`, and awaited in `PeerClient::within`, which enforces it here too
//! (a peer that keeps its connection open and stops answering, a stopped process whose kernel
//! still accepts connections, fails the call as DEADLINE_EXCEEDED naming the peer and the call);
//! a weight transfer runs under the transfer timeout of [`crate::sync::fetch`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ril_common::SamplingParams;
use ril_data::Row;
use ril_proto::client::{self, Channel};
use ril_proto::error::RpcError;
use ril_proto::security::Security;
use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use ril_proto::v1::learner_client::LearnerClient;
use ril_proto::v1::teacher_client::TeacherClient;

use crate::actor::Peers;
use crate::convert::{self, ConvertError};
use crate::error::ActorError;
use crate::peers::{
    Coordinator, Discriminator, GroupVerdict, HeartbeatReply, Learner, LeaseCompletion, LeaseReply,
    LeaseRequest, Registration, ResponseScore, Teacher, TeacherAnswer,
};
use crate::run::ActorOptions;
use crate::sync::{self, WeightPayload};

/// A peer's role, address and per-call deadline, and how calls to it are made and their
/// failures named.
#[derive(Debug, Clone)]
struct PeerClient {
    role: &'static str,
    addr: String,
    deadline: Duration,
}

impl PeerClient {
    /// A request carrying the deadline as `grpc-timeout` (the server gives up too).
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }

    /// Awaits `reply` for at most the deadline ([`client::within`]): a call past it fails as
    /// DEADLINE_EXCEEDED naming the peer and the call.
    async fn within<T>(
        &self,
        call: &'static str,
        reply: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, ActorError> {
        client::within(self.deadline, reply)
            .await
            .map_err(|status| self.failed(call, status))
    }

    fn failed(&self, call: &'static str, status: tonic::Status) -> ActorError {
        ActorError::Rpc(RpcError::new(self.role, &self.addr, call, status))
    }

    fn bad_reply(&self, call: &'static str, source: ConvertError) -> ActorError {
        ActorError::Reply {
            peer: self.role,
            addr: self.addr.clone(),
            call,
            source,
        }
    }
}

/// The coordinator.
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    peer: PeerClient,
    client: CoordinatorClient<Channel>,
}

impl GrpcCoordinator {
    /// Connects now (the coordinator is the one address an actor is given; failing fast names it).
    /// `timeout` bounds the connection and is the deadline of every call.
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<Self, ActorError> {
        Ok(Self {
            peer: PeerClient {
                role: "coordinator",
                addr: addr.to_string(),
                deadline: timeout,
            },
            client: client::coordinator(client::connect(addr, timeout, security).await?),
        })
    }
}

impl Coordinator for GrpcCoordinator {
    async fn register(&self, actor_id: &str, device: &str) -> Result<Registration, ActorError> {
        const CALL: &str = "RegisterActor";
        let request = self.peer.request(v1::RegisterActorRequest {
            actor_id: actor_id.to_string(),
            device: device.to_string(),
        });
        let mut client = self.client.clone();
        let reply = client.register_actor(request);
        let reply = self.peer.within(CALL, reply).await?.into_inner();
        Registration::try_from(reply).map_err(|e| self.peer.bad_reply(CALL, e))
    }

    async fn heartbeat(
        &self,
        actor_id: &str,
        policy_version: Option<u64>,
    ) -> Result<HeartbeatReply, ActorError> {
        let request = self.peer.request(v1::HeartbeatRequest {
            actor_id: actor_id.to_string(),
            policy_version: policy_version.unwrap_or(0),
        });
        let mut client = self.client.clone();
        let reply = client.heartbeat(request);
        Ok(self
            .peer
            .within("Heartbeat", reply)
            .await?
            .into_inner()
            .into())
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<LeaseReply, ActorError> {
        const CALL: &str = "LeasePrompts";
        let request = self.peer.request(v1::LeasePromptsRequest::from(request));
        let mut client = self.client.clone();
        let reply = client.lease_prompts(request);
        let reply = self.peer.within(CALL, reply).await?.into_inner();
        LeaseReply::try_from(reply).map_err(|e| self.peer.bad_reply(CALL, e))
    }

    async fn complete_lease(&self, completion: &LeaseCompletion) -> Result<(), ActorError> {
        let request = self
            .peer
            .request(v1::CompleteLeaseRequest::from(completion));
        let mut client = self.client.clone();
        let reply = client.complete_lease(request);
        self.peer.within("CompleteLease", reply).await?;
        Ok(())
    }
}

/// The learner (rank 0): weights in verified chunks, scored groups.
#[derive(Debug, Clone)]
pub struct GrpcLearner {
    peer: PeerClient,
    client: LearnerClient<Channel>,
    chunk_bytes: u32,
    transfer_timeout: Duration,
    attempts: usize,
}

impl Learner for GrpcLearner {
    fn addr(&self) -> &str {
        &self.peer.addr
    }

    async fn fetch_weights(&self) -> Result<WeightPayload, ActorError> {
        let mut client = self.client.clone();
        // Version 0: whatever the learner serves now; the actor decides whether it is new enough.
        Ok(sync::fetch(
            &mut client,
            &self.peer.addr,
            0,
            self.chunk_bytes,
            self.transfer_timeout,
            self.attempts,
        )
        .await?)
    }

    async fn push_groups(
        &self,
        groups: Vec<crate::peers::ScoredGroup>,
    ) -> Result<Vec<GroupVerdict>, ActorError> {
        let request = self.peer.request(v1::PushGroupsRequest {
            groups: groups.into_iter().map(Into::into).collect(),
        });
        let mut client = self.client.clone();
        let reply = client.push_groups(request);
        let reply = self.peer.within("PushGroups", reply).await?;
        Ok(reply
            .into_inner()
            .verdicts
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

/// A teacher server.
#[derive(Debug, Clone)]
pub struct GrpcTeacher {
    peer: PeerClient,
    client: TeacherClient<Channel>,
}

impl Teacher for GrpcTeacher {
    fn addr(&self) -> &str {
        &self.peer.addr
    }

    async fn answers(
        &self,
        question: &Row,
        n: usize,
        sampling: Option<&SamplingParams>,
    ) -> Result<Vec<TeacherAnswer>, ActorError> {
        const CALL: &str = "Answer";
        let request = self
            .peer
            .request(convert::answer_request(question, n, sampling));
        let mut client = self.client.clone();
        let answers = async move {
            let mut stream = client.answer(request).await?.into_inner();
            let mut answers = Vec::with_capacity(n);
            while let Some(a) = stream.message().await? {
                answers.push(a.into());
            }
            Ok(answers)
        };
        self.peer.within(CALL, answers).await
    }
}

/// The discriminator service.
#[derive(Debug, Clone)]
pub struct GrpcDiscriminator {
    peer: PeerClient,
    client: DiscriminatorClient<Channel>,
}

impl Discriminator for GrpcDiscriminator {
    fn addr(&self) -> &str {
        &self.peer.addr
    }

    async fn score(
        &self,
        question: &Row,
        responses: &[String],
    ) -> Result<Vec<ResponseScore>, ActorError> {
        const CALL: &str = "Score";
        let request = self
            .peer
            .request(convert::score_request(question, responses));
        let mut client = self.client.clone();
        let reply = client.score(request);
        let reply = self.peer.within(CALL, reply).await?.into_inner();
        convert::scores(reply).map_err(|e| self.peer.bad_reply(CALL, e))
    }
}

/// The peers a registration names, connected lazily (each reconnects on its own after a
/// restart), beside the coordinator already connected.
pub fn connect_peers(
    coordinator: Arc<GrpcCoordinator>,
    registration: &Registration,
    opts: &ActorOptions,
) -> Result<Peers<GrpcCoordinator, GrpcLearner, GrpcDiscriminator, GrpcTeacher>, ActorError> {
    let connect = |role: &'static str, addr: &str, deadline: Duration| {
        let channel = client::connect_lazy(addr, opts.rpc_timeout, &opts.security)?;
        Ok::<_, ActorError>((
            PeerClient {
                role,
                addr: addr.to_string(),
                deadline,
            },
            channel,
        ))
    };
    let (peer, channel) = connect("learner", &registration.learner_addr, opts.push_timeout)?;
    let learner = GrpcLearner {
        peer,
        client: client::learner(channel),
        chunk_bytes: opts.weight_chunk_bytes,
        transfer_timeout: opts.weight_timeout,
        attempts: opts.weight_attempts,
    };
    let (peer, channel) = connect(
        "discriminator",
        &registration.discriminator_addr,
        opts.rpc_timeout,
    )?;
    let discriminator = GrpcDiscriminator {
        peer,
        client: client::discriminator(channel),
    };
    let teachers = registration
        .teacher_addrs
        .iter()
        .map(|addr| {
            let (peer, channel) = connect("teacher", addr, opts.teacher_timeout)?;
            Ok(GrpcTeacher {
                peer,
                client: client::teacher(channel),
            })
        })
        .collect::<Result<_, ActorError>>()?;
    Ok(Peers {
        coordinator,
        learner,
        discriminator,
        teachers,
    })
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
