//! The learner's gRPC clients, behind the service's link traits: the coordinator
//! ([`GrpcCoordinator`]), the discriminator ([`GrpcDiscriminator`]) and the other learner ranks
//! ([`GrpcPeers`]). Every call has a deadline; a failed call is an [`RpcError`] naming the peer,
//! its address and the call.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use ril_proto::client::Channel;
use ril_proto::error::RpcError;
use ril_proto::security::Security;
use ril_proto::v1 as pb;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use ril_proto::v1::learner_ranks_client::LearnerRanksClient;
use tonic::{Request, Status};

use crate::error::{LearnerError, Result};
use crate::service::{
    Acceptance, CoordinatorLink, DiscriminatorLink, DiscriminatorStep, GroupKey, IncomingGroup,
    JoinReply, JoinRequest, LabelledGroup, ShardPeers,
};

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(timeout);
    r
}

/// 32 random bytes, fresh for every learner process.
fn new_publisher_key() -> Bytes {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    Bytes::copy_from_slice(&key)
}

/// The coordinator's gRPC client as the learner's [`CoordinatorLink`].
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    client: CoordinatorClient<Channel>,
    addr: String,
    timeout: Duration,
    /// This process's publisher key: rank 0 joins with it, and the coordinator takes
    /// AcceptGroup and PublishVersion only with it (JoinLearnerRequest.publisher_key).
    publisher_key: Bytes,
}

impl GrpcCoordinator {
    /// A client that connects on first use (and reconnects after a coordinator restart).
    pub fn connect_lazy(addr: &str, timeout: Duration, security: &Security) -> Result<Self> {
        let channel = ril_proto::client::connect_lazy(addr, timeout, security)?;
        Ok(Self {
            client: ril_proto::client::coordinator(channel),
            addr: addr.to_string(),
            timeout,
            publisher_key: new_publisher_key(),
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        with_timeout(message, self.timeout)
    }

    fn failed(&self, call: &'static str) -> impl FnOnce(Status) -> LearnerError + '_ {
        move |status| {
            LearnerError::Coordinator(RpcError::new("coordinator", &self.addr, call, status))
        }
    }
}

impl CoordinatorLink for GrpcCoordinator {
    async fn accept_group(&self, key: GroupKey) -> Result<Acceptance> {
        let req = self.request(pb::AcceptGroupRequest {
            lease_id: key.lease_id,
            position: key.position,
            question_id: key.question_id,
            iteration: key.iteration,
            publisher_key: self.publisher_key.clone(),
        });
        let reply = self
            .client
            .clone()
            .accept_group(req)
            .await
            .map_err(self.failed("AcceptGroup"))?
            .into_inner();
        Ok(if reply.accepted {
            Acceptance::Accepted
        } else {
            Acceptance::Refused(reply.reason)
        })
    }

    async fn return_question(&self, position: u64, reason: String) -> Result<()> {
        let req = self.request(pb::ReturnQuestionRequest { position, reason });
        self.client
            .clone()
            .return_question(req)
            .await
            .map(|_| ())
            .map_err(self.failed("ReturnQuestion"))
    }

    async fn publish_version(
        &self,
        version: u64,
        iteration: u64,
        checkpoint: Option<PathBuf>,
    ) -> Result<()> {
        let req = self.request(pb::PublishVersionRequest {
            version,
            iteration,
            checkpoint: checkpoint
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            publisher_key: self.publisher_key.clone(),
        });
        self.client
            .clone()
            .publish_version(req)
            .await
            .map(|_| ())
            .map_err(self.failed("PublishVersion"))
    }

    async fn report_metrics(&self, iteration: u64, metrics: BTreeMap<String, f64>) -> Result<()> {
        let req = self.request(pb::ReportMetricsRequest {
            iteration,
            metrics: metrics.into_iter().collect(),
        });
        self.client
            .clone()
            .report_metrics(req)
            .await
            .map(|_| ())
            .map_err(self.failed("ReportMetrics"))
    }

    async fn join_learner(&self, request: JoinRequest) -> Result<JoinReply> {
        let req = self.request(pb::JoinLearnerRequest {
            rank: request.rank,
            addr: request.addr,
            collective_id: Bytes::from(request.collective_id),
            collective_addr: request.collective_addr,
            version: request.version,
            publisher_key: if request.rank == 0 {
                self.publisher_key.clone()
            } else {
                Bytes::new()
            },
        });
        self.client
            .clone()
            .join_learner(req)
            .await
            .map(|r| JoinReply::from(r.into_inner()))
            .map_err(self.failed("JoinLearner"))
    }
}

/// The discriminator service's Train call as the learner's [`DiscriminatorLink`].
#[derive(Debug, Clone)]
pub struct GrpcDiscriminator {
    client: DiscriminatorClient<Channel>,
    addr: String,
    timeout: Duration,
}

impl GrpcDiscriminator {
    /// `timeout` bounds a whole Train call (D's step included).
    pub fn connect_lazy(addr: &str, timeout: Duration, security: &Security) -> Result<Self> {
        let channel = ril_proto::client::connect_lazy(addr, timeout, security)?;
        Ok(Self {
            client: ril_proto::client::discriminator(channel),
            addr: addr.to_string(),
            timeout,
        })
    }
}

impl DiscriminatorLink for GrpcDiscriminator {
    fn train(
        &self,
        iteration: u64,
        groups: Vec<LabelledGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<DiscriminatorStep>> + Send + '_>> {
        Box::pin(async move {
            let items = crate::convert::labelled_responses(&groups);
            let req = with_timeout(pb::TrainRequest { items, iteration }, self.timeout);
            self.client
                .clone()
                .train(req)
                .await
                .map(|r| DiscriminatorStep::from(r.into_inner()))
                .map_err(|status| {
                    LearnerError::Discriminator(RpcError::new(
                        "discriminator",
                        &self.addr,
                        "Train",
                        status,
                    ))
                })
        })
    }
}

/// Rank 0's clients of the other ranks' `LearnerRanks` service.
#[derive(Debug, Clone)]
pub struct GrpcPeers {
    /// Indexed by rank (rank 0's entry is unused).
    peers: Vec<(String, LearnerRanksClient<Channel>)>,
    timeout: Duration,
}

impl GrpcPeers {
    /// Clients of `rank_addrs` (every rank's learner address); `timeout` bounds a whole
    /// TrainShard call (the step included).
    pub fn connect_lazy(
        rank_addrs: &[String],
        timeout: Duration,
        security: &Security,
    ) -> Result<Self> {
        let peers = rank_addrs
            .iter()
            .map(|a| {
                let channel = ril_proto::client::connect_lazy(a, timeout, security)?;
                Ok((a.clone(), ril_proto::client::learner_ranks(channel)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { peers, timeout })
    }
}

impl ShardPeers for GrpcPeers {
    fn train_shard(
        &self,
        rank: u32,
        iteration: u64,
        groups: Vec<IncomingGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<u64>> + Send + '_>> {
        Box::pin(async move {
            let (addr, client) = self.peers.get(rank as usize).ok_or_else(|| {
                LearnerError::Invalid(format!("no learner rank {rank} to send a shard to"))
            })?;
            let req = with_timeout(
                pb::TrainShardRequest {
                    iteration,
                    groups: groups.iter().map(pb::ScoredGroup::from).collect(),
                },
                self.timeout,
            );
            client
                .clone()
                .train_shard(req)
                .await
                .map(|r| r.into_inner().policy_version)
                .map_err(|status| LearnerError::PeerRank {
                    rank,
                    iteration,
                    source: RpcError::new("learner", addr, "TrainShard", status),
                })
        })
    }
}
