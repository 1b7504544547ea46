//! The thin gRPC adapter: `ril.v1.Learner` over [`LearnerService`], the coordinator client as a
//! [`CoordinatorLink`], and [`serve`], which runs the learner role.
//!
//! Wire conversion happens here (every field checked; a bad group becomes its verdict, never an
//! RPC error); the model-level checks and all decisions are the domain's.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use ril_proto::client::Channel;
use ril_proto::security::Security;
use ril_proto::server::{self, Bound, DEFAULT_MAX_MESSAGE_BYTES, ServingStatus, names};
use ril_proto::v1 as pb;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use ril_proto::v1::learner_ranks_client::LearnerRanksClient;
use ril_proto::v1::learner_ranks_server::{LearnerRanks, LearnerRanksServer};
use ril_proto::v1::learner_server::{Learner, LearnerServer};
use tokio::sync::watch;
use tonic::{Request, Response as GrpcResponse, Status};

use crate::collective::SingleRank;
use crate::error::{LearnerError, Result};
use crate::grpo::{Response, ResponseSource};
use crate::options::LearnerOptions;
use crate::service::{
    Acceptance, CoordinatorLink, GroupKey, IncomingGroup, LearnerService, Rejection, ShardPeers,
    Verdict,
};
use crate::trainer::Trainer;

/// Weight chunk size when the request leaves `chunk_bytes` at 0.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// The largest chunk served, whatever the request asks (well below the message limit).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// The one table from learner errors to gRPC codes.
pub fn status(e: &LearnerError) -> Status {
    let msg = e.to_string();
    match e {
        LearnerError::VersionNotHeld { .. } => Status::failed_precondition(msg),
        LearnerError::NotReady(_) | LearnerError::ShuttingDown => Status::unavailable(msg),
        LearnerError::Failed(_) => Status::aborted(msg),
        LearnerError::Invalid(_) => Status::invalid_argument(msg),
        _ => Status::internal(msg),
    }
}

