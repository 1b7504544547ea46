//! The learner's gRPC clients, behind the service's link traits: the coordinator
//! ([`GrpcCoordinator`]), the discriminator ([`GrpcDiscriminator`]) and the other learner ranks
//! ([`GrpcPeers`]). Every call has a deadline, sent as `grpc-timeout` and enforced here too
//! ([`within`]: a peer that stops answering with its connection open fails the call as
//! DEADLINE_EXCEEDED); a failed call is an [`RpcError`] naming the peer, its address and the call.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use ril_proto::client::{Channel, within};
use ril_proto::error::RpcError;
use ril_proto::security::Security;
use ril_proto::v1 as pb;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use ril_proto::v1::learner_ranks_client::LearnerRanksClient;
use tonic::{Request, Response, Status};

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

/// The file in rank 0's out_dir that holds its publisher key (64 hex digits, owner-only).
pub const PUBLISHER_KEY_FILE: &str = "publisher.key";

const PUBLISHER_KEY_BYTES: usize = 32;

/// 32 random bytes.
fn new_publisher_key() -> Bytes {
    use rand::RngCore;
    let mut key = [0u8; PUBLISHER_KEY_BYTES];
    rand::rng().fill_bytes(&mut key);
    Bytes::copy_from_slice(&key)
}

/// Rank 0's publisher key: read from `out_dir/publisher.key`, or made and written there
/// (readable by the owner only) on the learner's first start. The coordinator takes a rank 0
/// only with the key the run's first rank 0 joined with, so the key lives beside the
/// checkpoints: a restarted learner resumes both, and a learner without them cannot take the
/// run over.
pub fn publisher_key(out_dir: &Path) -> Result<Bytes> {
    let path = out_dir.join(PUBLISHER_KEY_FILE);
    let bad = |problem: String| {
        LearnerError::Invalid(format!(
            "{}: {problem} (the learner's publisher key: 64 hex digits; remove the file only \
             to start a new run in this out_dir)",
            path.display()
        ))
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = hex::decode(text.trim()).map_err(|e| bad(format!("not hex: {e}")))?;
            if key.len() != PUBLISHER_KEY_BYTES {
                return Err(bad(format!(
                    "{} bytes, not {PUBLISHER_KEY_BYTES}",
                    key.len()
                )));
            }
            Ok(Bytes::from(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = new_publisher_key();
            ril_common::fs::write_atomic_with(&path, |w| {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    w.get_ref()
                        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
                }
                w.write_all(hex::encode(&key).as_bytes())
            })?;
            Ok(key)
        }
        Err(source) => Err(LearnerError::Io { path, source }),
    }
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
    /// `publisher_key`: rank 0's ([`publisher_key`]); `None` for the other ranks, which never
    /// send one.
    pub fn connect_lazy(
        addr: &str,
        timeout: Duration,
        security: &Security,
        publisher_key: Option<Bytes>,
    ) -> Result<Self> {
        let channel = ril_proto::client::connect_lazy(addr, timeout, security)?;
        Ok(Self {
            client: ril_proto::client::coordinator(channel),
            addr: addr.to_string(),
            timeout,
            publisher_key: publisher_key.unwrap_or_default(),
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

    /// Awaits `reply` for at most the deadline ([`within`]); a failure names the call.
    async fn ask<T>(
        &self,
        call: &'static str,
        reply: impl Future<Output = std::result::Result<Response<T>, Status>>,
    ) -> Result<T> {
        within(self.timeout, reply)
            .await
            .map(Response::into_inner)
            .map_err(self.failed(call))
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
            .ask("AcceptGroup", self.client.clone().accept_group(req))
            .await?;
        Ok(if reply.accepted {
            Acceptance::Accepted
        } else {
            Acceptance::Refused(reply.reason)
        })
    }

    async fn return_question(&self, position: u64, lease_id: String, reason: String) -> Result<()> {
        let req = self.request(pb::ReturnQuestionRequest {
            position,
            reason,
            lease_id,
        });
        self.ask("ReturnQuestion", self.client.clone().return_question(req))
            .await
            .map(|_| ())
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
        self.ask("PublishVersion", self.client.clone().publish_version(req))
            .await
            .map(|_| ())
    }

    async fn report_metrics(&self, iteration: u64, metrics: BTreeMap<String, f64>) -> Result<()> {
        let req = self.request(pb::ReportMetricsRequest {
            iteration,
            metrics: metrics.into_iter().collect(),
        });
        self.ask("ReportMetrics", self.client.clone().report_metrics(req))
            .await
            .map(|_| ())
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
        self.ask("JoinLearner", self.client.clone().join_learner(req))
            .await
            .map(JoinReply::from)
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
            within(self.timeout, self.client.clone().train(req))
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
            within(self.timeout, client.clone().train_shard(req))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator whose kernel still accepts connections but that never answers (a stopped
    /// process, a wedged server): every learner call fails at its deadline as DEADLINE_EXCEEDED
    /// naming the peer, its address, the call and the deadline (a retryable, outcome-unknown
    /// failure), the same reading as the actor's calls, instead of tonic's CANCELLED "Timeout
    /// expired" (what these calls read as before they went through `within`).
    #[tokio::test]
    async fn a_peer_that_accepts_and_never_answers_fails_the_call_at_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Accept and hold every connection open without reading or writing a byte.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                held.push(conn);
            }
        });
        let deadline = Duration::from_millis(400);
        let security = Security::plaintext(ril_proto::security::Role::Learner);
        let coordinator = GrpcCoordinator::connect_lazy(&addr, deadline, &security, None).unwrap();
        let started = std::time::Instant::now();
        let e = coordinator
            .report_metrics(3, BTreeMap::new())
            .await
            .unwrap_err()
            .to_string();
        let took = started.elapsed();
        assert!(
            e.contains("coordinator")
                && e.contains(&addr)
                && e.contains("ReportMetrics")
                && e.contains("DeadlineExceeded")
                && e.contains("no reply within the deadline of 400 ms"),
            "{e}"
        );
        assert!(took >= deadline, "failed before its deadline: {took:?}");
        assert!(
            took < Duration::from_secs(5),
            "took {took:?} for a 400 ms deadline"
        );
        // The same for a call whose retry loop the caller owns (AcceptGroup).
        let e = coordinator
            .accept_group(GroupKey {
                lease_id: "l-1".into(),
                position: 0,
                question_id: "q-0".into(),
                iteration: 0,
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AcceptGroup") && e.contains("DeadlineExceeded"),
            "{e}"
        );
    }

    #[test]
    fn the_publisher_key_is_made_once_kept_owner_only_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("learner");
        let key = publisher_key(&out).unwrap();
        assert_eq!(key.len(), PUBLISHER_KEY_BYTES);
        let path = out.join(PUBLISHER_KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "readable by the owner only");
        }
        // A restart reads the same key; another out_dir gets another.
        assert_eq!(publisher_key(&out).unwrap(), key);
        assert_ne!(publisher_key(&dir.path().join("other")).unwrap(), key);
        // A damaged file is an error naming it, never replaced by a new key.
        std::fs::write(&path, "zz").unwrap();
        let e = publisher_key(&out).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("not hex"),
            "{e}"
        );
        std::fs::write(&path, "abcd").unwrap();
        let e = publisher_key(&out).unwrap_err().to_string();
        assert!(e.contains("2 bytes, not 32"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abcd");
    }
}