/// A wire group as a domain group. Structural problems (no question, an unreadable question,
/// an unspecified response source) are rejections naming the position and field.
pub fn incoming_group(g: &pb::ScoredGroup) -> std::result::Result<IncomingGroup, Rejection> {
    let p = g.position;
    let question = g
        .question
        .as_ref()
        .ok_or_else(|| Rejection::new(p, "question", "missing"))?;
    let row = ril_proto::convert::question_to_row(question)
        .map_err(|e| Rejection::new(p, format!("question.{}", e.field), e.to_string()))?;
    let responses = g
        .responses
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let source = match pb::ResponseSource::try_from(r.source) {
                Ok(pb::ResponseSource::Student) => ResponseSource::Student,
                Ok(pb::ResponseSource::Teacher) => ResponseSource::Teacher,
                _ => {
                    return Err(Rejection::new(
                        p,
                        format!("responses[{i}].source"),
                        format!("{} is neither STUDENT nor TEACHER", r.source),
                    ));
                }
            };
            Ok(Response {
                source,
                token_ids: r.token_ids.clone(),
                behaviour_logprobs: match source {
                    ResponseSource::Student => r.behaviour_logprobs.clone(),
                    // Teacher tokens are scored by the learner itself.
                    ResponseSource::Teacher => Vec::new(),
                },
                policy_version: r.policy_version,
                d_prob: r.d_prob,
                r_sim: r.r_sim,
                r_ans: r.r_ans,
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(IncomingGroup {
        lease_id: g.lease_id.clone(),
        position: p,
        iteration: g.iteration,
        row,
        prompt_ids: g.prompt_token_ids.clone(),
        responses,
        actor_id: g.actor_id.clone(),
        timings_ms: g.timings_ms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    })
}

/// The coordinator's gRPC client as the learner's [`CoordinatorLink`]; every call has a
/// deadline.
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    client: CoordinatorClient<Channel>,
    timeout: Duration,
    discriminator: Option<DiscriminatorLink>,
    /// This process's publisher key: rank 0 joins with it, and the coordinator takes
    /// AcceptGroup and PublishVersion only with it (JoinLearnerRequest.publisher_key).
    publisher_key: Bytes,
}

/// Labelled responses of accepted groups, per iteration, for the discriminator's online step.
pub type DiscriminatorBuffer = Arc<Mutex<BTreeMap<u64, Vec<pb::LabelledResponse>>>>;

/// The discriminator service, trained once per iteration on that iteration's responses.
#[derive(Debug, Clone)]
pub struct DiscriminatorLink {
    client: DiscriminatorClient<Channel>,
    addr: String,
    buffer: DiscriminatorBuffer,
}

impl DiscriminatorLink {
    pub fn connect_lazy(addr: &str, timeout: Duration, security: &Security) -> Result<Self> {
        Ok(Self {
            client: DiscriminatorClient::new(ril_proto::client::connect_lazy(
                addr, timeout, security,
            )?)
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
            addr: addr.to_string(),
            buffer: Arc::default(),
        })
    }

    pub fn buffer(&self) -> DiscriminatorBuffer {
        self.buffer.clone()
    }
}

/// The labelled responses of an accepted group (student -> 1, teacher -> 0).
pub fn labelled_responses(g: &pb::ScoredGroup) -> Vec<pb::LabelledResponse> {
    g.responses
        .iter()
        .filter_map(|r| {
            let from_student = match pb::ResponseSource::try_from(r.source) {
                Ok(pb::ResponseSource::Student) => true,
                Ok(pb::ResponseSource::Teacher) => false,
                _ => return None,
            };
            Some(pb::LabelledResponse {
                question: g.question.clone(),
                response: r.text.clone(),
                from_student,
            })
        })
        .collect()
}

fn rpc_error(rpc: &'static str, s: Status) -> LearnerError {
    LearnerError::Coordinator {
        rpc,
        source: Box::new(s),
    }
}

/// 32 random bytes, fresh for every learner process.
fn new_publisher_key() -> Bytes {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    Bytes::copy_from_slice(&key)
}

impl GrpcCoordinator {
    /// A client that connects on first use (and reconnects after a coordinator restart).
    pub fn connect_lazy(addr: &str, timeout: Duration, security: &Security) -> Result<Self> {
        let channel = ril_proto::client::connect_lazy(addr, timeout, security)?;
        Ok(Self {
            client: CoordinatorClient::new(channel)
                .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
            timeout,
            discriminator: None,
            publisher_key: new_publisher_key(),
        })
    }

    /// Also trains the discriminator at `link` after every iteration.
    pub fn with_discriminator(mut self, link: DiscriminatorLink) -> Self {
        self.discriminator = Some(link);
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.set_timeout(self.timeout);
        r
    }

    /// JoinLearner: the rank rendezvous, and the learner's first contact with the coordinator.
    pub async fn join_learner(
        &self,
        rank: u32,
        addr: &str,
        collective_addr: &str,
        collective_id: &[u8],
        version: u64,
    ) -> Result<pb::JoinLearnerResponse> {
        let req = self.request(pb::JoinLearnerRequest {
            rank,
            addr: addr.to_string(),
            collective_id: Bytes::copy_from_slice(collective_id),
            collective_addr: collective_addr.to_string(),
            version,
            publisher_key: if rank == 0 {
                self.publisher_key.clone()
            } else {
                Bytes::new()
            },
        });
        self.client
            .clone()
            .join_learner(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| rpc_error("JoinLearner", s))
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
            .map_err(|s| rpc_error("AcceptGroup", s))?
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
            .map_err(|s| rpc_error("ReturnQuestion", s))
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
            .map_err(|s| rpc_error("PublishVersion", s))
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
            .map_err(|s| rpc_error("ReportMetrics", s))
    }

    async fn after_iteration(&self, iteration: u64) -> Result<BTreeMap<String, f64>> {
        let Some(d) = &self.discriminator else {
            return Ok(BTreeMap::new());
        };
        let items = {
            let mut b = d.buffer.lock().map_err(|_| {
                LearnerError::Failed("the discriminator buffer lock is poisoned".into())
            })?;
            // Older iterations can no longer train (their groups were dropped or re-issued).
            let items = b.remove(&iteration).unwrap_or_default();
            b.retain(|&it, _| it > iteration);
            items
        };
        if items.is_empty() {
            return Ok(BTreeMap::new());
        }
        let n = items.len();
        let mut req = Request::new(pb::TrainRequest { items, iteration });
        // A D step on a few dozen responses; generous next to a coordinator call.
        req.set_timeout(self.timeout * 30);
        let r = d
            .client
            .clone()
            .train(req)
            .await
            .map_err(|s| {
                LearnerError::Failed(format!(
                    "discriminator at {}: Train for iteration {iteration}: {:?}: {}",
                    d.addr,
                    s.code(),
                    s.message()
                ))
            })?
            .into_inner();
        let mut m = BTreeMap::new();
        if !r.skipped {
            m.insert("d_train_loss".to_string(), f64::from(r.loss));
            m.insert("d_train_accuracy".to_string(), f64::from(r.accuracy));
        }
        m.insert("d_step".to_string(), r.step as f64);
        m.insert("d_train_items".to_string(), n as f64);
        Ok(m)
    }
}

/// `ril.v1.Learner` over the domain service, which is set once the model is loaded.
#[derive(Debug, Clone)]
pub struct LearnerGrpc<C: CoordinatorLink> {
    service: Arc<OnceLock<LearnerService<C>>>,
    discriminator_buffer: Option<DiscriminatorBuffer>,
    /// Rank 0's address (from the rendezvous): where a rank > 0 sends groups pushed to it.
    rank0_addr: Arc<OnceLock<String>>,
}

impl<C: CoordinatorLink> LearnerGrpc<C> {
    pub fn new(service: Arc<OnceLock<LearnerService<C>>>) -> Self {
        Self {
            service,
            discriminator_buffer: None,
            rank0_addr: Arc::new(OnceLock::new()),
        }
    }

    /// The cell `serve` fills with rank 0's address once the ranks have met.
    pub fn rank0_addr(&self) -> Arc<OnceLock<String>> {
        self.rank0_addr.clone()
    }

    /// Accepted groups' responses also go to `buffer` (the discriminator's per-iteration data).
    pub fn with_discriminator_buffer(mut self, buffer: DiscriminatorBuffer) -> Self {
        self.discriminator_buffer = Some(buffer);
        self
    }

    fn ready(&self) -> std::result::Result<&LearnerService<C>, Status> {
        self.service.get().ok_or_else(|| {
            status(&LearnerError::NotReady(
                "loading the model or waiting for the coordinator".into(),
            ))
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::WeightChunk, Status>> + Send>>;

fn verdict_to_wire(v: Verdict) -> pb::GroupVerdict {
    pb::GroupVerdict {
        position: v.position,
        accepted: v.accepted,
        reason: v.reason,
    }
}

#[tonic::async_trait]
impl<C: CoordinatorLink> Learner for LearnerGrpc<C> {
    #[tracing::instrument(skip(self, request), fields(groups))]
    async fn push_groups(
        &self,
        request: Request<pb::PushGroupsRequest>,
    ) -> std::result::Result<GrpcResponse<pb::PushGroupsResponse>, Status> {
        let service = self.ready()?;
        let rank = service.options().rank;
        if rank > 0 {
            return Err(Status::failed_precondition(format!(
                "this is learner rank {rank}: push to rank 0 at {}",
                self.rank0_addr
                    .get()
                    .map(String::as_str)
                    .unwrap_or("(unknown)")
            )));
        }
        let groups = request.into_inner().groups;
        tracing::Span::current().record("groups", groups.len());
        if groups.is_empty() {
            // Actors push only when they have groups: an empty push is a client bug.
            return Err(Status::invalid_argument(
                "PushGroups: field `groups`: no groups (push at least one scored group)",
            ));
        }
        let mut verdicts = Vec::with_capacity(groups.len());
        for g in &groups {
            let verdict = match incoming_group(g) {
                Ok(incoming) => {
                    let v = service.push_group(incoming).await;
                    if v.accepted
                        && let Some(buf) = &self.discriminator_buffer
                        && let Ok(mut b) = buf.lock()
                    {
                        b.entry(g.iteration)
                            .or_default()
                            .extend(labelled_responses(g));
                    }
                    v
                }
                Err(rejection) => Verdict {
                    position: g.position,
                    accepted: false,
                    reason: rejection.to_string(),
                },
            };
            verdicts.push(verdict_to_wire(verdict));
        }
        Ok(GrpcResponse::new(pb::PushGroupsResponse {
            verdicts,
            policy_version: service.current_version(),
        }))
    }

    type GetWeightsStream = ChunkStream;

    #[tracing::instrument(skip(self, request))]
    async fn get_weights(
        &self,
        request: Request<pb::GetWeightsRequest>,
    ) -> std::result::Result<GrpcResponse<Self::GetWeightsStream>, Status> {
        let service = self.ready()?;
        let req = request.into_inner();
        let payload = service.weights(req.version).map_err(|e| status(&e))?;
        let chunk = match req.chunk_bytes as usize {
            0 => DEFAULT_CHUNK_BYTES,
            n => n.min(MAX_CHUNK_BYTES),
        };
        let total = payload.bytes.len();
        let n_chunks = total.div_ceil(chunk).max(1);
        let stream = futures_util::stream::iter((0..n_chunks).map(move |i| {
            let start = i * chunk;
            let end = (start + chunk).min(total);
            let last = i + 1 == n_chunks;
            Ok(pb::WeightChunk {
                version: Some(pb::PolicyVersion {
                    version: payload.version,
                }),
                offset: start as u64,
                total_bytes: total as u64,
                data: payload.bytes.slice(start..end),
                sha256: if last {
                    Bytes::copy_from_slice(&payload.sha256)
                } else {
                    Bytes::new()
                },
            })
        }));
        Ok(GrpcResponse::new(Box::pin(stream) as ChunkStream))
    }

    #[tracing::instrument(skip(self, _request))]
    async fn info(
        &self,
        _request: Request<pb::LearnerInfoRequest>,
    ) -> std::result::Result<GrpcResponse<pb::LearnerInfo>, Status> {
        let info = self.ready()?.info().map_err(|e| status(&e))?;
        Ok(GrpcResponse::new(pb::LearnerInfo {
            policy_version: info.policy_version,
            iteration: info.iteration,
            rank: info.rank,
            world_size: info.world_size,
            weights_bytes: info.weights_bytes,
            weights_sha256: info.weights_sha256,
        }))
    }
}

#[tonic::async_trait]
impl<C: CoordinatorLink> LearnerRanks for LearnerGrpc<C> {
    #[tracing::instrument(skip(self, request), fields(iteration, groups))]
    async fn train_shard(
        &self,
        request: Request<pb::TrainShardRequest>,
    ) -> std::result::Result<GrpcResponse<pb::TrainShardResponse>, Status> {
        let service = self.ready()?;
        if service.options().rank == 0 {
            return Err(Status::failed_precondition(
                "TrainShard goes to learner ranks > 0; this is rank 0",
            ));
        }
        let req = request.into_inner();
        tracing::Span::current().record("iteration", req.iteration);
        tracing::Span::current().record("groups", req.groups.len());
        let shard = req
            .groups
            .iter()
            .map(incoming_group)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|r| Status::invalid_argument(r.to_string()))?;
        let policy_version =
            service
                .train_shard(req.iteration, shard)
                .await
                .map_err(|e| match e {
                    LearnerError::Invalid(m) => Status::failed_precondition(m),
                    e => status(&e),
                })?;
        Ok(GrpcResponse::new(pb::TrainShardResponse { policy_version }))
    }
}

/// A domain group back in its wire form (for sending it to another rank).
pub fn scored_group(g: &IncomingGroup) -> pb::ScoredGroup {
    pb::ScoredGroup {
        lease_id: g.lease_id.clone(),
        position: g.position,
        iteration: g.iteration,
        question: Some(ril_proto::convert::row_to_question(&g.row)),
        prompt_token_ids: g.prompt_ids.clone(),
        responses: g
            .responses
            .iter()
            .map(|r| pb::ScoredResponse {
                source: match r.source {
                    ResponseSource::Student => pb::ResponseSource::Student,
                    ResponseSource::Teacher => pb::ResponseSource::Teacher,
                } as i32,
                token_ids: r.token_ids.clone(),
                behaviour_logprobs: r.behaviour_logprobs.clone(),
                policy_version: r.policy_version,
                d_prob: r.d_prob,
                r_sim: r.r_sim,
                r_ans: r.r_ans,
                ..Default::default()
            })
            .collect(),
        actor_id: g.actor_id.clone(),
        timings_ms: g.timings_ms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
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
                Ok((
                    a.clone(),
                    LearnerRanksClient::new(ril_proto::client::connect_lazy(a, timeout, security)?)
                        .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
                ))
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
            let mut req = Request::new(pb::TrainShardRequest {
                iteration,
                groups: groups.iter().map(scored_group).collect(),
            });
            req.set_timeout(self.timeout);
            client
                .clone()
                .train_shard(req)
                .await
                .map(|r| r.into_inner().policy_version)
                .map_err(|s| {
                    LearnerError::Collective(format!(
                        "learner rank {rank} at {addr}: TrainShard for iteration {iteration}: \
                         {:?}: {}",
                        s.code(),
                        s.message()
                    ))
                })
        })
    }
}

/// Waits for `flag` to become true.
async fn raised(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// Rendezvous with the coordinator (JoinLearner), retrying until it answers; with several ranks,
/// polling until all have joined (at most `collective_timeout_ms` after the coordinator first
/// answered). Returns the ready answer (None: a coordinator without JoinLearner, one rank only).
async fn join_coordinator(
    link: &GrpcCoordinator,
    options: &LearnerOptions,
    advertise: &str,
    collective_addr: &str,
    collective_id: &[u8],
    version: u64,
) -> Result<Option<pb::JoinLearnerResponse>> {
    let mut attempt = 0u32;
    let mut waiting_since: Option<std::time::Instant> = None;
    let wait_limit = Duration::from_millis(options.collective_timeout_ms);
    loop {
        match link
            .join_learner(
                options.rank,
                advertise,
                collective_addr,
                collective_id,
                version,
            )
            .await
        {
            Ok(reply) => {
                if reply.world_size != 0 && reply.world_size != options.world_size {
                    return Err(LearnerError::Invalid(format!(
                        "the coordinator at {} runs {} learner ranks, this learner was configured \
                         with world_size {}",
                        options.coordinator_addr, reply.world_size, options.world_size
                    )));
                }
                if reply.ready {
                    if options.world_size > 1
                        && (reply.rank_addrs.len() != options.world_size as usize
                            || reply.collective_addrs.len() != options.world_size as usize
                            || reply.collective_addrs.iter().any(String::is_empty))
                    {
                        return Err(LearnerError::Invalid(format!(
                            "the coordinator at {} answered the rendezvous of {} ranks with \
                             learner addresses {:?} and collective addresses {:?} (a coordinator \
                             too old to hand out collective addresses?)",
                            options.coordinator_addr,
                            options.world_size,
                            reply.rank_addrs,
                            reply.collective_addrs
                        )));
                    }
                    return Ok(Some(reply));
                }
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= wait_limit {
                    let missing: Vec<String> = (0..options.world_size)
                        .filter(|&r| {
                            reply
                                .collective_addrs
                                .get(r as usize)
                                .is_none_or(String::is_empty)
                        })
                        .map(|r| r.to_string())
                        .collect();
                    return Err(LearnerError::Collective(format!(
                        "learner rank {}: the other learner ranks did not all join within {} ms \
                         (collective_timeout_ms): missing rank(s) {}",
                        options.rank,
                        options.collective_timeout_ms,
                        missing.join(", ")
                    )));
                }
            }
            Err(LearnerError::Coordinator { source, .. })
                if source
                    .downcast_ref::<Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unimplemented) =>
            {
                if options.world_size > 1 {
                    return Err(LearnerError::Invalid(format!(
                        "the coordinator at {} does not implement JoinLearner, which {} learner \
                         ranks need to meet",
                        options.coordinator_addr, options.world_size
                    )));
                }
                tracing::warn!(
                    coordinator = %options.coordinator_addr,
                    "the coordinator does not implement JoinLearner; going on without a rendezvous"
                );
                return Ok(None);
            }
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(coordinator = %options.coordinator_addr, error = %e, "waiting for the coordinator");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the learner role on `bound` until `shutdown` resolves (or, with `exit_when_finished`,
/// until the run is finished, or a training step fails).
///
/// The server answers at once with health NOT_SERVING (`ril.v1.Learner` and the server as a
/// whole) and `Unavailable` for learner RPCs while the model loads and the coordinator is
/// reached; then SERVING. At shutdown: NOT_SERVING, buffered groups handed back, a checkpoint of
/// the current version written, the server drained. A failed training step ends it with that
/// error (after the same shutdown), so the process exits non-zero and can be resumed.
pub async fn serve(
    options: LearnerOptions,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    options.validate()?;
    let addr = bound.addr;
    let security = bound.security.clone();
    let (reporter, health_service) = server::health([names::LEARNER]).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection()?;
    let cell: Arc<OnceLock<LearnerService<GrpcCoordinator>>> = Arc::new(OnceLock::new());
    let timeout = Duration::from_millis(options.coordinator_timeout_ms);
    let discriminator = match &options.discriminator_addr {
        Some(a) if !a.is_empty() => Some(DiscriminatorLink::connect_lazy(a, timeout, &security)?),
        _ => None,
    };
    let mut grpc = LearnerGrpc::new(cell.clone());
    if let Some(d) = &discriminator {
        grpc = grpc.with_discriminator_buffer(d.buffer());
    }
    let rank0_cell = grpc.rank0_addr();
    let ranks = LearnerRanksServer::new(grpc.clone())
        .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
    let learner = LearnerServer::new(grpc)
        .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (signal_tx, signal_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal_tx.send(true);
    });
    let mut secure = bound.server(&health_service).await?;
    let server = tokio::spawn(
        secure
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(learner)
            .add_service(ranks)
            .serve_with_incoming_shutdown(server::incoming(bound), raised(stop_rx)),
    );
    tracing::info!(%addr, "learner listening (NOT_SERVING while loading)");
    let stop_server = |stop_tx: watch::Sender<bool>, server: tokio::task::JoinHandle<_>| async move {
        let _ = stop_tx.send(true);
        match server.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(LearnerError::Serve(server::ServeError::Serve {
                addr,
                source,
            })),
            Err(e) => Err(LearnerError::Failed(format!(
                "the gRPC server task failed: {e}"
            ))),
        }
    };
    // A failure while starting up stops the already-running server, then returns the error.
    macro_rules! stop_with {
        ($e:expr) => {{
            stop_server(stop_tx, server).await?;
            return Err($e);
        }};
    }

    let advertise = options
        .advertise_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    // The ring's listener is bound before the rendezvous, so its address can be announced.
    let ring_listener = if options.world_size > 1 && options.collective == "ring" {
        let fail = |e: String| {
            LearnerError::Collective(format!(
                "learner rank {}: collective_listen {:?}: {e}",
                options.rank, options.collective_listen
            ))
        };
        let listener = std::net::TcpListener::bind(&options.collective_listen)
            .map_err(|e| fail(e.to_string()));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => stop_with!(e),
        };
        let port = match listener.local_addr() {
            Ok(a) => a.port(),
            Err(e) => stop_with!(fail(e.to_string())),
        };
        Some((listener, port))
    } else {
        None
    };
    let collective_addr = match (&ring_listener, &options.collective_advertise) {
        (None, _) => String::new(),
        (Some(_), Some(a)) if !a.is_empty() => a.clone(),
        (Some((_, port)), _) => {
            let host = advertise
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(advertise.as_str());
            format!("{host}:{port}")
        }
    };
    // The model loads first, so the coordinator hands this learner's address to actors only
    // once it can serve weights.
    let opts = options.clone();
    let load = tokio::task::spawn_blocking(move || Trainer::open(&opts, Box::new(SingleRank)));
    let mut trainer = tokio::select! {
        loaded = load => match loaded {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => stop_with!(e),
            Err(e) => stop_with!(LearnerError::Failed(format!("loading the model failed: {e}"))),
        },
        _ = raised(signal_rx.clone()) => return stop_server(stop_tx, server).await,
    };
    let mut link = GrpcCoordinator::connect_lazy(&options.coordinator_addr, timeout, &security)?;
    if let Some(d) = discriminator {
        link = link.with_discriminator(d);
    }
    // With NCCL, rank 0 makes the communicator's unique id and the rendezvous hands it out.
    let nccl = options.world_size > 1 && options.collective == "nccl";
    let collective_id: Vec<u8> = if nccl && options.rank == 0 {
        match new_nccl_id() {
            Ok(id) => id,
            Err(e) => stop_with!(e),
        }
    } else {
        Vec::new()
    };
    let rendezvous = tokio::select! {
        joined = join_coordinator(&link, &options, &advertise, &collective_addr, &collective_id, trainer.state().version) => match joined {
            Ok(r) => r,
            Err(e) => stop_with!(e),
        },
        _ = raised(signal_rx.clone()) => return stop_server(stop_tx, server).await,
    };
    if let Some(r0) = rendezvous.as_ref().and_then(|r| r.rank_addrs.first()) {
        let _ = rank0_cell.set(r0.clone());
    }
    // A rank 0 resumed from a checkpoint publishes its version again: a harmless repeat when
    // the coordinator has it, and the missing publication when the learner stopped between
    // writing the checkpoint and publishing it.
    let resumed = trainer.state().version;
    if options.rank == 0 && resumed > 0 {
        let checkpoint = crate::trainer::checkpoint_dir(&options.out_dir, resumed);
        if let Err(e) = link
            .publish_version(resumed, resumed - 1, Some(checkpoint))
            .await
        {
            stop_with!(e);
        }
    }
    if nccl {
        let opts = options.clone();
        let id = rendezvous
            .as_ref()
            .map(|r| r.collective_id.to_vec())
            .unwrap_or_default();
        let join = tokio::task::spawn_blocking(move || {
            let c = connect_nccl(&opts, &id)?;
            trainer.set_collective(c);
            trainer.verify_replicas(&trainer.weights_payload()?)?;
            Ok::<_, LearnerError>(trainer)
        });
        trainer = match join.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => stop_with!(e),
            Err(e) => stop_with!(LearnerError::Failed(format!("joining NCCL failed: {e}"))),
        };
    } else if let Some((listener, _)) = ring_listener {
        let opts = options.clone();
        let collective_addrs = rendezvous
            .as_ref()
            .map(|r| r.collective_addrs.clone())
            .unwrap_or_default();
        let join_ring = tokio::task::spawn_blocking(move || {
            let ring = crate::ring::TcpRing::connect(
                opts.rank as usize,
                listener,
                &collective_addrs,
                Duration::from_millis(opts.collective_timeout_ms),
                (opts.bucket_mb << 20) / std::mem::size_of::<f32>(),
            )?;
            trainer.set_collective(Box::new(ring));
            // Every rank starts from the same weights (or the run stops here, naming who
            // differs).
            trainer.verify_replicas(&trainer.weights_payload()?)?;
            Ok::<_, LearnerError>(trainer)
        });
        trainer = tokio::select! {
            joined = join_ring => match joined {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => stop_with!(e),
                Err(e) => stop_with!(LearnerError::Failed(format!("joining the ring failed: {e}"))),
            },
            _ = raised(signal_rx.clone()) => return stop_server(stop_tx, server).await,
        };
    }
    let peers: Option<Arc<dyn ShardPeers>> = match &rendezvous {
        Some(r) if options.rank == 0 && options.world_size > 1 => {
            // A TrainShard call covers the peer's whole step; the ring's own timeouts catch a
            // dead peer much sooner.
            let call_timeout = Duration::from_millis(options.collective_timeout_ms) * 10;
            Some(Arc::new(GrpcPeers::connect_lazy(
                &r.rank_addrs,
                call_timeout,
                &security,
            )?))
        }
        _ => None,
    };
    let exit_when_finished = options.exit_when_finished;
    let service = match tokio::task::spawn_blocking(move || {
        LearnerService::with_peers(trainer, link, options, peers)
    })
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => stop_with!(e),
        Err(e) => stop_with!(LearnerError::Failed(format!(
            "starting the service failed: {e}"
        ))),
    };
    let _ = cell.set(service.clone());
    server::set_status(&reporter, &[names::LEARNER], ServingStatus::Serving).await;
    tracing::info!(%addr, version = service.current_version(), "learner serving");

    let mut progress = service.progress();
    let failed = tokio::select! {
        _ = raised(signal_rx) => None,
        failed = async {
            progress
                .wait_for(|p| p.failed.is_some() || (exit_when_finished && p.finished))
                .await
                .ok()
                .and_then(|p| p.failed.clone())
        } => failed,
    };
    server::set_status(&reporter, &[names::LEARNER], ServingStatus::NotServing).await;
    let saved = service.shutdown().await;
    let stopped = stop_server(stop_tx, server).await;
    if let Some(reason) = failed {
        return Err(LearnerError::Failed(reason));
    }
    saved?;
    stopped
}

#[cfg(feature = "nccl")]
fn new_nccl_id() -> Result<Vec<u8>> {
    crate::nccl::new_unique_id()
}

#[cfg(not(feature = "nccl"))]
fn new_nccl_id() -> Result<Vec<u8>> {
    Err(LearnerError::Invalid(
        "collective = \"nccl\" needs a build with `--features nccl`".into(),
    ))
}

/// The NCCL collective on this rank's CUDA device (`device = "cuda:N"`).
#[cfg(feature = "nccl")]
fn connect_nccl(
    opts: &LearnerOptions,
    id: &[u8],
) -> Result<Box<dyn crate::collective::Collective>> {
    let ordinal = opts.cuda_ordinal()?.unwrap_or(0);
    Ok(Box::new(crate::nccl::NcclCollective::connect(
        opts.rank as usize,
        opts.world_size as usize,
        ordinal,
        id,
        Duration::from_millis(opts.collective_timeout_ms),
        (opts.bucket_mb << 20) / std::mem::size_of::<f32>(),
    )?))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(
    _opts: &LearnerOptions,
    _id: &[u8],
) -> Result<Box<dyn crate::collective::Collective>> {
    Err(LearnerError::Invalid(
        "collective = \"nccl\" needs a build with `--features nccl`".into(),
    ))
}
